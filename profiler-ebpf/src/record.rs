//! The recording programs: VM creations, windows, target following, on-CPU
//! samples and off-CPU blocks, aggregated in the kernel.
//!
//! Every program computes the current window from the kernel's VM count when
//! its event happens, so there is no race with userspace.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_USER_STACK, BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, pt_regs, task_struct,
    },
    cty::c_void,
    helpers::generated,
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task_btf, bpf_get_smp_processor_id, bpf_get_stack, bpf_get_task_stack,
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user, bpf_probe_read_user_str_bytes, bpf_task_pt_regs,
    },
    macros::{btf_tracepoint, map, perf_event, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePointContext, PerfEventContext, ProbeContext, RetProbeContext, TracePointContext,
    },
};
use profiler_common::record::{
    BLOCK_SITES, BlockSite, CGROUP_PATH_LEN, CLONE_THREAD, COMM_LEN, CgroupKey, CgroupPending,
    CgroupValue, Config, Counter, DBUS_DEFAULT_TIMEOUT_MS, DBUS_NAME_LEN, DBUS_TIMEOUT_DEFAULT,
    DBUS_TIMEOUT_INFINITE, DbusInflight, DbusKey, DbusLast, DbusNames, DbusValue, Event, EventKind,
    ForkKey, ForkStart, ForkValue, KSTACK_SCAN_WORDS, KSTACK_UNCHECKED, KVM_CREATE_VM,
    LOCK_HIST_BUCKETS, LOCK_KSTACK_FRAMES, LOCK_KSTACK_WORDS, LOCK_KSTACKS, LockBegin, LockKey,
    LockKstack, LockPending, LockValue, Loss, LossKey, MAPPING_SETTLE_NS, MAX_LOCK_NESTING,
    MAX_STACK_DEPTH, MAX_WINDOW_RANGES, NO_SITE, NOT_CHARGED, OffCpuAcc, OffCpuKey, OffCpuStart,
    OffCpuValue, SETUP_WINDOW, STACK_DEFERRED, STACK_EXITING, STACK_ID_MIN, STACK_NOT_TAKEN,
    STACK_SHORT_BLOCK, SampleKey, StackBuf, TargetMode, VM_SOURCE_EXEC, VM_SOURCE_KVM, VmState,
    WindowMode, WindowRange, cgroup_op, dbus_fn, fork_kind, hist_bucket, lock_flags, window_every,
};

use crate::unwind::{self, NoWalk, UNWIND_ALIAS, UNWIND_PROCS};

const EFAULT: i32 = 14;
const ENOMEM: i32 = 12;
const E2BIG: i32 = 7;

/// Set by userspace before load.
#[unsafe(no_mangle)]
pub(crate) static CONFIG: Config = Config::zeroed();

/// Reads one field of [`CONFIG`]; volatile so the load of the patched
/// read-only value is kept.
macro_rules! config {
    ($field:ident) => {
        // SAFETY: CONFIG is a plain static; reading a field is always valid.
        unsafe { core::ptr::read_volatile(&raw const CONFIG.$field) }
    };
    ($outer:ident . $field:ident) => {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&raw const CONFIG.$outer.$field) }
    };
}

