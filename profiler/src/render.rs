//! Renderers: from a [`Profile`] to folded stacks, flame graphs (inferno) and
//! the summary (text and JSON). Nothing here touches BPF or `/proc`: a
//! profile file on another machine renders the same.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::Serialize;
use thiserror::Error;

use crate::{
    graphs::{Fold, GRAPHS, Graph},
    profile::Profile,
    tables::TABLES,
    windows::WindowInfo,
};

#[derive(Debug, Error)]
pub enum RenderError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("rendering the flame graph {path} failed: {source}")]
    FlameGraph { path: PathBuf, source: io::Error },
}

/// A function that takes each output file: its path, and a function
/// that writes its contents (a folded file of minutes of deep stacks is
/// hundreds of MB, written as it is made rather than held).
pub type Emit<'a> = dyn Fn(&Path, &mut dyn FnMut(&mut dyn Write) -> io::Result<()>) -> Result<(), RenderError>
    + Sync
    + 'a;

/// Hands `emit` a file whose contents are `bytes`.
fn put(emit: &Emit<'_>, path: &Path, bytes: &[u8]) -> Result<(), RenderError> {
    emit(path, &mut |w| w.write_all(bytes))
}

/// Renders a flame graph from folded lines. An empty window still gets an
/// SVG, which says that nothing was recorded.
pub fn write_flame_graph<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    title: &str,
    count_name: &str,
    mut out: impl Write,
) -> io::Result<()> {
    let mut lines = lines.into_iter().peekable();
    let mut opts = inferno::flamegraph::Options::default();
    title.clone_into(&mut opts.title);
    count_name.clone_into(&mut opts.count_name);
    opts.deterministic = true;
    if lines.peek().is_none() {
        write!(
            out,
            r#"<?xml version="1.0" standalone="no"?><svg version="1.1" width="1200" height="60" xmlns="http://www.w3.org/2000/svg"><text x="600" y="24" text-anchor="middle" font-family="Verdana" font-size="17">{}</text><text x="600" y="48" text-anchor="middle" font-family="Verdana" font-size="12">nothing recorded in this window</text></svg>"#,
            xml_escape(title)
        )
    } else {
        inferno::flamegraph::from_lines(&mut opts, lines, out)
    }
}

