//! The fork tracer's keys and values, and how a fork's caller is found.

use super::COMM_LEN;

/// Fork syscalls, as [`ForkKey::kind`] numbers them (low byte).
pub mod fork_kind {
    pub const CLONE: u32 = 1;
    pub const CLONE3: u32 = 2;
    pub const FORK: u32 = 3;
    pub const VFORK: u32 = 4;
    /// Set when the call created a thread (`CLONE_THREAD`).
    pub const THREAD: u32 = 1 << 8;
}

/// `CLONE_THREAD` (include/uapi/linux/sched.h).
pub const CLONE_THREAD: u64 = 0x0001_0000;

/// Key of the fork-syscall aggregation: who forked, how, from where.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ForkKey {
    pub window: u32,
    pub tgid: u32,
    /// [`fork_kind`].
    pub kind: u32,
    pub pad: u32,
    /// The parent's user stack.
    pub user_stack: u64,
    /// The return address of the libc call that forked (`fork`,
    /// `posix_spawn`, `pthread_create`, …), read at its entry by a uprobe:
    /// the exact caller (e.g. inside `virFork`) even when the frame-pointer
    /// walk cannot get past libc. 0 if unknown.
    pub caller: u64,
    pub comm: [u8; COMM_LEN],
}

/// Successful fork syscalls of one [`ForkKey`], and the parent's time in
/// them (for vfork: until the child execs or exits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkValue {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
}

/// A fork syscall in progress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkStart {
    pub start_ns: u64,
    pub window: u32,
    pub kind: u32,
    /// The return address into the caller of the libc function that made
    /// the syscall, found through a [`ForkPath`] at entry (0: none matched).
    pub caller: u64,
}

/// How many [`ForkPath`]s the configuration holds.
pub const FORK_PATHS: usize = 8;
/// [`ForkPath::sig_off`]: the path has no libc return address to check.
pub const FORK_PATH_NONE: u32 = u32::MAX;
/// [`ForkPath::caller_off`]: the caller's return address is in `rdi`
/// (glibc's `vfork` pops it there, as the child may overwrite the stack).
pub const FORK_PATH_IN_DI: u32 = u32::MAX - 1;

/// Where one of libc's fork functions keeps its caller's return address
/// when it enters the kernel. hvprof learns these from its own calls (a
/// traced child calls `fork`, `vfork`, `posix_spawn[p]` and
/// `pthread_create`), so no probe has to sit in the targets' libc: a
/// uprobe makes every fork of a process that maps the probed file copy its
/// page tables, and each hit traps.
///
/// Everything is relative to the syscall's user ip and sp, so a path holds
/// in every process that maps the same libc, wherever ASLR put it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForkPath {
    /// The syscall number (`u32::MAX`: an unused entry).
    pub nr: u32,
    /// The user ip's offset in its page (libc is mapped page-aligned).
    pub ip_page: u32,
    /// Byte offset from the user sp of a return address into libc that
    /// this path has there (of the call inside the function the caller
    /// called), or [`FORK_PATH_NONE`].
    pub sig_off: u32,
    /// Byte offset from the user sp of the caller's return address, or
    /// [`FORK_PATH_IN_DI`].
    pub caller_off: u32,
    /// The target of that call (a `call rel32`) minus the ip. The target,
    /// not the return address: a function may call the same function from
    /// two places with the same frame (glibc's fork calls `_Fork` from one
    /// place when the process has threads and another when it has none).
    pub sig_delta: u64,
}

impl ForkPath {
    pub const UNUSED: Self = Self {
        nr: u32::MAX,
        ip_page: 0,
        sig_off: FORK_PATH_NONE,
        caller_off: FORK_PATH_NONE,
        sig_delta: 0,
    };
}

/// The return address into the caller of the libc function that made fork
/// syscall `nr` with user `ip`, `sp` and `rdi`: through the first of the
/// `FORK_PATHS` paths (`path(i)`) whose libc return address is where it
/// says, of a call to the function it says. A path without one (vfork) has its caller checked for a call
/// instruction before it instead. `read` reads a user word, `read8` the 8
/// bytes before an address. 0 if no path holds.
#[expect(clippy::inline_always, reason = "in an eBPF program")]
#[inline(always)]
pub fn fork_caller(
    path: impl Fn(usize) -> ForkPath,
    nr: u32,
    [ip, sp, di]: [u64; 3],
    read: impl Fn(u64) -> Option<u64>,
    read8: impl Fn(u64) -> Option<[u8; 8]>,
) -> u64 {
    let mut i = 0;
    while i < FORK_PATHS {
        let p = path(i);
        i += 1;
        if p.nr != nr || u64::from(p.ip_page) != ip & 0xfff {
            continue;
        }
        if p.sig_off != FORK_PATH_NONE {
            let Some(ret) = read(sp.wrapping_add(u64::from(p.sig_off))) else {
                continue;
            };
            if read8(ret.wrapping_sub(8)).and_then(|b| call_target(ret, &b))
                != Some(ip.wrapping_add(p.sig_delta))
            {
                continue;
            }
        }
        let caller = if p.caller_off == FORK_PATH_IN_DI {
            di
        } else {
            match read(sp.wrapping_add(u64::from(p.caller_off))) {
                Some(c) => c,
                None => continue,
            }
        };
        if p.sig_off == FORK_PATH_NONE
            && !read8(caller.wrapping_sub(8)).is_some_and(|b| ends_with_call(&b))
        {
            continue;
        }
        return caller;
    }
    0
}

/// The target of a `call rel32` that `before`, the 8 bytes before return
/// address `ret`, end with.
#[expect(clippy::inline_always, reason = "in an eBPF program")]
#[inline(always)]
#[must_use]
pub fn call_target(ret: u64, before: &[u8; 8]) -> Option<u64> {
    if before[3] != 0xe8 {
        return None;
    }
    let rel = i32::from_le_bytes([before[4], before[5], before[6], before[7]]);
    Some(ret.wrapping_add_signed(i64::from(rel)))
}

/// Whether the 8 bytes before a return address end with an x86-64 call:
/// `call rel32`, `call *rel32(%rip)` (a GOT call), or `call` through a
/// register, `(%reg)`, `disp8(%reg)` or `disp32(%reg)` (a REX prefix before
/// the opcode changes nothing here). A stack word that passes is very
/// likely a return address; stale data rarely does.
#[expect(clippy::inline_always, reason = "in an eBPF program")]
#[inline(always)]
#[must_use]
pub fn ends_with_call(b: &[u8; 8]) -> bool {
    // `ff /2` with its ModRM byte at b[m] in addressing mode `mode`; an r/m
    // of 4 needs a SIB byte, and `no_rm` is the other r/m that means
    // something else in that mode.
    let ff2 = |m: usize, mode: u8, no_rm: u8| {
        b[m - 1] == 0xff && b[m] & 0xf8 == mode | 0x10 && b[m] & 7 != 4 && b[m] & 7 != no_rm
    };
    b[3] == 0xe8
        || (b[2] == 0xff && b[3] == 0x15)
        || ff2(7, 0xc0, 8)
        || ff2(7, 0x00, 5)
        || ff2(6, 0x40, 8)
        || ff2(3, 0x80, 8)
}
