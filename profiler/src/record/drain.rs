//! Reading the kernel's aggregations out once the recording stops: the
//! maps are frozen first (the programs see `STOPPED` and change nothing),
//! then every map is read whole, with what is still in flight — the blocks
//! of tasks still blocked, and those not yet added up — and the losses.

use std::collections::{BTreeMap, HashMap};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap},
};
use profiler_common::{
    record::{
        CgroupKey, CgroupValue, Counter, DbusKey, DbusValue, ForkKey, ForkValue, LockKey,
        LockValue, Loss, LossKey, OffCpuKey, OffCpuStart, OffCpuValue, STACK_ID_MIN, SampleKey,
        StackBuf, VmState, names,
    },
    unwind::UnwindStop,
};

use super::{
    attach,
    events::Recorder,
    options::{self, RecordError},
};
use crate::{
    profile::{self, LossCount},
    tracer::Tracer,
};

/// Freezes the maps: the programs see `STOPPED` and change nothing, so they
/// can stay attached until the files are written (detaching costs an RCU
/// grace period per probe, seconds with dozens of them). If the flag
/// cannot be written, the programs are detached instead, so that the maps
/// hold still all the same.
pub(super) fn freeze(bpf: &mut Ebpf) {
    let name = names::STOPPED;
    let frozen = bpf
        .map_mut(name)
        .ok_or_else(|| "the map is missing from the eBPF object".to_owned())
        .and_then(|m| Array::<&mut MapData, u32>::try_from(m).map_err(|e| options::chain(&e)))
        .and_then(|mut a| a.set(0, &1, 0).map_err(|e| options::chain(&e)));
    if let Err(e) = frozen {
        eprintln!(
            "hvprof: warning: the recording's maps could not be frozen (writing {name}: {e}): \
             the probes are detached before the maps are read instead, which takes longer"
        );
        attach::unload_all(bpf);
    }
    // Let programs already running on other CPUs finish.
    std::thread::sleep(std::time::Duration::from_millis(2));
}

/// The programs `--bpf-stats` reports, in the order of its table: every
/// program of the tracer registry, each once (a test checks it).
const STATS_ORDER: [&str; 24] = [
    names::PROG_ONCPU,
    names::PROG_SCHED_SWITCH,
    names::PROG_SYSCALL_ENTER,
    names::PROG_SYSCALL_EXIT,
    names::PROG_FORK,
    names::PROG_EXEC,
    names::PROG_EXIT,
    names::PROG_IOCTL_ENTER,
    names::PROG_IOCTL_EXIT,
    names::PROG_LOCK_BEGIN,
    names::PROG_LOCK_END,
    names::PROG_FORK_ENTER,
    names::PROG_FORK_EXIT,
    names::PROG_CGROUP_MKDIR,
    names::PROG_CGROUP_RMDIR,
    names::PROG_CGROUP_ATTACH,
    names::PROG_CGROUP_SYSCALL_ENTER,
    names::PROG_CGROUP_SYSCALL_EXIT,
    names::PROG_FORK_CALLER,
    names::PROG_UNWIND_MMAP_ENTER,
    names::PROG_UNWIND_MMAP_EXIT,
    names::PROG_DBUS_ENTER,
    names::PROG_DBUS_RETURN,
    names::PROG_DBUS_NAMES,
];

/// Run counts and run time of every recording program (`--bpf-stats`).
pub(super) fn program_stats(bpf: &Ebpf) -> Vec<profile::ProgramStat> {
    STATS_ORDER
        .iter()
        .filter_map(|&name| {
            let info = bpf.program(name)?.info().ok()?;
            Some(profile::ProgramStat {
                program: name.to_owned(),
                runs: info.run_count(),
                run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            })
        })
        .collect()
}

