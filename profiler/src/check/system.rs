//! The rows read from the system: privileges, limits, tracefs, kernel
//! BTF, the libraries and tables the tracers use, KVM.

use std::{fs, os::fd::AsRawFd as _};

use aya::{Btf, BtfError};

use super::{FIX_PRIVILEGES, NeededBy, Row};
use crate::{
    sys::{self, Memlock, Privileges},
    tracefs::{Tracefs, TracefsError},
    tracer::{Part, Tracer},
};

/// Root, or the capabilities loading and attaching the programs needs.
pub(super) fn privileges_row(privileges: &std::io::Result<Privileges>) -> Row {
    match privileges {
        Ok(p) if p.euid == 0 && p.sufficient() => {
            Row::ok("privileges", NeededBy::All, true, "root")
        }
        Ok(p) if p.sufficient() => Row::ok(
            "privileges",
            NeededBy::All,
            true,
            format!(
                "uid {} with {}",
                p.euid,
                if p.cap_sys_admin {
                    "CAP_SYS_ADMIN"
                } else {
                    "CAP_BPF + CAP_PERFMON"
                }
            ),
        ),
        Ok(p) => Row::missing(
            "privileges",
            NeededBy::All,
            true,
            format!(
                "uid {} lacks {}: loading tracing programs and sampling all CPUs needs root or CAP_BPF + CAP_PERFMON",
                p.euid,
                [(!p.cap_bpf, "CAP_BPF"), (!p.cap_perfmon, "CAP_PERFMON")]
                    .iter()
                    .filter(|(m, _)| *m)
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
            FIX_PRIVILEGES,
        ),
        Err(e) => Row::missing(
            "privileges",
            NeededBy::All,
            true,
            format!("cannot read /proc/self/status: {e}"),
            "mount /proc",
        ),
    }
}

/// Where tracefs is (mounted by `locate_or_mount` if it was not).
pub(super) fn tracefs_row(tracefs: &Result<(Tracefs, bool), TracefsError>) -> Row {
    match tracefs {
        Ok((t, false)) => Row::ok(
            "tracefs",
            NeededBy::All,
            true,
            t.root().display().to_string(),
        ),
        Ok((t, true)) => Row::ok(
            "tracefs",
            NeededBy::All,
            true,
            format!(
                "{} (was not mounted; hvprof mounted it)",
                t.root().display()
            ),
        ),
        Err(e) => {
            let text = e.to_string();
            let (why, fix) = text.split_once("; ").unwrap_or((&text, "run as root"));
            Row::missing("tracefs", NeededBy::All, true, why, fix)
        }
    }
}

/// Kernel BTF, which every recording program is loaded with (they are on
/// BTF tracepoints), and fentry/fexit.
pub(super) fn btf_row(btf: &Result<Btf, BtfError>) -> Row {
    match btf {
        Ok(_) => Row::ok("BTF", NeededBy::All, true, "/sys/kernel/btf/vmlinux"),
        Err(e) => Row::missing(
            "BTF",
            NeededBy::All,
            true,
            format!("cannot read kernel BTF from /sys/kernel/btf/vmlinux: {e}"),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        ),
    }
}

/// Whether RLIMIT_MEMLOCK limits the maps (kernels before 5.11).
pub(super) fn memlock_row() -> Row {
    let release = sys::kernel_release();
    let memcg = sys::bpf_memcg_accounting(&release);
    let show =
        |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |v| format!("{} KiB", v / 1024));
    match Memlock::current() {
        Ok(Memlock { soft: None, .. }) => {
            Row::ok("memlock", NeededBy::All, true, "RLIMIT_MEMLOCK unlimited")
        }
        Ok(m) if memcg => Row::ok(
            "memlock",
            NeededBy::All,
            true,
            format!(
                "RLIMIT_MEMLOCK {}, not used: kernel {release} charges BPF memory to the memory cgroup",
                show(m.soft)
            ),
        ),
        Ok(Memlock { hard: None, soft }) => Row::ok(
            "memlock",
            NeededBy::All,
            true,
            format!("RLIMIT_MEMLOCK {}, raised to unlimited at load", show(soft)),
        ),
        Ok(m) => Row::missing(
            "memlock",
            NeededBy::All,
            true,
            format!(
                "RLIMIT_MEMLOCK is {} (hard {}) and kernel {release} charges BPF maps to it",
                show(m.soft),
                show(m.hard)
            ),
            "raise it: `ulimit -l unlimited` as root, or LimitMEMLOCK=infinity in the unit",
        ),
        Err(e) => Row::missing(
            "memlock",
            NeededBy::All,
            true,
            format!("getrlimit(RLIMIT_MEMLOCK) failed: {e}"),
            "run hvprof on Linux",
        ),
    }
}

