//! What the recording programs share with userspace: configuration globals,
//! aggregation keys and values, ring-buffer events and loss counters.
//!
//! Aggregation follows libbpf-tools (`profile.bpf.c`, `offcputime.bpf.c`): a
//! hash of `{window, tgid, pid, kernel stack id, user stack id, comm}` to a
//! count or to times, read by userspace when the recording stops. Each
//! tracer's types are in its own module, re-exported here.

mod cgroup;
mod dbus;
mod fork;
mod libvirt;
mod locks;
mod stacks;

pub use self::{cgroup::*, dbus::*, fork::*, libvirt::*, locks::*, stacks::*};

/// `KVM_CREATE_VM`, `_IO(KVMIO, 0x01)`: a successful call is a VM creation.
pub const KVM_CREATE_VM: u64 = 0xAE01;

/// The kernel's task comm length, with its NUL.
pub const COMM_LEN: usize = 16;

/// The deepest stack the stack map keeps (the kernel's `PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

/// One stack as the kernel's `bpf_get_stack` writes it: instruction
/// pointers, leaf first, zero after the last frame.
///
/// Stacks are stored by a 64-bit hash of their content in the `STACKS` hash
/// map, not in a `BPF_MAP_TYPE_STACK_TRACE` map: that map keeps one stack per
/// bucket and loses a stack whenever two share a bucket (-EEXIST), which
/// QEMU's TCG threads and frame-pointer-less libraries, with thousands of
/// distinct user stacks, make common. A hash map chains, so it never loses a
/// stack to a collision; a 64-bit content hash makes two distinct stacks
/// sharing an id negligible.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackBuf {
    pub ips: [u64; MAX_STACK_DEPTH],
}

/// Stack ids below this are not hashes but "no stack" reasons: the errno
/// `bpf_get_stack` returned (e.g. 14 for -EFAULT, no stack in that mode).
pub const STACK_ID_MIN: u64 = 4096;
/// No user space: the task is exiting and its address space is gone.
pub const STACK_EXITING: u64 = 3;
/// Not taken, on purpose: a preempted task's stacks (see
/// `Config::preempted_stacks`).
pub const STACK_NOT_TAKEN: u64 = 1;
/// Off-CPU kernel stack to be taken when the task is switched back in (a
/// start's placeholder, never in a recorded key).
pub const STACK_DEFERRED: u64 = 4001;
/// Off-CPU kernel stack not walked: the block was shorter than
/// `Config::kstack_min_ns`.
pub const STACK_SHORT_BLOCK: u64 = 4002;
/// A lock holder's stacks not taken: it was running (on another CPU),
/// where no other task's stack can be walked.
pub const STACK_HOLDER_ON_CPU: u64 = 4003;
/// A lock holder's user stack not known: it was not blocked where the
/// off-CPU tracer saw it block.
pub const STACK_HOLDER_USER_UNKNOWN: u64 = 4004;
/// A stack not walked, and nothing to say in its place: a waker's user
/// stack when the waker was an interrupt, or a process not traced.
pub const STACK_NOT_WALKED: u64 = 4005;

/// At most this many explicit `--windows` ranges.
pub const MAX_WINDOW_RANGES: u32 = 64;

/// Window id of the time before the first VM is created.
pub const SETUP_WINDOW: u32 = 0;

/// The `STOPPED` flag's bits. [`PHASE_STOPPED`]: the recording has
/// stopped, the programs change nothing. [`PHASE_PARITY`]: the flush
/// parity, flipped by userspace at every flush: the programs key what they
/// record under the window with the parity in [`WINDOW_PARITY`] — the
/// parity when they write it, even for an event that began before the
/// flip (charged to the window it began in) — so the entries of the parity
/// before the flip are written no more and can be read and deleted
/// without a race.
pub const PHASE_STOPPED: u32 = 1;
pub const PHASE_PARITY: u32 = 2;
/// The system-call programs run on the calls' own tracepoints, no longer
/// through the dispatch (see the eBPF `syscalls` module).
pub const PHASE_PER_CALL_SYSCALLS: u32 = 4;
/// The off-CPU tracer has stopped (before the rest, which goes on while a
/// command hvprof started is ended): a block still going stays so, to be
/// read as unfinished at the stop.
pub const PHASE_OFFCPU_STOPPED: u32 = 8;
/// The bit of a recorded window that is the flush parity.
pub const WINDOW_PARITY: u32 = 1 << 31;
/// A recorded window that is no window (an event outside every window).
pub const NO_WINDOW: u32 = u32::MAX;

/// A recorded window that is not a time window but the VM its thread works
/// for (`--attribute vm`): this bit, with an attribution token in the bits
/// below it. Userspace learns which VM a token is for from the VM
/// creations that carry it ([`Event::token`]).
pub const ATTRIBUTED: u32 = 1 << 30;

/// The bit of an attribution token given to a process at a VM creation of
/// its own (not forked by a call): its next VM creation gives it another,
/// so that a process that creates VM after VM works for the latest.
pub const ATTRIBUTED_OWN: u32 = 1 << 29;

/// Whether a recorded window is an attribution token ([`ATTRIBUTED`]).
#[must_use]
pub const fn is_attributed(recorded: u32) -> bool {
    recorded != NO_WINDOW && recorded & ATTRIBUTED != 0
}

