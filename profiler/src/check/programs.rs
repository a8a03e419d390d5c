//! The rows that load a program from the embedded object, attach it and,
//! where they can, make it fire and count the hits.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::{
    Btf, Ebpf,
    maps::PerCpuArray,
    programs::{
        BtfTracePoint, FEntry, FExit, PerfEvent, ProgramError, UProbe,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::UProbeScope,
    },
};
use profiler_common::check::{
    CHECK_COUNTS_MAP, CHECK_TGID_GLOBAL, CHECK_TID_GLOBAL, CheckCounter, FENTRY_FUNCTION, program,
};

use super::{CheckedTracepoint, FIX_PRIVILEGES, NeededBy, Row, system, tracepoints};
use crate::{
    ebpf::{self, Global},
    sys::{self, Privileges},
    tracefs::{Tracefs, Tracepoint},
    tracer::{Part, Probe, Tracer, syscall_pair},
};

/// The function the uprobe check attaches to, in this very executable.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn hvprof_check_uprobe_target(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_add(1)
}

/// Loads the embedded object and checks what its programs can attach to;
/// if it does not load, every row that needs it says so.
pub(super) fn rows(
    privileges: &std::io::Result<Privileges>,
    tracefs: Option<&Tracefs>,
    btf: Option<&Btf>,
) -> Vec<Row> {
    let globals = [
        Global {
            name: CHECK_TGID_GLOBAL,
            value: std::process::id(),
        },
        Global {
            name: CHECK_TID_GLOBAL,
            value: sys::gettid(),
        },
    ];
    match ebpf::load(&globals) {
        Ok(mut bpf) => loaded_rows(&mut bpf, tracefs, btf),
        Err(e) => not_loaded_rows(&e, privileges),
    }
}

fn loaded_rows(bpf: &mut Ebpf, tracefs: Option<&Tracefs>, btf: Option<&Btf>) -> Vec<Row> {
    let mut rows = vec![Row::ok(
        "eBPF object",
        NeededBy::All,
        true,
        format!("{} bytes, maps created", ebpf::OBJECT.len()),
    )];
    rows.push(perf_event_row(bpf));
    rows.extend(tracepoint_rows(bpf, tracefs, btf));
    rows.push(uprobe_row(bpf));
    rows.push(system::dbus_libraries_row());
    rows.push(system::libvirt_probes_row());
    rows.push(system::attribution_row());
    rows.push(system::fork_paths_row());
    rows.push(system::unwind_row());
    match btf {
        Some(btf) => rows.extend(fentry_rows(bpf, btf)),
        None => {
            for cap in ["fentry", "fexit"] {
                rows.push(Row::missing(
                    cap,
                    NeededBy::Fentry,
                    false,
                    "not tested: fentry/fexit programs need kernel BTF",
                    "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
                ));
            }
        }
    }
    rows
}

/// Every row that needs the object, missing because it did not load.
fn not_loaded_rows(e: &ebpf::LoadError, privileges: &std::io::Result<Privileges>) -> Vec<Row> {
    let denied = privileges.as_ref().is_ok_and(|p| !p.sufficient());
    let fix = if denied {
        FIX_PRIVILEGES.to_owned()
    } else {
        "see the error above; a kernel with BPF (CONFIG_BPF_SYSCALL) is needed".to_owned()
    };
    let mut rows = vec![Row::missing(
        "eBPF object",
        NeededBy::All,
        true,
        e.to_string(),
        fix.clone(),
    )];
    let skipped = "not tested: the eBPF object did not load";
    rows.push(Row::missing(
        "perf-event cpu-clock sampling",
        NeededBy::from(Tracer::OnCpu),
        true,
        skipped,
        fix.clone(),
    ));
    for CheckedTracepoint {
        tracepoint,
        needed_by,
        required,
        ..
    } in tracepoints()
    {
        rows.push(Row::missing(
            tracepoint.to_string(),
            needed_by,
            required,
            skipped,
            fix.clone(),
        ));
    }
    rows.push(Row::missing(
        "uprobes",
        NeededBy::from(Tracer::Dbus),
        false,
        skipped,
        fix.clone(),
    ));
    rows.push(Row::missing(
        "fentry",
        NeededBy::Fentry,
        false,
        skipped,
        fix.clone(),
    ));
    rows.push(Row::missing("fexit", NeededBy::Fentry, false, skipped, fix));
    rows
}

