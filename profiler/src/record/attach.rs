//! Attaching the probes, driven by each part's probe list in the tracer
//! registry ([`Part::probes`]): the machinery's first, then each tracer's.
//! Uprobes go into files found at run time — the targets' libc for fork
//! callers, every D-Bus client library — so their files are chosen here.
//! And, at the end, detaching them all.

use std::{
    path::{Path, PathBuf},
    thread::JoinHandle,
};

use aya::{
    Btf, BtfError, Ebpf,
    programs::{
        BtfTracePoint, PerfEvent, ProgramError, TracePoint, UProbe,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::UProbeScope,
    },
};
use profiler_common::record::names;

use super::{
    kernel::Facts,
    options::{RecordError, RecordOptions, Target},
};
use crate::{
    forkpath,
    procmaps::Snapshot,
    sys,
    tracefs::Tracepoint,
    tracer::{
        CGROUP_WRITE_SYSCALL, DBUS_LIBRARIES, FORK_FUNCTIONS, Part, Probe, Tracer, syscall_pair,
    },
};

/// What the attach needs to know besides the registry.
pub(super) struct Plan<'a> {
    pub opts: &'a RecordOptions,
    /// The processes tracked from the start.
    pub initial: &'a [u32],
    /// Where the fork-caller uprobe goes, if anywhere.
    pub fork_uprobes: Option<&'a ForkUprobes>,
}

/// The kernel BTF the off-CPU tracer's BTF tracepoint is loaded with,
/// parsed meanwhile.
type BtfThread = Option<JoinHandle<Result<Btf, BtfError>>>;

/// Attaches the machinery's probes (task tracking first, so that no fork
/// between two attaches is missed), then each tracer's. Returns the
/// tracers attached: one this kernel cannot run after all is skipped with
/// a warning.
pub(super) fn attach(
    bpf: &mut Ebpf,
    facts: &mut Facts,
    plan: &Plan<'_>,
) -> Result<Vec<Tracer>, RecordError> {
    for part in Part::ALL {
        let wanted = match part {
            Part::Targets | Part::VmWindows => true,
            Part::Unwind => facts.mmap_hook,
            Part::Tracer(_) => false,
        };
        if wanted {
            attach_probes(bpf, part, plan.opts, &mut None)?;
        }
    }
    let mut attached = facts.tracers.clone();
    for part in Part::ALL {
        let Part::Tracer(tracer) = part else {
            continue;
        };
        if !attached.contains(&tracer) {
            continue;
        }
        if let Some(why) = attach_tracer(bpf, tracer, &mut facts.btf, plan)? {
            eprintln!(
                "hvprof: warning: the {} tracer is skipped: {why}",
                tracer.name()
            );
            attached.retain(|t| *t != tracer);
        }
    }
    Ok(attached)
}

/// Attaches one tracer; `Some(why)` when it is skipped instead.
fn attach_tracer(
    bpf: &mut Ebpf,
    tracer: Tracer,
    btf: &mut BtfThread,
    plan: &Plan<'_>,
) -> Result<Option<String>, RecordError> {
    let attached = attach_probes(bpf, Part::Tracer(tracer), plan.opts, btf);
    match tracer {
        // Its BTF tracepoint needs kernel BTF and Linux 5.18 or later:
        // without them the other tracers still run.
        Tracer::OffCpu => return Ok(attached.err().map(|e| e.to_string())),
        Tracer::Fork => {
            attached?;
            if let Some(f) = plan.fork_uprobes {
                attach_fork_callers(bpf, f);
            }
        }
        Tracer::Dbus => {
            attached?;
            if attach_dbus(bpf, plan.initial)?.is_empty() {
                return Ok(Some(
                    "no D-Bus client library (libdbus-1, libgio-2.0, libsystemd) found in the targets' maps or the standard library directories"
                        .to_owned(),
                ));
            }
        }
        Tracer::OnCpu | Tracer::Locks | Tracer::Cgroup => attached?,
    }
    Ok(None)
}

