//! `--fail-on`: the condition language, its parser and its evaluation on
//! one profile or on a pair.

use std::{collections::BTreeMap, fmt::Write as _, sync::LazyLock};

use serde::Serialize;
use thiserror::Error;

use super::{Metric, Unit, WindowMetrics};
use crate::tables::{self, AnyTable, Role, TABLES, md_escape};

/// The `--fail-on` language and the exit codes, for `--help` and errors:
/// the quantities from the metric and table definitions.
pub static GRAMMAR: LazyLock<String> = LazyLock::new(grammar);

fn grammar() -> String {
    let mut out = String::from(
        "\
--fail-on EXPR (repeatable): the command exits 3 when any EXPR holds.
  EXPR      [SCOPE]QUANTITY > BOUND          (or >=)
  SCOPE     (none)     the whole recording
            window:N.  window N only (window 0 is the setup before VM 1)
            metric:    each window on its own; holds if it holds in any window
                       (of an --attribute vm profile: each window of VMs; its
                       unattributed windows only when named, window:uN.)
",
    );
    for (i, m) in Metric::ALL.into_iter().enumerate() {
        let head = if i == 0 {
            "  QUANTITY  "
        } else {
            "            "
        };
        let _ = writeln!(out, "{head}{:<13} {}", m.name(), m.def().help);
    }
    out.push_str(
        "            offcpu:FUNCTION, oncpu:FUNCTION  the off-CPU time (on-CPU samples) of the stacks\n\
         \x20                         through FUNCTION, e.g. offcpu:virHookCall\n",
    );
    for t in TABLES {
        let Some(prefix) = t.gate_prefix() else {
            continue;
        };
        let (_, name, stats) = t.gate_words();
        let (what, any) = t.gate_help();
        let _ = writeln!(
            out,
            "            {prefix}.STAT, {prefix}:{name}.STAT  STAT: {stats}\n                          {name}: {what}; without {name}: {any}"
        );
    }
    out.push_str(
        "            regression    (diff only) every metric above; with no SCOPE, in every window
  BOUND     a count (100), a duration for times (50ms, 1s: the unit is required),
            or, in `hvprof diff` only, a percentage (10%): B above A by more than it.
            A percentage ignores values of B under the noise floor: 20 samples,
            10 ms, 10 counts, 1 D-Bus timeout. In diff, a count or duration is
            checked on B.
  examples  losses>0  lock.total>1s  lock:cgroup_mutex.max>50ms  dbus.timeouts>0
            window:3.oncpu>500  offcpu.total>2m  regression>10%  metric:lockwait>25%
exit codes: 0 every gate passed, 1 error (bad or mismatched input), 2 bad command
line (including a malformed EXPR), 3 a gate failed (each failed condition is
printed with the observed value and the bound).",
    );
    out
}

