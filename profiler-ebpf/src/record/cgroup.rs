//! Cgroup operations (`cgroup_mkdir`, `cgroup_rmdir`, `cgroup_attach_task`)
//! of traced tasks, per hierarchy and path, timed by the system call each
//! was made in (mkdir, rmdir, and with `--time-cgroup-writes` the writes to
//! `cgroup.procs`).

use aya_ebpf::{
    EbpfContext as _,
    helpers::bpf_probe_read_kernel_str_bytes,
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use profiler_common::record::{
    CGROUP_PATH_LEN, COMM_LEN, CgroupKey, CgroupPending, CgroupValue, Loss, cgroup_op,
};

use super::common::{
    Task, add_atomic, add_timed, comm, now, read, reset, slot, stopped, timed, traced,
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

/// Fills a key from a cgroup tracepoint.
#[inline(always)]
fn fill_key(
    ctx: &TracePointContext,
    key: *mut CgroupKey,
    kind: u32,
    window: u32,
    tgid: u32,
    root_off: u32,
    path_off: u32,
) {
    // SAFETY: key points to a map value or this CPU's scratch, valid for
    // writes; the path is read with the checked string helper.
    unsafe {
        (*key).window = window;
        (*key).kind = kind;
        (*key).tgid = tgid;
        (*key).root = read::<i32>(ctx, root_off).unwrap_or(-1) as u32;
        (*key).comm = comm();
        let loc = read::<u32>(ctx, path_off).unwrap_or(0);
        let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
        if bpf_probe_read_kernel_str_bytes(src, &mut (*key).path).is_err() {
            (*key).path[0] = 0;
        }
    }
}

/// One operation: charged when its timed system call returns if the
/// thread is in one, else now, untimed.
#[inline(always)]
fn operation(ctx: &TracePointContext, kind: u32, root_off: u32, path_off: u32) -> Option<u32> {
    let (task, window) = traced()?;
    if let Some(p) = CGROUP_PENDING.get_ptr_mut(&task.pid()) {
        // SAFETY: a valid map value of this thread.
        unsafe {
            if (*p).ops == 0 {
                fill_key(
                    ctx,
                    &raw mut (*p).key,
                    kind,
                    window,
                    task.tgid(),
                    root_off,
                    path_off,
                );
            }
            (*p).ops += 1;
        }
        return Some(0);
    }
    let key = CGROUP_SCRATCH.get_ptr_mut(0)?;
    fill_key(ctx, key, kind, window, task.tgid(), root_off, path_off);
    account(key, window, 1, false, 0)?;
    Some(0)
}

tracepoint_program! {
pub fn cgroup_mkdir(ctx: TracePointContext) -> Option<u32> {
    operation(
        &ctx,
        cgroup_op::MKDIR,
        config!(offsets.cgroup_root),
        config!(offsets.cgroup_path),
    )
}
}

tracepoint_program! {
pub fn cgroup_rmdir(ctx: TracePointContext) -> Option<u32> {
    operation(
        &ctx,
        cgroup_op::RMDIR,
        config!(offsets.cgroup_root),
        config!(offsets.cgroup_path),
    )
}
}

tracepoint_program! {
pub fn cgroup_attach(ctx: TracePointContext) -> Option<u32> {
    operation(
        &ctx,
        cgroup_op::ATTACH,
        config!(offsets.cgroup_attach_root),
        config!(offsets.cgroup_attach_path),
    )
}
}

tracepoint_program! {
/// `sys_enter_{mkdir,mkdirat,rmdir,unlinkat,write}` of tracked tasks: the
/// system calls cgroup operations are made in.
pub fn cgroup_syscall_enter(_ctx: TracePointContext) -> Option<u32> {
    try_cgroup_syscall_enter()
}
}

#[inline(always)]
fn try_cgroup_syscall_enter() -> Option<u32> {
    let pid = Task::tracked()?.pid();
    let p = reset(&CGROUP_PENDING, &pid, &CGROUP_PENDING_ZERO)?;
    // SAFETY: a valid map value of this thread.
    unsafe { (*p).start_ns = now() };
    Some(0)
}

tracepoint_program! {
pub fn cgroup_syscall_exit(_ctx: TracePointContext) -> Option<u32> {
    try_cgroup_syscall_exit()
}
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