#[map]
static ONCPU_COUNTS: HashMap<SampleKey, u64> = HashMap::with_max_entries(65536, 0);
#[map]
static OFFCPU_TIMES: HashMap<OffCpuKey, OffCpuValue> = HashMap::with_max_entries(65536, 0);
#[map]
static OFFCPU_START: HashMap<u64, OffCpuStart> = HashMap::with_max_entries(32768, 0);
/// Stacks by content hash (see `StackBuf`). Preallocated: an insert from
/// the sampling interrupt must not fail for want of memory. Userspace sets
/// the size (`--max-stacks`).
#[map]
pub(crate) static STACKS: HashMap<u64, StackBuf> = HashMap::with_max_entries(65536, 0);
/// Per-CPU scratch for `bpf_get_stack`: a stack is larger than the BPF stack.
#[map]
pub(crate) static STACK_SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(1, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
/// Tracked thread groups (and the tids of followed children, which for a
/// new process is its tgid).
#[map]
static TRACKED: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);
#[map]
static WINDOW_RANGES: Array<WindowRange> = Array::with_max_entries(MAX_WINDOW_RANGES, 0);
#[map]
static VM_STATE: Array<VmState> = Array::with_max_entries(1, 0);
#[map]
static LOSSES: PerCpuHashMap<LossKey, u64> = PerCpuHashMap::with_max_entries(4096, 0);
/// Tracked tasks past `sched_process_exit`: their address space is gone, so
/// a missing user stack is expected, not a loss.
#[map]
static EXITING: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);
/// Processes whose VM was counted at exec (`--vm-event exec:`): their first
/// successful `KVM_CREATE_VM` is that same VM and is not counted again.
#[map]
static VM_BY_EXEC: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);
/// Threads inside a `KVM_CREATE_VM` ioctl.
#[map]
static PENDING_CREATE: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Adds to a map value shared by all CPUs: a BPF atomic add (`lock xadd`),
/// which every BPF cpu version has as long as the result is unused.
#[inline(always)]
fn add_atomic(dst: *mut u64, v: u64) {
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
fn slot<K, V>(map: &HashMap<K, V>, key: &K, zero: &V, window: u32, full: Loss) -> Option<*mut V> {
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

/// Adds one timed event to a value's `count`/`total_ns`/`max_ns` (atomic
/// adds; the max is best effort).
#[inline(always)]
fn add_time(count: *mut u64, total: *mut u64, max: *mut u64, n: u64, ns: u64) {
    add_atomic(count, n);
    add_atomic(total, ns);
    // SAFETY: max points into the same map value as count and total.
    unsafe {
        if ns > *max {
            *max = ns;
        }
    }
}

/// [`add_time`] for one event, plus its log2 histogram bucket.
#[inline(always)]
fn add_timed(
    count: *mut u64,
    total: *mut u64,
    max: *mut u64,
    hist: *mut [u64; LOCK_HIST_BUCKETS],
    ns: u64,
) {
    add_time(count, total, max, 1, ns);
    let bucket = hist_bucket(ns);
    if bucket < LOCK_HIST_BUCKETS {
        // SAFETY: hist points into the same map value as count.
        add_atomic(unsafe { &raw mut (*hist)[bucket] }, 1);
    }
}

/// The current task's tgid (its process) and pid (the thread).
#[inline(always)]
fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn vms_created() -> u64 {
    VM_STATE.get(0).map_or(0, |s| s.created)
}

/// The current window, or `None` outside every window.
#[inline(always)]
fn window_for(vms: u64) -> Option<u32> {
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

/// Set by userspace when the recording stops: the programs stay attached
/// while the maps are read (detaching takes an RCU grace period per probe),
/// but change nothing any more.
#[map]
static STOPPED: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
fn stopped() -> bool {
    STOPPED.get(0).is_some_and(|s| *s != 0)
}

#[inline(always)]
fn current_window() -> Option<u32> {
    if stopped() {
        return None;
    }
    window_for(vms_created())
}

#[inline(always)]
fn lose(window: u32, loss: Loss) {
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
fn is_tracked(tgid: u32) -> bool {
    if tgid == 0 || tgid == config!(self_tgid) {
        return false;
    }
    if config!(target_mode) == TargetMode::All as u32 {
        return true;
    }
    // SAFETY: the value is only tested for presence.
    unsafe { TRACKED.get(&tgid) }.is_some()
}

/// The current task's comm.
#[inline(always)]
fn comm() -> [u8; COMM_LEN] {
    // SAFETY: bpf_get_current_task_btf has no preconditions.
    comm_of(unsafe { bpf_get_current_task_btf() })
}

/// The comm of `task`, the current task as a BTF pointer: two plain loads
/// from its task_struct where kernel BTF gave the offset (a helper call
/// costs several times more).
#[inline(always)]
fn comm_of(task: *mut task_struct) -> [u8; COMM_LEN] {
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

/// Takes the current stack (kernel, or user with `BPF_F_USER_STACK`),
/// stores it in `STACKS` under its content hash and returns the hash.
#[inline(always)]
fn stack_id<C: EbpfContext>(ctx: &C, flags: u64) -> Result<u64, i32> {
    walk_stack(ctx, flags).0
}

/// [`stack_id`], and the number of frames, which stay in `STACK_SCRATCH`.
#[inline(always)]
fn walk_stack<C: EbpfContext>(ctx: &C, flags: u64) -> (Result<u64, i32>, usize) {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return (Err(-ENOMEM), 0);
    };
    // The buffer size bounds the walk. User stacks get `user_stack_depth`
    // frames: without frame pointers (Debian's libvirt, glib, QEMU) a walk
    // runs on through garbage, and every frame costs a user-memory read.
    let size = if flags & u64::from(BPF_F_USER_STACK) != 0 {
        let d = config!(user_stack_depth) as usize;
        let d = if d == 0 || d > MAX_STACK_DEPTH {
            MAX_STACK_DEPTH
        } else {
            d
        };
        d * 8
    } else {
        core::mem::size_of::<StackBuf>()
    };
    // SAFETY: buf is this CPU's scratch value, at least `size` bytes.
    let n = unsafe { bpf_get_stack(ctx.as_ptr(), buf.cast(), size as u32, flags) };
    (store_stack(n), n.max(0) as usize / 8)
}

/// Stores the `n` bytes of frames a stack helper (or the unwinder) left in
/// `STACK_SCRATCH` in `STACKS` under their content hash, and returns the
/// hash.
#[inline(always)]
fn store_stack(n: i64) -> Result<u64, i32> {
    if n < 0 {
        return Err(n as i32);
    }
    match hvprof_store_stack(n as u64 / 8) {
        id if id < STACK_ID_MIN => Err(-(id as i32)),
        id => Ok(id),
    }
}

/// [`store_stack`] of the `frames` frames in this CPU's `STACK_SCRATCH`,
/// as a global BPF function (exported by `build.rs`): verified once per
/// program rather than at each of its many call sites, where its two loops
/// over the frames multiplied the paths. Returns the hash, or an errno
/// below `STACK_ID_MIN`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn hvprof_store_stack(frames: u64) -> u64 {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return ENOMEM as u64;
    };
    if frames == 0 {
        return EFAULT as u64;
    }
    let frames = frames as usize;
    // FNV-1a over the frames.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < MAX_STACK_DEPTH {
        if i >= frames {
            break;
        }
        // SAFETY: i < MAX_STACK_DEPTH, inside the scratch buffer.
        let ip = unsafe { (*buf).ips[i] };
        h = (h ^ ip).wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    if h < STACK_ID_MIN {
        h |= 1 << 63;
    }
    // SAFETY: only presence is tested.
    if unsafe { STACKS.get(&h) }.is_none() {
        // A new stack (rare once warm): clear what an earlier, deeper stack
        // left in the scratch, so the stored copy ends with zeros.
        let mut i = 0;
        while i < MAX_STACK_DEPTH {
            if i >= frames {
                // SAFETY: i < MAX_STACK_DEPTH, inside the scratch buffer.
                // Volatile: a loop of plain stores becomes a memset the
                // verifier rejects.
                unsafe { core::ptr::write_volatile(&raw mut (*buf).ips[i], 0) };
            }
            i += 1;
        }
        // SAFETY: buf is valid for reads of one StackBuf.
        if let Err(e) = STACKS.insert(&h, unsafe { &*buf }, 0) {
            return u64::from((-e) as u32);
        }
    }
    h
}

/// A kernel stack id, or the reason there is none, counting what is lost.
#[inline(always)]
fn kern_stack_or_reason(id: Result<u64, i32>, window: u32) -> u64 {
    match id {
        Ok(id) => id,
        Err(e) => {
            // -EFAULT: no kernel stack (the task was in user mode).
            match -e {
                EFAULT => {}
                E2BIG | ENOMEM => lose(window, Loss::StackMapFull),
                _ => lose(window, Loss::KernStackError),
            }
            u64::from((-e) as u32)
        }
    }
}

/// The current task's user stack id, or the reason there is none: from
/// the unwind tables (`--unwind dwarf`) where the process's are loaded,
/// else the kernel's frame-pointer walk.
#[inline(always)]
fn user_stack<C: EbpfContext>(ctx: &C, window: u32) -> u64 {
    user_stack_walk(ctx, window).0
}

/// [`user_stack`], and whether the stack may be remembered for the site:
/// not when the walk stopped for want of tables that are on their way (a
/// process not loaded yet, a PC in a mapping not read yet), or a thread
/// blocking again there would keep the short stack.
#[inline(always)]
fn user_stack_walk<C: EbpfContext>(ctx: &C, window: u32) -> (u64, bool) {
    let mut cacheable = true;
    if config!(unwind_dwarf) != 0 {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        match unwind::walk_current(tgid, window, config!(user_stack_depth)) {
            Ok(walked) => {
                if walked.unknown_mapping {
                    ask_tables(tgid, window);
                }
                let id = store_stack((walked.frames * 8) as i64);
                return (user_stack_or_reason(id, window), !walked.unknown_mapping);
            }
            // Not dropped: frame pointers meanwhile, and the tables asked
            // for.
            Err(NoWalk::NotLoaded) => {
                ask_tables(tgid, window);
                cacheable = false;
            }
            Err(NoWalk::NoUserStack) => {}
        }
    }
    let id = stack_id(ctx, u64::from(BPF_F_USER_STACK));
    (user_stack_or_reason(id, window), cacheable)
}

/// A user stack id, or the reason there is none, counting what is lost.
#[inline(always)]
fn user_stack_or_reason(id: Result<u64, i32>, window: u32) -> u64 {
    match id {
        Ok(id) => id,
        Err(e) => {
            match -e {
                E2BIG | ENOMEM => lose(window, Loss::StackMapFull),
                // With -a, kernel threads have no user stack: not a loss.
                EFAULT if config!(target_mode) == TargetMode::All as u32 => {}
                EFAULT if is_exiting() => return STACK_EXITING,
                _ => lose(window, Loss::UserStackMissing),
            }
            u64::from((-e) as u32)
        }
    }
}

/// When each process last asked userspace for its unwind tables.
#[map]
static UNWIND_ASKED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);

/// Asks userspace to read the process's mappings and load their tables
/// (at most every 50 ms per process).
#[inline(always)]
fn ask_tables(tgid: u32, window: u32) {
    let now = now();
    // SAFETY: a valid map value, read only.
    if let Some(last) = unsafe { UNWIND_ASKED.get(&tgid) }
        && now.saturating_sub(*last) < 50_000_000
    {
        return;
    }
    let _ = UNWIND_ASKED.insert(&tgid, &now, 0);
    let pid = bpf_get_current_pid_tgid() as u32;
    emit(EventKind::UnwindTables, tgid, pid, 0, 0, Some(window));
}

/// Kernel and user stack ids of the current task, counting what is lost.
#[inline(always)]
fn stacks<C: EbpfContext>(ctx: &C, window: u32) -> (u64, u64) {
    let kern = kern_stack_or_reason(stack_id(ctx, 0), window);
    (kern, user_stack(ctx, window))
}

/// The return address of the function blocking at `regs` (the current
/// task's ip, sp, bp): the one its unwind row gives (`--unwind dwarf`),
/// else the word at bp+8 (right only where the function keeps a frame
/// pointer); 0 if unreadable. Two blocks of a thread with the same four
/// are at the same site, with the same user call chain.
#[inline(always)]
fn site_return(regs: [u64; 3]) -> u64 {
    let [ip, sp, bp] = regs;
    let from_tables = if config!(unwind_dwarf) != 0 {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        unwind::return_address(tgid, ip, sp, bp)
    } else {
        None
    };
    // SAFETY: a user read, checked by the helper.
    from_tables
        .unwrap_or_else(|| unsafe { bpf_probe_read_user((bp + 8) as *const u64) }.unwrap_or(0))
}

#[inline(always)]
fn is_exiting() -> bool {
    let pid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: only presence is tested.
    unsafe { EXITING.get(&pid) }.is_some()
}

#[inline(always)]
fn read<T: Copy>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    // SAFETY: the offset comes from the tracepoint's format file; the read is
    // checked by the kernel.
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

// ---------------------------------------------------------------- on-CPU

#[perf_event]
pub fn oncpu_sample(ctx: PerfEventContext) -> u32 {
    let (tgid, pid) = current_ids();
    // pid 0 is the idle task.
    if pid == 0 || !is_tracked(tgid) {
        return 0;
    }
    let Some(window) = current_window() else {
        return 0;
    };
    let (kern_stack, user_stack) = stacks(&ctx, window);
    let key = SampleKey {
        window,
        tgid,
        pid,
        pad: 0,
        kern_stack,
        user_stack,
        comm: comm(),
    };
    if let Some(count) = slot(&ONCPU_COUNTS, &key, &0, window, Loss::OnCpuMapFull) {
        add_atomic(count, 1);
    }
    0
}

// --------------------------------------------------------------- off-CPU

/// `sched_switch`'s raw `prev_state` (`task_struct.__state`) bits.
const TASK_DEAD: u32 = 0x80;
const TASK_IDLE: u32 = 0x402;
const TASK_RTLOCK_WAIT: u32 = 0x1000;
/// The states `sched_switch`'s trace event reports (`S D T t X Z P`).
const TASK_REPORT: u32 = 0x7f;
const TASK_REPORT_UNINTERRUPTIBLE: u32 = 0x2;
const TASK_REPORT_IDLE: u32 = 0x80;
/// Reported for a preempted task (`R+`).
const TASK_REPORT_MAX: u32 = 0x100;

/// The state as the `sched_switch` trace event reports it (one bit of
/// `S D T t X Z P I`, `R+` preempted, 0 running), from the raw arguments:
/// the kernel's `__trace_sched_switch_state`.
#[inline(always)]
fn report_state(preempt: bool, raw: u32) -> u32 {
    if preempt {
        return TASK_REPORT_MAX;
    }
    if raw & TASK_IDLE == TASK_IDLE {
        return TASK_REPORT_IDLE;
    }
    if raw & TASK_RTLOCK_WAIT != 0 {
        return TASK_REPORT_UNINTERRUPTIBLE;
    }
    // The highest reported bit, as the kernel's fls() picks it.
    let s = raw & TASK_REPORT;
    let mut bit = 0x40;
    while bit != 0 {
        if s & bit != 0 {
            return bit;
        }
        bit >>= 1;
    }
    0
}

/// A BTF tracepoint (raw, typed arguments, no trace-event record to fill):
/// `sched_switch(bool preempt, struct task_struct *prev, struct
/// task_struct *next, unsigned int prev_state)`. Starts are keyed by task
/// pointer, the same for a task at switch-out and switch-in. A block's wait
/// for a CPU comes from the kernel's own run-queue accounting (see
/// `settle_runq`), so no program runs at each wakeup.
///
/// Switch-out takes the user stack, and the kernel stack only for an
/// uninterruptible wait. Other kernel stacks are walked when the task comes
/// back, from the task itself (`bpf_get_task_stack` on the stopped `next`),
/// and only for a block of at least `kstack_min_ns`: a kernel walk is the
/// dearest thing here (about 1 µs, most of it fixed cost), and a thread
/// ping-ponging on a futex blocks for microseconds tens of thousands of
/// times a second.
#[btf_tracepoint(function = "sched_switch")]
pub fn offcpu_sched_switch(ctx: BtfTracePointContext) -> u32 {
    let now = now();
    let next: *mut task_struct = ctx.arg(2);
    switch_out(&ctx, now);
    switch_in(next, now)
}

/// A new thread's off-CPU entry (larger than the BPF stack allows).
#[unsafe(no_mangle)]
static OFFCPU_START_ZERO: OffCpuStart = OffCpuStart {
    key: OffCpuKey::ZERO,
    start_ns: 0,
    run_delay: 0,
    slot: NO_SITE,
    next_slot: 0,
    charged: NOT_CHARGED,
    pad: 0,
    acc: OffCpuAcc::ZERO,
    sites: [BlockSite::EMPTY; BLOCK_SITES],
};

/// Per CPU: its idle task (pid 0), never tracked.
#[map]
static IDLE_TASK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The task switching out (current, `prev`): if it blocks, note when and
/// where.
#[inline(always)]
fn switch_out(ctx: &BtfTracePointContext, now: u64) {
    let preempt: u64 = ctx.arg(0);
    // The current task, as a BTF pointer: its fields are plain loads.
    let prev: *mut task_struct = ctx.arg(1);
    let raw_state: u64 = ctx.arg(3);
    let task = prev as u64;
    let (tgid, pid) = current_ids();
    if pid == 0 {
        // This CPU's idle task: remembered, so switching back to it costs
        // no map lookup.
        if let Some(idle) = IDLE_TASK.get_ptr_mut(0) {
            // SAFETY: this CPU's slot.
            unsafe { *idle = task };
        }
        return;
    }
    // After the stop userspace reads the entries: nothing changes them.
    if stopped() {
        return;
    }
    // A thread with an entry is tracked: only tracked threads get one, and
    // it goes when they exit. So the tracked-set lookup is only for threads
    // without one yet.
    let mut entry = own_entry(task, pid);
    match entry {
        // First, whatever comes of this switch: the last block's run-queue
        // wait.
        Some(e) => settle_runq(e, prev),
        None if !is_tracked(tgid) => return,
        None => {}
    }
    let Some(window) = current_window() else {
        return;
    };
    let raw_state = raw_state as u32;
    // A task switching out for the last time (exit) never comes back; it
    // is not blocked.
    if preempt == 0 && raw_state & TASK_DEAD != 0 {
        let _ = EXITING.remove(&pid);
        return;
    }
    let state = report_state(preempt != 0, raw_state);
    if entry.is_none() {
        // The thread's first block (or a reused task_struct's): its entry,
        // from a zeroed template (too large for the BPF stack).
        if OFFCPU_START.insert(&task, &OFFCPU_START_ZERO, 0).is_err() {
            lose(window, Loss::OffCpuStartFull);
            return;
        }
        entry = OFFCPU_START.get_ptr_mut(&task);
        if let Some(e) = entry {
            settle_runq(e, prev);
        }
    }
    let Some(e) = entry else {
        return;
    };
    // Preempted (R): waiting for a CPU, not blocked. Its stack is where it
    // ran, which on-CPU samples show; walking it at every preemption is
    // most of the off-CPU cost under CPU contention.
    let preempted = state == 0 || state == TASK_REPORT_MAX;
    let walk = !preempted || config!(preempted_stacks) != 0;
    let mut slot = NO_SITE;
    let (kern_stack, user_stack) = if !walk {
        count(Counter::OffCpuPreempted);
        (STACK_NOT_TAKEN, STACK_NOT_TAKEN)
    } else {
        // Uninterruptible (D): a mutex, rwsem, I/O or completion wait. The
        // wait primitive is the point, and a stopped task's walk leaves out
        // scheduler-section functions (mutex_lock, io_schedule, ...): walk
        // now. Other sleeps (futex, poll, pipe, nanosleep: the syscall names
        // the wait) are walked when they come back, if long enough.
        let kern = if state == TASK_REPORT_UNINTERRUPTIBLE {
            count(Counter::OffCpuKernWalkOut);
            kern_stack_or_reason(stack_id(ctx, 0), window)
        } else {
            STACK_DEFERRED
        };
        // The user stack is reused when the thread blocks again at one of
        // the last sites it blocked at (a QEMU worker on its futex, a main
        // loop in ppoll): four register reads instead of a walk.
        let (user, at) = site_user_stack(
            ctx,
            prev,
            e,
            window,
            Counter::OffCpuUserCached,
            Counter::OffCpuUserWalk,
        );
        slot = at;
        (kern, user)
    };
    let key = OffCpuKey {
        window,
        tgid,
        pid,
        state,
        dbus: dbus_inflight(pid),
        pad: 0,
        kern_stack,
        user_stack,
        comm: comm_of(prev),
    };
    // SAFETY: a valid map value of this thread, which is running here and
    // so is neither switched in nor woken meanwhile.
    unsafe {
        (*e).key = key;
        (*e).start_ns = now;
        (*e).slot = slot;
    }
}

/// The off-CPU entry of the current thread (`task`, `pid`), if it has one
/// (the pid check guards a reused task_struct).
#[inline(always)]
fn own_entry(task: u64, pid: u32) -> Option<*mut OffCpuStart> {
    OFFCPU_START
        .get_ptr_mut(&task)
        // SAFETY: a valid map value.
        .filter(|e| unsafe { (**e).key.pid } == pid)
}

/// The remembered sites of a thread's entry.
#[inline(always)]
fn sites_of(e: *mut OffCpuStart) -> *mut BlockSite {
    // SAFETY: e is a valid map value.
    unsafe { (&raw mut (*e).sites).cast::<BlockSite>() }
}

/// With `verify_stack_cache`: the stack `walked` anyway where `reused`
/// would have been taken, counting a difference.
#[inline(always)]
fn verified(reused: u64, walked: u64, differs: Counter) -> u64 {
    if walked >= STACK_ID_MIN && walked != reused {
        count(differs);
    }
    walked
}

/// The current thread's user stack: the one remembered with its entry `e`
/// if the thread is at one of the sites there (same user ip, sp, bp and
/// return address: the same call chain), else a walk, remembered in the
/// oldest site. Returns the stack id and the site's slot (`NO_SITE` if
/// none), and counts a reuse as `cached`, a walk as `walked`.
#[inline(always)]
fn site_user_stack<C: EbpfContext>(
    ctx: &C,
    task: *mut task_struct,
    e: *mut OffCpuStart,
    window: u32,
    cached: Counter,
    walked: Counter,
) -> (u64, u32) {
    // With the return address (see `site_return`), the user ip, sp and bp
    // where the thread blocks are the key of a blocking site.
    let regs = if config!(block_site_cache) != 0 {
        unwind::user_regs(task)
    } else {
        [0; 3]
    };
    // The site's return address, found only where a site needs it: one
    // whose walk recorded where its first return addresses sit is checked
    // by them, frame 0's included, which costs one read instead of a row
    // search (most switches of a thread are at a site it knows).
    let mut ret = None;
    if regs[0] != 0 {
        let sites = sites_of(e);
        let mut i = 0;
        while i < BLOCK_SITES {
            // SAFETY: i < BLOCK_SITES, inside the thread's entry.
            let s = unsafe { &*sites.add(i) };
            if s.user_stack >= STACK_ID_MIN
                && s.user[0] == regs[0]
                && s.user[1] == regs[1]
                && s.user[2] == regs[2]
                && if s.user_check[0] != 0 {
                    unwind::hvprof_site_matches(
                        s.user_check_hash,
                        regs[1],
                        s.user_check[0],
                        s.user_check[1],
                    ) != 0
                } else {
                    *ret.get_or_insert_with(|| site_return(regs)) == s.user[3]
                }
            {
                count(cached);
                if config!(verify_stack_cache) != 0 {
                    return (
                        verified(
                            s.user_stack,
                            user_stack(ctx, window),
                            Counter::UserReuseDiffers,
                        ),
                        i as u32,
                    );
                }
                return (s.user_stack, i as u32);
            }
            i += 1;
        }
    }
    count(walked);
    let (user, cacheable) = user_stack_walk(ctx, window);
    if user < STACK_ID_MIN || regs[0] == 0 || !cacheable {
        return (user, NO_SITE);
    }
    let (check, check_hash) = if config!(unwind_dwarf) != 0 {
        unwind::last_site_check()
    } else {
        ([0; 2], 0)
    };
    let ret = if check[0] != 0 {
        0
    } else {
        ret.unwrap_or_else(|| site_return(regs))
    };
    // A new site replaces the oldest, whose blocks go to the map first
    // (with the last block's run-queue wait, if it is one of them).
    // SAFETY: the thread's own entry (it is running here, so no switch-in
    // reads its sites meanwhile).
    unsafe {
        settle_runq(e, task);
        let next = (*e).next_slot as usize;
        let next = if next < BLOCK_SITES { next } else { 0 };
        flush(&raw mut (*sites_of(e).add(next)).acc);
        *sites_of(e).add(next) = BlockSite {
            user: [regs[0], regs[1], regs[2], ret],
            user_stack: user,
            user_check: check,
            user_check_hash: check_hash,
            ..BlockSite::EMPTY
        };
        (*e).next_slot = ((next + 1) % BLOCK_SITES) as u32;
        (user, next as u32)
    }
}

/// The task switching in: if it was blocked, charge its block.
#[inline(always)]
fn switch_in(next: *mut task_struct, now: u64) -> u32 {
    if stopped() {
        return 0;
    }
    let task = next as u64;
    if IDLE_TASK.get(0).is_some_and(|idle| *idle == task) {
        return 0;
    }
    let Some(e) = OFFCPU_START.get_ptr_mut(&task) else {
        return 0;
    };
    // SAFETY: a valid map value of this task, which is not running.
    let (start_ns, mut key) = unsafe {
        let start_ns = (*e).start_ns;
        if start_ns == 0 {
            return 0;
        }
        (*e).start_ns = 0;
        (start_ns, (*e).key)
    };
    let blocked = now.saturating_sub(start_ns);
    if blocked < config!(min_block_ns) || blocked > config!(max_block_ns) {
        return 0;
    }
    if key.kern_stack == STACK_DEFERRED {
        key.kern_stack = if blocked < config!(kstack_min_ns) {
            count(Counter::OffCpuKernShort);
            STACK_SHORT_BLOCK
        } else {
            // SAFETY: e is this task's valid map value.
            kernel_stack_at_site(next, sites_of(e), unsafe { (*e).slot }, key.window)
        };
    }
    // SAFETY: e is this task's valid map value, written only by the task
    // itself (switch-out, exit) and here, when it is switched in.
    unsafe {
        let slot = (*e).slot;
        let acc = acc_at(e, &raw const (*e).slot);
        // Its run-queue wait is added when the task next switches out.
        (*e).charged = if slot < NO_SITE { slot } else { NO_SITE };
        let block = OffCpuValue::block(blocked, 0);
        if (*acc).value.count != 0 {
            if same_key(&raw const (*acc).key, &raw const key) {
                (*acc).value.add(&block);
                return 0;
            }
            add_offcpu(&(*acc).key, &(*acc).value);
        }
        (*acc).key = key;
        (*acc).value = block;
    }
    0
}

/// The accumulator of a thread's entry `e` that `*slot` names: a site's,
/// or the entry's own for `NO_SITE` (or anything out of range).
#[inline(always)]
fn acc_at(e: *mut OffCpuStart, slot: *const u32) -> *mut OffCpuAcc {
    // SAFETY: e is a valid map value and slot points into it; the index is
    // checked.
    unsafe {
        if (*slot as usize) < BLOCK_SITES {
            // Read again (volatile, so the compiler cannot know it is in
            // range and drop the mask): the mask bounds it for the verifier.
            let i = core::ptr::read_volatile(slot) as usize;
            &raw mut (*sites_of(e).add(i & (BLOCK_SITES - 1))).acc
        } else {
            &raw mut (*e).acc
        }
    }
}

/// The total run-queue wait so far of `task` (the current task, as a BTF
/// pointer): the kernel's `sched_info.run_delay`, in ns; 0 if unknown.
#[inline(always)]
fn run_delay(task: *mut task_struct) -> u64 {
    let off = config!(task_run_delay) as usize;
    if off == 0 {
        return 0;
    }
    // SAFETY: as in comm_of.
    unsafe { core::ptr::read_volatile(task.cast::<u8>().add(off).cast::<u64>()) }
}

/// Adds the current thread's run-queue wait since it last switched out
/// (the kernel adds a wait as the task is switched in, after the
/// tracepoint) to the accumulator its last block went to, and starts
/// anew. Called by the thread itself, before anything else changes its
/// accumulators: at switch-out, when a site is replaced, at exit.
#[inline(always)]
fn settle_runq(e: *mut OffCpuStart, task: *mut task_struct) {
    let now = run_delay(task);
    // SAFETY: the current thread's own entry.
    unsafe {
        if (*e).charged != NOT_CHARGED {
            let acc = acc_at(e, &raw const (*e).charged);
            if (*acc).value.count != 0 {
                (*acc).value.add_runq(now.saturating_sub((*e).run_delay));
            }
            (*e).charged = NOT_CHARGED;
        }
        (*e).run_delay = now;
    }
}

/// Adds an accumulator's blocks to the off-CPU map and empties it.
#[inline(always)]
fn flush(acc: *mut OffCpuAcc) {
    // SAFETY: a valid map value of the thread running here (or of one
    // being switched in), the caller's to write.
    unsafe {
        if (*acc).value.count != 0 {
            add_offcpu(&(*acc).key, &(*acc).value);
            (*acc).value.count = 0;
        }
    }
}

/// Whether two off-CPU keys are equal, word by word (no memcmp in BPF).
#[inline(always)]
fn same_key(a: *const OffCpuKey, b: *const OffCpuKey) -> bool {
    const WORDS: usize = core::mem::size_of::<OffCpuKey>() / 8;
    let (a, b) = (a.cast::<u64>(), b.cast::<u64>());
    let mut i = 0;
    while i < WORDS {
        // SAFETY: i < WORDS, inside both keys.
        if unsafe { *a.add(i) != *b.add(i) } {
            return false;
        }
        i += 1;
    }
    true
}

/// Adds a thread's accumulated blocks to the off-CPU map.
#[inline(always)]
fn add_offcpu(key: &OffCpuKey, value: &OffCpuValue) {
    count(Counter::OffCpuMapUpdates);
    if let Some(v) = OFFCPU_TIMES.get_ptr_mut(key) {
        // SAFETY: a valid map value. Keys hold the pid, and only the thread
        // itself adds its blocks (at switch-in and at exit), so plain updates
        // do not race.
        unsafe { (*v).add(value) };
    } else if OFFCPU_TIMES.insert(key, value, 0).is_err() {
        lose(key.window, Loss::OffCpuMapFull);
    }
}
/// Scratch for the top of a stopped task's kernel stack.
#[map]
static KSTACK_WORDS: PerCpuArray<[u64; KSTACK_SCAN_WORDS]> = PerCpuArray::with_max_entries(1, 0);

/// The word `at` words above `sp` on a kernel stack (0 if unreadable).
#[inline(always)]
fn kstack_word(sp: u64, at: u32) -> u64 {
    // SAFETY: a kernel read through the checked helper.
    unsafe { bpf_probe_read_kernel((sp + u64::from(at) * 8) as *const u64) }.unwrap_or(0)
}

/// The kernel stack of a stopped task that blocked at site `slot` (of
/// `sites`): the one walked there last time if the task is in the same
/// syscall and its stack holds the same two innermost return addresses at
/// the same places above its saved stack pointer; else a walk, remembered
/// for next time.
#[inline(always)]
fn kernel_stack_at_site(
    task: *mut task_struct,
    sites: *mut BlockSite,
    slot: u32,
    window: u32,
) -> u64 {
    let off = config!(task_thread_sp) as usize;
    let slot = slot as usize;
    if off == 0 || slot >= BLOCK_SITES {
        return task_kernel_stack(task, window);
    }
    let verify = config!(verify_stack_cache) != 0;
    // SAFETY: task is the tracepoint's BTF task pointer (its saved stack
    // pointer is read with the checked helper, its user registers with
    // plain loads); slot < BLOCK_SITES, inside the task's entry.
    unsafe {
        let sp = bpf_probe_read_kernel(task.cast::<u8>().add(off).cast::<u64>()).unwrap_or(0);
        let regs = bpf_task_pt_regs(task) as *const pt_regs;
        let nr = core::ptr::read_volatile(&raw const (*regs).orig_rax);
        let site = sites.add(slot);
        if sp != 0 && (*site).kern_stack >= STACK_ID_MIN && (*site).syscall == nr {
            let [at0, at1] = (*site).kern_ret_at;
            if kstack_word(sp, at0) == (*site).kern_ret[0]
                && (at1 == KSTACK_UNCHECKED || kstack_word(sp, at1) == (*site).kern_ret[1])
            {
                count(Counter::OffCpuKernCached);
                if verify {
                    return verified(
                        (*site).kern_stack,
                        task_kernel_stack(task, window),
                        Counter::KernReuseDiffers,
                    );
                }
                return (*site).kern_stack;
            }
        }
        let id = task_kernel_stack(task, window);
        (*site).kern_stack = 0;
        if sp != 0 && id >= STACK_ID_MIN {
            remember_kernel_stack(site, sp, nr, id);
        }
        id
    }
}

/// Finds where the return addresses just walked (still in the scratch)
/// sit above `sp`, and keeps them with the stack id in `site`.
///
/// The positions found are written straight into the map value, never held
/// in a register: the verifier then sees one state per loop step instead of
/// one per position, which is what keeps this loop within its limits.
#[inline(always)]
fn remember_kernel_stack(site: *mut BlockSite, sp: u64, nr: u64, id: u64) {
    let (Some(words), Some(ips)) = (KSTACK_WORDS.get_ptr_mut(0), STACK_SCRATCH.get_ptr(0)) else {
        return;
    };
    // SAFETY: both are this CPU's scratch values, site a valid map value;
    // the kernel reads are checked (the top of the stack may be nearer than
    // 2 KiB: then a quarter is read).
    unsafe {
        let mut len = KSTACK_SCAN_WORDS;
        if generated::bpf_probe_read_kernel(words.cast(), (len * 8) as u32, sp as *const c_void)
            != 0
        {
            len = KSTACK_SCAN_WORDS / 4;
            if generated::bpf_probe_read_kernel(words.cast(), (len * 8) as u32, sp as *const c_void)
                != 0
            {
                return;
            }
        }
        let (ret0, ret1) = ((*ips).ips[0], (*ips).ips[1]);
        let at = &raw mut (*site).kern_ret_at;
        core::ptr::write_volatile(at, [KSTACK_UNCHECKED; 2]);
        let mut i = 0;
        while i < KSTACK_SCAN_WORDS {
            if i >= len {
                break;
            }
            let w = (*words)[i];
            if w == ret0 && core::ptr::read_volatile(&raw const (*at)[0]) == KSTACK_UNCHECKED {
                core::ptr::write_volatile(&raw mut (*at)[0], i as u32);
            } else if w == ret1
                && core::ptr::read_volatile(&raw const (*at)[0]) != KSTACK_UNCHECKED
                && core::ptr::read_volatile(&raw const (*at)[1]) == KSTACK_UNCHECKED
            {
                core::ptr::write_volatile(&raw mut (*at)[1], i as u32);
            }
            i += 1;
        }
        if core::ptr::read_volatile(&raw const (*at)[0]) == KSTACK_UNCHECKED {
            return;
        }
        (*site).kern_ret = [
            ret0,
            if core::ptr::read_volatile(&raw const (*at)[1]) == KSTACK_UNCHECKED {
                0
            } else {
                ret1
            },
        ];
        (*site).syscall = nr;
        (*site).kern_stack = id;
    }
}

/// The kernel stack of a task that is not running: where it blocked, as it
/// still is until it is switched in.
#[inline(always)]
fn task_kernel_stack(task: *mut task_struct, window: u32) -> u64 {
    count(Counter::OffCpuKernWalkIn);
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        lose(window, Loss::KernStackError);
        return u64::from(ENOMEM as u32);
    };
    // SAFETY: task is the tracepoint's BTF task pointer; buf is this CPU's
    // scratch value, one StackBuf long.
    let n =
        unsafe { bpf_get_task_stack(task, buf.cast(), core::mem::size_of::<StackBuf>() as u32, 0) };
    kern_stack_or_reason(store_stack(n), window)
}

