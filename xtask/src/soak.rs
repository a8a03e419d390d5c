//! `./x soak`: `hvprof record -a` for minutes beside a clean build of this
//! project in a loop, and what a long recording costs: hvprof's memory over
//! time (its RSS and its BPF maps' kernel memory), its CPU, the losses by
//! kind, the time from the stop to every file written, and the profile's
//! size. A measurement, not a test: nothing here fails on a threshold.
//!
//! The workload is a copy of HEAD (`git archive`) built with its own target
//! directory, offline, from the cargo registry already on the machine:
//! `cargo clean`, then `cargo build` of the default workspace (hvprof with
//! its eBPF object, xtask, vmload), again until the time is up. Hundreds of
//! rustc, cc and linker processes, a nested cargo for the eBPF object and
//! both CPUs busy: the fork/exec churn and the stack variety that fill a
//! recording's maps.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};

use crate::massboot::{cpu_busy_seconds, process_cpu_seconds, signal};

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// How long to record, in minutes.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Use this hvprof instead of building the release one.
    #[arg(long)]
    pub hvprof: Option<PathBuf>,
    /// Extra argument for `hvprof record` (repeatable), e.g.
    /// `--hvprof-arg=--max-stacks=65536`.
    #[arg(long = "hvprof-arg", allow_hyphen_values = true)]
    pub hvprof_args: Vec<String>,
    /// Where the recording goes (default: a new directory in the system's
    /// temporary directory). Kept.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Seconds between two samples of hvprof's memory.
    #[arg(long, default_value_t = 5.0)]
    pub interval_s: f64,
}

/// One look at hvprof's process and the machine.
struct Sample {
    elapsed_s: f64,
    rss_mb: f64,
    /// The anonymous part of the RSS (heap, stacks): what the file-backed
    /// part (mapped binaries, read for symbols) is not.
    anon_mb: f64,
    /// The RSS of the BPF maps hvprof maps into its memory (the unwind
    /// tables, the ring buffer): kernel memory, counted in `maps_mb` too.
    mapped_maps_mb: f64,
    maps_mb: f64,
    maps: usize,
    load1: f64,
    builds: usize,
}

pub fn run(opts: &Opts, hvprof: &Path) -> anyhow::Result<()> {
    ensure!(opts.minutes > 0.0, "--minutes must be positive");
    ensure!(opts.interval_s > 0.0, "--interval-s must be positive");
    let pid = std::process::id();
    let out = opts
        .output
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("hvprof-soak-{pid}")));
    let copy = BuildCopy::new(&std::env::temp_dir().join(format!("hvprof-soak-build-{pid}")))?;
    println!(
        "soak: {} min of `{} record -a{}` beside a clean build of {} in a loop \
         (CARGO_TARGET_DIR {})",
        opts.minutes,
        hvprof.display(),
        opts.hvprof_args
            .iter()
            .fold(String::new(), |s, a| s + " " + a),
        copy.dir.display(),
        copy.dir.join("target").display()
    );

    let mut rec = Recording::start(hvprof, &opts.hvprof_args, &out)?;
    let machine_before = cpu_busy_seconds();
    let mut builds = BuildLoop::start(&copy);
    let start = Instant::now();
    let samples = watch(opts, &mut rec, &builds, start)?;
    let hvprof_cpu_s = process_cpu_seconds(rec.pid);
    let hwm_recording_mb = status_kb(rec.pid, "VmHWM:").map_or(0.0, kb_to_mb);
    let recorded_s = start.elapsed().as_secs_f64();
    let builds = builds.stop()?;
    let machine_cpu_s = cpu_busy_seconds() - machine_before;
    let stop = rec.stop()?;

    let summary: serde_json::Value = serde_json::from_slice(
        &fs::read(out.join("summary.json")).context("reading the recording's summary.json")?,
    )?;
    let profile_bytes = fs::metadata(out.join("profile.hvprof")).map_or(0, |m| m.len());
    let (dir_bytes, dir_files) = dir_size(&out);
    write_samples(&out.join("soak-samples.csv"), &samples)?;
    let figures = Figures {
        recorded_s,
        builds,
        machine_cpu_s,
        hvprof_cpu_s,
        hwm_recording_mb,
        stop,
        summary,
        profile_bytes,
        dir_bytes,
        dir_files,
    };
    print_table(&figures, &samples, &out);
    Ok(())
}

