//! The stack graphs, each defined once: its name, title, unit, pprof sample
//! types and the stacks it draws. The folded files and flame graphs of
//! `report` and `diff`, the HTML report's graphs and the pprof and
//! speedscope exports are all drawn from a graph's [`StackRow`]s.

use std::{borrow::Cow, collections::HashMap, fmt::Write as _};

use crate::{
    profile::{DbusCall, LockWait, Profile},
    tracer::Tracer,
};

/// One stack of a graph with its values, in the shape every output reads.
pub struct StackRow<'a> {
    pub window: u32,
    pub tgid: u32,
    /// The thread, where the tracer records it.
    pub tid: Option<u32>,
    pub comm: &'a str,
    /// In the folded files only, a frame between the process and its
    /// stack: the blocking D-Bus call an off-CPU block happened inside
    /// (often frame-pointer-less library code that would not say so).
    pub context: Option<String>,
    /// Root first.
    pub stack: &'a [u32],
    /// Frames past the stack's leaf, outermost first: the lock, the D-Bus
    /// call; in the wakers graph `--`, the waker's stack leaf first, and
    /// the waker.
    pub tail: Vec<Tail>,
    /// Events: samples, blocks, contentions, calls.
    pub count: u64,
    /// Their time (on-CPU: samples × the sampling period).
    pub ns: u64,
    /// Labels of this graph only (task state, lock, D-Bus method).
    pub labels: Vec<(&'static str, Label)>,
}

/// A frame past a row's stack: one of the profile's frames, or a name of
/// the graph's own (`[lock …]`, `--`, a waker's `comm[pid]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Tail {
    Frame(u32),
    Name(String),
}

/// A label's value. Ids are numbers, as in `perf_to_profile`'s profiles,
/// so `go tool pprof -tagfocus pid=1234` matches (a digits-only value is
/// read as a number range there); names are strings, which is what
/// Pyroscope and Parca keep as series labels.
#[derive(Clone, Debug)]
pub enum Label {
    Str(String),
    Num(u64),
}

/// One of the per-window stack graphs.
pub struct Graph {
    /// File stem: `oncpu` → `oncpu.folded`, `oncpu.svg`, `oncpu.pb.gz`.
    pub name: &'static str,
    /// The title before `: window N (VMs a–b)`.
    pub title: &'static str,
    /// The tracer whose data it draws.
    pub tracer: Tracer,
    /// Its events are samples, each one sampling period of CPU time (the
    /// folded counts are samples); otherwise each event is timed, and the
    /// folded counts are microseconds.
    pub sampled: bool,
    /// pprof sample types: the event count first (pprof's convention), then
    /// the time, which is the default.
    pub sample_types: [(&'static str, &'static str); 2],
    /// The graph's stacks in one window, or (`None`) in all of them.
    pub rows: for<'a> fn(&'a Profile, Option<u32>) -> Vec<StackRow<'a>>,
}

/// Folded counts of timed graphs are in microseconds.
pub const US: &str = "us";

/// On-CPU samples. pprof's types are Go's CPU profile, so Pyroscope and
/// Parca recognise it.
pub static ONCPU: Graph = Graph {
    name: "oncpu",
    title: "On-CPU",
    tracer: Tracer::OnCpu,
    sampled: true,
    sample_types: [("samples", "count"), ("cpu", "nanoseconds")],
    rows: oncpu_rows,
};

/// The frame above the process of the blocks still going at the stop,
/// which the windows' off-CPU totals leave out.
pub const UNFINISHED: &str = "[still blocked at the stop]";

/// Blocked time; a block still going at the stop under [`UNFINISHED`].
pub static OFFCPU: Graph = Graph {
    name: "offcpu",
    title: "Off-CPU time",
    tracer: Tracer::OffCpu,
    sampled: false,
    sample_types: [("blocks", "count"), ("off_cpu", "nanoseconds")],
    rows: offcpu_rows,
};

