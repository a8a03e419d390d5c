//! `./x bench-report`: how long `hvprof report` and `hvprof diff`
//! take on large profiles, against the usual perf pipelines on the same
//! samples, in the same run. A measurement, not a test: nothing here fails
//! on a threshold.
//!
//! - The profiles: `profiler/examples/synth_profile.rs` builds N on-CPU
//!   samples over S distinct stacks (depth 20–40, a pool of a few thousand
//!   frame names) in 10 windows, and writes the same samples as `perf
//!   script` text, one event per sample. A second profile (`--seed 1
//!   --extra E`) has the same stacks with the samples spread anew, plus E
//!   samples in window 2 on a stack ending in `__synth_regression`: the
//!   known difference the diff must show (checked, so that what is timed
//!   is a diff that works).
//! - hvprof: `hvprof report` on the first (every window: folded stacks,
//!   four flame graphs, tables; the summary), and `hvprof diff` of the two
//!   (every window: four differential flame graphs, delta tables; text,
//!   markdown, JSON, HTML).
//! - perf, for report: `inferno-collapse-perf | inferno-flamegraph` on that
//!   text (one flame graph for the whole recording: perf has no windows),
//!   plus `perf script` on a real `perf record -a -g` recording of this
//!   machine with about as many samples — a perf.data with exactly the
//!   synthetic stacks cannot be made, so that stage is timed on real data
//!   and scaled to the sample count.
//! - perf, for diff: `perf script` (scaled, as above) and
//!   `inferno-collapse-perf` of each profile's text, then
//!   `inferno-diff-folded --normalize | inferno-flamegraph` (one
//!   differential flame graph), stage after stage as a script runs them.

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
    /// Samples the second profile adds in window 2 on a stack the first
    /// lacks: the known difference `hvprof diff` must show.
    #[arg(long, default_value_t = 50_000)]
    pub diff_extra: u64,
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

/// Runs `cmd` to completion; its output goes where `cmd` sends it, else
/// is read and dropped.
fn status_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
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

