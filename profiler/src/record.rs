//! `hvprof record`: loads and attaches the recording programs, follows the
//! target, drains the kernel's aggregations when the recording stops,
//! symbolizes them and writes the profile file and its renderings.
//!
//! Stopping — duration, Ctrl-C, SIGTERM, the target exiting — always goes
//! through the same drain, so whatever was recorded is written.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    fmt, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Btf, BtfError, Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePoint, PerfEvent, ProgramError, TracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};
use profiler_common::record::{
    COMM_LEN, CgroupKey, CgroupValue, Config, Counter, DbusKey, DbusValue, Event, EventKind,
    ForkKey, ForkValue, LockKey, LockValue, Loss, LossKey, MAPPING_SETTLE_NS, OffCpuKey,
    OffCpuStart, OffCpuValue, STACK_DEFERRED, STACK_EXITING, STACK_ID_MIN, STACK_NOT_TAKEN,
    STACK_SHORT_BLOCK, SampleKey, StackBuf, TargetMode, TracepointOffsets, VM_SOURCE_EXEC, VmState,
    cgroup_op, dbus_fn, fork_kind, names,
};
use profiler_common::unwind::{STACK_CUT, UnwindStop};
use thiserror::Error;

pub use crate::tracer::{Tracer, dbus_function};
use crate::{
    ebpf, forkpath,
    procmaps::{self, Snapshot},
    profile::{
        self, CgroupOp, DbusCall, ForkCall, FrameTable, LockWait, LossCount, Meta, OffCpu, OnCpu,
        Process, Profile, VmCreation,
    },
    render,
    symbolize::Symbolizer,
    sys::{self, Privileges},
    tracefs::{Tracefs, TracefsError, Tracepoint},
    tracer::{
        CGROUP_SYSCALLS, DBUS_LIBRARIES, FORK_FUNCTIONS, FORK_SYSCALLS, UNWIND_SYSCALLS,
        VM_SYSCALLS, syscall_pair,
    },
    windows::WindowSpec,
    words::{human_ns, lock_type_name},
};

/// What to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `-p PID[,PID]`
    Pids(Vec<u32>),
    /// `--comm NAME`: running processes with this comm, and any that exec it.
    Comm(String),
    /// `-a`
    All,
    /// `-- CMD ARGS`: run it, and record it.
    Command(Vec<OsString>),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pids(p) => {
                let p: Vec<String> = p.iter().map(ToString::to_string).collect();
                write!(f, "pid {}", p.join(","))
            }
            Self::Comm(c) => write!(f, "comm {c}"),
            Self::All => f.write_str("all tasks"),
            Self::Command(c) => {
                let c: Vec<String> = c.iter().map(|a| a.to_string_lossy().into_owned()).collect();
                write!(f, "command `{}`", c.join(" "))
            }
        }
    }
}

/// What counts as a VM creation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// A successful `KVM_CREATE_VM` ioctl.
    Kvm,
    /// An exec whose new comm matches `pattern` (`qemu-system-*`).
    Exec { pattern: String },
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("--vm-event {text:?}: {why}")]
pub struct VmEventError {
    text: String,
    why: String,
}

impl VmEvent {
    /// Parses `kvm` or `exec:PATTERN`.
    pub fn parse(text: &str) -> Result<Self, VmEventError> {
        let err = |why: &str| VmEventError {
            text: text.to_owned(),
            why: why.to_owned(),
        };
        if text == "kvm" {
            return Ok(Self::Kvm);
        }
        let Some(pattern) = text.strip_prefix("exec:") else {
            return Err(err(
                "expected `kvm` or `exec:PATTERN` (e.g. exec:qemu-system-*)",
            ));
        };
        if pattern.is_empty() || pattern == "*" {
            return Err(err("the pattern is empty"));
        }
        if pattern[..pattern.len() - 1].contains(['*', '?', '[']) {
            return Err(err(
                "only a trailing `*` is supported (the pattern is matched against the 15-character comm in the kernel)",
            ));
        }
        Ok(Self::Exec {
            pattern: pattern.to_owned(),
        })
    }

    /// `(comm bytes, length, prefix?)` for the kernel. The comm after an
    /// exec is the file name cut to 15 bytes, so longer patterns match on
    /// their first 15 bytes.
    fn kernel_pattern(pattern: &str) -> ([u8; COMM_LEN], u32, bool) {
        let (body, mut prefix) = match pattern.strip_suffix('*') {
            Some(b) => (b, true),
            None => (pattern, false),
        };
        let bytes = body.as_bytes();
        let max = COMM_LEN - 1;
        if bytes.len() > max {
            prefix = true;
        }
        let len = bytes.len().min(max);
        let mut comm = [0u8; COMM_LEN];
        comm[..len].copy_from_slice(&bytes[..len]);
        (comm, u32::try_from(len).unwrap_or(0), prefix)
    }
}

impl fmt::Display for VmEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kvm => f.write_str("kvm"),
            Self::Exec { pattern } => write!(f, "exec:{pattern}"),
        }
    }
}

/// The resolved configuration of one recording.
#[derive(Clone, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches from the command line"
)]
pub struct RecordOptions {
    pub target: Target,
    pub follow_children: bool,
    pub windows: WindowSpec,
    pub frequency_hz: u64,
    pub min_block: Duration,
    pub max_block: Duration,
    pub vm_events: Vec<VmEvent>,
    pub duration: Option<Duration>,
    pub output: PathBuf,
    pub command_line: Vec<String>,
    /// Turn on the kernel's BPF run-time statistics and keep each program's
    /// cost in the profile.
    pub bpf_stats: bool,
    /// Distinct stacks the kernel side can keep (each takes 1 KiB, allocated
    /// up front).
    pub max_stacks: u32,
    /// Most frames walked in a user stack.
    pub user_stack_depth: u32,
    pub tracers: Vec<Tracer>,
    /// Also time cgroup attaches made by writing to `cgroup.procs` (hooks
    /// every `write(2)` on the system).
    pub time_cgroup_writes: bool,
    /// Take stacks of preempted tasks at switch-out too.
    pub preempted_stacks: bool,
    /// Reuse a thread's off-CPU stacks when it blocks again at the same site.
    pub block_site_cache: bool,
    /// Walk anyway where a stack is reused, and count the differences.
    pub verify_stack_cache: bool,
    /// Off-CPU kernel stacks are walked only for blocks this long or longer.
    pub kernel_stack_min_block: Duration,
    /// Fork callers from uprobes on libc, not from the learned fork paths.
    pub fork_uprobes: bool,
    /// How user stacks are walked.
    pub unwind: UnwindMode,
    /// Unwind rows the kernel side keeps (12 bytes each, 16 in the map).
    pub unwind_max_rows: u32,
    /// Where unwind tables are cached, by file.
    pub unwind_cache: PathBuf,
    /// Every Nth user-stack walk is unwound again in userspace and
    /// compared (`--verify-unwind`; with `UnwindMode::Dwarf` only).
    pub verify_unwind: Option<u32>,
}

/// How user stacks are walked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnwindMode {
    /// The kernel's frame-pointer walk.
    Fp,
    /// From each file's `.eh_frame` unwind tables, frame pointers where a
    /// PC has none.
    #[default]
    Dwarf,
}