/// Everything the kernel side recorded, read out.
pub(super) struct Drained {
    /// VMs created, by the kernel's count.
    pub vm_count: u64,
    pub oncpu: Vec<(SampleKey, u64)>,
    /// One row per key: the map's, and the blocks still in flight.
    pub offcpu: Vec<(OffCpuKey, OffCpuValue)>,
    pub locks: Vec<(LockKey, LockValue)>,
    pub dbus: Vec<(DbusKey, DbusValue)>,
    pub forks: Vec<(ForkKey, ForkValue)>,
    pub cgroups: Vec<(CgroupKey, CgroupValue)>,
    pub losses: Vec<LossCount>,
    /// The unwinder's stops per window.
    pub unwind: Vec<LossCount>,
    /// The frames of every stack a row names, by stack id.
    pub stacks: HashMap<u64, Vec<u64>>,
    /// The kernel's `COUNTERS` and the unwind-table loader's, by name.
    pub counters: BTreeMap<String, u64>,
}

impl Drained {
    /// Every `(tgid, kernel stack, user stack)` that needs frames.
    pub fn triples(&self) -> Vec<(u32, u64, u64)> {
        self.oncpu
            .iter()
            .map(|(k, _)| (k.tgid, k.kern_stack, k.user_stack))
            .chain(
                self.offcpu
                    .iter()
                    .map(|(k, _)| (k.tgid, k.kern_stack, k.user_stack)),
            )
            .chain(
                self.locks
                    .iter()
                    .map(|(k, _)| (k.tgid, k.kern_stack, k.user_stack)),
            )
            .chain(self.forks.iter().map(|(k, _)| (k.tgid, 0, k.user_stack)))
            .chain(self.dbus.iter().map(|(k, _)| (k.tgid, 0, k.user_stack)))
            .collect()
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> RecordError {
    move |source| RecordError::Map { name, source }
}

fn map<'a>(bpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map, RecordError> {
    bpf.map(name).ok_or(RecordError::Missing { name })
}

/// Reads every map of the frozen recording.
pub(super) fn drain(rec: &Recorder, bpf: &Ebpf, stop_ns: u64) -> Result<Drained, RecordError> {
    let vm_count = {
        let name = names::VM_STATE;
        let a: Array<&MapData, VmState> =
            Array::try_from(map(bpf, name)?).map_err(map_err(name))?;
        a.get(&0, 0).map_err(map_err(name))?.created
    };
    let oncpu = {
        let name = names::ONCPU_COUNTS;
        let m: BpfHashMap<&MapData, SampleKey, u64> =
            BpfHashMap::try_from(map(bpf, name)?).map_err(map_err(name))?;
        m.iter().filter_map(Result::ok).collect()
    };
    let offcpu = offcpu(rec, bpf, stop_ns)?;
    let mut losses = losses(bpf)?;
    let unwind = unwind_counts(bpf);
    if rec.ring_losses > 0 {
        losses.push(LossCount {
            window: None,
            kind: "unknown ring-buffer events".to_owned(),
            count: rec.ring_losses,
        });
    }
    let mut drained = Drained {
        vm_count,
        oncpu,
        offcpu,
        locks: aggregation(rec, bpf, names::LOCK_WAITS, Tracer::Locks)?,
        dbus: aggregation(rec, bpf, names::DBUS_CALLS, Tracer::Dbus)?,
        forks: aggregation(rec, bpf, names::FORK_CALLS, Tracer::Fork)?,
        cgroups: aggregation(rec, bpf, names::CGROUP_OPS, Tracer::Cgroup)?,
        losses,
        unwind,
        stacks: HashMap::new(),
        counters: counters(rec, bpf),
    };
    drained.stacks = stacks(bpf, &drained.triples())?;
    Ok(drained)
}

/// The off-CPU map, with the blocks still in flight: each thread's blocks
/// not yet added to the map, and the block of a task still blocked at the
/// stop, so far. One row per key.
fn offcpu(
    rec: &Recorder,
    bpf: &Ebpf,
    stop_ns: u64,
) -> Result<Vec<(OffCpuKey, OffCpuValue)>, RecordError> {
    let name = names::OFFCPU_TIMES;
    let m: BpfHashMap<&MapData, OffCpuKey, OffCpuValue> =
        BpfHashMap::try_from(map(bpf, name)?).map_err(map_err(name))?;
    let mut rows: Vec<(OffCpuKey, OffCpuValue)> = m.iter().filter_map(Result::ok).collect();
    let name = names::OFFCPU_START;
    let m: BpfHashMap<&MapData, u64, OffCpuStart> =
        BpfHashMap::try_from(map(bpf, name)?).map_err(map_err(name))?;
    let min = u64::try_from(rec.opts.min_block.as_nanos()).unwrap_or(u64::MAX);
    let max = u64::try_from(rec.opts.max_block.as_nanos()).unwrap_or(u64::MAX);
    // Entries stay for live threads (and, after the stop, for the threads
    // that exited since). Each holds its last blocks not yet in the
    // off-CPU map; one not blocked has no start.
    for (_, mut s) in m.iter().filter_map(Result::ok) {
        let task = format!("/proc/{}/task/{}", s.key.tgid, s.key.pid);
        // A thread that ran since its last block: that block's run-queue
        // wait, which it would have added at its next switch-out (a thread
        // that exited added its own).
        let since = s.run_delay;
        if let Some(acc) = s.charged_acc_mut()
            && let Some(now) = run_delay_of(&task)
        {
            acc.value.add_runq(now.saturating_sub(since));
        }
        rows.extend(s.pending().map(|a| (a.key, a.value)));
        if s.start_ns == 0 {
            continue;
        }
        let blocked = stop_ns.saturating_sub(s.start_ns);
        let alive = std::path::Path::new(&task).exists();
        if blocked < min || blocked > max || s.start_ns < rec.start_ns || !alive {
            continue;
        }
        // Still blocked: whether it already waits for a CPU is not known.
        rows.push((s.key, OffCpuValue::block(blocked, 0)));
    }
    // One row per key: the map's, a thread's pending blocks and its block
    // in progress may share one.
    let mut merged: HashMap<OffCpuKey, OffCpuValue> = HashMap::with_capacity(rows.len());
    for (k, v) in rows {
        merged.entry(k).or_default().add(&v);
    }
    Ok(merged.into_iter().collect())
}

/// A thread's total run-queue wait so far, in ns (the second field of
/// `/proc/PID/task/TID/schedstat`, the kernel's `sched_info.run_delay`).
fn run_delay_of(task: &str) -> Option<u64> {
    std::fs::read_to_string(format!("{task}/schedstat"))
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The kernel's loss counts, per window.
fn losses(bpf: &Ebpf) -> Result<Vec<LossCount>, RecordError> {
    let name = names::LOSSES;
    let m: PerCpuHashMap<&MapData, LossKey, u64> =
        PerCpuHashMap::try_from(map(bpf, name)?).map_err(map_err(name))?;
    Ok(m.iter()
        .filter_map(Result::ok)
        .filter_map(|(k, v)| {
            let loss = Loss::ALL.get(k.loss as usize)?;
            Some(LossCount {
                window: (k.window != u32::MAX).then_some(k.window),
                kind: loss_name(*loss).to_owned(),
                count: v.iter().sum(),
            })
        })
        .filter(|l| l.count > 0)
        .collect())
}

/// What a [`Loss`] is called in the profile.
#[must_use]
pub fn loss_name(l: Loss) -> &'static str {
    match l {
        Loss::KernStackCollision => "kernel stack collisions (-EEXIST)",
        Loss::UserStackCollision => "user stack collisions (-EEXIST)",
        Loss::KernStackError => "kernel stacks not taken",
        Loss::UserStackMissing => "user stacks missing",
        Loss::StackMapFull => "stack map full (raise --max-stacks)",
        Loss::OnCpuMapFull => "on-CPU map full",
        Loss::OffCpuMapFull => "off-CPU map full",
        Loss::OffCpuStartFull => "off-CPU start map full",
        Loss::EventDropped => "ring-buffer events dropped",
        Loss::TrackedFull => "children not followed (tracked map full)",
        Loss::DbusMapFull => "D-Bus calls not counted (map full)",
        Loss::LockMapFull => "lock waits not counted (lock map full)",
        Loss::LockNestingTooDeep => "lock waits not timed (contentions nested too deep)",
        Loss::ForkMapFull => "forks not counted (fork map full)",
        Loss::CgroupMapFull => "cgroup operations not counted (cgroup map full)",
    }
}

/// The unwinder's counts per window, by `UnwindStop` name.
fn unwind_counts(bpf: &Ebpf) -> Vec<LossCount> {
    let Some(map) = bpf.map(names::UNWIND_STOPS) else {
        return Vec::new();
    };
    let Ok(m) = PerCpuHashMap::<&MapData, u32, [u64; UnwindStop::COUNT as usize]>::try_from(map)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (window, per_cpu) in m.iter().filter_map(Result::ok) {
        for stop in UnwindStop::ALL {
            let count: u64 = per_cpu.iter().map(|c| c[stop as usize]).sum();
            if count > 0 {
                out.push(LossCount {
                    window: (window != u32::MAX).then_some(window),
                    kind: stop.name().to_owned(),
                    count,
                });
            }
        }
    }
    out.sort_by(|a, b| (a.window, &a.kind).cmp(&(b.window, &b.kind)));
    out
}

/// Every entry of an aggregation map of `tracer`; none when the tracer did
/// not run.
fn aggregation<K: aya::Pod, V: aya::Pod>(
    rec: &Recorder,
    bpf: &Ebpf,
    name: &'static str,
    tracer: Tracer,
) -> Result<Vec<(K, V)>, RecordError> {
    match bpf.map(name) {
        Some(m) if rec.tracers.contains(&tracer) => {
            let m: BpfHashMap<&MapData, K, V> = BpfHashMap::try_from(m).map_err(map_err(name))?;
            Ok(m.iter().filter_map(Result::ok).collect())
        }
        _ => Ok(Vec::new()),
    }
}

/// The frames of every stack the rows name, by id.
fn stacks(bpf: &Ebpf, triples: &[(u32, u64, u64)]) -> Result<HashMap<u64, Vec<u64>>, RecordError> {
    let mut ids: Vec<u64> = triples
        .iter()
        .flat_map(|&(_, k, u)| [k, u])
        .filter(|&id| id >= STACK_ID_MIN)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let name = names::STACKS;
    let m: BpfHashMap<&MapData, u64, StackBuf> =
        BpfHashMap::try_from(map(bpf, name)?).map_err(map_err(name))?;
    Ok(ids
        .into_iter()
        .filter_map(|id| {
            let st = m.get(&id, 0).ok()?;
            let n = st
                .ips
                .iter()
                .position(|&ip| ip == 0)
                .unwrap_or(st.ips.len());
            Some((id, st.ips[..n].to_vec()))
        })
        .collect())
}

/// The off-CPU tracer's stack work (`--bpf-stats`).
const OFFCPU_COUNTERS: [(Counter, &str); 8] = [
    (Counter::OffCpuUserWalk, "off-CPU user stacks walked"),
    (
        Counter::OffCpuUserCached,
        "off-CPU user stacks reused (same site)",
    ),
    (
        Counter::OffCpuKernWalkOut,
        "off-CPU kernel stacks walked at switch-out (D)",
    ),
    (
        Counter::OffCpuKernWalkIn,
        "off-CPU kernel stacks walked at switch-in",
    ),
    (
        Counter::OffCpuKernCached,
        "off-CPU kernel stacks reused (same site)",
    ),
    (
        Counter::OffCpuKernShort,
        "off-CPU blocks too short for a kernel walk",
    ),
    (Counter::OffCpuPreempted, "off-CPU preemptions (no stack)"),
    (
        Counter::OffCpuMapUpdates,
        "off-CPU map updates (accumulated blocks added)",
    ),
];

/// `--verify-stack-cache`: reuses that differed from a walk.
const VERIFY_COUNTERS: [(Counter, &str); 3] = [
    (
        Counter::UserReuseDiffers,
        "user stack reuses that differed from a walk",
    ),
    (
        Counter::KernReuseDiffers,
        "off-CPU kernel stack reuses that differed from a walk",
    ),
    (
        Counter::LockKernReuseDiffers,
        "lock-wait kernel stack reuses that differed from a walk",
    ),
];

/// Every tracer's: programs that did not run, another one being under way on
/// their CPU.
const NESTED_COUNTERS: [(Counter, &str); 1] = [(
    Counter::NestedSkipped,
    "programs skipped: another of hvprof's was running on the CPU",
)];

/// The locks tracer's stack work.
const LOCK_COUNTERS: [(Counter, &str); 6] = [
    (
        Counter::LockWaitsMigrated,
        "lock waits ended on another CPU",
    ),
    (Counter::LockWaitsNested, "lock waits nested in another"),
    (Counter::LockKernWalk, "lock-wait kernel stacks walked"),
    (
        Counter::LockKernCached,
        "lock-wait kernel stacks reused (same place)",
    ),
    (Counter::LockUserWalk, "lock-wait user stacks walked"),
    (
        Counter::LockUserCached,
        "lock-wait user stacks reused (same site)",
    ),
];

/// The kernel's `COUNTERS`, summed over CPUs, by name; and what the
/// unwind-table loader did.
fn counters(rec: &Recorder, bpf: &Ebpf) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Some(m) = bpf.map(names::COUNTERS) else {
        return out;
    };
    let Ok(a) = PerCpuArray::<_, u64>::try_from(m) else {
        return out;
    };
    let groups: [(bool, &[(Counter, &str)]); 4] = [
        (true, &NESTED_COUNTERS),
        (rec.tracers.contains(&Tracer::OffCpu), &OFFCPU_COUNTERS),
        (rec.opts.verify_stack_cache, &VERIFY_COUNTERS),
        (rec.tracers.contains(&Tracer::Locks), &LOCK_COUNTERS),
    ];
    for (on, counted) in groups {
        for &(c, name) in counted.iter().filter(|_| on) {
            let n: u64 = a.get(&(c as u32), 0).map_or(0, |v| v.iter().sum());
            out.insert(name.to_owned(), n);
        }
    }
    unwind_table_counters(rec, &mut out);
    out
}

