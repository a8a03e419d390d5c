//! The fork table: who forks, from where, and how long it takes.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Cell, Column, Note, Role, TableDef, human_ns};
use crate::{profile::Profile, tracer::Tracer};

/// libc's own frames on the way into the kernel's fork.
fn is_fork_wrapper(frame: &str) -> bool {
    const NAMES: &[&str] = &[
        "fork",
        "__fork",
        "__libc_fork",
        "_Fork",
        "arch_fork",
        "vfork",
        "__vfork",
        "clone",
        "__clone",
        "clone3",
        "__clone3",
        "__clone_internal",
        "__clone_internal_fallback",
        "__spawni",
        "__spawnix",
        "__spawn_process",
        "posix_spawn",
        "__posix_spawn",
        "posix_spawnp",
        "__posix_spawnp",
        "pthread_create",
        "__pthread_create_2_1",
        "create_thread",
    ];
    NAMES.contains(&frame) || frame.starts_with("[libc.so") || frame.starts_with("[unknown")
}

/// Forks from one parent and call site, in a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForkRow {
    pub parent: String,
    /// The parent's first frame outside libc's fork machinery.
    pub caller: String,
    pub syscall: String,
    /// `process` or `thread`.
    pub creates: String,
    pub count: u64,
    pub total_ns: u64,
    pub mean_ns: u64,
    pub max_ns: u64,
}

/// The forks of one window or of the whole recording, by time in fork.
#[must_use]
pub fn forks(profile: &Profile, window: Option<u32>) -> Vec<ForkRow> {
    // (parent, caller, syscall, thread) → (count, total, max)
    type Group = (String, String, String, bool);
    let mut by: BTreeMap<Group, (u64, u64, u64)> = BTreeMap::new();
    for f in profile
        .forks
        .iter()
        .filter(|f| window.is_none_or(|w| f.window == w))
    {
        let caller = f.caller.clone().unwrap_or_else(|| {
            profile
                .frame_names(&f.stack)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .find(|n| !is_fork_wrapper(n))
                .unwrap_or("[unknown]")
                .to_owned()
        });
        let e = by
            .entry((f.comm.clone(), caller, f.syscall.clone(), f.thread))
            .or_default();
        e.0 += f.count;
        e.1 += f.total_ns;
        e.2 = e.2.max(f.max_ns);
    }
    let mut rows: Vec<ForkRow> = by
        .into_iter()
        .map(
            |((parent, caller, syscall, thread), (count, total, max))| ForkRow {
                parent,
                caller,
                syscall,
                creates: if thread { "thread" } else { "process" }.to_owned(),
                count,
                total_ns: total,
                mean_ns: total.checked_div(count).unwrap_or(0),
                max_ns: max,
            },
        )
        .collect();
    rows.sort_by(|a, b| {
        b.total_ns
            .cmp(&a.total_ns)
            .then_with(|| a.caller.cmp(&b.caller))
    });
    rows
}

#[must_use]
/// Execs and child lifetimes of a window (or of the whole recording).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ForkSummary {
    pub execs: u64,
    /// Child processes forked in the window that exited while recording.
    pub children_exited: u64,
    pub lifetime_p50_ns: u64,
    pub lifetime_max_ns: u64,
}

pub fn fork_summary(profile: &Profile, window: Option<u32>) -> ForkSummary {
    let in_window = |w: Option<u32>| window.is_none_or(|id| w == Some(id));
    let execs = profile
        .processes
        .iter()
        .filter(|p| p.exec_ns.is_some() && in_window(p.exec_window))
        .count();
    let mut lives: Vec<u64> = profile
        .processes
        .iter()
        .filter(|p| in_window(p.fork_window))
        .filter_map(|p| Some(p.exit_ns?.saturating_sub(p.forked_ns?)))
        .collect();
    lives.sort_unstable();
    ForkSummary {
        execs: execs as u64,
        children_exited: lives.len() as u64,
        lifetime_p50_ns: lives.get(lives.len() / 2).copied().unwrap_or(0),
        lifetime_max_ns: lives.last().copied().unwrap_or(0),
    }
}

impl ForkSummary {
    #[must_use]
    pub fn text(&self) -> String {
        format!(
            "execs: {}; child processes exited: {} (lifetime p50 {}, max {})\n",
            self.execs,
            self.children_exited,
            human_ns(self.lifetime_p50_ns),
            human_ns(self.lifetime_max_ns)
        )
    }
}

pub static FORKS: TableDef<ForkRow, ForkSummary> = TableDef {
    name: "forks",
    title: "forks",
    order: Some("by time in fork"),
    tracer: Tracer::Fork,
    count_name: "forks",
    empty: "no forks recorded",
    rows: forks,
    columns: &[
        Column {
            header: "parent",
            csv: "parent",
            role: Role::Key,
            cell: |r| Cell::Text(r.parent.clone()),
        },
        Column {
            header: "caller",
            csv: "caller",
            role: Role::Key,
            cell: |r| Cell::Text(r.caller.clone()),
        },
        Column {
            header: "syscall",
            csv: "syscall",
            role: Role::Key,
            cell: |r| Cell::Text(r.syscall.clone()),
        },
        Column {
            header: "creates",
            csv: "creates",
            role: Role::Key,
            cell: |r| Cell::Text(r.creates.clone()),
        },
        Column {
            header: "count",
            csv: "count",
            role: Role::Count,
            cell: |r| Cell::Count(r.count),
        },
        Column {
            header: "time in fork",
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
            header: "max",
            csv: "max_ns",
            role: Role::Max,
            cell: |r| Cell::Ns(r.max_ns),
        },
    ],
    note: Some(Note {
        of: fork_summary,
        text: ForkSummary::text,
    }),
    gate: None,
    top: None,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::FrameTable;
    use crate::tables::AnyTable as _;

    #[test]
    fn forks_by_parent_and_caller() {
        let mut t = FrameTable::default();
        let stack = vec![
            t.intern("main"),
            t.intern("virFork"),
            t.intern("__libc_fork"),
            t.intern("_Fork"),
        ];
        let call = |window, thread, count, ns| crate::profile::ForkCall {
            window,
            tgid: 7,
            comm: "rpc-libvirtd".into(),
            syscall: "clone".into(),
            thread,
            stack: stack.clone(),
            caller: None,
            count,
            total_ns: ns,
            max_ns: ns,
        };
        let p = Profile {
            frames: t.into_names(),
            forks: vec![
                call(1, false, 3, 300),
                call(1, false, 2, 200),
                call(2, true, 1, 50),
            ],
            ..Profile::default()
        };
        let rows = forks(&p, Some(1));
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].caller.as_str(), rows[0].count, rows[0].total_ns),
            ("virFork", 5, 500)
        );
        assert_eq!(rows[0].creates, "process");
        assert_eq!(forks(&p, None).len(), 2);
        let text = FORKS.table(&p, Some(1), true).text();
        assert!(
            text.contains("rpc-libvirtd") && text.contains("virFork"),
            "{text}"
        );
        assert_eq!(
            FORKS.table(&p, Some(7), true).text().lines().last(),
            Some("(no forks recorded)")
        );
    }
}
