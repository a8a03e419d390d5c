//! A diff as people read it: text, markdown and HTML.

use super::*;

impl Diff {
    fn metrics_table(&self, changed_only: bool) -> (Table, usize) {
        let mut hidden = 0;
        let mut rows = Vec::new();
        for s in self.windows.iter().chain(std::iter::once(&self.whole)) {
            let mut first = true;
            for m in &s.metrics {
                if changed_only && !m.delta.changed() {
                    hidden += 1;
                    continue;
                }
                let d = m.delta;
                rows.push(vec![
                    if first {
                        s.window.map_or_else(|| "all".to_owned(), |w| w.to_string())
                    } else {
                        String::new()
                    },
                    if first {
                        s.label.clone()
                    } else {
                        String::new()
                    },
                    m.metric.describe().to_owned(),
                    m.unit.format(d.a),
                    m.unit.format(d.b),
                    m.unit.format_delta(d.a, d.b),
                    d.ratio_text(),
                ]);
                first = false;
            }
        }
        (
            Table {
                headers: vec!["window", "VMs", "metric", "A", "B", "Δ", "ratio"],
                numeric: vec![false, false, false, true, true, true, true],
                rows,
                empty: "no metric differs",
            },
            hidden,
        )
    }

    fn header_lines(&self) -> Vec<String> {
        let side = |name: &str, s: &super::Side| {
            if s.runs.len() > 1 {
                format!(
                    "{name}: {} runs ({}) \u{2014} the first: {}",
                    s.runs.len(),
                    s.runs.join(", "),
                    s.description
                )
            } else {
                format!("{name}: {} \u{2014} {}", s.path, s.description)
            }
        };
        let mut lines = vec![side("A", &self.a), side("B", &self.b)];
        if self.a.runs.len() > 1 || self.b.runs.len() > 1 {
            lines.push(format!(
                "metrics: the medians of each side's runs; gates: a value over its bound fails \
                 only where B's runs are also significantly more than the bound above A's \
                 (one-sided Welch t-test on the logarithms, p Holm-adjusted over the gate's \
                 values, <= {}); flame graphs and tables: each side's runs merged",
                crate::ci::stats::SIGNIFICANCE
            ));
        }
        lines.push(format!(
            "{} windows compared{}; flame graphs: {}",
            self.windows.len(),
            if self.unmatched_a.is_empty() && self.unmatched_b.is_empty() {
                String::new()
            } else {
                format!(
                    " (--common-windows left out A's {} and B's {})",
                    list_or_none(&self.unmatched_a),
                    list_or_none(&self.unmatched_b)
                )
            },
            if self.normalized {
                "A scaled to B's total (--no-normalize to compare raw counts)"
            } else {
                "raw counts"
            }
        ));
        lines
    }

    /// The diff as text. `limit`: only changed rows, at most that many per
    /// table (what `hvprof diff` prints); `None`: everything (`diff.txt`).
    #[must_use]
    pub fn text(&self, limit: Option<usize>) -> String {
        let mut out = String::from("hvprof diff\n");
        for l in self.header_lines() {
            let _ = writeln!(out, "{l}");
        }
        let (t, hidden) = self.metrics_table(limit.is_some());
        if t.rows.is_empty() {
            out.push_str("\nno per-window metric differs\n");
        } else {
            out.push_str("\nper-window metrics (A, B, \u{394} = B \u{2212} A, ratio = B/A):\n");
            out.push_str(&t.text());
        }
        if hidden > 0 && !t.rows.is_empty() {
            let _ = writeln!(
                out,
                "({hidden} unchanged values not shown; all in diff.txt)"
            );
        }
        for s in self.windows.iter().chain(std::iter::once(&self.whole)) {
            let title = match s.window {
                Some(w) => format!("window {w} ({})", s.label),
                None => "whole recording".to_owned(),
            };
            for t in &s.tables {
                let rows: Vec<&DeltaRow> = match limit {
                    Some(n) => t.rows.iter().filter(|r| r.changed()).take(n).collect(),
                    None => t.rows.iter().collect(),
                };
                if limit.is_some() && rows.is_empty() {
                    continue;
                }
                let changed = t.rows.iter().filter(|r| r.changed()).count();
                let _ = writeln!(
                    out,
                    "\n{title}, {} ({changed} of {} rows changed; count: {}):",
                    t.name,
                    t.rows.len(),
                    t.count_name
                );
                out.push_str(&t.table(&rows).text());
                if limit.is_some() && changed > rows.len() {
                    let _ = writeln!(
                        out,
                        "({} more changed rows in diff.txt)",
                        changed - rows.len()
                    );
                }
            }
        }
        if limit.is_some()
            && self
                .windows
                .iter()
                .chain(std::iter::once(&self.whole))
                .all(|s| s.tables.iter().all(|t| t.rows.iter().all(|r| !r.changed())))
        {
            out.push_str(
                "\nno row of a table (locks, forks, cgroups, D-Bus, libvirt, QMP) differs\n",
            );
        }
        if !self.gates.is_empty() {
            out.push('\n');
            out.push_str(&ci::gates_text(&self.gates));
        }
        out
    }

