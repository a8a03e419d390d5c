//! The profile: one self-contained, versioned, already-symbolized
//! recording. Everything after it (report, diff, exports) works from this
//! file alone, offline, on another machine. [`file`] is how it is stored,
//! [`merge`] how the parts of a recording add up.

pub mod attribute;
mod file;
pub mod merge;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub use self::file::{
    DEFAULT_MAX_INFLATED_MIB, FILE_NAME, FORMAT_VERSION, MAGIC, MAX_INFLATED_ENV, ProfileError,
    ProfileLog, Record,
};
use crate::windows::{Attribution, WindowInfo, WindowSpec};

/// Frame names are interned: stacks are lists of indices into
/// [`Profile::frames`], root first.
pub type Stack = Vec<u32>;

/// What one eBPF program cost, from the kernel's BPF statistics
/// (`record --bpf-stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStat {
    pub program: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Meta {
    pub hvprof_version: String,
    pub hostname: String,
    pub kernel: String,
    pub cpus: usize,
    /// Unix time of the start, in ms.
    pub started_unix_ms: u64,
    pub duration_ns: u64,
    /// The `hvprof record` command line.
    pub command_line: Vec<String>,
    /// What was recorded: `pid 123`, `comm libvirtd`, `all`, `command …`.
    pub target: String,
    pub follow_children: bool,
    pub frequency_hz: u64,
    pub window_spec: Option<WindowSpec>,
    pub min_block_ns: u64,
    pub max_block_ns: u64,
    /// `kvm`, `exec:qemu-system-*`.
    pub vm_events: Vec<String>,
    /// Why the recording stopped: `duration`, `SIGINT`, `target exited`, …
    pub stop_reason: String,
    pub tracers: Vec<String>,
    /// Per-program eBPF cost, when recorded with `--bpf-stats`.
    pub program_stats: Vec<ProgramStat>,
    /// Facts counted in the kernel that are not losses (e.g. lock waits
    /// that ended on another CPU than they began on).
    pub counters: std::collections::BTreeMap<String, u64>,
    /// hvprof's own CPU time (all its threads, not its eBPF programs, which
    /// run in the traced tasks) from the start of the recording to the
    /// stop: what it took from the workload's CPUs meanwhile. `None` in
    /// profiles written before hvprof measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_cpu_ns: Option<u64>,
    /// `record --verify-unwind`: the user stacks walked in the kernel,
    /// unwound again in userspace and compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_unwind: Option<VerifyUnwind>,
    /// Set by the reader when the recording has no end: hvprof was killed
    /// (or its machine stopped) while it recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<Incomplete>,
    /// Off-CPU time is the blocked time within each window (a block going
    /// on past its window cut at the windows' boundaries), and the blocks
    /// still going at the stop are kept apart ([`OffCpu::unfinished`]).
    /// False in profiles written before: each block whole in the window it
    /// began in, those still going at the stop included.
    #[serde(default)]
    pub offcpu_cut_at_windows: bool,
    /// `record --comm`: each time every process of that name was gone and
    /// one was started again (a daemon restarted), which was then followed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarts: Vec<Restart>,
    /// What the windows hold (`record --attribute`): the events of a time
    /// interval, or the work done for their VMs (then each row's window
    /// says which: a window of VMs, or an unattributed one).
    #[serde(default)]
    pub attribute: Attribution,
}

/// A recording cut off before its end: what the file still holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Incomplete {
    /// Since the start: the recording is whole up to here.
    pub until_ns: u64,
    /// The window that was open then, whose rest is missing.
    pub window: Option<u32>,
    /// The file is damaged after `until_ns` (rather than cut short), and why.
    pub damaged: Option<String>,
}

/// A `--comm` target restarted during the recording: its last process
/// exited, and a new one of the same name started (exec'd) later. Times
/// are since the start of the recording.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    pub comm: String,
    pub old_pid: u32,
    pub exited_ns: u64,
    pub new_pid: u32,
    pub started_ns: u64,
}

