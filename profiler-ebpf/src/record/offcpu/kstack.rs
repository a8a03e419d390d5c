//! The kernel stack of a block, taken when the task comes back: from the
//! stopped task, or reused from the site it blocked at when the task is
//! in the same syscall with the same innermost return addresses at the
//! same places on its kernel stack.

use aya_ebpf::{
    bindings::task_struct,
    cty::c_void,
    helpers::{bpf_get_task_stack, bpf_probe_read_kernel, generated},
    macros::map,
    maps::PerCpuArray,
};
use profiler_common::record::{
    BLOCK_SITES, BlockSite, Counter, KSTACK_SCAN_WORDS, KSTACK_UNCHECKED, Loss, STACK_ID_MIN,
    StackBuf,
};

use crate::record::{
    common::{EntryRegs, count, lose},
    stacks::{ENOMEM, STACK_SCRATCH, kern_stack_or_reason, store_stack, verified},
};

/// Scratch for the top of a stopped task's kernel stack.
#[map]
static KSTACK_WORDS: PerCpuArray<[u64; KSTACK_SCAN_WORDS]> = PerCpuArray::with_max_entries(1, 0);

/// The word `at` words above `sp` on a kernel stack (0 if unreadable).
#[inline(always)]
fn kstack_word(sp: u64, at: u32) -> u64 {
    // SAFETY: a kernel read through the checked helper.
    unsafe { bpf_probe_read_kernel((sp + u64::from(at) * 8) as *const u64) }.unwrap_or(0)
}

/// The kernel stack of a stopped task that blocked at site `slot` (of
/// `sites`): the one walked there last time if the task is in the same
/// syscall and its stack holds the same two innermost return addresses at
/// the same places above its saved stack pointer; else a walk, remembered
/// for next time.
#[inline(always)]
pub(super) fn at_site(
    task: *mut task_struct,
    sites: *mut BlockSite,
    slot: u32,
    window: u32,
) -> u64 {
    let off = config!(task_thread_sp) as usize;
    let slot = slot as usize;
    if off == 0 || slot >= BLOCK_SITES {
        return task_kernel_stack(task, window);
    }
    let verify = config!(verify_stack_cache) != 0;
    // SAFETY: task is the tracepoint's BTF task pointer (its saved stack
    // pointer is read with the checked helper); slot < BLOCK_SITES, inside
    // the task's entry.
    unsafe {
        let sp = bpf_probe_read_kernel(task.cast::<u8>().add(off).cast::<u64>()).unwrap_or(0);
        let nr = EntryRegs::of(task).syscall();
        let site = sites.add(slot);
        if sp != 0 && (*site).kern_stack >= STACK_ID_MIN && (*site).syscall == nr {
            let [at0, at1] = (*site).kern_ret_at;
            if kstack_word(sp, at0) == (*site).kern_ret[0]
                && (at1 == KSTACK_UNCHECKED || kstack_word(sp, at1) == (*site).kern_ret[1])
            {
                count(Counter::OffCpuKernCached);
                if verify {
                    return verified(
                        (*site).kern_stack,
                        task_kernel_stack(task, window),
                        Counter::KernReuseDiffers,
                    );
                }
                return (*site).kern_stack;
            }
        }
        let id = task_kernel_stack(task, window);
        (*site).kern_stack = 0;
        if sp != 0 && id >= STACK_ID_MIN {
            remember(site, sp, nr, id);
        }
        id
    }
}

/// Finds where the return addresses just walked (still in the scratch)
/// sit above `sp`, and keeps them with the stack id in `site`.
///
/// The positions found are written straight into the map value, never held
/// in a register: the verifier then sees one state per loop step instead of
/// one per position, which is what keeps this loop within its limits.
#[inline(always)]
fn remember(site: *mut BlockSite, sp: u64, nr: u64, id: u64) {
    let (Some(words), Some(ips)) = (KSTACK_WORDS.get_ptr_mut(0), STACK_SCRATCH.get_ptr(0)) else {
        return;
    };
    // SAFETY: both are this CPU's scratch values, site a valid map value;
    // the kernel reads are checked (the top of the stack may be nearer than
    // 2 KiB: then a quarter is read).
    unsafe {
        let mut len = KSTACK_SCAN_WORDS;
        if generated::bpf_probe_read_kernel(words.cast(), (len * 8) as u32, sp as *const c_void)
            != 0
        {
            len = KSTACK_SCAN_WORDS / 4;
            if generated::bpf_probe_read_kernel(words.cast(), (len * 8) as u32, sp as *const c_void)
                != 0
            {
                return;
            }
        }
        let (ret0, ret1) = ((*ips).ips[0], (*ips).ips[1]);
        let at = &raw mut (*site).kern_ret_at;
        core::ptr::write_volatile(at, [KSTACK_UNCHECKED; 2]);
        let mut i = 0;
        while i < KSTACK_SCAN_WORDS {
            if i >= len {
                break;
            }
            let w = (*words)[i];
            if w == ret0 && core::ptr::read_volatile(&raw const (*at)[0]) == KSTACK_UNCHECKED {
                core::ptr::write_volatile(&raw mut (*at)[0], i as u32);
            } else if w == ret1
                && core::ptr::read_volatile(&raw const (*at)[0]) != KSTACK_UNCHECKED
                && core::ptr::read_volatile(&raw const (*at)[1]) == KSTACK_UNCHECKED
            {
                core::ptr::write_volatile(&raw mut (*at)[1], i as u32);
            }
            i += 1;
        }
        if core::ptr::read_volatile(&raw const (*at)[0]) == KSTACK_UNCHECKED {
            return;
        }
        (*site).kern_ret = [
            ret0,
            if core::ptr::read_volatile(&raw const (*at)[1]) == KSTACK_UNCHECKED {
                0
            } else {
                ret1
            },
        ];
        (*site).syscall = nr;
        (*site).kern_stack = id;
    }
}

/// The kernel stack of a task that is not running: where it blocked, as it
/// still is until it is switched in.
#[inline(always)]
fn task_kernel_stack(task: *mut task_struct, window: u32) -> u64 {
    count(Counter::OffCpuKernWalkIn);
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        lose(window, Loss::KernStackError);
        return u64::from(ENOMEM as u32);
    };
    // SAFETY: task is the tracepoint's BTF task pointer; buf is this CPU's
    // scratch value, one StackBuf long.
    let n =
        unsafe { bpf_get_task_stack(task, buf.cast(), core::mem::size_of::<StackBuf>() as u32, 0) };
    kern_stack_or_reason(store_stack(n), window)
}