/// The lines of `fold` that a flame graph needs: each cut after the
/// first frame narrower than inferno draws (its `min_width`, a share of
/// the total; every frame under it is narrower). The graph is the same,
/// from a fraction of the text: minutes of deep stacks fold to 100 k
/// lines of 200 MB, most of them differing only in frames too narrow to
/// see. (inferno sorts lines as text: where a frame's name begins a
/// sibling's, `foo` and `foo::bar`, a cut line may sort on the other side
/// of the sibling, and the two swap places.)
#[must_use]
pub fn drawn(fold: &Fold<'_>) -> Vec<String> {
    let total: u64 = fold.stacks.iter().map(|s| s.1).fold(0, u64::saturating_add);
    // inferno's own test, on its own figures.
    #[expect(clippy::cast_precision_loss, reason = "as inferno computes it")]
    let narrow = |node: u64| {
        (node as f64) < inferno::flamegraph::defaults::MIN_WIDTH / (100.0 / total as f64)
    };
    // The frames of consecutive lines merge as long as they are equal, as
    // inferno merges them: a line's nodes are the open ones up to where it
    // differs from the line before, then new ones. Once for the nodes'
    // totals (in the order they open), once to cut the lines.
    let walk = |on_line: &mut dyn FnMut(usize, &[usize])| {
        let mut open: Vec<usize> = Vec::new();
        let mut nodes = 0;
        let mut prev: &[u32] = &[];
        for (i, (stack, _)) in fold.stacks.iter().enumerate() {
            let same = stack.iter().zip(prev).take_while(|(a, b)| a == b).count();
            open.truncate(same);
            for _ in same..stack.len() {
                open.push(nodes);
                nodes += 1;
            }
            prev = stack;
            on_line(i, &open);
        }
    };
    let mut totals: Vec<u64> = Vec::new();
    walk(&mut |i, open| {
        let n = fold.stacks[i].1;
        if let Some(&last) = open.last() {
            totals.resize(totals.len().max(last + 1), 0);
        }
        for &node in open {
            totals[node] = totals[node].saturating_add(n);
        }
    });
    // Each line keeps its frames up to its first narrow one, which stays
    // (inferno drops it) so that the line keeps its place among its
    // siblings and every frame drawn its position. The lines under one
    // narrow frame are consecutive: they become one.
    let mut cut: Vec<(&[u32], u64)> = Vec::new();
    walk(&mut |i, open| {
        let (stack, n) = &fold.stacks[i];
        let kept = open.iter().take_while(|&&o| !narrow(totals[o])).count();
        let frames = &stack[..(kept + 1).min(stack.len())];
        match cut.last_mut() {
            Some((last, count)) if *last == frames => *count = count.saturating_add(*n),
            _ => cut.push((frames, *n)),
        }
    });
    cut.into_iter().map(|(s, n)| fold.line(s, n)).collect()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Per-window figures of the summary.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct WindowSummary {
    pub id: u32,
    pub label: String,
    pub first_vm: Option<u64>,
    pub last_vm: Option<u64>,
    pub dir: String,
    pub oncpu_samples: u64,
    /// Off-CPU time and blocks, without those still going at the stop
    /// (with profiles that keep them apart: see
    /// `Meta::offcpu_cut_at_windows`), which are `offcpu_unfinished_ns`.
    pub offcpu_ns: u64,
    pub offcpu_blocks: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offcpu_unfinished_ns: u64,
    pub lock_wait_ns: u64,
    pub lock_contentions: u64,
    pub forks: u64,
    pub cgroup_ops: u64,
    /// Blocking D-Bus calls: their total time, count and timeouts.
    pub dbus_ns: u64,
    pub dbus_calls: u64,
    pub dbus_timeouts: u64,
    /// libvirt's API calls answered: their total time and count; the QEMU
    /// monitor commands answered: their total time.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub api_ns: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub api_calls: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub qmp_ns: u64,
    /// Off-CPU time of the blocks a task (not an interrupt) woke (the
    /// wakers tracer).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub task_woken_ns: u64,
    pub losses: BTreeMap<String, u64>,
    pub processes: usize,
    /// Why user-stack walks ended and how frames were found
    /// (`--unwind dwarf`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unwind: BTreeMap<String, u64>,
}

#[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's signature")]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub target: String,
    pub kernel: String,
    pub duration_ns: u64,
    pub stop_reason: String,
    pub frequency_hz: u64,
    pub windows_spec: String,
    pub vms_created: usize,
    pub vms: Vec<crate::profile::VmCreation>,
    pub windows: Vec<WindowSummary>,
    /// Losses not tied to a window.
    pub other_losses: BTreeMap<String, u64>,
    pub total_losses: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub program_stats: Vec<crate::profile::ProgramStat>,
    /// Facts counted in the kernel (stack walks taken and saved, lock waits
    /// that migrated, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub counters: BTreeMap<String, u64>,
    /// hvprof's own CPU time while recording (see `Meta::self_cpu_ns`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_cpu_ns: Option<u64>,
    /// `record --verify-unwind` (see `Meta::verify_unwind`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_unwind: Option<crate::profile::VerifyUnwind>,
    /// `record --comm`: the target's restarts, each followed again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restarts: Vec<crate::profile::Restart>,
    /// Which rule the windows' off-CPU times follow, in words.
    pub offcpu_rule: String,
    /// What the windows hold (`record --attribute`), in words, with the
    /// unattributed share of each figure.
    pub attribute_rule: String,
}

