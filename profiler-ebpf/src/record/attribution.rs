//! `--attribute vm`: which VM a thread's work is for, so that its events
//! are charged to that VM's window rather than to the time they happen in.
//!
//! - A libvirtd worker, from the entry of `virNetServerProgramDispatch` for
//!   a call that can start a VM (`VM_CALLS`, by procedure) to its return,
//!   works for that call: a fresh token, announced to userspace
//!   ([`EventKind::CallStarted`]).
//! - A process forked by a thread with a token (QEMU, a hook script, a
//!   helper) gets the token too, and so do all its threads; so does a
//!   thread made inside a call (libvirtd's per-domain event thread).
//! - A VM creation carries its creator's token ([`Event::token`]), or a
//!   fresh one given to its process: userspace charges every event of that
//!   token to the VM, so the work of a call counts for the VM whose QEMU
//!   it started, whenever the VM was created.
//!
//! - A call of another procedure whose arguments start with a domain (most
//!   `Domain*` calls) works for the VM of that domain, found by its UUID
//!   (userspace puts each VM's, from its QEMU's `-uuid`, in `VM_BY_UUID`).
//!
//! Threads with no token record under the time window, as without the
//! option: userspace shows them as unattributed. Each event pays for two
//! hash lookups (thread, then process) only with the option on.
//!
//! [`Event::token`]: profiler_common::record::Event
//! [`EventKind::CallStarted`]: profiler_common::record::EventKind

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
};
use profiler_common::record::{
    ATTRIBUTED, ATTRIBUTED_OWN, Counter, EventKind, Loss, MAX_DOMAIN_NAME, NET_MESSAGE_BUFFER,
    NET_MESSAGE_PAYLOAD, REMOTE_PROGRAM,
};

use super::common::{Task, count, emit_token, lose, stopped, time_window};

/// Threads inside a call that can start a VM, and the threads made inside
/// one: their token.
#[map]
static ATTR_THREAD: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);
/// Processes working for a VM or a call (by tgid): their token.
#[map]
static ATTR_PROCESS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);
/// The `remote` procedures that can start a VM (set by userspace).
#[map]
static VM_CALLS: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);
/// The VMs by their domain's UUID (set by userspace from each QEMU's
/// `-uuid`): their token.
#[map]
static VM_BY_UUID: HashMap<[u8; 16], u32> = HashMap::with_max_entries(16384, 0);
/// Per CPU: tokens given so far.
#[map]
static TOKENS: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The token `task` works under, if any (always `None` without the option).
#[inline(always)]
pub(super) fn of(task: Task) -> Option<u32> {
    if config!(attribute_vm) == 0 {
        return None;
    }
    // SAFETY: plain values, copied.
    if let Some(t) = unsafe { ATTR_THREAD.get(&task.pid()) } {
        return Some(*t);
    }
    // SAFETY: as above.
    unsafe { ATTR_PROCESS.get(&task.tgid()) }.copied()
}

/// A token not given before: this CPU's count, shifted past the CPU's
/// number. Unique until 2^29 tokens have been given.
#[inline(always)]
fn new_token() -> Option<u32> {
    let n = TOKENS.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; no other program runs on the CPU meanwhile
    // (`Running`, or a uprobe's own).
    let count = unsafe {
        let c = *n;
        *n = c.wrapping_add(1);
        c
    };
    // SAFETY: no preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    Some(ATTRIBUTED | ((count << config!(token_cpu_bits)) | cpu) & (ATTRIBUTED_OWN - 1))
}

/// A VM was created by `task`: the token it is charged under, 0 without
/// the option. That of the call that forked its process: a call works for
/// the first VM it started. Else a fresh one for its process, from now on
/// (a process that creates VM after VM works for the latest).
#[inline(always)]
pub(super) fn vm_created(task: Task) -> u32 {
    if config!(attribute_vm) == 0 {
        return 0;
    }
    if let Some(t) = of(task)
        && t & ATTRIBUTED_OWN == 0
    {
        return t;
    }
    let Some(t) = new_token() else { return 0 };
    let t = t | ATTRIBUTED_OWN;
    if ATTR_PROCESS.insert(&task.tgid(), &t, 0).is_err() {
        lose(time_window().unwrap_or(u32::MAX), Loss::AttributionFull);
        return 0;
    }
    t
}

/// `parent` forked process `child`: it works for what its parent works for.
#[inline(always)]
pub(super) fn fork(parent: Task, child: u32) {
    if let Some(t) = of(parent)
        && ATTR_PROCESS.insert(&child, &t, 0).is_err()
    {
        lose(time_window().unwrap_or(u32::MAX), Loss::AttributionFull);
    }
}

