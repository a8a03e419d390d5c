//! Each process's executable mappings, turned into (unwind table, load
//! bias) and loaded into the unwinder's maps: the rows of every file once
//! (`UNWIND_ROWS`, written through mmap) with their chunk index
//! (`UNWIND_CHUNKS`, likewise), and per process its sorted mappings
//! (`UNWIND_PROCS`).
//!
//! Files are opened through `/proc/PID/map_files/`, so a file deleted or
//! replaced since it was mapped (a package upgrade), or one in another
//! mount namespace, is still the one the process runs. The vDSO has no
//! file: its image is read from hvprof's own address space (the kernel maps
//! the same one into every process). JIT code that describes itself
//! through the GDB JIT interface (QEMU's TCG buffer, an anonymous mapping)
//! gets the rows [`jit`](super::jit) reads from the live process.
//!
//! The maps have a fixed size. When a table does not fit, the rows (and
//! chunk index entries) of files and JIT code no known process maps any
//! more are given back and reused, so a recording of hours (every build
//! brings new binaries) stays within them; a table that still does not fit
//! makes its mappings [`NO_ROOM`], which the unwinder counts as a loss.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::{FileExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use object::{Object as _, ObjectSegment as _, ReadCache, ReadRef};
use profiler_common::unwind::{
    MAX_PROC_MAPPINGS, MAX_UNWIND_RULES, MapRow, NO_ROOM, ProcMappings, ROW_CHUNK_SHIFT, RowChunk,
    UnwindMapping, UnwindRow, UnwindRule,
};
use thiserror::Error;

use super::{TableError, build_table, jit, table_of};
use crate::procmaps::{Mapping, Snapshot};

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
    /// Times a file's table did not fit in the rows map, even after the
    /// rows of files no process maps were given back (frame pointers
    /// there; the walks that meet it are counted as a loss).
    pub files_not_fitting: usize,
    /// Files and JIT code whose rows were given back (no process mapped
    /// them any more, and a table needed the room).
    pub tables_reclaimed: u64,
    /// Rows given back.
    pub rows_reclaimed: u64,
    pub rows: u64,
    /// Runs the loaded tables were written in (a large one is cut in
    /// pieces).
    pub pieces: u64,
    /// Entries of the rows' chunk index.
    pub chunks: u64,
    /// Time spent building or reading tables.
    pub build_time: Duration,
    /// Processes whose mappings were loaded (each load counts).
    pub process_loads: u64,
    /// Mappings left out past `MAX_PROC_MAPPINGS`.
    pub mappings_left_out: u64,
    /// JIT code (QEMU's TCG buffer, one per process) whose rows are loaded,
    /// read from the processes through the GDB JIT interface.
    pub jit_code: u64,
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

/// A table's rows and chunk index as written to the maps (all 0: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RowsRun {
    rows_start: u32,
    rows_len: u32,
    chunks_start: u32,
    chunks_len: u32,
    chunk_base: u32,
}

impl RowsRun {
    /// A file whose table did not fit.
    const NO_ROOM: Self = Self {
        rows_start: 0,
        rows_len: 0,
        chunks_start: 0,
        chunks_len: 0,
        chunk_base: NO_ROOM,
    };

    /// A mapping of these rows at `start..end`, with `bias`.
    fn mapping(self, start: u64, end: u64, bias: u64) -> UnwindMapping {
        UnwindMapping {
            start,
            end,
            bias,
            rows_start: self.rows_start,
            rows_len: self.rows_len,
            chunks_start: self.chunks_start,
            chunks_len: self.chunks_len,
            chunk_base: self.chunk_base,
            pad: 0,
        }
    }
}

/// A file's rows in the map, and how its segments are laid out (for the
/// load bias of each mapping).
#[derive(Clone, Debug)]
struct FileEntry {
    pieces: Pieces,
    /// `PT_LOAD` segments: (file offset, virtual address, file size).
    loads: Vec<(u64, u64, u64)>,
    /// When a process last mapped it (or it was loaded).
    used: Instant,
}

/// Part of a file's rows, one run in the map: those for the file addresses
/// `lo..hi`. A large table is cut in pieces, each its own entry in the
/// process's mappings, so that it fits in whatever room is free rather than
/// needing one hole as large as itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    lo: u32,
    /// `u32::MAX`: to the end of the mapping.
    hi: u32,
    run: RowsRun,
}

impl Piece {
    /// All of a file, one run (or none: `RowsRun::default()`).
    fn whole(run: RowsRun) -> Self {
        Self {
            lo: 0,
            hi: u32::MAX,
            run,
        }
    }
}

/// A file's pieces, shared by the processes that map it.
type Pieces = std::sync::Arc<[Piece]>;

/// The pieces of a file that did not fit.
fn no_room() -> Pieces {
    std::sync::Arc::new([Piece::whole(RowsRun::NO_ROOM)])
}

/// One process's JIT code and its rows in the map (`pc`s relative to
/// `start`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct JitRows {
    start: u64,
    end: u64,
    run: RowsRun,
}

