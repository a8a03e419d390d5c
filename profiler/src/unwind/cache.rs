//! The on-disk cache of unwind tables: one `<key>.rows` file per ELF file,
//! named by its GNU build-id (or, without one, its inode and mtime).
//!
//! The format is little-endian: a 48-byte header — magic, format version,
//! row size, row count, the [`TableStats`] counters, a CRC-32 of everything
//! else — then the rows, 12 bytes each in [`UnwindRow`]'s field order. A
//! file that is short, corrupt, of another version or not sorted is
//! ignored and rebuilt. The checksum catches accidents, not forgeries: the
//! cache directory must be writable by root only, as its rows go to the
//! kernel.

use std::{
    fmt,
    fs::{self, File},
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use object::{
    ReadCache, ReadRef,
    elf::{ELF_NOTE_GNU, FileHeader64, NT_GNU_BUILD_ID},
    read::elf::{FileHeader as _, ProgramHeader as _},
};
use profiler_common::unwind::{CFA_UNSUPPORTED, RBP_UNKNOWN, UnwindRow};

use super::table::{TableError, TableStats, UnwindTable, build_from};

const MAGIC: [u8; 8] = *b"hvpunwnd";
/// Bump when the rows [`build_table`](super::build_table) makes for a file
/// change, so that old caches are rebuilt.
const VERSION: u32 = 1;
const ROW_SIZE: usize = 12;
const HEADER_SIZE: usize = 48;
/// Where the checksum is in the header; it covers the rest of the file.
const CHECKSUM_AT: usize = 44;

/// What identifies an ELF file's contents, for the cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FileKey {
    /// The GNU build-id note: the same for every copy of the file.
    BuildId(Vec<u8>),
    /// No build-id: this file as it is now.
    Inode {
        dev: u64,
        ino: u64,
        size: u64,
        mtime_sec: i64,
        mtime_nsec: i64,
    },
}

impl fmt::Display for FileKey {
    /// The cache file's stem.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BuildId(id) => {
                f.write_str("buildid-")?;
                id.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            Self::Inode {
                dev,
                ino,
                size,
                mtime_sec,
                mtime_nsec,
            } => write!(f, "inode-{dev:x}-{ino}-{size}-{mtime_sec}.{mtime_nsec:09}"),
        }
    }
}

/// File identity for caching: the GNU build-id if the file has one, else
/// (dev, inode, size, mtime). Reads only the ELF headers and notes.
pub fn file_key(path: &Path) -> Result<FileKey, TableError> {
    let file = open(path)?;
    key_of(&file, path)
}

/// The unwind table of the ELF file at `path`, from `cache_dir/<key>.rows`
/// if a valid one is there (then `true`), else built and stored there. A
/// cache that cannot be written (a read-only home) costs the rebuild next
/// time, not the table.
pub fn table_for(path: &Path, cache_dir: &Path) -> Result<(UnwindTable, bool), TableError> {
    table_of(&open(path)?, path, cache_dir)
}

