//! What a CI job consumes: `--fail-on` gates (a small expression language
//! evaluated on one profile, or on a pair in `hvprof diff`), the exit codes,
//! and the compact markdown job summary (`--markdown-summary`).
//!
//! Everything here works from [`Profile`]s alone.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde::Serialize;
use thiserror::Error;

use crate::{
    profile::Profile,
    record::Tracer,
    render::{self, WindowSummary},
    tables::{self, AnyTable, Role, TABLES, human_ns},
    windows::WindowInfo,
};

/// Exit status when every gate passed.
pub const EXIT_OK: u8 = 0;
/// Exit status when the command failed (unreadable profile, windows that do
/// not match, a gate naming a window the profile does not have).
pub const EXIT_ERROR: u8 = 1;
/// Exit status when at least one `--fail-on` condition held.
pub const EXIT_GATE_FAILED: u8 = 3;

/// The `--fail-on` language and the exit codes, for `--help` and errors.
pub const GRAMMAR: &str = "\
--fail-on EXPR (repeatable): the command exits 3 when any EXPR holds.
  EXPR      [SCOPE]QUANTITY > BOUND          (or >=)
  SCOPE     (none)     the whole recording
            window:N.  window N only (window 0 is the setup before VM 1)
            metric:    each window on its own; holds if it holds in any window
  QUANTITY  oncpu         on-CPU samples
            offcpu        off-CPU time (offcpu.total: the same)
            lockwait      kernel lock wait, all locks (lockwait.total)
            contentions   kernel lock contentions
            forks         fork/clone/thread creations
            cgroups       cgroup operations
            dbuswait      blocking D-Bus call time, all calls (dbuswait.total)
            dbuscalls     blocking D-Bus calls
            dbustimeouts  D-Bus calls that ran into their timeout
            losses        events lost, every kind
            lock.STAT, lock:NAME.STAT    STAT: total, max, count; NAME: the lock's
                          symbol or 0x address; without NAME: any single lock
            dbus.STAT, dbus:METHOD.STAT  STAT: total, max, calls, timeouts; METHOD:
                          interface.member or member; without METHOD: any single method
            regression    (diff only) every metric above; with no SCOPE, in every window
  BOUND     a count (100), a duration for times (50ms, 1s: the unit is required),
            or, in `hvprof diff` only, a percentage (10%): B above A by more than it.
            A percentage ignores values of B under the noise floor: 20 samples,
            10 ms, 10 counts, 1 D-Bus timeout. In diff, a count or duration is
            checked on B.
  examples  losses>0  lock.total>1s  lock:cgroup_mutex.max>50ms  dbus.timeouts>0
            window:3.oncpu>500  offcpu.total>2m  regression>10%  metric:lockwait>25%
exit codes: 0 every gate passed, 1 error (bad or mismatched input), 2 bad command
line (including a malformed EXPR), 3 a gate failed (each failed condition is
printed with the observed value and the bound).";

/// A per-window figure that a gate can name and a diff compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Oncpu,
    Offcpu,
    Lockwait,
    Contentions,
    Forks,
    Cgroups,
    Dbuswait,
    Dbuscalls,
    Dbustimeouts,
    Losses,
}

/// How a value reads and which noise floor it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Samples,
    Ns,
    Count,
    /// D-Bus timeouts: each one is a whole timeout (25 s by default).
    Timeouts,
}

impl Unit {
    /// Values of B under this are ignored by percentage gates.
    #[must_use]
    pub fn noise_floor(self) -> u64 {
        match self {
            Self::Samples => 20,
            Self::Ns => 10_000_000,
            Self::Count => 10,
            Self::Timeouts => 1,
        }
    }

    #[must_use]
    pub fn format(self, v: u64) -> String {
        match self {
            Self::Ns => human_ns(v),
            _ => v.to_string(),
        }
    }

    /// A signed difference, `+12.0 ms` / `-3`.
    #[must_use]
    pub fn format_delta(self, a: u64, b: u64) -> String {
        let (sign, d) = if b >= a { ('+', b - a) } else { ('-', a - b) };
        if d == 0 {
            return "0".to_owned();
        }
        format!("{sign}{}", self.format(d))
    }
}

impl Metric {
    pub const ALL: [Self; 10] = [
        Self::Oncpu,
        Self::Offcpu,
        Self::Lockwait,
        Self::Contentions,
        Self::Forks,
        Self::Cgroups,
        Self::Dbuswait,
        Self::Dbuscalls,
        Self::Dbustimeouts,
        Self::Losses,
    ];

    fn def(self) -> &'static MetricDef {
        &METRICS[self as usize]
    }

    #[must_use]
    pub fn name(self) -> &'static str {
        self.def().name
    }

    /// What it is, in the user's words.
    #[must_use]
    pub fn describe(self) -> &'static str {
        self.def().describe
    }

    #[must_use]
    pub fn unit(self) -> Unit {
        self.def().unit
    }

    /// The tracer that measures it (`None`: hvprof itself).
    #[must_use]
    pub fn tracer(self) -> Option<Tracer> {
        self.def().tracer
    }

    /// The HTML heatmap's name for its row, if it has one.
    #[must_use]
    pub fn heatmap(self) -> Option<&'static str> {
        self.def().heatmap
    }

    /// Its value in one window's summary.
    #[must_use]
    pub fn of(self, w: &WindowSummary) -> u64 {
        (self.def().of)(w)
    }

    fn parse(name: &str) -> Option<Self> {
        let (base, total) = match name.strip_suffix(".total") {
            Some(b) => (b, true),
            None => (name, false),
        };
        let m = Self::ALL.into_iter().find(|m| m.name() == base)?;
        (!total || m.unit() == Unit::Ns).then_some(m)
    }
}

/// One metric, defined once.
struct MetricDef {
    name: &'static str,
    describe: &'static str,
    unit: Unit,
    tracer: Option<Tracer>,
    heatmap: Option<&'static str>,
    of: fn(&WindowSummary) -> u64,
}

