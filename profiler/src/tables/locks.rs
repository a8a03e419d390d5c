//! The kernel lock contention table.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Cell, Column, Gate, Role, TableDef, hist_quantile, merge_hist};
use crate::{
    profile::{LockWait, Profile},
    tracer::Tracer,
};

/// Kernel frames that are the locking code itself, not its caller.
fn is_lock_internal(frame: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "_raw_",
        "__raw_",
        "queued_",
        "native_queued",
        "__pv_queued",
        "pv_queued",
        "do_raw_",
        "mutex_",
        "__mutex",
        "rwsem_",
        "__rwsem",
        "down_",
        "__down",
        "up_",
        "percpu_down",
        "__percpu_down",
        "rt_mutex",
        "__rt_mutex",
        "rt_spin",
        "rwbase_",
        "osq_",
        "schedule",
        "__schedule",
        "preempt_schedule",
        "mmap_read_lock",
        "mmap_write_lock",
        "lock_",
        "__lock",
    ];
    let f = frame.trim_end_matches("_[k]");
    PREFIXES.iter().any(|p| f.starts_with(p)) || f.contains("_lock_slowpath")
}

/// The first kernel frame outside the locking code, from the leaf: the
/// function that contended, as `perf lock contention` shows it.
#[must_use]
pub fn lock_caller(profile: &Profile, w: &LockWait) -> Option<String> {
    profile
        .frame_names(&w.stack)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .filter(|f| f.ends_with("_[k]"))
        .find(|f| !is_lock_internal(f))
        .map(|f| f.trim_end_matches("_[k]").to_owned())
}

/// Holders a lock's row names.
pub const TOP_HOLDERS: usize = 3;

/// One lock in a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LockRow {
    /// The symbol of a static lock, else its address.
    pub lock: String,
    pub address: String,
    #[serde(rename = "type")]
    pub lock_type: String,
    /// The function most often contending on it.
    pub caller: String,
    /// Who held it for most of the wait (a mutex's or rwsem's holder as
    /// each wait began: `comm[pid]`, or `[readers]`), and the share of the
    /// wait time; empty for locks that record no holder.
    pub holder: String,
    pub holder_share_pct: u64,
    /// The top [`TOP_HOLDERS`] holders by wait caused, with their shares.
    pub holders: Vec<(String, u64)>,
    pub contentions: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub mean_ns: u64,
    /// Upper bounds of the log2 bucket holding the median / 99th percentile.
    pub p50_ns: u64,
    pub p99_ns: u64,
}

/// The locks of one window (`Some(id)`) or of the whole recording, by total
/// wait, longest first.
#[must_use]
pub fn locks(profile: &Profile, window: Option<u32>) -> Vec<LockRow> {
    struct Acc<'a> {
        name: Option<&'a str>,
        count: u64,
        total: u64,
        max: u64,
        hist: Vec<u64>,
        callers: BTreeMap<String, u64>,
        holders: BTreeMap<String, u64>,
    }
    let mut by_lock: BTreeMap<(u64, &str), Acc<'_>> = BTreeMap::new();
    for w in profile
        .locks
        .iter()
        .filter(|w| window.is_none_or(|id| w.window == id))
    {
        let a = by_lock
            .entry((w.lock, w.lock_type.as_str()))
            .or_insert_with(|| Acc {
                name: None,
                count: 0,
                total: 0,
                max: 0,
                hist: Vec::new(),
                callers: BTreeMap::new(),
                holders: BTreeMap::new(),
            });
        a.name = a.name.or(w.lock_name.as_deref());
        a.count += w.count;
        a.total += w.total_ns;
        a.max = a.max.max(w.max_ns);
        merge_hist(&mut a.hist, &w.hist);
        let caller = lock_caller(profile, w).unwrap_or_else(|| "[unknown]".to_owned());
        *a.callers.entry(caller).or_default() += w.total_ns;
        if let Some(h) = &w.holder {
            *a.holders.entry(h.to_string()).or_default() += w.total_ns;
        }
    }
    let mut rows: Vec<LockRow> = by_lock
        .into_iter()
        .map(|((addr, ty), a)| {
            let address = format!("{addr:#x}");
            let mut holders: Vec<(String, u64)> = a.holders.into_iter().collect();
            holders.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
            holders.truncate(TOP_HOLDERS);
            for h in &mut holders {
                h.1 = h.1.saturating_mul(100).checked_div(a.total).unwrap_or(0);
            }
            let (holder, holder_share_pct) = holders.first().cloned().unwrap_or_default();
            LockRow {
                holder,
                holder_share_pct,
                holders,
                lock: a.name.map_or_else(|| address.clone(), str::to_owned),
                address,
                lock_type: ty.to_owned(),
                caller: a
                    .callers
                    .iter()
                    .max_by_key(|(_, ns)| **ns)
                    .map(|(c, _)| c.clone())
                    .unwrap_or_default(),
                contentions: a.count,
                total_ns: a.total,
                max_ns: a.max,
                mean_ns: a.total.checked_div(a.count).unwrap_or(0),
                p50_ns: hist_quantile(&a.hist, 0.5),
                p99_ns: hist_quantile(&a.hist, 0.99),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.total_ns
            .cmp(&a.total_ns)
            .then_with(|| a.address.cmp(&b.address))
    });
    rows
}

