//! D-Bus waits: uprobes at the entry and return of the libraries' blocking
//! client calls (libdbus, GIO, sd-bus), told apart by the probe's cookie
//! (`dbus_fn`), and at their message constructors for the names. One call
//! is a thread's outermost blocking call; the off-CPU tracer marks the
//! blocks inside one ([`inflight`]).

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_attach_cookie, bpf_probe_read_user, bpf_probe_read_user_str_bytes},
    macros::{map, uprobe, uretprobe},
    maps::{Array, HashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
};
use profiler_common::record::{
    DBUS_DEFAULT_TIMEOUT_MS, DBUS_NAME_LEN, DBUS_TIMEOUT_DEFAULT, DBUS_TIMEOUT_INFINITE,
    DbusInflight, DbusKey, DbusLast, DbusNames, DbusValue, LOCK_HIST_BUCKETS, Loss, dbus_fn,
};

use super::{
    common::{
        Running, Task, add_atomic, aggregate, comm, lose, now, reset, slot, stopped, timed, traced,
        written_now,
    },
    stacks::user_stack,
};

#[map]
static DBUS_CALLS: HashMap<DbusKey, DbusValue> = HashMap::with_max_entries(8192, 0);
/// Per thread: the blocking call it is inside.
#[map]
static DBUS_INFLIGHT: HashMap<u32, DbusInflight> = HashMap::with_max_entries(16384, 0);
/// Per thread: what its last message constructor said.
#[map]
static DBUS_LAST: HashMap<u32, DbusLast> = HashMap::with_max_entries(16384, 0);
/// Outermost calls in flight on the whole system: while 0, the off-CPU
/// tracer does not look threads up in `DBUS_INFLIGHT`.
#[map]
static DBUS_ACTIVE: Array<u64> = Array::with_max_entries(1, 0);
#[map]
static DBUS_SCRATCH: PerCpuArray<DbusKey> = PerCpuArray::with_max_entries(1, 0);

const DBUS_NAMES_ZERO: DbusNames = DbusNames {
    destination: [0; DBUS_NAME_LEN],
    path: [0; DBUS_NAME_LEN],
    interface: [0; DBUS_NAME_LEN],
    member: [0; DBUS_NAME_LEN],
};
#[unsafe(no_mangle)]
static DBUS_VALUE_ZERO: DbusValue = DbusValue {
    count: 0,
    total_ns: 0,
    max_ns: 0,
    timeouts: 0,
    hist: [0; LOCK_HIST_BUCKETS],
};
#[unsafe(no_mangle)]
static DBUS_INFLIGHT_ZERO: DbusInflight = DbusInflight {
    depth: 0,
    function: 0,
    window: 0,
    pad: 0,
    timeout_ms: 0,
    start_ns: 0,
    names: DBUS_NAMES_ZERO,
};
#[unsafe(no_mangle)]
static DBUS_LAST_ZERO: DbusLast = DbusLast {
    has_timeout: 0,
    pad: 0,
    timeout_ms: 0,
    names: DBUS_NAMES_ZERO,
};

timed!(DbusValue, count, total_ns, max_ns, hist: hist);

/// The D-Bus function a probe is attached to (its cookie).
#[inline(always)]
fn cookie<C: EbpfContext>(ctx: &C) -> u32 {
    // SAFETY: the context is the probe's.
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) as u32 }
}

/// The probed function's arguments at its entry (x86-64 SysV): the six
/// register arguments, read once at the program's start (the verifier
/// allows only constant offsets into the context, and an address computed
/// once and kept across branches is not one), and the stack ones on demand.
#[derive(Clone, Copy)]
struct Args {
    regs: [u64; 6],
    sp: u64,
}