/// Attaches `part`'s tracepoints and perf events. Its uprobes go into
/// files found at run time: [`attach_fork_callers`], [`attach_dbus`].
fn attach_probes(
    bpf: &mut Ebpf,
    part: Part,
    opts: &RecordOptions,
    btf: &mut BtfThread,
) -> Result<(), RecordError> {
    for probe in part.probes() {
        match *probe {
            Probe::Tracepoint {
                tracepoint: tp,
                program,
            } => tracepoint(bpf, program, tp)?,
            // Every entry first: an exit whose entry was not seen is
            // ignored, and a start left by a call whose exit came before
            // its probe was attached is overwritten by the thread's next
            // call.
            Probe::Syscalls { calls, enter, exit } => {
                let hooked = |call: &&&str| {
                    opts.time_cgroup_writes
                        || !(part == Part::Tracer(Tracer::Cgroup) && **call == CGROUP_WRITE_SYSCALL)
                };
                for call in calls.iter().filter(hooked) {
                    let [tp, _] = syscall_pair(call);
                    tracepoint(bpf, enter, tp)?;
                }
                for call in calls.iter().filter(hooked) {
                    let [_, tp] = syscall_pair(call);
                    tracepoint(bpf, exit, tp)?;
                }
            }
            Probe::BtfTracepoint {
                tracepoint,
                program,
            } => attach_btf(bpf, program, tracepoint, btf.take())?,
            Probe::CpuClock { program } => cpu_clock(bpf, program, opts.frequency_hz)?,
            Probe::Uprobe { .. } => {}
        }
    }
    Ok(())
}

fn attach_err(what: impl Into<String>) -> impl FnOnce(ProgramError) -> RecordError {
    let what = what.into();
    move |source| RecordError::Attach { what, source }
}

fn tracepoint(bpf: &mut Ebpf, prog: &'static str, tp: Tracepoint) -> Result<(), RecordError> {
    let p: &mut TracePoint = bpf
        .program_mut(prog)
        .ok_or(RecordError::Missing { name: prog })?
        .try_into()
        .map_err(attach_err(prog))?;
    // One program may be attached to several tracepoints: load it once.
    if p.fd().is_err() {
        p.load().map_err(attach_err(format!("{prog} ({tp})")))?;
    }
    p.attach(tp.category, tp.name)
        .map_err(attach_err(format!("{prog} to {tp}")))?;
    Ok(())
}

/// A BTF tracepoint (the off-CPU tracer's): typed raw arguments, no trace
/// event record filled per context switch.
fn attach_btf(
    bpf: &mut Ebpf,
    prog: &'static str,
    tp: Tracepoint,
    btf: BtfThread,
) -> Result<(), RecordError> {
    let btf = btf
        .map_or(Err(BtfError::InvalidHeader), |b| {
            b.join().unwrap_or(Err(BtfError::InvalidHeader))
        })
        .map_err(|e| RecordError::Attach {
            what: "the off-CPU tracer (kernel BTF at /sys/kernel/btf/vmlinux)".into(),
            source: ProgramError::Btf(e),
        })?;
    let p: &mut BtfTracePoint = bpf
        .program_mut(prog)
        .ok_or(RecordError::Missing { name: prog })?
        .try_into()
        .map_err(attach_err(prog))?;
    p.load(tp.name, &btf).map_err(attach_err(format!(
        "{prog} (BTF tracepoint {}, which needs kernel BTF and, for its prev_state \
         argument, Linux 5.18 or later)",
        tp.name
    )))?;
    p.attach()
        .map_err(attach_err(format!("{prog} to {}", tp.name)))?;
    Ok(())
}

/// cpu-clock sampling at `frequency_hz` on every online CPU.
fn cpu_clock(bpf: &mut Ebpf, prog: &'static str, frequency_hz: u64) -> Result<(), RecordError> {
    let cpus = sys::online_cpus().map_err(|source| RecordError::OnlineCpus { source })?;
    let p: &mut PerfEvent = bpf
        .program_mut(prog)
        .ok_or(RecordError::Missing { name: prog })?
        .try_into()
        .map_err(attach_err(prog))?;
    p.load().map_err(attach_err(prog))?;
    for cpu in cpus {
        p.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Frequency(frequency_hz),
            false,
        )
        .map_err(attach_err(format!("cpu-clock sampling on CPU {cpu}")))?;
    }
    Ok(())
}

