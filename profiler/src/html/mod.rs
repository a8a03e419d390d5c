//! The self-contained HTML report (`hvprof report PROFILE --html`): one file
//! with the recording's header, the VM timeline, a VM-ordinal heatmap, and
//! per window its flame graphs, tables and losses, then the whole
//! recording's tables. No network fetches: the styles, the scripts and every
//! SVG are inline.
//!
//! Everything that comes from the recorded system (frame names, comms,
//! command lines, guest names, cgroup paths, D-Bus names) goes through
//! [`escape`]. Each inferno flame graph is embedded as the `srcdoc` of its
//! own `<iframe>`, so its script (zoom, search) runs in a document of its
//! own: several graphs' global variables cannot clash, and the SVG stays in
//! an attribute value, where no sequence of its characters can close it.
//!
//! The page skeleton is reusable (the diff report uses it): [`page`],
//! [`escape`], [`table`], [`flame_graph_frame`], [`window_nav`] and
//! [`window_section`]. A page whose graphs are too big to inline keeps them
//! as files next to it instead ([`page_with_graph_files`],
//! [`flame_graph_file_frame`]).

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

mod charts;

use crate::{
    ci,
    graphs::GRAPHS,
    profile::{Profile, VmCreation},
    render::{self, RenderError},
    tables::{TABLES, Table, human_ns},
    windows::WindowInfo,
};

/// The report's file name in the output directory.
pub const FILE_NAME: &str = "report.html";

