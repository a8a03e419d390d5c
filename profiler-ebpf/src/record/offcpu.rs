//! Off-CPU blocks: `sched_switch` notes when and where a traced thread
//! blocks (switch-out) and charges the block when it comes back
//! (switch-in). Each thread has an entry ([`OFFCPU_START`]) that adds up its
//! blocks per key and remembers its last blocking sites with their user
//! and kernel stacks, so a thread blocking again at one of them reuses the
//! stacks instead of walking them ([`site_user_stack`], which the lock
//! tracer uses too, and [`kstack`]).

mod kstack;
mod wakers;

use aya_ebpf::{
    EbpfContext,
    bindings::task_struct,
    macros::{btf_tracepoint, map},
    maps::{HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use profiler_common::record::{
    BLOCK_SITES, BlockSite, Counter, Loss, NO_SITE, NOT_CHARGED, OFFCPU_SPANS_ENTRIES, OffCpuAcc,
    OffCpuKey, OffCpuStart, OffCpuValue, STACK_DEFERRED, STACK_ID_MIN, STACK_NOT_TAKEN,
    STACK_SHORT_BLOCK, SpanBlock, SpanKey, TaskStacks, WINDOW_PARITY, is_attributed,
};

use super::{
    common::{
        Running, Task, comm_of, count, current_window_at, is_tracked, lose, now, offcpu_stopped,
        reset, time_window, vms_created, written_now,
    },
    dbus,
    stacks::{kern_stack, site_return, user_stack, user_stack_walk, verified},
    tasks,
};
use crate::unwind;

#[map]
static OFFCPU_TIMES: HashMap<OffCpuKey, OffCpuValue> = HashMap::with_max_entries(65536, 0);
#[map]
static OFFCPU_START: HashMap<u64, OffCpuStart> = HashMap::with_max_entries(32768, 0);
/// Blocks that went on past their window, for userspace to cut.
#[map]
static OFFCPU_SPANS: HashMap<SpanKey, SpanBlock> =
    HashMap::with_max_entries(OFFCPU_SPANS_ENTRIES, 0);
/// Per CPU: its idle task (pid 0), never tracked.
#[map]
static IDLE_TASK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

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
    waker: TaskStacks::UNKNOWN,
    woken_ns: 0,
    start_vms: 0,
};

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

/// Whether a switch-out in reported `state` is a preemption (or a task
/// switching out running): waiting for a CPU, not blocked, so nobody
/// wakes it.
#[inline(always)]
fn is_preemption(state: u32) -> bool {
    state == 0 || state == TASK_REPORT_MAX
}

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
    // Runs whatever else is under way (with interrupts off, nothing of
    // hvprof's can be), but keeps the others off meanwhile: a contention
    // on a map's lock inside it would start a lock program.
    let _running = Running::always();
    let now = now();
    let next: *mut task_struct = ctx.arg(2);
    // Each half whatever came of the other.
    let _ = switch_out(&ctx, now);
    let _ = switch_in(next, now);
    0
}

/// The task switching out (current, `prev`): if it blocks, note when and
/// where.
#[inline(always)]
fn switch_out(ctx: &BtfTracePointContext, now: u64) -> Option<()> {
    let preempt: u64 = ctx.arg(0);
    // The current task, as a BTF pointer: its fields are plain loads.
    let prev: *mut task_struct = ctx.arg(1);
    let raw_state: u64 = ctx.arg(3);
    let task = prev as u64;
    let (tgid, pid) = Task::current().ids();
    if pid == 0 {
        // This CPU's idle task: remembered, so switching back to it costs
        // no map lookup.
        let idle = IDLE_TASK.get_ptr_mut(0)?;
        // SAFETY: this CPU's slot.
        unsafe { *idle = task };
        return None;
    }
    // After the stop userspace reads the entries: nothing changes them.
    if offcpu_stopped() {
        return None;
    }
    // Not the common preamble: a thread with an entry is tracked (only
    // tracked threads get one, and it goes when they exit), so the
    // tracked-set lookup is only for threads without one yet.
    let entry = own_entry(task, pid);
    match entry {
        // First, whatever comes of this switch: the last block's run-queue
        // wait.
        Some(e) => settle_runq(e, prev),
        None if !is_tracked(tgid) => return None,
        None => {}
    }
    let (window, vms) = current_window_at()?;
    let raw_state = raw_state as u32;
    // A task switching out for the last time (exit) never comes back; it
    // is not blocked.
    if preempt == 0 && raw_state & TASK_DEAD != 0 {
        tasks::gone(pid);
        return None;
    }
    let state = report_state(preempt != 0, raw_state);
    let e = match entry {
        Some(e) => e,
        None => new_entry(task, prev, window)?,
    };
    let (kern_stack, user_stack, slot) = block_stacks(ctx, prev, e, window, state);
    let key = OffCpuKey {
        window,
        tgid,
        pid,
        state,
        dbus: dbus::inflight(pid),
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
        (*e).start_vms = vms;
    }
    Some(())
}