    /// The whole diff as markdown (`diff.md`); every name escaped.
    #[must_use]
    pub fn markdown(&self) -> String {
        let mut out = String::from("# hvprof diff\n\n");
        for l in self.header_lines() {
            let _ = writeln!(out, "- {}", tables::md_escape(&l));
        }
        let (t, _) = self.metrics_table(false);
        out.push_str("\n## Per-window metrics\n\n");
        out.push_str(&tables::md_table(&t.headers, &t.rows));
        for s in self.windows.iter().chain(std::iter::once(&self.whole)) {
            let _ = match s.window {
                Some(w) => writeln!(out, "\n## Window {w} ({})\n", tables::md_escape(&s.label)),
                None => writeln!(out, "\n## Whole recording\n"),
            };
            for f in &s.flame_graphs {
                let _ = writeln!(
                    out,
                    "- {} differential flame graph: {} (A {} / B {} {})",
                    f.tracer,
                    tables::md_escape(&f.svg),
                    f.a_total,
                    f.b_total,
                    f.unit
                );
            }
            for t in &s.tables {
                let rows: Vec<&DeltaRow> = t.rows.iter().collect();
                let table = t.table(&rows);
                let _ = writeln!(out, "\n### {} (count: {})\n", t.name, t.count_name);
                if table.rows.is_empty() {
                    let _ = writeln!(out, "({})", table.empty);
                } else {
                    out.push_str(&tables::md_table(&table.headers, &table.rows));
                }
            }
        }
        if !self.gates.is_empty() {
            out.push('\n');
            out.push_str(&ci::gates_markdown(&self.gates));
        }
        out
    }

