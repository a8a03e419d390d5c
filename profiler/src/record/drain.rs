//! Reading the kernel's aggregations out.
//!
//! While recording, at every flush: userspace flips the flush parity (see
//! `PHASE_PARITY`), waits for the programs running on other CPUs, then
//! reads and deletes every entry written under the parity before the flip
//! — nothing writes those any more but events that began before it, which
//! insert a new entry, read at a later flush. So the maps hold what two
//! flushes add, however long the recording, and no count is lost to a
//! race between a program's update and a delete.
//!
//! At the stop the maps are frozen (the programs see `PHASE_STOPPED` and
//! change nothing), then read whole, with what is still in flight — the
//! blocks of tasks still blocked, and those not yet added up.

use std::collections::{BTreeMap, HashMap, HashSet};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap},
};
use profiler_common::{
    record::{
        ApiCallValue, CgroupKey, CgroupValue, Counter, DbusKey, DbusValue, ForkKey, ForkValue,
        JobWaitKey, JobWaitStart, LockKey, LockPending, LockValue, Loss, LossKey, OffCpuKey,
        OffCpuStart, OffCpuValue, OffWakeKey, PHASE_OFFCPU_STOPPED, PHASE_PARITY, PHASE_STOPPED,
        STACK_ID_MIN, SampleKey, SpanBlock, SpanKey, StackBuf, VmState, names, net_status,
        parity_of, recorded_window,
    },
    unwind::UnwindStop,
};

use super::{attach, events::Recorder, options::RecordError, symbolize::StackStore};
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
    if let Err(e) = set_phase(bpf, PHASE_STOPPED, 0) {
        eprintln!(
            "hvprof: warning: the recording's maps could not be frozen ({e}): the probes are \
             detached before the maps are read instead, which takes longer"
        );
        attach::unload_all(bpf);
    }
    settle();
}

/// Stops the off-CPU tracer (`PHASE_OFFCPU_STOPPED`) and returns the
/// threads blocked then, and alive: their blocks are unfinished, timed up
/// to the stop. (An entry of a thread gone has a block that never ended:
/// its exit went unseen.)
pub(super) fn stop_offcpu(bpf: &mut Ebpf) -> HashSet<u32> {
    if set_phase(bpf, PHASE_OFFCPU_STOPPED, 0).is_err() {
        return HashSet::new();
    }
    settle();
    let Some(Ok(m)) = bpf
        .map(names::OFFCPU_START)
        .map(BpfHashMap::<&MapData, u64, OffCpuStart>::try_from)
    else {
        return HashSet::new();
    };
    m.iter()
        .filter_map(Result::ok)
        .filter(|(_, s)| s.start_ns != 0)
        .filter(|(_, s)| {
            std::path::Path::new(&format!("/proc/{}/task/{}", s.key.tgid, s.key.pid)).exists()
        })
        .map(|(_, s)| s.key.pid)
        .collect()
}

/// Lets the programs already running on other CPUs finish (a program runs
/// for microseconds, without sleeping).
fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(2));
}

/// Flips the flush parity to `parity`: from now on the programs write
/// their entries under it. Returns once the programs that read the old
/// parity are done.
pub(super) fn flip(bpf: &mut Ebpf, parity: bool) -> Result<(), RecordError> {
    if parity {
        set_phase(bpf, PHASE_PARITY, 0)?;
    } else {
        set_phase(bpf, 0, PHASE_PARITY)?;
    }
    settle();
    Ok(())
}

/// Sets bits `set` and clears bits `clear` of the phase word the programs
/// read (`STOPPED`); userspace, its only writer, writes it from one thread.
pub(super) fn set_phase(bpf: &mut Ebpf, set: u32, clear: u32) -> Result<(), RecordError> {
    let name = names::STOPPED;
    let map = bpf.map_mut(name).ok_or(RecordError::Missing { name })?;
    let mut a: Array<&mut MapData, u32> = Array::try_from(map).map_err(map_err(name))?;
    let phase = a.get(&0, 0).map_err(map_err(name))?;
    a.set(0, &((phase & !clear) | set), 0)
        .map_err(map_err(name))
}

