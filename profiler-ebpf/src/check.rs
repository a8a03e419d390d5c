//! Probes for `hvprof check`: each one proves that a kind of program loads,
//! attaches and fires on this kernel, by counting what it sees.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, fentry, fexit, map, perf_event, uprobe},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, FEntryContext, FExitContext, PerfEventContext, ProbeContext},
};
use profiler_common::check::CheckCounter;

#[map]
static CHECK_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CheckCounter::COUNT, 0);

/// Set by userspace before load.
#[unsafe(no_mangle)]
static CHECK_TGID: u32 = 0;
/// Set by userspace before load.
#[unsafe(no_mangle)]
static CHECK_TID: u32 = 0;

#[inline(always)]
fn bump(counter: CheckCounter) {
    if let Some(slot) = CHECK_COUNTS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and this program cannot be preempted by
        // itself on one CPU, so the read-modify-write is not racy.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn current_tgid_is_target() -> bool {
    // SAFETY: a read-only global; volatile so the compiler keeps the load
    // that userspace patches before load.
    let target = unsafe { core::ptr::read_volatile(&raw const CHECK_TGID) };
    (bpf_get_current_pid_tgid() >> 32) as u32 == target
}

/// Loaded on each BTF tracepoint a recording attaches to, in turn.
#[btf_tracepoint]
pub fn check_tracepoint(_ctx: BtfTracePointContext) -> i32 {
    bump(CheckCounter::Tracepoint);
    0
}

/// `sched_process_fork` runs in the parent: count forks made by the one
/// thread userspace named, so the count is exact.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn check_fork(_ctx: BtfTracePointContext) -> i32 {
    // SAFETY: as above.
    let target = unsafe { core::ptr::read_volatile(&raw const CHECK_TID) };
    if bpf_get_current_pid_tgid() as u32 == target {
        bump(CheckCounter::Fork);
    }
    0
}

#[perf_event]
pub fn check_perf_event(_ctx: PerfEventContext) -> u32 {
    bump(CheckCounter::PerfEvent);
    0
}

/// A `uprobe.multi` program, as the recording's uprobes are.
#[uprobe(multi)]
pub fn check_uprobe(_ctx: ProbeContext) -> u32 {
    if current_tgid_is_target() {
        bump(CheckCounter::Uprobe);
    }
    0
}

#[fentry]
pub fn check_fentry(_ctx: FEntryContext) -> i32 {
    if current_tgid_is_target() {
        bump(CheckCounter::Fentry);
    }
    0
}

#[fexit]
pub fn check_fexit(_ctx: FExitContext) -> i32 {
    if current_tgid_is_target() {
        bump(CheckCounter::Fexit);
    }
    0
}

/// Reads `prev_state`, the fourth argument (Linux 5.18+): on an older
/// kernel the verifier refuses the load, as it would the off-CPU tracer.
#[btf_tracepoint(function = "sched_switch")]
pub fn check_btf_switch(ctx: BtfTracePointContext) -> u32 {
    let state: u64 = ctx.arg(3);
    if state != u64::MAX {
        bump(CheckCounter::BtfSwitch);
    }
    0
}
