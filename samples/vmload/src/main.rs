//! vmload: a workload whose ground truth hvprof's tests know.
//!
//! It runs a plan of steps, e.g.
//! `vmload busy:200,vm,busy:300,block:200,vm,child:100,vm`:
//!
//! - `vm` — create one VM with `KVM_CREATE_VM` on `/dev/kvm` (then close it);
//! - `busy:MS` — burn CPU for MS ms in `vmload_busy`;
//! - `block:MS` — sleep MS ms in `vmload_block` (off-CPU, state S);
//! - `child:MS` — fork a child that burns MS ms in `vmload_child_busy`, and
//!   wait for it (a fork helper that never execs);
//! - `spawn:MS` — run this binary again as an exec'd helper that burns MS ms
//!   in `vmload_spawned_busy`, and wait for it;
//! - `thread:MS` — a thread that burns MS ms in `vmload_thread_busy`.
//!
//! - `contend:MS` — 4 threads mmap, touch and munmap memory in one address
//!   space for MS ms in `vmload_contend`: the kernel's mmap_lock (an rwsem)
//!   is contended on purpose.
//!
//! - `readlocks:MS` — the same `read(2)` waits for the mmap_lock by two
//!   kernel paths for MS ms: one thread reads `/proc/self/cmdline` (which
//!   read-locks the address space), one reads `/dev/zero` into a fresh
//!   mapping (the copy faults, and the fault read-locks it), while two
//!   threads of `contend` write-lock it.
//!
//! - `holdlock:MS` — a kernel mutex held by a sleeping thread: `vmload-holder`
//!   writes to a pipe from a page that userfaultfd leaves missing, so it
//!   faults inside `pipe_write` holding the pipe's mutex and sleeps until
//!   a handler fills the page MS ms later; meanwhile `vmload-waiter`
//!   writes to the same pipe (`vmload_holdlock_wait`) and waits about MS
//!   ms for the mutex. Needs root (userfaultfd of kernel faults).
//!
//! - `crowd:MS` — 3 threads (`vmload-crowd`) on one CPU, each burning in
//!   `vmload_crowd_busy` until MS ms have passed: each runs about a third
//!   of the time and waits for the CPU the rest, about 2·MS ms of
//!   run-queue wait in all. Prints the kernel's count of it (the growth of
//!   each thread's `/proc/thread-self/schedstat` run delay), as
//!   `vmload: crowd run-queue wait NS ns`.
//!
//! - `cgroups:N` — under the cgroup v2 mount (and the v1 `memory`
//!   hierarchy, where mounted), make `hvprof-vmload-PID/`, then N times:
//!   mkdir `cg-I`, move itself in (write to `cgroup.procs`), move back,
//!   rmdir; then remove the parent: per hierarchy N+1 mkdirs, 2N attaches
//!   (one per thread moved: run it single-threaded), N+1 rmdirs.
//!
//! Fixed-work steps, for benchmarks (their wall time grows with overhead):
//!
//! - `work:N` — N million rounds of arithmetic in `vmload_work`;
//! - `forks:N` — N forks of a child that exits at once, each waited for;
//! - `vforks:N` — the same with `vfork`;
//! - `noclone3` — from here on `clone3` fails with ENOSYS, as under QEMU's
//!   seccomp sandbox: glibc's `pthread_create` and `posix_spawn` fall back
//!   to `clone`, by another path through libc;
//! - `spawns:N` — N runs of `/bin/true`;
//! - `switches:N` — N round trips between two threads over pipes (2N
//!   context switches).
//!
//! - `sleeper:MS` — a thread (`vmload-sleeper`) that sleeps MS ms in
//!   `vmload_sleeper_nap` while the next steps run (VMs created meanwhile
//!   move the windows under it); joined after the last step.
//!
//! - `pingpong:N` — N round trips between threads `vmload-ping` and
//!   `vmload-pong` over two pipes. Ping writes a byte
//!   (`vmload_ping_write`) and blocks reading the answer
//!   (`vmload_ping_read`); pong, woken by that write in its read
//!   (`vmload_pong_read`), sleeps 1 ms (`vmload_pong_nap`, woken by a
//!   timer interrupt) and answers (`vmload_pong_write`), which wakes ping.
//!   So ping blocks N times, about 1 ms each, each woken by pong's write;
//!   pong's naps are N blocks of about 1 ms woken by an interrupt. Prints
//!   `vmload: pingpong ping TID pong TID`.
//!
//! - `twofds:N` — N one-byte reads at one call site (`vmload_twofds_read`),
//!   two from a pipe, two from a unix socket, and so on; a helper thread
//!   writes each byte 1 ms after it sees the read asleep, so every read
//!   blocks (state S) exactly once, for about 1 ms: one user site over two
//!   kernel paths, N/2 blocks each.
//!
//! Every step is a named, never-inlined function, so a test knows which
//! window each stack belongs in and how much time it must show.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

