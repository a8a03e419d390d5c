//! Each process's executable mappings, turned into (unwind table, load
//! bias) and loaded into the unwinder's maps: the rows of every file once
//! (`UNWIND_ROWS`, written through mmap), and per process its sorted
//! mappings (`UNWIND_PROCS`).
//!
//! Files are opened through `/proc/PID/map_files/`, so a file deleted or
//! replaced since it was mapped (a package upgrade), or one in another
//! mount namespace, is still the one the process runs. The vDSO has no
//! file: its image is read from hvprof's own address space (the kernel maps
//! the same one into every process).

use std::{
    collections::HashMap,
    fs,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use object::{Object as _, ObjectSegment as _};
use profiler_common::unwind::{MAX_PROC_MAPPINGS, ProcMappings, UnwindMapping, UnwindRow};
use thiserror::Error;

use super::{build_table, table_for};
use crate::procmaps::Snapshot;

#[derive(Debug, Error)]
pub enum LoaderError {
    #[error("the eBPF object has no map {name}: rebuild hvprof (`./x build`)")]
    MissingMap { name: &'static str },
    #[error("mapping the unwind rows map into memory failed: {source}")]
    Mmap {
        #[source]
        source: std::io::Error,
    },
}

/// What the loader did, for `check`, the summary and the closing numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoaderStats {
    /// Files whose tables are loaded.
    pub files: usize,
    /// Of those, read from the disk cache.
    pub files_cached: usize,
    /// Files without unwind tables (frame pointers there).
    pub files_without_table: usize,
    /// Files that did not fit in the rows map (frame pointers there).
    pub files_not_fitting: usize,
    pub rows: u64,
    /// Time spent building or reading tables.
    pub build_time: Duration,
    /// Processes whose mappings were loaded (each load counts).
    pub process_loads: u64,
    /// Mappings left out past `MAX_PROC_MAPPINGS`.
    pub mappings_left_out: u64,
}

/// A file as mapped: identified by device and inode (and size and mtime, so
/// a file rewritten in place is a new one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum FileId {
    Inode {
        dev: u64,
        ino: u64,
        size: u64,
        mtime: i64,
    },
    Vdso,
}

/// A file's rows in the map, and how its segments are laid out (for the
/// load bias of each mapping).
#[derive(Clone, Debug, Default)]
struct FileEntry {
    rows_start: u32,
    rows_len: u32,
    /// `PT_LOAD` segments: (file offset, virtual address, file size).
    loads: Vec<(u64, u64, u64)>,
}

/// `UNWIND_ROWS` mapped into hvprof's memory.
struct RowsMmap {
    ptr: *mut u8,
    len: usize,
}

/// The kernel's array element stride: the value size rounded up to 8.
const ROW_STRIDE: usize = size_of::<UnwindRow>().next_multiple_of(8);

impl RowsMmap {
    fn new(map: &MapData, capacity: u32) -> Result<Self, LoaderError> {
        let len = capacity as usize * ROW_STRIDE;
        // SAFETY: a shared mapping of an mmapable array map's fd, of the
        // map's size; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(LoaderError::Mmap {
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn write(&mut self, at: u32, rows: &[UnwindRow]) {
        for (i, row) in rows.iter().enumerate() {
            let off = (at as usize + i) * ROW_STRIDE;
            if off + size_of::<UnwindRow>() > self.len {
                return;
            }
            // SAFETY: inside the mapping (checked above); unaligned-safe.
            unsafe { std::ptr::write_unaligned(self.ptr.add(off).cast::<UnwindRow>(), *row) };
        }
    }
}

impl Drop for RowsMmap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Loads processes' mappings and their files' tables into the maps.
pub struct Loader {
    rows: RowsMmap,
    /// Kept open: programs loaded later name the map by this fd.
    _rows_map: MapData,
    capacity: u32,
    used: u32,
    procs: BpfHashMap<MapData, u32, ProcMappings>,
    files: HashMap<FileId, Option<FileEntry>>,
    cache_dir: PathBuf,
    pub stats: LoaderStats,
}

impl Loader {
    /// Takes the unwinder's maps out of the loaded object.
    pub fn new(
        rows_map: Map,
        procs_map: Map,
        capacity: u32,
        cache_dir: PathBuf,
    ) -> Result<Self, LoaderError> {
        let Map::Array(rows_data) = rows_map else {
            return Err(LoaderError::MissingMap {
                name: profiler_common::record::names::UNWIND_ROWS,
            });
        };
        let rows = RowsMmap::new(&rows_data, capacity)?;
        let procs = BpfHashMap::try_from(procs_map).map_err(|_| LoaderError::MissingMap {
            name: profiler_common::record::names::UNWIND_PROCS,
        })?;
        Ok(Self {
            rows,
            _rows_map: rows_data,
            capacity,
            used: 0,
            procs,
            files: HashMap::new(),
            cache_dir,
            stats: LoaderStats::default(),
        })
    }