/// The kernel memory of `rows` rows and `chunks` chunk index entries, in
/// KiB (8 bytes a row and an entry; the rules they name are at most
/// 512 KiB more).
#[must_use]
pub fn map_kib(rows: u64, chunks: u64) -> u64 {
    (rows * MmapArray::<MapRow>::STRIDE as u64 + chunks * MmapArray::<RowChunk>::STRIDE as u64)
        / 1024
}

/// A file mapping as a process's maps show it: start, end, file offset,
/// path.
type MappingKey = (u64, u64, u64, String);

/// An mmapable array map of `T`s, written through a mapping of the pages
/// each write covers, made for the write. Kept mapped, the whole map (tens
/// of MB of kernel memory, counted apart) would count in hvprof's RSS too.
struct MmapArray<T> {
    fd: OwnedFd,
    /// The map's size in bytes.
    len: usize,
    _of: std::marker::PhantomData<T>,
}

impl<T: Copy> MmapArray<T> {
    /// The kernel's array element stride: the value size rounded up to 8.
    const STRIDE: usize = size_of::<T>().next_multiple_of(8);

    fn new(map: &MapData, capacity: u32) -> Result<Self, LoaderError> {
        let fd = map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| LoaderError::Mmap { source })?;
        Ok(Self {
            fd,
            len: capacity as usize * Self::STRIDE,
            _of: std::marker::PhantomData,
        })
    }

    /// Writes `values` from element `at` on (what would go past the map's
    /// end is left out).
    fn write(&mut self, at: u32, values: &[T]) -> Result<(), LoaderError> {
        let page = crate::sys::page_size();
        let first = at as usize * Self::STRIDE;
        let end = (first + values.len() * Self::STRIDE).min(self.len);
        if first >= end {
            return Ok(());
        }
        let from = first / page * page;
        let to = end.next_multiple_of(page);
        // SAFETY: a shared mapping of pages of an mmapable array map's fd,
        // inside the map (its size rounded up to a page, as the kernel
        // allows); checked for failure below, unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                to - from,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                libc::off_t::try_from(from).unwrap_or(libc::off_t::MAX),
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(LoaderError::Mmap {
                source: std::io::Error::last_os_error(),
            });
        }
        let base = ptr.cast::<u8>();
        for (i, value) in values.iter().enumerate() {
            let off = first + i * Self::STRIDE;
            if off + size_of::<T>() > end {
                break;
            }
            // SAFETY: inside the mapping (from..to covers first..end);
            // unaligned-safe.
            unsafe { std::ptr::write_unaligned(base.add(off - from).cast::<T>(), *value) };
        }
        // SAFETY: the mapping made above, unmapped once.
        unsafe { libc::munmap(ptr, to - from) };
        Ok(())
    }
}

/// The room in one of the unwinder's array maps. Large runs (the tables of
/// rustc's or QEMU's libraries, a million rows) come from the top down,
/// the others from the bottom up, so that the holes the many small tables
/// leave as their processes come and go cannot keep a large table from
/// fitting again.
#[derive(Debug)]
struct Space {
    /// Everything in `lo..hi` is free.
    lo: u32,
    hi: u32,
    /// Free runs outside `lo..hi`: (start, length), by start, none
    /// adjacent to another or to `lo..hi`.
    free: Vec<(u32, u32)>,
}

impl Space {
    /// A run at least this long is large.
    const LARGE: u32 = 1 << 16;

    fn new(capacity: u32) -> Self {
        Self {
            lo: 0,
            hi: capacity,
            free: Vec::new(),
        }
    }

    /// The start of `len` free elements, now taken: a small run from the
    /// lowest free run that holds it, else from `lo`; a large one from the
    /// highest, else from `hi`.
    fn take(&mut self, len: u32) -> Option<u32> {
        let large = len >= Self::LARGE;
        let lo = self.lo;
        let own = |&(s, l): &(u32, u32)| l >= len && (s < lo) != large;
        let own_hole = if large {
            self.free.iter().rposition(own)
        } else {
            self.free.iter().position(own)
        };
        let middle = self.hi - self.lo >= len;
        // Either kind takes the other's holes rather than not fit at all.
        let found = own_hole.or_else(|| {
            (!middle)
                .then(|| self.free.iter().position(|&(_, l)| l >= len))
                .flatten()
        });
        if let Some(i) = found {
            let (start, l) = self.free[i];
            let at = if large { start + l - len } else { start };
            if l == len {
                self.free.remove(i);
            } else if large {
                self.free[i].1 -= len;
            } else {
                self.free[i] = (start + len, l - len);
            }
            return Some(at);
        }
        if !middle {
            return None;
        }
        if large {
            self.hi -= len;
            Some(self.hi)
        } else {
            self.lo += len;
            Some(self.lo - len)
        }
    }

