//! On-CPU samples: a perf event (cpu-clock, every CPU) counts the traced
//! task's kernel and user stacks.

use aya_ebpf::{macros::map, macros::perf_event, maps::HashMap, programs::PerfEventContext};
use profiler_common::record::{Loss, SampleKey};

use super::{
    common::{Running, add_atomic, comm, slot, traced},
    stacks::stacks,
};

#[map]
static ONCPU_COUNTS: HashMap<SampleKey, u64> = HashMap::with_max_entries(65536, 0);

#[perf_event]
pub fn oncpu_sample(ctx: PerfEventContext) -> u32 {
    // A sample that interrupts another of hvprof's programs is not taken.
    let Some(_running) = Running::start() else {
        return 0;
    };
    try_oncpu_sample(&ctx).unwrap_or(0)
}

#[inline(always)]
fn try_oncpu_sample(ctx: &PerfEventContext) -> Option<u32> {
    // The idle tasks (pid 0) are not traced.
    let (task, window) = traced()?;
    let (kern_stack, user_stack) = stacks(ctx, window);
    let key = SampleKey {
        window,
        tgid: task.tgid(),
        pid: task.pid(),
        pad: 0,
        kern_stack,
        user_stack,
        comm: comm(),
    };
    let count = slot(&ONCPU_COUNTS, &key, &0, window, Loss::OnCpuMapFull)?;
    add_atomic(count, 1);
    Some(0)
}