/// Why a program failed to load or attach, and what to do.
fn program_failure(err: &ProgramError) -> (String, String) {
    let errno = match err {
        ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        ProgramError::LoadError { io_error, .. } => io_error.raw_os_error(),
        _ => std::error::Error::source(err)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .and_then(std::io::Error::raw_os_error),
    };
    let privileged = Privileges::current().is_ok_and(|p| p.sufficient());
    // aya's message ends in an empty "Verifier output:" when the kernel
    // refused before verifying; drop it.
    let text = err.to_string();
    let text = text
        .trim_end()
        .trim_end_matches("Verifier output:")
        .trim_end()
        .trim_end_matches('.');
    match errno {
        Some(libc::EPERM | libc::EACCES) if privileged => (
            format!(
                "{text}: refused although hvprof has CAP_BPF and CAP_PERFMON, so kernel lockdown \
                 or a security module forbids it (see /sys/kernel/security/lockdown)"
            ),
            "boot with lockdown=none (or a kernel that allows it); the tracers that need it are skipped".to_owned(),
        ),
        Some(errno @ (libc::EPERM | libc::EACCES)) => {
            (format!("{text} ({})", sys::explain_errno(errno)), FIX_PRIVILEGES.to_owned())
        }
        Some(errno) => (
            format!("{text} ({})", sys::explain_errno(errno)),
            "use a kernel with this feature enabled".to_owned(),
        ),
        None => (text.to_owned(), "use a kernel with this feature enabled".to_owned()),
    }
}

fn counter(bpf: &Ebpf, slot: CheckCounter) -> Vec<u64> {
    bpf.map(CHECK_COUNTS_MAP)
        .and_then(|m| PerCpuArray::<_, u64>::try_from(m).ok())
        .and_then(|a| a.get(&(slot as u32), 0).ok())
        .map(|v| v.iter().copied().collect())
        .unwrap_or_default()
}

fn program_mut<'a, T>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, (String, String)>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = bpf.program_mut(name).ok_or_else(|| {
        (
            format!("program {name} is missing from the embedded eBPF object"),
            "rebuild hvprof (`./x build`)".to_owned(),
        )
    })?;
    prog.try_into()
        .map_err(|e: ProgramError| program_failure(&e))
}

fn perf_event_row(bpf: &mut Ebpf) -> Row {
    const CAP: &str = "perf-event cpu-clock sampling";
    let result = (|| {
        let cpus = sys::online_cpus().map_err(|e| {
            (
                format!("cannot list online CPUs: {e}"),
                "mount /sys".to_owned(),
            )
        })?;
        let prog: &mut PerfEvent = program_mut(bpf, program::PERF_EVENT)?;
        prog.load().map_err(|e| program_failure(&e))?;
        for &cpu in &cpus {
            prog.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(1000),
                false,
            )
            .map_err(|e| {
                let (why, fix) = program_failure(&e);
                (format!("CPU {cpu}: {why}"), fix)
            })?;
        }
        // An idle CPU may not be sampled (tickless idle): keep every CPU
        // that has not fired yet busy for a moment, pinned there.
        let deadline = Instant::now() + Duration::from_secs(2);
        let silent = |per_cpu: &[u64]| -> Vec<u32> {
            cpus.iter()
                .copied()
                .filter(|&c| per_cpu.get(c as usize).copied().unwrap_or(0) == 0)
                .collect()
        };
        loop {
            let busy: Vec<_> = silent(&counter(bpf, CheckCounter::PerfEvent))
                .into_iter()
                .map(|c| std::thread::spawn(move || spin_on(c, 50)))
                .collect();
            for b in busy {
                let _ = b.join();
            }
            let per_cpu = counter(bpf, CheckCounter::PerfEvent);
            let silent = silent(&per_cpu);
            if silent.is_empty() {
                let total: u64 = per_cpu.iter().sum();
                return Ok(format!("{} CPUs, {total} samples", cpus.len()));
            }
            if Instant::now() > deadline {
                return Err((
                    format!("attached, but CPUs {silent:?} produced no sample in 2 s"),
                    "check perf_event_paranoid and that the kernel has CONFIG_PERF_EVENTS; a hypervisor may hide the timer".to_owned(),
                ));
            }
        }
    })();
    // Detach now: the check must not keep sampling while it goes on.
    if let Ok(prog) = program_mut::<PerfEvent>(bpf, program::PERF_EVENT) {
        let _ = prog.unload();
    }
    match result {
        Ok(detail) => Row::ok(CAP, NeededBy::from(Tracer::OnCpu), true, detail),
        Err((why, fix)) => Row::missing(CAP, NeededBy::from(Tracer::OnCpu), true, why, fix),
    }
}

