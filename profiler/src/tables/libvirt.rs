//! libvirt's tables: libvirtd's API calls, the QEMU monitor commands its
//! QEMU driver sent, the events QEMU sent back, and its workers' waits for
//! a domain's job (the libvirt tracer's rows, one kind each).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Cell, Column, Gate, Note, Role, TableDef, hist_quantile, merge_hist};
use crate::{
    profile::{LibvirtCall, Profile},
    tracer::Tracer,
};

/// The calls of one name (API procedure, QMP command or event; a job
/// wait's caller).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LibvirtRow {
    pub name: String,
    /// Every call: answered or not.
    pub calls: u64,
    /// Answered with an error (a job wait: failed, timed out or not).
    pub errors: u64,
    /// Job waits that ran into libvirt's job wait timeout.
    pub timeouts: u64,
    /// Not answered by the stop.
    pub in_flight: u64,
    /// The answered calls' time.
    pub total_ns: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    /// The longest, the calls in flight counted up to the stop.
    pub max_ns: u64,
}

/// The rows of one kind ([`LibvirtCall::API`], …) of one window or of the
/// whole recording, by total time, then calls.
#[must_use]
pub fn libvirt_rows(profile: &Profile, window: Option<u32>, kind: &str) -> Vec<LibvirtRow> {
    #[derive(Default)]
    struct Acc {
        calls: u64,
        errors: u64,
        timeouts: u64,
        in_flight: u64,
        total: u64,
        answered: u64,
        max: u64,
        hist: Vec<u64>,
    }
    let mut by: BTreeMap<String, Acc> = BTreeMap::new();
    for c in profile
        .libvirt
        .iter()
        .filter(|c| c.kind == kind && window.is_none_or(|w| c.window == w))
    {
        let a = by.entry(row_name(profile, c)).or_default();
        a.calls += c.calls;
        a.max = a.max.max(c.max_ns);
        match c.status.as_str() {
            LibvirtCall::IN_FLIGHT => a.in_flight += c.calls,
            s => {
                if s == LibvirtCall::ERROR || s == LibvirtCall::TIMEOUT {
                    a.errors += c.calls;
                }
                if s == LibvirtCall::TIMEOUT {
                    a.timeouts += c.calls;
                }
                a.answered += c.calls;
                a.total += c.total_ns;
                merge_hist(&mut a.hist, &c.hist);
            }
        }
    }
    let mut rows: Vec<LibvirtRow> = by
        .into_iter()
        .map(|(name, a)| LibvirtRow {
            name,
            calls: a.calls,
            errors: a.errors,
            timeouts: a.timeouts,
            in_flight: a.in_flight,
            total_ns: a.total,
            mean_ns: a.total.checked_div(a.answered).unwrap_or(0),
            p50_ns: hist_quantile(&a.hist, 0.5),
            p99_ns: hist_quantile(&a.hist, 0.99),
            max_ns: a.max,
        })
        .collect();
    rows.sort_by(|a, b| {
        b.total_ns
            .cmp(&a.total_ns)
            .then(b.calls.cmp(&a.calls))
            .then_with(|| a.name.cmp(&b.name))
    });
    rows
}

/// What a row is named by: its name, or a job wait's caller: the
/// innermost function of its stack with a name, past libvirt's own
/// `virDomainObjBegin…Job` (Debian's QEMU driver has symbols for its
/// exported functions only, so the waiter is often the public API call
/// that led there: `virDomainSuspend`).
fn row_name(profile: &Profile, c: &LibvirtCall) -> String {
    if c.kind != LibvirtCall::JOB {
        return c.name.clone();
    }
    if c.status == LibvirtCall::IN_FLIGHT {
        return WAITING.to_owned();
    }
    let frames: Vec<&str> = profile
        .frame_names(&c.stack)
        .rev()
        .filter(|f| !f.starts_with("virDomainObjBegin"))
        .collect();
    frames
        .iter()
        .find(|f| !f.starts_with('['))
        .or(frames.first())
        .map_or("[unknown]", |f| f)
        .to_owned()
}

/// A job wait still under way at the stop (its caller's stack is taken
/// when it ends).
const WAITING: &str = "[still waiting at the stop]";

/// A timed table's columns: `$lead` (the name and counts), then the
/// times of the calls or waits that ended.
macro_rules! timed_columns {
    ($($lead:expr),* $(,)?) => {
        [
            $($lead,)*
            Column {
                header: "total",
                csv: "total_ns",
                role: Role::Total,
                cell: |r| Cell::Ns(r.total_ns),
            },
            Column {
                header: "mean",
                csv: "mean_ns",
                role: Role::Figure,
                cell: |r| Cell::Ns(r.mean_ns),
            },
            Column {
                header: "p50",
                csv: "p50_ns",
                role: Role::Figure,
                cell: |r| Cell::AtMost(r.p50_ns),
            },
            Column {
                header: "p99",
                csv: "p99_ns",
                role: Role::P99,
                cell: |r| Cell::AtMost(r.p99_ns),
            },
            Column {
                header: "max",
                csv: "max_ns",
                role: Role::Max,
                cell: |r| Cell::Ns(r.max_ns),
            },
        ]
    };
}

/// The API calls' and QMP commands' columns: calls, errors, in flight,
/// times.
const TIMED: [Column<LibvirtRow>; 9] = timed_columns![
    Column {
        header: "name",
        csv: "name",
        role: Role::Key,
        cell: |r| Cell::Text(r.name.clone()),
    },
    Column {
        header: "calls",
        csv: "calls",
        role: Role::Count,
        cell: |r| Cell::Count(r.calls),
    },
    Column {
        header: "errors",
        csv: "errors",
        role: Role::Errors,
        cell: |r| Cell::Count(r.errors),
    },
    Column {
        header: "in flight",
        csv: "in_flight",
        role: Role::Figure,
        cell: |r| Cell::Count(r.in_flight),
    }
];

