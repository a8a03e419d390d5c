//! The tracers, and what each part of a recording needs from the kernel:
//! one registry, which `record` attaches from and `hvprof check` tests.
//!
//! A [`Part`] is a tracer `--tracers` selects, or the machinery every
//! recording runs (following the targets, counting VMs, the system-call
//! dispatch, loading unwind tables). Each part's probes — BTF tracepoints,
//! system calls, perf events, uprobes — are listed once, in
//! [`Part::probes`], with the eBPF program each one runs.
//!
//! Every probe is one whose program the kernel detaches without an RCU
//! grace period of its own (a BTF tracepoint, a perf event, a
//! `uprobe.multi` link): a classic tracepoint's or a perf-event uprobe's
//! detach waits for one (70 ms here), one after the other, and made
//! hvprof linger for seconds after writing its files.
//!
//! What a tracer's data becomes is defined beside the data's shape: its
//! graphs in [`crate::graphs`], its tables in [`crate::tables`], its
//! metrics in [`crate::ci`]; [`Tracer::graphs`], [`Tracer::tables`] and
//! [`Tracer::metrics`] find them.

use profiler_common::record::{dbus_fn, names};

use crate::{
    ci::Metric,
    graphs::{GRAPHS, Graph},
    tables::{AnyTable, TABLES},
    tracefs::Tracepoint,
};

/// A tracer that `--tracers` can select.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tracer {
    OnCpu,
    OffCpu,
    Locks,
    Fork,
    Cgroup,
    Dbus,
    /// libvirt's API calls and QEMU monitor commands, from libvirt's own
    /// USDT probes.
    Libvirt,
    /// Who woke each off-CPU block: a program at every wakeup on the
    /// machine, so off unless asked for; needs `offcpu`.
    Wakers,
}

impl Tracer {
    pub const ALL: [Self; 8] = [
        Self::OnCpu,
        Self::OffCpu,
        Self::Locks,
        Self::Fork,
        Self::Cgroup,
        Self::Dbus,
        Self::Libvirt,
        Self::Wakers,
    ];

    /// What a recording runs without `--tracers`: all but [`Self::Wakers`].
    pub const DEFAULT: [Self; 7] = [
        Self::OnCpu,
        Self::OffCpu,
        Self::Locks,
        Self::Fork,
        Self::Cgroup,
        Self::Dbus,
        Self::Libvirt,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::OnCpu => "oncpu",
            Self::OffCpu => "offcpu",
            Self::Locks => "locks",
            Self::Fork => "fork",
            Self::Cgroup => "cgroup",
            Self::Dbus => "dbus",
            Self::Libvirt => "libvirt",
            Self::Wakers => "wakers",
        }
    }

    /// Parses `oncpu,offcpu,locks`.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        let mut out = Vec::new();
        for t in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let tracer = Self::ALL
                .into_iter()
                .find(|x| x.name() == t)
                .ok_or_else(|| {
                    format!(
                        "unknown tracer {t:?}: choose from {}",
                        Self::ALL.map(Self::name).join(", ")
                    )
                })?;
            if !out.contains(&tracer) {
                out.push(tracer);
            }
        }
        if out.is_empty() {
            return Err("--tracers: name at least one tracer".to_owned());
        }
        if out.contains(&Self::Wakers) && !out.contains(&Self::OffCpu) {
            return Err(
                "the wakers tracer charges off-CPU blocks to their wakers: add offcpu \
                 (--tracers offcpu,wakers,...)"
                    .to_owned(),
            );
        }
        Ok(out)
    }

    /// The stack graphs drawn from this tracer's data (defined in
    /// [`crate::graphs`]).
    pub fn graphs(self) -> impl Iterator<Item = &'static Graph> {
        GRAPHS.into_iter().filter(move |g| g.tracer == self)
    }

    /// The tables of its data (defined in [`crate::tables`]).
    pub fn tables(self) -> impl Iterator<Item = &'static dyn AnyTable> {
        TABLES.into_iter().filter(move |t| t.tracer() == self)
    }

    /// The per-window metrics it measures (defined in [`crate::ci`]).
    pub fn metrics(self) -> impl Iterator<Item = Metric> {
        Metric::ALL
            .into_iter()
            .filter(move |m| m.tracer() == Some(self))
    }
}