/// Burns `ms` of CPU on `cpu` (pinned; unpinned if pinning fails).
fn spin_on(cpu: u32, ms: u64) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
    // sched_setaffinity(0, …) act on this thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
    }
    let end = Instant::now() + Duration::from_millis(ms);
    let mut x = 1u64;
    while Instant::now() < end {
        x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
    }
}

fn tracepoint_rows(bpf: &mut Ebpf, tracefs: Option<&Tracefs>, btf: Option<&Btf>) -> Vec<Row> {
    let mut rows = Vec::new();
    for CheckedTracepoint {
        tracepoint: tp,
        needed_by,
        required,
    } in tracepoints()
    {
        let name = tp.to_string();
        if let Some(tracefs) = tracefs
            && let Err(e) = tracefs.id(tp)
        {
            rows.push(Row::missing(
                name,
                needed_by,
                required,
                e.to_string(),
                match tp.category {
                    "lock" => "use a kernel with CONFIG_LOCKDEP or, since 5.19, the lock contention tracepoints (always built)",
                    "raw_syscalls" => "use a kernel with CONFIG_FTRACE_SYSCALLS=y",
                    _ => "use a kernel with this tracepoint",
                },
            ));
            continue;
        }
        let Some(btf) = btf else {
            rows.push(Row::missing(
                name,
                needed_by,
                required,
                "not tested: recording programs are on BTF tracepoints, which need kernel BTF",
                "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
            ));
            continue;
        };
        rows.push(match tp.name {
            "sched_process_fork" => fork_row(bpf, btf, tp, needed_by),
            "sched_switch" => btf_switch_row(bpf, btf, tp, needed_by, required),
            _ => btf_tracepoint_row(bpf, btf, tp, needed_by, required),
        });
    }
    if let Some(tracefs) = tracefs {
        rows.push(per_call_row(tracefs));
    }
    rows
}

/// The timed system calls' own tracepoints (`syscalls:sys_enter_X`,
/// `sys_exit_X`), where their programs move after `--syscall-dispatch-for`:
/// without them they stay on the dispatch, which costs every system call.
fn per_call_row(tracefs: &Tracefs) -> Row {
    let calls: Vec<&str> = Part::ALL
        .iter()
        .flat_map(|p| p.probes())
        .flat_map(|p| match p {
            Probe::Syscalls { calls, .. } => calls.to_vec(),
            _ => Vec::new(),
        })
        .collect();
    let name = "syscalls:sys_enter_*/sys_exit_* of the timed calls";
    let missing: Vec<String> = calls
        .iter()
        .flat_map(|c| syscall_pair(c))
        .filter(|&tp| tracefs.id(tp).is_err())
        .map(|tp| tp.to_string())
        .collect();
    if missing.is_empty() {
        Row::ok(
            name,
            Part::Syscalls.into(),
            false,
            format!("{} tracepoints ({})", calls.len() * 2, calls.join(", ")),
        )
    } else {
        Row::missing(
            name,
            Part::Syscalls.into(),
            false,
            format!(
                "{} not found: the timed system calls stay on the dispatch on raw_syscalls, \
                 which runs on every system call of the machine",
                missing.join(", ")
            ),
            "use a kernel with CONFIG_FTRACE_SYSCALLS=y",
        )
    }
}