/// What `record --verify-unwind` found: sampled user-stack walks, each
/// unwound again in userspace (framehop) from a copy of the stack and the
/// registers the walk started from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VerifyUnwind {
    /// Samples received (the sum of the counts below).
    pub samples: u64,
    /// Both unwinders found the same frames.
    pub same: u64,
    /// Of these and `short`, those that matched only with mappings older
    /// than the process's latest: the kernel's tables had not caught up
    /// with them yet (a library mapped since).
    pub same_with_older_mappings: u64,
    /// A frame differs within the frames both found: one of the
    /// unwinders is wrong there.
    pub differs: u64,
    /// The same frames as far as the copy of the stack went; the kernel's
    /// walk went on past it (not a difference).
    pub short: u64,
    /// The same frames, but the kernel's walk ended (not at its frame
    /// limit) where framehop found more.
    pub kernel_shorter: u64,
    /// The same frames, but framehop ended inside the copy where the
    /// kernel's walk found more.
    pub framehop_shorter: u64,
    /// Not checked: no mappings known for the process.
    pub unchecked: u64,
    /// The first few samples that were not the same or short: both stacks,
    /// for debugging.
    pub examples: Vec<String>,
}

/// One VM creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCreation {
    pub ordinal: u64,
    /// Since the start of the recording.
    pub time_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// `kvm` or `exec`.
    pub source: String,
    pub cmdline: Option<String>,
    /// QEMU's `-name guest=NAME`.
    pub name: Option<String>,
    /// `--attribute vm`: the attribution token of its creator (the
    /// libvirtd call that started it, or its own process), while the
    /// recording's rows are not attributed yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u32>,
}

/// `--attribute vm`: a libvirtd call that could start a VM, whose work is
/// recorded under its token until it is known which VM it started (if
/// any; else it is unattributed, in the time window it began in).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallToken {
    pub token: u32,
    /// The time window it began in (`None`: outside every window).
    pub window: Option<u32>,
    /// libvirt's `remote` procedure.
    pub procedure: u32,
    /// Since the start of the recording.
    pub time_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnCpu {
    pub window: u32,
    pub tgid: u32,
    pub pid: u32,
    pub comm: String,
    pub stack: Stack,
    pub samples: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffCpu {
    pub window: u32,
    pub tgid: u32,
    pub pid: u32,
    pub comm: String,
    /// `S`, `D`, `R` (preempted), … as `ps` writes task states.
    pub state: String,
    pub stack: Stack,
    pub blocks: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// Of `total_ns`, the time spent waiting for a CPU: runnable after the
    /// wakeup, or all of a preemption.
    pub runq_ns: u64,
    /// The blocking D-Bus function the task was inside when it blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbus: Option<String>,
    /// Blocks still going when the recording stopped, timed up to the
    /// stop: kept out of the windows' off-CPU totals (see
    /// [`Meta::offcpu_cut_at_windows`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unfinished: bool,
}

/// Blocks of one thread from one stack, woken by one waker from one stack
/// (the wakers tracer): the off-CPU time of [`OffCpu`] rows, by who ended
/// it. A block counts in the window it began in, as there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffWake {
    pub window: u32,
    pub tgid: u32,
    pub pid: u32,
    pub comm: String,
    /// As [`OffCpu::state`] (never a preemption: nobody wakes those).
    pub state: String,
    /// The blocked thread's stack, as [`OffCpu::stack`].
    pub stack: Stack,
    pub waker: Waker,
    pub blocks: u64,
    pub total_ns: u64,
    pub max_ns: u64,
}

/// Who woke a blocked thread.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Waker {
    /// An interrupt (a timer, a device, an IPI): its kernel stack. The task
    /// it interrupted had no part in the wakeup.
    Interrupt { stack: Stack },
    /// The task that ran the wakeup, and its stack there (kernel frames,
    /// and user frames for a traced process).
    Task {
        tgid: u32,
        pid: u32,
        comm: String,
        stack: Stack,
    },
}

impl Waker {
    /// Its name in a graph: its comm, or `[interrupt]`.
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            Self::Interrupt { .. } => "[interrupt]",
            Self::Task { comm, .. } => comm,
        }
    }

    /// Its stack, root first.
    #[must_use]
    pub fn stack(&self) -> &[u32] {
        match self {
            Self::Interrupt { stack } | Self::Task { stack, .. } => stack,
        }
    }
}

impl std::fmt::Display for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Interrupt { .. } => f.write_str("[interrupt]"),
            Self::Task { pid, comm, .. } => write!(f, "{comm}[{pid}]"),
        }
    }
}