#[derive(Debug, Error)]
pub enum RecordError {
    #[error(
        "recording needs root or CAP_BPF + CAP_PERFMON; run `sudo hvprof record …` (`hvprof check` shows what is missing)"
    )]
    Privileges,
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Load(#[from] ebpf::LoadError),
    #[error("attaching {what} failed: {source}; run `hvprof check` to see what this kernel allows")]
    Attach {
        what: String,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object is missing {name}: rebuild hvprof (`./x build`)")]
    Missing { name: &'static str },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no process with pid {pid}: check the pid (`pgrep -a NAME`)")]
    NoSuchPid { pid: u32 },
    #[error("cannot start {command}: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("cannot create the output directory {path}: {source}")]
    Output { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Profile(#[from] profile::ProfileError),
    #[error(transparent)]
    Render(#[from] render::RenderError),
    #[error("the event loop failed: {0}")]
    Runtime(io::Error),
    #[error(transparent)]
    Unwind(#[from] crate::unwind::procs::LoaderError),
}

/// What a recording produced.
#[derive(Debug)]
pub struct Outcome {
    /// What was written, for printing without reading the file back.
    pub profile: Profile,
    pub profile_path: PathBuf,
    pub output: PathBuf,
    pub summary: render::Summary,
    /// From the stop to every file written.
    pub stop_to_written: Duration,
    /// Exit status of the `-- CMD` target, if it exited.
    pub command_status: Option<std::process::ExitStatus>,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn comm_str(c: &[u8; COMM_LEN]) -> String {
    let end = c.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&c[..end]).into_owned()
}

/// `ps`-style letter of a `sched_switch` `prev_state`.
#[must_use]
pub fn task_state_name(state: u32) -> &'static str {
    // TASK_REPORT_MAX (0x100 on current kernels) marks a preempted task.
    if state == 0 || state & 0x100 != 0 {
        return "R";
    }
    match state.isolate_lowest_one() {
        0x01 => "S",
        0x02 => "D",
        0x04 => "T",
        0x08 => "t",
        0x10 => "X",
        0x20 => "Z",
        0x40 => "P",
        0x80 => "I",
        _ => "?",
    }
}

/// A kernel log2 histogram without its empty tail buckets.
fn trim_hist(hist: &[u64]) -> Vec<u64> {
    let n = hist.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
    hist[..n].to_vec()
}

#[must_use]
pub fn loss_name(l: Loss) -> &'static str {
    match l {
        Loss::KernStackCollision => "kernel stack collisions (-EEXIST)",
        Loss::UserStackCollision => "user stack collisions (-EEXIST)",
        Loss::KernStackError => "kernel stacks not taken",
        Loss::UserStackMissing => "user stacks missing",
        Loss::StackMapFull => "stack map full (raise --max-stacks)",
        Loss::OnCpuMapFull => "on-CPU map full",
        Loss::OffCpuMapFull => "off-CPU map full",
        Loss::OffCpuStartFull => "off-CPU start map full",
        Loss::EventDropped => "ring-buffer events dropped",
        Loss::TrackedFull => "children not followed (tracked map full)",
        Loss::DbusMapFull => "D-Bus calls not counted (map full)",
        Loss::LockMapFull => "lock waits not counted (lock map full)",
        Loss::LockNestingTooDeep => "lock waits not timed (contentions nested too deep)",
        Loss::ForkMapFull => "forks not counted (fork map full)",
        Loss::CgroupMapFull => "cgroup operations not counted (cgroup map full)",
    }
}

/// Exact addresses of kernel data symbols (static locks such as
/// `cgroup_mutex`), when kallsyms lists data (CONFIG_KALLSYMS_ALL).
fn kernel_data_symbols() -> HashMap<u64, String> {
    kallsyms(&std::fs::read_to_string("/proc/kallsyms").unwrap_or_default())
        .filter(|&(addr, ty, _)| addr != 0 && matches!(ty, "d" | "D" | "b" | "B"))
        .map(|(addr, _, name)| (addr, name.to_owned()))
        .collect()
}

/// The `(address, type, name)` lines of `/proc/kallsyms` text.
fn kallsyms(text: &str) -> impl Iterator<Item = (u64, &str, &str)> {
    text.lines().filter_map(|l| {
        let mut f = l.split_whitespace();
        let addr = u64::from_str_radix(f.next()?, 16).ok()?;
        Some((addr, f.next()?, f.next()?))
    })
}

/// The addresses of the syscall entry code that calls into C: from
/// `entry_SYSCALL_64_after_hwframe` to the next symbol in kallsyms.
fn syscall_entry_range() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/kallsyms").ok()?;
    let mut start = None;
    let mut all = Vec::new();
    for (addr, _, name) in kallsyms(&text) {
        if name == "entry_SYSCALL_64_after_hwframe" {
            start = Some(addr);
        }
        all.push(addr);
    }
    let start = start.filter(|&a| a != 0)?;
    let end = all.into_iter().filter(|&a| a > start).min()?;
    Some((start, end))
}

/// Reads the tracepoint field offsets the programs need.
fn offsets(tracefs: &Tracefs) -> Result<TracepointOffsets, TracefsError> {
    let fork = tracefs.format(Tracepoint::new("sched", "sched_process_fork"))?;
    let [enter, exit] = syscall_pair(VM_SYSCALLS[0]);
    let (enter, exit) = (tracefs.format(enter)?, tracefs.format(exit)?);
    Ok(TracepointOffsets {
        fork_parent_pid: fork.offset("parent_pid", &[4])?,
        fork_child_pid: fork.offset("child_pid", &[4])?,
        ioctl_enter_cmd: enter.offset("cmd", &[8])?,
        ioctl_exit_ret: exit.offset("ret", &[8])?,
        ..TracepointOffsets::default()
    })
}

/// Offsets of the fork-syscall tracepoints, or why they cannot be used.
fn fork_offsets(tracefs: &Tracefs, offsets: &mut TracepointOffsets) -> Result<(), TracefsError> {
    let clone = tracefs.format(Tracepoint::new("syscalls", "sys_enter_clone"))?;
    let clone3 = tracefs.format(Tracepoint::new("syscalls", "sys_enter_clone3"))?;
    let exit = tracefs.format(Tracepoint::new("syscalls", "sys_exit_clone"))?;
    for tp in FORK_SYSCALLS.into_iter().flat_map(syscall_pair) {
        tracefs.id(tp)?;
    }
    offsets.syscall_nr = clone.offset("__syscall_nr", &[4])?;
    offsets.clone_flags = clone.offset("clone_flags", &[8])?;
    offsets.clone3_uargs = clone3.offset("uargs", &[8])?;
    offsets.fork_exit_ret = exit.offset("ret", &[8])?;
    Ok(())
}

/// The libc file a process maps (canonical), if it maps one.
fn mapped_libc(pid: u32) -> Option<PathBuf> {
    libc_paths_of(pid).into_iter().next()
}

/// The libc files the targets use (from their maps) and the usual paths,
/// canonical and distinct: a uprobe fires per file, so one file must not be
/// probed twice through two names.
fn libc_paths(pids: &[u32]) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = pids
        .iter()
        .flat_map(|&p| libc_paths_of(p))
        .chain(
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/libc.so.6",
            ]
            .map(PathBuf::from),
        )
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// The libc files process `pid` maps, through its root (a process in a
/// container sees its own /).
fn libc_paths_of(pid: u32) -> Vec<PathBuf> {
    Snapshot::take(pid)
        .map(|s| s.mappings)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| forkpath::is_libc(&m.path))
        .filter_map(|m| {
            PathBuf::from(format!("/proc/{pid}/root{}", m.path))
                .canonicalize()
                .ok()
        })
        .collect()
}

/// The D-Bus client library files to probe: those the targets have mapped,
/// and those in the standard library directories, canonical and distinct
/// (a uprobe is per file, so one file must not be probed twice).
pub(crate) fn dbus_library_paths(pids: &[u32]) -> Vec<(&'static str, PathBuf)> {
    let which = |path: &Path| {
        let name = path.file_name()?.to_str()?;
        DBUS_LIBRARIES
            .iter()
            .position(|l| l.files.iter().any(|p| name.starts_with(p)))
    };
    let mut candidates: Vec<PathBuf> = pids
        .iter()
        .filter_map(|&p| Snapshot::take(p))
        .flat_map(|s| s.mappings)
        .map(|m| PathBuf::from(m.path))
        .collect();
    for dir in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu/systemd",
        "/lib/systemd",
        "/usr/lib/systemd",
        "/lib64",
        "/usr/lib64",
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            candidates.extend(entries.filter_map(Result::ok).map(|e| e.path()));
        }
    }
    let mut out: Vec<(usize, PathBuf)> = candidates
        .into_iter()
        .filter_map(|p| {
            let lib = which(&p)?;
            let p = p.canonicalize().ok()?;
            p.is_file().then_some((lib, p))
        })
        .collect();
    out.sort();
    out.dedup();
    out.into_iter()
        .map(|(lib, p)| (DBUS_LIBRARIES[lib].name, p))
        .collect()
}

/// Attaches the D-Bus probes to every client library file found; returns
/// the probed files, with the library's name.
fn attach_dbus(bpf: &mut Ebpf, pids: &[u32]) -> Result<Vec<(String, PathBuf)>, RecordError> {
    use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope};
    let libs = dbus_library_paths(pids);
    let mut probed = Vec::new();
    for name in [
        names::PROG_DBUS_ENTER,
        names::PROG_DBUS_RETURN,
        names::PROG_DBUS_NAMES,
    ] {
        let p: &mut aya::programs::UProbe = bpf
            .program_mut(name)
            .ok_or(RecordError::Missing { name })?
            .try_into()
            .map_err(attach_err(name))?;
        p.load().map_err(attach_err(name))?;
    }
    for (lib, path) in libs {
        let Some(l) = DBUS_LIBRARIES.iter().find(|l| l.name == lib) else {
            continue;
        };
        let (lib_name, blocking, constructors) = (l.name, l.blocking, l.constructors);
        let mut any = false;
        for (prog, functions) in [
            (names::PROG_DBUS_ENTER, blocking),
            (names::PROG_DBUS_RETURN, blocking),
            (names::PROG_DBUS_NAMES, constructors),
        ] {
            let p: &mut aya::programs::UProbe = bpf
                .program_mut(prog)
                .ok_or(RecordError::Missing { name: prog })?
                .try_into()
                .map_err(attach_err(prog))?;
            // By symbol name, one function at a time: a library without
            // one of them (an old libdbus) still gets the others.
            for &(function, cookie) in functions {
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::Symbol(function),
                    cookie: Some(u64::from(cookie)),
                };
                if p.attach([point], &path, UProbeScope::AllProcesses).is_ok() {
                    any = true;
                }
            }
        }
        if any {
            probed.push((lib_name.to_owned(), path));
        }
    }
    Ok(probed)
}

/// Offsets of `sys_enter_mmap`/`sys_exit_mmap`, which tell the unwinder
/// of a library mapped executable (`dlopen`), or why they cannot be used.
fn mmap_offsets(tracefs: &Tracefs, offsets: &mut TracepointOffsets) -> Result<(), TracefsError> {
    let [enter, exit] = syscall_pair(UNWIND_SYSCALLS[0]);
    let (enter, exit) = (tracefs.format(enter)?, tracefs.format(exit)?);
    offsets.mmap_prot = enter.offset("prot", &[8])?;
    offsets.mmap_flags = enter.offset("flags", &[8])?;
    offsets.mmap_exit_ret = exit.offset("ret", &[8])?;
    Ok(())
}

/// Offsets of the cgroup tracepoints, or why they cannot be used.
fn cgroup_offsets(tracefs: &Tracefs, offsets: &mut TracepointOffsets) -> Result<(), TracefsError> {
    let mkdir = tracefs.format(Tracepoint::new("cgroup", "cgroup_mkdir"))?;
    tracefs.format(Tracepoint::new("cgroup", "cgroup_rmdir"))?;
    let attach = tracefs.format(Tracepoint::new("cgroup", "cgroup_attach_task"))?;
    for tp in CGROUP_SYSCALLS.into_iter().flat_map(syscall_pair) {
        tracefs.id(tp)?;
    }
    offsets.cgroup_root = mkdir.offset("root", &[4])?;
    offsets.cgroup_path = mkdir.offset("path", &[4])?;
    offsets.cgroup_attach_root = attach.offset("dst_root", &[4])?;
    offsets.cgroup_attach_path = attach.offset("dst_path", &[4])?;
    Ok(())
}

/// Hierarchy ids to names, from `/proc/cgroups` (0 is cgroup v2).
fn cgroup_hierarchies() -> HashMap<u32, String> {
    let mut out: HashMap<u32, Vec<String>> = HashMap::new();
    for line in std::fs::read_to_string("/proc/cgroups")
        .unwrap_or_default()
        .lines()
        .skip(1)
    {
        let mut f = line.split_whitespace();
        if let (Some(name), Some(id)) = (f.next(), f.next().and_then(|i| i.parse().ok())) {
            out.entry(id).or_default().push(name.to_owned());
        }
    }
    let mut names: HashMap<u32, String> = out
        .into_iter()
        .filter(|(id, _)| *id != 0)
        .map(|(id, mut v)| {
            v.sort();
            (id, v.join(","))
        })
        .collect();
    names.insert(0, "v2".to_owned());
    names
}

/// Offsets of the lock-contention tracepoints, or why they cannot be used.
fn lock_offsets(tracefs: &Tracefs, offsets: &mut TracepointOffsets) -> Result<(), TracefsError> {
    let begin = tracefs.format(Tracepoint::new("lock", "contention_begin"))?;
    let end = tracefs.format(Tracepoint::new("lock", "contention_end"))?;
    offsets.lock_begin_addr = begin.offset("lock_addr", &[8])?;
    offsets.lock_begin_flags = begin.offset("flags", &[4])?;
    offsets.lock_end_addr = end.offset("lock_addr", &[8])?;
    Ok(())
}

/// The descendants of `roots` that are alive now (from `/proc/*/stat`).
fn descendants(roots: &[u32]) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    for pid in procmaps::all_pids() {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
            && let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok())
        {
            parent.insert(pid, ppid);
        }
    }
    let mut set: HashSet<u32> = roots.iter().copied().collect();
    loop {
        let before = set.len();
        for (&pid, ppid) in &parent {
            if set.contains(ppid) {
                set.insert(pid);
            }
        }
        if set.len() == before {
            break;
        }
    }
    let mut out: Vec<u32> = set.into_iter().filter(|p| !roots.contains(p)).collect();
    out.sort_unstable();
    out
}

/// A `-- CMD` child held before `exec` until the probes are attached, so its
/// whole life is recorded. Forked by hand: `std::process::Command::spawn`
/// waits for the exec, which is exactly what must not happen yet.
struct GatedChild {
    pid: u32,
    gate: Option<std::os::fd::OwnedFd>,
    status: Option<std::process::ExitStatus>,
}

impl GatedChild {
    fn spawn(argv: &[OsString]) -> Result<Self, RecordError> {
        use std::os::unix::ffi::OsStrExt as _;
        let command = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let spawn_err = |source| RecordError::Spawn {
            command: command.clone(),
            source,
        };
        let cargs: Vec<std::ffi::CString> = argv
            .iter()
            .map(|a| std::ffi::CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| spawn_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let mut ptrs: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        let mut fds = [0i32; 2];
        // SAFETY: fds is a valid 2-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(spawn_err(io::Error::last_os_error()));
        }
        // SAFETY: pipe2 returned two fresh fds that we now own.
        let (read, write) = unsafe {
            use std::os::fd::FromRawFd as _;
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        let read_fd = std::os::fd::AsRawFd::as_raw_fd(&read);
        // SAFETY: hvprof is single-threaded here (the event loop has not
        // started); the child only calls async-signal-safe functions.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(spawn_err(io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: child side of fork: read, execvp and _exit only.
            unsafe {
                let mut b = 0u8;
                if libc::read(read_fd, (&raw mut b).cast(), 1) != 1 {
                    // hvprof went away before releasing the gate.
                    libc::_exit(126);
                }
                libc::execvp(ptrs[0], ptrs.as_ptr());
                libc::_exit(127);
            }
        }
        drop(read);
        Ok(Self {
            pid: pid.cast_unsigned(),
            gate: Some(write),
            status: None,
        })
    }

