//! `cargo xtask bench-report`: how long `hvprof report` takes on a large
//! profile, against the usual perf pipeline on the same samples, in the same
//! run. A measurement, not a test: nothing here fails on a threshold.
//!
//! - The profile: `profiler/examples/synth_profile.rs` builds N on-CPU
//!   samples over S distinct stacks (depth 20–40, a pool of a few thousand
//!   frame names) in 10 windows, and writes the same samples as `perf
//!   script` text, one event per sample.
//! - hvprof: `hvprof report` on it (every window: folded stacks, four flame
//!   graphs, tables; the summary).
//! - perf: `inferno-collapse-perf | inferno-flamegraph` on that text (one
//!   flame graph for the whole recording: perf has no windows), plus
//!   `perf script` on a real `perf record -a -g` recording of this machine
//!   with about as many samples — a perf.data with exactly the synthetic
//!   stacks cannot be made, so that stage is timed on real data.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, ensure};

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// On-CPU samples in the synthetic profile.
    #[arg(long, default_value_t = 1_000_000)]
    pub samples: u64,
    /// Distinct stacks in the synthetic profile.
    #[arg(long, default_value_t = 50_000)]
    pub stacks: u64,
    /// Timed runs of each command; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Length of the real `perf record -a -g` whose `perf script` is timed
    /// (at the default frequency, 2 CPUs give ~1 M samples in 50 s).
    #[arg(long, default_value_t = 50)]
    pub perf_seconds: u64,
    /// Sampling frequency of that recording.
    #[arg(long, default_value_t = 9999)]
    pub perf_frequency: u64,
}

/// Wall and CPU time (of the children: user + system) of one run.
#[derive(Clone, Copy, Debug)]
struct Timing {
    wall: Duration,
    cpu: Duration,
}

