//! The capability probes behind `hvprof check`.
//!
//! The probe programs count what they see in a per-CPU array indexed by
//! [`CheckCounter`]; userspace sums the CPUs. The names below are the names of
//! the programs, maps and globals in the eBPF object.

/// Per-CPU array of `u64` hit counters, indexed by [`CheckCounter`].
pub const CHECK_COUNTS_MAP: &str = "CHECK_COUNTS";

/// Read-only global: only events of this thread group are counted.
pub const CHECK_TGID_GLOBAL: &str = "CHECK_TGID";
/// Read-only global: only forks made by this thread are counted.
pub const CHECK_TID_GLOBAL: &str = "CHECK_TID";

/// Program names, as in the eBPF object.
pub mod program {
    /// A tracepoint program that does nothing but count; attached to every
    /// tracepoint a tracer needs to prove the attach works.
    pub const TRACEPOINT: &str = "check_tracepoint";
    /// `sched:sched_process_fork`, counting forks made by [`super::CHECK_TID_GLOBAL`].
    pub const FORK: &str = "check_fork";
    /// cpu-clock sampling program.
    pub const PERF_EVENT: &str = "check_perf_event";
    /// uprobe on a function of the calling executable.
    pub const UPROBE: &str = "check_uprobe";
    /// fentry on [`super::FENTRY_FUNCTION`].
    pub const FENTRY: &str = "check_fentry";
    /// fexit on [`super::FENTRY_FUNCTION`].
    pub const FEXIT: &str = "check_fexit";
    /// BTF tracepoint on `sched_switch`, reading all four arguments.
    pub const BTF_SWITCH: &str = "check_btf_switch";
}

/// The kernel function the fentry/fexit probes attach to: present on every
/// kernel, and called by a plain `read(2)`, so the probe can be triggered.
pub const FENTRY_FUNCTION: &str = "vfs_read";

/// Slots of [`CHECK_COUNTS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckCounter {
    Tracepoint = 0,
    Fork = 1,
    PerfEvent = 2,
    Uprobe = 3,
    Fentry = 4,
    Fexit = 5,
    /// The off-CPU tracer's BTF tracepoint (`sched_switch` with its
    /// `prev_state` argument).
    BtfSwitch = 6,
}

impl CheckCounter {
    /// Number of slots in [`CHECK_COUNTS_MAP`].
    pub const COUNT: u32 = 7;
}
