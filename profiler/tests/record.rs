//! Privileged integration tests of `hvprof record` against the sample
//! workload (`samples/vmload`), whose ground truth they know: how many VMs it
//! creates and when, and which named function burns or sleeps for how long
//! between them. They need root and /dev/kvm, and fail (not skip) without.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use profiler::profile::Profile;

mod common;
use common::*;

#[test]
fn windows_follow_vm_creations_and_stacks_match_ground_truth() {
    let vmload = vmload();
    // VMs: 1 | 2 3 | 4 5 6 → windows of 2: w1 = VMs 1–2, w2 = 3–4, w3 = 5–6.
    let plan =
        "busy:400,vm,busy:600,block:400,vm,vm,child:300,vm,vm,spawn:300,thread:300,vm,block:300";
    let (p, dir) = record(
        "truth",
        &["--window-size", "2", "--", vmload.to_str().unwrap(), plan],
    );

    // Exactly six VM creations, ordinals 1..=6, by the workload, via KVM.
    assert_eq!(p.vms.len(), 6, "{:#?}", p.vms);
    for (i, vm) in p.vms.iter().enumerate() {
        assert_eq!(vm.ordinal, i as u64 + 1);
        assert_eq!(vm.source, "kvm");
        assert_eq!(vm.comm, "vmload");
    }
    assert!(p.vms.windows(2).all(|w| w[0].time_ns <= w[1].time_ns));
    let ids: Vec<u32> = p.windows.iter().map(|w| w.id).collect();
    assert_eq!(ids, [0, 1, 2, 3]);
    assert_eq!(p.windows[2].first_vm, Some(3));
    assert!(
        p.meta.stop_reason.starts_with("target exited"),
        "{}",
        p.meta.stop_reason
    );

    // The busy function is on CPU only where it ran, for as long as it ran.
    let busy = samples_of(&p, "vmload_busy");
    assert_eq!(busy.keys().copied().collect::<Vec<_>>(), [0, 1], "{busy:?}");
    assert_samples(busy[&0], 400, "vmload_busy in setup");
    assert_samples(busy[&1], 600, "vmload_busy in window 1");

    // A forked child (never exec'd) is followed, in window 2, and its
    // frames symbolize from its parent's image after it is gone.
    let child = samples_of(&p, "vmload_child_busy");
    assert_eq!(child.keys().copied().collect::<Vec<_>>(), [2], "{child:?}");
    assert_samples(child[&2], 300, "vmload_child_busy");
    let main_pid = p.vms[0].pid;
    assert!(
        tgids_of(&p, "vmload_child_busy")
            .iter()
            .all(|&t| t != main_pid)
    );

    // An exec'd helper and a thread, in window 3.
    let spawned = samples_of(&p, "vmload_spawned_busy");
    assert_eq!(
        spawned.keys().copied().collect::<Vec<_>>(),
        [3],
        "{spawned:?}"
    );
    assert_samples(spawned[&3], 300, "vmload_spawned_busy");
    assert!(
        tgids_of(&p, "vmload_spawned_busy")
            .iter()
            .all(|&t| t != main_pid)
    );
    let thread = samples_of(&p, "vmload_thread_busy");
    assert_eq!(
        thread.keys().copied().collect::<Vec<_>>(),
        [3],
        "{thread:?}"
    );
    assert_samples(thread[&3], 300, "vmload_thread_busy");
    assert_eq!(tgids_of(&p, "vmload_thread_busy"), [main_pid]);

    // Off-CPU: the blocking function, for as long as it slept, where it slept.
    let blocked = blocked_in(&p, "vmload_block");
    assert_eq!(
        blocked.keys().copied().collect::<Vec<_>>(),
        [1, 3],
        "{blocked:?}"
    );
    assert_blocked(blocked[&1], 400, "vmload_block in window 1");
    assert_blocked(blocked[&3], 300, "vmload_block in window 3");
    assert!(
        p.offcpu
            .iter()
            .filter(|r| p.frame_names(&r.stack).any(|f| f == "vmload_block"))
            .all(|r| r.state == "S")
    );

    // Kernel frames are named, and the tracing machinery is not among them.
    assert!(
        !p.frames.iter().any(|f| is_tracing_frame(f)),
        "tracing frames in stacks"
    );
    assert_no_losses(&p);

    // The profile alone re-renders the same folded stacks.
    let again = out_dir("truth-report");
    let status = Command::new(env!("CARGO_BIN_EXE_hvprof"))
        .arg("report")
        .arg(dir.join("profile.hvprof"))
        .arg("-o")
        .arg(&again)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let (a, b) = (folded_files(&dir), folded_files(&again));
    assert_eq!(a.len(), 8);
    assert_eq!(a, b, "report differs from record");
    for w in ["w00-setup", "w01-vms-1-2", "w02-vms-3-4", "w03-vms-5-6"] {
        let svg = std::fs::read_to_string(dir.join(w).join("oncpu.svg")).unwrap();
        assert!(svg.contains("<svg"), "{w}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&again);
}

/// Off-CPU time in a window is the time blocked within it. `vmload-sleeper`
/// sleeps 700 ms from VM 1 on, while VMs 2 and 3 are created 250 ms apart
/// (windows of one VM): window 2 holds exactly the time between VMs 2 and
/// 3 of its sleep, windows 1 and 3 the rest, and the block counts once, in
/// window 1. The main thread's last block is still going when the
/// recording stops (`-d`): it is kept apart, under its own frame, in no
/// window's total.
#[test]
fn off_cpu_time_is_cut_at_window_boundaries_and_unfinished_blocks_kept_apart() {
    let vmload = vmload();
    let plan = "vm,sleeper:700,block:250,vm,block:250,vm,block:5000";
    let (p, dir) = record(
        "offcpu-cut",
        &[
            "--window-size",
            "1",
            "-d",
            "1500ms",
            "--",
            vmload.to_str().unwrap(),
            plan,
        ],
    );
    assert!(p.meta.offcpu_cut_at_windows);
    assert_eq!(p.vms.len(), 3, "{:#?}", p.vms);
    let names = |stack: &[u32]| -> Vec<&str> {
        stack
            .iter()
            .map(|&f| p.frames[f as usize].as_str())
            .collect()
    };
    let rows_in = |func: &str, unfinished: bool| -> Vec<&profiler::profile::OffCpu> {
        p.offcpu
            .iter()
            .filter(|r| r.unfinished == unfinished && names(&r.stack).contains(&func))
            .collect()
    };
    let per_window = |rows: &[&profiler::profile::OffCpu]| {
        let mut m = std::collections::BTreeMap::<u32, (u64, u64)>::new();
        for r in rows {
            let e = m.entry(r.window).or_default();
            e.0 += r.blocks;
            e.1 += r.total_ns;
        }
        m
    };
    let ms = 1_000_000;
    let sleeper = per_window(&rows_in("vmload_sleeper_nap", false));
    let between = p.vms[2].time_ns - p.vms[1].time_ns;
    let (w1, w2, w3) = (sleeper[&1], sleeper[&2], sleeper[&3]);
    assert_eq!(
        sleeper.keys().copied().collect::<Vec<_>>(),
        [1, 2, 3],
        "{sleeper:?}"
    );
    assert_eq!((w1.0, w2.0, w3.0), (1, 0, 0), "blocks: {sleeper:?}");
    assert!(
        w2.1.abs_diff(between) <= 2 * ms,
        "window 2 holds {} ns of the sleep, VMs 2 and 3 were {between} ns apart",
        w2.1
    );
    assert!(
        (200 * ms..=320 * ms).contains(&w1.1) && (100 * ms..=300 * ms).contains(&w3.1),
        "{sleeper:?}"
    );
    let whole = w1.1 + w2.1 + w3.1;
    assert!((690 * ms..=800 * ms).contains(&whole), "{sleeper:?}");
    assert_eq!(rows_in("vmload_sleeper_nap", true).len(), 0);

    // The main thread's last block, still going at the stop: about a
    // second (VM 3 at ~0.5 s, the stop at 1.5 s), in no window's total.
    let unfinished = per_window(&rows_in("vmload_block", true));
    let (blocks, ns) = unfinished.get(&3).copied().unwrap_or_default();
    assert_eq!(unfinished.len(), 1, "{unfinished:?}");
    assert!(
        blocks == 1 && (700 * ms..=1300 * ms).contains(&ns),
        "{unfinished:?}"
    );
    let summary = profiler::render::summary(&p);
    let w = summary.windows.iter().find(|w| w.id == 3).unwrap();
    assert_eq!(w.offcpu_unfinished_ns, ns);
    let finished: u64 = p
        .offcpu
        .iter()
        .filter(|r| r.window == 3 && !r.unfinished)
        .map(|r| r.total_ns)
        .sum();
    assert_eq!(w.offcpu_ns, finished);
    assert!(
        w.offcpu_ns < 500 * ms,
        "window 3: {} ns off-CPU",
        w.offcpu_ns
    );
    let folded = std::fs::read_to_string(dir.join("w03-vms-3-3/offcpu.folded")).unwrap();
    assert!(
        folded
            .lines()
            .any(|l| l.starts_with("vmload;[still blocked at the stop];")
                && l.contains(";vmload_block;")),
        "{folded}"
    );
    let text = std::fs::read_to_string(dir.join("summary.txt")).unwrap();
    assert!(
        text.contains("still blocked at the stop is kept apart"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nothing_is_recorded_outside_the_requested_windows() {
    let vmload = vmload();
    // Windows: VM 2 and VM 4 only; the busy spells after VMs 1 and 3 fall
    // outside every window.
    let plan = "busy:300,vm,busy:300,vm,busy:300,vm,busy:300,vm,busy:300";
    let (p, dir) = record(
        "ranges",
        &["--windows", "2,4", "--", vmload.to_str().unwrap(), plan],
    );
    assert_eq!(p.vms.len(), 4, "every creation is in the timeline");
    let ids: Vec<u32> = p.windows.iter().map(|w| w.id).collect();
    assert_eq!(ids, [0, 1, 2]);
    // hvprof's own CPU while recording: some, and no more than all CPUs
    // for the whole recording.
    let cpus = p.meta.cpus as u64;
    assert!(
        p.meta
            .self_cpu_ns
            .is_some_and(|ns| ns > 0 && ns < p.meta.duration_ns * cpus),
        "{:?} ns of {} ns on {cpus} CPUs",
        p.meta.self_cpu_ns,
        p.meta.duration_ns
    );
    assert!(p.oncpu.iter().all(|r| r.window <= 2));
    assert!(p.offcpu.iter().all(|r| r.window <= 2));
    let busy = samples_of(&p, "vmload_busy");
    assert_eq!(
        busy.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2],
        "{busy:?}"
    );
    for w in 0..=2 {
        assert_samples(busy[&w], 300, &format!("window {w}"));
    }
    let total: u64 = p.oncpu.iter().map(|r| r.samples).sum();
    assert!(
        total < 5 * 300 * HZ / 1000 * 80 / 100,
        "outside windows recorded: {total}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn children_are_not_followed_when_told_not_to() {
    let vmload = vmload();
    let (p, dir) = record(
        "nochildren",
        &[
            "--no-children",
            "--",
            vmload.to_str().unwrap(),
            "busy:200,child:300,spawn:300",
        ],
    );
    assert!(samples_of(&p, "vmload_child_busy").is_empty());
    assert!(samples_of(&p, "vmload_spawned_busy").is_empty());
    assert_samples(samples_of(&p, "vmload_busy")[&0], 200, "vmload_busy");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vm_created_by_any_process_moves_the_window_of_the_target() {
    let vmload = vmload();
    // The target sleeps twice, then burns CPU. Its second sleep starts in
    // window 0; during it another process, not a target, creates a VM; the
    // burn is then in window 1.
    let spawned = Instant::now();
    let mut target = Command::new(vmload)
        .arg("block:4000,block:1500,busy:400")
        .spawn()
        .unwrap();
    let dir = out_dir("pid");
    let pid = target.id().to_string();
    let hv = start_recording(&dir, &["-p", &pid, "--window-size", "1"]);
    // hvprof must be recording before the first sleep ends (a debug build
    // starts in about 1-1.4 s here, more on a busy host: map creation,
    // kernel BTF, the verifier).
    assert!(
        spawned.elapsed() < Duration::from_millis(3900),
        "hvprof took {:?} to start; the test's timing needs < 3.9 s",
        spawned.elapsed()
    );
    std::thread::sleep(Duration::from_millis(4400).saturating_sub(spawned.elapsed()));
    let other = Command::new(vmload).arg("vm").output().unwrap();
    assert!(other.status.success());
    let out = hv.wait_with_output().unwrap();
    target.wait().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
    assert_eq!(p.vms.len(), 1);
    assert_ne!(
        p.vms[0].pid,
        target.id(),
        "the VM came from the other process"
    );
    assert!(
        p.meta.stop_reason.contains("target exited"),
        "{}",
        p.meta.stop_reason
    );
    // The other process is not recorded.
    assert!(p.oncpu.iter().all(|r| r.tgid == target.id()));
    assert!(p.offcpu.iter().all(|r| r.tgid == target.id()));
    let busy = samples_of(&p, "vmload_busy");
    assert_eq!(busy.keys().copied().collect::<Vec<_>>(), [1], "{busy:?}");
    assert_samples(busy[&1], 400, "vmload_busy after the VM");
    // The second sleep started before the VM and ended after it: it is
    // cut where the VM was created, about 400 ms into it (4.4 s after the
    // spawn, the sleep from 4 s). (The first began before the recording.)
    let blocked = blocked_in(&p, "vmload_block");
    assert_eq!(
        blocked.keys().copied().collect::<Vec<_>>(),
        [0, 1],
        "{blocked:?}"
    );
    assert_blocked(blocked[&0] + blocked[&1], 1500, "second sleep");
    assert!(
        (200_000_000..=700_000_000).contains(&blocked[&0]),
        "{blocked:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_stops_cleanly_writes_everything_and_ends_the_command() {
    let vmload = vmload();
    let dir = out_dir("sigint");
    let hv = start_recording(
        &dir,
        &["--", vmload.to_str().unwrap(), "busy:300,vm,block:60000"],
    );
    std::thread::sleep(Duration::from_millis(1200));
    // SAFETY: signalling the hvprof we started, by pid.
    unsafe { libc::kill(hv.id().cast_signed(), libc::SIGINT) };
    let out = hv.wait_with_output().unwrap();
    assert!(out.status.success());
    let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
    assert_eq!(p.meta.stop_reason, "SIGINT");
    assert_eq!(p.vms.len(), 1);
    assert_samples(samples_of(&p, "vmload_busy")[&0], 300, "before the stop");
    // The command hvprof started is gone.
    let vmload_pid = p.vms[0].pid;
    assert!(
        !Path::new(&format!("/proc/{vmload_pid}")).exists(),
        "vmload left running"
    );
    assert!(dir.join("w01-vms-1-10/offcpu.svg").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_exec_can_count_as_a_vm_creation() {
    let vmload = vmload();
    // QEMU under TCG makes no KVM ioctl; here /bin/true stands in for it.
    let (p, dir) = record(
        "execvm",
        &[
            "--vm-event",
            "exec:tru*",
            "--window-size",
            "1",
            "--",
            vmload.to_str().unwrap(),
            "busy:200,spawns:1,busy:300,spawns:1,busy:200",
        ],
    );
    assert_eq!(p.vms.len(), 2, "{:#?}", p.vms);
    assert!(p.vms.iter().all(|v| v.source == "exec" && v.comm == "true"));
    let busy = samples_of(&p, "vmload_busy");
    assert_eq!(
        busy.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2],
        "{busy:?}"
    );
    assert_samples(busy[&1], 300, "between the two execs");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vm_seen_both_at_exec_and_at_kvm_create_counts_once() {
    let vmload = vmload();
    // The exec of vmload counts; its first KVM_CREATE_VM is that same VM;
    // its second is a new one.
    let (p, dir) = record(
        "execkvm",
        &[
            "--vm-event",
            "exec:vmload",
            "--vm-event",
            "kvm",
            "--",
            vmload.to_str().unwrap(),
            "vm,vm",
        ],
    );
    let sources: Vec<&str> = p.vms.iter().map(|v| v.source.as_str()).collect();
    assert_eq!(sources, ["exec", "kvm"], "{:#?}", p.vms);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn min_and_max_block_filter_off_cpu_time() {
    let vmload = vmload();
    let (p, dir) = record(
        "minblock",
        &[
            "--min-block",
            "250ms",
            "--max-block",
            "700ms",
            "--",
            vmload.to_str().unwrap(),
            "block:100,block:400,block:900",
        ],
    );
    let blocked = blocked_in(&p, "vmload_block");
    assert_blocked(
        blocked.get(&0).copied().unwrap_or(0),
        400,
        &format!(
            "only the 400 ms sleep is kept ({} rows: {:?})",
            p.offcpu.len(),
            p.offcpu
                .iter()
                .map(|r| (
                    r.window,
                    r.blocks,
                    r.total_ns,
                    p.frame_names(&r.stack).collect::<Vec<_>>()
                ))
                .collect::<Vec<_>>()
        ),
    );
    assert!(
        p.offcpu
            .iter()
            .all(|r| r.max_ns >= 250_000_000 && r.max_ns <= 700_000_000)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Off-CPU rows under `read` (vmload's pipe ping-pong) that carry the
/// short-block marker, and those with a walked kernel stack.
fn pipe_reads(
    p: &Profile,
) -> (
    Vec<&profiler::profile::OffCpu>,
    Vec<&profiler::profile::OffCpu>,
) {
    p.offcpu
        .iter()
        .filter(|r| {
            r.state == "S"
                && p.frame_names(&r.stack)
                    .any(|f| f.contains("default_read_exact"))
        })
        .partition(|r| {
            p.frame_names(&r.stack)
                .any(|f| f.starts_with("[kernel stack not walked: blocked < "))
        })
}

#[test]
fn off_cpu_kernel_stacks_are_walked_for_long_blocks_only() {
    let vmload = vmload();
    let plan = "block:200,switches:3000";
    // Default: a block under 100 us keeps its time under the marker frame.
    let (p, dir) = record(
        "kstack-default",
        &["--tracers", "offcpu", "--", vmload.to_str().unwrap(), plan],
    );
    let (marked, walked) = pipe_reads(&p);
    let marked_blocks: u64 = marked.iter().map(|r| r.blocks).sum();
    // 3000 round trips: each of the two threads blocks in read about 3000
    // times; most blocks are microseconds long.
    assert!(
        marked_blocks > 3000,
        "{marked_blocks} short pipe-read blocks"
    );
    for r in &marked {
        assert!(
            r.max_ns < 100_000,
            "a marked row's longest block: {} ns",
            r.max_ns
        );
        assert_eq!(
            p.frame_names(&r.stack).last(),
            Some("[kernel stack not walked: blocked < 100.0 us]")
        );
    }
    for r in &walked {
        let names: Vec<&str> = p.frame_names(&r.stack).collect();
        assert!(
            names.iter().any(|f| f.ends_with("pipe_read_[k]")),
            "a long read's kernel stack: {names:?}"
        );
    }
    assert_blocked(
        blocked_in(&p, "vmload_block").values().sum(),
        200,
        "the sleep",
    );
    // A sleep's kernel stack is walked when it comes back (scheduler
    // functions are not in a stopped task's walk).
    for r in p
        .offcpu
        .iter()
        .filter(|r| p.frame_names(&r.stack).any(|f| f == "vmload_block"))
    {
        let names: Vec<&str> = p.frame_names(&r.stack).collect();
        assert_eq!(
            names.last(),
            Some(&"hrtimer_nanosleep_[k]"),
            "the sleep's kernel leaf: {names:?}"
        );
    }

    let _ = std::fs::remove_dir_all(&dir);

    // 0: every block's kernel stack is walked (when the task comes back).
    let (p, dir) = record(
        "kstack-all",
        &[
            "--tracers",
            "offcpu",
            "--kernel-stack-min-block",
            "0",
            "--",
            vmload.to_str().unwrap(),
            plan,
        ],
    );
    let (marked, walked) = pipe_reads(&p);
    assert!(marked.is_empty(), "{} marked rows", marked.len());
    let walked_blocks: u64 = walked.iter().map(|r| r.blocks).sum();
    assert!(
        walked_blocks > 3000,
        "{walked_blocks} walked pipe-read blocks"
    );
    for r in &walked {
        let names: Vec<&str> = p.frame_names(&r.stack).collect();
        // pipe_read, anon_pipe_read since 6.15.
        assert!(
            names.iter().any(|f| f.ends_with("pipe_read_[k]")),
            "{names:?}"
        );
        assert!(!names.iter().any(|f| is_tracing_frame(f)), "{names:?}");
    }
    assert_no_losses(&p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every stack cache agrees with the walk it saves.
#[test]
fn stack_reuses_agree_with_walks() {
    // Every reused stack is checked against a walk of the same stack
    // (--verify-stack-cache): futex ping-pong and one read site blocking on
    // a pipe and a socket (off-CPU user and kernel reuse), then mmap_lock
    // contention (lock-wait user and kernel reuse), with read(2) waiting
    // for it by two kernel paths (a fault in the copy, /proc/self/cmdline).
    let vmload = vmload();
    let (p, dir) = record(
        "verify-reuse",
        &[
            "--verify-stack-cache",
            "--kernel-stack-min-block",
            "0",
            "--",
            vmload.to_str().unwrap(),
            "switches:2000,twofds:200,contend:400,readlocks:800",
        ],
    );
    let c = |name: &str| {
        *p.meta
            .counters
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name:?} in {:#?}", p.meta.counters))
    };
    for differed in [
        "user stack reuses that differed from a walk",
        "off-CPU kernel stack reuses that differed from a walk",
        "lock-wait kernel stack reuses that differed from a walk",
    ] {
        assert_eq!(c(differed), 0, "{differed}: {:#?}", p.meta.counters);
    }
    // And there were reuses to check.
    for (reused, at_least) in [
        ("off-CPU user stacks reused (same site)", 2000),
        ("off-CPU kernel stacks reused (same site)", 100),
        ("lock-wait user stacks reused (same site)", 100),
        ("lock-wait kernel stacks reused (same place)", 20),
    ] {
        assert!(
            c(reused) >= at_least,
            "{reused} < {at_least}: {:#?}",
            p.meta.counters
        );
    }
    assert_no_losses(&p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One read call site over two kernel paths (a pipe twice, a unix socket
/// twice, ...): a kernel stack is reused only for a block that stopped the
/// same way as the one it was walked for, so every block keeps its own path.
#[test]
fn off_cpu_kernel_stacks_are_reused_only_where_they_match() {
    let vmload = vmload();
    let n = 400;
    let (p, dir) = record(
        "kstack-reuse",
        &[
            "--tracers",
            "offcpu",
            // Every block's kernel path, even one that came back quickly
            // (the byte arrived just after the read blocked).
            "--kernel-stack-min-block",
            "0",
            "--",
            vmload.to_str().unwrap(),
            &format!("twofds:{n}"),
        ],
    );
    let (mut pipe, mut sock) = (0, 0);
    for r in p
        .offcpu
        .iter()
        .filter(|r| r.state == "S" && p.frame_names(&r.stack).any(|f| f == "vmload_twofds_read"))
    {
        let names: Vec<&str> = p.frame_names(&r.stack).collect();
        assert!(!names.iter().any(|f| is_tracing_frame(f)), "{names:?}");
        let on_pipe = names.iter().any(|f| f.ends_with("pipe_read_[k]"));
        let on_sock = names.iter().any(|f| f.starts_with("unix_stream_read"));
        assert!(on_pipe != on_sock, "one kernel path per row: {names:?}");
        if on_pipe {
            pipe += r.blocks;
        } else {
            sock += r.blocks;
        }
    }
    // Each read blocks exactly once: the writer sends its byte 1 ms after
    // it sees the read asleep.
    for (what, blocks) in [("pipe", pipe), ("socket", sock)] {
        assert_eq!(blocks, n / 2, "blocks on the {what}, {} reads", n / 2);
    }
    // Half the reads follow a read of the same fd: their stacks are reused.
    let reused = p.meta.counters["off-CPU kernel stacks reused (same site)"];
    assert!(reused >= n / 4, "{reused} kernel stacks reused");
    assert_no_losses(&p);
    let _ = std::fs::remove_dir_all(&dir);

    // --no-stack-cache: every block walked, none reused.
    let (p, dir) = record(
        "kstack-noreuse",
        &[
            "--tracers",
            "offcpu",
            "--no-stack-cache",
            "--kernel-stack-min-block",
            "0",
            "--",
            vmload.to_str().unwrap(),
            &format!("twofds:{n}"),
        ],
    );
    assert_eq!(
        p.meta.counters["off-CPU kernel stacks reused (same site)"],
        0
    );
    assert_eq!(p.meta.counters["off-CPU user stacks reused (same site)"], 0);
    assert!(p.meta.counters["off-CPU kernel stacks walked at switch-in"] >= n - 10);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Three threads crowding one CPU for MS ms wait about 2·MS ms for it in
/// all; vmload prints the kernel's own count of that wait. The off-CPU
/// rows of those threads carry it as run-queue wait, nearly all of it in
/// preemptions (state R), which are nothing but waiting for a CPU.
#[test]
fn run_queue_wait_matches_the_kernels_count() {
    let vmload = vmload();
    let ms = 300;
    let (p, dir, stderr) = record_with_stderr(
        "runq",
        &[
            "--tracers",
            "offcpu",
            "--",
            vmload.to_str().unwrap(),
            &format!("crowd:{ms}"),
        ],
    );
    let kernel: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmload: crowd run-queue wait "))
        .and_then(|l| l.strip_suffix(" ns"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no run-queue wait from vmload in:\n{stderr}"));
    let ms_ns = ms * 1_000_000;
    // Three threads on one CPU for MS ms of wall time: 3·MS of which the
    // CPU gives them MS.
    assert!(
        (2 * ms_ns * 9 / 10..=2 * ms_ns * 11 / 10).contains(&kernel),
        "the kernel counts {kernel} ns of run-queue wait for 2 x {ms} ms"
    );
    let crowd: Vec<_> = p
        .offcpu
        .iter()
        .filter(|r| r.comm == "vmload-crowd")
        .collect();
    let (mut runq, mut preempted_runq, mut preempted_total) = (0, 0, 0);
    for r in &crowd {
        assert!(r.runq_ns <= r.total_ns, "{r:?}");
        runq += r.runq_ns;
        if r.state == "R" {
            preempted_runq += r.runq_ns;
            preempted_total += r.total_ns;
        }
    }
    eprintln!(
        "run-queue wait: hvprof {runq} ns, kernel {kernel} ns; preemptions {preempted_runq} of \
         {preempted_total} ns"
    );
    // The burn phase waits only in preemptions, as the kernel counts (a
    // thread may also be preempted once before it starts counting).
    assert!(
        preempted_runq.abs_diff(kernel) <= kernel / 100 + 10_000_000,
        "preemptions carry {preempted_runq} ns of run-queue wait, the kernel counts {kernel} ns"
    );
    // hvprof counts each thread's whole life: also its wait to run after
    // it was created or released from the barrier (a time slice or so per
    // thread), before vmload reads the count.
    assert!(
        runq >= kernel && runq <= kernel * 101 / 100 + 30_000_000,
        "hvprof {runq} ns of run-queue wait, the kernel {kernel} ns: {crowd:#?}"
    );
    // A preemption is all run-queue wait (hvprof's clock and the run
    // queue's agree within a little).
    assert!(
        preempted_runq >= preempted_total * 98 / 100,
        "preemptions: {preempted_runq} ns waiting of {preempted_total} ns"
    );
    assert_no_losses(&p);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn comm_target_picks_up_processes_that_exec_later() {
    let vmload = vmload();
    let dir = out_dir("comm");
    let hv = start_recording(&dir, &["--comm", "vmload", "-d", "2500ms"]);
    let mine = Command::new(vmload).arg("busy:400").output().unwrap();
    assert!(mine.status.success());
    // Not a vmload: not recorded, though it burns CPU meanwhile.
    let other = Command::new("sh")
        .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
        .status()
        .unwrap();
    assert!(other.success());
    let out = hv.wait_with_output().unwrap();
    assert!(out.status.success());
    let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
    assert_eq!(p.meta.stop_reason, "duration reached");
    assert_samples(samples_of(&p, "vmload_busy")[&0], 400, "vmload_busy");
    assert!(
        p.oncpu.iter().all(|r| r.comm == "vmload"),
        "only vmload is recorded"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restarted_comm_target_is_followed_again_and_the_summary_says_so() {
    let vmload = vmload();
    let dir = out_dir("restart");
    // The daemon, running before the recording.
    let mut old = Command::new(vmload)
        .arg("block:60000")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let hv = start_recording(&dir, &["--comm", "vmload", "-d", "3s"]);
    std::thread::sleep(Duration::from_millis(300));
    old.kill().unwrap();
    old.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Started again: a new process of the same name.
    let new = Command::new(vmload).arg("busy:300").spawn().unwrap();
    let new_pid = new.id();
    assert!(new.wait_with_output().unwrap().status.success());
    let out = hv.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
    let restarts: Vec<(u32, u32)> = p
        .meta
        .restarts
        .iter()
        .map(|r| (r.old_pid, r.new_pid))
        .collect();
    assert_eq!(restarts, [(old.id(), new_pid)], "{:#?}", p.meta.restarts);
    let r = &p.meta.restarts[0];
    assert!(r.exited_ns < r.started_ns && r.comm == "vmload", "{r:?}");
    // Followed again: the new process's samples are there.
    assert_eq!(tgids_of(&p, "vmload_busy"), [new_pid]);
    let line = format!("vmload restarted: pid {} exited at ", old.id());
    assert!(stdout.contains(&line), "{stdout}");
    let summary = std::fs::read_to_string(dir.join("summary.txt")).unwrap();
    assert!(summary.contains(&line), "{summary}");
    let json = std::fs::read_to_string(dir.join("summary.json")).unwrap();
    assert!(json.contains("\"restarts\""), "{json}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn all_records_every_task_but_hvprof_itself() {
    let vmload = vmload();
    let dir = out_dir("all");
    let hv = start_recording(&dir, &["-a", "-d", "2s"]);
    let hv_pid = hv.id();
    let w = Command::new(vmload).arg("busy:400").output().unwrap();
    assert!(w.status.success());
    let out = hv.wait_with_output().unwrap();
    assert!(out.status.success());
    let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
    assert_samples(samples_of(&p, "vmload_busy")[&0], 400, "vmload_busy");
    assert!(
        p.oncpu.iter().all(|r| r.tgid != hv_pid),
        "hvprof recorded itself"
    );
    // Kernel threads are recorded too (no user stack, not a loss).
    assert!(
        p.offcpu
            .iter()
            .any(|r| r.comm.starts_with("kworker") || r.comm.starts_with("rcu"))
    );
    assert_no_losses(&p);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tracers_can_be_chosen() {
    let vmload = vmload();
    let (p, dir) = record(
        "tracers",
        &[
            "--tracers",
            "oncpu",
            "--",
            vmload.to_str().unwrap(),
            "busy:200,block:200,contend:200",
        ],
    );
    assert_eq!(p.meta.tracers, ["oncpu"]);
    assert!(p.offcpu.is_empty() && p.locks.is_empty());
    assert_samples(samples_of(&p, "vmload_busy")[&0], 200, "vmload_busy");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let hv = env!("CARGO_BIN_EXE_hvprof");
    let run = |args: &[&str]| {
        let o = Command::new(hv).args(args).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let junk = std::env::temp_dir().join(format!("hvprof-junk-{}", std::process::id()));
    std::fs::write(&junk, "not a profile").unwrap();
    let (code, err) = run(&["report", junk.to_str().unwrap(), "-o", "/tmp/x"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not an hvprof profile"), "{err}");
    std::fs::remove_file(&junk).unwrap();
    let (code, err) = run(&["record", "-p", "999999999"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no process with pid 999999999"), "{err}");
    let (code, err) = run(&["record"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("say what to record"), "{err}");
    let (code, err) = run(&["record", "--tracers", "oncpu,gpu", "-a"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown tracer \"gpu\""), "{err}");
    let (code, err) = run(&["record", "--windows", "5-3", "-a"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("runs backwards"), "{err}");
}