/// Loads `prog` on BTF tracepoint `tp` (again: a program can be loaded on
/// one tracepoint after another) and attaches it.
fn load_btf(bpf: &mut Ebpf, btf: &Btf, prog: &str, tp: Tracepoint) -> Result<(), (String, String)> {
    let p = program_mut::<BtfTracePoint>(bpf, prog)?;
    let _ = p.unload();
    p.load(tp.name, btf).map_err(|e| program_failure(&e))?;
    p.attach().map(|_| ()).map_err(|e| program_failure(&e))
}

/// A recording program's BTF tracepoint: a program loads and attaches there.
fn btf_tracepoint_row(
    bpf: &mut Ebpf,
    btf: &Btf,
    tp: Tracepoint,
    needed_by: NeededBy,
    required: bool,
) -> Row {
    let name = tp.to_string();
    let attached = load_btf(bpf, btf, program::TRACEPOINT, tp);
    if let Ok(p) = program_mut::<BtfTracePoint>(bpf, program::TRACEPOINT) {
        let _ = p.unload();
    }
    match attached {
        Ok(()) => Row::ok(name, needed_by, required, "BTF tracepoint attached"),
        Err((why, fix)) => Row::missing(name, needed_by, required, why, fix),
    }
}

/// The off-CPU tracer's program on `sched_switch` reads `prev_state`: load
/// one that does, attach it and see it fire.
fn btf_switch_row(
    bpf: &mut Ebpf,
    btf: &Btf,
    tp: Tracepoint,
    needed_by: NeededBy,
    required: bool,
) -> Row {
    let name = tp.to_string();
    let (prog, slot) = (program::BTF_SWITCH, CheckCounter::BtfSwitch);
    let attached = load_btf(bpf, btf, prog, tp).map_err(|(why, _)| {
        (
            why,
            "use Linux 5.18 or later (sched_switch's prev_state argument) with kernel BTF"
                .to_owned(),
        )
    });
    if let Err((why, fix)) = attached {
        return Row::missing(name, needed_by, required, why, fix);
    }
    // Context switches and wakeups: sleep a few times.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let n: u64 = counter(bpf, slot).iter().sum();
    if let Ok(p) = program_mut::<BtfTracePoint>(bpf, prog) {
        let _ = p.unload();
    }
    if n > 0 {
        Row::ok(
            name,
            needed_by,
            required,
            format!("BTF tracepoint attached, counted {n} events"),
        )
    } else {
        Row::missing(
            name,
            needed_by,
            required,
            "BTF tracepoint attached, but it never fired",
            "check that the kernel has CONFIG_TRACEPOINTS",
        )
    }
}

/// Attaches the fork counter and forks three children from this thread.
fn fork_row(bpf: &mut Ebpf, btf: &Btf, tp: Tracepoint, needed_by: NeededBy) -> Row {
    const FORKS: u64 = 3;
    let name = tp.to_string();
    if let Err((why, fix)) = load_btf(bpf, btf, program::FORK, tp) {
        return Row::missing(name, needed_by, true, why, fix);
    }
    let mut spawned = 0;
    for _ in 0..FORKS {
        let child = Command::new("/bin/true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Ok(mut child) = child {
            let _ = child.wait();
            spawned += 1;
        }
    }
    let seen: u64 = counter(bpf, CheckCounter::Fork).iter().sum();
    if let Ok(p) = program_mut::<BtfTracePoint>(bpf, program::FORK) {
        let _ = p.unload();
    }
    if spawned == 0 {
        Row::ok(
            name,
            needed_by,
            true,
            "attached (could not run /bin/true to count forks)",
        )
    } else if seen == spawned {
        Row::ok(
            name,
            needed_by,
            true,
            format!("attached, counted {seen}/{spawned} forks"),
        )
    } else {
        Row::missing(
            name,
            needed_by,
            true,
            format!("attached, but counted {seen} of {spawned} forks"),
            "the tracepoint does not fire as expected; report this kernel",
        )
    }
}

