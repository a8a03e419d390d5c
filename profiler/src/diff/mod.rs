//! `hvprof diff A B`: two profiles compared window by window. Windows are
//! matched by VM range (the setup window with the setup window); per window,
//! differential flame graphs (inferno's differential folding, A normalised
//! to B's total by default), the per-window metrics and the lock, fork,
//! cgroup and D-Bus tables as deltas (A, B, Δ, ratio B/A). Written as text,
//! markdown, JSON and an HTML page that shows the graphs from the window
//! directories next to it (the output directory is the artifact).

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs, io,
    path::{Path, PathBuf},
};

use profiler_common::record::SETUP_WINDOW;
use serde::Serialize;
use thiserror::Error;

mod text;

use crate::{
    ci::{self, Gate, GateResult, Metric, Unit, WindowMetrics},
    graphs::{GRAPHS, Graph},
    html,
    profile::{Profile, ProfileError},
    render::{self, RenderError},
    tables::{self, AnyTable, Measured, TABLES, Table, human_ns},
    windows::WindowInfo,
};

#[derive(Debug, Error)]
pub enum DiffError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(
        "the two profiles' windows do not match, so their windows cannot be compared one to one:\n  A {a}: {a_windows}\n  B {b}: {b_windows}\nrecord both with the same --window-size or --windows (and enough VMs to reach the same windows), or pass --common-windows to diff only the windows both have ({common})"
    )]
    WindowsDiffer {
        a: PathBuf,
        b: PathBuf,
        a_windows: String,
        b_windows: String,
        common: String,
    },
    #[error(
        "the two profiles have no window in common:\n  A {a}: {a_windows}\n  B {b}: {b_windows}\nrecord both with the same --window-size or --windows"
    )]
    NoCommonWindows {
        a: PathBuf,
        b: PathBuf,
        a_windows: String,
        b_windows: String,
    },
    #[error(
        "{place}: A's stacks add up to {a_total} and B's to {b_total}, more than a differential flame graph can draw ({MAX_DIFF_TOTAL}); no recording comes near that, so a profile is corrupt: record it again"
    )]
    TooLargeToDraw {
        place: String,
        a_total: u64,
        b_total: u64,
    },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{path} holds no profile: name profile files, recordings' directories, or a directory of them"
    )]
    NoProfiles { path: PathBuf },
    #[error(
        "the runs of a side must have the same windows: {why}; record every run with the same --window-size or --windows and the same number of VMs"
    )]
    RunsNeedSameWindows { why: String },
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Gate(#[from] ci::GateError),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// What `hvprof diff` is asked to do.
pub struct DiffArgs<'a> {
    /// A's profile, or its runs (profile files, or directories of
    /// recordings: see [`expand`]); the same for B.
    pub a: &'a [PathBuf],
    pub b: &'a [PathBuf],
    pub output: &'a Path,
    /// Scale A's flame-graph counts to B's total (inferno's `normalize`).
    pub normalize: bool,
    /// Diff only the windows both profiles have instead of failing.
    pub common_windows: bool,
    pub gates: &'a [Gate],
    /// Append a compact markdown summary to this file.
    pub markdown_summary: Option<&'a Path>,
}

/// What `hvprof diff` found: the text to print, warnings for stderr, and
/// whether a gate failed.
pub struct Outcome {
    pub diff: Diff,
    pub text: String,
    pub warnings: Vec<String>,
}

impl Outcome {
    #[must_use]
    pub fn gate_failed(&self) -> bool {
        self.diff.gates.iter().any(|g| !g.passed)
    }
}

/// The profiles `path` names: a profile file; a recording's directory
/// (its `profile.hvprof`); or a directory of recordings or profiles (every
/// `*/profile.hvprof` and `*.hvprof` in it, in name order).
pub fn expand(path: &Path) -> Result<Vec<PathBuf>, DiffError> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let own = path.join(crate::profile::FILE_NAME);
    if own.is_file() {
        return Ok(vec![own]);
    }
    let entries = fs::read_dir(path).map_err(|source| DiffError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter_map(|p| {
            let inner = p.join(crate::profile::FILE_NAME);
            if inner.is_file() {
                Some(inner)
            } else {
                (p.is_file() && p.extension().is_some_and(|x| x == "hvprof")).then_some(p)
            }
        })
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(DiffError::NoProfiles {
            path: path.to_path_buf(),
        });
    }
    Ok(found)
}

