//! The profile file: one self-contained, versioned, already-symbolized
//! recording. Everything after it (report, diff, exports) works from this
//! file alone, offline, on another machine.
//!
//! On disk: the 8-byte magic `HVPROF\0\n`, a little-endian `u32` format
//! version, then gzip-compressed JSON of [`Profile`].

use std::{
    collections::HashMap,
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::windows::{WindowInfo, WindowSpec};

pub const MAGIC: &[u8; 8] = b"HVPROF\0\n";
/// Bumped on every incompatible change of [`Profile`].
pub const FORMAT_VERSION: u32 = 1;
/// The conventional file name inside a recording directory.
pub const FILE_NAME: &str = "profile.hvprof";

#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write profile {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not an hvprof profile (it does not start with the hvprof magic); pass the profile.hvprof written by `hvprof record`"
    )]
    Foreign { path: PathBuf },
    #[error(
        "{path} is a profile of format version {found}, this hvprof reads version {FORMAT_VERSION}; use the hvprof that recorded it, or record again"
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "{path} is truncated or corrupt ({why}); it cannot be read — record again, or re-copy the file"
    )]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "{path} inflates to more than {limit_mib} MiB, the most hvprof reads of a profile (real ones are far smaller: the file is likely corrupt or not a profile); to read it anyway, set {MAX_INFLATED_ENV} to a larger number of MiB"
    )]
    TooLarge { path: PathBuf, limit_mib: u64 },
}

/// The environment variable that raises [`DEFAULT_MAX_INFLATED_MIB`].
pub const MAX_INFLATED_ENV: &str = "HVPROF_MAX_PROFILE_MIB";

/// The most a profile's JSON may inflate to, in MiB: profiles travel (CI
/// baselines, bug reports), so a small file must not make the reader
/// allocate without bound (4 GiB of zeros gzip to 4 MB). The sample workload's
/// profile inflates to 17 KB.
pub const DEFAULT_MAX_INFLATED_MIB: u64 = 1024;

/// [`DEFAULT_MAX_INFLATED_MIB`], or what [`MAX_INFLATED_ENV`] says.
fn max_inflated_mib() -> u64 {
    std::env::var(MAX_INFLATED_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_INFLATED_MIB)
}

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
    /// `record --comm`: each time every process of that name was gone and
    /// one was started again (a daemon restarted), which was then followed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarts: Vec<Restart>,
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
    /// The user-stack unwinder, per window: why walks ended and how frames
    /// were found (`--unwind dwarf`; empty with frame pointers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unwind: Vec<LossCount>,
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

    /// Writes the profile (atomically: to a temporary name, then renamed).
    pub fn write(&self, path: &Path) -> Result<(), ProfileError> {
        let err = |source| ProfileError::Write {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("hvprof.tmp");
        let file = File::create(&tmp).map_err(err)?;
        let mut out = BufWriter::new(file);
        out.write_all(MAGIC).map_err(err)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes()).map_err(err)?;
        // Buffered in front of the encoder too: serde writes a few bytes at
        // a time, and each write into the encoder zeroed its 32 KiB output
        // buffer (a quarter of a 50-guest recording's CPU, after the stop).
        let mut gz = BufWriter::with_capacity(
            1 << 16,
            flate2::write::GzEncoder::new(out, flate2::Compression::default()),
        );
        serde_json::to_writer(&mut gz, self).map_err(|e| err(io::Error::other(e)))?;
        let out = gz
            .into_inner()
            .map_err(|e| err(e.into_error()))?
            .finish()
            .map_err(err)?;
        out.into_inner()
            .map_err(|e| err(e.into_error()))?
            .sync_all()
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Reads a profile, rejecting foreign, newer and damaged files with an
    /// error that says which.
    pub fn read(path: &Path) -> Result<Self, ProfileError> {
        let file = File::open(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_reader(BufReader::new(file), path)
    }

    pub fn from_reader(mut input: impl Read, path: &Path) -> Result<Self, ProfileError> {
        let mut head = [0u8; 12];
        let mut got = 0;
        while got < head.len() {
            match input.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(source) => {
                    return Err(ProfileError::Read {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
        if got < MAGIC.len() || &head[..8] != MAGIC {
            return Err(ProfileError::Foreign {
                path: path.to_path_buf(),
            });
        }
        if got < head.len() {
            return Err(ProfileError::Corrupt {
                path: path.to_path_buf(),
                why: "it ends inside the header".to_owned(),
            });
        }
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if version != FORMAT_VERSION {
            return Err(ProfileError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        // Inflated whole, then parsed from memory: serde_json reading from
        // a `Read` goes a byte at a time, 3× slower on a large profile.
        let corrupt = |why: String| ProfileError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        let limit_mib = max_inflated_mib();
        let limit = limit_mib.saturating_mul(1 << 20);
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(input)
            .take(limit.saturating_add(1))
            .read_to_end(&mut json)
            .map_err(|e| corrupt(e.to_string()))?;
        if json.len() as u64 > limit {
            return Err(ProfileError::TooLarge {
                path: path.to_path_buf(),
                limit_mib,
            });
        }
        serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Profile {
        let mut frames = FrameTable::default();
        let main = frames.intern("main");
        let busy = frames.intern("vmload_busy");
        assert_eq!(frames.intern("main"), main);
        Profile {
            meta: Meta {
                hvprof_version: "0.1.0".into(),
                target: "pid 1".into(),
                window_spec: Some(WindowSpec::Every { size: 2 }),
                ..Meta::default()
            },
            windows: WindowSpec::Every { size: 2 }.windows(3),
            vms: vec![VmCreation {
                ordinal: 1,
                time_ns: 5,
                pid: 1,
                tid: 1,
                comm: "vmload".into(),
                source: "kvm".into(),
                cmdline: None,
                name: None,
            }],
            frames: frames.into_names(),
            oncpu: vec![OnCpu {
                window: 1,
                tgid: 1,
                pid: 1,
                comm: "vmload".into(),
                stack: vec![main, busy],
                samples: 7,
            }],
            ..Profile::default()
        }
    }

    #[test]
    fn round_trips() {
        let dir = std::env::temp_dir().join(format!("hvprof-profile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        let p = sample();
        p.write(&path).unwrap();
        let q = Profile::read(&path).unwrap();
        assert_eq!(p, q);
        assert_eq!(
            q.frame_names(&q.oncpu[0].stack).collect::<Vec<_>>(),
            ["main", "vmload_busy"]
        );

        // Truncated: every prefix is rejected with a clear error, not a panic.
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 4, 8, 11, 12, 20, bytes.len() / 2, bytes.len() - 1] {
            let err = Profile::from_reader(&bytes[..cut], &path)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("not an hvprof profile") || err.contains("truncated or corrupt"),
                "cut {cut}: {err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_foreign_and_newer_files() {
        let path = Path::new("x.svg");
        let err = Profile::from_reader(&b"<svg xmlns=...>"[..], path).unwrap_err();
        assert!(matches!(err, ProfileError::Foreign { .. }), "{err}");
        let mut newer = MAGIC.to_vec();
        newer.extend_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let err = Profile::from_reader(&newer[..], path).unwrap_err();
        assert!(err.to_string().contains("format version 2"), "{err}");
        let mut garbage = MAGIC.to_vec();
        garbage.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        garbage.extend_from_slice(b"not gzip at all");
        let err = Profile::from_reader(&garbage[..], path).unwrap_err();
        assert!(matches!(err, ProfileError::Corrupt { .. }), "{err}");
    }
}
