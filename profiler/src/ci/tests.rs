use super::*;
use crate::{
    profile::{CgroupOp, DbusCall, ForkCall, FrameTable, LockWait, LossCount, OffCpu, OnCpu},
    windows::WindowSpec,
};

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

/// A profile whose every figure is known: two VM windows and the setup.
fn known() -> Profile {
    let mut t = FrameTable::default();
    let stack = vec![t.intern("main"), t.intern("work")];
    let on = |window, samples| OnCpu {
        window,
        tgid: 1,
        pid: 1,
        comm: "libvirtd".into(),
        stack: stack.clone(),
        samples,
    };
    let off = |window, total_ns| OffCpu {
        window,
        tgid: 1,
        pid: 1,
        comm: "libvirtd".into(),
        state: "S".into(),
        stack: stack.clone(),
        blocks: 1,
        total_ns,
        max_ns: total_ns,
        runq_ns: 0,
        dbus: None,
        unfinished: false,
    };
    let fork = |window, count| ForkCall {
        window,
        tgid: 1,
        comm: "libvirtd".into(),
        syscall: "clone".into(),
        thread: false,
        stack: stack.clone(),
        caller: Some("virFork".into()),
        count,
        total_ns: count * MS,
        max_ns: MS,
    };
    Profile {
        windows: WindowSpec::Every { size: 2 }.windows(4),
        frames: t.into_names(),
        oncpu: vec![on(1, 30), on(2, 20), on(2, 30)],
        offcpu: vec![off(1, 2 * S), off(2, 3 * S)],
        locks: known_locks(&stack),
        forks: vec![fork(1, 3), fork(2, 4)],
        cgroups: vec![CgroupOp {
            window: 2,
            tgid: 1,
            comm: "libvirtd".into(),
            op: "mkdir".into(),
            hierarchy: "v2".into(),
            path: "/machine/qemu-1-a.libvirt-qemu".into(),
            count: 14,
            timed: 14,
            total_ns: 14 * MS,
            max_ns: MS,
        }],
        dbus: vec![known_dbus_call(stack)],
        losses: vec![
            LossCount {
                window: Some(2),
                kind: "stack-map collision".into(),
                count: 7,
            },
            LossCount {
                window: None,
                kind: "ring buffer".into(),
                count: 2,
            },
        ],
        ..Profile::default()
    }
}

/// The known profile's lock waits: `cgroup_mutex` in both VM windows,
/// an unnamed rwsem in the second.
fn known_locks(stack: &[u32]) -> Vec<LockWait> {
    let lock = |window, lock, name: Option<&str>, ty: &str, count, total_ns, max_ns| LockWait {
        window,
        tgid: 1,
        comm: "libvirtd".into(),
        lock,
        lock_name: name.map(str::to_owned),
        lock_type: ty.into(),
        stack: stack.to_vec(),
        count,
        total_ns,
        max_ns,
        hist: vec![count],
        holder: None,
    };
    vec![
        lock(
            1,
            0x1000,
            Some("cgroup_mutex"),
            "mutex",
            4,
            40 * MS,
            20 * MS,
        ),
        lock(
            2,
            0x1000,
            Some("cgroup_mutex"),
            "mutex",
            6,
            60 * MS,
            30 * MS,
        ),
        lock(2, 0x2000, None, "rwsem:W", 1, 5 * MS, 5 * MS),
    ]
}

/// The known profile's D-Bus calls: two `CreateMachine`, one of them a
/// timeout.
fn known_dbus_call(stack: Vec<u32>) -> DbusCall {
    DbusCall {
        window: 2,
        tgid: 1,
        comm: "libvirtd".into(),
        library: "gio".into(),
        function: "g_dbus_connection_call_sync".into(),
        destination: Some("org.freedesktop.machine1".into()),
        path: None,
        interface: Some("org.freedesktop.machine1.Manager".into()),
        member: Some("CreateMachine".into()),
        timeout_ms: Some(-1),
        stack,
        calls: 2,
        timeouts: 1,
        total_ns: 25 * S + 500 * MS,
        max_ns: 25 * S,
        hist: vec![2],
    }
}