    /// Frees `start..start + len`, taken before.
    fn give_back(&mut self, start: u32, len: u32) {
        if len == 0 {
            return;
        }
        let mut i = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(i, (start, len));
        if i + 1 < self.free.len() && start + len == self.free[i + 1].0 {
            self.free[i].1 += self.free.remove(i + 1).1;
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == start {
            self.free[i - 1].1 += self.free.remove(i).1;
            i -= 1;
        }
        let (s, l) = self.free[i];
        if s + l == self.lo {
            self.lo = s;
            self.free.remove(i);
        } else if s == self.hi {
            self.hi = s + l;
            self.free.remove(i);
        }
    }
}

/// A table no process maps, but one did this recently, is given back only
/// if those idle for longer do not make the room.
const RECENTLY_USED: Duration = Duration::from_secs(10);

/// Loads processes' mappings and their files' tables into the maps.
pub struct Loader {
    rows: MmapArray<MapRow>,
    chunks: MmapArray<RowChunk>,
    rules: MmapArray<UnwindRule>,
    /// Each rule written to `rules`, by its index there.
    rule_index: HashMap<UnwindRule, u32>,
    /// Kept open: programs loaded later name the maps by these fds.
    _rows_map: MapData,
    _chunks_map: MapData,
    _rules_map: MapData,
    row_space: Space,
    chunk_space: Space,
    procs: BpfHashMap<MapData, u32, ProcMappings>,
    /// Files whose tables are in the maps, or that have none.
    files: HashMap<FileId, Option<FileEntry>>,
    /// Files whose tables did not fit, with their segments; tried again
    /// after rows are given back.
    not_fitting: HashMap<FileId, Vec<(u64, u64, u64)>>,
    /// JIT code of forgotten processes: its rows are free once no walk can
    /// still be reading them.
    jit_gone: Vec<RowsRun>,
    /// Per executable: its GDB JIT descriptor, if it exports one.
    jit_descriptors: HashMap<FileId, Option<jit::Descriptor>>,
    /// Per process and JIT code start: the code's rows, written once.
    jit_code: HashMap<(u32, u64), JitRows>,
    cache_dir: PathBuf,
    /// When each process was last loaded.
    loaded_at: HashMap<u32, Instant>,
    /// Per process: its file mappings (start, end, offset, path) resolved
    /// at earlier loads. A process is loaded again at every dlopen and
    /// resnapshot, and resolving a mapping costs a stat through
    /// `/proc/PID/map_files` (about 100 per QEMU).
    resolved: HashMap<u32, HashMap<MappingKey, (Pieces, u64)>>,
    /// Rows a piece holds at most.
    piece_rows: usize,
    pub stats: LoaderStats,
}

impl Loader {
    /// Takes the unwinder's maps out of the loaded object (`capacity`
    /// rows, `chunk_capacity` chunk index entries).
    pub fn new(
        rows_map: Map,
        chunks_map: Map,
        rules_map: Map,
        procs_map: Map,
        (capacity, chunk_capacity): (u32, u32),
        cache_dir: PathBuf,
    ) -> Result<Self, LoaderError> {
        let Map::Array(rows_data) = rows_map else {
            return Err(LoaderError::MissingMap {
                name: profiler_common::record::names::UNWIND_ROWS,
            });
        };
        let Map::Array(chunks_data) = chunks_map else {
            return Err(LoaderError::MissingMap {
                name: profiler_common::record::names::UNWIND_CHUNKS,
            });
        };
        let Map::Array(rules_data) = rules_map else {
            return Err(LoaderError::MissingMap {
                name: profiler_common::record::names::UNWIND_RULES,
            });
        };
        let rows = MmapArray::new(&rows_data, capacity)?;
        let chunks = MmapArray::new(&chunks_data, chunk_capacity)?;
        let rules = MmapArray::new(&rules_data, MAX_UNWIND_RULES)?;
        let procs = BpfHashMap::try_from(procs_map).map_err(|_| LoaderError::MissingMap {
            name: profiler_common::record::names::UNWIND_PROCS,
        })?;
        Ok(Self {
            rows,
            chunks,
            rules,
            rule_index: HashMap::new(),
            _rows_map: rows_data,
            _chunks_map: chunks_data,
            _rules_map: rules_data,
            row_space: Space::new(capacity),
            chunk_space: Space::new(chunk_capacity),
            procs,
            files: HashMap::new(),
            not_fitting: HashMap::new(),
            jit_gone: Vec::new(),
            jit_descriptors: HashMap::new(),
            jit_code: HashMap::new(),
            cache_dir,
            loaded_at: HashMap::new(),
            resolved: HashMap::new(),
            piece_rows: (capacity / 64).clamp(1024, Space::LARGE - 1) as usize,
            stats: LoaderStats::default(),
        })
    }