/// The entry of a thread's first block (or a reused `task_struct`'s), from a
/// zeroed template (too large for the BPF stack).
#[inline(always)]
fn new_entry(task: u64, prev: *mut task_struct, window: u32) -> Option<*mut OffCpuStart> {
    let Some(e) = reset(&OFFCPU_START, &task, &OFFCPU_START_ZERO) else {
        lose(window, Loss::OffCpuStartFull);
        return None;
    };
    settle_runq(e, prev);
    Some(e)
}

/// The kernel and user stacks of a block in `state` of the current thread
/// (`task`, entry `e`), and the site its user stack is remembered at.
#[inline(always)]
fn block_stacks(
    ctx: &BtfTracePointContext,
    task: *mut task_struct,
    e: *mut OffCpuStart,
    window: u32,
    state: u32,
) -> (u64, u64, u32) {
    // Preempted (R): waiting for a CPU, not blocked. Its stack is where it
    // ran, which on-CPU samples show; walking it at every preemption is
    // most of the off-CPU cost under CPU contention.
    if is_preemption(state) && config!(preempted_stacks) == 0 {
        count(Counter::OffCpuPreempted);
        return (STACK_NOT_TAKEN, STACK_NOT_TAKEN, NO_SITE);
    }
    // Uninterruptible (D): a mutex, rwsem, I/O or completion wait. The
    // wait primitive is the point, and a stopped task's walk leaves out
    // scheduler-section functions (mutex_lock, io_schedule, ...): walk
    // now. Other sleeps (futex, poll, pipe, nanosleep: the syscall names
    // the wait) are walked when they come back, if long enough.
    let kern = if state == TASK_REPORT_UNINTERRUPTIBLE {
        count(Counter::OffCpuKernWalkOut);
        kern_stack(ctx, window)
    } else {
        STACK_DEFERRED
    };
    // The user stack is reused when the thread blocks again at one of
    // the last sites it blocked at (a QEMU worker on its futex, a main
    // loop in ppoll): four register reads instead of a walk.
    let (user, slot) = site_user_stack(
        ctx,
        task,
        e,
        window,
        Counter::OffCpuUserCached,
        Counter::OffCpuUserWalk,
    );
    (kern, user, slot)
}

/// The off-CPU entry of the current thread (`task`, `pid`), if it has one
/// (the pid check guards a reused `task_struct`).
#[inline(always)]
pub(super) fn own_entry(task: u64, pid: u32) -> Option<*mut OffCpuStart> {
    OFFCPU_START
        .get_ptr_mut(&task)
        // SAFETY: a valid map value.
        .filter(|e| unsafe { (**e).key.pid } == pid)
}

/// The user stack of thread `pid` (task pointer `task`) where it blocked,
/// while it is still blocked there.
#[inline(always)]
pub(super) fn blocked_user_stack(task: u64, pid: u32) -> Option<u64> {
    let e = OFFCPU_START.get_ptr(&task)?;
    // SAFETY: a valid map value (another CPU may be changing it: a stale
    // read gives a stack of the thread's, or none).
    unsafe { ((*e).key.pid == pid && (*e).start_ns != 0).then(|| (*e).key.user_stack) }
}

/// The remembered sites of a thread's entry.
#[inline(always)]
fn sites_of(e: *mut OffCpuStart) -> *mut BlockSite {
    // SAFETY: e is a valid map value.
    unsafe { (&raw mut (*e).sites).cast::<BlockSite>() }
}