impl Args {
    #[inline(always)]
    fn of(ctx: &ProbeContext) -> Self {
        // SAFETY: regs is the probed task's register file, valid for the
        // program's run; volatile keeps each load a constant-offset load.
        unsafe {
            let r = ctx.regs;
            Self {
                regs: [
                    core::ptr::read_volatile(&raw const (*r).rdi),
                    core::ptr::read_volatile(&raw const (*r).rsi),
                    core::ptr::read_volatile(&raw const (*r).rdx),
                    core::ptr::read_volatile(&raw const (*r).rcx),
                    core::ptr::read_volatile(&raw const (*r).r8),
                    core::ptr::read_volatile(&raw const (*r).r9),
                ],
                sp: core::ptr::read_volatile(&raw const (*r).rsp),
            }
        }
    }

    /// Argument `N` (0-based); from the seventh on, from the stack above
    /// the return address.
    #[inline(always)]
    fn get<const N: usize>(&self) -> u64 {
        if N < 6 {
            return self.regs[N];
        }
        // SAFETY: read with the checked helper.
        unsafe { bpf_probe_read_user((self.sp + 8 * (N as u64 - 5)) as *const u64).unwrap_or(0) }
    }
}

/// Copies a user string into `dst` if `dst` is still empty (the first name
/// found for a call wins; GIO's proxy call knows only the member, the
/// `call_sync` inside it knows everything).
#[inline(always)]
fn fill_name(dst: &mut [u8; DBUS_NAME_LEN], src: u64) {
    if src == 0 || dst[0] != 0 {
        return;
    }
    // SAFETY: the helper checks the user read; dst is a map value.
    let _ = unsafe { bpf_probe_read_user_str_bytes(src as *const u8, dst) };
}

#[inline(always)]
fn fill_names(dst: &mut DbusNames, src: &DbusNames) {
    if dst.destination[0] == 0 {
        dst.destination = src.destination;
    }
    if dst.path[0] == 0 {
        dst.path = src.path;
    }
    if dst.interface[0] == 0 {
        dst.interface = src.interface;
    }
    if dst.member[0] == 0 {
        dst.member = src.member;
    }
}

/// Message constructors (and libdbus `send_with_reply`): remember what the
/// thread's next blocking call is about. The D-Bus programs are
/// `uprobe.multi` programs: one link per library file, whose uprobes the
/// kernel detaches with one RCU grace period.
#[uprobe(multi)]
pub fn dbus_names(ctx: ProbeContext) -> u32 {
    let Some(_running) = Running::start() else {
        return 0;
    };
    try_dbus_names(&ctx).unwrap_or(0)
}

#[inline(always)]
fn try_dbus_names(ctx: &ProbeContext) -> Option<u32> {
    let a = Args::of(ctx);
    let (task, window) = traced()?;
    let pid = task.pid();
    let f = cookie(ctx);
    if f == dbus_fn::LIBDBUS_SEND_WITH_REPLY {
        let last = slot(&DBUS_LAST, &pid, &DBUS_LAST_ZERO, window, Loss::DbusMapFull)?;
        // SAFETY: a valid map value of this thread.
        unsafe {
            (*last).has_timeout = 1;
            (*last).timeout_ms = i64::from(a.get::<3>() as i32);
        }
        return Some(0);
    }
    if f == dbus_fn::LIBDBUS_SET_DESTINATION {
        let last = DBUS_LAST.get_ptr_mut(&pid)?;
        // SAFETY: a valid map value of this thread.
        unsafe { fill_name(&mut (*last).names.destination, a.get::<1>()) };
        return Some(0);
    }
    let (dest, path, iface, member) = match f {
        dbus_fn::LIBDBUS_NEW_METHOD_CALL | dbus_fn::GIO_NEW_METHOD_CALL => {
            (a.get::<0>(), a.get::<1>(), a.get::<2>(), a.get::<3>())
        }
        dbus_fn::SDBUS_NEW_METHOD_CALL => (a.get::<2>(), a.get::<3>(), a.get::<4>(), a.get::<5>()),
        _ => return None,
    };
    // A new message: forget the names of the previous one.
    let Some(last) = reset(&DBUS_LAST, &pid, &DBUS_LAST_ZERO) else {
        lose(window, Loss::DbusMapFull);
        return None;
    };
    // SAFETY: a valid map value of this thread.
    unsafe {
        let n = &mut (*last).names;
        fill_name(&mut n.destination, dest);
        fill_name(&mut n.path, path);
        fill_name(&mut n.interface, iface);
        fill_name(&mut n.member, member);
    }
    Some(0)
}

