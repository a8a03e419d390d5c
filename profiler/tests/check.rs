//! Privileged integration tests for the foundation: the embedded eBPF object
//! loads, its programs attach, and they count exactly what this test does.
//! They need root (or CAP_BPF + CAP_PERFMON) and fail, not skip, without it.

use std::process::Command;

use aya::{
    Btf, Ebpf,
    maps::PerCpuArray,
    programs::{BtfTracePoint, UProbe, uprobe::UProbeScope},
};
use profiler::{
    ebpf::{self, Global},
    sys::{self, Privileges},
    tracefs::Tracefs,
};
use profiler_common::check::{
    CHECK_COUNTS_MAP, CHECK_TGID_GLOBAL, CHECK_TID_GLOBAL, CheckCounter, program,
};

fn require_privileges() {
    let p = Privileges::current().expect("read /proc/self/status");
    assert!(
        p.sufficient(),
        "these tests load eBPF programs: run them as root (./x test does, in CI)"
    );
    Tracefs::locate_or_mount().expect("tracefs");
}

fn load() -> Ebpf {
    ebpf::load(&[
        Global {
            name: CHECK_TGID_GLOBAL,
            value: std::process::id(),
        },
        Global {
            name: CHECK_TID_GLOBAL,
            value: sys::gettid(),
        },
    ])
    .expect("load the embedded eBPF object")
}

fn count(bpf: &Ebpf, slot: CheckCounter) -> u64 {
    let map =
        PerCpuArray::<_, u64>::try_from(bpf.map(CHECK_COUNTS_MAP).expect("map")).expect("type");
    map.get(&(slot as u32), 0).expect("slot").iter().sum()
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn hvprof_test_uprobe_target(x: u64) -> u64 {
    std::hint::black_box(x) * 3
}

#[test]
fn uprobe_counts_every_call_of_a_function_in_this_binary() {
    require_privileges();
    let mut bpf = load();
    let prog: &mut UProbe = bpf
        .program_mut(program::UPROBE)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().unwrap();
    let exe = std::env::current_exe().unwrap();
    prog.attach(
        ["hvprof_test_uprobe_target"],
        &exe,
        UProbeScope::AllProcesses,
    )
    .unwrap();
    assert_eq!(count(&bpf, CheckCounter::Uprobe), 0);
    for i in 0..17 {
        std::hint::black_box(hvprof_test_uprobe_target(i));
    }
    assert_eq!(count(&bpf, CheckCounter::Uprobe), 17);
}

#[test]
fn fork_tracepoint_counts_exactly_the_forks_of_this_thread() {
    require_privileges();
    let mut bpf = load();
    let prog: &mut BtfTracePoint = bpf.program_mut(program::FORK).unwrap().try_into().unwrap();
    let btf = Btf::from_sys_fs().expect("kernel BTF");
    prog.load("sched_process_fork", &btf).unwrap();
    prog.attach().unwrap();
    // Creating a thread is a fork of this thread (clone), and counts; the
    // new thread's own fork must not, since only this thread's tid does.
    std::thread::spawn(|| {
        Command::new("/bin/true").status().unwrap();
    })
    .join()
    .unwrap();
    for _ in 0..5 {
        assert!(Command::new("/bin/true").status().unwrap().success());
    }
    assert_eq!(count(&bpf, CheckCounter::Fork), 1 + 5);
}

#[test]
fn hvprof_check_passes_the_minimum_for_record_here() {
    require_privileges();
    let out = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .args(["check", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "hvprof check failed: {report:#}");
    assert_eq!(report["record_ready"], true);
    let rows = report["rows"].as_array().unwrap();
    for row in rows {
        if row["required"] == true {
            assert_eq!(row["status"], "ok", "{row:#}");
        }
        if row["status"] != "ok" {
            assert!(row["why"].is_string() && row["fix"].is_string(), "{row:#}");
        }
    }
    let row = |name: &str| rows.iter().find(|r| r["capability"] == name).unwrap();
    assert!(
        row("sched:sched_process_fork")["detail"]
            .as_str()
            .unwrap()
            .contains("counted 3/3 forks")
    );
    assert!(
        row("uprobes")["detail"]
            .as_str()
            .unwrap()
            .contains("3/3 calls")
    );
    assert!(
        row("perf-event cpu-clock sampling")["detail"]
            .as_str()
            .unwrap()
            .ends_with("samples")
    );
}

#[test]
fn hvprof_check_without_privileges_names_the_cause_and_fix() {
    require_privileges();
    // Drop to nobody in the child: it must fail cleanly, exit 1, and say why.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_hvprof"))
        .arg("check")
        .output()
        .expect("setpriv (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("record: NOT ready"), "{text}");
    assert!(text.contains("lacks CAP_BPF and CAP_PERFMON"), "{text}");
    assert!(text.contains("setcap cap_bpf,cap_perfmon+ep"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}