fn report(p: &Profile, expr: &str) -> GateResult {
    let g = Gate::parse(expr, Context::Report).unwrap();
    evaluate(&[g], &WindowMetrics::new(p)).unwrap().remove(0)
}

fn diff(a: &Profile, b: &Profile, expr: &str) -> GateResult {
    let g = Gate::parse(expr, Context::Diff).unwrap();
    evaluate_diff(&[g], &WindowMetrics::new(a), &WindowMetrics::new(b))
        .unwrap()
        .remove(0)
}

/// `expr` holds at `fails` and not at `passes`, and sees `value`.
fn bounds(p: &Profile, fails: &str, passes: &str, value: u64) {
    let f = report(p, fails);
    assert!(!f.passed, "{fails} should fail: {}", f.text());
    assert_eq!(f.violations[0].value, value, "{fails}");
    let ok = report(p, passes);
    assert!(ok.passed, "{passes} should pass: {}", ok.text());
    assert_eq!(ok.worst.as_ref().unwrap().value, value, "{passes}");
}

#[test]
fn whole_recording_metrics() {
    let p = known();
    let f = WindowMetrics::new(&p);
    let expect = [
        (Metric::Oncpu, 80),
        (Metric::Offcpu, 5 * S),
        (Metric::Lockwait, 105 * MS),
        (Metric::Contentions, 11),
        (Metric::Forks, 7),
        (Metric::Cgroups, 14),
        (Metric::Dbuswait, 25 * S + 500 * MS),
        (Metric::Dbuscalls, 2),
        (Metric::Dbustimeouts, 1),
        (Metric::Losses, 9),
    ];
    for (m, v) in expect {
        assert_eq!(f.whole.get(m), v, "{}", m.name());
    }
    assert_eq!(f.windows[2].1.get(Metric::Losses), 7);
    assert_eq!(f.windows[2].1.get(Metric::Oncpu), 50);
}