/// `KVM_CREATE_VM`, `_IO(KVMIO, 0x01)`.
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Vm,
    Busy(u64),
    Block(u64),
    Child(u64),
    Spawn(u64),
    Thread(u64),
    Work(u64),
    Contend(u64),
    ReadLocks(u64),
    HoldLock(u64),
    Crowd(u64),
    Cgroups(u64),
    Forks(u64),
    Vforks(u64),
    NoClone3,
    Spawns(u64),
    Switches(u64),
    PingPong(u64),
    Sleeper(u64),
    TwoFds(u64),
}

fn parse(plan: &str) -> Result<Vec<Step>, String> {
    plan.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s == "vm" {
                return Ok(Step::Vm);
            }
            if s == "noclone3" {
                return Ok(Step::NoClone3);
            }
            let (name, ms) = s
                .split_once(':')
                .ok_or_else(|| format!("step {s:?}: expected vm or NAME:MS"))?;
            let ms: u64 = ms
                .parse()
                .map_err(|_| format!("step {s:?}: {ms:?} is not a number of ms"))?;
            match name {
                "busy" => Ok(Step::Busy(ms)),
                "block" => Ok(Step::Block(ms)),
                "child" => Ok(Step::Child(ms)),
                "spawn" => Ok(Step::Spawn(ms)),
                "thread" => Ok(Step::Thread(ms)),
                "work" => Ok(Step::Work(ms)),
                "contend" => Ok(Step::Contend(ms)),
                "readlocks" => Ok(Step::ReadLocks(ms)),
                "holdlock" => Ok(Step::HoldLock(ms)),
                "crowd" => Ok(Step::Crowd(ms)),
                "cgroups" => Ok(Step::Cgroups(ms)),
                "forks" => Ok(Step::Forks(ms)),
                "vforks" => Ok(Step::Vforks(ms)),
                "spawns" => Ok(Step::Spawns(ms)),
                "switches" => Ok(Step::Switches(ms)),
                "pingpong" => Ok(Step::PingPong(ms)),
                "sleeper" => Ok(Step::Sleeper(ms)),
                "twofds" => Ok(Step::TwoFds(ms)),
                _ => Err(format!("step {s:?}: unknown step {name:?}")),
            }
        })
        .collect()
}

/// Burns CPU until `ms` have passed. The clock is read rarely so that
/// nearly every sample lands in this function's own code.
#[inline(never)]
fn burn(ms: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    loop {
        for _ in 0..200_000 {
            x = black_box(x.rotate_left(7) ^ x.wrapping_mul(0x2545_f491_4f6c_dd1d));
        }
        if Instant::now() >= deadline {
            return x;
        }
    }
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_busy(ms: u64) -> u64 {
    black_box(burn(ms))
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_child_busy(ms: u64) -> u64 {
    black_box(burn(ms))
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_spawned_busy(ms: u64) -> u64 {
    black_box(burn(ms))
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_thread_busy(ms: u64) -> u64 {
    black_box(burn(ms))
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_work(millions: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..millions * 1_000_000 {
        x = black_box(x.rotate_left(7) ^ x.wrapping_mul(0x2545_f491_4f6c_dd1d));
    }
    x
}

/// mmap, touch, munmap until `ms` have passed: page faults take the
/// mmap_lock for reading, mmap and munmap take it for writing.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_contend(ms: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut rounds = 0;
    while Instant::now() < deadline {
        with_fresh_mapping(256 * 1024, |bytes| {
            for off in (0..bytes.len()).step_by(4096) {
                // SAFETY: inside the mapping.
                unsafe { bytes.as_mut_ptr().add(off).write_volatile(1) };
            }
        });
        rounds += 1;
    }
    rounds
}

/// Maps `len` bytes of fresh anonymous memory (taking the mmap_lock for
/// writing), hands them to `f`, and unmaps them (again).
fn with_fresh_mapping(len: usize, f: impl FnOnce(&mut [u8])) {
    // SAFETY: an anonymous private mapping, only used within its length
    // while it exists.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return;
        }
        f(std::slice::from_raw_parts_mut(p.cast::<u8>(), len));
        libc::munmap(p, len);
    }
}

/// Reads `/proc/self/cmdline` for `ms` ms (each read locks the mmap_lock
/// for reading in `__access_remote_vm`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_read_cmdline(ms: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut rounds = 0;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        if let Ok(mut f) = std::fs::File::open("/proc/self/cmdline") {
            let _ = std::io::Read::read(&mut f, &mut buf);
        }
        rounds += 1;
    }
    rounds
}

