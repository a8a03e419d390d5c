//! Privileged integration tests of the lock, fork and cgroup tracers
//! against the sample workload (`samples/vmload`), whose ground truth they
//! know: which lock it contends, how many forks, threads, execs and cgroup
//! operations it makes in each window. They need root and /dev/kvm, and
//! fail (not skip) without.

use std::{
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use profiler::profile::Profile;

mod common;
use common::*;

/// Who held the mmap_lock as each wait began (its `owner` word): only
/// vmload's own threads take it (`contend` makes 4 of them mmap, fault and
/// munmap), as writers (a task) or as readers (faulting threads, which the
/// kernel does not record: `[readers]`). The table names the top holder.
/// (The holders' stacks: `a_lock_wait_names_its_sleeping_holder_and_the_
/// holders_stack`, where the holder is known to sleep; here a waiter often
/// meets only running holders.)
fn assert_mmap_lock_holders(p: &Profile, row: &profiler::tables::LockRow) {
    use profiler::profile::Holder;
    let vmload_pid = p.vms[0].pid;
    let waits: Vec<_> = p
        .locks
        .iter()
        .filter(|w| format!("{:#x}", w.lock) == row.address && w.lock_type.starts_with("rwsem"))
        .collect();
    let held = |f: &dyn Fn(&Option<Holder>) -> bool| -> u64 {
        waits
            .iter()
            .filter(|w| f(&w.holder))
            .map(|w| w.total_ns)
            .sum()
    };
    let total = held(&|_| true);
    let by_vmload = held(&|h| {
        matches!(h, Some(Holder::Task { tgid, comm, .. })
            if *tgid == vmload_pid && comm.starts_with("vmload"))
    });
    let by_readers = held(&|h| matches!(h, Some(Holder::Readers)));
    let by_others = held(&|h| matches!(h, Some(Holder::Task { tgid, .. }) if *tgid != vmload_pid));
    let summary = format!(
        "{total} ns: vmload's threads {by_vmload}, readers {by_readers}, others {by_others}"
    );
    // Writers mostly wait for the faulting readers.
    assert!(by_vmload > 0 && by_readers > 0, "{summary}");
    assert!((by_vmload + by_readers) * 10 >= total * 9, "{summary}");
    assert!(by_others * 20 <= total, "{summary}");
    assert!(
        (row.holder.starts_with("vmload") || row.holder == "[readers]")
            && row.holder_share_pct > 0
            && row.holder_share_pct <= 100,
        "{row:#?}"
    );
}

/// A kernel mutex held by a thread that sleeps (`holdlock:300`): the
/// holder faults on a page userfaultfd leaves missing for 300 ms, inside
/// `pipe_write` with the pipe's mutex held, while the waiter's write to the
/// same pipe waits for it. The one wait names the holder, and the holder's
/// stack is where it sleeps: from `vmload_holdlock_hold` through the pipe
/// write into `handle_userfault`.
#[test]
fn a_lock_wait_names_its_sleeping_holder_and_the_holders_stack() {
    use profiler::profile::Holder;
    let vmload = vmload();
    // The block first: the process's unwind tables are loaded by the time
    // the holder blocks (before, its user stack would be a frame-pointer
    // walk, which skips the frame below libc's `write`).
    let (p, dir) = record(
        "holder",
        &["--", vmload.to_str().unwrap(), "block:300,holdlock:300"],
    );
    let names = |stack: &[u32]| -> Vec<String> {
        stack
            .iter()
            .map(|&f| p.frames[f as usize].clone())
            .collect()
    };
    let waits: Vec<_> = p
        .locks
        .iter()
        .filter(|w| names(&w.stack).iter().any(|f| f == "vmload_holdlock_wait"))
        .collect();
    assert_eq!(waits.iter().map(|w| w.count).sum::<u64>(), 1, "{waits:#?}");
    let w = waits[0];
    assert_eq!(w.lock_type, "mutex");
    assert!(
        (240_000_000..=350_000_000).contains(&w.total_ns),
        "waited {} ns for a 300 ms hold",
        w.total_ns
    );
    let Some(Holder::Task {
        tgid,
        pid,
        comm,
        stack,
    }) = &w.holder
    else {
        panic!("no holder: {:?}", w.holder);
    };
    assert_eq!((*tgid, comm.as_str()), (w.tgid, "vmload-holder"));
    let held = names(stack);
    for f in ["vmload_holdlock_hold", "handle_userfault_[k]"] {
        assert!(
            held.iter().any(|h| h == f),
            "{f} not in the holder's stack {held:?}"
        );
    }
    assert!(
        held.iter().any(|h| h.ends_with("pipe_write_[k]")),
        "no pipe write in the holder's stack {held:?}"
    );
    let rows = profiler::tables::locks(&p, Some(0));
    let row = rows.iter().find(|r| r.lock_type == "mutex").unwrap();
    assert_eq!(row.holders, [(format!("vmload-holder[{pid}]"), 100)]);
    let folded = std::fs::read_to_string(dir.join("w00-setup/lockhold.folded")).unwrap();
    assert!(
        folded
            .lines()
            .any(|l| l.starts_with("vmload-holder;") && l.contains("handle_userfault_[k];[lock ")),
        "{folded}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The folded wakers graph of `wakers_name_…`'s recording: blocked
/// stack, `--`, the waker's stack leaf first, the waker.
fn assert_offwake_folded(dir: &Path) {
    let folded = std::fs::read_to_string(dir.join("w00-setup/offwake.folded")).unwrap();
    assert!(
        folded.lines().any(|l| {
            let Some((blocked, waker)) = l.split_once(";--;") else {
                return false;
            };
            blocked.starts_with("vmload-ping;")
                && blocked.ends_with("pipe_read_[k]")
                && waker.starts_with("try_to_wake_up_[k];")
                && waker.contains(";vmload_pong_write;")
                && waker
                    .rsplit_once(' ')
                    .is_some_and(|(w, _)| w.ends_with(";vmload-pong"))
        }),
        "{folded}"
    );
}

/// Who woke each block (`--tracers offcpu,wakers`), on `pingpong:400`:
/// `vmload-ping` blocks 400 times in `vmload_ping_read`, each time woken
/// by `vmload-pong`'s write (`vmload_pong_write`, through the kernel's
/// pipe write); pong's 1 ms naps are woken by a timer interrupt; pong's
/// reads by ping's write. Each block's waker is that thread, with its pid
/// and stack, and the time is the block's.
#[test]
fn wakers_name_the_thread_and_the_stack_that_woke_each_block() {
    use profiler::profile::Waker;
    const N: u64 = 400;
    let vmload = vmload();
    // The block first: the process's unwind tables are loaded by the time
    // the threads start.
    let (p, dir) = record(
        "wakers",
        &[
            "--tracers",
            "offcpu,wakers",
            "--",
            vmload.to_str().unwrap(),
            "block:300,pingpong:400",
        ],
    );
    assert_no_losses(&p);
    let names = |stack: &[u32]| -> Vec<String> {
        stack
            .iter()
            .map(|&f| p.frames[f as usize].clone())
            .collect()
    };
    let has = |stack: &[u32], f: &str| names(stack).iter().any(|n| n == f);
    let pid_of = |comm: &str| {
        p.offcpu
            .iter()
            .find(|r| r.comm == comm)
            .unwrap_or_else(|| panic!("no off-CPU row of {comm}"))
            .pid
    };
    let (asker, answerer) = (pid_of("vmload-ping"), pid_of("vmload-pong"));
    // The rows of `comm`'s blocks in `func`, and which of them `waker`
    // (its comm, pid or interrupt, and a frame of its stack) woke.
    let blocks_in = |comm: &str, func: &str| -> Vec<&profiler::profile::OffWake> {
        p.offwake
            .iter()
            .filter(|r| r.comm == comm && has(&r.stack, func))
            .collect()
    };
    let sum = |rows: &[&profiler::profile::OffWake]| -> (u64, u64) {
        (
            rows.iter().map(|r| r.blocks).sum(),
            rows.iter().map(|r| r.total_ns).sum(),
        )
    };
    let woken_by_task = |rows: &[&profiler::profile::OffWake], comm: &str, pid: u32, f: &str| {
        let (ok, other): (Vec<_>, Vec<_>) = rows.iter().partition(|r| {
            matches!(&r.waker, Waker::Task { comm: c, pid: w, stack, .. }
                if c == comm && *w == pid && has(stack, f)
                    && names(stack).iter().any(|n| n.ends_with("pipe_write_[k]")))
        });
        (sum(&ok), sum(&other))
    };

    // Ping's reads: woken by pong's write, about 1 ms each (pong's nap).
    let reads = blocks_in("vmload-ping", "vmload_ping_read");
    let ((n, ns), (n_other, _)) =
        woken_by_task(&reads, "vmload-pong", answerer, "vmload_pong_write");
    assert!(
        (N * 97 / 100..=N).contains(&n) && n_other <= N / 100,
        "ping's reads: {n} woken by pong's write, {n_other} otherwise, of {N}: {reads:#?}"
    );
    assert!(
        (N * 900_000..=N * 4_000_000).contains(&ns),
        "ping's {n} reads blocked {ns} ns, each for pong's 1 ms nap"
    );
    // The same blocks as the off-CPU tracer's, but those whose waker went
    // unseen.
    let off: u64 = p
        .offcpu
        .iter()
        .filter(|r| r.pid == asker && has(&r.stack, "vmload_ping_read"))
        .map(|r| r.blocks)
        .sum();
    let unseen = p
        .meta
        .counters
        .get("off-CPU blocks whose waker was not seen")
        .copied()
        .unwrap_or(0);
    assert!(
        n + n_other <= off && off <= n + n_other + unseen,
        "{off} off-CPU blocks in vmload_ping_read, {} charged to wakers, {unseen} not",
        n + n_other
    );

    // Pong's reads, those that blocked (ping's next write can come before
    // pong reads): woken by ping's write; the last one by ping closing
    // the pipe.
    let reads = blocks_in("vmload-pong", "vmload_pong_read");
    let ((n, _), (n_other, _)) = woken_by_task(&reads, "vmload-ping", asker, "vmload_ping_write");
    assert!(
        n > 0 && n_other <= 1 + n / 100,
        "pong's reads: {n} woken by ping's write, {n_other} otherwise: {reads:#?}"
    );

    // Pong's naps: woken by the timer interrupt, whose stack starts at
    // the interrupt's entry (not in whatever it interrupted).
    let naps = blocks_in("vmload-pong", "vmload_pong_nap");
    let (timer, other): (Vec<_>, Vec<_>) = naps.iter().partition(|r| {
        matches!(&r.waker, Waker::Interrupt { stack }
            if has(stack, "hrtimer_wakeup_[k]")
                && names(stack).first().is_some_and(|f| f.starts_with("asm_")))
    });
    let ((n, ns), (n_other, _)) = (sum(&timer), sum(&other));
    assert!(
        (N * 97 / 100..=N).contains(&n) && n_other <= N / 100,
        "pong's naps: {n} woken by a timer interrupt, {n_other} otherwise: {naps:#?}"
    );
    assert!(
        (N * 900_000..=N * 4_000_000).contains(&ns),
        "pong's {n} 1 ms naps took {ns} ns"
    );

    assert_offwake_folded(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_contended_kernel_lock_shows_with_type_caller_and_window() {
    let vmload = vmload();
    // mmap_lock contention only between VM 1 and VM 2: window 1.
    let (p, dir) = record(
        "locks",
        &[
            "--window-size",
            "1",
            "--",
            vmload.to_str().unwrap(),
            "busy:200,vm,contend:800,vm,busy:200",
        ],
    );
    assert!(
        p.meta.tracers.iter().any(|t| t == "locks"),
        "{:?}",
        p.meta.tracers
    );
    let ours = |w: &profiler::profile::LockWait| {
        p.frame_names(&w.stack)
            .any(|f| f == "vmload_contend" || f.starts_with("vmload::contend"))
    };
    let windows: std::collections::BTreeSet<u32> = p
        .locks
        .iter()
        .filter(|w| ours(w))
        .map(|w| w.window)
        .collect();
    assert_eq!(
        windows.into_iter().collect::<Vec<_>>(),
        [1],
        "waits from vmload_contend"
    );
    // The mmap_lock: an rwsem, waited for by writers from the mmap path.
    let rows = profiler::tables::locks(&p, Some(1));
    let mmap_lock = rows
        .iter()
        .find(|r| {
            r.lock_type == "rwsem:W" && (r.caller.contains("mmap") || r.caller.contains("munmap"))
        })
        .unwrap_or_else(|| panic!("no rwsem:W from the mmap path in {rows:#?}"));
    assert!(mmap_lock.contentions > 0 && mmap_lock.total_ns > 0);
    assert!(mmap_lock.max_ns <= mmap_lock.total_ns && mmap_lock.mean_ns <= mmap_lock.max_ns);
    assert!(mmap_lock.p50_ns <= mmap_lock.p99_ns);
    // Readers of the same lock (page faults) are a separate row of the same lock.
    assert!(
        rows.iter()
            .any(|r| r.address == mmap_lock.address && r.lock_type == "rwsem:R")
    );
    assert_mmap_lock_holders(&p, mmap_lock);
    // The waits could not be longer than the phase that made them.
    let ours_total: u64 = p.locks.iter().filter(|w| ours(w)).map(|w| w.total_ns).sum();
    assert!(
        ours_total > 0 && ours_total < 4 * 800_000_000,
        "{ours_total}"
    );
    // Sleeping waiters woke on the other CPU and were still paired: the
    // pairing is per task, not per CPU.
    let migrated = p
        .meta
        .counters
        .get("lock waits ended on another CPU")
        .copied()
        .unwrap_or(0);
    assert!(
        migrated > 0,
        "no lock wait migrated CPUs: {:?}",
        p.meta.counters
    );
    // The same waits off-CPU: uninterruptible (D), walked at switch-out so
    // the wait primitive and the scheduler frames are there, and nothing of
    // the tracing machinery below them.
    let d_waits: Vec<Vec<&str>> = p
        .offcpu
        .iter()
        .filter(|r| r.state == "D")
        .map(|r| p.frame_names(&r.stack).collect::<Vec<_>>())
        .filter(|names| names.iter().any(|f| f.starts_with("vmload::contend")))
        .filter(|names| names.iter().any(|f| f.starts_with("rwsem_down_")))
        .collect();
    assert!(
        !d_waits.is_empty(),
        "no D-state rwsem wait of vmload::contend off-CPU"
    );
    for names in &d_waits {
        assert!(
            names.last().is_some_and(|f| f.starts_with("__schedule")),
            "kernel leaf of a D wait: {names:?}"
        );
        assert!(!names.iter().any(|f| is_tracing_frame(f)), "{names:?}");
    }
    assert_no_losses(&p);
    // Tables and the lock-wait flame graph are written.
    for f in [
        "locks.txt",
        "locks.md",
        "locks.csv",
        "locks.json",
        "w01-vms-1-1/locks.txt",
        "w01-vms-1-1/lockwait.svg",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let folded = std::fs::read_to_string(dir.join("w01-vms-1-1/lockwait.folded")).unwrap();
    // (The frame-pointer walk skips the caller of libc's frameless mmap
    // wrapper, vmload_contend, but keeps the closure above it.)
    assert!(
        folded
            .lines()
            .any(|l| l.contains("vmload::contend") && l.contains("rwsem:W]")),
        "{folded}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Anonymous (patched) memory in a process's libc text mapping: a uprobe
/// installed there copies the page it patches.
fn patched_libc_kb(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_libc_text = false;
    let mut kb = 0;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let perms = f.next().unwrap_or("");
            in_libc_text = perms == "r-xp" && line.contains("/libc.so");
        } else if in_libc_text && first == "Anonymous:" {
            kb += f.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    kb
}

/// The pid of the command hvprof runs.
fn command_pid(hv: &Child) -> u32 {
    std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", hv.id()))
        .unwrap()
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("hvprof's command")
}

/// Every libc way to fork: `fork` (5), `vfork` (3), then `pthread_create`
/// (1 thread) and `posix_spawn` (2 spawns of /bin/true) with clone3 and
/// again after a seccomp filter refuses clone3 (as QEMU's sandbox does),
/// which makes glibc fall back to clone by another path.
const FORK_PLAN: &str =
    "forks:5,vforks:3,thread:10,spawns:2,noclone3,thread:10,spawns:2,block:3000";

/// Each `(caller, syscall, count)` is a row of the fork table (the caller
/// contains the given name).
fn assert_fork_callers(p: &Profile, want: &[(&str, &str, u64)]) {
    let rows = profiler::tables::forks(p, None);
    for &(caller, syscall, n) in want {
        assert!(
            rows.iter()
                .any(|r| r.caller.contains(caller) && r.syscall == syscall && r.count == n),
            "no {n} {syscall} under {caller}: {rows:#?}"
        );
    }
}

/// Each of [`FORK_PLAN`]'s forks, under its exact caller.
fn assert_fork_plan_callers(p: &Profile) {
    assert_fork_callers(
        p,
        &[
            ("vmload::forks", "clone", 5),
            ("vmload::vforks", "vfork", 3),
            ("Thread>::new", "clone3", 1),
            ("Thread>::new", "clone", 1),
            ("Command>::spawn", "clone3", 2),
            ("Command>::spawn", "clone", 2),
        ],
    );
}

/// Fork callers come from the fork paths hvprof learns from its own libc
/// calls: no uprobe patches the target's libc (a patched mapping makes each
/// of its forks copy page tables), and the callers of `fork` (the caller's
/// return address on the stack) and `vfork` (in rdi) are exact.
#[test]
fn fork_callers_come_without_probing_libc() {
    let vmload = vmload();
    let dir = out_dir("forkpaths");
    let mut hv = start_recording(&dir, &["--", vmload.to_str().unwrap(), FORK_PLAN]);
    let target = command_pid(&hv);
    std::thread::sleep(Duration::from_millis(300));
    let target_kb = patched_libc_kb(target);
    assert!(hv.wait().unwrap().success());
    assert_eq!(target_kb, 0, "the target's libc is probed");
    let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
    assert_fork_plan_callers(&p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `-p` target whose libc is another file than hvprof's (as in a
/// container) gets the fork-caller uprobe: its libc pages are patched, and
/// its callers are exact.
#[test]
fn a_target_with_another_libc_gets_the_fork_caller_uprobe() {
    let vmload = vmload();
    let libdir = std::env::temp_dir().join(format!("hvprof-otherlibc-{}", std::process::id()));
    std::fs::create_dir_all(&libdir).unwrap();
    let ours = Path::new("/lib/x86_64-linux-gnu/libc.so.6")
        .canonicalize()
        .unwrap();
    std::fs::copy(&ours, libdir.join("libc.so.6")).unwrap();
    let spawned = Instant::now();
    let mut target = Command::new(vmload)
        .env("LD_LIBRARY_PATH", &libdir)
        .arg("block:4000,forks:5,vforks:3")
        .spawn()
        .unwrap();
    let dir = out_dir("otherlibc");
    let pid = target.id();
    let hv = start_recording(&dir, &["-p", &pid.to_string()]);
    assert!(
        spawned.elapsed() < Duration::from_millis(3900),
        "hvprof took {:?} to start; the test's timing needs < 3.9 s",
        spawned.elapsed()
    );
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let kb = patched_libc_kb(pid);
    target.wait().unwrap();
    let out = hv.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&libdir);
    assert!(out.status.success());
    assert!(
        maps.contains(&format!("{}/libc.so.6", libdir.display())),
        "{maps}"
    );
    assert!(kb > 0, "the target's libc is not probed");
    let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
    assert_fork_callers(
        &p,
        &[
            ("vmload::forks", "clone", 5),
            ("vmload::vforks", "vfork", 3),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With --fork-uprobes and `-- CMD` (or `-p`) the fork-caller uprobes are
/// installed in the target only: another process started meanwhile keeps
/// its libc pages unpatched.
#[test]
fn fork_caller_uprobes_stay_in_the_targets() {
    let vmload = vmload();
    let dir = out_dir("forkprobe-scope");
    let mut hv = start_recording(
        &dir,
        &["--fork-uprobes", "--", vmload.to_str().unwrap(), FORK_PLAN],
    );
    let target = command_pid(&hv);
    let mut other = Command::new("sleep").arg("2").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (target_kb, other_kb) = (patched_libc_kb(target), patched_libc_kb(other.id()));
    let _ = other.kill();
    let _ = other.wait();
    assert!(hv.wait().unwrap().success());
    assert!(target_kb > 0, "the target's libc is not probed");
    assert_eq!(other_kb, 0, "another process's libc is probed");
    // And the probes give the callers.
    let p = Profile::read(&dir.join("profile.hvprof")).unwrap();
    assert_fork_plan_callers(&p);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn forks_threads_and_execs_are_counted_exactly_per_window() {
    let vmload = vmload();
    // Window 1: 7 forks (glibc fork: clone). Window 2: 3 spawns of
    // /bin/true (posix_spawn: clone3 + exec) and 1 thread (clone3).
    // Flushed every 100 ms: counts stay exact across flushes.
    let (p, dir) = record(
        "forks",
        &[
            "--window-size",
            "1",
            "--flush-interval",
            "100ms",
            "--",
            vmload.to_str().unwrap(),
            "busy:50,vm,forks:7,vm,spawns:3,thread:50",
        ],
    );
    let count = |w: u32, thread: bool| -> u64 {
        p.forks
            .iter()
            .filter(|f| f.window == w && f.thread == thread && f.comm.starts_with("vmload"))
            .map(|f| f.count)
            .sum()
    };
    assert_eq!((count(1, false), count(1, true)), (7, 0), "{:#?}", p.forks);
    assert_eq!((count(2, false), count(2, true)), (3, 1), "{:#?}", p.forks);
    assert!(
        p.forks
            .iter()
            .all(|f| f.total_ns > 0 && f.max_ns <= f.total_ns)
    );
    let s1 = profiler::tables::fork_summary(&p, Some(1));
    assert_eq!(s1.children_exited, 7, "{s1:?}");
    assert!(s1.lifetime_max_ns > 0);
    let s2 = profiler::tables::fork_summary(&p, Some(2));
    assert_eq!(s2.execs, 3, "{s2:?}");
    let rows = profiler::tables::forks(&p, Some(2));
    assert!(
        rows.iter()
            .any(|r| r.creates == "thread" && r.syscall == "clone3" && r.count == 1),
        "{rows:#?}"
    );
    // The callers, through the fork paths learned from hvprof's own calls.
    let w1 = profiler::tables::forks(&p, Some(1));
    assert!(
        w1.iter()
            .any(|r| r.caller == "vmload::forks" && r.count == 7),
        "{w1:#?}"
    );
    assert!(
        rows.iter()
            .any(|r| r.caller.contains("Command>::spawn") && r.count == 3),
        "{rows:#?}"
    );
    assert!(dir.join("w01-vms-1-1/forks.txt").is_file() && dir.join("forks.csv").is_file());
    assert_no_losses(&p);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cgroup_operations_are_counted_exactly_per_window_and_path() {
    let vmload = vmload();
    // Window 1: 4 rounds of mkdir/attach/attach back/rmdir under a parent.
    let (p, dir) = record(
        "cgroups",
        &[
            "--window-size",
            "1",
            "--flush-interval",
            "100ms",
            "--",
            vmload.to_str().unwrap(),
            "busy:50,vm,cgroups:4,vm,busy:50",
        ],
    );
    let rows = profiler::tables::cgroups(&p, Some(1));
    let count = |op: &str, path: &str| -> u64 {
        rows.iter()
            .filter(|r| r.op == op && r.path == path && r.hierarchy == "v2")
            .map(|r| r.count)
            .sum()
    };
    assert_eq!(count("mkdir", "/hvprof-vmload-*/cg-*"), 4, "{rows:#?}");
    assert_eq!(count("attach", "/hvprof-vmload-*/cg-*"), 4, "{rows:#?}");
    assert_eq!(count("rmdir", "/hvprof-vmload-*/cg-*"), 4, "{rows:#?}");
    assert_eq!(count("mkdir", "/hvprof-vmload-*"), 1, "{rows:#?}");
    assert_eq!(count("rmdir", "/hvprof-vmload-*"), 1, "{rows:#?}");
    assert_eq!(count("attach", "/"), 4, "{rows:#?}");
    // The v1 memory hierarchy (mounted here next to v2), named by controller.
    let v1 = |op: &str| -> u64 {
        rows.iter()
            .filter(|r| {
                r.op == op && r.hierarchy == "memory" && r.path.ends_with("/hvprof-vmload-*/cg-*")
            })
            .map(|r| r.count)
            .sum()
    };
    assert_eq!(
        (v1("mkdir"), v1("attach"), v1("rmdir")),
        (4, 4, 4),
        "{rows:#?}"
    );
    // mkdir and rmdir are timed in their system calls; attaches (writes to
    // cgroup.procs) are counted only, unless --time-cgroup-writes.
    for r in &rows {
        if r.op == "attach" {
            assert_eq!(r.timed, 0, "{r:?}");
        } else {
            assert!(
                r.timed == r.count && r.total_ns > 0 && r.max_ns <= r.total_ns,
                "{r:?}"
            );
        }
    }
    assert!(
        profiler::tables::cgroups(&p, Some(0)).is_empty()
            && profiler::tables::cgroups(&p, Some(2)).is_empty()
    );
    assert!(dir.join("w01-vms-1-1/cgroups.csv").is_file());
    assert_no_losses(&p);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cgroup_attaches_are_timed_when_asked() {
    let vmload = vmload();
    let (p, dir) = record(
        "cgwrites",
        &[
            "--time-cgroup-writes",
            "--",
            vmload.to_str().unwrap(),
            "cgroups:3",
        ],
    );
    let rows = profiler::tables::cgroups(&p, Some(0));
    let attach: Vec<_> = rows
        .iter()
        .filter(|r| r.op == "attach" && r.hierarchy == "v2" && r.path == "/hvprof-vmload-*/cg-*")
        .collect();
    assert_eq!(attach.len(), 1, "{rows:#?}");
    assert_eq!((attach[0].count, attach[0].timed), (3, 3));
    assert!(attach[0].total_ns > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The timed system calls move from the dispatch on `raw_syscalls` to the
/// calls' own tracepoints while the workload makes them without a pause
/// (`--syscall-dispatch-for 300ms`; the move itself waits for the twins'
/// verification): every VM creation (`ioctl`), fork and cgroup mkdir/rmdir
/// is counted once and timed, none lost or counted twice by the two, and
/// some of each kind fall on each side of the move.
#[test]
fn system_calls_are_counted_exactly_across_the_move_to_their_own_tracepoints() {
    const ROUNDS: usize = 60;
    let vmload = vmload();
    let plan = vec!["vm,forks:2,cgroups:1,busy:20"; ROUNDS].join(",");
    let (p, dir) = record(
        "syscall-move",
        &[
            "--tracers",
            "fork,cgroup",
            "--window-size",
            "1000",
            "--syscall-dispatch-for",
            "300ms",
            "--",
            vmload.to_str().unwrap(),
            &plan,
        ],
    );
    let moved_ms = p
        .meta
        .counters
        .get("system calls timed on their own tracepoints from: ms")
        .copied();
    let moved_at_ns = moved_ms.expect("the calls moved to their own tracepoints") * 1_000_000;
    let vms = p
        .vms
        .iter()
        .filter(|v| v.comm.starts_with("vmload"))
        .count();
    let before = p
        .vms
        .iter()
        .filter(|v| v.comm.starts_with("vmload") && v.time_ns < moved_at_ns)
        .count();
    let report = format!(
        "moved at {moved_ms:?} ms; {vms} VMs, {before} before the move; forks {:#?}; \
         cgroups {:#?}",
        p.forks, p.cgroups
    );
    assert_eq!(vms, ROUNDS, "{report}");
    assert!(before > 0 && before < ROUNDS, "{report}");
    let forks: u64 = p
        .forks
        .iter()
        .filter(|f| f.comm.starts_with("vmload") && !f.thread)
        .map(|f| f.count)
        .sum();
    assert_eq!(forks, 2 * ROUNDS as u64, "{report}");
    assert!(p.forks.iter().all(|f| f.total_ns > 0), "{report}");
    let rows = profiler::tables::cgroups(&p, None);
    let timed = |op: &str| -> (u64, u64) {
        rows.iter()
            .filter(|r| r.op == op && r.path == "/hvprof-vmload-*/cg-*" && r.hierarchy == "v2")
            .fold((0, 0), |(c, t), r| (c + r.count, t + r.timed))
    };
    for op in ["mkdir", "rmdir"] {
        assert_eq!(timed(op), (ROUNDS as u64, ROUNDS as u64), "{op}: {report}");
    }
    assert_no_losses(&p);
    let _ = std::fs::remove_dir_all(&dir);
}