#[test]
fn every_form_evaluates_on_a_known_profile() {
    let p = known();
    bounds(&p, "losses>8", "losses>9", 9);
    assert!(!report(&p, "losses>=9").passed);
    bounds(&p, "window:2.losses>6", "window:2.losses>7", 7);
    assert!(report(&p, "window:1.losses>0").passed);
    bounds(&p, "oncpu>79", "oncpu > 80", 80);
    bounds(&p, "offcpu.total>4999ms", "offcpu>5s", 5 * S);
    bounds(&p, "lockwait>104ms", "lockwait.total>105ms", 105 * MS);
    bounds(&p, "contentions>10", "contentions>11", 11);
    bounds(&p, "forks>6", "forks>7", 7);
    bounds(&p, "cgroups>13", "cgroups>14", 14);
    bounds(&p, "dbuswait>25s", "dbuswait>25.5s", 25 * S + 500 * MS);
    bounds(&p, "dbuscalls>1", "dbuscalls>2", 2);
    bounds(&p, "dbustimeouts>0", "dbustimeouts>1", 1);
    // Any single lock: cgroup_mutex, 40 + 60 ms over the recording.
    bounds(&p, "lock.total>99ms", "lock.total>100ms", 100 * MS);
    bounds(
        &p,
        "lock:cgroup_mutex.max>29ms",
        "lock:cgroup_mutex.max>30ms",
        30 * MS,
    );
    bounds(
        &p,
        "lock:cgroup_mutex.count>9",
        "lock:cgroup_mutex.count>10",
        10,
    );
    // An unnamed lock by address, any case.
    bounds(&p, "lock:0x2000.total>4ms", "lock:0X2000.total>5ms", 5 * MS);
    bounds(
        &p,
        "window:1.lock.total>39ms",
        "window:1.lock.total>40ms",
        40 * MS,
    );
    // D-Bus, by full method or member.
    bounds(&p, "dbus.timeouts>0", "dbus.timeouts>1", 1);
    bounds(
        &p,
        "dbus:CreateMachine.total>25s",
        "dbus:CreateMachine.total>26s",
        25 * S + 500 * MS,
    );
    bounds(
        &p,
        "dbus:org.freedesktop.machine1.Manager.CreateMachine.calls>1",
        "dbus:org.freedesktop.machine1.Manager.CreateMachine.calls>2",
        2,
    );
    bounds(&p, "dbus.max>24s", "dbus.max>25s", 25 * S);
    bounds(&p, "window:2.oncpu>49", "window:2.oncpu>50", 50);
    // Each window on its own: only window 2 is over 40 samples.
    let r = report(&p, "metric:oncpu>40");
    assert!(!r.passed);
    assert_eq!(r.violations.len(), 1);
    assert_eq!(r.violations[0].window, Some(2));
    assert_eq!(r.checked, 3);
    assert!(
        r.text().contains("window 2 (VMs 3\u{2013}4): oncpu 50"),
        "{}",
        r.text()
    );
    // A name that is not there is 0, and said.
    let r = report(&p, "lock:no_such_lock.total>0ms");
    assert!(r.passed);
    assert!(
        r.note
            .as_deref()
            .unwrap()
            .contains("lock no_such_lock not in the profile")
    );
    // A window the profile does not have is an error naming its windows.
    let g = Gate::parse("window:9.oncpu>1", Context::Report).unwrap();
    let e = evaluate(&[g], &WindowMetrics::new(&p))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no window 9") && e.contains("2 (VMs 3\u{2013}4)"),
        "{e}"
    );
}

#[test]
fn percentages_compare_b_with_a_above_the_noise_floor() {
    let base = known();
    let mut new = known();
    // Window 2: on-CPU 50 → 60 samples (+20 %). Window 1: forks 3 → 6
    // (+100 %), under the noise floor of 10.
    new.oncpu[1].samples += 10;
    new.forks[0].count = 6;
    let res = diff(&base, &new, "regression>19%");
    assert!(!res.passed);
    assert_eq!(res.violations.len(), 1, "{}", res.text());
    let hit = &res.violations[0];
    assert_eq!(
        (hit.window, hit.quantity.as_str(), hit.a, hit.value),
        (Some(2), "oncpu", Some(50), 60)
    );
    assert!((hit.change_pct.unwrap() - 20.0).abs() < 1e-9);
    assert!(res.below_noise_floor > 0);
    assert!(
        res.text().contains("oncpu 50 \u{2192} 60 (+20.0%)"),
        "{}",
        res.text()
    );
    assert!(diff(&base, &new, "regression>20%").passed);
    assert!(!diff(&base, &new, "regression>=20%").passed);
    assert!(!diff(&base, &new, "metric:oncpu>10%").passed);
    assert!(
        diff(&base, &new, "metric:forks>10%").passed,
        "under the floor"
    );
    assert!(diff(&base, &new, "window:1.regression>0%").passed);
    assert!(!diff(&base, &new, "oncpu>12%").passed, "whole: 80 → 90");
    assert!(diff(&base, &new, "oncpu>13%").passed);
    assert!(diff(&base, &new, "lock:cgroup_mutex.total>0%").passed);
    // Counts and durations are checked on B.
    assert!(!diff(&base, &new, "forks>9").passed);
    assert!(diff(&base, &new, "forks>10").passed);
    // Against itself nothing changed.
    assert!(diff(&base, &base, "regression>0%").passed);
    // Something new in B (A had 0) is an infinite change.
    let mut changed = known();
    changed.locks[2].total_ns = 50 * MS;
    changed.locks[2].lock = 0x3000;
    let res = diff(&base, &changed, "lock.total>1000%");
    assert!(!res.passed);
    assert_eq!(res.violations[0].quantity, "lock 0x3000 rwsem:W total");
    assert!(res.text().contains("(new)"), "{}", res.text());
}

