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
    maps::HashMap,
    programs::BtfTracePointContext,
};
use profiler_common::record::{
    COMM_LEN, Counter, Loss, OFFSET_UNKNOWN, OffCpuKey, OffCpuStart, OffCpuValue, OffWakeKey,
    STACK_NOT_WALKED, TaskStacks, WAKER_INTERRUPT,
};

use super::{OFFCPU_START, is_preemption, own_entry, site_user_stack};
use crate::record::{
    common::{Task, comm_of, count, current_window, is_tracked, lose, now, stopped, written_now},
    stacks::{kern_stack, kern_stack_or_reason, user_stack, walk_stack_upto},
};

#[map]
static OFFWAKE_TIMES: HashMap<OffWakeKey, OffCpuValue> = HashMap::with_max_entries(65536, 0);

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
    if stopped() {
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
        let walked = walk_stack_upto(ctx, 0, INTERRUPT_FRAMES).0;
        return TaskStacks {
            pid: WAKER_INTERRUPT,
            tgid: 0,
            comm: [0; COMM_LEN],
            kern_stack: kern_stack_or_reason(walked, window),
            user_stack: STACK_NOT_WALKED,
        };
    }
    let kern_stack = kern_stack(ctx, window);
    let (tgid, pid) = Task::current().ids();
    let user_stack = if !is_tracked(tgid) {
        STACK_NOT_WALKED
    } else if let Some(own) = own_entry(task as u64, pid) {
        // Where it wakes others is a site of its own, as where it blocks
        // (a QEMU worker's futex wake, a libvirtd worker's write to a
        // pipe): the same cache saves the walk.
        site_user_stack(
            ctx,
            task,
            own,
            window,
            Counter::WakerUserCached,
            Counter::WakerUserWalk,
        )
        .0
    } else {
        count(Counter::WakerUserWalk);
        user_stack(ctx, window)
    };
    TaskStacks {
        pid,
        tgid,
        comm: comm_of(task),
        kern_stack,
        user_stack,
    }
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