/// The current thread's user stack: the one remembered with its entry `e`
/// if the thread is at one of the sites there (same user ip, sp, bp and
/// return address: the same call chain), else a walk, remembered in the
/// oldest site. Returns the stack id and the site's slot (`NO_SITE` if
/// none), and counts a reuse as `cached`, a walk as `walked`.
#[inline(always)]
pub(super) fn site_user_stack<C: EbpfContext>(
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
    // The site's return address, found only where a site needs it.
    let mut ret = None;
    if regs[0] != 0
        && let Some((stack, i)) = known_site(e, regs, &mut ret)
    {
        count(cached);
        if config!(verify_stack_cache) != 0 {
            let walked = user_stack(ctx, window);
            return (verified(stack, walked, Counter::UserReuseDiffers), i);
        }
        return (stack, i);
    }
    count(walked);
    let (user, cacheable) = user_stack_walk(ctx, window);
    if user < STACK_ID_MIN || regs[0] == 0 || !cacheable {
        return (user, NO_SITE);
    }
    (user, remember_site(e, task, regs, ret, user))
}

/// The site of entry `e` the current thread is at (user registers `regs`),
/// with its user stack. One whose walk recorded where its first return
/// addresses sit is checked by them, frame 0's included, which costs one
/// read instead of a row search (most switches of a thread are at a site
/// it knows); the others by the return address, found once into `ret`.
#[inline(always)]
fn known_site(e: *mut OffCpuStart, regs: [u64; 3], ret: &mut Option<u64>) -> Option<(u64, u32)> {
    let sites = sites_of(e);
    let mut i = 0;
    while i < BLOCK_SITES {
        // SAFETY: i < BLOCK_SITES, inside the thread's entry.
        let s = unsafe { &*sites.add(i) };
        if at_site(
            &s.user,
            s.user_stack,
            &s.user_check,
            s.user_check_hash,
            regs,
            ret,
        ) {
            return Some((s.user_stack, i as u32));
        }
        i += 1;
    }
    None
}

/// Whether a thread at user registers `regs` is at the site keyed by
/// `user` (ip, sp, bp, return address), `check` and `check_hash` (see
/// [`BlockSite`]), which has user stack `stack`; the return address is
/// found once into `ret` where a site needs it.
#[inline(always)]
pub(super) fn at_site(
    user: &[u64; 4],
    stack: u64,
    check: &[u64; 2],
    check_hash: u64,
    regs: [u64; 3],
    ret: &mut Option<u64>,
) -> bool {
    stack >= STACK_ID_MIN
        && user[0] == regs[0]
        && user[1] == regs[1]
        && user[2] == regs[2]
        && if check[0] != 0 {
            unwind::hvprof_site_matches(check_hash, regs[1], check[0], check[1]) != 0
        } else {
            *ret.get_or_insert_with(|| site_return(regs)) == user[3]
        }
}

/// The key of the site the current thread is at (user registers `regs`,
/// and its return address if already found), just walked: its `user`
/// (ip, sp, bp and the return address, 0 where checked), and the check of
/// its first return addresses with their hash, where the walk recorded
/// them.
#[inline(always)]
pub(super) fn site_key(regs: [u64; 3], ret: Option<u64>) -> ([u64; 4], [u64; 2], u64) {
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
    ([regs[0], regs[1], regs[2], ret], check, check_hash)
}

/// Remembers the user stack `user` just walked at the current thread's
/// site (`regs`, and its return address if already found) in the oldest
/// site of its entry `e`, and returns that site's slot.
#[inline(always)]
fn remember_site(
    e: *mut OffCpuStart,
    task: *mut task_struct,
    regs: [u64; 3],
    ret: Option<u64>,
    user: u64,
) -> u32 {
    let (user_key, check, check_hash) = site_key(regs, ret);
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
            user: user_key,
            user_stack: user,
            user_check: check,
            user_check_hash: check_hash,
            ..BlockSite::EMPTY
        };
        (*e).next_slot = ((next + 1) % BLOCK_SITES) as u32;
        next as u32
    }
}