/// The function of libvirt's RPC server that dispatches one call, in a
/// worker thread, up to its reply: `virNetServerProgramDispatch(prog,
/// server, client, msg)`, exported by `libvirt.so.0`.
pub const DISPATCH_FUNCTION: &str = "virNetServerProgramDispatch";
/// Where `virNetMessage.buffer` is (`bool tracked; char *buffer; …`, the
/// layout since libvirt 1.x): the message as received, its XDR header
/// (`program, version, procedure, …`, big-endian) after its length.
pub const NET_MESSAGE_BUFFER: u64 = 8;
/// Where a call's arguments start in its message: after the length and the
/// six words of the header.
pub const NET_MESSAGE_PAYLOAD: u64 = 4 + 6 * 4;
/// The longest domain name read from a call's arguments (libvirt's own
/// limit is larger; a longer one is not looked up).
pub const MAX_DOMAIN_NAME: u32 = 1024;

/// The `remote` program of libvirt's RPC protocol (the public API).
pub const REMOTE_PROGRAM: u32 = 0x2000_8086;

/// The window of a recorded key or event, without its flush parity;
/// `None` for [`NO_WINDOW`].
#[must_use]
pub const fn recorded_window(recorded: u32) -> Option<u32> {
    if recorded == NO_WINDOW {
        None
    } else {
        Some(recorded & !WINDOW_PARITY)
    }
}

/// The flush parity a recorded window was written under (`NO_WINDOW`:
/// none).
#[must_use]
pub const fn parity_of(recorded: u32) -> Option<bool> {
    if recorded == NO_WINDOW {
        None
    } else {
        Some(recorded & WINDOW_PARITY != 0)
    }
}

/// Map, program and global names in the eBPF object.
pub mod names {
    pub const ONCPU_COUNTS: &str = "ONCPU_COUNTS";
    pub const OFFCPU_TIMES: &str = "OFFCPU_TIMES";
    pub const OFFCPU_START: &str = "OFFCPU_START";
    pub const STACKS: &str = "STACKS";
    pub const EVENTS: &str = "EVENTS";
    pub const TRACKED: &str = "TRACKED";
    pub const WINDOW_RANGES: &str = "WINDOW_RANGES";
    pub const VM_STATE: &str = "VM_STATE";
    pub const LOSSES: &str = "LOSSES";
    pub const PENDING_CREATE: &str = "PENDING_CREATE";

    pub const CONFIG: &str = "CONFIG";

    pub const PROG_ONCPU: &str = "oncpu_sample";
    pub const PROG_SCHED_SWITCH: &str = "offcpu_sched_switch";
    pub const PROG_FORK: &str = "task_fork";
    pub const PROG_EXEC: &str = "task_exec";
    pub const PROG_EXIT: &str = "task_exit";
    pub const PROG_IOCTL_ENTER: &str = "vm_ioctl_enter";
    pub const PROG_IOCTL_EXIT: &str = "vm_ioctl_exit";
    /// The system-call programs' twins on the calls' own tracepoints.
    pub const PROG_IOCTL_PER_CALL: [&str; 2] =
        ["vm_ioctl_enter_per_call", "vm_ioctl_exit_per_call"];
    pub const PROG_LOCK_BEGIN: &str = "lock_contention_begin";
    pub const PROG_LOCK_END: &str = "lock_contention_end";
    pub const PROG_SCHED_WAKING: &str = "offcpu_sched_waking";
    pub const OFFWAKE_TIMES: &str = "OFFWAKE_TIMES";
    pub const WAKER_SITES: &str = "WAKER_SITES";
    pub const OFFCPU_SPANS: &str = "OFFCPU_SPANS";

