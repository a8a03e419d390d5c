//! The recording programs, aggregated in the kernel: one module per tracer
//! over shared helpers.
//!
//! - [`common`]: the current task and whether it is traced, the window an
//!   event is charged to, losses and counters, get-or-insert of a map
//!   entry, the timed aggregates, events to userspace, the tasks' saved
//!   user registers;
//! - [`stacks`]: kernel and user stacks, stored by content hash;
//! - [`oncpu`], [`offcpu`], [`locks`], [`fork`], [`cgroup`], [`dbus`]: the
//!   tracers;
//! - [`vm`]: VM creations, which move the windows;
//! - [`tasks`]: forks, execs and exits of tasks (following targets); a
//!   task's exit calls each tracer's exit hook;
//! - [`mappings`]: the processes' executable mappings the unwinder knows.
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

mod cgroup;
mod common;
mod dbus;
mod fork;
mod locks;
mod mappings;
mod offcpu;
mod oncpu;
mod stacks;
mod tasks;
mod vm;

pub(crate) use stacks::STACK_SCRATCH;
