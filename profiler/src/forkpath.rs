//! Where libc's fork functions keep their caller's return address when they
//! enter the kernel, learned from hvprof's own calls.
//!
//! The fork table names each fork by its caller (`virFork`), the function
//! that called libc's `fork`. A frame-pointer walk from the syscall does not
//! find it: libc has no frame pointers, and glibc's fork code uses `rbp` as
//! a plain register. A uprobe at libc's `fork` reads it exactly, but on this
//! kind of machine a uprobe is dear: every fork of a process whose libc is
//! probed copies the page tables of libc's text (about 25 µs here), and each
//! hit traps (about 45 µs).
//!
//! Instead hvprof makes each call itself, once, in a child it traces with
//! ptrace: at the syscall-entry stop it reads the registers and the stack
//! and finds where its own return address lies (a stack slot, or `rdi` for
//! glibc's `vfork`), and the return address into libc just below it (the
//! call inside the function that was called). Both are fixed offsets from
//! the syscall's sp, and the libc return address is a fixed distance from
//! the syscall's ip, so in any process that maps the same libc the program
//! at `sys_enter_*` checks that return address and then reads the caller.
//! A process with another libc matches no path and gets its fork callers
//! from its stack, as before.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use profiler_common::record::{
    FORK_PATH_IN_DI, FORK_PATH_NONE, FORK_PATHS, ForkPath, call_target, ends_with_call,
};

use crate::procmaps::Snapshot;

/// Bytes of the stack read above the syscall's sp: the caller's return
/// address lies within (glibc's `posix_spawn` path is the deepest, well
/// under 1 KiB).
const STACK_BYTES: usize = 2048;

/// How far past its entry a calibration function's call can be.
const CALLER_SPAN: u64 = 1024;

/// The call the traced child is making (an index into [`CALLS`], plus
/// `CALLS.len()` in the second round), read by the parent from the child's
/// copy at the same address.
static STEP: AtomicUsize = AtomicUsize::new(usize::MAX);

/// A path for exec that does not exist: the spawn calls fail in their
/// child after the clone, which is all that is needed, and exec nothing.
const NO_FILE: &CStr = c"/nonexistent/hvprof-fork-calibration";

unsafe extern "C" {
    // libc's declaration is deprecated (a `returns_twice` function Rust
    // cannot describe); the child here only calls `_exit`.
    fn vfork() -> libc::pid_t;
}

#[inline(never)]
fn call_fork() {
    // SAFETY: the child only exits.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::_exit(0);
        }
        if pid > 0 {
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
}