/// Which entries a drain takes.
#[derive(Clone, Copy, Debug)]
pub(super) enum Take {
    /// A flush's: those of the inactive flush parity, deleted.
    Parity(bool),
    /// The stop's: all that is left (the maps are frozen), with what is
    /// still in flight.
    Rest { stop_ns: u64 },
}

impl Take {
    fn wants(self, window: u32) -> bool {
        match self {
            Self::Parity(p) => parity_of(window) == Some(p),
            Self::Rest { .. } => true,
        }
    }

    fn deletes(self) -> bool {
        matches!(self, Self::Parity(_))
    }
}

/// Counts the kernel keeps per CPU under keys it never deletes (losses
/// outside every window): what was already written, to write only what was
/// added since.
#[derive(Default)]
pub(super) struct Seen {
    losses: HashMap<LossKey, u64>,
    unwind: HashMap<u32, [u64; UnwindStop::COUNT as usize]>,
}

/// The programs `--bpf-stats` reports, in the order of its table: every
/// program of the tracer registry, each once (a test checks it).
/// (A program not loaded, as the system calls' twins on their own
/// tracepoints until the move, has no line.)
const STATS_ORDER: [&str; 40] = [
    names::PROG_ONCPU,
    names::PROG_SCHED_SWITCH,
    names::PROG_SCHED_WAKING,
    names::PROG_SYSCALL_ENTER,
    names::PROG_SYSCALL_EXIT,
    names::PROG_FORK,
    names::PROG_EXEC,
    names::PROG_EXIT,
    names::PROG_IOCTL_ENTER,
    names::PROG_IOCTL_EXIT,
    names::PROG_IOCTL_PER_CALL[0],
    names::PROG_IOCTL_PER_CALL[1],
    names::PROG_LOCK_BEGIN,
    names::PROG_LOCK_END,
    names::PROG_FORK_ENTER,
    names::PROG_FORK_EXIT,
    names::PROG_FORK_PER_CALL[0],
    names::PROG_FORK_PER_CALL[1],
    names::PROG_CGROUP_MKDIR,
    names::PROG_CGROUP_RMDIR,
    names::PROG_CGROUP_ATTACH,
    names::PROG_CGROUP_SYSCALL_ENTER,
    names::PROG_CGROUP_SYSCALL_EXIT,
    names::PROG_CGROUP_SYSCALL_PER_CALL[0],
    names::PROG_CGROUP_SYSCALL_PER_CALL[1],
    names::PROG_FORK_CALLER,
    names::PROG_UNWIND_MMAP_ENTER,
    names::PROG_UNWIND_MMAP_EXIT,
    names::PROG_UNWIND_MMAP_PER_CALL[0],
    names::PROG_UNWIND_MMAP_PER_CALL[1],
    names::PROG_DBUS_ENTER,
    names::PROG_DBUS_RETURN,
    names::PROG_DBUS_NAMES,
    names::PROG_LIBVIRT_MSG_RX,
    names::PROG_LIBVIRT_MSG_TX,
    names::PROG_QMP_MSG,
    names::PROG_CALL_ENTER,
    names::PROG_CALL_RETURN,
    names::PROG_JOB_ENTER,
    names::PROG_JOB_RETURN,
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

/// What one drain read out of the kernel.
#[derive(Default)]
pub(super) struct Drained {
    /// VMs created, by the kernel's count (at the stop).
    pub vm_count: Option<u64>,
    pub oncpu: Vec<(SampleKey, u64)>,
    /// One row per key: the map's, and the blocks still in flight.
    pub offcpu: Vec<(OffCpuKey, OffCpuValue)>,
    /// At the stop: the blocks still going, each up to the stop.
    pub unfinished: Vec<(OffCpuKey, OffCpuValue)>,
    /// The wakers tracer's: blocks by who woke them.
    pub offwake: Vec<(OffWakeKey, OffCpuValue)>,
    pub locks: Vec<(LockKey, LockValue)>,
    pub dbus: Vec<(DbusKey, DbusValue)>,
    pub forks: Vec<(ForkKey, ForkValue)>,
    pub cgroups: Vec<(CgroupKey, CgroupValue)>,
    /// libvirt's API calls (at the stop with those still in flight, and
    /// the waits for a domain job still under way), and the QMP rows paired
    /// in userspace since the last drain.
    pub libvirt: Vec<profile::LibvirtCall>,
    /// Waits for a domain job, by caller stack.
    pub jobs: Vec<(JobWaitKey, ApiCallValue)>,
    pub losses: Vec<LossCount>,
    /// The unwinder's stops per window.
    pub unwind: Vec<LossCount>,
    /// The kernel's `COUNTERS` and the unwind-table loader's, by name (at
    /// the stop).
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
                    .chain(&self.unfinished)
                    .map(|(k, _)| (k.tgid, k.kern_stack, k.user_stack)),
            )
            .chain(self.offwake.iter().flat_map(|(k, _)| {
                let (b, w) = (&k.blocked, &k.waker);
                [
                    (b.tgid, b.kern_stack, b.user_stack),
                    (w.tgid, w.kern_stack, w.user_stack),
                ]
            }))
            .chain(
                self.locks
                    .iter()
                    .map(|(k, _)| (k.tgid, k.kern_stack, k.user_stack)),
            )
            .chain(self.locks.iter().map(|(k, _)| {
                let h = &k.holder;
                (h.tgid, h.kern_stack, h.user_stack)
            }))
            .chain(self.forks.iter().map(|(k, _)| (k.tgid, 0, k.user_stack)))
            .chain(self.dbus.iter().map(|(k, _)| (k.tgid, 0, k.user_stack)))
            .chain(self.jobs.iter().map(|(k, _)| (k.tgid, 0, k.user_stack)))
            .collect()
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> RecordError {
    move |source| RecordError::Map { name, source }
}

fn map<'a>(bpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map, RecordError> {
    bpf.map(name).ok_or(RecordError::Missing { name })
}