/// Off-CPU time by who ended it, as `offwaketime` folds it: the blocked
/// thread's stack, `--`, then the waker's stack leaf first, and the waker
/// (its comm, or `[interrupt]`). Read upward: where the thread slept, then
/// from where and by whom it was woken. Preemptions have no waker.
pub static OFFWAKE: Graph = Graph {
    name: "offwake",
    title: "Off-CPU time, by waker",
    tracer: Tracer::Wakers,
    sampled: false,
    sample_types: [("blocks", "count"), ("off_cpu", "nanoseconds")],
    rows: offwake_rows,
};

/// The waiter's stack, then the lock (`[lock 0x… rwsem:W]` or its
/// symbol). pprof's types are Go's mutex profile.
pub static LOCKWAIT: Graph = Graph {
    name: "lockwait",
    title: "Kernel lock wait",
    tracer: Tracer::Locks,
    sampled: false,
    sample_types: [("contentions", "count"), ("delay", "nanoseconds")],
    rows: lockwait_rows,
};

/// The lock waits each holder caused, on the holder's stack (where it was
/// when a waiter began to wait), then the lock: who held the locks others
/// waited for, and where. An rwsem held for reading is `[readers]`.
pub static LOCKHOLD: Graph = Graph {
    name: "lockhold",
    title: "Kernel lock wait, by holder",
    tracer: Tracer::Locks,
    sampled: false,
    sample_types: [("contentions", "count"), ("delay", "nanoseconds")],
    rows: lockhold_rows,
};

/// The caller's stack, then the call (`[dbus gio org.foo.Bar.Method]`).
pub static DBUSWAIT: Graph = Graph {
    name: "dbuswait",
    title: "D-Bus wait",
    tracer: Tracer::Dbus,
    sampled: false,
    sample_types: [("calls", "count"), ("dbus_wait", "nanoseconds")],
    rows: dbuswait_rows,
};

/// libvirtd's workers waiting for a domain's job, by the waiter's stack.
pub static JOBWAIT: Graph = Graph {
    name: "jobwait",
    title: "Domain job wait",
    tracer: Tracer::Libvirt,
    sampled: false,
    sample_types: [("waits", "count"), ("job_wait", "nanoseconds")],
    rows: jobwait_rows,
};

/// The graphs every window gets, in the order reports show them.
pub static GRAPHS: [&Graph; 7] = [
    &ONCPU, &OFFCPU, &OFFWAKE, &LOCKWAIT, &LOCKHOLD, &DBUSWAIT, &JOBWAIT,
];

impl Graph {
    /// `On-CPU: window 1 (VMs 1–4)`.
    #[must_use]
    pub fn title_for(&self, w: &crate::windows::WindowInfo) -> String {
        format!("{}: window {} ({})", self.title, w.name(), w.label())
    }

