//! What every tracer shares: the current task and whether it is traced,
//! the window an event is charged to, losses and counters, get-or-insert
//! of a map entry, the timed aggregates, events to userspace and the
//! tasks' saved user registers.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, pt_regs, task_struct},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
        bpf_task_pt_regs,
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::BtfTracePointContext,
};
use profiler_common::record::{
    COMM_LEN, Counter, Event, EventKind, LOCK_HIST_BUCKETS, Loss, LossKey, MAX_WINDOW_RANGES,
    NO_WINDOW, PHASE_OFFCPU_STOPPED, PHASE_PARITY, PHASE_PER_CALL_SYSCALLS, PHASE_STOPPED,
    SETUP_WINDOW, TargetMode, VmState, WINDOW_PARITY, WindowMode, WindowRange, hist_bucket,
    window_every,
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
/// Tracked thread groups (and the tids of followed children, which for a
/// new process is its tgid).
#[map]
pub(super) static TRACKED: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);
#[map]
static WINDOW_RANGES: Array<WindowRange> = Array::with_max_entries(MAX_WINDOW_RANGES, 0);
#[map]
pub(super) static VM_STATE: Array<VmState> = Array::with_max_entries(1, 0);
#[map]
static LOSSES: PerCpuHashMap<LossKey, u64> = PerCpuHashMap::with_max_entries(4096, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
/// Set by userspace: `PHASE_STOPPED` when the recording stops (the
/// programs stay attached while the maps are read — the uprobes are
/// detached meanwhile — but change nothing any more), and the flush
/// parity, which [`current_window`] puts in every window it gives.
#[map]
static STOPPED: Array<u32> = Array::with_max_entries(1, 0);
/// Per CPU: nonzero while one of hvprof's programs runs there (see
/// [`Running`]).
#[map]
static RUNNING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

// ------------------------------------------------ one program per CPU

/// This CPU taken by one of hvprof's programs until dropped. The programs
/// share per-CPU scratch (the stack buffer, the unwinder's state), so one
/// must not start while another is under way on the CPU: an interrupt's
/// on-CPU sample, or a lock contention inside an interrupt or inside a
/// program's own map update. The kernel keeps programs on classic
/// tracepoints and perf events from nesting (`bpf_prog_active`), but not
/// those on BTF tracepoints or uprobes.
pub(crate) struct Running {
    flag: *mut u32,
    before: u32,
}

impl Running {
    /// Takes the CPU, or `None` (counted) if a program runs on it already.
    #[inline(always)]
    pub(crate) fn start() -> Option<Self> {
        let flag = RUNNING.get_ptr_mut(0)?;
        // SAFETY: this CPU's slot; a program that interrupts this one
        // restores it before this one goes on.
        unsafe {
            if *flag != 0 {
                count(Counter::NestedSkipped);
                return None;
            }
            *flag = 1;
        }
        Some(Self { flag, before: 0 })
    }

    /// Takes the CPU whatever runs on it: for `sched_switch`, which must
    /// run (it runs with interrupts off, so nothing of hvprof's is under way
    /// on the CPU but a preempted uprobe program).
    #[inline(always)]
    pub(crate) fn always() -> Option<Self> {
        let flag = RUNNING.get_ptr_mut(0)?;
        // SAFETY: as in `start`.
        let before = unsafe { core::ptr::replace(flag, 1) };
        Some(Self { flag, before })
    }
}

impl Drop for Running {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: this CPU's slot, as taken.
        unsafe { *self.flag = self.before };
    }
}

// ------------------------------------------------- the task and its window

/// A task as `bpf_get_current_pid_tgid` gives it: its process (tgid) in
/// the high half, its thread (pid) in the low one. One word, not two
/// fields: a pair packed into a register and out again costs every
/// program a few instructions.
#[derive(Clone, Copy)]
pub(super) struct Task(u64);

impl Task {
    /// The current task.
    #[inline(always)]
    pub(super) fn current() -> Self {
        Self(bpf_get_current_pid_tgid())
    }

    /// Thread `pid` of process `tgid`.
    #[inline(always)]
    pub(super) fn of(tgid: u32, pid: u32) -> Self {
        Self(u64::from(tgid) << 32 | u64::from(pid))
    }

