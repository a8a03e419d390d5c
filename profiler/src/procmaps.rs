//! What hvprof keeps of a process while it is alive, so that its stacks can
//! be symbolized after it is gone: its executable mappings, command line and
//! comm. Processes in a mass boot live for milliseconds; their frames are
//! turned into `(file, file offset)` from these snapshots, never from a live
//! `/proc` read at the end.

use std::{fs, path::PathBuf};

/// One executable mapping of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// The mapped file, or a pseudo name such as `[vdso]`.
    pub path: String,
}

/// One line of a `/proc/<pid>/maps` text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapsLine<'a> {
    pub start: u64,
    pub end: u64,
    /// `r-xp`, `r--s`, …
    pub perms: &'a str,
    /// File offset of `start`.
    pub offset: u64,
    pub inode: u64,
    /// The mapped file, a pseudo name such as `[vdso]`, or empty.
    pub path: &'a str,
}

/// The mappings of a `/proc/<pid>/maps` text; lines that do not parse are
/// left out.
pub fn maps_lines(text: &str) -> impl Iterator<Item = MapsLine<'_>> {
    text.lines().filter_map(|line| {
        let mut f = line.splitn(6, ' ');
        let (start, end) = f.next()?.split_once('-')?;
        let perms = f.next()?;
        let offset = f.next()?;
        let _dev = f.next()?;
        let inode = f.next()?;
        Some(MapsLine {
            start: u64::from_str_radix(start, 16).ok()?,
            end: u64::from_str_radix(end, 16).ok()?,
            perms,
            offset: u64::from_str_radix(offset, 16).ok()?,
            inode: inode.parse().ok()?,
            path: f.next().map_or("", str::trim),
        })
    })
}

/// The executable mappings of one process at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub mappings: Vec<Mapping>,
}

/// Where a user address falls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location<'a> {
    /// In a file: symbolize by file offset.
    File { path: &'a str, offset: u64 },
    /// In `[vdso]`, an anonymous (JIT) mapping or another pseudo file.
    Pseudo { name: &'a str, offset: u64 },
}

impl Snapshot {
    /// Reads `/proc/<pid>/maps`. `None` if the process is gone (a zombie's
    /// maps are empty, which counts as gone).
    #[must_use]
    pub fn take(pid: u32) -> Option<Self> {
        let text = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        let s = Self::parse(&text);
        (!s.mappings.is_empty()).then_some(s)
    }

    /// Parses the text of `/proc/<pid>/maps`, keeping executable mappings.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let mappings = maps_lines(text)
            .filter(|m| m.perms.contains('x'))
            .map(|m| Mapping {
                start: m.start,
                end: m.end,
                offset: m.offset,
                path: if m.path.is_empty() {
                    "[anon]".to_owned()
                } else {
                    m.path.to_owned()
                },
            })
            .collect();
        Self { mappings }
    }

    /// The mapping containing `addr`.
    #[must_use]
    pub fn locate(&self, addr: u64) -> Option<Location<'_>> {
        let m = self
            .mappings
            .iter()
            .find(|m| m.start <= addr && addr < m.end)?;
        let offset = addr - m.start + m.offset;
        if m.path.starts_with('/') {
            // "(deleted)": the file was replaced (an upgrade during the run);
            // its offsets are still right but the new file's symbols are not.
            Some(Location::File {
                path: m.path.trim_end_matches(" (deleted)"),
                offset,
            })
        } else {
            Some(Location::Pseudo {
                name: &m.path,
                offset: addr - m.start,
            })
        }
    }
}

/// `/proc/<pid>/cmdline` with NULs turned into spaces.
#[must_use]
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then(|| args.join(" "))
}

/// `/proc/<pid>/comm`.
#[must_use]
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// The thread-group ids of all processes.
#[must_use]
pub fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The VM name in a QEMU command line: `-name guest=NAME,debug-threads=on`
/// (libvirt) or `-name NAME`.
#[must_use]
pub fn qemu_vm_name(cmdline: &str) -> Option<String> {
    let mut args = cmdline.split(' ');
    while let Some(a) = args.next() {
        if a == "-name" || a == "--name" {
            let v = args.next()?;
            let first = v.split(',').next()?;
            let name = first.strip_prefix("guest=").unwrap_or(first);
            return (!name.is_empty()).then(|| name.to_owned());
        }
    }
    None
}

