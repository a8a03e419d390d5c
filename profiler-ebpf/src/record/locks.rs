//! Kernel lock contention (`lock:contention_begin` / `contention_end`):
//! begin and end paired per thread with a small stack of the locks it is
//! waiting on, each wait aggregated per window, lock, type and waiter
//! stack. The waiter's user stack comes from the off-CPU site cache when
//! the thread is at one of its sites; its kernel stack from the two this
//! thread's entry remembers when every return address is where it was.
//!
//! An end or a begin can go unseen: the kernel keeps a program on a BTF
//! tracepoint from running while the same program runs on the CPU, and an
//! interrupt that contends while the end program is starting or finishing
//! (before [`Running`](super::common::Running) is taken, or after it is
//! given back) has its begin seen and its end not. Such a begin must never
//! be paired with a later end of the same lock (seconds later, by then).
//! A begin is known to be over when its task has switched out since and the
//! wait spins (a spinning waiter is not switched out), or when the same
//! lock is begun again (except for a mutex's spin going on to sleep): it is
//! dropped and counted as a loss, as is an end without a begin.

use aya_ebpf::{
    bindings::task_struct,
    helpers::{
        bpf_get_current_task_btf, bpf_get_smp_processor_id, bpf_get_task_stack,
        bpf_probe_read_kernel, generated,
    },
    macros::map,
    maps::HashMap,
    programs::BtfTracePointContext,
};
use profiler_common::record::{
    COMM_LEN, Counter, HOLDER_READERS, HOLDER_UNKNOWN, LOCK_HIST_BUCKETS, LockBegin, LockKey,
    LockPending, LockValue, Loss, MAX_LOCK_NESTING, OFFSET_UNKNOWN, STACK_HOLDER_ON_CPU,
    STACK_HOLDER_USER_UNKNOWN, StackBuf, TaskStacks, WindowMode, lock_flags,
};

use super::{
    common::{Task, aggregate, comm, count, lose, now, slot, stopped, timed, traced, written_now},
    live_kstack::live_kern_stack,
    offcpu,
    stacks::{STACK_SCRATCH, kern_stack, kern_stack_or_reason, store_stack, user_stack},
};

#[map]
static LOCK_WAITS: HashMap<LockKey, LockValue> = HashMap::with_max_entries(32768, 0);
/// Contentions in progress, per thread.
#[map]
static LOCK_PENDING: HashMap<u32, LockPending> = HashMap::with_max_entries(32768, 0);

/// Initial values for inserts: larger than the BPF stack allows.
#[unsafe(no_mangle)]
static LOCK_VALUE_ZERO: LockValue = LockValue {
    count: 0,
    total_ns: 0,
    max_ns: 0,
    hist: [0; LOCK_HIST_BUCKETS],
};
#[unsafe(no_mangle)]
static LOCK_PENDING_ZERO: LockPending = LockPending::ZERO;

timed!(LockValue, count, total_ns, max_ns, hist: hist);

tracepoint_program! {
/// `contention_begin(lock, flags)`.
pub fn lock_contention_begin(ctx: BtfTracePointContext) -> Option<u32> {
    try_lock_contention_begin(&ctx)
}
}

#[inline(always)]
fn try_lock_contention_begin(ctx: &BtfTracePointContext) -> Option<u32> {
    let (task, window) = traced()?;
    let lock: u64 = ctx.arg(0);
    let flags = ctx.arg::<u64>(1) as u32;
    let pending = slot(
        &LOCK_PENDING,
        &task.pid(),
        &LOCK_PENDING_ZERO,
        window,
        Loss::LockMapFull,
    )?;
    let switches = switches();
    drop_ended(pending, switches);
    // SAFETY: a valid map value, only touched by this thread (and by
    // interrupts on this CPU, which run to completion first).
    unsafe {
        let depth = (*pending).depth as usize;
        let mut i = 0;
        while i < MAX_LOCK_NESTING {
            if i < depth && (*pending).entries[i].lock == lock {
                if lock_flags::spin_then_sleep((*pending).entries[i].flags, flags) {
                    // One wait, from the first begin; the latest flags.
                    (*pending).entries[i].flags = flags;
                    return Some(0);
                }
                // Its end went unseen: a task does not wait for a lock
                // while it waits for it already (an interrupt that takes a
                // spinlock finds it taken with interrupts off).
                let stale = remove_entry(pending, i);
                lose(written_now(stale.window), Loss::LockEndUnseen);
                break;
            }
            i += 1;
        }
        let depth = (*pending).depth as usize;
        if depth >= MAX_LOCK_NESTING {
            lose(window, Loss::LockNestingTooDeep);
            return Some(0);
        }
        let holder = holder(lock, flags, window);
        (*pending).entries[depth] = LockBegin {
            lock,
            start_ns: now(),
            cpu: bpf_get_smp_processor_id(),
            switches,
            flags,
            window,
            holder,
        };
        (*pending).depth = depth as u32 + 1;
    }
    Some(0)
}

