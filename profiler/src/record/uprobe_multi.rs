//! `uprobe.multi` links with reference counters: what USDT probes with a
//! semaphore need, and aya's `UProbe::attach` does not take.
//!
//! A site guarded by a semaphore runs only while the semaphore is non-zero.
//! Given a reference-counter offset, the kernel increments the `u16` at
//! that file offset in every process that maps the file, and in those that
//! map it later, for as long as the link lives, and decrements it when the
//! link is closed. Without it the uprobe is installed but the site never
//! runs.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// `BPF_LINK_CREATE` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_TRACE_UPROBE_MULTI` (`enum bpf_attach_type`), Linux 6.6+.
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
/// `BPF_F_UPROBE_MULTI_RETURN`: a return probe.
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;

/// The `link_create` member of `union bpf_attr` as `uprobe_multi` fills it.
/// Shorter than the union: the kernel reads the rest as zeros.
#[repr(C)]
#[derive(Default)]
struct LinkCreateUprobeMulti {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    pad: u32,
}

/// One uprobe of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// File offset of the probed instruction.
    pub offset: u64,
    /// File offset of the `u16` semaphore the kernel counts the probe's
    /// users in; 0 for none.
    pub ref_ctr_offset: u64,
    /// What `bpf_get_attach_cookie` returns in the program.
    pub cookie: u64,
}

/// Attaches the loaded `uprobe.multi` program `prog` at `targets` in the
/// file `path`, for process `pid` only or (`None`) for every process, at
/// entry or (`ret`) at return. Closing the returned link detaches it.
pub fn attach(
    prog: BorrowedFd<'_>,
    path: &Path,
    targets: &[Target],
    pid: Option<u32>,
    ret: bool,
) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if targets.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a uprobe.multi link needs at least one probe",
        ));
    }
    let cnt =
        u32::try_from(targets.len()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let offsets: Vec<u64> = targets.iter().map(|t| t.offset).collect();
    let ref_ctr_offsets: Vec<u64> = targets.iter().map(|t| t.ref_ctr_offset).collect();
    let cookies: Vec<u64> = targets.iter().map(|t| t.cookie).collect();
    let attr = LinkCreateUprobeMulti {
        prog_fd: prog.as_raw_fd().cast_unsigned(),
        attach_type: BPF_TRACE_UPROBE_MULTI,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        ref_ctr_offsets: if ref_ctr_offsets.iter().any(|&o| o != 0) {
            ref_ctr_offsets.as_ptr() as u64
        } else {
            0
        },
        cookies: cookies.as_ptr() as u64,
        cnt,
        multi_flags: if ret { BPF_F_UPROBE_MULTI_RETURN } else { 0 },
        pid: pid.unwrap_or(0),
        ..LinkCreateUprobeMulti::default()
    };
    // SAFETY: `attr` is a valid, initialised `bpf_attr` prefix of the size
    // passed, and the arrays and path it points to outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &raw const attr,
            size_of::<LinkCreateUprobeMulti>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // SAFETY: the kernel returned a new file descriptor that nothing else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of `bpf_attr.link_create.uprobe_multi` (Linux 6.6+).
    #[test]
    fn attr_layout() {
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, attach_type), 8);
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, path), 16);
        assert_eq!(
            std::mem::offset_of!(LinkCreateUprobeMulti, ref_ctr_offsets),
            32
        );
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, cookies), 40);
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, cnt), 48);
        assert_eq!(std::mem::offset_of!(LinkCreateUprobeMulti, pid), 56);
        assert_eq!(size_of::<LinkCreateUprobeMulti>(), 64);
    }

    #[test]
    fn no_targets_is_an_error() {
        // SAFETY: fd 0 is only borrowed for the call, which refuses before
        // using it.
        let fd = unsafe { BorrowedFd::borrow_raw(0) };
        let e = attach(fd, Path::new("/bin/true"), &[], None, false).expect_err("empty");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