/// QEMU's `-uuid` (libvirt's domain UUID), as its 16 bytes.
#[must_use]
pub fn qemu_uuid(cmdline: &str) -> Option<[u8; 16]> {
    let mut args = cmdline.split(' ');
    while let Some(a) = args.next() {
        if a == "-uuid" || a == "--uuid" {
            let hex: Vec<u8> = args.next()?.bytes().filter(|&b| b != b'-').collect();
            if hex.len() != 32 {
                return None;
            }
            let mut out = [0u8; 16];
            for (o, pair) in out.iter_mut().zip(hex.chunks(2)) {
                *o = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
            }
            return Some(out);
        }
    }
    None
}

/// Whether a process is alive: it exists and is not a zombie.
#[must_use]
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// The path of a pid's executable, if it is alive.
#[must_use]
pub fn exe(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a20000 r--p 00000000 fe:01 1234 /usr/sbin/libvirtd
55d0c0a20000-55d0c0a80000 r-xp 00020000 fe:01 1234 /usr/sbin/libvirtd
7f00aa000000-7f00aa100000 r-xp 00028000 fe:01 99   /usr/lib/x86_64-linux-gnu/libc.so.6
7f00ab000000-7f00ab001000 rwxp 00000000 00:00 0
7f00ac000000-7f00ac100000 r-xp 00000000 fe:01 77   /opt/old.so (deleted)
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn locates_addresses() {
        let s = Snapshot::parse(MAPS);
        assert_eq!(s.mappings.len(), 5);
        assert_eq!(
            s.locate(0x55d0_c0a2_0010),
            Some(Location::File {
                path: "/usr/sbin/libvirtd",
                offset: 0x20010
            })
        );
        assert_eq!(
            s.locate(0x7f00_aa00_0100),
            Some(Location::File {
                path: "/usr/lib/x86_64-linux-gnu/libc.so.6",
                offset: 0x28100
            })
        );
        assert_eq!(
            s.locate(0x7f00_ac00_0004),
            Some(Location::File {
                path: "/opt/old.so",
                offset: 4
            })
        );
        assert_eq!(
            s.locate(0x7ffd_0000_0010),
            Some(Location::Pseudo {
                name: "[vdso]",
                offset: 0x10
            })
        );
        assert_eq!(
            s.locate(0x7f00_ab00_0010),
            Some(Location::Pseudo {
                name: "[anon]",
                offset: 0x10
            })
        );
        // Not executable, or not mapped.
        assert_eq!(s.locate(0x55d0_c0a0_0010), None);
        assert_eq!(s.locate(1), None);
    }

    #[test]
    fn qemu_names() {
        let libvirt =
            "/usr/bin/qemu-system-x86_64 -name guest=vm-17,debug-threads=on -S -machine pc";
        assert_eq!(qemu_vm_name(libvirt).as_deref(), Some("vm-17"));
        assert_eq!(
            qemu_vm_name("qemu -name plain -m 16").as_deref(),
            Some("plain")
        );
        assert_eq!(qemu_vm_name("qemu -m 16"), None);
        assert_eq!(qemu_vm_name("qemu -name"), None);
        let uuid = qemu_uuid("qemu -name guest=a -uuid 436e4fd9-5f7f-4893-b905-ad63fdfe78cd -m 16");
        assert_eq!(
            uuid,
            Some([
                0x43, 0x6e, 0x4f, 0xd9, 0x5f, 0x7f, 0x48, 0x93, 0xb9, 0x05, 0xad, 0x63, 0xfd, 0xfe,
                0x78, 0xcd
            ])
        );
        assert_eq!(qemu_uuid("qemu -uuid 436e4fd9"), None);
        assert_eq!(
            qemu_uuid("qemu -uuid 436e4fd9-5f7f-4893-b905-ad63fdfe78zz"),
            None
        );
        assert_eq!(qemu_uuid("qemu -m 16"), None);
    }

    #[test]
    fn snapshots_self() {
        let s = Snapshot::take(std::process::id()).unwrap();
        let here = snapshots_self as fn() as usize as u64;
        match s.locate(here) {
            Some(Location::File { path, .. }) => {
                assert_eq!(Some(PathBuf::from(path)), exe(std::process::id()));
            }
            other => panic!("{other:?}"),
        }
        assert!(cmdline(std::process::id()).is_some());
    }
}