    /// Loads `tgid`'s mappings as `snapshot` has them. Returns false if the
    /// process is gone.
    pub fn load(&mut self, tgid: u32, snapshot: &Snapshot) -> bool {
        self.loaded_at.insert(tgid, Instant::now());
        let jit_code = self.jit_code_of(tgid, snapshot);
        let mut value = Box::new(ProcMappings::EMPTY);
        let mut n = 0;
        for m in &snapshot.mappings {
            let jit = jit_rows_for(&jit_code, m.start, m.end);
            let t = Instant::now();
            // JIT code the process registered wins over the mapping's file:
            // with `-accel tcg,split-wx=on` QEMU runs it from a memfd.
            let key = (m.start, m.end, m.offset, m.path.clone());
            let known = self.resolved.get(&tgid).and_then(|r| r.get(&key)).cloned();
            let (pieces, bias) = if jit.0.rows_len != 0 || m.path == "[anon]" {
                (std::sync::Arc::from([Piece::whole(jit.0)]), jit.1)
            } else if let Some(known) = known {
                known
            } else {
                let entry = self.file_of(tgid, m.start, m.end, &m.path);
                match entry
                    .and_then(|f| Some((f.pieces, bias_of(&f.loads, m.start, m.offset, &m.path)?)))
                {
                    // A table that did not fit is looked for again at the
                    // next load: rows may have been given back meanwhile.
                    Some(found) if found.0[0].run != RowsRun::NO_ROOM => {
                        self.resolved
                            .entry(tgid)
                            .or_default()
                            .insert(key, found.clone());
                        found
                    }
                    Some(no_room) => no_room,
                    None => (std::sync::Arc::from([Piece::whole(RowsRun::default())]), 0),
                }
            };
            for piece in pieces.iter() {
                let lo = m.start.max(bias.wrapping_add(u64::from(piece.lo)));
                let hi = if piece.hi == u32::MAX {
                    m.end
                } else {
                    m.end.min(bias.wrapping_add(u64::from(piece.hi)))
                };
                if lo >= hi {
                    continue;
                }
                if n == MAX_PROC_MAPPINGS {
                    self.stats.mappings_left_out += 1;
                    continue;
                }
                value.mappings[n] = piece.run.mapping(lo, hi, bias);
                n += 1;
            }
            // A file whose table had to be built took a while: the process
            // walks meanwhile, so what is known so far goes in now (the
            // snapshot is sorted by address, so the prefix is too).
            if t.elapsed() > Duration::from_millis(2) {
                value.count = u32::try_from(n).unwrap_or(0);
                let _ = self.procs.insert(&tgid, &*value, 0);
            }
        }
        value.mappings[..n].sort_by_key(|m| m.start);
        value.count = u32::try_from(n).unwrap_or(0);
        self.stats.process_loads += 1;
        self.procs.insert(&tgid, &*value, 0).is_ok()
    }

    /// Whether `tgid` was loaded within `within` (a walk asking again for
    /// tables it has is answered at most that often).
    #[must_use]
    pub fn loaded_within(&self, tgid: u32, within: Duration) -> bool {
        self.loaded_at
            .get(&tgid)
            .is_some_and(|t| t.elapsed() < within)
    }

    /// Forgets a process that exited or exec'd.
    pub fn forget(&mut self, tgid: u32) {
        self.loaded_at.remove(&tgid);
        self.resolved.remove(&tgid);
        let _ = self.procs.remove(&tgid);
        // A new process with the same pid reads its own JIT code again.
        let gone = &mut self.jit_gone;
        self.jit_code.retain(|&(t, _), code| {
            if t == tgid {
                gone.push(code.run);
            }
            t != tgid
        });
    }

    /// Gives back the rows of the files no known process maps and of the
    /// JIT code of forgotten processes. False if there were none.
    fn reclaim(&mut self, idle: Duration) -> bool {
        let live: HashSet<u32> = self
            .resolved
            .values()
            .flat_map(HashMap::values)
            .flat_map(|(pieces, _)| pieces.iter().map(|p| p.run.rows_start))
            .chain(self.jit_code.values().map(|j| j.run.rows_start))
            .collect();
        let unused: Vec<FileId> = self
            .files
            .iter()
            .filter(|(_, e)| {
                e.as_ref().is_some_and(|e| {
                    !live.contains(&e.pieces[0].run.rows_start) && e.used.elapsed() >= idle
                })
            })
            .map(|(&id, _)| id)
            .collect();
        let mut runs = std::mem::take(&mut self.jit_gone);
        runs.extend(
            unused
                .iter()
                .filter_map(|id| self.files.remove(id).flatten())
                .flat_map(|e| e.pieces.iter().map(|p| p.run).collect::<Vec<_>>()),
        );
        if runs.is_empty() {
            return false;
        }
        // The processes were forgotten (their mappings deleted from the
        // map) before: a walk still reading their rows ends within
        // microseconds.
        std::thread::sleep(Duration::from_millis(2));
        for run in &runs {
            self.row_space.give_back(run.rows_start, run.rows_len);
            self.chunk_space.give_back(run.chunks_start, run.chunks_len);
            self.stats.rows_reclaimed += u64::from(run.rows_len);
        }
        self.stats.tables_reclaimed += runs.len() as u64;
        self.not_fitting.clear();
        true
    }