/// Who holds `lock` (of type `flags`): the task in its `owner` word, with
/// the word's flag bits masked off (a mutex keeps three, an rwsem two); an
/// rwsem owned by readers says so. Read with the checked helper: the lock
/// and the task are plain addresses here. Then the holder's stacks (see
/// [`holder_stacks`]).
#[inline(always)]
fn holder(lock: u64, flags: u32, window: u32) -> TaskStacks {
    if !lock_flags::has_owner(flags) {
        return TaskStacks::UNKNOWN;
    }
    let mutex = flags & lock_flags::MUTEX != 0;
    let (off, mask) = if mutex {
        (config!(offsets.mutex_owner), MUTEX_OWNER_FLAGS)
    } else {
        (config!(offsets.rwsem_owner), RWSEM_OWNER_FLAGS)
    };
    let (pid_off, tgid_off, comm_off) = (
        config!(offsets.task_pid),
        config!(offsets.task_tgid),
        config!(task_comm),
    );
    if off == OFFSET_UNKNOWN || tgid_off == OFFSET_UNKNOWN || comm_off == 0 {
        return TaskStacks::UNKNOWN;
    }
    // SAFETY: reads of kernel memory through the checked helper.
    unsafe {
        let Ok(owner) = bpf_probe_read_kernel((lock + u64::from(off)) as *const u64) else {
            return TaskStacks::UNKNOWN;
        };
        if !mutex && owner & RWSEM_READER_OWNED != 0 {
            return TaskStacks {
                pid: HOLDER_READERS,
                ..TaskStacks::UNKNOWN
            };
        }
        let task = owner & !mask;
        if task == 0 {
            return TaskStacks::UNKNOWN;
        }
        let (Ok(pid), Ok(tgid), Ok(comm)) = (
            bpf_probe_read_kernel((task + u64::from(pid_off)) as *const u32),
            bpf_probe_read_kernel((task + u64::from(tgid_off)) as *const u32),
            bpf_probe_read_kernel((task + u64::from(comm_off)) as *const [u8; COMM_LEN]),
        ) else {
            return TaskStacks::UNKNOWN;
        };
        if pid == HOLDER_UNKNOWN || pid == HOLDER_READERS {
            return TaskStacks::UNKNOWN;
        }
        let (kern_stack, user_stack) = holder_stacks(task, pid, window);
        TaskStacks {
            pid,
            tgid,
            comm,
            kern_stack,
            user_stack,
        }
    }
}

/// The stacks of holder `task` (thread `pid`). Not of one that is running:
/// another CPU's task has no stack to walk from here (the kernel's walk of
/// it would read a stack being overwritten). Else its kernel stack, walked
/// by the kernel from where it switched out (the task is taken by pid, as
/// the helper wants a counted task), and its user stack where the off-CPU
/// tracer saw it block.
#[inline(always)]
fn holder_stacks(task: u64, pid: u32, window: u32) -> (u64, u64) {
    let on_cpu_off = config!(offsets.task_on_cpu);
    // SAFETY: a read of kernel memory through the checked helper.
    let running = on_cpu_off == OFFSET_UNKNOWN
        || !matches!(
            unsafe { bpf_probe_read_kernel((task + u64::from(on_cpu_off)) as *const u32) },
            Ok(0)
        );
    if running {
        return (STACK_HOLDER_ON_CPU, STACK_HOLDER_ON_CPU);
    }
    let user = offcpu::blocked_user_stack(task, pid).unwrap_or(STACK_HOLDER_USER_UNKNOWN);
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return (STACK_HOLDER_ON_CPU, user);
    };
    // SAFETY: kfuncs on a pid; the task they give is released on every
    // path; buf is this CPU's scratch value, one StackBuf long.
    let n = unsafe {
        let t = bpf_task_from_pid(pid as i32);
        if t.is_null() {
            return (STACK_HOLDER_ON_CPU, user);
        }
        let n = bpf_get_task_stack(t, buf.cast(), core::mem::size_of::<StackBuf>() as u32, 0);
        bpf_task_release(t);
        n
    };
    (kern_stack_or_reason(store_stack(n), window), user)
}

