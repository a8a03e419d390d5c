//! Who woke a blocked thread (the wakers tracer, `offwaketime`'s
//! question): at `sched_waking` the waker — the task running the wakeup,
//! or an interrupt — is written with its stacks into the woken thread's
//! off-CPU entry; when the thread is switched in, the off-CPU tracer
//! charges its block to (blocked key, waker) as well ([`charge`]).
//!
//! The cost at every wakeup on the machine is one lookup of the woken
//! task's entry; only a traced thread's wakeup takes stacks.

use aya_ebpf::{
    EbpfContext as _,
    bindings::task_struct,
    helpers::{bpf_get_current_task_btf, bpf_probe_read_kernel},
    macros::map,
    maps::{HashMap, LruHashMap},
    programs::BtfTracePointContext,
};
use profiler_common::record::{
    COMM_LEN, Counter, LiveKstack, Loss, OFFSET_UNKNOWN, OFFWAKE_ENTRIES, OffCpuKey, OffCpuStart,
    OffCpuValue, OffWakeKey, STACK_ID_MIN, STACK_NOT_WALKED, TaskStacks, WAKE_SITES,
    WAKER_INTERRUPT, WAKER_SITES_ENTRIES, WakerSites,
};

use super::{OFFCPU_START, at_site, is_preemption, site_key};
use crate::{
    record::{
        common::{
            Task, comm_of, count, current_window, is_tracked, lose, now, offcpu_stopped,
            written_now,
        },
        live_kstack::live_kern_stack,
        stacks::{kern_stack, kern_stack_or_reason, user_stack, user_stack_walk, walk_stack_upto},
    },
    unwind,
};

#[map]
static OFFWAKE_TIMES: HashMap<OffWakeKey, OffCpuValue> =
    HashMap::with_max_entries(OFFWAKE_ENTRIES, 0);
/// Per waker thread, by task pointer: where it woke others from. LRU: a
/// thread gone is forgotten in time, without an exit hook.
#[map]
static WAKER_SITES: LruHashMap<u64, WakerSites> =
    LruHashMap::with_max_entries(WAKER_SITES_ENTRIES, 0);
/// A new waker's sites (larger than the BPF stack allows).
#[unsafe(no_mangle)]
static WAKER_SITES_EMPTY: WakerSites = WakerSites::EMPTY;

/// A waker seen this long before the block began still woke it: the
/// wakeup can run on another CPU while the thread is being switched out,
/// after it was taken off the run queue but before the off-CPU program
/// stamped the block's start. An older one woke an earlier block (or the
/// thread before it slept at all), and the block's own waker went unseen.
const WAKE_BEFORE_BLOCK_NS: u64 = 1_000_000;

/// Kernel frames walked of an interrupt's wakeup: from the program through
/// a timer's handlers to the interrupt's entry takes 10; walking on
/// through the interrupted context's stack would cost as much again (a
/// walk from an interrupt costs about 0.3 µs a frame here). A deeper
/// chain (a network softirq's) is cut.
const INTERRUPT_FRAMES: usize = 16;

tracepoint_program! {
/// `sched_waking(struct task_struct *p)`, in the waker's context, for every
/// wakeup that changes a sleeping task's state.
pub fn offcpu_sched_waking(ctx: BtfTracePointContext) -> Option<()> {
    waking(&ctx)
}
}

#[inline(always)]
fn waking(ctx: &BtfTracePointContext) -> Option<()> {
    if offcpu_stopped() {
        return None;
    }
    let woken: *mut task_struct = ctx.arg(0);
    // Only traced threads have an entry.
    let e = OFFCPU_START.get_ptr_mut(&(woken as u64))?;
    let window = current_window()?;
    let waker = waker(ctx, window);
    // SAFETY: a valid map value; its thread is asleep (or just going to
    // sleep) and reads these only once it is switched in, after this
    // wakeup has put it on a run queue.
    unsafe {
        (*e).waker = waker;
        (*e).woken_ns = now();
    }
    count(Counter::Wakeups);
    Some(())
}