fn map_mut<'a>(
    bpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, RecordError> {
    bpf.map_mut(name).ok_or(RecordError::Missing { name })
}

/// Reads (and for a flush deletes) what `take` takes of every map, and
/// the stacks its rows name that `stacks` does not have yet.
pub(super) fn drain(
    rec: &Recorder,
    bpf: &mut Ebpf,
    take: Take,
    seen: &mut Seen,
    stacks: &mut StackStore,
) -> Result<Drained, RecordError> {
    let (offcpu, unfinished) = offcpu(rec, bpf, take)?;
    let mut drained = Drained {
        offcpu,
        unfinished,
        oncpu: entries(bpf, names::ONCPU_COUNTS, take, |k: &SampleKey| k.window)?,
        offwake: aggregation(
            rec,
            bpf,
            names::OFFWAKE_TIMES,
            Tracer::Wakers,
            take,
            |k: &OffWakeKey| k.blocked.window,
        )?,
        locks: aggregation(
            rec,
            bpf,
            names::LOCK_WAITS,
            Tracer::Locks,
            take,
            |k: &LockKey| k.window,
        )?,
        dbus: aggregation(
            rec,
            bpf,
            names::DBUS_CALLS,
            Tracer::Dbus,
            take,
            |k: &DbusKey| k.window,
        )?,
        forks: aggregation(
            rec,
            bpf,
            names::FORK_CALLS,
            Tracer::Fork,
            take,
            |k: &ForkKey| k.window,
        )?,
        cgroups: aggregation(
            rec,
            bpf,
            names::CGROUP_OPS,
            Tracer::Cgroup,
            take,
            |k: &CgroupKey| k.window,
        )?,
        libvirt: api_calls(rec, bpf, take)?,
        jobs: aggregation(
            rec,
            bpf,
            names::JOB_WAITS,
            Tracer::Libvirt,
            take,
            |k: &JobWaitKey| k.window,
        )?,
        losses: losses(bpf, take, &mut seen.losses)?,
        unwind: unwind_counts(bpf, take, &mut seen.unwind),
        ..Drained::default()
    };
    // A walk cut where a table did not fit lost frames the user wanted.
    let full = UnwindStop::TablesFull.name();
    let cut = drained.unwind.iter().filter(|l| l.kind == full).cloned();
    drained.losses.extend(cut.map(|l| LossCount {
        kind: USER_STACKS_CUT_TABLES_FULL.to_owned(),
        ..l
    }));
    if let Take::Rest { .. } = take {
        let name = names::VM_STATE;
        let a: Array<&MapData, VmState> =
            Array::try_from(map(bpf, name)?).map_err(map_err(name))?;
        drained.vm_count = Some(a.get(&0, 0).map_err(map_err(name))?.created);
        drained.counters = counters(rec, bpf);
        if rec.ring_losses > 0 {
            drained.losses.push(LossCount {
                window: None,
                kind: "unknown ring-buffer events".to_owned(),
                count: rec.ring_losses,
            });
        }
    }
    fetch_stacks(bpf, &drained.triples(), stacks, take.deletes())?;
    Ok(drained)
}