    pub const LOCK_WAITS: &str = "LOCK_WAITS";
    pub const LOCK_PENDING: &str = "LOCK_PENDING";
    pub const COUNTERS: &str = "COUNTERS";
    /// One `u32`: [`PHASE_STOPPED`](super::PHASE_STOPPED) once userspace
    /// stopped the recording, and the flush parity.
    pub const STOPPED: &str = "STOPPED";
    pub const FORK_CALLS: &str = "FORK_CALLS";
    pub const CGROUP_OPS: &str = "CGROUP_OPS";
    pub const PROG_CGROUP_MKDIR: &str = "cgroup_mkdir";
    pub const PROG_CGROUP_RMDIR: &str = "cgroup_rmdir";
    pub const PROG_CGROUP_ATTACH: &str = "cgroup_attach";
    pub const PROG_CGROUP_SYSCALL_ENTER: &str = "cgroup_syscall_enter";
    pub const PROG_CGROUP_SYSCALL_EXIT: &str = "cgroup_syscall_exit";
    pub const PROG_CGROUP_SYSCALL_PER_CALL: [&str; 2] = [
        "cgroup_syscall_enter_per_call",
        "cgroup_syscall_exit_per_call",
    ];
    pub const PROG_FORK_ENTER: &str = "fork_syscall_enter";
    pub const PROG_FORK_EXIT: &str = "fork_syscall_exit";
    pub const PROG_FORK_PER_CALL: [&str; 2] =
        ["fork_syscall_enter_per_call", "fork_syscall_exit_per_call"];
    pub const PROG_FORK_CALLER: &str = "fork_caller";
    pub const PROG_UNWIND_MMAP_ENTER: &str = "unwind_mmap_enter";
    pub const PROG_UNWIND_MMAP_EXIT: &str = "unwind_mmap_exit";
    pub const PROG_UNWIND_MMAP_PER_CALL: [&str; 2] =
        ["unwind_mmap_enter_per_call", "unwind_mmap_exit_per_call"];
    /// On `raw_syscalls:sys_enter`/`sys_exit`: jump to the program in the
    /// call's slot of `SYSCALL_ENTER_PROGS`/`SYSCALL_EXIT_PROGS`.
    pub const PROG_SYSCALL_ENTER: &str = "syscall_enter";
    pub const PROG_SYSCALL_EXIT: &str = "syscall_exit";
    pub const SYSCALL_ENTER_PROGS: &str = "SYSCALL_ENTER_PROGS";
    pub const SYSCALL_EXIT_PROGS: &str = "SYSCALL_EXIT_PROGS";
    pub const API_CALLS: &str = "API_CALLS";
    pub const API_CALL_START: &str = "API_CALL_START";
    pub const QMP_MSGS: &str = "QMP_MSGS";
    pub const PROG_LIBVIRT_MSG_RX: &str = "libvirt_msg_rx";
    pub const PROG_LIBVIRT_MSG_TX: &str = "libvirt_msg_tx";
    pub const PROG_QMP_MSG: &str = "libvirt_qmp_msg";
    pub const JOB_WAITS: &str = "JOB_WAITS";
    pub const JOB_WAIT_START: &str = "JOB_WAIT_START";
    pub const PROG_JOB_ENTER: &str = "libvirt_job_enter";
    pub const PROG_JOB_RETURN: &str = "libvirt_job_return";
    pub const PROG_CALL_ENTER: &str = "attribute_call_enter";
    pub const PROG_CALL_RETURN: &str = "attribute_call_return";
    pub const VM_CALLS: &str = "VM_CALLS";
    pub const VM_BY_UUID: &str = "VM_BY_UUID";
    pub const DBUS_CALLS: &str = "DBUS_CALLS";
    pub const PROG_DBUS_ENTER: &str = "dbus_enter";
    pub const PROG_DBUS_RETURN: &str = "dbus_return";
    pub const PROG_DBUS_NAMES: &str = "dbus_names";
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    pub const UNWIND_RULES: &str = "UNWIND_RULES";
    pub const UNWIND_CHUNKS: &str = "UNWIND_CHUNKS";
    pub const UNWIND_PROCS: &str = "UNWIND_PROCS";
    pub const UNWIND_STOPS: &str = "UNWIND_STOPS";
    pub const UNWIND_VERIFY: &str = "UNWIND_VERIFY";
}

/// Which tasks are recorded.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetMode {
    /// Every task (`-a`).
    All = 0,
    /// Tasks whose thread group is in the `TRACKED` map.
    Tracked = 1,
}

/// How VM ordinals map to windows.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowMode {
    /// Window `w >= 1` holds VMs `(w-1)*K+1 ..= w*K`.
    Every = 0,
    /// Window `i + 1` holds VMs `WINDOW_RANGES[i].first ..= .last`.
    Ranges = 1,
}

/// Byte offsets of the kernel structure fields the tracepoint programs
/// read, from kernel BTF by userspace (the eBPF side is built without
/// CO-RE; they move between kernels and configurations).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.pid`: the child of `sched_process_fork`.
    pub task_pid: u32,
    /// `cgroup.root`, and `cgroup_root.hierarchy_id` (the hierarchy of a
    /// cgroup operation: 0 is cgroup v2).
    pub cgroup_root: u32,
    pub cgroup_hierarchy_id: u32,
    /// `task_struct.nvcsw` and `nivcsw`: a task's context switches, which
    /// tell the lock tracer a spinning wait has ended unseen.
    pub task_nvcsw: u32,
    pub task_nivcsw: u32,
    /// `task_struct.tgid`, `mutex.owner` and `rw_semaphore.owner`: a lock
    /// waiter's holder ([`OFFSET_UNKNOWN`] where kernel BTF lacks one).
    pub task_tgid: u32,
    pub mutex_owner: u32,
    pub rwsem_owner: u32,
    /// `task_struct.on_cpu`: whether a lock holder is running.
    pub task_on_cpu: u32,
    /// `task_struct.stack`: the base of a task's kernel stack, which tells
    /// a waker's program whether it runs in an interrupt.
    pub task_stack: u32,
}

/// A [`KernelOffsets`] field kernel BTF did not give.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

/// Slots of the system-call dispatch tables (`SYSCALL_ENTER_PROGS`,
/// `SYSCALL_EXIT_PROGS`), indexed by system call number: the programs on
/// `raw_syscalls:sys_enter`/`sys_exit` jump to the program in the slot of
/// the call, if any.
pub const SYSCALL_SLOTS: u32 = 512;

/// The log2 bucket of a wait (see [`LOCK_HIST_BUCKETS`]).
#[must_use]
pub fn hist_bucket(ns: u64) -> usize {
    let b = (64 - ns.leading_zeros()) as usize;
    let b = b.saturating_sub(1);
    if b >= LOCK_HIST_BUCKETS {
        LOCK_HIST_BUCKETS - 1
    } else {
        b
    }
}

