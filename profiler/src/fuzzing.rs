//! What each fuzz target (`profiler/fuzz/`) does with one input. The
//! targets and the regression test over their corpora
//! (`tests/fuzz_corpora.rs`) call these functions, so a reproducer that
//! once crashed a target is run through the same code by `cargo test`.
//! Not an API: nothing else should call it.
//!
//! A target's input is untrusted through and through; a panic, an
//! overflow or an allocation without bound anywhere below is a bug. What a
//! function returns is the clear error a user would have seen instead.

use std::path::Path;

use crate::{
    ci::{self, Context, Gate, WindowMetrics},
    diff, export, html,
    profile::{
        CgroupOp, DbusCall, ForkCall, FrameTable, LibvirtCall, LockWait, LossCount, Meta, OffCpu,
        OffWake, OnCpu, Process, Profile, ProfileError, VmCreation, Waker,
    },
    render, tables,
    windows::WindowSpec,
};

/// The name every input is read under (errors name it).
pub const INPUT: &str = "fuzz-input.hvprof";

/// The `profile_file` target: `data` as a profile file, read the way
/// `hvprof report`, `export` and `diff` read one; when it reads, everything
/// those commands make of it.
pub fn profile_file(data: &[u8]) -> Result<(), ProfileError> {
    let profile = Profile::from_reader(data, Path::new(INPUT))?;
    use_profile(&profile);
    Ok(())
}

/// The `profile_json` target: `data` as the JSON of the profile model, held to
/// the checks every profile reader makes, then used as `profile_file` uses
/// a profile. A profile file is compressed and checksummed, so a mutated
/// file rarely reads; this reaches the renderers with every shape a file
/// that does read could have.
pub fn profile_json(data: &[u8]) -> Result<(), ProfileError> {
    let Ok(profile) = serde_json::from_slice::<Profile>(data) else {
        // Not the model's JSON: the readers' own concern, fuzzed above.
        return Ok(());
    };
    profile.validate(Path::new(INPUT))?;
    use_profile(&profile);
    Ok(())
}

/// Gates that every profile is checked against: every metric, every
/// table's quantities, a window that may not exist.
const REPORT_GATES: &[&str] = &[
    "losses>0",
    "oncpu>=1",
    "offcpu>1ms",
    "lockwait.total>0ms",
    "contentions>0",
    "forks>0",
    "cgroups>0",
    "dbuswait>1s",
    "dbuscalls>0",
    "dbustimeouts>0",
    "metric:oncpu>0",
    "metric:losses>=1",
    "window:1.oncpu>500",
    "lock.total>1s",
    "lock.max>1ms",
    "lock:cgroup_mutex.max>50ms",
    "lock:0xffff0001.count>0",
    "dbus.timeouts>0",
    "dbus:Work.calls>0",
    "dbus:org.example.Service.Work.total>1ms",
    "apiwait>1s",
    "qmpwait.total>1s",
    "libvirt:DomainCreateXML.p99>2s",
    "libvirt.errors>0",
    "qmp:query-cpus-fast.total>1s",
    "qmp-event:RESUME.count>0",
];

const DIFF_GATES: &[&str] = &[
    "regression>10%",
    "metric:lockwait>25%",
    "window:0.offcpu>=0%",
    "lock.total>5%",
    "dbus:Work.count>0%",
    "libvirt:DomainCreateXML.total>10%",
    "losses>0",
];

/// What `report` (every file, the HTML page, the gates and the markdown
/// summary), `export` (both formats) and `diff` (against itself, and
/// against a copy without its first window) make of a profile, in memory.
/// A failure other than a gate naming a missing window, an export
/// refusing samples without a frequency or a differential flame graph too
/// large to draw is a bug: it panics.
fn use_profile(profile: &Profile) {
    let source = Path::new(INPUT);
    let dir = Path::new("out");
    render::render_all(profile, dir, &|path, contents| {
        contents(&mut std::io::sink()).map_err(|source| render::RenderError::Write {
            path: path.to_path_buf(),
            source,
        })
    })
    .unwrap_or_else(|e| panic!("report of a profile that reads: {e}"));
    html::report(profile).unwrap_or_else(|e| panic!("HTML report of a profile that reads: {e}"));
    for t in tables::TABLES {
        let _ = tables::whole_recording_text(t, profile, 15);
    }
    let gates = parse_all(REPORT_GATES, Context::Report);
    let facts = WindowMetrics::new(profile);
    for gate in &gates {
        if let Ok(results) = ci::evaluate(std::slice::from_ref(gate), &facts) {
            let _ = ci::gates_text(&results);
            let _ = ci::report_markdown(&facts, source, &results);
        }
    }
    match export::render(profile, dir, &export::Format::ALL, &mut |_, _| Ok(())) {
        Ok(()) | Err(export::ExportError::NoFrequency) => {}
        Err(e) => panic!("export of a profile that reads: {e}"),
    }
    diff_with(profile, profile, false);
    if profile.windows.len() > 1 {
        let mut fewer = profile.clone();
        fewer.windows.remove(0);
        diff_with(profile, &fewer, true);
    }
}

