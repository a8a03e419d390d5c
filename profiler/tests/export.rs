//! `hvprof export` (no root): the pprof files are decoded by decoders that
//! share no code with hvprof's encoder — Debian's `protoc --decode` against
//! a copy of pprof's own `profile.proto`, and `go tool pprof` — and their
//! totals, stacks and labels equal the profile's; the speedscope files pass
//! the speedscope JSON schema (Debian's python3-jsonschema) and carry the
//! same totals. `./x test` installs protobuf-compiler, golang-go and
//! python3-jsonschema when they are missing.

use std::{
    collections::{BTreeMap, HashMap},
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use profiler::{
    profile::{DbusCall, FrameTable, LockWait, Meta, OffCpu, OnCpu, Profile},
    render,
    windows::WindowSpec,
};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

fn sample_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/massboot/profile.hvprof")
}

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hvprof-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs a tool the tests need; a missing one fails with how to get it.
fn tool(program: &str, package: &str) -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()));
    assert!(
        found,
        "{program} is not installed: `./x test` installs it, or `apt-get install {package}`"
    );
    Command::new(program)
}

fn run_ok(cmd: &mut Command, input: Option<&[u8]>) -> String {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    if let Some(bytes) = input {
        let mut stdin = child.stdin.take().unwrap();
        let bytes = bytes.to_vec();
        std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &bytes).unwrap());
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn hvprof_export(profile: &Path, dir: &Path, formats: &str) -> String {
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_hvprof"))
            .arg("export")
            .arg(profile)
            .args(["--format", formats, "-o"])
            .arg(dir),
        None,
    )
}

// --- protoc's text format, read just enough to walk a decoded Profile ---

#[derive(Debug, Default)]
struct Msg {
    fields: Vec<(String, Field)>,
}

#[derive(Debug)]
enum Field {
    Scalar(String),
    Msg(Msg),
}

impl Msg {
    fn all(&self, name: &str) -> Vec<&Field> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, f)| f)
            .collect()
    }

    fn msgs(&self, name: &str) -> Vec<&Msg> {
        self.all(name)
            .into_iter()
            .map(|f| match f {
                Field::Msg(m) => m,
                Field::Scalar(s) => panic!("{name} is a scalar ({s}), not a message"),
            })
            .collect()
    }

    fn msg(&self, name: &str) -> &Msg {
        self.msgs(name)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no {name}"))
    }

    fn nums(&self, name: &str) -> Vec<u64> {
        self.all(name)
            .into_iter()
            .map(|f| match f {
                Field::Scalar(s) => s.parse().unwrap_or_else(|_| panic!("{name}: {s}")),
                Field::Msg(_) => panic!("{name} is a message"),
            })
            .collect()
    }

    /// A scalar field; protobuf's default (0) when absent.
    fn num(&self, name: &str) -> u64 {
        self.nums(name).first().copied().unwrap_or(0)
    }
}

/// Unescapes a text-format string literal (C escapes, octal bytes).
fn unquote(lit: &str) -> String {
    let body = lit
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or_else(|| panic!("not a string literal: {lit}"));
    let mut out = Vec::new();
    let b = body.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = b[i + 1];
        i += 2;
        match c {
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    if i < b.len() && (b'0'..=b'7').contains(&b[i]) {
                        v = v * 8 + u32::from(b[i] - b'0');
                        i += 1;
                    }
                }
                out.push(u8::try_from(v).unwrap());
            }
            b'x' => {
                let hex = std::str::from_utf8(&b[i..i + 2]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            other => out.push(other),
        }
    }
    String::from_utf8(out).expect("strings in the table are UTF-8")
}