/// A part of a recording: a tracer, or the machinery every recording runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// Following the targets: forks, execs and exits.
    Targets,
    /// Windows keyed to the Nth VM created.
    VmWindows,
    /// The programs on `raw_syscalls:sys_enter`/`sys_exit` that run the
    /// programs of the system calls the other parts time.
    Syscalls,
    /// Whole user stacks without frame pointers (`--unwind dwarf`): the
    /// libraries mapped during the recording.
    Unwind,
    /// `--attribute vm`: libvirtd's calls that can start a VM.
    Attribution,
    Tracer(Tracer),
}

impl From<Tracer> for Part {
    fn from(t: Tracer) -> Self {
        Self::Tracer(t)
    }
}

impl Part {
    /// Every part, in the order `hvprof check` lists their probes. `record`
    /// attaches the machinery's first (so that no fork, exec or VM creation
    /// between two attaches is missed), then the tracers', in this order.
    pub const ALL: [Self; 13] = [
        Self::Tracer(Tracer::OffCpu),
        Self::Tracer(Tracer::Wakers),
        Self::Targets,
        Self::Syscalls,
        Self::VmWindows,
        Self::Tracer(Tracer::Locks),
        Self::Tracer(Tracer::Fork),
        Self::Tracer(Tracer::Cgroup),
        Self::Unwind,
        Self::Tracer(Tracer::Dbus),
        Self::Tracer(Tracer::Libvirt),
        Self::Attribution,
        Self::Tracer(Tracer::OnCpu),
    ];

    /// As `hvprof check` names it (NEEDED BY).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Targets => "targets",
            Self::VmWindows => "vm-windows",
            Self::Syscalls => "syscalls",
            Self::Unwind => "unwind",
            Self::Attribution => "attribution",
            Self::Tracer(t) => t.name(),
        }
    }

    /// Whether `hvprof check` counts this part's probes as required
    /// (MISSING, exit status 1) rather than optional (WARN).
    #[must_use]
    pub fn required(self) -> bool {
        match self {
            Self::Targets
            | Self::VmWindows
            | Self::Syscalls
            | Self::Tracer(Tracer::OffCpu | Tracer::OnCpu) => true,
            Self::Unwind
            | Self::Attribution
            | Self::Tracer(
                Tracer::Locks
                | Tracer::Fork
                | Tracer::Cgroup
                | Tracer::Dbus
                | Tracer::Libvirt
                | Tracer::Wakers,
            ) => false,
        }
    }

    /// What this part attaches to, and with which programs.
    #[must_use]
    pub fn probes(self) -> &'static [Probe] {
        match self {
            Self::Targets => &TARGETS,
            Self::VmWindows => &VM_WINDOWS,
            Self::Syscalls => &SYSCALLS,
            Self::Unwind => &UNWIND,
            Self::Attribution => &ATTRIBUTION,
            Self::Tracer(Tracer::OnCpu) => &ONCPU,
            Self::Tracer(Tracer::OffCpu) => &OFFCPU,
            Self::Tracer(Tracer::Locks) => &LOCKS,
            Self::Tracer(Tracer::Fork) => &FORK,
            Self::Tracer(Tracer::Cgroup) => &CGROUP,
            Self::Tracer(Tracer::Dbus) => &DBUS,
            Self::Tracer(Tracer::Libvirt) => &LIBVIRT,
            Self::Tracer(Tracer::Wakers) => &WAKERS,
        }
    }
}

const TARGETS: [Probe; 3] = [
    Probe::BtfTracepoint {
        tracepoint: Tracepoint::new("sched", "sched_process_fork"),
        program: names::PROG_FORK,
    },
    Probe::BtfTracepoint {
        tracepoint: Tracepoint::new("sched", "sched_process_exec"),
        program: names::PROG_EXEC,
    },
    Probe::BtfTracepoint {
        tracepoint: Tracepoint::new("sched", "sched_process_exit"),
        program: names::PROG_EXIT,
    },
];

const SYSCALLS: [Probe; 1] = [Probe::SyscallDispatch {
    enter: names::PROG_SYSCALL_ENTER,
    exit: names::PROG_SYSCALL_EXIT,
}];

const VM_WINDOWS: [Probe; 1] = [Probe::Syscalls {
    calls: &VM_SYSCALLS,
    enter: names::PROG_IOCTL_ENTER,
    exit: names::PROG_IOCTL_EXIT,
    per_call: names::PROG_IOCTL_PER_CALL,
}];