/// The entries of a hash map that `take` takes (by their recorded
/// window), deleted if it deletes them.
fn entries<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    bpf: &mut Ebpf,
    name: &'static str,
    take: Take,
    window: impl Fn(&K) -> u32,
) -> Result<Vec<(K, V)>, RecordError> {
    let mut m: BpfHashMap<&mut MapData, K, V> =
        BpfHashMap::try_from(map_mut(bpf, name)?).map_err(map_err(name))?;
    let keys: Vec<K> = m
        .keys()
        .filter_map(Result::ok)
        .filter(|k| take.wants(window(k)))
        .collect();
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        if let Ok(v) = m.get(&k, 0) {
            out.push((k, v));
        }
        if take.deletes() {
            // Gone already: a key seen by the walk is deleted only here.
            let _ = m.remove(&k);
        }
    }
    Ok(out)
}

/// Off-CPU rows: the map's, with the blocks that went on past their window
/// cut at the windows' boundaries; at the stop also each thread's blocks
/// not yet added to the map (one row per key), and apart from them the
/// block of each thread still blocked, up to the stop: kept out of the
/// windows' off-CPU time, which would otherwise grow with how long the
/// recording ran.
fn offcpu(
    rec: &Recorder,
    bpf: &mut Ebpf,
    take: Take,
) -> Result<(OffCpuRows, OffCpuRows), RecordError> {
    let mut rows = entries(bpf, names::OFFCPU_TIMES, take, |k: &OffCpuKey| k.window)?;
    rows.extend(spans(rec, bpf, take)?);
    let Take::Rest { stop_ns } = take else {
        return Ok((rows, Vec::new()));
    };
    let name = names::OFFCPU_START;
    let m: BpfHashMap<&MapData, u64, OffCpuStart> =
        BpfHashMap::try_from(map(bpf, name)?).map_err(map_err(name))?;
    let min = u64::try_from(rec.opts.min_block.as_nanos()).unwrap_or(u64::MAX);
    let max = u64::try_from(rec.opts.max_block.as_nanos()).unwrap_or(u64::MAX);
    let mut unfinished: HashMap<OffCpuKey, OffCpuValue> = HashMap::new();
    // Entries stay for live threads (and, after the off-CPU tracer
    // stopped, for the threads that exited since). Each holds its last
    // blocks not yet in the off-CPU map, and its block in progress.
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
        let alive = rec.blocked_at_stop.contains(&s.key.pid);
        if blocked < min || blocked > max || s.start_ns < rec.start_ns || !alive {
            continue;
        }
        // Whether it already waits for a CPU is not known.
        unfinished
            .entry(s.key)
            .or_default()
            .add(&OffCpuValue::block(blocked, 0));
    }
    // One row per key: the map's and a thread's pending blocks may share
    // one.
    let mut merged: HashMap<OffCpuKey, OffCpuValue> = HashMap::with_capacity(rows.len());
    for (k, v) in rows {
        merged.entry(k).or_default().add(&v);
    }
    Ok((
        merged.into_iter().collect(),
        unfinished.into_iter().collect(),
    ))
}

