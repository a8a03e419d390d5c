//! Forks: the `clone`/`clone3`/`fork`/`vfork` system calls of traced
//! tasks, per parent, caller (the libc fork function's caller, see
//! [`caller_of`]) and user stack, with the parent's time in the call.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_task_btf, bpf_probe_read_user},
    macros::{map, uprobe},
    maps::HashMap,
    programs::ProbeContext,
};
use profiler_common::record::{CLONE_THREAD, ForkKey, ForkStart, ForkValue, Loss, fork_kind};

use super::{
    common::{EntryRegs, Syscall, Task, aggregate, comm, now, stopped, timed, traced, written_now},
    stacks::user_stack,
};
use crate::unwind;

#[map]
static FORK_CALLS: HashMap<ForkKey, ForkValue> = HashMap::with_max_entries(16384, 0);
/// Fork syscalls in progress, per thread.
#[map]
static FORK_START: HashMap<u32, ForkStart> = HashMap::with_max_entries(16384, 0);
/// Per thread: the return address of the libc fork function it is in.
#[map]
static FORK_CALLER: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);

timed!(ForkValue, count, total_ns, max_ns);

/// uprobe on libc's `fork`, `vfork`, `posix_spawn[p]`, `pthread_create`: at
/// a function's entry the return address is at the top of the stack, so
/// the caller is exact, frame pointers or not. A `uprobe.multi` program, so
/// one link can be limited to one process.
#[uprobe(multi)]
pub fn fork_caller(ctx: ProbeContext) -> u32 {
    try_fork_caller(&ctx).unwrap_or(0)
}

#[inline(always)]
fn try_fork_caller(ctx: &ProbeContext) -> Option<u32> {
    let task = Task::tracked()?;
    // SAFETY: regs is the probed task's user register file; the stack slot
    // is read with the checked helper.
    let ret = unsafe {
        let sp = (*ctx.regs).rsp;
        bpf_probe_read_user(sp as *const u64).unwrap_or(0)
    };
    let _ = FORK_CALLER.insert(&task.pid(), &ret, 0);
    Some(0)
}

/// The caller of the libc function making fork syscall `nr` in thread
/// `pid`: the fork-caller uprobe's, where it fired (a libc the learned
/// paths are not for), else through the `ForkPath`s (0 if none holds).
#[inline(always)]
fn caller_of(pid: u32, nr: u32) -> u64 {
    if config!(fork_uprobes) != 0 {
        // SAFETY: only copied.
        if let Some(c) = unsafe { FORK_CALLER.get(&pid) }.copied() {
            let _ = FORK_CALLER.remove(&pid);
            return c;
        }
    }
    // SAFETY: the helper has no preconditions.
    let current = unsafe { bpf_get_current_task_btf() };
    let [ip, sp, _] = unwind::user_regs(current);
    let di = EntryRegs::of(current).arg0();
    profiler_common::record::fork_caller(
        // SAFETY: CONFIG is a plain static; reading a field is always valid.
        |i| unsafe { core::ptr::read_volatile(&raw const crate::record::CONFIG.fork_paths[i]) },
        nr,
        [ip, sp, di],
        // SAFETY: user memory, read with the checked helper.
        |a| unsafe { bpf_probe_read_user(a as *const u64) }.ok(),
        // SAFETY: as above.
        |a| unsafe { bpf_probe_read_user(a as *const [u8; 8]) }.ok(),
    )
}

/// The flags of a `clone3` call, the first field of its `struct
/// clone_args` at `uargs` (0 if unreadable).
#[inline(always)]
pub(super) fn clone3_flags(uargs: u64) -> u64 {
    // SAFETY: a user pointer, read with the checked helper.
    unsafe { bpf_probe_read_user(uargs as *const u64) }.unwrap_or(0)
}

syscall_program! {
/// `clone`, `clone3`, `fork` or `vfork` entered: one program, told apart
/// by the syscall number.
pub fn fork_syscall_enter, fork_syscall_enter_per_call => |call, _ctx| try_fork_syscall_enter(call)
}

#[inline(always)]
fn try_fork_syscall_enter(call: Syscall) -> Option<u32> {
    let (task, window) = traced()?;
    let nr = call.nr() as u32;
    // clone(flags, …); clone3(uargs, size)
    let (mut kind, flags) = if nr == config!(nr_clone) {
        (fork_kind::CLONE, call.arg::<0>())
    } else if nr == config!(nr_clone3) {
        (fork_kind::CLONE3, clone3_flags(call.arg::<0>()))
    } else if nr == config!(nr_fork) {
        (fork_kind::FORK, 0)
    } else {
        (fork_kind::VFORK, 0)
    };
    if flags & CLONE_THREAD != 0 {
        kind |= fork_kind::THREAD;
    }
    let start = ForkStart {
        start_ns: now(),
        window,
        kind,
        caller: caller_of(task.pid(), nr),
    };
    let _ = FORK_START.insert(&task.pid(), &start, 0);
    Some(0)
}

syscall_program! {
pub fn fork_syscall_exit, fork_syscall_exit_per_call => |call, ctx| try_fork_syscall_exit(call, ctx)
}

#[inline(always)]
fn try_fork_syscall_exit<C: EbpfContext>(call: Syscall, ctx: &C) -> Option<u32> {
    if stopped() {
        return None;
    }
    let (tgid, pid) = Task::current().ids();
    // The child returns from the same syscall: it has no start entry.
    let start = FORK_START.get_ptr(&pid)?;
    // SAFETY: a valid map value, copied before removal.
    let start = unsafe { *start };
    let _ = FORK_START.remove(&pid);
    // Failed forks (ret < 0) created nothing.
    if call.ret() <= 0 {
        return None;
    }
    let took = now().saturating_sub(start.start_ns);
    let user_stack = user_stack(ctx, start.window);
    let window = written_now(start.window);
    let key = ForkKey {
        window,
        tgid,
        kind: start.kind,
        pad: 0,
        user_stack,
        caller: start.caller,
        comm: comm(),
    };
    let zero = ForkValue {
        count: 0,
        total_ns: 0,
        max_ns: 0,
    };
    aggregate(&FORK_CALLS, &key, &zero, window, Loss::ForkMapFull, took)?;
    Some(0)
}

/// The exit hook: a fork the thread was in, and its caller, go with it.
#[inline(always)]
pub(super) fn task_exited(pid: u32) {
    let _ = FORK_START.remove(&pid);
    if config!(fork_uprobes) != 0 {
        let _ = FORK_CALLER.remove(&pid);
    }
}