/// The waker: an interrupt (its kernel stack only), or the current task
/// with its stacks (a user stack only for a traced process: the unwinder
/// has tables for those alone).
#[inline(always)]
fn waker(ctx: &BtfTracePointContext, window: u32) -> TaskStacks {
    // SAFETY: no preconditions.
    let task = unsafe { bpf_get_current_task_btf() };
    if in_interrupt(ctx, task) {
        // Up to the interrupt's entry, not on through what it interrupted
        // (which userspace cuts off anyway).
        count(Counter::WakerInterrupts);
        let walked = walk_stack_upto(ctx, 0, INTERRUPT_FRAMES).0;
        return TaskStacks {
            pid: WAKER_INTERRUPT,
            tgid: 0,
            comm: [0; COMM_LEN],
            kern_stack: kern_stack_or_reason(walked, window),
            user_stack: STACK_NOT_WALKED,
        };
    }
    let (tgid, pid) = Task::current().ids();
    let (kern_stack, user_stack) = match waker_sites(task as u64, pid) {
        Some(w) => site_stacks(ctx, task, w, is_tracked(tgid), window),
        None => {
            count(Counter::WakerKernWalk);
            let user = if is_tracked(tgid) {
                count(Counter::WakerUserWalk);
                user_stack(ctx, window)
            } else {
                STACK_NOT_WALKED
            };
            (kern_stack(ctx, window), user)
        }
    };
    TaskStacks {
        pid,
        tgid,
        comm: comm_of(task),
        kern_stack,
        user_stack,
    }
}

/// The sites waker `task` (thread `pid`) woke others from, a new entry if
/// it has none (or one of a thread gone, whose `task_struct` it reuses).
#[inline(always)]
fn waker_sites(task: u64, pid: u32) -> Option<*mut WakerSites> {
    if let Some(w) = WAKER_SITES.get_ptr_mut(&task)
        // SAFETY: a valid map value.
        && unsafe { (*w).pid } == pid
    {
        return Some(w);
    }
    let _ = WAKER_SITES.insert(&task, &WAKER_SITES_EMPTY, 0);
    let w = WAKER_SITES.get_ptr_mut(&task)?;
    // SAFETY: a valid map value, the current thread's.
    unsafe { (*w).pid = pid };
    Some(w)
}

/// The stacks of the current thread (`task`, its sites `w`) where it
/// wakes another: where it woke others from before (a QEMU worker's futex
/// wake, a libvirtd worker's write to a pipe), the user stack walked there
/// and the kernel stack its site remembers if it is the live one; else
/// walks, remembered in the older site. A process not traced has one
/// kernel stack remembered, and no user stack.
#[inline(always)]
fn site_stacks(
    ctx: &BtfTracePointContext,
    task: *mut task_struct,
    w: *mut WakerSites,
    traced: bool,
    window: u32,
) -> (u64, u64) {
    const KERN: [Counter; 3] = [
        Counter::WakerKernCached,
        Counter::WakerKernWalk,
        Counter::KernReuseDiffers,
    ];
    // The kernel stacks' slot index (one slot each) needs no turn.
    let mut one_slot = 0u32;
    // SAFETY (each block): w is the current thread's valid map value;
    // indices are bounded.
    let first = unsafe { (&raw mut (*w).sites[0].kstack).cast::<[LiveKstack; 1]>() };
    if !traced {
        return (
            live_kern_stack(ctx, window, first, &raw mut one_slot, KERN),
            STACK_NOT_WALKED,
        );
    }
    let regs = if config!(block_site_cache) != 0 {
        unwind::user_regs(task)
    } else {
        [0; 3]
    };
    let mut ret = None;
    let mut at = WAKE_SITES;
    if regs[0] != 0 {
        let mut i = 0;
        while i < WAKE_SITES {
            // SAFETY: as above.
            let s = unsafe { &(*w).sites[i] };
            if at_site(
                &s.user,
                s.user_stack,
                &s.user_check,
                s.user_check_hash,
                regs,
                &mut ret,
            ) {
                at = i;
                break;
            }
            i += 1;
        }
    }
    let user = if at < WAKE_SITES {
        count(Counter::WakerUserCached);
        // SAFETY: as above.
        unsafe { (*w).sites[at & (WAKE_SITES - 1)].user_stack }
    } else {
        count(Counter::WakerUserWalk);
        let (user, cacheable) = user_stack_walk(ctx, window);
        if user < STACK_ID_MIN || regs[0] == 0 || !cacheable {
            count(Counter::WakerKernWalk);
            return (kern_stack(ctx, window), user);
        }
        let (key, check, check_hash) = site_key(regs, ret);
        // SAFETY: as above.
        unsafe {
            at = (*w).next as usize & (WAKE_SITES - 1);
            let s = &raw mut (*w).sites[at];
            (*s).user = key;
            (*s).user_stack = user;
            (*s).user_check = check;
            (*s).user_check_hash = check_hash;
            (*w).next = ((at + 1) % WAKE_SITES) as u32;
        }
        user
    };
    // SAFETY: as above.
    let slot: *mut [LiveKstack; 1] =
        unsafe { (&raw mut (*w).sites[at & (WAKE_SITES - 1)].kstack).cast() };
    (
        live_kern_stack(ctx, window, slot, &raw mut one_slot, KERN),
        user,
    )
}