/// Off-CPU rows as the kernel keys them.
type OffCpuRows = Vec<(OffCpuKey, OffCpuValue)>;

/// The blocks that went on past their window (`OFFCPU_SPANS`), cut where
/// the VMs that moved the windows were created: a row per window part,
/// the block counted once, in its first part (the window it began in).
/// A VM created just before the block ended may not be known yet (its
/// event still on its way): the rest of the block then stays in the last
/// window known.
fn spans(
    rec: &Recorder,
    bpf: &mut Ebpf,
    take: Take,
) -> Result<Vec<(OffCpuKey, OffCpuValue)>, RecordError> {
    let spans: Vec<(SpanKey, SpanBlock)> = aggregation(
        rec,
        bpf,
        names::OFFCPU_SPANS,
        Tracer::OffCpu,
        take,
        |k: &SpanKey| k.window,
    )?;
    if spans.is_empty() {
        return Ok(Vec::new());
    }
    let mut created: Vec<u64> = rec.vms.iter().map(|(e, _)| e.ts_ns).collect();
    created.sort_unstable();
    let mut rows = Vec::new();
    for (k, b) in spans {
        let parts = rec.opts.windows.cut_at_vms(&created, k.start_ns, b.end_ns);
        for (i, (window, ns)) in parts.into_iter().enumerate() {
            let value = OffCpuValue {
                count: u64::from(i == 0),
                total_ns: ns,
                max_ns: ns,
                runq_ns: 0,
            };
            rows.push((OffCpuKey { window, ..b.key }, value));
        }
    }
    Ok(rows)
}