/// The off-CPU tracer takes each block's wait for a CPU from the kernel's
/// own run-queue accounting, `task_struct.sched_info.run_delay`.
pub(super) fn run_queue_row() -> Row {
    const CAP: &str = "run-queue accounting";
    let off = crate::kbtf::Kbtf::from_sys_fs()
        .map_err(|e| e.to_string())
        .and_then(|b| {
            b.offset_of("task_struct", &["sched_info", "run_delay"])
                .map_err(|e| e.to_string())
        });
    match off {
        Ok(off) => Row::ok(
            CAP,
            NeededBy::from(Tracer::OffCpu),
            false,
            format!("task_struct.sched_info.run_delay at offset {off}"),
        ),
        Err(e) => Row::missing(
            CAP,
            NeededBy::from(Tracer::OffCpu),
            false,
            format!(
                "no task_struct.sched_info.run_delay in kernel BTF ({e}): off-CPU blocks get \
                 no run-queue wait"
            ),
            "use a kernel with CONFIG_SCHED_INFO (selected by CONFIG_SCHEDSTATS or \
             CONFIG_TASK_DELAY_ACCT)",
        ),
    }
}

/// What the lock tracer needs to say who held a mutex or rwsem: the locks'
/// `owner` words, the task's `on_cpu`, and the kfuncs that give it a
/// holder's kernel stack.
pub(super) fn lock_holders_row() -> Row {
    const CAP: &str = "lock holders";
    let needed = NeededBy::from(Tracer::Locks);
    let btf = match crate::kbtf::Kbtf::from_sys_fs() {
        Ok(b) => b,
        Err(e) => {
            return Row::missing(
                CAP,
                needed,
                false,
                format!("kernel BTF unreadable ({e}): no lock holder is recorded"),
                "use a kernel with CONFIG_DEBUG_INFO_BTF",
            );
        }
    };
    let fields = [
        ("mutex", "owner"),
        ("rw_semaphore", "owner"),
        ("task_struct", "tgid"),
        ("task_struct", "on_cpu"),
    ];
    let missing: Vec<String> = fields
        .iter()
        .filter_map(|(s, f)| btf.offset_of(s, &[f]).err().map(|e| e.to_string()))
        .collect();
    if !missing.is_empty() {
        return Row::missing(
            CAP,
            needed,
            false,
            format!(
                "kernel BTF lacks {}: no lock holder is recorded",
                missing.join("; ")
            ),
            "use a kernel whose BTF describes mutex, rw_semaphore and task_struct (any BTF kernel)",
        );
    }
    let kfuncs: Vec<&str> = crate::ebpf::kfuncs::KFUNCS
        .iter()
        .copied()
        .filter(|k| btf.func_id(k).is_none())
        .collect();
    if !kfuncs.is_empty() {
        return Row::missing(
            CAP,
            needed,
            false,
            format!(
                "the kernel has no kfunc {}: holders are named, their kernel stacks not taken",
                kfuncs.join(", ")
            ),
            "use Linux 6.2 or later (bpf_task_from_pid)",
        );
    }
    Row::ok(
        CAP,
        needed,
        false,
        "mutex and rwsem owners; holder kernel stacks through bpf_task_from_pid",
    )
}

