//! A recording killed with SIGKILL (an OOM kill, a CI timeout) keeps what
//! it flushed: the profile file holds every flush before the kill, and
//! `report`, `export` and `diff` read it, naming the window cut short.
//! Needs root.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{assert_samples, out_dir, samples_of, start_recording, vmload};
use profiler::profile::Profile;

/// Runs `hvprof ARGS`, expecting success; its stderr.
fn hvprof(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "hvprof {args:?}: {stderr}");
    stderr
}

#[test]
fn a_killed_recording_keeps_every_flush_and_its_readers_name_the_open_window() {
    let vmload = vmload();
    let dir = out_dir("killed");
    let mut hv = start_recording(
        &dir,
        &[
            "--comm",
            "vmload",
            "--window-size",
            "2",
            "--flush-interval",
            "200ms",
        ],
    );
    // Known work: 300 ms on-CPU before the first VM, 7 forks and 300 ms
    // after it, then a second VM and 4 forks (window 1: VMs 1–2).
    let status = Command::new(vmload)
        .arg("busy:300,vm,forks:7,busy:300,vm,forks:4")
        .status()
        .unwrap();
    assert!(status.success());
    // Several flushes later, a kill: nothing of hvprof's own stop runs.
    let done = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    hv.kill().unwrap();
    hv.wait().unwrap();

    let path = dir.join("profile.hvprof");
    let p = Profile::read(&path).unwrap();
    let inc = p
        .meta
        .incomplete
        .as_ref()
        .expect("the profile says it has no end");
    assert_eq!(inc.window, Some(1), "{inc:?}");
    assert_eq!(inc.damaged, None);
    // The data reaches to the last flush, after the workload ended.
    assert!(
        inc.until_ns >= p.vms.last().unwrap().time_ns
            && inc.until_ns <= p.meta.duration_ns.max(inc.until_ns),
        "{inc:?}"
    );
    assert!(done.elapsed() > Duration::from_millis(1000));
    assert_eq!(p.vms.len(), 2, "{:?}", p.vms);
    assert_eq!(p.meta.target, "comm vmload");
    // Exact counts, and the on-CPU time, in the windows they happened in.
    let forks = |w: u32| -> u64 {
        p.forks
            .iter()
            .filter(|f| f.window == w && !f.thread && f.comm.starts_with("vmload"))
            .map(|f| f.count)
            .sum()
    };
    assert_eq!((forks(0), forks(1)), (0, 11), "{:#?}", p.forks);
    let busy = samples_of(&p, "vmload_busy");
    assert_samples(busy.get(&0).copied().unwrap_or(0), 300, "before VM 1");
    assert_samples(busy.get(&1).copied().unwrap_or(0), 300, "VMs 1–2");
    assert!(p.frames.iter().any(|f| f.contains("vmload_busy")));
    assert!(
        p.processes.iter().any(|pr| pr.comm == "vmload"),
        "{:?}",
        p.processes
    );

    // Every reader takes it, and says which window is incomplete.
    let warning = "the recording has no end";
    let stderr = hvprof(&[
        "report",
        path.to_str().unwrap(),
        "-o",
        dir.join("report").to_str().unwrap(),
    ]);
    assert!(
        stderr.contains(warning) && stderr.contains("window 1 (VMs 1–2) is incomplete"),
        "{stderr}"
    );
    assert!(dir.join("report/w01-vms-1-2/oncpu.svg").is_file());
    let stderr = hvprof(&[
        "export",
        path.to_str().unwrap(),
        "-o",
        dir.join("export").to_str().unwrap(),
    ]);
    assert!(stderr.contains(warning), "{stderr}");
    let stderr = hvprof(&[
        "diff",
        path.to_str().unwrap(),
        path.to_str().unwrap(),
        "-o",
        dir.join("diff").to_str().unwrap(),
    ]);
    assert!(stderr.contains(warning), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