/// Whether the wakeup runs in an interrupt that came while the CPU was in
/// the kernel: the tracepoint's caller is not on the current task's stack
/// (x86-64 then runs hard and soft interrupts on per-CPU stacks). One that
/// came while the task ran in user mode runs on the task's stack, and
/// userspace tells it by its kernel stack, which holds the interrupt's
/// entry. The caller's stack is where the tracepoint put the
/// arguments this program's context points to (the program's own stack
/// may be a private per-CPU one); that address, copied through the checked
/// helper, is a plain number. The task's stack base is one load.
#[inline(always)]
fn in_interrupt(ctx: &BtfTracePointContext, task: *mut task_struct) -> bool {
    let size = config!(thread_size);
    let off = config!(offsets.task_stack);
    if size == 0 || off == OFFSET_UNKNOWN {
        return false;
    }
    let args = ctx.as_ptr();
    // SAFETY: a BTF pointer to the current task, at an offset kernel BTF
    // gave (read-only config, checked by the verifier); a helper read of
    // this program's own stack.
    unsafe {
        let base = core::ptr::read_volatile(task.cast::<u8>().add(off as usize).cast::<u64>());
        let Ok(at) = bpf_probe_read_kernel((&raw const args).cast::<u64>()) else {
            return false;
        };
        at.wrapping_sub(base) >= u64::from(size)
    }
}

/// At the switch-in of the thread of entry `e`: its block `key` (begun at
/// `start_ns`, `blocked` ns long) charged to who woke it, `woken_ns` being
/// when the last waker was written (0: none since the last block). A
/// preemption has no waker.
#[inline(always)]
pub(super) fn charge(
    e: *mut OffCpuStart,
    key: &OffCpuKey,
    start_ns: u64,
    woken_ns: u64,
    blocked: u64,
) {
    if is_preemption(key.state) {
        return;
    }
    if woken_ns == 0 || woken_ns.saturating_add(WAKE_BEFORE_BLOCK_NS) < start_ns {
        count(Counter::WakerNotSeen);
        return;
    }
    let k = OffWakeKey {
        blocked: OffCpuKey {
            window: written_now(key.window),
            ..*key
        },
        // SAFETY: this thread's valid map value.
        waker: unsafe { (*e).waker },
    };
    let block = OffCpuValue::block(blocked, 0);
    if let Some(v) = OFFWAKE_TIMES.get_ptr_mut(&k) {
        // SAFETY: a valid map value; its key holds the blocked thread, and
        // only that thread's switch-in adds to it.
        unsafe { (*v).add(&block) };
    } else if OFFWAKE_TIMES.insert(&k, &block, 0).is_err() {
        lose(k.blocked.window, Loss::OffWakeMapFull);
    }
}
