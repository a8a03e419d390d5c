//! libvirt's API calls and QEMU monitor commands, named for the tables.
//!
//! libvirtd's `rpc_server_client_msg_*` probes give an RPC program and
//! procedure number; [`procedure_name`] names them from libvirt's own
//! protocol definitions ([`PROGRAMS`], generated from Debian's libvirt
//! source by `./x gen-libvirt-procs`; [`SOURCE_PACKAGE`] says which, for
//! a table's header). Its `qemu_monitor_*` probes give the JSON text of
//! QMP messages, which [`qmp_command`], [`qmp_reply_error`] and
//! [`qmp_event`] read.

pub mod probes;
mod procs;
mod qmp;

use std::borrow::Cow;

pub use procs::{PROGRAMS, SOURCE_PACKAGE};
pub use qmp::{qmp_command, qmp_event, qmp_reply_error};

/// An RPC program libvirtd serves: the public API (`remote`), QEMU's and
/// LXC's private APIs, the admin API and the keepalive pings.
#[derive(Debug)]
pub struct Program {
    /// The number in each message's header (`REMOTE_PROGRAM`, …).
    pub number: u32,
    /// The program's word, lower case: `remote`, `qemu`, `lxc`, `admin`,
    /// `keepalive`.
    pub name: &'static str,
    /// The protocol file of libvirt's source its procedures come from.
    pub file: &'static str,
    /// (number, name), sorted by number; names as libvirt's generator
    /// spells them (`DomainCreateXML` for `virDomainCreateXML`).
    pub procedures: &'static [(u32, &'static str)],
}

impl Program {
    /// The name of procedure `proc_`, if this program has one.
    #[must_use]
    pub fn procedure(&self, proc_: u32) -> Option<&'static str> {
        self.procedures
            .binary_search_by_key(&proc_, |&(n, _)| n)
            .ok()
            .map(|i| self.procedures[i].1)
    }
}

/// The public API's program, whose names stand alone in the tables.
const REMOTE: &str = "remote";

/// The public API's procedures that can start a VM (a QEMU process): the
/// creations, restores, incoming migrations and snapshot reverts. Their
/// work is attributed to the VM they start (`record --attribute vm`).
#[must_use]
pub fn vm_starting_procedures() -> Vec<u32> {
    const STARTS: [&str; 4] = [
        "DomainCreate",
        "DomainRestore",
        "DomainMigratePrepare",
        "DomainSnapshotRevert",
    ];
    program(profiler_common::record::REMOTE_PROGRAM)
        .map(|p| {
            p.procedures
                .iter()
                .filter(|(_, name)| STARTS.iter().any(|s| name.starts_with(s)))
                .map(|&(n, _)| n)
                .collect()
        })
        .unwrap_or_default()
}

/// The program numbered `prog`, if libvirt defines one.
#[must_use]
pub fn program(prog: u32) -> Option<&'static Program> {
    PROGRAMS.iter().find(|p| p.number == prog)
}

/// Where the names come from, for a table's header: `procedure names from
/// Debian's libvirt 11.3.0-2~bpo12+1 source (remote_protocol.x, …)`.
#[must_use]
pub fn names_source() -> String {
    let files: Vec<&str> = PROGRAMS
        .iter()
        .map(|p| p.file.rsplit('/').next().unwrap_or(p.file))
        .collect();
    format!(
        "procedure names from Debian's {SOURCE_PACKAGE} source ({})",
        files.join(", ")
    )
}