/// Read-only configuration, set by userspace before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// [`TargetMode`].
    pub target_mode: u32,
    /// Nonzero: children of tracked tasks are tracked too.
    pub follow_children: u32,
    /// [`WindowMode`].
    pub window_mode: u32,
    /// `K` of [`WindowMode::Every`].
    pub window_size: u32,
    /// Number of valid entries in `WINDOW_RANGES`.
    pub window_ranges: u32,
    /// Nonzero: a successful `KVM_CREATE_VM` counts as a VM creation.
    pub vm_event_kvm: u32,
    /// Nonzero: an exec whose new comm matches `vm_exec_comm` counts.
    pub vm_event_exec: u32,
    /// Nonzero: `vm_exec_comm` is a prefix (pattern ended in `*`).
    pub vm_exec_prefix: u32,
    /// Bytes of `vm_exec_comm` to compare.
    pub vm_exec_len: u32,
    /// hvprof's own thread group, never recorded.
    pub self_tgid: u32,
    pub vm_exec_comm: [u8; COMM_LEN],
    /// `--comm`: an exec whose new comm equals this (first `target_comm_len`
    /// bytes) starts tracking that process.
    pub target_comm: [u8; COMM_LEN],
    pub target_comm_len: u32,
    /// Most frames of a user stack (0: [`MAX_STACK_DEPTH`]).
    pub user_stack_depth: u32,
    /// Nonzero: take stacks of preempted tasks too (state R) at switch-out.
    pub preempted_stacks: u32,
    /// Nonzero: reuse a thread's off-CPU user stack when it blocks again at
    /// the same site (same user ip, sp, bp and return address).
    pub block_site_cache: u32,
    /// This architecture's numbers of clone, clone3, fork and vfork.
    pub nr_clone: u32,
    pub nr_clone3: u32,
    pub nr_fork: u32,
    pub nr_vfork: u32,
    /// `--min-block`, in ns.
    pub min_block_ns: u64,
    /// `--max-block`, in ns.
    pub max_block_ns: u64,
    /// `--kernel-stack-min-block`, in ns: an off-CPU kernel stack is walked
    /// (when the task comes back) only for blocks at least this long.
    pub kstack_min_ns: u64,
    /// Where the syscall entry calls into C (`entry_SYSCALL_64_after_hwframe`
    /// up to the next symbol), from kallsyms; 0s if unknown. A kernel stack
    /// whose outermost return address is there has the per-syscall random
    /// offset above its other frames.
    pub syscall_entry: u64,
    pub syscall_entry_end: u64,
    pub offsets: KernelOffsets,
    /// Offset of `task_struct.thread.sp` (the saved kernel stack pointer of
    /// a task that is not running), from kernel BTF; 0 if unknown, and then
    /// no kernel stack is reused.
    pub task_thread_sp: u32,
    /// Nonzero: walk the stacks even where one is reused, and count the
    /// reuses that differ from the walk (`Counter::*ReuseDiffers`).
    pub verify_stack_cache: u32,
    /// Offset of `task_struct.sched_info.run_delay` (the task's total
    /// run-queue wait, `CONFIG_SCHED_INFO`), from kernel BTF; 0 if unknown,
    /// and then no run-queue wait is measured.
    pub task_run_delay: u32,
    /// Offset of `task_struct.comm`, from kernel BTF; 0 if unknown, and
    /// then the comm comes from `bpf_get_current_comm` (a helper call, the
    /// dearest part of a context switch's bookkeeping after the user
    /// stack).
    pub task_comm: u32,
    /// Nonzero: the fork-caller uprobe is attached somewhere, and a fork's
    /// caller is taken from it where it fired.
    pub fork_uprobes: u32,
    /// Nonzero: user stacks are unwound from the unwind tables
    /// (`--unwind dwarf`), else by the kernel's frame-pointer walk.
    pub unwind_dwarf: u32,
    /// Nonzero: every Nth user-stack walk (N = this) also copies the user
    /// stack and registers to `UNWIND_VERIFY`, to be unwound again in
    /// userspace (`--verify-unwind`).
    pub verify_unwind: u32,
    /// Nonzero: the dbus tracer is on (a thread's exit ends its calls).
    pub dbus: u32,
    /// Nonzero: the wakers tracer is on (the off-CPU tracer charges a
    /// block to its waker too).
    pub wakers: u32,
    /// The kernel's `THREAD_SIZE`: a program whose stack is not within
    /// the current task's that far runs in an interrupt. 0: not known, a
    /// waker is never taken for an interrupt.
    pub thread_size: u32,
    /// Nonzero: the lock tracer acts as if the kernel had kept its end
    /// program from running once in this many ends, at random (each
    /// counted, `Counter::LockEndsDropped`), to test that the begins left
    /// behind are dropped and never paired (`--drop-lock-ends`, hidden).
    pub drop_lock_ends: u32,
    /// Nonzero: `--attribute vm` (see [`ATTRIBUTED`]).
    pub attribute_vm: u32,
    /// Attribution tokens are a per-CPU count shifted left by this many
    /// bits, or'ed with the CPU: enough bits for every possible CPU.
    pub token_cpu_bits: u32,
    pub pad_tail: u32,
    /// Where libc's fork functions keep their caller's return address at
    /// the syscall (see [`ForkPath`]); unused entries are
    /// [`ForkPath::UNUSED`].
    pub fork_paths: [ForkPath; FORK_PATHS],
}

