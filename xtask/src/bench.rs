//! `./x bench`: the sample workload with and without `hvprof record`
//! in the same run, alternating, and the figures that matter: added wall
//! time, each eBPF program's cost per event, losses, and the time from the
//! stop to every file written. A measurement, not a test: nothing here fails
//! on a threshold.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, ensure};

/// 30 VMs, each followed by CPU work, forks, execs and context switches.
fn plan(vms: usize) -> String {
    vec!["vm,work:30,forks:20,spawns:5,switches:2000"; vms].join(",")
}

/// One run of the workload: its wall time (`vmload: done in Xs`), its CPU
/// time with its children's (`vmload: cpu Xs`; in-kernel eBPF programs run
/// in the context of the tasks they trace, so theirs is in there too), and
/// the command's stdout.
fn run_workload(cmd: &mut Command) -> anyhow::Result<(f64, f64, String)> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "{cmd:?} failed:\n{stdout}\n{stderr}");
    let line = |prefix: &str| {
        stderr
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim_end_matches('s').parse::<f64>().ok())
            .ok_or_else(|| anyhow!("no `{prefix}` line in:\n{stderr}"))
    };
    Ok((line("vmload: done in ")?, line("vmload: cpu ")?, stdout))
}

/// The last recording's summary.
fn summary(out_dir: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("summary.json"))
            .context("reading the last summary.json")?,
    )?)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(
    hvprof: &Path,
    vmload: &Path,
    rounds: usize,
    vms: usize,
    hvprof_args: &[String],
) -> anyhow::Result<()> {
    let plan = plan(vms);
    let out_dir = std::env::temp_dir().join(format!("hvprof-bench-{}", std::process::id()));
    let (mut base, mut with) = (Vec::new(), Vec::new());
    println!("bench: {rounds} rounds of {vms} VMs, each: work:30,forks:20,spawns:5,switches:2000");
    if !hvprof_args.is_empty() {
        println!("hvprof record arguments: {}", hvprof_args.join(" "));
    }
    // The timed runs are of `record` as users run it: kernel BPF statistics
    // cost two clock reads per program run, so they are on only for one
    // more run at the end, which gives the per-program costs.
    let with_hvprof = |stats: bool| {
        let mut cmd = Command::new(hvprof);
        cmd.args(["record", "--window-size", "10"]);
        if stats {
            cmd.arg("--bpf-stats");
        }
        cmd.args(hvprof_args)
            .arg("-o")
            .arg(&out_dir)
            .arg("--")
            .arg(vmload)
            .arg(&plan);
        run_workload(&mut cmd)
    };
    let (mut base_cpu, mut with_cpu, mut hvprof_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (b, b_cpu, _) = run_workload(Command::new(vmload).arg(&plan))?;
        let (w, w_cpu, _) = with_hvprof(false)?;
        // hvprof's process while it recorded.
        #[expect(clippy::cast_precision_loss, reason = "seconds")]
        let own = summary(&out_dir)?["self_cpu_ns"].as_u64().unwrap_or(0) as f64 / 1e9;
        println!(
            "  round {round}: without {b:.3} s, with hvprof {w:.3} s ({:+.1} %); CPU {b_cpu:.3} s, \
             with {w_cpu:.3} s + hvprof {own:.3} s ({:+.1} %)",
            (w / b - 1.0) * 100.0,
            ((w_cpu + own) / b_cpu - 1.0) * 100.0
        );
        base.push(b);
        with.push(w);
        base_cpu.push(b_cpu);
        with_cpu.push(w_cpu + own);
        hvprof_cpu.push(own);
    }
    // Noise here only adds time (other load, a noisy host), so besides the
    // medians: the median of each round's paired ratio, and best against
    // best.
    let mut paired: Vec<f64> = with.iter().zip(&base).map(|(w, b)| w / b).collect();
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (bb, bw) = (best(&base), best(&with));
    let (b, w) = (median(&mut base), median(&mut with));
    let p = median(&mut paired);
    println!("\nworkload wall time, median: without {b:.3} s, with hvprof {w:.3} s");
    println!(
        "overhead ratio: {:.3} ({:+.1} % added wall time)",
        w / b,
        (w / b - 1.0) * 100.0
    );
    println!(
        "median of the rounds' ratios: {p:.3} ({:+.1} %); best against best: {bb:.3} s vs {bw:.3} s ({:+.1} %)",
        (p - 1.0) * 100.0,
        (bw / bb - 1.0) * 100.0
    );

    // CPU time is less at the mercy of the host than wall time: the
    // workload's own (in-kernel eBPF included) plus hvprof's process.
    let mut paired_cpu: Vec<f64> = with_cpu.iter().zip(&base_cpu).map(|(w, b)| w / b).collect();
    let (bc, wc, hc) = (
        median(&mut base_cpu),
        median(&mut with_cpu),
        median(&mut hvprof_cpu),
    );
    let pc = median(&mut paired_cpu);
    println!(
        "CPU time, median: without {bc:.3} s, with hvprof {wc:.3} s (of which hvprof's process \
         {hc:.3} s): {:+.1} %; median of the rounds' ratios {:+.1} %",
        (wc / bc - 1.0) * 100.0,
        (pc - 1.0) * 100.0
    );

    let (_, _, last_stdout) = with_hvprof(true)?;
    let summary = summary(&out_dir)?;
    println!("\neBPF cost per event (one more run, with kernel BPF statistics):");
    println!(
        "  {:<22} {:>10} {:>12} {:>8}",
        "program", "runs", "total ms", "ns/run"
    );
    for p in summary["program_stats"].as_array().into_iter().flatten() {
        let runs = p["runs"].as_u64().unwrap_or(0);
        let ns = p["run_time_ns"].as_u64().unwrap_or(0);
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let total_ms = ns as f64 / 1e6;
        println!(
            "  {:<22} {:>10} {:>12.1} {:>8}",
            p["program"].as_str().unwrap_or("?"),
            runs,
            total_ms,
            ns.checked_div(runs).unwrap_or(0)
        );
    }
    for (name, n) in summary["counters"].as_object().into_iter().flatten() {
        println!("  {name:<48} {n:>10}");
    }
    println!("losses (last run): {}", summary["total_losses"]);
    if let Some(line) = last_stdout.lines().find(|l| l.contains("after the stop")) {
        println!(
            "stop to files written: {}",
            line.rsplit(" in ").next().unwrap_or(line)
        );
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    Ok(())
}
