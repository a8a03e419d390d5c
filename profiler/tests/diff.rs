//! `hvprof diff`, `--fail-on` and `--markdown-summary` on the checked-in
//! profile of a real libvirtd mass boot (no root): against itself
//! everything is zero; against a copy with a known change, exactly that
//! change shows, in its window; mismatched windows are refused clearly.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use profiler::{
    ci::{self, Context, Gate, WindowMetrics},
    diff,
    profile::{LockWait, Profile},
};
use serde_json::Value;

fn sample_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/massboot/profile.hvprof")
}

fn sample() -> Profile {
    Profile::read(&sample_path()).expect("the checked-in sample profile reads")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hvprof-diff-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn hvprof(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .args(args)
        .output()
        .expect("run hvprof")
}

fn text(run: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    )
}

fn json(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("diff.json")).unwrap()).unwrap()
}

/// `stack A B` → (A, B).
fn columns(line: &str) -> (u64, u64) {
    let mut it = line.rsplitn(3, ' ');
    let b = it.next().unwrap().parse().unwrap();
    let a = it.next().unwrap().parse().unwrap();
    (a, b)
}

fn folded(dir: &Path, window: &str, tracer: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(window).join(format!("{tracer}.diff.folded")))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

const TRACERS: [&str; 7] = [
    "oncpu", "offcpu", "offwake", "lockwait", "lockhold", "dbuswait", "jobwait",
];

/// `diff.html` inlines no graph (it stays small on big profiles): in each
/// window's panel, one frame per tracer loads that window's SVG file, which
/// exists and is inferno's differential graph of that window and tracer.
fn assert_page_links_every_graph(dir: &Path, p: &Profile) {
    let html = std::fs::read_to_string(dir.join("diff.html")).unwrap();
    assert!(!html.contains("<svg"), "a graph is inlined in diff.html");
    assert_eq!(
        html.matches("<iframe").count(),
        TRACERS.len() * p.windows.len()
    );
    for w in &p.windows {
        let start = html
            .find(&format!(
                "<section class=\"window\" data-window=\"{}\"",
                w.id
            ))
            .unwrap_or_else(|| panic!("no panel for window {}", w.id));
        let panel = &html[start..start + html[start..].find("</section>").unwrap()];
        let titles = [
            "On-CPU",
            "Off-CPU time",
            "Off-CPU time, by waker",
            "Kernel lock wait",
            "Kernel lock wait, by holder",
            "D-Bus wait",
            "Domain job wait",
        ];
        for (tracer, title) in TRACERS.iter().zip(titles) {
            let src = format!("{}/{tracer}.diff.svg", w.dir_name());
            assert!(
                panel.contains(&format!("data-src=\"{src}\"")),
                "window {}: {src} is not in its panel",
                w.id
            );
            let svg = std::fs::read_to_string(dir.join(&src)).unwrap();
            let want = format!("{title}, window {} ({}): ", w.id, w.label());
            assert!(svg.contains(&want), "{src}: no title {want:?}");
        }
    }
}