/// Waits for one kernel lock from one stack (the lock-contention tracer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockWait {
    pub window: u32,
    pub tgid: u32,
    pub comm: String,
    /// The lock's address.
    pub lock: u64,
    /// A static lock's symbol (from kallsyms), if the kernel exports it.
    pub lock_name: Option<String>,
    /// `spinlock`, `mutex`, `rwsem:W`, … as `perf lock contention` names them.
    pub lock_type: String,
    /// The waiter's stack.
    pub stack: Stack,
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// log2 histogram of the waits: bucket `i` counts waits in
    /// `[2^i, 2^(i+1))` ns.
    pub hist: Vec<u64>,
    /// Who held the lock as the waits began (mutexes and rwsems; `None`
    /// for other locks, and while a lock was being handed over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<Holder>,
}

/// Who held a lock as a waiter began to wait for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Holder {
    /// An rwsem held for reading: the kernel does not record its readers.
    Readers,
    /// The task in the lock's `owner` word, and its stack: kernel frames
    /// where it was switched out (one frame saying so if it was running),
    /// user frames where it blocked.
    Task {
        tgid: u32,
        pid: u32,
        comm: String,
        #[serde(default)]
        stack: Stack,
    },
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Readers => f.write_str("[readers]"),
            Self::Task { pid, comm, .. } => write!(f, "{comm}[{pid}]"),
        }
    }
}

/// Successful fork syscalls from one parent and call site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkCall {
    pub window: u32,
    pub tgid: u32,
    pub comm: String,
    /// `clone`, `clone3`, `fork` or `vfork`.
    pub syscall: String,
    /// A thread (`CLONE_THREAD`) rather than a process.
    pub thread: bool,
    /// The parent's user stack.
    pub stack: Stack,
    /// The function that called libc's fork/spawn/thread creation (from the
    /// return address a uprobe read at its entry), when known.
    #[serde(default)]
    pub caller: Option<String>,
    pub count: u64,
    /// The parent's time in the syscall (vfork: until the child execs).
    pub total_ns: u64,
    pub max_ns: u64,
}

/// Cgroup operations of one kind on one cgroup, by one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupOp {
    pub window: u32,
    pub tgid: u32,
    pub comm: String,
    /// `mkdir`, `rmdir` or `attach`.
    pub op: String,
    /// `v2`, or the v1 hierarchy's controllers (`memory`, `cpu,cpuacct`).
    pub hierarchy: String,
    /// The (destination) cgroup, as the kernel names it.
    pub path: String,
    pub count: u64,
    /// Operations whose system call was timed (the rest: count only).
    pub timed: u64,
    pub total_ns: u64,
    pub max_ns: u64,
}

/// Blocking D-Bus client calls to one method from one stack (the dbus
/// tracer). One call is one outermost blocking library call: GIO's nested
/// `call_sync` → `send_message_with_reply_sync` counts once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbusCall {
    pub window: u32,
    pub tgid: u32,
    pub comm: String,
    /// `libdbus`, `gio` or `sd-bus`.
    pub library: String,
    /// The outermost blocking function, e.g. `g_dbus_connection_call_sync`.
    pub function: String,
    /// Bus name called (`org.freedesktop.machine1`), when known.
    pub destination: Option<String>,
    pub path: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
    /// The timeout the caller passed, in ms (`-1`: the library default,
    /// 25 s for libdbus and GIO), when the function takes one.
    pub timeout_ms: Option<i64>,
    /// The caller's user stack.
    pub stack: Stack,
    pub calls: u64,
    /// Calls that ran for (at least) their whole timeout.
    pub timeouts: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// log2 histogram of the latencies: bucket `i` counts calls in
    /// `[2^i, 2^(i+1))` ns.
    pub hist: Vec<u64>,
}

/// libvirt's calls of one name in one window, ended one way: libvirtd's
/// API calls (from the call's arrival to its reply's queueing), the QMP
/// commands its QEMU driver sent (from the command to QEMU's reply), the
/// QMP events QEMU sent (counted, not timed), or its workers' waits for a
/// domain's job (from one caller stack). The libvirt tracer's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtCall {
    pub window: u32,
    /// libvirtd's process.
    pub tgid: u32,
    /// [`LibvirtCall::API`], [`LibvirtCall::QMP`], [`LibvirtCall::EVENT`]
    /// or [`LibvirtCall::JOB`].
    pub kind: String,
    /// `DomainCreateXML` (see [`crate::libvirt::procedure_name`]),
    /// `query-cpus-fast`, `RESUME`.
    pub name: String,
    /// [`LibvirtCall::OK`], [`LibvirtCall::ERROR`],
    /// [`LibvirtCall::TIMEOUT`] (a job wait that ran into libvirt's job
    /// wait timeout) or [`LibvirtCall::IN_FLIGHT`] (not over by the stop:
    /// its time is up to the stop).
    pub status: String,
    /// A job wait's: the waiter's thread name and user stack (its
    /// caller's, whole: taken at the return).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comm: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack: Stack,
    pub calls: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// log2 histogram of the latencies, as [`DbusCall::hist`].
    pub hist: Vec<u64>,
}