fn parse_all(texts: &[&str], ctx: Context) -> Vec<Gate> {
    texts
        .iter()
        .map(|t| Gate::parse(t, ctx).unwrap_or_else(|e| panic!("{t}: {e}")))
        .collect()
}

/// What `hvprof diff A B` makes of two profiles, in memory.
fn diff_with(a: &Profile, b: &Profile, common: bool) {
    let (pa, pb) = (Path::new("a.hvprof"), Path::new("b.hvprof"));
    let Ok(matched) = diff::match_windows(a, pa, b, pb, common) else {
        return;
    };
    let (fa, fb) = (
        WindowMetrics::new(&matched.a),
        WindowMetrics::new(&matched.b),
    );
    let mut d = diff::compare(&fa, pa, &fb, pb, true);
    for gate in parse_all(DIFF_GATES, Context::Diff) {
        if let Ok(mut results) = ci::evaluate_diff(std::slice::from_ref(&gate), &fa, &fb) {
            d.gates.append(&mut results);
        }
    }
    match diff::render_all(
        &mut d,
        &matched.a,
        &matched.b,
        Path::new("diff"),
        &|_, _| Ok(()),
    ) {
        Ok(()) | Err(diff::DiffError::TooLargeToDraw { .. }) => {}
        Err(e) => panic!("diff of profiles that read: {e}"),
    }
    let _ = d.text(Some(10));
    let _ = d.summary_markdown();
}