/// [`table_for`] of a file already open (`path` names it in errors).
pub fn table_of(
    file: &File,
    path: &Path,
    cache_dir: &Path,
) -> Result<(UnwindTable, bool), TableError> {
    let key = key_of(file, path)?;
    let cache_path = cache_dir.join(format!("{key}.rows"));
    if let Ok(bytes) = fs::read(&cache_path)
        && let Some(table) = decode(&bytes)
    {
        return Ok((table, true));
    }
    // Through a read cache: of a large binary such as QEMU, only the
    // headers, symbol tables and CFI sections are read, not the code.
    let table = build_from(&ReadCache::new(file)).map_err(|source| TableError::InFile {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    if let Err(e) = store(cache_dir, &cache_path, &encode(&table)) {
        static TOLD: std::sync::Once = std::sync::Once::new();
        TOLD.call_once(|| {
            eprintln!(
                "hvprof: warning: {e}; unwind tables are built again at each recording (--unwind-cache DIR names a writable directory)"
            );
        });
    }
    Ok((table, false))
}

fn open(path: &Path) -> Result<File, TableError> {
    File::open(path).map_err(|source| TableError::Io {
        action: "open",
        path: path.to_owned(),
        source,
    })
}

fn key_of(file: &File, path: &Path) -> Result<FileKey, TableError> {
    if let Some(id) = build_id(&ReadCache::new(file)) {
        return Ok(FileKey::BuildId(id));
    }
    let meta = file.metadata().map_err(|source| TableError::Io {
        action: "stat",
        path: path.to_owned(),
        source,
    })?;
    Ok(FileKey::Inode {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
    })
}

/// The GNU build-id from the program headers' notes (what the loader
/// maps, so present even in stripped files). `None` for anything else,
/// including files that are not ELF: building their table will say why.
fn build_id<'data, R: ReadRef<'data>>(data: R) -> Option<Vec<u8>> {
    let header = FileHeader64::<object::Endianness>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    for segment in header.program_headers(endian, data).ok()? {
        let Ok(Some(mut notes)) = segment.notes(endian, data) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.name() == ELF_NOTE_GNU
                && note.n_type(endian) == NT_GNU_BUILD_ID
                && !note.desc().is_empty()
            {
                return Some(note.desc().to_vec());
            }
        }
    }
    None
}

/// Writes the cache file whole or not at all: a reader never sees half a
/// file, and two writers of one key leave one of their (equal) files.
fn store(cache_dir: &Path, cache_path: &Path, bytes: &[u8]) -> Result<(), TableError> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let io_error = |action, path: &Path| {
        let path = path.to_owned();
        move |source| TableError::Io {
            action,
            path,
            source,
        }
    };
    fs::create_dir_all(cache_dir)
        .map_err(io_error("create the unwind cache directory", cache_dir))?;
    // Unique per writer, in the same directory so that the rename is atomic.
    let mut tmp_name = cache_path.as_os_str().to_owned();
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    tmp_name.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp_path = Path::new(&tmp_name);
    let written = File::create(tmp_path)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| fs::rename(tmp_path, cache_path));
    if written.is_err() {
        // Best effort: the error below is the one to report.
        let _ = fs::remove_file(tmp_path);
    }
    written.map_err(io_error("write the unwind cache file", cache_path))
}

fn checksum(header: &[u8], rows: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header);
    hasher.update(rows);
    hasher.finalize()
}