const UNWIND: [Probe; 1] = [Probe::Syscalls {
    calls: &UNWIND_SYSCALLS,
    enter: names::PROG_UNWIND_MMAP_ENTER,
    exit: names::PROG_UNWIND_MMAP_EXIT,
    per_call: names::PROG_UNWIND_MMAP_PER_CALL,
}];

const ONCPU: [Probe; 1] = [Probe::CpuClock {
    program: names::PROG_ONCPU,
}];

const OFFCPU: [Probe; 1] = [Probe::BtfTracepoint {
    tracepoint: Tracepoint::new("sched", "sched_switch"),
    program: names::PROG_SCHED_SWITCH,
}];

const WAKERS: [Probe; 1] = [Probe::BtfTracepoint {
    tracepoint: Tracepoint::new("sched", "sched_waking"),
    program: names::PROG_SCHED_WAKING,
}];

const LOCKS: [Probe; 2] = [
    Probe::BtfTracepoint {
        tracepoint: Tracepoint::new("lock", "contention_begin"),
        program: names::PROG_LOCK_BEGIN,
    },
    Probe::BtfTracepoint {
        tracepoint: Tracepoint::new("lock", "contention_end"),
        program: names::PROG_LOCK_END,
    },
];

const FORK: [Probe; 2] = [
    Probe::Syscalls {
        calls: &FORK_SYSCALLS,
        enter: names::PROG_FORK_ENTER,
        exit: names::PROG_FORK_EXIT,
        per_call: names::PROG_FORK_PER_CALL,
    },
    // Only where the learned fork paths do not hold.
    Probe::Uprobe {
        program: names::PROG_FORK_CALLER,
    },
];

/// Entry and return of libvirt's `virNetServerProgramDispatch`.
const ATTRIBUTION: [Probe; 2] = [
    Probe::Uprobe {
        program: names::PROG_CALL_ENTER,
    },
    Probe::Uprobe {
        program: names::PROG_CALL_RETURN,
    },
];

const CGROUP: [Probe; 4] = [
    Probe::BtfTracepoint {
        tracepoint: Tracepoint::new("cgroup", "cgroup_mkdir"),
        program: names::PROG_CGROUP_MKDIR,
    },
    Probe::BtfTracepoint {
        tracepoint: Tracepoint::new("cgroup", "cgroup_attach_task"),
        program: names::PROG_CGROUP_ATTACH,
    },
    Probe::BtfTracepoint {
        tracepoint: Tracepoint::new("cgroup", "cgroup_rmdir"),
        program: names::PROG_CGROUP_RMDIR,
    },
    Probe::Syscalls {
        calls: &CGROUP_SYSCALLS,
        enter: names::PROG_CGROUP_SYSCALL_ENTER,
        exit: names::PROG_CGROUP_SYSCALL_EXIT,
        per_call: names::PROG_CGROUP_SYSCALL_PER_CALL,
    },
];

const DBUS: [Probe; 3] = [
    Probe::Uprobe {
        program: names::PROG_DBUS_ENTER,
    },
    Probe::Uprobe {
        program: names::PROG_DBUS_RETURN,
    },
    Probe::Uprobe {
        program: names::PROG_DBUS_NAMES,
    },
];

const LIBVIRT: [Probe; 5] = [
    Probe::Uprobe {
        program: names::PROG_LIBVIRT_MSG_RX,
    },
    Probe::Uprobe {
        program: names::PROG_LIBVIRT_MSG_TX,
    },
    Probe::Uprobe {
        program: names::PROG_QMP_MSG,
    },
    Probe::Uprobe {
        program: names::PROG_JOB_ENTER,
    },
    Probe::Uprobe {
        program: names::PROG_JOB_RETURN,
    },
];