/// Reads `/dev/zero` into a fresh anonymous mapping for `ms` ms: the copy
/// to it faults, and the first fault of a new mapping takes the mmap_lock
/// for reading, inside `read(2)`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_read_fault(ms: u64) -> u64 {
    let Ok(mut zero) = std::fs::File::open("/dev/zero") else {
        return 0;
    };
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut rounds = 0;
    while Instant::now() < deadline {
        with_fresh_mapping(64 * 1024, |buf| {
            let _ = std::io::Read::read(&mut zero, buf);
        });
        rounds += 1;
    }
    rounds
}

fn readlocks(ms: u64) -> Result<(), String> {
    let jobs: [(&str, extern "C" fn(u64) -> u64); 4] = [
        ("vmload-mm0", vmload_contend),
        ("vmload-mm1", vmload_contend),
        ("vmload-cmdline", vmload_read_cmdline),
        ("vmload-rdfault", vmload_read_fault),
    ];
    let threads: Vec<_> = jobs
        .into_iter()
        .map(|(name, job)| {
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || job(ms))
                .map_err(|e| format!("thread: {e}"))
        })
        .collect::<Result<_, _>>()?;
    for t in threads {
        t.join()
            .map_err(|_| "readlocks thread panicked".to_owned())?;
    }
    Ok(())
}

fn contend(ms: u64) -> Result<(), String> {
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::Builder::new()
                .name(format!("vmload-mm{i}"))
                .spawn(move || vmload_contend(ms))
                .map_err(|e| format!("thread: {e}"))
        })
        .collect::<Result<_, _>>()?;
    for t in threads {
        t.join().map_err(|_| "contend thread panicked".to_owned())?;
    }
    Ok(())
}

/// userfaultfd's ioctls and their arguments (`linux/userfaultfd.h`).
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// The holder: a write to the pipe from the missing page, which faults
/// with the pipe's mutex held.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_holdlock_hold(fd: i32, page: u64) -> isize {
    // SAFETY: page is a mapping of one page (its contents come from the
    // handler).
    let n = unsafe { libc::write(fd, page as *const libc::c_void, 16) };
    // Not a tail call: this function stays on the stack.
    black_box(n)
}

/// The waiter: a write to the same pipe, which waits for its mutex.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_holdlock_wait(fd: i32) -> isize {
    // SAFETY: writes one byte of a static.
    let n = unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    black_box(n)
}