/// Escapes text for HTML and SVG element content and for attribute values
/// (quoted with `"` or `'`).
#[must_use]
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
:root { --fg: #1d1d1f; --muted: #666; --line: #ddd; --accent: #b3261e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); margin: 0 auto; padding: 1em 1.5em 4em; max-width: 1280px; }
h1 { font-size: 1.6em; margin: .2em 0 .4em; }
h2 { font-size: 1.3em; margin: 1.8em 0 .5em; border-bottom: 2px solid var(--line); padding-bottom: .2em; }
h3 { font-size: 1.1em; margin: 1.2em 0 .4em; }
code, .mono, td, th { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .15em 1.2em; margin: 0; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; word-break: break-all; }
table { border-collapse: collapse; margin: .3em 0 1em; }
th, td { border: 1px solid var(--line); padding: .15em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num, th.num { text-align: right; white-space: nowrap; }
td.num.up { color: #b00; }
td.num.down { color: #05a; }
p.note, .muted { color: var(--muted); }
.scroll { overflow-x: auto; }
nav.windows { display: flex; flex-wrap: wrap; gap: .3em; margin: .5em 0 1em; position: sticky; top: 0; background: #fff; padding: .4em 0; z-index: 2; border-bottom: 1px solid var(--line); }
nav.windows button { font: inherit; padding: .25em .7em; border: 1px solid #aaa; border-radius: 4px; background: #fafafa; cursor: pointer; }
nav.windows button.selected { background: var(--accent); color: #fff; border-color: var(--accent); }
figure.flame { margin: .6em 0 1.2em; }
figure.flame figcaption { font-weight: 600; margin-bottom: .2em; }
figure.flame iframe { width: 100%; border: 1px solid var(--line); display: block; }
table.heatmap td.cell { cursor: pointer; text-align: right; min-width: 5.5em; }
table.heatmap td.cell.selected { outline: 3px solid #1a73e8; outline-offset: -3px; }
table.heatmap th.win { cursor: pointer; text-align: center; }
svg.chart { display: block; max-width: 100%; height: auto; font: 11px system-ui, sans-serif; }
svg.chart .axis { stroke: #888; }
svg.chart .grid { stroke: #eee; }
"#;

/// The page's own script: window selection (buttons, heatmap cells, timeline
/// bands: any element with `data-select-window`), loading the flame graph
/// frames of the selected window (those outside windows at once), and the
/// heatmap's per-VM switch. It moves only attribute values the report wrote
/// (escaped) and never builds markup from them.
const SCRIPT: &str = r#"
(function () {
  "use strict";
  var FRAMES = "iframe[data-srcdoc], iframe[data-src]:not([src])";
  function show(frame) {
    if (frame.hasAttribute("data-src")) {
      frame.src = frame.getAttribute("data-src");
    } else {
      frame.srcdoc = frame.getAttribute("data-srcdoc");
      frame.removeAttribute("data-srcdoc");
    }
  }
  function load(scope) {
    scope.querySelectorAll(FRAMES).forEach(show);
  }
  // A graph file's frame is dropped when its window hides (a fresh one
  // loads it again when shown): big graphs do not pile up in memory, and
  // inferno's script never lays a graph out to a hidden, 0 px wide frame.
  function unload(scope) {
    scope.querySelectorAll("iframe[data-src][src]").forEach(function (f) {
      var fresh = f.cloneNode(false);
      fresh.removeAttribute("src");
      f.replaceWith(fresh);
    });
  }
  function select(id) {
    document.querySelectorAll("section.window").forEach(function (s) {
      var on = s.getAttribute("data-window") === id;
      if (!on) unload(s);
      s.hidden = !on;
      if (on) load(s);
    });
    document.querySelectorAll("[data-select-window]").forEach(function (b) {
      b.classList.toggle("selected", b.getAttribute("data-select-window") === id);
    });
    document.body.setAttribute("data-selected-window", id);
  }
  document.addEventListener("click", function (e) {
    var t = e.target.closest("[data-select-window]");
    if (!t) return;
    select(t.getAttribute("data-select-window"));
    if (t.hasAttribute("data-scroll")) {
      var v = document.getElementById("window-view");
      if (v) v.scrollIntoView();
    }
  });
  var perVm = document.getElementById("heatmap-per-vm");
  if (perVm) perVm.addEventListener("change", function () {
    document.querySelectorAll("table.heatmap td.cell").forEach(function (c) {
      ["style", "title", "data-text"].forEach(function (a) {
        var alt = c.getAttribute("data-alt-" + a);
        c.setAttribute("data-alt-" + a, c.getAttribute(a) || "");
        c.setAttribute(a, alt);
      });
      c.textContent = c.getAttribute("data-text");
    });
  });
  document.querySelectorAll(FRAMES).forEach(function (f) {
    if (!f.closest("section.window")) show(f);
  });
  var nav = document.querySelector("nav.windows");
  if (nav) select(nav.getAttribute("data-initial"));
})();
"#;

/// A whole page: `<head>` with the report's style and a content security
/// policy that forbids every fetch, `body`, then the report's script.
/// `title` is plain text (escaped here); `body` is markup.
#[must_use]
pub fn page(title: &str, body: &str) -> String {
    page_with_csp(title, body, "")
}

/// [`page`] whose policy lets frames load files from the page's own place
/// (its directory, opened from disk or served): for
/// [`flame_graph_file_frame`]s. Still nothing else is fetched.
#[must_use]
pub fn page_with_graph_files(title: &str, body: &str) -> String {
    // `'self'` for a served directory; `file:` because browsers differ in
    // whether `'self'` covers a file next to a page opened from disk.
    page_with_csp(title, body, "; frame-src 'self' file:")
}

fn page_with_csp(title: &str, body: &str, more_csp: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:{more_csp}\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n\
         <script>{SCRIPT}</script>\n</body>\n</html>\n",
        escape(title)
    )
}

/// A [`Table`] as an HTML table (numeric columns right-aligned; signed
/// numbers, a diff's deltas, red when `+`, blue when `-`), or its "nothing
/// recorded" sentence when it has no rows.
#[must_use]
pub fn table(t: &Table) -> String {
    if t.rows.is_empty() {
        return format!("<p class=\"note\">({})</p>\n", escape(t.empty));
    }
    let numeric = |i: usize| t.numeric.get(i).copied().unwrap_or(false);
    let mut out = String::from("<div class=\"scroll\"><table>\n<thead><tr>");
    for (i, h) in t.headers.iter().enumerate() {
        let class = if numeric(i) { " class=\"num\"" } else { "" };
        let _ = write!(out, "<th{class}>{}</th>", escape(h));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for r in &t.rows {
        out.push_str("<tr>");
        for (i, c) in r.iter().enumerate() {
            let mut chars = c.chars();
            let class = match (numeric(i), chars.next(), chars.next()) {
                (false, ..) => "",
                (true, Some('+'), Some(d)) if d.is_ascii_digit() => " class=\"num up\"",
                (true, Some('-'), Some(d)) if d.is_ascii_digit() => " class=\"num down\"",
                (true, ..) => " class=\"num\"",
            };
            let _ = write!(out, "<td{class}>{}</td>", escape(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
    out
}

/// A flame graph SVG (inferno's, with its script) in a figure with a
/// caption; `name` (e.g. `oncpu`) becomes the figure's `data-graph`. The SVG
/// becomes the `srcdoc` of an iframe when the window it is in is selected
/// (at once outside windows): it runs in a document of its own. `caption`
/// and `name` are plain text.
#[must_use]
pub fn flame_graph_frame(svg: &[u8], name: &str, caption: &str) -> String {
    let svg = String::from_utf8_lossy(svg);
    // The XML prologue and DOCTYPE mean nothing in an HTML document.
    let body = svg.find("<svg").map_or(&*svg, |i| &svg[i..]);
    let height = svg_height(body).unwrap_or(400) + 4;
    // The document is HTML: an SVG without a width attribute (inferno's
    // script removes it to follow the frame's width) would be 300 px wide.
    // history.replaceState (inferno keeps the zoom in the URL) throws in an
    // about:srcdoc document: keep zoom working without the error. A frame
    // in a hidden window is 0 px wide: inferno's resize handler would set
    // a negative width; it runs again when the frame shows.
    let doc = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><style>html,body{{margin:0}}\
         body>svg{{display:block;width:100%}}</style><script>(function(h){{var r=h.replaceState;\
         h.replaceState=function(){{try{{return r.apply(h,arguments)}}catch(e){{}}}}}})(history);\
         addEventListener(\"resize\",function(e){{if(innerWidth<50)e.stopImmediatePropagation()}})\
         </script></head><body>{body}</body></html>"
    );
    // Single-quoted attribute: only `&` and `'` are special in it, so the
    // SVG's many `"` stay one byte each.
    let mut attr = String::with_capacity(doc.len() + doc.len() / 16);
    for c in doc.chars() {
        match c {
            '&' => attr.push_str("&amp;"),
            '\'' => attr.push_str("&#39;"),
            c => attr.push(c),
        }
    }
    format!(
        "<figure class=\"flame\" data-graph=\"{}\"><figcaption>{}</figcaption>\
         <iframe title=\"{}\" height=\"{height}\" data-srcdoc='{attr}'></iframe></figure>\n",
        escape(name),
        escape(caption),
        escape(caption)
    )
}

/// A flame graph kept as a file next to the page (`src`, relative to it,
/// `height` its SVG's): [`flame_graph_frame`]'s figure, but the frame loads
/// the file itself when the window it is in is selected (at once outside
/// windows) and drops it when another window is, and a link opens it
/// alone. For graphs too big to inline: the page stays small, and a
/// browser holds only the graphs looked at. Only on a
/// [`page_with_graph_files`]. `src`, `name` and `caption` are plain text.
#[must_use]
pub fn flame_graph_file_frame(src: &str, height: u32, name: &str, caption: &str) -> String {
    format!(
        "<figure class=\"flame\" data-graph=\"{name}\"><figcaption>{caption} \
         <a href=\"{src}\" target=\"_blank\">(open)</a></figcaption>\
         <iframe title=\"{caption}\" height=\"{}\" data-src=\"{src}\"></iframe></figure>\n",
        height + 4,
        name = escape(name),
        caption = escape(caption),
        src = escape(src),
    )
}

/// The `height` of the first `<svg` element (inferno writes it), given the
/// start of an SVG document.
#[must_use]
pub fn svg_height(svg: &str) -> Option<u32> {
    let svg = &svg[svg.find("<svg")?..];
    let tag = &svg[..svg.find('>')?];
    let rest = &tag[tag.find(" height=\"")? + 9..];
    rest[..rest.find('"')?].parse().ok()
}

/// The window selector: one button per `(id, label)`; `initial` (else the
/// first) is selected when the page opens. Pairs with [`window_section`].
#[must_use]
pub fn window_nav(windows: &[(u32, String)], initial: Option<u32>) -> String {
    let initial = initial.or(windows.first().map(|w| w.0)).unwrap_or(0);
    let mut out =
        format!("<nav class=\"windows\" aria-label=\"windows\" data-initial=\"{initial}\">\n");
    for (id, label) in windows {
        let _ = writeln!(
            out,
            "<button type=\"button\" data-select-window=\"{id}\">{} {}</button>",
            crate::windows::window_name(*id),
            escape(label)
        );
    }
    out.push_str("</nav>\n");
    out
}

/// One window's panel: shown when its window is selected, and its flame
/// graph frames load then. `body` is markup.
#[must_use]
pub fn window_section(id: u32, body: &str) -> String {
    format!(
        "<section class=\"window\" data-window=\"{id}\" id=\"window-{id}\" hidden>\n{body}</section>\n"
    )
}

/// Renders one flame graph in memory.
fn flame_svg(lines: &[String], title: &str, unit: &str) -> Result<Vec<u8>, RenderError> {
    let mut svg = Vec::new();
    render::write_flame_graph(lines.iter().map(String::as_str), title, unit, &mut svg).map_err(
        |source| RenderError::FlameGraph {
            path: title.into(),
            source,
        },
    )?;
    Ok(svg)
}

/// How long each VM took to be created, where the profile shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmLatency {
    pub ordinal: u64,
    pub window: Option<u32>,
    /// Since the previous VM creation (any process).
    pub since_previous_ns: Option<u64>,
    /// From the fork that started the VM's process to the creation: the
    /// fork of the VM's process, or of its forked parent when that parent
    /// never exec'd (libvirt forks a child that forks QEMU), when the fork
    /// was recorded and this is the first VM of that process.
    pub fork_to_create_ns: Option<u64>,
    /// From the VM process's exec to the creation (the VMM's own start-up
    /// until `KVM_CREATE_VM`), when the exec was recorded and this is the
    /// first VM of that process.
    pub exec_to_create_ns: Option<u64>,
}

/// Per-VM creation latencies, in ordinal order.
#[must_use]
pub fn vm_latencies(profile: &Profile) -> Vec<VmLatency> {
    let procs: BTreeMap<u32, &crate::profile::Process> =
        profile.processes.iter().map(|p| (p.tgid, p)).collect();
    let mut vms: Vec<&VmCreation> = profile.vms.iter().collect();
    vms.sort_by_key(|v| v.ordinal);
    let mut seen_pids = std::collections::HashSet::new();
    let vm_pids: std::collections::HashSet<u32> = vms.iter().map(|v| v.pid).collect();
    let mut prev: Option<u64> = None;
    vms.iter()
        .map(|v| {
            let first_of_process = seen_pids.insert(v.pid);
            let proc = procs.get(&v.pid).filter(|_| first_of_process);
            let fork = proc.and_then(|p| {
                let mut fork = p.forked_ns?;
                // libvirt (virCommand) forks a child that forks QEMU: start
                // at the outer fork when the parent is such a helper — it
                // was forked while recording, never exec'd, made no VM.
                if let Some(parent) = p.parent.and_then(|pp| procs.get(&pp))
                    && parent.exec_ns.is_none()
                    && !vm_pids.contains(&parent.tgid)
                    && let Some(f) = parent.forked_ns
                {
                    fork = f.min(fork);
                }
                Some(fork)
            });
            let lat = VmLatency {
                ordinal: v.ordinal,
                window: window_of_vm(profile, v.ordinal),
                since_previous_ns: prev.map(|p| v.time_ns.saturating_sub(p)),
                fork_to_create_ns: fork.filter(|&f| f <= v.time_ns).map(|f| v.time_ns - f),
                exec_to_create_ns: proc
                    .and_then(|p| p.exec_ns)
                    .filter(|&e| e <= v.time_ns)
                    .map(|e| v.time_ns - e),
            };
            prev = Some(v.time_ns);
            lat
        })
        .collect()
}

fn window_of_vm(profile: &Profile, ordinal: u64) -> Option<u32> {
    profile
        .windows
        .iter()
        .find(
            |w| matches!((w.first_vm, w.last_vm), (Some(a), Some(b)) if (a..=b).contains(&ordinal)),
        )
        .map(|w| w.id)
}

/// The whole report for `profile`, as one HTML document.
pub fn report(profile: &Profile) -> Result<String, RenderError> {
    let summary = render::summary(profile);
    let mut body = String::new();
    header(profile, &summary, &mut body);
    charts::timeline(profile, &mut body);
    charts::heatmap(profile, &summary, &mut body);

    body.push_str("<h2 id=\"window-view\">Per window</h2>\n");
    let nav: Vec<(u32, String)> = profile.windows.iter().map(|w| (w.id, w.label())).collect();
    // Open on the first window with VMs: the setup is rarely the question.
    let initial = profile
        .windows
        .iter()
        .find(|w| w.first_vm.is_some())
        .or(profile.windows.first())
        .map(|w| w.id);
    body.push_str(&window_nav(&nav, initial));
    for w in &profile.windows {
        let panel = window_panel(profile, &summary, w)?;
        body.push_str(&window_section(w.id, &panel));
    }

    body.push_str("<h2 id=\"whole\">Whole recording</h2>\n");
    body.push_str(&tables_html(profile, None));
    Ok(page(
        &format!("hvprof report: {}", profile.meta.target),
        &body,
    ))
}

/// Writes [`report`] to `path`.
pub fn write_report(profile: &Profile, path: &Path) -> Result<(), RenderError> {
    let html = report(profile)?;
    fs::write(path, html).map_err(|source| RenderError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn header(profile: &Profile, summary: &render::Summary, out: &mut String) {
    let m = &profile.meta;
    let _ = writeln!(out, "<h1>hvprof report: {}</h1>", escape(&m.target));
    out.push_str("<dl class=\"meta\">\n");
    let mut row = |k: &str, v: &str| {
        let _ = writeln!(out, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(v));
    };
    row("target", &m.target);
    row("kernel", &m.kernel);
    row("host", &format!("{} ({} CPUs)", m.hostname, m.cpus));
    if m.started_unix_ms > 0 {
        row("started", &utc(m.started_unix_ms));
    }
    row("duration", &human_ns(m.duration_ns));
    row("stop reason", &m.stop_reason);
    row("tracers", &m.tracers.join(", "));
    row("sampling", &format!("{} Hz", m.frequency_hz));
    row("windows", &summary.windows_spec);
    row("off-CPU time", &summary.offcpu_rule);
    row("windows", &summary.attribute_rule);
    row("VM events", &m.vm_events.join(", "));
    row("VMs created", &summary.vms_created.to_string());
    row(
        "losses",
        &if summary.total_losses == 0 {
            "none".to_owned()
        } else {
            format!("{} in all (per window below)", summary.total_losses)
        },
    );
    row("command", &m.command_line.join(" "));
    row("hvprof", &m.hvprof_version);
    out.push_str("</dl>\n");
    if !summary.other_losses.is_empty() {
        out.push_str("<h3>Losses outside every window</h3>\n");
        out.push_str(&losses_table(&summary.other_losses));
    }
}

/// `2026-11-22 00:37:53 UTC` from Unix milliseconds.
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn losses_table(losses: &BTreeMap<String, u64>) -> String {
    table(&Table {
        headers: vec!["loss", "count"],
        numeric: vec![false, true],
        rows: losses
            .iter()
            .map(|(k, n)| vec![k.clone(), n.to_string()])
            .collect(),
        empty: "no losses",
    })
}

fn window_panel(
    profile: &Profile,
    summary: &render::Summary,
    w: &WindowInfo,
) -> Result<String, RenderError> {
    let mut out = String::new();
    let ws = summary.windows.iter().find(|s| s.id == w.id);
    let _ = writeln!(
        out,
        "<h3>Window {}: {}</h3>\n<p class=\"note\">{}</p>",
        w.id,
        escape(&w.label()),
        escape(&ws.map_or_else(String::new, |s| format!(
            "{} on-CPU samples, {} off CPU in {} blocks, {} lock wait, {} forks, {} cgroup operations, {} in {} blocking D-Bus calls, {} processes",
            s.oncpu_samples,
            human_ns(s.offcpu_ns),
            s.offcpu_blocks,
            human_ns(s.lock_wait_ns),
            s.forks,
            s.cgroup_ops,
            human_ns(s.dbus_ns),
            s.dbus_calls,
            s.processes
        )))
    );
    for g in GRAPHS {
        let lines = g.folded(profile, w.id);
        let title = g.title_for(w);
        let svg = flame_svg(&lines, &title, g.count_name())?;
        let mut caption = title.clone();
        if !profile.recorded(g.tracer) {
            let _ = write!(
                caption,
                " \u{2014} the {} tracer was not part of this recording",
                g.tracer.name()
            );
        }
        out.push_str(&flame_graph_frame(&svg, g.name, &caption));
    }
    out.push_str(&tables_html(profile, Some(w.id)));
    out.push_str("<h4>Losses</h4>\n");
    out.push_str(&losses_table(
        &ws.map(|s| s.losses.clone()).unwrap_or_default(),
    ));
    Ok(out)
}

/// Every table of one window or of the whole recording, each under its
/// title, or a note that its tracer did not run.
fn tables_html(profile: &Profile, window: Option<u32>) -> String {
    let mut out = String::new();
    for t in TABLES {
        let _ = writeln!(out, "<h4>{}</h4>", escape(&capitalized(t.title())));
        if profile.recorded(t.tracer()) {
            out.push_str(&table(&t.table(profile, window, true)));
            if let Some(note) = t.note(profile, window) {
                let _ = writeln!(out, "<p class=\"note\">{}</p>", escape(note.trim_end()));
            }
        } else {
            let _ = writeln!(
                out,
                "<p class=\"note\">(the {} tracer was not part of this recording)</p>",
                escape(t.tracer().name())
            );
        }
    }
    out
}

/// `Forks` from `forks`.
fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|first| first.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }

    #[test]
    fn tables_escape_cells() {
        let t = Table {
            headers: vec!["name", "n"],
            numeric: vec![false, true],
            rows: vec![vec!["<b>".into(), "1".into()]],
            empty: "none",
        };
        let h = table(&t);
        assert!(
            h.contains("<td>&lt;b&gt;</td><td class=\"num\">1</td>"),
            "{h}"
        );
        let empty = Table { rows: vec![], ..t };
        assert_eq!(table(&empty), "<p class=\"note\">(none)</p>\n");
    }

    #[test]
    fn frames_keep_the_svg_in_one_attribute() {
        let svg = br#"<?xml version="1.0"?><svg height="42" x='a'><title>&lt;x&gt; it's</title><script>var a = '</script>';</script></svg>"#;
        let h = flame_graph_frame(svg, "oncpu", "t <1>");
        assert!(h.contains("height=\"46\""), "{h}");
        let attr = h.split("data-srcdoc='").nth(1).unwrap();
        let attr = &attr[..attr.find('\'').unwrap()];
        assert!(!attr.contains('\''));
        assert!(attr.contains("&amp;lt;x&amp;gt; it&#39;s"), "{attr}");
        assert!(!h.contains("<?xml"));
        assert!(h.contains("<figcaption>t &lt;1&gt;</figcaption>"));
    }

    #[test]
    fn vm_latency_from_the_spawning_fork() {
        use crate::profile::Process;
        let proc = |tgid, parent, forked: Option<u64>, exec: Option<u64>| Process {
            tgid,
            comm: String::new(),
            cmdline: None,
            parent,
            forked_ns: forked,
            exec_ns: exec,
            exit_ns: None,
            fork_window: None,
            exec_window: None,
        };
        let vm = |ordinal, time_ns, pid| VmCreation {
            ordinal,
            time_ns,
            pid,
            tid: pid,
            comm: "qemu".into(),
            source: "kvm".into(),
            cmdline: None,
            name: None,
            token: None,
        };
        let p = Profile {
            windows: crate::windows::WindowSpec::Every { size: 2 }.windows(3),
            processes: vec![
                // libvirtd (not forked while recording) forks a helper
                // (100), which forks QEMU (101), which execs, then creates
                // VM 1.
                proc(100, Some(1), Some(1_000), None),
                proc(101, Some(100), Some(1_500), Some(2_000)),
                // A harness started by hand (exec'd) forks QEMU 201: the
                // harness's own fork is not part of the VM's creation.
                proc(200, Some(1), Some(100), Some(150)),
                proc(201, Some(200), Some(5_000), None),
            ],
            vms: vec![vm(1, 9_000, 101), vm(2, 10_000, 201), vm(3, 12_000, 201)],
            ..Profile::default()
        };
        let l = vm_latencies(&p);
        assert_eq!(l[0].fork_to_create_ns, Some(8_000));
        assert_eq!(l[0].exec_to_create_ns, Some(7_000));
        assert_eq!(l[0].since_previous_ns, None);
        assert_eq!(l[0].window, Some(1));
        assert_eq!(l[1].fork_to_create_ns, Some(5_000));
        assert_eq!(l[1].exec_to_create_ns, None);
        // The same process's second VM: only the gap is known.
        assert_eq!(l[2].fork_to_create_ns, None);
        assert_eq!(l[2].since_previous_ns, Some(2_000));
        assert_eq!(l[2].window, Some(2));
    }

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
    }
}
