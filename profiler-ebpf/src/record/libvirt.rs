//! libvirt's API calls: libvirtd's `rpc_server_client_msg_rx` probe at a
//! call's arrival notes it by client and serial; its
//! `rpc_server_client_msg_tx_queue` probe at the reply's queueing times it
//! and counts it under its procedure and reply status.
//!
//! QEMU monitor (QMP) messages: the QEMU driver's `qemu_monitor_send_msg`,
//! `qemu_monitor_recv_reply` and `qemu_monitor_recv_event` probes send the
//! start of the message's text to userspace, which pairs and reads them.
//!
//! All are USDT sites with semaphores, attached as `uprobe.multi` links
//! with the sites' reference counters; the low half of a probe's cookie is
//! the site's argument spec (see `crate::usdt`), the high half what the
//! site is (a [`qmp_kind`]).

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_attach_cookie, generated},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use profiler_common::record::{
    ApiCallKey, ApiCallStart, ApiCallStartKey, ApiCallValue, JOB_WAIT_TIMEOUT_NS, JobWaitKey,
    JobWaitStart, LOCK_HIST_BUCKETS, Loss, NO_WINDOW, QMP_TEXT, QmpMsg, job_outcome, msg_arg,
    net_type, qmp_arg, qmp_kind,
};

use super::{
    common::{Task, aggregate, comm, current_window, lose, now, stopped, timed, written_now},
    stacks::user_stack,
};
use crate::usdt::{usdt_arg, usdt_spec};

#[map]
static API_CALLS: HashMap<ApiCallKey, ApiCallValue> = HashMap::with_max_entries(8192, 0);
/// Calls received and not answered yet.
#[map]
static API_CALL_START: HashMap<ApiCallStartKey, ApiCallStart> = HashMap::with_max_entries(16384, 0);

/// QMP messages for userspace, drained every 100 ms: room for 15 000. A
/// guest's start sends hundreds of commands within a few ms (libvirt 11
/// reads the CPU's features with one `qom-get` each): 256 KiB overflowed
/// with 14 guests starting at once.
#[map]
static QMP_MSGS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Waits for a domain job, by caller stack and outcome.
#[map]
static JOB_WAITS: HashMap<JobWaitKey, ApiCallValue> = HashMap::with_max_entries(4096, 0);
/// The threads waiting for a domain job now.
#[map]
static JOB_WAIT_START: HashMap<u32, JobWaitStart> = HashMap::with_max_entries(16384, 0);

#[unsafe(no_mangle)]
static API_CALL_VALUE_ZERO: ApiCallValue = ApiCallValue {
    count: 0,
    total_ns: 0,
    max_ns: 0,
    hist: [0; LOCK_HIST_BUCKETS],
};

timed!(ApiCallValue, count, total_ns, max_ns, hist: hist);

/// The current task if it is traced and the recording runs, with the
/// window now (`NO_WINDOW` outside every window: a call or command that
/// starts there is still paired with its end).
#[inline(always)]
fn noted() -> Option<(Task, u32)> {
    let task = Task::tracked()?;
    if stopped() {
        return None;
    }
    Some((task, current_window().unwrap_or(NO_WINDOW)))
}

/// A message arrives: a call is noted.
#[uprobe(multi)]
pub fn libvirt_msg_rx(ctx: ProbeContext) -> u32 {
    let _ = try_msg_rx(&ctx);
    0
}

#[inline(always)]
fn try_msg_rx(ctx: &ProbeContext) -> Option<()> {
    // Charged to the window it began in, as a block is; outside every
    // window it is still noted, so that its reply finds it.
    let (task, window) = noted()?;
    let (_, spec) = usdt_spec(ctx)?;
    let kind = usdt_arg(ctx, spec, msg_arg::TYPE)?;
    if kind != net_type::CALL && kind != net_type::CALL_WITH_FDS {
        return None;
    }
    let key = ApiCallStartKey {
        client: usdt_arg(ctx, spec, msg_arg::CLIENT)?,
        serial: usdt_arg(ctx, spec, msg_arg::SERIAL)?,
    };
    let start = ApiCallStart {
        start_ns: now(),
        window,
        tgid: task.tgid(),
        program: usdt_arg(ctx, spec, msg_arg::PROGRAM)? as u32,
        procedure: usdt_arg(ctx, spec, msg_arg::PROCEDURE)? as u32,
    };
    if API_CALL_START.insert(&key, &start, 0).is_err() {
        lose(window, Loss::ApiCallMapFull);
    }
    Some(())
}

/// A reply is queued: its call is timed.
#[uprobe(multi)]
pub fn libvirt_msg_tx(ctx: ProbeContext) -> u32 {
    let _ = try_msg_tx(&ctx);
    0
}

