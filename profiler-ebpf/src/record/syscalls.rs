//! The system calls the tracers time (`ioctl` for VM creations, the fork
//! calls, the cgroup calls, `mmap`): one program on each of
//! `raw_syscalls:sys_enter` and `sys_exit` jumps to the program userspace
//! put in the call's slot of [`SYSCALL_ENTER_PROGS`] or
//! [`SYSCALL_EXIT_PROGS`], and returns at once for every other call.
//!
//! The dispatch runs on every system call of the machine (60 ns a run
//! here), the calls' own tracepoints (`syscalls:sys_enter_ioctl`, …) only
//! on theirs; but those are classic tracepoints, each detached with an RCU
//! grace period of its own (about 70 ms here, one after the other, and
//! there are twenty). So a recording starts on the dispatch, and after
//! `--syscall-dispatch-for` (10 s) userspace attaches the programs' twins
//! on the calls' own tracepoints, sets `PHASE_PER_CALL_SYSCALLS` (from
//! then on the programs the dispatch jumps to return at once and the twins
//! run), and detaches the dispatch: a short recording exits at once, a long one pays the grace
//! periods once at its end instead of a program on every system call.

use aya_ebpf::{macros::map, maps::ProgramArray, programs::BtfTracePointContext};
use profiler_common::record::SYSCALL_SLOTS;

use super::common::Syscall;

#[map]
static SYSCALL_ENTER_PROGS: ProgramArray = ProgramArray::with_max_entries(SYSCALL_SLOTS, 0);
#[map]
static SYSCALL_EXIT_PROGS: ProgramArray = ProgramArray::with_max_entries(SYSCALL_SLOTS, 0);

/// `sys_enter(regs, id)`: the program of call `id`, for a 64-bit call.
#[unsafe(no_mangle)]
#[unsafe(link_section = "tp_btf")]
pub fn syscall_enter(ctx: *mut core::ffi::c_void) -> i32 {
    let ctx = BtfTracePointContext::new(ctx);
    let nr: u64 = ctx.arg(1);
    if nr < u64::from(SYSCALL_SLOTS) && Syscall::of(&ctx).native() {
        // SAFETY: a tail call with this program's own context; an empty
        // slot returns here.
        unsafe { SYSCALL_ENTER_PROGS.tail_call(&ctx, nr as u32) };
    }
    0
}

/// `sys_exit(regs, ret)`: the program of the call the registers name.
#[unsafe(no_mangle)]
#[unsafe(link_section = "tp_btf")]
pub fn syscall_exit(ctx: *mut core::ffi::c_void) -> i32 {
    let ctx = BtfTracePointContext::new(ctx);
    let nr = Syscall::of(&ctx).nr();
    if nr < u64::from(SYSCALL_SLOTS) {
        // SAFETY: as above.
        unsafe { SYSCALL_EXIT_PROGS.tail_call(&ctx, nr as u32) };
    }
    0
}