#[test]
fn malformed_conditions_say_why_with_the_grammar() {
    let cases: &[(&str, Context, &str)] = &[
        ("", Context::Report, "no `>`"),
        ("losses", Context::Report, "no `>`"),
        ("losses>", Context::Report, "nothing after"),
        (">5", Context::Report, "nothing before"),
        ("losses>abc", Context::Report, "not a count"),
        ("offcpu>5", Context::Report, "needs a unit"),
        ("oncpu>5ms", Context::Report, "not a count"),
        ("lock.total>1fortnight", Context::Report, "unknown unit"),
        ("regression>10", Context::Diff, "takes a percentage"),
        ("losses>10%", Context::Report, "use it with `hvprof diff"),
        ("regression>10%", Context::Report, "compares two profiles"),
        ("lock:foo>1ms", Context::Report, "say which statistic"),
        ("lock.bogus>1", Context::Report, "not a lock statistic"),
        ("dbus.count2>1", Context::Report, "not a D-Bus statistic"),
        ("window:x.oncpu>1", Context::Report, "not a window number"),
        ("window:3>1", Context::Report, "followed by `.`"),
        (
            "metric:lock.total>1ms",
            Context::Report,
            "metric: takes a metric",
        ),
        ("bogus>1", Context::Report, "not a quantity"),
        ("forks.total>1s", Context::Report, "not a quantity"),
        ("oncpu>1>2", Context::Report, "one comparison"),
        ("regression>-5%", Context::Diff, "not a percentage"),
    ];
    for (expr, ctx, why) in cases {
        let e = Gate::parse(expr, *ctx).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(why), "{expr:?}: {msg}");
        assert!(
            msg.contains("EXPR      [SCOPE]QUANTITY > BOUND"),
            "{expr:?}: no grammar"
        );
    }
    // And the forms that parse.
    for expr in [
        "losses>0",
        "losses >= 100",
        "lock:cgroup_mutex.total>50ms",
        "lock.total>1s",
        "dbus:org.freedesktop.machine1.Manager.CreateMachine.total>1s",
        "dbus.timeouts>0",
        "offcpu.total>2m",
        "window:3.oncpu>500",
        "window:0.lock:0xffff8883edd50d38.count>3",
        "metric:lockwait>25ms",
    ] {
        Gate::parse(expr, Context::Report).unwrap();
    }
    for expr in [
        "regression>10%",
        "metric:oncpu>10%",
        "window:2.regression>5.5%",
    ] {
        Gate::parse(expr, Context::Diff).unwrap();
    }
    assert_eq!(
        Gate::parse("window:3.oncpu>=500", Context::Report).unwrap(),
        Gate {
            text: "window:3.oncpu>=500".into(),
            scope: Scope::Window(3),
            subject: Subject::Quantity(Quantity::Metric(Metric::Oncpu)),
            inclusive: true,
            bound: Bound::Value(500),
        }
    );
}

#[test]
fn markdown_is_escaped() {
    assert_eq!(
        md_escape("<script>a|b</script>"),
        "&lt;script&gt;a\\|b&lt;/script&gt;"
    );
    assert_eq!(
        md_escape("__x__ *y* `z` [l](u)"),
        "\\_\\_x\\_\\_ \\*y\\* \\`z\\` \\[l\\](u)"
    );
    let mut p = known();
    p.locks[0].lock_name = Some("<img src=x onerror=alert(1)>".into());
    p.locks[1].lock_name = p.locks[0].lock_name.clone();
    let f = WindowMetrics::new(&p);
    let md = report_markdown(&f, Path::new("p.hvprof"), &[]);
    assert!(!md.contains("<img"), "{md}");
    assert!(md.contains("&lt;img src=x onerror=alert(1)&gt;"), "{md}");
    assert!(md.contains("| 2 | VMs 3\u{2013}4 | 50 |"), "{md}");
}