/// `parent` made thread `child`: one made inside a call works for that
/// call's VM for its whole life (libvirtd's per-domain event thread
/// `vm-NAME`); the threads of a process with a token have it already.
#[inline(always)]
pub(super) fn thread_created(parent: Task, child: u32) {
    if config!(attribute_vm) == 0 {
        return;
    }
    // SAFETY: a plain value, copied.
    if let Some(&t) = unsafe { ATTR_THREAD.get(&parent.pid()) }
        && ATTR_THREAD.insert(&child, &t, 0).is_err()
    {
        lose(time_window().unwrap_or(u32::MAX), Loss::AttributionFull);
    }
}

/// The exit hook, for every exiting task.
#[inline(always)]
pub(super) fn task_exited(task: Task) {
    if config!(attribute_vm) == 0 {
        return;
    }
    let _ = ATTR_THREAD.remove(&task.pid());
    if task.pid() == task.tgid() {
        let _ = ATTR_PROCESS.remove(&task.tgid());
    }
}

/// `virNetServerProgramDispatch(prog, server, client, msg)` entered: a call
/// of the `remote` program whose procedure can start a VM gets a token.
#[uprobe(multi)]
pub fn attribute_call_enter(ctx: ProbeContext) -> u32 {
    let _ = try_call_enter(&ctx);
    0
}

#[inline(always)]
fn try_call_enter(ctx: &ProbeContext) -> Option<()> {
    if config!(attribute_vm) == 0 || stopped() {
        return None;
    }
    let task = Task::tracked()?;
    let Some((buffer, procedure)) = procedure(ctx) else {
        count(Counter::CallsUnread);
        return None;
    };
    // SAFETY: only presence is tested.
    if unsafe { VM_CALLS.get(&procedure) }.is_none() {
        // A call on a domain: the VM it names, if hvprof saw it created.
        let Some(token) = named_vm(buffer) else {
            count(Counter::CallsOther);
            return None;
        };
        count(Counter::CallsOfDomain);
        if ATTR_THREAD.insert(&task.pid(), &token, 0).is_err() {
            lose(time_window().unwrap_or(u32::MAX), Loss::AttributionFull);
        }
        return None;
    }
    count(Counter::CallsAttributed);
    let token = new_token()?;
    if ATTR_THREAD.insert(&task.pid(), &token, 0).is_err() {
        lose(time_window().unwrap_or(u32::MAX), Loss::AttributionFull);
        return None;
    }
    emit_token(
        EventKind::CallStarted,
        task,
        procedure,
        0,
        time_window(),
        token,
    );
    Some(())
}

/// The dispatch's message (its buffer) and the procedure of its `remote`
/// program's call, if they can be read.
#[inline(always)]
fn procedure(ctx: &ProbeContext) -> Option<(u64, u32)> {
    let msg: u64 = ctx.arg(3)?;
    // SAFETY: user memory, read with the checked helper.
    let buffer = unsafe { bpf_probe_read_user((msg + NET_MESSAGE_BUFFER) as *const u64) }.ok()?;
    // The length, then program, version and procedure, big-endian.
    // SAFETY: as above.
    let head = unsafe { bpf_probe_read_user((buffer + 4) as *const [u32; 3]) }.ok()?;
    (u32::from_be(head[0]) == REMOTE_PROGRAM).then(|| (buffer, u32::from_be(head[2])))
}

/// The token of the VM whose domain a call's arguments start with (XDR
/// `remote_nonnull_domain`: the name, a length and its bytes padded to 4,
/// then the 16-byte UUID), if that UUID is one of the VMs'. A call whose
/// arguments are something else does not match: 16 bytes that are a VM's
/// UUID by chance are not to be expected.
#[inline(always)]
fn named_vm(buffer: u64) -> Option<u32> {
    let payload = buffer + NET_MESSAGE_PAYLOAD;
    // SAFETY: user memory, read with the checked helper.
    let len = u32::from_be(unsafe { bpf_probe_read_user(payload as *const u32) }.ok()?);
    if len == 0 || len > MAX_DOMAIN_NAME {
        return None;
    }
    let uuid_at = payload + 4 + u64::from((len + 3) & !3);
    // SAFETY: as above.
    let uuid = unsafe { bpf_probe_read_user(uuid_at as *const [u8; 16]) }.ok()?;
    // SAFETY: a plain value, copied.
    unsafe { VM_BY_UUID.get(&uuid) }.copied()
}

/// The dispatch returned: the call (replied to) is over for its thread (the
/// threads it made go on working for its VM).
#[uretprobe(multi)]
pub fn attribute_call_return(_ctx: RetProbeContext) -> u32 {
    if config!(attribute_vm) != 0 {
        let _ = ATTR_THREAD.remove(&Task::current().pid());
    }
    0
}