    /// The JIT code `tgid` registers through the GDB JIT interface, its
    /// rows written once per code start. Only a process with an anonymous
    /// (or memfd) executable mapping whose executable exports the
    /// descriptor (QEMU) is read; anything that fails (it exited) means no
    /// JIT rows.
    fn jit_code_of(&mut self, tgid: u32, snapshot: &Snapshot) -> Vec<JitRows> {
        if !snapshot.mappings.iter().any(|m| may_hold_jit_code(&m.path)) {
            return Vec::new();
        }
        let Some(address) = self.jit_descriptor_address(tgid, snapshot) else {
            return Vec::new();
        };
        let t = Instant::now();
        let mut loaded = Vec::new();
        for code in jit::read_jit_code(tgid, address) {
            if let Some(known) = self.jit_code.get(&(tgid, code.start)) {
                loaded.push(*known);
                continue;
            }
            let Some(run) = self.write_rows(&code.rows) else {
                continue;
            };
            let rows = JitRows {
                start: code.start,
                end: code.end,
                run,
            };
            self.jit_code.insert((tgid, code.start), rows);
            self.stats.jit_code += 1;
            loaded.push(rows);
        }
        self.stats.build_time += t.elapsed();
        loaded
    }

    /// Where `__jit_debug_descriptor` is in `tgid`'s address space, if its
    /// executable exports it.
    fn jit_descriptor_address(&mut self, tgid: u32, snapshot: &Snapshot) -> Option<u64> {
        // The executable as mapped: /proc/PID/exe and the maps name it the
        // same way (with " (deleted)" if it was replaced).
        let exe = crate::procmaps::exe(tgid)?;
        let m: &Mapping = snapshot
            .mappings
            .iter()
            .find(|m| Path::new(&m.path) == exe)?;
        let mapped = map_files(tgid, m.start, m.end);
        let id = inode_id(&mapped)?;
        let descriptor = self
            .jit_descriptors
            .entry(id)
            .or_insert_with(|| jit::find_descriptor(&mapped))
            .as_ref()?;
        let bias = bias_of(&descriptor.loads, m.start, m.offset, &m.path)?;
        Some(descriptor.vaddr.wrapping_add(bias))
    }

    /// A table's rows written in pieces of at most `piece_rows`; `None`
    /// (and nothing taken) if they do not all fit.
    fn write_pieces(&mut self, rows: &[UnwindRow]) -> Option<Pieces> {
        let mut pieces: Vec<Piece> = Vec::new();
        for part in rows.chunks(self.piece_rows) {
            let Some(run) = self.write_rows(part) else {
                for p in &pieces {
                    self.row_space.give_back(p.run.rows_start, p.run.rows_len);
                    self.chunk_space
                        .give_back(p.run.chunks_start, p.run.chunks_len);
                }
                return None;
            };
            let lo = if pieces.is_empty() { 0 } else { part[0].pc };
            if let Some(last) = pieces.last_mut() {
                last.hi = lo;
            }
            pieces.push(Piece {
                lo,
                hi: u32::MAX,
                run,
            });
        }
        self.stats.pieces += pieces.len() as u64;
        Some(pieces.into())
    }

    /// Appends rows to the map, and their chunk index where it fits (else
    /// the unwinder searches all of them); `None` if the rows do not fit.
    fn write_rows(&mut self, rows: &[UnwindRow]) -> Option<RowsRun> {
        let len = u32::try_from(rows.len()).ok().filter(|&n| n > 0)?;
        let packed = self.map_rows(rows)?;
        // The tables no process maps go, those idle for a while first: a
        // library that processes map one after the other (rustc's, in a
        // build) stays.
        let start = self.row_space.take(len).or_else(|| {
            [RECENTLY_USED, Duration::ZERO]
                .into_iter()
                .find_map(|idle| {
                    self.reclaim(idle)
                        .then(|| self.row_space.take(len))
                        .flatten()
                })
        })?;
        if let Err(e) = self.rows.write(start, &packed) {
            self.row_space.give_back(start, len);
            eprintln!("hvprof: warning: {e}: a file's unwind table is left out");
            return None;
        }
        self.stats.rows += u64::from(len);
        let mut run = RowsRun {
            rows_start: start,
            rows_len: len,
            ..RowsRun::default()
        };
        if let Some((base, index)) = chunk_index(rows)
            && let Ok(n) = u32::try_from(index.len())
            && n > 0
            && let Some(at) = self.chunk_space.take(n)
        {
            if self.chunks.write(at, &index).is_err() {
                // The rows alone: the unwinder searches all of them.
                self.chunk_space.give_back(at, n);
                return Some(run);
            }
            run.chunks_start = at;
            run.chunks_len = n;
            run.chunk_base = base;
            self.stats.chunks += u64::from(n);
        }
        Some(run)
    }

