//! The cgroup operations table.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Cell, Column, Role, TableDef};
use crate::{profile::Profile, tracer::Tracer};

/// Folds the per-VM and per-instance parts of a cgroup path so that the
/// operations of every VM aggregate: libvirt's
/// `machine/qemu-12-vm\x2d12.libvirt-qemu/vcpu0` becomes
/// `machine/qemu-*.libvirt-qemu/vcpu*`; other runs of digits become `*`.
#[must_use]
pub fn fold_cgroup_path(path: &str) -> String {
    let fold_digits = |c: &str| {
        let mut out = String::with_capacity(c.len());
        let mut in_digits = false;
        for ch in c.chars() {
            if ch.is_ascii_digit() {
                if !in_digits {
                    out.push('*');
                }
                in_digits = true;
            } else {
                out.push(ch);
                in_digits = false;
            }
        }
        out
    };
    path.split('/')
        .map(|c| {
            if c.starts_with("qemu-")
                && let Some(rest) = c.strip_suffix(".libvirt-qemu")
                && rest.len() > 5
            {
                return "qemu-*.libvirt-qemu".to_owned();
            }
            fold_digits(c)
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Cgroup operations of one kind on one (folded) path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CgroupRow {
    pub op: String,
    pub hierarchy: String,
    pub path: String,
    pub count: u64,
    pub timed: u64,
    pub total_ns: u64,
    pub mean_ns: u64,
    pub max_ns: u64,
}

/// The cgroup operations of one window or of the whole recording, by
/// total latency, then count.
#[must_use]
pub fn cgroups(profile: &Profile, window: Option<u32>) -> Vec<CgroupRow> {
    type Group = (String, String, String);
    let mut by: BTreeMap<Group, (u64, u64, u64, u64)> = BTreeMap::new();
    for c in profile
        .cgroups
        .iter()
        .filter(|c| window.is_none_or(|w| c.window == w))
    {
        let e = by
            .entry((c.op.clone(), c.hierarchy.clone(), fold_cgroup_path(&c.path)))
            .or_default();
        e.0 += c.count;
        e.1 += c.timed;
        e.2 += c.total_ns;
        e.3 = e.3.max(c.max_ns);
    }
    let mut rows: Vec<CgroupRow> = by
        .into_iter()
        .map(
            |((op, hierarchy, path), (count, timed, total, max))| CgroupRow {
                op,
                hierarchy,
                path,
                count,
                timed,
                total_ns: total,
                mean_ns: total.checked_div(timed).unwrap_or(0),
                max_ns: max,
            },
        )
        .collect();
    rows.sort_by(|a, b| {
        b.total_ns
            .cmp(&a.total_ns)
            .then(b.count.cmp(&a.count))
            .then_with(|| a.path.cmp(&b.path))
    });
    rows
}

pub static CGROUPS: TableDef<CgroupRow> = TableDef {
    name: "cgroups",
    title: "cgroup operations",
    order: None,
    tracer: Tracer::Cgroup,
    count_name: "operations",
    empty: "no cgroup operations recorded",
    rows: cgroups,
    columns: &[
        Column {
            header: "op",
            csv: "op",
            role: Role::Key,
            cell: |r| Cell::Text(r.op.clone()),
        },
        Column {
            header: "hierarchy",
            csv: "hierarchy",
            role: Role::Key,
            cell: |r| Cell::Text(r.hierarchy.clone()),
        },
        Column {
            header: "cgroup",
            csv: "cgroup",
            role: Role::Key,
            cell: |r| Cell::Text(r.path.clone()),
        },
        Column {
            header: "count",
            csv: "count",
            role: Role::Count,
            cell: |r| Cell::Count(r.count),
        },
        Column {
            header: "timed",
            csv: "timed",
            role: Role::Figure,
            cell: |r| Cell::Count(r.timed),
        },
        Column {
            header: "total",
            csv: "total_ns",
            role: Role::Total,
            cell: |r| r.timed_ns(r.total_ns),
        },
        Column {
            header: "mean",
            csv: "mean_ns",
            role: Role::Figure,
            cell: |r| r.timed_ns(r.mean_ns),
        },
        Column {
            header: "max",
            csv: "max_ns",
            role: Role::Max,
            cell: |r| r.timed_ns(r.max_ns),
        },
    ],
    note: None,
    gate: None,
    top: None,
};

impl CgroupRow {
    /// A duration of the operations that were timed (`-` when none was).
    fn timed_ns(&self, ns: u64) -> Cell {
        if self.timed == 0 {
            Cell::Untimed
        } else {
            Cell::Ns(ns)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_per_vm_cgroup_paths() {
        assert_eq!(
            fold_cgroup_path("/machine/qemu-12-vm\\x2d12.libvirt-qemu/emulator"),
            "/machine/qemu-*.libvirt-qemu/emulator"
        );
        assert_eq!(
            fold_cgroup_path("/machine/qemu-3-guest.libvirt-qemu/vcpu0"),
            "/machine/qemu-*.libvirt-qemu/vcpu*"
        );
        assert_eq!(
            fold_cgroup_path("/hvprof-vmload-4242/cg-17"),
            "/hvprof-vmload-*/cg-*"
        );
        assert_eq!(fold_cgroup_path("/machine"), "/machine");
    }
}