#[inline(always)]
fn try_msg_tx(ctx: &ProbeContext) -> Option<()> {
    let _ = Task::tracked()?;
    let (_, spec) = usdt_spec(ctx)?;
    let kind = usdt_arg(ctx, spec, msg_arg::TYPE)?;
    if kind != net_type::REPLY && kind != net_type::REPLY_WITH_FDS {
        return None;
    }
    let key = ApiCallStartKey {
        client: usdt_arg(ctx, spec, msg_arg::CLIENT)?,
        serial: usdt_arg(ctx, spec, msg_arg::SERIAL)?,
    };
    // SAFETY: a valid map value, copied before its entry goes.
    let start = unsafe { *API_CALL_START.get(&key)? };
    let _ = API_CALL_START.remove(&key);
    // Noted by the thread that received it; replied to by the worker that
    // ran it, whose attribution (`--attribute vm`) is the call's.
    let window = super::attribution::of(Task::current()).unwrap_or(start.window);
    if window == NO_WINDOW || stopped() {
        return None;
    }
    let window = written_now(window);
    let call = ApiCallKey {
        window,
        tgid: start.tgid,
        program: start.program,
        procedure: start.procedure,
        status: usdt_arg(ctx, spec, msg_arg::STATUS)? as u32,
        pad: 0,
    };
    let ns = now().saturating_sub(start.start_ns);
    aggregate(
        &API_CALLS,
        &call,
        &API_CALL_VALUE_ZERO,
        window,
        Loss::ApiCallMapFull,
        ns,
    )?;
    Some(())
}

/// A QMP message sent or received: its monitor and the start of its text,
/// to userspace.
#[uprobe(multi)]
pub fn libvirt_qmp_msg(ctx: ProbeContext) -> u32 {
    let _ = try_qmp_msg(&ctx);
    0
}

#[inline(always)]
fn try_qmp_msg(ctx: &ProbeContext) -> Option<()> {
    // A command outside every window is still paired with its reply (and
    // counted nowhere).
    let (task, window) = noted()?;
    let (_, spec) = usdt_spec(ctx)?;
    // SAFETY: the context is the probe's.
    let kind = (unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } >> 32) as u32;
    if !matches!(kind, qmp_kind::SEND | qmp_kind::REPLY | qmp_kind::EVENT) {
        return None;
    }
    let mon = usdt_arg(ctx, spec, qmp_arg::MON)?;
    let text = usdt_arg(ctx, spec, qmp_arg::TEXT)?;
    let Some(mut entry) = QMP_MSGS.reserve::<QmpMsg>(0) else {
        lose(window, Loss::QmpMsgDropped);
        return None;
    };
    let msg = entry.as_mut_ptr();
    // SAFETY: the reserved entry, one QmpMsg long; the text is read from
    // user memory with the checked helper, at most QMP_TEXT bytes.
    unsafe {
        (*msg).ts_ns = now();
        (*msg).mon = mon;
        (*msg).kind = kind;
        (*msg).window = window;
        (*msg).tgid = task.tgid();
        let n = generated::bpf_probe_read_user_str(
            (&raw mut (*msg).text).cast::<c_void>(),
            QMP_TEXT as u32,
            text as *const c_void,
        );
        (*msg).len = if n > 0 { n as u32 } else { 0 };
    }
    entry.submit(0);
    Some(())
}

/// A worker starts waiting for a domain's job (`JOB_FUNCTION`'s entry).
#[uprobe(multi)]
pub fn libvirt_job_enter(_ctx: ProbeContext) -> u32 {
    if let Some((task, window)) = noted() {
        let start = JobWaitStart {
            start_ns: now(),
            window,
            tgid: task.tgid(),
        };
        if JOB_WAIT_START.insert(&task.pid(), &start, 0).is_err() {
            lose(window, Loss::JobWaitMapFull);
        }
    }
    0
}

/// It has the job, or gave up: the wait is timed, under the caller's
/// stack (at the return the registers are the caller's) and how it ended.
#[uretprobe(multi)]
pub fn libvirt_job_return(ctx: RetProbeContext) -> u32 {
    let _ = try_job_return(&ctx);
    0
}

#[inline(always)]
fn try_job_return(ctx: &RetProbeContext) -> Option<()> {
    let (tgid, pid) = Task::current().ids();
    // SAFETY: copied before the entry goes.
    let start = unsafe { *JOB_WAIT_START.get(&pid)? };
    let _ = JOB_WAIT_START.remove(&pid);
    if start.window == NO_WINDOW || stopped() {
        return None;
    }
    let ns = now().saturating_sub(start.start_ns);
    let rc: i32 = ctx.ret();
    let outcome = match rc {
        0.. => job_outcome::GOT,
        _ if ns >= JOB_WAIT_TIMEOUT_NS => job_outcome::TIMEOUT,
        _ => job_outcome::FAILED,
    };
    let window = written_now(start.window);
    let key = JobWaitKey {
        window,
        tgid,
        outcome,
        pad: 0,
        user_stack: user_stack(ctx, window),
        comm: comm(),
    };
    aggregate(
        &JOB_WAITS,
        &key,
        &API_CALL_VALUE_ZERO,
        window,
        Loss::JobWaitMapFull,
        ns,
    )?;
    Some(())
}

/// The exit hook of a traced thread: a wait it was in goes with it.
#[inline(always)]
pub(super) fn task_exited(pid: u32) {
    let _ = JOB_WAIT_START.remove(&pid);
}
