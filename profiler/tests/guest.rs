//! hvprof is a guest on the machine: while it records, other tools on the
//! same tracepoints count what they count without it. (A BPF program on a
//! classic tracepoint that returns 0 makes the kernel drop the event for
//! every perf user of it; hvprof's are on BTF tracepoints, but this holds
//! whatever they are.) Needs root, perf and /dev/kvm.

use std::{collections::BTreeMap, path::Path, process::Command};

mod common;
use common::*;
use profiler::tracer::{Part, Probe, syscall_pair};

/// Every tracepoint hvprof attaches (its registry), and the events of each
/// system call it times, that this kernel has, as perf names them.
fn attached_tracepoints() -> Vec<String> {
    let probes = || Part::ALL.into_iter().flat_map(|p| p.probes().iter());
    let syscalls = probes().flat_map(|probe| match probe {
        Probe::Syscalls { calls, .. } => calls.iter().flat_map(|c| syscall_pair(c)).collect(),
        _ => Vec::new(),
    });
    let mut names: Vec<String> = probes()
        .flat_map(|probe| probe.tracepoints())
        .chain(syscalls)
        .map(|t| t.to_string())
        .filter(|t| {
            let (category, name) = t.split_once(':').unwrap();
            Path::new("/sys/kernel/tracing/events")
                .join(category)
                .join(name)
                .exists()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// `perf stat` of `events` over `vmload PLAN`: each event's count.
fn perf_stat(events: &[String], plan: &str) -> BTreeMap<String, u64> {
    let out = Command::new("perf")
        .args(["stat", "-x", ",", "-e", &events.join(","), "--"])
        .arg(vmload())
        .arg(plan)
        .output()
        .expect("run perf (Debian's linux-perf; `./x test` installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "perf stat failed: {stderr}");
    let counts: BTreeMap<String, u64> = stderr
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((f.get(2)?.to_string(), f.first()?.parse().ok()?))
        })
        .collect();
    assert_eq!(counts.len(), events.len(), "perf stat printed:\n{stderr}");
    counts
}

/// The counts of `events` over the plan, alone and while `hvprof record
/// -a ARGS` with every tracer records.
fn alone_and_beside_hvprof(
    name: &str,
    events: &[String],
    plan: &str,
    args: &[&str],
) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let alone = perf_stat(events, plan);
    let dir = out_dir(name);
    let mut all = vec![
        "-a",
        "--tracers",
        "oncpu,offcpu,locks,fork,cgroup,dbus,wakers",
    ];
    all.extend(args);
    let hv = start_recording(&dir, &all);
    let beside = perf_stat(events, plan);
    // SAFETY: kill(2) of the child this test started.
    unsafe { libc::kill(hv.id().cast_signed(), libc::SIGINT) };
    let out = hv.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "hvprof record failed");
    (alone, beside)
}

#[test]
fn perf_counts_the_same_tracepoint_events_while_hvprof_records() {
    let events = attached_tracepoints();
    assert!(events.len() > 20, "{events:?}");
    // Work whose every event count is the same each run: VMs, forks,
    // vforks, spawns (execs), cgroup mkdir/attach/rmdir, threads.
    let plan = "vm,forks:5,vforks:3,spawns:2,cgroups:2,thread:20,vm";
    // The system calls timed through the dispatch (the first 10 s), and on
    // their own tracepoints.
    for args in [&[][..], &["--syscall-dispatch-for", "0"]] {
        let (alone, beside) = alone_and_beside_hvprof("guest-exact", &events, plan, args);
        assert_same_exact_counts(&events, &alone, &beside, args);
    }
    // Contention and switches vary from run to run (and hvprof's own work
    // changes how often vmload's threads collide): perf must still see
    // them while hvprof records, where a blinded perf sees none.
    let (alone, beside) = alone_and_beside_hvprof("guest-contend", &events, "contend:300", &[]);
    for e in [
        "lock:contention_begin",
        "lock:contention_end",
        "sched:sched_waking",
        "raw_syscalls:sys_enter",
        "raw_syscalls:sys_exit",
    ] {
        assert!(
            alone[e] > 0 && beside[e] > alone[e] / 10,
            "{e}: perf counted {} alone, {} while hvprof recorded",
            alone[e],
            beside[e]
        );
    }
}

/// The counts that are the same each run are the same beside hvprof
/// (recording with `args`).
fn assert_same_exact_counts(
    events: &[String],
    alone: &BTreeMap<String, u64>,
    beside: &BTreeMap<String, u64>,
    args: &[&str],
) {
    for e in events {
        if e.starts_with("lock:")
            || e.starts_with("sched:sched_switch")
            || e.starts_with("sched:sched_waking")
            || e.starts_with("raw_syscalls:")
        {
            continue; // not the same each run
        }
        // vmload's writes (its output, cgroup.procs) vary by one or two
        // from run to run; every other count is exact.
        let slack = if e.ends_with("_write") { 2 } else { 0 };
        assert!(
            beside[e].abs_diff(alone[e]) <= slack,
            "{e}: perf counted {} alone, {} while hvprof {args:?} recorded",
            alone[e],
            beside[e]
        );
    }
    assert!(alone["syscalls:sys_enter_ioctl"] >= 2 && alone["cgroup:cgroup_mkdir"] >= 2);
}