    /// `rows` as the map keeps them, their new rules written; `None` if
    /// the rules map is full.
    fn map_rows(&mut self, rows: &[UnwindRow]) -> Option<Vec<MapRow>> {
        let first_new = u32::try_from(self.rule_index.len()).ok()?;
        let mut new = Vec::new();
        let mut mapped = Vec::with_capacity(rows.len());
        for row in rows {
            let rule = row.rule();
            let next = first_new.saturating_add(u32::try_from(new.len()).unwrap_or(u32::MAX));
            let index = *self.rule_index.entry(rule).or_insert_with(|| {
                new.push(rule);
                next
            });
            mapped.push(MapRow {
                pc: row.pc,
                rule: index,
            });
        }
        let fits = u64::from(first_new) + new.len() as u64 <= u64::from(MAX_UNWIND_RULES);
        if !fits || (!new.is_empty() && self.rules.write(first_new, &new).is_err()) {
            self.rule_index.retain(|_, i| *i < first_new);
            return None;
        }
        Some(mapped)
    }

    /// The table of the file mapped at `start..end` in `tgid`, loaded if it
    /// is new. `None`: no table (frame pointers there).
    fn file_of(&mut self, tgid: u32, start: u64, end: u64, path: &str) -> Option<FileEntry> {
        let mapped = map_files(tgid, start, end);
        let id = if path == "[vdso]" {
            FileId::Vdso
        } else if path.starts_with('[') {
            return None;
        } else {
            inode_id(&mapped)?
        };
        if let Some(known) = self.files.get_mut(&id) {
            if let Some(e) = known {
                e.used = Instant::now();
            }
            return known.clone();
        }
        if let Some(loads) = self.not_fitting.get(&id) {
            return Some(FileEntry {
                pieces: no_room(),
                loads: loads.clone(),
                used: Instant::now(),
            });
        }
        // A process gone before its file could be opened says nothing of
        // the file: the next process that maps it tries again.
        let entry = self.build(id, &mapped).ok()?;
        if entry
            .as_ref()
            .is_none_or(|e| e.pieces[0].run != RowsRun::NO_ROOM)
        {
            self.files.insert(id, entry.clone());
        }
        entry
    }