/// Generates a synthetic profile and its perf-script text (`extra`: more
/// arguments to the generator), unless the last run left them with the
/// same parameters.
fn synth(synth: &Path, data: &Path, opts: &Opts, extra: &[String]) -> anyhow::Result<String> {
    let mut params = format!("samples {} stacks {}", opts.samples, opts.stacks);
    for a in extra {
        params.push(' ');
        params.push_str(a);
    }
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
        .args(extra)
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

/// The median of `rounds` timings of `f`.
fn median_of(
    rounds: usize,
    mut f: impl FnMut() -> anyhow::Result<Timing>,
) -> anyhow::Result<Timing> {
    let v = (0..rounds)
        .map(|_| f())
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(median(v))
}

/// Times `hvprof ARGS… -o OUT` (a fresh OUT each round).
fn time_hvprof(hvprof: &Path, args: &[&Path], out: &Path, rounds: usize) -> anyhow::Result<Timing> {
    median_of(rounds, || {
        let _ = fs::remove_dir_all(out);
        timed(|| status_ok(Command::new(hvprof).args(args).arg("-o").arg(out)))
    })
}

pub fn run(opts: &Opts, hvprof: &Path, synth_bin: &Path) -> anyhow::Result<()> {
    ensure!(opts.rounds > 0, "--rounds 0: nothing to time");
    let root = crate::toolchain::root();
    let dir = root.join("target/bench-report");
    let (data, data_b) = (dir.join("data"), dir.join("data-b"));
    fs::create_dir_all(&dir)?;
    let collapse = inferno_bin(&root, "inferno-collapse-perf")?;
    let flamegraph = inferno_bin(&root, "inferno-flamegraph")?;
    let diff_folded = inferno_bin(&root, "inferno-diff-folded")?;
    println!("bench-report: {}", synth(synth_bin, &data, opts, &[])?);
    let b_args = ["--seed", "1", "--extra", &opts.diff_extra.to_string()].map(str::to_owned);
    println!(
        "bench-report: {}",
        synth(synth_bin, &data_b, opts, &b_args)?
    );
    let (profile, profile_b) = (data.join("profile.hvprof"), data_b.join("profile.hvprof"));
    let (script, script_b) = (data.join("perf-script.txt"), data_b.join("perf-script.txt"));

    let report = time_hvprof(
        hvprof,
        &[Path::new("report"), &profile],
        &dir.join("report"),
        opts.rounds,
    )?;
    let diff_dir = dir.join("diff");
    let diff = time_hvprof(
        hvprof,
        &[Path::new("diff"), &profile, &profile_b],
        &diff_dir,
        opts.rounds,
    )?;
    let known = known_difference(&diff_dir, opts.diff_extra)?;

    let inferno = median_of(opts.rounds, || {
        timed(|| inferno_pipeline(&collapse, &flamegraph, &script, &dir.join("perf-flame.svg")))
    })?;
    let (folded_a, folded_b) = (dir.join("perf-a.folded"), dir.join("perf-b.folded"));
    let collapse_ab = median_of(opts.rounds, || {
        timed(|| {
            for (s, f) in [(&script, &folded_a), (&script_b, &folded_b)] {
                status_ok(Command::new(&collapse).arg(s).stdout(fs::File::create(f)?))?;
            }
            Ok(())
        })
    })?;
    let diff_flame = median_of(opts.rounds, || {
        timed(|| {
            diff_pipeline(
                &diff_folded,
                &flamegraph,
                [&folded_a, &folded_b],
                &dir.join("perf-diff-flame.svg"),
            )
        })
    })?;
    let (perf_data, perf_samples) = real_perf_data(&dir, opts)?;
    let perf = median_of(opts.rounds, || {
        timed(|| {
            status_ok(
                Command::new("perf")
                    .args(["script", "-i"])
                    .arg(&perf_data)
                    .stdout(fs::File::create(dir.join("perf-real-script.txt"))?),
            )
        })
    })?;
    Results {
        opts,
        script_mb: fs::metadata(&script)?.len() / 1_000_000,
        perf_samples,
        report,
        inferno,
        perf,
        diff,
        diff_html: fs::metadata(diff_dir.join("diff.html"))?.len(),
        diff_total: dir_size(&diff_dir)?,
        known,
        collapse_ab,
        diff_flame,
    }
    .print();
    println!(
        "(inputs and outputs are in {}; the perf pipelines draw one flame graph each, hvprof one per window and tracer)",
        dir.display()
    );
    Ok(())
}

/// What [`run`] measured (medians).
struct Results<'a> {
    opts: &'a Opts,
    script_mb: u64,
    perf_samples: u64,
    report: Timing,
    /// `inferno-collapse-perf | inferno-flamegraph` of the first text.
    inferno: Timing,
    /// `perf script` of the real recording.
    perf: Timing,
    diff: Timing,
    diff_html: u64,
    /// Bytes `hvprof diff` wrote.
    diff_total: u64,
    known: String,
    /// `inferno-collapse-perf` of both texts.
    collapse_ab: Timing,
    /// `inferno-diff-folded | inferno-flamegraph`.
    diff_flame: Timing,
}