impl LibvirtCall {
    pub const API: &str = "api";
    pub const QMP: &str = "qmp";
    pub const EVENT: &str = "qmp-event";
    pub const JOB: &str = "jobwait";
    pub const OK: &str = "ok";
    pub const ERROR: &str = "error";
    pub const TIMEOUT: &str = "timeout";
    pub const IN_FLIGHT: &str = "in flight";

    /// This row as one call that took `ns`.
    #[must_use]
    pub fn timed_once(self, ns: u64) -> Self {
        let bucket = profiler_common::record::hist_bucket(ns);
        let mut hist = vec![0; bucket + 1];
        hist[bucket] = 1;
        Self {
            calls: 1,
            total_ns: ns,
            max_ns: ns,
            hist,
            ..self
        }
    }
}

impl DbusCall {
    /// The method called: `interface.member`, or what is known of it.
    #[must_use]
    pub fn method(&self) -> String {
        match (&self.interface, &self.member) {
            (Some(i), Some(m)) => format!("{i}.{m}"),
            (None, Some(m)) => m.clone(),
            (Some(i), None) => format!("{i}.?"),
            (None, None) => "?".to_owned(),
        }
    }
}

/// A loss counter: something that was not recorded, and how often.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossCount {
    /// `None`: outside every window, or not tied to one.
    pub window: Option<u32>,
    pub kind: String,
    pub count: u64,
}

/// A process seen during the recording.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub tgid: u32,
    pub comm: String,
    pub cmdline: Option<String>,
    /// The process it was forked from, when seen.
    pub parent: Option<u32>,
    pub forked_ns: Option<u64>,
    pub exec_ns: Option<u64>,
    pub exit_ns: Option<u64>,
    /// The windows of its fork and of its (last) exec.
    #[serde(default)]
    pub fork_window: Option<u32>,
    #[serde(default)]
    pub exec_window: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub meta: Meta,
    pub windows: Vec<WindowInfo>,
    pub vms: Vec<VmCreation>,
    pub frames: Vec<String>,
    pub oncpu: Vec<OnCpu>,
    pub offcpu: Vec<OffCpu>,
    /// The wakers tracer's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offwake: Vec<OffWake>,
    pub losses: Vec<LossCount>,
    pub processes: Vec<Process>,
    #[serde(default)]
    pub locks: Vec<LockWait>,
    #[serde(default)]
    pub forks: Vec<ForkCall>,
    #[serde(default)]
    pub cgroups: Vec<CgroupOp>,
    #[serde(default)]
    pub dbus: Vec<DbusCall>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub libvirt: Vec<LibvirtCall>,
    /// The user-stack unwinder, per window: why walks ended and how frames
    /// were found (`--unwind dwarf`; empty with frame pointers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unwind: Vec<LossCount>,
    /// `--attribute vm`, while the rows are not attributed yet (parts of a
    /// recording, and a recording that was killed): the calls with a token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<CallToken>,
}

/// Interns frame names while a profile is built.
#[derive(Debug, Default)]
pub struct FrameTable {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl FrameTable {
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = u32::try_from(self.names.len()).expect("fewer than 4G frames");
        self.names.push(name.to_owned());
        self.index.insert(name.to_owned(), i);
        i
    }

    #[must_use]
    pub fn names(&self) -> &[String] {
        &self.names
    }

    #[must_use]
    pub fn into_names(self) -> Vec<String> {
        self.names
    }
}

impl Profile {
    /// Whether `tracer` ran in this recording. A profile from before
    /// profiles listed their tracers had every one.
    #[must_use]
    pub fn recorded(&self, tracer: crate::tracer::Tracer) -> bool {
        self.meta.tracers.is_empty() || self.meta.tracers.iter().any(|t| t == tracer.name())
    }

