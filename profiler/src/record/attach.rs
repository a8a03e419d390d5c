//! Attaching the probes, driven by each part's probe list in the tracer
//! registry ([`Part::probes`]): the machinery's first, then each tracer's.
//! Uprobes go into files found at run time — the targets' libc for fork
//! callers, every D-Bus client library — so their files are chosen here.
//! And, at the end, detaching them all.
//!
//! Every program is on a BTF tracepoint, a perf event or a `uprobe.multi`
//! link (one per library file), so that detaching costs no RCU grace
//! period per probe; the uprobe links, which cost one each, are detached
//! together ([`Detaching`]).

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    thread::JoinHandle,
};

use aya::{
    Btf, Ebpf,
    maps::{MapData, ProgramArray},
    programs::{
        BtfTracePoint, PerfEvent, ProgramError, TracePoint, UProbe,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        tp_btf::BtfTracePointLinkId,
        trace_point::TracePointLink,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use profiler_common::record::{DISPATCH_FUNCTION, JOB_FUNCTION, PHASE_PER_CALL_SYSCALLS, names};

use super::{
    kernel::Facts,
    options::{RecordError, RecordOptions, Target, UnwindMode},
};
use crate::{
    forkpath, libvirt,
    procmaps::Snapshot,
    sys,
    tracefs::Tracepoint,
    tracer::{
        CGROUP_WRITE_SYSCALL, DBUS_LIBRARIES, FORK_FUNCTIONS, Part, Probe, SYSCALL_TRACEPOINTS,
        Tracer, syscall_nr, syscall_pair,
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

/// What was attached: the tracers (one this kernel cannot run after all is
/// skipped with a warning), and the uprobe links, which are detached
/// together at the end ([`Detaching::start`]).
pub(super) struct Attached {
    pub tracers: Vec<Tracer>,
    pub uprobe_links: Vec<(&'static str, UProbeLinkId)>,
    /// The USDT probes' `uprobe.multi` links: closing one detaches it and
    /// gives its semaphores back.
    pub usdt_links: Vec<std::os::fd::OwnedFd>,
    /// The system-call dispatch's links, detached when the programs move to
    /// the calls' own tracepoints ([`switch_to_per_call`]).
    pub dispatch_links: Vec<(&'static str, BtfTracePointLinkId)>,
}

/// Whether a recording with `tracers` and `opts` attaches `part`.
fn wanted(part: Part, tracers: &[Tracer], opts: &RecordOptions) -> bool {
    match part {
        Part::Targets | Part::Syscalls | Part::VmWindows => true,
        Part::Unwind => opts.unwind == UnwindMode::Dwarf,
        Part::Attribution => opts.attribute == crate::windows::Attribution::Vm,
        Part::Tracer(t) => tracers.contains(&t),
    }
}

/// Attaches the machinery's probes (task tracking first, so that no fork
/// between two attaches is missed), then each tracer's.
pub(super) fn attach(
    bpf: &mut Ebpf,
    btf: &Btf,
    facts: &Facts,
    plan: &Plan<'_>,
) -> Result<Attached, RecordError> {
    let mut attached = Attached {
        tracers: facts.tracers.clone(),
        uprobe_links: Vec::new(),
        usdt_links: Vec::new(),
        dispatch_links: Vec::new(),
    };
    for part in Part::ALL {
        if !matches!(part, Part::Tracer(_)) && wanted(part, &[], plan.opts) {
            attached
                .dispatch_links
                .extend(attach_probes(bpf, btf, part, plan.opts)?);
        }
    }
    for part in Part::ALL {
        let Part::Tracer(tracer) = part else {
            continue;
        };
        if !attached.tracers.contains(&tracer) {
            continue;
        }
        let links = (&mut attached.uprobe_links, &mut attached.usdt_links);
        if let Some(why) = attach_tracer(bpf, btf, tracer, plan, links)? {
            eprintln!(
                "hvprof: warning: the {} tracer is skipped: {why}",
                tracer.name()
            );
            attached.tracers.retain(|t| *t != tracer);
        }
    }
    if plan.opts.attribute == crate::windows::Attribution::Vm {
        attach_attribution(bpf, plan.initial, &mut attached.uprobe_links)?;
    }
    Ok(attached)
}

/// `--attribute vm`: the uprobes on the entry and return of libvirt's
/// [`DISPATCH_FUNCTION`], in each libvirt library file found that defines
/// it. Without one, only QEMU processes (and what they fork) are
/// attributed, which is said.
fn attach_attribution(
    bpf: &mut Ebpf,
    pids: &[u32],
    links: &mut Vec<(&'static str, UProbeLinkId)>,
) -> Result<(), RecordError> {
    let files = libvirt::probes::files(pids);
    let attached = attach_entry_and_return(
        bpf,
        &files,
        DISPATCH_FUNCTION,
        [names::PROG_CALL_ENTER, names::PROG_CALL_RETURN],
        "libvirtd's calls are not attributed to VMs",
        links,
    )?;
    if attached == 0 {
        eprintln!(
            "hvprof: warning: --attribute vm: no libvirt library with {DISPATCH_FUNCTION} was \
             found, so only QEMU processes (and what they fork) are attributed to their VMs; \
             libvirtd's calls are unattributed"
        );
    }
    Ok(())
}

/// How a program is loaded: on a BTF tracepoint, or as it is.
#[derive(Clone, Copy)]
enum Load {
    Btf(&'static str),
    Plain,
}

/// The programs a recording with `tracers` attaches, and how each is
/// loaded.
fn programs_to_load(tracers: &[Tracer], plan: &Plan<'_>) -> Vec<(&'static str, Load)> {
    let mut out = Vec::new();
    let [enter, exit] = SYSCALL_TRACEPOINTS.map(|t| Load::Btf(t.name));
    for part in Part::ALL {
        let wanted = wanted(part, tracers, plan.opts);
        for probe in part.probes().iter().filter(|_| wanted) {
            match *probe {
                Probe::BtfTracepoint {
                    tracepoint,
                    program,
                } => out.push((program, Load::Btf(tracepoint.name))),
                Probe::Syscalls {
                    enter: e, exit: x, ..
                }
                | Probe::SyscallDispatch { enter: e, exit: x } => {
                    out.extend([(e, enter), (x, exit)]);
                }
                Probe::CpuClock { program } => out.push((program, Load::Plain)),
                Probe::Uprobe { program } => {
                    if matches!(
                        part,
                        Part::Attribution | Part::Tracer(Tracer::Dbus | Tracer::Libvirt)
                    ) || plan.fork_uprobes.is_some()
                    {
                        out.push((program, Load::Plain));
                    }
                }
            }
        }
    }
    out
}

/// Loads the programs a recording with `tracers` attaches, on every CPU at
/// once, the largest first: the kernel's verifier takes most of the
/// start-up (0.1 to 0.4 s for each program that walks stacks), on one CPU
/// per program. A program that fails to load is left for the attach,
/// which loads it again and says why.
pub(super) fn load_programs(bpf: &mut Ebpf, btf: &Btf, tracers: &[Tracer], plan: &Plan<'_>) {
    use std::sync::Mutex;
    let wanted = programs_to_load(tracers, plan);
    let size = program_sizes();
    let mut jobs: Vec<(u64, &str, Load, &mut aya::programs::Program)> = bpf
        .programs_mut()
        .filter_map(|(name, p)| {
            let &(_, how) = wanted.iter().find(|(w, _)| *w == name)?;
            Some((size(name), name, how, p))
        })
        .collect();
    jobs.sort_by_key(|&(size, ..)| std::cmp::Reverse(size));
    let queue = Mutex::new(jobs.into_iter());
    let workers = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    let Some((_, name, how, program)) = next else {
                        break;
                    };
                    let started = std::time::Instant::now();
                    let _ = load_one(program, how, btf);
                    super::timing_detail(&format!(
                        "loaded {name} in {} ms",
                        started.elapsed().as_millis()
                    ));
                }
            });
        }
    });
}

fn load_one(
    program: &mut aya::programs::Program,
    how: Load,
    btf: &Btf,
) -> Result<(), ProgramError> {
    use aya::programs::Program;
    match (program, how) {
        (Program::BtfTracePoint(p), Load::Btf(tp)) => p.load(tp, btf),
        (Program::PerfEvent(p), Load::Plain) => p.load(),
        (Program::UProbe(p), Load::Plain) => p.load(),
        _ => Ok(()),
    }
}

/// The size of each program of the embedded object, by name (0 if not
/// found), which is about what verifying it costs.
fn program_sizes() -> impl Fn(&str) -> u64 {
    use object::{Object as _, ObjectSymbol as _};
    let sizes: std::collections::HashMap<String, u64> = object::File::parse(crate::ebpf::OBJECT)
        .map(|obj| {
            obj.symbols()
                .filter_map(|s| Some((s.name().ok()?.to_owned(), s.size())))
                .collect()
        })
        .unwrap_or_default();
    move |name| sizes.get(name).copied().unwrap_or(0)
}

/// Attaches one tracer; `Some(why)` when it is skipped instead.
fn attach_tracer(
    bpf: &mut Ebpf,
    btf: &Btf,
    tracer: Tracer,
    plan: &Plan<'_>,
    (links, usdt_links): (
        &mut Vec<(&'static str, UProbeLinkId)>,
        &mut Vec<std::os::fd::OwnedFd>,
    ),
) -> Result<Option<String>, RecordError> {
    let attached = attach_probes(bpf, btf, Part::Tracer(tracer), plan.opts).map(drop);
    match tracer {
        // Its BTF tracepoint needs Linux 5.18 or later (sched_switch's
        // prev_state): without it the other tracers still run.
        Tracer::OffCpu => return Ok(attached.err().map(|e| e.to_string())),
        Tracer::Fork => {
            attached?;
            if let Some(f) = plan.fork_uprobes {
                attach_fork_callers(bpf, f, links);
            }
        }
        Tracer::Dbus => {
            attached?;
            if attach_dbus(bpf, plan.initial, links)?.is_empty() {
                return Ok(Some(
                    "no D-Bus client library (libdbus-1, libgio-2.0, libsystemd) found in the targets' maps or the standard library directories"
                        .to_owned(),
                ));
            }
        }
        Tracer::Libvirt => {
            attached?;
            return attach_libvirt(bpf, plan.initial, links, usdt_links);
        }
        Tracer::OnCpu | Tracer::Locks | Tracer::Cgroup | Tracer::Wakers => attached?,
    }
    Ok(None)
}

/// Attaches libvirt's USDT probes ([`libvirt::probes::USES`]) in every
/// libvirt library and QEMU driver file found, with their semaphores, one
/// `uprobe.multi` link per program and file, and the job-wait uprobes to
/// the files that define [`JOB_FUNCTION`]; `Some(why)` when there is no
/// file with them.
fn attach_libvirt(
    bpf: &mut Ebpf,
    pids: &[u32],
    job_links: &mut Vec<(&'static str, UProbeLinkId)>,
    links: &mut Vec<std::os::fd::OwnedFd>,
) -> Result<Option<String>, RecordError> {
    use std::os::fd::AsFd as _;

    use profiler_common::usdt::{USDT_MAX_SPECS, USDT_SPECS_MAP, UsdtSpec};

    use super::uprobe_multi::{self, Target};
    let files = libvirt::probes::files(pids);
    if files.is_empty() {
        return Ok(Some(
            "libvirt (libvirt.so.0, libvirt_driver_qemu.so) is not installed here, nor mapped by the targets"
                .to_owned(),
        ));
    }
    attach_job_waits(bpf, &files, job_links)?;
    let mut specs: Vec<UsdtSpec> = Vec::new();
    // (program, file, sites)
    let mut plan: Vec<(&'static str, PathBuf, Vec<Target>)> = Vec::new();
    let mut unreadable = Vec::new();
    for path in files {
        let sites = match libvirt::probes::sites(&path) {
            Ok(s) => s,
            Err(e) => {
                unreadable.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        for site in sites {
            let Ok(spec) = site.probe.spec() else {
                continue;
            };
            let id = match specs.iter().position(|s| *s == spec) {
                Some(i) => i,
                None if specs.len() < USDT_MAX_SPECS as usize => {
                    specs.push(spec);
                    specs.len() - 1
                }
                None => continue,
            };
            let target = Target {
                offset: site.probe.offset,
                ref_ctr_offset: site.probe.semaphore_offset.unwrap_or(0),
                cookie: id as u64 | (u64::from(site.usage.kind) << 32),
            };
            match plan
                .iter_mut()
                .find(|(p, f, _)| *p == site.usage.program && *f == path)
            {
                Some((_, _, t)) => t.push(target),
                None => plan.push((site.usage.program, path.clone(), vec![target])),
            }
        }
    }
    if plan.is_empty() {
        let why = if unreadable.is_empty() {
            "this libvirt has none of the probes it uses (rpc_server_client_msg_*, qemu_monitor_*): it was built without SystemTap SDT probes".to_owned()
        } else {
            format!(
                "libvirt's probes could not be read: {}",
                unreadable.join("; ")
            )
        };
        return Ok(Some(why));
    }
    {
        let name = USDT_SPECS_MAP;
        let mut m: aya::maps::Array<&mut MapData, UsdtSpec> =
            aya::maps::Array::try_from(bpf.map_mut(name).ok_or(RecordError::Missing { name })?)
                .map_err(|source| RecordError::Map { name, source })?;
        for (i, s) in (0..).zip(&specs) {
            m.set(i, s, 0)
                .map_err(|source| RecordError::Map { name, source })?;
        }
    }
    for (prog, path, targets) in plan {
        let p = loaded_uprobe(bpf, prog)?;
        let fd = p.fd().map_err(attach_err(prog))?;
        match uprobe_multi::attach(fd.as_fd(), &path, &targets, None, false) {
            Ok(link) => links.push(link),
            Err(e) => eprintln!(
                "hvprof: warning: libvirt's probes in {} are not attached ({prog}): {e}",
                path.display()
            ),
        }
    }
    if links.is_empty() {
        return Ok(Some("no libvirt probe could be attached".to_owned()));
    }
    Ok(None)
}

/// The job-wait uprobes (entry and return of [`JOB_FUNCTION`]), in each of
/// `files` that defines it (libvirt.so.0 of libvirt 8.x and later).
fn attach_job_waits(
    bpf: &mut Ebpf,
    files: &[PathBuf],
    links: &mut Vec<(&'static str, UProbeLinkId)>,
) -> Result<(), RecordError> {
    attach_entry_and_return(
        bpf,
        files,
        JOB_FUNCTION,
        [names::PROG_JOB_ENTER, names::PROG_JOB_RETURN],
        "domain job waits are not timed",
        links,
    )?;
    Ok(())
}

/// Attaches `progs` (a uprobe and a uretprobe) to `function` in each of
/// `files` that defines it; a failure is a warning, `what` saying what is
/// lost. Returns the links made.
fn attach_entry_and_return(
    bpf: &mut Ebpf,
    files: &[PathBuf],
    function: &'static str,
    progs: [&'static str; 2],
    what: &str,
    links: &mut Vec<(&'static str, UProbeLinkId)>,
) -> Result<usize, RecordError> {
    let before = links.len();
    for path in files {
        if defined(path, &[function]).is_empty() {
            continue;
        }
        for prog in progs {
            let p = loaded_uprobe(bpf, prog)?;
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::Symbol(function),
                cookie: None,
            };
            match p.attach([point], path, UProbeScope::AllProcesses) {
                Ok(id) => links.push((prog, id)),
                Err(e) => eprintln!(
                    "hvprof: warning: {what} in {} ({prog}): {e}",
                    path.display()
                ),
            }
        }
    }
    Ok(links.len() - before)
}

/// The calls of `part`'s [`Probe::Syscalls`] `calls` that are hooked:
/// `write` only with `--time-cgroup-writes`.
fn hooked_calls(part: Part, calls: &[&'static str], opts: &RecordOptions) -> Vec<&'static str> {
    calls
        .iter()
        .copied()
        .filter(|call| {
            opts.time_cgroup_writes
                || !(part == Part::Tracer(Tracer::Cgroup) && *call == CGROUP_WRITE_SYSCALL)
        })
        .collect()
}

/// Attaches `part`'s BTF tracepoints and perf events, and puts its system
/// calls' programs in the dispatch; returns the dispatch's links. Its
/// uprobes go into files found at run time: [`attach_fork_callers`],
/// [`attach_dbus`].
fn attach_probes(
    bpf: &mut Ebpf,
    btf: &Btf,
    part: Part,
    opts: &RecordOptions,
) -> Result<Vec<(&'static str, BtfTracePointLinkId)>, RecordError> {
    let mut dispatch_links = Vec::new();
    for probe in part.probes() {
        match *probe {
            Probe::BtfTracepoint {
                tracepoint,
                program,
            } => {
                btf_tracepoint(bpf, btf, program, tracepoint)?;
            }
            Probe::SyscallDispatch { enter, exit } => {
                for (program, tracepoint) in [enter, exit].into_iter().zip(SYSCALL_TRACEPOINTS) {
                    let link = btf_tracepoint(bpf, btf, program, tracepoint)?;
                    dispatch_links.push((program, link));
                }
            }
            // Every entry first: an exit whose entry was not seen is
            // ignored, and a start left by a call whose exit came before
            // its program was in place is overwritten by the thread's next
            // call.
            Probe::Syscalls {
                calls, enter, exit, ..
            } => {
                let hooked = hooked_calls(part, calls, opts);
                let tables = [names::SYSCALL_ENTER_PROGS, names::SYSCALL_EXIT_PROGS];
                for ((program, tracepoint), table) in [enter, exit]
                    .into_iter()
                    .zip(SYSCALL_TRACEPOINTS)
                    .zip(tables)
                {
                    dispatch(bpf, btf, program, tracepoint, table, &hooked)?;
                }
            }
            Probe::CpuClock { program } => cpu_clock(bpf, program, opts.frequency_hz)?,
            Probe::Uprobe { .. } => {}
        }
    }
    Ok(dispatch_links)
}

/// The programs' twins a recording with `tracers` moves to the calls' own
/// tracepoints, and where: the entries first, as at the start.
pub(super) fn per_call_hooks(
    tracers: &[Tracer],
    opts: &RecordOptions,
) -> Vec<(&'static str, Tracepoint)> {
    let mut hooks = Vec::new();
    for part in Part::ALL.into_iter().filter(|&p| wanted(p, tracers, opts)) {
        for probe in part.probes() {
            if let Probe::Syscalls {
                calls,
                per_call: [enter, exit],
                ..
            } = *probe
            {
                for call in hooked_calls(part, calls, opts) {
                    let [on_enter, on_exit] = syscall_pair(call);
                    hooks.extend([(enter, on_enter), (exit, on_exit)]);
                }
            }
        }
    }
    hooks.sort_by_key(|&(_, tp)| !tp.name.starts_with("sys_enter"));
    hooks
}

/// Loads the programs' twins of `hooks` ([`per_call_hooks`]): verifying
/// them takes a while, so the caller runs this beside the event loop.
pub(super) fn load_per_call(
    bpf: &mut Ebpf,
    hooks: &[(&'static str, Tracepoint)],
) -> Result<(), RecordError> {
    for (name, p) in bpf.programs_mut() {
        if hooks.iter().any(|&(h, _)| h == name)
            && let Ok(p) = <&mut TracePoint>::try_from(p)
            && p.fd().is_err()
        {
            p.load().map_err(attach_err(name.to_owned()))?;
        }
    }
    Ok(())
}

/// Moves the timed system calls from the dispatch to the calls' own
/// tracepoints (see the eBPF `syscalls` module): attaches the programs'
/// twins, loaded by [`load_per_call`], to `hooks` (they do nothing yet),
/// sets `PHASE_PER_CALL_SYSCALLS` (from then on the programs the dispatch
/// jumps to return at once and the twins run) and detaches the dispatch.
/// Each call is timed by exactly one of them; one in flight is entered
/// under the dispatch and exits under its twin, through the same maps.
/// On an error nothing has changed: the dispatch goes on.
pub(super) fn switch_to_per_call(
    bpf: &mut Ebpf,
    hooks: &[(&'static str, Tracepoint)],
    dispatch: &mut Vec<(&'static str, BtfTracePointLinkId)>,
) -> Result<Vec<TracePointLink>, RecordError> {
    let mut links = Vec::new();
    for &(prog, tp) in hooks {
        let p: &mut TracePoint = bpf
            .program_mut(prog)
            .ok_or(RecordError::Missing { name: prog })?
            .try_into()
            .map_err(attach_err(prog))?;
        let id = p
            .attach(tp.category, tp.name)
            .map_err(attach_err(format!("{prog} to {tp}")))?;
        links.push(p.take_link(id).map_err(attach_err(prog))?);
    }
    super::drain::set_phase(bpf, PHASE_PER_CALL_SYSCALLS, 0)?;
    for (prog, id) in dispatch.drain(..) {
        if let Some(p) = bpf
            .program_mut(prog)
            .and_then(|p| <&mut BtfTracePoint>::try_from(p).ok())
        {
            let _ = p.detach(id);
        }
    }
    Ok(links)
}

/// The uprobe program `name`, loaded (the first attach loads it).
fn loaded_uprobe<'a>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, RecordError> {
    let p: &mut UProbe = bpf
        .program_mut(name)
        .ok_or(RecordError::Missing { name })?
        .try_into()
        .map_err(attach_err(name))?;
    if p.fd().is_err() {
        p.load().map_err(attach_err(name))?;
    }
    Ok(p)
}

fn attach_err(what: impl Into<String>) -> impl FnOnce(ProgramError) -> RecordError {
    let what = what.into();
    move |source| RecordError::Attach { what, source }
}

/// Loads `prog` on BTF tracepoint `tp`.
fn load_btf<'a>(
    bpf: &'a mut Ebpf,
    btf: &Btf,
    prog: &'static str,
    tp: Tracepoint,
) -> Result<&'a mut BtfTracePoint, RecordError> {
    let p: &mut BtfTracePoint = bpf
        .program_mut(prog)
        .ok_or(RecordError::Missing { name: prog })?
        .try_into()
        .map_err(attach_err(prog))?;
    if p.fd().is_err() {
        p.load(tp.name, btf).map_err(attach_err(format!(
            "{prog} (BTF tracepoint {tp}{})",
            if tp.name == "sched_switch" {
                ", whose prev_state argument needs Linux 5.18 or later"
            } else {
                ""
            }
        )))?;
    }
    Ok(p)
}

/// A program on BTF tracepoint `tp`: typed raw arguments, no trace event
/// record filled per event, and detached without a grace period.
fn btf_tracepoint(
    bpf: &mut Ebpf,
    btf: &Btf,
    prog: &'static str,
    tp: Tracepoint,
) -> Result<BtfTracePointLinkId, RecordError> {
    load_btf(bpf, btf, prog, tp)?
        .attach()
        .map_err(attach_err(format!("{prog} to {tp}")))
}

/// Puts `prog` (loaded on `tp`, `raw_syscalls:sys_enter` or `sys_exit`) in
/// dispatch table `table`, in the slot of each of `calls`.
fn dispatch(
    bpf: &mut Ebpf,
    btf: &Btf,
    prog: &'static str,
    tp: Tracepoint,
    table: &'static str,
    calls: &[&str],
) -> Result<(), RecordError> {
    let fd = load_btf(bpf, btf, prog, tp)?
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(attach_err(prog))?;
    let map_err = |source| RecordError::Map {
        name: table,
        source,
    };
    let mut slots: ProgramArray<&mut MapData> = bpf
        .map_mut(table)
        .ok_or(RecordError::Missing { name: table })?
        .try_into()
        .map_err(map_err)?;
    for call in calls {
        let nr = syscall_nr(call).ok_or(RecordError::Missing {
            name: "a system call's number",
        })?;
        slots.set(nr, &fd, 0).map_err(map_err)?;
    }
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
    if p.fd().is_err() {
        p.load().map_err(attach_err(prog))?;
    }
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

/// Detaches and unloads every recording program (the links [`Detaching`]
/// took are gone already).
pub(super) fn unload_all(bpf: &mut Ebpf) {
    use aya::programs::Program;
    for (_, p) in bpf.programs_mut() {
        let _ = match p {
            Program::BtfTracePoint(p) => p.unload(),
            Program::TracePoint(p) => p.unload(),
            Program::PerfEvent(p) => p.unload(),
            Program::UProbe(p) => p.unload(),
            _ => Ok(()),
        };
    }
}

/// The links that cost an RCU grace period each to detach (about 70 ms
/// here), being detached: the uprobe links each in a thread of its own
/// (waits that overlap end together), the system calls' own tracepoints
/// one after the other in one (the kernel detaches those under one mutex).
/// Dropping it waits for them.
#[derive(Debug)]
pub struct Detaching {
    threads: Vec<JoinHandle<()>>,
}

impl Detaching {
    /// Takes the uprobe `links` out of their programs and detaches them
    /// with `per_call`.
    pub(super) fn start(
        bpf: &mut Ebpf,
        links: Vec<(&'static str, UProbeLinkId)>,
        per_call: Vec<TracePointLink>,
    ) -> Self {
        let mut threads: Vec<JoinHandle<()>> = links
            .into_iter()
            .filter_map(|(name, id)| {
                let p: &mut UProbe = bpf.program_mut(name)?.try_into().ok()?;
                let link = p.take_link(id).ok()?;
                Some(std::thread::spawn(move || drop(link)))
            })
            .collect();
        if !per_call.is_empty() {
            threads.push(std::thread::spawn(move || drop(per_call)));
        }
        Self { threads }
    }
}

impl Drop for Detaching {
    fn drop(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
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
fn attach_fork_callers(
    bpf: &mut Ebpf,
    plan: &ForkUprobes,
    links: &mut Vec<(&'static str, UProbeLinkId)>,
) {
    let loaded = bpf
        .program_mut(names::PROG_FORK_CALLER)
        .ok_or_else(|| "not in the eBPF object".to_owned())
        .and_then(|p| <&mut UProbe>::try_from(p).map_err(|e| e.to_string()))
        .and_then(|p| match p.fd() {
            Ok(_) => Ok(p),
            Err(_) => p.load().map(|()| p).map_err(|e| e.to_string()),
        });
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
        let functions = defined(libc, &FORK_FUNCTIONS);
        if functions.is_empty() {
            continue;
        }
        for scope in &plan.scopes {
            if let Ok(id) = p.attach(functions.iter().copied(), libc, *scope) {
                links.push((names::PROG_FORK_CALLER, id));
                attached += 1;
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

/// Of `functions`, those `path` defines (an old libdbus lacks some), in
/// their order: a `uprobe.multi` link is refused whole for one missing.
pub(crate) fn defined<'a>(path: &Path, functions: &[&'a str]) -> Vec<&'a str> {
    use object::{Object as _, ObjectSymbol as _};
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    let Ok(file) = object::File::parse(&*data) else {
        return Vec::new();
    };
    let names: HashSet<&str> = file
        .dynamic_symbols()
        .chain(file.symbols())
        .filter(object::ObjectSymbol::is_definition)
        .filter_map(|s| s.name().ok())
        .collect();
    functions
        .iter()
        .copied()
        .filter(|f| names.contains(f))
        .collect()
}

/// Attaches the D-Bus probes to every client library file found, one
/// `uprobe.multi` link per program and file; returns the probed files,
/// with the library's name.
fn attach_dbus(
    bpf: &mut Ebpf,
    pids: &[u32],
    links: &mut Vec<(&'static str, UProbeLinkId)>,
) -> Result<Vec<(String, PathBuf)>, RecordError> {
    let libs = dbus_library_paths(pids);
    let mut probed = Vec::new();
    for name in [
        names::PROG_DBUS_ENTER,
        names::PROG_DBUS_RETURN,
        names::PROG_DBUS_NAMES,
    ] {
        loaded_uprobe(bpf, name)?;
    }
    for (lib, path) in libs {
        let Some(l) = DBUS_LIBRARIES.iter().find(|l| l.name == lib) else {
            continue;
        };
        let mut any = false;
        for (prog, functions) in [
            (names::PROG_DBUS_ENTER, l.blocking),
            (names::PROG_DBUS_RETURN, l.blocking),
            (names::PROG_DBUS_NAMES, l.constructors),
        ] {
            let all: Vec<&str> = functions.iter().map(|&(f, _)| f).collect();
            let present = defined(&path, &all);
            let points: Vec<UProbeAttachPoint<'_>> = functions
                .iter()
                .filter(|(f, _)| present.contains(f))
                .map(|&(function, cookie)| UProbeAttachPoint {
                    location: UProbeAttachLocation::Symbol(function),
                    cookie: Some(u64::from(cookie)),
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            let p: &mut UProbe = bpf
                .program_mut(prog)
                .ok_or(RecordError::Missing { name: prog })?
                .try_into()
                .map_err(attach_err(prog))?;
            if let Ok(id) = p.attach(points, &path, UProbeScope::AllProcesses) {
                links.push((prog, id));
                any = true;
            }
        }
        if any {
            probed.push((l.name.to_owned(), path));
        }
    }
    Ok(probed)
}
