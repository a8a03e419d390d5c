//! `hvprof record`: one module per stage, in the order data flows —
//! `options` (what was asked) → `kernel` (what this kernel has) → `load`
//! and `attach` (the programs, their configuration, and their probes,
//! from the [tracer registry](crate::tracer)) → `targets` and `events`
//! (following the targets until the stop) → `drain` (the maps) →
//! `symbolize` (stacks into frames) → `assemble` (rows, and at the stop
//! the profile) → `flush` (which runs the three last at every flush while
//! recording, appending to the profile file, and once more at the stop,
//! when the file is replaced by the whole profile and its renderings are
//! written).
//!
//! Stopping — duration, Ctrl-C, SIGTERM, the target exiting — always goes
//! through the same drain, so whatever was recorded is written; a kill
//! leaves the file as the last flush left it.

mod assemble;
mod attach;
mod drain;
mod events;
mod flush;
mod interrupts;
mod kernel;
mod load;
mod options;
mod qmp;
mod symbolize;
mod targets;
pub mod uprobe_multi;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use profiler_common::record::{COMM_LEN, names};

pub(crate) use self::attach::{dbus_library_paths, defined};
pub use self::{
    assemble::task_state_name,
    attach::Detaching,
    drain::loss_name,
    options::{RecordError, RecordOptions, Target, UnwindMode, VmEvent, VmEventError},
};
use self::{
    events::Recorder,
    flush::Flusher,
    interrupts::{Interrupts, Phase},
    kernel::Facts,
    targets::GatedChild,
};
pub use crate::tracer::{Tracer, dbus_function};
use crate::{
    profile::{self, Profile},
    render,
    sys::{self, Privileges},
};

/// What a recording produced.
#[derive(Debug)]
pub struct Outcome {
    /// What was written, for printing without reading the file back.
    pub profile: Profile,
    pub profile_path: PathBuf,
    pub output: PathBuf,
    pub summary: render::Summary,
    /// From the stop to every file written.
    pub stop_to_written: Duration,
    /// Exit status of the `-- CMD` target, if it exited.
    pub command_status: Option<std::process::ExitStatus>,
    /// The probes still being detached; dropping this waits for them.
    pub detaching: Detaching,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn comm_str(c: &[u8; COMM_LEN]) -> String {
    let end = c.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&c[..end]).into_owned()
}

/// When the recording was set up and when the last phase ended, with
/// `HVPROF_TIMING` set.
fn timing_clock() -> Option<&'static std::sync::Mutex<(Instant, Instant)>> {
    use std::sync::{Mutex, OnceLock};
    static CLOCK: OnceLock<Option<Mutex<(Instant, Instant)>>> = OnceLock::new();
    CLOCK
        .get_or_init(|| {
            std::env::var_os("HVPROF_TIMING").map(|_| {
                let now = Instant::now();
                Mutex::new((now, now))
            })
        })
        .as_ref()
}

/// With `HVPROF_TIMING` set, says on stderr how long the phase that ends
/// now took, and when it ended since the recording was set up: start-up
/// and teardown are what a CI job pays per recording.
pub fn timing(phase: &str) {
    if let Some(Ok(mut last)) = timing_clock().map(std::sync::Mutex::lock) {
        let now = Instant::now();
        eprintln!(
            "hvprof: timing: {phase}: {} ms (at {} ms)",
            (now - last.1).as_millis(),
            (now - last.0).as_millis()
        );
        last.1 = now;
    }
}

/// With `HVPROF_TIMING` set, a detail of the phase under way.
fn timing_detail(what: &str) {
    if timing_clock().is_some() {
        eprintln!("hvprof: timing:   {what}");
    }
}