impl WindowMetrics<'_> {
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
            Quantity::Frame { metric, function } => {
                vec![(
                    format!("{} {function}", metric.name()),
                    through(self.profile, *metric, function, window),
                )]
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

/// `metric` (off-CPU time or on-CPU samples) of the stacks through a frame
/// named `function`, in `window` (`None`: every window); off-CPU blocks
/// still going at the stop are not counted, as in the metric.
fn through(
    profile: &crate::profile::Profile,
    metric: Metric,
    function: &str,
    window: Option<u32>,
) -> u64 {
    let frames: std::collections::HashSet<u32> = (0..)
        .zip(&profile.frames)
        .filter(|(_, name)| *name == function)
        .map(|(i, _)| i)
        .collect();
    let counted = |w: u32, stack: &[u32]| {
        window.is_none_or(|id| id == w) && stack.iter().any(|f| frames.contains(f))
    };
    match metric {
        Metric::Oncpu => profile
            .oncpu
            .iter()
            .filter(|r| counted(r.window, &r.stack))
            .map(|r| r.samples)
            .sum(),
        _ => profile
            .offcpu
            .iter()
            .filter(|r| !r.unfinished && counted(r.window, &r.stack))
            .map(|r| r.total_ns)
            .sum(),
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
    /// A metric (off-CPU time, on-CPU samples) of the stacks through a
    /// function (`offcpu:virHookCall`).
    Frame {
        metric: Metric,
        function: String,
    },
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
            Self::Metric(m) | Self::Frame { metric: m, .. } => m.unit(),
            Self::Row { stat, .. } => match stat {
                Role::Count | Role::Errors => Unit::Count,
                Role::Timeouts => Unit::Timeouts,
                _ => Unit::Ns,
            },
        }
    }

    fn stat_name(&self) -> &'static str {
        match self {
            Self::Metric(_) | Self::Frame { .. } => "",
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
#[error("--fail-on {text:?}: {why}\n\n{}", *GRAMMAR)]
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
            let (unattributed, number) = match n.trim().strip_prefix('u') {
                Some(rest) => (crate::windows::UNATTRIBUTED, rest),
                None => (0, n.trim()),
            };
            let n = number
                .parse::<u32>()
                .ok()
                .filter(|n| n & crate::windows::UNATTRIBUTED == 0)
                .map(|n| n | unattributed)
                .ok_or_else(|| bad(&format!("window:{n}: {n:?} is not a window number")))?;
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
            if metrics_only && !matches!(q, Quantity::Metric(_) | Quantity::Frame { .. }) {
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
            // An --attribute vm profile's unattributed windows hold the work
            // for no VM, which grows with the wall time (idle threads): each
            // is gated only when named.
            Scope::EachWindow => Ok(facts
                .windows
                .iter()
                .filter(|(w, _)| !w.unattributed)
                .map(|(w, _)| Some(w.id))
                .collect()),
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
                            .map(|(w, _)| format!("{} ({})", w.name(), w.label()))
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
    }

    /// How many times A's runs B's must be significantly above: 1 plus a
    /// percentage bound, 1 for a count or a duration.
    fn ratio(&self) -> f64 {
        match self.bound {
            Bound::Percent(p) => 1.0 + p / 100.0,
            Bound::Value(_) => 1.0,
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
    for (metric, stat) in [(Metric::Offcpu, "total"), (Metric::Oncpu, "samples")] {
        let Some(rest) = text
            .strip_prefix(metric.name())
            .and_then(|r| r.strip_prefix(':'))
        else {
            continue;
        };
        let function = rest.strip_suffix(&format!(".{stat}")).unwrap_or(rest);
        if function.is_empty() || function.contains(char::is_whitespace) {
            return Err(format!(
                "{}:FUNCTION: name one function, e.g. {}:virHookCall (the statistic is .{stat})",
                metric.name(),
                metric.name()
            ));
        }
        return Ok(Quantity::Frame {
            metric,
            function: function.to_owned(),
        });
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
    /// With several runs a side: each run's value (`a` and `value` are
    /// the medians) and how significant B's being larger is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs: Option<RunValues>,
}

/// The runs behind an [`Observation`] of a diff over several runs a side.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunValues {
    pub a: Vec<u64>,
    pub b: Vec<u64>,
    /// The one-sided p-value of "B is more than the bound above A" (Welch's
    /// t-test on the logarithms), Holm-adjusted over the gate's values: a
    /// regression is only one at or under [`super::stats::SIGNIFICANCE`].
    pub p_value: f64,
}

impl RunValues {
    /// `medians of 3 and 3 runs; A 1.0 s–1.2 s, B 1.5 s–1.9 s, p = 0.050`.
    fn text(&self, u: Unit) -> String {
        let spread = |v: &[u64]| match (v.iter().min(), v.iter().max()) {
            (Some(lo), Some(hi)) if lo == hi => u.format(*lo),
            (Some(lo), Some(hi)) => format!("{}\u{2013}{}", u.format(*lo), u.format(*hi)),
            _ => "-".to_owned(),
        };
        format!(
            "medians of {} and {} runs; A {}, B {}, p = {:.3}",
            self.a.len(),
            self.b.len(),
            spread(&self.a),
            spread(&self.b),
            self.p_value
        )
    }
}

impl Observation {
    fn text(&self) -> String {
        let text = self.value_text();
        match &self.runs {
            Some(r) => format!("{text} [{}]", r.text(self.unit)),
            None => text,
        }
    }

    fn value_text(&self) -> String {
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
        Some((w, _)) => format!("window {} ({})", w.name(), w.label()),
        None => "whole recording".to_owned(),
    }
}

fn quantity_label(q: &Quantity, key: &str) -> String {
    match q {
        Quantity::Metric(m) => m.name().to_owned(),
        Quantity::Frame { .. } => key.to_owned(),
        Quantity::Row { .. } => format!("{key} {}", q.stat_name()),
    }
}

/// Evaluates conditions on one profile (`hvprof report`).
pub fn evaluate(gates: &[Gate], facts: &WindowMetrics<'_>) -> Result<Vec<GateResult>, GateError> {
    let facts = std::slice::from_ref(facts);
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
    evaluate_runs(gates, std::slice::from_ref(a), std::slice::from_ref(b))
}

/// Evaluates conditions on several runs a side (`hvprof diff A… --vs
/// B…`; all with the same windows): each value is the median of its runs,
/// and with two runs or more on a side a value over its bound fails only
/// where B's runs are also significantly more than the bound above A's
/// (see [`super::stats`]: Welch's t-test on the logarithms, Holm-adjusted
/// over the gate's values, at [`super::stats::SIGNIFICANCE`]).
pub fn evaluate_runs(
    gates: &[Gate],
    a: &[WindowMetrics<'_>],
    b: &[WindowMetrics<'_>],
) -> Result<Vec<GateResult>, GateError> {
    gates.iter().map(|g| evaluate_one(g, Some(a), b)).collect()
}

/// Per key of quantity `q` in `window`, each run's value of A (`base`)
/// and of B (`runs`), 0 where a run has none.
fn per_run(
    base: &[WindowMetrics<'_>],
    runs: &[WindowMetrics<'_>],
    q: &Quantity,
    window: Option<u32>,
) -> BTreeMap<String, (Vec<u64>, Vec<u64>)> {
    let mut values: BTreeMap<String, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
    let fresh = || (vec![0; base.len()], vec![0; runs.len()]);
    for (i, run) in runs.iter().enumerate() {
        for (k, v) in run.items(q, window) {
            values.entry(k).or_insert_with(fresh).1[i] = v;
        }
    }
    for (i, run) in base.iter().enumerate() {
        for (k, v) in run.items(q, window) {
            values.entry(k).or_insert_with(fresh).0[i] = v;
        }
    }
    values
}

/// Sorts a gate's observations worst first: by change for percentages
/// (new beats any finite change), by value otherwise.
fn worst_first(gate: &Gate, observations: &mut [(bool, bool, Observation)]) {
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
}

/// Over several runs a side, a value over its bound holds only where it is
/// significant: its p-value adjusted (Holm) over every value the gate looked
/// at above the noise floor, one family per gate.
fn significant_only(observations: &mut [(bool, bool, Observation)]) {
    use super::stats::{SIGNIFICANCE, holm};
    let tested: Vec<usize> = (0..observations.len())
        .filter(|&i| !observations[i].1 && observations[i].2.runs.is_some())
        .collect();
    let raw: Vec<f64> = tested
        .iter()
        .filter_map(|&i| observations[i].2.runs.as_ref().map(|r| r.p_value))
        .collect();
    for (&i, p) in tested.iter().zip(holm(&raw)) {
        if let Some(r) = observations[i].2.runs.as_mut() {
            r.p_value = p;
        }
    }
    for (hit, _, o) in observations {
        *hit = *hit && o.runs.as_ref().is_none_or(|r| r.p_value <= SIGNIFICANCE);
    }
}

fn evaluate_one(
    gate: &Gate,
    base: Option<&[WindowMetrics<'_>]>,
    runs: &[WindowMetrics<'_>],
) -> Result<GateResult, GateError> {
    use super::stats::{median, p_above};
    let facts = &runs[0];
    let n_base = base.map_or(0, <[_]>::len);
    let several = runs.len() > 1 || n_base > 1;
    let mut observations = Vec::new();
    let mut below_floor = 0;
    let mut missing = Vec::new();
    for window in gate.places(facts)? {
        for q in gate.quantities() {
            let values = per_run(base.unwrap_or_default(), runs, &q, window);
            let fresh = || (vec![0; n_base], vec![0; runs.len()]);
            let mut joined: BTreeMap<String, (Option<u64>, u64)> = values
                .iter()
                .map(|(k, (a, b))| (k.clone(), (base.map(|_| median(a)), median(b))))
                .collect();
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
                let run_values = (several && base.is_some()).then(|| {
                    let (ra, rb) = values.get(&key).cloned().unwrap_or_else(fresh);
                    let p_value = p_above(&ra, &rb, gate.ratio());
                    RunValues {
                        a: ra,
                        b: rb,
                        p_value,
                    }
                });
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
                        runs: run_values,
                    },
                ));
            }
        }
    }
    significant_only(&mut observations);
    worst_first(gate, &mut observations);
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