/// The libvirt tables' quantities: a procedure's calls, errors and p99, a
/// QMP command's total, an event's count (the fixture's calls take 2 ms).
#[test]
fn libvirt_gates_name_procedures_commands_and_events() {
    let p = crate::fuzzing::fixture();
    // DomainCreateXML: window 1 two answered and one error, window 2 three.
    bounds(
        &p,
        "libvirt:DomainCreateXML.calls>5",
        "libvirt:DomainCreateXML.calls>6",
        6,
    );
    bounds(
        &p,
        "libvirt:DomainCreateXML.errors>0",
        "libvirt:DomainCreateXML.errors>1",
        1,
    );
    // p99 is a log2 bucket's upper bound: 2 ms is in [2^20, 2^21) ns.
    bounds(
        &p,
        "libvirt:DomainCreateXML.p99>2ms",
        "libvirt:DomainCreateXML.p99>3ms",
        1 << 21,
    );
    bounds(
        &p,
        "qmp:qmp_capabilities.total>3ms",
        "qmp:qmp_capabilities.total>4ms",
        4 * MS,
    );
    bounds(
        &p,
        "qmp-event:RESUME.count>2",
        "qmp-event:RESUME.count>3",
        3,
    );
    // Job waits: one got the job after 0.5 s, one timed out after 30 s.
    bounds(&p, "jobwait.timeouts>0", "jobwait.timeouts>1", 1);
    bounds(&p, "jobwait.total>30s", "jobwait.total>31s", 30_500 * MS);
    bounds(&p, "jobwait.waits>1", "jobwait.waits>2", 2);
    // A command still in flight is a call, not time.
    bounds(&p, "qmp:cont.calls>0", "qmp:cont.calls>1", 1);
    let r = report(&p, "qmp:cont.total>0ms");
    assert!(r.passed, "{}", r.text());
    assert_eq!(r.worst.as_ref().unwrap().value, 0);
    // And the per-window metrics.
    let f = WindowMetrics::new(&p);
    let w = |id: u32| &f.windows.iter().find(|(w, _)| w.id == id).unwrap().1;
    assert_eq!(w(1).get(Metric::Apicalls), 3);
    assert_eq!(w(1).get(Metric::Apiwait), 6 * MS);
    assert_eq!(w(1).get(Metric::Qmpwait), 4 * MS);
    assert_eq!(w(2).get(Metric::Qmpwait), 0);
}

/// `known()` with window 1's off-CPU time set to `ms` (window 2's stays).
fn with_offcpu(ms: u64) -> Profile {
    let mut p = known();
    p.offcpu[0].total_ns = ms * MS;
    p
}

fn runs_gate(a: &[u64], b: &[u64], expr: &str) -> GateResult {
    let (pa, pb): (Vec<Profile>, Vec<Profile>) = (
        a.iter().map(|&ms| with_offcpu(ms)).collect(),
        b.iter().map(|&ms| with_offcpu(ms)).collect(),
    );
    let fa: Vec<WindowMetrics<'_>> = pa.iter().map(WindowMetrics::new).collect();
    let fb: Vec<WindowMetrics<'_>> = pb.iter().map(WindowMetrics::new).collect();
    let g = Gate::parse(expr, Context::Diff).unwrap();
    evaluate_runs(&[g], &fa, &fb).unwrap().remove(0)
}