/// The metrics, in [`Metric::ALL`]'s order.
static METRICS: [MetricDef; Metric::ALL.len()] = [
    MetricDef {
        name: "oncpu",
        describe: "on-CPU samples",
        unit: Unit::Samples,
        tracer: Some(Tracer::OnCpu),
        heatmap: Some("on-CPU samples"),
        of: |w| w.oncpu_samples,
    },
    MetricDef {
        name: "offcpu",
        describe: "off-CPU time",
        unit: Unit::Ns,
        tracer: Some(Tracer::OffCpu),
        heatmap: Some("off-CPU time"),
        of: |w| w.offcpu_ns,
    },
    MetricDef {
        name: "lockwait",
        describe: "lock wait",
        unit: Unit::Ns,
        tracer: Some(Tracer::Locks),
        heatmap: Some("lock wait"),
        of: |w| w.lock_wait_ns,
    },
    MetricDef {
        name: "contentions",
        describe: "lock contentions",
        unit: Unit::Count,
        tracer: Some(Tracer::Locks),
        heatmap: None,
        of: |w| w.lock_contentions,
    },
    MetricDef {
        name: "forks",
        describe: "forks",
        unit: Unit::Count,
        tracer: Some(Tracer::Fork),
        heatmap: Some("forks"),
        of: |w| w.forks,
    },
    MetricDef {
        name: "cgroups",
        describe: "cgroup ops",
        unit: Unit::Count,
        tracer: Some(Tracer::Cgroup),
        heatmap: Some("cgroup ops"),
        of: |w| w.cgroup_ops,
    },
    MetricDef {
        name: "dbuswait",
        describe: "D-Bus wait",
        unit: Unit::Ns,
        tracer: Some(Tracer::Dbus),
        heatmap: Some("D-Bus time"),
        of: |w| w.dbus_ns,
    },
    MetricDef {
        name: "dbuscalls",
        describe: "D-Bus calls",
        unit: Unit::Count,
        tracer: Some(Tracer::Dbus),
        heatmap: None,
        of: |w| w.dbus_calls,
    },
    MetricDef {
        name: "dbustimeouts",
        describe: "D-Bus timeouts",
        unit: Unit::Timeouts,
        tracer: Some(Tracer::Dbus),
        heatmap: Some("D-Bus timeouts"),
        of: |w| w.dbus_timeouts,
    },
    MetricDef {
        name: "losses",
        describe: "losses",
        unit: Unit::Count,
        tracer: None,
        heatmap: Some("losses"),
        of: |w| w.losses.values().sum(),
    },
];

/// The metrics of one window or of the whole recording, indexed by
/// [`Metric`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricValues([u64; Metric::ALL.len()]);

impl MetricValues {
    #[must_use]
    pub fn get(&self, m: Metric) -> u64 {
        self.0[m as usize]
    }

    fn add(&mut self, m: Metric, v: u64) {
        self.0[m as usize] += v;
    }
}

impl Serialize for MetricValues {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(Metric::ALL.len()))?;
        for m in Metric::ALL {
            map.serialize_entry(m.name(), &self.get(m))?;
        }
        map.end()
    }
}

/// A profile with its per-window metrics computed once.
pub struct WindowMetrics<'a> {
    pub profile: &'a Profile,
    pub windows: Vec<(WindowInfo, MetricValues)>,
    pub whole: MetricValues,
}

impl<'a> WindowMetrics<'a> {
    #[must_use]
    pub fn new(profile: &'a Profile) -> Self {
        let summary = render::summary(profile);
        let mut whole = MetricValues::default();
        let windows = profile
            .windows
            .iter()
            .zip(&summary.windows)
            .map(|(info, w)| {
                let mut v = MetricValues::default();
                for m in Metric::ALL {
                    let x = m.of(w);
                    v.add(m, x);
                    if m != Metric::Losses {
                        whole.add(m, x);
                    }
                }
                (info.clone(), v)
            })
            .collect();
        // Losses of the whole recording include those outside every window.
        whole.add(Metric::Losses, summary.total_losses);
        Self {
            profile,
            windows,
            whole,
        }
    }

    fn window(&self, id: u32) -> Option<&(WindowInfo, MetricValues)> {
        self.windows.iter().find(|(w, _)| w.id == id)
    }

    /// The values of a quantity in one window (`None`: the whole recording),
    /// keyed by what they are of (a metric's name, a lock, a D-Bus method).
    /// A named lock or method that is not there gives nothing.
    fn items(&self, q: &Quantity, window: Option<u32>) -> Vec<(String, u64)> {
        match q {
            Quantity::Metric(m) => {
                let v = match window {
                    None => self.whole.get(*m),
                    Some(id) => self.window(id).map_or(0, |(_, v)| v.get(*m)),
                };
                vec![(m.name().to_owned(), v)]
            }
            Quantity::Row { table, name, stat } => named_or_each(
                table_of(table)
                    .observe(self.profile, window, *stat, name.as_deref())
                    .into_iter(),
                name.as_deref()
                    .map(|n| format!("{} {n}", table_of(table).gate_words().0)),
                *stat,
            ),
        }
    }
}

/// The table a parsed quantity names (the parser found it).
fn table_of(name: &str) -> &'static dyn AnyTable {
    tables::by_name(name).unwrap_or_else(|| panic!("no table {name}"))
}

/// Without a name: every row on its own. With one: the matching rows as
/// one (summed; the largest for `max`), or nothing when none match.
fn named_or_each(
    rows: impl Iterator<Item = (String, u64, bool)>,
    name: Option<String>,
    stat: Role,
) -> Vec<(String, u64)> {
    let Some(name) = name else {
        return rows.map(|(k, v, _)| (k, v)).collect();
    };
    let mut found = None;
    for (_, v, hit) in rows {
        if hit {
            let acc = found.get_or_insert(0);
            *acc = if stat == Role::Max {
                (*acc).max(v)
            } else {
                *acc + v
            };
        }
    }
    found.map(|v| vec![(name, v)]).unwrap_or_default()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Quantity {
    Metric(Metric),
    /// A statistic of a table's rows (`lock:NAME.max`); `name: None`: any
    /// single row.
    Row {
        /// The table's name.
        table: &'static str,
        name: Option<String>,
        /// Its column's role: count, total, max or timeouts.
        stat: Role,
    },
}

impl Quantity {
    #[must_use]
    pub fn unit(&self) -> Unit {
        match self {
            Self::Metric(m) => m.unit(),
            Self::Row { stat, .. } => match stat {
                Role::Count => Unit::Count,
                Role::Timeouts => Unit::Timeouts,
                _ => Unit::Ns,
            },
        }
    }

    fn stat_name(&self) -> &'static str {
        match self {
            Self::Metric(_) => "",
            Self::Row { table, stat, .. } => table_of(table).gate_stat_name(*stat),
        }
    }
}

