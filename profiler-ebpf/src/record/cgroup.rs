//! Cgroup operations (`cgroup_mkdir`, `cgroup_rmdir`, `cgroup_attach_task`)
//! of traced tasks, per hierarchy and path, timed by the system call each
//! was made in (mkdir, rmdir, and with `--time-cgroup-writes` the writes to
//! `cgroup.procs`).

use aya_ebpf::{
    helpers::bpf_probe_read_kernel_str_bytes,
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use profiler_common::record::{
    CGROUP_PATH_LEN, COMM_LEN, CgroupKey, CgroupPending, CgroupValue, Loss, cgroup_op,
};

use super::common::{
    Task, add_atomic, add_timed, comm, now, reset, slot, stopped, timed, traced, written_now,
};

#[map]
static CGROUP_OPS: HashMap<CgroupKey, CgroupValue> = HashMap::with_max_entries(16384, 0);
/// The timed system call each thread is in, and the operations seen in it.
#[map]
static CGROUP_PENDING: HashMap<u32, CgroupPending> = HashMap::with_max_entries(8192, 0);
/// Builds an untimed operation's key (too large for the BPF stack).
#[map]
static CGROUP_SCRATCH: PerCpuArray<CgroupKey> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
static CGROUP_PENDING_ZERO: CgroupPending = CgroupPending {
    key: CgroupKey {
        window: 0,
        kind: 0,
        tgid: 0,
        root: 0,
        path: [0; CGROUP_PATH_LEN],
        comm: [0; COMM_LEN],
    },
    start_ns: 0,
    ops: 0,
    pad: 0,
};
#[unsafe(no_mangle)]
static CGROUP_VALUE_ZERO: CgroupValue = CgroupValue {
    count: 0,
    timed: 0,
    total_ns: 0,
    max_ns: 0,
};

// The timed operations of a value; its `count` has the untimed ones too.
timed!(CgroupValue, timed, total_ns, max_ns);

/// Adds `ops` operations taking `ns` (timed or not) to a key's value.
#[inline(always)]
fn account(key: *const CgroupKey, window: u32, ops: u64, timed: bool, ns: u64) -> Option<()> {
    // SAFETY: key points to a map value or this CPU's scratch.
    let key = unsafe { &*key };
    let value = slot(
        &CGROUP_OPS,
        key,
        &CGROUP_VALUE_ZERO,
        window,
        Loss::CgroupMapFull,
    )?;
    // SAFETY: a valid map value.
    add_atomic(unsafe { &raw mut (*value).count }, ops);
    if timed {
        add_timed(value, ops, ns);
    }
    Some(())
}

/// The hierarchy of cgroup `cgrp` (a BTF pointer): `cgrp->root->hierarchy_id`,
/// as the classic tracepoints show it (0 is cgroup v2).
#[inline(always)]
fn hierarchy(cgrp: *const u8) -> u32 {
    let (root_off, id_off) = (
        config!(offsets.cgroup_root) as usize,
        config!(offsets.cgroup_hierarchy_id) as usize,
    );
    // SAFETY: BTF pointers; the offsets are constants (read-only config)
    // which the verifier checks against kernel BTF.
    unsafe {
        let root = core::ptr::read_volatile(cgrp.add(root_off).cast::<*const u8>());
        core::ptr::read_volatile(root.add(id_off).cast::<i32>()) as u32
    }
}

/// Fills a key from a cgroup tracepoint's cgroup and path.
#[inline(always)]
fn fill_key(
    key: *mut CgroupKey,
    kind: u32,
    window: u32,
    tgid: u32,
    cgrp: *const u8,
    path: *const u8,
) {
    // SAFETY: key points to a map value or this CPU's scratch, valid for
    // writes; the path is read with the checked string helper.
    unsafe {
        (*key).window = window;
        (*key).kind = kind;
        (*key).tgid = tgid;
        (*key).root = hierarchy(cgrp);
        (*key).comm = comm();
        if bpf_probe_read_kernel_str_bytes(path, &mut (*key).path).is_err() {
            (*key).path[0] = 0;
        }
    }
}

/// One operation on cgroup `cgrp` at `path` (the tracepoints' first two
/// arguments): charged when its timed system call returns if the thread is
/// in one, else now, untimed.
#[inline(always)]
fn operation(ctx: &BtfTracePointContext, kind: u32) -> Option<u32> {
    let (task, window) = traced()?;
    let (cgrp, path): (*const u8, *const u8) = (ctx.arg(0), ctx.arg(1));
    if let Some(p) = CGROUP_PENDING.get_ptr_mut(&task.pid()) {
        // SAFETY: a valid map value of this thread.
        unsafe {
            if (*p).ops == 0 {
                fill_key(&raw mut (*p).key, kind, window, task.tgid(), cgrp, path);
            }
            (*p).ops += 1;
        }
        return Some(0);
    }
    let key = CGROUP_SCRATCH.get_ptr_mut(0)?;
    fill_key(key, kind, window, task.tgid(), cgrp, path);
    account(key, window, 1, false, 0)?;
    Some(0)
}

tracepoint_program! {
/// `cgroup_mkdir(cgrp, path)`.
pub fn cgroup_mkdir(ctx: BtfTracePointContext) -> Option<u32> {
    operation(&ctx, cgroup_op::MKDIR)
}
}

tracepoint_program! {
/// `cgroup_rmdir(cgrp, path)`.
pub fn cgroup_rmdir(ctx: BtfTracePointContext) -> Option<u32> {
    operation(&ctx, cgroup_op::RMDIR)
}
}

tracepoint_program! {
/// `cgroup_attach_task(dst_cgrp, path, task, threadgroup)`.
pub fn cgroup_attach(ctx: BtfTracePointContext) -> Option<u32> {
    operation(&ctx, cgroup_op::ATTACH)
}
}

syscall_program! {
/// `mkdir`, `mkdirat`, `rmdir`, `unlinkat` (and with
/// `--time-cgroup-writes` `write`) entered by a tracked task: the system
/// calls cgroup operations are made in.
pub fn cgroup_syscall_enter, cgroup_syscall_enter_per_call =>
    |_call, _ctx| try_cgroup_syscall_enter()
}

#[inline(always)]
fn try_cgroup_syscall_enter() -> Option<u32> {
    let pid = Task::tracked()?.pid();
    let p = reset(&CGROUP_PENDING, &pid, &CGROUP_PENDING_ZERO)?;
    // SAFETY: a valid map value of this thread.
    unsafe { (*p).start_ns = now() };
    Some(0)
}

syscall_program! {
pub fn cgroup_syscall_exit, cgroup_syscall_exit_per_call => |_call, _ctx| try_cgroup_syscall_exit()
}

#[inline(always)]
fn try_cgroup_syscall_exit() -> Option<u32> {
    if stopped() {
        return None;
    }
    let pid = Task::current().pid();
    let p = CGROUP_PENDING.get_ptr_mut(&pid)?;
    // SAFETY: a valid map value of this thread, removed after use.
    unsafe {
        if (*p).ops > 0 {
            let ns = now().saturating_sub((*p).start_ns);
            (*p).key.window = written_now((*p).key.window);
            let _ = account(
                &raw const (*p).key,
                (*p).key.window,
                u64::from((*p).ops),
                true,
                ns,
            );
        }
    }
    let _ = CGROUP_PENDING.remove(&pid);
    Some(0)
}

/// The exit hook: a timed system call the thread was in goes with it.
#[inline(always)]
pub(super) fn task_exited(pid: u32) {
    let _ = CGROUP_PENDING.remove(&pid);
}