    /// The current task, if it is traced.
    #[inline(always)]
    pub(super) fn tracked() -> Option<Self> {
        let task = Self::current();
        if !is_tracked(task.tgid()) {
            return None;
        }
        Some(task)
    }

    #[inline(always)]
    pub(super) fn tgid(self) -> u32 {
        (self.0 >> 32) as u32
    }

    #[inline(always)]
    pub(super) fn pid(self) -> u32 {
        self.0 as u32
    }

    /// (tgid, pid).
    #[inline(always)]
    pub(super) fn ids(self) -> (u32, u32) {
        (self.tgid(), self.pid())
    }
}

/// A tracer's preamble: the current task if it is traced, and the window
/// its event is charged to, if that window is recorded.
#[inline(always)]
pub(super) fn traced() -> Option<(Task, u32)> {
    let task = Task::tracked()?;
    Some((task, current_window()?))
}

/// Whether hvprof traces the tasks of process `tgid`. The idle tasks
/// (tgid 0) and hvprof itself never.
#[inline(always)]
pub(super) fn is_tracked(tgid: u32) -> bool {
    if tgid == 0 || tgid == config!(self_tgid) {
        return false;
    }
    if config!(target_mode) == TargetMode::All as u32 {
        return true;
    }
    // SAFETY: the value is only tested for presence.
    unsafe { TRACKED.get(&tgid) }.is_some()
}

#[inline(always)]
pub(super) fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// VMs created so far (the kernel's count, which moves the windows).
#[inline(always)]
pub(super) fn vms_created() -> u64 {
    VM_STATE.get(0).map_or(0, |s| s.created)
}

/// The window of the `vms`th VM creation, or `None` outside every window.
#[inline(always)]
pub(super) fn window_for(vms: u64) -> Option<u32> {
    if vms == 0 {
        return Some(SETUP_WINDOW);
    }
    if config!(window_mode) == WindowMode::Every as u32 {
        return Some(window_every(config!(window_size), vms));
    }
    let n = config!(window_ranges);
    let mut i = 0;
    while i < MAX_WINDOW_RANGES {
        if i >= n {
            break;
        }
        if let Some(r) = WINDOW_RANGES.get(i)
            && vms >= u64::from(r.first)
            && vms <= u64::from(r.last)
        {
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

/// Whether userspace moved the system-call programs from the dispatch to
/// the calls' own tracepoints (see [`STOPPED`]).
#[inline(always)]
pub(crate) fn per_call_syscalls() -> bool {
    STOPPED
        .get(0)
        .is_some_and(|s| *s & PHASE_PER_CALL_SYSCALLS != 0)
}

/// Whether the recording has stopped (see [`STOPPED`]).
#[inline(always)]
pub(super) fn stopped() -> bool {
    STOPPED.get(0).is_some_and(|s| *s & PHASE_STOPPED != 0)
}

/// Whether the off-CPU tracer has stopped: with the rest, or before them
/// (`PHASE_OFFCPU_STOPPED`).
#[inline(always)]
pub(super) fn offcpu_stopped() -> bool {
    STOPPED
        .get(0)
        .is_some_and(|s| *s & (PHASE_STOPPED | PHASE_OFFCPU_STOPPED) != 0)
}

/// The window an event now is charged to, with the flush parity in its
/// `WINDOW_PARITY` bit (see [`STOPPED`]); `None` outside every window or
/// after the stop.
#[inline(always)]
pub(super) fn current_window() -> Option<u32> {
    current_window_at().map(|(w, _)| w)
}

/// [`current_window`], and the VMs created so far it follows from. With
/// `--attribute vm`, a thread that works for a VM (or for a call that may
/// start one) gets its attribution token in place of the time window.
#[inline(always)]
pub(super) fn current_window_at() -> Option<(u32, u64)> {
    let phase = STOPPED.get(0).copied().unwrap_or(0);
    if phase & PHASE_STOPPED != 0 {
        return None;
    }
    let vms = vms_created();
    if let Some(token) = super::attribution::of(Task::current()) {
        return Some((token | parity_bit(phase), vms));
    }
    window_for(vms).map(|w| (w | parity_bit(phase), vms))
}

/// The time window now, whatever the current thread's attribution, with
/// the flush parity; `None` outside every window or after the stop.
#[inline(always)]
pub(super) fn time_window() -> Option<u32> {
    let phase = STOPPED.get(0).copied().unwrap_or(0);
    if phase & PHASE_STOPPED != 0 {
        return None;
    }
    window_for(vms_created()).map(|w| w | parity_bit(phase))
}

/// The [`WINDOW_PARITY`] bit of the flush parity in `phase`.
#[inline(always)]
fn parity_bit(phase: u32) -> u32 {
    if phase & PHASE_PARITY != 0 {
        WINDOW_PARITY
    } else {
        0
    }
}

/// A window recorded when an event began, for the row written now that it
/// ends: under the flush parity of now. Userspace drains a parity after
/// the flip away from it by reading each key's value and then deleting
/// the key, so an event that began before the flip and added to a key of
/// the old parity during the drain would be lost; under the parity of now
/// its add goes to the entries nobody drains yet.
#[inline(always)]
pub(super) fn written_now(recorded: u32) -> u32 {
    if recorded == NO_WINDOW {
        return recorded;
    }
    let phase = STOPPED.get(0).copied().unwrap_or(0);
    (recorded & !WINDOW_PARITY) | parity_bit(phase)
}

// ------------------------------------------------------ losses and counts

#[inline(always)]
pub(super) fn lose(window: u32, loss: Loss) {
    let key = LossKey {
        window,
        loss: loss as u32,
    };
    if let Some(v) = LOSSES.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, not shared with another CPU.
        unsafe { *v += 1 };
    } else {
        let _ = LOSSES.insert(&key, &1, 0);
    }
}

#[inline(always)]
pub(super) fn count(c: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: this CPU's slot.
        unsafe { *v += 1 };
    }
}

// ---------------------------------------------------------- map entries

/// Adds to a map value shared by all CPUs: a BPF atomic add (`lock xadd`),
/// which every BPF cpu version has as long as the result is unused.
#[inline(always)]
pub(super) fn add_atomic(dst: *mut u64, v: u64) {
    // SAFETY: dst points into a map value, valid for the program's run.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            dst, v,
        )
    };
}

