//! The cgroup tracer's keys and values.

use super::COMM_LEN;

/// Cgroup operations, as [`CgroupKey::kind`] numbers them.
pub mod cgroup_op {
    pub const MKDIR: u32 = 1;
    pub const RMDIR: u32 = 2;
    pub const ATTACH: u32 = 3;
}

/// Bytes of a cgroup path kept (longer paths are cut).
pub const CGROUP_PATH_LEN: usize = 112;

/// Key of the cgroup-operation aggregation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    pub window: u32,
    /// [`cgroup_op`].
    pub kind: u32,
    pub tgid: u32,
    /// The hierarchy id (0: cgroup v2), as in `/proc/cgroups`.
    pub root: u32,
    /// The (destination) cgroup's path in its hierarchy, NUL-terminated.
    pub path: [u8; CGROUP_PATH_LEN],
    pub comm: [u8; COMM_LEN],
}

/// Operations of one [`CgroupKey`]; latency is that of the system call
/// the task made them in (mkdir, rmdir, write to `cgroup.procs`, …).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupValue {
    pub count: u64,
    /// Operations inside a timed system call.
    pub timed: u64,
    pub total_ns: u64,
    pub max_ns: u64,
}

/// An operation waiting for its system call to return.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupPending {
    pub key: CgroupKey,
    pub start_ns: u64,
    /// Operations seen in this system call so far (0: none yet).
    pub ops: u32,
    pub pad: u32,
}