/// Detaches and unloads every recording program.
pub(super) fn unload_all(bpf: &mut Ebpf) {
    for probe in Part::ALL.iter().flat_map(|p| p.probes()) {
        for name in probe.programs() {
            let Some(p) = bpf.program_mut(name) else {
                continue;
            };
            let _ = match probe {
                Probe::Tracepoint { .. } | Probe::Syscalls { .. } => {
                    <&mut TracePoint>::try_from(p).map(TracePoint::unload)
                }
                Probe::BtfTracepoint { .. } => {
                    <&mut BtfTracePoint>::try_from(p).map(BtfTracePoint::unload)
                }
                Probe::CpuClock { .. } => <&mut PerfEvent>::try_from(p).map(PerfEvent::unload),
                Probe::Uprobe { .. } => <&mut UProbe>::try_from(p).map(UProbe::unload),
            };
        }
    }
}

/// Where the fork-caller uprobe goes: which processes, in which libc files.
pub(super) struct ForkUprobes {
    scopes: Vec<UProbeScope>,
    libcs: Vec<PathBuf>,
}

/// Where libc's fork functions are probed for their exact callers, if
/// anywhere: where the learned fork paths do not hold. A uprobe in a
/// library costs every process that maps it (fork copies the page tables
/// of a mapping with a patched page: about 25 µs a fork here, and a hit
/// traps), so:
/// - with the paths learned, only `-p` targets whose libc is another file
///   are probed (a process in a container); `-- CMD` is assumed to run
///   with hvprof's own libc, and `--comm` and `-a` are not probed;
/// - without them, the probes are installed in the targets' processes for
///   `-p` and `-- CMD` (a `uprobe.multi` link per process; children born
///   later get their callers from their stacks), and in every process for
///   `--comm` and `-a`.
pub(super) fn plan_fork_uprobes(
    target: &Target,
    initial: &[u32],
    calibration: Option<&forkpath::Calibration>,
) -> Option<ForkUprobes> {
    let one_each = |pids: &[u32]| -> Vec<UProbeScope> {
        pids.iter()
            .filter_map(|&p| std::num::NonZeroU32::new(p))
            .map(UProbeScope::OneProcess)
            .collect()
    };
    let plan = match (target, calibration) {
        (Target::Pids(_), Some(c)) => {
            let (pids, libcs): (Vec<u32>, Vec<PathBuf>) = initial
                .iter()
                .filter_map(|&p| Some((p, mapped_libc(p)?)))
                .filter(|(_, l)| *l != c.libc)
                .unzip();
            ForkUprobes {
                scopes: one_each(&pids),
                libcs,
            }
        }
        (_, Some(_)) => return None,
        (Target::Pids(_) | Target::Command(_), None) => ForkUprobes {
            scopes: one_each(initial),
            libcs: libc_paths(initial),
        },
        (Target::Comm(_) | Target::All, None) => ForkUprobes {
            scopes: vec![UProbeScope::AllProcesses],
            libcs: libc_paths(initial),
        },
    };
    (!plan.scopes.is_empty() && !plan.libcs.is_empty()).then_some(plan)
}

/// Attaches the fork-caller uprobe as planned. A probe that cannot be
/// attached costs the callers, not the recording.
fn attach_fork_callers(bpf: &mut Ebpf, plan: &ForkUprobes) {
    let loaded = bpf
        .program_mut(names::PROG_FORK_CALLER)
        .ok_or_else(|| "not in the eBPF object".to_owned())
        .and_then(|p| <&mut UProbe>::try_from(p).map_err(|e| e.to_string()))
        .and_then(|p| p.load().map(|()| p).map_err(|e| e.to_string()));
    let p = match loaded {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "hvprof: warning: the fork-caller uprobe does not load ({e}; it needs uprobe.multi, \
                 Linux 6.6 or later): fork callers come from stacks only"
            );
            return;
        }
    };
    let mut attached = 0;
    for libc in &plan.libcs {
        for f in FORK_FUNCTIONS {
            for scope in &plan.scopes {
                if p.attach([f], libc, *scope).is_ok() {
                    attached += 1;
                }
            }
        }
    }
    if attached == 0 {
        eprintln!(
            "hvprof: warning: no libc fork function could be probed: fork callers come from stacks only"
        );
    }
}