/// Where a condition looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Whole,
    Window(u32),
    /// Every window on its own.
    EachWindow,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Quantity(Quantity),
    /// Every metric.
    Regression,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    /// A count, or nanoseconds.
    Value(u64),
    /// B above A by more than this many percent (diff only).
    Percent(f64),
}

/// Which command a condition is for: percentages need two profiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    Report,
    Diff,
}

/// One parsed `--fail-on` condition.
#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    /// As the user wrote it.
    pub text: String,
    pub scope: Scope,
    pub subject: Subject,
    /// `>=` rather than `>`.
    pub inclusive: bool,
    pub bound: Bound,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("--fail-on {text:?}: {why}\n\n{GRAMMAR}")]
pub struct GateParseError {
    pub text: String,
    pub why: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GateError {
    #[error(
        "--fail-on {condition:?}: the profile has no window {window} (its windows: {available}); name one of those"
    )]
    UnknownWindow {
        condition: String,
        window: u32,
        available: String,
    },
}

impl Gate {
    /// Parses a condition for `hvprof report` (`Context::Report`) or
    /// `hvprof diff`.
    pub fn parse(text: &str, ctx: Context) -> Result<Self, GateParseError> {
        let bad = |why: &str| GateParseError {
            text: text.to_owned(),
            why: why.to_owned(),
        };
        let t = text.trim();
        let Some(op) = t.find('>') else {
            return Err(bad(
                "there is no `>`: write QUANTITY>BOUND, e.g. losses>0 or lock.total>50ms",
            ));
        };
        let (lhs, rest) = (t[..op].trim(), &t[op + 1..]);
        let (inclusive, rhs) = match rest.strip_prefix('=') {
            Some(r) => (true, r.trim()),
            None => (false, rest.trim()),
        };
        if lhs.is_empty() {
            return Err(bad("nothing before `>`: name a quantity, e.g. losses>0"));
        }
        if rhs.is_empty() {
            return Err(bad("nothing after `>`: give a bound, e.g. losses>0"));
        }
        if rhs.contains(['>', '<', '=']) {
            return Err(bad(
                "one comparison per condition (repeat --fail-on for more)",
            ));
        }

        let (scope, subject_text, metrics_only) = if let Some(r) = lhs.strip_prefix("window:") {
            let (n, q) = r.split_once('.').ok_or_else(|| {
                bad("window:N must be followed by `.` and a quantity, e.g. window:3.oncpu>500")
            })?;
            let n = n
                .trim()
                .parse::<u32>()
                .map_err(|_| bad(&format!("window:{n}: {n:?} is not a window number")))?;
            (Scope::Window(n), q.trim(), false)
        } else if let Some(m) = lhs.strip_prefix("metric:") {
            (Scope::EachWindow, m.trim(), true)
        } else if lhs == "regression" {
            (Scope::EachWindow, lhs, false)
        } else {
            (Scope::Whole, lhs, false)
        };

        let subject = if subject_text == "regression" {
            if ctx == Context::Report {
                return Err(bad(
                    "`regression` compares two profiles: use it with `hvprof diff A B --fail-on …`",
                ));
            }
            Subject::Regression
        } else {
            let q = parse_quantity(subject_text).map_err(|why| bad(&why))?;
            if metrics_only && !matches!(q, Quantity::Metric(_)) {
                return Err(bad(
                    "metric: takes a metric (oncpu, offcpu, lockwait, …); for a lock or a D-Bus method write lock:NAME.STAT or dbus:METHOD.STAT",
                ));
            }
            Subject::Quantity(q)
        };

        let bound = if let Some(p) = rhs.strip_suffix('%') {
            if ctx == Context::Report {
                return Err(bad(
                    "a percentage compares two profiles: use it with `hvprof diff A B --fail-on …`, or give a count or a duration",
                ));
            }
            let p: f64 = p
                .trim()
                .parse()
                .ok()
                .filter(|p: &f64| p.is_finite() && *p >= 0.0)
                .ok_or_else(|| bad(&format!("{rhs:?} is not a percentage (e.g. 10%)")))?;
            Bound::Percent(p)
        } else {
            let Subject::Quantity(q) = &subject else {
                return Err(bad("regression takes a percentage, e.g. regression>10%"));
            };
            Bound::Value(parse_bound(rhs, q.unit()).map_err(|why| bad(&why))?)
        };
        Ok(Self {
            text: t.to_owned(),
            scope,
            subject,
            inclusive,
            bound,
        })
    }

    fn quantities(&self) -> Vec<Quantity> {
        match &self.subject {
            Subject::Quantity(q) => vec![q.clone()],
            Subject::Regression => Metric::ALL.into_iter().map(Quantity::Metric).collect(),
        }
    }