/// One probe and the eBPF program it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A BTF tracepoint: raw, typed arguments, no trace-event record
    /// filled per event, and nothing changed for other tools on it.
    BtfTracepoint {
        tracepoint: Tracepoint,
        program: &'static str,
    },
    /// System calls: program `enter` runs when one of `calls` is entered,
    /// `exit` when it returns, from the [`Probe::SyscallDispatch`]; after
    /// `--syscall-dispatch-for`, their twins `per_call` (enter, exit) on
    /// the calls' own classic tracepoints instead ([`syscall_pair`]).
    Syscalls {
        calls: &'static [&'static str],
        enter: &'static str,
        exit: &'static str,
        per_call: [&'static str; 2],
    },
    /// Programs `enter` and `exit` on `raw_syscalls:sys_enter` and
    /// `sys_exit` (BTF tracepoints), which run the [`Probe::Syscalls`]
    /// programs of a call by its number, and return at once for the others.
    SyscallDispatch {
        enter: &'static str,
        exit: &'static str,
    },
    /// cpu-clock sampling on every CPU.
    CpuClock { program: &'static str },
    /// Uprobes on library functions ([`FORK_FUNCTIONS`], the
    /// [`DBUS_LIBRARIES`]' functions), in the files found at run time: a
    /// `uprobe.multi` link per file.
    Uprobe { program: &'static str },
}

impl Probe {
    /// The eBPF programs this probe runs.
    #[must_use]
    pub fn programs(self) -> Vec<&'static str> {
        match self {
            Self::BtfTracepoint { program, .. }
            | Self::CpuClock { program }
            | Self::Uprobe { program } => vec![program],
            Self::Syscalls {
                enter,
                exit,
                per_call: [e, x],
                ..
            } => vec![enter, exit, e, x],
            Self::SyscallDispatch { enter, exit } => vec![enter, exit],
        }
    }

    /// The BTF tracepoints it attaches to (the per-call tracepoints of
    /// [`Probe::Syscalls`] come later: [`syscall_pair`]).
    #[must_use]
    pub fn tracepoints(self) -> Vec<Tracepoint> {
        match self {
            Self::BtfTracepoint { tracepoint, .. } => vec![tracepoint],
            Self::SyscallDispatch { .. } => SYSCALL_TRACEPOINTS.to_vec(),
            Self::Syscalls { .. } | Self::CpuClock { .. } | Self::Uprobe { .. } => Vec::new(),
        }
    }
}

/// Where the system-call dispatch runs: `raw_syscalls:sys_enter` and
/// `sys_exit`.
pub const SYSCALL_TRACEPOINTS: [Tracepoint; 2] = [
    Tracepoint::new("raw_syscalls", "sys_enter"),
    Tracepoint::new("raw_syscalls", "sys_exit"),
];

/// This architecture's number of system call `name` (one the registry
/// lists), which is its slot in the dispatch.
#[must_use]
pub fn syscall_nr(name: &str) -> Option<u32> {
    let nr = match name {
        "ioctl" => libc::SYS_ioctl,
        "clone" => libc::SYS_clone,
        "clone3" => libc::SYS_clone3,
        "fork" => libc::SYS_fork,
        "vfork" => libc::SYS_vfork,
        "mkdir" => libc::SYS_mkdir,
        "mkdirat" => libc::SYS_mkdirat,
        "rmdir" => libc::SYS_rmdir,
        "unlinkat" => libc::SYS_unlinkat,
        "write" => libc::SYS_write,
        "mmap" => libc::SYS_mmap,
        _ => return None,
    };
    u32::try_from(nr).ok()
}

/// Every eBPF program a recording may run, each once, in registry order.
#[must_use]
pub fn programs() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for p in Part::ALL.iter().flat_map(|p| p.probes()) {
        for name in p.programs() {
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// The fork syscalls' tracepoints.
pub const FORK_SYSCALLS: [&str; 4] = ["clone", "clone3", "fork", "vfork"];

/// The system call whose tracepoints key windows to VM creations
/// (`KVM_CREATE_VM`).
pub const VM_SYSCALLS: [&str; 1] = ["ioctl"];

/// The system call whose tracepoints tell the unwinder of a library mapped
/// executable (`--unwind dwarf`; optional: walks ask for it too).
pub const UNWIND_SYSCALLS: [&str; 1] = ["mmap"];

/// The system calls cgroup operations are made in (and timed by).
pub const CGROUP_SYSCALLS: [&str; 5] = ["mkdir", "mkdirat", "rmdir", "unlinkat", "write"];

/// Of [`CGROUP_SYSCALLS`], the one hooked only with `--time-cgroup-writes`:
/// moving a task by writing to `cgroup.procs` is a `write`, and its
/// tracepoints fire for every write on the system.
pub const CGROUP_WRITE_SYSCALL: &str = "write";

/// libc functions that fork, spawn or create threads: the fork tracer's
/// uprobe at their entry reads the caller's return address.
pub const FORK_FUNCTIONS: [&str; 5] = [
    "fork",
    "vfork",
    "posix_spawn",
    "posix_spawnp",
    "pthread_create",
];

/// One D-Bus client library: the files it comes in (name prefixes), its
/// blocking calls (probed at entry and return) and the constructors that
/// name the next call, each with its [`dbus_fn`] number.
pub struct DbusLibrary {
    pub name: &'static str,
    pub files: &'static [&'static str],
    pub blocking: &'static [(&'static str, u32)],
    pub constructors: &'static [(&'static str, u32)],
}