/// A figure of the window summaries, by name.
type Figure = (&'static str, fn(&WindowSummary) -> u64);

/// [`Summary::attribute_rule`] of a profile, from its window summaries.
fn attribute_rule(profile: &Profile, windows: &[WindowSummary]) -> String {
    if profile.meta.attribute == crate::windows::Attribution::Time {
        return "windows: the events between the creations of their VMs (--attribute time)"
            .to_owned();
    }
    let unattributed = |w: &&WindowSummary| w.id & crate::windows::UNATTRIBUTED != 0;
    let figures: [Figure; 6] = [
        ("on-CPU", |w| w.oncpu_samples),
        ("off-CPU", |w| w.offcpu_ns),
        ("lock wait", |w| w.lock_wait_ns),
        ("forks", |w| w.forks),
        ("cgroup ops", |w| w.cgroup_ops),
        ("libvirt calls", |w| w.api_calls),
    ];
    let shares: Vec<String> = figures
        .iter()
        .filter_map(|(name, f)| {
            let all: u64 = windows.iter().map(f).sum();
            let apart: u64 = windows.iter().filter(unattributed).map(f).sum();
            #[expect(clippy::cast_precision_loss, reason = "a percentage")]
            (all > 0).then(|| format!("{name} {:.1} %", apart as f64 * 100.0 / all as f64))
        })
        .collect();
    format!(
        "windows: the work done for their VMs (--attribute vm: each VM's QEMU, the libvirtd \
         calls that started it and what they forked), whenever it happened; the rest is in the \
         unattributed windows (u*): {}",
        if shares.is_empty() {
            "nothing recorded".to_owned()
        } else {
            shares.join(", ")
        }
    )
}

/// [`Summary::offcpu_rule`] of a profile.
fn offcpu_rule(profile: &Profile) -> String {
    if !profile.meta.offcpu_cut_at_windows {
        return "off-CPU: each block whole in the window it began in, blocks still going at the \
                stop counted up to it (a profile of an older hvprof)"
            .to_owned();
    }
    let unfinished: u64 = profile
        .offcpu
        .iter()
        .filter(|r| r.unfinished)
        .map(|r| r.total_ns)
        .sum();
    format!(
        "off-CPU: the time blocked within each window (a block going on past its window is cut \
         at the windows' boundaries); {} still blocked at the stop is kept apart, out of the \
         windows' totals and gates ({} in offcpu.svg)",
        ms(unfinished),
        crate::graphs::UNFINISHED
    )
}

/// A window's blocking D-Bus calls: their time, count and timeouts.
fn dbus_figures(profile: &Profile, window: u32) -> (u64, u64, u64) {
    let (mut ns, mut calls, mut timeouts) = (0, 0, 0);
    for c in profile.dbus.iter().filter(|c| c.window == window) {
        ns += c.total_ns;
        calls += c.calls;
        timeouts += c.timeouts;
    }
    (ns, calls, timeouts)
}

/// A window's libvirt API calls answered (their time and count) and QEMU
/// monitor commands answered (their time).
fn libvirt_figures(profile: &Profile, window: u32) -> (u64, u64, u64) {
    use crate::profile::LibvirtCall;
    let (mut api_ns, mut api_calls, mut qmp_ns) = (0, 0, 0);
    for c in profile
        .libvirt
        .iter()
        .filter(|c| c.window == window && c.status != LibvirtCall::IN_FLIGHT)
    {
        match c.kind.as_str() {
            LibvirtCall::API => {
                api_ns += c.total_ns;
                api_calls += c.calls;
            }
            LibvirtCall::QMP => qmp_ns += c.total_ns,
            _ => {}
        }
    }
    (api_ns, api_calls, qmp_ns)
}

/// Off-CPU time of a window's blocks that a task woke.
fn task_woken_ns(profile: &Profile, window: u32) -> u64 {
    profile
        .offwake
        .iter()
        .filter(|r| r.window == window)
        .filter(|r| matches!(r.waker, crate::profile::Waker::Task { .. }))
        .map(|r| r.total_ns)
        .sum()
}

/// One window's figures.
fn window_summary(profile: &Profile, w: &crate::windows::WindowInfo) -> WindowSummary {
    let mut pids = std::collections::HashSet::new();
    let mut samples = 0;
    for r in profile.oncpu.iter().filter(|r| r.window == w.id) {
        samples += r.samples;
        pids.insert(r.tgid);
    }
    let (mut ns, mut blocks) = (0, 0);
    let mut unfinished_ns = 0;
    for r in profile.offcpu.iter().filter(|r| r.window == w.id) {
        if r.unfinished {
            unfinished_ns += r.total_ns;
        } else {
            ns += r.total_ns;
            blocks += r.blocks;
        }
        pids.insert(r.tgid);
    }
    let (mut lock_ns, mut lock_n) = (0, 0);
    for l in profile.locks.iter().filter(|l| l.window == w.id) {
        lock_ns += l.total_ns;
        lock_n += l.count;
    }
    let (dbus_ns, dbus_calls, dbus_timeouts) = dbus_figures(profile, w.id);
    let (api_ns, api_calls, qmp_ns) = libvirt_figures(profile, w.id);
    let mut losses = BTreeMap::new();
    for l in profile.losses.iter().filter(|l| l.window == Some(w.id)) {
        *losses.entry(l.kind.clone()).or_default() += l.count;
    }
    let mut unwind = BTreeMap::new();
    for l in profile.unwind.iter().filter(|l| l.window == Some(w.id)) {
        *unwind.entry(l.kind.clone()).or_default() += l.count;
    }
    WindowSummary {
        id: w.id,
        label: w.label(),
        first_vm: w.first_vm,
        last_vm: w.last_vm,
        dir: w.dir_name(),
        oncpu_samples: samples,
        offcpu_ns: ns,
        offcpu_blocks: blocks,
        offcpu_unfinished_ns: unfinished_ns,
        lock_wait_ns: lock_ns,
        lock_contentions: lock_n,
        forks: profile
            .forks
            .iter()
            .filter(|f| f.window == w.id)
            .map(|f| f.count)
            .sum(),
        cgroup_ops: profile
            .cgroups
            .iter()
            .filter(|c| c.window == w.id)
            .map(|c| c.count)
            .sum(),
        dbus_ns,
        dbus_calls,
        dbus_timeouts,
        task_woken_ns: task_woken_ns(profile, w.id),
        api_ns,
        api_calls,
        qmp_ns,
        losses,
        processes: pids.len(),
        unwind,
    }
}

#[must_use]
pub fn summary(profile: &Profile) -> Summary {
    let windows: Vec<WindowSummary> = profile
        .windows
        .iter()
        .map(|w| window_summary(profile, w))
        .collect();
    let mut other_losses = BTreeMap::new();
    let known: Vec<u32> = profile.windows.iter().map(|w| w.id).collect();
    for l in profile
        .losses
        .iter()
        .filter(|l| l.window.is_none_or(|w| !known.contains(&w)))
    {
        *other_losses.entry(l.kind.clone()).or_default() += l.count;
    }
    Summary {
        target: profile.meta.target.clone(),
        kernel: profile.meta.kernel.clone(),
        duration_ns: profile.meta.duration_ns,
        stop_reason: profile.meta.stop_reason.clone(),
        frequency_hz: profile.meta.frequency_hz,
        windows_spec: profile
            .meta
            .window_spec
            .as_ref()
            .map_or_else(String::new, ToString::to_string),
        vms_created: profile.vms.len(),
        vms: profile.vms.clone(),
        other_losses,
        total_losses: profile.losses.iter().map(|l| l.count).sum(),
        program_stats: profile.meta.program_stats.clone(),
        counters: profile.meta.counters.clone(),
        self_cpu_ns: profile.meta.self_cpu_ns,
        verify_unwind: profile.meta.verify_unwind.clone(),
        restarts: profile.meta.restarts.clone(),
        offcpu_rule: offcpu_rule(profile),
        attribute_rule: attribute_rule(profile, &windows),
        windows,
    }
}

fn secs(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let v = ns as f64 / 1e9;
    format!("{v:.2} s")
}

fn ms(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let v = ns as f64 / 1e6;
    format!("{v:.1} ms")
}

impl Summary {
    #[must_use]
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "hvprof: {} for {} ({}), kernel {}, {} Hz, windows: {}",
            self.target,
            ms(self.duration_ns),
            self.stop_reason,
            self.kernel,
            self.frequency_hz,
            self.windows_spec
        );
        for r in &self.restarts {
            let _ = writeln!(
                out,
                "{} restarted: pid {} exited at {}, pid {} started at {} and was followed",
                r.comm,
                r.old_pid,
                secs(r.exited_ns),
                r.new_pid,
                secs(r.started_ns)
            );
        }
        let _ = writeln!(out, "VMs created: {}", self.vms_created);
        for vm in self.vms.iter().take(20) {
            let _ = writeln!(
                out,
                "  VM {:>4}  {:>10}  pid {:<7} {:<16} {}",
                vm.ordinal,
                ms(vm.time_ns),
                vm.pid,
                vm.comm,
                vm.name.as_deref().unwrap_or("")
            );
        }
        if self.vms.len() > 20 {
            let _ = writeln!(out, "  … {} more in summary.json", self.vms.len() - 20);
        }
        let _ = writeln!(
            out,
            "\n{:<4} {:<22} {:>10} {:>14} {:>9} {:>12} {:>6} {:>7} {:>12} {:>6} {:>7}  DIR",
            "WIN",
            "VMS",
            "ON-CPU",
            "OFF-CPU",
            "BLOCKS",
            "LOCK WAIT",
            "FORKS",
            "CGROUP",
            "D-BUS WAIT",
            "PROCS",
            "LOSSES"
        );
        for w in &self.windows {
            let _ = writeln!(
                out,
                "{:<4} {:<22} {:>10} {:>14} {:>9} {:>12} {:>6} {:>7} {:>12} {:>6} {:>7}  {}",
                crate::windows::window_name(w.id),
                w.label,
                w.oncpu_samples,
                ms(w.offcpu_ns),
                w.offcpu_blocks,
                ms(w.lock_wait_ns),
                w.forks,
                w.cgroup_ops,
                ms(w.dbus_ns),
                w.processes,
                w.losses.values().sum::<u64>(),
                w.dir
            );
        }
        let _ = writeln!(out, "{}", self.offcpu_rule);
        let _ = writeln!(out, "{}", self.attribute_rule);
        self.cost_text(&mut out);
        self.unwind_text(&mut out);
        self.verify_unwind_text(&mut out);
        if self.total_losses == 0 {
            out.push_str("\nlosses: none\n");
        } else {
            let _ = writeln!(out, "\nlosses: {} in all", self.total_losses);
            for w in &self.windows {
                for (k, n) in &w.losses {
                    let _ = writeln!(
                        out,
                        "  window {:<3} {k}: {n}",
                        crate::windows::window_name(w.id)
                    );
                }
            }
            for (k, n) in &self.other_losses {
                let _ = writeln!(out, "  outside windows  {k}: {n}");
            }
        }
        out
    }

    /// With `--unwind dwarf`: how the user-stack walks ended, per window.
    fn unwind_text(&self, out: &mut String) {
        use profiler_common::unwind::UnwindStop;
        let frame_kinds = [UnwindStop::FramesDwarf.name(), UnwindStop::FramesFp.name()];
        let mut total: BTreeMap<&str, u64> = BTreeMap::new();
        for w in &self.windows {
            for (k, n) in &w.unwind {
                *total.entry(k.as_str()).or_default() += n;
            }
        }
        if total.is_empty() {
            return;
        }
        let walks: u64 = total
            .iter()
            .filter(|(k, _)| !frame_kinds.contains(k))
            .map(|(_, n)| n)
            .sum();
        let complete = total.get(UnwindStop::Complete.name()).copied().unwrap_or(0);
        #[expect(clippy::cast_precision_loss, reason = "a percentage")]
        let pct = complete as f64 * 100.0 / walks.max(1) as f64;
        let _ = writeln!(
            out,
            "
user stacks unwound from .eh_frame: {walks} walks, {pct:.1} % to the thread's or \
             process's entry; frames: {} from tables, {} by frame pointer",
            total.get(frame_kinds[0]).copied().unwrap_or(0),
            total.get(frame_kinds[1]).copied().unwrap_or(0),
        );
        for w in &self.windows {
            let stops: Vec<String> = w
                .unwind
                .iter()
                .filter(|(k, _)| !frame_kinds.contains(&k.as_str()))
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            if !stops.is_empty() {
                let _ = writeln!(
                    out,
                    "  window {:<3} ended: {}",
                    crate::windows::window_name(w.id),
                    stops.join(", ")
                );
            }
        }
    }

    /// With `--verify-unwind`: how the kernel's walks compared with
    /// framehop's, and the first few that did not agree.
    fn verify_unwind_text(&self, out: &mut String) {
        let Some(v) = &self.verify_unwind else {
            return;
        };
        let _ = write!(
            out,
            "\nunwind verified: {} stacks copied and unwound again in userspace (framehop): \
             {} the same, {} differ, {} cut by the copy",
            v.samples, v.same, v.differs, v.short
        );
        for (n, what) in [
            (
                v.same_with_older_mappings,
                "of them matched with older mappings (the kernel's tables lagged)",
            ),
            (v.kernel_shorter, "ended sooner in the kernel"),
            (v.framehop_shorter, "ended sooner in framehop"),
            (v.unchecked, "not checked (no mappings known)"),
        ] {
            if n > 0 {
                let _ = write!(out, ", {n} {what}");
            }
        }
        out.push('\n');
        for e in &v.examples {
            let _ = writeln!(out, "  {}", e.replace('\n', "\n  "));
        }
    }

    /// With `--bpf-stats`: what each eBPF program cost, hvprof's own
    /// process, and what the cost went to.
    fn cost_text(&self, out: &mut String) {
        if !self.program_stats.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<22} {:>12} {:>12} {:>10}",
                "EBPF PROGRAM", "RUNS", "TOTAL", "NS/RUN"
            );
            for p in &self.program_stats {
                let _ = writeln!(
                    out,
                    "{:<22} {:>12} {:>12} {:>10}",
                    p.program,
                    p.runs,
                    ms(p.run_time_ns),
                    p.run_time_ns.checked_div(p.runs).unwrap_or(0)
                );
            }
            if let Some(ns) = self.self_cpu_ns {
                let _ = writeln!(
                    out,
                    "{:<22} {:>25}  (its process, while recording)",
                    "hvprof itself",
                    ms(ns)
                );
            }
            // What the programs' cost goes to: stack walks taken and saved.
            if !self.counters.is_empty() {
                out.push('\n');
                for (name, n) in &self.counters {
                    let _ = writeln!(out, "{name:<48} {n:>12}");
                }
            }
        }
    }
}