impl Config {
    #[must_use]
    pub const fn zeroed() -> Self {
        Self {
            target_mode: 0,
            follow_children: 0,
            window_mode: 0,
            window_size: 1,
            window_ranges: 0,
            vm_event_kvm: 0,
            vm_event_exec: 0,
            vm_exec_prefix: 0,
            vm_exec_len: 0,
            self_tgid: 0,
            vm_exec_comm: [0; COMM_LEN],
            target_comm: [0; COMM_LEN],
            target_comm_len: 0,
            user_stack_depth: 0,
            preempted_stacks: 0,
            block_site_cache: 0,
            nr_clone: 0,
            nr_clone3: 0,
            nr_fork: 0,
            nr_vfork: 0,
            min_block_ns: 0,
            max_block_ns: u64::MAX,
            kstack_min_ns: 0,
            syscall_entry: 0,
            syscall_entry_end: 0,
            offsets: KernelOffsets {
                task_pid: 0,
                cgroup_root: 0,
                cgroup_hierarchy_id: 0,
                task_nvcsw: 0,
                task_nivcsw: 0,
                task_tgid: OFFSET_UNKNOWN,
                mutex_owner: OFFSET_UNKNOWN,
                rwsem_owner: OFFSET_UNKNOWN,
                task_on_cpu: OFFSET_UNKNOWN,
                task_stack: OFFSET_UNKNOWN,
            },
            task_thread_sp: 0,
            verify_stack_cache: 0,
            task_run_delay: 0,
            task_comm: 0,
            fork_uprobes: 0,
            unwind_dwarf: 0,
            verify_unwind: 0,
            dbus: 0,
            wakers: 0,
            thread_size: 0,
            drop_lock_ends: 0,
            attribute_vm: 0,
            token_cpu_bits: 0,
            pad_tail: 0,
            fork_paths: [ForkPath::UNUSED; FORK_PATHS],
        }
    }
}

/// One explicit window: VM ordinals `first ..= last`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowRange {
    pub first: u32,
    pub last: u32,
}

/// [`WindowMode::Every`]: the window of the `vms`-th VM (`vms >= 1`), in
/// windows of `size` (0 counts as 1). Used by the programs too.
#[inline(always)]
#[must_use]
#[expect(clippy::inline_always, reason = "on the eBPF per-event path")]
pub fn window_every(size: u32, vms: u64) -> u32 {
    let k = if size == 0 { 1 } else { u64::from(size) };
    let w = vms.saturating_sub(1) / k + 1;
    if w > u64::from(u32::MAX) {
        u32::MAX
    } else {
        #[expect(clippy::cast_possible_truncation, reason = "checked just above")]
        let w = w as u32;
        w
    }
}

/// The window a VM count falls in, or `None` when it is outside every
/// window (then nothing is recorded). The programs apply the same rule to
/// the `WINDOW_RANGES` map.
#[must_use]
pub fn window_of(mode: u32, window_size: u32, vms: u64, ranges: &[WindowRange]) -> Option<u32> {
    if vms == 0 {
        return Some(SETUP_WINDOW);
    }
    if mode == WindowMode::Every as u32 {
        return Some(window_every(window_size, vms));
    }
    let mut i = 0;
    while i < ranges.len() {
        let r = ranges[i];
        if vms >= u64::from(r.first) && vms <= u64::from(r.last) {
            return u32::try_from(i + 1).ok();
        }
        i += 1;
    }
    None
}

/// The VM counter, in a one-entry array so userspace can read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmState {
    pub created: u64,
}

/// Kinds of ring-buffer events.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    VmCreated = 1,
    /// A tracked task (or, with `-a`, any task) exec'd.
    Exec = 2,
    /// A tracked process exited (its thread-group leader).
    Exit = 3,
    /// A tracked task forked a new process (not a thread).
    Fork = 4,
    /// The user-stack unwinder met a tracked process whose mappings it
    /// does not know (not loaded yet, or a PC outside them: a `dlopen`):
    /// userspace reads its mappings and loads their unwind tables.
    UnwindTables = 5,
    /// A process the unwinder knows mapped a file executable (the dynamic
    /// loader at a `dlopen`): userspace reads its mappings again once the
    /// loader's burst of mappings is over.
    UnwindMapping = 6,
    /// `--attribute vm`: a libvirtd worker began a call that can start a
    /// VM (`child`: its procedure), and works for it under
    /// [`Event::token`] until its reply.
    CallStarted = 7,
}

/// A process's mappings are read again this long after an
/// [`EventKind::UnwindMapping`], and the kernel announces no other mapping
/// of the process meanwhile (that read will see it): an exec'd process's
/// loader maps dozens of libraries within a few ms, in a few reads.
pub const MAPPING_SETTLE_NS: u64 = 10_000_000;

/// A VM creation seen as a successful `KVM_CREATE_VM`.
pub const VM_SOURCE_KVM: u32 = 1;
/// A VM creation seen as an exec matching `--vm-event exec:PATTERN`.
pub const VM_SOURCE_EXEC: u32 = 2;