/// What the dbus tracer probes (see [`Part::probes`]).
pub const DBUS_LIBRARIES: [DbusLibrary; 3] = [
    DbusLibrary {
        name: "libdbus",
        files: &["libdbus-1.so"],
        blocking: &[
            (
                "dbus_connection_send_with_reply_and_block",
                dbus_fn::LIBDBUS_SEND_BLOCK,
            ),
            ("dbus_pending_call_block", dbus_fn::LIBDBUS_PENDING_BLOCK),
        ],
        constructors: &[
            (
                "dbus_message_new_method_call",
                dbus_fn::LIBDBUS_NEW_METHOD_CALL,
            ),
            (
                "dbus_connection_send_with_reply",
                dbus_fn::LIBDBUS_SEND_WITH_REPLY,
            ),
            (
                "dbus_message_set_destination",
                dbus_fn::LIBDBUS_SET_DESTINATION,
            ),
        ],
    },
    DbusLibrary {
        name: "gio",
        files: &["libgio-2.0.so"],
        blocking: &[
            ("g_dbus_connection_call_sync", dbus_fn::GIO_CALL_SYNC),
            (
                "g_dbus_connection_call_with_unix_fd_list_sync",
                dbus_fn::GIO_CALL_FD_SYNC,
            ),
            (
                "g_dbus_connection_send_message_with_reply_sync",
                dbus_fn::GIO_SEND_MESSAGE_SYNC,
            ),
            ("g_dbus_proxy_call_sync", dbus_fn::GIO_PROXY_CALL_SYNC),
        ],
        constructors: &[(
            "g_dbus_message_new_method_call",
            dbus_fn::GIO_NEW_METHOD_CALL,
        )],
    },
    DbusLibrary {
        name: "sd-bus",
        files: &["libsystemd.so", "libsystemd-shared-", "libelogind.so"],
        blocking: &[("sd_bus_call", dbus_fn::SDBUS_CALL)],
        constructors: &[(
            "sd_bus_message_new_method_call",
            dbus_fn::SDBUS_NEW_METHOD_CALL,
        )],
    },
];

/// The library and function name of a [`dbus_fn`] number.
#[must_use]
pub fn dbus_function(f: u32) -> (&'static str, &'static str) {
    DBUS_LIBRARIES
        .iter()
        .flat_map(|l| l.blocking.iter().map(move |(name, n)| (l.name, *name, *n)))
        .find(|&(_, _, n)| n == f)
        .map_or(("?", "?"), |(lib, name, _)| (lib, name))
}

/// `syscalls:sys_enter_NAME` and `syscalls:sys_exit_NAME`.
#[must_use]
pub fn syscall_pair(name: &str) -> [Tracepoint; 2] {
    [
        Tracepoint::new("syscalls", leak(format!("sys_enter_{name}"))),
        Tracepoint::new("syscalls", leak(format!("sys_exit_{name}"))),
    ]
}

