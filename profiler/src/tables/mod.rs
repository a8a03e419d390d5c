//! The per-window tables, each defined once ([`TableDef`]): its rows, its
//! columns and what each column is ([`Role`]). Every output is derived
//! from that definition: aligned text, markdown, CSV and JSON files, the
//! HTML report's sections, `record`'s closing tables, `diff`'s matched
//! rows and deltas, the gates' `FAMILY[:NAME].STAT` quantities and the CI
//! summary's top rows.

mod cgroups;
mod dbus;
mod forks;
mod libvirt;
mod locks;

use std::fmt::Write as _;

use serde::{Serialize, ser::SerializeMap as _};

pub use self::{
    cgroups::{CGROUPS, CgroupRow, cgroups, fold_cgroup_path},
    dbus::{DBUS, DbusRow, dbus},
    forks::{FORKS, ForkRow, ForkSummary, fork_summary, forks},
    libvirt::{JOBWAIT, LIBVIRT, LibvirtRow, QMP, QMP_EVENTS, libvirt_rows},
    locks::{LOCKS, LockRow, lock_caller, locks},
};
pub use crate::words::human_ns;
use crate::{profile::Profile, tracer::Tracer};

/// Every table, in the order reports show them.
pub static TABLES: [&dyn AnyTable; 8] = [
    &LOCKS,
    &FORKS,
    &CGROUPS,
    &DBUS,
    &LIBVIRT,
    &QMP,
    &QMP_EVENTS,
    &JOBWAIT,
];

/// The table with this name (`locks`, `forks`, `cgroups`, `dbus`).
#[must_use]
pub fn by_name(name: &str) -> Option<&'static dyn AnyTable> {
    TABLES.into_iter().find(|t| t.name() == name)
}

/// What a column holds: how each output shows it, and what `diff` and the
/// gates do with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Names the row: `diff` matches the rows of two profiles on these.
    Key,
    /// Says more about the row; not compared.
    Text,
    /// The row's events: `diff`'s count, a gate's `.count`.
    Count,
    /// The events' total time: `diff`'s time, a gate's `.total`.
    Total,
    /// The longest event: a gate's `.max`.
    Max,
    /// Events that ran into their timeout: `diff`'s timeouts, a gate's
    /// `.timeouts`.
    Timeouts,
    /// The 99th percentile of the events' times: a gate's `.p99`.
    P99,
    /// Events that failed: a gate's `.errors`.
    Errors,
    /// Another number or duration, shown only.
    Figure,
}

impl Role {
    fn numeric(self) -> bool {
        !matches!(self, Self::Key | Self::Text)
    }
}

/// One cell's value.
pub enum Cell {
    Text(String),
    Count(u64),
    /// Nanoseconds: for people in text, markdown and HTML; as they are in
    /// CSV.
    Ns(u64),
    /// The upper bound of a log2 histogram bucket, in ns (`<=4.1 us`).
    AtMost(u64),
    /// A duration that was not measured (`-`; 0 in CSV).
    Untimed,
}

impl Cell {
    fn show(&self, human: bool) -> String {
        match *self {
            Self::Text(ref s) => s.clone(),
            Self::Count(n) => n.to_string(),
            Self::Ns(ns) if human => human_ns(ns),
            Self::AtMost(ns) if human => format!("<={}", human_ns(ns)),
            Self::Ns(ns) | Self::AtMost(ns) => ns.to_string(),
            Self::Untimed if human => "-".to_owned(),
            Self::Untimed => "0".to_owned(),
        }
    }

    fn value(&self) -> u64 {
        match *self {
            Self::Count(n) | Self::Ns(n) | Self::AtMost(n) => n,
            Self::Text(_) | Self::Untimed => 0,
        }
    }
}

/// One column of a table.
pub struct Column<R> {
    /// The header people read.
    pub header: &'static str,
    /// The CSV header (a duration's says `_ns`).
    pub csv: &'static str,
    pub role: Role,
    pub cell: fn(&R) -> Cell,
}

/// A table's quantities for `--fail-on`: `PREFIX[:NAME][.STAT]`.
pub struct Gate<R> {
    /// `lock` in `lock:NAME.max`.
    pub prefix: &'static str,
    /// What `NAME` is in the grammar: `NAME`, `METHOD`.
    pub name: &'static str,
    /// What a row is, in messages: `lock`, `D-Bus`.
    pub noun: &'static str,
    /// What `NAME` may be, and what the quantity is without it, for the
    /// grammar's help.
    pub help: (&'static str, &'static str),
    /// The statistics by name, the first of each role its own name.
    pub stats: &'static [(&'static str, Role)],
    /// How an observation names a row.
    pub label: fn(&R) -> String,
    /// Whether a row is the one `NAME` names.
    pub is: fn(&R, &str) -> bool,
}

/// A table after its rows: more that a window's table says (the fork
/// table's execs and child lifetimes).
pub struct Note<N> {
    pub of: fn(&Profile, Option<u32>) -> N,
    /// Its text, one or more lines, each ending in a newline.
    pub text: fn(&N) -> String,
}