/// A rare event, sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// [`EventKind`].
    pub kind: u32,
    pub pid: u32,
    pub tgid: u32,
    /// For [`EventKind::Fork`], the child's pid; for
    /// [`EventKind::VmCreated`], [`VM_SOURCE_KVM`] or [`VM_SOURCE_EXEC`].
    pub child: u32,
    /// `bpf_ktime_get_ns`.
    pub ts_ns: u64,
    /// For [`EventKind::VmCreated`], the VM's ordinal (1-based).
    pub ordinal: u64,
    /// The window the event falls in (`u32::MAX`: outside every window).
    /// For [`EventKind::CallStarted`], the time window, whatever the
    /// thread's attribution.
    pub window: u32,
    /// `--attribute vm`: for [`EventKind::VmCreated`] and
    /// [`EventKind::CallStarted`], the attribution token (an
    /// [`ATTRIBUTED`] window) of the VM's creator or of the call; else 0.
    pub token: u32,
    pub comm: [u8; COMM_LEN],
}

/// Slots of the per-CPU `COUNTERS` array: facts about the recording that
/// are not losses.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Lock waits that began on one CPU and ended on another (the waiter
    /// slept and was migrated); paired per task, so timed correctly.
    LockWaitsMigrated = 0,
    /// Lock waits paired from a nested or interrupting contention.
    LockWaitsNested = 1,
    /// Off-CPU switch-outs that walked the user stack.
    OffCpuUserWalk = 2,
    /// Off-CPU switch-outs that reused the user stack of the thread's last
    /// block at the same site.
    OffCpuUserCached = 3,
    /// Kernel stacks walked at switch-out (uninterruptible waits).
    OffCpuKernWalkOut = 4,
    /// Kernel stacks walked at switch-in, from the stopped task.
    OffCpuKernWalkIn = 5,
    /// Blocks too short for a kernel walk (`kstack_min_ns`).
    OffCpuKernShort = 6,
    /// Switch-outs of a preempted task (no stack taken).
    OffCpuPreempted = 7,
    /// Kernel stacks reused at switch-in: the thread blocked again at a site
    /// in the same syscall, with the same return addresses at the same places
    /// on its kernel stack.
    OffCpuKernCached = 8,
    /// Lock waits whose waiter's user stack was walked.
    LockUserWalk = 9,
    /// Lock waits whose waiter's user stack was reused: the thread was at a
    /// site where it had blocked or contended before.
    LockUserCached = 10,
    /// Off-CPU map updates: a thread's accumulated blocks of one key added
    /// (at a key change, a replaced site or its exit).
    OffCpuMapUpdates = 11,
    /// Lock waits whose waiter's kernel stack was walked.
    LockKernWalk = 12,
    /// Lock waits whose waiter's kernel stack was reused (see
    /// [`LiveKstack`]).
    LockKernCached = 13,
    /// Stacks reused that differ from the walk done anyway
    /// (`verify_stack_cache`), one counter per cache: off-CPU user stacks,
    /// off-CPU kernel stacks, lock-wait kernel stacks (lock-wait user
    /// stacks come from the off-CPU user cache).
    UserReuseDiffers = 14,
    KernReuseDiffers = 15,
    LockKernReuseDiffers = 16,
    /// Programs that did not run because another of hvprof's programs was
    /// running on the CPU, which an interrupt or exception had stopped:
    /// they share per-CPU scratch (the kernel skips a classic tracepoint's
    /// or a perf event's program in that case too).
    NestedSkipped = 17,
    /// Lock contention ends dropped on purpose (`Config::drop_lock_ends`).
    LockEndsDropped = 18,
    /// Wakeups of a blocked traced thread whose waker was taken.
    Wakeups = 19,
    /// Blocks (not preemptions) whose waker was not seen: its program was
    /// kept from running, or ran before the block began.
    WakerNotSeen = 20,
    /// Wakers' user stacks reused (the waker was at a site of its own) and
    /// walked.
    WakerUserCached = 21,
    WakerUserWalk = 22,
    /// Wakers' kernel stacks reused (the live one: see `LiveKstack`) and
    /// walked.
    WakerKernCached = 23,
    WakerKernWalk = 24,
    /// Wakeups whose waker was an interrupt on its own stack.
    WakerInterrupts = 25,
    /// `--attribute vm`: libvirt calls dispatched that can start a VM (a
    /// token given), other calls of the `remote` program, and dispatches
    /// whose message could not be read (or of another program).
    CallsAttributed = 26,
    CallsOther = 27,
    CallsUnread = 28,
    /// `--attribute vm`: other calls naming the domain of a VM hvprof saw
    /// created (attributed to it).
    CallsOfDomain = 29,
}

impl Counter {
    pub const COUNT: u32 = 30;
}

