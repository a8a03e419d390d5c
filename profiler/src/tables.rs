//! Per-window tables (for now: kernel lock contention), rendered as aligned
//! text, markdown, CSV and JSON from a [`Profile`].

use std::{collections::BTreeMap, fmt::Write as _};

use profiler_common::record::lock_flags;
use serde::Serialize;

use crate::profile::{LockWait, Profile};

/// `perf lock contention`'s names for `lock:contention_begin` flags.
#[must_use]
pub fn lock_type_name(flags: u32) -> &'static str {
    use lock_flags::{MUTEX, PERCPU, READ, RT, SPIN, WRITE};
    match flags {
        f if f == SPIN => "spinlock",
        f if f == SPIN | READ => "rwlock:R",
        f if f == SPIN | WRITE => "rwlock:W",
        f if f == READ => "rwsem:R",
        f if f == WRITE => "rwsem:W",
        f if f == RT => "rt-mutex",
        f if f == RT | READ => "rwlock-rt:R",
        f if f == RT | WRITE => "rwlock-rt:W",
        f if f == PERCPU | READ => "pcpu-sem:R",
        f if f == PERCPU | WRITE => "pcpu-sem:W",
        f if f == MUTEX => "mutex",
        f if f == MUTEX | SPIN => "mutex-spin",
        _ => "unknown",
    }
}

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
        if a.hist.len() < w.hist.len() {
            a.hist.resize(w.hist.len(), 0);
        }
        for (i, n) in w.hist.iter().enumerate() {
            a.hist[i] += n;
        }
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

/// A duration for people: `812 ns`, `12.3 us`, `4.56 ms`, `1.20 s`.
#[must_use]
pub fn human_ns(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let f = ns as f64;
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} us", f / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2} ms", f / 1e6)
    } else {
        format!("{:.2} s", f / 1e9)
    }
}

const HEADERS: [&str; 10] = [
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
];

fn cells(r: &LockRow) -> [String; 10] {
    [
        r.lock.clone(),
        r.lock_type.clone(),
        r.caller.clone(),
        r.contentions.to_string(),
        human_ns(r.total_ns),
        human_ns(r.max_ns),
        human_ns(r.mean_ns),
        format!("<={}", human_ns(r.p50_ns)),
        format!("<={}", human_ns(r.p99_ns)),
        r.address.clone(),
    ]
}

/// Aligned text, numbers right-aligned.
#[must_use]
pub fn locks_text(rows: &[LockRow]) -> String {
    let body: Vec<[String; 10]> = rows.iter().map(cells).collect();
    let mut width = HEADERS.map(str::len);
    for r in &body {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cols: &[String]| {
        for (i, c) in cols.iter().enumerate() {
            let w = width[i];
            if (3..=8).contains(&i) {
                let _ = write!(out, "{c:>w$}  ");
            } else {
                let _ = write!(out, "{c:<w$}  ");
            }
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    };
    line(&mut out, &HEADERS.map(str::to_uppercase));
    for r in &body {
        line(&mut out, r);
    }
    if rows.is_empty() {
        out.push_str("(no lock contention recorded)\n");
    }
    out
}

#[must_use]
pub fn locks_markdown(rows: &[LockRow]) -> String {
    let esc = |s: &str| s.replace('|', "\\|");
    let mut out = format!(
        "| {} |\n|{}\n",
        HEADERS.join(" | "),
        "---|".repeat(HEADERS.len())
    );
    for r in rows {
        let c = cells(r).map(|c| esc(&c));
        let _ = writeln!(out, "| {} |", c.join(" | "));
    }
    out
}

#[must_use]
pub fn locks_csv(rows: &[LockRow]) -> String {
    let q = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_owned()
        }
    };
    let mut out = String::from(
        "lock,type,caller,contentions,total_ns,max_ns,mean_ns,p50_ns,p99_ns,address\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{}",
            q(&r.lock),
            q(&r.lock_type),
            q(&r.caller),
            r.contentions,
            r.total_ns,
            r.max_ns,
            r.mean_ns,
            r.p50_ns,
            r.p99_ns,
            r.address
        );
    }
    out
}

#[cfg(test)]
mod tests {
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
    fn quantiles() {
        assert_eq!(hist_quantile(&[], 0.5), 0);
        assert_eq!(hist_quantile(&[10], 0.5), 2);
        assert_eq!(hist_quantile(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 99], 0.5), 1024);
        assert_eq!(hist_quantile(&[99, 0, 1], 0.99), 2);
        assert_eq!(hist_quantile(&[98, 0, 2], 0.99), 8);
    }
}
