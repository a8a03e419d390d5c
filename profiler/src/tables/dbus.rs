//! The blocking D-Bus calls table.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Cell, Column, Gate, Role, TableDef, hist_quantile, merge_hist};
use crate::{profile::Profile, tracer::Tracer};

/// Blocking D-Bus calls to one method of one destination through one
/// library.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DbusRow {
    pub library: String,
    pub destination: String,
    /// `interface.member`.
    pub method: String,
    pub calls: u64,
    pub timeouts: u64,
    pub total_ns: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    /// The callers' user stacks with the most time, leaf first, the most
    /// expensive first (at most three), each as `frame <- frame <- …`.
    pub top_callers: Vec<String>,
}

/// The D-Bus calls of one window or of the whole recording, by total
/// latency, then calls.
#[must_use]
pub fn dbus(profile: &Profile, window: Option<u32>) -> Vec<DbusRow> {
    #[derive(Default)]
    struct Acc {
        calls: u64,
        timeouts: u64,
        total: u64,
        max: u64,
        hist: Vec<u64>,
        stacks: BTreeMap<String, u64>,
    }
    let mut by: BTreeMap<(String, String, String), Acc> = BTreeMap::new();
    for c in profile
        .dbus
        .iter()
        .filter(|c| window.is_none_or(|w| c.window == w))
    {
        let a = by
            .entry((
                c.library.clone(),
                c.destination.clone().unwrap_or_else(|| "?".to_owned()),
                c.method(),
            ))
            .or_default();
        a.calls += c.calls;
        a.timeouts += c.timeouts;
        a.total += c.total_ns;
        a.max = a.max.max(c.max_ns);
        merge_hist(&mut a.hist, &c.hist);
        let frames: Vec<&str> = profile.frame_names(&c.stack).rev().take(4).collect();
        let caller = if frames.is_empty() {
            "[unknown]".to_owned()
        } else {
            frames.join(" <- ")
        };
        *a.stacks.entry(caller).or_default() += c.total_ns;
    }
    let mut rows: Vec<DbusRow> = by
        .into_iter()
        .map(|((library, destination, method), a)| {
            let mut stacks: Vec<(String, u64)> = a.stacks.into_iter().collect();
            stacks.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
            DbusRow {
                library,
                destination,
                method,
                calls: a.calls,
                timeouts: a.timeouts,
                total_ns: a.total,
                mean_ns: a.total.checked_div(a.calls).unwrap_or(0),
                p50_ns: hist_quantile(&a.hist, 0.5),
                p99_ns: hist_quantile(&a.hist, 0.99),
                max_ns: a.max,
                top_callers: stacks.into_iter().take(3).map(|(s, _)| s).collect(),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.total_ns
            .cmp(&a.total_ns)
            .then(b.calls.cmp(&a.calls))
            .then_with(|| a.method.cmp(&b.method))
    });
    rows
}

pub static DBUS: TableDef<DbusRow> = TableDef {
    name: "dbus",
    title: "blocking D-Bus calls",
    order: Some("by total latency"),
    tracer: Tracer::Dbus,
    count_name: "calls",
    empty: "no blocking D-Bus calls recorded",
    rows: dbus,
    columns: &[
        Column {
            header: "library",
            csv: "library",
            role: Role::Key,
            cell: |r| Cell::Text(r.library.clone()),
        },
        Column {
            header: "destination",
            csv: "destination",
            role: Role::Key,
            cell: |r| Cell::Text(r.destination.clone()),
        },
        Column {
            header: "method",
            csv: "method",
            role: Role::Key,
            cell: |r| Cell::Text(r.method.clone()),
        },
        Column {
            header: "calls",
            csv: "calls",
            role: Role::Count,
            cell: |r| Cell::Count(r.calls),
        },
        Column {
            header: "timeouts",
            csv: "timeouts",
            role: Role::Timeouts,
            cell: |r| Cell::Count(r.timeouts),
        },
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
            cell: |r| Cell::Ns(r.p50_ns),
        },
        Column {
            header: "p99",
            csv: "p99_ns",
            role: Role::Figure,
            cell: |r| Cell::Ns(r.p99_ns),
        },
        Column {
            header: "max",
            csv: "max_ns",
            role: Role::Max,
            cell: |r| Cell::Ns(r.max_ns),
        },
        Column {
            header: "top caller",
            csv: "top caller",
            role: Role::Text,
            cell: |r| Cell::Text(r.top_callers.first().cloned().unwrap_or_default()),
        },
    ],
    note: None,
    gate: Some(Gate {
        prefix: "dbus",
        name: "METHOD",
        noun: "D-Bus",
        help: ("interface.member or member", "any single method"),
        stats: &[
            ("total", Role::Total),
            ("max", Role::Max),
            ("calls", Role::Count),
            ("count", Role::Count),
            ("timeouts", Role::Timeouts),
        ],
        label: |r| format!("D-Bus {} {} {}", r.library, r.destination, r.method),
        // `interface.member`, or the member alone.
        is: |r, m| {
            r.method == m
                || r.method
                    .strip_suffix(m)
                    .is_some_and(|head| head.ends_with('.'))
        },
    }),
    top: Some((
        "**Top D-Bus calls** (by total time)",
        &["destination", "method", "calls", "timeouts", "total", "max"],
    )),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::FrameTable;
    use crate::tables::AnyTable as _;

    #[test]
    fn dbus_rows_group_by_library_destination_and_method() {
        let mut t = FrameTable::default();
        let (main, vir) = (t.intern("main"), t.intern("virSystemdCreateMachine"));
        let call = |window, library: &str, member: &str, calls, timeouts, total_ns, max_ns| {
            crate::profile::DbusCall {
                window,
                tgid: 7,
                comm: "libvirtd".into(),
                library: library.into(),
                function: "g_dbus_connection_call_sync".into(),
                destination: Some("org.freedesktop.machine1".into()),
                path: Some("/org/freedesktop/machine1".into()),
                interface: Some("org.freedesktop.machine1.Manager".into()),
                member: Some(member.into()),
                timeout_ms: Some(-1),
                stack: vec![main, vir],
                calls,
                timeouts,
                total_ns,
                max_ns,
                hist: {
                    let mut h = vec![0; 35];
                    h[20] = calls - timeouts;
                    h[34] = timeouts;
                    h
                },
            }
        };
        let p = Profile {
            dbus: vec![
                call(
                    1,
                    "gio",
                    "CreateMachine",
                    4,
                    1,
                    25_004_000_000,
                    25_001_000_000,
                ),
                call(2, "gio", "CreateMachine", 2, 0, 2_000_000, 1_500_000),
                call(2, "gio", "TerminateMachine", 1, 0, 1_000_000, 1_000_000),
            ],
            frames: t.into_names(),
            ..Profile::default()
        };
        let all = dbus(&p, None);
        assert_eq!(all.len(), 2);
        let create = &all[0];
        assert_eq!(
            create.method,
            "org.freedesktop.machine1.Manager.CreateMachine"
        );
        assert_eq!((create.calls, create.timeouts), (6, 1));
        assert_eq!(create.total_ns, 25_006_000_000);
        assert_eq!(create.max_ns, 25_001_000_000);
        assert_eq!(create.p50_ns, 1 << 21);
        assert_eq!(create.p99_ns, 1 << 35);
        assert_eq!(
            create.top_callers,
            vec!["virSystemdCreateMachine <- main".to_owned()]
        );
        let w2 = dbus(&p, Some(2));
        assert_eq!(w2.len(), 2);
        assert_eq!((w2[0].calls, w2[0].timeouts), (2, 0));
        let text = DBUS.table(&p, Some(2), true).text();
        assert!(text.contains("TerminateMachine"), "{text}");
        assert_eq!(dbus(&p, Some(3)), Vec::new());
    }
}