fn encode(table: &UnwindTable) -> Vec<u8> {
    let stats = &table.stats;
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let mut bytes = Vec::with_capacity(HEADER_SIZE + table.rows.len() * ROW_SIZE);
    bytes.extend_from_slice(&MAGIC);
    for word in [
        VERSION,
        count(ROW_SIZE),
        count(table.rows.len()),
        count(stats.fdes),
        count(stats.unsupported_rows),
        count(stats.plt_rows),
        count(stats.signal_rows),
        count(stats.bad_fdes),
        u32::from(stats.from_debug_frame),
    ] {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    bytes.extend_from_slice(&[0; 4]);
    for row in &table.rows {
        bytes.extend_from_slice(&row.pc.to_le_bytes());
        bytes.extend_from_slice(&row.cfa_offset.to_le_bytes());
        bytes.extend_from_slice(&row.rbp_offset.to_le_bytes());
        bytes.push(row.cfa_type);
        bytes.push(row.rbp_type);
    }
    let sum = checksum(&bytes[..CHECKSUM_AT], &bytes[HEADER_SIZE..]);
    bytes[CHECKSUM_AT..HEADER_SIZE].copy_from_slice(&sum.to_le_bytes());
    bytes
}

/// The table in a cache file, `None` unless it is whole and well-formed.
fn decode(bytes: &[u8]) -> Option<UnwindTable> {
    let (header, body) = bytes.split_at_checked(HEADER_SIZE)?;
    let (magic, words) = header.split_at(MAGIC.len());
    let word = |i: usize| -> Option<u32> {
        let b = words.get(i * 4..i * 4 + 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    };
    let usize_word = |i| word(i).and_then(|w| usize::try_from(w).ok());
    if magic != MAGIC || word(0)? != VERSION || usize_word(1)? != ROW_SIZE {
        return None;
    }
    let count = usize_word(2)?;
    if body.len() != count.checked_mul(ROW_SIZE)? {
        return None;
    }
    if checksum(&header[..CHECKSUM_AT], body) != word(9)? {
        return None;
    }
    let mut rows = Vec::with_capacity(count);
    let (chunks, rest) = body.as_chunks::<ROW_SIZE>();
    if !rest.is_empty() {
        return None;
    }
    for &[p0, p1, p2, p3, c0, c1, c2, c3, r0, r1, cfa_type, rbp_type] in chunks {
        let row = UnwindRow {
            pc: u32::from_le_bytes([p0, p1, p2, p3]),
            cfa_offset: i32::from_le_bytes([c0, c1, c2, c3]),
            rbp_offset: i16::from_le_bytes([r0, r1]),
            cfa_type,
            rbp_type,
        };
        let sorted = rows.last().is_none_or(|last: &UnwindRow| last.pc < row.pc);
        if !sorted || row.cfa_type > CFA_UNSUPPORTED || row.rbp_type > RBP_UNKNOWN {
            return None;
        }
        rows.push(row);
    }
    let stats = TableStats {
        fdes: usize_word(3)?,
        rows: count,
        unsupported_rows: usize_word(4)?,
        plt_rows: usize_word(5)?,
        signal_rows: usize_word(6)?,
        bad_fdes: usize_word(7)?,
        from_debug_frame: word(8)? != 0,
    };
    Some(UnwindTable { rows, stats })
}

#[cfg(test)]
mod tests {
    use profiler_common::unwind::{CFA_NONE, CFA_PLT, CFA_RBP, RBP_AT_CFA};

    use super::*;

    fn table() -> UnwindTable {
        let rows = vec![
            UnwindRow {
                pc: 0x1000,
                cfa_offset: 16,
                cfa_type: CFA_PLT,
                ..UnwindRow::default()
            },
            UnwindRow {
                pc: 0x1040,
                cfa_offset: -0x7fff_0000,
                rbp_offset: -16,
                cfa_type: CFA_RBP,
                rbp_type: RBP_AT_CFA,
            },
            UnwindRow {
                pc: 0xffff_fff0,
                cfa_type: CFA_NONE,
                ..UnwindRow::default()
            },
        ];
        let stats = TableStats {
            fdes: 2,
            rows: rows.len(),
            unsupported_rows: 0,
            plt_rows: 1,
            signal_rows: 0,
            bad_fdes: 3,
            from_debug_frame: true,
        };
        UnwindTable { rows, stats }
    }

    /// Recomputes the checksum, as a file that is well-framed but wrong
    /// inside would have it.
    fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
        let sum = checksum(&bytes[..CHECKSUM_AT], &bytes[HEADER_SIZE..]);
        bytes[CHECKSUM_AT..HEADER_SIZE].copy_from_slice(&sum.to_le_bytes());
        bytes
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&table());
        assert_eq!(bytes.len(), HEADER_SIZE + 3 * ROW_SIZE);
        assert_eq!(decode(&bytes), Some(table()));
        let empty = UnwindTable::default();
        assert_eq!(decode(&encode(&empty)), Some(empty));
    }

    #[test]
    fn damaged_files_are_rejected() {
        let good = encode(&table());
        for len in 0..good.len() {
            assert_eq!(decode(&good[..len]), None, "cut at {len}");
        }
        assert_eq!(decode(&[good.as_slice(), &[0; ROW_SIZE]].concat()), None);
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut flipped = good.clone();
                flipped[i] ^= 1 << bit;
                assert_eq!(decode(&flipped), None, "bit {bit} of byte {i}");
            }
        }
    }

    #[test]
    fn well_sealed_nonsense_is_rejected() {
        let good = encode(&table());
        let row = |i: usize| HEADER_SIZE + i * ROW_SIZE;
        let mut unsorted = good.clone();
        unsorted[row(1)..row(1) + 4].copy_from_slice(&0x1000u32.to_le_bytes());
        let mut bad_cfa_type = good.clone();
        bad_cfa_type[row(0) + 10] = CFA_UNSUPPORTED + 1;
        let mut bad_rbp_type = good.clone();
        bad_rbp_type[row(0) + 11] = RBP_UNKNOWN + 1;
        let mut huge_count = good.clone();
        huge_count[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut old_version = good.clone();
        old_version[8..12].copy_from_slice(&(VERSION - 1).to_le_bytes());
        for (what, bytes) in [
            ("unsorted", unsorted),
            ("CFA type", bad_cfa_type),
            ("rbp type", bad_rbp_type),
            ("row count", huge_count),
            ("version", old_version),
        ] {
            assert_eq!(decode(&reseal(bytes)), None, "{what}");
        }
        assert_eq!(decode(&reseal(good)), Some(table()));
    }

    #[test]
    fn keys_name_files() {
        assert_eq!(
            FileKey::BuildId(vec![0x0a, 0xbc, 0x01]).to_string(),
            "buildid-0abc01"
        );
        let inode = FileKey::Inode {
            dev: 0xfd01,
            ino: 42,
            size: 1000,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 5,
        };
        assert_eq!(inode.to_string(), "inode-fd01-42-1000-1700000000.000000005");
        // Not an ELF file: keyed by inode; its table is an error.
        let key = file_key(Path::new("/proc/self/status")).unwrap();
        assert!(matches!(key, FileKey::Inode { .. }));
    }
}
