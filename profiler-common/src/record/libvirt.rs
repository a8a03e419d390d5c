//! libvirt's API calls, from libvirtd's own USDT probes
//! (`rpc_server_client_msg_rx` and `rpc_server_client_msg_tx_queue`): a
//! call received is paired with the reply queued for it by the client and
//! the call's serial, and timed.

use super::LOCK_HIST_BUCKETS;

/// `virNetMessageType` (libvirt's `src/rpc/virnetprotocol.x`): the kinds of
/// message a call and its reply are.
pub mod net_type {
    pub const CALL: u64 = 0;
    pub const REPLY: u64 = 1;
    pub const CALL_WITH_FDS: u64 = 4;
    pub const REPLY_WITH_FDS: u64 = 5;
}

/// `virNetMessageStatus`: a reply's status (`ERROR` for a call that failed).
pub mod net_status {
    pub const OK: u32 = 0;
    pub const ERROR: u32 = 1;
}

/// Where the `rpc_server_client_msg_*` probes put a message's header
/// fields among their arguments (`client, len, prog, vers, proc, type,
/// status, serial`, in libvirt 9.0 and 11.3 alike).
pub mod msg_arg {
    pub const CLIENT: usize = 0;
    pub const PROGRAM: usize = 2;
    pub const PROCEDURE: usize = 4;
    pub const TYPE: usize = 5;
    pub const STATUS: usize = 6;
    pub const SERIAL: usize = 7;
}

/// Key of the API-call aggregation: the calls of one procedure of one RPC
/// program answered with one status, charged to the window the call
/// arrived in (as a block is to the window it began in).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ApiCallKey {
    pub window: u32,
    /// libvirtd's process.
    pub tgid: u32,
    pub program: u32,
    pub procedure: u32,
    /// [`net_status`] of the reply.
    pub status: u32,
    pub pad: u32,
}

/// Calls of one [`ApiCallKey`]: from the call's arrival to its reply's
/// queueing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCallValue {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub hist: [u64; LOCK_HIST_BUCKETS],
}

/// A call received and not answered yet, by client and serial (a client's
/// serials are its own).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ApiCallStartKey {
    /// The `virNetServerClient` address.
    pub client: u64,
    pub serial: u64,
}

/// What a call's reply needs of its arrival.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCallStart {
    pub start_ns: u64,
    pub window: u32,
    pub tgid: u32,
    pub program: u32,
    pub procedure: u32,
}

/// Where the `qemu_monitor_*` probes of libvirt's QEMU driver put their
/// arguments: `send_msg(mon, msg, fd)`, `recv_reply(mon, reply)`,
/// `recv_event(mon, event)` — the monitor, then the message's JSON text.
pub mod qmp_arg {
    pub const MON: usize = 0;
    pub const TEXT: usize = 1;
}

/// Which probe saw a [`QmpMsg`].
pub mod qmp_kind {
    /// `qemu_monitor_send_msg`: a command sent to QEMU.
    pub const SEND: u32 = 1;
    /// `qemu_monitor_recv_reply`: QEMU's reply to the command in flight.
    pub const REPLY: u32 = 2;
    /// `qemu_monitor_recv_event`: an asynchronous event from QEMU.
    pub const EVENT: u32 = 3;
}

/// Bytes of a QMP message's text a [`QmpMsg`] holds: the command's
/// `execute`, a reply's `error` class and an event's name come first (a
/// reply's `return` value, which may be long, is not needed).
pub const QMP_TEXT: usize = 240;

/// A QMP message seen by libvirtd's QEMU driver, sent to userspace
/// (through the `QMP_MSGS` ring buffer), which pairs each command with its
/// reply per monitor and reads the JSON. Tens per VM started: a copy each
/// costs less than reading JSON in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QmpMsg {
    pub ts_ns: u64,
    /// The `qemuMonitor` address: one per QEMU, one command in flight.
    pub mon: u64,
    /// [`qmp_kind`].
    pub kind: u32,
    /// The window (with its flush parity) the message falls in;
    /// `NO_WINDOW` outside every window. A command is charged to the window
    /// it was sent in.
    pub window: u32,
    pub tgid: u32,
    /// Bytes of `text` read, its NUL included (0: unreadable).
    pub len: u32,
    pub text: [u8; QMP_TEXT],
}

/// The function every domain job of libvirt ≥ 8.x starts in
/// (`virDomainObjBeginJob`, `…AgentJob`, `…AsyncJob`, `…NestedJob` end in a
/// tail call to it): it waits on the domain's job condition until the job
/// is free, or until `VIR_JOB_WAIT_TIME` (30 s) has passed.
pub const JOB_FUNCTION: &str = "virDomainObjBeginJobInternal";

/// A wait that fails after this long ran into libvirt's `VIR_JOB_WAIT_TIME`
/// (30 s: "cannot acquire state change lock"). libvirt's deadline is in ms
/// of a clock it truncates, so such a wait may end up to a ms short of
/// 30 s; a wait that fails otherwise fails at once.
pub const JOB_WAIT_TIMEOUT_NS: u64 = 29_900_000_000;

/// How a wait for a domain job ended.
pub mod job_outcome {
    /// The caller got the job.
    pub const GOT: u32 = 0;
    /// It failed at once (no such domain, not running, …).
    pub const FAILED: u32 = 1;
    /// It failed after the job wait timeout.
    pub const TIMEOUT: u32 = 2;
}

/// Key of the job-wait aggregation: the waits of one caller stack that
/// ended one way, charged to the window the wait began in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct JobWaitKey {
    pub window: u32,
    pub tgid: u32,
    /// [`job_outcome`].
    pub outcome: u32,
    pub pad: u32,
    /// The waiter's user stack at the return: its caller's, whole.
    pub user_stack: u64,
    pub comm: [u8; super::COMM_LEN],
}

/// A thread waiting for a domain job.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobWaitStart {
    pub start_ns: u64,
    /// `NO_WINDOW` outside every window.
    pub window: u32,
    pub tgid: u32,
}
