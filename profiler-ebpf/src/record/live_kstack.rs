//! The current task's kernel stack without walking it, where it is one
//! walked before: remembered with where its return addresses sat, and
//! reused when every one of them is there again (allowing for the
//! per-syscall random offset) in the same syscall. A walk costs 4 to 12 µs
//! here. The lock tracer's waiters at a contention end and the wakers
//! tracer's wakers use it.
//!
//! Where the return addresses are is read from the 4 KiB below the task's
//! entry registers, the top of its kernel stack. (Not relative to the
//! program's frame: since Linux 6.13 a tracing program may run on a
//! private stack.) Only in process context: an interrupt on its own stack
//! has no frames there, and the task stack under it may still hold a
//! whole earlier stack that would match.

use aya_ebpf::{EbpfContext, cty::c_void, helpers::generated, macros::map, maps::PerCpuArray};
use profiler_common::record::{
    Counter, KSTACK_UNCHECKED, LIVE_KSTACK_FRAMES, LIVE_KSTACK_WORDS, LiveKstack, STACK_ID_MIN,
    StackBuf,
};

use super::{
    common::{EntryRegs, count},
    stacks::{STACK_SCRATCH, kern_stack, kern_stack_or_reason, verified, walk_stack},
};

/// Scratch for the top 4 KiB of the current task's kernel stack.
#[map]
static LIVE_KSTACK_SCRATCH: PerCpuArray<[u64; LIVE_KSTACK_WORDS]> =
    PerCpuArray::with_max_entries(1, 0);

/// `bpf_get_stack`'s count of innermost frames to leave out: the first is
/// in the calling program (a BTF tracepoint's walk starts there).
const SKIP_OWN_FRAME: u64 = 1;

/// The current task's kernel stack: one of the `N` `slots` (a power of
/// two) if it is the live one, else a walk, remembered in slot `*next`
/// (which then moves on). `counters`: a reuse, a walk, and a reuse that
/// differs from the walk done anyway (`verify_stack_cache`).
#[inline(always)]
pub(super) fn live_kern_stack<C: EbpfContext, const N: usize>(
    ctx: &C,
    window: u32,
    slots: *mut [LiveKstack; N],
    next: *mut u32,
    [cached, walked, differs]: [Counter; 3],
) -> u64 {
    let Some(words) = LIVE_KSTACK_SCRATCH.get_ptr_mut(0) else {
        count(walked);
        return kern_stack(ctx, window);
    };
    // The top of the kernel stack is just under the entry registers.
    let regs = EntryRegs::current();
    let nr = regs.syscall();
    let bytes = (LIVE_KSTACK_WORDS * 8) as u64;
    // SAFETY: the stack is read with the checked helper into this CPU's
    // scratch.
    let cache = unsafe {
        generated::bpf_probe_read_kernel(
            words.cast(),
            bytes as u32,
            (regs.addr() - bytes) as *const c_void,
        ) == 0
    };
    let mut reused = 0;
    if cache {
        let mut k = 0;
        while k < N {
            // SAFETY: k < N, inside the caller's slots.
            let c = unsafe { (&raw mut (*slots)[k]).cast::<LiveKstack>() };
            if matches(c, words, nr) {
                count(cached);
                // SAFETY: as above.
                reused = unsafe { (*c).id };
                if config!(verify_stack_cache) == 0 {
                    return reused;
                }
                break;
            }
            k += 1;
        }
    }
    if reused == 0 {
        count(walked);
    }
    // Without this program's own frame (where the walk returns to it): a
    // later check runs before any walk, and only the frames of the live
    // chain, the tracepoint's runner first, can be found in place.
    let (id, frames) = walk_stack(ctx, SKIP_OWN_FRAME);
    let id = kern_stack_or_reason(id, window);
    if reused != 0 {
        return verified(reused, id, differs);
    }
    if let (true, Some(ips)) = (id >= STACK_ID_MIN && cache, STACK_SCRATCH.get_ptr(0)) {
        // SAFETY: the caller's slots; the slot is bounded.
        unsafe {
            let k = *next as usize & (N - 1);
            let c = (&raw mut (*slots)[k]).cast::<LiveKstack>();
            if remember(c, words, ips, frames) {
                (*c).id = id;
                (*c).syscall = nr;
                if N > 1 {
                    *next = ((k + 1) % N) as u32;
                }
            }
        }
    }
    id
}