fn parse_text(text: &str) -> Msg {
    let mut stack = vec![Msg::default()];
    let mut names: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line == "}" {
            let done = stack.pop().unwrap();
            let name = names.pop().unwrap();
            stack
                .last_mut()
                .unwrap()
                .fields
                .push((name, Field::Msg(done)));
        } else if let Some(name) = line.strip_suffix(" {") {
            names.push(name.to_owned());
            stack.push(Msg::default());
        } else {
            let (name, value) = line
                .split_once(": ")
                .unwrap_or_else(|| panic!("unexpected text-format line {line:?}"));
            let value = if value.starts_with('"') {
                unquote(value)
            } else {
                value.to_owned()
            };
            stack
                .last_mut()
                .unwrap()
                .fields
                .push((name.to_owned(), Field::Scalar(value)));
        }
    }
    assert_eq!(stack.len(), 1, "unbalanced braces");
    stack.pop().unwrap()
}

fn gunzip(path: &Path) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{} is not gzip: {e}", path.display()));
    raw
}

/// A pprof file decoded by `protoc`, with its string table resolved.
struct Decoded {
    sample_types: Vec<(String, String)>,
    default_sample_type: String,
    period_type: (String, String),
    period: u64,
    /// Leaf first, as pprof stores them.
    samples: Vec<DecodedSample>,
    comments: Vec<String>,
}

struct DecodedSample {
    frames: Vec<String>,
    values: Vec<u64>,
    labels: BTreeMap<String, String>,
}

fn decode_pprof(path: &Path) -> Decoded {
    let raw = gunzip(path);
    let text = run_ok(
        tool("protoc", "protobuf-compiler")
            .arg("--proto_path")
            .arg(data("pprof"))
            .args(["--decode=perftools.profiles.Profile", "profile.proto"]),
        Some(&raw),
    );
    let p = parse_text(&text);
    let strings: Vec<String> = p
        .all("string_table")
        .into_iter()
        .map(|f| match f {
            Field::Scalar(s) => s.clone(),
            Field::Msg(_) => panic!("string_table entry is a message"),
        })
        .collect();
    assert_eq!(
        strings.first().map(String::as_str),
        Some(""),
        "string_table[0] must be \"\""
    );
    let s = |i: u64| -> String {
        strings
            .get(usize::try_from(i).unwrap())
            .unwrap_or_else(|| panic!("string index {i} out of the table"))
            .clone()
    };
    let functions: HashMap<u64, String> = p
        .msgs("function")
        .into_iter()
        .map(|f| {
            let id = f.num("id");
            assert_ne!(id, 0, "function ids are nonzero");
            (id, s(f.num("name")))
        })
        .collect();
    let locations: HashMap<u64, String> = p
        .msgs("location")
        .into_iter()
        .map(|l| {
            let id = l.num("id");
            assert_ne!(id, 0, "location ids are nonzero");
            let lines = l.msgs("line");
            assert_eq!(lines.len(), 1, "one function per location");
            let f = lines[0].num("function_id");
            (
                id,
                functions
                    .get(&f)
                    .unwrap_or_else(|| panic!("no function {f}"))
                    .clone(),
            )
        })
        .collect();
    let value_type = |m: &Msg| (s(m.num("type")), s(m.num("unit")));
    let sample_types: Vec<_> = p.msgs("sample_type").into_iter().map(value_type).collect();
    let samples = p
        .msgs("sample")
        .into_iter()
        .map(|m| DecodedSample {
            frames: m
                .nums("location_id")
                .into_iter()
                .map(|id| {
                    locations
                        .get(&id)
                        .unwrap_or_else(|| panic!("sample refers to missing location {id}"))
                        .clone()
                })
                .collect(),
            values: m.nums("value"),
            labels: m
                .msgs("label")
                .into_iter()
                .map(|l| {
                    // A string label, or a number (printed in decimal).
                    let value = match (l.num("str"), l.num("num")) {
                        (0, n) => n.to_string(),
                        (i, 0) => s(i),
                        _ => panic!("a label with both str and num"),
                    };
                    (s(l.num("key")), value)
                })
                .collect(),
        })
        .collect();
    Decoded {
        default_sample_type: s(p.num("default_sample_type")),
        period_type: value_type(p.msg("period_type")),
        period: p.num("period"),
        comments: p.nums("comment").into_iter().map(s).collect(),
        sample_types,
        samples,
    }
}