/// Writes every per-window output and the summary into `dir`.
pub fn write_all(profile: &Profile, dir: &Path) -> Result<Summary, RenderError> {
    let mkdir = |p: &Path| {
        fs::create_dir_all(p).map_err(|source| RenderError::Write {
            path: p.to_path_buf(),
            source,
        })
    };
    mkdir(dir)?;
    for w in &profile.windows {
        mkdir(&dir.join(w.dir_name()))?;
    }
    render_all(profile, dir, &|path, contents| {
        let file = fs::File::create(path).and_then(|f| {
            let mut out = io::BufWriter::with_capacity(1 << 20, f);
            contents(&mut out)?;
            out.flush()
        });
        file.map_err(|source| RenderError::Write {
            path: path.to_path_buf(),
            source,
        })
    })
}

/// Renders what [`write_all`] writes, handing each file to `emit` (its
/// path under `dir`, which it does not create, and its contents): the
/// fuzz targets render a profile without a disk.
pub fn render_all(profile: &Profile, dir: &Path, emit: &Emit<'_>) -> Result<Summary, RenderError> {
    // Each window's graphs and tables render independently, and the flame
    // graphs are most of a report's time: one piece of work each, so that
    // a recording of one window uses every CPU too.
    let work: Vec<(&WindowInfo, Option<&Graph>)> = profile
        .windows
        .iter()
        .flat_map(|w| {
            GRAPHS
                .iter()
                .map(move |&g| (w, Some(g)))
                .chain(std::iter::once((w, None)))
        })
        .collect();
    parallel_map(&work, |&(w, graph)| {
        let wdir = dir.join(w.dir_name());
        match graph {
            Some(g) => render_graph(profile, w, g, &wdir, emit),
            None => render_tables(profile, Some(w.id), &wdir, emit),
        }
    })?;
    render_tables(profile, None, dir, emit)?;
    let summary = summary(profile);
    put(emit, &dir.join("summary.txt"), summary.to_text().as_bytes())?;
    let json = serde_json::to_string_pretty(&summary).map_err(|e| RenderError::Write {
        path: dir.join("summary.json"),
        source: io::Error::other(e),
    })?;
    put(emit, &dir.join("summary.json"), json.as_bytes())?;
    Ok(summary)
}