/// The D-Bus client libraries the dbus tracer would probe.
pub(super) fn dbus_libraries_row() -> Row {
    let libs = crate::record::dbus_library_paths(&[]);
    if libs.is_empty() {
        return Row::missing(
            "D-Bus client libraries",
            NeededBy::from(Tracer::Dbus),
            false,
            "no libdbus-1, libgio-2.0 or libsystemd in the standard library directories (a target's own copy is found from its maps at record time)",
            "install the library your D-Bus clients use (libdbus-1-3, libglib2.0-0, libsystemd0)",
        );
    }
    let list: Vec<String> = libs
        .iter()
        .map(|(lib, p)| format!("{lib} {}", p.display()))
        .collect();
    Row::ok(
        "D-Bus client libraries",
        NeededBy::from(Tracer::Dbus),
        false,
        list.join(", "),
    )
}

/// `--attribute vm`'s uprobes: the libvirt libraries that define libvirt's
/// RPC dispatch.
pub(super) fn attribution_row() -> Row {
    use profiler_common::record::DISPATCH_FUNCTION;
    const NAME: &str = "libvirt RPC dispatch";
    let files: Vec<String> = crate::libvirt::probes::files(&[])
        .into_iter()
        .filter(|f| !crate::record::defined(f, &[DISPATCH_FUNCTION]).is_empty())
        .map(|f| f.display().to_string())
        .collect();
    if files.is_empty() {
        return Row::missing(
            NAME,
            NeededBy::from(Part::Attribution),
            false,
            format!(
                "no libvirt.so.0 defining {DISPATCH_FUNCTION}: --attribute vm attributes QEMU processes, not libvirtd's calls"
            ),
            "install libvirt (Debian: libvirt0); a target's own copy is found from its maps at record time",
        );
    }
    Row::ok(
        NAME,
        NeededBy::from(Part::Attribution),
        false,
        format!("{DISPATCH_FUNCTION} in {}", files.join(", ")),
    )
}

/// libvirt's USDT probes the libvirt tracer would attach: which files have
/// which, and whether each has its semaphore.
pub(super) fn libvirt_probes_row() -> Row {
    use crate::libvirt::probes;
    const NAME: &str = "libvirt USDT probes";
    let files = probes::files(&[]);
    if files.is_empty() {
        return Row::missing(
            NAME,
            NeededBy::from(Tracer::Libvirt),
            false,
            "no libvirt.so.0 or libvirt_driver_qemu.so in the standard library directories (a target's own copy is found from its maps at record time)",
            "install libvirt (Debian: libvirt0, libvirt-daemon-driver-qemu), built with SystemTap SDT probes as Debian's is",
        );
    }
    let mut found = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for f in &files {
        match probes::sites(f) {
            Ok(sites) => {
                let mut here: Vec<&str> = sites.iter().map(|s| s.usage.probe).collect();
                here.dedup();
                names.extend(here.iter().copied());
                let unguarded = sites
                    .iter()
                    .filter(|s| s.probe.semaphore_offset.is_none())
                    .count();
                found.push(format!(
                    "{}: {}{}",
                    f.display(),
                    if here.is_empty() {
                        "none".to_owned()
                    } else {
                        here.join(" ")
                    },
                    if unguarded > 0 {
                        format!(" ({unguarded} without a semaphore)")
                    } else {
                        String::new()
                    }
                ));
            }
            Err(e) => found.push(format!("{}: unreadable ({e})", f.display())),
        }
    }
    let missing: Vec<String> = probes::USES
        .iter()
        .filter(|u| !names.contains(u.probe))
        .map(|u| format!("{} ({})", u.probe, u.gives))
        .collect();
    if names.is_empty() {
        return Row::missing(
            NAME,
            NeededBy::from(Tracer::Libvirt),
            false,
            format!("none of the probes it uses: {}", found.join("; ")),
            "use a libvirt built with SystemTap SDT probes (--with-dtrace), as Debian's is",
        );
    }
    let mut detail = found.join("; ");
    if !missing.is_empty() {
        detail = format!("{detail}; missing: {}", missing.join(", "));
    }
    Row::ok(NAME, NeededBy::from(Tracer::Libvirt), false, detail)
}