/// The lock table: people read durations, CSV keeps nanoseconds.
pub static LOCKS: TableDef<LockRow> = TableDef {
    name: "locks",
    title: "kernel lock contention",
    order: Some("by total wait"),
    tracer: Tracer::Locks,
    count_name: "contentions",
    empty: "no lock contention recorded",
    rows: locks,
    columns: &[
        Column {
            header: "lock",
            csv: "lock",
            role: Role::Key,
            cell: |r| Cell::Text(r.lock.clone()),
        },
        Column {
            header: "type",
            csv: "type",
            role: Role::Key,
            cell: |r| Cell::Text(r.lock_type.clone()),
        },
        Column {
            header: "caller",
            csv: "caller",
            role: Role::Text,
            cell: |r| Cell::Text(r.caller.clone()),
        },
        Column {
            header: "holder",
            csv: "holder",
            role: Role::Text,
            cell: |r| {
                Cell::Text(if r.holders.is_empty() {
                    "-".to_owned()
                } else {
                    let shares: Vec<String> = r
                        .holders
                        .iter()
                        .map(|(h, pct)| format!("{h} {pct}%"))
                        .collect();
                    shares.join(", ")
                })
            },
        },
        Column {
            header: "contentions",
            csv: "contentions",
            role: Role::Count,
            cell: |r| Cell::Count(r.contentions),
        },
        Column {
            header: "total",
            csv: "total_ns",
            role: Role::Total,
            cell: |r| Cell::Ns(r.total_ns),
        },
        Column {
            header: "max",
            csv: "max_ns",
            role: Role::Max,
            cell: |r| Cell::Ns(r.max_ns),
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
            role: Role::Figure,
            cell: |r| Cell::AtMost(r.p99_ns),
        },
        Column {
            header: "address",
            csv: "address",
            role: Role::Text,
            cell: |r| Cell::Text(r.address.clone()),
        },
    ],
    note: None,
    gate: Some(Gate {
        prefix: "lock",
        name: "NAME",
        noun: "lock",
        help: ("the lock's symbol or 0x address", "any single lock"),
        stats: &[
            ("total", Role::Total),
            ("max", Role::Max),
            ("count", Role::Count),
            ("contentions", Role::Count),
        ],
        label: |r| format!("lock {} {}", r.lock, r.lock_type),
        // A lock by its symbol or its address.
        is: |r, name| r.lock == name || r.address.eq_ignore_ascii_case(name),
    }),
    top: Some((
        "**Top locks** (by total wait)",
        &["lock", "type", "caller", "contentions", "total", "max"],
    )),
};

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::record::lock_flags;

    use crate::tables::AnyTable as _;
    use crate::{profile::FrameTable, words::lock_type_name};

    fn profile() -> Profile {
        let mut t = FrameTable::default();
        let stack = vec![
            t.intern("main"),
            t.intern("do_mmap_[k]"),
            t.intern("down_write_killable_[k]"),
            t.intern("rwsem_down_write_slowpath_[k]"),
            t.intern("schedule_[k]"),
        ];
        let wait = |window, lock, ns, hist: Vec<u64>| LockWait {
            window,
            tgid: 1,
            comm: "x".into(),
            lock,
            lock_name: None,
            lock_type: lock_type_name(lock_flags::WRITE).into(),
            stack: stack.clone(),
            count: hist.iter().sum(),
            total_ns: ns,
            max_ns: ns / 2,
            hist,
            holder: None,
        };
        Profile {
            frames: t.into_names(),
            locks: vec![
                wait(1, 0xffff_8880_0000_1000, 5000, vec![0, 0, 1, 1]),
                wait(1, 0xffff_8880_0000_1000, 3000, vec![0, 0, 0, 2]),
                wait(2, 0xffff_8880_0000_2000, 100, vec![1]),
            ],
            ..Profile::default()
        }
    }

    #[test]
    fn the_top_holder_is_the_one_that_made_most_of_the_wait() {
        use crate::profile::Holder;
        let mut p = profile();
        let task = |pid| Holder::Task {
            tgid: 7,
            pid,
            comm: format!("w{pid}"),
            stack: Vec::new(),
        };
        p.locks[0].holder = Some(task(11));
        p.locks[1].holder = Some(Holder::Readers);
        let mut third = p.locks[1].clone();
        third.holder = Some(task(11));
        third.total_ns = 1000;
        p.locks.push(third);
        let rows = locks(&p, Some(1));
        // 6000 of 9000 ns by w11, 3000 by readers.
        assert_eq!(rows[0].holder, "w11[11]");
        assert_eq!(rows[0].holder_share_pct, 66);
        assert_eq!(
            rows[0].holders,
            [("w11[11]".to_owned(), 66), ("[readers]".to_owned(), 33)]
        );
        let text = LOCKS.table(&p, Some(1), true).text();
        assert!(text.contains("w11[11] 66%, [readers] 33%"), "{text}");
        // A lock that records no holder says so.
        assert_eq!(locks(&p, Some(2))[0].holder, "");
        assert!(LOCKS.table(&p, Some(2), true).text().contains(" - "));
    }

    #[test]
    fn names_lock_types_like_perf() {
        assert_eq!(lock_type_name(lock_flags::SPIN), "spinlock");
        assert_eq!(lock_type_name(lock_flags::MUTEX), "mutex");
        assert_eq!(
            lock_type_name(lock_flags::MUTEX | lock_flags::SPIN),
            "mutex-spin"
        );
        assert_eq!(lock_type_name(lock_flags::READ), "rwsem:R");
        assert_eq!(
            lock_type_name(lock_flags::SPIN | lock_flags::WRITE),
            "rwlock:W"
        );
        assert_eq!(
            lock_type_name(lock_flags::PERCPU | lock_flags::READ),
            "pcpu-sem:R"
        );
    }

    #[test]
    fn aggregates_per_lock_with_caller_and_percentiles() {
        let p = profile();
        let rows = locks(&p, Some(1));
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.contentions, 4);
        assert_eq!(r.total_ns, 8000);
        assert_eq!(r.mean_ns, 2000);
        assert_eq!(r.caller, "do_mmap");
        assert_eq!(r.lock_type, "rwsem:W");
        assert_eq!(r.lock, "0xffff888000001000");
        // Buckets: [4,8)=1, [8,16)=3 → median and p99 in [8,16).
        assert_eq!(r.p50_ns, 16);
        assert_eq!(r.p99_ns, 16);
        let all = locks(&p, None);
        assert_eq!(all.len(), 2);
        assert!(all[0].total_ns >= all[1].total_ns);
        let text = LOCKS.table(&p, None, true).text();
        assert!(text.starts_with("LOCK"), "{text}");
        assert!(
            text.contains("do_mmap") && text.contains("8.0 us"),
            "{text}"
        );
        let md = LOCKS.table(&p, None, true).markdown();
        assert_eq!(md.lines().count(), 4);
        let csv = LOCKS.table(&p, None, false).csv();
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .contains(",rwsem:W,do_mmap,-,4,8000,"),
            "{csv}"
        );
        assert_eq!(
            LOCKS.table(&p, Some(7), true).text().lines().last(),
            Some("(no lock contention recorded)")
        );
    }
}