unsafe extern "C" {
    /// The task of `pid`, counted (`KF_ACQUIRE`), or null.
    fn bpf_task_from_pid(pid: i32) -> *mut task_struct;
    fn bpf_task_release(task: *mut task_struct);
}

/// The flag bits in the low bits of a mutex's `owner` (`MUTEX_FLAGS`).
const MUTEX_OWNER_FLAGS: u64 = 0x07;
/// Those of an rwsem's (`RWSEM_OWNER_FLAGS_MASK`), and the one that says
/// readers own it (`RWSEM_READER_OWNED`).
const RWSEM_OWNER_FLAGS: u64 = 0x03;
const RWSEM_READER_OWNED: u64 = 0x01;

/// The low half of the current task's count of context switches
/// (`nvcsw + nivcsw`, two plain loads from its `task_struct`).
#[inline(always)]
fn switches() -> u32 {
    let (nv, niv) = (
        config!(offsets.task_nvcsw) as usize,
        config!(offsets.task_nivcsw) as usize,
    );
    // SAFETY: bpf_get_current_task_btf has no preconditions; the offsets
    // are constants (read-only config) the verifier checks against kernel
    // BTF.
    unsafe {
        let task = bpf_get_current_task_btf().cast::<u8>();
        let nv = core::ptr::read_volatile(task.add(nv).cast::<u64>());
        let niv = core::ptr::read_volatile(task.add(niv).cast::<u64>());
        nv.wrapping_add(niv) as u32
    }
}

/// Drops the spinning waits of the thread's entry whose task has switched
/// out since they began: their ends went unseen.
#[inline(always)]
fn drop_ended(pending: *mut LockPending, switches: u32) {
    // SAFETY: as in lock_contention_begin; indices are bounded.
    unsafe {
        let depth = (*pending).depth as usize;
        let mut kept = 0usize;
        let mut i = 0;
        while i < MAX_LOCK_NESTING {
            if i < depth {
                let e = (*pending).entries[i];
                if lock_flags::spins(e.flags) && e.switches != switches {
                    lose(written_now(e.window), Loss::LockEndUnseen);
                } else {
                    (*pending).entries[kept & (MAX_LOCK_NESTING - 1)] = e;
                    kept += 1;
                }
            }
            i += 1;
        }
        (*pending).depth = kept as u32;
    }
}

/// Takes entry `found` (< depth) out of the thread's entry.
#[inline(always)]
fn remove_entry(pending: *mut LockPending, found: usize) -> LockBegin {
    // SAFETY: as in lock_contention_begin; indices are bounded.
    unsafe {
        let depth = (*pending).depth as usize;
        let begin = (*pending).entries[found & (MAX_LOCK_NESTING - 1)];
        let mut j = 0;
        while j + 1 < MAX_LOCK_NESTING {
            if j >= found && j + 1 < depth {
                (*pending).entries[j] = (*pending).entries[j + 1];
            }
            j += 1;
        }
        (*pending).depth = depth as u32 - 1;
        begin
    }
}

tracepoint_program! {
/// `contention_end(lock, ret)`.
pub fn lock_contention_end(ctx: BtfTracePointContext) -> Option<u32> {
    try_lock_contention_end(&ctx)
}
}

