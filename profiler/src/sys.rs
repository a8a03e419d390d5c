//! Facts about the running system that decide what hvprof can do:
//! privileges, resource limits, kernel release, CPUs.

use std::{collections::HashSet, fs, io, os::unix::fs::MetadataExt as _};

use crate::procmaps::maps_lines;

/// Linux capability numbers (include/uapi/linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What the current process may do with BPF and perf events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Privileges {
    pub euid: u32,
    pub cap_bpf: bool,
    pub cap_perfmon: bool,
    pub cap_sys_admin: bool,
}

impl Privileges {
    /// Reads the effective uid and capability set of this process.
    pub fn current() -> io::Result<Self> {
        let status = fs::read_to_string("/proc/self/status")?;
        Ok(Self::from_proc_status(&status, geteuid()))
    }

    /// Parses `CapEff:` from the text of `/proc/<pid>/status`.
    #[must_use]
    pub fn from_proc_status(status: &str, euid: u32) -> Self {
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
        Self {
            euid,
            cap_bpf: has(CAP_BPF),
            cap_perfmon: has(CAP_PERFMON),
            cap_sys_admin: has(CAP_SYS_ADMIN),
        }
    }

    /// Loading tracing programs and opening system-wide perf events needs
    /// CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN, which implies both).
    #[must_use]
    pub fn sufficient(&self) -> bool {
        self.cap_sys_admin || (self.cap_bpf && self.cap_perfmon)
    }
}

fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The RLIMIT_MEMLOCK of this process, `None` meaning unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memlock {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

impl Memlock {
    pub fn current() -> io::Result<Self> {
        let mut rlim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: rlim is a valid, writable rlimit.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut rlim) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let limit = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
        Ok(Self {
            soft: limit(rlim.rlim_cur),
            hard: limit(rlim.rlim_max),
        })
    }
}

/// Raises RLIMIT_MEMLOCK to unlimited. Kernels before 5.11 charge BPF maps
/// against it; later ones charge the memory cgroup, where this is harmless.
pub fn raise_memlock() -> io::Result<()> {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: rlim is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel release (`uname -r`).
#[must_use]
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
}

/// `(major, minor)` of a kernel release such as `6.18.44-fc-v669`.
#[must_use]
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether this kernel charges BPF memory to the memory cgroup (5.11+), so
/// that RLIMIT_MEMLOCK no longer limits maps.
#[must_use]
pub fn bpf_memcg_accounting(release: &str) -> bool {
    parse_kernel_version(release).is_some_and(|v| v >= (5, 11))
}

/// The online CPUs, from `/sys/devices/system/cpu/online`.
pub fn online_cpus() -> io::Result<Vec<u32>> {
    let text = fs::read_to_string("/sys/devices/system/cpu/online")?;
    parse_cpu_list(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse CPU list {text:?}"),
        )
    })
}

/// Parses the kernel's CPU list format (`0-3,8,10-11`).
#[must_use]
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if a > b {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// The OS thread id of the calling thread.
#[must_use]
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    u32::try_from(tid).unwrap_or(0)
}

/// Gives the heap's free pages back to the kernel (glibc keeps them
/// otherwise): a flush frees what symbolizing a batch of files took.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: no arguments but the pad to keep; the allocator locks itself.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Lets go of the pages of the ELF files the symbolizer has mapped whole
/// (read-only, from offset 0, not code this process runs): a
/// symbol search reads tens of MB of a large library's symbol table, and
/// those pages stayed in hvprof's RSS as long as the file was open. They
/// stay in the page cache, reclaimable, and a later lookup faults in the
/// few it needs.
pub fn release_mapped_files() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let mappings: Vec<_> = maps_lines(&maps).collect();
    let code: HashSet<u64> = mappings
        .iter()
        .filter(|m| m.perms.contains('x'))
        .map(|m| m.inode)
        .collect();
    let page = page_size() as u64;
    for m in &mappings {
        let read_only = m.perms == "r--s" || m.perms == "r--p";
        if !read_only
            || m.offset != 0
            || m.inode == 0
            || !m.path.starts_with('/')
            || code.contains(&m.inode)
        {
            continue;
        }
        // Mapped whole: the symbolizer's, not a loader's first segment.
        let whole = std::fs::metadata(m.path)
            .is_ok_and(|f| f.ino() == m.inode && f.len().next_multiple_of(page) == m.end - m.start);
        if whole {
            // SAFETY: a read-only mapping of a file: dropping its pages
            // loses nothing (they are read from the file again), and its
            // owner may keep using it.
            unsafe {
                libc::madvise(
                    m.start as *mut libc::c_void,
                    usize::try_from(m.end - m.start).unwrap_or(0),
                    libc::MADV_DONTNEED,
                );
            }
        }
    }
}

/// CPU time (user and system, ns) of all of this process's threads so far.
#[must_use]
pub fn self_cpu_ns() -> u64 {
    // SAFETY: a zeroed rusage for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) } != 0 {
        return 0;
    }
    [ru.ru_utime, ru.ru_stime]
        .iter()
        .map(|tv| {
            u64::try_from(tv.tv_sec).unwrap_or(0) * 1_000_000_000
                + u64::try_from(tv.tv_usec).unwrap_or(0) * 1_000
        })
        .sum()
}

/// The kernel-internal ENOTSUPP, which BPF syscalls leak to userspace.
const ENOTSUPP: i32 = 524;

/// A human explanation of an errno met while loading or attaching BPF.
#[must_use]
pub fn explain_errno(errno: i32) -> &'static str {
    match errno {
        libc::EPERM | libc::EACCES => {
            "permission denied: loading tracing programs needs root or CAP_BPF + CAP_PERFMON"
        }
        libc::ENOENT => "not present in this kernel",
        libc::EINVAL => "the kernel rejected the request as invalid (feature missing or disabled)",
        libc::E2BIG => "the kernel does not know a newer attribute hvprof passed (kernel too old)",
        ENOTSUPP | libc::EOPNOTSUPP => "not supported by this kernel or hardware",
        libc::ENOMEM => "out of memory (or RLIMIT_MEMLOCK too low on kernels before 5.11)",
        libc::EBUSY => "busy: another user holds it",
        libc::ENODEV => "no such device",
        _ => "unexpected error from the kernel",
    }
}

/// The size of a memory page.
#[must_use]
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_is_decoded() {
        let status = "Name:\tx\nCapEff:\t000000c000000000\n";
        let p = Privileges::from_proc_status(status, 1000);
        assert!(p.cap_bpf && p.cap_perfmon && !p.cap_sys_admin);
        assert!(p.sufficient());
        let p = Privileges::from_proc_status("CapEff:\t0000004000000000\n", 1000);
        assert!(p.cap_perfmon && !p.cap_bpf && !p.sufficient());
        let p = Privileges::from_proc_status("CapEff:\t000001ffffffffff\n", 0);
        assert!(p.sufficient());
        assert!(!Privileges::from_proc_status("", 1000).sufficient());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-4,7"), Some(vec![0, 2, 3, 4, 7]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.10.0-28-amd64"), Some((5, 10)));
        assert!(bpf_memcg_accounting("5.11.0"));
        assert!(!bpf_memcg_accounting("5.10.200"));
        assert!(!bpf_memcg_accounting("garbage"));
    }
}