/// libvirt's API calls, named; at the stop with the calls received and
/// not answered yet, timed up to the stop.
fn api_calls(
    rec: &Recorder,
    bpf: &mut Ebpf,
    take: Take,
) -> Result<Vec<profile::LibvirtCall>, RecordError> {
    use profiler_common::record::{ApiCallKey, ApiCallStart, ApiCallStartKey};
    let row = |window: u32, tgid, program, procedure, status: &str| profile::LibvirtCall {
        window,
        tgid,
        kind: profile::LibvirtCall::API.to_owned(),
        name: crate::libvirt::procedure_name(program, procedure).into_owned(),
        status: status.to_owned(),
        ..profile::LibvirtCall::default()
    };
    let calls: Vec<(ApiCallKey, ApiCallValue)> = aggregation(
        rec,
        bpf,
        names::API_CALLS,
        Tracer::Libvirt,
        take,
        |k: &ApiCallKey| k.window,
    )?;
    let mut rows: Vec<profile::LibvirtCall> = calls
        .into_iter()
        .filter_map(|(k, v)| {
            let status = if k.status == net_status::OK {
                profile::LibvirtCall::OK
            } else {
                profile::LibvirtCall::ERROR
            };
            Some(profile::LibvirtCall {
                calls: v.count,
                total_ns: v.total_ns,
                max_ns: v.max_ns,
                hist: super::assemble::trim_hist(&v.hist),
                ..row(
                    recorded_window(k.window)?,
                    k.tgid,
                    k.program,
                    k.procedure,
                    status,
                )
            })
        })
        .collect();
    let Take::Rest { stop_ns } = take else {
        return Ok(rows);
    };
    if !rec.tracers.contains(&Tracer::Libvirt) {
        return Ok(rows);
    }
    let name = names::API_CALL_START;
    let m: BpfHashMap<&MapData, ApiCallStartKey, ApiCallStart> =
        BpfHashMap::try_from(map(bpf, name)?).map_err(map_err(name))?;
    for (_, s) in m.iter().filter_map(Result::ok) {
        let Some(window) = recorded_window(s.window) else {
            continue;
        };
        let ns = stop_ns.saturating_sub(s.start_ns);
        let status = profile::LibvirtCall::IN_FLIGHT;
        rows.push(row(window, s.tgid, s.program, s.procedure, status).timed_once(ns));
    }
    // The workers still waiting for a domain's job (their stack is taken
    // when the wait ends).
    let name = names::JOB_WAIT_START;
    let m: BpfHashMap<&MapData, u32, JobWaitStart> =
        BpfHashMap::try_from(map(bpf, name)?).map_err(map_err(name))?;
    for (_, s) in m.iter().filter_map(Result::ok) {
        let Some(window) = recorded_window(s.window) else {
            continue;
        };
        let wait = profile::LibvirtCall {
            window,
            tgid: s.tgid,
            kind: profile::LibvirtCall::JOB.to_owned(),
            status: profile::LibvirtCall::IN_FLIGHT.to_owned(),
            ..profile::LibvirtCall::default()
        };
        rows.push(wait.timed_once(stop_ns.saturating_sub(s.start_ns)));
    }
    Ok(profile::merge::merge_rows(rows))
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

/// The per-CPU counts of a map keyed by recorded window: those of the
/// taken parity (deleted), and of the other keys what was added since they
/// were last read.
fn per_cpu_counts<K, V, const N: usize>(
    bpf: &mut Ebpf,
    name: &'static str,
    take: Take,
    seen: &mut HashMap<K, [u64; N]>,
    window: impl Fn(&K) -> u32,
    counts: impl Fn(&V) -> [u64; N],
) -> Result<Vec<(K, [u64; N])>, RecordError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let mut m: PerCpuHashMap<&mut MapData, K, V> =
        PerCpuHashMap::try_from(map_mut(bpf, name)?).map_err(map_err(name))?;
    let all: Vec<(K, [u64; N])> = m
        .iter()
        .filter_map(Result::ok)
        .map(|(k, per_cpu)| {
            let mut sum = [0u64; N];
            for v in per_cpu.iter() {
                for (s, c) in sum.iter_mut().zip(counts(v)) {
                    *s = s.saturating_add(c);
                }
            }
            (k, sum)
        })
        .collect();
    let mut out = Vec::new();
    for (k, sum) in all {
        let last = seen.get(&k).copied().unwrap_or([0; N]);
        let mut added = [0u64; N];
        for ((a, s), l) in added.iter_mut().zip(sum).zip(last) {
            *a = s.saturating_sub(l);
        }
        if take.deletes() && parity_of(window(&k)).is_some() && take.wants(window(&k)) {
            let _ = m.remove(&k);
            seen.remove(&k);
        } else {
            seen.insert(k, sum);
        }
        if added.iter().any(|&c| c > 0) {
            out.push((k, added));
        }
    }
    Ok(out)
}

/// The kernel's loss counts, per window.
fn losses(
    bpf: &mut Ebpf,
    take: Take,
    seen: &mut HashMap<LossKey, u64>,
) -> Result<Vec<LossCount>, RecordError> {
    let mut seen_arr: HashMap<LossKey, [u64; 1]> = seen.iter().map(|(k, v)| (*k, [*v])).collect();
    let counts = per_cpu_counts(
        bpf,
        names::LOSSES,
        take,
        &mut seen_arr,
        |k: &LossKey| k.window,
        |v: &u64| [*v],
    )?;
    *seen = seen_arr.into_iter().map(|(k, [v])| (k, v)).collect();
    Ok(counts
        .into_iter()
        .filter_map(|(k, [count])| {
            let loss = Loss::ALL.get(k.loss as usize)?;
            Some(LossCount {
                window: recorded_window(k.window),
                kind: loss_name(*loss).to_owned(),
                count,
            })
        })
        .collect())
}