/// Folded lines (`comm;root;…;leaf N`) of decoded samples, as
/// `render::*_folded` writes them: counts summed per line, then divided by
/// `unit` (the ns→µs of off-CPU folding), zeros dropped.
fn folded_from(samples: &[&DecodedSample], value: usize, unit: u64) -> Vec<String> {
    let clean = |s: &str| s.replace(';', ":").replace(['\n', '\r'], " ");
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for smp in samples {
        let mut line = clean(&smp.labels["comm"]).replace(' ', "_");
        for f in smp.frames.iter().rev() {
            line.push(';');
            line.push_str(&clean(f));
        }
        *lines.entry(line).or_default() += smp.values[value];
    }
    lines
        .into_iter()
        .filter_map(|(l, n)| (n / unit > 0).then(|| format!("{l} {}", n / unit)))
        .collect()
}

fn vms_label(p: &Profile, window: u32) -> String {
    let w = p.windows.iter().find(|w| w.id == window).unwrap();
    match (w.first_vm, w.last_vm) {
        (Some(a), Some(b)) => format!("{a}-{b}"),
        _ => "setup".to_owned(),
    }
}

/// Ground truth from the profile's rows: (count, ns) per window.
fn truth(p: &Profile, tracer: &str) -> BTreeMap<u32, (u64, u64)> {
    let mut t: BTreeMap<u32, (u64, u64)> = p.windows.iter().map(|w| (w.id, (0, 0))).collect();
    let period = 1_000_000_000 / p.meta.frequency_hz.max(1);
    let mut add = |w: u32, n: u64, ns: u64| {
        let e = t.entry(w).or_default();
        e.0 += n;
        e.1 += ns;
    };
    match tracer {
        "oncpu" => p
            .oncpu
            .iter()
            .for_each(|r| add(r.window, r.samples, r.samples * period)),
        "offcpu" => p
            .offcpu
            .iter()
            .for_each(|r| add(r.window, r.blocks, r.total_ns)),
        "lockwait" => p
            .locks
            .iter()
            .for_each(|r| add(r.window, r.count, r.total_ns)),
        "dbuswait" => p
            .dbus
            .iter()
            .for_each(|r| add(r.window, r.calls, r.total_ns)),
        _ => unreachable!(),
    }
    t
}

fn folded(p: &Profile, tracer: &str, window: u32) -> Vec<String> {
    match tracer {
        "oncpu" => profiler::graphs::ONCPU.folded(p, window),
        "offcpu" => profiler::graphs::OFFCPU.folded(p, window),
        "lockwait" => profiler::graphs::LOCKWAIT.folded(p, window),
        "dbuswait" => profiler::graphs::DBUSWAIT.folded(p, window),
        _ => unreachable!(),
    }
}

fn expected_types(tracer: &str) -> [(&'static str, &'static str); 2] {
    match tracer {
        "oncpu" => [("samples", "count"), ("cpu", "nanoseconds")],
        "offcpu" => [("blocks", "count"), ("off_cpu", "nanoseconds")],
        "lockwait" => [("contentions", "count"), ("delay", "nanoseconds")],
        "dbuswait" => [("calls", "count"), ("dbus_wait", "nanoseconds")],
        _ => unreachable!(),
    }
}