/// Samples hvprof's memory every interval until the time is up; fails if
/// hvprof or the build loop ends early.
fn watch(
    opts: &Opts,
    rec: &mut Recording,
    builds: &BuildLoop,
    start: Instant,
) -> anyhow::Result<Vec<Sample>> {
    let total = Duration::from_secs_f64(opts.minutes * 60.0);
    let interval = Duration::from_secs_f64(opts.interval_s);
    println!(
        "{:>8} {:>8} {:>8} {:>8} {:>9} {:>5} {:>6} {:>7}",
        "elapsed", "RSS MB", "anon MB", "mapped", "maps MB", "maps", "load1", "builds"
    );
    let mut samples = Vec::new();
    let mut next = start;
    loop {
        if let Some(status) = rec.exited()? {
            bail!(
                "hvprof record ended after {:.0} s ({status}):\n{}",
                start.elapsed().as_secs_f64(),
                rec.stderr_so_far()
            );
        }
        if let Some(log) = builds.failed() {
            bail!("the build of the project copy failed; the end of its log:\n{log}");
        }
        let (maps_mb, maps) = maps_memory(rec.pid);
        let s = Sample {
            elapsed_s: start.elapsed().as_secs_f64(),
            rss_mb: status_kb(rec.pid, "VmRSS:").map_or(0.0, kb_to_mb),
            anon_mb: status_kb(rec.pid, "RssAnon:").map_or(0.0, kb_to_mb),
            mapped_maps_mb: kb_to_mb(mapped_maps_kb(rec.pid)),
            maps_mb,
            maps,
            load1: load_average(),
            builds: builds.completed(),
        };
        println!(
            "{:>7.0}s {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>5} {:>6.2} {:>7}",
            s.elapsed_s,
            s.rss_mb,
            s.anon_mb,
            s.mapped_maps_mb,
            s.maps_mb,
            s.maps,
            s.load1,
            s.builds
        );
        samples.push(s);
        if start.elapsed() >= total {
            return Ok(samples);
        }
        next += interval;
        let until = next.min(start + total);
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
    }
}

/// A copy of HEAD in a temporary directory, removed on drop.
struct BuildCopy {
    dir: PathBuf,
}

impl BuildCopy {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let root = crate::toolchain::root();
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let copy = Self {
            dir: dir.to_owned(),
        };
        let tar = dir.join("head.tar");
        crate::run(
            Command::new("git")
                .arg("-C")
                .arg(&root)
                .args(["archive", "--format=tar", "-o"])
                .arg(&tar)
                .arg("HEAD"),
        )?;
        crate::run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(dir))?;
        fs::remove_file(&tar)?;
        // The eBPF object needs the project's bpf-linker (`./x bootstrap`),
        // which profiler/build.rs looks for in .tools/.
        std::os::unix::fs::symlink(root.join(".tools"), dir.join(".tools"))
            .context("linking .tools into the build copy")?;
        Ok(copy)
    }
}

