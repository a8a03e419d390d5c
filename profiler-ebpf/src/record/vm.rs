//! VM creations, which move the windows: a successful `KVM_CREATE_VM`
//! ioctl, or with `--vm-event exec:` an exec whose comm matches.

use aya_ebpf::{macros::map, maps::HashMap};
use profiler_common::record::{COMM_LEN, EventKind, KVM_CREATE_VM, VM_SOURCE_EXEC, VM_SOURCE_KVM};

use super::common::{
    Syscall, Task, VM_STATE, add_atomic, comm_matches, emit_token, stopped, window_for,
};

/// Processes whose VM was counted at exec (`--vm-event exec:`): their first
/// successful `KVM_CREATE_VM` is that same VM and is not counted again.
#[map]
static VM_BY_EXEC: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);
/// Threads inside a `KVM_CREATE_VM` ioctl.
#[map]
static PENDING_CREATE: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Counts a VM made by `task` (`source`: `VM_SOURCE_*`) and tells
/// userspace.
#[inline(always)]
fn vm_created(task: Task, source: u32) -> Option<()> {
    if stopped() {
        return None;
    }
    let state = VM_STATE.get_ptr_mut(0)?;
    // The count itself is exact (atomic add). The ordinal is read back after
    // it: a fetch-add would need BPF cpu v3, which aya-build does not select,
    // so two creations within the same instant on two CPUs may both read the
    // later count. Userspace numbers creations by their time stamps.
    // SAFETY: a valid map value.
    let created = unsafe {
        add_atomic(&raw mut (*state).created, 1);
        core::ptr::read_volatile(&raw const (*state).created)
    };
    emit_token(
        EventKind::VmCreated,
        task,
        source,
        created,
        window_for(created),
        super::attribution::vm_created(task),
    );
    Some(())
}

/// At an exec (of any task) whose new comm is `comm`: with `--vm-event
/// exec:`, a matching comm is a VM.
#[inline(always)]
pub(super) fn exec(task: Task, comm: &[u8; COMM_LEN]) {
    if config!(vm_event_exec) != 0
        && comm_matches(
            comm,
            &config!(vm_exec_comm),
            config!(vm_exec_len),
            config!(vm_exec_prefix) != 0,
        )
    {
        let _ = vm_created(task, VM_SOURCE_EXEC);
        if config!(vm_event_kvm) != 0 {
            let _ = VM_BY_EXEC.insert(&task.tgid(), &1, 0);
        }
    }
}

syscall_program! {
/// `ioctl(fd, cmd, arg)` entered.
pub fn vm_ioctl_enter, vm_ioctl_enter_per_call => |call, _ctx| try_vm_ioctl_enter(call)
}

#[inline(always)]
fn try_vm_ioctl_enter(call: Syscall) -> Option<u32> {
    if config!(vm_event_kvm) == 0 {
        return None;
    }
    if call.arg::<1>() == KVM_CREATE_VM {
        let _ = PENDING_CREATE.insert(&Task::current().pid(), &1, 0);
    }
    Some(0)
}

syscall_program! {
pub fn vm_ioctl_exit, vm_ioctl_exit_per_call => |call, _ctx| try_vm_ioctl_exit(call)
}

#[inline(always)]
fn try_vm_ioctl_exit(call: Syscall) -> Option<u32> {
    let task = Task::current();
    // SAFETY: only presence is tested.
    unsafe { PENDING_CREATE.get(&task.pid()) }?;
    let _ = PENDING_CREATE.remove(&task.pid());
    let ret = call.ret();
    // A VM fd: the VM exists (unless its exec already counted it).
    if ret >= 0 && VM_BY_EXEC.remove(&task.tgid()).is_err() {
        let _ = vm_created(task, VM_SOURCE_KVM);
    }
    Some(0)
}

/// The exit hook, for every exiting task: a process counted at its exec
/// that made no VM is forgotten.
#[inline(always)]
pub(super) fn task_exited(task: Task) {
    if task.pid() == task.tgid() && config!(vm_event_exec) != 0 && config!(vm_event_kvm) != 0 {
        let _ = VM_BY_EXEC.remove(&task.tgid());
    }
}