#[inline(never)]
fn call_vfork() {
    // SAFETY: the child only exits, touching nothing of the parent's.
    unsafe {
        let pid = vfork();
        if pid == 0 {
            libc::_exit(0);
        }
        if pid > 0 {
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
}

fn spawn_args() -> ([*mut libc::c_char; 2], [*mut libc::c_char; 1]) {
    (
        [NO_FILE.as_ptr().cast_mut(), std::ptr::null_mut()],
        [std::ptr::null_mut()],
    )
}

/// libc's `posix_spawn` and `posix_spawnp`.
type Spawn = unsafe extern "C" fn(
    *mut libc::pid_t,
    *const libc::c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    *const *mut libc::c_char,
    *const *mut libc::c_char,
) -> libc::c_int;

/// Spawns [`NO_FILE`] with `spawn`: inlined, so that the call is in the
/// calibration function.
#[expect(clippy::inline_always, reason = "the call must be in the caller")]
#[inline(always)]
fn spawn_nothing(spawn: Spawn) {
    let (argv, envp) = spawn_args();
    let mut pid = 0;
    // SAFETY: valid NULL-terminated vectors; the exec fails and glibc
    // reaps the child.
    unsafe {
        spawn(
            &raw mut pid,
            NO_FILE.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            argv.as_ptr(),
            envp.as_ptr(),
        );
    }
}

#[inline(never)]
fn call_posix_spawn() {
    spawn_nothing(libc::posix_spawn);
}

#[inline(never)]
fn call_posix_spawnp() {
    spawn_nothing(libc::posix_spawnp);
}

extern "C" fn idle_thread(_: *mut libc::c_void) -> *mut libc::c_void {
    std::ptr::null_mut()
}

#[inline(never)]
fn call_pthread_create() {
    let mut t: libc::pthread_t = 0;
    // SAFETY: a thread that returns at once, joined.
    unsafe {
        if libc::pthread_create(
            &raw mut t,
            std::ptr::null(),
            idle_thread,
            std::ptr::null_mut(),
        ) == 0
        {
            libc::pthread_join(t, std::ptr::null_mut());
        }
    }
}

/// The calls, in the order the child makes them.
const CALLS: [(&str, fn()); 5] = [
    ("fork", call_fork),
    ("vfork", call_vfork),
    ("posix_spawn", call_posix_spawn),
    ("posix_spawnp", call_posix_spawnp),
    ("pthread_create", call_pthread_create),
];

/// One fork syscall of the traced child, as seen at its entry stop.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Which of [`CALLS`] made it.
    pub step: usize,
    pub nr: u64,
    pub ip: u64,
    pub sp: u64,
    pub di: u64,
    /// The stack from sp up.
    pub stack: Vec<u64>,
}

/// The fork paths of one libc.
#[derive(Clone, Debug)]
pub struct Calibration {
    /// The libc file they hold for (canonical).
    pub libc: PathBuf,
    pub paths: Vec<ForkPath>,
}

/// The fork paths of the libc hvprof runs with, learned from a traced
/// child; an error names what failed (ptrace forbidden, no libc, a call
/// whose caller was not found).
pub fn calibrate() -> Result<Calibration, String> {
    let samples = trace_calls()?;
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    let snapshot = Snapshot::parse(&maps);
    let libc = snapshot
        .mappings
        .iter()
        .find(|m| is_libc(&m.path))
        .ok_or("hvprof's own libc is not in its maps")?;
    let file = Path::new(&libc.path)
        .canonicalize()
        .map_err(|e| format!("{}: {e}", libc.path))?;
    let libc = (libc.start, libc.end);
    let mut paths = Vec::new();
    for (step, (name, f)) in CALLS.iter().enumerate() {
        let entry = *f as usize as u64;
        let mut found = false;
        for s in samples.iter().filter(|s| s.step == step) {
            let p = path_of(s, entry..entry + CALLER_SPAN, libc.0..libc.1)
                .ok_or_else(|| format!("the caller of {name} was not found on its stack"))?;
            found = true;
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
        if !found {
            return Err(format!("{name} made no fork system call"));
        }
    }
    if paths.len() > FORK_PATHS {
        return Err(format!("{} paths, room for {FORK_PATHS}", paths.len()));
    }
    Ok(Calibration { libc: file, paths })
}

/// Whether a mapped file is a libc (`libc.so.6`, or `libc-2.31.so` of
/// older glibc).
#[must_use]
pub fn is_libc(path: &str) -> bool {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("libc.so") || n.starts_with("libc-"))
}

/// Whether `addr` is a return address inside `range` (in hvprof's own
/// memory, the same as the child's).
fn returns_into(addr: u64, range: &std::ops::Range<u64>) -> bool {
    if !range.contains(&addr) || addr < range.start + 8 {
        return false;
    }
    // SAFETY: the 8 bytes before `addr` are inside a mapped text range of
    // this process (the calibration function or libc's text).
    let before = unsafe { std::ptr::read_unaligned((addr - 8) as *const [u8; 8]) };
    ends_with_call(&before)
}

/// How far into a function a call in it can be.
const FUNCTION_SPAN: u64 = 32 * 1024;

/// The target of the direct call (`call rel32`) before return address
/// `ret`, in hvprof's own memory.
fn call_target_of(ret: u64) -> Option<u64> {
    // SAFETY: `ret` passed `returns_into` for a mapped text range, so the 8
    // bytes before it are mapped.
    let before = unsafe { std::ptr::read_unaligned((ret - 8) as *const [u8; 8]) };
    call_target(ret, &before)
}

/// The slot (in words from sp) of the outermost libc frame below `below`:
/// the return address into the function the caller called. Found by
/// following the chain of direct calls out from the syscall's ip: each
/// return address must be of a call to a function that the next inner
/// frame's address is in. A stale return address left in a frame's
/// uninitialized slots rarely fits the chain; the real ones always do.
fn outermost_libc_frame(s: &Sample, below: usize, libc: &std::ops::Range<u64>) -> Option<usize> {
    let mut inner = s.ip;
    let mut found = None;
    for (i, &w) in s.stack[..below].iter().enumerate() {
        let links = returns_into(w, libc)
            && call_target_of(w).is_some_and(|t| t <= inner && inner - t < FUNCTION_SPAN);
        if links {
            found = Some(i);
            inner = w;
        }
    }
    found
}

/// Overwrites 16 KiB of stack below the caller with zeros, so that the
/// call that follows finds no stale return addresses in its frames' unused
/// slots.
#[inline(never)]
fn scrub_stack() {
    let mut area = [0u64; 2048];
    std::hint::black_box(&mut area);
}

/// The path of one sample: where the return address into `caller` is,
/// and the outermost libc frame below it.
fn path_of(
    s: &Sample,
    caller: std::ops::Range<u64>,
    libc: std::ops::Range<u64>,
) -> Option<ForkPath> {
    let slot = s.stack.iter().position(|&w| returns_into(w, &caller));
    // glibc's vfork pops its return address into rdi, and has no call
    // inside: no libc return address to check.
    let (caller_off, below) = if returns_into(s.di, &caller) {
        (FORK_PATH_IN_DI, 0)
    } else {
        let i = slot?;
        (u32::try_from(i * 8).ok()?, i)
    };
    let sig = outermost_libc_frame(s, below, &libc);
    Some(ForkPath {
        nr: u32::try_from(s.nr).ok()?,
        ip_page: (s.ip & 0xfff) as u32,
        sig_off: sig.map_or(Some(FORK_PATH_NONE), |j| u32::try_from(j * 8).ok())?,
        caller_off,
        sig_delta: sig
            .and_then(|j| call_target_of(s.stack[j]))
            .map_or(0, |t| t.wrapping_sub(s.ip)),
    })
}

/// The fork system calls a child makes for each of [`CALLS`], each read at
/// its entry stop.
fn trace_calls() -> Result<Vec<Sample>, String> {
    // SAFETY: the child calls only async-signal-safe functions and libc's
    // fork functions (glibc makes malloc usable in a forked child), then
    // exits; it never returns into Rust code of the parent's.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: see above.
        unsafe {
            // A parent that dies or hangs must not leave the child behind.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::alarm(10);
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                libc::_exit(2);
            }
            libc::raise(libc::SIGSTOP);
            for round in 0..2 {
                for (i, (_, f)) in CALLS.iter().enumerate() {
                    STEP.store(round * CALLS.len() + i, Ordering::SeqCst);
                    scrub_stack();
                    f();
                }
            }
            libc::_exit(0);
        }
    }
    let result = trace(child);
    // SAFETY: our own child, by pid; reaped whatever happened.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    result
}