/// The timeout (ms, or `DBUS_TIMEOUT_*`) blocking call `f` was given, by
/// its arguments `a`.
#[inline(always)]
fn timeout_ms(f: u32, a: &Args) -> i64 {
    match f {
        dbus_fn::LIBDBUS_SEND_BLOCK => i64::from(a.get::<2>() as i32),
        dbus_fn::GIO_CALL_SYNC | dbus_fn::GIO_CALL_FD_SYNC => i64::from(a.get::<8>() as i32),
        dbus_fn::GIO_SEND_MESSAGE_SYNC => i64::from(a.get::<3>() as i32),
        dbus_fn::GIO_PROXY_CALL_SYNC => i64::from(a.get::<4>() as i32),
        dbus_fn::SDBUS_CALL => {
            let usec = a.get::<2>();
            if usec == 0 {
                DBUS_TIMEOUT_DEFAULT
            } else if usec == u64::MAX {
                DBUS_TIMEOUT_INFINITE
            } else {
                (usec / 1000) as i64
            }
        }
        // pending_call_block: the timeout of the send_with_reply before.
        _ => DBUS_TIMEOUT_DEFAULT,
    }
}

/// Entry of a blocking call: the outermost one starts the clock.
#[uprobe(multi)]
pub fn dbus_enter(ctx: ProbeContext) -> u32 {
    let Some(_running) = Running::start() else {
        return 0;
    };
    try_dbus_enter(&ctx).unwrap_or(0)
}

#[inline(always)]
fn try_dbus_enter(ctx: &ProbeContext) -> Option<u32> {
    let a = Args::of(ctx);
    let (task, window) = traced()?;
    let pid = task.pid();
    let f = cookie(ctx);
    let st = slot(
        &DBUS_INFLIGHT,
        &pid,
        &DBUS_INFLIGHT_ZERO,
        window,
        Loss::DbusMapFull,
    )?;
    // SAFETY: a valid map value, only touched by this thread.
    let st = unsafe { &mut *st };
    let outermost = st.depth == 0;
    st.depth += 1;
    if outermost {
        st.function = f;
        st.window = window;
        st.start_ns = now();
        st.names = DBUS_NAMES_ZERO;
        st.timeout_ms = timeout_ms(f, &a);
        if let Some(active) = DBUS_ACTIVE.get_ptr_mut(0) {
            add_atomic(active, 1);
        }
    }
    match f {
        dbus_fn::GIO_CALL_SYNC | dbus_fn::GIO_CALL_FD_SYNC => {
            fill_name(&mut st.names.destination, a.get::<1>());
            fill_name(&mut st.names.path, a.get::<2>());
            fill_name(&mut st.names.interface, a.get::<3>());
            fill_name(&mut st.names.member, a.get::<4>());
        }
        dbus_fn::GIO_PROXY_CALL_SYNC => fill_name(&mut st.names.member, a.get::<1>()),
        _ => {
            // Message-based: the names (and for pending_call_block the
            // timeout) come from the constructor called before.
            if let Some(last) = DBUS_LAST.get_ptr(&pid) {
                // SAFETY: a valid map value of this thread.
                let last = unsafe { &*last };
                fill_names(&mut st.names, &last.names);
                if outermost && f == dbus_fn::LIBDBUS_PENDING_BLOCK && last.has_timeout != 0 {
                    st.timeout_ms = last.timeout_ms;
                }
            }
        }
    }
    Some(0)
}

