//! The recording programs, aggregated in the kernel: one module per tracer
//! over shared helpers.
//!
//! - [`common`]: the current task and whether it is traced, the window an
//!   event is charged to, losses and counters, get-or-insert of a map
//!   entry, the timed aggregates, events to userspace, the tasks' saved
//!   user registers;
//! - [`stacks`]: kernel and user stacks, stored by content hash;
//! - [`oncpu`], [`offcpu`], [`locks`], [`fork`], [`cgroup`], [`dbus`],
//!   [`libvirt`]: the tracers;
//! - [`vm`]: VM creations, which move the windows;
//! - [`attribution`]: `--attribute vm`, which VM a thread works for;
//! - [`tasks`]: forks, execs and exits of tasks (following targets); a
//!   task's exit calls each tracer's exit hook;
//! - [`mappings`]: the processes' executable mappings the unwinder knows;
//! - [`syscalls`]: the programs on `raw_syscalls:sys_enter`/`sys_exit`,
//!   which jump to the tracers' programs for the calls they time.
//!
//! Every program is on a BTF tracepoint, a perf event or a uprobe: a BTF
//! tracepoint's or a `uprobe.multi` link's program is detached without an
//! RCU grace period each (a classic tracepoint's or a perf-event uprobe's
//! costs one, about 70 ms here, and hvprof had fifty), and leaves the
//! events to other tools untouched. The exception: the programs timing
//! system calls move to the calls' own classic tracepoints once a
//! recording has run long enough for them to cost less there (see
//! [`syscalls`]).
//!
//! Every program computes the current window from the kernel's VM count when
//! its event happens, so there is no race with userspace.

use profiler_common::record::Config;

/// Set by userspace before load.
#[unsafe(no_mangle)]
pub(crate) static CONFIG: Config = Config::zeroed();

/// Reads one field of [`CONFIG`]; volatile so the load of the patched
/// read-only value is kept.
macro_rules! config {
    ($field:ident) => {
        // SAFETY: CONFIG is a plain static; reading a field is always valid.
        unsafe { core::ptr::read_volatile(&raw const $crate::record::CONFIG.$field) }
    };
    ($outer:ident . $field:ident) => {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&raw const $crate::record::CONFIG.$outer.$field) }
    };
}

/// A recording program on a BTF tracepoint (section `tp_btf`; userspace
/// names the tracepoint when it loads it). Its body does not run while
/// another of hvprof's programs is under way on the CPU
/// ([`common::Running`]).
macro_rules! tracepoint_program {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident($ctx:ident: BtfTracePointContext) -> $ret:ty $body:block
    ) => {
        $(#[$attr])*
        #[unsafe(no_mangle)]
        #[unsafe(link_section = "tp_btf")]
        $vis fn $name(ctx: *mut ::core::ffi::c_void) -> i32 {
            #[inline(always)]
            fn program($ctx: ::aya_ebpf::programs::BtfTracePointContext) -> $ret $body
            if let Some(_running) = $crate::record::common::Running::start() {
                let _ = program(::aya_ebpf::programs::BtfTracePointContext::new(ctx));
            }
            0
        }
    };
}

/// A program timing a system call, built twice from one body: on a BTF
/// tracepoint (`tp_btf`), for the dispatch on `raw_syscalls` to jump to,
/// and on the call's own classic tracepoint (`syscalls:sys_enter_X`), which
/// userspace attaches instead once the recording has run for
/// `--syscall-dispatch-for` (see [`syscalls`]). Both run the body on the
/// task's registers ([`common::Syscall`]), each only while the phase says
/// it is its turn (`PHASE_PER_CALL_SYSCALLS`: read here, for the timed
/// calls, not by the dispatch on every call); the classic one returns 1,
/// so the event goes on to other perf users of the tracepoint.
macro_rules! syscall_program {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident, $per_call:ident => |$call:ident, $ctx:ident| $body:expr
    ) => {
        $(#[$attr])*
        #[unsafe(no_mangle)]
        #[unsafe(link_section = "tp_btf")]
        $vis fn $name(ctx: *mut ::core::ffi::c_void) -> i32 {
            if !$crate::record::common::per_call_syscalls()
                && let Some(_running) = $crate::record::common::Running::start()
            {
                let ctx = ::aya_ebpf::programs::BtfTracePointContext::new(ctx);
                let ($call, $ctx) = ($crate::record::common::Syscall::of(&ctx), &ctx);
                let _ = $body;
            }
            0
        }

        $(#[$attr])*
        #[unsafe(no_mangle)]
        #[unsafe(link_section = "tracepoint")]
        $vis fn $per_call(ctx: *mut ::core::ffi::c_void) -> u32 {
            if $crate::record::common::per_call_syscalls()
                && let Some(_running) = $crate::record::common::Running::start()
            {
                let ctx = ::aya_ebpf::programs::TracePointContext::new(ctx);
                let ($call, $ctx) = ($crate::record::common::Syscall::current(), &ctx);
                let _ = $body;
            }
            1
        }
    };
}

mod attribution;
mod cgroup;
mod common;
mod dbus;
mod fork;
mod libvirt;
mod live_kstack;
mod locks;
mod mappings;
mod offcpu;
mod oncpu;
mod stacks;
mod syscalls;
mod tasks;
mod vm;

pub(crate) use stacks::STACK_SCRATCH;
