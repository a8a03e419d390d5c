//! Per-window tables (for now: kernel lock contention), rendered as aligned
//! text, markdown, CSV and JSON from a [`Profile`].

use std::{collections::BTreeMap, fmt::Write as _};

pub use crate::words::{human_ns, lock_type_name};
use serde::Serialize;

use crate::profile::{LockWait, Profile};

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
    pub contentions: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub mean_ns: u64,
    /// Upper bounds of the log2 bucket holding the median / 99th percentile.
    pub p50_ns: u64,
    pub p99_ns: u64,
}

/// Adds log2 histogram `from` into `into`, bucket by bucket.
fn merge_hist(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (i, n) in from.iter().enumerate() {
        into[i] += n;
    }
}

/// The upper bound of the bucket holding quantile `q` of a log2 histogram.
#[must_use]
pub fn hist_quantile(hist: &[u64], q: f64) -> u64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "rank"
    )]
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, &n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return 1u64
                .checked_shl(u32::try_from(i + 1).unwrap_or(63))
                .unwrap_or(u64::MAX);
        }
    }
    u64::MAX
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
            });
        a.name = a.name.or(w.lock_name.as_deref());
        a.count += w.count;
        a.total += w.total_ns;
        a.max = a.max.max(w.max_ns);
        merge_hist(&mut a.hist, &w.hist);
        let caller = lock_caller(profile, w).unwrap_or_else(|| "[unknown]".to_owned());
        *a.callers.entry(caller).or_default() += w.total_ns;
    }
    let mut rows: Vec<LockRow> = by_lock
        .into_iter()
        .map(|((addr, ty), a)| {
            let address = format!("{addr:#x}");
            LockRow {
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

/// Escapes text for a markdown table cell or paragraph: names from stacks
/// and command lines must not become markup (or HTML, which GitHub renders).
#[must_use]
pub fn md_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\n' | '\r' => out.push(' '),
            '\\' | '`' | '*' | '_' | '[' | ']' | '|' | '#' | '~' | '!' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// A markdown table whose cells are escaped.
#[must_use]
pub fn md_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!(
        "| {} |\n|{}\n",
        headers
            .iter()
            .map(|h| md_escape(h))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(headers.len())
    );
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| md_escape(c)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

/// A table of strings, rendered the same way for every tracer.
pub struct Table {
    pub headers: Vec<&'static str>,
    /// Columns right-aligned in text (numbers).
    pub numeric: Vec<bool>,
    pub rows: Vec<Vec<String>>,
    /// Said instead of the rows when there are none.
    pub empty: &'static str,
}

impl Table {
    /// Aligned text, numbers right-aligned.
    #[must_use]
    pub fn text(&self) -> String {
        let mut width: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cols: &[String]| {
            let mut l = String::new();
            for (i, c) in cols.iter().enumerate() {
                let w = width[i];
                if self.numeric[i] {
                    let _ = write!(l, "{c:>w$}  ");
                } else {
                    let _ = write!(l, "{c:<w$}  ");
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(
            &self
                .headers
                .iter()
                .map(|h| h.to_uppercase())
                .collect::<Vec<_>>(),
        );
        for r in &self.rows {
            line(r);
        }
        if self.rows.is_empty() {
            let _ = writeln!(out, "({})", self.empty);
        }
        out
    }

    #[must_use]
    pub fn markdown(&self) -> String {
        md_table(&self.headers, &self.rows)
    }

    #[must_use]
    pub fn csv(&self) -> String {
        let q = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_owned()
            }
        };
        let mut out = self.headers.join(",");
        out.push('\n');
        for r in &self.rows {
            let c: Vec<String> = r.iter().map(|c| q(c)).collect();
            out.push_str(&c.join(","));
            out.push('\n');
        }
        out
    }
}

/// The lock table: people read durations, CSV keeps nanoseconds.
#[must_use]
pub fn lock_table(rows: &[LockRow], human: bool) -> Table {
    let d = |ns: u64| if human { human_ns(ns) } else { ns.to_string() };
    Table {
        headers: if human {
            vec![
                "lock",
                "type",
                "caller",
                "contentions",
                "total",
                "max",
                "mean",
                "p50",
                "p99",
                "address",
            ]
        } else {
            vec![
                "lock",
                "type",
                "caller",
                "contentions",
                "total_ns",
                "max_ns",
                "mean_ns",
                "p50_ns",
                "p99_ns",
                "address",
            ]
        },
        numeric: vec![
            false, false, false, true, true, true, true, true, true, false,
        ],
        rows: rows
            .iter()
            .map(|r| {
                vec![
                    r.lock.clone(),
                    r.lock_type.clone(),
                    r.caller.clone(),
                    r.contentions.to_string(),
                    d(r.total_ns),
                    d(r.max_ns),
                    d(r.mean_ns),
                    if human {
                        format!("<={}", d(r.p50_ns))
                    } else {
                        d(r.p50_ns)
                    },
                    if human {
                        format!("<={}", d(r.p99_ns))
                    } else {
                        d(r.p99_ns)
                    },
                    r.address.clone(),
                ]
            })
            .collect(),
        empty: "no lock contention recorded",
    }
}

#[must_use]
pub fn locks_text(rows: &[LockRow]) -> String {
    lock_table(rows, true).text()
}

#[must_use]
pub fn locks_markdown(rows: &[LockRow]) -> String {
    lock_table(rows, true).markdown()
}

#[must_use]
pub fn locks_csv(rows: &[LockRow]) -> String {
    lock_table(rows, false).csv()
}

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
pub fn fork_table(rows: &[ForkRow], human: bool) -> Table {
    let d = |ns: u64| if human { human_ns(ns) } else { ns.to_string() };
    Table {
        headers: if human {
            vec![
                "parent",
                "caller",
                "syscall",
                "creates",
                "count",
                "time in fork",
                "mean",
                "max",
            ]
        } else {
            vec![
                "parent", "caller", "syscall", "creates", "count", "total_ns", "mean_ns", "max_ns",
            ]
        },
        numeric: vec![false, false, false, false, true, true, true, true],
        rows: rows
            .iter()
            .map(|r| {
                vec![
                    r.parent.clone(),
                    r.caller.clone(),
                    r.syscall.clone(),
                    r.creates.clone(),
                    r.count.to_string(),
                    d(r.total_ns),
                    d(r.mean_ns),
                    d(r.max_ns),
                ]
            })
            .collect(),
        empty: "no forks recorded",
    }
}

/// Execs and child lifetimes of a window (or of the whole recording).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ForkSummary {
    pub execs: u64,
    /// Child processes forked in the window that exited while recording.
    pub children_exited: u64,
    pub lifetime_p50_ns: u64,
    pub lifetime_max_ns: u64,
}

#[must_use]
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

#[must_use]
pub fn cgroup_table(rows: &[CgroupRow], human: bool) -> Table {
    let d = |ns: u64| if human { human_ns(ns) } else { ns.to_string() };
    Table {
        headers: if human {
            vec![
                "op",
                "hierarchy",
                "cgroup",
                "count",
                "timed",
                "total",
                "mean",
                "max",
            ]
        } else {
            vec![
                "op",
                "hierarchy",
                "cgroup",
                "count",
                "timed",
                "total_ns",
                "mean_ns",
                "max_ns",
            ]
        },
        numeric: vec![false, false, false, true, true, true, true, true],
        rows: rows
            .iter()
            .map(|r| {
                let t = |ns: u64| {
                    if r.timed == 0 && human {
                        "-".to_owned()
                    } else {
                        d(ns)
                    }
                };
                vec![
                    r.op.clone(),
                    r.hierarchy.clone(),
                    r.path.clone(),
                    r.count.to_string(),
                    r.timed.to_string(),
                    t(r.total_ns),
                    t(r.mean_ns),
                    t(r.max_ns),
                ]
            })
            .collect(),
        empty: "no cgroup operations recorded",
    }
}

/// The method a D-Bus call went to: `interface.member`, or what is known.
#[must_use]
pub fn dbus_method(c: &crate::profile::DbusCall) -> String {
    match (&c.interface, &c.member) {
        (Some(i), Some(m)) => format!("{i}.{m}"),
        (None, Some(m)) => m.clone(),
        (Some(i), None) => format!("{i}.?"),
        (None, None) => "?".to_owned(),
    }
}

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
                dbus_method(c),
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

#[must_use]
pub fn dbus_table(rows: &[DbusRow], human: bool) -> Table {
    let d = |ns: u64| if human { human_ns(ns) } else { ns.to_string() };
    let ns = |h: &'static str, m: &'static str| if human { h } else { m };
    Table {
        headers: vec![
            "library",
            "destination",
            "method",
            "calls",
            "timeouts",
            ns("total", "total_ns"),
            ns("mean", "mean_ns"),
            ns("p50", "p50_ns"),
            ns("p99", "p99_ns"),
            ns("max", "max_ns"),
            "top caller",
        ],
        numeric: vec![
            false, false, false, true, true, true, true, true, true, true, false,
        ],
        rows: rows
            .iter()
            .map(|r| {
                vec![
                    r.library.clone(),
                    r.destination.clone(),
                    r.method.clone(),
                    r.calls.to_string(),
                    r.timeouts.to_string(),
                    d(r.total_ns),
                    d(r.mean_ns),
                    d(r.p50_ns),
                    d(r.p99_ns),
                    d(r.max_ns),
                    r.top_callers.first().cloned().unwrap_or_default(),
                ]
            })
            .collect(),
        empty: "no blocking D-Bus calls recorded",
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::record::lock_flags;

    use super::*;
    use crate::profile::FrameTable;

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
        let text = locks_text(&all);
        assert!(text.starts_with("LOCK"), "{text}");
        assert!(
            text.contains("do_mmap") && text.contains("8.0 us"),
            "{text}"
        );
        let md = locks_markdown(&all);
        assert_eq!(md.lines().count(), 4);
        let csv = locks_csv(&all);
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .contains(",rwsem:W,do_mmap,4,8000,"),
            "{csv}"
        );
        assert_eq!(
            locks_text(&[]).lines().last(),
            Some("(no lock contention recorded)")
        );
    }

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
        let text = fork_table(&rows, true).text();
        assert!(
            text.contains("rpc-libvirtd") && text.contains("virFork"),
            "{text}"
        );
        assert_eq!(
            fork_table(&[], true).text().lines().last(),
            Some("(no forks recorded)")
        );
    }

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

    #[test]
    fn quantiles() {
        assert_eq!(hist_quantile(&[], 0.5), 0);
        assert_eq!(hist_quantile(&[10], 0.5), 2);
        assert_eq!(hist_quantile(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 99], 0.5), 1024);
        assert_eq!(hist_quantile(&[99, 0, 1], 0.99), 2);
        assert_eq!(hist_quantile(&[98, 0, 2], 0.99), 8);
    }

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
        let text = dbus_table(&w2, true).text();
        assert!(text.contains("TerminateMachine"), "{text}");
        assert_eq!(dbus(&p, Some(3)), Vec::new());
    }
}