impl Results<'_> {
    /// `perf script` of the real recording, scaled to `samples`.
    fn perf_scaled(&self, samples: u64) -> Timing {
        #[expect(clippy::cast_precision_loss, reason = "a ratio")]
        let scale = samples as f64 / self.perf_samples as f64;
        Timing {
            wall: self.perf.wall.mul_f64(scale),
            cpu: self.perf.cpu.mul_f64(scale),
        }
    }

    fn print(&self) {
        let o = self.opts;
        let perf_scaled = self.perf_scaled(o.samples);
        let pipeline = perf_scaled + self.inferno;
        let perf_scaled_ab = perf_scaled + self.perf_scaled(o.samples + o.diff_extra);
        let diff_pipeline = perf_scaled_ab + self.collapse_ab + self.diff_flame;
        let row = |name: &str, t: Timing| {
            println!("  {name:<58} {:>9} {:>9}", secs(t.wall), secs(t.cpu));
        };
        println!(
            "\nmedian of {} runs; {} CPUs; load average {}",
            o.rounds,
            std::thread::available_parallelism().map_or(1, usize::from),
            fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!("  {:<58} {:>9} {:>9}", "", "wall", "CPU");
        row(
            "hvprof report (every window, 4 flame graphs each)",
            self.report,
        );
        row(
            &format!(
                "inferno-collapse-perf | inferno-flamegraph ({} MB text)",
                self.script_mb
            ),
            self.inferno,
        );
        row(
            &format!(
                "perf script, real perf.data of {} samples",
                self.perf_samples
            ),
            self.perf,
        );
        row(
            &format!("perf script, scaled to {} samples", o.samples),
            perf_scaled,
        );
        row(
            "perf script | inferno-collapse-perf | inferno-flamegraph",
            pipeline,
        );
        println!();
        row(
            "hvprof diff (every window, 4 differential graphs each)",
            self.diff,
        );
        row("perf script of both, scaled", perf_scaled_ab);
        row("inferno-collapse-perf of both texts", self.collapse_ab);
        row(
            "inferno-diff-folded --normalize | inferno-flamegraph",
            self.diff_flame,
        );
        row(
            "perf script, collapse, diff-folded, flamegraph",
            diff_pipeline,
        );
        println!(
            "\nhvprof diff wrote {:.1} MB ({} KB of it diff.html); it shows the known difference: {}",
            mb(self.diff_total),
            self.diff_html / 1000,
            self.known
        );
        println!(
            "\nratio, report: the perf pipeline takes {:.1}× the wall time of hvprof report ({:.1}× the CPU time)",
            ratio(pipeline.wall, self.report.wall),
            ratio(pipeline.cpu, self.report.cpu)
        );
        println!(
            "ratio, diff: the perf diff pipeline takes {:.1}× the wall time of hvprof diff ({:.1}× the CPU time)",
            ratio(diff_pipeline.wall, self.diff.wall),
            ratio(diff_pipeline.cpu, self.diff.cpu)
        );
    }
}

impl std::ops::Add for Timing {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self {
            wall: self.wall + o.wall,
            cpu: self.cpu + o.cpu,
        }
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

#[expect(clippy::cast_precision_loss, reason = "display only")]
fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Bytes of every file under `dir`.
fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let meta = e.metadata()?;
        total += if meta.is_dir() {
            dir_size(&e.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// The second profile's extra stack in window 2's differential on-CPU
/// folded stacks: in B only, with all its samples (A's 0 scales to 0).
fn known_difference(diff: &Path, extra: u64) -> anyhow::Result<String> {
    let path = diff.join("w02-vms-5-8/oncpu.diff.folded");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let line = text
        .lines()
        .find(|l| l.contains(";__synth_regression "))
        .ok_or_else(|| anyhow!("{}: no __synth_regression stack", path.display()))?;
    let counts: Vec<&str> = line.rsplitn(3, ' ').take(2).collect();
    let want = [extra.to_string(), "0".to_owned()];
    ensure!(
        counts == want,
        "{}: the known difference is wrong: {line:?} (want A 0, B {extra})",
        path.display()
    );
    Ok(format!(
        "window 2, __synth_regression: A 0, B {extra} samples"
    ))
}

/// `inferno-diff-folded --normalize A B | inferno-flamegraph > SVG`.
fn diff_pipeline(
    diff_folded: &Path,
    flamegraph: &Path,
    [a, b]: [&Path; 2],
    svg: &Path,
) -> anyhow::Result<()> {
    let mut d = Command::new(diff_folded)
        .arg("--normalize")
        .arg(a)
        .arg(b)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", diff_folded.display()))?;
    let pipe = d.stdout.take().ok_or_else(|| anyhow!("no pipe"))?;
    let f = Command::new(flamegraph)
        .stdin(pipe)
        .stdout(fs::File::create(svg)?)
        .status()
        .with_context(|| format!("running {}", flamegraph.display()))?;
    let ds = d.wait()?;
    ensure!(
        ds.success() && f.success(),
        "the inferno diff pipeline failed ({ds}, {f})"
    );
    Ok(())
}