/// The value of `key`, inserting `zero` first if there is none; `None`
/// (counted as `full` in `window`) when the map is full. An insert that loses
/// a race with another CPU still finds that CPU's value.
#[inline(always)]
pub(super) fn slot<K, V>(
    map: &HashMap<K, V>,
    key: &K,
    zero: &V,
    window: u32,
    full: Loss,
) -> Option<*mut V> {
    if let Some(v) = map.get_ptr_mut(key) {
        return Some(v);
    }
    let _ = map.insert(key, zero, u64::from(BPF_NOEXIST));
    let v = map.get_ptr_mut(key);
    if v.is_none() {
        lose(window, full);
    }
    v
}

/// The value of `key` set to `zero` (a new one, or the old one reset);
/// `None` when the map is full. (Only a new key's insert can fail in a
/// preallocated map: the lookup then finds nothing.)
#[inline(always)]
pub(super) fn reset<K, V>(map: &HashMap<K, V>, key: &K, zero: &V) -> Option<*mut V> {
    let _ = map.insert(key, zero, 0);
    map.get_ptr_mut(key)
}

/// A map value that adds up timed events: how many, their total and
/// longest time, and where it has one a log2 histogram of them.
pub(super) trait Timed {
    /// The value's count, total and max (ns).
    fn times(v: *mut Self) -> [*mut u64; 3];

    /// The value's histogram, if it has one.
    #[inline(always)]
    fn hist(_v: *mut Self) -> Option<*mut [u64; LOCK_HIST_BUCKETS]> {
        None
    }
}

/// `impl Timed` for a value type from the names of its count, total and max
/// fields (and its histogram's): `timed!(ForkValue, count, total_ns, max_ns)`.
macro_rules! timed {
    ($ty:ty, $count:ident, $total:ident, $max:ident $(, hist: $hist:ident)?) => {
        impl $crate::record::common::Timed for $ty {
            #[inline(always)]
            fn times(v: *mut Self) -> [*mut u64; 3] {
                // SAFETY: v is a valid map value.
                unsafe { [&raw mut (*v).$count, &raw mut (*v).$total, &raw mut (*v).$max] }
            }
            $(
                #[inline(always)]
                fn hist(
                    v: *mut Self,
                ) -> Option<*mut [u64; ::profiler_common::record::LOCK_HIST_BUCKETS]> {
                    // SAFETY: v is a valid map value.
                    Some(unsafe { &raw mut (*v).$hist })
                }
            )?
        }
    };
}
pub(super) use timed;