    /// What a folded count is, as the flame graph says it.
    #[must_use]
    pub fn count_name(&self) -> &'static str {
        if self.sampled { "samples" } else { "\u{b5}s" }
    }

    /// What a folded count is, in ASCII (the diff's JSON).
    #[must_use]
    pub fn unit(&self) -> &'static str {
        if self.sampled { "samples" } else { US }
    }

    /// Folded lines (`comm;frame;…;frame count`) of one window, sorted,
    /// with equal stacks merged; a timed graph counts microseconds and
    /// leaves out stacks under one.
    #[must_use]
    pub fn folded(&self, profile: &Profile, window: u32) -> Vec<String> {
        let f = self.fold(profile, window);
        f.stacks.iter().map(|(s, n)| f.line(s, *n)).collect()
    }

    /// One window's stacks, merged and sorted, as [`Graph::folded`] has
    /// them (see [`Fold`]).
    #[must_use]
    pub fn fold<'a>(&self, profile: &'a Profile, window: u32) -> Fold<'a> {
        let rows = (self.rows)(profile, Some(window));
        // Rows of many processes and threads share a stack: merged first.
        let mut merged: HashMap<_, u64> = HashMap::with_capacity(rows.len());
        for r in &rows {
            let key = (r.comm, r.stack, r.context.as_deref(), r.tail.as_slice());
            *merged.entry(key).or_default() += if self.sampled { r.count } else { r.ns };
        }
        // Each line as tokens: a frame by its id, the other names (comm,
        // context, leaf; made fit for the format) after the frames.
        let frames = profile.frames.len();
        let mut others: HashMap<String, usize> = HashMap::new();
        let mut other_names: Vec<String> = Vec::new();
        let mut other = |name: String| -> usize {
            let next = frames + other_names.len();
            *others.entry(name).or_insert_with_key(|k| {
                other_names.push(k.clone());
                next
            })
        };
        let mut stacks: Vec<(Vec<usize>, u64)> = Vec::with_capacity(merged.len());
        for ((comm, stack, context, tail), n) in merged {
            let mut tokens = Vec::with_capacity(stack.len() + 3);
            let comm = clean(comm, '_');
            tokens.push(other(if comm.is_empty() {
                "[unknown]".to_owned()
            } else {
                comm.into_owned()
            }));
            if let Some(c) = context {
                tokens.push(other(c.replace(';', ":")));
            }
            let own = stack.iter().map(|&f| Tail::Frame(f));
            for t in own.chain(tail.iter().cloned()) {
                tokens.push(match t {
                    Tail::Frame(f) if (f as usize) < frames => f as usize,
                    Tail::Frame(_) => other("[bad frame]".to_owned()),
                    Tail::Name(name) => other(name.replace(';', ":")),
                });
            }
            stacks.push((tokens, n));
        }
        let mut names: Vec<Option<Cow<'a, str>>> = vec![None; frames];
        names.extend(other_names.into_iter().map(|n| Some(Cow::Owned(n))));
        let mut seen = vec![false; names.len()];
        for &t in stacks.iter().flat_map(|(t, _)| t) {
            seen[t] = true;
        }
        let used: Vec<usize> = (0..names.len()).filter(|&t| seen[t]).collect();
        for &t in &used {
            if names[t].is_none() {
                names[t] = Some(clean(&profile.frames[t], ' '));
            }
        }
        // Ranks in the order of the names as they stand in a line (each
        // followed by `;`), equal names one rank: sorting the lines by
        // their ranks sorts them as text, without comparing text, and
        // merges the lines that cleaning made equal.
        let name_of = |t: usize| names[t].as_deref().unwrap_or("");
        let mut by_name = used;
        by_name.sort_unstable_by(|&a, &b| {
            (name_of(a).bytes().chain(Some(b';'))).cmp(name_of(b).bytes().chain(Some(b';')))
        });
        let mut rank = vec![0u32; names.len()];
        let mut texts: Vec<Cow<'a, str>> = Vec::new();
        for (i, &t) in by_name.iter().enumerate() {
            if i == 0 || name_of(t) != name_of(by_name[i - 1]) {
                texts.push(names[t].clone().unwrap_or_default());
            }
            rank[t] = u32::try_from(texts.len() - 1).unwrap_or(u32::MAX);
        }
        let mut stacks: Vec<(Vec<u32>, u64)> = stacks
            .into_iter()
            .map(|(tokens, n)| (tokens.into_iter().map(|t| rank[t]).collect(), n))
            .collect();
        stacks.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        stacks.dedup_by(|next, kept| {
            let same = next.0 == kept.0;
            if same {
                kept.1 = kept.1.saturating_add(next.1);
            }
            same
        });
        let sampled = self.sampled;
        stacks.retain_mut(|(_, n)| {
            if !sampled {
                *n /= 1000;
            }
            *n > 0
        });
        Fold {
            names: texts,
            stacks,
        }
    }

    /// Whether the profile has this graph: its tracer was recorded, or it
    /// has stacks.
    #[must_use]
    pub fn in_profile(&self, profile: &Profile) -> bool {
        profile.recorded(self.tracer) || !(self.rows)(profile, None).is_empty()
    }
}