fn uprobe_row(bpf: &mut Ebpf) -> Row {
    const CALLS: u64 = 3;
    let result = (|| {
        let exe: PathBuf = std::env::current_exe().map_err(|e| {
            (
                format!("cannot find this executable: {e}"),
                "mount /proc".to_owned(),
            )
        })?;
        let prog: &mut UProbe = program_mut(bpf, program::UPROBE)?;
        prog.load().map_err(|e| {
            let (why, _) = program_failure(&e);
            (
                why,
                "use Linux 6.6 or later: the D-Bus and fork-caller uprobes are uprobe.multi links"
                    .to_owned(),
            )
        })?;
        prog.attach(
            ["hvprof_check_uprobe_target"],
            &exe,
            UProbeScope::AllProcesses,
        )
        .map_err(|e| program_failure(&e))?;
        for i in 0..CALLS {
            std::hint::black_box(hvprof_check_uprobe_target(i));
        }
        let seen: u64 = counter(bpf, CheckCounter::Uprobe).iter().sum();
        if seen == CALLS {
            Ok(format!(
                "uprobe.multi link attached to {}, counted {seen}/{CALLS} calls",
                exe.display()
            ))
        } else {
            Err((
                format!("attached, but counted {seen} of {CALLS} calls"),
                "the kernel's uprobes do not fire as expected; check CONFIG_UPROBE_EVENTS"
                    .to_owned(),
            ))
        }
    })();
    if let Ok(p) = program_mut::<UProbe>(bpf, program::UPROBE) {
        let _ = p.unload();
    }
    match result {
        Ok(detail) => Row::ok("uprobes", NeededBy::from(Tracer::Dbus), false, detail),
        Err((why, fix)) => Row::missing("uprobes", NeededBy::from(Tracer::Dbus), false, why, fix),
    }
}

fn fentry_rows(bpf: &mut Ebpf, btf: &Btf) -> Vec<Row> {
    fn trigger() {
        // read(2) goes through vfs_read.
        if let Ok(f) = File::open("/proc/self/stat") {
            let mut buf = [0u8; 64];
            // SAFETY: buf is a valid writable buffer of the given length and
            // f is an open file descriptor.
            let _ = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        }
    }
    fn finish(name: &str, result: Result<u64, (String, String)>) -> Row {
        match result {
            Ok(n) if n > 0 => Row::ok(
                name,
                NeededBy::Fentry,
                false,
                format!("attached to {FENTRY_FUNCTION}, counted {n} calls"),
            ),
            Ok(_) => Row::missing(
                name,
                NeededBy::Fentry,
                false,
                format!("attached to {FENTRY_FUNCTION}, but it never fired"),
                "check CONFIG_FUNCTION_TRACER and CONFIG_DYNAMIC_FTRACE",
            ),
            Err((why, fix)) => Row::missing(name, NeededBy::Fentry, false, why, fix),
        }
    }
    let fentry = (|| {
        let prog: &mut FEntry = program_mut(bpf, program::FENTRY)?;
        prog.load(FENTRY_FUNCTION, btf)
            .map_err(|e| program_failure(&e))?;
        prog.attach().map_err(|e| program_failure(&e))?;
        trigger();
        Ok(counter(bpf, CheckCounter::Fentry).iter().sum())
    })();
    let fexit = (|| {
        let prog: &mut FExit = program_mut(bpf, program::FEXIT)?;
        prog.load(FENTRY_FUNCTION, btf)
            .map_err(|e| program_failure(&e))?;
        prog.attach().map_err(|e| program_failure(&e))?;
        trigger();
        Ok(counter(bpf, CheckCounter::Fexit).iter().sum())
    })();
    vec![finish("fentry", fentry), finish("fexit", fexit)]
}