/// `f` of every item, in the items' order, computed on one thread per CPU
/// (each taking the next item), or the first error met (the threads then
/// stop taking items). For independent pieces of work that take long
/// enough to be worth a thread: windows, flame graphs, profile files.
pub fn parallel_map<T, R, E>(
    items: &[T],
    f: impl Fn(&T) -> Result<R, E> + Sync,
) -> Result<Vec<R>, E>
where
    T: Sync,
    R: Send,
    E: Send,
{
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let (next, failed) = (AtomicUsize::new(0), AtomicBool::new(false));
    // Each thread's results, tagged with their item's index.
    let work = || {
        let mut done = Vec::new();
        while !failed.load(Relaxed) {
            let i = next.fetch_add(1, Relaxed);
            let Some(item) = items.get(i) else { break };
            match f(item) {
                Ok(r) => done.push((i, r)),
                Err(e) => {
                    failed.store(true, Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(done)
    };
    let per_thread: Vec<Result<Vec<(usize, R)>, E>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads).map(|_| scope.spawn(work)).collect();
        workers
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut all = Vec::with_capacity(items.len());
    for done in per_thread {
        all.extend(done?);
    }
    all.sort_unstable_by_key(|&(i, _)| i);
    Ok(all.into_iter().map(|(_, r)| r).collect())
}

/// One window's folded file and flame graph of `g`.
fn render_graph(
    profile: &Profile,
    w: &WindowInfo,
    g: &Graph,
    wdir: &Path,
    emit: &Emit<'_>,
) -> Result<(), RenderError> {
    let fold = g.fold(profile, w.id);
    emit(&wdir.join(format!("{}.folded", g.name)), &mut |w| {
        fold.write_text(w)
    })?;
    let drawn = drawn(&fold);
    drop(fold);
    let path = wdir.join(format!("{}.svg", g.name));
    let mut svg = Vec::new();
    write_flame_graph(
        drawn.iter().map(String::as_str),
        &g.title_for(w),
        g.count_name(),
        &mut svg,
    )
    .map_err(|source| RenderError::FlameGraph {
        path: path.clone(),
        source,
    })?;
    put(emit, &path, &svg)
}

/// `NAME.txt`, `.md`, `.csv` and `.json` of every table, for one window or
/// the whole recording.
fn render_tables(
    profile: &Profile,
    window: Option<u32>,
    dir: &Path,
    emit: &Emit<'_>,
) -> Result<(), RenderError> {
    for t in TABLES {
        let (name, human) = (t.name(), t.table(profile, window, true));
        let note = t
            .note(profile, window)
            .map(|n| format!("\n{n}"))
            .unwrap_or_default();
        put(
            emit,
            &dir.join(format!("{name}.txt")),
            format!("{}{note}", human.text()).as_bytes(),
        )?;
        put(
            emit,
            &dir.join(format!("{name}.md")),
            human.markdown().as_bytes(),
        )?;
        put(
            emit,
            &dir.join(format!("{name}.csv")),
            t.table(profile, window, false).csv().as_bytes(),
        )?;
        let path = dir.join(format!("{name}.json"));
        let json = t.json(profile, window).map_err(|e| RenderError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        put(emit, &path, json.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{FrameTable, OffCpu, OnCpu};

    fn profile() -> Profile {
        let mut t = FrameTable::default();
        let (a, b, c) = (
            t.intern("main"),
            t.intern("busy"),
            t.intern("do;weird name"),
        );
        let on = |window, stack: Vec<u32>, samples| OnCpu {
            window,
            tgid: 1,
            pid: 1,
            comm: "vm load".into(),
            stack,
            samples,
        };
        Profile {
            windows: crate::windows::WindowSpec::Every { size: 2 }.windows(2),
            frames: t.into_names(),
            oncpu: vec![
                on(1, vec![a, b], 3),
                on(1, vec![a, b], 4),
                on(1, vec![a, c], 1),
                on(0, vec![a], 9),
            ],
            offcpu: vec![OffCpu {
                window: 1,
                tgid: 1,
                pid: 2,
                comm: "t".into(),
                state: "S".into(),
                stack: vec![a],
                blocks: 2,
                total_ns: 2_500_000,
                max_ns: 2_000_000,
                runq_ns: 0,
                dbus: None,
                unfinished: false,
            }],
            ..Profile::default()
        }
    }

    /// A flame graph from the drawn lines is the graph from all of them,
    /// byte for byte, from a fraction of the text: 20 000 deep stacks under
    /// a few wide frames.
    #[test]
    fn the_drawn_lines_draw_the_same_graph() {
        let mut t = FrameTable::default();
        // No name begins another (see `drawn`).
        let frames: Vec<u32> = (0..400).map(|i| t.intern(&format!("f{i:03}"))).collect();
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % n
        };
        let oncpu = (0..20_000usize)
            .map(|i| {
                // Three wide roots, then a random tail.
                let mut stack = vec![frames[i % 3], frames[3 + i % 7]];
                for _ in 0..(2 + next(30)) {
                    stack.push(frames[usize::try_from(next(400)).unwrap_or(0)]);
                }
                OnCpu {
                    window: 0,
                    tgid: 1,
                    pid: 1,
                    comm: "w".into(),
                    stack,
                    samples: 1 + next(3) * next(3),
                }
            })
            .collect();
        let p = Profile {
            windows: crate::windows::WindowSpec::Every { size: 2 }.windows(0),
            frames: t.into_names(),
            oncpu,
            ..Profile::default()
        };
        let fold = crate::graphs::ONCPU.fold(&p, 0);
        let all: Vec<String> = fold.stacks.iter().map(|(s, n)| fold.line(s, *n)).collect();
        let drawn = drawn(&fold);
        let bytes = |lines: &[String]| lines.iter().map(String::len).sum::<usize>();
        assert!(
            bytes(&drawn) * 3 < bytes(&all),
            "{} bytes drawn of {}",
            bytes(&drawn),
            bytes(&all)
        );
        let svg = |lines: &[String]| {
            let mut out = Vec::new();
            write_flame_graph(lines.iter().map(String::as_str), "t", "samples", &mut out)
                .expect("render");
            out
        };
        assert!(svg(&all) == svg(&drawn), "the graphs differ");
    }

    #[test]
    fn verified_unwinds_are_summarized_only_when_recorded() {
        let mut p = profile();
        assert!(!summary(&p).to_text().contains("unwind verified"));
        p.meta.verify_unwind = Some(crate::profile::VerifyUnwind {
            samples: 12,
            same: 10,
            short: 2,
            examples: vec!["tgid 1 pid 1: frame 1 differs\n  kernel: 0x1".into()],
            ..crate::profile::VerifyUnwind::default()
        });
        let text = summary(&p).to_text();
        assert!(
            text.contains(
                "unwind verified: 12 stacks copied and unwound again in userspace (framehop): \
                 10 the same, 0 differ, 2 cut by the copy\n  tgid 1 pid 1: frame 1 differs\n    \
                 kernel: 0x1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn parallel_map_keeps_the_order_and_stops_on_an_error() {
        let items: Vec<u32> = (0..200).collect();
        let doubled: Result<Vec<u32>, String> = parallel_map(&items, |&i| Ok(i * 2));
        assert_eq!(
            doubled.unwrap(),
            items.iter().map(|i| i * 2).collect::<Vec<_>>()
        );
        let taken = std::sync::atomic::AtomicUsize::new(0);
        let failed = parallel_map(&items, |&i| {
            taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i == 3 {
                return Err(format!("item {i}"));
            }
            // Slow enough that no thread runs through every item before
            // the error is seen.
            std::thread::sleep(std::time::Duration::from_millis(1));
            Ok(i)
        });
        assert_eq!(failed, Err("item 3".to_owned()));
        // The threads stopped taking items soon after the error.
        assert!(taken.into_inner() < items.len(), "every item was still run");
        assert_eq!(parallel_map(&[] as &[u32], |&i| Ok::<_, ()>(i)), Ok(vec![]));
    }

    #[test]
    fn writes_every_output() {
        let dir = std::env::temp_dir().join(format!("hvprof-render-{}", std::process::id()));
        let s = write_all(&profile(), &dir).unwrap();
        assert_eq!(s.windows.len(), 2);
        assert_eq!(s.windows[1].oncpu_samples, 8);
        assert_eq!(s.windows[1].offcpu_ns, 2_500_000);
        for f in [
            "w00-setup/oncpu.svg",
            "w01-vms-1-2/oncpu.svg",
            "w01-vms-1-2/offcpu.svg",
            "summary.txt",
            "summary.json",
        ] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        let svg = fs::read_to_string(dir.join("w01-vms-1-2/oncpu.svg")).unwrap();
        assert!(svg.contains("On-CPU: window 1 (VMs 1\u{2013}2)"), "title");
        assert!(svg.contains("busy"));
        let empty = fs::read_to_string(dir.join("w00-setup/offcpu.svg")).unwrap();
        assert!(empty.contains("nothing recorded"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