/// The runs of one side, read.
fn read_runs(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, Vec<Profile>), DiffError> {
    let mut files = Vec::new();
    for p in paths {
        files.extend(expand(p)?);
    }
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let profiles = render::parallel_map(&refs, |p| Profile::open(p))?;
    Ok((files, profiles))
}

/// Reads both sides, diffs them, writes every output into `args.output`,
/// and evaluates the gates. One profile a side is compared as it is; with
/// several runs on a side, the graphs and tables are of each side's runs
/// merged, the metrics are medians, and the gates need significance
/// ([`ci::evaluate_runs`]).
pub fn run(args: &DiffArgs<'_>) -> Result<Outcome, DiffError> {
    let ((a_files, a_runs), (b_files, b_runs)) = (read_runs(args.a)?, read_runs(args.b)?);
    let several = a_runs.len() > 1 || b_runs.len() > 1;
    if several && args.common_windows {
        return Err(DiffError::RunsNeedSameWindows {
            why: "--common-windows compares two profiles, not runs".to_owned(),
        });
    }
    for (files, runs) in [(&a_files, &a_runs), (&b_files, &b_runs)] {
        same_windows(files, runs)?;
    }
    let merged = |runs: &[Profile]| {
        crate::profile::merge::merge_runs(runs).unwrap_or_else(|| unreachable!("a run a side"))
    };
    let (a, b) = if several {
        (merged(&a_runs), merged(&b_runs))
    } else {
        (a_runs[0].clone(), b_runs[0].clone())
    };
    let (a_path, b_path) = (&a_files[0], &b_files[0]);
    let matched = match_windows(&a, a_path, &b, b_path, args.common_windows)?;
    let (mut fa, mut fb) = (
        WindowMetrics::new(&matched.a),
        WindowMetrics::new(&matched.b),
    );
    let ra: Vec<WindowMetrics<'_>> = a_runs.iter().map(WindowMetrics::new).collect();
    let rb: Vec<WindowMetrics<'_>> = b_runs.iter().map(WindowMetrics::new).collect();
    if several {
        fa.set_medians(&ra);
        fb.set_medians(&rb);
    }
    let mut diff = compare(&fa, a_path, &fb, b_path, args.normalize);
    diff.a.runs = a_files.iter().map(|p| p.display().to_string()).collect();
    diff.b.runs = b_files.iter().map(|p| p.display().to_string()).collect();
    diff.unmatched_a = matched.only_a.iter().map(window_name).collect();
    diff.unmatched_b = matched.only_b.iter().map(window_name).collect();
    diff.gates = if several {
        ci::evaluate_runs(args.gates, &ra, &rb)?
    } else {
        ci::evaluate_diff(args.gates, &fa, &fb)?
    };
    write_all(&mut diff, &matched.a, &matched.b, args.output)?;
    if let Some(path) = args.markdown_summary {
        ci::append_markdown(path, &diff.summary_markdown()).map_err(|source| DiffError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let mut warnings = Vec::new();
    if !diff.unmatched_a.is_empty() || !diff.unmatched_b.is_empty() {
        warnings.push(format!(
            "--common-windows: left out windows only A has ({}) and only B has ({})",
            list_or_none(&diff.unmatched_a),
            list_or_none(&diff.unmatched_b)
        ));
    }
    let mut text = diff.text(Some(10));
    let _ = writeln!(
        text,
        "\nwrote {} (diff.txt, diff.md, diff.json, diff.html, per-window differential flame graphs)",
        args.output.display()
    );
    Ok(Outcome {
        diff,
        text,
        warnings,
    })
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

fn window_name(w: &WindowInfo) -> String {
    format!("{} {}", w.name(), w.label())
}

/// Both profiles cut to the windows they share, with B's window ids
/// replaced by A's.
pub struct Matched<'a> {
    pub a: Cow<'a, Profile>,
    pub b: Cow<'a, Profile>,
    pub only_a: Vec<WindowInfo>,
    pub only_b: Vec<WindowInfo>,
}

fn range(w: &WindowInfo) -> (Option<u64>, Option<u64>) {
    (w.first_vm, w.last_vm)
}

/// Matches windows by VM range. Identical window lists borrow both
/// profiles; otherwise, with `common`, both are cut to the shared windows
/// (B renumbered to A's ids), else the error names both lists and the fix.
pub fn match_windows<'a>(
    a: &'a Profile,
    a_path: &Path,
    b: &'a Profile,
    b_path: &Path,
    common: bool,
) -> Result<Matched<'a>, DiffError> {
    let list = |p: &Profile| {
        p.windows
            .iter()
            .map(window_name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ranges = |p: &Profile| p.windows.iter().map(range).collect::<Vec<_>>();
    if ranges(a) == ranges(b) && a.windows.iter().zip(&b.windows).all(|(x, y)| x.id == y.id) {
        return Ok(Matched {
            a: Cow::Borrowed(a),
            b: Cow::Borrowed(b),
            only_a: Vec::new(),
            only_b: Vec::new(),
        });
    }
    let b_by_range: HashMap<_, _> = b.windows.iter().map(|w| (range(w), w.id)).collect();
    let shared: Vec<(&WindowInfo, u32)> = a
        .windows
        .iter()
        .filter_map(|w| b_by_range.get(&range(w)).map(|&bid| (w, bid)))
        .collect();
    if shared.is_empty() {
        return Err(DiffError::NoCommonWindows {
            a: a_path.to_path_buf(),
            b: b_path.to_path_buf(),
            a_windows: list(a),
            b_windows: list(b),
        });
    }
    if !common {
        return Err(DiffError::WindowsDiffer {
            a: a_path.to_path_buf(),
            b: b_path.to_path_buf(),
            a_windows: list(a),
            b_windows: list(b),
            common: shared
                .iter()
                .map(|(w, _)| window_name(w))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let windows: Vec<WindowInfo> = shared.iter().map(|(w, _)| (*w).clone()).collect();
    let keep_a: HashMap<u32, u32> = shared.iter().map(|(w, _)| (w.id, w.id)).collect();
    let keep_b: HashMap<u32, u32> = shared.iter().map(|(w, bid)| (*bid, w.id)).collect();
    let only = |p: &Profile, keep: &HashMap<u32, u32>| {
        p.windows
            .iter()
            .filter(|w| !keep.contains_key(&w.id))
            .cloned()
            .collect()
    };
    Ok(Matched {
        only_a: only(a, &keep_a),
        only_b: only(b, &keep_b),
        a: Cow::Owned(restrict(a, &keep_a, windows.clone())),
        b: Cow::Owned(restrict(b, &keep_b, windows)),
    })
}

/// A copy of `p` with only the windows in `keep`, renumbered.
fn restrict(p: &Profile, keep: &HashMap<u32, u32>, windows: Vec<WindowInfo>) -> Profile {
    let mut out = p.clone();
    out.windows = windows;
    crate::profile::merge::map_windows(&mut out, &|w| keep.get(&w).copied());
    out
}

/// A value in A and in B.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Delta {
    pub a: u64,
    pub b: u64,
    /// B − A.
    pub delta: i64,
    /// B / A: 1 when equal (also 0 and 0), `None` when A is 0 and B is not.
    pub ratio: Option<f64>,
}

impl Delta {
    #[must_use]
    pub fn new(a: u64, b: u64) -> Self {
        let delta = i64::try_from(i128::from(b) - i128::from(a)).unwrap_or(if b > a {
            i64::MAX
        } else {
            i64::MIN
        });
        #[expect(clippy::cast_precision_loss, reason = "a ratio")]
        let ratio = if a == b {
            Some(1.0)
        } else if a == 0 {
            None
        } else {
            Some(b as f64 / a as f64)
        };
        Self { a, b, delta, ratio }
    }

    #[must_use]
    pub fn changed(&self) -> bool {
        self.a != self.b
    }

    fn ratio_text(&self) -> String {
        match self.ratio {
            Some(r) => format!("{r:.2}"),
            None => "new".to_owned(),
        }
    }

    /// `132 → 140 (+6.1%)`, `12 (=)`.
    fn arrow(&self, unit: Unit) -> String {
        if !self.changed() {
            return format!("{} (=)", unit.format(self.b));
        }
        let pct = match self.ratio {
            Some(r) => format!("{:+.1}%", (r - 1.0) * 100.0),
            None => "new".to_owned(),
        };
        format!(
            "{} \u{2192} {} ({pct})",
            unit.format(self.a),
            unit.format(self.b)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricDelta {
    pub metric: Metric,
    pub unit: Unit,
    #[serde(flatten)]
    pub delta: Delta,
}

/// One row of a delta table: a lock, a fork call site, a cgroup operation
/// or a D-Bus method, in A and in B.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeltaRow {
    /// The values of the table's key columns.
    pub key: Vec<String>,
    /// Contentions, forks, operations or calls.
    pub count: Delta,
    pub time_ns: Delta,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Delta>,
}

impl DeltaRow {
    #[must_use]
    pub fn changed(&self) -> bool {
        self.count.changed() || self.time_ns.changed() || self.timeouts.is_some_and(|t| t.changed())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeltaTable {
    /// `locks`, `forks`, `cgroups`, `dbus`.
    pub name: &'static str,
    /// The key columns.
    pub columns: Vec<&'static str>,
    /// What `count` counts.
    pub count_name: &'static str,
    /// Changed rows first (by |Δ time|, then |Δ count|), then by B's time.
    pub rows: Vec<DeltaRow>,
}

impl DeltaTable {
    /// Table `t`'s rows in A and in B, matched on their keys.
    fn new(t: &dyn AnyTable, a: Vec<Measured>, b: Vec<Measured>) -> Self {
        let with_timeouts = t.has_timeouts();
        let mut by: BTreeMap<Vec<String>, ([u64; 3], [u64; 3])> = BTreeMap::new();
        for m in a {
            by.entry(m.key).or_default().0 = m.values;
        }
        for m in b {
            by.entry(m.key).or_default().1 = m.values;
        }
        let mut rows: Vec<DeltaRow> = by
            .into_iter()
            .map(|(key, (a, b))| DeltaRow {
                key,
                count: Delta::new(a[0], b[0]),
                time_ns: Delta::new(a[1], b[1]),
                timeouts: with_timeouts.then(|| Delta::new(a[2], b[2])),
            })
            .collect();
        rows.sort_by(|x, y| {
            y.time_ns
                .delta
                .unsigned_abs()
                .cmp(&x.time_ns.delta.unsigned_abs())
                .then(
                    y.count
                        .delta
                        .unsigned_abs()
                        .cmp(&x.count.delta.unsigned_abs()),
                )
                .then(y.time_ns.b.cmp(&x.time_ns.b))
                .then(y.count.b.cmp(&x.count.b))
                .then_with(|| x.key.cmp(&y.key))
        });
        Self {
            name: t.name(),
            columns: t.keys(),
            count_name: t.count_name(),
            rows,
        }
    }

    /// Rows as strings for [`Table`] (people read durations).
    fn table(&self, rows: &[&DeltaRow]) -> Table {
        let mut headers = self.columns.clone();
        headers.extend([
            "count A", "count B", "Δ count", "ratio", "time A", "time B", "Δ time", "ratio",
        ]);
        let with_timeouts = rows.iter().any(|r| r.timeouts.is_some());
        if with_timeouts {
            headers.extend(["timeouts A", "timeouts B", "Δ timeouts"]);
        }
        let mut numeric = vec![false; self.columns.len()];
        numeric.resize(headers.len(), true);
        Table {
            headers,
            numeric,
            rows: rows
                .iter()
                .map(|r| {
                    let mut c = r.key.clone();
                    let (n, t) = (r.count, r.time_ns);
                    c.extend([
                        n.a.to_string(),
                        n.b.to_string(),
                        Unit::Count.format_delta(n.a, n.b),
                        n.ratio_text(),
                        human_ns(t.a),
                        human_ns(t.b),
                        Unit::Ns.format_delta(t.a, t.b),
                        t.ratio_text(),
                    ]);
                    if let Some(o) = r.timeouts {
                        c.extend([
                            o.a.to_string(),
                            o.b.to_string(),
                            Unit::Count.format_delta(o.a, o.b),
                        ]);
                    }
                    c
                })
                .collect(),
            empty: "nothing recorded in either profile",
        }
    }
}

/// One differential flame graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlameDiff {
    /// `oncpu`, `offcpu`, `lockwait`, `dbuswait`.
    pub tracer: &'static str,
    /// Relative to the output directory.
    pub svg: String,
    pub folded: String,
    /// `samples` or `us`.
    pub unit: &'static str,
    /// Totals before normalisation.
    pub a_total: u64,
    pub b_total: u64,
    /// A's counts were scaled to B's total (normalised, and neither empty).
    pub scaled: bool,
    /// The SVG's height in pixels (the page's frame for it).
    #[serde(skip)]
    pub height: u32,
}

/// The comparison of one window (or, with `window: None`, of the whole
/// recording).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Section {
    pub window: Option<u32>,
    pub label: String,
    /// The window's output directory.
    pub dir: Option<String>,
    pub metrics: Vec<MetricDelta>,
    pub tables: Vec<DeltaTable>,
    pub flame_graphs: Vec<FlameDiff>,
}

/// One profile of the pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Side {
    pub path: String,
    /// Every run's profile, with several a side (the metrics are then
    /// their medians, the graphs and tables of them merged).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<String>,
    /// Target, kernel, VMs, duration, windows, losses, in one line.
    pub description: String,
    pub kernel: String,
    pub vms: usize,
    pub duration_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diff {
    pub a: Side,
    pub b: Side,
    /// A's flame-graph counts scaled to B's total.
    pub normalized: bool,
    /// Windows left out by `--common-windows`.
    pub unmatched_a: Vec<String>,
    pub unmatched_b: Vec<String>,
    pub whole: Section,
    pub windows: Vec<Section>,
    pub gates: Vec<GateResult>,
}

fn side(f: &WindowMetrics<'_>, path: &Path) -> Side {
    Side {
        path: path.display().to_string(),
        runs: Vec::new(),
        description: ci::profile_line(f),
        kernel: f.profile.meta.kernel.clone(),
        vms: f.profile.vms.len(),
        duration_ns: f.profile.meta.duration_ns,
    }
}

/// Every run of a side has the windows of its first (ids and VM ranges).
fn same_windows(files: &[PathBuf], runs: &[Profile]) -> Result<(), DiffError> {
    let names = |p: &Profile| p.windows.iter().map(window_name).collect::<Vec<_>>();
    let first = names(&runs[0]);
    for (file, run) in files.iter().zip(runs).skip(1) {
        let these = names(run);
        if these != first {
            return Err(DiffError::RunsNeedSameWindows {
                why: format!(
                    "{} has {}, {} has {}",
                    files[0].display(),
                    first.join(", "),
                    file.display(),
                    these.join(", ")
                ),
            });
        }
    }
    Ok(())
}

fn section(
    a: &WindowMetrics<'_>,
    b: &WindowMetrics<'_>,
    window: Option<&WindowInfo>,
    ma: &ci::MetricValues,
    mb: &ci::MetricValues,
) -> Section {
    let id = window.map(|w| w.id);
    let (pa, pb) = (a.profile, b.profile);
    Section {
        window: id,
        label: window.map_or_else(|| "whole recording".to_owned(), WindowInfo::label),
        dir: window.map(WindowInfo::dir_name),
        // The metrics of the tracers either profile recorded.
        metrics: Metric::ALL
            .into_iter()
            .filter(|m| m.tracer().is_none_or(|t| pa.recorded(t) || pb.recorded(t)))
            .map(|m| MetricDelta {
                metric: m,
                unit: m.unit(),
                delta: Delta::new(ma.get(m), mb.get(m)),
            })
            .collect(),
        tables: TABLES
            .into_iter()
            .map(|t| DeltaTable::new(t, t.measured(pa, id), t.measured(pb, id)))
            .collect(),
        flame_graphs: Vec::new(),
    }
}

/// Compares two profiles whose windows match (see [`match_windows`]):
/// metrics and tables, no flame graphs yet (see [`write_all`]).
#[must_use]
pub fn compare(
    a: &WindowMetrics<'_>,
    a_path: &Path,
    b: &WindowMetrics<'_>,
    b_path: &Path,
    normalize: bool,
) -> Diff {
    let windows = a
        .windows
        .iter()
        .zip(&b.windows)
        .map(|((w, ma), (_, mb))| section(a, b, Some(w), ma, mb))
        .collect();
    Diff {
        a: side(a, a_path),
        b: side(b, b_path),
        normalized: normalize,
        unmatched_a: Vec::new(),
        unmatched_b: Vec::new(),
        whole: section(a, b, None, &a.whole, &b.whole),
        windows,
        gates: Vec::new(),
    }
}

/// The most a side of a differential flame graph may add up to: inferno
/// colours each frame by 150 × its change in an `isize` (below 2^63),
/// after scaling A to B's total in floating point; 2^55 leaves room for
/// both.
pub const MAX_DIFF_TOTAL: u64 = 1 << 55;

/// The folded lines inferno will count (`stack N`, N digits only; it
/// skips the rest), and their total, saturating.
fn countable(lines: &[String]) -> (Vec<&str>, u64) {
    let mut total: u64 = 0;
    let kept = lines
        .iter()
        .filter_map(|l| {
            let (_, n) = l.trim_end().rsplit_once(' ')?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            total = total.saturating_add(n.parse().unwrap_or(u64::MAX));
            Some(l.as_str())
        })
        .collect();
    (kept, total)
}

/// Two-column folded lines (`stack A B`, sorted) from A's and B's folded
/// lines, by inferno's differential folding.
pub fn differential_folded(a: &[&str], b: &[&str], normalize: bool) -> io::Result<Vec<String>> {
    let join = |v: &[&str]| {
        let mut s = v.join("\n");
        s.push('\n');
        s
    };
    let opts = inferno::differential::Options {
        normalize,
        strip_hex: false,
    };
    let mut out = Vec::new();
    inferno::differential::from_readers(opts, join(a).as_bytes(), join(b).as_bytes(), &mut out)?;
    let text = String::from_utf8(out).map_err(io::Error::other)?;
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort_unstable();
    Ok(lines)
}

/// A differential flame graph drawn from A's and B's folded lines.
pub struct DifferentialGraph {
    /// The two-column folded lines (`stack A B`), one per line.
    pub folded: String,
    pub svg: Vec<u8>,
    /// Totals before normalisation.
    pub a_total: u64,
    pub b_total: u64,
    /// A's counts were scaled to B's total.
    pub scaled: bool,
}

/// Draws B against A from their folded lines (A scaled to B's total when
/// `normalize` and neither is empty); `place` starts the title, e.g.
/// `On-CPU, window 1 (VMs 1–4)`. The paths only name the outputs in
/// errors.
pub fn differential_graph(
    fa: &[String],
    fb: &[String],
    normalize: bool,
    place: &str,
    count_name: &str,
    folded_path: &Path,
    svg_path: &Path,
) -> Result<DifferentialGraph, DiffError> {
    let ((fa, a_total), (fb, b_total)) = (countable(fa), countable(fb));
    if a_total.max(b_total) > MAX_DIFF_TOTAL {
        return Err(DiffError::TooLargeToDraw {
            place: place.to_owned(),
            a_total,
            b_total,
        });
    }
    // Scaling to an empty side would erase the other one.
    let scaled = normalize && a_total > 0 && b_total > 0;
    let lines = differential_folded(&fa, &fb, scaled).map_err(|source| DiffError::Write {
        path: folded_path.to_path_buf(),
        source,
    })?;
    let mut folded = lines.join("\n");
    if !folded.is_empty() {
        folded.push('\n');
    }
    let (title, lines) = if b_total == 0 {
        // Nothing in B to draw: inferno draws B's widths.
        (
            format!("{place}: nothing in B (A: {a_total} {count_name})"),
            Vec::new(),
        )
    } else {
        (
            format!(
                "{place}: B against A{}; red: more in B, blue: less",
                if scaled { " scaled to B's total" } else { "" }
            ),
            lines,
        )
    };
    let mut svg = Vec::new();
    render::write_flame_graph(
        lines.iter().map(String::as_str),
        &title,
        count_name,
        &mut svg,
    )
    .map_err(|source| RenderError::FlameGraph {
        path: svg_path.to_path_buf(),
        source,
    })?;
    Ok(DifferentialGraph {
        folded,
        svg,
        a_total,
        b_total,
        scaled,
    })
}

/// A function that takes each output file: its path and contents.
pub type Emit<'a> = dyn Fn(&Path, &[u8]) -> Result<(), DiffError> + Sync + 'a;

/// One window's differential flame graph of one tracer: its two-column
/// folded file and its SVG, in `dir`'s window directory.
fn flame_diff(
    a: &Profile,
    b: &Profile,
    w: &WindowInfo,
    g: &Graph,
    normalized: bool,
    dir: &Path,
    emit: &Emit<'_>,
) -> Result<FlameDiff, DiffError> {
    let wdir_name = w.dir_name();
    let wdir = dir.join(&wdir_name);
    let stem = g.name;
    let folded = format!("{stem}.diff.folded");
    let svg = format!("{stem}.diff.svg");
    let (folded_path, svg_path) = (wdir.join(&folded), wdir.join(&svg));
    let graph = differential_graph(
        &g.folded(a, w.id),
        &g.folded(b, w.id),
        normalized,
        &format!("{}, window {} ({})", g.title, w.name(), w.label()),
        g.count_name(),
        &folded_path,
        &svg_path,
    )?;
    emit(&folded_path, graph.folded.as_bytes())?;
    emit(&svg_path, &graph.svg)?;
    // The page sizes each graph's frame by the SVG's own height, at its
    // start.
    let head = &graph.svg[..graph.svg.len().min(4096)];
    let height = html::svg_height(&String::from_utf8_lossy(head)).unwrap_or(600);
    Ok(FlameDiff {
        tracer: stem,
        svg: format!("{wdir_name}/{svg}"),
        folded: format!("{wdir_name}/{folded}"),
        unit: g.unit(),
        a_total: graph.a_total,
        b_total: graph.b_total,
        scaled: graph.scaled,
        height,
    })
}

/// Writes the differential flame graphs (filling in each window's
/// `flame_graphs`) and `diff.txt`, `diff.md`, `diff.json`, `diff.html`.
pub fn write_all(diff: &mut Diff, a: &Profile, b: &Profile, dir: &Path) -> Result<(), DiffError> {
    let mkdir = |p: &Path| {
        fs::create_dir_all(p).map_err(|source| DiffError::Write {
            path: p.to_path_buf(),
            source,
        })
    };
    mkdir(dir)?;
    for w in &a.windows {
        mkdir(&dir.join(w.dir_name()))?;
    }
    render_all(diff, a, b, dir, &|path, bytes| {
        fs::write(path, bytes).map_err(|source| DiffError::Write {
            path: path.to_path_buf(),
            source,
        })
    })
}

/// Renders what [`write_all`] writes, handing each file to `emit` (its
/// path under `dir`, which it does not create, and its contents): the
/// fuzz targets diff profiles without a disk.
pub fn render_all(
    diff: &mut Diff,
    a: &Profile,
    b: &Profile,
    dir: &Path,
    emit: &Emit<'_>,
) -> Result<(), DiffError> {
    // Every graph of every window is independent, and drawing them is most
    // of a diff's time: one job each, on every CPU.
    let jobs: Vec<(usize, &Graph)> = (0..a.windows.len())
        .flat_map(|i| GRAPHS.into_iter().map(move |g| (i, g)))
        .collect();
    let normalized = diff.normalized;
    let graphs = render::parallel_map(&jobs, |&(i, g)| {
        flame_diff(a, b, &a.windows[i], g, normalized, dir, emit)
    })?;
    for s in &mut diff.windows {
        s.flame_graphs.clear();
    }
    for (&(i, _), g) in jobs.iter().zip(graphs) {
        diff.windows[i].flame_graphs.push(g);
    }
    emit(&dir.join("diff.txt"), diff.text(None).as_bytes())?;
    emit(&dir.join("diff.md"), diff.markdown().as_bytes())?;
    let json = serde_json::to_string_pretty(&diff).map_err(|e| DiffError::Write {
        path: dir.join("diff.json"),
        source: io::Error::other(e),
    })?;
    emit(&dir.join("diff.json"), json.as_bytes())?;
    emit(&dir.join("diff.html"), diff.html().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_and_ratios() {
        let d = Delta::new(10, 15);
        assert_eq!((d.delta, d.ratio), (5, Some(1.5)));
        assert_eq!(Delta::new(0, 0).ratio, Some(1.0));
        assert_eq!(Delta::new(0, 3).ratio, None);
        assert_eq!(Delta::new(4, 0).delta, -4);
        assert_eq!(Delta::new(4, 0).ratio, Some(0.0));
        assert_eq!(
            Delta::new(132, 140).arrow(Unit::Count),
            "132 \u{2192} 140 (+6.1%)"
        );
        assert_eq!(Delta::new(7, 7).arrow(Unit::Count), "7 (=)");
    }

    #[test]
    fn differential_folding_keeps_both_counts() {
        let a = ["x;a 10", "x;b 10"];
        let b = ["x;a 30", "x;c 10"];
        assert_eq!(
            differential_folded(&a, &b, false).unwrap(),
            ["x;a 10 30", "x;b 10 0", "x;c 0 10"]
        );
        // Normalised: A (20) is scaled to B's total (40).
        assert_eq!(
            differential_folded(&a, &b, true).unwrap(),
            ["x;a 20 30", "x;b 20 0", "x;c 0 10"]
        );
    }

    #[test]
    fn refuses_counts_inferno_cannot_draw() {
        let draw = |a: &[&str], b: &[&str]| {
            let lines = |v: &[&str]| v.iter().map(|&l| l.to_owned()).collect::<Vec<_>>();
            differential_graph(
                &lines(a),
                &lines(b),
                false,
                "On-CPU, window 1",
                "samples",
                Path::new("f"),
                Path::new("s"),
            )
        };
        let most = format!("x {MAX_DIFF_TOTAL}");
        assert!(draw(&["x 1", "y 1"], &[&most]).is_ok());
        let over = format!("x {}", MAX_DIFF_TOTAL + 1);
        let err = draw(&["x 1", "y 1"], &[&over]).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!(
                "On-CPU, window 1: A's stacks add up to 2 and B's to {},",
                MAX_DIFF_TOTAL + 1
            )),
            "{err}"
        );
        // Lines whose sum overflows are refused, not added.
        let max = format!("x {}", u64::MAX);
        assert!(draw(&[&max, "y 1"], &[]).is_err());
        // What inferno would skip is not counted.
        let g = draw(&["x 1.5", "y +3", "z", "w 2"], &["w 2"]).unwrap();
        assert_eq!((g.a_total, g.b_total, g.folded.as_str()), (2, 2, "w 2 2\n"));
    }

    #[test]
    fn a_window_empty_in_b_still_gets_its_graph() {
        use crate::profile::{FrameTable, OnCpu};
        let mut names = FrameTable::default();
        let stack = vec![names.intern("main"), names.intern("busy")];
        let a = Profile {
            windows: crate::windows::WindowSpec::Every { size: 2 }.windows(2),
            frames: names.into_names(),
            oncpu: vec![OnCpu {
                window: 1,
                tgid: 1,
                pid: 1,
                comm: "vmload".into(),
                stack,
                samples: 7,
            }],
            ..Profile::default()
        };
        let b = Profile {
            oncpu: Vec::new(),
            ..a.clone()
        };
        let dir = std::env::temp_dir().join(format!("hvprof-diff-empty-{}", std::process::id()));
        let (fa, fb) = (WindowMetrics::new(&a), WindowMetrics::new(&b));
        let mut result = compare(&fa, Path::new("a"), &fb, Path::new("b"), true);
        write_all(&mut result, &a, &b, &dir).unwrap();
        let svg = fs::read_to_string(dir.join("w01-vms-1-2/oncpu.diff.svg")).unwrap();
        assert!(svg.contains("nothing in B (A: 7 samples)"), "{svg}");
        assert_eq!(
            fs::read_to_string(dir.join("w01-vms-1-2/oncpu.diff.folded")).unwrap(),
            "vmload;main;busy 7 0\n"
        );
        let m = &result.windows[1].metrics[0];
        assert_eq!(
            (m.metric, m.delta.delta, m.delta.ratio),
            (Metric::Oncpu, -7, Some(0.0))
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn escapes_html() {
        assert_eq!(
            crate::html::escape("<script>alert(\"x\")</script>&'"),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(
            html::svg_height(r#"<?xml?><svg version="1.1" width="1200" height="342" x="1">"#),
            Some(342)
        );
    }
}