    /// Loads `tgid`'s mappings as `snapshot` has them. Returns false if the
    /// process is gone.
    pub fn load(&mut self, tgid: u32, snapshot: &Snapshot) -> bool {
        let mut value = Box::new(ProcMappings::EMPTY);
        let mut n = 0;
        for m in &snapshot.mappings {
            if n == MAX_PROC_MAPPINGS {
                self.stats.mappings_left_out += 1;
                continue;
            }
            let entry = self.file_of(tgid, m.start, m.end, &m.path);
            let (rows_start, rows_len, bias) = match entry {
                Some(f) => match bias_of(&f.loads, m.start, m.offset, &m.path) {
                    Some(bias) => (f.rows_start, f.rows_len, bias),
                    None => (0, 0, 0),
                },
                None => (0, 0, 0),
            };
            value.mappings[n] = UnwindMapping {
                start: m.start,
                end: m.end,
                bias,
                rows_start,
                rows_len,
            };
            n += 1;
        }
        value.mappings[..n].sort_by_key(|m| m.start);
        value.count = u32::try_from(n).unwrap_or(0);
        self.stats.process_loads += 1;
        self.procs.insert(&tgid, &*value, 0).is_ok()
    }

    /// Forgets a process that exited.
    pub fn forget(&mut self, tgid: u32) {
        let _ = self.procs.remove(&tgid);
    }

    /// The table of the file mapped at `start..end` in `tgid`, loaded if it
    /// is new. `None`: no table (frame pointers there).
    fn file_of(&mut self, tgid: u32, start: u64, end: u64, path: &str) -> Option<FileEntry> {
        let mapped = PathBuf::from(format!("/proc/{tgid}/map_files/{start:x}-{end:x}"));
        let id = if path == "[vdso]" {
            FileId::Vdso
        } else if path.starts_with('[') {
            return None;
        } else {
            let meta = fs::metadata(&mapped).ok()?;
            FileId::Inode {
                dev: meta.dev(),
                ino: meta.ino(),
                size: meta.size(),
                mtime: meta.mtime(),
            }
        };
        if let Some(known) = self.files.get(&id) {
            return known.clone();
        }
        let entry = self.build(id, &mapped);
        self.files.insert(id, entry.clone());
        entry
    }

    fn build(&mut self, id: FileId, mapped: &Path) -> Option<FileEntry> {
        let t = Instant::now();
        let (bytes, table) = if id == FileId::Vdso {
            let image = vdso_image()?;
            let table = build_table(&image).ok();
            (image, table.map(|t| (t, false)))
        } else {
            let bytes = fs::read(mapped).ok()?;
            // A cache that cannot be written (read-only home) costs the
            // rebuild next time, not the table.
            let table = table_for(mapped, &self.cache_dir)
                .ok()
                .or_else(|| build_table(&bytes).ok().map(|t| (t, false)));
            (bytes, table)
        };
        self.stats.build_time += t.elapsed();
        let loads = load_segments(&bytes);
        drop(bytes);
        let Some((table, cached)) = table else {
            self.stats.files_without_table += 1;
            return None;
        };
        if table.rows.is_empty() {
            self.stats.files_without_table += 1;
            return None;
        }
        let len = u32::try_from(table.rows.len()).ok()?;
        if self.capacity - self.used < len {
            self.stats.files_not_fitting += 1;
            return None;
        }
        let start = self.used;
        self.rows.write(start, &table.rows);
        self.used += len;
        self.stats.files += 1;
        self.stats.files_cached += usize::from(cached);
        self.stats.rows += u64::from(len);
        Some(FileEntry {
            rows_start: start,
            rows_len: len,
            loads,
        })
    }
}

/// The `PT_LOAD` segments of an ELF file: (file offset, virtual address,
/// file size).
fn load_segments(bytes: &[u8]) -> Vec<(u64, u64, u64)> {
    let Ok(file) = object::File::parse(bytes) else {
        return Vec::new();
    };
    file.segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (offset, s.address(), size)
        })
        .collect()
}