/// One table, defined once.
pub struct TableDef<R: 'static, N: 'static = ()> {
    /// File stem (`locks.txt`, `.md`, `.csv`, `.json`) and `diff`'s name.
    pub name: &'static str,
    /// `kernel lock contention`: headings say it.
    pub title: &'static str,
    /// How the rows are ordered, when a heading should say it.
    pub order: Option<&'static str>,
    /// The tracer whose data it shows.
    pub tracer: Tracer,
    /// What `diff` calls the count.
    pub count_name: &'static str,
    /// Said instead of the rows when there are none.
    pub empty: &'static str,
    /// The rows of one window (`Some(id)`) or of the whole recording.
    pub rows: fn(&Profile, Option<u32>) -> Vec<R>,
    pub columns: &'static [Column<R>],
    pub note: Option<Note<N>>,
    pub gate: Option<Gate<R>>,
    /// The CI summary's top rows: their heading and columns, by header.
    pub top: Option<(&'static str, &'static [&'static str])>,
}

/// A table's rows and its note, as JSON: `{"forks": [...], "summary": {...}}`.
struct WithNote<'a, R, N>(&'static str, &'a [R], &'a N);

impl<R: Serialize, N: Serialize> Serialize for WithNote<'_, R, N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry(self.0, self.1)?;
        map.serialize_entry("summary", self.2)?;
        map.end()
    }
}

/// A row as `diff` and the gates compare it: its key cells and figures.
pub struct Measured {
    pub key: Vec<String>,
    /// `[count, total ns, timeouts]`.
    pub values: [u64; 3],
}

/// A table whatever its row type: what the outputs ask of one.
pub trait AnyTable: Sync {
    fn name(&self) -> &'static str;
    fn title(&self) -> &'static str;
    fn tracer(&self) -> Tracer;
    fn count_name(&self) -> &'static str;
    fn order(&self) -> Option<&'static str>;
    /// The table of one window or of the whole recording; `human`:
    /// durations for people, else the CSV's.
    fn table(&self, profile: &Profile, window: Option<u32>, human: bool) -> Table;
    /// The note after the table, if it has one.
    fn note(&self, profile: &Profile, window: Option<u32>) -> Option<String>;
    /// The rows (and note) as JSON.
    fn json(&self, profile: &Profile, window: Option<u32>) -> serde_json::Result<String>;
    /// The key columns' headers.
    fn keys(&self) -> Vec<&'static str>;
    /// Whether the rows have a timeouts column.
    fn has_timeouts(&self) -> bool;
    fn measured(&self, profile: &Profile, window: Option<u32>) -> Vec<Measured>;
    /// `lock`, when the table has gate quantities.
    fn gate_prefix(&self) -> Option<&'static str>;
    /// A gate quantity's statistic by name.
    fn gate_stat(&self, name: &str) -> Option<Role>;
    /// The name a statistic is shown by.
    fn gate_stat_name(&self, stat: Role) -> &'static str;
    /// `lock`, `METHOD`, `total, max or count`.
    fn gate_words(&self) -> (&'static str, &'static str, String);
    /// What `NAME` may be, what the quantity is without it.
    fn gate_help(&self) -> (&'static str, &'static str);
    /// Each row's label, its value of `stat` and whether `name` names it.
    fn observe(
        &self,
        profile: &Profile,
        window: Option<u32>,
        stat: Role,
        name: Option<&str>,
    ) -> Vec<(String, u64, bool)>;
    /// The CI summary's top rows, by total.
    fn top(&self, profile: &Profile, n: usize) -> Option<(&'static str, Table)>;
}

impl<R: Serialize + Sync, N: Serialize + Sync> TableDef<R, N> {
    fn column(&self, role: Role) -> Option<&Column<R>> {
        self.columns.iter().find(|c| c.role == role)
    }

    fn value(&self, row: &R, role: Role) -> u64 {
        self.column(role).map_or(0, |c| (c.cell)(row).value())
    }

    fn rendered(&self, rows: &[R], columns: &[&Column<R>], human: bool) -> Table {
        Table {
            headers: columns
                .iter()
                .map(|c| if human { c.header } else { c.csv })
                .collect(),
            numeric: columns.iter().map(|c| c.role.numeric()).collect(),
            rows: rows
                .iter()
                .map(|r| columns.iter().map(|c| (c.cell)(r).show(human)).collect())
                .collect(),
            empty: self.empty,
        }
    }