    fn release(&mut self) {
        if let Some(w) = self.gate.take() {
            let b = 1u8;
            // SAFETY: w is an open pipe fd; b is one readable byte.
            unsafe {
                libc::write(
                    std::os::fd::AsRawFd::as_raw_fd(&w),
                    (&raw const b).cast(),
                    1,
                )
            };
        }
    }

    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt as _;
        if self.status.is_none() {
            let mut status = 0;
            // SAFETY: waiting for our own child, by pid, without blocking.
            let r =
                unsafe { libc::waitpid(self.pid.cast_signed(), &raw mut status, libc::WNOHANG) };
            if r == self.pid.cast_signed() {
                self.status = Some(std::process::ExitStatus::from_raw(status));
            }
        }
        self.status
    }

    /// Ends the child if it still runs: SIGTERM, then SIGKILL after 2 s.
    fn end(&mut self) -> Option<std::process::ExitStatus> {
        self.release();
        if self.try_wait().is_some() {
            return self.status;
        }
        // SAFETY: signalling the child we forked, by its pid.
        unsafe { libc::kill(self.pid.cast_signed(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.try_wait().is_some() {
                return self.status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(self.pid.cast_signed(), libc::SIGKILL) };
        while self.try_wait().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.status
    }
}

impl Drop for GatedChild {
    /// Never leave the child we started behind, even on an error path.
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.end();
        }
    }
}

/// Per-process knowledge gathered while recording.
#[derive(Default)]
struct Processes {
    info: HashMap<u32, Process>,
    snapshots: HashMap<u32, Vec<Snapshot>>,
    /// Loads each new snapshot's mappings into the user-stack unwinder
    /// (`--unwind dwarf`); gone after the stop.
    unwind: Option<crate::unwind::procs::Loader>,
}

impl Processes {
    fn entry(&mut self, tgid: u32) -> &mut Process {
        self.info.entry(tgid).or_insert_with(|| Process {
            tgid,
            comm: String::new(),
            cmdline: None,
            parent: None,
            forked_ns: None,
            exec_ns: None,
            exit_ns: None,
            fork_window: None,
            exec_window: None,
        })
    }

    fn snapshot(&mut self, tgid: u32) -> bool {
        match Snapshot::take(tgid) {
            Some(s) => {
                let list = self.snapshots.entry(tgid).or_default();
                if list.last() != Some(&s) {
                    if let Some(u) = &mut self.unwind {
                        u.load(tgid, &s);
                    }
                    list.push(s);
                }
                true
            }
            None => false,
        }
    }

    /// Loads `tgid`'s latest mappings into the unwinder again even if they
    /// did not change (its JIT code may have), at most every 100 ms.
    fn reload_unwind(&mut self, tgid: u32) {
        let Some(u) = &mut self.unwind else {
            return;
        };
        if u.loaded_within(tgid, Duration::from_millis(100)) {
            return;
        }
        if let Some(s) = self.snapshots.get(&tgid).and_then(|l| l.last()) {
            u.load(tgid, s);
        }
    }

    fn learn(&mut self, tgid: u32) {
        if !self.snapshots.contains_key(&tgid) {
            self.snapshot(tgid);
        }
        let cmdline = procmaps::cmdline(tgid);
        let comm = procmaps::comm(tgid);
        let p = self.entry(tgid);
        if p.cmdline.is_none() {
            p.cmdline = cmdline;
        }
        if p.comm.is_empty()
            && let Some(c) = comm
        {
            p.comm = c;
        }
    }

    /// Snapshots to symbolize `tgid`'s stacks with, oldest first: its
    /// ancestors' (a forked child runs its parent's image until it execs),
    /// then its own.
    fn chain(&self, tgid: u32) -> Vec<&Snapshot> {
        let mut lineage = vec![tgid];
        let mut cur = tgid;
        while let Some(parent) = self.info.get(&cur).and_then(|p| p.parent) {
            if lineage.contains(&parent) || lineage.len() > 32 {
                break;
            }
            lineage.push(parent);
            cur = parent;
        }
        lineage
            .iter()
            .rev()
            .filter_map(|t| self.snapshots.get(t))
            .flat_map(|v| v.iter())
            .collect()
    }
}

struct Recorder {
    opts: RecordOptions,
    start_ns: u64,
    /// hvprof's own CPU time when the recording starts (the programs are
    /// attached), and after the stop what it used meanwhile.
    start_cpu_ns: u64,
    self_cpu_ns: u64,
    started_unix_ms: u64,
    processes: Processes,
    vms: Vec<(Event, Option<String>)>,
    target_pids: HashSet<u32>,
    /// Every `-p` target has exited.
    targets_gone: bool,
    /// The tracers actually attached.
    tracers: Vec<Tracer>,
    ring_losses: u64,
    /// Snapshots to take again: at exec only the binary and the dynamic
    /// loader are mapped, the libraries come a moment later.
    resnap: Vec<(Instant, u32)>,
    /// What the unwind-table loader did, kept at the stop.
    unwind_stats: Option<crate::unwind::procs::LoaderStats>,
    /// `--verify-unwind`: checks the sampled walks.
    verifier: Option<crate::unwind::verify::Verifier>,
}

/// Why the recording stopped.
#[derive(Clone, Debug)]
enum Stop {
    Duration,
    Signal(&'static str),
    TargetExited(String),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Duration => f.write_str("duration reached"),
            Self::Signal(s) => write!(f, "{s}"),
            Self::TargetExited(s) => write!(f, "target exited ({s})"),
        }
    }
}

fn attach_err(what: impl Into<String>) -> impl FnOnce(ProgramError) -> RecordError {
    let what = what.into();
    move |source| RecordError::Attach { what, source }
}

fn tracepoint(bpf: &mut Ebpf, prog: &'static str, tp: Tracepoint) -> Result<(), RecordError> {
    let p: &mut TracePoint = bpf
        .program_mut(prog)
        .ok_or(RecordError::Missing { name: prog })?
        .try_into()
        .map_err(attach_err(prog))?;
    // One program may be attached to several tracepoints: load it once.
    if p.fd().is_err() {
        p.load().map_err(attach_err(format!("{prog} ({tp})")))?;
    }
    p.attach(tp.category, tp.name)
        .map_err(attach_err(format!("{prog} to {tp}")))?;
    Ok(())
}

/// The address to symbolize for frame `i` of a stack: every frame but the
/// innermost holds a return address, which is after its call, so the call
/// itself is looked up (a function that ends in a call would otherwise be
/// named as the one after it).
fn call_site(i: usize, ip: u64) -> u64 {
    if i == 0 { ip } else { ip.saturating_sub(1) }
}