#[inline(always)]
fn try_lock_contention_end(ctx: &BtfTracePointContext) -> Option<u32> {
    if stopped() {
        return None;
    }
    let (tgid, pid) = Task::current().ids();
    let pending = LOCK_PENDING.get_ptr_mut(&pid)?;
    let lock: u64 = ctx.arg(0);
    let end = now();
    let drop_every = config!(drop_lock_ends);
    // SAFETY: no preconditions.
    if drop_every != 0 && unsafe { generated::bpf_get_prandom_u32() } % drop_every == 0 {
        count(Counter::LockEndsDropped);
        return None;
    }
    drop_ended(pending, switches());
    let Some(begin) = take_begin(pending, lock) else {
        // Unseen, or began before the recording or outside every window
        // (explicit windows: between two of them, which is no loss).
        if config!(window_mode) == WindowMode::Every as u32
            && let Some((_, window)) = traced()
        {
            lose(window, Loss::LockBeginUnseen);
        }
        return None;
    };
    // SAFETY: no preconditions.
    if begin.cpu != unsafe { bpf_get_smp_processor_id() } {
        count(Counter::LockWaitsMigrated);
    }
    let wait = end.saturating_sub(begin.start_ns);
    let user_stack = waiter_user_stack(ctx, pid, begin.window);
    let kern_stack = lock_kernel_stack(ctx, pending, begin.flags, begin.window);
    let window = written_now(begin.window);
    let key = LockKey {
        window,
        tgid,
        flags: begin.flags,
        pad: 0,
        lock,
        kern_stack,
        user_stack,
        comm: comm(),
        holder: begin.holder,
    };
    // Threads of one process contend on the same lock from the same
    // stack: the aggregate's adds are atomic.
    aggregate(
        &LOCK_WAITS,
        &key,
        &LOCK_VALUE_ZERO,
        window,
        Loss::LockMapFull,
        wait,
    )?;
    Some(0)
}

/// Takes the innermost begin of `lock` out of the thread's entry.
#[inline(always)]
fn take_begin(pending: *mut LockPending, lock: u64) -> Option<LockBegin> {
    // SAFETY: as in lock_contention_begin.
    unsafe {
        let depth = (*pending).depth as usize;
        let mut found = MAX_LOCK_NESTING;
        let mut i = MAX_LOCK_NESTING;
        while i > 0 {
            i -= 1;
            if i < depth && found == MAX_LOCK_NESTING && (*pending).entries[i].lock == lock {
                found = i;
            }
        }
        if found >= MAX_LOCK_NESTING {
            return None;
        }
        if depth > 1 {
            count(Counter::LockWaitsNested);
        }
        Some(remove_entry(pending, found))
    }
}

/// The waiter's user stack: reused if the thread is at a site where it
/// blocked or contended before (a QEMU thread's futex wake or eventfd write
/// contending on a run-queue lock). Walking it costs microseconds where
/// there are no frame pointers.
#[inline(always)]
fn waiter_user_stack(ctx: &BtfTracePointContext, pid: u32, window: u32) -> u64 {
    // SAFETY: bpf_get_current_task_btf has no preconditions.
    let current = unsafe { bpf_get_current_task_btf() };
    if let Some(e) = offcpu::own_entry(current as u64, pid) {
        return offcpu::site_user_stack(
            ctx,
            current,
            e,
            window,
            Counter::LockUserCached,
            Counter::LockUserWalk,
        )
        .0;
    }
    count(Counter::LockUserWalk);
    user_stack(ctx, window)
}

/// The current task's kernel stack at the end of a wait for a sleeping
/// lock: one of the two its lock entry remembers if it is the live one
/// (see [`live_kern_stack`]), else a walk (4 to 12 µs here), remembered in
/// the older slot. Only for sleeping locks, taken in process context: a
/// spinlock's waiter may be an interrupt on its own stack, and the task
/// stack under it may still hold a whole earlier stack that would match.
#[inline(always)]
fn lock_kernel_stack(
    ctx: &BtfTracePointContext,
    pending: *mut LockPending,
    flags: u32,
    window: u32,
) -> u64 {
    if config!(block_site_cache) == 0 || !lock_flags::sleeps(flags) {
        count(Counter::LockKernWalk);
        return kern_stack(ctx, window);
    }
    // SAFETY: the thread's own entry.
    let (slots, next) = unsafe { (&raw mut (*pending).kstacks, &raw mut (*pending).kstack_next) };
    live_kern_stack(
        ctx,
        window,
        slots,
        next,
        [
            Counter::LockKernCached,
            Counter::LockKernWalk,
            Counter::LockKernReuseDiffers,
        ],
    )
}

/// The exit hook: contentions the thread was in go with it. None can be
/// under way as it exits: their ends went unseen.
#[inline(always)]
pub(super) fn task_exited(pid: u32) {
    let Some(pending) = LOCK_PENDING.get_ptr(&pid) else {
        return;
    };
    // SAFETY: a valid map value; indices are bounded.
    unsafe {
        let depth = (*pending).depth as usize;
        let mut i = 0;
        while i < MAX_LOCK_NESTING {
            if i < depth {
                lose(
                    written_now((*pending).entries[i].window),
                    Loss::LockEndUnseen,
                );
            }
            i += 1;
        }
    }
    let _ = LOCK_PENDING.remove(&pid);
}
