//! Privileged integration test of the dbus tracer against the sample D-Bus
//! service (`samples/dbus/service.py`) on a private bus, called through the
//! real client libraries: `dbus-send` (libdbus), `gdbus` (GIO) and `busctl`
//! (sd-bus). The service never answers every third `Work` call, so the
//! test knows exactly which calls time out, and for how long they wait.
//! `./x test` installs the tools if they are missing; without them
//! (or root, or /dev/kvm) the test fails, it does not skip.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use profiler::{
    profile::Profile,
    tables::{self, AnyTable as _},
};

const WORK: &str = "org.hvprof.Sample.Work";

/// The private bus and the service on it; both ended (by pid) and the
/// directory removed when dropped, whatever the test's outcome.
struct Bus {
    dir: PathBuf,
    daemon: Child,
    service: Option<Child>,
}

impl Bus {
    /// A bus of its own for the test `name` (tests run in parallel).
    fn start(name: &str, stall_every: u32) -> Self {
        for tool in [
            "/usr/bin/dbus-daemon",
            "/usr/bin/dbus-send",
            "/usr/bin/gdbus",
            "/usr/bin/busctl",
            "/usr/bin/python3",
        ] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: run `./x test`, which installs the D-Bus tools"
            );
        }
        let dir = std::env::temp_dir().join(format!("hvprof-dbus-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the bus directory");
        let daemon = Command::new("/usr/bin/dbus-daemon")
            .args(["--session", "--nofork", "--print-address"])
            .arg(format!("--address=unix:path={}", dir.join("bus").display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbus-daemon");
        let mut bus = Self {
            dir,
            daemon,
            service: None,
        };
        let mut line = String::new();
        BufReader::new(bus.daemon.stdout.take().expect("daemon stdout"))
            .read_line(&mut line)
            .expect("read the bus address");
        assert!(line.starts_with("unix:"), "dbus-daemon said {line:?}");
        let service_py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/dbus/service.py");
        let mut service = Command::new("/usr/bin/python3")
            .arg(&service_py)
            .arg("--address")
            .arg(bus.address())
            .arg("--stall-every")
            .arg(stall_every.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the sample service");
        let mut ready = String::new();
        BufReader::new(service.stdout.take().expect("service stdout"))
            .read_line(&mut ready)
            .expect("read the service's readiness");
        bus.service = Some(service);
        assert_eq!(ready.trim(), "ready", "the sample service did not start");
        bus
    }

    fn address(&self) -> String {
        format!("unix:path={}", self.dir.join("bus").display())
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        if let Some(s) = &mut self.service {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn vmload() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--package", "vmload", "--bin", "vmload"])
        .status()
        .expect("run cargo");
    assert!(status.success(), "building samples/vmload failed");
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test creates VMs to move windows: /dev/kvm is needed"
    );
    Path::new(env!("CARGO_BIN_EXE_hvprof")).with_file_name("vmload")
}

/// Calls, timeouts and longest call of one method of one library, per window.
fn calls(p: &Profile, library: &str, method: &str) -> BTreeMap<u32, (u64, u64, u64)> {
    let mut m: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
    for c in p
        .dbus
        .iter()
        .filter(|c| c.library == library && c.method() == method)
    {
        let e = m.entry(c.window).or_default();
        e.0 += c.calls;
        e.1 += c.timeouts;
        e.2 = e.2.max(c.max_ns);
    }
    m
}

#[test]
fn dbus_calls_are_counted_per_library_window_and_method_with_timeouts() {
    let bus = Bus::start("counted", 3);
    let dir = bus.dir.join("out");
    let p = record_one_library_per_window(&bus, &dir);
    let table = tables::DBUS.table(&p, None, true).text();
    assert_three_work_calls_per_library(&p, &table);
    assert_only_the_targets_outermost_calls_count(&p, &table);
    assert_blocked_time_is_under_the_calls_frames(&p, &dir);
    assert_summary_and_window_files_carry_the_calls(&p, &dir);
    assert!(
        p.losses.iter().all(|l| l.count == 0),
        "losses: {:?}",
        p.losses
    );
}

/// Records a command that makes three Work calls per library, one library
/// per window (a VM between them), while a process outside the target set
/// calls the same service. Returns the profile.
fn record_one_library_per_window(bus: &Bus, dir: &Path) -> Profile {
    let addr = bus.address();
    let vmload = vmload();
    let started = bus.dir.join("started");
    let outsider_done = bus.dir.join("outsider-done");
    // The recorded command: three Work calls per library, one library per
    // window (a VM between them); the service leaves every third call
    // unanswered, so each batch has exactly one timeout. Every client starts
    // after the recording began. It waits for the outsider's calls, made
    // meanwhile from outside the target set.
    let script = format!(
        r"set -u
touch {started}
while [ ! -e {outsider_done} ]; do sleep 0.01; done
for i in 1 2 3; do
  dbus-send --bus={addr} --print-reply --reply-timeout=300 --dest=org.hvprof.Sample /org/hvprof/Sample {WORK} uint32:$i >/dev/null 2>&1
done
{vmload} vm
for i in 1 2 3; do
  gdbus call --address {addr} --dest org.hvprof.Sample --object-path /org/hvprof/Sample --method {WORK} --timeout 1 $i >/dev/null 2>&1
done
{vmload} vm
for i in 1 2 3; do
  busctl --address={addr} call --timeout=0.3 org.hvprof.Sample /org/hvprof/Sample org.hvprof.Sample Work u $i >/dev/null 2>&1
done
exit 0
",
        started = started.display(),
        outsider_done = outsider_done.display(),
        vmload = vmload.display(),
    );
    let hvprof = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .args(["record", "--tracers", "dbus,offcpu", "--window-size", "1"])
        .arg("-o")
        .arg(dir)
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hvprof");
    let t0 = Instant::now();
    while !started.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the recorded command did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    call_ping_from_outside(&addr);
    std::fs::write(&outsider_done, "").expect("signal the recorded command");
    let out = hvprof.wait_with_output().expect("wait for hvprof");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "hvprof failed:\n{stdout}\n{stderr}");
    let p = Profile::read(&dir.join("profile.hvprof")).expect("read the profile");
    assert!(
        p.meta.tracers.iter().any(|t| t == "dbus"),
        "the dbus tracer did not run: {stderr}"
    );
    assert_eq!(p.vms.len(), 2, "two VMs move the windows");
    p
}

/// Outside the target set: the same libraries, a method nobody in the
/// target calls.
fn call_ping_from_outside(addr: &str) {
    for _ in 0..2 {
        let ok = Command::new("/usr/bin/dbus-send")
            .arg(format!("--bus={addr}"))
            .args([
                "--print-reply",
                "--dest=org.hvprof.Sample",
                "/org/hvprof/Sample",
                "org.hvprof.Sample.Ping",
            ])
            .stdout(Stdio::null())
            .status()
            .expect("run dbus-send");
        assert!(ok.success(), "the outsider's libdbus Ping failed");
        let ok = Command::new("/usr/bin/gdbus")
            .args(["call", "--address", addr, "--dest", "org.hvprof.Sample"])
            .args(["--object-path", "/org/hvprof/Sample"])
            .args(["--method", "org.hvprof.Sample.Ping"])
            .stdout(Stdio::null())
            .status()
            .expect("run gdbus");
        assert!(ok.success(), "the outsider's GIO Ping failed");
    }
}

/// Per library: exactly three Work calls, in its own window, one of them
/// timed out after the timeout the client passed.
fn assert_three_work_calls_per_library(p: &Profile, table: &str) {
    for (library, window, timeout_ms) in [("libdbus", 0, 300), ("gio", 1, 1000), ("sd-bus", 2, 300)]
    {
        let got = calls(p, library, WORK);
        assert_eq!(
            got.keys().copied().collect::<Vec<_>>(),
            vec![window],
            "{library}: Work calls in windows {got:?}, expected only window {window}\n{table}"
        );
        let (n, timeouts, max_ns) = got[&window];
        assert_eq!(
            n, 3,
            "{library}: Work calls (nested calls count once)\n{table}"
        );
        assert_eq!(timeouts, 1, "{library}: timeouts\n{table}");
        let longest_ms = max_ns / 1_000_000;
        assert!(
            (timeout_ms..timeout_ms + 150).contains(&longest_ms),
            "{library}: the timed-out call took {longest_ms} ms, its timeout is {timeout_ms} ms\n{table}"
        );
        let rows: Vec<_> = p
            .dbus
            .iter()
            .filter(|c| c.library == library && c.method() == WORK)
            .collect();
        for c in &rows {
            assert_eq!(
                c.destination.as_deref(),
                Some("org.hvprof.Sample"),
                "{library}"
            );
            assert_eq!(c.path.as_deref(), Some("/org/hvprof/Sample"), "{library}");
            assert_eq!(
                c.timeout_ms,
                Some(i64::try_from(timeout_ms).unwrap()),
                "{library}: timeout passed"
            );
        }
        // The two answered calls are fast: the "fast or full timeout" shape.
        let total: u64 = rows.iter().map(|c| c.total_ns).sum();
        assert!(
            total - max_ns < 100_000_000,
            "{library}: the answered calls took {} ms together",
            (total - max_ns) / 1_000_000
        );
    }
}

/// A nested GIO call counts once, each client's own Hello and Introspect
/// count exactly, and the outsider's calls are absent.
fn assert_only_the_targets_outermost_calls_count(p: &Profile, table: &str) {
    // GIO's call ends in send_message_with_reply_sync: counted as the
    // outermost function only.
    assert!(
        p.dbus
            .iter()
            .filter(|c| c.library == "gio")
            .all(|c| c.function != "g_dbus_connection_send_message_with_reply_sync"),
        "a nested GIO call was counted as its own call\n{table}"
    );
    // Each client process registers on the bus first (libdbus and GIO make
    // that Hello call blocking; sd-bus makes it asynchronously), and gdbus
    // introspects the method before calling it.
    let hello = "org.freedesktop.DBus.Hello";
    assert_eq!(calls(p, "libdbus", hello).get(&0).map(|c| c.0), Some(3));
    assert_eq!(calls(p, "gio", hello).get(&1).map(|c| c.0), Some(3));
    let introspect = "org.freedesktop.DBus.Introspectable.Introspect";
    assert_eq!(calls(p, "gio", introspect).get(&1).map(|c| c.0), Some(3));
    // The outsider's calls, made while recording, are not there.
    assert!(
        !p.dbus.iter().any(|c| c.member.as_deref() == Some("Ping")),
        "a process outside the target set was recorded\n{table}"
    );
}

/// Off-CPU: the time blocked inside the calls is under their frames.
fn assert_blocked_time_is_under_the_calls_frames(p: &Profile, dir: &Path) {
    let blocked_under = |window: u32, function: &str| -> u64 {
        p.offcpu
            .iter()
            .filter(|r| r.window == window && r.dbus.as_deref() == Some(function))
            .map(|r| r.total_ns)
            .sum()
    };
    for (window, function, at_least_ms) in [
        (0, "dbus_connection_send_with_reply_and_block", 300),
        (2, "sd_bus_call", 300),
    ] {
        let ms = blocked_under(window, function) / 1_000_000;
        assert!(
            ms >= at_least_ms,
            "window {window}: {ms} ms off-CPU under [D-Bus {function}], expected ≥ {at_least_ms} ms"
        );
    }
    let gio_ms: u64 = p
        .offcpu
        .iter()
        .filter(|r| r.window == 1 && r.dbus.as_deref().is_some_and(|f| f.starts_with("g_dbus")))
        .map(|r| r.total_ns)
        .sum::<u64>()
        / 1_000_000;
    assert!(
        gio_ms >= 1000,
        "window 1: {gio_ms} ms off-CPU under GIO's D-Bus frames, expected ≥ 1000 ms"
    );
    let folded = std::fs::read_to_string(dir.join("w02-vms-2-2/offcpu.folded"))
        .expect("window 2's off-CPU folded stacks");
    assert!(folded.contains(";[D-Bus sd_bus_call];"), "{folded}");
}

/// The summary's windows and summary.txt carry the D-Bus totals; the
/// per-window table and flame graph are written.
fn assert_summary_and_window_files_carry_the_calls(p: &Profile, dir: &Path) {
    // The summary's windows carry the D-Bus totals (summary.txt's column,
    // the gates' dbus metrics and the HTML notes read them): one timeout
    // per window, as long as the client's timeout at least.
    let summary = profiler::render::summary(p);
    for (window, at_least_ms) in [(0, 300), (1, 1000), (2, 300)] {
        let w = summary
            .windows
            .iter()
            .find(|w| w.id == window)
            .expect("the window in the summary");
        assert_eq!(w.dbus_timeouts, 1, "window {window}'s D-Bus timeouts");
        assert!(
            w.dbus_ns / 1_000_000 >= at_least_ms,
            "window {window}: {} ms of D-Bus wait, expected ≥ {at_least_ms} ms",
            w.dbus_ns / 1_000_000
        );
    }
    let text = std::fs::read_to_string(dir.join("summary.txt")).expect("summary.txt");
    assert!(text.contains("D-BUS WAIT"), "no D-Bus column:\n{text}");

    // The per-window table and flame graph are written.
    let text = std::fs::read_to_string(dir.join("w01-vms-1-1/dbus.txt")).expect("window 1's table");
    assert!(text.contains(WORK) && text.contains("gio"), "{text}");
    let svg = std::fs::read_to_string(dir.join("w01-vms-1-1/dbuswait.svg")).expect("flame graph");
    assert!(
        svg.contains("Work"),
        "the D-Bus wait flame graph names the call"
    );
}

/// A client killed inside a blocking call never returns from it: the
/// thread's exit ends the call. A new client that gets the dead thread's
/// id has its calls counted (they used to count as nested in the dead
/// call, and vanished), and `--bpf-stats` lists the D-Bus programs.
#[test]
fn a_thread_killed_inside_a_call_leaves_nothing_behind() {
    // Every Work call stalls; Ping answers.
    let bus = Bus::start("killed", 1);
    let addr = bus.address();
    let dir = bus.dir.join("out");
    let reused = bus.dir.join("reused");
    let attempts = bus.dir.join("attempts");
    let gdbus = format!(
        "gdbus call --address {addr} --dest org.hvprof.Sample --object-path /org/hvprof/Sample --method"
    );
    // The victim blocks in Work and is killed there. Then Ping clients are
    // started with the kernel's next pid set to the victim's (its main
    // thread, the one that called), until one gets it.
    let script = format!(
        r"set -u
{gdbus} {WORK} --timeout 60 1 >/dev/null 2>&1 &
victim=$!
sleep 1
kill -9 $victim
wait $victim
n=0
while [ $n -lt 50 ]; do
  n=$((n + 1))
  echo $((victim - 1)) > /proc/sys/kernel/ns_last_pid
  {gdbus} org.hvprof.Sample.Ping >/dev/null 2>&1 &
  pid=$!
  wait $pid
  if [ $pid -eq $victim ]; then touch {reused}; break; fi
done
echo $n > {attempts}
",
        reused = reused.display(),
        attempts = attempts.display(),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .args(["record", "--tracers", "dbus,offcpu", "--bpf-stats"])
        .arg("-o")
        .arg(&dir)
        .args(["--", "sh", "-c", &script])
        .output()
        .expect("run hvprof");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hvprof failed:\n{stderr}");
    assert!(
        reused.exists(),
        "no Ping client got the killed client's pid in 50 tries: the test proves nothing"
    );
    let tries: u64 = std::fs::read_to_string(&attempts)
        .expect("the script's count of Ping clients")
        .trim()
        .parse()
        .expect("a number");
    let p = Profile::read(&dir.join("profile.hvprof")).expect("read the profile");
    let pings: u64 = calls(&p, "gio", "org.hvprof.Sample.Ping")
        .values()
        .map(|c| c.0)
        .sum();
    assert_eq!(
        pings, tries,
        "{tries} Ping clients, the last with the killed client's pid: {pings} Ping calls counted"
    );
    // The killed call itself is never counted: it did not return.
    assert!(
        calls(&p, "gio", WORK).is_empty(),
        "a call that never returned was counted"
    );
    for program in ["dbus_enter", "dbus_return"] {
        assert!(
            p.meta.program_stats.iter().any(|s| s.program == program),
            "--bpf-stats does not list {program}: {:?}",
            p.meta.program_stats
        );
    }
}