/// The load bias of a mapping of `offset` at `start`: what is subtracted
/// from an address to get the file's own virtual address. The dynamic
/// loader maps each segment from its page-aligned file offset to its
/// page-aligned address, so the segment whose page-aligned offset is the
/// mapping's (or that contains it) gives it.
fn bias_of(loads: &[(u64, u64, u64)], start: u64, offset: u64, path: &str) -> Option<u64> {
    if path == "[vdso]" {
        // Linked at 0 (or at its own base): the first segment's address.
        let vaddr = loads.first().map_or(0, |l| l.1);
        return Some(start.wrapping_sub(vaddr));
    }
    let page = 4096u64;
    let seg = loads
        .iter()
        .find(|(off, _, size)| *off & !(page - 1) <= offset && offset < off + size.max(&1))?;
    // vaddr of the mapping's start = seg.vaddr - (seg.offset - offset).
    let vaddr = seg.1.wrapping_sub(seg.0.wrapping_sub(offset));
    Some(start.wrapping_sub(vaddr))
}

/// hvprof's own vDSO image (the same in every process).
fn vdso_image() -> Option<Vec<u8>> {
    let maps = fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|l| l.ends_with("[vdso]"))?;
    let (start, end) = line.split_whitespace().next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    // SAFETY: the vDSO is mapped readable in this process for its whole
    // life, at the range /proc/self/maps gives.
    let image = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
    Some(image.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_of_a_shared_librarys_text() {
        // libc-like: r-- at 0, r-x at 0x26000 (vaddr 0x26000), mapped at
        // 0x7f00_0000_0000 + ...
        let loads = [(0, 0, 0x25f00), (0x26000, 0x26000, 0x0015_5000)];
        let base = 0x7f00_0000_0000;
        assert_eq!(
            bias_of(&loads, base + 0x26000, 0x26000, "/lib/libc.so.6"),
            Some(base)
        );
        // A segment whose vaddr is not its offset (lld, -z separate-code
        // variants): offset 0x1000 at vaddr 0x201000.
        let loads = [(0, 0x0020_0000, 0x800), (0x1000, 0x0020_1000, 0x5000)];
        assert_eq!(
            bias_of(&loads, 0x5555_0000_1000, 0x1000, "/bin/x"),
            Some(0x5555_0000_1000 - 0x0020_1000)
        );
        assert_eq!(bias_of(&[], 0x1000, 0, "/bin/x"), None);
    }

    #[test]
    fn own_vdso_has_a_table() {
        let image = vdso_image().expect("this process has a vDSO");
        let table = build_table(&image).expect("the vDSO is an ELF file with .eh_frame");
        assert!(table.rows.len() > 10, "{} rows", table.rows.len());
    }
}

/// What [`own_tables`] built.
#[derive(Clone, Debug, Default)]
pub struct OwnTables {
    pub files: usize,
    /// Their file names (`[vdso]` for the vDSO).
    pub names: Vec<String>,
    pub rows: u64,
    pub time: Duration,
}

/// Builds, cold (no cache), the unwind tables of every file this process
/// maps executable, and of its vDSO: `hvprof check`'s proof that tables
/// can be built here, and what they cost.
pub fn own_tables() -> Result<OwnTables, String> {
    let snapshot = Snapshot::take(std::process::id())
        .ok_or_else(|| "cannot read /proc/self/maps".to_owned())?;
    let t = Instant::now();
    let mut out = OwnTables::default();
    let mut seen = std::collections::HashSet::new();
    for m in &snapshot.mappings {
        if !seen.insert(m.path.clone()) {
            continue;
        }
        let bytes = if m.path == "[vdso]" {
            vdso_image()
        } else if m.path.starts_with('[') {
            None
        } else {
            fs::read(&m.path).ok()
        };
        let Some(bytes) = bytes else {
            continue;
        };
        let Ok(table) = build_table(&bytes) else {
            continue;
        };
        out.files += 1;
        out.rows += table.rows.len() as u64;
        out.names.push(
            Path::new(&m.path)
                .file_name()
                .map_or_else(|| m.path.clone(), |n| n.to_string_lossy().into_owned()),
        );
    }
    out.time = t.elapsed();
    Ok(out)
}
