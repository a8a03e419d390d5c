//! Tasks: following the targets' children (`sched_process_fork`), execs
//! (`--comm` targets, exec-counted VMs) and exits. A task's exit calls
//! each tracer's exit hook, so that what a tracer keeps per thread goes
//! with the thread.

use aya_ebpf::{helpers::bpf_get_current_task_btf, macros::map, maps::HashMap};
use profiler_common::record::{CLONE_THREAD, EventKind, Loss, TargetMode};

use super::{
    attribution, cgroup,
    common::{
        EntryRegs, TRACKED, Task, comm, comm_matches, current_window, emit, is_tracked, lose,
    },
    dbus, fork, libvirt, locks, mappings, offcpu, vm,
};

/// Tracked tasks past `sched_process_exit`: their address space is gone, so
/// a missing user stack is expected, not a loss.
#[map]
static EXITING: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);

/// Whether the current task is past `sched_process_exit`.
#[inline(always)]
pub(super) fn is_exiting() -> bool {
    let pid = Task::current().pid();
    // SAFETY: only presence is tested.
    unsafe { EXITING.get(&pid) }.is_some()
}

/// Thread `pid` has switched out for the last time.
#[inline(always)]
pub(super) fn gone(pid: u32) {
    let _ = EXITING.remove(&pid);
}

tracepoint_program! {
/// `sched_process_fork(parent, child)` runs in the parent.
pub fn task_fork(ctx: BtfTracePointContext) -> Option<u32> {
    try_task_fork(ctx.arg(1))
}
}

#[inline(always)]
fn try_task_fork(child: *const u8) -> Option<u32> {
    let task = Task::tracked()?;
    let pid_off = config!(offsets.task_pid) as usize;
    // SAFETY: a BTF task pointer; the offset of its `pid` is a constant
    // (read-only config) which the verifier checks against kernel BTF.
    let child = unsafe { core::ptr::read_volatile(child.add(pid_off).cast::<i32>()) } as u32;
    // A new thread is neither a process to follow nor an event: the parent
    // is in clone or clone3 with CLONE_THREAD (an io_uring worker, made
    // elsewhere, still goes to userspace, which tells it apart there).
    if creates_thread() {
        attribution::thread_created(task, child);
        return None;
    }
    if config!(target_mode) == TargetMode::Tracked as u32 && config!(follow_children) != 0 {
        // A new process (its pid is its tgid), or rarely a thread made
        // outside clone (an io_uring worker: its tid is harmless here and
        // is removed when it exits).
        if TRACKED.insert(&child, &task.tgid(), 0).is_err() {
            lose(current_window().unwrap_or(u32::MAX), Loss::TrackedFull);
        }
    }
    mappings::fork(task.tgid(), child);
    attribution::fork(task, child);
    emit(EventKind::Fork, task, child, 0, current_window());
    Some(0)
}

/// Whether the current task is in a clone or clone3 system call that
/// creates a thread (`CLONE_THREAD`), from its syscall registers.
#[inline(always)]
fn creates_thread() -> bool {
    let regs = EntryRegs::current();
    let nr = regs.syscall() as u32;
    let flags = if nr == config!(nr_clone) {
        regs.arg0()
    } else if nr == config!(nr_clone3) {
        fork::clone3_flags(regs.arg0())
    } else {
        0
    };
    flags & CLONE_THREAD != 0
}

tracepoint_program! {
/// `sched_process_exec` runs in the new image: the comm is the new one.
pub fn task_exec(_ctx: BtfTracePointContext) -> Option<u32> {
    try_task_exec()
}
}

#[inline(always)]
fn try_task_exec() -> Option<u32> {
    let task = Task::current();
    if task.tgid() == config!(self_tgid) {
        return None;
    }
    let comm = comm();
    if config!(target_comm_len) != 0
        && config!(target_mode) == TargetMode::Tracked as u32
        && comm_matches(
            &comm,
            &config!(target_comm),
            config!(target_comm_len),
            false,
        )
        && TRACKED.insert(&task.tgid(), &task.tgid(), 0).is_err()
    {
        lose(current_window().unwrap_or(u32::MAX), Loss::TrackedFull);
    }
    vm::exec(task, &comm);
    if is_tracked(task.tgid()) {
        mappings::exec(task.tgid());
        emit(EventKind::Exec, task, 0, 0, current_window());
    }
    Some(0)
}

tracepoint_program! {
/// `sched_process_exit`, in the exiting thread: each tracer's exit hook,
/// then the thread is no longer followed.
pub fn task_exit(_ctx: BtfTracePointContext) -> Option<u32> {
    try_task_exit()
}
}

#[inline(always)]
fn try_task_exit() -> Option<u32> {
    let task = Task::current();
    // Whether tracked or not.
    vm::task_exited(task);
    attribution::task_exited(task);
    // SAFETY: bpf_get_current_task_btf has no preconditions.
    offcpu::task_exited(unsafe { bpf_get_current_task_btf() });
    if !is_tracked(task.tgid()) {
        return None;
    }
    locks::task_exited(task.pid());
    fork::task_exited(task.pid());
    cgroup::task_exited(task.pid());
    mappings::task_exited(task);
    dbus::task_exited(task.pid());
    libvirt::task_exited(task.pid());
    let _ = EXITING.insert(&task.pid(), &1, 0);
    if task.pid() == task.tgid() {
        emit(EventKind::Exit, task, 0, 0, current_window());
    }
    if config!(target_mode) == TargetMode::Tracked as u32 {
        let _ = TRACKED.remove(&task.pid());
    }
    Some(0)
}