/// The libc file a process maps (canonical), if it maps one.
fn mapped_libc(pid: u32) -> Option<PathBuf> {
    libc_paths_of(pid).into_iter().next()
}

/// The libc files the targets use (from their maps) and the usual paths,
/// canonical and distinct: a uprobe fires per file, so one file must not be
/// probed twice through two names.
fn libc_paths(pids: &[u32]) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = pids
        .iter()
        .flat_map(|&p| libc_paths_of(p))
        .chain(
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/libc.so.6",
            ]
            .map(PathBuf::from),
        )
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// The libc files process `pid` maps, through its root (a process in a
/// container sees its own /).
fn libc_paths_of(pid: u32) -> Vec<PathBuf> {
    Snapshot::take(pid)
        .map(|s| s.mappings)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| forkpath::is_libc(&m.path))
        .filter_map(|m| {
            PathBuf::from(format!("/proc/{pid}/root{}", m.path))
                .canonicalize()
                .ok()
        })
        .collect()
}

/// The D-Bus client library files to probe: those the targets have mapped,
/// and those in the standard library directories, canonical and distinct
/// (a uprobe is per file, so one file must not be probed twice).
pub(crate) fn dbus_library_paths(pids: &[u32]) -> Vec<(&'static str, PathBuf)> {
    let which = |path: &Path| {
        let name = path.file_name()?.to_str()?;
        DBUS_LIBRARIES
            .iter()
            .position(|l| l.files.iter().any(|p| name.starts_with(p)))
    };
    let mut candidates: Vec<PathBuf> = pids
        .iter()
        .filter_map(|&p| Snapshot::take(p))
        .flat_map(|s| s.mappings)
        .map(|m| PathBuf::from(m.path))
        .collect();
    for dir in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu/systemd",
        "/lib/systemd",
        "/usr/lib/systemd",
        "/lib64",
        "/usr/lib64",
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            candidates.extend(entries.filter_map(Result::ok).map(|e| e.path()));
        }
    }
    let mut out: Vec<(usize, PathBuf)> = candidates
        .into_iter()
        .filter_map(|p| {
            let lib = which(&p)?;
            let p = p.canonicalize().ok()?;
            p.is_file().then_some((lib, p))
        })
        .collect();
    out.sort();
    out.dedup();
    out.into_iter()
        .map(|(lib, p)| (DBUS_LIBRARIES[lib].name, p))
        .collect()
}

/// Attaches the D-Bus probes to every client library file found; returns
/// the probed files, with the library's name.
fn attach_dbus(bpf: &mut Ebpf, pids: &[u32]) -> Result<Vec<(String, PathBuf)>, RecordError> {
    use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint};
    let libs = dbus_library_paths(pids);
    let mut probed = Vec::new();
    for name in [
        names::PROG_DBUS_ENTER,
        names::PROG_DBUS_RETURN,
        names::PROG_DBUS_NAMES,
    ] {
        let p: &mut UProbe = bpf
            .program_mut(name)
            .ok_or(RecordError::Missing { name })?
            .try_into()
            .map_err(attach_err(name))?;
        p.load().map_err(attach_err(name))?;
    }
    for (lib, path) in libs {
        let Some(l) = DBUS_LIBRARIES.iter().find(|l| l.name == lib) else {
            continue;
        };
        let (lib_name, blocking, constructors) = (l.name, l.blocking, l.constructors);
        let mut any = false;
        for (prog, functions) in [
            (names::PROG_DBUS_ENTER, blocking),
            (names::PROG_DBUS_RETURN, blocking),
            (names::PROG_DBUS_NAMES, constructors),
        ] {
            let p: &mut UProbe = bpf
                .program_mut(prog)
                .ok_or(RecordError::Missing { name: prog })?
                .try_into()
                .map_err(attach_err(prog))?;
            // By symbol name, one function at a time: a library without
            // one of them (an old libdbus) still gets the others.
            for &(function, cookie) in functions {
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::Symbol(function),
                    cookie: Some(u64::from(cookie)),
                };
                if p.attach([point], &path, UProbeScope::AllProcesses).is_ok() {
                    any = true;
                }
            }
        }
        if any {
            probed.push((lib_name.to_owned(), path));
        }
    }
    Ok(probed)
}