/// The task switching in: if it was blocked, charge its block.
#[inline(always)]
fn switch_in(next: *mut task_struct, now: u64) -> Option<()> {
    if offcpu_stopped() {
        return None;
    }
    let task = next as u64;
    if IDLE_TASK.get(0).is_some_and(|idle| *idle == task) {
        return None;
    }
    let e = OFFCPU_START.get_ptr_mut(&task)?;
    let wakers = config!(wakers) != 0;
    // SAFETY: a valid map value of this task, which is not running.
    let (start_ns, mut key, woken_ns) = unsafe {
        let start_ns = (*e).start_ns;
        if start_ns == 0 {
            return None;
        }
        (*e).start_ns = 0;
        // Its waker, once: one this block does not use was not its own.
        let woken_ns = if wakers { (*e).woken_ns } else { 0 };
        if woken_ns != 0 {
            (*e).woken_ns = 0;
        }
        (start_ns, (*e).key, woken_ns)
    };
    let blocked = now.saturating_sub(start_ns);
    if blocked < config!(min_block_ns) || blocked > config!(max_block_ns) {
        return None;
    }
    if key.kern_stack == STACK_DEFERRED {
        key.kern_stack = if blocked < config!(kstack_min_ns) {
            count(Counter::OffCpuKernShort);
            STACK_SHORT_BLOCK
        } else {
            // SAFETY: e is this task's valid map value.
            kstack::at_site(next, sites_of(e), unsafe { (*e).slot }, key.window)
        };
    }
    if wakers {
        wakers::charge(e, &key, start_ns, woken_ns, blocked);
    }
    // A block that went on past its window goes to userspace whole, to be
    // cut at the windows' boundaries.
    // SAFETY: e is this task's valid map value.
    if unsafe { (*e).start_vms } != vms_created() && spanned(&key, start_ns, now) {
        // SAFETY: as above.
        unsafe { (*e).charged = NOT_CHARGED };
        return Some(());
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
                return Some(());
            }
            add_offcpu(&(*acc).key, &(*acc).value);
        }
        (*acc).key = key;
        (*acc).value = block;
    }
    Some(())
}

/// Block `key` from `start_ns` to `now`, if it ended in another window
/// than it began in (or outside every one): kept in `OFFCPU_SPANS` for
/// userspace, which cuts it where the VMs that moved the windows were
/// created. False if it did not, or if the map is full (a loss: it is
/// then counted whole in the window it began in).
#[inline(always)]
fn spanned(key: &OffCpuKey, start_ns: u64, now: u64) -> bool {
    // A block of a thread working for a VM is that VM's, whenever it ends.
    if is_attributed(key.window)
        || time_window().is_some_and(|w| (w ^ key.window) & !WINDOW_PARITY == 0)
    {
        return false;
    }
    let k = SpanKey {
        window: written_now(key.window),
        pid: key.pid,
        start_ns,
    };
    let v = SpanBlock {
        key: *key,
        end_ns: now,
        end_vms: vms_created(),
    };
    if OFFCPU_SPANS.insert(&k, &v, 0).is_err() {
        lose(k.window, Loss::OffCpuSpanFull);
        return false;
    }
    true
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
    // SAFETY: as in `comm_of`.
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
    // The block's window, under the parity of now: a thread's blocks are
    // added up in its entry and reach the map later.
    let key = &OffCpuKey {
        window: written_now(key.window),
        ..*key
    };
    if let Some(v) = OFFCPU_TIMES.get_ptr_mut(key) {
        // SAFETY: a valid map value. Keys hold the pid, and only the thread
        // itself adds its blocks (at switch-in and at exit), so plain updates
        // do not race.
        unsafe { (*v).add(value) };
    } else if OFFCPU_TIMES.insert(key, value, 0).is_err() {
        lose(key.window, Loss::OffCpuMapFull);
    }
}

/// The exit hook, for every exiting thread, tracked or not (its process
/// may have stopped being tracked first: an entry makes a thread count as
/// tracked): its blocks not yet in the off-CPU map go there, and its entry
/// goes. After the stop the entry stays for userspace to read.
#[inline(always)]
pub(super) fn task_exited(current: *mut task_struct) {
    if offcpu_stopped() {
        return;
    }
    let task = current as u64;
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