/// Slots of the `LOSSES` map: everything the kernel side could not record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Unused since stacks are stored by content hash (kept for the numbering).
    KernStackCollision = 0,
    /// Unused, as above.
    UserStackCollision = 1,
    /// A kernel stack could not be taken (other than -EFAULT: none).
    KernStackError = 2,
    /// A user task's user stack could not be taken (-EFAULT from a user task
    /// is counted here too: frame pointers missing or stack paged out).
    UserStackMissing = 3,
    /// The stack map is full.
    StackMapFull = 4,
    /// An on-CPU sample could not be counted: the counts map is full.
    OnCpuMapFull = 5,
    OffCpuMapFull = 6,
    /// A block could not be timed: the start map is full.
    OffCpuStartFull = 7,
    /// A ring-buffer event was dropped.
    EventDropped = 8,
    /// A child could not be followed: the tracked map is full.
    TrackedFull = 9,
    /// A lock wait could not be counted: the lock map is full.
    LockMapFull = 10,
    /// Contentions nested deeper than [`MAX_LOCK_NESTING`]: not timed.
    LockNestingTooDeep = 11,
    /// A fork could not be counted: the fork map is full.
    ForkMapFull = 12,
    /// A cgroup operation could not be counted: the cgroup map is full.
    CgroupMapFull = 13,
    /// A D-Bus call could not be counted: a D-Bus map is full.
    DbusMapFull = 14,
    /// A libvirt API call could not be timed or counted: an API-call map
    /// is full.
    ApiCallMapFull = 15,
    /// A QMP message was not seen: its ring buffer was full.
    QmpMsgDropped = 16,
    /// A wait for a domain job could not be counted: a job map is full.
    JobWaitMapFull = 17,
    /// A lock contention's end that hvprof did not see (its program was
    /// kept from running: an interrupt came while hvprof's own program for
    /// an end ran on the CPU): its begin is dropped, not timed.
    LockEndUnseen = 18,
    /// A lock contention's end whose begin hvprof did not see: not timed.
    LockBeginUnseen = 19,
    /// A block could not be charged to its waker: the wakers map is full.
    OffWakeMapFull = 20,
    /// A block that went on past its window could not be cut at the
    /// windows' boundaries (its map was full): counted whole in the window
    /// it began in.
    OffCpuSpanFull = 21,
    /// `--attribute vm`: a call or process could not be attributed (its
    /// map was full): its work is unattributed.
    AttributionFull = 22,
}

impl Loss {
    pub const COUNT: u32 = 23;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::KernStackCollision,
        Self::UserStackCollision,
        Self::KernStackError,
        Self::UserStackMissing,
        Self::StackMapFull,
        Self::OnCpuMapFull,
        Self::OffCpuMapFull,
        Self::OffCpuStartFull,
        Self::EventDropped,
        Self::TrackedFull,
        Self::LockMapFull,
        Self::LockNestingTooDeep,
        Self::ForkMapFull,
        Self::CgroupMapFull,
        Self::DbusMapFull,
        Self::ApiCallMapFull,
        Self::QmpMsgDropped,
        Self::JobWaitMapFull,
        Self::LockEndUnseen,
        Self::LockBeginUnseen,
        Self::OffWakeMapFull,
        Self::OffCpuSpanFull,
        Self::AttributionFull,
    ];
}

