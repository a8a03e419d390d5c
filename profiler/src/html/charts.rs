//! The report's charts: the VM timeline, the creation latency histogram,
//! the VM table and the per-window heatmap, as inline SVG and HTML.

use super::*;

#[expect(clippy::cast_precision_loss, reason = "chart coordinates")]
fn coord(v: u64) -> f64 {
    v as f64
}

/// A "nice" tick step (1, 2 or 5 × 10^k) for about `n` ticks up to `max`.
fn tick_step(max: f64, n: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let raw = max / n;
    let mag = 10f64.powf(raw.log10().floor());
    let m = raw / mag;
    mag * if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    }
}

fn tick_label(v: f64, step: f64) -> String {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a few decimals"
    )]
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

const CHART_W: f64 = 900.0;
const CHART_H: f64 = 260.0;
const PAD_L: f64 = 56.0;
const PAD_R: f64 = 70.0;
const PAD_T: f64 = 14.0;
const PAD_B: f64 = 40.0;
/// The plot area's width and height.
const PLOT_W: f64 = CHART_W - PAD_L - PAD_R;
const PLOT_H: f64 = CHART_H - PAD_T - PAD_B;

fn chart_start(out: &mut String, id: &str, what: &str) {
    let _ = write!(
        out,
        "<svg class=\"chart\" id=\"{id}\" viewBox=\"0 0 {CHART_W} {CHART_H}\" width=\"{CHART_W}\" height=\"{CHART_H}\" role=\"img\" aria-label=\"{}\">",
        escape(what)
    );
}

/// The axes and their labels, and the end of the chart.
fn chart_end(out: &mut String, x_label: &str, y_label: &str) {
    let _ = writeln!(
        out,
        "<line class=\"axis\" x1=\"{PAD_L}\" x2=\"{PAD_L}\" y1=\"{PAD_T}\" y2=\"{0:.1}\"/><line class=\"axis\" x1=\"{PAD_L}\" x2=\"{1:.1}\" y1=\"{0:.1}\" y2=\"{0:.1}\"/>\
         <text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"middle\">{x_label}</text>\
         <text transform=\"translate(14 {4:.1}) rotate(-90)\" text-anchor=\"middle\">{y_label}</text></svg>",
        PAD_T + PLOT_H,
        PAD_L + PLOT_W,
        PAD_L + PLOT_W / 2.0,
        CHART_H - 6.0,
        PAD_T + PLOT_H / 2.0,
        x_label = escape(x_label),
        y_label = escape(y_label),
    );
}

pub(super) fn timeline(profile: &Profile, out: &mut String) {
    out.push_str("<h2 id=\"timeline\">VM timeline</h2>\n");
    if profile.vms.is_empty() {
        out.push_str("<p class=\"note\">(no VM was created while recording)</p>\n");
        return;
    }
    let mut vms: Vec<&VmCreation> = profile.vms.iter().collect();
    vms.sort_by_key(|v| v.ordinal);
    let lat = vm_latencies(profile);
    let max_ord = vms.last().map_or(1, |v| v.ordinal).max(1);
    let t_max = coord(
        profile
            .meta
            .duration_ns
            .max(vms.last().map_or(1, |v| v.time_ns)),
    ) / 1e9;
    let (pw, ph) = (PLOT_W, PLOT_H);
    let x = |t_s: f64| PAD_L + t_s / t_max.max(1e-9) * pw;
    let y = |ord: f64| PAD_T + ph - ord / coord(max_ord) * ph;

    out.push_str(
        "<p>Each VM creation against its time since the recording started; the bands are the windows (click one to open it).</p>\n",
    );
    chart_start(out, "vm-timeline", "VM ordinal against creation time");
    window_bands(profile, max_ord, &y, out);
    // Axes and ticks.
    let ts = tick_step(t_max, 8.0);
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{PAD_T}\" y2=\"{1:.1}\"/><text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3}</text>",
            x(t),
            PAD_T + ph,
            PAD_T + ph + 14.0,
            tick_label(t, ts)
        );
        t += ts;
    }
    let os = tick_step(coord(max_ord), 6.0).max(1.0);
    let mut o = 0.0;
    while o <= coord(max_ord) + 1e-9 {
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            PAD_L - 6.0,
            y(o) + 4.0,
            tick_label(o, os)
        );
        o += os;
    }
    // The step line: the count of VMs created so far.
    let mut path = format!("M{:.1},{:.1}", x(0.0), y(0.0));
    for v in &vms {
        let (vx, vy) = (x(coord(v.time_ns) / 1e9), y(coord(v.ordinal)));
        let _ = write!(path, " H{vx:.1} V{vy:.1}");
    }
    let _ = write!(
        path,
        " H{:.1}",
        x(coord(profile.meta.duration_ns) / 1e9).max(x(0.0))
    );
    let _ = write!(
        out,
        "<path d=\"{path}\" fill=\"none\" stroke=\"#b3261e\" stroke-width=\"1.5\"/>"
    );
    for v in &vms {
        let _ = write!(
            out,
            "<circle class=\"vm\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"#b3261e\"><title>{}</title></circle>",
            x(coord(v.time_ns) / 1e9),
            y(coord(v.ordinal)),
            escape(&format!(
                "VM {} at {}: {} pid {}{}",
                v.ordinal,
                human_ns(v.time_ns),
                v.comm,
                v.pid,
                v.name
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ))
        );
    }
    chart_end(out, "time since the start (s)", "VM ordinal");

    latency_chart(&lat, out);
    vm_table(&vms, &lat, out);
}

