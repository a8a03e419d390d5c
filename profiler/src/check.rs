//! `hvprof check`: what this kernel and these privileges allow, capability by
//! capability, each with the reason and the fix for anything missing.
//!
//! Where existence is not proof (a tracepoint can exist and still refuse a BPF
//! program; a perf event can open and never fire), the check really loads and
//! attaches a tiny program from the embedded object and, where it can, makes
//! the program fire and counts the hits.

use std::{
    fmt::Write as _,
    fs::{self, File},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::{
    Btf, Ebpf,
    maps::PerCpuArray,
    programs::{
        BtfTracePoint, FEntry, FExit, PerfEvent, ProgramError, TracePoint, UProbe,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::UProbeScope,
    },
};
use profiler_common::check::{
    CHECK_COUNTS_MAP, CHECK_TGID_GLOBAL, CHECK_TID_GLOBAL, CheckCounter, FENTRY_FUNCTION, program,
};
use serde::Serialize;

use crate::{
    ebpf::{self, Global},
    sys::{self, Memlock, Privileges},
    tracefs::{Tracefs, Tracepoint},
    tracer::{Part, Probe, Tracer},
};

/// Which part of hvprof needs a capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeededBy {
    /// Everything.
    All,
    /// One part of a recording: a tracer, or the machinery every recording
    /// runs (following the targets, VM windows, unwind tables).
    Part(Part),
    /// Nothing yet; reported because later tracers may use it.
    Fentry,
}

impl From<Part> for NeededBy {
    fn from(p: Part) -> Self {
        Self::Part(p)
    }
}

impl From<Tracer> for NeededBy {
    fn from(t: Tracer) -> Self {
        Self::Part(Part::Tracer(t))
    }
}

impl NeededBy {
    fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Part(p) => p.name(),
            Self::Fentry => "fentry",
        }
    }

    /// As `--json` spells it: the tracer's name, but `on-cpu` and `off-cpu`
    /// for oncpu and offcpu, as it always has.
    fn json_name(self) -> &'static str {
        match self {
            Self::Part(Part::Tracer(Tracer::OnCpu)) => "on-cpu",
            Self::Part(Part::Tracer(Tracer::OffCpu)) => "off-cpu",
            _ => self.as_str(),
        }
    }
}

impl Serialize for NeededBy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.json_name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Missing,
}

/// One capability and what this machine says about it.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub capability: String,
    pub needed_by: NeededBy,
    /// `record` cannot run without it.
    pub required: bool,
    pub status: Status,
    /// What was found (for OK rows, the evidence).
    pub detail: String,
    /// Why it is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Row {
    fn ok(
        capability: impl Into<String>,
        needed_by: NeededBy,
        required: bool,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            capability: capability.into(),
            needed_by,
            required,
            status: Status::Ok,
            detail: detail.into(),
            why: None,
            fix: None,
        }
    }

    fn missing(
        capability: impl Into<String>,
        needed_by: NeededBy,
        required: bool,
        why: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            capability: capability.into(),
            needed_by,
            required,
            status: Status::Missing,
            detail: String::new(),
            why: Some(why.into()),
            fix: Some(fix.into()),
        }
    }
}

/// The whole answer of `hvprof check`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cpus: usize,
    pub rows: Vec<Row>,
    /// Every required capability is present.
    pub record_ready: bool,
}

impl Report {
    fn new(rows: Vec<Row>) -> Self {
        let record_ready = rows.iter().all(|r| !r.required || r.status == Status::Ok);
        Self {
            kernel: sys::kernel_release(),
            cpus: sys::online_cpus().map_or(0, |c| c.len()),
            rows,
            record_ready,
        }
    }

    /// The capabilities `record` needs and does not have.
    pub fn missing_for_record(&self) -> impl Iterator<Item = &Row> {
        self.rows
            .iter()
            .filter(|r| r.required && r.status == Status::Missing)
    }