/// Whether remembered stack `c` is the current one: the same syscall, its
/// innermost return address is found (the highest copy in the window:
/// older copies left by deeper calls are below the live frames), the
/// others are where they were, moved by as much, and the outermost, where
/// the walk ends under the entry registers, has not moved (above a
/// syscall's random offset; an exception's stack has none). The same
/// return addresses at the same places make the unwinder find the same
/// frames.
#[inline(always)]
fn matches(c: *mut LiveKstack, words: *const [u64; LIVE_KSTACK_WORDS], nr: u64) -> bool {
    // SAFETY: c is a valid map value, words this CPU's scratch; indices
    // are masked into range. The search's state is kept in the map value
    // (see `offcpu::kstack::remember`).
    let (entry, entry_end) = (config!(syscall_entry), config!(syscall_entry_end));
    unsafe {
        if (*c).id < STACK_ID_MIN || (*c).syscall != nr {
            return false;
        }
        let at0 = (*c).at[0] as usize & (LIVE_KSTACK_WORDS - 1);
        let ret0 = (*c).ret[0];
        core::ptr::write_volatile(&raw mut (*c).search, KSTACK_UNCHECKED);
        let mut w = LIVE_KSTACK_WORDS;
        while w > 0 {
            w -= 1;
            if (*words)[w] == ret0 {
                core::ptr::write_volatile(&raw mut (*c).search, w as u32);
                break;
            }
        }
        let now0 = core::ptr::read_volatile(&raw const (*c).search);
        if now0 == KSTACK_UNCHECKED {
            return false;
        }
        let now0 = now0 as usize;
        let frames = (*c).found as usize;
        if frames <= 1 {
            return now0 == at0;
        }
        let mut i = 1;
        while i < LIVE_KSTACK_FRAMES {
            if i >= frames {
                break;
            }
            let at = (*c).at[i] as usize & (LIVE_KSTACK_WORDS - 1);
            let ret = (*c).ret[i];
            let ok = if i + 1 < frames {
                // Moved as much as the innermost, inside the window.
                let moved = at + now0;
                moved >= at0
                    && moved - at0 < LIVE_KSTACK_WORDS
                    && (*words)[(moved - at0) & (LIVE_KSTACK_WORDS - 1)] == ret
            } else {
                // The outermost, just under the entry registers, where the
                // walk ends: not moved (else this is the same chain nested
                // deeper, under another entry), and the others moved only
                // if the random offset is between (a syscall).
                (*words)[at] == ret && (now0 == at0 || (ret >= entry && ret < entry_end))
            };
            if !ok {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// Finds, in one pass down from the top of the window, where the walked
/// stack's return addresses (`frames` of them in `ips`, outermost first
/// from the top) sit, and keeps them in `c`. False if the stack cannot be
/// checked that way: deeper than [`LIVE_KSTACK_FRAMES`], or a frame not in
/// the window (on the IRQ stack, or more than 4 KiB down).
#[inline(always)]
fn remember(
    c: *mut LiveKstack,
    words: *const [u64; LIVE_KSTACK_WORDS],
    ips: *const StackBuf,
    frames: usize,
) -> bool {
    // SAFETY: c is a valid map value, words and ips this CPU's scratch
    // values; indices are masked into range. The count of frames still to
    // find lives in the map value (see `offcpu::kstack::remember`).
    unsafe {
        (*c).id = 0;
        if frames == 0 || frames > LIVE_KSTACK_FRAMES {
            return false;
        }
        core::ptr::write_volatile(&raw mut (*c).found, frames as u32);
        let mut w = LIVE_KSTACK_WORDS;
        while w > 0 {
            w -= 1;
            let j = core::ptr::read_volatile(&raw const (*c).found) as usize;
            if j == 0 {
                break;
            }
            let j = (j - 1) & (LIVE_KSTACK_FRAMES - 1);
            let ip = (*ips).ips[j];
            if (*words)[w] == ip {
                (*c).at[j] = w as u32;
                (*c).ret[j] = ip;
                core::ptr::write_volatile(&raw mut (*c).found, j as u32);
            }
        }
        if core::ptr::read_volatile(&raw const (*c).found) != 0 {
            return false;
        }
        (*c).found = frames as u32;
        true
    }
}