fn holdlock(ms: u64) -> Result<(), String> {
    const PAGE: usize = 4096;
    // SAFETY: plain system calls on descriptors and a mapping this
    // function owns; the structures are the kernel's layouts.
    unsafe {
        let uffd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC);
        let uffd = i32::try_from(uffd)
            .ok()
            .filter(|&fd| fd >= 0)
            .ok_or_else(|| os_err("userfaultfd"))?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        if libc::ioctl(uffd, UFFDIO_API, &raw mut api) != 0 {
            return Err(os_err("UFFDIO_API"));
        }
        let page = libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if page == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        let mut reg = UffdioRegister {
            start: page as u64,
            len: PAGE as u64,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        if libc::ioctl(uffd, UFFDIO_REGISTER, &raw mut reg) != 0 {
            return Err(os_err("UFFDIO_REGISTER"));
        }
        let mut fds = [0; 2];
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return Err(os_err("pipe"));
        }
        let (rd, wr) = (fds[0], fds[1]);
        let addr = page as u64;
        let holder = std::thread::Builder::new()
            .name("vmload-holder".to_owned())
            .spawn(move || vmload_holdlock_hold(wr, addr))
            .map_err(|e| format!("thread: {e}"))?;
        // The holder's fault: it now sleeps with the pipe's mutex held.
        let mut msg = [0u8; 32];
        if libc::read(uffd, msg.as_mut_ptr().cast(), msg.len()) != 32 {
            return Err(os_err("reading the userfaultfd"));
        }
        let waiter = std::thread::Builder::new()
            .name("vmload-waiter".to_owned())
            .spawn(move || vmload_holdlock_wait(wr))
            .map_err(|e| format!("thread: {e}"))?;
        std::thread::sleep(Duration::from_millis(ms));
        let src = [b'h'; PAGE];
        let mut copy = UffdioCopy {
            dst: addr,
            src: src.as_ptr() as u64,
            len: PAGE as u64,
            mode: 0,
            copy: 0,
        };
        if libc::ioctl(uffd, UFFDIO_COPY, &raw mut copy) != 0 {
            return Err(os_err("UFFDIO_COPY"));
        }
        let (h, w) = (holder.join(), waiter.join());
        if h.map_or(true, |n| n != 16) || w.map_or(true, |n| n != 1) {
            return Err("holdlock: a write to the pipe failed".to_owned());
        }
        libc::close(rd);
        libc::close(wr);
        libc::close(uffd);
        libc::munmap(page, PAGE);
    }
    Ok(())
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_crowd_busy(ms: u64) -> u64 {
    black_box(burn(ms))
}

/// This thread's total run-queue wait so far, in ns (the kernel's
/// `sched_info.run_delay`).
fn own_run_delay() -> Result<u64, String> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat")
        .map_err(|e| format!("/proc/thread-self/schedstat: {e}"))?;
    s.split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| format!("/proc/thread-self/schedstat: unexpected {s:?}"))
}

fn crowd(ms: u64) -> Result<(), String> {
    const THREADS: usize = 3;
    // SAFETY: no arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    let cpu = usize::try_from(cpu).map_err(|_| "sched_getcpu failed".to_owned())?;
    let start = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let start = std::sync::Arc::clone(&start);
            std::thread::Builder::new()
                .name("vmload-crowd".to_owned())
                .spawn(move || {
                    // SAFETY: a zeroed cpu_set_t with one CPU set, for
                    // this thread (0).
                    let pinned = unsafe {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(cpu, &mut set);
                        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set)
                    };
                    if pinned != 0 {
                        return Err(format!(
                            "sched_setaffinity: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                    start.wait();
                    let before = own_run_delay()?;
                    vmload_crowd_busy(ms);
                    Ok(own_run_delay()? - before)
                })
                .map_err(|e| format!("thread: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut waited = 0;
    for t in threads {
        waited += t.join().map_err(|_| "crowd thread panicked".to_owned())??;
    }
    eprintln!("vmload: crowd run-queue wait {waited} ns");
    Ok(())
}

/// The cgroup v2 mount point.
fn cgroup2_mount() -> Result<std::path::PathBuf, String> {
    let mounts =
        std::fs::read_to_string("/proc/mounts").map_err(|e| format!("/proc/mounts: {e}"))?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == "cgroup2").then(|| std::path::PathBuf::from(dir))
        })
        .ok_or_else(|| "no cgroup2 mount".to_owned())
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_cgroups(n: u64) -> u64 {
    match cgroups(n) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vmload: cgroups: {e}");
            1
        }
    }
}

/// Runs the cgroup rounds in the v2 hierarchy and, where one is mounted, in
/// the v1 `memory` hierarchy.
fn cgroups(n: u64) -> Result<(), String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let v2_home = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 line in /proc/self/cgroup")?;
    cgroup_rounds(&cgroup2_mount()?, v2_home, n)?;
    if let Some(mem) = cgroup1_mount("memory") {
        let home = own
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
                ctrls.split(',').any(|c| c == "memory").then_some(path)
            })
            .ok_or("no memory line in /proc/self/cgroup")?;
        cgroup_rounds(&mem, home, n)?;
    }
    Ok(())
}

/// The mount point of the v1 hierarchy with this controller.
fn cgroup1_mount(controller: &str) -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
        (ty == "cgroup" && opts.split(',').any(|o| o == controller))
            .then(|| std::path::PathBuf::from(dir))
    })
}