impl Drop for BuildCopy {
    fn drop(&mut self) {
        // The .tools symlink is removed, not followed.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What the build loop did.
struct Builds {
    /// Wall time of each build that finished.
    seconds: Vec<f64>,
    /// Whether a build was cut off by the stop.
    interrupted: bool,
}

/// `cargo clean` then `cargo build` of the copy, again and again, each in
/// its own process group so that the stop kills it with every rustc under
/// it.
struct BuildLoop {
    shared: Arc<LoopState>,
    thread: Option<JoinHandle<anyhow::Result<Builds>>>,
}

/// What the loop's thread and the soak share.
#[derive(Default)]
struct LoopState {
    stop: AtomicBool,
    /// Process group (the cargo's pid) running now; 0 when none.
    running: Mutex<i32>,
    completed: AtomicUsize,
    /// The end of the build log, once a build failed.
    failure: Mutex<Option<String>>,
}

/// How one cargo step ended.
enum Step {
    Ok,
    Failed,
    Stopped,
}

impl LoopState {
    /// Runs one cargo command in the copy; its output goes to `log`.
    fn step(&self, dir: &Path, log: &fs::File, args: &[&str]) -> anyhow::Result<Step> {
        let mut cmd = crate::cargo();
        cmd.current_dir(dir)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .process_group(0);
        let mut child = {
            // Under the lock, so that no cargo starts once the stop is set.
            let mut pgid = self.running.lock().map_err(|_| anyhow!("poisoned"))?;
            if self.stop.load(Ordering::SeqCst) {
                return Ok(Step::Stopped);
            }
            let child = cmd.spawn().context("starting cargo")?;
            *pgid = i32::try_from(child.id())?;
            child
        };
        let status = child.wait()?;
        *self.running.lock().map_err(|_| anyhow!("poisoned"))? = 0;
        Ok(if self.stop.load(Ordering::SeqCst) {
            Step::Stopped
        } else if status.success() {
            Step::Ok
        } else {
            Step::Failed
        })
    }

    /// Builds until stopped, or until a build fails.
    fn builds(&self, dir: &Path) -> anyhow::Result<Builds> {
        let log_path = dir.join("build.log");
        let log = fs::File::create(&log_path)?;
        let mut seconds = Vec::new();
        loop {
            let t = Instant::now();
            let outcome = match self.step(dir, &log, &["clean", "--offline"])? {
                Step::Ok => self.step(dir, &log, &["build", "--offline"])?,
                other => other,
            };
            match outcome {
                Step::Ok => {
                    seconds.push(t.elapsed().as_secs_f64());
                    self.completed.store(seconds.len(), Ordering::Relaxed);
                }
                Step::Stopped => {
                    return Ok(Builds {
                        seconds,
                        interrupted: true,
                    });
                }
                Step::Failed => {
                    *self.failure.lock().map_err(|_| anyhow!("poisoned"))? =
                        Some(tail(&fs::read_to_string(&log_path).unwrap_or_default(), 30));
                    return Ok(Builds {
                        seconds,
                        interrupted: false,
                    });
                }
            }
        }
    }

    /// Sets the stop and kills the cargo running now with every process
    /// under it.
    fn kill(&self) {
        let Ok(pgid) = self.running.lock() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        if *pgid > 0 {
            // SAFETY: signalling the process group of a cargo this loop
            // started (its own group, made with process_group(0)).
            unsafe { libc::killpg(*pgid, libc::SIGKILL) };
        }
    }
}

impl BuildLoop {
    fn start(copy: &BuildCopy) -> Self {
        let shared = Arc::new(LoopState::default());
        let (state, dir) = (shared.clone(), copy.dir.clone());
        let thread = std::thread::spawn(move || state.builds(&dir));
        Self {
            shared,
            thread: Some(thread),
        }
    }

    fn completed(&self) -> usize {
        self.shared.completed.load(Ordering::Relaxed)
    }

    /// The end of the build log, if a build failed.
    fn failed(&self) -> Option<String> {
        self.shared.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Kills the build running now; waits for the loop to end.
    fn stop(&mut self) -> anyhow::Result<Builds> {
        self.shared.kill();
        self.thread
            .take()
            .ok_or_else(|| anyhow!("the build loop is stopped already"))?
            .join()
            .map_err(|_| anyhow!("the build loop panicked"))?
    }
}

impl Drop for BuildLoop {
    fn drop(&mut self) {
        // On an early return: no build outlives the soak.
        self.shared.kill();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The last `n` lines of a text.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `hvprof record -a` running, its stdout and stderr collected by threads.
struct Recording {
    child: Option<Child>,
    pid: u32,
    stdout: Option<JoinHandle<String>>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
}

/// What the stop took.
struct Stopped {
    /// From SIGINT to the exit, by polling every 20 ms.
    sigint_to_exit_ms: u128,
    /// hvprof's own "wrote … in N ms after the stop".
    stop_to_written: Option<String>,
    /// User and system CPU of the whole run, stop included (rusage).
    cpu_total_s: f64,
    /// The high-water mark of RSS, last read before the exit.
    hwm_mb: f64,
    /// The most anonymous and file-backed memory seen during the stop.
    anon_max_mb: f64,
    file_max_mb: f64,
    /// What hvprof printed on stderr after "recording".
    stderr: String,
}

impl Recording {
    fn start(hvprof: &Path, args: &[String], out: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(hvprof)
            .args(["record", "-a"])
            .args(args)
            .arg("-o")
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", hvprof.display()))?;
        let pid = child.id();
        let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let mut rec = Self {
            child: Some(child),
            pid,
            stdout: Some(std::thread::spawn(move || {
                let mut s = String::new();
                let _ = stdout.read_to_string(&mut s);
                s
            })),
            stderr: Arc::new(Mutex::new(String::new())),
            stderr_thread: None,
        };
        let mut lines = BufReader::new(stderr).lines();
        let mut before = String::new();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("hvprof: recording") => {
                    println!("{l}");
                    break;
                }
                Some(Ok(l)) => {
                    before.push_str(&l);
                    before.push('\n');
                }
                _ => bail!("hvprof exited before recording:\n{before}"),
            }
        }
        if !before.is_empty() {
            print!("{before}");
        }
        let collected = rec.stderr.clone();
        rec.stderr_thread = Some(std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if let Ok(mut s) = collected.lock() {
                    s.push_str(&l);
                    s.push('\n');
                }
            }
        }));
        Ok(rec)
    }