/// Builds the unwind tables of this process's own files, cold (no cache):
/// what `record --unwind dwarf` does for each file its targets map.
pub(super) fn unwind_row() -> Row {
    const NAME: &str = "unwind tables (.eh_frame)";
    match crate::unwind::procs::own_tables() {
        Ok(t) if t.rows > 0 => Row::ok(
            NAME,
            NeededBy::Part(Part::Unwind),
            false,
            format!(
                "built for {} files of hvprof's own process ({}) in {} ms, {} rows, {} KiB of map",
                t.files,
                t.names.join(", "),
                t.time.as_millis(),
                t.rows,
                crate::unwind::procs::map_kib(t.rows, t.chunks)
            ),
        ),
        Ok(_) => Row::missing(
            NAME,
            NeededBy::Part(Part::Unwind),
            false,
            "no file of this process has unwind tables (.eh_frame)",
            "record with --unwind fp (frame pointers)",
        ),
        Err(e) => Row::missing(
            NAME,
            NeededBy::Part(Part::Unwind),
            false,
            format!("{e}; user stacks would come from frame pointers only"),
            "mount /proc; or record with --unwind fp",
        ),
    }
}

/// Whether hvprof can learn where its libc's fork functions keep their
/// callers (a child it traces with ptrace makes each call once).
pub(super) fn fork_paths_row() -> Row {
    const NAME: &str = "fork-caller paths";
    match crate::forkpath::calibrate() {
        Ok(c) => Row::ok(
            NAME,
            NeededBy::from(Tracer::Fork),
            false,
            format!(
                "{} paths learned for {} (fork, vfork, posix_spawn[p], pthread_create)",
                c.paths.len(),
                c.libc.display()
            ),
        ),
        Err(e) => Row::missing(
            NAME,
            NeededBy::from(Tracer::Fork),
            false,
            format!("{e}; fork callers would come from uprobes on libc, which make forks dearer"),
            "allow a process to ptrace its own child (kernel.yama.ptrace_scope below 3, no \
             seccomp filter on ptrace)",
        ),
    }
}

/// `KVM_GET_API_VERSION`, `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// The only KVM API version there has ever been.
const KVM_API_VERSION: libc::c_int = 12;

pub(super) fn kvm_row() -> Row {
    const CAP: &str = "/dev/kvm";
    const WITHOUT: &str = "without KVM, count VMs by exec with `--vm-event exec:qemu-system-*`";
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(f) => {
            // SAFETY: f is an open fd; KVM_GET_API_VERSION takes no argument.
            let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
            if v == KVM_API_VERSION {
                Row::ok(
                    CAP,
                    NeededBy::Part(Part::VmWindows),
                    false,
                    format!("KVM API version {v}"),
                )
            } else {
                Row::missing(
                    CAP,
                    NeededBy::Part(Part::VmWindows),
                    false,
                    format!("KVM_GET_API_VERSION returned {v}, expected {KVM_API_VERSION}"),
                    WITHOUT,
                )
            }
        }
        Err(e) => {
            let fix = match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    format!("run as root or join the kvm group; {WITHOUT}")
                }
                _ => format!(
                    "load kvm_intel or kvm_amd (or enable nested virtualization); {WITHOUT}"
                ),
            };
            Row::missing(
                CAP,
                NeededBy::Part(Part::VmWindows),
                false,
                format!("cannot open /dev/kvm: {e}, so KVM_CREATE_VM cannot be seen here"),
                fix,
            )
        }
    }
}