    /// The aligned text table.
    #[must_use]
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "hvprof check: kernel {}, {} online CPUs\n",
            self.kernel, self.cpus
        );
        let status = |r: &Row| match (r.status, r.required) {
            (Status::Ok, _) => "OK",
            (Status::Missing, true) => "MISSING",
            (Status::Missing, false) => "WARN",
        };
        let w_cap = self
            .rows
            .iter()
            .map(|r| r.capability.len())
            .max()
            .unwrap_or(0)
            .max("CAPABILITY".len());
        let w_need = self
            .rows
            .iter()
            .map(|r| r.needed_by.as_str().len())
            .max()
            .unwrap_or(0)
            .max("NEEDED BY".len());
        let _ = writeln!(
            out,
            "{:<w_cap$}  {:<w_need$}  {:<7}  DETAIL",
            "CAPABILITY", "NEEDED BY", "STATUS"
        );
        for r in &self.rows {
            let detail = if r.status == Status::Ok {
                r.detail.as_str()
            } else {
                r.why.as_deref().unwrap_or("")
            };
            let _ = writeln!(
                out,
                "{:<w_cap$}  {:<w_need$}  {:<7}  {detail}",
                r.capability,
                r.needed_by.as_str(),
                status(r),
            );
            if let Some(fix) = &r.fix {
                let _ = writeln!(
                    out,
                    "{:<w_cap$}  {:<w_need$}  {:<7}  fix: {fix}",
                    "", "", ""
                );
            }
        }
        out.push('\n');
        if self.record_ready {
            let warn = self
                .rows
                .iter()
                .filter(|r| r.status == Status::Missing)
                .count();
            if warn == 0 {
                out.push_str("record: ready, every capability present\n");
            } else {
                let _ = writeln!(
                    out,
                    "record: ready; {warn} optional capabilit{} missing (the tracers that need them are skipped)",
                    if warn == 1 { "y is" } else { "ies are" }
                );
            }
        } else {
            let names: Vec<_> = self
                .missing_for_record()
                .map(|r| r.capability.as_str())
                .collect();
            let _ = writeln!(out, "record: NOT ready, missing {}", names.join(", "));
        }
        out
    }
}

/// A tracepoint a part of a recording attaches to, as `check` tests it.
#[derive(Clone, Copy, Debug)]
pub struct CheckedTracepoint {
    pub tracepoint: Tracepoint,
    pub needed_by: NeededBy,
    /// `record` cannot run without it.
    pub required: bool,
    /// A BTF tracepoint: tested with a BTF program, as its tracer loads it.
    pub btf: bool,
}

/// The tracepoints of every part's probes, from the tracer registry (the
/// lists `record` attaches, and drops a tracer for when one is missing):
/// the named tracepoints first, then the system calls'.
#[must_use]
pub fn tracepoints() -> Vec<CheckedTracepoint> {
    let mut out = Vec::new();
    for syscalls in [false, true] {
        for part in Part::ALL {
            let probes = part.probes().iter();
            for probe in probes.filter(|p| matches!(p, Probe::Syscalls { .. }) == syscalls) {
                for tracepoint in probe.tracepoints() {
                    out.push(CheckedTracepoint {
                        tracepoint,
                        needed_by: part.into(),
                        required: part.required(),
                        btf: matches!(probe, Probe::BtfTracepoint { .. }),
                    });
                }
            }
        }
    }
    out
}

const FIX_PRIVILEGES: &str =
    "run as root (sudo hvprof …), or `setcap cap_bpf,cap_perfmon+ep $(command -v hvprof)`";

/// The function the uprobe check attaches to, in this very executable.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn hvprof_check_uprobe_target(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_add(1)
}