fn cgroup_rounds(root: &std::path::Path, own: &str, n: u64) -> Result<(), String> {
    let home = root.join(own.trim_start_matches('/'));
    let parent = root.join(format!("hvprof-vmload-{}", std::process::id()));
    let pid = std::process::id().to_string();
    let io =
        |what: &str, p: &std::path::Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    std::fs::create_dir(&parent).map_err(|e| io("mkdir", &parent, e))?;
    let result = (|| {
        for i in 0..n {
            let cg = parent.join(format!("cg-{i}"));
            std::fs::create_dir(&cg).map_err(|e| io("mkdir", &cg, e))?;
            let moved = std::fs::write(cg.join("cgroup.procs"), &pid)
                .map_err(|e| io("attach to", &cg, e))
                .and_then(|()| {
                    std::fs::write(home.join("cgroup.procs"), &pid)
                        .map_err(|e| io("attach to", &home, e))
                });
            std::fs::remove_dir(&cg).map_err(|e| io("rmdir", &cg, e))?;
            moved?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::write(home.join("cgroup.procs"), &pid);
    }
    std::fs::remove_dir(&parent).map_err(|e| io("rmdir", &parent, e))?;
    result
}

unsafe extern "C" {
    // libc's declaration is deprecated (Rust cannot describe a function
    // that returns twice); the child here only calls `_exit`.
    fn vfork() -> libc::pid_t;
}

/// `n` children made by `fork`, each exiting at once and waited for.
/// Inlined, so that the call is in the named step function (its caller in
/// the fork table).
#[expect(clippy::inline_always, reason = "the call must be in the step")]
#[inline(always)]
fn fork_each(
    n: u64,
    name: &str,
    fork: unsafe extern "C" fn() -> libc::pid_t,
) -> Result<(), String> {
    for _ in 0..n {
        // SAFETY: the child only _exits, touching nothing of the parent's
        // (which vfork's child shares).
        let pid = unsafe { fork() };
        if pid < 0 {
            return Err(format!(
                "{name} failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        if pid == 0 {
            // SAFETY: leave the child at once.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
    }
    Ok(())
}

#[inline(never)]
fn forks(n: u64) -> Result<(), String> {
    fork_each(n, "fork", libc::fork)
}

#[inline(never)]
fn vforks(n: u64) -> Result<(), String> {
    fork_each(n, "vfork", vfork)
}

/// Installs a seccomp filter answering `clone3` with ENOSYS (threads
/// created from here on inherit it).
fn deny_clone3() -> Result<(), String> {
    // The classic BPF opcodes, all below 0x100.
    #[expect(clippy::cast_possible_truncation, reason = "opcodes fit in u16")]
    const fn op(code: u32) -> u16 {
        code as u16
    }
    const fn stmt(code: u32, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: op(code),
            jt: 0,
            jf: 0,
            k,
        }
    }
    const CLONE3: u32 = 435;
    let mut filter = [
        // The syscall number: offset 0 of struct seccomp_data.
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        libc::sock_filter {
            code: op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K),
            jt: 0,
            jf: 1,
            k: CLONE3,
        },
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS.unsigned_abs(),
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: 4,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: a valid filter program, for this thread and its future
    // threads.
    let ok = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &raw const prog,
            ) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(format!("seccomp: {}", std::io::Error::last_os_error()))
    }
}

fn switches(n: u64) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    let (mut a_rx, mut b_tx) = std::io::pipe().map_err(|e| e.to_string())?;
    let (mut b_rx, mut a_tx) = std::io::pipe().map_err(|e| e.to_string())?;
    let echo = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        while a_rx.read_exact(&mut b).is_ok() {
            if a_tx.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut byte = [0u8; 1];
    for _ in 0..n {
        b_tx.write_all(&byte).map_err(|e| e.to_string())?;
        b_rx.read_exact(&mut byte).map_err(|e| e.to_string())?;
    }
    drop(b_tx);
    echo.join().map_err(|_| "echo thread panicked".to_owned())
}

/// One sleep of `ms` ms, in a thread of its own.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_sleeper_nap(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
    black_box(());
}

/// One byte written to `fd` (whose reader it wakes).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_ping_write(fd: libc::c_int) -> isize {
    black_box(write_byte(fd))
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_ping_read(fd: libc::c_int) -> isize {
    black_box(read_byte(fd))
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_pong_read(fd: libc::c_int) -> isize {
    black_box(read_byte(fd))
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_pong_nap() {
    std::thread::sleep(Duration::from_millis(1));
    black_box(());
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_pong_write(fd: libc::c_int) -> isize {
    black_box(write_byte(fd))
}

#[inline(never)]
fn write_byte(fd: libc::c_int) -> isize {
    let b = 1u8;
    // SAFETY: a one-byte buffer.
    black_box(unsafe { libc::write(black_box(fd), (&raw const b).cast(), 1) })
}

/// The kernel's id of the calling thread.
fn gettid() -> i64 {
    // SAFETY: no arguments.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

fn ping_pong(n: u64) -> Result<(), String> {
    let mut requests = [0; 2];
    let mut answers = [0; 2];
    // SAFETY: arrays of two fds.
    if unsafe { libc::pipe(requests.as_mut_ptr()) != 0 || libc::pipe(answers.as_mut_ptr()) != 0 } {
        return Err(format!("pingpong: {}", std::io::Error::last_os_error()));
    }
    let answerer = std::thread::Builder::new()
        .name("vmload-pong".to_owned())
        .spawn(move || {
            let tid = gettid();
            while vmload_pong_read(requests[0]) == 1 {
                vmload_pong_nap();
                if vmload_pong_write(answers[1]) != 1 {
                    break;
                }
            }
            tid
        })
        .map_err(|e| e.to_string())?;
    let asker = std::thread::Builder::new()
        .name("vmload-ping".to_owned())
        .spawn(move || {
            for _ in 0..n {
                if vmload_ping_write(requests[1]) != 1 || vmload_ping_read(answers[0]) != 1 {
                    return Err(format!("pingpong: {}", std::io::Error::last_os_error()));
                }
            }
            // SAFETY: pong's end of the pipe: its read returns 0 and it ends.
            unsafe { libc::close(requests[1]) };
            Ok(gettid())
        })
        .map_err(|e| e.to_string())?;
    let asker = asker.join().map_err(|_| "ping panicked".to_owned())??;
    let answerer = answerer.join().map_err(|_| "pong panicked".to_owned())?;
    // SAFETY: the other ends, unused now.
    unsafe {
        libc::close(requests[0]);
        libc::close(answers[0]);
        libc::close(answers[1]);
    }
    println!("vmload: pingpong ping {asker} pong {answerer}");
    Ok(())
}

/// libc's read is a leaf without a frame, so a frame-pointer walk skips
/// its direct caller: that is this helper, and `vmload_twofds_read` above
/// it stays visible.
#[inline(never)]
fn read_byte(fd: libc::c_int) -> isize {
    let mut b = 0u8;
    // SAFETY: a one-byte buffer.
    black_box(unsafe { libc::read(black_box(fd), (&raw mut b).cast(), 1) })
}

/// One blocking read of one byte: the same user call site for every fd.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_twofds_read(fd: libc::c_int) -> isize {
    black_box(read_byte(fd))
}

fn two_fds(n: u64) -> Result<(), String> {
    let mut pipe = [0; 2];
    let mut sock = [0; 2];
    // SAFETY: arrays of two fds.
    unsafe {
        if libc::pipe(pipe.as_mut_ptr()) != 0
            || libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sock.as_mut_ptr()) != 0
        {
            return Err(format!("twofds: {}", std::io::Error::last_os_error()));
        }
    }
    // Reads 0 and 1 from the pipe, 2 and 3 from the socket, ...
    let which = |i: u64| (i / 2) % 2;
    let (pipe_w, sock_w) = (pipe[1], sock[1]);
    // The reader announces read i as i + 1; the writer waits until that
    // read is asleep in the kernel, so every read blocks exactly once
    // however late the reader is scheduled.
    let started = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // SAFETY: no arguments.
    let reader = unsafe { libc::gettid() };
    let announced = std::sync::Arc::clone(&started);
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            wait_until_asleep_in_read(reader, &announced, i + 1)?;
            sleep_in_kernel(1);
            let fd = if which(i) == 0 { pipe_w } else { sock_w };
            // SAFETY: one byte from a valid buffer.
            if unsafe { libc::write(fd, c"x".as_ptr().cast(), 1) } != 1 {
                return Err(std::io::Error::last_os_error().to_string());
            }
        }
        Ok(())
    });
    for i in 0..n {
        let fd = if which(i) == 0 { pipe[0] } else { sock[0] };
        started.store(i + 1, std::sync::atomic::Ordering::SeqCst);
        if vmload_twofds_read(fd) != 1 {
            return Err(format!("twofds: read: {}", std::io::Error::last_os_error()));
        }
    }
    let r = writer
        .join()
        .map_err(|_| "twofds: the writer panicked".to_owned())?;
    for fd in pipe.into_iter().chain(sock) {
        // SAFETY: fds this function opened.
        unsafe { libc::close(fd) };
    }
    r
}

