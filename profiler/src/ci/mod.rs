//! What a CI job consumes: `--fail-on` gates (a small expression language
//! evaluated on one profile, or on a pair in `hvprof diff`), the exit codes,
//! and the compact markdown job summary (`--markdown-summary`).
//!
//! Everything here works from [`Profile`]s alone.

mod gate;
mod metrics;
pub mod stats;
#[cfg(test)]
mod tests;

use std::{fmt::Write as _, path::Path};

use thiserror::Error;

use crate::{
    profile::Profile,
    tables::{TABLES, human_ns, md_escape, md_table},
};

/// Exit status when every gate passed.
pub const EXIT_OK: u8 = 0;
/// Exit status when the command failed (unreadable profile, windows that do
/// not match, a gate naming a window the profile does not have).
pub const EXIT_ERROR: u8 = 1;
/// Exit status when at least one `--fail-on` condition held.
pub const EXIT_GATE_FAILED: u8 = 3;

pub use self::{gate::*, metrics::*};

/// The per-window metric columns of the markdown summaries: those the
/// HTML heatmap shows.
pub fn summary_metrics() -> impl Iterator<Item = Metric> {
    Metric::ALL.into_iter().filter(|m| m.heatmap().is_some())
}

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
    headers.extend(summary_metrics().map(Metric::describe));
    let rows: Vec<Vec<String>> = facts
        .windows
        .iter()
        .map(|(w, v)| {
            let mut r = vec![w.id.to_string(), w.label()];
            r.extend(summary_metrics().map(|m| m.unit().format(v.get(m))));
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