/// One window's stacks of a graph, merged: each a line of names (indices
/// into `names`), sorted as their text, with its count (samples, or µs).
pub struct Fold<'a> {
    pub names: Vec<Cow<'a, str>>,
    pub stacks: Vec<(Vec<u32>, u64)>,
}

impl Fold<'_> {
    /// `stack`'s folded line: `comm;frame;…;frame count`.
    #[must_use]
    pub fn line(&self, stack: &[u32], n: u64) -> String {
        let mut line = String::new();
        self.push_line(&mut line, stack);
        let _ = write!(line, " {n}");
        line
    }

    /// Appends `stack`'s names, `;`-separated.
    pub fn push_line(&self, out: &mut String, stack: &[u32]) {
        for (i, &t) in stack.iter().enumerate() {
            if i > 0 {
                out.push(';');
            }
            out.push_str(&self.names[t as usize]);
        }
    }

    /// Writes the folded file: every line, each ending in a newline.
    pub fn write_text(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut line = String::new();
        for (stack, n) in &self.stacks {
            line.clear();
            self.push_line(&mut line, stack);
            let _ = writeln!(line, " {n}");
            out.write_all(line.as_bytes())?;
        }
        Ok(())
    }
}

/// The graph with this file stem.
#[must_use]
pub fn by_name(name: &str) -> Option<&'static Graph> {
    GRAPHS.into_iter().find(|g| g.name == name)
}

/// The on-CPU sampling period in ns, from the recorded frequency (0 when
/// none was).
#[must_use]
pub fn period_ns(profile: &Profile) -> u64 {
    1_000_000_000_u64
        .checked_div(profile.meta.frequency_hz)
        .unwrap_or(0)
}

fn in_window(window: Option<u32>) -> impl Fn(u32) -> bool {
    move |w| window.is_none_or(|x| x == w)
}

fn oncpu_rows(profile: &Profile, window: Option<u32>) -> Vec<StackRow<'_>> {
    let period = period_ns(profile);
    let keep = in_window(window);
    profile
        .oncpu
        .iter()
        .filter(|r| keep(r.window))
        .map(|r| StackRow {
            window: r.window,
            tgid: r.tgid,
            tid: Some(r.pid),
            comm: &r.comm,
            context: None,
            stack: &r.stack,
            tail: Vec::new(),
            count: r.samples,
            ns: r.samples.saturating_mul(period),
            labels: Vec::new(),
        })
        .collect()
}

fn offcpu_rows(profile: &Profile, window: Option<u32>) -> Vec<StackRow<'_>> {
    let keep = in_window(window);
    profile
        .offcpu
        .iter()
        .filter(|r| keep(r.window))
        .map(|r| StackRow {
            window: r.window,
            tgid: r.tgid,
            tid: Some(r.pid),
            comm: &r.comm,
            context: if r.unfinished {
                Some(UNFINISHED.to_owned())
            } else {
                r.dbus.as_ref().map(|f| format!("[D-Bus {f}]"))
            },
            stack: &r.stack,
            tail: Vec::new(),
            count: r.blocks,
            ns: r.total_ns,
            labels: {
                let mut l = vec![("state", Label::Str(r.state.clone()))];
                if r.unfinished {
                    l.push(("unfinished", Label::Str("at the stop".to_owned())));
                }
                if let Some(f) = &r.dbus {
                    l.push(("dbus_function", Label::Str(f.clone())));
                }
                l
            },
        })
        .collect()
}