    /// What a reader of an incomplete profile is told, naming the window
    /// whose data ends early.
    #[must_use]
    pub fn incomplete_warning(&self) -> Option<String> {
        let inc = self.meta.incomplete.as_ref()?;
        let window = inc
            .window
            .and_then(|id| self.windows.iter().find(|w| w.id == id))
            .map_or_else(
                || "no window".to_owned(),
                |w| format!("window {} ({})", w.name(), w.label()),
            );
        Some(format!(
            "the recording has no end: it holds the first {} and {} is incomplete{}",
            crate::words::human_ns(inc.until_ns),
            window,
            inc.damaged
                .as_deref()
                .map_or_else(String::new, |why| format!(
                    " (the file is damaged after that: {why})"
                ))
        ))
    }

    /// Puts every kind of row in its order: by window, then process and
    /// stack (locks: by lock; cgroups: by operation and path).
    pub fn sort_rows(&mut self) {
        self.oncpu.sort_by(|a, b| {
            (a.window, a.tgid, a.pid, &a.stack).cmp(&(b.window, b.tgid, b.pid, &b.stack))
        });
        self.offcpu.sort_by(|a, b| {
            (a.window, a.tgid, a.pid, &a.stack, &a.state)
                .cmp(&(b.window, b.tgid, b.pid, &b.stack, &b.state))
        });
        self.offwake.sort_by(|a, b| {
            (a.window, a.tgid, a.pid, &a.stack, &a.state, &a.waker)
                .cmp(&(b.window, b.tgid, b.pid, &b.stack, &b.state, &b.waker))
        });
        self.locks.sort_by(|a, b| {
            (a.window, a.lock, a.tgid, &a.stack, &a.holder)
                .cmp(&(b.window, b.lock, b.tgid, &b.stack, &b.holder))
        });
        self.forks.sort_by(|a, b| {
            (a.window, a.tgid, &a.stack, a.thread).cmp(&(b.window, b.tgid, &b.stack, b.thread))
        });
        self.dbus.sort_by(|a, b| {
            (a.window, a.tgid, &a.library, &a.member, &a.stack)
                .cmp(&(b.window, b.tgid, &b.library, &b.member, &b.stack))
        });
        self.libvirt.sort_by(|a, b| {
            (a.window, &a.kind, &a.name, &a.status, a.tgid, &a.stack)
                .cmp(&(b.window, &b.kind, &b.name, &b.status, b.tgid, &b.stack))
        });
        self.cgroups.sort_by(|a, b| {
            (a.window, &a.op, &a.hierarchy, &a.path, a.tgid).cmp(&(
                b.window,
                &b.op,
                &b.hierarchy,
                &b.path,
                b.tgid,
            ))
        });
        self.losses
            .sort_by(|a, b| (a.window, &a.kind).cmp(&(b.window, &b.kind)));
        self.unwind
            .sort_by(|a, b| (a.window, &a.kind).cmp(&(b.window, &b.kind)));
    }

    /// Every stack of every row, its frames renumbered by `f` (into
    /// another frame table).
    pub fn remap_stacks(&mut self, f: &dyn Fn(u32) -> u32) {
        let remap = |s: &mut Stack| s.iter_mut().for_each(|x| *x = f(*x));
        self.oncpu.iter_mut().for_each(|r| remap(&mut r.stack));
        self.offcpu.iter_mut().for_each(|r| remap(&mut r.stack));
        for r in &mut self.offwake {
            remap(&mut r.stack);
            match &mut r.waker {
                Waker::Interrupt { stack } | Waker::Task { stack, .. } => remap(stack),
            }
        }
        for r in &mut self.locks {
            remap(&mut r.stack);
            if let Some(Holder::Task { stack, .. }) = &mut r.holder {
                remap(stack);
            }
        }
        self.forks.iter_mut().for_each(|r| remap(&mut r.stack));
        self.dbus.iter_mut().for_each(|r| remap(&mut r.stack));
        self.libvirt.iter_mut().for_each(|r| remap(&mut r.stack));
    }

    /// The names of a stack's frames, root first.
    pub fn frame_names<'a>(
        &'a self,
        stack: &'a [u32],
    ) -> impl DoubleEndedIterator<Item = &'a str> + 'a {
        stack.iter().map(|&i| {
            self.frames
                .get(i as usize)
                .map_or("[bad frame]", String::as_str)
        })
    }
}