/// Adds `n` events that took `ns` in all to a timed value (atomic adds;
/// the max is best effort), and one to its histogram's bucket for `ns`.
#[inline(always)]
pub(super) fn add_timed<V: Timed>(v: *mut V, n: u64, ns: u64) {
    let [count, total, max] = V::times(v);
    add_atomic(count, n);
    add_atomic(total, ns);
    // SAFETY: max points into the map value v.
    unsafe {
        if ns > *max {
            *max = ns;
        }
    }
    if let Some(hist) = V::hist(v) {
        let bucket = hist_bucket(ns);
        if bucket < LOCK_HIST_BUCKETS {
            // SAFETY: hist points into the map value v; bucket is in range.
            add_atomic(unsafe { &raw mut (*hist)[bucket] }, 1);
        }
    }
}

/// [`add_timed`] to the value of `key` (see [`slot`]): the timed
/// aggregate of every tracer that times something. Returns the value.
#[inline(always)]
pub(super) fn aggregate<K, V: Timed>(
    map: &HashMap<K, V>,
    key: &K,
    zero: &V,
    window: u32,
    full: Loss,
    ns: u64,
) -> Option<*mut V> {
    let v = slot(map, key, zero, window, full)?;
    add_timed(v, 1, ns);
    Some(v)
}

// ------------------------------------------------------------ the task

/// The current task's comm.
#[inline(always)]
pub(super) fn comm() -> [u8; COMM_LEN] {
    // SAFETY: bpf_get_current_task_btf has no preconditions.
    comm_of(unsafe { bpf_get_current_task_btf() })
}

/// The comm of `task`, the current task as a BTF pointer: two plain loads
/// from its `task_struct` where kernel BTF gave the offset (a helper call
/// costs several times more).
#[inline(always)]
pub(super) fn comm_of(task: *mut task_struct) -> [u8; COMM_LEN] {
    let off = config!(task_comm) as usize;
    if off == 0 {
        return bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    }
    // SAFETY: a BTF pointer to a task; the offset is a constant (read-only
    // config) which the verifier checks against kernel BTF.
    unsafe {
        let words = task.cast::<u8>().add(off).cast::<[u64; COMM_LEN / 8]>();
        core::mem::transmute::<[u64; COMM_LEN / 8], [u8; COMM_LEN]>(core::ptr::read_volatile(words))
    }
}

/// Whether `comm` is `pattern`'s first `len` bytes (and ends there, unless
/// `prefix`).
#[inline(always)]
pub(super) fn comm_matches(
    comm: &[u8; COMM_LEN],
    pattern: &[u8; COMM_LEN],
    len: u32,
    prefix: bool,
) -> bool {
    let len = if len as usize > COMM_LEN {
        COMM_LEN
    } else {
        len as usize
    };
    let mut i = 0;
    while i < COMM_LEN {
        if i >= len {
            break;
        }
        if comm[i] != pattern[i] {
            return false;
        }
        i += 1;
    }
    // An exact pattern must end where the comm ends.
    prefix || len >= COMM_LEN || comm[len] == 0
}

/// The user registers a task entered the kernel with (its `pt_regs`, at
/// the top of its kernel stack), from its BTF pointer: each field a plain
/// load. Its user ip, sp and bp are [`crate::unwind::user_regs`].
#[derive(Clone, Copy)]
pub(super) struct EntryRegs(*const pt_regs);

impl EntryRegs {
    /// `task`'s, a BTF task pointer.
    #[inline(always)]
    pub(super) fn of(task: *mut task_struct) -> Self {
        // SAFETY: the helper takes a BTF task pointer.
        Self(unsafe { bpf_task_pt_regs(task) } as *const pt_regs)
    }

    /// The current task's.
    #[inline(always)]
    pub(super) fn current() -> Self {
        // SAFETY: bpf_get_current_task_btf has no preconditions.
        Self::of(unsafe { bpf_get_current_task_btf() })
    }

    /// The system call the task is in (`orig_rax`).
    #[inline(always)]
    pub(super) fn syscall(self) -> u64 {
        // SAFETY: a BTF pointer (the verifier makes the load a faulting
        // one); volatile keeps it a constant-offset load.
        unsafe { core::ptr::read_volatile(&raw const (*self.0).orig_rax) }
    }