/// Over several runs a side, a regression gate fails only where B's median
/// is over the bound and B's runs are significantly larger (every B run
/// above every A run, with three a side).
#[test]
fn regressions_over_runs_need_significance() {
    let gate = "window:1.offcpu>10%";
    // Medians 105 → 135 ms (+28.6%), every B run well above every A run
    // raised by 10%.
    let f = runs_gate(&[100, 110, 105], &[130, 140, 135], gate);
    assert!(!f.passed, "{}", f.text());
    let v = &f.violations[0];
    assert_eq!((v.a, v.value), (Some(105 * MS), 135 * MS));
    let r = v.runs.as_ref().unwrap();
    assert!(r.p_value < 0.01, "{r:?}");
    assert!(f.text().contains("medians of 3 and 3 runs"), "{}", f.text());
    // The same medians, but one B run below A's: not significant.
    let ok = runs_gate(&[100, 110, 105], &[90, 140, 135], gate);
    assert!(ok.passed, "{}", ok.text());
    // Significant, but the medians within 10%.
    let ok = runs_gate(&[100, 101, 102], &[108, 109, 110], gate);
    assert!(ok.passed, "{}", ok.text());
    // Medians +13.9%, every B run above every A run, but one B run not 10%
    // above every A run: B is larger, not significantly more than 10%
    // larger.
    let ok = runs_gate(&[100, 101, 102], &[108, 115, 120], gate);
    assert!(ok.passed, "{}", ok.text());
    assert!(ok.worst.as_ref().unwrap().runs.as_ref().unwrap().p_value > 0.05);
    // Identical runs: nothing.
    let ok = runs_gate(&[100, 110, 105], &[100, 110, 105], gate);
    assert!(ok.passed, "{}", ok.text());
    // One run a side is the plain diff: the medians alone decide.
    let f = runs_gate(&[100], &[130], gate);
    assert!(!f.passed && f.violations[0].runs.is_none(), "{}", f.text());
}

/// `offcpu:FUNCTION` and `oncpu:FUNCTION`: the metric of the stacks through
/// a function, per window; `window:uN.` names an unattributed window, which
/// `metric:` and `regression` leave alone.
#[test]
fn gates_on_the_stacks_through_a_function_and_unattributed_windows() {
    use crate::windows::UNATTRIBUTED;
    let mut p = known();
    let index = |name: &str| u32::try_from(p.frames.iter().position(|f| f == name).unwrap());
    let (work, main) = (index("work").unwrap(), index("main").unwrap());
    // A block through `main` only: not through `work`.
    let mut elsewhere = p.offcpu[1].clone();
    elsewhere.stack = vec![main];
    elsewhere.total_ns = 7 * S;
    p.offcpu.push(elsewhere);
    bounds(
        &p,
        "window:2.offcpu:work>2s",
        "window:2.offcpu:work.total>3s",
        3 * S,
    );
    bounds(&p, "offcpu:main>=12s", "offcpu:main>12s", 12 * S);
    bounds(
        &p,
        "window:2.oncpu:work.samples>49",
        "window:2.oncpu:work>50",
        50,
    );
    assert!(report(&p, "offcpu:nowhere>0ms").passed);
    assert!(Gate::parse("offcpu:>1s", Context::Report).is_err());
    assert!(
        p.offcpu
            .iter()
            .all(|r| r.stack.contains(&work) || r.stack == [main])
    );

    // The same profile as attributed windows: 1, 2 and u2.
    let mut q = p.clone();
    q.windows.retain(|w| w.id > 0);
    let mut u2 = q.windows[1].clone();
    u2.id |= UNATTRIBUTED;
    u2.unattributed = true;
    q.windows.push(u2);
    let mut b = q.clone();
    b.offcpu[2].window = 2 | UNATTRIBUTED;
    q.offcpu[2].window = 2 | UNATTRIBUTED;
    b.offcpu[2].total_ns *= 3;
    assert!(diff(&q, &b, "regression>10%").passed);
    assert!(diff(&q, &b, "metric:offcpu>10%").passed);
    let f = diff(&q, &b, "window:u2.offcpu>10%");
    assert!(!f.passed, "{}", f.text());
    assert!(f.text().contains("window u2"), "{}", f.text());
}