/// The `folded` target: `data` as two sets of folded lines (`stack
/// count`), A before the first NUL byte and B after it, drawn as `hvprof
/// diff` draws a window's differential flame graph; the first byte says
/// whether A is scaled to B's total. The lines `diff` reads are folded
/// from profiles, so every name in them can be hostile.
pub fn folded(data: &[u8]) -> Result<(), diff::DiffError> {
    let Some((&flags, rest)) = data.split_first() else {
        return Ok(());
    };
    let (a, b) = match rest.iter().position(|&c| c == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let lines = |bytes: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    diff::differential_graph(
        &lines(a),
        &lines(b),
        flags & 1 == 1,
        "On-CPU, window 1 (VMs 1\u{2013}2)",
        "samples",
        Path::new("oncpu.diff.folded"),
        Path::new("oncpu.diff.svg"),
    )
    .map(|_| ())
}

/// The `fail_on` target: `data` as one `--fail-on` condition, parsed for
/// `hvprof report` and for `hvprof diff`; what parses is evaluated on
/// [`fixture`] (and on a pair: the fixture and a copy with more of
/// everything). Returns what `report` would have said of the condition.
pub fn fail_on(data: &[u8]) -> Result<String, String> {
    // clap hands the parser UTF-8 only.
    let text = std::str::from_utf8(data).map_err(|e| e.to_string())?;
    let a = fixture();
    let b = more(&a);
    let (fa, fb) = (WindowMetrics::new(&a), WindowMetrics::new(&b));
    if let Ok(gate) = Gate::parse(text, Context::Diff) {
        let gates = [gate];
        if let Ok(results) = ci::evaluate_diff(&gates, &fa, &fb) {
            let _ = ci::gates_text(&results);
            let _ = ci::gates_markdown(&results);
        }
    }
    let gate = Gate::parse(text, Context::Report).map_err(|e| e.to_string())?;
    let results = ci::evaluate(&[gate], &fa).map_err(|e| e.to_string())?;
    let _ = ci::report_markdown(&fa, Path::new(INPUT), &results);
    let _ = ci::gates_markdown(&results);
    Ok(ci::gates_text(&results))
}

/// The fixture's off-CPU block woken by another thread.
fn fixture_offwake(f: &[u32]) -> OffWake {
    OffWake {
        window: 1,
        tgid: 100,
        pid: 102,
        comm: "libvirtd".into(),
        state: "S".into(),
        stack: vec![f[0], f[5]],
        waker: Waker::Task {
            tgid: 100,
            pid: 101,
            comm: "rpc libvirtd".into(),
            stack: vec![f[0], f[1]],
        },
        blocks: 2,
        total_ns: 30_000_000,
        max_ns: 20_000_000,
    }
}

/// A small profile with every tracer's rows in three windows (setup, VMs
/// 1–2, VMs 3–4), named locks and D-Bus methods, losses and names that
/// need escaping: [`fail_on`]'s profile, and a seed of the profile
/// targets' corpora.
#[must_use]
pub fn fixture() -> Profile {
    let mut t = FrameTable::default();
    let f: Vec<u32> = [
        "main",
        "virDomainCreateXML",
        "do;weird name \"quoted\" <b>",
        "_raw_spin_lock_[k]",
        "cgroup_mkdir_[k]",
        "g_dbus_connection_call_sync",
    ]
    .iter()
    .map(|n| t.intern(n))
    .collect();
    let spec = WindowSpec::Every { size: 2 };
    Profile {
        meta: fixture_meta(&spec),
        calls: Vec::new(),
        windows: spec.windows(4),
        vms: fixture_vms(),
        frames: t.into_names(),
        oncpu: (0..3)
            .map(|window| OnCpu {
                window,
                tgid: 100,
                pid: 101,
                comm: "rpc libvirtd".into(),
                stack: vec![f[0], f[1], f[2]],
                samples: 30 + u64::from(window) * 10,
            })
            .collect(),
        offcpu: vec![OffCpu {
            window: 1,
            tgid: 100,
            pid: 102,
            comm: "libvirtd".into(),
            state: "S".into(),
            stack: vec![f[0], f[5]],
            blocks: 3,
            total_ns: 40_000_000,
            max_ns: 20_000_000,
            runq_ns: 1_000,
            dbus: Some("g_dbus_connection_call_sync".into()),
            unfinished: false,
        }],
        offwake: vec![fixture_offwake(&f)],
        losses: fixture_losses(),
        processes: vec![Process {
            tgid: 201,
            comm: "qemu-system-x86".into(),
            cmdline: None,
            parent: Some(100),
            forked_ns: Some(900_000_000),
            exec_ns: Some(950_000_000),
            exit_ns: None,
            fork_window: Some(0),
            exec_window: Some(0),
        }],
        locks: vec![
            fixture_lock(
                &f,
                1,
                Some("cgroup_mutex"),
                60_000_000,
                vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
            ),
            fixture_lock(&f, 2, None, 2_000, vec![1, 2]),
        ],
        forks: vec![ForkCall {
            window: 1,
            tgid: 100,
            comm: "rpc-libvirtd".into(),
            syscall: "clone".into(),
            thread: false,
            stack: vec![f[0], f[1]],
            caller: Some("virFork".into()),
            count: 2,
            total_ns: 300_000,
            max_ns: 200_000,
        }],
        cgroups: vec![CgroupOp {
            window: 2,
            tgid: 100,
            comm: "rpc-libvirtd".into(),
            op: "mkdir".into(),
            hierarchy: "v2".into(),
            path: "/machine/qemu-1-vm1.libvirt-qemu".into(),
            count: 1,
            timed: 1,
            total_ns: 50_000,
            max_ns: 50_000,
        }],
        dbus: vec![
            fixture_dbus(&f, 1, "Work", 3, 1),
            fixture_dbus(&f, 2, "Hello", 12, 0),
        ],
        libvirt: fixture_libvirt_rows(&f),
        unwind: Vec::new(),
    }
}

/// libvirt's rows: API calls, QMP commands and events, and two job waits
/// of one caller (`f[5]`): one got the job, one timed out.
fn fixture_libvirt_rows(f: &[u32]) -> Vec<LibvirtCall> {
    let job = |status: &str, ns: u64| {
        LibvirtCall {
            window: 2,
            tgid: 100,
            kind: LibvirtCall::JOB.into(),
            status: status.into(),
            comm: "rpc-libvirtd".into(),
            stack: vec![f[0], f[5]],
            ..LibvirtCall::default()
        }
        .timed_once(ns)
    };
    let mut rows = vec![
        job(LibvirtCall::OK, 500_000_000),
        job(LibvirtCall::TIMEOUT, 30_000_000_000),
    ];
    rows.extend([
        fixture_libvirt(1, LibvirtCall::API, "DomainCreateXML", LibvirtCall::OK, 2),
        fixture_libvirt(
            1,
            LibvirtCall::API,
            "DomainCreateXML",
            LibvirtCall::ERROR,
            1,
        ),
        fixture_libvirt(2, LibvirtCall::API, "DomainCreateXML", LibvirtCall::OK, 3),
        fixture_libvirt(1, LibvirtCall::QMP, "qmp_capabilities", LibvirtCall::OK, 2),
        fixture_libvirt(2, LibvirtCall::QMP, "cont", LibvirtCall::IN_FLIGHT, 1),
        fixture_libvirt(2, LibvirtCall::EVENT, "RESUME", LibvirtCall::OK, 3),
    ]);
    rows
}

/// `calls` libvirt calls of 2 ms each (events are not timed).
fn fixture_libvirt(window: u32, kind: &str, name: &str, status: &str, calls: u64) -> LibvirtCall {
    let timed = kind != LibvirtCall::EVENT;
    let ns = if timed { 2_000_000 } else { 0 };
    let mut hist = vec![0; 21];
    hist[20] = if timed { calls } else { 0 };
    LibvirtCall {
        window,
        tgid: 100,
        kind: kind.into(),
        name: name.into(),
        status: status.into(),
        calls,
        total_ns: calls * ns,
        max_ns: ns,
        hist: if timed { hist } else { Vec::new() },
        ..LibvirtCall::default()
    }
}

fn fixture_losses() -> Vec<LossCount> {
    vec![
        LossCount {
            window: Some(1),
            kind: "stack-map collisions".into(),
            count: 2,
        },
        LossCount {
            window: None,
            kind: "ring buffer full".into(),
            count: 1,
        },
    ]
}

fn fixture_meta(spec: &WindowSpec) -> Meta {
    Meta {
        hvprof_version: "0.1.0".into(),
        hostname: "host".into(),
        kernel: "6.1.0".into(),
        cpus: 2,
        duration_ns: 5_000_000_000,
        target: "pid 100".into(),
        frequency_hz: 99,
        window_spec: Some(spec.clone()),
        stop_reason: "duration".into(),
        ..Meta::default()
    }
}

fn fixture_vms() -> Vec<VmCreation> {
    (1..=4)
        .map(|ordinal| VmCreation {
            ordinal,
            time_ns: ordinal * 1_000_000_000,
            pid: 200 + u32::try_from(ordinal).unwrap_or(0),
            tid: 200,
            comm: "qemu-system-x86".into(),
            source: "kvm".into(),
            cmdline: Some("qemu-system-x86_64 -name guest=vm,debug-threads=on".into()),
            name: Some(format!("vm{ordinal}")),
            token: None,
        })
        .collect()
}

/// Waits for lock 0xffff0001 (`name`, when it has one).
fn fixture_lock(
    f: &[u32],
    window: u32,
    name: Option<&str>,
    total_ns: u64,
    hist: Vec<u64>,
) -> LockWait {
    LockWait {
        window,
        tgid: 100,
        comm: "rpc-libvirtd".into(),
        lock: 0xffff_0001,
        lock_name: name.map(str::to_owned),
        lock_type: "mutex".into(),
        stack: vec![f[0], f[4], f[3]],
        count: hist.iter().sum(),
        total_ns,
        max_ns: total_ns / 2,
        hist,
        holder: None,
    }
}

/// Calls of `org.example.Service.MEMBER`, 3 ms each.
fn fixture_dbus(f: &[u32], window: u32, member: &str, calls: u64, timeouts: u64) -> DbusCall {
    let mut hist = vec![0; 22];
    hist[21] = calls;
    DbusCall {
        window,
        tgid: 100,
        comm: "libvirtd".into(),
        library: "gio".into(),
        function: "g_dbus_connection_call_sync".into(),
        destination: Some("org.freedesktop.machine1".into()),
        path: Some("/org/freedesktop/machine1".into()),
        interface: Some("org.example.Service".into()),
        member: Some(member.into()),
        timeout_ms: Some(-1),
        stack: vec![f[0], f[5]],
        calls,
        timeouts,
        total_ns: calls * 3_000_000,
        max_ns: 25_000_000_000,
        hist,
    }
}

/// The fixture with every count and time doubled, and a lock only it has.
fn more(p: &Profile) -> Profile {
    let mut q = p.clone();
    for r in &mut q.oncpu {
        r.samples *= 2;
    }
    for r in &mut q.offcpu {
        r.total_ns *= 2;
    }
    for r in &mut q.dbus {
        r.calls *= 2;
        r.total_ns *= 2;
    }
    let mut extra = q.locks[0].clone();
    extra.lock = 0xffff_0002;
    extra.lock_name = None;
    q.locks.push(extra);
    q
}