    /// The first argument of its system call (`rdi`).
    #[inline(always)]
    pub(super) fn arg0(self) -> u64 {
        // SAFETY: as in `syscall`.
        unsafe { core::ptr::read_volatile(&raw const (*self.0).rdi) }
    }

    /// Where they are: the task's kernel stack is below.
    #[inline(always)]
    pub(super) fn addr(self) -> u64 {
        self.0 as u64
    }
}

/// The system call a program timing it runs for, by the task's user
/// registers: those `raw_syscalls:sys_enter` and `sys_exit` pass first, or
/// on a call's own classic tracepoint the current task's.
#[derive(Clone, Copy)]
pub(crate) struct Syscall(*const pt_regs);

impl Syscall {
    #[inline(always)]
    pub(crate) fn of(ctx: &BtfTracePointContext) -> Self {
        Self(ctx.arg(0))
    }

    /// The current task's (on a `syscalls:` tracepoint).
    #[inline(always)]
    pub(crate) fn current() -> Self {
        Self(EntryRegs::current().0)
    }

    /// Its return value, at `sys_exit` (`rax`, what the tracepoint
    /// passes as `ret`).
    #[inline(always)]
    pub(super) fn ret(self) -> i64 {
        // SAFETY: as in `nr`.
        unsafe { core::ptr::read_volatile(&raw const (*self.0).rax) as i64 }
    }

    /// Its number (`orig_rax`).
    #[inline(always)]
    pub(super) fn nr(self) -> u64 {
        // SAFETY: a BTF pointer (the verifier makes the load a faulting
        // one); volatile keeps it a constant-offset load.
        unsafe { core::ptr::read_volatile(&raw const (*self.0).orig_rax) }
    }

    /// Whether it is a 64-bit call (a 32-bit process's calls have other
    /// numbers): made from the 64-bit user code segment.
    #[inline(always)]
    pub(super) fn native(self) -> bool {
        // SAFETY: as in `nr`.
        let cs = unsafe { core::ptr::read_volatile(&raw const (*self.0).cs) };
        cs & 0xffff == USER64_CS
    }

    /// Its argument `N` (rdi, rsi, rdx, r10, r8, r9).
    #[inline(always)]
    pub(super) fn arg<const N: usize>(self) -> u64 {
        // SAFETY: as in `nr`.
        unsafe {
            match N {
                0 => core::ptr::read_volatile(&raw const (*self.0).rdi),
                1 => core::ptr::read_volatile(&raw const (*self.0).rsi),
                2 => core::ptr::read_volatile(&raw const (*self.0).rdx),
                3 => core::ptr::read_volatile(&raw const (*self.0).r10),
                4 => core::ptr::read_volatile(&raw const (*self.0).r8),
                _ => core::ptr::read_volatile(&raw const (*self.0).r9),
            }
        }
    }
}

/// x86-64's `__USER_CS`.
const USER64_CS: u64 = 0x33;

// -------------------------------------------------------------- events

/// Sends a rare event (VM created, fork, exec, exit, a request for unwind
/// tables) to userspace; `window` `None` is outside every window.
#[inline(always)]
pub(super) fn emit(kind: EventKind, task: Task, child: u32, ordinal: u64, window: Option<u32>) {
    emit_token(kind, task, child, ordinal, window, 0);
}

/// [`emit`] with an attribution token ([`Event::token`]).
#[inline(always)]
pub(super) fn emit_token(
    kind: EventKind,
    task: Task,
    child: u32,
    ordinal: u64,
    window: Option<u32>,
    token: u32,
) {
    let event = Event {
        kind: kind as u32,
        pid: task.pid(),
        tgid: task.tgid(),
        child,
        ts_ns: now(),
        ordinal,
        window: window.unwrap_or(u32::MAX),
        token,
        comm: comm(),
    };
    // Only an exec (its maps must be read while it lives) and the
    // unwinder's requests for tables wake userspace; the rest waits for
    // those or for userspace's slow tick, instead of a wakeup per fork and
    // exit.
    let flags = if matches!(
        kind,
        EventKind::Exec | EventKind::UnwindTables | EventKind::UnwindMapping
    ) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output(&event, u64::from(flags)).is_err() {
        lose(window.unwrap_or(u32::MAX), Loss::EventDropped);
    }
}