fn offwake_rows(profile: &Profile, window: Option<u32>) -> Vec<StackRow<'_>> {
    let keep = in_window(window);
    profile
        .offwake
        .iter()
        .filter(|r| keep(r.window))
        .map(|r| {
            let mut tail = Vec::with_capacity(r.waker.stack().len() + 2);
            tail.push(Tail::Name("--".to_owned()));
            tail.extend(r.waker.stack().iter().rev().map(|&f| Tail::Frame(f)));
            tail.push(Tail::Name(r.waker.name().to_owned()));
            StackRow {
                window: r.window,
                tgid: r.tgid,
                tid: Some(r.pid),
                comm: &r.comm,
                context: None,
                stack: &r.stack,
                tail,
                count: r.blocks,
                ns: r.total_ns,
                labels: vec![
                    ("state", Label::Str(r.state.clone())),
                    ("waker", Label::Str(r.waker.to_string())),
                ],
            }
        })
        .collect()
}

fn lockwait_rows(profile: &Profile, window: Option<u32>) -> Vec<StackRow<'_>> {
    let keep = in_window(window);
    profile
        .locks
        .iter()
        .filter(|r| keep(r.window))
        .map(|r| lock_row(r, r.tgid, None, &r.comm, &r.stack))
        .collect()
}

fn lockhold_rows(profile: &Profile, window: Option<u32>) -> Vec<StackRow<'_>> {
    use crate::profile::Holder;
    let keep = in_window(window);
    profile
        .locks
        .iter()
        .filter(|r| keep(r.window))
        .filter_map(|r| match r.holder.as_ref()? {
            Holder::Readers => Some(lock_row(r, 0, None, "[readers]", &[])),
            Holder::Task {
                tgid,
                pid,
                comm,
                stack,
            } => Some(lock_row(r, *tgid, Some(*pid), comm, stack)),
        })
        .collect()
}

/// A lock wait's row on the stack of `comm` (the waiter's, or the
/// holder's), the lock as the leaf.
fn lock_row<'a>(
    r: &'a LockWait,
    tgid: u32,
    thread: Option<u32>,
    comm: &'a str,
    stack: &'a [u32],
) -> StackRow<'a> {
    StackRow {
        window: r.window,
        tgid,
        tid: thread,
        comm,
        context: None,
        stack,
        tail: vec![Tail::Name(lock_frame(r))],
        count: r.count,
        ns: r.total_ns,
        labels: lock_labels(r),
    }
}

fn dbuswait_rows(profile: &Profile, window: Option<u32>) -> Vec<StackRow<'_>> {
    let keep = in_window(window);
    profile
        .dbus
        .iter()
        .filter(|r| keep(r.window))
        .map(|r| StackRow {
            window: r.window,
            tgid: r.tgid,
            tid: None,
            comm: &r.comm,
            context: None,
            stack: &r.stack,
            tail: vec![Tail::Name(dbus_frame(r))],
            count: r.calls,
            ns: r.total_ns,
            labels: vec![
                ("dbus_library", Label::Str(r.library.clone())),
                (
                    "dbus_destination",
                    Label::Str(r.destination.clone().unwrap_or_else(|| "?".to_owned())),
                ),
                ("dbus_method", Label::Str(r.method())),
            ],
        })
        .collect()
}

/// The waits that ended (a wait under way at the stop has no stack yet),
/// each under a leaf that says how: `[job wait: ok]`, `…: timeout`.
fn jobwait_rows(profile: &Profile, window: Option<u32>) -> Vec<StackRow<'_>> {
    use crate::profile::LibvirtCall;
    let keep = in_window(window);
    profile
        .libvirt
        .iter()
        .filter(|r| r.kind == LibvirtCall::JOB && r.status != LibvirtCall::IN_FLIGHT)
        .filter(|r| keep(r.window))
        .map(|r| StackRow {
            window: r.window,
            tgid: r.tgid,
            tid: None,
            comm: &r.comm,
            context: None,
            stack: &r.stack,
            tail: vec![Tail::Name(format!("[job wait: {}]", r.status))],
            count: r.calls,
            ns: r.total_ns,
            labels: vec![("job_wait", Label::Str(r.status.clone()))],
        })
        .collect()
}