/// Runs every check. Never fails: anything that goes wrong is a row.
#[must_use]
#[expect(
    clippy::too_many_lines,
    reason = "one row after another, in table order"
)]
pub fn run() -> Report {
    let mut rows = Vec::new();

    let privileges = Privileges::current();
    rows.push(match &privileges {
        Ok(p) if p.euid == 0 && p.sufficient() => Row::ok("privileges", NeededBy::All, true, "root"),
        Ok(p) if p.sufficient() => Row::ok(
            "privileges",
            NeededBy::All,
            true,
            format!(
                "uid {} with {}",
                p.euid,
                if p.cap_sys_admin { "CAP_SYS_ADMIN" } else { "CAP_BPF + CAP_PERFMON" }
            ),
        ),
        Ok(p) => Row::missing(
            "privileges",
            NeededBy::All,
            true,
            format!(
                "uid {} lacks {}: loading tracing programs and sampling all CPUs needs root or CAP_BPF + CAP_PERFMON",
                p.euid,
                [(!p.cap_bpf, "CAP_BPF"), (!p.cap_perfmon, "CAP_PERFMON")]
                    .iter()
                    .filter(|(m, _)| *m)
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
            FIX_PRIVILEGES,
        ),
        Err(e) => Row::missing(
            "privileges",
            NeededBy::All,
            true,
            format!("cannot read /proc/self/status: {e}"),
            "mount /proc",
        ),
    });

    rows.push(memlock_row());

    let tracefs = Tracefs::locate_or_mount();
    rows.push(match &tracefs {
        Ok((t, false)) => Row::ok(
            "tracefs",
            NeededBy::All,
            true,
            t.root().display().to_string(),
        ),
        Ok((t, true)) => Row::ok(
            "tracefs",
            NeededBy::All,
            true,
            format!(
                "{} (was not mounted; hvprof mounted it)",
                t.root().display()
            ),
        ),
        Err(e) => {
            let text = e.to_string();
            let (why, fix) = text.split_once("; ").unwrap_or((&text, "run as root"));
            Row::missing("tracefs", NeededBy::All, true, why, fix)
        }
    });
    let tracefs = tracefs.map(|(t, _)| t);

    let btf = Btf::from_sys_fs();
    rows.push(match &btf {
        Ok(_) => Row::ok("BTF", NeededBy::Fentry, false, "/sys/kernel/btf/vmlinux"),
        Err(e) => Row::missing(
            "BTF",
            NeededBy::Fentry,
            false,
            format!("cannot read kernel BTF from /sys/kernel/btf/vmlinux: {e}"),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        ),
    });

    rows.push(run_queue_row());

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
        Ok(mut bpf) => {
            rows.push(Row::ok(
                "eBPF object",
                NeededBy::All,
                true,
                format!("{} bytes, maps created", ebpf::OBJECT.len()),
            ));
            rows.push(perf_event_row(&mut bpf));
            rows.extend(tracepoint_rows(
                &mut bpf,
                tracefs.as_ref().ok(),
                btf.as_ref().ok(),
            ));
            rows.push(uprobe_row(&mut bpf));
            rows.push(dbus_libraries_row());
            rows.push(fork_paths_row());
            rows.push(unwind_row());
            match &btf {
                Ok(btf) => rows.extend(fentry_rows(&mut bpf, btf)),
                Err(_) => {
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
        }
        Err(e) => {
            let denied = privileges.as_ref().is_ok_and(|p| !p.sufficient());
            let fix = if denied {
                FIX_PRIVILEGES.to_owned()
            } else {
                "see the error above; a kernel with BPF (CONFIG_BPF_SYSCALL) is needed".to_owned()
            };
            rows.push(Row::missing(
                "eBPF object",
                NeededBy::All,
                true,
                e.to_string(),
                fix.clone(),
            ));
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
        }
    }

    rows.push(kvm_row());
    Report::new(rows)
}

fn memlock_row() -> Row {
    let release = sys::kernel_release();
    let memcg = sys::bpf_memcg_accounting(&release);
    let show =
        |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |v| format!("{} KiB", v / 1024));
    match Memlock::current() {
        Ok(Memlock { soft: None, .. }) => {
            Row::ok("memlock", NeededBy::All, true, "RLIMIT_MEMLOCK unlimited")
        }
        Ok(m) if memcg => Row::ok(
            "memlock",
            NeededBy::All,
            true,
            format!(
                "RLIMIT_MEMLOCK {}, not used: kernel {release} charges BPF memory to the memory cgroup",
                show(m.soft)
            ),
        ),
        Ok(Memlock { hard: None, soft }) => Row::ok(
            "memlock",
            NeededBy::All,
            true,
            format!("RLIMIT_MEMLOCK {}, raised to unlimited at load", show(soft)),
        ),
        Ok(m) => Row::missing(
            "memlock",
            NeededBy::All,
            true,
            format!(
                "RLIMIT_MEMLOCK is {} (hard {}) and kernel {release} charges BPF maps to it",
                show(m.soft),
                show(m.hard)
            ),
            "raise it: `ulimit -l unlimited` as root, or LimitMEMLOCK=infinity in the unit",
        ),
        Err(e) => Row::missing(
            "memlock",
            NeededBy::All,
            true,
            format!("getrlimit(RLIMIT_MEMLOCK) failed: {e}"),
            "run hvprof on Linux",
        ),
    }
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
    let load = program_mut::<TracePoint>(bpf, program::TRACEPOINT)
        .and_then(|p| p.load().map_err(|e| program_failure(&e)));
    for CheckedTracepoint {
        tracepoint: tp,
        needed_by,
        required,
        btf: is_btf,
    } in tracepoints()
    {
        let name = tp.to_string();
        if let Some(tracefs) = tracefs
            && let Err(e) = tracefs.id(tp)
        {
            {
                rows.push(Row::missing(
                    name,
                    needed_by,
                    required,
                    e.to_string(),
                    match tp.category {
                        "lock" => "use a kernel with CONFIG_LOCKDEP or, since 5.19, the lock contention tracepoints (always built)",
                        "syscalls" => "use a kernel with CONFIG_FTRACE_SYSCALLS=y",
                        _ => "use a kernel with this tracepoint",
                    },
                ));
                continue;
            }
        }
        if let Err((why, fix)) = &load {
            rows.push(Row::missing(
                name,
                needed_by,
                required,
                why.clone(),
                fix.clone(),
            ));
            continue;
        }
        if tp.name == "sched_process_fork" {
            rows.push(fork_row(bpf, tp, needed_by));
            continue;
        }
        if is_btf {
            rows.push(btf_tracepoint_row(bpf, btf, tp, needed_by, required));
            continue;
        }
        let attached = program_mut::<TracePoint>(bpf, program::TRACEPOINT).and_then(|p| {
            p.attach(tp.category, tp.name)
                .map_err(|e| program_failure(&e))
        });
        rows.push(match attached {
            Ok(_) => Row::ok(name, needed_by, required, "attached"),
            Err((why, fix)) => Row::missing(name, needed_by, required, why, fix),
        });
    }
    if let Ok(p) = program_mut::<TracePoint>(bpf, program::TRACEPOINT) {
        let _ = p.unload();
    }
    rows
}

/// The off-CPU tracer's programs are BTF tracepoints: load one on `tp` the
/// way the tracer does (for `sched_switch`, reading `prev_state`), attach it
/// and see it fire.
fn btf_tracepoint_row(
    bpf: &mut Ebpf,
    btf: Option<&Btf>,
    tp: Tracepoint,
    needed_by: NeededBy,
    required: bool,
) -> Row {
    let name = tp.to_string();
    let Some(btf) = btf else {
        return Row::missing(
            name,
            needed_by,
            required,
            "not tested: the off-CPU tracer's BTF tracepoints need kernel BTF",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        );
    };
    let (prog, slot) = (program::BTF_SWITCH, CheckCounter::BtfSwitch);
    let attached = program_mut::<BtfTracePoint>(bpf, prog).and_then(|p| {
        p.load(tp.name, btf).map_err(|e| {
            let (why, _) = program_failure(&e);
            (
                why,
                "use Linux 5.18 or later (sched_switch's prev_state argument) with kernel BTF"
                    .to_owned(),
            )
        })?;
        p.attach().map_err(|e| program_failure(&e))
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

/// The off-CPU tracer takes each block's wait for a CPU from the kernel's
/// own run-queue accounting, `task_struct.sched_info.run_delay`.
fn run_queue_row() -> Row {
    const CAP: &str = "run-queue accounting";
    let off = crate::kbtf::Kbtf::from_sys_fs()
        .map_err(|e| e.to_string())
        .and_then(|b| {
            b.offset_of("task_struct", &["sched_info", "run_delay"])
                .map_err(|e| e.to_string())
        });
    match off {
        Ok(off) => Row::ok(
            CAP,
            NeededBy::from(Tracer::OffCpu),
            false,
            format!("task_struct.sched_info.run_delay at offset {off}"),
        ),
        Err(e) => Row::missing(
            CAP,
            NeededBy::from(Tracer::OffCpu),
            false,
            format!(
                "no task_struct.sched_info.run_delay in kernel BTF ({e}): off-CPU blocks get \
                 no run-queue wait"
            ),
            "use a kernel with CONFIG_SCHED_INFO (selected by CONFIG_SCHEDSTATS or \
             CONFIG_TASK_DELAY_ACCT)",
        ),
    }
}

/// Attaches the fork counter and forks three children from this thread.
fn fork_row(bpf: &mut Ebpf, tp: Tracepoint, needed_by: NeededBy) -> Row {
    const FORKS: u64 = 3;
    let name = tp.to_string();
    let attached = program_mut::<TracePoint>(bpf, program::FORK).and_then(|p| {
        p.load().map_err(|e| program_failure(&e))?;
        p.attach(tp.category, tp.name)
            .map_err(|e| program_failure(&e))
    });
    if let Err((why, fix)) = attached {
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
    if let Ok(p) = program_mut::<TracePoint>(bpf, program::FORK) {
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

/// The D-Bus client libraries the dbus tracer would probe.
fn dbus_libraries_row() -> Row {
    let libs = crate::record::dbus_library_paths(&[]);
    if libs.is_empty() {
        return Row::missing(
            "D-Bus client libraries",
            NeededBy::from(Tracer::Dbus),
            false,
            "no libdbus-1, libgio-2.0 or libsystemd in the standard library directories (a target's own copy is found from its maps at record time)",
            "install the library your D-Bus clients use (libdbus-1-3, libglib2.0-0, libsystemd0)",
        );
    }
    let list: Vec<String> = libs
        .iter()
        .map(|(lib, p)| format!("{lib} {}", p.display()))
        .collect();
    Row::ok(
        "D-Bus client libraries",
        NeededBy::from(Tracer::Dbus),
        false,
        list.join(", "),
    )
}

/// Whether hvprof can learn where its libc's fork functions keep their
/// callers (a child it traces with ptrace makes each call once).
/// Builds the unwind tables of this process's own files, cold (no cache):
/// what `record --unwind dwarf` does for each file its targets map.
fn unwind_row() -> Row {
    const NAME: &str = "unwind tables (.eh_frame)";
    match crate::unwind::procs::own_tables() {
        Ok(t) if t.rows > 0 => Row::ok(
            NAME,
            NeededBy::Part(Part::Unwind),
            false,
            format!(
                "built for {} files of hvprof's own process ({}) in {} ms, {} rows, {} KiB of map",
                t.files,
                t.names.join(", "),
                t.time.as_millis(),
                t.rows,
                crate::unwind::procs::map_kib(t.rows, t.chunks)
            ),
        ),
        Ok(_) => Row::missing(
            NAME,
            NeededBy::Part(Part::Unwind),
            false,
            "no file of this process has unwind tables (.eh_frame)",
            "record with --unwind fp (frame pointers)",
        ),
        Err(e) => Row::missing(
            NAME,
            NeededBy::Part(Part::Unwind),
            false,
            format!("{e}; user stacks would come from frame pointers only"),
            "mount /proc; or record with --unwind fp",
        ),
    }
}

fn fork_paths_row() -> Row {
    const NAME: &str = "fork-caller paths";
    match crate::forkpath::calibrate() {
        Ok(c) => Row::ok(
            NAME,
            NeededBy::from(Tracer::Fork),
            false,
            format!(
                "{} paths learned for {} (fork, vfork, posix_spawn[p], pthread_create)",
                c.paths.len(),
                c.libc.display()
            ),
        ),
        Err(e) => Row::missing(
            NAME,
            NeededBy::from(Tracer::Fork),
            false,
            format!("{e}; fork callers would come from uprobes on libc, which make forks dearer"),
            "allow a process to ptrace its own child (kernel.yama.ptrace_scope below 3, no \
             seccomp filter on ptrace)",
        ),
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
        prog.load().map_err(|e| program_failure(&e))?;
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
                "attached to {}, counted {seen}/{CALLS} calls",
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

/// `KVM_GET_API_VERSION`, `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// The only KVM API version there has ever been.
const KVM_API_VERSION: libc::c_int = 12;

fn kvm_row() -> Row {
    const CAP: &str = "/dev/kvm";
    const WITHOUT: &str = "without KVM, count VMs by exec with `--vm-event exec:qemu-system-*`";
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(f) => {
            // SAFETY: f is an open fd; KVM_GET_API_VERSION takes no argument.
            let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
            if v == KVM_API_VERSION {
                Row::ok(
                    CAP,
                    NeededBy::Part(Part::VmWindows),
                    false,
                    format!("KVM API version {v}"),
                )
            } else {
                Row::missing(
                    CAP,
                    NeededBy::Part(Part::VmWindows),
                    false,
                    format!("KVM_GET_API_VERSION returned {v}, expected {KVM_API_VERSION}"),
                    WITHOUT,
                )
            }
        }
        Err(e) => {
            let fix = match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    format!("run as root or join the kvm group; {WITHOUT}")
                }
                _ => format!(
                    "load kvm_intel or kvm_amd (or enable nested virtualization); {WITHOUT}"
                ),
            };
            Row::missing(
                CAP,
                NeededBy::Part(Part::VmWindows),
                false,
                format!("cannot open /dev/kvm: {e}, so KVM_CREATE_VM cannot be seen here"),
                fix,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_missing_row_makes_record_not_ready() {
        let rows = vec![
            Row::ok("privileges", NeededBy::All, true, "root"),
            Row::missing(
                "lock:contention_begin",
                NeededBy::from(Tracer::Locks),
                false,
                "absent",
                "newer kernel",
            ),
        ];
        let report = Report::new(rows.clone());
        assert!(report.record_ready);
        let text = report.to_text();
        assert!(text.contains("WARN"), "{text}");
        assert!(text.contains("fix: newer kernel"), "{text}");
        assert!(
            text.contains("record: ready; 1 optional capability is missing"),
            "{text}"
        );

        let mut rows = rows;
        rows.push(Row::missing(
            "tracefs",
            NeededBy::All,
            true,
            "not mounted",
            "mount it",
        ));
        let report = Report::new(rows);
        assert!(!report.record_ready);
        let text = report.to_text();
        assert!(text.contains("MISSING"), "{text}");
        assert!(
            text.contains("record: NOT ready, missing tracefs"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["record_ready"], false);
        assert_eq!(json["rows"][2]["status"], "missing");
        assert_eq!(json["rows"][2]["fix"], "mount it");
        assert!(json["rows"][0].get("why").is_none());
    }

    /// `check` tests exactly the tracepoints the tracer registry lists, each
    /// once and for the part that attaches it.
    #[test]
    fn tracepoint_rows_are_the_registrys_probes() {
        let mut rows: Vec<(String, &str)> = tracepoints()
            .iter()
            .map(|t| (t.tracepoint.to_string(), t.needed_by.as_str()))
            .collect();
        let mut registry: Vec<(String, &str)> = Part::ALL
            .iter()
            .flat_map(|&part| {
                part.probes()
                    .iter()
                    .flat_map(|p| p.tracepoints())
                    .map(move |t| (t.to_string(), part.name()))
            })
            .collect();
        rows.sort();
        registry.sort();
        assert_eq!(rows, registry);
        let btf: Vec<String> = tracepoints()
            .iter()
            .filter(|t| t.btf)
            .map(|t| t.tracepoint.to_string())
            .collect();
        assert_eq!(btf, ["sched:sched_switch"]);
    }

    /// The rows in the order `check` has always printed them.
    #[test]
    fn tracepoint_rows_keep_their_order() {
        let rows: Vec<String> = tracepoints()
            .iter()
            .map(|t| format!("{} {}", t.tracepoint, t.needed_by.as_str()))
            .collect();
        let mut want: Vec<String> = [
            "sched:sched_switch offcpu",
            "sched:sched_process_fork targets",
            "sched:sched_process_exec targets",
            "sched:sched_process_exit targets",
            "lock:contention_begin locks",
            "lock:contention_end locks",
            "cgroup:cgroup_mkdir cgroup",
            "cgroup:cgroup_attach_task cgroup",
            "cgroup:cgroup_rmdir cgroup",
        ]
        .map(str::to_owned)
        .to_vec();
        let syscalls = [
            ("vm-windows", &["ioctl"][..]),
            ("fork", &["clone", "clone3", "fork", "vfork"]),
            (
                "cgroup",
                &["mkdir", "mkdirat", "rmdir", "unlinkat", "write"],
            ),
            ("unwind", &["mmap"]),
        ];
        for (by, calls) in syscalls {
            for call in calls {
                want.push(format!("syscalls:sys_enter_{call} {by}"));
                want.push(format!("syscalls:sys_exit_{call} {by}"));
            }
        }
        assert_eq!(rows, want);
    }

    /// `--json` spells who needs a capability as it always has.
    #[test]
    fn needed_by_in_json() {
        let json = |n: NeededBy| serde_json::to_value(n).unwrap();
        assert_eq!(json(NeededBy::All), "all");
        assert_eq!(json(Tracer::OnCpu.into()), "on-cpu");
        assert_eq!(json(Tracer::OffCpu.into()), "off-cpu");
        assert_eq!(json(Tracer::Dbus.into()), "dbus");
        assert_eq!(json(Part::VmWindows.into()), "vm-windows");
        assert_eq!(json(NeededBy::Fentry), "fentry");
    }

    #[test]
    fn every_tracepoint_the_design_names_is_checked() {
        let names: Vec<String> = tracepoints()
            .iter()
            .map(|t| t.tracepoint.to_string())
            .collect();
        for want in [
            "sched:sched_switch",
            "sched:sched_process_fork",
            "sched:sched_process_exec",
            "sched:sched_process_exit",
            "lock:contention_begin",
            "lock:contention_end",
            "cgroup:cgroup_mkdir",
            "cgroup:cgroup_attach_task",
            "cgroup:cgroup_rmdir",
            "syscalls:sys_enter_ioctl",
            "syscalls:sys_exit_ioctl",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not checked");
        }
    }

    /// `record` drops the fork tracer when any fork syscall's tracepoint
    /// is missing, and the cgroup tracer for any of its syscalls': `check`
    /// tests each of them, for that tracer.
    #[test]
    fn check_tests_every_syscall_tracepoint_record_needs() {
        let rows = tracepoints();
        let has = |name: &str, by: NeededBy| {
            rows.iter()
                .any(|t| t.tracepoint.to_string() == name && t.needed_by == by)
        };
        for call in ["clone", "clone3", "fork", "vfork"] {
            for dir in ["enter", "exit"] {
                let name = format!("syscalls:sys_{dir}_{call}");
                assert!(
                    has(&name, NeededBy::from(Tracer::Fork)),
                    "{name} not checked for fork"
                );
            }
        }
        for call in ["mkdir", "mkdirat", "rmdir", "unlinkat", "write"] {
            for dir in ["enter", "exit"] {
                let name = format!("syscalls:sys_{dir}_{call}");
                assert!(
                    has(&name, NeededBy::from(Tracer::Cgroup)),
                    "{name} not checked for cgroup"
                );
            }
        }
        for name in ["syscalls:sys_enter_mmap", "syscalls:sys_exit_mmap"] {
            assert!(
                has(name, NeededBy::Part(Part::Unwind)),
                "{name} not checked for unwind"
            );
        }
    }
}