    fn places(&self, facts: &WindowMetrics<'_>) -> Result<Vec<Option<u32>>, GateError> {
        match self.scope {
            Scope::Whole => Ok(vec![None]),
            Scope::EachWindow => Ok(facts.windows.iter().map(|(w, _)| Some(w.id)).collect()),
            Scope::Window(n) => {
                if facts.window(n).is_some() {
                    Ok(vec![Some(n)])
                } else {
                    Err(GateError::UnknownWindow {
                        condition: self.text.clone(),
                        window: n,
                        available: facts
                            .windows
                            .iter()
                            .map(|(w, _)| format!("{} ({})", w.id, w.label()))
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
    }

    /// Whether the condition holds for a value (of B, with A's in diff),
    /// B's change against A, and whether B is under the noise floor (only
    /// percentages have one).
    fn holds(&self, a: Option<u64>, value: u64, unit: Unit) -> (bool, Option<f64>, bool) {
        #[expect(clippy::cast_precision_loss, reason = "a percentage")]
        let change = a.map(|a| {
            if a == 0 {
                if value == 0 { 0.0 } else { f64::INFINITY }
            } else {
                (value as f64 - a as f64) / a as f64 * 100.0
            }
        });
        let shown = change.filter(|c| c.is_finite());
        let over = |x: f64, bound: f64| {
            if self.inclusive {
                x >= bound
            } else {
                x > bound
            }
        };
        match self.bound {
            Bound::Value(bound) => {
                let hit = if self.inclusive {
                    value >= bound
                } else {
                    value > bound
                };
                (hit, shown, false)
            }
            Bound::Percent(p) => {
                let below_floor = value < unit.noise_floor();
                let hit = !below_floor && over(change.unwrap_or(0.0), p);
                (hit, shown, below_floor)
            }
        }
    }
}

fn parse_quantity(text: &str) -> Result<Quantity, String> {
    if let Some(m) = Metric::parse(text) {
        return Ok(Quantity::Metric(m));
    }
    let family = |prefix: &str| -> Option<(Option<String>, Option<&str>)> {
        let rest = text.strip_prefix(prefix)?;
        if rest.is_empty() {
            return Some((None, None));
        }
        if let Some(stat) = rest.strip_prefix('.') {
            return Some((None, Some(stat)));
        }
        let named = rest.strip_prefix(':')?;
        match named.rsplit_once('.') {
            Some((n, stat)) if !n.is_empty() => Some((Some(n.to_owned()), Some(stat))),
            _ => Some((Some(named.to_owned()), None)),
        }
    };
    for t in TABLES {
        let Some(prefix) = t.gate_prefix() else {
            continue;
        };
        let Some((name, stat)) = family(prefix) else {
            continue;
        };
        let (noun, placeholder, stats) = t.gate_words();
        let stat = match stat {
            None if name.is_none() => Role::Total,
            None => {
                let dotted = stats.replace(", ", ", .").replacen(" or ", " or .", 1);
                return Err(format!("say which statistic: {text}.{dotted}"));
            }
            Some(s) => t.gate_stat(s).ok_or_else(|| {
                format!(
                    "{s:?} is not a {noun} statistic: use {stats} (e.g. {prefix}:{placeholder}.total)"
                )
            })?,
        };
        return Ok(Quantity::Row {
            table: t.name(),
            name,
            stat,
        });
    }
    let families: Vec<String> = TABLES
        .into_iter()
        .filter_map(|t| {
            let prefix = t.gate_prefix()?;
            Some(format!("{prefix}[:{}].STAT", t.gate_words().1))
        })
        .collect();
    Err(format!(
        "{text:?} is not a quantity: use one of {}, {}",
        Metric::ALL.map(Metric::name).join(", "),
        families.join(", ")
    ))
}

fn parse_bound(text: &str, unit: Unit) -> Result<u64, String> {
    if unit == Unit::Ns {
        if text.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(format!(
                "{text:?}: a time needs a unit (e.g. {text}ms or {text}s)"
            ));
        }
        let d = crate::cli::parse_duration(text)?;
        Ok(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    } else {
        text.parse::<u64>().map_err(|_| {
            format!("{text:?} is not a count (a whole number; this quantity is not a time)")
        })
    }
}

/// A clap value parser for `hvprof report --fail-on`.
pub fn parse_report_gate(text: &str) -> Result<Gate, String> {
    Gate::parse(text, Context::Report).map_err(|e| e.to_string())
}

/// A clap value parser for `hvprof diff --fail-on`.
pub fn parse_diff_gate(text: &str) -> Result<Gate, String> {
    Gate::parse(text, Context::Diff).map_err(|e| e.to_string())
}

/// One value a condition looked at.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Observation {
    /// `None`: the whole recording.
    pub window: Option<u32>,
    /// `window 3 (VMs 9–12)` or `whole recording`.
    pub place: String,
    /// `lockwait`, `lock 0xffff… rwsem:R total`, …
    pub quantity: String,
    pub unit: Unit,
    /// A's value (diff only).
    pub a: Option<u64>,
    /// The value checked: the profile's, or B's.
    pub value: u64,
    /// B against A in percent; `None` when A is 0 (and B is not: new).
    pub change_pct: Option<f64>,
}

impl Observation {
    fn text(&self) -> String {
        let u = self.unit;
        match self.a {
            Some(a) => {
                let change = match self.change_pct {
                    Some(c) => format!("{c:+.1}%"),
                    None if self.value > 0 => "new".to_owned(),
                    None => "0%".to_owned(),
                };
                format!(
                    "{}: {} {} \u{2192} {} ({change})",
                    self.place,
                    self.quantity,
                    u.format(a),
                    u.format(self.value)
                )
            }
            None => format!("{}: {} {}", self.place, self.quantity, u.format(self.value)),
        }
    }
}

/// What a condition found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GateResult {
    pub condition: String,
    pub passed: bool,
    /// The bound, as people read it (`10%`, `50.00 ms`, `0`).
    pub bound: String,
    /// Values compared.
    pub checked: usize,
    /// Values of B under the noise floor, not compared (percentages only).
    pub below_noise_floor: usize,
    /// Every value over the bound, the worst first.
    pub violations: Vec<Observation>,
    /// The value closest to (or furthest over) the bound.
    pub worst: Option<Observation>,
    /// E.g. that a named lock is not in the profile.
    pub note: Option<String>,
}

impl GateResult {
    /// One line, or a few for a failure with several values over the bound.
    #[must_use]
    pub fn text(&self) -> String {
        let mut out = format!(
            "{} {}",
            if self.passed { "PASS" } else { "FAIL" },
            self.condition
        );
        let floor = if self.below_noise_floor > 0 {
            format!(
                " [{} under the noise floor, ignored]",
                self.below_noise_floor
            )
        } else {
            String::new()
        };
        if self.passed {
            match &self.worst {
                Some(w) => {
                    let _ = write!(out, ": largest {} (bound {}){floor}", w.text(), self.bound);
                }
                None => {
                    let _ = write!(out, ": nothing to compare (bound {}){floor}", self.bound);
                }
            }
        } else {
            let _ = write!(
                out,
                ": {} of {} values over the bound {}{floor}",
                self.violations.len(),
                self.checked,
                self.bound
            );
            for v in self.violations.iter().take(10) {
                let _ = write!(out, "\n    {}", v.text());
            }
            if self.violations.len() > 10 {
                let _ = write!(out, "\n    … {} more", self.violations.len() - 10);
            }
        }
        if let Some(n) = &self.note {
            let _ = write!(out, "\n    note: {n}");
        }
        out
    }
}

fn place_of(facts: &WindowMetrics<'_>, window: Option<u32>) -> String {
    match window.and_then(|id| facts.window(id)) {
        Some((w, _)) => format!("window {} ({})", w.id, w.label()),
        None => "whole recording".to_owned(),
    }
}

fn quantity_label(q: &Quantity, key: &str) -> String {
    match q {
        Quantity::Metric(m) => m.name().to_owned(),
        Quantity::Row { .. } => format!("{key} {}", q.stat_name()),
    }
}

/// Evaluates conditions on one profile (`hvprof report`).
pub fn evaluate(gates: &[Gate], facts: &WindowMetrics<'_>) -> Result<Vec<GateResult>, GateError> {
    gates.iter().map(|g| evaluate_one(g, None, facts)).collect()
}

/// Evaluates conditions on a pair (`hvprof diff`): percentages compare B
/// with A, counts and durations are checked on B. Both must have the same
/// windows (ids and VM ranges).
pub fn evaluate_diff(
    gates: &[Gate],
    a: &WindowMetrics<'_>,
    b: &WindowMetrics<'_>,
) -> Result<Vec<GateResult>, GateError> {
    gates.iter().map(|g| evaluate_one(g, Some(a), b)).collect()
}

fn evaluate_one(
    gate: &Gate,
    base: Option<&WindowMetrics<'_>>,
    facts: &WindowMetrics<'_>,
) -> Result<GateResult, GateError> {
    let mut observations = Vec::new();
    let mut below_floor = 0;
    let mut missing = Vec::new();
    for window in gate.places(facts)? {
        for q in gate.quantities() {
            let mut joined: BTreeMap<String, (Option<u64>, u64)> = BTreeMap::new();
            for (k, v) in facts.items(&q, window) {
                joined.entry(k).or_insert((None, 0)).1 = v;
            }
            if let Some(base) = base {
                for (k, v) in base.items(&q, window) {
                    joined.entry(k).or_insert((None, 0)).0 = Some(v);
                }
                for e in joined.values_mut() {
                    e.0.get_or_insert(0);
                }
            }
            if joined.is_empty() {
                // A named lock or method that is in neither profile: say so,
                // and compare 0 (a typo must not pass silently).
                let key = match &q {
                    Quantity::Row {
                        table,
                        name: Some(n),
                        ..
                    } => format!("{} {n}", table_of(table).gate_words().0),
                    _ => String::new(),
                };
                if !key.is_empty() {
                    missing.push(key.clone());
                }
                joined.insert(key, (base.map(|_| 0), 0));
            }
            for (key, (a, value)) in joined {
                let (hit, change_pct, under) = gate.holds(a, value, q.unit());
                if under {
                    below_floor += 1;
                }
                observations.push((
                    hit,
                    under,
                    Observation {
                        window,
                        place: place_of(facts, window),
                        quantity: quantity_label(&q, &key),
                        unit: q.unit(),
                        a,
                        value,
                        change_pct,
                    },
                ));
            }
        }
    }
    // Worst first: by change for percentages (new beats any finite change),
    // by value otherwise.
    let severity = |o: &Observation| match gate.bound {
        Bound::Percent(_) => match (o.change_pct, o.value) {
            (None, v) if v > 0 => f64::INFINITY,
            (None, _) => 0.0,
            (Some(c), _) => c,
        },
        #[expect(clippy::cast_precision_loss, reason = "ordering only")]
        Bound::Value(_) => o.value as f64,
    };
    observations.sort_by(|x, y| {
        severity(&y.2)
            .partial_cmp(&severity(&x.2))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let checked = observations.len();
    let worst = observations
        .iter()
        .find(|(_, under, _)| !under)
        .map(|(_, _, o)| o.clone());
    let violations: Vec<Observation> = observations
        .into_iter()
        .filter(|(hit, _, _)| *hit)
        .map(|(_, _, o)| o)
        .collect();
    missing.sort();
    missing.dedup();
    let bound = match (gate.bound, &gate.subject) {
        (Bound::Percent(p), _) => format!("{p}%"),
        (Bound::Value(v), Subject::Quantity(q)) => q.unit().format(v),
        (Bound::Value(v), Subject::Regression) => v.to_string(),
    };
    Ok(GateResult {
        condition: gate.text.clone(),
        passed: violations.is_empty(),
        bound,
        checked,
        below_noise_floor: below_floor,
        violations,
        worst,
        note: (!missing.is_empty()).then(|| {
            format!(
                "{} not in the profile{} (taken as 0); check the name against the tables",
                missing.join(", "),
                if base.is_some() { "s" } else { "" }
            )
        }),
    })
}

/// `gates:` and one block per condition.
#[must_use]
pub fn gates_text(results: &[GateResult]) -> String {
    if results.is_empty() {
        return String::new();
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    let mut out = format!("gates: {} of {} failed\n", failed, results.len());
    for r in results {
        for line in r.text().lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub use crate::tables::{md_escape, md_table};

/// The gates as markdown lines.
#[must_use]
pub fn gates_markdown(results: &[GateResult]) -> String {
    if results.is_empty() {
        return String::new();
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    let mut out = format!(
        "**Gates:** {}\n\n",
        if failed == 0 {
            format!("all {} passed", results.len())
        } else {
            format!("{failed} of {} failed", results.len())
        }
    );
    for r in results {
        let first = if r.passed {
            r.worst.as_ref().map_or_else(String::new, Observation::text)
        } else {
            r.violations
                .first()
                .map(Observation::text)
                .unwrap_or_default()
        };
        let _ = write!(
            out,
            "- {} {} (bound {})",
            if r.passed {
                "\u{2705} pass"
            } else {
                "\u{274c} **FAIL**"
            },
            md_escape(&r.condition),
            md_escape(&r.bound)
        );
        if !first.is_empty() {
            let _ = write!(out, ": {}", md_escape(&first));
        }
        if r.violations.len() > 1 {
            let _ = write!(out, " and {} more", r.violations.len() - 1);
        }
        out.push('\n');
    }
    out
}

/// The per-window metric columns of the markdown summaries.
pub const SUMMARY_METRICS: [Metric; 8] = [
    Metric::Oncpu,
    Metric::Offcpu,
    Metric::Lockwait,
    Metric::Forks,
    Metric::Cgroups,
    Metric::Dbuswait,
    Metric::Dbustimeouts,
    Metric::Losses,
];

/// One line about a profile: `14 VMs, 4.27 s, kernel …, windows every 4 VMs, losses: none`.
#[must_use]
pub fn profile_line(facts: &WindowMetrics<'_>) -> String {
    let p = facts.profile;
    let losses = facts.whole.get(Metric::Losses);
    format!(
        "{} ({}), kernel {}, {} VMs in {}, windows {}, losses: {}",
        p.meta.target,
        p.meta.hostname,
        p.meta.kernel,
        p.vms.len(),
        human_ns(p.meta.duration_ns),
        p.meta
            .window_spec
            .as_ref()
            .map_or_else(|| "?".to_owned(), ToString::to_string),
        if losses == 0 {
            "none".to_owned()
        } else {
            losses.to_string()
        }
    )
}

/// The compact markdown summary of one profile, for a CI job summary
/// (`hvprof report --markdown-summary`).
#[must_use]
pub fn report_markdown(facts: &WindowMetrics<'_>, source: &Path, gates: &[GateResult]) -> String {
    let p = facts.profile;
    let mut out = format!(
        "### hvprof report: {}\n\n{}\n\n",
        md_escape(&source.display().to_string()),
        md_escape(&profile_line(facts))
    );
    let mut headers = vec!["window", "VMs"];
    headers.extend(SUMMARY_METRICS.map(Metric::describe));
    let rows: Vec<Vec<String>> = facts
        .windows
        .iter()
        .map(|(w, v)| {
            let mut r = vec![w.id.to_string(), w.label()];
            r.extend(SUMMARY_METRICS.map(|m| m.unit().format(v.get(m))));
            r
        })
        .collect();
    out.push_str(&md_table(&headers, &rows));
    for (heading, top) in TABLES.into_iter().filter_map(|t| t.top(p, 5)) {
        let _ = write!(out, "\n{heading}\n\n{}", top.markdown());
    }
    if !gates.is_empty() {
        out.push('\n');
        out.push_str(&gates_markdown(gates));
    }
    out
}

#[derive(Debug, Error)]
pub enum CiError {
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error("cannot write the markdown summary {path}: {source}")]
    Summary {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// `hvprof report --fail-on … --markdown-summary …`: evaluates the gates
/// on the profile read from `source` and appends the summary.
pub fn check_report(
    profile: &Profile,
    source: &Path,
    gates: &[Gate],
    markdown_summary: Option<&Path>,
) -> Result<Vec<GateResult>, CiError> {
    let facts = WindowMetrics::new(profile);
    let results = evaluate(gates, &facts)?;
    if let Some(path) = markdown_summary {
        append_markdown(path, &report_markdown(&facts, source, &results)).map_err(|source| {
            CiError::Summary {
                path: path.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(results)
}

/// Appends to a markdown summary file (created if missing), as a CI job
/// summary such as `$GITHUB_STEP_SUMMARY` expects.
pub fn append_markdown(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        f.write_all(b"\n")?;
    }
    f.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        profile::{CgroupOp, DbusCall, ForkCall, FrameTable, LockWait, LossCount, OffCpu, OnCpu},
        windows::WindowSpec,
    };

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    /// A profile whose every figure is known: two VM windows and the setup.
    fn known() -> Profile {
        let mut t = FrameTable::default();
        let stack = vec![t.intern("main"), t.intern("work")];
        let on = |window, samples| OnCpu {
            window,
            tgid: 1,
            pid: 1,
            comm: "libvirtd".into(),
            stack: stack.clone(),
            samples,
        };
        let off = |window, total_ns| OffCpu {
            window,
            tgid: 1,
            pid: 1,
            comm: "libvirtd".into(),
            state: "S".into(),
            stack: stack.clone(),
            blocks: 1,
            total_ns,
            max_ns: total_ns,
            runq_ns: 0,
            dbus: None,
        };
        let fork = |window, count| ForkCall {
            window,
            tgid: 1,
            comm: "libvirtd".into(),
            syscall: "clone".into(),
            thread: false,
            stack: stack.clone(),
            caller: Some("virFork".into()),
            count,
            total_ns: count * MS,
            max_ns: MS,
        };
        Profile {
            windows: WindowSpec::Every { size: 2 }.windows(4),
            frames: t.into_names(),
            oncpu: vec![on(1, 30), on(2, 20), on(2, 30)],
            offcpu: vec![off(1, 2 * S), off(2, 3 * S)],
            locks: known_locks(&stack),
            forks: vec![fork(1, 3), fork(2, 4)],
            cgroups: vec![CgroupOp {
                window: 2,
                tgid: 1,
                comm: "libvirtd".into(),
                op: "mkdir".into(),
                hierarchy: "v2".into(),
                path: "/machine/qemu-1-a.libvirt-qemu".into(),
                count: 14,
                timed: 14,
                total_ns: 14 * MS,
                max_ns: MS,
            }],
            dbus: vec![known_dbus_call(stack)],
            losses: vec![
                LossCount {
                    window: Some(2),
                    kind: "stack-map collision".into(),
                    count: 7,
                },
                LossCount {
                    window: None,
                    kind: "ring buffer".into(),
                    count: 2,
                },
            ],
            ..Profile::default()
        }
    }

    /// The known profile's lock waits: `cgroup_mutex` in both VM windows,
    /// an unnamed rwsem in the second.
    fn known_locks(stack: &[u32]) -> Vec<LockWait> {
        let lock = |window, lock, name: Option<&str>, ty: &str, count, total_ns, max_ns| LockWait {
            window,
            tgid: 1,
            comm: "libvirtd".into(),
            lock,
            lock_name: name.map(str::to_owned),
            lock_type: ty.into(),
            stack: stack.to_vec(),
            count,
            total_ns,
            max_ns,
            hist: vec![count],
        };
        vec![
            lock(
                1,
                0x1000,
                Some("cgroup_mutex"),
                "mutex",
                4,
                40 * MS,
                20 * MS,
            ),
            lock(
                2,
                0x1000,
                Some("cgroup_mutex"),
                "mutex",
                6,
                60 * MS,
                30 * MS,
            ),
            lock(2, 0x2000, None, "rwsem:W", 1, 5 * MS, 5 * MS),
        ]
    }

    /// The known profile's D-Bus calls: two `CreateMachine`, one of them a
    /// timeout.
    fn known_dbus_call(stack: Vec<u32>) -> DbusCall {
        DbusCall {
            window: 2,
            tgid: 1,
            comm: "libvirtd".into(),
            library: "gio".into(),
            function: "g_dbus_connection_call_sync".into(),
            destination: Some("org.freedesktop.machine1".into()),
            path: None,
            interface: Some("org.freedesktop.machine1.Manager".into()),
            member: Some("CreateMachine".into()),
            timeout_ms: Some(-1),
            stack,
            calls: 2,
            timeouts: 1,
            total_ns: 25 * S + 500 * MS,
            max_ns: 25 * S,
            hist: vec![2],
        }
    }

    fn report(p: &Profile, expr: &str) -> GateResult {
        let g = Gate::parse(expr, Context::Report).unwrap();
        evaluate(&[g], &WindowMetrics::new(p)).unwrap().remove(0)
    }

    fn diff(a: &Profile, b: &Profile, expr: &str) -> GateResult {
        let g = Gate::parse(expr, Context::Diff).unwrap();
        evaluate_diff(&[g], &WindowMetrics::new(a), &WindowMetrics::new(b))
            .unwrap()
            .remove(0)
    }

    /// `expr` holds at `fails` and not at `passes`, and sees `value`.
    fn bounds(p: &Profile, fails: &str, passes: &str, value: u64) {
        let f = report(p, fails);
        assert!(!f.passed, "{fails} should fail: {}", f.text());
        assert_eq!(f.violations[0].value, value, "{fails}");
        let ok = report(p, passes);
        assert!(ok.passed, "{passes} should pass: {}", ok.text());
        assert_eq!(ok.worst.as_ref().unwrap().value, value, "{passes}");
    }

    #[test]
    fn whole_recording_metrics() {
        let p = known();
        let f = WindowMetrics::new(&p);
        let expect = [
            (Metric::Oncpu, 80),
            (Metric::Offcpu, 5 * S),
            (Metric::Lockwait, 105 * MS),
            (Metric::Contentions, 11),
            (Metric::Forks, 7),
            (Metric::Cgroups, 14),
            (Metric::Dbuswait, 25 * S + 500 * MS),
            (Metric::Dbuscalls, 2),
            (Metric::Dbustimeouts, 1),
            (Metric::Losses, 9),
        ];
        for (m, v) in expect {
            assert_eq!(f.whole.get(m), v, "{}", m.name());
        }
        assert_eq!(f.windows[2].1.get(Metric::Losses), 7);
        assert_eq!(f.windows[2].1.get(Metric::Oncpu), 50);
    }

    #[test]
    fn every_form_evaluates_on_a_known_profile() {
        let p = known();
        bounds(&p, "losses>8", "losses>9", 9);
        assert!(!report(&p, "losses>=9").passed);
        bounds(&p, "window:2.losses>6", "window:2.losses>7", 7);
        assert!(report(&p, "window:1.losses>0").passed);
        bounds(&p, "oncpu>79", "oncpu > 80", 80);
        bounds(&p, "offcpu.total>4999ms", "offcpu>5s", 5 * S);
        bounds(&p, "lockwait>104ms", "lockwait.total>105ms", 105 * MS);
        bounds(&p, "contentions>10", "contentions>11", 11);
        bounds(&p, "forks>6", "forks>7", 7);
        bounds(&p, "cgroups>13", "cgroups>14", 14);
        bounds(&p, "dbuswait>25s", "dbuswait>25.5s", 25 * S + 500 * MS);
        bounds(&p, "dbuscalls>1", "dbuscalls>2", 2);
        bounds(&p, "dbustimeouts>0", "dbustimeouts>1", 1);
        // Any single lock: cgroup_mutex, 40 + 60 ms over the recording.
        bounds(&p, "lock.total>99ms", "lock.total>100ms", 100 * MS);
        bounds(
            &p,
            "lock:cgroup_mutex.max>29ms",
            "lock:cgroup_mutex.max>30ms",
            30 * MS,
        );
        bounds(
            &p,
            "lock:cgroup_mutex.count>9",
            "lock:cgroup_mutex.count>10",
            10,
        );
        // An unnamed lock by address, any case.
        bounds(&p, "lock:0x2000.total>4ms", "lock:0X2000.total>5ms", 5 * MS);
        bounds(
            &p,
            "window:1.lock.total>39ms",
            "window:1.lock.total>40ms",
            40 * MS,
        );
        // D-Bus, by full method or member.
        bounds(&p, "dbus.timeouts>0", "dbus.timeouts>1", 1);
        bounds(
            &p,
            "dbus:CreateMachine.total>25s",
            "dbus:CreateMachine.total>26s",
            25 * S + 500 * MS,
        );
        bounds(
            &p,
            "dbus:org.freedesktop.machine1.Manager.CreateMachine.calls>1",
            "dbus:org.freedesktop.machine1.Manager.CreateMachine.calls>2",
            2,
        );
        bounds(&p, "dbus.max>24s", "dbus.max>25s", 25 * S);
        bounds(&p, "window:2.oncpu>49", "window:2.oncpu>50", 50);
        // Each window on its own: only window 2 is over 40 samples.
        let r = report(&p, "metric:oncpu>40");
        assert!(!r.passed);
        assert_eq!(r.violations.len(), 1);
        assert_eq!(r.violations[0].window, Some(2));
        assert_eq!(r.checked, 3);
        assert!(
            r.text().contains("window 2 (VMs 3\u{2013}4): oncpu 50"),
            "{}",
            r.text()
        );
        // A name that is not there is 0, and said.
        let r = report(&p, "lock:no_such_lock.total>0ms");
        assert!(r.passed);
        assert!(
            r.note
                .as_deref()
                .unwrap()
                .contains("lock no_such_lock not in the profile")
        );
        // A window the profile does not have is an error naming its windows.
        let g = Gate::parse("window:9.oncpu>1", Context::Report).unwrap();
        let e = evaluate(&[g], &WindowMetrics::new(&p))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no window 9") && e.contains("2 (VMs 3\u{2013}4)"),
            "{e}"
        );
    }

    #[test]
    fn percentages_compare_b_with_a_above_the_noise_floor() {
        let base = known();
        let mut new = known();
        // Window 2: on-CPU 50 → 60 samples (+20 %). Window 1: forks 3 → 6
        // (+100 %), under the noise floor of 10.
        new.oncpu[1].samples += 10;
        new.forks[0].count = 6;
        let res = diff(&base, &new, "regression>19%");
        assert!(!res.passed);
        assert_eq!(res.violations.len(), 1, "{}", res.text());
        let hit = &res.violations[0];
        assert_eq!(
            (hit.window, hit.quantity.as_str(), hit.a, hit.value),
            (Some(2), "oncpu", Some(50), 60)
        );
        assert!((hit.change_pct.unwrap() - 20.0).abs() < 1e-9);
        assert!(res.below_noise_floor > 0);
        assert!(
            res.text().contains("oncpu 50 \u{2192} 60 (+20.0%)"),
            "{}",
            res.text()
        );
        assert!(diff(&base, &new, "regression>20%").passed);
        assert!(!diff(&base, &new, "regression>=20%").passed);
        assert!(!diff(&base, &new, "metric:oncpu>10%").passed);
        assert!(
            diff(&base, &new, "metric:forks>10%").passed,
            "under the floor"
        );
        assert!(diff(&base, &new, "window:1.regression>0%").passed);
        assert!(!diff(&base, &new, "oncpu>12%").passed, "whole: 80 → 90");
        assert!(diff(&base, &new, "oncpu>13%").passed);
        assert!(diff(&base, &new, "lock:cgroup_mutex.total>0%").passed);
        // Counts and durations are checked on B.
        assert!(!diff(&base, &new, "forks>9").passed);
        assert!(diff(&base, &new, "forks>10").passed);
        // Against itself nothing changed.
        assert!(diff(&base, &base, "regression>0%").passed);
        // Something new in B (A had 0) is an infinite change.
        let mut changed = known();
        changed.locks[2].total_ns = 50 * MS;
        changed.locks[2].lock = 0x3000;
        let res = diff(&base, &changed, "lock.total>1000%");
        assert!(!res.passed);
        assert_eq!(res.violations[0].quantity, "lock 0x3000 rwsem:W total");
        assert!(res.text().contains("(new)"), "{}", res.text());
    }

    #[test]
    fn malformed_conditions_say_why_with_the_grammar() {
        let cases: &[(&str, Context, &str)] = &[
            ("", Context::Report, "no `>`"),
            ("losses", Context::Report, "no `>`"),
            ("losses>", Context::Report, "nothing after"),
            (">5", Context::Report, "nothing before"),
            ("losses>abc", Context::Report, "not a count"),
            ("offcpu>5", Context::Report, "needs a unit"),
            ("oncpu>5ms", Context::Report, "not a count"),
            ("lock.total>1fortnight", Context::Report, "unknown unit"),
            ("regression>10", Context::Diff, "takes a percentage"),
            ("losses>10%", Context::Report, "use it with `hvprof diff"),
            ("regression>10%", Context::Report, "compares two profiles"),
            ("lock:foo>1ms", Context::Report, "say which statistic"),
            ("lock.bogus>1", Context::Report, "not a lock statistic"),
            ("dbus.count2>1", Context::Report, "not a D-Bus statistic"),
            ("window:x.oncpu>1", Context::Report, "not a window number"),
            ("window:3>1", Context::Report, "followed by `.`"),
            (
                "metric:lock.total>1ms",
                Context::Report,
                "metric: takes a metric",
            ),
            ("bogus>1", Context::Report, "not a quantity"),
            ("forks.total>1s", Context::Report, "not a quantity"),
            ("oncpu>1>2", Context::Report, "one comparison"),
            ("regression>-5%", Context::Diff, "not a percentage"),
        ];
        for (expr, ctx, why) in cases {
            let e = Gate::parse(expr, *ctx).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(why), "{expr:?}: {msg}");
            assert!(
                msg.contains("EXPR      [SCOPE]QUANTITY > BOUND"),
                "{expr:?}: no grammar"
            );
        }
        // And the forms that parse.
        for expr in [
            "losses>0",
            "losses >= 100",
            "lock:cgroup_mutex.total>50ms",
            "lock.total>1s",
            "dbus:org.freedesktop.machine1.Manager.CreateMachine.total>1s",
            "dbus.timeouts>0",
            "offcpu.total>2m",
            "window:3.oncpu>500",
            "window:0.lock:0xffff8883edd50d38.count>3",
            "metric:lockwait>25ms",
        ] {
            Gate::parse(expr, Context::Report).unwrap();
        }
        for expr in [
            "regression>10%",
            "metric:oncpu>10%",
            "window:2.regression>5.5%",
        ] {
            Gate::parse(expr, Context::Diff).unwrap();
        }
        assert_eq!(
            Gate::parse("window:3.oncpu>=500", Context::Report).unwrap(),
            Gate {
                text: "window:3.oncpu>=500".into(),
                scope: Scope::Window(3),
                subject: Subject::Quantity(Quantity::Metric(Metric::Oncpu)),
                inclusive: true,
                bound: Bound::Value(500),
            }
        );
    }

    #[test]
    fn markdown_is_escaped() {
        assert_eq!(
            md_escape("<script>a|b</script>"),
            "&lt;script&gt;a\\|b&lt;/script&gt;"
        );
        assert_eq!(
            md_escape("__x__ *y* `z` [l](u)"),
            "\\_\\_x\\_\\_ \\*y\\* \\`z\\` \\[l\\](u)"
        );
        let mut p = known();
        p.locks[0].lock_name = Some("<img src=x onerror=alert(1)>".into());
        p.locks[1].lock_name = p.locks[0].lock_name.clone();
        let f = WindowMetrics::new(&p);
        let md = report_markdown(&f, Path::new("p.hvprof"), &[]);
        assert!(!md.contains("<img"), "{md}");
        assert!(md.contains("&lt;img src=x onerror=alert(1)&gt;"), "{md}");
        assert!(md.contains("| 2 | VMs 3\u{2013}4 | 50 |"), "{md}");
    }
}