    fn gate(&self) -> &Gate<R> {
        self.gate
            .as_ref()
            .unwrap_or_else(|| panic!("the {} table has no gate quantities", self.name))
    }
}

impl<R: Serialize + Sync, N: Serialize + Sync> AnyTable for TableDef<R, N> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn title(&self) -> &'static str {
        self.title
    }

    fn tracer(&self) -> Tracer {
        self.tracer
    }

    fn count_name(&self) -> &'static str {
        self.count_name
    }

    fn order(&self) -> Option<&'static str> {
        self.order
    }

    fn table(&self, profile: &Profile, window: Option<u32>, human: bool) -> Table {
        let columns: Vec<&Column<R>> = self.columns.iter().collect();
        self.rendered(&(self.rows)(profile, window), &columns, human)
    }

    fn note(&self, profile: &Profile, window: Option<u32>) -> Option<String> {
        self.note
            .as_ref()
            .map(|n| (n.text)(&(n.of)(profile, window)))
    }

    fn json(&self, profile: &Profile, window: Option<u32>) -> serde_json::Result<String> {
        let rows = (self.rows)(profile, window);
        match &self.note {
            None => serde_json::to_string_pretty(&rows),
            Some(note) => serde_json::to_string_pretty(&WithNote(
                self.name,
                &rows,
                &(note.of)(profile, window),
            )),
        }
    }

    fn keys(&self) -> Vec<&'static str> {
        self.columns
            .iter()
            .filter(|c| c.role == Role::Key)
            .map(|c| c.header)
            .collect()
    }

    fn has_timeouts(&self) -> bool {
        self.column(Role::Timeouts).is_some()
    }

    fn measured(&self, profile: &Profile, window: Option<u32>) -> Vec<Measured> {
        (self.rows)(profile, window)
            .iter()
            .map(|r| Measured {
                key: self
                    .columns
                    .iter()
                    .filter(|c| c.role == Role::Key)
                    .map(|c| (c.cell)(r).show(false))
                    .collect(),
                values: [Role::Count, Role::Total, Role::Timeouts].map(|role| self.value(r, role)),
            })
            .collect()
    }

    fn gate_prefix(&self) -> Option<&'static str> {
        self.gate.as_ref().map(|g| g.prefix)
    }

    fn gate_stat(&self, name: &str) -> Option<Role> {
        let g = self.gate.as_ref()?;
        g.stats.iter().find(|(n, _)| *n == name).map(|&(_, r)| r)
    }

    fn gate_stat_name(&self, stat: Role) -> &'static str {
        self.gate()
            .stats
            .iter()
            .find(|(_, r)| *r == stat)
            .map_or("?", |(n, _)| n)
    }

    fn gate_words(&self) -> (&'static str, &'static str, String) {
        let g = self.gate();
        let mut names: Vec<&str> = Vec::new();
        for (i, (n, role)) in g.stats.iter().enumerate() {
            if !g.stats[..i].iter().any(|(_, r)| r == role) {
                names.push(n);
            }
        }
        let list = match names.split_last() {
            Some((last, [])) => (*last).to_owned(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        (g.noun, g.name, list)
    }

    fn gate_help(&self) -> (&'static str, &'static str) {
        self.gate().help
    }

    fn observe(
        &self,
        profile: &Profile,
        window: Option<u32>,
        stat: Role,
        name: Option<&str>,
    ) -> Vec<(String, u64, bool)> {
        let g = self.gate();
        (self.rows)(profile, window)
            .iter()
            .map(|r| {
                (
                    (g.label)(r),
                    self.value(r, stat),
                    name.is_some_and(|n| (g.is)(r, n)),
                )
            })
            .collect()
    }

    fn top(&self, profile: &Profile, n: usize) -> Option<(&'static str, Table)> {
        let (heading, headers) = self.top?;
        let mut rows = (self.rows)(profile, None);
        if rows.is_empty() {
            return None;
        }
        rows.truncate(n);
        let columns: Vec<&Column<R>> = headers
            .iter()
            .filter_map(|h| self.columns.iter().find(|c| c.header == *h))
            .collect();
        Some((heading, self.rendered(&rows, &columns, true)))
    }
}

/// The rows of a table with a heading that says what they are:
/// `kernel lock contention, whole recording (by total wait; per window in
/// w*/locks.txt):`, then the first `limit` rows and the note.
#[must_use]
pub fn whole_recording_text(t: &dyn AnyTable, profile: &Profile, limit: usize) -> String {
    let mut table = t.table(profile, None, true);
    table.rows.truncate(limit);
    let order = t.order().map(|o| format!("{o}; ")).unwrap_or_default();
    format!(
        "\n{}, whole recording ({order}per window in w*/{}.txt):\n{}{}",
        t.title(),
        t.name(),
        table.text(),
        t.note(profile, None).unwrap_or_default()
    )
}

/// Adds log2 histogram `from` into `into`, bucket by bucket.
pub(crate) fn merge_hist(into: &mut Vec<u64>, from: &[u64]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        assert_eq!(hist_quantile(&[], 0.5), 0);
        assert_eq!(hist_quantile(&[10], 0.5), 2);
        assert_eq!(hist_quantile(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 99], 0.5), 1024);
        assert_eq!(hist_quantile(&[99, 0, 1], 0.99), 2);
        assert_eq!(hist_quantile(&[98, 0, 2], 0.99), 8);
    }
}