fn wait(child: libc::pid_t) -> Result<libc::c_int, String> {
    let mut status = 0;
    // SAFETY: our own child.
    if unsafe { libc::waitpid(child, &raw mut status, libc::__WALL) } != child {
        return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 2 {
        return Err("ptrace(PTRACE_TRACEME) is not permitted here".to_owned());
    }
    Ok(status)
}

/// Runs the traced child to its end, sampling its fork system calls.
fn trace(child: libc::pid_t) -> Result<Vec<Sample>, String> {
    let forks = [
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_fork,
        libc::SYS_vfork,
    ];
    let status = wait(child)?;
    if !libc::WIFSTOPPED(status) {
        return Err(format!(
            "the traced child did not stop (status {status:#x})"
        ));
    }
    // SAFETY: ptrace on our stopped tracee.
    let ok = unsafe {
        libc::ptrace(
            libc::PTRACE_SETOPTIONS,
            child,
            0,
            libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL,
        )
    };
    if ok != 0 {
        return Err(format!("ptrace: {}", std::io::Error::last_os_error()));
    }
    let mut samples = Vec::new();
    let mut signal = 0;
    loop {
        // SAFETY: ptrace on our stopped tracee.
        if unsafe { libc::ptrace(libc::PTRACE_SYSCALL, child, 0, signal) } != 0 {
            return Err(format!("ptrace: {}", std::io::Error::last_os_error()));
        }
        let status = wait(child)?;
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            break;
        }
        signal = 0;
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        if libc::WSTOPSIG(status) != (libc::SIGTRAP | 0x80) {
            // A signal for the child (SIGCHLD of its own children): passed on.
            signal = libc::WSTOPSIG(status);
            continue;
        }
        // SAFETY: a plain struct the kernel fills.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: ptrace on our stopped tracee, into `regs`.
        if unsafe { libc::ptrace(libc::PTRACE_GETREGS, child, 0, &raw mut regs) } != 0 {
            return Err(format!("ptrace: {}", std::io::Error::last_os_error()));
        }
        // At the entry stop rax holds -ENOSYS; the number is in orig_rax.
        let entry = regs.rax == (-i64::from(libc::ENOSYS)).cast_unsigned();
        if !entry || !forks.contains(&regs.orig_rax.cast_signed()) {
            continue;
        }
        let step = read_word(child, (&raw const STEP) as u64)
            .and_then(|w| usize::try_from(w).ok())
            .ok_or("the traced child's memory cannot be read")?;
        // The second round is made as under a seccomp filter that answers
        // clone3 with ENOSYS (QEMU's sandbox does): glibc then falls back
        // to clone, by another path. An orig_rax of -1 skips the call,
        // which then returns the -ENOSYS rax holds.
        if step >= CALLS.len() && regs.orig_rax == libc::SYS_clone3.cast_unsigned() {
            let mut skip = regs;
            skip.orig_rax = u64::MAX;
            // SAFETY: ptrace on our stopped tracee, from `skip`.
            if unsafe { libc::ptrace(libc::PTRACE_SETREGS, child, 0, &raw const skip) } != 0 {
                return Err(format!("ptrace: {}", std::io::Error::last_os_error()));
            }
        }
        let mut stack = vec![0u64; STACK_BYTES / 8];
        let got = read_memory(child, regs.rsp, bytemuck_words(&mut stack));
        stack.truncate(got / 8);
        samples.push(Sample {
            step: step % CALLS.len(),
            nr: regs.orig_rax,
            ip: regs.rip,
            sp: regs.rsp,
            di: regs.rdi,
            stack,
        });
    }
    Ok(samples)
}