/// A kernel frame of the tracing machinery itself (our program, the
/// tracepoint's BPF runner).
fn is_tracing_frame(name: &str) -> bool {
    ["bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// A thread's total run-queue wait so far, in ns (the second field of
/// `/proc/PID/task/TID/schedstat`, the kernel's `sched_info.run_delay`).
fn run_delay_of(task: &str) -> Option<u64> {
    std::fs::read_to_string(format!("{task}/schedstat"))
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Where the fork-caller uprobe goes: which processes, in which libc files.
struct ForkUprobes {
    scopes: Vec<aya::programs::uprobe::UProbeScope>,
    libcs: Vec<PathBuf>,
}

/// Where libc's fork functions are probed for their exact callers, if
/// anywhere: where the learned fork paths do not hold. A uprobe in a
/// library costs every process that maps it (fork copies the page tables
/// of a mapping with a patched page: about 25 µs a fork here, and a hit
/// traps), so:
/// - with the paths learned, only `-p` targets whose libc is another file
///   are probed (a process in a container); `-- CMD` is assumed to run
///   with hvprof's own libc, and `--comm` and `-a` are not probed;
/// - without them, the probes are installed in the targets' processes for
///   `-p` and `-- CMD` (a `uprobe.multi` link per process; children born
///   later get their callers from their stacks), and in every process for
///   `--comm` and `-a`.
fn plan_fork_uprobes(
    target: &Target,
    initial: &[u32],
    calibration: Option<&forkpath::Calibration>,
) -> Option<ForkUprobes> {
    use aya::programs::uprobe::UProbeScope;
    let one_each = |pids: &[u32]| -> Vec<UProbeScope> {
        pids.iter()
            .filter_map(|&p| std::num::NonZeroU32::new(p))
            .map(UProbeScope::OneProcess)
            .collect()
    };
    let plan = match (target, calibration) {
        (Target::Pids(_), Some(c)) => {
            let (pids, libcs): (Vec<u32>, Vec<PathBuf>) = initial
                .iter()
                .filter_map(|&p| Some((p, mapped_libc(p)?)))
                .filter(|(_, l)| *l != c.libc)
                .unzip();
            ForkUprobes {
                scopes: one_each(&pids),
                libcs,
            }
        }
        (_, Some(_)) => return None,
        (Target::Pids(_) | Target::Command(_), None) => ForkUprobes {
            scopes: one_each(initial),
            libcs: libc_paths(initial),
        },
        (Target::Comm(_) | Target::All, None) => ForkUprobes {
            scopes: vec![UProbeScope::AllProcesses],
            libcs: libc_paths(initial),
        },
    };
    (!plan.scopes.is_empty() && !plan.libcs.is_empty()).then_some(plan)
}

/// Attaches the fork-caller uprobe as planned. A probe that cannot be
/// attached costs the callers, not the recording.
fn attach_fork_callers(bpf: &mut Ebpf, plan: &ForkUprobes) {
    let loaded = bpf
        .program_mut(names::PROG_FORK_CALLER)
        .ok_or_else(|| "not in the eBPF object".to_owned())
        .and_then(|p| <&mut aya::programs::UProbe>::try_from(p).map_err(|e| e.to_string()))
        .and_then(|p| p.load().map(|()| p).map_err(|e| e.to_string()));
    let p = match loaded {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "hvprof: warning: the fork-caller uprobe does not load ({e}; it needs uprobe.multi, \
                 Linux 6.6 or later): fork callers come from stacks only"
            );
            return;
        }
    };
    let mut attached = 0;
    for libc in &plan.libcs {
        for f in FORK_FUNCTIONS {
            for scope in &plan.scopes {
                if p.attach([f], libc, *scope).is_ok() {
                    attached += 1;
                }
            }
        }
    }
    if attached == 0 {
        eprintln!(
            "hvprof: warning: no libc fork function could be probed: fork callers come from stacks only"
        );
    }
}

/// The off-CPU program is a BTF tracepoint: typed raw arguments, no trace
/// event record filled per context switch.
fn attach_offcpu(
    bpf: &mut Ebpf,
    btf: std::thread::JoinHandle<Result<Btf, BtfError>>,
) -> Result<(), RecordError> {
    let btf = btf
        .join()
        .unwrap_or(Err(BtfError::InvalidHeader))
        .map_err(|e| RecordError::Attach {
            what: "the off-CPU tracer (kernel BTF at /sys/kernel/btf/vmlinux)".into(),
            source: ProgramError::Btf(e),
        })?;
    let prog = names::PROG_SCHED_SWITCH;
    let p: &mut BtfTracePoint = bpf
        .program_mut(prog)
        .ok_or(RecordError::Missing { name: prog })?
        .try_into()
        .map_err(attach_err(prog))?;
    p.load("sched_switch", &btf).map_err(attach_err(format!(
        "{prog} (BTF tracepoint sched_switch, which needs kernel BTF and, for its prev_state \
         argument, Linux 5.18 or later)"
    )))?;
    p.attach()
        .map_err(attach_err(format!("{prog} to sched_switch")))?;
    Ok(())
}

/// Runs a whole recording.
#[expect(
    clippy::too_many_lines,
    reason = "the recording's steps in order, each short"
)]
pub fn record(opts: RecordOptions) -> Result<Outcome, RecordError> {
    if !Privileges::current().is_ok_and(|p| p.sufficient()) {
        return Err(RecordError::Privileges);
    }
    if let Target::Pids(pids) = &opts.target
        && let Some(&pid) = pids
            .iter()
            .find(|p| !PathBuf::from(format!("/proc/{p}")).exists())
    {
        return Err(RecordError::NoSuchPid { pid });
    }
    std::fs::create_dir_all(&opts.output).map_err(|source| RecordError::Output {
        path: opts.output.clone(),
        source,
    })?;
    // Kernel BTF (for the off-CPU tracer's BTF tracepoints) takes a while to
    // parse: do it while the rest is set up.
    let btf = opts
        .tracers
        .contains(&Tracer::OffCpu)
        .then(|| std::thread::spawn(Btf::from_sys_fs));
    // And task_struct offsets (a few ms of parsing, also done meanwhile):
    // its comm, read with plain loads; for the off-CPU tracer, where a
    // stopped task's saved kernel stack pointer is, with which it reuses a
    // thread's kernel stack when it blocks again the same way, and the
    // task's total run-queue wait, which gives each block's wait for a CPU.
    let offcpu = opts.tracers.contains(&Tracer::OffCpu);
    let task_offsets = std::thread::spawn(|| {
        let btf = crate::kbtf::Kbtf::from_sys_fs().map_err(|e| e.to_string())?;
        let off = |path: &[&str]| {
            btf.offset_of("task_struct", path)
                .map_err(|e| e.to_string())
        };
        Ok::<_, String>((
            off(&["thread", "sp"]),
            off(&["sched_info", "run_delay"]),
            off(&["comm"]),
        ))
    });
    let (tracefs, _) = Tracefs::locate_or_mount()?;
    let mut offsets = offsets(&tracefs)?;
    let mut active = opts.tracers.clone();
    if active.contains(&Tracer::Locks)
        && let Err(e) = lock_offsets(&tracefs, &mut offsets)
    {
        eprintln!("hvprof: warning: the locks tracer is skipped: {e}");
        active.retain(|t| *t != Tracer::Locks);
    }
    if active.contains(&Tracer::Fork)
        && let Err(e) = fork_offsets(&tracefs, &mut offsets)
    {
        eprintln!("hvprof: warning: the fork tracer is skipped: {e}");
        active.retain(|t| *t != Tracer::Fork);
    }
    if active.contains(&Tracer::Cgroup)
        && let Err(e) = cgroup_offsets(&tracefs, &mut offsets)
    {
        eprintln!("hvprof: warning: the cgroup tracer is skipped: {e}");
        active.retain(|t| *t != Tracer::Cgroup);
    }
    let mmap_hook = opts.unwind == UnwindMode::Dwarf
        && match mmap_offsets(&tracefs, &mut offsets) {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "hvprof: warning: a library mapped during the recording gets its unwind tables at the first stack that meets it: {e}"
                );
                false
            }
        };

    let mut config = Config::zeroed();
    config.target_mode = match opts.target {
        Target::All => TargetMode::All as u32,
        _ => TargetMode::Tracked as u32,
    };
    config.follow_children = u32::from(opts.follow_children);
    config.window_mode = opts.windows.mode() as u32;
    if let WindowSpec::Every { size } = opts.windows {
        config.window_size = size;
    }
    let ranges = opts.windows.kernel_ranges();
    config.window_ranges = u32::try_from(ranges.len()).unwrap_or(0);
    config.self_tgid = std::process::id();
    config.min_block_ns = u64::try_from(opts.min_block.as_nanos()).unwrap_or(u64::MAX);
    config.max_block_ns = u64::try_from(opts.max_block.as_nanos()).unwrap_or(u64::MAX);
    config.offsets = offsets;
    config.user_stack_depth = opts.user_stack_depth;
    config.preempted_stacks = u32::from(opts.preempted_stacks);
    config.block_site_cache = u32::from(opts.block_site_cache);
    config.verify_stack_cache = u32::from(opts.verify_stack_cache);
    config.unwind_dwarf = u32::from(opts.unwind == UnwindMode::Dwarf);
    config.dbus = u32::from(active.contains(&Tracer::Dbus));
    if opts.unwind == UnwindMode::Dwarf {
        config.verify_unwind = opts.verify_unwind.unwrap_or(0);
    }
    let (sp, run_delay, comm) = match task_offsets.join() {
        Ok(Ok(offsets)) => offsets,
        Ok(Err(e)) => (Err(e.clone()), Err(e.clone()), Err(e)),
        Err(_) => {
            let e = || "panicked".to_owned();
            (Err(e()), Err(e()), Err(e()))
        }
    };
    // Without it the comm comes from a helper call: slower, as right.
    config.task_comm = comm.unwrap_or(0);
    if offcpu {
        match sp {
            Ok(off) => config.task_thread_sp = off,
            Err(e) => eprintln!(
                "hvprof: note: off-CPU kernel stacks are walked at every long block, none reused \
                 (kernel BTF: {e})"
            ),
        }
        match run_delay {
            Ok(off) => config.task_run_delay = off,
            Err(e) => eprintln!(
                "hvprof: note: off-CPU run-queue wait is not measured: it needs \
                 task_struct.sched_info.run_delay (CONFIG_SCHED_INFO, selected by \
                 CONFIG_SCHEDSTATS or CONFIG_TASK_DELAY_ACCT) in kernel BTF ({e})"
            ),
        }
    }
    config.kstack_min_ns =
        u64::try_from(opts.kernel_stack_min_block.as_nanos()).unwrap_or(u64::MAX);
    if let Some((start, end)) = syscall_entry_range() {
        config.syscall_entry = start;
        config.syscall_entry_end = end;
    }
    for (field, nr) in [
        (&mut config.nr_clone, libc::SYS_clone),
        (&mut config.nr_clone3, libc::SYS_clone3),
        (&mut config.nr_fork, libc::SYS_fork),
        (&mut config.nr_vfork, libc::SYS_vfork),
    ] {
        *field = u32::try_from(nr).unwrap_or(u32::MAX);
    }
    let calibration = if active.contains(&Tracer::Fork) && !opts.fork_uprobes {
        match forkpath::calibrate() {
            Ok(c) => {
                for (slot, p) in config.fork_paths.iter_mut().zip(&c.paths) {
                    *slot = *p;
                }
                Some(c)
            }
            Err(e) => {
                eprintln!(
                    "hvprof: warning: libc's fork paths could not be learned ({e}): fork callers \
                     come from uprobes on libc's fork functions, which make each fork dearer"
                );
                None
            }
        }
    } else {
        None
    };
    for ev in &opts.vm_events {
        match ev {
            VmEvent::Kvm => config.vm_event_kvm = 1,
            VmEvent::Exec { pattern } => {
                let (comm, len, prefix) = VmEvent::kernel_pattern(pattern);
                config.vm_event_exec = 1;
                config.vm_exec_comm = comm;
                config.vm_exec_len = len;
                config.vm_exec_prefix = u32::from(prefix);
            }
        }
    }
    if let Target::Comm(name) = &opts.target {
        let (comm, len, _) = VmEvent::kernel_pattern(name);
        config.target_comm = comm;
        config.target_comm_len = len;
    }

    // Who is tracked from the start.
    let mut initial: Vec<u32> = Vec::new();
    let mut gated = None;
    match &opts.target {
        Target::Pids(pids) => initial.extend(pids),
        Target::Comm(name) => {
            let want: String = name.chars().take(COMM_LEN - 1).collect();
            initial.extend(
                procmaps::all_pids()
                    .into_iter()
                    .filter(|&p| procmaps::comm(p).as_deref() == Some(want.as_str())),
            );
        }
        Target::All => {}
        Target::Command(argv) => {
            let g = GatedChild::spawn(argv)?;
            initial.push(g.pid);
            gated = Some(g);
        }
    }
    if opts.follow_children && !initial.is_empty() && !matches!(opts.target, Target::Command(_)) {
        let more = descendants(&initial);
        initial.extend(more);
    }

    let fork_uprobes = if active.contains(&Tracer::Fork) {
        plan_fork_uprobes(&opts.target, &initial, calibration.as_ref())
    } else {
        None
    };
    config.fork_uprobes = u32::from(fork_uprobes.is_some());

    // Kept open for the whole recording: statistics are on while it is.
    let _stats = if opts.bpf_stats {
        Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .map_err(|e| RecordError::Runtime(e.io_error))?,
        )
    } else {
        None
    };
    let unwind_rows = if opts.unwind == UnwindMode::Dwarf {
        opts.unwind_max_rows.max(1)
    } else {
        1
    };
    let mut bpf = ebpf::load_with_config(&config, opts.max_stacks, unwind_rows)?;
    let unwinder = if opts.unwind == UnwindMode::Dwarf {
        let take = |bpf: &mut Ebpf, name: &'static str| {
            bpf.take_map(name).ok_or(RecordError::Missing { name })
        };
        let rows = take(&mut bpf, names::UNWIND_ROWS)?;
        let chunks = take(&mut bpf, names::UNWIND_CHUNKS)?;
        let procs = take(&mut bpf, names::UNWIND_PROCS)?;
        Some(crate::unwind::procs::Loader::new(
            rows,
            chunks,
            procs,
            (unwind_rows, ebpf::unwind_chunks(unwind_rows)),
            opts.unwind_cache.clone(),
        )?)
    } else {
        None
    };
    let verifier = if config.verify_unwind == 0 {
        None
    } else {
        let name = names::UNWIND_VERIFY;
        let map = bpf.take_map(name).ok_or(RecordError::Missing { name })?;
        let ring = RingBuf::try_from(map).map_err(|source| RecordError::Map { name, source })?;
        Some(crate::unwind::verify::Verifier::new(ring))
    };
    {
        let mut map: Array<&mut MapData, profiler_common::record::WindowRange> = Array::try_from(
            bpf.map_mut(names::WINDOW_RANGES)
                .ok_or(RecordError::Missing {
                    name: names::WINDOW_RANGES,
                })?,
        )
        .map_err(|source| RecordError::Map {
            name: names::WINDOW_RANGES,
            source,
        })?;
        for (i, r) in ranges.iter().enumerate() {
            map.set(u32::try_from(i).unwrap_or(0), r, 0)
                .map_err(|source| RecordError::Map {
                    name: names::WINDOW_RANGES,
                    source,
                })?;
        }
        let mut tracked: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(bpf.map_mut(names::TRACKED).ok_or(RecordError::Missing {
                name: names::TRACKED,
            })?)
            .map_err(|source| RecordError::Map {
                name: names::TRACKED,
                source,
            })?;
        for &pid in &initial {
            tracked
                .insert(&pid, &pid, 0)
                .map_err(|source| RecordError::Map {
                    name: names::TRACKED,
                    source,
                })?;
        }
    }

    let mut rec = Recorder {
        start_ns: monotonic_ns(),
        start_cpu_ns: 0,
        self_cpu_ns: 0,
        started_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)),
        processes: Processes {
            unwind: unwinder,
            ..Processes::default()
        },
        vms: Vec::new(),
        target_pids: match &opts.target {
            Target::Pids(p) => p.iter().copied().collect(),
            _ => HashSet::new(),
        },
        targets_gone: false,
        tracers: Vec::new(),
        ring_losses: 0,
        resnap: Vec::new(),
        unwind_stats: None,
        verifier,
        opts,
    };
    // Snapshot what runs already; with -a, everything.
    let known: Vec<u32> = if matches!(rec.opts.target, Target::All) {
        procmaps::all_pids()
    } else {
        initial.clone()
    };
    for pid in known {
        rec.processes.learn(pid);
    }

    // Attach: task tracking first, so no fork between attaches is missed.
    tracepoint(
        &mut bpf,
        names::PROG_FORK,
        Tracepoint::new("sched", "sched_process_fork"),
    )?;
    tracepoint(
        &mut bpf,
        names::PROG_EXEC,
        Tracepoint::new("sched", "sched_process_exec"),
    )?;
    tracepoint(
        &mut bpf,
        names::PROG_EXIT,
        Tracepoint::new("sched", "sched_process_exit"),
    )?;
    let [enter, exit] = syscall_pair(VM_SYSCALLS[0]);
    tracepoint(&mut bpf, names::PROG_IOCTL_ENTER, enter)?;
    tracepoint(&mut bpf, names::PROG_IOCTL_EXIT, exit)?;
    if mmap_hook {
        let [enter, exit] = syscall_pair(UNWIND_SYSCALLS[0]);
        tracepoint(&mut bpf, names::PROG_UNWIND_MMAP_ENTER, enter)?;
        tracepoint(&mut bpf, names::PROG_UNWIND_MMAP_EXIT, exit)?;
    }
    if let Some(btf) = btf
        && let Err(e) = attach_offcpu(&mut bpf, btf)
    {
        eprintln!("hvprof: warning: the offcpu tracer is skipped: {e}");
        active.retain(|t| *t != Tracer::OffCpu);
    }
    if active.contains(&Tracer::Locks) {
        tracepoint(
            &mut bpf,
            names::PROG_LOCK_BEGIN,
            Tracepoint::new("lock", "contention_begin"),
        )?;
        tracepoint(
            &mut bpf,
            names::PROG_LOCK_END,
            Tracepoint::new("lock", "contention_end"),
        )?;
    }
    if active.contains(&Tracer::Fork) {
        // A start left by a call whose exit came before its probe was
        // attached is overwritten by the thread's next fork.
        for name in FORK_SYSCALLS {
            let [enter, _] = syscall_pair(name);
            tracepoint(&mut bpf, names::PROG_FORK_ENTER, enter)?;
        }
        for name in FORK_SYSCALLS {
            let [_, exit] = syscall_pair(name);
            tracepoint(&mut bpf, names::PROG_FORK_EXIT, exit)?;
        }
    }
    if let Some(plan) = &fork_uprobes {
        attach_fork_callers(&mut bpf, plan);
    }
    if active.contains(&Tracer::Cgroup) {
        tracepoint(
            &mut bpf,
            names::PROG_CGROUP_MKDIR,
            Tracepoint::new("cgroup", "cgroup_mkdir"),
        )?;
        tracepoint(
            &mut bpf,
            names::PROG_CGROUP_RMDIR,
            Tracepoint::new("cgroup", "cgroup_rmdir"),
        )?;
        tracepoint(
            &mut bpf,
            names::PROG_CGROUP_ATTACH,
            Tracepoint::new("cgroup", "cgroup_attach_task"),
        )?;
        for name in CGROUP_SYSCALLS {
            if name == "write" && !rec.opts.time_cgroup_writes {
                continue;
            }
            let [enter, exit] = syscall_pair(name);
            tracepoint(&mut bpf, names::PROG_CGROUP_SYSCALL_ENTER, enter)?;
            tracepoint(&mut bpf, names::PROG_CGROUP_SYSCALL_EXIT, exit)?;
        }
    }
    if active.contains(&Tracer::Dbus) {
        let probed = attach_dbus(&mut bpf, &initial)?;
        if probed.is_empty() {
            eprintln!(
                "hvprof: warning: the dbus tracer is skipped: no D-Bus client library (libdbus-1, libgio-2.0, libsystemd) found in the targets' maps or the standard library directories"
            );
            active.retain(|t| *t != Tracer::Dbus);
        }
    }
    if active.contains(&Tracer::OnCpu) {
        let cpus = sys::online_cpus().map_err(RecordError::Runtime)?;
        let p: &mut PerfEvent = bpf
            .program_mut(names::PROG_ONCPU)
            .ok_or(RecordError::Missing {
                name: names::PROG_ONCPU,
            })?
            .try_into()
            .map_err(attach_err(names::PROG_ONCPU))?;
        p.load().map_err(attach_err(names::PROG_ONCPU))?;
        for cpu in cpus {
            p.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(rec.opts.frequency_hz),
                false,
            )
            .map_err(attach_err(format!("cpu-clock sampling on CPU {cpu}")))?;
        }
    }
    rec.tracers = active;

    // From here hvprof's own CPU competes with the workload's (loading and
    // verifying the programs, before, does not).
    rec.start_cpu_ns = sys::self_cpu_ns();
    if let Some(g) = gated.as_mut() {
        g.release();
    }
    eprintln!(
        "hvprof: recording {} (windows: {}, {} Hz); Ctrl-C to stop",
        rec.opts.target, rec.opts.windows, rec.opts.frequency_hz
    );

    // Mapped once: mapping the ring (4 MiB) at every poll cost more CPU than
    // anything else hvprof does while recording.
    let mut events =
        RingBuf::try_from(bpf.take_map(names::EVENTS).ok_or(RecordError::Missing {
            name: names::EVENTS,
        })?)
        .map_err(|source| RecordError::Map {
            name: names::EVENTS,
            source,
        })?;
    let stop = rec.run_loop(&mut events, gated.as_mut())?;
    let stopped = Instant::now();
    let stop_ns = monotonic_ns();
    rec.self_cpu_ns = sys::self_cpu_ns().saturating_sub(rec.start_cpu_ns);

    // Take final snapshots while processes are still alive, then stop the
    // probes so the maps hold still while they are read. No more tables
    // are loaded: nothing is walked after the stop.
    if let Some(u) = rec.processes.unwind.take() {
        rec.unwind_stats = Some(u.stats.clone());
    }
    let alive: Vec<u32> = rec.processes.info.keys().copied().collect();
    for t in alive {
        rec.processes.snapshot(t);
    }
    let command_status = gated.as_mut().and_then(GatedChild::end);
    let program_stats = if rec.opts.bpf_stats {
        program_stats(&bpf)
    } else {
        Vec::new()
    };
    // Freeze the maps: the programs see STOPPED and change nothing, so they
    // can stay attached until the files are written (detaching costs an RCU
    // grace period per probe, seconds with dozens of them).
    if let Some(m) = bpf.map_mut(names::STOPPED)
        && let Ok(mut a) = Array::<&mut MapData, u32>::try_from(m)
    {
        let _ = a.set(0, &1, 0);
    }
    // Let programs already running on other CPUs finish.
    std::thread::sleep(Duration::from_millis(2));
    rec.drain_events(&mut events);
    rec.drain_verifier(true);
    let mut profile = rec.build_profile(&mut bpf, &stop, stop_ns)?;
    profile.meta.program_stats = program_stats;
    let profile_path = rec.opts.output.join(profile::FILE_NAME);
    profile.write(&profile_path)?;
    let summary = render::write_all(&profile, &rec.opts.output)?;
    let stop_to_written = stopped.elapsed();
    unload_all(&mut bpf);
    drop(bpf);
    Ok(Outcome {
        profile,
        profile_path,
        output: rec.opts.output.clone(),
        summary,
        stop_to_written,
        command_status,
    })
}