/// Runs a whole recording.
pub fn record(opts: RecordOptions) -> Result<Outcome, RecordError> {
    timing("start");
    can_start(&opts)?;
    let interrupts = Interrupts::watch(&opts.output, &opts.output.join(profile::FILE_NAME));
    let mut facts = Facts::gather(&opts)?;
    timing("kernel facts (BTF offsets, kallsyms, fork paths)");
    let mut config = load::config(&opts, &facts);
    let (initial, mut gated) = targets::initial(&opts)?;
    let fork_uprobes = if facts.tracers.contains(&Tracer::Fork) {
        attach::plan_fork_uprobes(&opts.target, &initial, facts.calibration.as_ref())
    } else {
        None
    };
    config.fork_uprobes = u32::from(fork_uprobes.is_some());
    // Kept open for the whole recording: statistics are on while it is.
    let _stats = load::enable_stats(&opts)?;
    let btf = facts.btf()?;
    timing("kernel BTF for loading");
    let loaded = load::load(&opts, &config, &initial)?;
    timing("maps");
    let mut bpf = loaded.bpf;
    let mut rec = Recorder::new(opts, loaded.unwinder, loaded.verifier);
    rec.restarts = targets::Restarts::new(&rec.opts.target, &initial);
    // Snapshot what runs already; with -a, everything.
    let known: Vec<u32> = if matches!(rec.opts.target, Target::All) {
        crate::procmaps::all_pids()
    } else {
        initial.clone()
    };
    for pid in known {
        rec.processes.learn(pid);
    }
    timing("process snapshots");
    let plan = attach::Plan {
        opts: &rec.opts,
        initial: &initial,
        fork_uprobes: fork_uprobes.as_ref(),
    };
    attach::load_programs(&mut bpf, &btf, &facts.tracers, &plan);
    timing("programs loaded (verified)");
    let attached = attach::attach(&mut bpf, &btf, &facts, &plan)?;
    drop(btf);
    timing("probes attached");
    rec.tracers = attached.tracers;
    rec.uprobe_links = attached.uprobe_links;
    rec.usdt_links = attached.usdt_links;
    rec.dispatch_links = attached.dispatch_links;
    if rec.tracers.contains(&Tracer::Libvirt) {
        let name = names::QMP_MSGS;
        let ring = RingBuf::try_from(bpf.take_map(name).ok_or(RecordError::Missing { name })?)
            .map_err(|source| RecordError::Map { name, source })?;
        rec.qmp = Some(qmp::Qmp::new(ring));
    }
    if rec.opts.attribute == crate::windows::Attribution::Vm {
        let name = names::VM_BY_UUID;
        let map =
            aya::maps::HashMap::try_from(bpf.take_map(name).ok_or(RecordError::Missing { name })?)
                .map_err(|source| RecordError::Map { name, source })?;
        rec.vm_uuids = Some(map);
    }
    run(rec, bpf, gated.as_mut(), &interrupts)
}

/// What must hold before anything is set up: privileges, the `-p` pids,
/// the output directory.
fn can_start(opts: &RecordOptions) -> Result<(), RecordError> {
    if !Privileges::current().is_ok_and(|p| p.sufficient()) {
        return Err(RecordError::Privileges);
    }
    if let Target::Pids(pids) = &opts.target
        && let Some(&pid) = pids
            .iter()
            .find(|p| !PathBuf::from(format!("/proc/{p}")).exists())
    {
        return Err(RecordError::NoSuchPid { pid });
    }
    std::fs::create_dir_all(&opts.output).map_err(|source| RecordError::Output {
        path: opts.output.clone(),
        source,
    })
}