/// Every pprof file of `tracer` in an export of `p`: the whole-recording
/// file and each window's, decoded by protoc, against the profile's rows.
fn check_pprof(p: &Profile, dir: &Path, tracer: &str) {
    let truth = truth(p, tracer);
    let types: Vec<(String, String)> = expected_types(tracer)
        .iter()
        .map(|&(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    let check_labels = |smp: &DecodedSample, window: u32| {
        assert_eq!(smp.labels["tracer"], tracer);
        assert_eq!(smp.labels["vms"], vms_label(p, window));
        let w = p.windows.iter().find(|w| w.id == window).unwrap();
        assert_eq!(
            smp.labels.get("first_vm"),
            w.first_vm.map(|v| v.to_string()).as_ref()
        );
        assert_eq!(
            smp.labels.get("last_vm"),
            w.last_vm.map(|v| v.to_string()).as_ref()
        );
        let pid: u32 = smp.labels["pid"].parse().unwrap();
        assert!(pid > 0, "pid label {pid}");
        if matches!(tracer, "oncpu" | "offcpu") {
            assert!(smp.labels["tid"].parse::<u32>().unwrap() > 0);
        }
        if tracer == "offcpu" {
            assert_ne!(smp.labels["state"], "");
        }
        if tracer == "lockwait" {
            assert!(smp.frames[0].starts_with("[lock "), "{:?}", smp.frames);
            assert!(smp.frames[0].contains(&smp.labels["lock_type"]));
        }
        assert_eq!(smp.values.len(), 2, "one value per sample type");
    };
    let folded_unit = if tracer == "oncpu" { 1 } else { 1000 };
    let folded_value = usize::from(tracer != "oncpu");

    let all = decode_pprof(&dir.join(format!("{tracer}.pb.gz")));
    assert_eq!(all.sample_types, types, "{tracer}");
    assert_eq!(all.default_sample_type, types[1].0);
    if tracer == "oncpu" {
        assert_eq!(all.period_type, types[1]);
        assert_eq!(all.period, 1_000_000_000 / p.meta.frequency_hz);
    } else {
        assert_eq!(all.period_type, types[0]);
        assert_eq!(all.period, 1);
    }
    assert!(
        all.comments.iter().any(|c| c.contains("every window")),
        "{:?}",
        all.comments
    );
    let mut by_window: BTreeMap<u32, Vec<&DecodedSample>> = BTreeMap::new();
    for smp in &all.samples {
        let w: u32 = smp.labels["window"]
            .strip_prefix('w')
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("window label {}", smp.labels["window"]));
        check_labels(smp, w);
        by_window.entry(w).or_default().push(smp);
    }
    for (&w, &(count, ns)) in &truth {
        let samples = by_window.remove(&w).unwrap_or_default();
        let got = (
            samples.iter().map(|s| s.values[0]).sum::<u64>(),
            samples.iter().map(|s| s.values[1]).sum::<u64>(),
        );
        assert_eq!(got, (count, ns), "{tracer}.pb.gz window {w}: (count, ns)");
        assert_eq!(
            folded_from(&samples, folded_value, folded_unit),
            folded(p, tracer, w),
            "{tracer}.pb.gz window {w}: the stacks differ from the folded output"
        );

        let win = p.windows.iter().find(|x| x.id == w).unwrap();
        let one = decode_pprof(&dir.join(win.dir_name()).join(format!("{tracer}.pb.gz")));
        assert_eq!(one.sample_types, types);
        let samples: Vec<&DecodedSample> = one.samples.iter().collect();
        for smp in &samples {
            assert_eq!(smp.labels["window"], format!("w{w:02}"));
            check_labels(smp, w);
        }
        let got = (
            samples.iter().map(|s| s.values[0]).sum::<u64>(),
            samples.iter().map(|s| s.values[1]).sum::<u64>(),
        );
        assert_eq!(got, (count, ns), "{}/{tracer}.pb.gz", win.dir_name());
        assert_eq!(
            folded_from(&samples, folded_value, folded_unit),
            folded(p, tracer, w)
        );
    }
    assert!(
        by_window.is_empty(),
        "samples of unknown windows: {:?}",
        by_window.keys()
    );
}

#[test]
fn pprof_of_the_sample_decodes_with_protoc_and_matches_the_profile() {
    let p = Profile::read(&sample_path()).unwrap();
    let dir = out_dir("sample-pprof");
    let stdout = hvprof_export(&sample_path(), &dir, "pprof");
    assert!(stdout.contains("oncpu.pb.gz"), "{stdout}");
    // The sample recorded every tracer but D-Bus: no D-Bus files.
    for tracer in ["oncpu", "offcpu", "lockwait"] {
        check_pprof(&p, &dir, tracer);
    }
    assert!(!dir.join("dbuswait.pb.gz").exists());
    assert!(
        !dir.join("oncpu.speedscope.json").exists(),
        "only pprof was asked for"
    );
    // The whole recording's totals, once more, against the summary.
    let summary = render::summary(&p);
    let oncpu = decode_pprof(&dir.join("oncpu.pb.gz"));
    assert_eq!(
        oncpu.samples.iter().map(|s| s.values[0]).sum::<u64>(),
        summary.windows.iter().map(|w| w.oncpu_samples).sum::<u64>()
    );
    let offcpu = decode_pprof(&dir.join("offcpu.pb.gz"));
    assert_eq!(
        offcpu.samples.iter().map(|s| s.values[1]).sum::<u64>(),
        summary
            .windows
            .iter()
            .map(|w| w.offcpu_ns + w.offcpu_unfinished_ns)
            .sum::<u64>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A profile with every tracer, explicit windows, names that need escaping
/// and D-Bus calls (the checked-in sample has none).
fn synthetic() -> Profile {
    let mut t = FrameTable::default();
    let names = [
        "main",
        "virDomainCreateXML",
        "qemuProcessStart",
        "do;weird name \"quoted\" \\ back",
        "caf\u{e9} \u{2013} <script>alert(1)</script>",
        "schedule_[k]",
        "g_dbus_connection_call_sync",
    ];
    let f: Vec<u32> = names.iter().map(|n| t.intern(n)).collect();
    let spec = WindowSpec::parse_ranges("1-10,101-110").unwrap();
    let on = |window, pid, stack: &[u32], samples| OnCpu {
        window,
        tgid: 100,
        pid,
        comm: "rpc libvirtd".into(),
        stack: stack.to_vec(),
        samples,
    };
    Profile {
        meta: Meta {
            frequency_hz: 99,
            target: "pid 100".into(),
            tracers: vec!["oncpu".into(), "offcpu".into(), "locks".into()],
            window_spec: Some(spec.clone()),
            ..Meta::default()
        },
        windows: spec.windows(110),
        frames: t.into_names(),
        oncpu: vec![
            on(1, 101, &[f[0], f[1], f[2]], 7),
            on(1, 102, &[f[0], f[1], f[2]], 5),
            on(1, 101, &[f[0], f[3]], 1),
            on(2, 101, &[f[0], f[4]], 40),
            on(0, 100, &[f[0]], 3),
        ],
        offcpu: vec![OffCpu {
            window: 2,
            tgid: 100,
            pid: 103,
            comm: "worker".into(),
            state: "D".into(),
            stack: vec![f[0], f[5]],
            blocks: 4,
            total_ns: 30_000_123,
            max_ns: 20_000_000,
            runq_ns: 5,
            dbus: None,
            unfinished: false,
        }],
        locks: vec![LockWait {
            window: 2,
            tgid: 100,
            comm: "worker".into(),
            lock: 0xffff_8880_1234_5678,
            lock_name: None,
            lock_type: "rwsem:W".into(),
            stack: vec![f[0], f[5]],
            count: 3,
            total_ns: 1_500_000,
            max_ns: 1_000_000,
            hist: vec![],
            holder: None,
        }],
        dbus: vec![DbusCall {
            window: 1,
            tgid: 100,
            comm: "rpc-libvirtd".into(),
            library: "gio".into(),
            function: "g_dbus_connection_call_sync".into(),
            destination: Some("org.freedesktop.machine1".into()),
            path: None,
            interface: Some("org.freedesktop.machine1.Manager".into()),
            member: Some("CreateMachineWithNetwork".into()),
            timeout_ms: Some(-1),
            stack: vec![f[0], f[6]],
            calls: 2,
            timeouts: 1,
            total_ns: 25_000_000_000,
            max_ns: 25_000_000_000,
            hist: vec![],
        }],
        ..Profile::default()
    }
}

#[test]
fn pprof_keeps_every_tracer_label_and_name_through_protoc() {
    let p = synthetic();
    let dir = out_dir("synthetic-pprof");
    let path = dir.join("profile.hvprof");
    std::fs::create_dir_all(&dir).unwrap();
    p.write(&path).unwrap();
    hvprof_export(&path, &dir.join("out"), "pprof");
    for tracer in ["oncpu", "offcpu", "lockwait", "dbuswait"] {
        check_pprof(&p, &dir.join("out"), tracer);
    }
    // Names that need escaping come back byte for byte, leaf first.
    let on = decode_pprof(&dir.join("out/w02-vms-101-110/oncpu.pb.gz"));
    assert_eq!(on.samples.len(), 1);
    assert_eq!(
        on.samples[0].frames,
        ["caf\u{e9} \u{2013} <script>alert(1)</script>", "main"]
    );
    assert_eq!(on.samples[0].values, [40, 40 * (1_000_000_000 / 99)]);
    let labels = &on.samples[0].labels;
    assert_eq!(labels["comm"], "rpc libvirtd");
    assert_eq!(
        (labels["pid"].as_str(), labels["tid"].as_str()),
        ("100", "101")
    );
    assert_eq!(
        (labels["window"].as_str(), labels["vms"].as_str()),
        ("w02", "101-110")
    );
    assert_eq!(
        (labels["first_vm"].as_str(), labels["last_vm"].as_str()),
        ("101", "110")
    );
    let on = decode_pprof(&dir.join("out/w01-vms-1-10/oncpu.pb.gz"));
    assert!(
        on.samples
            .iter()
            .any(|s| s.frames[0] == "do;weird name \"quoted\" \\ back"),
        "{:?}",
        on.samples.iter().map(|s| &s.frames).collect::<Vec<_>>()
    );
    let lock = decode_pprof(&dir.join("out/lockwait.pb.gz"));
    let l = &lock.samples[0];
    assert_eq!(
        l.frames,
        ["[lock 0xffff888012345678 rwsem:W]", "schedule_[k]", "main"]
    );
    assert_eq!(l.labels["lock"], "0xffff888012345678");
    assert_eq!(l.labels["lock_type"], "rwsem:W");
    assert_eq!(l.values, [3, 1_500_000]);
    let dbus = decode_pprof(&dir.join("out/dbuswait.pb.gz"));
    let d = &dbus.samples[0];
    assert_eq!(
        d.labels["dbus_method"],
        "org.freedesktop.machine1.Manager.CreateMachineWithNetwork"
    );
    assert_eq!(d.labels["dbus_destination"], "org.freedesktop.machine1");
    assert_eq!(d.values, [2, 25_000_000_000]);
    let off = decode_pprof(&dir.join("out/offcpu.pb.gz"));
    assert_eq!(off.samples[0].labels["state"], "D");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `go tool pprof -raw`: the samples and their values as pprof itself
/// reads them.
fn go_pprof_raw(path: &Path) -> String {
    run_ok(
        tool("go", "golang-go")
            .args(["tool", "pprof", "-raw"])
            .arg(path)
            .env("HOME", std::env::temp_dir()),
        None,
    )
}

/// Sums the value columns of `go tool pprof -raw`'s sample lines
/// (`   VALUE   VALUE: LOC LOC …`).
fn raw_totals(raw: &str) -> (Vec<String>, [u64; 2]) {
    let mut lines = raw.lines();
    lines
        .by_ref()
        .find(|l| l.trim() == "Samples:")
        .expect("a Samples: section");
    let header: Vec<String> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut totals = [0u64; 2];
    for line in lines.take_while(|l| !l.starts_with("Locations")) {
        let Some((values, _)) = line.split_once(':') else {
            continue;
        };
        let v: Vec<u64> = values
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if v.len() == 2 && !line.trim_start().starts_with(|c: char| c.is_alphabetic()) {
            totals[0] += v[0];
            totals[1] += v[1];
        }
    }
    (header, totals)
}

#[test]
fn pprof_of_the_sample_loads_in_go_tool_pprof() {
    let p = Profile::read(&sample_path()).unwrap();
    let dir = out_dir("sample-go");
    hvprof_export(&sample_path(), &dir, "pprof");
    for tracer in ["oncpu", "offcpu", "lockwait"] {
        let truth = truth(&p, tracer);
        let (header, totals) = raw_totals(&go_pprof_raw(&dir.join(format!("{tracer}.pb.gz"))));
        let types = expected_types(tracer);
        assert_eq!(
            header,
            [
                format!("{}/{}", types[0].0, types[0].1),
                // The time is the default sample type.
                format!("{}/{}[dflt]", types[1].0, types[1].1)
            ]
        );
        let want = truth
            .values()
            .fold([0, 0], |a, &(n, ns)| [a[0] + n, a[1] + ns]);
        assert_eq!(totals, want, "{tracer}.pb.gz: go tool pprof's totals");
        for w in &p.windows {
            let path = dir.join(w.dir_name()).join(format!("{tracer}.pb.gz"));
            let (_, totals) = raw_totals(&go_pprof_raw(&path));
            let (n, ns) = truth[&w.id];
            assert_eq!(totals, [n, ns], "{}", path.display());
        }
    }
    // Slicing the one file by label, as a user does: a window, a VM range
    // (numbers: `first_vm=5:12` is a range), a process.
    let all = dir.join("oncpu.pb.gz");
    let truth = truth(&p, "oncpu");
    let focus = |filter: &str| -> u64 {
        let raw = run_ok(
            tool("go", "golang-go")
                .args(["tool", "pprof", "-raw"])
                .arg(format!("-tagfocus={filter}"))
                .arg(&all)
                .env("HOME", std::env::temp_dir()),
            None,
        );
        raw_totals(&raw).1[0]
    };
    let w = &p.windows[2];
    assert_eq!(focus(&format!("window=w{:02}", w.id)), truth[&w.id].0);
    let (a, b) = (
        p.windows[2].first_vm.unwrap(),
        p.windows[3].last_vm.unwrap(),
    );
    assert_eq!(
        focus(&format!("first_vm={a}:{b}")),
        truth[&p.windows[2].id].0 + truth[&p.windows[3].id].0
    );
    let pid = p.oncpu[0].tgid;
    let want: u64 = p
        .oncpu
        .iter()
        .filter(|r| r.tgid == pid)
        .map(|r| r.samples)
        .sum();
    assert_eq!(focus(&format!("pid={pid}")), want);
    let _ = std::fs::remove_dir_all(&dir);
}

fn validate_speedscope(path: &Path) {
    // Debian's python3 with its python3-jsonschema, not a pyenv shim.
    let python = "/usr/bin/python3";
    let has_jsonschema = Command::new(python)
        .args(["-c", "import jsonschema"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_jsonschema,
        "{python} cannot import jsonschema: `./x test` installs python3-jsonschema, or `apt-get install python3-jsonschema`"
    );
    let script = "import json, sys, jsonschema\n\
                  schema = json.load(open(sys.argv[1]))\n\
                  doc = json.load(open(sys.argv[2]))\n\
                  jsonschema.Draft7Validator(schema).validate(doc)\n\
                  print('valid')";
    let out = run_ok(
        Command::new(python)
            .args(["-c", script])
            .arg(data("speedscope/file-format-schema.json"))
            .arg(path),
        None,
    );
    assert_eq!(out.trim(), "valid");
}

fn check_speedscope(p: &Profile, dir: &Path, tracer: &str) {
    let path = dir.join(format!("{tracer}.speedscope.json"));
    validate_speedscope(&path);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let frames: Vec<&str> = doc["shared"]["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    let profiles = doc["profiles"].as_array().unwrap();
    assert_eq!(profiles.len(), p.windows.len(), "one profile per window");
    let truth = truth(p, tracer);
    let period = 1_000_000_000 / p.meta.frequency_hz;
    for (w, prof) in p.windows.iter().zip(profiles) {
        assert_eq!(prof["type"], "sampled");
        assert_eq!(prof["unit"], "nanoseconds");
        let name = prof["name"].as_str().unwrap();
        assert!(
            name.contains(&format!("window {} ({})", w.id, w.label())),
            "{name}"
        );
        let samples = prof["samples"].as_array().unwrap();
        let weights: Vec<u64> = prof["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(samples.len(), weights.len());
        let total: u64 = weights.iter().sum();
        assert_eq!(total, truth[&w.id].1, "{tracer} window {}: ns", w.id);
        assert_eq!(prof["endValue"].as_u64(), Some(total));
        // The stacks are the folded output's: comm root, then the frames.
        let clean = |s: &str| s.replace(';', ":").replace(['\n', '\r'], " ");
        let mut lines: BTreeMap<String, u64> = BTreeMap::new();
        for (stack, weight) in samples.iter().zip(&weights) {
            let names: Vec<String> = stack
                .as_array()
                .unwrap()
                .iter()
                .map(|i| clean(frames[usize::try_from(i.as_u64().unwrap()).unwrap()]))
                .collect();
            let mut line = names[0].replace(' ', "_");
            for n in &names[1..] {
                line.push(';');
                line.push_str(n);
            }
            *lines.entry(line).or_default() += weight;
        }
        let unit = if tracer == "oncpu" { period } else { 1000 };
        let got: Vec<String> = lines
            .into_iter()
            .filter_map(|(l, n)| (n / unit > 0).then(|| format!("{l} {}", n / unit)))
            .collect();
        assert_eq!(got, folded(p, tracer, w.id), "{tracer} window {}", w.id);
    }
}

#[test]
fn speedscope_matches_the_schema_and_the_profile() {
    let p = Profile::read(&sample_path()).unwrap();
    let dir = out_dir("sample-speedscope");
    let stdout = hvprof_export(&sample_path(), &dir, "speedscope");
    assert!(stdout.contains("oncpu.speedscope.json"), "{stdout}");
    assert!(
        !dir.join("oncpu.pb.gz").exists(),
        "only speedscope was asked for"
    );
    for tracer in ["oncpu", "offcpu", "lockwait"] {
        check_speedscope(&p, &dir, tracer);
    }
    let p = synthetic();
    let src = out_dir("synthetic-speedscope");
    std::fs::create_dir_all(&src).unwrap();
    p.write(&src.join("profile.hvprof")).unwrap();
    hvprof_export(
        &src.join("profile.hvprof"),
        &src.join("out"),
        "pprof,speedscope",
    );
    for tracer in ["oncpu", "offcpu", "lockwait", "dbuswait"] {
        check_speedscope(&p, &src.join("out"), tracer);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&src);
}

#[test]
fn export_rejects_bad_input_clearly() {
    let dir = out_dir("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let not_profile = dir.join("x.svg");
    std::fs::write(&not_profile, "<svg/>").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .arg("export")
        .arg(&not_profile)
        .arg("-o")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not an hvprof profile"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .args(["export", "--format", "perf"])
        .arg(sample_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("choose pprof or speedscope"), "{err}");
    let mut p = synthetic();
    p.meta.frequency_hz = 0;
    p.write(&dir.join("nohz.hvprof")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .arg("export")
        .arg(dir.join("nohz.hvprof"))
        .arg("-o")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no sampling frequency") && err.contains("-F"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