    /// The compact summary for a CI job (`--markdown-summary`): the two
    /// profiles, per-window key metrics, the five largest lock and D-Bus
    /// changes, the gates.
    #[must_use]
    pub fn summary_markdown(&self) -> String {
        let mut out = format!(
            "### hvprof diff: {} \u{2192} {}\n\n",
            tables::md_escape(&self.a.path),
            tables::md_escape(&self.b.path)
        );
        for l in self.header_lines() {
            let _ = writeln!(out, "- {}", tables::md_escape(&l));
        }
        out.push('\n');
        let mut headers = vec!["window", "VMs"];
        headers.extend(ci::summary_metrics().map(Metric::describe));
        let rows: Vec<Vec<String>> = self
            .windows
            .iter()
            .chain(std::iter::once(&self.whole))
            .map(|s| {
                let mut r = vec![
                    s.window.map_or_else(|| "all".to_owned(), |w| w.to_string()),
                    s.label.clone(),
                ];
                for m in ci::summary_metrics() {
                    if let Some(d) = s.metrics.iter().find(|d| d.metric == m) {
                        r.push(d.delta.arrow(m.unit()));
                    }
                }
                r
            })
            .collect();
        out.push_str(&tables::md_table(&headers, &rows));
        for t in &self.whole.tables {
            if t.name != "locks" && t.name != "dbus" {
                continue;
            }
            let changed: Vec<Vec<String>> = t
                .rows
                .iter()
                .filter(|r| r.changed())
                .take(5)
                .map(|r| {
                    let mut c = r.key.clone();
                    c.push(r.count.arrow(Unit::Count));
                    c.push(r.time_ns.arrow(Unit::Ns));
                    c
                })
                .collect();
            if changed.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "\n**Largest {} changes** (whole recording, by \u{394} time)\n",
                if t.name == "locks" { "lock" } else { "D-Bus" }
            );
            let mut h = t.columns.clone();
            h.extend([t.count_name, "time"]);
            out.push_str(&tables::md_table(&h, &changed));
        }
        if !self.gates.is_empty() {
            out.push('\n');
            out.push_str(&ci::gates_markdown(&self.gates));
        }
        out
    }

    /// The HTML page (`diff.html`): the two profiles, the gates, the
    /// per-window metrics, then per window (a selector, as in the report)
    /// its four differential flame graphs and delta tables, then the whole
    /// recording's tables. The graphs stay files in the window directories
    /// next to the page, each loaded into a frame when its window is
    /// selected: inlined, a diff of big profiles is hundreds of megabytes
    /// of HTML that a browser must parse whole before showing anything.
    #[must_use]
    pub fn html(&self) -> String {
        let mut body = String::from("<h1>hvprof diff</h1>\n<ul>\n");
        for l in self.header_lines() {
            let _ = writeln!(body, "<li>{}</li>", html::escape(&l));
        }
        body.push_str("</ul>\n");
        if !self.gates.is_empty() {
            body.push_str("<h2>Gates</h2>\n<ul>\n");
            for g in &self.gates {
                let _ = writeln!(body, "<li><pre>{}</pre></li>", html::escape(&g.text()));
            }
            body.push_str("</ul>\n");
        }
        body.push_str("<h2>Per-window metrics</h2>\n");
        body.push_str(&html::table(&self.metrics_table(false).0));

        body.push_str("<h2 id=\"window-view\">Per window</h2>\n");
        let nav: Vec<(u32, String)> = self
            .windows
            .iter()
            .filter_map(|s| Some((s.window?, s.label.clone())))
            .collect();
        // Open on the first window with VMs, as the report does.
        let initial = nav
            .iter()
            .find(|(id, _)| *id != SETUP_WINDOW)
            .or(nav.first())
            .map(|w| w.0);
        body.push_str(&html::window_nav(&nav, initial));
        for s in &self.windows {
            let Some(id) = s.window else { continue };
            let mut panel = format!("<h3>Window {id}: {}</h3>\n", html::escape(&s.label));
            for f in &s.flame_graphs {
                let caption = format!(
                    "{}, A {} / B {} {}{}",
                    f.tracer,
                    f.a_total,
                    f.b_total,
                    f.unit,
                    if f.scaled {
                        ", A scaled to B's total"
                    } else {
                        ""
                    }
                );
                panel.push_str(&html::flame_graph_file_frame(
                    &f.svg, f.height, f.tracer, &caption,
                ));
            }
            panel.push_str(&section_tables(s));
            body.push_str(&html::window_section(id, &panel));
        }
        body.push_str("<h2 id=\"whole\">Whole recording</h2>\n");
        body.push_str(&section_tables(&self.whole));
        html::page_with_graph_files(
            &format!("hvprof diff: {} \u{2192} {}", self.a.path, self.b.path),
            &body,
        )
    }
}

/// A section's delta tables, as HTML.
fn section_tables(s: &Section) -> String {
    let mut out = String::new();
    for t in &s.tables {
        let _ = writeln!(
            out,
            "<h4>{} (count: {})</h4>",
            html::escape(t.name),
            html::escape(t.count_name)
        );
        let rows: Vec<&DeltaRow> = t.rows.iter().collect();
        out.push_str(&html::table(&t.table(&rows)));
    }
    out
}