/// A procedure's name for a table: `DomainCreateXML` for the public API,
/// the program's word before it for the others (`qemu
/// DomainMonitorCommand`, `admin ConnectOpen`, `keepalive Ping`), and the
/// numbers for what libvirt does not define (`proc 999`, `qemu proc 9`,
/// `prog 0x12345678 proc 1`).
#[must_use]
pub fn procedure_name(prog: u32, proc_: u32) -> Cow<'static, str> {
    let Some(program) = program(prog) else {
        return Cow::Owned(format!("prog {prog:#010x} proc {proc_}"));
    };
    match (program.name == REMOTE, program.procedure(proc_)) {
        (true, Some(name)) => Cow::Borrowed(name),
        (true, None) => Cow::Owned(format!("proc {proc_}")),
        (false, Some(name)) => Cow::Owned(format!("{} {name}", program.name)),
        (false, None) => Cow::Owned(format!("{} proc {proc_}", program.name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote() -> &'static Program {
        PROGRAMS.iter().find(|p| p.name == REMOTE).unwrap()
    }

    #[test]
    fn tables_are_sorted_without_duplicates() {
        assert!(!PROGRAMS.is_empty());
        for (i, p) in PROGRAMS.iter().enumerate() {
            assert!(!p.procedures.is_empty(), "{}", p.name);
            for pair in p.procedures.windows(2) {
                assert!(
                    pair[0].0 < pair[1].0,
                    "{}: {:?} before {:?}",
                    p.name,
                    pair[0],
                    pair[1]
                );
            }
            let mut names: Vec<&str> = p.procedures.iter().map(|&(_, n)| n).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), p.procedures.len(), "{}: a name twice", p.name);
            for q in &PROGRAMS[i + 1..] {
                assert_ne!(p.number, q.number, "{} and {}", p.name, q.name);
                assert_ne!(p.name, q.name);
            }
        }
        for &(_, name) in PROGRAMS.iter().flat_map(|p| p.procedures) {
            assert!(
                name.starts_with(|c: char| c.is_ascii_uppercase())
                    && name.bytes().all(|b| b.is_ascii_alphanumeric()),
                "{name}"
            );
        }
        assert!(SOURCE_PACKAGE.starts_with("libvirt "));
        let source = names_source();
        assert!(
            source.starts_with("procedure names from Debian's libvirt ")
                && source.contains(" source (remote_protocol.x, "),
            "{source}"
        );
    }

    #[test]
    fn numbers_name_the_calls_libvirt_defines() {
        // The numbers of libvirt 11.3.0's remote_protocol.x, and the programs'.
        assert_eq!(remote().number, 0x2000_8086);
        for (n, name) in [
            (1, "ConnectOpen"),
            (2, "ConnectClose"),
            (9, "DomainCreate"),
            (10, "DomainCreateXML"),
            (11, "DomainDefineXML"),
            (12, "DomainDestroy"),
            (14, "DomainGetXMLDesc"),
            (22, "DomainLookupByID"),
            (24, "DomainLookupByUUID"),
            (66, "AuthList"),
            (273, "ConnectListAllDomains"),
            (293, "NodeGetCPUMap"),
            (350, "DomainDefineXMLFlags"),
            (453, "DomainEventNicMACChange"),
        ] {
            assert_eq!(procedure_name(0x2000_8086, n), name, "proc {n}");
        }
        let number = |name| program_number(name);
        assert_eq!(number("qemu"), 0x2000_8087);
        assert_eq!(number("lxc"), 0x0006_8000);
        assert_eq!(number("admin"), 0x0690_0690);
        assert_eq!(number("keepalive"), 0x6b65_6570);
        assert_eq!(procedure_name(0x2000_8087, 1), "qemu DomainMonitorCommand");
        assert_eq!(procedure_name(0x0690_0690, 1), "admin ConnectOpen");
        assert_eq!(procedure_name(0x6b65_6570, 1), "keepalive Ping");
        assert_eq!(procedure_name(0x6b65_6570, 2), "keepalive Pong");
    }

    fn program_number(name: &str) -> u32 {
        PROGRAMS.iter().find(|p| p.name == name).unwrap().number
    }

    #[test]
    fn unknown_numbers_show_as_numbers() {
        let past_the_end = remote().procedures.last().unwrap().0 + 1;
        assert_eq!(
            procedure_name(0x2000_8086, past_the_end),
            format!("proc {past_the_end}")
        );
        assert_eq!(procedure_name(0x2000_8086, 0), "proc 0");
        assert_eq!(procedure_name(0x6b65_6570, 3), "keepalive proc 3");
        assert_eq!(procedure_name(0x1234_5678, 1), "prog 0x12345678 proc 1");
        assert_eq!(
            procedure_name(0, u32::MAX),
            "prog 0x00000000 proc 4294967295"
        );
        assert!(matches!(procedure_name(0x2000_8086, 10), Cow::Borrowed(_)));
    }
}