/// The timeline's horizontal band of each window's VM ordinals.
fn window_bands(profile: &Profile, max_ord: u64, y: &dyn Fn(f64) -> f64, out: &mut String) {
    let (pw, ph) = (PLOT_W, PLOT_H);
    // An unattributed window's VMs are those of a window of VMs too.
    for (i, w) in profile
        .windows
        .iter()
        .filter(|w| !w.unattributed)
        .enumerate()
    {
        let (Some(a), Some(b)) = (w.first_vm, w.last_vm) else {
            continue;
        };
        if a > max_ord {
            continue;
        }
        // A last window the boot did not fill ends at the last VM.
        let b = b.min(max_ord);
        let (y0, y1) = (
            y(coord(b) + 0.5).max(PAD_T),
            y(coord(a) - 0.5).min(PAD_T + ph),
        );
        let fill = if i % 2 == 0 { "#f3f6fb" } else { "#e6edf7" };
        let _ = write!(
            out,
            "<rect x=\"{PAD_L:.1}\" y=\"{y0:.1}\" width=\"{pw:.1}\" height=\"{:.1}\" fill=\"{fill}\" data-select-window=\"{}\" data-scroll=\"\" style=\"cursor:pointer\"><title>window {} ({})</title></rect>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#456\">{} {}</text>",
            (y1 - y0).max(0.0),
            w.id,
            w.id,
            escape(&w.label()),
            PAD_L + pw + 4.0,
            f64::midpoint(y0, y1) + 4.0,
            w.tag(),
            short_label(w)
        );
    }
}

fn latency_chart(lat: &[VmLatency], out: &mut String) {
    // The better measure when the profile has it for most VMs.
    let forks = lat.iter().filter(|l| l.fork_to_create_ns.is_some()).count();
    let use_fork = forks * 2 >= lat.len() && forks > 0;
    let value = |l: &VmLatency| {
        if use_fork {
            l.fork_to_create_ns
        } else {
            l.since_previous_ns
        }
    };
    let what = if use_fork {
        "from the fork that started the VM's process to its creation (libvirt's helper child, then QEMU, up to KVM_CREATE_VM or the exec that counted)"
    } else {
        "the gap since the previous VM creation (the profile has no fork of the VMs' processes)"
    };
    let _ = writeln!(
        out,
        "<h3>Creation latency per VM</h3>\n<p>Per VM: {}.</p>",
        escape(what)
    );
    let max = lat.iter().filter_map(value).max().unwrap_or(0);
    if max == 0 {
        out.push_str("<p class=\"note\">(not derivable from this profile)</p>\n");
        return;
    }
    let n = lat.len().max(1);
    let (pw, ph) = (PLOT_W, PLOT_H);
    let max_ms = coord(max) / 1e6;
    let bw = pw / coord(n as u64);
    chart_start(out, "vm-latency", "creation latency per VM");
    let step = tick_step(max_ms, 5.0);
    let mut t = 0.0;
    while t <= max_ms + 1e-9 {
        let yy = PAD_T + ph - t / max_ms * ph;
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{PAD_L}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            PAD_L + pw,
            PAD_L - 6.0,
            yy + 4.0,
            tick_label(t, step)
        );
        t += step;
    }
    let label_every = (n / 30).max(1);
    for (i, l) in lat.iter().enumerate() {
        let bx = PAD_L + bw * coord(i as u64);
        if let Some(v) = value(l) {
            let h = coord(v) / coord(max) * ph;
            let _ = write!(
                out,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#d9822b\"><title>VM {}: {}</title></rect>",
                bx + bw * 0.1,
                PAD_T + ph - h,
                bw * 0.8,
                l.ordinal,
                human_ns(v)
            );
        }
        if i % label_every == 0 {
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                bx + bw / 2.0,
                PAD_T + ph + 14.0,
                l.ordinal
            );
        }
    }
    chart_end(out, "VM ordinal", "ms");
}

