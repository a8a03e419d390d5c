//! Which of libvirt's USDT probes hvprof uses, and where they are: in
//! `libvirt.so.0` (libvirtd's RPC server) and in the QEMU driver that
//! libvirtd `dlopen`s (its monitor). A uprobe is per file, so the driver
//! is probed before libvirtd loads it.

use std::path::{Path, PathBuf};

use profiler_common::record::{names, qmp_kind};

use crate::usdt::{self, Probe};

/// libvirt's SDT provider name.
pub const PROVIDER: &str = "libvirt";

/// A probe hvprof attaches: its name, the program it runs and the high half
/// of its cookie (what the program is told the site is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Use {
    pub probe: &'static str,
    pub program: &'static str,
    pub kind: u32,
    /// What the tables lack without it.
    pub gives: &'static str,
}

/// Every probe hvprof uses, by the file that has it.
pub const USES: [Use; 5] = [
    Use {
        probe: "rpc_server_client_msg_rx",
        program: names::PROG_LIBVIRT_MSG_RX,
        kind: 0,
        gives: "API calls",
    },
    Use {
        probe: "rpc_server_client_msg_tx_queue",
        program: names::PROG_LIBVIRT_MSG_TX,
        kind: 0,
        gives: "API calls",
    },
    Use {
        probe: "qemu_monitor_send_msg",
        program: names::PROG_QMP_MSG,
        kind: qmp_kind::SEND,
        gives: "QMP commands",
    },
    Use {
        probe: "qemu_monitor_recv_reply",
        program: names::PROG_QMP_MSG,
        kind: qmp_kind::REPLY,
        gives: "QMP commands",
    },
    Use {
        probe: "qemu_monitor_recv_event",
        program: names::PROG_QMP_MSG,
        kind: qmp_kind::EVENT,
        gives: "QMP events",
    },
];

/// The file names that hold the probes: libvirt's library and its QEMU
/// driver.
const FILES: [&str; 2] = ["libvirt.so.0", "libvirt_driver_qemu.so"];

/// Where Debian (and most distributions) install them.
const DIRS: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver",
    "/usr/lib64",
    "/usr/lib64/libvirt/connection-driver",
];

/// The files to probe: libvirt's library and QEMU driver as the targets
/// map them (`/proc/PID/root/…`, so a containerised libvirtd's own), and
/// those in the standard directories; canonical and distinct.
#[must_use]
pub fn files(pids: &[u32]) -> Vec<PathBuf> {
    let wanted = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| FILES.iter().any(|f| n.starts_with(f)))
    };
    let mut candidates: Vec<PathBuf> = pids
        .iter()
        .filter_map(|&pid| crate::procmaps::Snapshot::take(pid).map(|s| (pid, s)))
        .flat_map(|(pid, s)| {
            s.mappings
                .into_iter()
                .map(move |m| PathBuf::from(format!("/proc/{pid}/root{}", m.path)))
        })
        .filter(|p| wanted(p))
        .collect();
    candidates.extend(
        DIRS.iter()
            .flat_map(|d| FILES.iter().map(move |f| Path::new(d).join(f))),
    );
    let mut out: Vec<PathBuf> = candidates
        .into_iter()
        .filter_map(|p| p.canonicalize().ok())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A probe site of a file, with what hvprof does with it.
#[derive(Debug)]
pub struct Site {
    pub probe: Probe,
    pub usage: Use,
}

/// The sites of `path` hvprof uses (several sites may share a name).
pub fn sites(path: &Path) -> Result<Vec<Site>, usdt::UsdtError> {
    Ok(usdt::probes(path)?
        .into_iter()
        .filter(|p| p.provider == PROVIDER)
        .filter_map(|probe| {
            let usage = *USES.iter().find(|u| u.probe == probe.name)?;
            Some(Site { probe, usage })
        })
        .collect())
}