#[test]
fn a_profile_against_itself_is_all_zero() {
    let dir = tmp("self");
    let sample_file = sample_path();
    let s_arg = sample_file.to_str().unwrap();
    let md = dir.join("summary.md");
    let run = hvprof(&[
        "diff",
        s_arg,
        s_arg,
        "-o",
        dir.to_str().unwrap(),
        "--fail-on",
        "regression>0%",
        "--fail-on",
        "losses>0",
        "--markdown-summary",
        md.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    let out = text(&run);
    assert!(out.contains("no per-window metric differs"), "{out}");
    assert!(out.contains("PASS regression>0%"), "{out}");

    let report = json(&dir);
    let windows = report["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 5);
    let mut values = 0;
    for sec in windows.iter().chain(std::iter::once(&report["whole"])) {
        for m in sec["metrics"].as_array().unwrap() {
            assert_eq!(m["delta"], 0, "{m}");
            assert_eq!(m["ratio"], 1.0, "{m}");
            assert_eq!(m["a"], m["b"], "{m}");
            values += 1;
        }
        for t in sec["tables"].as_array().unwrap() {
            for r in t["rows"].as_array().unwrap() {
                for d in ["count", "time_ns"] {
                    assert_eq!(r[d]["delta"], 0, "{r}");
                    assert_eq!(r[d]["ratio"], 1.0, "{r}");
                }
                values += 1;
            }
        }
    }
    assert!(values > 100, "only {values} values compared");
    for g in report["gates"].as_array().unwrap() {
        assert_eq!(g["passed"], true, "{g}");
    }
    // Every differential folded line has the same count in A and B, and
    // together they are each profile's own folded stacks.
    let profile = sample();
    for w in &profile.windows {
        for tracer in TRACERS {
            let lines = folded(&dir, &w.dir_name(), tracer);
            for l in &lines {
                let (in_a, in_b) = columns(l);
                assert_eq!(in_a, in_b, "{} {tracer}: {l}", w.dir_name());
            }
            if tracer == "oncpu" {
                assert_eq!(
                    lines.len(),
                    profiler::graphs::ONCPU.folded(&profile, w.id).len()
                );
            }
        }
        assert!(dir.join(w.dir_name()).join("oncpu.diff.svg").is_file());
    }
    assert_page_links_every_graph(&dir, &profile);
    let md = std::fs::read_to_string(md).unwrap();
    assert!(md.starts_with("### hvprof diff"), "{md}");
    assert!(md.contains("| 3 | VMs 9\u{2013}12 | 168 (=) |"), "{md}");
    assert!(md.contains("all 2 passed"), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sample with a known change: in window 3 one on-CPU stack has three
/// times its samples; in window 2 a new lock was waited on for 50 ms.
fn changed() -> (Profile, usize, u64) {
    let mut p = sample();
    let (i, row) = p
        .oncpu
        .iter()
        .enumerate()
        .filter(|(_, r)| r.window == 3)
        .max_by_key(|(i, r)| (r.samples, std::cmp::Reverse(*i)))
        .unwrap();
    let added = row.samples * 2;
    p.oncpu[i].samples *= 3;
    let stack = p
        .locks
        .iter()
        .find(|l| l.window == 2)
        .unwrap()
        .stack
        .clone();
    p.locks.push(LockWait {
        window: 2,
        tgid: 1,
        comm: "rpc-libvirtd".into(),
        lock: 0xffff_ffff_8400_0000,
        lock_name: Some("hvprof_test_mutex".into()),
        lock_type: "mutex".into(),
        stack,
        count: 5,
        total_ns: 50_000_000,
        max_ns: 20_000_000,
        hist: vec![0; 25].into_iter().chain([5]).collect(),
        holder: None,
    });
    (p, i, added)
}

/// Folded (raw counts): one on-CPU stack in window 3 and one lock-wait
/// stack in window 2 differ, by the known amounts; every other line of
/// every window is equal.
fn assert_only_the_known_stacks_differ(out: &Path, a: &Profile, row: usize, added: u64) {
    let stack = profiler::graphs::ONCPU.folded(
        &Profile {
            oncpu: vec![a.oncpu[row].clone()],
            ..a.clone()
        },
        3,
    )[0]
    .rsplit_once(' ')
    .unwrap()
    .0
    .to_owned();
    let (mut oncpu_seen, mut lock_seen) = (0, 0);
    for w in &a.windows {
        for tr in TRACERS {
            for l in folded(out, &w.dir_name(), tr) {
                let (x, y) = columns(&l);
                if w.id == 3 && tr == "oncpu" && l.starts_with(&format!("{stack} ")) {
                    assert_eq!(y - x, added, "{l}");
                    oncpu_seen += 1;
                } else if w.id == 2
                    && tr == "lockwait"
                    && l.contains("[lock hvprof_test_mutex mutex]")
                {
                    assert_eq!((x, y), (0, 50_000), "{l}");
                    lock_seen += 1;
                } else {
                    assert_eq!(x, y, "{} {tr}: {l}", w.dir_name());
                }
            }
        }
    }
    assert_eq!((oncpu_seen, lock_seen), (1, 1));
}

#[test]
fn a_known_difference_shows_in_its_window_and_nowhere_else() {
    let dir = tmp("known");
    let (new, row, added) = changed();
    let b_path = dir.join("b.hvprof");
    new.write(&b_path).unwrap();
    let out = dir.join("out");
    let run = hvprof(&[
        "diff",
        sample_path().to_str().unwrap(),
        b_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-normalize",
        "--fail-on",
        "regression>10%",
    ]);
    let said = text(&run);
    assert_eq!(run.status.code(), Some(3), "{said}");
    assert!(said.contains("FAIL regression>10%"), "{said}");
    assert!(
        said.contains("window 2 (VMs 5\u{2013}8): lockwait 12.04 ms \u{2192} 62.04 ms"),
        "{said}"
    );

    let report = json(&out);
    let a = sample();
    let total3: u64 = a
        .oncpu
        .iter()
        .filter(|r| r.window == 3)
        .map(|r| r.samples)
        .sum();
    // Metrics: window 3 on-CPU, window 2 lock wait and contentions, and the
    // whole recording's sums of those; every other value is unchanged.
    for sec in report["windows"]
        .as_array()
        .unwrap()
        .iter()
        .chain(std::iter::once(&report["whole"]))
    {
        let w = sec["window"].as_u64();
        for m in sec["metrics"].as_array().unwrap() {
            let expect: i64 = match (w, m["metric"].as_str().unwrap()) {
                (Some(3) | None, "oncpu") => i64::try_from(added).unwrap(),
                (Some(2) | None, "lockwait") => 50_000_000,
                (Some(2) | None, "contentions") => 5,
                _ => 0,
            };
            assert_eq!(m["delta"].as_i64(), Some(expect), "window {w:?}: {m}");
        }
        // Tables: only the new lock, only in window 2 (and the whole).
        for tbl in sec["tables"].as_array().unwrap() {
            for r in tbl["rows"].as_array().unwrap() {
                let changed = r["count"]["delta"] != 0 || r["time_ns"]["delta"] != 0;
                let is_new = tbl["name"] == "locks"
                    && r["key"][0] == "hvprof_test_mutex"
                    && matches!(w, Some(2) | None);
                assert_eq!(changed, is_new, "window {w:?}: {r}");
                if is_new {
                    assert_eq!(r["time_ns"]["a"], 0);
                    assert_eq!(r["time_ns"]["b"], 50_000_000);
                    assert_eq!(r["count"]["b"], 5);
                    assert_eq!(r["time_ns"]["ratio"], Value::Null);
                }
            }
        }
    }
    let w3 = &report["windows"][3]["metrics"][0];
    assert_eq!(
        (w3["metric"].as_str(), w3["a"].as_u64()),
        (Some("oncpu"), Some(total3))
    );
    assert_only_the_known_stacks_differ(&out, &a, row, added);
    assert_page_links_every_graph(&out, &a);
    // The differential flame graph of window 3 was drawn by inferno.
    let svg = std::fs::read_to_string(out.join("w03-vms-9-12/oncpu.diff.svg")).unwrap();
    assert!(
        svg.contains("On-CPU, window 3 (VMs 9\u{2013}12): B against A"),
        "title"
    );

    // Normalised (the default) it still renders, and the text says so.
    let run = hvprof(&[
        "diff",
        sample_path().to_str().unwrap(),
        b_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    assert!(text(&run).contains("A scaled to B's total"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The on-CPU change of window 3 is caught by a percentage just under its
/// size and not by one just over it, in window 3 only.
#[test]
fn percentage_gates_on_a_known_difference_are_exact() {
    let a = sample();
    let (new, _, added) = changed();
    let total3: u64 = a
        .oncpu
        .iter()
        .filter(|r| r.window == 3)
        .map(|r| r.samples)
        .sum();
    let pct = 100.0 * f64::from(u32::try_from(added).unwrap())
        / f64::from(u32::try_from(total3).unwrap());
    let (fa, fb) = (WindowMetrics::new(&a), WindowMetrics::new(&new));
    let gate = |e: &str| {
        ci::evaluate_diff(&[Gate::parse(e, Context::Diff).unwrap()], &fa, &fb)
            .unwrap()
            .remove(0)
    };
    let r = gate(&format!("metric:oncpu>{:.3}%", pct - 0.01));
    assert!(!r.passed);
    assert_eq!(r.violations.len(), 1);
    assert_eq!(r.violations[0].window, Some(3));
    assert!(gate(&format!("metric:oncpu>{:.3}%", pct + 0.01)).passed);
    assert!(!gate("lock:hvprof_test_mutex.total>1000%").passed);
    assert!(gate("window:3.lockwait>0%").passed);
}

#[test]
fn mismatched_windows_are_refused_with_the_fix() {
    let dir = tmp("mismatch");
    // B: the same boot cut at 12 VMs (no window 4).
    let mut cut = sample();
    cut.windows.retain(|w| w.id != 4);
    cut.vms.retain(|v| v.ordinal <= 12);
    cut.oncpu.retain(|r| r.window != 4);
    cut.offcpu.retain(|r| r.window != 4);
    cut.locks.retain(|r| r.window != 4);
    cut.forks.retain(|r| r.window != 4);
    cut.cgroups.retain(|r| r.window != 4);
    let b_path = dir.join("b.hvprof");
    cut.write(&b_path).unwrap();
    let out = dir.join("out");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "diff".to_owned(),
            sample_path().to_str().unwrap().to_owned(),
            b_path.to_str().unwrap().to_owned(),
            "-o".to_owned(),
            out.to_str().unwrap().to_owned(),
        ];
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    let diff_with = |extra: &[&str]| {
        let a = args(extra);
        hvprof(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let run = diff_with(&[]);
    let said = text(&run);
    assert_eq!(run.status.code(), Some(1), "{said}");
    for want in [
        "windows do not match",
        "4 VMs 13\u{2013}16",
        "3 VMs 9\u{2013}12",
        "b.hvprof",
        "--window-size",
        "--common-windows",
    ] {
        assert!(said.contains(want), "{want:?} missing: {said}");
    }
    assert!(!out.join("diff.json").exists());

    let run = diff_with(&["--common-windows", "--fail-on", "regression>0%"]);
    let said = text(&run);
    assert_eq!(run.status.code(), Some(0), "{said}");
    assert!(
        said.contains(
            "warning: --common-windows: left out windows only A has (4 VMs 13\u{2013}16)"
        ),
        "{said}"
    );
    let report = json(&out);
    assert_eq!(report["windows"].as_array().unwrap().len(), 4);
    assert_eq!(report["unmatched_a"][0], "4 VMs 13\u{2013}16");
    // The whole recording compares the shared windows only: all equal.
    for m in report["whole"]["metrics"].as_array().unwrap() {
        assert_eq!(m["delta"], 0, "{m}");
    }

    // Windows with nothing in common but the setup: only the setup matches.
    let mut c = sample();
    for w in &mut c.windows {
        if let (Some(f), Some(l)) = (w.first_vm, w.last_vm) {
            w.first_vm = Some(f + 1);
            w.last_vm = Some(l + 1);
        }
    }
    let c_path = dir.join("c.hvprof");
    c.write(&c_path).unwrap();
    let e = diff::match_windows(&sample(), Path::new("a"), &c, &c_path, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("both have (0 setup (before VM 1))"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn report_gates_exit_codes_and_markdown_summary() {
    let dir = tmp("report");
    let sample_file = sample_path();
    let s_arg = sample_file.to_str().unwrap();
    let out = dir.join("out");
    let md = dir.join("summary.md");
    let run = hvprof(&[
        "report",
        s_arg,
        "-o",
        out.to_str().unwrap(),
        "--fail-on",
        "losses>0",
        "--fail-on",
        "window:4.oncpu>198",
        "--markdown-summary",
        md.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    assert!(
        text(&run).contains("gates: 0 of 2 failed"),
        "{}",
        text(&run)
    );
    let summary = std::fs::read_to_string(&md).unwrap();
    assert!(summary.contains("14 VMs in 4.27 s"), "{summary}");
    assert!(summary.contains("losses: none"), "{summary}");
    assert!(
        summary.contains("| 4 | VMs 13\u{2013}16 | 198 |"),
        "{summary}"
    );
    assert!(summary.contains("**Top locks**"), "{summary}");
    assert_eq!(
        summary
            .lines()
            .filter(|l| l.starts_with("| 0xffff"))
            .count(),
        5,
        "{summary}"
    );

    // The worst lock waited 36.29 ms in all.
    let run = hvprof(&[
        "report",
        s_arg,
        "-o",
        out.to_str().unwrap(),
        "--fail-on",
        "lock.total>30ms",
        "--fail-on",
        "window:4.oncpu>197",
        "--markdown-summary",
        md.to_str().unwrap(),
    ]);
    let said = text(&run);
    assert_eq!(run.status.code(), Some(3), "{said}");
    assert!(said.contains("FAIL lock.total>30ms: 1 of"), "{said}");
    assert!(said.contains("values over the bound 30.00 ms"), "{said}");
    assert!(
        said.contains("lock 0xffff8883edd50d38 rwsem:R total 36.29 ms"),
        "{said}"
    );
    assert!(said.contains("FAIL window:4.oncpu>197"), "{said}");
    // Appended: both runs are in the file.
    let summary = std::fs::read_to_string(&md).unwrap();
    assert_eq!(summary.matches("### hvprof report").count(), 2, "{summary}");
    assert!(
        summary.contains("**FAIL** lock.total&gt;30ms (bound 30.00 ms)"),
        "{summary}"
    );

    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_conditions_exit_2_and_unknown_windows_exit_1() {
    let dir = tmp("bad");
    let sample_file = sample_path();
    let s_arg = sample_file.to_str().unwrap();
    let out = dir.join("out");
    // A malformed condition is a command-line error (2) with the grammar;
    // a window the profile lacks is an error (1).
    let run = hvprof(&[
        "report",
        s_arg,
        "-o",
        out.to_str().unwrap(),
        "--fail-on",
        "lock.bogus>1",
    ]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    assert!(
        text(&run).contains("\"bogus\" is not a lock statistic"),
        "{}",
        text(&run)
    );
    assert!(
        text(&run).contains("dbus.STAT, dbus:METHOD.STAT"),
        "{}",
        text(&run)
    );
    let run = hvprof(&[
        "report",
        s_arg,
        "-o",
        out.to_str().unwrap(),
        "--fail-on",
        "regression>10%",
    ]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));
    let run = hvprof(&[
        "report",
        s_arg,
        "-o",
        out.to_str().unwrap(),
        "--fail-on",
        "window:7.oncpu>0",
    ]);
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    assert!(text(&run).contains("no window 7"), "{}", text(&run));
    // The grammar and the exit codes are in --help.
    let h = text(&hvprof(&["diff", "--help"]));
    assert!(
        h.contains("regression") && h.contains("exit codes: 0"),
        "{h}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_names_are_escaped_in_every_output() {
    let dir = tmp("hostile");
    let (mut new, _, _) = changed();
    let evil = "<script>alert(1)</script>|**x**";
    new.locks.last_mut().unwrap().lock_name = Some(evil.into());
    let f = new.frames.len();
    new.frames.push("<img src=x onerror=alert(2)>".into());
    let stack = &mut new.oncpu.iter_mut().find(|r| r.window == 1).unwrap().stack;
    stack.push(u32::try_from(f).unwrap());
    let b_path = dir.join("b.hvprof");
    new.write(&b_path).unwrap();
    let out = dir.join("out");
    let md = dir.join("summary.md");
    let run = hvprof(&[
        "diff",
        sample_path().to_str().unwrap(),
        b_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--markdown-summary",
        md.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));
    for file in [out.join("diff.md"), md, out.join("diff.html")] {
        let s = std::fs::read_to_string(&file).unwrap();
        assert!(!s.contains("<script>alert"), "{}", file.display());
        assert!(!s.contains("<img src=x"), "{}", file.display());
    }
    let html = std::fs::read_to_string(out.join("diff.html")).unwrap();
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "lock name as text"
    );
    let svg = std::fs::read_to_string(out.join("w01-vms-1-4/oncpu.diff.svg")).unwrap();
    assert!(!svg.contains("<img src=x"), "svg");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sample with window 2's off-CPU time scaled by `percent` %.
fn offcpu_scaled(percent: u64) -> Profile {
    let mut p = sample();
    for r in p.offcpu.iter_mut().filter(|r| r.window == 2) {
        r.total_ns = r.total_ns / 100 * percent;
    }
    p
}

/// Writes runs with these scales into `dir/NAME-i/profile.hvprof`.
fn runs(dir: &Path, name: &str, scales: &[u64]) -> Vec<String> {
    scales
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let d = dir.join(format!("{name}-{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let path = d.join("profile.hvprof");
            offcpu_scaled(s).write(&path).unwrap();
            path.display().to_string()
        })
        .collect()
}

/// `hvprof diff A1 A2 A3 --vs B1 B2 B3`: medians per metric, and a
/// regression gate that fails only where B's runs are significantly larger
/// (every B run above every A run, with three a side) and their median
/// over the bound: window 2's off-CPU time +30 % in every B run fails it;
/// the same median with one B run below A's does not, nor do A's runs
/// against themselves. A directory of recordings stands for its runs.
#[test]
fn gates_over_several_runs_need_a_significant_change() {
    let dir = tmp("runs");
    let a = runs(&dir.join("a"), "run", &[100, 102, 98]);
    let gate = ["--fail-on", "regression>10%"];
    let diff_of = |b: &[String], out: &str| {
        let out = dir.join(out);
        let mut args: Vec<&str> = vec!["diff"];
        args.extend(a.iter().map(String::as_str));
        args.push("--vs");
        args.extend(b.iter().map(String::as_str));
        args.extend(["-o", out.to_str().unwrap()]);
        args.extend(gate);
        let run = hvprof(&args);
        (run.status.code(), text(&run), json(&out))
    };

    let b = runs(&dir.join("b"), "run", &[130, 135, 140]);
    let (code, out, j) = diff_of(&b, "worse");
    assert_eq!(code, Some(i32::from(ci::EXIT_GATE_FAILED)), "{out}");
    let failed = &j["gates"][0]["violations"];
    assert!(
        failed
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["window"] == 2 && v["quantity"] == "offcpu"),
        "{failed:#}"
    );
    assert!(
        failed[0]["runs"]["p_value"].as_f64().unwrap() < 0.05,
        "{failed:#}"
    );
    assert!(out.contains("medians of 3 and 3 runs"), "{out}");
    assert_eq!(j["b"]["runs"].as_array().unwrap().len(), 3);

    let b = runs(&dir.join("b-noisy"), "run", &[135, 90, 130]);
    let (code, out, _) = diff_of(&b, "noisy");
    assert_eq!(code, Some(0), "{out}");

    let (code, out, _) = diff_of(&a, "same");
    assert_eq!(code, Some(0), "{out}");

    // Directories of recordings.
    let run = hvprof(&[
        "diff",
        dir.join("a").to_str().unwrap(),
        "--vs",
        dir.join("b").to_str().unwrap(),
        "-o",
        dir.join("dirs").to_str().unwrap(),
        "--fail-on",
        "regression>10%",
    ]);
    assert_eq!(
        run.status.code(),
        Some(i32::from(ci::EXIT_GATE_FAILED)),
        "{}",
        text(&run)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