/// What the unwind-table loader did (`--unwind dwarf`).
fn unwind_table_counters(rec: &Recorder, out: &mut BTreeMap<String, u64>) {
    if let Some(u) = &rec.unwind_stats {
        for (name, n) in [
            ("unwind tables: files loaded", u.files as u64),
            ("unwind tables: files from the cache", u.files_cached as u64),
            (
                "unwind tables: files without tables",
                u.files_without_table as u64,
            ),
            (
                "unwind tables: files that did not fit",
                u.files_not_fitting as u64,
            ),
            ("unwind tables: rows", u.rows),
            ("unwind tables: JIT code ranges", u.jit_code),
            ("unwind tables: chunk index entries", u.chunks),
            (
                "unwind tables: map KiB",
                crate::unwind::procs::map_kib(u.rows, u.chunks),
            ),
            (
                "unwind tables: build/read ms",
                u64::try_from(u.build_time.as_millis()).unwrap_or(u64::MAX),
            ),
            ("unwind tables: process loads", u.process_loads),
            ("unwind tables: mappings left out", u.mappings_left_out),
        ] {
            out.insert(name.to_owned(), n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--bpf-stats` reports every program of the tracer registry, once.
    #[test]
    fn bpf_stats_report_every_registered_program() {
        let mut stats = STATS_ORDER.to_vec();
        let mut registry = crate::tracer::programs();
        stats.sort_unstable();
        stats.dedup();
        registry.sort_unstable();
        assert_eq!(stats.len(), STATS_ORDER.len(), "a program is listed twice");
        assert_eq!(stats, registry);
    }
}