/// A timed table's gate statistics.
const TIMED_STATS: &[(&str, Role)] = &[
    ("total", Role::Total),
    ("max", Role::Max),
    ("p99", Role::P99),
    ("calls", Role::Count),
    ("count", Role::Count),
    ("errors", Role::Errors),
];

/// Where the API procedures' names come from, said after the table.
#[derive(Serialize)]
pub struct NamesSource(String);

pub static LIBVIRT: TableDef<LibvirtRow, NamesSource> = TableDef {
    name: "libvirt",
    title: "libvirt API calls (libvirtd, call to reply)",
    order: Some("by total time"),
    tracer: Tracer::Libvirt,
    count_name: "calls",
    empty: "no libvirt API calls recorded",
    rows: |p, w| libvirt_rows(p, w, LibvirtCall::API),
    columns: &TIMED,
    note: Some(Note {
        of: |_, _| NamesSource(crate::libvirt::names_source()),
        text: |s| format!("{}\n", s.0),
    }),
    gate: Some(Gate {
        prefix: "libvirt",
        name: "PROCEDURE",
        noun: "libvirt API",
        help: ("a procedure, e.g. DomainCreateXML", "any single procedure"),
        stats: TIMED_STATS,
        label: |r| format!("libvirt {}", r.name),
        is: |r, n| r.name == n,
    }),
    top: Some((
        "**Top libvirt API calls** (by total time)",
        &["name", "calls", "errors", "total", "p99", "max"],
    )),
};

pub static QMP: TableDef<LibvirtRow> = TableDef {
    name: "qmp",
    title: "QEMU monitor commands (libvirtd's QEMU driver, command to reply)",
    order: Some("by total time"),
    tracer: Tracer::Libvirt,
    count_name: "commands",
    empty: "no QEMU monitor commands recorded",
    rows: |p, w| libvirt_rows(p, w, LibvirtCall::QMP),
    columns: &TIMED,
    note: None,
    gate: Some(Gate {
        prefix: "qmp",
        name: "COMMAND",
        noun: "QMP",
        help: ("a command, e.g. query-cpus-fast", "any single command"),
        stats: TIMED_STATS,
        label: |r| format!("QMP {}", r.name),
        is: |r, n| r.name == n,
    }),
    top: Some((
        "**Top QEMU monitor commands** (by total time)",
        &["name", "calls", "errors", "total", "p99", "max"],
    )),
};

pub static QMP_EVENTS: TableDef<LibvirtRow> = TableDef {
    name: "qmp-events",
    title: "QEMU monitor events (sent by QEMU to libvirtd)",
    order: Some("by count"),
    tracer: Tracer::Libvirt,
    count_name: "events",
    empty: "no QEMU monitor events recorded",
    rows: |p, w| {
        let mut rows = libvirt_rows(p, w, LibvirtCall::EVENT);
        rows.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.name.cmp(&b.name)));
        rows
    },
    columns: &[
        Column {
            header: "event",
            csv: "event",
            role: Role::Key,
            cell: |r| Cell::Text(r.name.clone()),
        },
        Column {
            header: "count",
            csv: "count",
            role: Role::Count,
            cell: |r| Cell::Count(r.calls),
        },
    ],
    note: None,
    gate: Some(Gate {
        prefix: "qmp-event",
        name: "EVENT",
        noun: "QMP event",
        help: ("an event, e.g. RESUME", "any single event"),
        stats: &[("count", Role::Count)],
        label: |r| format!("QMP event {}", r.name),
        is: |r, n| r.name == n,
    }),
    top: None,
};

pub static JOBWAIT: TableDef<LibvirtRow> = TableDef {
    name: "jobwait",
    title: "domain job waits (libvirtd's workers, virDomainObjBeginJob)",
    order: Some("by total wait"),
    tracer: Tracer::Libvirt,
    count_name: "waits",
    empty: "no domain job waits recorded",
    rows: |p, w| libvirt_rows(p, w, LibvirtCall::JOB),
    columns: &timed_columns![
        Column {
            header: "caller",
            csv: "caller",
            role: Role::Key,
            cell: |r| Cell::Text(r.name.clone()),
        },
        Column {
            header: "waits",
            csv: "waits",
            role: Role::Count,
            cell: |r| Cell::Count(r.calls),
        },
        Column {
            header: "failed",
            csv: "failed",
            role: Role::Errors,
            cell: |r| Cell::Count(r.errors),
        },
        Column {
            header: "timeouts",
            csv: "timeouts",
            role: Role::Timeouts,
            cell: |r| Cell::Count(r.timeouts),
        },
        Column {
            header: "waiting",
            csv: "waiting",
            role: Role::Figure,
            cell: |r| Cell::Count(r.in_flight),
        }
    ],
    note: None,
    gate: Some(Gate {
        prefix: "jobwait",
        name: "CALLER",
        noun: "domain job wait",
        help: (
            "the waiter's caller, e.g. virDomainSuspend",
            "any single caller",
        ),
        stats: &[
            ("total", Role::Total),
            ("max", Role::Max),
            ("p99", Role::P99),
            ("waits", Role::Count),
            ("count", Role::Count),
            ("failed", Role::Errors),
            ("timeouts", Role::Timeouts),
        ],
        label: |r| format!("job wait in {}", r.name),
        is: |r, n| r.name == n,
    }),
    top: Some((
        "**Top domain job waits** (by total wait)",
        &["caller", "waits", "timeouts", "total", "max"],
    )),
};