    fn stderr_so_far(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Its exit status, if it has ended.
    fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match &mut self.child {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    /// SIGINT, then polls until hvprof exits, reading its RSS high-water
    /// mark until then; reaps it with `wait4` for its whole CPU time.
    fn stop(&mut self) -> anyhow::Result<Stopped> {
        let child = self.child.take().ok_or_else(|| anyhow!("hvprof is gone"))?;
        let pid = i32::try_from(child.id())?;
        let (mut hwm_mb, mut anon_max_mb, mut file_max_mb) = (0.0_f64, 0.0_f64, 0.0_f64);
        let sent = Instant::now();
        signal(child.id(), libc::SIGINT);
        let (status, usage) = loop {
            for (field, max) in [
                ("VmHWM:", &mut hwm_mb),
                ("RssAnon:", &mut anon_max_mb),
                ("RssFile:", &mut file_max_mb),
            ] {
                if let Some(kb) = status_kb(child.id(), field) {
                    *max = max.max(kb_to_mb(kb));
                }
            }
            let mut status = 0;
            // SAFETY: an all-zero rusage is a valid value to overwrite.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: reaping our own child by pid, with valid pointers.
            let r = unsafe { libc::wait4(pid, &raw mut status, libc::WNOHANG, &raw mut usage) };
            ensure!(
                r >= 0,
                "waiting for hvprof: {}",
                std::io::Error::last_os_error()
            );
            if r == pid {
                break (status, usage);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let sigint_to_exit_ms = sent.elapsed().as_millis();
        let stdout = self
            .stdout
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let stderr = self.stderr_so_far();
        ensure!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "hvprof record failed (wait status {status:#x}):\n{stderr}"
        );
        #[expect(clippy::cast_precision_loss, reason = "seconds for display")]
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok(Stopped {
            sigint_to_exit_ms,
            stop_to_written: stdout
                .lines()
                .find(|l| l.contains("after the stop"))
                .and_then(|l| l.rsplit(" in ").next())
                .map(str::to_owned),
            cpu_total_s: secs(usage.ru_utime) + secs(usage.ru_stime),
            hwm_mb,
            anon_max_mb,
            file_max_mb,
            stderr,
        })
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        // On an early return: stop hvprof the way a user would, so that it
        // detaches its programs, and wait for it.
        if let Some(mut child) = self.child.take() {
            crate::massboot::stop_child(&mut child, libc::SIGINT, Duration::from_secs(60));
        }
    }
}

/// A `kB` field of /proc/PID/status.
/// The RSS of `pid`'s mappings of BPF maps (`anon_inode:bpf-map` in its
/// smaps), in kB.
fn mapped_maps_kb(pid: u32) -> u64 {
    let Ok(smaps) = fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let mut in_map = false;
    let mut kb = 0;
    for line in smaps.lines() {
        if line.starts_with(|c: char| c.is_ascii_hexdigit()) && line.contains('-') {
            in_map = line.ends_with("anon_inode:bpf-map");
        } else if in_map && let Some(v) = line.strip_prefix("Rss:") {
            kb += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    kb
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[expect(clippy::cast_precision_loss, reason = "megabytes for display")]
fn kb_to_mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Kernel memory of the BPF maps hvprof holds (`memlock:` of its map file
/// descriptors' fdinfo, each map once), in MB, and how many maps.
fn maps_memory(pid: u32) -> (f64, usize) {
    let mut seen = std::collections::BTreeMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:")) {
            seen.insert(id, bytes);
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "megabytes for display")]
    let mb = seen.values().sum::<u64>() as f64 / (1024.0 * 1024.0);
    (mb, seen.len())
}

/// The 1-minute load average.
fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Bytes and files under `dir`.
fn dir_size(dir: &Path) -> (u64, usize) {
    let (mut bytes, mut files) = (0, 0);
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let (b, f) = dir_size(&entry.path());
            bytes += b;
            files += f;
        } else {
            bytes += meta.len();
            files += 1;
        }
    }
    (bytes, files)
}

fn write_samples(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let mut csv =
        String::from("elapsed_s,rss_mb,anon_mb,mapped_maps_mb,maps_mb,maps,load1,builds\n");
    for s in samples {
        let _ = writeln!(
            csv,
            "{:.1},{:.1},{:.1},{:.1},{:.1},{},{:.2},{}",
            s.elapsed_s,
            s.rss_mb,
            s.anon_mb,
            s.mapped_maps_mb,
            s.maps_mb,
            s.maps,
            s.load1,
            s.builds
        );
    }
    fs::write(path, csv).with_context(|| format!("writing {}", path.display()))
}

/// Everything the closing table shows besides the samples.
struct Figures {
    recorded_s: f64,
    builds: Builds,
    machine_cpu_s: f64,
    hvprof_cpu_s: f64,
    hwm_recording_mb: f64,
    stop: Stopped,
    summary: serde_json::Value,
    profile_bytes: u64,
    dir_bytes: u64,
    dir_files: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Least-squares slope of `y` over the samples' time, per minute.
fn slope_per_min(samples: &[Sample], y: impl Fn(&Sample) -> f64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a few hundred samples")]
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mx = samples.iter().map(|s| s.elapsed_s).sum::<f64>() / n;
    let my = samples.iter().map(&y).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for s in samples {
        sxy += (s.elapsed_s - mx) * (y(s) - my);
        sxx += (s.elapsed_s - mx).powi(2);
    }
    if sxx == 0.0 { 0.0 } else { sxy / sxx * 60.0 }
}

/// Losses by kind, over every window and outside them.
fn losses(summary: &serde_json::Value) -> std::collections::BTreeMap<String, u64> {
    let mut by_kind = std::collections::BTreeMap::new();
    let windows = summary["windows"].as_array().into_iter().flatten();
    for losses in windows
        .map(|w| &w["losses"])
        .chain(std::iter::once(&summary["other_losses"]))
    {
        for (kind, n) in losses.as_object().into_iter().flatten() {
            *by_kind.entry(kind.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
    }
    by_kind
}

/// Sum of a per-window field of summary.json.
fn window_sum(summary: &serde_json::Value, field: &str) -> u64 {
    summary["windows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w[field].as_u64())
        .sum()
}

fn row(what: &str, value: &str) {
    println!("  {what:<36} {value}");
}

fn print_table(f: &Figures, samples: &[Sample], out: &Path) {
    println!("\nsoak: closing figures");
    print_costs(f, samples);
    print_outcome(f, out);
}

/// The workload and hvprof's CPU.
fn print_costs(f: &Figures, samples: &[Sample]) {
    let loads: Vec<f64> = samples.iter().map(|s| s.load1).collect();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let b = &f.builds;

    row("recorded", &format!("{:.1} min", f.recorded_s / 60.0));
    row(
        "builds completed",
        &format!(
            "{} (median {:.0} s each){}",
            b.seconds.len(),
            median(b.seconds.clone()),
            if b.interrupted {
                ", one more cut off by the stop"
            } else {
                ""
            }
        ),
    );
    row(
        "load average (1 min)",
        &format!(
            "min {:.2}, median {:.2}, max {:.2}",
            min(&loads),
            median(loads.clone()),
            max(&loads)
        ),
    );
    row(
        "hvprof CPU while recording",
        &format!(
            "{:.1} s ({:.2} % of the machine's {:.0} s busy)",
            f.hvprof_cpu_s,
            f.hvprof_cpu_s / f.machine_cpu_s.max(1e-9) * 100.0,
            f.machine_cpu_s
        ),
    );
    row(
        "hvprof CPU, stop included",
        &format!("{:.1} s", f.stop.cpu_total_s),
    );
    print_memory(f, samples);
}

/// hvprof's memory and the kernel memory of its maps.
fn print_memory(f: &Figures, samples: &[Sample]) {
    let rss: Vec<f64> = samples.iter().map(|s| s.rss_mb).collect();
    let anon: Vec<f64> = samples.iter().map(|s| s.anon_mb).collect();
    let own: Vec<f64> = samples
        .iter()
        .map(|s| s.rss_mb - s.mapped_maps_mb)
        .collect();
    let maps: Vec<f64> = samples.iter().map(|s| s.maps_mb).collect();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let first = |v: &[f64]| v.first().copied().unwrap_or(0.0);
    let last = |v: &[f64]| v.last().copied().unwrap_or(0.0);
    let second_half = &samples[samples.len() / 2..];
    row(
        "RSS first/median/max/last",
        &format!(
            "{:.1} / {:.1} / {:.1} / {:.1} MB",
            first(&rss),
            median(rss.clone()),
            max(&rss),
            last(&rss)
        ),
    );
    row(
        "RSS but the BPF maps mapped",
        &format!(
            "{:.1} / {:.1} / {:.1} / {:.1} MB (the maps' {:.1} MB are kernel memory, counted below)",
            first(&own),
            median(own.clone()),
            max(&own),
            last(&own),
            samples.last().map_or(0.0, |s| s.mapped_maps_mb)
        ),
    );
    row(
        "RSS growth",
        &format!(
            "{:+.2} MB/min over the run, {:+.2} MB/min over its second half",
            slope_per_min(samples, |s| s.rss_mb),
            slope_per_min(second_half, |s| s.rss_mb)
        ),
    );
    row(
        "RSS high-water mark",
        &format!(
            "{:.1} MB while recording, {:.1} MB with the stop",
            f.hwm_recording_mb, f.stop.hwm_mb
        ),
    );
    row(
        "anonymous RSS first/median/max/last",
        &format!(
            "{:.1} / {:.1} / {:.1} / {:.1} MB; during the stop at most {:.1} MB \
             (file-backed at most {:.1} MB)",
            first(&anon),
            median(anon.clone()),
            max(&anon),
            last(&anon),
            f.stop.anon_max_mb,
            f.stop.file_max_mb
        ),
    );
    row(
        "BPF maps (memlock) first/max/last",
        &format!(
            "{:.1} / {:.1} / {:.1} MB in {} maps ({:+.2} MB/min)",
            first(&maps),
            max(&maps),
            last(&maps),
            samples.last().map_or(0, |s| s.maps),
            slope_per_min(samples, |s| s.maps_mb)
        ),
    );
}

/// What hvprof recorded, lost and wrote.
fn print_outcome(f: &Figures, out: &Path) {
    #[expect(clippy::cast_precision_loss, reason = "megabytes for display")]
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    let s = &f.summary;
    row(
        "recorded events",
        &format!(
            "{} on-CPU samples, {} off-CPU blocks, {} lock contentions, {} forks",
            window_sum(s, "oncpu_samples"),
            window_sum(s, "offcpu_blocks"),
            window_sum(s, "lock_contentions"),
            window_sum(s, "forks")
        ),
    );
    let losses = losses(s);
    row(
        "losses",
        &format!("{} in all", losses.values().sum::<u64>()),
    );
    for (kind, n) in &losses {
        row(&format!("  {kind}"), &n.to_string());
    }
    row(
        "stop to files written",
        f.stop
            .stop_to_written
            .as_deref()
            .unwrap_or("(no `after the stop` line)"),
    );
    row(
        "SIGINT to exit",
        &format!("{} ms", f.stop.sigint_to_exit_ms),
    );
    row("profile.hvprof", &format!("{:.1} MB", mb(f.profile_bytes)));
    row(
        "output directory",
        &format!("{:.1} MB in {} files", mb(f.dir_bytes), f.dir_files),
    );
    row("recording", &out.display().to_string());
    if !f.stop.stderr.trim().is_empty() {
        println!(
            "\nhvprof's stderr while recording:\n{}",
            tail(&f.stop.stderr, 20)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(elapsed_s: f64, rss_mb: f64) -> Sample {
        Sample {
            elapsed_s,
            rss_mb,
            anon_mb: 0.0,
            mapped_maps_mb: 0.0,
            maps_mb: 0.0,
            maps: 0,
            load1: 0.0,
            builds: 0,
        }
    }

    #[test]
    fn slope_is_per_minute() {
        let s: Vec<Sample> = (0..10)
            .map(|i| sample(f64::from(i) * 30.0, 50.0 + f64::from(i)))
            .collect();
        assert!((slope_per_min(&s, |s| s.rss_mb) - 2.0).abs() < 1e-9);
        assert!(slope_per_min(&s[..1], |s| s.rss_mb).abs() < 1e-9);
    }

    #[test]
    fn losses_add_up_over_windows_and_outside() {
        let summary = serde_json::json!({
            "windows": [
                {"losses": {"stack_map_full": 3}},
                {"losses": {"stack_map_full": 2, "ring_dropped": 1}},
            ],
            "other_losses": {"ring_dropped": 4},
        });
        let l = losses(&summary);
        assert_eq!(l["stack_map_full"], 5);
        assert_eq!(l["ring_dropped"], 5);
    }
}