/// Records from the attach to the stop, then drains, symbolizes, assembles
/// and writes the profile and its renderings.
fn run(
    mut rec: Recorder,
    mut bpf: Ebpf,
    mut gated: Option<&mut GatedChild>,
    interrupts: &Interrupts,
) -> Result<Outcome, RecordError> {
    // From here hvprof's own CPU competes with the workload's (loading and
    // verifying the programs, before, does not).
    rec.start_cpu_ns = sys::self_cpu_ns();
    if let Some(g) = gated.as_deref_mut() {
        g.release();
    }
    interrupts.phase(Phase::Recording);
    rec.syscall_switch_at = rec.opts.syscall_dispatch_for.map(|d| Instant::now() + d);
    eprintln!(
        "hvprof: recording {} (windows: {}, {} Hz); Ctrl-C to stop",
        rec.opts.target, rec.opts.windows, rec.opts.frequency_hz
    );
    // Mapped once: mapping the ring (4 MiB) at every poll cost more CPU than
    // anything else hvprof does while recording.
    let name = names::EVENTS;
    let mut events = RingBuf::try_from(bpf.take_map(name).ok_or(RecordError::Missing { name })?)
        .map_err(|source| RecordError::Map { name, source })?;
    let mut flusher = Flusher::create(&rec)?;
    let stop = rec.run_loop(&mut events, gated.as_deref_mut(), &mut bpf, &mut flusher)?;
    interrupts.phase(Phase::Writing);
    timing("recording");
    let stopped = Instant::now();
    let stop_ns = monotonic_ns();
    rec.self_cpu_ns = sys::self_cpu_ns().saturating_sub(rec.start_cpu_ns);
    let (command_status, program_stats) = stop_recording(&mut rec, &mut bpf, &mut events, gated);
    if let Some(q) = &mut rec.qmp {
        q.stop(stop_ns);
        rec.qmp_at_stop = q.take();
    }
    // The programs change nothing any more: their uprobes go meanwhile.
    let detaching = Detaching::start(
        &mut bpf,
        std::mem::take(&mut rec.uprobe_links),
        std::mem::take(&mut rec.per_call_links),
    );
    timing("stop (final snapshots, the command ended, maps frozen)");
    let (profile, summary) = write(
        &rec,
        &mut bpf,
        flusher,
        &stop,
        stop_ns,
        program_stats,
        interrupts,
    )?;
    interrupts.phase(Phase::Written);
    let stop_to_written = stopped.elapsed();
    timing("files written");
    attach::unload_all(&mut bpf);
    drop(bpf);
    timing("probes but the uprobes detached, maps freed");
    Ok(Outcome {
        profile,
        profile_path: rec.opts.output.join(profile::FILE_NAME),
        output: rec.opts.output.clone(),
        summary,
        stop_to_written,
        command_status,
        detaching,
    })
}

/// Drains what the flushes left, symbolizes, assembles the profile and writes it
/// with its renderings.
fn write(
    rec: &Recorder,
    bpf: &mut Ebpf,
    flusher: Flusher,
    stop: &events::Stop,
    stop_ns: u64,
    program_stats: Vec<profile::ProgramStat>,
    interrupts: &Interrupts,
) -> Result<(Profile, render::Summary), RecordError> {
    let mut profile = flusher.finish(rec, bpf, stop, stop_ns)?;
    timing("drain, symbolize and assemble the rest");
    profile.meta.program_stats = program_stats;
    // The profile file (compressing it is a few hundred ms of a large
    // one) is written beside the renderings.
    let path = rec.opts.output.join(profile::FILE_NAME);
    let started = Instant::now();
    let (written, summary) = std::thread::scope(|scope| {
        let file = scope.spawn(|| {
            let written = profile.write(&path);
            if written.is_ok() {
                interrupts.phase(Phase::Rendering);
            }
            timing_detail(&format!(
                "profile file written: {} ms",
                started.elapsed().as_millis()
            ));
            written
        });
        let summary = render::write_all(&profile, &rec.opts.output);
        timing_detail(&format!(
            "graphs and tables rendered: {} ms",
            started.elapsed().as_millis()
        ));
        let written = file.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        (written, summary)
    });
    written?;
    let summary = summary?;
    Ok((profile, summary))
}

/// Takes the final snapshots while the processes are still alive, ends the
/// `-- CMD`, reads the programs' costs (`--bpf-stats`), freezes the maps,
/// and handles the events that came meanwhile. No more unwind tables are
/// loaded: nothing is walked after the stop.
fn stop_recording(
    rec: &mut Recorder,
    bpf: &mut Ebpf,
    events: &mut RingBuf<MapData>,
    gated: Option<&mut GatedChild>,
) -> (Option<std::process::ExitStatus>, Vec<profile::ProgramStat>) {
    if let Some(u) = rec.processes.unwind.take() {
        rec.unwind_stats = Some(u.stats.clone());
    }
    let alive: Vec<u32> = rec.processes.info.keys().copied().collect();
    for t in alive {
        rec.processes.snapshot(t);
    }
    // Off-CPU first, before a command hvprof started is ended: the blocks
    // still going now are unfinished, not ended by the command's end.
    rec.blocked_at_stop = drain::stop_offcpu(bpf);
    let command_status = gated.and_then(GatedChild::end);
    let program_stats = if rec.opts.bpf_stats {
        drain::program_stats(bpf)
    } else {
        Vec::new()
    };
    drain::freeze(bpf);
    rec.drain_events(events);
    rec.drain_verifier(true);
    (command_status, program_stats)
}
