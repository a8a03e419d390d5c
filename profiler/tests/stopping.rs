//! How a recording ends: hvprof exits soon after its command does, with
//! nothing of it left attached in the kernel; Ctrl-C twice still writes
//! everything, and a third one aborts, saying what is lost. Needs root.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

mod common;
use common::*;
use profiler::profile::Profile;

/// The ids of the BPF programs and links process `pid` holds, from its
/// file descriptors' `fdinfo`.
fn bpf_objects_of(pid: u32) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let (mut progs, mut links) = (BTreeSet::new(), BTreeSet::new());
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).unwrap().map_while(Result::ok) {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in info.lines() {
            let id = |key: &str| line.strip_prefix(key)?.trim().parse::<u32>().ok();
            if let Some(id) = id("prog_id:") {
                progs.insert(id);
            }
            if let Some(id) = id("link_id:") {
                links.insert(id);
            }
        }
    }
    (progs, links)
}

/// The type and tracepoint (if any) of each BPF link process `pid` holds.
fn links_of(pid: u32) -> Vec<(String, String)> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().map_while(Result::ok) {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
        };
        if let Some(kind) = field("link_type:") {
            out.push((kind, field("tp_name:").unwrap_or_default()));
        }
    }
    out
}

fn loaded_programs() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect()
}

fn loaded_links() -> BTreeSet<u32> {
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.id())
        .collect()
}

#[test]
fn hvprof_exits_soon_after_its_command_and_leaves_nothing_attached() {
    let dir = out_dir("teardown");
    let start = Instant::now();
    let (mut hv, _) = start_recording_logged(&dir, &["--", "/bin/sleep", "1"]);
    assert!(start.elapsed() < Duration::from_secs(10), "slow start");
    let recording = Instant::now();
    let (progs, links) = bpf_objects_of(hv.id());
    assert!(
        progs.len() >= 10 && links.len() >= 10,
        "hvprof holds {} programs and {} links",
        progs.len(),
        links.len()
    );
    let status = hv.wait().unwrap();
    assert!(status.success());
    // The command ran for 1 s. Detaching ~50 probes one grace period after
    // the other took hvprof 4 to 6 s after writing its files; now it takes
    // one. Generous: this machine's wall time is noisy.
    let took = recording.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "hvprof exited {took:?} after it started recording a 1 s command"
    );
    assert_nothing_left(&links, &progs);
    assert!(Profile::read(&dir.join("profile.hvprof")).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

/// None of `links` is attached, and `progs` go within 3 s.
fn assert_nothing_left(links: &BTreeSet<u32>, progs: &BTreeSet<u32>) {
    // A link's id goes when it is closed; a program's may outlive it by an
    // RCU grace period, while the kernel frees it.
    let left = loaded_links().intersection(links).count();
    assert_eq!(left, 0, "{left} of hvprof's links are still attached");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left: Vec<u32> = loaded_programs().intersection(progs).copied().collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hvprof's programs {left:?} are still loaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Once the timed system calls moved to their own (classic) tracepoints,
/// those are detached at the end too, one grace period each (about 70 ms
/// here): the fork and cgroup tracers' 16, ioctl's and mmap's 4.
#[test]
fn the_system_calls_own_tracepoints_are_detached_too() {
    let dir = out_dir("teardown-per-call");
    let (mut hv, _) = start_recording_logged(
        &dir,
        &[
            "--tracers",
            "fork,cgroup",
            "--syscall-dispatch-for",
            "0",
            "--",
            "/bin/sleep",
            "3",
        ],
    );
    // The move: the twins verified, attached (perf links, one per
    // tracepoint), the dispatch's links on sys_enter/sys_exit detached.
    let count = |links: &[(String, String)]| {
        let perf = links.iter().filter(|l| l.0 == "perf").count();
        let dispatch = links
            .iter()
            .filter(|l| l.1 == "sys_enter" || l.1 == "sys_exit")
            .count();
        (perf, dispatch)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let links = loop {
        let links = links_of(hv.id());
        if count(&links) == (20, 0) || Instant::now() > deadline {
            break links;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (perf, dispatch) = count(&links);
    assert!(perf == 20 && dispatch == 0, "hvprof's links: {links:?}");
    let (progs, links) = bpf_objects_of(hv.id());
    let status = hv.wait().unwrap();
    assert!(status.success());
    assert_nothing_left(&links, &progs);
    let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
    assert!(
        p.meta
            .counters
            .contains_key("system calls timed on their own tracepoints from: ms"),
        "{:?}",
        p.meta.counters
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `record -a` (whose drain and symbolizing take a while), lets it
/// record for a moment, and sends it `n` SIGINTs 20 ms apart.
fn interrupt_times(name: &str, n: usize) -> (std::process::ExitStatus, String, std::path::PathBuf) {
    let dir = out_dir(name);
    let (mut hv, log) = start_recording_logged(&dir, &["-a", "-d", "60s"]);
    // Busy meanwhile, so that even an idle machine has samples to write.
    let busy = Instant::now();
    while busy.elapsed() < Duration::from_millis(800) {
        std::hint::black_box(busy.elapsed());
    }
    for _ in 0..n {
        signal(&hv, libc::SIGINT);
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = hv.wait().unwrap();
    // The stderr reader ends with the process.
    std::thread::sleep(Duration::from_millis(100));
    let log = log.lock().unwrap().clone();
    (status, log, dir)
}

#[test]
fn a_second_ctrl_c_still_writes_everything() {
    let (status, log, dir) = interrupt_times("sigint2", 2);
    assert!(status.success(), "{status}:\n{log}");
    assert!(
        log.contains("hvprof: stopping: writing everything recorded to")
            && log.contains("Ctrl-C once more aborts"),
        "{log}"
    );
    let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
    assert_eq!(p.meta.stop_reason, "SIGINT");
    let mine: u64 = p
        .oncpu
        .iter()
        .filter(|r| r.tgid == std::process::id())
        .map(|r| r.samples)
        .sum();
    // 0.8 s at 99 Hz is 79 samples.
    assert!(
        mine >= 60,
        "{mine} samples of the test's 0.8 s on CPU, want about 79"
    );
    assert!(dir.join("summary.txt").is_file() && dir.join("w00-setup/oncpu.svg").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_third_ctrl_c_aborts_and_says_what_is_lost() {
    let (status, log, dir) = interrupt_times("sigint3", 3);
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("hvprof: aborted; lost: "), "{log}");
    // Stopped while recording or writing, it loses what the flushes had not
    // written, and the file of those that were reads as incomplete.
    if log.contains("lost: what was recorded since the last flush") {
        let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
        assert!(p.meta.incomplete.is_some(), "{log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