/// Waits until thread `tid` has announced read `seq` and sleeps in it:
/// `/proc/.../syscall` names the syscall only of a task that is off-CPU in
/// a sleeping state (a running or waking one reads as `running`), and
/// `read` is syscall 0. The announcement tells this read from the last.
fn wait_until_asleep_in_read(
    tid: libc::pid_t,
    announced: &std::sync::atomic::AtomicU64,
    seq: u64,
) -> Result<(), String> {
    let path = format!("/proc/self/task/{tid}/syscall");
    loop {
        if announced.load(std::sync::atomic::Ordering::SeqCst) == seq {
            let s = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
            if s.split_whitespace().next() == Some("0") {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// The libc sleep is a leaf without a frame, so a frame-pointer walk skips
/// its direct caller: that caller is this helper, and `vmload_block` above
/// it stays visible.
#[inline(never)]
fn sleep_in_kernel(ms: u64) {
    let mut ts = libc::timespec {
        tv_sec: libc::time_t::try_from(ms / 1000).unwrap_or(0),
        tv_nsec: libc::c_long::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    };
    // Restart after a signal, for the remaining time.
    loop {
        let mut rem = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid timespec pointers.
        let r = unsafe { libc::nanosleep(&raw const ts, &raw mut rem) };
        if r == 0 {
            return;
        }
        ts = rem;
    }
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_block(ms: u64) {
    sleep_in_kernel(black_box(ms));
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vmload_create_vm(kvm: libc::c_int) -> libc::c_int {
    // SAFETY: KVM_CREATE_VM takes the machine type (0) as its argument.
    unsafe { libc::ioctl(kvm, KVM_CREATE_VM, 0) }
}

fn open_kvm() -> Result<libc::c_int, String> {
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "cannot open /dev/kvm: {} (load kvm_intel/kvm_amd, run as root)",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

fn run(steps: &[Step]) -> Result<(), String> {
    let mut kvm = None;
    let mut vms = 0;
    let mut sleepers = Vec::new();
    let start = Instant::now();
    for &step in steps {
        match step {
            Step::Vm => {
                let fd = match kvm {
                    Some(fd) => fd,
                    None => *kvm.insert(open_kvm()?),
                };
                vms += 1;
                create_vm(fd, vms, start)?;
            }
            Step::Busy(ms) => {
                vmload_busy(ms);
            }
            Step::Block(ms) => vmload_block(ms),
            Step::Child(ms) => {
                // SAFETY: the child only burns CPU and _exits.
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    return Err(format!("fork failed: {}", std::io::Error::last_os_error()));
                }
                if pid == 0 {
                    vmload_child_busy(ms);
                    // SAFETY: leave the child without running the parent's
                    // exit handlers.
                    unsafe { libc::_exit(0) };
                }
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &raw mut status, 0) };
            }
            Step::Spawn(ms) => {
                let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
                let status = std::process::Command::new(exe)
                    .arg("--spawned-busy")
                    .arg(ms.to_string())
                    .status()
                    .map_err(|e| format!("spawn: {e}"))?;
                if !status.success() {
                    return Err(format!("spawned helper failed: {status}"));
                }
            }
            Step::Work(n) => {
                vmload_work(n);
            }
            Step::Forks(n) => forks(n)?,
            Step::Vforks(n) => vforks(n)?,
            Step::NoClone3 => deny_clone3()?,
            Step::Contend(ms) => contend(ms)?,
            Step::ReadLocks(ms) => readlocks(ms)?,
            Step::HoldLock(ms) => holdlock(ms)?,
            Step::Crowd(ms) => crowd(ms)?,
            Step::Cgroups(n) => {
                if vmload_cgroups(n) != 0 {
                    return Err("the cgroups step failed".to_owned());
                }
            }
            Step::Spawns(n) => {
                for _ in 0..n {
                    let st = std::process::Command::new("/bin/true")
                        .status()
                        .map_err(|e| format!("/bin/true: {e}"))?;
                    if !st.success() {
                        return Err(format!("/bin/true: {st}"));
                    }
                }
            }
            Step::Switches(n) => switches(n)?,
            Step::PingPong(n) => ping_pong(n)?,
            Step::Sleeper(ms) => {
                sleepers.push(named_thread("vmload-sleeper", move || {
                    vmload_sleeper_nap(ms);
                })?);
            }
            Step::TwoFds(n) => two_fds(n)?,
            Step::Thread(ms) => {
                named_thread("vmload-worker", move || vmload_thread_busy(ms))?
                    .join()
                    .map_err(|_| "thread panicked".to_owned())?;
            }
        }
    }
    for t in sleepers {
        t.join().map_err(|_| "sleeper panicked".to_owned())?;
    }
    if let Some(fd) = kvm {
        // SAFETY: our own fd.
        unsafe { libc::close(fd) };
    }
    eprintln!("vmload: done in {:.6}s", start.elapsed().as_secs_f64());
    eprintln!("vmload: cpu {:.6}s", cpu_seconds());
    Ok(())
}

/// VM number `n`, created and closed at once.
fn create_vm(kvm: libc::c_int, n: u64, start: Instant) -> Result<(), String> {
    let vm = vmload_create_vm(kvm);
    if vm < 0 {
        return Err(format!(
            "KVM_CREATE_VM failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: vm is the fd KVM_CREATE_VM returned.
    unsafe { libc::close(vm) };
    eprintln!(
        "vmload: {:>8.3}s VM {n} created",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A thread named `name` running `f`.
fn named_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, String> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .map_err(|e| format!("{name}: {e}"))
}

/// User and system CPU time of this process and its waited-for children.
fn cpu_seconds() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: a zeroed rusage for getrusage to fill.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid rusage pointer.
        if unsafe { libc::getrusage(who, &raw mut ru) } == 0 {
            for tv in [ru.ru_utime, ru.ru_stime] {
                #[expect(clippy::cast_precision_loss, reason = "seconds")]
                {
                    total += tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
                }
            }
        }
    }
    total
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() == 2 && args[0] == "--spawned-busy" {
        let ms = args[1].parse().unwrap_or(0);
        vmload_spawned_busy(ms);
        return std::process::ExitCode::SUCCESS;
    }
    let Some(plan) = args.first().filter(|_| args.len() == 1) else {
        eprintln!("usage: vmload PLAN   (e.g. vmload busy:200,vm,block:100,vm,child:50)");
        return std::process::ExitCode::from(2);
    };
    match parse(plan).and_then(|steps| run(&steps)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmload: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plans() {
        assert_eq!(
            parse("busy:200, vm,block:5,child:1,spawn:2,thread:3").unwrap(),
            [
                Step::Busy(200),
                Step::Vm,
                Step::Block(5),
                Step::Child(1),
                Step::Spawn(2),
                Step::Thread(3)
            ]
        );
        assert_eq!(
            parse("work:2,forks:3,spawns:4,switches:5").unwrap(),
            [
                Step::Work(2),
                Step::Forks(3),
                Step::Spawns(4),
                Step::Switches(5)
            ]
        );
        assert_eq!(
            parse("vforks:2,noclone3,thread:1").unwrap(),
            [Step::Vforks(2), Step::NoClone3, Step::Thread(1)]
        );
        assert!(parse("busy").is_err());
        assert!(parse("busy:x").is_err());
        assert!(parse("nap:3").is_err());
    }

    #[test]
    fn fixed_work_steps_run() {
        run(&[
            Step::Work(1),
            Step::Forks(2),
            Step::Spawns(1),
            Step::Switches(10),
        ])
        .unwrap();
    }

    #[test]
    fn burns_about_as_long_as_asked() {
        let t = Instant::now();
        vmload_busy(50);
        let e = t.elapsed();
        assert!(
            e >= Duration::from_millis(50) && e < Duration::from_millis(500),
            "{e:?}"
        );
    }
}