    /// The file's table, loaded; `Ok(None)` if it has none, `Err` if it
    /// could not be read (the process that mapped it is gone).
    fn build(&mut self, id: FileId, mapped: &Path) -> Result<Option<FileEntry>, io::Error> {
        let t = Instant::now();
        let (loads, table) = if id == FileId::Vdso {
            let Some(image) = vdso_image() else {
                return Ok(None);
            };
            let table = build_table(&image).ok();
            (load_segments(image.as_slice()), table.map(|t| (t, false)))
        } else {
            // The segments from the headers alone: reading all of QEMU to
            // find them cost more than its cached table.
            let file = fs::File::open(mapped)?;
            let loads = load_segments(&ReadCache::new(&file));
            match table_of(&file, mapped, &self.cache_dir) {
                Ok(table) => (loads, Some(table)),
                Err(TableError::Io { source, .. }) => return Err(source),
                Err(_) => (loads, None),
            }
        };
        self.stats.build_time += t.elapsed();
        let Some((table, cached)) = table.filter(|(t, _)| !t.rows.is_empty()) else {
            self.stats.files_without_table += 1;
            return Ok(None);
        };
        let Some(pieces) = self.write_pieces(&table.rows) else {
            self.stats.files_not_fitting += 1;
            self.not_fitting.insert(id, loads.clone());
            return Ok(Some(FileEntry {
                pieces: no_room(),
                loads,
                used: Instant::now(),
            }));
        };
        self.stats.files += 1;
        self.stats.files_cached += usize::from(cached);
        Ok(Some(FileEntry {
            pieces,
            loads,
            used: Instant::now(),
        }))
    }
}

/// `/proc/PID/map_files/` of a mapping: its file, even deleted or in
/// another mount namespace.
fn map_files(tgid: u32, start: u64, end: u64) -> PathBuf {
    PathBuf::from(format!("/proc/{tgid}/map_files/{start:x}-{end:x}"))
}

/// A mapped file's identity.
fn inode_id(mapped: &Path) -> Option<FileId> {
    let meta = fs::metadata(mapped).ok()?;
    Some(FileId::Inode {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime: meta.mtime(),
    })
}

/// Whether a mapping can be JIT code: anonymous, or a memfd (QEMU's
/// `split-wx` view of its code buffer, `/memfd:tcg-jit (deleted)`).
fn may_hold_jit_code(path: &str) -> bool {
    path == "[anon]" || path.starts_with("/memfd:")
}

/// The rows and bias of a mapping: those of the JIT code that lies in it,
/// if any. The code may start inside the mapping (QEMU's starts after its
/// prologue) or span several (one per TCG region, with guard pages between
/// them): each gets the code's rows and its start as bias. Addresses below
/// the code are beyond u32 from it and those above it meet the final
/// `CFA_NONE` row, so neither takes the code's rule.
fn jit_rows_for(code: &[JitRows], start: u64, end: u64) -> (RowsRun, u64) {
    code.iter()
        .find(|c| c.start < end && start < c.end)
        .map_or_else(Default::default, |c| (c.run, c.start))
}

/// The chunk index of a table's sorted rows (see `ROW_CHUNK_SHIFT`): the
/// first chunk's number and, for each chunk from it to the last row's, the
/// rows that can cover it. `None` for rows spread so thinly that the index
/// would outgrow them (JIT code: a few rows over a 1 GiB buffer); the
/// unwinder then searches all the rows.
pub(super) fn chunk_index(rows: &[UnwindRow]) -> Option<(u32, Vec<RowChunk>)> {
    let (first, last) = (rows.first()?, rows.last()?);
    let base = first.pc >> ROW_CHUNK_SHIFT;
    let count = (last.pc >> ROW_CHUNK_SHIFT) - base + 1;
    if count as usize > 4 * rows.len() + 64 {
        return None;
    }
    let mut index = Vec::with_capacity(count as usize);
    // The last row starting at or below the chunk, the first past it.
    let (mut lo, mut hi) = (0, 0);
    for k in 0..count {
        let start = u64::from(base + k) << ROW_CHUNK_SHIFT;
        let end = start + (1 << ROW_CHUNK_SHIFT);
        while lo + 1 < rows.len() && u64::from(rows[lo + 1].pc) <= start {
            lo += 1;
        }
        while hi < rows.len() && u64::from(rows[hi].pc) < end {
            hi += 1;
        }
        index.push(RowChunk {
            lo: u32::try_from(lo).ok()?,
            hi: u32::try_from(hi).ok()?,
        });
    }
    Some((base, index))
}

/// The `PT_LOAD` segments of an ELF file: (file offset, virtual address,
/// file size).
pub(super) fn load_segments<'data, R: ReadRef<'data>>(data: R) -> Vec<(u64, u64, u64)> {
    let Ok(file) = object::File::parse(data) else {
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
pub(super) fn bias_of(
    loads: &[(u64, u64, u64)],
    start: u64,
    offset: u64,
    path: &str,
) -> Option<u64> {
    if path == "[vdso]" {
        // Linked at 0 (or at its own base): the first segment's address.
        let vaddr = loads.first().map_or(0, |l| l.1);
        return Some(start.wrapping_sub(vaddr));
    }
    let page = 4096u64;
    // The segment the loader mapped at this offset: its page-aligned file
    // offset is the mapping's. Only that one: the segment before it may
    // reach into the same page (lld lays out `R` up to 0x29ba8 and `R E`
    // from 0x29bb0 at another address), and taking it shifts every PC of
    // the mapping by a page.
    let seg = loads
        .iter()
        .find(|(off, _, _)| *off & !(page - 1) == offset)
        .or_else(|| {
            loads
                .iter()
                .filter(|(off, _, size)| {
                    *off & !(page - 1) <= offset && offset < off + size.max(&1)
                })
                .max_by_key(|(off, _, _)| *off)
        })?;
    // vaddr of the mapping's start = seg.vaddr - (seg.offset - offset).
    let vaddr = seg.1.wrapping_sub(seg.0.wrapping_sub(offset));
    Some(start.wrapping_sub(vaddr))
}

/// hvprof's own vDSO image: the kernel maps the same one into every
/// process.
pub(super) fn vdso_image() -> Option<Vec<u8>> {
    let snapshot = Snapshot::take(std::process::id())?;
    let m = snapshot.mappings.iter().find(|m| m.path == "[vdso]")?;
    let mut image = vec![0; usize::try_from(m.end - m.start).ok()?];
    fs::File::open("/proc/self/mem")
        .ok()?
        .read_exact_at(&mut image, m.start)
        .ok()?;
    Some(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs given back are reused (small ones first-fit from the bottom,
    /// large ones from the top), merge with their neighbours, and return
    /// to the free middle when they reach it.
    #[test]
    fn space_reuses_what_is_given_back() {
        const L: u32 = Space::LARGE;
        let mut s = Space::new(4 * L);
        assert_eq!(s.take(40), Some(0));
        assert_eq!(s.take(30), Some(40));
        assert_eq!(s.take(2 * L), Some(2 * L), "large: from the top");
        assert_eq!(s.take(L + 10), Some(L - 10), "down to just above");
        assert_eq!(s.take(L), None, "{s:?}");
        s.give_back(0, 40);
        assert_eq!(s.take(15), Some(0), "the first hole that holds it");
        s.give_back(40, 30);
        assert_eq!((s.lo, s.free.as_slice()), (15, &[][..]), "15.. is free");
        // A hole among the large runs is kept for a large one.
        s.give_back(2 * L, 2 * L);
        assert_eq!(s.take(100), Some(15));
        assert_eq!(s.take(L), Some(3 * L), "the top of the hole");
        // With the middle full, a small run takes a large one's hole.
        assert_eq!(s.take(L - 125), Some(115));
        assert_eq!(s.take(3), Some(2 * L));
        s.give_back(2 * L, 3);
        s.give_back(3 * L, L);
        s.give_back(L - 10, L + 10);
        assert_eq!((s.lo, s.hi, s.free.len()), (L - 10, 4 * L, 0), "{s:?}");
        s.give_back(115, L - 125);
        s.give_back(0, 15);
        s.give_back(15, 100);
        assert_eq!(
            (s.lo, s.hi, s.free.as_slice()),
            (0, 4 * L, &[][..]),
            "all free"
        );
        assert_eq!(s.take(4 * L), Some(0));
    }

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
        // lld's layout (vmload): `R` from 0 to 0x29ba8, `R E` from file
        // offset 0x29bb0 at 0x2abb0; the text is mapped from offset 0x29000,
        // which both segments' pages reach.
        let loads = [(0, 0, 0x0002_9ba8), (0x0002_9bb0, 0x0002_abb0, 0x0007_8050)];
        assert_eq!(
            bias_of(&loads, 0x5555_0002_9000, 0x0002_9000, "/bin/vmload"),
            Some(0x5555_0002_9000 - 0x0002_a000)
        );
    }

    #[test]
    fn jit_code_rows_go_to_every_mapping_it_lies_in() {
        let run = RowsRun {
            rows_start: 100,
            rows_len: 2,
            ..RowsRun::default()
        };
        let code = [JitRows {
            start: 0x7f00_0000_002d,
            end: 0x7f00_4000_0000,
            run,
        }];
        let jit = (run, 0x7f00_0000_002d);
        let none = (RowsRun::default(), 0);
        // The code's start inside the first region, its end in the last.
        assert_eq!(jit_rows_for(&code, 0x7f00_0000_0000, 0x7f00_1fff_f000), jit);
        assert_eq!(jit_rows_for(&code, 0x7f00_2000_0000, 0x7f00_3fff_f000), jit);
        // Before, after, touching.
        assert_eq!(
            jit_rows_for(&code, 0x7eff_0000_0000, 0x7f00_0000_002d),
            none
        );
        assert_eq!(
            jit_rows_for(&code, 0x7f00_4000_0000, 0x7f00_4001_0000),
            none
        );
        assert_eq!(jit_rows_for(&[], 0x1000, 0x2000), none);
    }

    /// The eBPF search (`find_row` in profiler-ebpf's unwind.rs): the
    /// chunk's bounds, or the last row past the last chunk.
    fn row_by_chunk(rows: &[UnwindRow], base: u32, index: &[RowChunk], pc: u32) -> Option<usize> {
        let chunk = (pc >> ROW_CHUNK_SHIFT).wrapping_sub(base);
        let (mut lo, mut hi) = match index.get(chunk as usize) {
            Some(c) => (c.lo as usize, (c.hi as usize).min(rows.len())),
            None if pc >> ROW_CHUNK_SHIFT < base => return None,
            None => (rows.len() - 1, rows.len()),
        };
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if rows[mid].pc <= pc {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo.checked_sub(1)
    }

    #[test]
    fn the_chunk_index_finds_the_row_a_full_search_finds() {
        let table = build_table(&vdso_image().expect("a vDSO")).expect("its table");
        let libc = fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6")
            .ok()
            .and_then(|b| build_table(&b).ok());
        // Hand-made: rows sharing a chunk, a chunk without a row start,
        // rows far apart, a first row in the middle of its chunk.
        let pc = |pc| UnwindRow {
            pc,
            ..UnwindRow::default()
        };
        let made = vec![
            pc(0x1010),
            pc(0x1020),
            pc(0x1021),
            pc(0x1c00),
            pc(0x2400),
            pc(0x9000),
        ];
        for rows in [Some(table.rows), libc.map(|t| t.rows), Some(made)]
            .into_iter()
            .flatten()
        {
            let (base, index) = chunk_index(&rows).expect("rows dense enough for an index");
            let (lo, hi) = (
                rows[0].pc.saturating_sub(3000),
                rows[rows.len() - 1].pc + 3000,
            );
            // Every row start, the address before it, and a stride between.
            let probes = rows
                .iter()
                .flat_map(|r| [r.pc, r.pc.saturating_sub(1)])
                .chain((lo..hi).step_by(97));
            for p in probes {
                let full = rows.partition_point(|r| r.pc <= p).checked_sub(1);
                assert_eq!(row_by_chunk(&rows, base, &index, p), full, "pc {p:#x}");
            }
        }
        // A few rows over a wide range get no index.
        assert_eq!(chunk_index(&[pc(0), pc(1 << 30)]), None);
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
    /// Entries of their chunk indices.
    pub chunks: u64,
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
        out.chunks += chunk_index(&table.rows).map_or(0, |(_, c)| c.len() as u64);
        out.names.push(
            Path::new(&m.path)
                .file_name()
                .map_or_else(|| m.path.clone(), |n| n.to_string_lossy().into_owned()),
        );
    }
    out.time = t.elapsed();
    Ok(out)
}