const PROGRAMS: [&str; 22] = [
    names::PROG_ONCPU,
    names::PROG_SCHED_SWITCH,
    names::PROG_FORK,
    names::PROG_EXEC,
    names::PROG_EXIT,
    names::PROG_IOCTL_ENTER,
    names::PROG_IOCTL_EXIT,
    names::PROG_LOCK_BEGIN,
    names::PROG_LOCK_END,
    names::PROG_FORK_ENTER,
    names::PROG_FORK_EXIT,
    names::PROG_CGROUP_MKDIR,
    names::PROG_CGROUP_RMDIR,
    names::PROG_CGROUP_ATTACH,
    names::PROG_CGROUP_SYSCALL_ENTER,
    names::PROG_CGROUP_SYSCALL_EXIT,
    names::PROG_FORK_CALLER,
    names::PROG_UNWIND_MMAP_ENTER,
    names::PROG_UNWIND_MMAP_EXIT,
    names::PROG_DBUS_ENTER,
    names::PROG_DBUS_RETURN,
    names::PROG_DBUS_NAMES,
];

/// Run counts and run time of every recording program.
fn program_stats(bpf: &Ebpf) -> Vec<profile::ProgramStat> {
    PROGRAMS
        .iter()
        .filter_map(|&name| {
            let info = bpf.program(name)?.info().ok()?;
            Some(profile::ProgramStat {
                program: name.to_owned(),
                runs: info.run_count(),
                run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            })
        })
        .collect()
}

/// Detaches and unloads every recording program, so the maps hold still.
fn unload_all(bpf: &mut Ebpf) {
    if let Some(p) = bpf.program_mut(names::PROG_ONCPU)
        && let Ok(p) = <&mut PerfEvent>::try_from(p)
    {
        let _ = p.unload();
    }
    for name in &PROGRAMS[1..] {
        let Some(p) = bpf.program_mut(name) else {
            continue;
        };
        if let Ok(p) = <&mut TracePoint>::try_from(&mut *p) {
            let _ = p.unload();
        } else if let Ok(p) = <&mut BtfTracePoint>::try_from(p) {
            let _ = p.unload();
        }
    }
    for name in [
        names::PROG_FORK_CALLER,
        names::PROG_DBUS_ENTER,
        names::PROG_DBUS_RETURN,
        names::PROG_DBUS_NAMES,
    ] {
        if let Some(p) = bpf.program_mut(name)
            && let Ok(p) = <&mut aya::programs::UProbe>::try_from(p)
        {
            let _ = p.unload();
        }
    }
}