/// The loss of user-stack walks cut at a file whose unwind table did not
/// fit ([`UnwindStop::TablesFull`]).
pub const USER_STACKS_CUT_TABLES_FULL: &str =
    "user stacks cut: unwind tables full (raise --unwind-max-rows)";

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
        Loss::ApiCallMapFull => "libvirt API calls not timed (map full)",
        Loss::QmpMsgDropped => "QEMU monitor messages dropped (ring buffer full)",
        Loss::JobWaitMapFull => "domain job waits not counted (map full)",
        Loss::LockMapFull => "lock waits not counted (lock map full)",
        Loss::LockNestingTooDeep => "lock waits not timed (contentions nested too deep)",
        Loss::LockEndUnseen => "lock waits not timed (end not seen)",
        Loss::LockBeginUnseen => "lock waits not timed (begin not seen)",
        Loss::OffWakeMapFull => "off-CPU blocks not charged to their waker (map full)",
        Loss::OffCpuSpanFull => "off-CPU blocks not cut at window boundaries (map full)",
        Loss::AttributionFull => "calls or processes not attributed to a VM (map full)",
        Loss::ForkMapFull => "forks not counted (fork map full)",
        Loss::CgroupMapFull => "cgroup operations not counted (cgroup map full)",
    }
}

/// The unwinder's counts per window, by `UnwindStop` name.
fn unwind_counts(
    bpf: &mut Ebpf,
    take: Take,
    seen: &mut HashMap<u32, [u64; UnwindStop::COUNT as usize]>,
) -> Vec<LossCount> {
    if bpf.map(names::UNWIND_STOPS).is_none() {
        return Vec::new();
    }
    let Ok(counts) = per_cpu_counts(
        bpf,
        names::UNWIND_STOPS,
        take,
        seen,
        |w: &u32| *w,
        |v: &[u64; UnwindStop::COUNT as usize]| *v,
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (window, per_stop) in counts {
        for stop in UnwindStop::ALL {
            let count = per_stop[stop as usize];
            if count > 0 {
                out.push(LossCount {
                    window: recorded_window(window),
                    kind: stop.name().to_owned(),
                    count,
                });
            }
        }
    }
    out
}

/// [`entries`] of the aggregation map of `tracer`; none when the tracer did
/// not run.
fn aggregation<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    rec: &Recorder,
    bpf: &mut Ebpf,
    name: &'static str,
    tracer: Tracer,
    take: Take,
    window: impl Fn(&K) -> u32,
) -> Result<Vec<(K, V)>, RecordError> {
    if bpf.map(name).is_none() || !rec.tracers.contains(&tracer) {
        return Ok(Vec::new());
    }
    entries(bpf, name, take, window)
}

/// Reads the stacks the rows name that `store` does not have yet into it;
/// with `delete`, deletes every stack they name from the kernel's map,
/// which then holds only stacks not read yet (the programs store a stack
/// again when they walk it again, and name the ids they hold: `store`
/// keeps those, see [`StackStore::expire`]).
fn fetch_stacks(
    bpf: &mut Ebpf,
    triples: &[(u32, u64, u64)],
    store: &mut StackStore,
    delete: bool,
) -> Result<(), RecordError> {
    let mut ids: Vec<u64> = triples
        .iter()
        .flat_map(|&(_, k, u)| [k, u])
        .filter(|&id| id >= STACK_ID_MIN)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let name = names::STACKS;
    let mut m: BpfHashMap<&mut MapData, u64, StackBuf> =
        BpfHashMap::try_from(map_mut(bpf, name)?).map_err(map_err(name))?;
    for id in ids {
        // A stack the store has may be in the map again all the same: a
        // program walked it again.
        if !store.named(id) {
            let Ok(st) = m.get(&id, 0) else {
                continue;
            };
            let n = st
                .ips
                .iter()
                .position(|&ip| ip == 0)
                .unwrap_or(st.ips.len());
            store.insert(id, st.ips[..n].into());
        }
        if delete {
            let _ = m.remove(&id);
        }
    }
    Ok(())
}

