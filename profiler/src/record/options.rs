//! What a recording is asked to do: the resolved options (the command
//! line's flags, parsed) and the errors a recording can end with.

use std::{ffi::OsString, fmt, io, path::PathBuf, time::Duration};

use profiler_common::record::COMM_LEN;
use thiserror::Error;

use crate::{ebpf, profile, render, tracer::Tracer, windows::WindowSpec};

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
    pub(super) fn kernel_pattern(pattern: &str) -> ([u8; COMM_LEN], u32, bool) {
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
    /// What the windows hold: the events of a time interval, or the work
    /// for their VMs.
    pub attribute: crate::windows::Attribution,
    pub frequency_hz: u64,
    pub min_block: Duration,
    pub max_block: Duration,
    pub vm_events: Vec<VmEvent>,
    pub duration: Option<Duration>,
    /// How often the maps are drained into the profile file.
    pub flush_interval: Duration,
    /// How long the timed system calls go through the dispatch before
    /// their programs move to the calls' own tracepoints; `None`: for the
    /// whole recording.
    pub syscall_dispatch_for: Option<Duration>,
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
    /// Drop one lock contention end in this many, at random, as if unseen
    /// (0: none); for tests.
    pub drop_lock_ends: u32,
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
    #[error(
        "kernel BTF (/sys/kernel/btf/vmlinux), which every recording program is loaded with, \
         is not usable: {cause}; use a kernel built with CONFIG_DEBUG_INFO_BTF=y \
         (`hvprof check` shows what this kernel has)"
    )]
    Btf { cause: String },
    #[error(transparent)]
    Load(#[from] ebpf::LoadError),
    #[error("attaching {what} failed: {source}; run `hvprof check` to see what this kernel allows")]
    Attach {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the eBPF object is missing {name}: rebuild hvprof (`./x build`)")]
    Missing { name: &'static str },
    #[error("eBPF map {name}: {cause}; {fix}", cause = chain(source), fix = map_fix(source))]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no process with pid {pid}: check the pid (`pgrep -a NAME`)")]
    NoSuchPid { pid: u32 },
    #[error("cannot start `{command}`: {step} failed: {source}; {fix}", fix = syscall_fix(source))]
    Spawn {
        command: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot create the output directory {path}: {source}; give -o a directory you can write (or free space on its file system)"
    )]
    Output { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Profile(#[from] profile::ProfileError),
    #[error(transparent)]
    Render(#[from] render::RenderError),
    #[error("the event loop failed {step}: {source}; {fix}", fix = syscall_fix(source))]
    Runtime {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "--bpf-stats: turning on the kernel's BPF run-time statistics failed: {source}; {fix}",
        fix = bpf_stats_fix(source)
    )]
    BpfStats {
        #[source]
        source: io::Error,
    },
    #[error(
        "the oncpu tracer samples every online CPU, and reading their list \
         (/sys/devices/system/cpu/online) failed: {source}; mount sysfs \
         (`mount -t sysfs sysfs /sys`), or record without it (`--tracers` without oncpu)"
    )]
    OnlineCpus {
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Unwind(#[from] crate::unwind::procs::LoaderError),
}

pub(super) use crate::ebpf::chain;

/// What to do about a failed map operation.
fn map_fix(err: &aya::maps::MapError) -> &'static str {
    use aya::maps::MapError;
    let errno = match err {
        MapError::SyscallError(e) => e.io_error.raw_os_error(),
        MapError::IoError(e) => e.raw_os_error(),
        // The map is not what this hvprof expects (type, key or value
        // size, entries).
        _ => {
            return "this hvprof and its embedded eBPF object disagree about the map: rebuild \
                    hvprof (`./x build`)";
        }
    };
    match errno {
        Some(libc::EPERM | libc::EACCES) => {
            "run as root, or with CAP_BPF + CAP_PERFMON (`hvprof check` shows what is missing)"
        }
        Some(libc::E2BIG | libc::ENOSPC) => {
            "the map is full: record fewer processes (fewer -p pids, or a narrower --comm)"
        }
        Some(libc::ENOMEM) => {
            "the kernel is short of memory for BPF maps: free some, or lower --max-stacks and \
             --unwind-max-rows"
        }
        _ => "the kernel refused it; run `hvprof check` to see what this kernel allows",
    }
}

/// What to do when a system call that starts the `-- CMD` or runs the
/// event loop fails: mostly a resource that ran out.
fn syscall_fix(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => {
            "too many open files: raise the limit (`ulimit -n`) and record again"
        }
        Some(libc::EAGAIN) => {
            "the process limit is reached: raise it (`ulimit -u`) or end some processes, and \
             record again"
        }
        Some(libc::ENOMEM) => "the system is out of memory: free some and record again",
        _ if err.kind() == io::ErrorKind::InvalidInput => {
            "an argument holds a NUL byte, which no command line can pass: remove it"
        }
        _ => "record again; if it fails the same way, report it with this message",
    }
}

/// What to do when the kernel's BPF statistics cannot be turned on.
fn bpf_stats_fix(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            "they need CAP_SYS_ADMIN: run as root, or record without --bpf-stats"
        }
        Some(libc::EINVAL) => "they need Linux 5.8 or later: record without --bpf-stats",
        _ => "record without --bpf-stats",
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

    /// Each error a user can hit says what failed, why, and what to do.
    #[test]
    fn errors_name_the_cause_and_the_fix() {
        let map = RecordError::Map {
            name: "TRACKED",
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: io::Error::from_raw_os_error(libc::E2BIG),
            }),
        }
        .to_string();
        assert!(
            map.contains("TRACKED") && map.contains("the map is full"),
            "{map}"
        );
        assert!(
            map.contains("Argument list too long"),
            "the errno is left out: {map}"
        );
        let map = RecordError::Map {
            name: "VM_STATE",
            source: aya::maps::MapError::OutOfBounds {
                index: 1,
                max_entries: 1,
            },
        }
        .to_string();
        assert!(map.contains("rebuild hvprof"), "{map}");
        let spawn = RecordError::Spawn {
            command: "qemu".into(),
            step: "fork",
            source: io::Error::from_raw_os_error(libc::EAGAIN),
        }
        .to_string();
        assert!(
            spawn.starts_with("cannot start `qemu`: fork failed"),
            "{spawn}"
        );
        assert!(spawn.contains("ulimit -u"), "{spawn}");
        let runtime = RecordError::Runtime {
            step: "watching the ring buffer",
            source: io::Error::from_raw_os_error(libc::EMFILE),
        }
        .to_string();
        assert!(runtime.contains("ulimit -n"), "{runtime}");
        let stats = RecordError::BpfStats {
            source: io::Error::from_raw_os_error(libc::EPERM),
        }
        .to_string();
        assert!(stats.contains("CAP_SYS_ADMIN"), "{stats}");
    }
}