impl Recorder {
    fn run_loop(
        &mut self,
        events: &mut RingBuf<MapData>,
        mut gated: Option<&mut GatedChild>,
    ) -> Result<Stop, RecordError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RecordError::Runtime)?;
        rt.block_on(async {
            use std::os::fd::AsRawFd;
            use tokio::{
                io::{Interest, unix::AsyncFd},
                signal::unix::{SignalKind, signal},
            };
            let mut sigint = signal(SignalKind::interrupt()).map_err(RecordError::Runtime)?;
            let mut sigterm = signal(SignalKind::terminate()).map_err(RecordError::Runtime)?;
            let mut sigchld = signal(SignalKind::child()).map_err(RecordError::Runtime)?;
            // Woken by the ring buffer itself (its epoll readiness) for an
            // exec, whose snapshot is taken at once; the other events (forks,
            // exits, VMs) wait for it or for the tick, rather than waking
            // hvprof one by one. A 10 ms tick cost 1.5 % of a CPU doing
            // nothing.
            // SAFETY: the fd is the ring map's, which `events` keeps open
            // for longer than this loop (and so the AsyncFd) lives.
            let ring =
                unsafe { AsyncFd::register_with_interest(events.as_raw_fd(), Interest::READABLE) }
                    .map_err(|e| RecordError::Runtime(e.into_parts().1))?;
            let deadline = self.opts.duration.map(|d| tokio::time::Instant::now() + d);
            // The drain of the events that do not wake, and slow checks:
            // targets gone without an exit event (lost, or a pid that was
            // never ours).
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let sleep = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                let resnap_at = self.resnap.iter().map(|&(at, _)| at).min();
                let resnap = async {
                    match resnap_at {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                let mut slow = false;
                tokio::select! {
                    _ = sigint.recv() => return Ok(Stop::Signal("SIGINT")),
                    _ = sigterm.recv() => return Ok(Stop::Signal("SIGTERM")),
                    () = sleep => return Ok(Stop::Duration),
                    ready = ring.readable() => {
                        // Cleared before the drain: an event committed during
                        // it makes the fd ready again, so none waits.
                        ready.map_err(RecordError::Runtime)?.clear_ready();
                        self.drain_events(events);
                    }
                    () = resnap => self.resnapshot_due(),
                    _ = sigchld.recv() => {}
                    _ = tick.tick() => {
                        self.drain_events(events);
                        self.drain_verifier(false);
                        slow = true;
                    }
                }
                if let Some(g) = gated.as_deref_mut()
                    && let Some(status) = g.try_wait()
                {
                    return Ok(Stop::TargetExited(status.to_string()));
                }
                if self.targets_gone
                    || (slow
                        && !self.target_pids.is_empty()
                        && self.target_pids.iter().all(|&p| !procmaps::alive(p)))
                {
                    return Ok(Stop::TargetExited("every target pid is gone".to_owned()));
                }
            }
        })
    }

    /// Takes the snapshots that are due again (a snapshot equal to the
    /// last one is not kept twice).
    fn resnapshot_due(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        self.resnap.retain(|&(at, tgid)| {
            if at <= now {
                due.push(tgid);
                false
            } else {
                true
            }
        });
        for tgid in due {
            if !self.processes.snapshot(tgid) {
                continue;
            }
            // Unchanged mappings may have new JIT code (QEMU registers
            // its TCG buffer once the accelerator starts).
            self.processes.reload_unwind(tgid);
        }
    }

    /// Handles every pending ring-buffer event. Exec and fork events are
    /// acted on at once: the snapshot of a short-lived process must be taken
    /// while it lives.
    fn drain_events(&mut self, ring: &mut RingBuf<MapData>) {
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<Event>() {
                // SAFETY: the kernel wrote an Event (plain old data) here;
                // read_unaligned copes with any alignment.
                events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
            }
        }
        for ev in events {
            self.handle(ev);
        }
    }

    /// `--verify-unwind`: checks the walks sent since the last drain, each
    /// with its process's mappings (a forked child's are its parent's
    /// until it execs). After `drain_events`, so that a new process is
    /// known; `last` after the stop.
    fn drain_verifier(&mut self, last: bool) {
        let processes = &self.processes;
        if let Some(v) = &mut self.verifier {
            v.drain(|tgid| processes.chain(tgid), last);
        }
    }

    fn handle(&mut self, ev: Event) {
        let rel = ev.ts_ns.saturating_sub(self.start_ns);
        match ev.kind {
            k if k == EventKind::Exec as u32 => {
                // A new image: nothing of the old one's mappings holds.
                if let Some(u) = &mut self.processes.unwind {
                    u.forget(ev.tgid);
                }
                self.processes.snapshot(ev.tgid);
                // Again once the dynamic loader has mapped the libraries
                // (a short-lived process may be gone by the later one), and
                // after early dlopens (QEMU's accelerator modules). A process
                // alive at the stop gets its last snapshot then; each read of
                // a QEMU's maps costs about 0.5 ms.
                let now = Instant::now();
                for ms in [20, 300] {
                    self.resnap.push((now + Duration::from_millis(ms), ev.tgid));
                }
                let cmdline = procmaps::cmdline(ev.tgid);
                let p = self.processes.entry(ev.tgid);
                p.exec_ns = Some(rel);
                p.exec_window = (ev.window != u32::MAX).then_some(ev.window);
                p.comm = comm_str(&ev.comm);
                if cmdline.is_some() {
                    p.cmdline = cmdline;
                }
            }
            k if k == EventKind::Fork as u32 => {
                // A parent born during the recording (forked or exec'd) is
                // symbolized from its lineage's snapshots: reading its maps
                // again (a libvirtd child forking once more) adds nothing.
                let born_here = self
                    .processes
                    .info
                    .get(&ev.tgid)
                    .is_some_and(|p| p.parent.is_some() || p.exec_ns.is_some());
                if !born_here && !self.processes.snapshots.contains_key(&ev.tgid) {
                    self.processes.learn(ev.tgid);
                }
                // A thread's "child" is in the same thread group: skip it.
                if procmaps::exe(ev.child).is_some()
                    && std::fs::read_to_string(format!("/proc/{}/status", ev.child))
                        .ok()
                        .and_then(|s| {
                            s.lines()
                                .find_map(|l| l.strip_prefix("Tgid:"))
                                .and_then(|v| v.trim().parse::<u32>().ok())
                        })
                        .is_some_and(|tgid| tgid == ev.tgid)
                {
                    return;
                }
                let comm = comm_str(&ev.comm);
                let p = self.processes.entry(ev.child);
                p.parent = Some(ev.tgid);
                p.forked_ns = Some(rel);
                p.fork_window = (ev.window != u32::MAX).then_some(ev.window);
                if p.comm.is_empty() {
                    p.comm = comm;
                }
            }
            k if k == EventKind::UnwindTables as u32 => {
                // A process the unwinder met without its mappings (a child
                // that exec'd, or a dlopen), or in code without a table
                // (JIT code registered since): read them again.
                if !self.processes.snapshot(ev.tgid) {
                    self.processes.learn(ev.tgid);
                }
                self.processes.reload_unwind(ev.tgid);
            }
            k if k == EventKind::UnwindMapping as u32 => {
                // A library mapped executable: its mappings are read again
                // once the loader is done (a dlopen maps a few segments, an
                // exec'd process's loader dozens of libraries within a few
                // ms). The kernel announces no other mapping of the process
                // for MAPPING_SETTLE_NS, so the read must come after that:
                // one already due then (an exec's 20 ms snapshot) serves.
                let settled = Instant::now() + Duration::from_nanos(MAPPING_SETTLE_NS);
                let serves = settled..=settled + Duration::from_millis(20);
                if !self
                    .resnap
                    .iter()
                    .any(|&(at, t)| t == ev.tgid && serves.contains(&at))
                {
                    self.resnap.push((settled, ev.tgid));
                }
            }
            k if k == EventKind::Exit as u32 => {
                if let Some(u) = &mut self.processes.unwind {
                    u.forget(ev.tgid);
                }
                self.target_pids.remove(&ev.tgid);
                if self.target_pids.is_empty() && matches!(self.opts.target, Target::Pids(_)) {
                    self.targets_gone = true;
                }
                let comm = comm_str(&ev.comm);
                let p = self.processes.entry(ev.tgid);
                p.exit_ns = Some(rel);
                if p.comm.is_empty() {
                    p.comm = comm;
                }
            }
            k if k == EventKind::VmCreated as u32 => {
                let cmdline = procmaps::cmdline(ev.tgid);
                self.vms.push((ev, cmdline));
            }
            _ => self.ring_losses += 1,
        }
    }

    /// The unwinder's counts per window, by `UnwindStop` name.
    fn unwind_counts(bpf: &Ebpf) -> Vec<LossCount> {
        let Some(map) = bpf.map(names::UNWIND_STOPS) else {
            return Vec::new();
        };
        let Ok(m) =
            PerCpuHashMap::<&MapData, u32, [u64; UnwindStop::COUNT as usize]>::try_from(map)
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (window, per_cpu) in m.iter().filter_map(Result::ok) {
            for stop in UnwindStop::ALL {
                let count: u64 = per_cpu.iter().map(|c| c[stop as usize]).sum();
                if count > 0 {
                    out.push(LossCount {
                        window: (window != u32::MAX).then_some(window),
                        kind: stop.name().to_owned(),
                        count,
                    });
                }
            }
        }
        out.sort_by(|a, b| (a.window, &a.kind).cmp(&(b.window, &b.kind)));
        out
    }

    /// Every entry of an aggregation map of `tracer`; none when the
    /// tracer did not run.
    fn drain<K: aya::Pod, V: aya::Pod>(
        &self,
        bpf: &Ebpf,
        name: &'static str,
        tracer: Tracer,
    ) -> Result<Vec<(K, V)>, RecordError> {
        match bpf.map(name) {
            Some(m) if self.tracers.contains(&tracer) => {
                let m: BpfHashMap<&MapData, K, V> =
                    BpfHashMap::try_from(m).map_err(|source| RecordError::Map { name, source })?;
                Ok(m.iter().filter_map(Result::ok).collect())
            }
            _ => Ok(Vec::new()),
        }
    }

    /// The kernel's `COUNTERS`, summed over CPUs, by name.
    fn counters(&self, bpf: &Ebpf) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        let Some(m) = bpf.map(names::COUNTERS) else {
            return out;
        };
        let Ok(a) = aya::maps::PerCpuArray::<_, u64>::try_from(m) else {
            return out;
        };
        let mut counted = Vec::new();
        if self.tracers.contains(&Tracer::OffCpu) {
            counted.extend([
                (Counter::OffCpuUserWalk, "off-CPU user stacks walked"),
                (
                    Counter::OffCpuUserCached,
                    "off-CPU user stacks reused (same site)",
                ),
                (
                    Counter::OffCpuKernWalkOut,
                    "off-CPU kernel stacks walked at switch-out (D)",
                ),
                (
                    Counter::OffCpuKernWalkIn,
                    "off-CPU kernel stacks walked at switch-in",
                ),
                (
                    Counter::OffCpuKernCached,
                    "off-CPU kernel stacks reused (same site)",
                ),
                (
                    Counter::OffCpuKernShort,
                    "off-CPU blocks too short for a kernel walk",
                ),
                (Counter::OffCpuPreempted, "off-CPU preemptions (no stack)"),
                (
                    Counter::OffCpuMapUpdates,
                    "off-CPU map updates (accumulated blocks added)",
                ),
            ]);
        }
        if self.opts.verify_stack_cache {
            counted.extend([
                (
                    Counter::UserReuseDiffers,
                    "user stack reuses that differed from a walk",
                ),
                (
                    Counter::KernReuseDiffers,
                    "off-CPU kernel stack reuses that differed from a walk",
                ),
                (
                    Counter::LockKernReuseDiffers,
                    "lock-wait kernel stack reuses that differed from a walk",
                ),
            ]);
        }
        for (c, name) in counted {
            let n: u64 = a.get(&(c as u32), 0).map_or(0, |v| v.iter().sum());
            out.insert(name.to_owned(), n);
        }
        if self.tracers.contains(&Tracer::Locks) {
            for (c, name) in [
                (
                    Counter::LockWaitsMigrated,
                    "lock waits ended on another CPU",
                ),
                (Counter::LockWaitsNested, "lock waits nested in another"),
                (Counter::LockKernWalk, "lock-wait kernel stacks walked"),
                (
                    Counter::LockKernCached,
                    "lock-wait kernel stacks reused (same place)",
                ),
                (Counter::LockUserWalk, "lock-wait user stacks walked"),
                (
                    Counter::LockUserCached,
                    "lock-wait user stacks reused (same site)",
                ),
            ] {
                let n: u64 = a.get(&(c as u32), 0).map_or(0, |v| v.iter().sum());
                out.insert(name.to_owned(), n);
            }
        }
        self.unwind_table_counters(&mut out);
        out
    }

    /// What the unwind-table loader did (`--unwind dwarf`).
    fn unwind_table_counters(&self, out: &mut std::collections::BTreeMap<String, u64>) {
        if let Some(u) = &self.unwind_stats {
            for (name, n) in [
                ("unwind tables: files loaded", u.files as u64),
                ("unwind tables: files from the cache", u.files_cached as u64),
                (
                    "unwind tables: files without tables",
                    u.files_without_table as u64,
                ),
                (
                    "unwind tables: files that did not fit",
                    u.files_not_fitting as u64,
                ),
                ("unwind tables: rows", u.rows),
                ("unwind tables: JIT code ranges", u.jit_code),
                ("unwind tables: chunk index entries", u.chunks),
                (
                    "unwind tables: map KiB",
                    crate::unwind::procs::map_kib(u.rows, u.chunks),
                ),
                (
                    "unwind tables: build/read ms",
                    u64::try_from(u.build_time.as_millis()).unwrap_or(u64::MAX),
                ),
                ("unwind tables: process loads", u.process_loads),
                ("unwind tables: mappings left out", u.mappings_left_out),
            ] {
                out.insert(name.to_owned(), n);
            }
        }
    }

    #[expect(
        clippy::too_many_lines,
        reason = "drain, then symbolize, then assemble: one pass"
    )]
    fn build_profile(
        &mut self,
        bpf: &mut Ebpf,
        stop: &Stop,
        stop_ns: u64,
    ) -> Result<Profile, RecordError> {
        let map_err = |name: &'static str| move |source| RecordError::Map { name, source };
        let vm_count = {
            let a: Array<&MapData, VmState> =
                Array::try_from(bpf.map(names::VM_STATE).ok_or(RecordError::Missing {
                    name: names::VM_STATE,
                })?)
                .map_err(map_err(names::VM_STATE))?;
            a.get(&0, 0).map_err(map_err(names::VM_STATE))?.created
        };

        let oncpu_raw: Vec<(SampleKey, u64)> = {
            let m: BpfHashMap<&MapData, SampleKey, u64> =
                BpfHashMap::try_from(bpf.map(names::ONCPU_COUNTS).ok_or(RecordError::Missing {
                    name: names::ONCPU_COUNTS,
                })?)
                .map_err(map_err(names::ONCPU_COUNTS))?;
            m.iter().filter_map(Result::ok).collect()
        };
        let mut offcpu_raw: Vec<(OffCpuKey, OffCpuValue)> = {
            let m: BpfHashMap<&MapData, OffCpuKey, OffCpuValue> =
                BpfHashMap::try_from(bpf.map(names::OFFCPU_TIMES).ok_or(RecordError::Missing {
                    name: names::OFFCPU_TIMES,
                })?)
                .map_err(map_err(names::OFFCPU_TIMES))?;
            m.iter().filter_map(Result::ok).collect()
        };
        // Tasks still blocked when the recording stopped: their block so far.
        {
            let m: BpfHashMap<&MapData, u64, OffCpuStart> =
                BpfHashMap::try_from(bpf.map(names::OFFCPU_START).ok_or(RecordError::Missing {
                    name: names::OFFCPU_START,
                })?)
                .map_err(map_err(names::OFFCPU_START))?;
            let min = u64::try_from(self.opts.min_block.as_nanos()).unwrap_or(u64::MAX);
            let max = u64::try_from(self.opts.max_block.as_nanos()).unwrap_or(u64::MAX);
            // Entries stay for live threads (and, after the stop, for the
            // threads that exited since). Each holds its last blocks not yet
            // in the off-CPU map; one not blocked has no start.
            for (_, mut s) in m.iter().filter_map(Result::ok) {
                let task = format!("/proc/{}/task/{}", s.key.tgid, s.key.pid);
                // A thread that ran since its last block: that block's
                // run-queue wait, which it would have added at its next
                // switch-out (a thread that exited added its own).
                let since = s.run_delay;
                if let Some(acc) = s.charged_acc_mut()
                    && let Some(now) = run_delay_of(&task)
                {
                    acc.value.add_runq(now.saturating_sub(since));
                }
                offcpu_raw.extend(s.pending().map(|a| (a.key, a.value)));
                if s.start_ns == 0 {
                    continue;
                }
                let blocked = stop_ns.saturating_sub(s.start_ns);
                let alive = Path::new(&task).exists();
                if blocked < min || blocked > max || s.start_ns < self.start_ns || !alive {
                    continue;
                }
                // Still blocked: whether it already waits for a CPU is not
                // known.
                offcpu_raw.push((s.key, OffCpuValue::block(blocked, 0)));
            }
        }
        // One row per key: the map's, a thread's pending blocks and its block
        // in progress may share one.
        let offcpu_raw: Vec<(OffCpuKey, OffCpuValue)> = {
            let mut merged: std::collections::HashMap<OffCpuKey, OffCpuValue> =
                std::collections::HashMap::with_capacity(offcpu_raw.len());
            for (k, v) in offcpu_raw {
                merged.entry(k).or_default().add(&v);
            }
            merged.into_iter().collect()
        };
        let mut losses: Vec<LossCount> = {
            let m: PerCpuHashMap<&MapData, LossKey, u64> =
                PerCpuHashMap::try_from(bpf.map(names::LOSSES).ok_or(RecordError::Missing {
                    name: names::LOSSES,
                })?)
                .map_err(map_err(names::LOSSES))?;
            m.iter()
                .filter_map(Result::ok)
                .filter_map(|(k, v)| {
                    let loss = Loss::ALL.get(k.loss as usize)?;
                    Some(LossCount {
                        window: (k.window != u32::MAX).then_some(k.window),
                        kind: loss_name(*loss).to_owned(),
                        count: v.iter().sum(),
                    })
                })
                .filter(|l| l.count > 0)
                .collect()
        };
        let unwind = Self::unwind_counts(bpf);
        if self.ring_losses > 0 {
            losses.push(LossCount {
                window: None,
                kind: "unknown ring-buffer events".to_owned(),
                count: self.ring_losses,
            });
        }

        // Stacks, by content hash.
        let locks_raw: Vec<(LockKey, LockValue)> =
            self.drain(bpf, names::LOCK_WAITS, Tracer::Locks)?;
        let dbus_raw: Vec<(DbusKey, DbusValue)> =
            self.drain(bpf, names::DBUS_CALLS, Tracer::Dbus)?;
        let forks_raw: Vec<(ForkKey, ForkValue)> =
            self.drain(bpf, names::FORK_CALLS, Tracer::Fork)?;

        // Every (tgid, kernel stack, user stack) that needs frames.
        let triples: Vec<(u32, u64, u64)> = oncpu_raw
            .iter()
            .map(|(k, _)| (k.tgid, k.kern_stack, k.user_stack))
            .chain(
                offcpu_raw
                    .iter()
                    .map(|(k, _)| (k.tgid, k.kern_stack, k.user_stack)),
            )
            .chain(
                locks_raw
                    .iter()
                    .map(|(k, _)| (k.tgid, k.kern_stack, k.user_stack)),
            )
            .chain(forks_raw.iter().map(|(k, _)| (k.tgid, 0, k.user_stack)))
            .chain(dbus_raw.iter().map(|(k, _)| (k.tgid, 0, k.user_stack)))
            .collect();

        let stacks: HashMap<u64, Vec<u64>> = {
            let mut ids: Vec<u64> = triples
                .iter()
                .flat_map(|&(_, k, u)| [k, u])
                .filter(|&id| id >= STACK_ID_MIN)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            let m: BpfHashMap<&MapData, u64, StackBuf> =
                BpfHashMap::try_from(bpf.map(names::STACKS).ok_or(RecordError::Missing {
                    name: names::STACKS,
                })?)
                .map_err(map_err(names::STACKS))?;
            ids.into_iter()
                .filter_map(|id| {
                    let st = m.get(&id, 0).ok()?;
                    let n = st
                        .ips
                        .iter()
                        .position(|&ip| ip == 0)
                        .unwrap_or(st.ips.len());
                    Some((id, st.ips[..n].to_vec()))
                })
                .collect()
        };

        let mut sym = Symbolizer::new();
        let kaddrs: Vec<u64> = triples
            .iter()
            .map(|&(_, k, _)| k)
            .filter_map(|id| stacks.get(&id))
            .flatten()
            .copied()
            .collect();
        sym.prepare_kernel(&kaddrs);
        // Batch the user frames per file.
        let mut files = Vec::new();
        for &(tgid, _, id) in &triples {
            let chain = self.processes.chain(tgid);
            let ips = stacks.get(&id).into_iter().flatten();
            for (i, &ip) in ips.take_while(|&&ip| ip < STACK_CUT).enumerate() {
                let addr = call_site(i, ip);
                if let Some(fo) = Symbolizer::file_offset(&chain, addr) {
                    files.push(fo);
                }
            }
        }
        files.sort_unstable();
        files.dedup();
        sym.prepare_files(&files);

        let mut table = FrameTable::default();
        let mut kcache: HashMap<u64, Vec<u32>> = HashMap::new();
        let mut ucache: HashMap<(u32, u64), Vec<u32>> = HashMap::new();
        let target_all = matches!(self.opts.target, Target::All);
        let short_block = format!(
            "[kernel stack not walked: blocked < {}]",
            human_ns(
                u64::try_from(self.opts.kernel_stack_min_block.as_nanos()).unwrap_or(u64::MAX)
            )
        );
        let mut stack_of = |tgid: u32,
                            kern: u64,
                            user: u64,
                            sym: &mut Symbolizer,
                            table: &mut FrameTable|
         -> Vec<u32> {
            let mut out = ucache
                .entry((tgid, user))
                .or_insert_with(|| {
                    if user < STACK_ID_MIN {
                        return match user {
                            // No user space: a kernel thread (-a), or exiting.
                            14 if target_all => Vec::new(),
                            STACK_EXITING => Vec::new(),
                            STACK_NOT_TAKEN => vec![table.intern("[preempted]")],
                            _ => vec![table.intern("[missing user stack]")],
                        };
                    }
                    let chain = self.processes.chain(tgid);
                    let ips = stacks.get(&user).map_or(&[][..], Vec::as_slice);
                    // Walk from the leaf. A frame in no executable mapping
                    // means the frame-pointer walk left the stack (code
                    // built without frame pointers): what follows it is
                    // garbage, so the stack ends in one `[unknown]`.
                    let mut leaf_first: Vec<String> = Vec::new();
                    for (i, &ip) in ips.iter().enumerate() {
                        if let Some(stop) = UnwindStop::of_cut(ip) {
                            leaf_first.push(format!("[user stack cut: {}]", stop.name()));
                            break;
                        }
                        let addr = call_site(i, ip);
                        let mapped = chain.iter().any(|s| s.locate(addr).is_some());
                        let names = sym.user_frames(&chain, addr);
                        // Inlined frames come outermost first: reverse them
                        // for this leaf-first walk.
                        leaf_first.extend(names.into_iter().rev());
                        if !mapped {
                            break;
                        }
                    }
                    let frames: Vec<u32> =
                        leaf_first.iter().rev().map(|f| table.intern(f)).collect();
                    frames
                })
                .clone();
            let k = kcache.entry(kern).or_insert_with(|| {
                if kern < STACK_ID_MIN {
                    return match kern {
                        STACK_SHORT_BLOCK => vec![table.intern(&short_block)],
                        STACK_DEFERRED => {
                            vec![table.intern("[kernel stack not walked: blocked at the stop]")]
                        }
                        _ => Vec::new(),
                    };
                }
                let mut names = Vec::new();
                for (i, &ip) in stacks
                    .get(&kern)
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .enumerate()
                    .rev()
                {
                    let addr = call_site(i, ip);
                    names.extend(sym.kernel_frames(addr));
                }
                // A walk from a BTF tracepoint starts in the program and the
                // tracepoint's runner: not where the task was.
                while names.last().is_some_and(|f| is_tracing_frame(f)) {
                    names.pop();
                }
                names.iter().map(|f| table.intern(f)).collect()
            });
            out.extend_from_slice(k);
            out
        };

        let mut oncpu: Vec<OnCpu> = oncpu_raw
            .iter()
            .map(|(k, n)| OnCpu {
                window: k.window,
                tgid: k.tgid,
                pid: k.pid,
                comm: comm_str(&k.comm),
                stack: stack_of(k.tgid, k.kern_stack, k.user_stack, &mut sym, &mut table),
                samples: *n,
            })
            .collect();
        oncpu.sort_by(|a, b| {
            (a.window, a.tgid, a.pid, &a.stack).cmp(&(b.window, b.tgid, b.pid, &b.stack))
        });
        let mut offcpu: Vec<OffCpu> = offcpu_raw
            .iter()
            .map(|(k, v)| OffCpu {
                window: k.window,
                tgid: k.tgid,
                pid: k.pid,
                comm: comm_str(&k.comm),
                state: task_state_name(k.state).to_owned(),
                dbus: (k.dbus != 0).then(|| dbus_function(k.dbus).1.to_owned()),
                stack: stack_of(k.tgid, k.kern_stack, k.user_stack, &mut sym, &mut table),
                blocks: v.count,
                total_ns: v.total_ns,
                max_ns: v.max_ns,
                runq_ns: v.runq_ns,
            })
            .collect();
        offcpu.sort_by(|a, b| {
            (a.window, a.tgid, a.pid, &a.stack).cmp(&(b.window, b.tgid, b.pid, &b.stack))
        });

        let data_symbols = kernel_data_symbols();
        let mut locks: Vec<LockWait> = locks_raw
            .iter()
            .map(|(k, v)| LockWait {
                window: k.window,
                tgid: k.tgid,
                comm: comm_str(&k.comm),
                lock: k.lock,
                lock_name: data_symbols.get(&k.lock).cloned(),
                lock_type: lock_type_name(k.flags).to_owned(),
                stack: stack_of(k.tgid, k.kern_stack, k.user_stack, &mut sym, &mut table),
                count: v.count,
                total_ns: v.total_ns,
                max_ns: v.max_ns,
                hist: trim_hist(&v.hist),
            })
            .collect();
        locks.sort_by(|a, b| {
            (a.window, a.lock, a.tgid, &a.stack).cmp(&(b.window, b.lock, b.tgid, &b.stack))
        });

        let mut forks: Vec<ForkCall> = forks_raw
            .iter()
            .map(|(k, v)| ForkCall {
                window: k.window,
                tgid: k.tgid,
                comm: comm_str(&k.comm),
                syscall: FORK_SYSCALLS
                    .get(((k.kind & 0xff) as usize).wrapping_sub(1))
                    .copied()
                    .unwrap_or("?")
                    .to_owned(),
                thread: k.kind & fork_kind::THREAD != 0,
                stack: stack_of(k.tgid, 0, k.user_stack, &mut sym, &mut table),
                caller: (k.caller != 0)
                    .then(|| {
                        // The call instruction is just before the return address.
                        sym.user_frames(&self.processes.chain(k.tgid), k.caller - 1)
                            .into_iter()
                            .next()
                    })
                    .flatten(),
                count: v.count,
                total_ns: v.total_ns,
                max_ns: v.max_ns,
            })
            .collect();
        forks.sort_by(|a, b| {
            (a.window, a.tgid, &a.stack, a.thread).cmp(&(b.window, b.tgid, &b.stack, b.thread))
        });

        let name = |b: &[u8]| {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            (end > 0).then(|| String::from_utf8_lossy(&b[..end]).into_owned())
        };
        let mut dbus: Vec<DbusCall> = dbus_raw
            .iter()
            .map(|(k, v)| {
                let (library, function) = dbus_function(k.function);
                DbusCall {
                    window: k.window,
                    tgid: k.tgid,
                    comm: comm_str(&k.comm),
                    library: library.to_owned(),
                    function: function.to_owned(),
                    destination: name(&k.names.destination),
                    path: name(&k.names.path),
                    interface: name(&k.names.interface),
                    member: name(&k.names.member),
                    timeout_ms: (k.function != dbus_fn::LIBDBUS_PENDING_BLOCK
                        || k.timeout_ms != profiler_common::record::DBUS_TIMEOUT_DEFAULT)
                        .then_some(k.timeout_ms),
                    stack: stack_of(k.tgid, 0, k.user_stack, &mut sym, &mut table),
                    calls: v.count,
                    timeouts: v.timeouts,
                    total_ns: v.total_ns,
                    max_ns: v.max_ns,
                    hist: trim_hist(&v.hist),
                }
            })
            .collect();
        dbus.sort_by(|a, b| {
            (a.window, a.tgid, &a.library, &a.member, &a.stack)
                .cmp(&(b.window, b.tgid, &b.library, &b.member, &b.stack))
        });

        let hierarchies = cgroup_hierarchies();
        let mut cgroups: Vec<CgroupOp> = match bpf.map(names::CGROUP_OPS) {
            Some(m) if self.tracers.contains(&Tracer::Cgroup) => {
                let m: BpfHashMap<&MapData, CgroupKey, CgroupValue> =
                    BpfHashMap::try_from(m).map_err(map_err(names::CGROUP_OPS))?;
                m.iter()
                    .filter_map(Result::ok)
                    .map(|(k, v)| CgroupOp {
                        window: k.window,
                        tgid: k.tgid,
                        comm: comm_str(&k.comm),
                        op: match k.kind {
                            cgroup_op::MKDIR => "mkdir",
                            cgroup_op::RMDIR => "rmdir",
                            _ => "attach",
                        }
                        .to_owned(),
                        hierarchy: hierarchies
                            .get(&k.root)
                            .cloned()
                            .unwrap_or_else(|| format!("hierarchy {}", k.root)),
                        path: {
                            let end = k.path.iter().position(|&b| b == 0).unwrap_or(k.path.len());
                            String::from_utf8_lossy(&k.path[..end]).into_owned()
                        },
                        count: v.count,
                        timed: v.timed,
                        total_ns: v.total_ns,
                        max_ns: v.max_ns,
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        cgroups.sort_by(|a, b| {
            (a.window, &a.op, &a.hierarchy, &a.path, a.tgid).cmp(&(
                b.window,
                &b.op,
                &b.hierarchy,
                &b.path,
                b.tgid,
            ))
        });

        let stats = sym.stats;
        if stats.user_unmapped > 0 {
            losses.push(LossCount {
                window: None,
                kind: "user frames of processes gone before their maps were read".to_owned(),
                count: stats.user_unmapped,
            });
        }

        // VM creations, numbered by time (see the kernel's `vm_created`).
        let mut vm_events = self.vms.clone();
        vm_events.sort_by_key(|(e, _)| e.ts_ns);
        let vms: Vec<VmCreation> = vm_events
            .into_iter()
            .enumerate()
            .map(|(i, (e, cmdline))| {
                let name = cmdline.as_deref().and_then(procmaps::qemu_vm_name);
                VmCreation {
                    ordinal: i as u64 + 1,
                    time_ns: e.ts_ns.saturating_sub(self.start_ns),
                    pid: e.tgid,
                    tid: e.pid,
                    comm: comm_str(&e.comm),
                    source: if e.child == VM_SOURCE_EXEC {
                        "exec"
                    } else {
                        "kvm"
                    }
                    .to_owned(),
                    cmdline,
                    name,
                }
            })
            .collect();
        if vms.len() as u64 != vm_count {
            losses.push(LossCount {
                window: None,
                kind: "VM creation events missing (count from the kernel's counter)".to_owned(),
                count: vm_count.saturating_sub(vms.len() as u64),
            });
        }

        let mut processes: Vec<Process> = self.processes.info.values().cloned().collect();
        processes.sort_by_key(|p| p.tgid);
        Ok(Profile {
            meta: Meta {
                hvprof_version: env!("CARGO_PKG_VERSION").to_owned(),
                hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default(),
                kernel: sys::kernel_release(),
                cpus: sys::online_cpus().map_or(0, |c| c.len()),
                started_unix_ms: self.started_unix_ms,
                duration_ns: stop_ns.saturating_sub(self.start_ns),
                command_line: self.opts.command_line.clone(),
                target: self.opts.target.to_string(),
                follow_children: self.opts.follow_children,
                frequency_hz: self.opts.frequency_hz,
                window_spec: Some(self.opts.windows.clone()),
                min_block_ns: u64::try_from(self.opts.min_block.as_nanos()).unwrap_or(u64::MAX),
                max_block_ns: u64::try_from(self.opts.max_block.as_nanos()).unwrap_or(u64::MAX),
                vm_events: self
                    .opts
                    .vm_events
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                stop_reason: stop.to_string(),
                tracers: self.tracers.iter().map(|t| t.name().to_owned()).collect(),
                program_stats: Vec::new(),
                self_cpu_ns: Some(self.self_cpu_ns),
                counters: self.counters(bpf),
                verify_unwind: self
                    .verifier
                    .as_ref()
                    .map(crate::unwind::verify::Verifier::result),
            },
            windows: self.opts.windows.windows(vm_count),
            vms,
            frames: table.into_names(),
            oncpu,
            offcpu,
            losses,
            unwind,
            processes,
            locks,
            forks,
            cgroups,
            dbus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_event_patterns() {
        assert_eq!(VmEvent::parse("kvm"), Ok(VmEvent::Kvm));
        let e = VmEvent::parse("exec:qemu-system-*").unwrap();
        assert_eq!(e.to_string(), "exec:qemu-system-*");
        let (comm, len, prefix) = VmEvent::kernel_pattern("qemu-system-*");
        assert_eq!(&comm[..len as usize], b"qemu-system-");
        assert!(prefix);
        // Longer than a comm: compared on its first 15 bytes, as a prefix.
        let (comm, len, prefix) = VmEvent::kernel_pattern("qemu-system-x86_64");
        assert_eq!(&comm[..len as usize], b"qemu-system-x86");
        assert!(prefix);
        let (_, len, prefix) = VmEvent::kernel_pattern("firecracker");
        assert_eq!((len, prefix), (11, false));
        for bad in ["exec:", "exec:*", "exec:q*emu", "tcg", "exec:a?b*"] {
            assert!(VmEvent::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn task_states() {
        assert_eq!(task_state_name(0), "R");
        assert_eq!(task_state_name(0x100), "R");
        assert_eq!(task_state_name(1), "S");
        assert_eq!(task_state_name(2), "D");
        assert_eq!(task_state_name(0x402), "D");
        assert_eq!(task_state_name(0x80), "I");
    }

    #[test]
    fn finds_own_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let d = descendants(&[std::process::id()]);
        assert!(d.contains(&child.id()), "{d:?}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