/// Return of a blocking call: the outermost one is counted.
#[uretprobe(multi)]
pub fn dbus_return(ctx: RetProbeContext) -> u32 {
    let Some(_running) = Running::start() else {
        return 0;
    };
    try_dbus_return(&ctx).unwrap_or(0)
}

#[inline(always)]
fn try_dbus_return(ctx: &RetProbeContext) -> Option<u32> {
    let (tgid, pid) = Task::current().ids();
    let st = DBUS_INFLIGHT.get_ptr_mut(&pid)?;
    // SAFETY: a valid map value, only touched by this thread.
    let st = unsafe { &mut *st };
    if st.depth > 1 {
        st.depth -= 1;
        return Some(0);
    }
    let end = now();
    if let Some(active) = DBUS_ACTIVE.get_ptr_mut(0) {
        add_atomic(active, u64::MAX);
    }
    let _ = DBUS_LAST.remove(&pid);
    if stopped() {
        let _ = DBUS_INFLIGHT.remove(&pid);
        return None;
    }
    let window = written_now(st.window);
    let latency = end.saturating_sub(st.start_ns);
    let timeout_ns = match st.timeout_ms {
        DBUS_TIMEOUT_INFINITE => u64::MAX,
        t if t < 0 => DBUS_DEFAULT_TIMEOUT_MS * 1_000_000,
        t => t as u64 * 1_000_000,
    };
    // A call that ran for its whole timeout timed out; the libraries' timers
    // have millisecond granularity.
    let timed_out = latency + 1_000_000 >= timeout_ns;
    let key = DBUS_SCRATCH.get_ptr_mut(0)?;
    // At the return the registers are the caller's, at the instruction
    // after the call: its stack, whole.
    let user_stack = user_stack(ctx, window);
    // SAFETY: this CPU's scratch key.
    unsafe {
        (*key).window = window;
        (*key).tgid = tgid;
        (*key).function = st.function;
        (*key).pad = 0;
        (*key).timeout_ms = st.timeout_ms;
        (*key).user_stack = user_stack;
        (*key).comm = comm();
        (*key).names = st.names;
    }
    let _ = DBUS_INFLIGHT.remove(&pid);
    // SAFETY: the scratch key is valid for reads. Threads of one process
    // may share the value: the aggregate's adds are atomic.
    let value = aggregate(
        &DBUS_CALLS,
        unsafe { &*key },
        &DBUS_VALUE_ZERO,
        window,
        Loss::DbusMapFull,
        latency,
    )?;
    if timed_out {
        // SAFETY: a valid map value.
        add_atomic(unsafe { &raw mut (*value).timeouts }, 1);
    }
    Some(0)
}

/// The exit hook (with `--tracers` including dbus). A thread that exits
/// inside a blocking call (killed, or ending the process from a callback)
/// never returns from it: the call is dropped and no longer holds
/// `DBUS_ACTIVE` up, and the thread's constructor names go with it, so
/// that a thread that reuses its id starts outside any call.
#[inline(always)]
pub(super) fn task_exited(pid: u32) {
    if config!(dbus) == 0 {
        return;
    }
    if let Some(st) = DBUS_INFLIGHT.get_ptr(&pid) {
        // SAFETY: a valid map value of this (exiting) thread.
        if unsafe { (*st).depth } > 0
            && let Some(active) = DBUS_ACTIVE.get_ptr_mut(0)
        {
            add_atomic(active, u64::MAX);
        }
        let _ = DBUS_INFLIGHT.remove(&pid);
    }
    let _ = DBUS_LAST.remove(&pid);
}

/// The blocking D-Bus call the current thread is inside, 0 if none.
#[inline(always)]
pub(super) fn inflight(pid: u32) -> u32 {
    if DBUS_ACTIVE.get(0).is_none_or(|n| *n == 0) {
        return 0;
    }
    DBUS_INFLIGHT
        .get_ptr(&pid)
        // SAFETY: a valid map value.
        .map_or(0, |st| unsafe { (*st).function })
}
