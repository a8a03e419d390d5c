//! `hvprof check`: what this kernel and these privileges allow, capability by
//! capability, each with the reason and the fix for anything missing.
//!
//! Where existence is not proof (a tracepoint can exist and still refuse a BPF
//! program; a perf event can open and never fire), the check really loads and
//! attaches a tiny program from the embedded object and, where it can, makes
//! the program fire and counts the hits.
//!
//! `system` has the rows read from the system, `programs` those that load a
//! program; the tracepoint rows come from the tracer registry's probe lists
//! ([`tracepoints`]).

mod programs;
mod system;

use std::fmt::Write as _;

use aya::Btf;
use serde::Serialize;

pub use self::programs::hvprof_check_uprobe_target;
use crate::{
    sys::{self, Privileges},
    tracefs::{Tracefs, Tracepoint},
    tracer::{Part, Tracer},
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
}

/// The tracepoints of every part's probes, from the tracer registry (the
/// lists `record` attaches, and drops a tracer for when one is missing):
/// all BTF tracepoints, tested as `record` loads its programs on them.
#[must_use]
pub fn tracepoints() -> Vec<CheckedTracepoint> {
    let mut out = Vec::new();
    for part in Part::ALL {
        for probe in part.probes() {
            for tracepoint in probe.tracepoints() {
                out.push(CheckedTracepoint {
                    tracepoint,
                    needed_by: part.into(),
                    required: part.required(),
                });
            }
        }
    }
    out
}

const FIX_PRIVILEGES: &str =
    "run as root (sudo hvprof …), or `setcap cap_bpf,cap_perfmon+ep $(command -v hvprof)`";

/// Runs every check. Never fails: anything that goes wrong is a row.
#[must_use]
pub fn run() -> Report {
    let privileges = Privileges::current();
    let mut rows = vec![system::privileges_row(&privileges), system::memlock_row()];
    let tracefs = Tracefs::locate_or_mount();
    rows.push(system::tracefs_row(&tracefs));
    let tracefs = tracefs.map(|(t, _)| t);
    let btf = Btf::from_sys_fs();
    rows.push(system::btf_row(&btf));
    rows.push(system::run_queue_row());
    rows.push(system::lock_holders_row());
    rows.extend(programs::rows(
        &privileges,
        tracefs.as_ref().ok(),
        btf.as_ref().ok(),
    ));
    rows.push(system::kvm_row());
    Report::new(rows)
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
    }

    /// The rows in the order `check` has always printed them.
    #[test]
    fn tracepoint_rows_keep_their_order() {
        let rows: Vec<String> = tracepoints()
            .iter()
            .map(|t| format!("{} {}", t.tracepoint, t.needed_by.as_str()))
            .collect();
        let want = [
            "sched:sched_switch offcpu",
            "sched:sched_waking wakers",
            "sched:sched_process_fork targets",
            "sched:sched_process_exec targets",
            "sched:sched_process_exit targets",
            "raw_syscalls:sys_enter syscalls",
            "raw_syscalls:sys_exit syscalls",
            "lock:contention_begin locks",
            "lock:contention_end locks",
            "cgroup:cgroup_mkdir cgroup",
            "cgroup:cgroup_attach_task cgroup",
            "cgroup:cgroup_rmdir cgroup",
        ];
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
            "raw_syscalls:sys_enter",
            "raw_syscalls:sys_exit",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not checked");
        }
    }
}