/// Tracepoint names are `&'static str`; the few built at run time live for
/// the whole recording anyway.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tracer_shows_in_the_outputs() {
        for t in Tracer::ALL {
            assert!(
                t.graphs().next().is_some() || t.tables().next().is_some(),
                "the {} tracer has no graph and no table",
                t.name()
            );
            assert!(
                t.metrics().next().is_some(),
                "the {} tracer has no per-window metric for the gates",
                t.name()
            );
        }
    }

    #[test]
    fn tracer_lists_parse() {
        assert_eq!(
            Tracer::parse_list("offcpu, locks,offcpu"),
            Ok(vec![Tracer::OffCpu, Tracer::Locks])
        );
        assert_eq!(
            Tracer::parse_list("oncpu,cpu"),
            Err(
                "unknown tracer \"cpu\": choose from oncpu, offcpu, locks, fork, cgroup, dbus, \
                 libvirt, wakers"
                    .to_owned()
            )
        );
        assert!(Tracer::parse_list(" , ").is_err());
        // Wakers charge off-CPU blocks; they are not on by default.
        assert!(Tracer::parse_list("wakers,locks").is_err());
        assert_eq!(
            Tracer::parse_list("wakers,offcpu"),
            Ok(vec![Tracer::Wakers, Tracer::OffCpu])
        );
        assert!(!Tracer::DEFAULT.contains(&Tracer::Wakers));
        assert_eq!(Tracer::DEFAULT.len() + 1, Tracer::ALL.len());
    }

    /// Every system call the registry times has a slot in the dispatch.
    #[test]
    fn every_timed_syscall_has_a_dispatch_slot() {
        for probe in Part::ALL.iter().flat_map(|p| p.probes()) {
            if let Probe::Syscalls { calls, .. } = probe {
                for call in *calls {
                    let nr = syscall_nr(call).unwrap_or_else(|| panic!("{call} has no number"));
                    assert!(nr < profiler_common::record::SYSCALL_SLOTS, "{call}: {nr}");
                }
            }
        }
    }

    /// Every tracer has its part, once.
    #[test]
    fn every_tracer_is_a_part() {
        for t in Tracer::ALL {
            let n = Part::ALL.iter().filter(|p| **p == Part::Tracer(t)).count();
            assert_eq!(n, 1, "{t:?}");
            assert!(!Part::from(t).probes().is_empty(), "{t:?} has no probes");
        }
    }

    /// No program runs for two parts: a program's cost (`--bpf-stats`)
    /// and the maps it fills belong to one of them.
    #[test]
    fn a_program_belongs_to_one_part() {
        let all: Vec<&str> = Part::ALL
            .iter()
            .flat_map(|p| p.probes())
            .flat_map(|p| p.programs())
            .collect();
        assert_eq!(all.len(), programs().len(), "{all:?}");
    }

    /// The registry names exactly the programs of the embedded eBPF object
    /// (but `hvprof check`'s own `check_*`): a program it left out would be
    /// neither attached nor in `--bpf-stats`.
    #[test]
    fn the_registry_names_every_program_of_the_ebpf_object() {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};
        let obj = object::File::parse(crate::ebpf::OBJECT).expect("parse the eBPF object");
        let mut in_object: Vec<&str> = obj
            .symbols()
            .filter(|s| s.is_global() && s.kind() == SymbolKind::Text)
            .filter(|s| {
                // Programs have sections of their own (`tracepoint`,
                // `uprobe.multi`, …); functions left out of line are in
                // `.text`.
                s.section_index()
                    .and_then(|i| obj.section_by_index(i).ok())
                    .and_then(|sec| sec.name().ok())
                    .is_some_and(|name| name != ".text")
            })
            .filter_map(|s| s.name().ok())
            .filter(|name| !name.starts_with("check_"))
            .collect();
        in_object.sort_unstable();
        let mut registry = programs();
        registry.sort_unstable();
        assert_eq!(registry, in_object);
    }

    /// The system calls are timed through the dispatch on
    /// `raw_syscalls`; `syscall_pair` names each call's own events (as perf
    /// counts them).
    #[test]
    fn syscalls_go_through_the_dispatch() {
        let fork = Part::Tracer(Tracer::Fork).probes();
        assert!(fork.iter().all(|p| p.tracepoints().is_empty()));
        assert!(fork.iter().any(|p| matches!(
            p,
            Probe::Syscalls { calls, .. } if *calls == ["clone", "clone3", "fork", "vfork"]
        )));
        let dispatch: Vec<String> = Part::Syscalls
            .probes()
            .iter()
            .flat_map(|p| p.tracepoints())
            .map(|t| t.to_string())
            .collect();
        assert_eq!(
            dispatch,
            ["raw_syscalls:sys_enter", "raw_syscalls:sys_exit"]
        );
        assert_eq!(
            syscall_pair("clone").map(|t| t.to_string()),
            ["syscalls:sys_enter_clone", "syscalls:sys_exit_clone"]
        );
    }
}