/// The stack ids the programs hold and may name in a row without storing
/// the stack again (see [`StackStore::expire`]): in every thread's off-CPU
/// entry and kernel-stack cache of lock waits.
pub(super) fn held_stacks(bpf: &Ebpf) -> Result<HashSet<u64>, RecordError> {
    let mut held = HashSet::new();
    if let Some(m) = bpf.map(names::OFFCPU_START) {
        let m: BpfHashMap<&MapData, u64, OffCpuStart> =
            BpfHashMap::try_from(m).map_err(map_err(names::OFFCPU_START))?;
        for (_, e) in m.iter().filter_map(Result::ok) {
            held.extend(e.stacks().filter(|&id| id >= STACK_ID_MIN));
        }
    }
    if let Some(m) = bpf.map(names::LOCK_PENDING) {
        let m: BpfHashMap<&MapData, u32, LockPending> =
            BpfHashMap::try_from(m).map_err(map_err(names::LOCK_PENDING))?;
        for (_, e) in m.iter().filter_map(Result::ok) {
            held.extend(e.stacks().filter(|&id| id >= STACK_ID_MIN));
        }
    }
    Ok(held)
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

/// The wakers tracer's.
const WAKER_COUNTERS: [(Counter, &str); 7] = [
    (Counter::Wakeups, "wakeups of blocked threads (waker taken)"),
    (
        Counter::WakerInterrupts,
        "wakeups by an interrupt on its own stack",
    ),
    (Counter::WakerKernWalk, "waker kernel stacks walked"),
    (
        Counter::WakerKernCached,
        "waker kernel stacks reused (same place)",
    ),
    (Counter::WakerUserWalk, "waker user stacks walked"),
    (
        Counter::WakerUserCached,
        "waker user stacks reused (same site)",
    ),
    (
        Counter::WakerNotSeen,
        "off-CPU blocks whose waker was not seen",
    ),
];

/// `--attribute vm`'s calls.
const ATTRIBUTION_COUNTERS: [(Counter, &str); 4] = [
    (
        Counter::CallsAttributed,
        "libvirt calls that can start a VM (attributed to it)",
    ),
    (
        Counter::CallsOfDomain,
        "libvirt calls on the domain of a VM (attributed to it)",
    ),
    (Counter::CallsOther, "libvirt calls of other procedures"),
    (
        Counter::CallsUnread,
        "libvirt dispatches whose message was not read (or not of the remote program)",
    ),
];

/// `--drop-lock-ends`'s doing.
const DROP_COUNTERS: [(Counter, &str); 1] = [(
    Counter::LockEndsDropped,
    "lock contention ends dropped on purpose (--drop-lock-ends)",
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
    let groups: [(bool, &[(Counter, &str)]); 7] = [
        (
            rec.opts.attribute == crate::windows::Attribution::Vm,
            &ATTRIBUTION_COUNTERS,
        ),
        (true, &NESTED_COUNTERS),
        (rec.tracers.contains(&Tracer::Wakers), &WAKER_COUNTERS),
        (rec.opts.drop_lock_ends != 0, &DROP_COUNTERS),
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
            ("unwind tables: tables given back", u.tables_reclaimed),
            ("unwind tables: rows given back", u.rows_reclaimed),
            ("unwind tables: rows", u.rows),
            ("unwind tables: pieces", u.pieces),
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