fn bytemuck_words(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64s viewed as their bytes.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 8) }
}

/// Reads the child's memory at `addr` into `buf`; the bytes read (the
/// stack may end before the buffer does).
fn read_memory(child: libc::pid_t, addr: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: one local buffer we own, one remote range of our tracee.
        let n =
            unsafe { libc::process_vm_readv(child, &raw const local, 1, &raw const remote, 1, 0) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => done += n,
            _ => break,
        }
    }
    done
}

fn read_word(child: libc::pid_t, addr: u64) -> Option<u64> {
    let mut w = [0u64; 1];
    (read_memory(child, addr, bytemuck_words(&mut w)) == 8).then_some(w[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::record::fork_caller;

    /// The caller `paths` find for a sample, reading its stack and
    /// hvprof's own text as the program reads the target's.
    fn caller_of(paths: &[ForkPath], s: &Sample) -> u64 {
        let read = |a: u64| {
            let i = usize::try_from(a.checked_sub(s.sp)? / 8).ok()?;
            s.stack.get(i).copied()
        };
        // hvprof's libc and its calibration functions: text it may read.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let text: Vec<(u64, u64)> = Snapshot::parse(&maps)
            .mappings
            .iter()
            .filter(|m| is_libc(&m.path))
            .map(|m| (m.start, m.end))
            .chain(CALLS.iter().map(|(_, f)| {
                let f = *f as usize as u64;
                (f, f + CALLER_SPAN)
            }))
            .collect();
        let read8 = |a: u64| {
            // SAFETY: only inside the text ranges above.
            text.iter()
                .any(|&(lo, hi)| a >= lo && a + 8 <= hi)
                .then(|| unsafe { std::ptr::read_unaligned(a as *const [u8; 8]) })
        };
        let path = |i: usize| paths.get(i).copied().unwrap_or(ForkPath::UNUSED);
        let nr = u32::try_from(s.nr).unwrap();
        fork_caller(path, nr, [s.ip, s.sp, s.di], read, read8)
    }

    /// glibc's fork functions, traced in a child: every call has a path,
    /// and the paths, applied to a second traced run (other stack
    /// addresses), find each call's caller: the function that called it.
    #[test]
    fn the_learned_paths_find_every_libc_fork_functions_caller() {
        let c = calibrate().unwrap();
        eprintln!("{c:#x?}");
        // vfork's caller is in rdi, with no libc return address to check;
        // fork's, the spawns' and pthread_create's are on the stack, with
        // one below it.
        let vfork = u32::try_from(libc::SYS_vfork).unwrap();
        assert!(c.paths.iter().any(|p| p.nr == vfork
            && p.caller_off == FORK_PATH_IN_DI
            && p.sig_off == FORK_PATH_NONE));
        for p in c.paths.iter().filter(|p| p.nr != vfork) {
            assert!(
                p.sig_off < p.caller_off && (p.caller_off as usize) < STACK_BYTES,
                "{p:x?}"
            );
        }
        assert!(c.libc.is_absolute());

        let samples = trace_calls().unwrap();
        // The spawns and pthread_create go through clone3, and through
        // clone in the round where clone3 is refused.
        for step in [2, 3, 4] {
            for nr in [libc::SYS_clone3, libc::SYS_clone] {
                assert!(
                    samples
                        .iter()
                        .any(|s| s.step == step && s.nr == nr.cast_unsigned()),
                    "{}: no {nr}",
                    CALLS[step].0
                );
            }
        }
        for (step, (name, f)) in CALLS.iter().enumerate() {
            let entry = *f as usize as u64;
            let mine: Vec<&Sample> = samples.iter().filter(|s| s.step == step).collect();
            assert!(!mine.is_empty(), "{name} made no fork system call");
            for s in mine {
                let caller = caller_of(&c.paths, s);
                assert!(
                    (entry..entry + CALLER_SPAN).contains(&caller),
                    "{name}: caller {caller:#x}, expected in {entry:#x}.."
                );
                // With its libc return address one byte off, a path no
                // longer holds (vfork's has none: it is checked by its call).
                let mut moved = c.paths.clone();
                for p in &mut moved {
                    p.sig_delta = p.sig_delta.wrapping_add(1);
                }
                if s.nr != u64::from(vfork) {
                    assert_eq!(caller_of(&moved, s), 0, "{name}");
                }
            }
        }
    }
}