fn vm_table(vms: &[&VmCreation], lat: &[VmLatency], out: &mut String) {
    let d = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), human_ns);
    let t = Table {
        headers: vec![
            "VM",
            "window",
            "created at",
            "since previous",
            "fork \u{2192} created",
            "exec \u{2192} created",
            "pid",
            "comm",
            "counted by",
            "name",
        ],
        numeric: vec![
            true, true, true, true, true, true, true, false, false, false,
        ],
        rows: vms
            .iter()
            .zip(lat)
            .map(|(v, l)| {
                vec![
                    v.ordinal.to_string(),
                    l.window.map_or_else(|| "-".to_owned(), |w| w.to_string()),
                    human_ns(v.time_ns),
                    d(l.since_previous_ns),
                    d(l.fork_to_create_ns),
                    d(l.exec_to_create_ns),
                    v.pid.to_string(),
                    v.comm.clone(),
                    v.source.clone(),
                    v.name.clone().unwrap_or_default(),
                ]
            })
            .collect(),
        empty: "no VMs",
    };
    out.push_str("<details><summary>VM creations (table, with command lines)</summary>\n");
    out.push_str(&table(&t));
    out.push_str("<div class=\"scroll\"><table><thead><tr><th class=\"num\">VM</th><th>command line</th></tr></thead><tbody>\n");
    for v in vms {
        let _ = writeln!(
            out,
            "<tr><td class=\"num\">{}</td><td>{}</td></tr>",
            v.ordinal,
            escape(v.cmdline.as_deref().unwrap_or("-"))
        );
    }
    out.push_str("</tbody></table></div></details>\n");
}

/// One heatmap row: a metric per window, and how to show a value.
struct HeatRow {
    name: &'static str,
    values: Vec<u64>,
    show: fn(u64) -> String,
}

/// The heatmap's rows: VMs created first (the per-VM switch divides by it).
fn heat_rows(profile: &Profile, summary: &render::Summary) -> Vec<HeatRow> {
    let ws = &summary.windows;
    let per_window = |f: &dyn Fn(u32) -> u64| profile.windows.iter().map(|w| f(w.id)).collect();
    let vms_in = |w: u32| {
        profile
            .vms
            .iter()
            .filter(|v| window_of_vm(profile, v.ordinal) == Some(w))
            .count() as u64
    };
    let count = |n: u64| n.to_string();
    [HeatRow {
        name: "VMs created",
        values: per_window(&vms_in),
        show: count,
    }]
    .into_iter()
    .chain(ci::Metric::ALL.into_iter().filter_map(|m| {
        // A tracer the recording did not run has no row (a profile from
        // before the libvirt tracer has no libvirt rows).
        if m.tracer().is_some_and(|t| !profile.recorded(t)) {
            return None;
        }
        Some(HeatRow {
            name: m.heatmap()?,
            values: ws.iter().map(|w| m.of(w)).collect(),
            show: match m.unit() {
                ci::Unit::Ns => human_ns,
                _ => count,
            },
        })
    }))
    .collect()
}