/// Key of the per-window loss counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LossKey {
    pub window: u32,
    /// [`Loss`].
    pub loss: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): plain `#[repr(C)]` integers and byte arrays, with the
    // padding spelled out as fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::WindowRange {}
    unsafe impl aya::Pod for super::SampleKey {}
    unsafe impl aya::Pod for super::OffCpuKey {}
    unsafe impl aya::Pod for super::OffCpuValue {}
    unsafe impl aya::Pod for super::OffCpuStart {}
    unsafe impl aya::Pod for super::OffWakeKey {}
    unsafe impl aya::Pod for super::WakerSites {}
    unsafe impl aya::Pod for super::SpanKey {}
    unsafe impl aya::Pod for super::SpanBlock {}
    unsafe impl aya::Pod for super::VmState {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::LossKey {}
    unsafe impl aya::Pod for super::StackBuf {}
    unsafe impl aya::Pod for super::LockKey {}
    unsafe impl aya::Pod for super::LockValue {}
    unsafe impl aya::Pod for super::LockPending {}
    unsafe impl aya::Pod for super::ForkKey {}
    unsafe impl aya::Pod for super::ForkValue {}
    unsafe impl aya::Pod for super::CgroupKey {}
    unsafe impl aya::Pod for super::CgroupValue {}
    unsafe impl aya::Pod for super::DbusKey {}
    unsafe impl aya::Pod for super::DbusValue {}
    unsafe impl aya::Pod for super::ApiCallKey {}
    unsafe impl aya::Pod for super::ApiCallValue {}
    unsafe impl aya::Pod for super::ApiCallStartKey {}
    unsafe impl aya::Pod for super::ApiCallStart {}
    unsafe impl aya::Pod for super::QmpMsg {}
    unsafe impl aya::Pod for super::JobWaitKey {}
    unsafe impl aya::Pod for super::JobWaitStart {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_every_k() {
        let w = |n| window_of(WindowMode::Every as u32, 10, n, &[]);
        assert_eq!(w(0), Some(0));
        assert_eq!(w(1), Some(1));
        assert_eq!(w(10), Some(1));
        assert_eq!(w(11), Some(2));
        assert_eq!(w(101), Some(11));
        assert_eq!(window_of(WindowMode::Every as u32, 1, 7, &[]), Some(7));
    }

    #[test]
    fn window_ranges() {
        let r = [
            WindowRange { first: 1, last: 10 },
            WindowRange {
                first: 101,
                last: 110,
            },
            WindowRange {
                first: 201,
                last: 210,
            },
        ];
        let w = |n| window_of(WindowMode::Ranges as u32, 0, n, &r);
        assert_eq!(w(0), Some(0));
        assert_eq!(w(1), Some(1));
        assert_eq!(w(10), Some(1));
        assert_eq!(w(11), None);
        assert_eq!(w(100), None);
        assert_eq!(w(101), Some(2));
        assert_eq!(w(210), Some(3));
        assert_eq!(w(211), None);
    }

    #[test]
    fn hist_buckets() {
        assert_eq!(hist_bucket(0), 0);
        assert_eq!(hist_bucket(1), 0);
        assert_eq!(hist_bucket(2), 1);
        assert_eq!(hist_bucket(1023), 9);
        assert_eq!(hist_bucket(1024), 10);
        assert_eq!(hist_bucket(u64::MAX), LOCK_HIST_BUCKETS - 1);
    }

    #[test]
    fn calls_are_recognized_before_return_addresses() {
        let end = |tail: &[u8]| {
            let mut b = [0x90u8; 8];
            b[8 - tail.len()..].copy_from_slice(tail);
            ends_with_call(&b)
        };
        assert!(end(&[0xe8, 1, 2, 3, 4]));
        assert!(end(&[0xff, 0x15, 1, 2, 3, 4]));
        assert!(end(&[0xff, 0xd0]) && end(&[0x41, 0xff, 0xd3]));
        assert!(end(&[0xff, 0x10]) && end(&[0xff, 0x55, 0x08]));
        assert!(end(&[0xff, 0x90, 0, 1, 0, 0]));
        // Not calls: jumps (`ff /4`), a push, plain data.
        assert!(!end(&[0xff, 0xe0]) && !end(&[0xff, 0x25, 1, 2, 3, 4]));
        assert!(!end(&[0x55]) && !end(&[0, 0, 0, 0, 0, 0, 0, 0]));
        // rip-relative is only `ff 15` with its displacement after it.
        assert!(!end(&[0xff, 0x15]));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<SampleKey>(), 4 * 4 + 2 * 8 + COMM_LEN);
        assert_eq!(size_of::<OffCpuKey>(), 6 * 4 + 2 * 8 + COMM_LEN);
        assert_eq!(size_of::<StackBuf>(), MAX_STACK_DEPTH * 8);
        assert_eq!(
            size_of::<OffCpuAcc>(),
            size_of::<OffCpuKey>() + size_of::<OffCpuValue>()
        );
        assert_eq!(size_of::<BlockSite>(), 13 * 8 + size_of::<OffCpuAcc>());
        assert_eq!(
            size_of::<OffCpuStart>(),
            size_of::<OffCpuKey>()
                + 4 * 8
                + size_of::<OffCpuAcc>()
                + BLOCK_SITES * size_of::<BlockSite>()
                + size_of::<TaskStacks>()
                + 2 * 8
        );
        assert_eq!(size_of::<SpanKey>(), 2 * 4 + 8);
        assert_eq!(size_of::<SpanBlock>(), size_of::<OffCpuKey>() + 2 * 8);
        assert_eq!(
            size_of::<WakerSites>(),
            8 + WAKE_SITES * (8 * 8 + size_of::<LiveKstack>())
        );
        assert_eq!(
            size_of::<OffWakeKey>(),
            size_of::<OffCpuKey>() + size_of::<TaskStacks>()
        );
        assert_eq!(size_of::<Event>(), 4 * 4 + 16 + 8 + COMM_LEN);
        assert_eq!(size_of::<KernelOffsets>(), 10 * 4);
        assert_eq!(size_of::<CgroupKey>(), 4 * 4 + CGROUP_PATH_LEN + COMM_LEN);
        assert_eq!(size_of::<ForkKey>(), 4 * 4 + 2 * 8 + COMM_LEN);
        assert_eq!(size_of::<TaskStacks>(), 2 * 4 + COMM_LEN + 2 * 8);
        assert_eq!(
            size_of::<LockKey>(),
            4 * 4 + 3 * 8 + COMM_LEN + size_of::<TaskStacks>()
        );
        assert_eq!(size_of::<DbusNames>(), 4 * DBUS_NAME_LEN);
        assert_eq!(
            size_of::<DbusKey>(),
            4 * 4 + 2 * 8 + COMM_LEN + size_of::<DbusNames>()
        );
        assert_eq!(
            size_of::<DbusInflight>(),
            4 * 4 + 2 * 8 + size_of::<DbusNames>()
        );
        assert_eq!(size_of::<DbusLast>(), 2 * 4 + 8 + size_of::<DbusNames>());
        assert_eq!(size_of::<LockValue>(), (3 + LOCK_HIST_BUCKETS) * 8);
        assert_eq!(size_of::<LiveKstack>(), 3 * 8 + LIVE_KSTACK_FRAMES * 12);
        assert_eq!(
            size_of::<LockPending>(),
            8 + MAX_LOCK_NESTING * (32 + size_of::<TaskStacks>())
                + LOCK_KSTACKS * size_of::<LiveKstack>()
        );
        assert_eq!(
            size_of::<Config>(),
            10 * 4
                + 2 * COMM_LEN
                + 2 * 4
                + 2 * 4
                + 4 * 4
                + 24
                + 2 * 8
                + size_of::<KernelOffsets>()
                + 5 * 4
                + 3 * 4
                + 2 * 4
                + 2 * 4
                // attribute_vm, token_cpu_bits
                + 2 * 4
                + FORK_PATHS * size_of::<ForkPath>()
        );
        assert_eq!(size_of::<ForkPath>(), 4 * 4 + 8);
        assert_eq!(size_of::<ForkStart>(), 8 + 2 * 4 + 8);
    }
}
