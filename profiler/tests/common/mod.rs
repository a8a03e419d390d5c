//! What the privileged `hvprof record` tests share: the sample workload,
//! running a recording, and ground-truth assertions.
#![allow(dead_code, reason = "each test file uses its own part")]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use profiler::profile::Profile;

pub const HZ: u64 = 99;

pub fn vmload() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--package", "vmload", "--bin", "vmload"])
            .status()
            .expect("run cargo");
        assert!(status.success(), "building samples/vmload failed");
        let path = Path::new(env!("CARGO_BIN_EXE_hvprof")).with_file_name("vmload");
        assert!(path.is_file(), "{} missing", path.display());
        assert!(
            Path::new("/dev/kvm").exists(),
            "these tests create VMs: /dev/kvm is needed"
        );
        path
    })
}

/// The project's xtask (`./x`), built.
pub fn xtask() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--package", "xtask"])
        .status()
        .expect("run cargo");
    assert!(status.success(), "building xtask failed");
    Path::new(env!("CARGO_BIN_EXE_hvprof")).with_file_name("xtask")
}

/// `./x massboot ARGS` with this build's hvprof (the report in `dir`, if
/// given); panics with its output if it fails.
pub fn massboot(args: &[&str], dir: Option<&Path>) {
    let mut cmd = Command::new(xtask());
    cmd.arg("massboot")
        .args(args)
        .arg("--hvprof")
        .arg(env!("CARGO_BIN_EXE_hvprof"));
    if let Some(dir) = dir {
        cmd.arg("-o").arg(dir);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "massboot {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hvprof-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs `hvprof record ARGS -o DIR` to completion and reads the profile.
pub fn record(name: &str, args: &[&str]) -> (Profile, PathBuf) {
    let (p, dir, _) = record_with_stderr(name, args);
    (p, dir)
}

/// [`record`], also returning what hvprof and the command wrote to stderr.
pub fn record_with_stderr(name: &str, args: &[&str]) -> (Profile, PathBuf, String) {
    let dir = out_dir(name);
    let out = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .arg("record")
        .arg("-o")
        .arg(&dir)
        .args(args)
        .output()
        .expect("run hvprof");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hvprof record failed:\n{stdout}\n{stderr}"
    );
    let profile = Profile::read(&dir.join("profile.hvprof")).expect("read profile");
    (profile, dir, stderr.into_owned())
}

/// On-CPU samples per window of stacks whose leaf-most named frame is `func`.
pub fn samples_of(p: &Profile, func: &str) -> BTreeMap<u32, u64> {
    let mut m = BTreeMap::new();
    for r in &p.oncpu {
        if p.frame_names(&r.stack).any(|f| f == func) {
            *m.entry(r.window).or_default() += r.samples;
        }
    }
    m
}

/// Off-CPU ns per window of stacks through `func`.
pub fn blocked_in(p: &Profile, func: &str) -> BTreeMap<u32, u64> {
    let mut m = BTreeMap::new();
    for r in &p.offcpu {
        if p.frame_names(&r.stack).any(|f| f == func) {
            *m.entry(r.window).or_default() += r.total_ns;
        }
    }
    m
}

pub fn tgids_of(p: &Profile, func: &str) -> Vec<u32> {
    let mut t: Vec<u32> = p
        .oncpu
        .iter()
        .filter(|r| p.frame_names(&r.stack).any(|f| f == func))
        .map(|r| r.tgid)
        .collect();
    t.sort_unstable();
    t.dedup();
    t
}

/// `ms` of CPU at `HZ`, within ±35 % (the machine has two CPUs and other
/// tests' leftovers; the busy loop is wall-clock bounded).
pub fn assert_samples(got: u64, ms: u64, what: &str) {
    let want = ms * HZ / 1000;
    let (lo, hi) = (want * 65 / 100, want * 135 / 100 + 2);
    assert!(
        (lo..=hi).contains(&got),
        "{what}: {got} samples, want {want} (±35%)"
    );
}

/// A sleep of `ms`: never less, at most 15 % + 20 ms more.
#[expect(clippy::cast_precision_loss, reason = "display only")]
pub fn assert_blocked(got_ns: u64, ms: u64, what: &str) {
    let want = ms * 1_000_000;
    let hi = want * 115 / 100 + 20_000_000;
    assert!(
        (want * 99 / 100..=hi).contains(&got_ns),
        "{what}: {:.1} ms off-CPU, want {ms} ms",
        got_ns as f64 / 1e6
    );
}

/// Our program or the tracepoint's runner, which must never show as a frame.
pub fn is_tracing_frame(f: &str) -> bool {
    f.starts_with("bpf_prog_") || f.starts_with("bpf_trace_run") || f.starts_with("__traceiter_")
}

pub fn folded_files(dir: &Path) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for w in std::fs::read_dir(dir).unwrap() {
        let w = w.unwrap().path();
        if w.is_dir() {
            for f in ["oncpu.folded", "offcpu.folded"] {
                let text = std::fs::read_to_string(w.join(f)).unwrap();
                m.insert(
                    format!("{}/{f}", w.file_name().unwrap().to_string_lossy()),
                    text,
                );
            }
        }
    }
    m
}

/// Starts `hvprof record ARGS` and waits until it says it is recording.
pub fn start_recording(dir: &Path, args: &[&str]) -> Child {
    start_recording_logged(dir, args).0
}

/// [`start_recording`], and what hvprof writes to stderr from then on, as
/// it comes.
pub fn start_recording_logged(dir: &Path, args: &[&str]) -> (Child, Arc<Mutex<String>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .arg("record")
        .arg("-o")
        .arg(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "hvprof did not start recording");
        match lines.next() {
            Some(Ok(l)) if l.contains("recording") => break,
            Some(_) => {}
            None => panic!("hvprof exited before recording: {:?}", child.wait()),
        }
    }
    // Keep draining stderr so hvprof never blocks on a full pipe.
    let log = Arc::new(Mutex::new(String::new()));
    let kept = Arc::clone(&log);
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let mut log = kept.lock().unwrap();
            log.push_str(&l);
            log.push('\n');
        }
    });
    (child, log)
}

/// Sends `signal` to a process this test started.
pub fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) of a child this test started and has not waited for.
    assert_eq!(unsafe { libc::kill(child.id().cast_signed(), signal) }, 0);
}

/// No loss, but for the lock tracer's rare pairing losses: a contention's
/// end or begin that the kernel kept its program from seeing. An interrupt
/// that contends while hvprof's own program for a contention starts or ends
/// on the same CPU is one cause (see docs/internals.md, "Kernel lock
/// contention"). At most one in 1000 lock waits, and at least 3 allowed.
pub fn assert_no_losses(p: &Profile) {
    use profiler::record::loss_name;
    use profiler_common::record::Loss;
    let pairing = [
        loss_name(Loss::LockEndUnseen),
        loss_name(Loss::LockBeginUnseen),
    ];
    let (unpaired, others): (Vec<_>, Vec<_>) = p
        .losses
        .iter()
        .filter(|l| l.count > 0)
        .partition(|l| pairing.contains(&l.kind.as_str()));
    assert!(others.is_empty(), "losses: {:?}", p.losses);
    let waits: u64 = p.locks.iter().map(|l| l.count).sum();
    let n: u64 = unpaired.iter().map(|l| l.count).sum();
    assert!(
        n <= (waits / 1000).max(3),
        "{n} lock waits not paired of {waits}: {:?}",
        p.losses
    );
}