// ------------------------------------------------------ tasks and targets

#[inline(always)]
fn emit(kind: EventKind, tgid: u32, pid: u32, child: u32, ordinal: u64, window: Option<u32>) {
    let event = Event {
        kind: kind as u32,
        pid,
        tgid,
        child,
        ts_ns: now(),
        ordinal,
        window: window.unwrap_or(u32::MAX),
        pad: 0,
        comm: comm(),
    };
    // Only an exec wakes userspace (its maps must be read while it lives);
    // the rest waits for that or for userspace's slow tick, instead of a
    // wakeup per fork and exit.
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

/// `sched_process_fork` runs in the parent.
#[tracepoint]
pub fn task_fork(ctx: TracePointContext) -> u32 {
    let (tgid, pid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let Some(child) = read::<i32>(&ctx, config!(offsets.fork_child_pid)) else {
        return 0;
    };
    let child = child as u32;
    // A new thread is neither a process to follow nor an event: the parent
    // is in clone or clone3 with CLONE_THREAD (an io_uring worker, made
    // elsewhere, still goes to userspace, which tells it apart there).
    if creates_thread() {
        return 0;
    }
    if config!(target_mode) == TargetMode::Tracked as u32 && config!(follow_children) != 0 {
        // A new process (its pid is its tgid), or rarely a thread made
        // outside clone (an io_uring worker: its tid is harmless here and
        // is removed when it exits).
        if TRACKED.insert(&child, &tgid, 0).is_err() {
            lose(current_window().unwrap_or(u32::MAX), Loss::TrackedFull);
        }
    }
    // A child runs its parent's image until it execs: the same mappings.
    if config!(unwind_dwarf) != 0
        && let Some(owner) = unwind::owner_of(tgid)
    {
        let _ = UNWIND_ALIAS.insert(&child, &owner, 0);
    }
    emit(EventKind::Fork, tgid, pid, child, 0, current_window());
    0
}

/// Whether the current task is in a clone or clone3 system call that
/// creates a thread (`CLONE_THREAD`), from its syscall registers.
#[inline(always)]
fn creates_thread() -> bool {
    // SAFETY: the current task's BTF pointer: plain loads of its user
    // registers.
    let (nr, arg0) = unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        (
            core::ptr::read_volatile(&raw const (*regs).orig_rax) as u32,
            core::ptr::read_volatile(&raw const (*regs).rdi),
        )
    };
    let flags = if nr == config!(nr_clone) {
        arg0
    } else if nr == config!(nr_clone3) {
        // struct clone_args starts with `flags`.
        // SAFETY: a user pointer, read with the checked helper.
        unsafe { bpf_probe_read_user(arg0 as *const u64) }.unwrap_or(0)
    } else {
        0
    };
    flags & CLONE_THREAD != 0
}

#[inline(always)]
fn comm_matches(comm: &[u8; COMM_LEN], pattern: &[u8; COMM_LEN], len: u32, prefix: bool) -> bool {
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

/// `sched_process_exec` runs in the new image: the comm is the new one.
#[tracepoint]
pub fn task_exec(_ctx: TracePointContext) -> u32 {
    let (tgid, pid) = current_ids();
    if tgid == config!(self_tgid) {
        return 0;
    }
    let comm = comm();
    if config!(target_comm_len) != 0
        && config!(target_mode) == TargetMode::Tracked as u32
        && comm_matches(
            &comm,
            &config!(target_comm),
            config!(target_comm_len),
            false,
        )
        && TRACKED.insert(&tgid, &tgid, 0).is_err()
    {
        lose(current_window().unwrap_or(u32::MAX), Loss::TrackedFull);
    }
    if config!(vm_event_exec) != 0
        && comm_matches(
            &comm,
            &config!(vm_exec_comm),
            config!(vm_exec_len),
            config!(vm_exec_prefix) != 0,
        )
    {
        vm_created(tgid, pid, VM_SOURCE_EXEC);
        if config!(vm_event_kvm) != 0 {
            let _ = VM_BY_EXEC.insert(&tgid, &1, 0);
        }
    }
    if is_tracked(tgid) {
        // The old image's mappings are gone: frame pointers until
        // userspace loads the new ones.
        if config!(unwind_dwarf) != 0 {
            let _ = UNWIND_PROCS.remove(&tgid);
            let _ = UNWIND_ALIAS.remove(&tgid);
        }
        emit(EventKind::Exec, tgid, pid, 0, 0, current_window());
    }
    0
}

#[tracepoint]
pub fn task_exit(_ctx: TracePointContext) -> u32 {
    let (tgid, pid) = current_ids();
    if pid == tgid && config!(vm_event_exec) != 0 && config!(vm_event_kvm) != 0 {
        let _ = VM_BY_EXEC.remove(&tgid);
    }
    // Whether tracked or not (its process may have stopped being tracked
    // first): an entry makes a thread count as tracked. Its blocks not yet
    // in the off-CPU map go there first. After the stop the entry stays for
    // userspace to read.
    // SAFETY: bpf_get_current_task_btf has no preconditions.
    let current = unsafe { bpf_get_current_task_btf() };
    let task = current as u64;
    if !stopped() {
        if let Some(e) = OFFCPU_START.get_ptr_mut(&task) {
            settle_runq(e, current);
            // SAFETY: the exiting thread's own entry; i < BLOCK_SITES.
            unsafe {
                flush(&raw mut (*e).acc);
                let mut i = 0;
                while i < BLOCK_SITES {
                    flush(&raw mut (*sites_of(e).add(i)).acc);
                    i += 1;
                }
            }
        }
        let _ = OFFCPU_START.remove(&task);
    }
    if !is_tracked(tgid) {
        return 0;
    }
    let _ = LOCK_PENDING.remove(&pid);
    let _ = FORK_START.remove(&pid);
    if config!(fork_uprobes) != 0 {
        let _ = FORK_CALLER.remove(&pid);
    }
    let _ = CGROUP_PENDING.remove(&pid);
    if config!(unwind_dwarf) != 0 {
        let _ = MMAP_EXEC.remove(&pid);
    }
    if config!(dbus) != 0 {
        dbus_exit(pid);
    }
    let _ = EXITING.insert(&pid, &1, 0);
    if pid == tgid {
        if config!(unwind_dwarf) != 0 {
            let _ = UNWIND_ALIAS.remove(&tgid);
        }
        emit(EventKind::Exit, tgid, pid, 0, 0, current_window());
    }
    if config!(target_mode) == TargetMode::Tracked as u32 {
        let _ = TRACKED.remove(&pid);
    }
    0
}

// ----------------------------------------------------------- VM creation

#[inline(always)]
fn vm_created(tgid: u32, pid: u32, source: u32) {
    if stopped() {
        return;
    }
    let Some(state) = VM_STATE.get_ptr_mut(0) else {
        return;
    };
    // The count itself is exact (atomic add). The ordinal is read back after
    // it: a fetch-add would need BPF cpu v3, which aya-build does not select,
    // so two creations within the same instant on two CPUs may both read the
    // later count. Userspace numbers creations by their time stamps.
    // SAFETY: a valid map value.
    let created = unsafe {
        add_atomic(&raw mut (*state).created, 1);
        core::ptr::read_volatile(&raw const (*state).created)
    };
    emit(
        EventKind::VmCreated,
        tgid,
        pid,
        source,
        created,
        window_for(created),
    );
}

#[tracepoint]
pub fn vm_ioctl_enter(ctx: TracePointContext) -> u32 {
    if config!(vm_event_kvm) == 0 {
        return 0;
    }
    let Some(cmd) = read::<u64>(&ctx, config!(offsets.ioctl_enter_cmd)) else {
        return 0;
    };
    if cmd == KVM_CREATE_VM {
        let pid = ctx.pid();
        let _ = PENDING_CREATE.insert(&pid, &1, 0);
    }
    0
}

#[tracepoint]
pub fn vm_ioctl_exit(ctx: TracePointContext) -> u32 {
    let (tgid, pid) = current_ids();
    // SAFETY: only presence is tested.
    if unsafe { PENDING_CREATE.get(&pid) }.is_none() {
        return 0;
    }
    let _ = PENDING_CREATE.remove(&pid);
    let ret = read::<i64>(&ctx, config!(offsets.ioctl_exit_ret)).unwrap_or(-1);
    // A VM fd: the VM exists (unless its exec already counted it).
    if ret >= 0 && VM_BY_EXEC.remove(&tgid).is_err() {
        vm_created(tgid, pid, VM_SOURCE_KVM);
    }
    0
}

// ---------------------------------------------------------- lock contention

#[map]
static LOCK_WAITS: HashMap<LockKey, LockValue> = HashMap::with_max_entries(32768, 0);
/// Contentions in progress, per thread.
#[map]
static LOCK_PENDING: HashMap<u32, LockPending> = HashMap::with_max_entries(32768, 0);

/// Initial values for inserts: larger than the BPF stack allows.
#[unsafe(no_mangle)]
static LOCK_VALUE_ZERO: LockValue = LockValue {
    count: 0,
    total_ns: 0,
    max_ns: 0,
    hist: [0; LOCK_HIST_BUCKETS],
};
#[unsafe(no_mangle)]
static LOCK_PENDING_ZERO: LockPending = LockPending::ZERO;

/// Scratch for the top 4 KiB of a lock waiter's kernel stack.
#[map]
static LOCK_KSTACK_SCRATCH: PerCpuArray<[u64; LOCK_KSTACK_WORDS]> =
    PerCpuArray::with_max_entries(1, 0);

/// The current task's kernel stack at the end of a wait for a sleeping
/// lock: one of the two its lock entry remembers if it is in the same
/// syscall and every return address of it is where it was on its kernel
/// stack (allowing for the per-syscall random offset); else a walk (4 to
/// 12 µs here), remembered in the older slot.
///
/// Where the return addresses are is read from the 4 KiB below the task's
/// entry registers, the top of its kernel stack. (Not relative to this
/// program's frame: since Linux 6.13 a tracing program may run on a
/// private stack.)
#[inline(always)]
fn lock_kernel_stack(
    ctx: &TracePointContext,
    pending: *mut LockPending,
    flags: u32,
    window: u32,
) -> u64 {
    // Only for sleeping locks, taken in process context: a spinlock's
    // waiter may be an interrupt on its own stack, and the task stack under
    // it may still hold a whole earlier stack that would match.
    let (Some(words), true) = (
        LOCK_KSTACK_SCRATCH.get_ptr_mut(0),
        config!(block_site_cache) != 0 && lock_flags::sleeps(flags),
    ) else {
        count(Counter::LockKernWalk);
        return kern_stack_or_reason(stack_id(ctx, 0), window);
    };
    // SAFETY: the current task's BTF pointer: a plain load of its syscall
    // number; the stack is read with the checked helper into this CPU's
    // scratch.
    let (nr, cache) = unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        let nr = core::ptr::read_volatile(&raw const (*regs).orig_rax);
        let bytes = (LOCK_KSTACK_WORDS * 8) as u64;
        let ok = generated::bpf_probe_read_kernel(
            words.cast(),
            bytes as u32,
            (regs as u64 - bytes) as *const c_void,
        ) == 0;
        (nr, ok)
    };
    let mut reused = 0;
    if cache {
        let mut k = 0;
        while k < LOCK_KSTACKS {
            // SAFETY: k < LOCK_KSTACKS, inside the thread's entry.
            let c = unsafe { &raw mut (*pending).kstacks[k] };
            if lock_kstack_matches(c, words, nr) {
                count(Counter::LockKernCached);
                // SAFETY: as above.
                reused = unsafe { (*c).id };
                if config!(verify_stack_cache) == 0 {
                    return reused;
                }
                break;
            }
            k += 1;
        }
    }
    if reused == 0 {
        count(Counter::LockKernWalk);
    }
    let (id, frames) = walk_stack(ctx, 0);
    let id = kern_stack_or_reason(id, window);
    if reused != 0 {
        return verified(reused, id, Counter::LockKernReuseDiffers);
    }
    if let (true, Some(ips)) = (id >= STACK_ID_MIN && cache, STACK_SCRATCH.get_ptr(0)) {
        // SAFETY: the thread's own entry; the slot is bounded.
        unsafe {
            let next = (*pending).kstack_next as usize & (LOCK_KSTACKS - 1);
            let c = &raw mut (*pending).kstacks[next];
            if remember_lock_kstack(c, words, ips, frames) {
                (*c).id = id;
                (*c).syscall = nr;
                (*pending).kstack_next = ((next + 1) % LOCK_KSTACKS) as u32;
            }
        }
    }
    id
}

/// Whether remembered stack `c` is the current one: the same syscall, its
/// innermost return address is found (the highest copy in the window:
/// older copies left by deeper calls are below the live frames), the
/// others are where they were, moved by as much, and the outermost, where
/// the walk ends under the entry registers, has not moved (above a
/// syscall's random offset; an exception's stack has none). The same
/// return addresses at the same places make the unwinder find the same
/// frames.
#[inline(always)]
fn lock_kstack_matches(
    c: *mut LockKstack,
    words: *const [u64; LOCK_KSTACK_WORDS],
    nr: u64,
) -> bool {
    // SAFETY: c is a valid map value, words this CPU's scratch; indices
    // are masked into range. The search's state is kept in the map value
    // (see `remember_kernel_stack`).
    let (entry, entry_end) = (config!(syscall_entry), config!(syscall_entry_end));
    unsafe {
        if (*c).id < STACK_ID_MIN || (*c).syscall != nr {
            return false;
        }
        let at0 = (*c).at[0] as usize & (LOCK_KSTACK_WORDS - 1);
        let ret0 = (*c).ret[0];
        core::ptr::write_volatile(&raw mut (*c).search, KSTACK_UNCHECKED);
        let mut w = LOCK_KSTACK_WORDS;
        while w > 0 {
            w -= 1;
            if (*words)[w] == ret0 {
                core::ptr::write_volatile(&raw mut (*c).search, w as u32);
                break;
            }
        }
        let now0 = core::ptr::read_volatile(&raw const (*c).search);
        if now0 == KSTACK_UNCHECKED {
            return false;
        }
        let now0 = now0 as usize;
        let frames = (*c).found as usize;
        if frames <= 1 {
            return now0 == at0;
        }
        let mut i = 1;
        while i < LOCK_KSTACK_FRAMES {
            if i >= frames {
                break;
            }
            let at = (*c).at[i] as usize & (LOCK_KSTACK_WORDS - 1);
            let ret = (*c).ret[i];
            let ok = if i + 1 < frames {
                // Moved as much as the innermost, inside the window.
                let moved = at + now0;
                moved >= at0
                    && moved - at0 < LOCK_KSTACK_WORDS
                    && (*words)[(moved - at0) & (LOCK_KSTACK_WORDS - 1)] == ret
            } else {
                // The outermost, just under the entry registers, where the
                // walk ends: not moved (else this is the same chain nested
                // deeper, under another entry), and the others moved only
                // if the random offset is between (a syscall).
                (*words)[at] == ret && (now0 == at0 || (ret >= entry && ret < entry_end))
            };
            if !ok {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// Finds, in one pass down from the top of the window, where the walked
/// stack's return addresses (`frames` of them in `ips`, outermost first
/// from the top) sit, and keeps them in `c`. False if the stack cannot be
/// checked that way: deeper than [`LOCK_KSTACK_FRAMES`], or a frame not in
/// the window (on the IRQ stack, or more than 4 KiB down).
#[inline(always)]
fn remember_lock_kstack(
    c: *mut LockKstack,
    words: *const [u64; LOCK_KSTACK_WORDS],
    ips: *const StackBuf,
    frames: usize,
) -> bool {
    // SAFETY: c is a valid map value, words and ips this CPU's scratch
    // values; indices are masked into range. The count of frames still to
    // find lives in the map value (see `remember_kernel_stack`).
    unsafe {
        (*c).id = 0;
        if frames == 0 || frames > LOCK_KSTACK_FRAMES {
            return false;
        }
        core::ptr::write_volatile(&raw mut (*c).found, frames as u32);
        let mut w = LOCK_KSTACK_WORDS;
        while w > 0 {
            w -= 1;
            let j = core::ptr::read_volatile(&raw const (*c).found) as usize;
            if j == 0 {
                break;
            }
            let j = (j - 1) & (LOCK_KSTACK_FRAMES - 1);
            let ip = (*ips).ips[j];
            if (*words)[w] == ip {
                (*c).at[j] = w as u32;
                (*c).ret[j] = ip;
                core::ptr::write_volatile(&raw mut (*c).found, j as u32);
            }
        }
        if core::ptr::read_volatile(&raw const (*c).found) != 0 {
            return false;
        }
        (*c).found = frames as u32;
        true
    }
}

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
fn count(c: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: this CPU's slot.
        unsafe { *v += 1 };
    }
}

#[tracepoint]
pub fn lock_contention_begin(ctx: TracePointContext) -> u32 {
    let (tgid, pid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let Some(window) = current_window() else {
        return 0;
    };
    let Some(lock) = read::<u64>(&ctx, config!(offsets.lock_begin_addr)) else {
        return 0;
    };
    let flags = read::<u32>(&ctx, config!(offsets.lock_begin_flags)).unwrap_or(0);
    let Some(pending) = slot(
        &LOCK_PENDING,
        &pid,
        &LOCK_PENDING_ZERO,
        window,
        Loss::LockMapFull,
    ) else {
        return 0;
    };
    // SAFETY: a valid map value, only touched by this thread (and by
    // interrupts on this CPU, which run to completion first).
    unsafe {
        let depth = (*pending).depth as usize;
        // The same lock again (a mutex that spun, then sleeps): one wait,
        // from the first begin; keep the latest flags.
        let mut i = 0;
        while i < MAX_LOCK_NESTING {
            if i < depth && (*pending).entries[i].lock == lock {
                (*pending).entries[i].flags = flags;
                return 0;
            }
            i += 1;
        }
        if depth >= MAX_LOCK_NESTING {
            lose(window, Loss::LockNestingTooDeep);
            return 0;
        }
        (*pending).entries[depth] = LockBegin {
            lock,
            start_ns: now(),
            cpu: bpf_get_smp_processor_id(),
            pad: 0,
            flags,
            window,
        };
        (*pending).depth = depth as u32 + 1;
    }
    0
}

#[tracepoint]
pub fn lock_contention_end(ctx: TracePointContext) -> u32 {
    if stopped() {
        return 0;
    }
    let (tgid, pid) = current_ids();
    let Some(pending) = LOCK_PENDING.get_ptr_mut(&pid) else {
        return 0;
    };
    let Some(lock) = read::<u64>(&ctx, config!(offsets.lock_end_addr)) else {
        return 0;
    };
    let end = now();
    // SAFETY: as in lock_contention_begin.
    let begin = unsafe {
        let depth = (*pending).depth as usize;
        // Innermost first: find the begin of this lock and take it out.
        let mut found = MAX_LOCK_NESTING;
        let mut i = MAX_LOCK_NESTING;
        while i > 0 {
            i -= 1;
            if i < depth && found == MAX_LOCK_NESTING && (*pending).entries[i].lock == lock {
                found = i;
            }
        }
        if found >= MAX_LOCK_NESTING {
            // Began before the recording, or in another task.
            return 0;
        }
        let begin = (*pending).entries[found];
        let mut j = 0;
        while j + 1 < MAX_LOCK_NESTING {
            if j >= found && j + 1 < depth {
                (*pending).entries[j] = (*pending).entries[j + 1];
            }
            j += 1;
        }
        (*pending).depth = depth as u32 - 1;
        if depth > 1 {
            count(Counter::LockWaitsNested);
        }
        begin
    };
    // SAFETY: no preconditions.
    if begin.cpu != unsafe { bpf_get_smp_processor_id() } {
        count(Counter::LockWaitsMigrated);
    }
    let wait = end.saturating_sub(begin.start_ns);
    // The user stack: reused if the thread is at a site where it blocked
    // or contended before (a QEMU thread's futex wake or eventfd write
    // contending on a run-queue lock). Walking it costs microseconds where
    // there are no frame pointers.
    // SAFETY: bpf_get_current_task_btf has no preconditions.
    let current = unsafe { bpf_get_current_task_btf() };
    let user_stack = match own_entry(current as u64, pid) {
        Some(e) => {
            site_user_stack(
                &ctx,
                current,
                e,
                begin.window,
                Counter::LockUserCached,
                Counter::LockUserWalk,
            )
            .0
        }
        None => {
            count(Counter::LockUserWalk);
            user_stack(&ctx, begin.window)
        }
    };
    let kern_stack = lock_kernel_stack(&ctx, pending, begin.flags, begin.window);
    let key = LockKey {
        window: begin.window,
        tgid,
        flags: begin.flags,
        pad: 0,
        lock,
        kern_stack,
        user_stack,
        comm: comm(),
    };
    let Some(value) = slot(
        &LOCK_WAITS,
        &key,
        &LOCK_VALUE_ZERO,
        begin.window,
        Loss::LockMapFull,
    ) else {
        return 0;
    };
    // SAFETY: a valid map value (threads of one process contend on the same
    // lock from the same stack, hence the atomic adds).
    unsafe {
        add_timed(
            &raw mut (*value).count,
            &raw mut (*value).total_ns,
            &raw mut (*value).max_ns,
            &raw mut (*value).hist,
            wait,
        );
    }
    0
}

// ------------------------------------------------------------------- forks

#[map]
static FORK_CALLS: HashMap<ForkKey, ForkValue> = HashMap::with_max_entries(16384, 0);
/// Fork syscalls in progress, per thread.
#[map]
static FORK_START: HashMap<u32, ForkStart> = HashMap::with_max_entries(16384, 0);
/// Per thread: the return address of the libc fork function it is in.
#[map]
static FORK_CALLER: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);

/// uprobe on libc's `fork`, `vfork`, `posix_spawn[p]`, `pthread_create`: at
/// a function's entry the return address is at the top of the stack, so
/// the caller is exact, frame pointers or not. A `uprobe.multi` program, so
/// one link can be limited to one process.
#[uprobe(multi)]
pub fn fork_caller(ctx: ProbeContext) -> u32 {
    let (tgid, pid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    // SAFETY: regs is the probed task's user register file; the stack slot
    // is read with the checked helper.
    let ret = unsafe {
        let sp = (*ctx.regs).rsp;
        bpf_probe_read_user(sp as *const u64).unwrap_or(0)
    };
    let _ = FORK_CALLER.insert(&pid, &ret, 0);
    0
}

/// The caller of the libc function making fork syscall `nr` in thread
/// `pid`: the fork-caller uprobe's, where it fired (a libc the learned
/// paths are not for), else through the [`ForkPath`]s (0 if none holds).
#[inline(always)]
fn fork_caller_of(pid: u32, nr: u32) -> u64 {
    if config!(fork_uprobes) != 0 {
        // SAFETY: only copied.
        if let Some(c) = unsafe { FORK_CALLER.get(&pid) }.copied() {
            let _ = FORK_CALLER.remove(&pid);
            return c;
        }
    }
    // SAFETY: a BTF pointer to the current task's user registers (plain
    // loads); user memory is read with the checked helper.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        let ip = core::ptr::read_volatile(&raw const (*regs).rip);
        let sp = core::ptr::read_volatile(&raw const (*regs).rsp);
        let di = core::ptr::read_volatile(&raw const (*regs).rdi);
        profiler_common::record::fork_caller(
            |i| core::ptr::read_volatile(&raw const CONFIG.fork_paths[i]),
            nr,
            [ip, sp, di],
            |a| bpf_probe_read_user(a as *const u64).ok(),
            |a| bpf_probe_read_user(a as *const [u8; 8]).ok(),
        )
    }
}

/// `sys_enter_{clone,clone3,fork,vfork}`: one program, told apart by the
/// syscall number.
#[tracepoint]
pub fn fork_syscall_enter(ctx: TracePointContext) -> u32 {
    let (tgid, pid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let Some(window) = current_window() else {
        return 0;
    };
    let nr = read::<i32>(&ctx, config!(offsets.syscall_nr)).unwrap_or(-1) as u32;
    let (mut kind, flags) = if nr == config!(nr_clone) {
        (
            fork_kind::CLONE,
            read::<u64>(&ctx, config!(offsets.clone_flags)).unwrap_or(0),
        )
    } else if nr == config!(nr_clone3) {
        let uargs = read::<u64>(&ctx, config!(offsets.clone3_uargs)).unwrap_or(0);
        // struct clone_args starts with `flags`.
        // SAFETY: a user pointer, read with the checked helper.
        let flags = unsafe { bpf_probe_read_user(uargs as *const u64) }.unwrap_or(0);
        (fork_kind::CLONE3, flags)
    } else if nr == config!(nr_fork) {
        (fork_kind::FORK, 0)
    } else {
        (fork_kind::VFORK, 0)
    };
    if flags & CLONE_THREAD != 0 {
        kind |= fork_kind::THREAD;
    }
    let start = ForkStart {
        start_ns: now(),
        window,
        kind,
        caller: fork_caller_of(pid, nr),
    };
    let _ = FORK_START.insert(&pid, &start, 0);
    0
}

#[tracepoint]
pub fn fork_syscall_exit(ctx: TracePointContext) -> u32 {
    if stopped() {
        return 0;
    }
    let (tgid, pid) = current_ids();
    // The child returns from the same syscall: it has no start entry.
    let Some(start) = FORK_START.get_ptr(&pid) else {
        return 0;
    };
    // SAFETY: a valid map value, copied before removal.
    let start = unsafe { *start };
    let _ = FORK_START.remove(&pid);
    // Failed forks (ret < 0) created nothing.
    if read::<i64>(&ctx, config!(offsets.fork_exit_ret)).unwrap_or(-1) <= 0 {
        return 0;
    }
    let took = now().saturating_sub(start.start_ns);
    let user_stack = user_stack(&ctx, start.window);
    let key = ForkKey {
        window: start.window,
        tgid,
        kind: start.kind,
        pad: 0,
        user_stack,
        caller: start.caller,
        comm: comm(),
    };
    let zero = ForkValue {
        count: 0,
        total_ns: 0,
        max_ns: 0,
    };
    if let Some(v) = slot(&FORK_CALLS, &key, &zero, start.window, Loss::ForkMapFull) {
        // SAFETY: a valid map value.
        unsafe {
            add_time(
                &raw mut (*v).count,
                &raw mut (*v).total_ns,
                &raw mut (*v).max_ns,
                1,
                took,
            )
        };
    }
    0
}

// ----------------------------------------------------------------- cgroups

#[map]
static CGROUP_OPS: HashMap<CgroupKey, CgroupValue> = HashMap::with_max_entries(16384, 0);
/// The timed system call each thread is in, and the operations seen in it.
#[map]
static CGROUP_PENDING: HashMap<u32, CgroupPending> = HashMap::with_max_entries(8192, 0);
/// Builds an untimed operation's key (too large for the BPF stack).
#[map]
static CGROUP_SCRATCH: PerCpuArray<CgroupKey> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
static CGROUP_PENDING_ZERO: CgroupPending = CgroupPending {
    key: CgroupKey {
        window: 0,
        kind: 0,
        tgid: 0,
        root: 0,
        path: [0; CGROUP_PATH_LEN],
        comm: [0; COMM_LEN],
    },
    start_ns: 0,
    ops: 0,
    pad: 0,
};
#[unsafe(no_mangle)]
static CGROUP_VALUE_ZERO: CgroupValue = CgroupValue {
    count: 0,
    timed: 0,
    total_ns: 0,
    max_ns: 0,
};

/// Adds `ops` operations taking `ns` (timed or not) to a key's value.
#[inline(always)]
fn cgroup_account(key: *const CgroupKey, window: u32, ops: u64, timed: bool, ns: u64) {
    // SAFETY: key points to a map value or this CPU's scratch.
    let key = unsafe { &*key };
    let Some(value) = slot(
        &CGROUP_OPS,
        key,
        &CGROUP_VALUE_ZERO,
        window,
        Loss::CgroupMapFull,
    ) else {
        return;
    };
    // SAFETY: a valid map value.
    unsafe {
        add_atomic(&raw mut (*value).count, ops);
        if timed {
            add_time(
                &raw mut (*value).timed,
                &raw mut (*value).total_ns,
                &raw mut (*value).max_ns,
                ops,
                ns,
            );
        }
    }
}

/// Fills a key from a cgroup tracepoint.
#[inline(always)]
fn cgroup_key(
    ctx: &TracePointContext,
    key: *mut CgroupKey,
    kind: u32,
    window: u32,
    tgid: u32,
    root_off: u32,
    path_off: u32,
) {
    // SAFETY: key points to a map value or this CPU's scratch, valid for
    // writes; the path is read with the checked string helper.
    unsafe {
        (*key).window = window;
        (*key).kind = kind;
        (*key).tgid = tgid;
        (*key).root = read::<i32>(ctx, root_off).unwrap_or(-1) as u32;
        (*key).comm = comm();
        let loc = read::<u32>(ctx, path_off).unwrap_or(0);
        let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
        if bpf_probe_read_kernel_str_bytes(src, &mut (*key).path).is_err() {
            (*key).path[0] = 0;
        }
    }
}

#[inline(always)]
fn cgroup_op(ctx: &TracePointContext, kind: u32, root_off: u32, path_off: u32) -> u32 {
    let (tgid, pid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let Some(window) = current_window() else {
        return 0;
    };
    if let Some(p) = CGROUP_PENDING.get_ptr_mut(&pid) {
        // Inside a timed system call: charged when it returns.
        // SAFETY: a valid map value of this thread.
        unsafe {
            if (*p).ops == 0 {
                cgroup_key(
                    ctx,
                    &raw mut (*p).key,
                    kind,
                    window,
                    tgid,
                    root_off,
                    path_off,
                );
            }
            (*p).ops += 1;
        }
        return 0;
    }
    let Some(key) = CGROUP_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    cgroup_key(ctx, key, kind, window, tgid, root_off, path_off);
    cgroup_account(key, window, 1, false, 0);
    0
}

#[tracepoint]
pub fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
    cgroup_op(
        &ctx,
        cgroup_op::MKDIR,
        config!(offsets.cgroup_root),
        config!(offsets.cgroup_path),
    )
}

#[tracepoint]
pub fn cgroup_rmdir(ctx: TracePointContext) -> u32 {
    cgroup_op(
        &ctx,
        cgroup_op::RMDIR,
        config!(offsets.cgroup_root),
        config!(offsets.cgroup_path),
    )
}

#[tracepoint]
pub fn cgroup_attach(ctx: TracePointContext) -> u32 {
    cgroup_op(
        &ctx,
        cgroup_op::ATTACH,
        config!(offsets.cgroup_attach_root),
        config!(offsets.cgroup_attach_path),
    )
}

/// `sys_enter_{mkdir,mkdirat,rmdir,unlinkat,write}` of tracked tasks: the
/// system calls cgroup operations are made in.
#[tracepoint]
pub fn cgroup_syscall_enter(_ctx: TracePointContext) -> u32 {
    let (tgid, pid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let _ = CGROUP_PENDING.insert(&pid, &CGROUP_PENDING_ZERO, 0);
    if let Some(p) = CGROUP_PENDING.get_ptr_mut(&pid) {
        // SAFETY: a valid map value of this thread.
        unsafe { (*p).start_ns = now() };
    }
    0
}

#[tracepoint]
pub fn cgroup_syscall_exit(_ctx: TracePointContext) -> u32 {
    if stopped() {
        return 0;
    }
    let pid = bpf_get_current_pid_tgid() as u32;
    let Some(p) = CGROUP_PENDING.get_ptr_mut(&pid) else {
        return 0;
    };
    // SAFETY: a valid map value of this thread, removed after use.
    unsafe {
        if (*p).ops > 0 {
            let ns = now().saturating_sub((*p).start_ns);
            cgroup_account(
                &raw const (*p).key,
                (*p).key.window,
                u64::from((*p).ops),
                true,
                ns,
            );
        }
    }
    let _ = CGROUP_PENDING.remove(&pid);
    0
}

// ---------------------------------------------------- executable mappings

/// `mmap`'s `PROT_EXEC` and `MAP_ANONYMOUS`.
const PROT_EXEC: u64 = 0x4;
const MAP_ANONYMOUS: u64 = 0x20;

/// Per thread: an executable file mapping under way in a process the
/// unwinder knows (the thread's tgid).
#[map]
static MMAP_EXEC: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);
/// Per process: when its last executable mapping was announced.
#[map]
static MMAP_ANNOUNCED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);

/// `sys_enter_mmap` (`--unwind dwarf`): a process the unwinder knows maps a
/// file executable, as the dynamic loader does at a `dlopen` (the text
/// segment, `PROT_READ | PROT_EXEC`). Marked here; announced at the exit,
/// once the mapping is in the process's maps.
#[tracepoint]
pub fn unwind_mmap_enter(ctx: TracePointContext) -> u32 {
    let (Some(prot), Some(flags)) = (
        read::<u64>(&ctx, config!(offsets.mmap_prot)),
        read::<u64>(&ctx, config!(offsets.mmap_flags)),
    ) else {
        return 0;
    };
    if prot & PROT_EXEC == 0 || flags & MAP_ANONYMOUS != 0 {
        return 0;
    }
    let (tgid, pid) = current_ids();
    // A process whose mappings are not loaded yet gets them all when they
    // are (its exec, or its first walk).
    if unwind::owner_of(tgid).is_none() {
        return 0;
    }
    let _ = MMAP_EXEC.insert(&pid, &tgid, 0);
    0
}

/// `sys_exit_mmap`: a marked mapping that succeeded is announced
/// (`EventKind::UnwindMapping`), unless one of the process was announced
/// less than `MAPPING_SETTLE_NS` ago: userspace reads the mappings that
/// long after that one, so the read sees this one too.
#[tracepoint]
pub fn unwind_mmap_exit(ctx: TracePointContext) -> u32 {
    let pid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: a valid map value, copied.
    let Some(tgid) = (unsafe { MMAP_EXEC.get(&pid) }).copied() else {
        return 0;
    };
    let _ = MMAP_EXEC.remove(&pid);
    let ret = read::<i64>(&ctx, config!(offsets.mmap_exit_ret)).unwrap_or(-1);
    // -4095..-1: an errno.
    if (-4095..0).contains(&ret) {
        return 0;
    }
    let now = now();
    // SAFETY: a valid map value, read only.
    if let Some(last) = unsafe { MMAP_ANNOUNCED.get(&tgid) }
        && now.saturating_sub(*last) < MAPPING_SETTLE_NS
    {
        return 0;
    }
    let _ = MMAP_ANNOUNCED.insert(&tgid, &now, 0);
    emit(EventKind::UnwindMapping, tgid, pid, 0, 0, current_window());
    0
}

// ------------------------------------------------------------------- D-Bus

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
/// thread's next blocking call is about.
#[uprobe]
pub fn dbus_names(ctx: ProbeContext) -> u32 {
    let a = Args::of(&ctx);
    let (tgid, pid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let Some(window) = current_window() else {
        return 0;
    };
    let f = cookie(&ctx);
    if f == dbus_fn::LIBDBUS_SEND_WITH_REPLY {
        let Some(last) = slot(&DBUS_LAST, &pid, &DBUS_LAST_ZERO, window, Loss::DbusMapFull) else {
            return 0;
        };
        // SAFETY: a valid map value of this thread.
        unsafe {
            (*last).has_timeout = 1;
            (*last).timeout_ms = i64::from(a.get::<3>() as i32);
        }
        return 0;
    }
    if f == dbus_fn::LIBDBUS_SET_DESTINATION {
        if let Some(last) = DBUS_LAST.get_ptr_mut(&pid) {
            // SAFETY: a valid map value of this thread.
            unsafe { fill_name(&mut (*last).names.destination, a.get::<1>()) };
        }
        return 0;
    }
    let (dest, path, iface, member) = match f {
        dbus_fn::LIBDBUS_NEW_METHOD_CALL | dbus_fn::GIO_NEW_METHOD_CALL => {
            (a.get::<0>(), a.get::<1>(), a.get::<2>(), a.get::<3>())
        }
        dbus_fn::SDBUS_NEW_METHOD_CALL => (a.get::<2>(), a.get::<3>(), a.get::<4>(), a.get::<5>()),
        _ => return 0,
    };
    // A new message: forget the names of the previous one.
    if DBUS_LAST.insert(&pid, &DBUS_LAST_ZERO, 0).is_err() {
        lose(window, Loss::DbusMapFull);
        return 0;
    }
    let Some(last) = DBUS_LAST.get_ptr_mut(&pid) else {
        return 0;
    };
    // SAFETY: a valid map value of this thread.
    unsafe {
        let n = &mut (*last).names;
        fill_name(&mut n.destination, dest);
        fill_name(&mut n.path, path);
        fill_name(&mut n.interface, iface);
        fill_name(&mut n.member, member);
    }
    0
}

/// Entry of a blocking call: the outermost one starts the clock.
#[uprobe]
pub fn dbus_enter(ctx: ProbeContext) -> u32 {
    let a = Args::of(&ctx);
    let (tgid, pid) = current_ids();
    if !is_tracked(tgid) {
        return 0;
    }
    let Some(window) = current_window() else {
        return 0;
    };
    let f = cookie(&ctx);
    let Some(st) = slot(
        &DBUS_INFLIGHT,
        &pid,
        &DBUS_INFLIGHT_ZERO,
        window,
        Loss::DbusMapFull,
    ) else {
        return 0;
    };
    // SAFETY: a valid map value, only touched by this thread.
    let st = unsafe { &mut *st };
    let outermost = st.depth == 0;
    st.depth += 1;
    if outermost {
        st.function = f;
        st.window = window;
        st.start_ns = now();
        st.names = DBUS_NAMES_ZERO;
        st.timeout_ms = match f {
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
        };
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
    0
}

/// Return of a blocking call: the outermost one is counted.
#[uretprobe]
pub fn dbus_return(ctx: RetProbeContext) -> u32 {
    let (tgid, pid) = current_ids();
    let Some(st) = DBUS_INFLIGHT.get_ptr_mut(&pid) else {
        return 0;
    };
    // SAFETY: a valid map value, only touched by this thread.
    let st = unsafe { &mut *st };
    if st.depth > 1 {
        st.depth -= 1;
        return 0;
    }
    let end = now();
    if let Some(active) = DBUS_ACTIVE.get_ptr_mut(0) {
        add_atomic(active, u64::MAX);
    }
    let _ = DBUS_LAST.remove(&pid);
    if stopped() {
        let _ = DBUS_INFLIGHT.remove(&pid);
        return 0;
    }
    let window = st.window;
    let latency = end.saturating_sub(st.start_ns);
    let timeout_ns = match st.timeout_ms {
        DBUS_TIMEOUT_INFINITE => u64::MAX,
        t if t < 0 => DBUS_DEFAULT_TIMEOUT_MS * 1_000_000,
        t => t as u64 * 1_000_000,
    };
    // A call that ran for its whole timeout timed out; the libraries' timers
    // have millisecond granularity.
    let timed_out = latency + 1_000_000 >= timeout_ns;
    let Some(key) = DBUS_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // At the return the registers are the caller's, at the instruction
    // after the call: its stack, whole.
    let user_stack = user_stack(&ctx, window);
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
    // SAFETY: the scratch key is valid for reads.
    let Some(value) = slot(
        &DBUS_CALLS,
        unsafe { &*key },
        &DBUS_VALUE_ZERO,
        window,
        Loss::DbusMapFull,
    ) else {
        return 0;
    };
    // SAFETY: a valid map value (threads of one process may share it).
    unsafe {
        add_timed(
            &raw mut (*value).count,
            &raw mut (*value).total_ns,
            &raw mut (*value).max_ns,
            &raw mut (*value).hist,
            latency,
        );
        if timed_out {
            add_atomic(&raw mut (*value).timeouts, 1);
        }
    }
    0
}

/// A thread that exits inside a blocking call (killed, or ending the
/// process from a callback) never returns from it: the call is dropped
/// and no longer holds `DBUS_ACTIVE` up, and the thread's constructor
/// names go with it, so that a thread that reuses its id starts outside
/// any call.
#[inline(always)]
fn dbus_exit(pid: u32) {
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
fn dbus_inflight(pid: u32) -> u32 {
    if DBUS_ACTIVE.get(0).is_none_or(|n| *n == 0) {
        return 0;
    }
    DBUS_INFLIGHT
        .get_ptr(&pid)
        // SAFETY: a valid map value.
        .map_or(0, |st| unsafe { (*st).function })
}