fn children_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass, nothing else.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &raw mut ru);
        ru
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Times `f`, which runs child processes to completion.
fn timed(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Timing> {
    let (cpu0, t0) = (children_cpu(), Instant::now());
    f()?;
    Ok(Timing {
        wall: t0.elapsed(),
        cpu: children_cpu().saturating_sub(cpu0),
    })
}

fn median(mut v: Vec<Timing>) -> Timing {
    v.sort_by_key(|t| t.wall);
    v[v.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn status_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// inferno's binaries: on PATH, or installed into target/inferno (the
/// version hvprof links, from Cargo.lock).
fn inferno_bin(root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if let Some(p) = on_path {
        return Ok(p);
    }
    let local = root.join("target/inferno/bin").join(name);
    if !local.is_file() {
        let lock = fs::read_to_string(root.join("Cargo.lock")).context("reading Cargo.lock")?;
        let version = lock
            .split("[[package]]")
            .find(|p| p.contains("name = \"inferno\""))
            .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
            .map(|v| v.trim_matches('"').to_owned())
            .ok_or_else(|| anyhow!("no inferno in Cargo.lock"))?;
        println!(
            "bench-report: installing inferno {version}'s binaries into target/inferno (a few minutes, once)"
        );
        crate::run(
            crate::cargo()
                .args(["install", "inferno", "--locked", "--version", &version])
                .arg("--root")
                .arg(root.join("target/inferno")),
        )?;
    }
    Ok(local)
}

/// Generates the synthetic profile and perf-script text, unless the last
/// run left them with the same parameters.
fn synth(synth: &Path, data: &Path, opts: &Opts) -> anyhow::Result<String> {
    let params = format!("samples {} stacks {}", opts.samples, opts.stacks);
    let stamp = data.join("params");
    if fs::read_to_string(&stamp).is_ok_and(|p| p == params)
        && data.join("profile.hvprof").is_file()
        && data.join("perf-script.txt").is_file()
    {
        println!("bench-report: reusing {} ({params})", data.display());
        return fs::read_to_string(data.join("synth.txt")).context("reading synth.txt");
    }
    let _ = fs::remove_dir_all(data);
    println!("bench-report: generating {params} (half a minute)…");
    let out = Command::new(synth)
        .arg(data)
        .args(["--samples", &opts.samples.to_string()])
        .args(["--stacks", &opts.stacks.to_string()])
        .output()
        .with_context(|| format!("running {}", synth.display()))?;
    ensure!(
        out.status.success(),
        "synth_profile failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    fs::write(data.join("synth.txt"), &line)?;
    fs::write(&stamp, params)?;
    Ok(line)
}

/// `inferno-collapse-perf SCRIPT | inferno-flamegraph > SVG`.
fn inferno_pipeline(
    collapse: &Path,
    flamegraph: &Path,
    script: &Path,
    svg: &Path,
) -> anyhow::Result<()> {
    let mut c = Command::new(collapse)
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", collapse.display()))?;
    let pipe = c.stdout.take().ok_or_else(|| anyhow!("no pipe"))?;
    let f = Command::new(flamegraph)
        .stdin(pipe)
        .stdout(fs::File::create(svg)?)
        .status()
        .with_context(|| format!("running {}", flamegraph.display()))?;
    let cs = c.wait()?;
    ensure!(
        cs.success() && f.success(),
        "the inferno pipeline failed ({cs}, {f})"
    );
    Ok(())
}

/// Records this machine with `perf record -a -g` (once; reused), and
/// returns the perf.data and its sample count.
fn real_perf_data(dir: &Path, opts: &Opts) -> anyhow::Result<(PathBuf, u64)> {
    let data = dir.join("perf.data");
    let stamp = dir.join("perf.params");
    let params = format!("-F {} {} s", opts.perf_frequency, opts.perf_seconds);
    if !(data.is_file() && fs::read_to_string(&stamp).is_ok_and(|p| p == params)) {
        println!(
            "bench-report: perf record -F {} -a -g -- sleep {} …",
            opts.perf_frequency, opts.perf_seconds
        );
        status_ok(
            Command::new("perf")
                .args([
                    "record",
                    "-q",
                    "-F",
                    &opts.perf_frequency.to_string(),
                    "-a",
                    "-g",
                    "-o",
                ])
                .arg(&data)
                .args(["--", "sleep", &opts.perf_seconds.to_string()]),
        )
        .context("perf record failed (it needs root, or kernel.perf_event_paranoid ≤ 0)")?;
        fs::write(&stamp, &params)?;
    }
    // Count the samples: event lines of `perf script -F comm` are one per
    // sample, and this also warms the caches the timed runs will find.
    let out = Command::new("perf")
        .args(["script", "-F", "comm,tid", "-i"])
        .arg(&data)
        .stderr(Stdio::null())
        .output()
        .context("perf script")?;
    let samples = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count() as u64;
    ensure!(samples > 0, "perf.data has no samples");
    Ok((data, samples))
}

pub fn run(opts: &Opts, hvprof: &Path, synth_bin: &Path) -> anyhow::Result<()> {
    ensure!(opts.rounds > 0, "--rounds 0: nothing to time");
    let root = crate::toolchain::root();
    let dir = root.join("target/bench-report");
    let data = dir.join("data");
    fs::create_dir_all(&dir)?;
    let collapse = inferno_bin(&root, "inferno-collapse-perf")?;
    let flamegraph = inferno_bin(&root, "inferno-flamegraph")?;
    let what = synth(synth_bin, &data, opts)?;
    let profile = data.join("profile.hvprof");
    let script = data.join("perf-script.txt");
    let script_mb = fs::metadata(&script)?.len() / 1_000_000;
    println!("bench-report: {what}");

    let report_dir = dir.join("report");
    let mut report = Vec::new();
    for _ in 0..opts.rounds {
        let _ = fs::remove_dir_all(&report_dir);
        report.push(timed(|| {
            status_ok(
                Command::new(hvprof)
                    .arg("report")
                    .arg(&profile)
                    .arg("-o")
                    .arg(&report_dir),
            )
        })?);
    }
    let mut inferno = Vec::new();
    for _ in 0..opts.rounds {
        inferno.push(timed(|| {
            inferno_pipeline(&collapse, &flamegraph, &script, &dir.join("perf-flame.svg"))
        })?);
    }
    let (perf_data, perf_samples) = real_perf_data(&dir, opts)?;
    let mut perf = Vec::new();
    for _ in 0..opts.rounds {
        perf.push(timed(|| {
            status_ok(
                Command::new("perf")
                    .args(["script", "-i"])
                    .arg(&perf_data)
                    .stdout(fs::File::create(dir.join("perf-real-script.txt"))?),
            )
        })?);
    }

    let (report, inferno, perf) = (median(report), median(inferno), median(perf));
    #[expect(clippy::cast_precision_loss, reason = "a ratio")]
    let scale = opts.samples as f64 / perf_samples as f64;
    let perf_scaled = Timing {
        wall: perf.wall.mul_f64(scale),
        cpu: perf.cpu.mul_f64(scale),
    };
    let pipeline = Timing {
        wall: perf_scaled.wall + inferno.wall,
        cpu: perf_scaled.cpu + inferno.cpu,
    };
    let row =
        |name: &str, t: Timing| println!("  {name:<58} {:>9} {:>9}", secs(t.wall), secs(t.cpu));
    println!(
        "\nmedian of {} runs; {} CPUs; load average {}",
        opts.rounds,
        std::thread::available_parallelism().map_or(1, usize::from),
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("  {:<58} {:>9} {:>9}", "", "wall", "CPU");
    row("hvprof report (every window, 4 flame graphs each)", report);
    row(
        &format!("inferno-collapse-perf | inferno-flamegraph ({script_mb} MB text)"),
        inferno,
    );
    row(
        &format!("perf script, real perf.data of {perf_samples} samples"),
        perf,
    );
    row(
        &format!("perf script, scaled to {} samples", opts.samples),
        perf_scaled,
    );
    row(
        "perf script | inferno-collapse-perf | inferno-flamegraph",
        pipeline,
    );
    println!(
        "\nratio: the perf pipeline takes {:.1}× the wall time of hvprof report ({:.1}× the CPU time)",
        pipeline.wall.as_secs_f64() / report.wall.as_secs_f64(),
        pipeline.cpu.as_secs_f64() / report.cpu.as_secs_f64()
    );
    println!(
        "(inputs and outputs are in {}; the perf pipeline draws one flame graph, hvprof one per window and tracer)",
        dir.display()
    );
    Ok(())
}