pub(super) fn heatmap(profile: &Profile, summary: &render::Summary, out: &mut String) {
    let metrics = heat_rows(profile, summary);
    let vms: Vec<u64> = metrics[0].values.clone();
    out.push_str(
        "<h2 id=\"heatmap\">VM-ordinal heatmap</h2>\n<p>Windows from left to right; each row's colour is its value against the row's largest. Hover a cell for its value, click it to open that window below.</p>\n\
         <label><input type=\"checkbox\" id=\"heatmap-per-vm\"> per VM created in the window (the setup window and windows without VMs show -)</label>\n",
    );
    out.push_str("<div class=\"scroll\"><table class=\"heatmap\"><thead><tr><th>metric</th>");
    for w in &profile.windows {
        let _ = write!(
            out,
            "<th class=\"win\" data-select-window=\"{}\" data-scroll=\"\" title=\"{}\">{}<br><span class=\"muted\">{}</span></th>",
            w.id,
            escape(&w.label()),
            w.tag(),
            escape(&short_label(w))
        );
    }
    out.push_str("</tr></thead><tbody>\n");
    for m in &metrics {
        let _ = write!(out, "<tr><th>{}</th>", escape(m.name));
        let raw: Vec<Option<f64>> = m.values.iter().map(|&v| Some(coord(v))).collect();
        let per_vm: Vec<Option<f64>> = m
            .values
            .iter()
            .zip(&vms)
            .map(|(&v, &n)| (n > 0).then(|| coord(v) / coord(n)))
            .collect();
        let raw_max = raw.iter().flatten().copied().fold(0.0, f64::max);
        let vm_max = per_vm.iter().flatten().copied().fold(0.0, f64::max);
        for (i, w) in profile.windows.iter().enumerate() {
            let v = m.values[i];
            let (style, text, title) = cell(raw[i], raw_max, &(m.show)(v), m.name, w);
            let pv = per_vm[i].map(|x| {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "display of a per-VM mean"
                )]
                let r = x.round() as u64;
                format!("{} per VM", (m.show)(r))
            });
            let (astyle, atext, atitle) =
                cell(per_vm[i], vm_max, pv.as_deref().unwrap_or("-"), m.name, w);
            let _ = write!(
                out,
                "<td class=\"cell\" data-select-window=\"{}\" data-scroll=\"\" data-metric=\"{}\" data-value=\"{v}\" style=\"{style}\" title=\"{}\" data-text=\"{}\" data-alt-style=\"{astyle}\" data-alt-title=\"{}\" data-alt-data-text=\"{}\">{}</td>",
                w.id,
                escape(m.name),
                escape(&title),
                escape(&text),
                escape(&atitle),
                escape(&atext),
                escape(&text)
            );
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
}

fn short_label(w: &WindowInfo) -> String {
    match (w.first_vm, w.last_vm) {
        (Some(a), Some(b)) if a == b => format!("{a}"),
        (Some(a), Some(b)) => format!("{a}\u{2013}{b}"),
        _ => "setup".to_owned(),
    }
}

/// A heatmap cell's style, text and tooltip.
fn cell(
    value: Option<f64>,
    max: f64,
    shown: &str,
    metric: &str,
    window: &WindowInfo,
) -> (String, String, String) {
    let title = format!(
        "{metric}, window {} ({}): {}",
        window.name(),
        window.label(),
        if value.is_some() { shown } else { "-" }
    );
    let Some(value) = value else {
        return (
            "background:#fff;color:#999".to_owned(),
            "-".to_owned(),
            title,
        );
    };
    let level = if max > 0.0 { value / max } else { 0.0 };
    let (red, green, blue) = heat(level);
    let fg = if level > 0.55 { "#fff" } else { "#111" };
    (
        format!("background:rgb({red},{green},{blue});color:{fg}"),
        shown.to_owned(),
        title,
    )
}

/// White through orange to dark red.
fn heat(t: f64) -> (u8, u8, u8) {
    const STOPS: [(f64, [f64; 3]); 5] = [
        (0.0, [255.0, 255.0, 255.0]),
        (0.25, [254.0, 224.0, 144.0]),
        (0.5, [253.0, 141.0, 60.0]),
        (0.75, [215.0, 48.0, 31.0]),
        (1.0, [127.0, 0.0, 0.0]),
    ];
    let t = t.clamp(0.0, 1.0);
    let i = STOPS
        .windows(2)
        .position(|s| t <= s[1].0)
        .unwrap_or(STOPS.len() - 2);
    let ((t0, c0), (t1, c1)) = (STOPS[i], STOPS[i + 1]);
    let k = (t - t0) / (t1 - t0);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "0..=255"
    )]
    let ch = |j: usize| (c0[j] + (c1[j] - c0[j]) * k).round() as u8;
    (ch(0), ch(1), ch(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_and_colours() {
        assert!((tick_step(4.27, 8.0) - 1.0).abs() < 1e-9);
        assert!((tick_step(3.0, 8.0) - 0.5).abs() < 1e-9);
        assert!((tick_step(14.0, 6.0) - 5.0).abs() < 1e-9);
        assert_eq!(tick_label(0.5, 0.5), "0.5");
        assert_eq!(heat(0.0), (255, 255, 255));
        assert_eq!(heat(1.0), (127, 0, 0));
    }
}