/// A lock wait's labels: the lock (its symbol, or its address) and type.
fn lock_labels(r: &LockWait) -> Vec<(&'static str, Label)> {
    vec![
        (
            "lock",
            Label::Str(
                r.lock_name
                    .clone()
                    .unwrap_or_else(|| format!("{:#x}", r.lock)),
            ),
        ),
        ("lock_type", Label::Str(r.lock_type.clone())),
    ]
}

/// The leaf frame a lock wait's stack ends in: `[lock NAME TYPE]`, the lock
/// named by its symbol or, without one, its address.
#[must_use]
pub fn lock_frame(w: &LockWait) -> String {
    match &w.lock_name {
        Some(name) => format!("[lock {name} {}]", w.lock_type),
        None => format!("[lock {:#x} {}]", w.lock, w.lock_type),
    }
}

/// The leaf frame a blocking D-Bus call's stack ends in:
/// `[dbus LIBRARY DESTINATION interface.member]`.
#[must_use]
pub fn dbus_frame(c: &DbusCall) -> String {
    format!(
        "[dbus {} {} {}]",
        c.library,
        c.destination.as_deref().unwrap_or("?"),
        c.method()
    )
}

/// `s` fit for a folded line: `;` separates frames and a space separates
/// the count, so both are kept out of names (`space` replaces spaces in a
/// comm; a frame keeps its own). Most names need no change: borrowed.
fn clean(s: &str, space: char) -> Cow<'_, str> {
    if !s
        .bytes()
        .any(|b| matches!(b, b';' | b'\n' | b'\r') || (b == b' ' && space != ' '))
    {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| match c {
                ';' => ':',
                '\n' | '\r' | ' ' => space,
                c => c,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{FrameTable, OffCpu, OnCpu};

    #[test]
    fn folds_and_merges() {
        let mut frames = FrameTable::default();
        let (main, busy, weird) = (
            frames.intern("main"),
            frames.intern("busy"),
            frames.intern("do;weird name"),
        );
        let on = |window, stack: Vec<u32>, samples| OnCpu {
            window,
            tgid: 1,
            pid: 1,
            comm: "vm load".into(),
            stack,
            samples,
        };
        let off = |dbus: Option<&str>, total_ns| OffCpu {
            window: 1,
            tgid: 1,
            pid: 2,
            comm: "t".into(),
            state: "S".into(),
            stack: vec![main],
            blocks: 2,
            total_ns,
            max_ns: 2_000_000,
            runq_ns: 0,
            dbus: dbus.map(str::to_owned),
            unfinished: false,
        };
        let p = Profile {
            frames: frames.into_names(),
            oncpu: vec![
                on(1, vec![main, busy], 3),
                on(1, vec![main, busy], 4),
                on(1, vec![main, weird], 1),
                on(0, vec![main], 9),
                OnCpu {
                    comm: "a\nb c".into(),
                    ..on(2, vec![weird], 1)
                },
            ],
            offcpu: vec![
                off(None, 2_500_000),
                off(Some("g_dbus;call"), 7_000),
                off(None, 999),
            ],
            ..Profile::default()
        };
        assert_eq!(
            ONCPU.folded(&p, 1),
            ["vm_load;main;busy 7", "vm_load;main;do:weird name 1"]
        );
        assert_eq!(ONCPU.folded(&p, 0), ["vm_load;main 9"]);
        assert_eq!(ONCPU.folded(&p, 5), Vec::<String>::new());
        // Microseconds, merged before they are rounded down; a D-Bus
        // block under its call.
        assert_eq!(
            OFFCPU.folded(&p, 1),
            ["t;[D-Bus g_dbus:call];main 7", "t;main 2500"]
        );
        // Newlines: `_` in a comm (like spaces), a space in a frame.
        assert_eq!(ONCPU.folded(&p, 2), ["a_b_c;do:weird name 1"]);
    }
}
