//! The user-stack unwinder's tables, as the eBPF side reads them.
//!
//! Userspace turns each executable file's `.eh_frame` (and `.debug_frame`)
//! into a sorted run of [`UnwindRow`]s, one row per address where the rule
//! to find the caller changes (x86-64 only). The eBPF unwinder finds a PC's
//! mapping, subtracts the mapping's bias to get the file's own virtual
//! address, and takes the last row at or below it.

/// One unwind row: from `pc` (a virtual address of the file, as in its ELF
/// headers) up to the next row's `pc`, how to find the caller's frame.
///
/// The return address is always at CFA − 8 on x86-64; a file whose CFI
/// says otherwise gets [`CFA_UNSUPPORTED`] rows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnwindRow {
    /// First address the row covers (file virtual address).
    pub pc: u32,
    /// Added to the register [`UnwindRow::cfa_type`] names.
    pub cfa_offset: i32,
    /// With [`RBP_AT_CFA`]: the caller's rbp is saved at CFA + this.
    pub rbp_offset: i16,
    /// One of the `CFA_*` constants.
    pub cfa_type: u8,
    /// One of the `RBP_*` constants.
    pub rbp_type: u8,
}

/// No unwind information for this address: a gap between functions' CFI
/// (or the end of the last one). The unwinder falls back to frame pointers.
pub const CFA_NONE: u8 = 0;
/// CFA = rsp + `cfa_offset`.
pub const CFA_RSP: u8 = 1;
/// CFA = rbp + `cfa_offset`.
pub const CFA_RBP: u8 = 2;
/// A PLT stub's rule, the expression the linkers emit for `.plt`:
/// CFA = rsp + 8, plus 8 more when `(rip & 15) >= cfa_offset` (after the
/// stub's `push`).
pub const CFA_PLT: u8 = 3;
/// A signal trampoline (an FDE with the `S` augmentation, e.g. glibc's
/// `__restore_rt`): rsp points at the `ucontext`; the interrupted rip, rsp
/// and rbp are in its `sigcontext`.
pub const CFA_SIGNAL: u8 = 4;
/// The return address is undefined: the outermost frame of a thread or
/// process (`_start`, `clone3`). The stack is complete.
pub const CFA_END: u8 = 5;
/// A rule the unwinder does not evaluate (a DWARF expression other than
/// the PLT's, a CFA based on another register, the return address not at
/// CFA − 8). The walk stops here and counts it.
pub const CFA_UNSUPPORTED: u8 = 6;

/// The caller's rbp is the same as this frame's (not saved).
pub const RBP_SAME: u8 = 0;
/// The caller's rbp is saved at CFA + `rbp_offset`.
pub const RBP_AT_CFA: u8 = 1;
/// The caller's rbp cannot be recovered (a rule other than the two above).
/// A later frame whose CFA is rbp-based then stops the walk.
pub const RBP_UNKNOWN: u8 = 2;

/// Where, in a signal frame's `ucontext` (at the trampoline's rsp), the
/// interrupted registers are: `uc_mcontext` (at 40) is a `sigcontext`,
/// r8–r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip.
pub const SIGFRAME_RBP: u64 = 40 + 10 * 8;
pub const SIGFRAME_RSP: u64 = 40 + 15 * 8;
pub const SIGFRAME_RIP: u64 = 40 + 16 * 8;

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding (4 + 4 + 2 + 1 + 1 = 12).
unsafe impl aya::Pod for UnwindRow {}

impl UnwindRow {
    /// The row's rule: all of it but its address.
    #[must_use]
    pub const fn rule(&self) -> UnwindRule {
        UnwindRule {
            cfa_offset: self.cfa_offset,
            rbp_offset: self.rbp_offset,
            cfa_type: self.cfa_type,
            rbp_type: self.rbp_type,
        }
    }
}

/// How to find the caller's frame: an [`UnwindRow`] but its address. Few
/// rules cover all the rows of a system (3.8 k distinct ones in the 19.7 M
/// rows of Debian's libraries, QEMU, libvirt and five Rust toolchains), so
/// the maps keep each rule once, in `UNWIND_RULES`, and a row as its
/// address and its rule's index ([`MapRow`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRule {
    pub cfa_offset: i32,
    pub rbp_offset: i16,
    pub cfa_type: u8,
    pub rbp_type: u8,
}

/// A row as `UNWIND_ROWS` keeps it: 8 bytes, where the row with its rule
/// took 16 (an array map's elements are 8-byte aligned).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapRow {
    /// First address the row covers (file virtual address).
    pub pc: u32,
    /// Its rule's index in `UNWIND_RULES`.
    pub rule: u32,
}

/// Distinct rules `UNWIND_RULES` holds (512 KiB); a table with a rule
/// beyond them is left out, as one that does not fit.
pub const MAX_UNWIND_RULES: u32 = 1 << 16;

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding (4 + 2 + 1 + 1 = 8).
unsafe impl aya::Pod for UnwindRule {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding (4 + 4 = 8).
unsafe impl aya::Pod for MapRow {}

/// Most executable mappings of one process the unwinder knows (QEMU maps
/// about 60, libvirtd about 80); the rest are left out and counted.
pub const MAX_PROC_MAPPINGS: usize = 256;
const _: () = assert!(
    MAX_PROC_MAPPINGS.is_power_of_two(),
    "the unwinder masks indices"
);

/// A file's rows are found through an index of its addresses in chunks of
/// `1 << ROW_CHUNK_SHIFT` bytes: a chunk's [`RowChunk`] bounds the binary
/// search to the few rows that can cover it. A search of all of QEMU's
/// 250 k rows touches 18 cache lines (and pages) spread over 4 MB, and
/// that was half of a frame's cost.
pub const ROW_CHUNK_SHIFT: u32 = 10;

/// The rows (indices into the file's own run) that can cover one chunk:
/// the row for an address of the chunk is in `lo..hi`, or there is none
/// (`lo` is 0 and row 0 starts above the address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowChunk {
    /// The last row starting at or below the chunk's first address (0 if
    /// none does).
    pub lo: u32,
    /// One past the last row starting inside the chunk.
    pub hi: u32,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding.
unsafe impl aya::Pod for RowChunk {}

/// One executable mapping of a process, as the unwinder reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    /// Address minus bias = the file's own virtual address.
    pub bias: u64,
    /// The file's rows in `UNWIND_ROWS` ([`MapRow`]s): `rows_start..rows_start + rows_len`
    /// (`rows_len` 0: no table for this file; frame pointers there).
    pub rows_start: u32,
    pub rows_len: u32,
    /// The file's chunk index in `UNWIND_CHUNKS`: `chunks_start..
    /// chunks_start + chunks_len`, for the chunks from `chunk_base` (the
    /// first row's address `>> ROW_CHUNK_SHIFT`) to the last row's
    /// (`chunks_len` 0: no index; the search takes all the rows).
    pub chunks_start: u32,
    pub chunks_len: u32,
    /// [`NO_ROOM`] with `rows_len` 0: the file has a table, but it did not
    /// fit in `UNWIND_ROWS`.
    pub chunk_base: u32,
    pub pad: u32,
}

/// [`UnwindMapping::chunk_base`] of a file whose table did not fit.
pub const NO_ROOM: u32 = u32::MAX;

impl UnwindMapping {
    pub const EMPTY: Self = Self {
        start: 0,
        end: 0,
        bias: 0,
        rows_start: 0,
        rows_len: 0,
        chunks_start: 0,
        chunks_len: 0,
        chunk_base: 0,
        pad: 0,
    };
}

/// The executable mappings of one process, sorted by `start`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcMappings {
    pub count: u32,
    pub pad: u32,
    pub mappings: [UnwindMapping; MAX_PROC_MAPPINGS],
}

impl ProcMappings {
    pub const EMPTY: Self = Self {
        count: 0,
        pad: 0,
        mappings: [UnwindMapping::EMPTY; MAX_PROC_MAPPINGS],
    };
}

/// A user stack that did not reach its thread's or process's entry ends
/// with this frame plus the [`UnwindStop`] (`--unwind dwarf`): flame graphs
/// show where and why a stack was cut, as `[user stack cut: …]`. No user
/// address is this high.
pub const STACK_CUT: u64 = 0xffff_ffff_ffff_ff00;

/// A thread that blocks again at a remembered site (same ip, sp, bp and
/// return address) reuses the user stack walked there only if the return
/// addresses of its first `SITE_CHECK_FRAMES` frames are still in the same
/// stack slots: the same function reached from sibling callers at the same
/// depth (two callers of `sleeper()`) has the same four registers but other
/// callers. The slots' word offsets from sp (+ 1) are kept packed, 16 bits
/// each, in a site's `user_check`; 0 ends the list.
pub const SITE_CHECK_FRAMES: usize = 8;
/// The slots checked lie within this many bytes above sp (read in one go).
pub const SITE_CHECK_BYTES: usize = 2048;

/// Why a user-stack walk ended (one count per stack), or how a frame was
/// found (one count per frame), per window.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnwindStop {
    /// Reached a frame whose return address is undefined (`_start`,
    /// `clone3`): the whole stack.
    Complete = 0,
    /// A PC in no mapping the unwinder knows for its process.
    NoMapping = 1,
    /// A PC in a file without unwind tables, and no frame pointer chain to
    /// follow from there.
    NoTable = 2,
    /// A PC in a file's gap between functions' CFI, and no frame pointer
    /// chain to follow from there.
    NoRow = 3,
    /// A rule the unwinder does not evaluate ([`CFA_UNSUPPORTED`], or a
    /// CFA based on an rbp that could not be recovered).
    Unsupported = 4,
    /// Reading the user stack failed (paged out, or a wrong CFA).
    ReadFault = 5,
    /// `--max-user-frames` reached.
    FrameLimit = 6,
    /// The process's tables were not loaded yet: the whole stack came from
    /// frame pointers (the kernel's walk), and userspace is asked to load
    /// them.
    NotLoaded = 7,
    /// A frame-pointer step ended the stack (rbp 0 or not above rsp).
    FpEnd = 8,
    /// A return address of 0 or a stack pointer that did not grow: the end
    /// of a stack that marks no outermost frame.
    ZeroReturn = 9,
    /// Per frame: found from the tables.
    FramesDwarf = 10,
    /// Per frame: found by frame pointer, where a PC had no table or row.
    FramesFp = 11,
    /// A PC in a file whose table did not fit in the rows map (and no frame
    /// pointer chain to follow from there): a loss, `--unwind-max-rows`
    /// raises the room.
    TablesFull = 12,
}

impl UnwindStop {
    pub const COUNT: u32 = 13;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::Complete,
        Self::NoMapping,
        Self::NoTable,
        Self::NoRow,
        Self::Unsupported,
        Self::ReadFault,
        Self::FrameLimit,
        Self::NotLoaded,
        Self::FpEnd,
        Self::ZeroReturn,
        Self::FramesDwarf,
        Self::FramesFp,
        Self::TablesFull,
    ];

    /// The stop a [`STACK_CUT`] frame names.
    #[must_use]
    pub fn of_cut(frame: u64) -> Option<Self> {
        let i = frame.checked_sub(STACK_CUT)?;
        Self::ALL.get(usize::try_from(i).ok()?).copied()
    }

    /// The name the profile and summary use.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::NoMapping => "no mapping",
            Self::NoTable => "no table for the file",
            Self::NoRow => "no row for the PC",
            Self::Unsupported => "unsupported rule",
            Self::ReadFault => "read fault",
            Self::FrameLimit => "frame limit",
            Self::NotLoaded => "tables not loaded yet",
            Self::FpEnd => "frame-pointer chain ended",
            Self::ZeroReturn => "return address 0",
            Self::FramesDwarf => "frames from tables",
            Self::FramesFp => "frames by frame pointer",
            Self::TablesFull => "unwind tables full (raise --unwind-max-rows)",
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding.
unsafe impl aya::Pod for UnwindMapping {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers and an array of Pod, no padding.
unsafe impl aya::Pod for ProcMappings {}

/// Bytes of user stack an [`UnwindSample`] holds, from the stack pointer
/// up.
pub const VERIFY_STACK_BYTES: usize = 16384;

/// One walk as `--verify-unwind` checks it: the frames the eBPF unwinder
/// found, with the registers it started from and a copy of the user stack
/// above `sp`, so that userspace can unwind the same stack again with
/// another unwinder and compare (`UNWIND_VERIFY` ring buffer).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnwindSample {
    pub tgid: u32,
    pub pid: u32,
    /// Frames in `ips` (frame 0 is the exact PC, the others return
    /// addresses).
    pub n: u32,
    /// Bytes of `stack` copied from `sp`: the largest of the sizes tried
    /// that could be read (a stack near its top has less above `sp`).
    pub copied: u32,
    /// Why the walk ended (`UnwindStop`).
    pub stop: u32,
    pub pad: u32,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub ips: [u64; crate::record::MAX_STACK_DEPTH],
    pub stack: [u8; VERIFY_STACK_BYTES],
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integers and arrays of them, padding spelled out (6 × 4
// + 3 × 8 + 127 × 8 + 16384, every field at its natural alignment).
unsafe impl aya::Pod for UnwindSample {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_has_no_padding() {
        assert_eq!(core::mem::size_of::<UnwindRow>(), 12);
        assert_eq!(core::mem::align_of::<UnwindRow>(), 4);
        assert_eq!(core::mem::size_of::<UnwindRule>(), 8);
        assert_eq!(core::mem::size_of::<MapRow>(), 8);
        assert_eq!(core::mem::size_of::<UnwindMapping>(), 48);
        assert_eq!(core::mem::size_of::<RowChunk>(), 8);
        assert_eq!(
            core::mem::size_of::<ProcMappings>(),
            8 + 48 * MAX_PROC_MAPPINGS
        );
        assert_eq!(
            core::mem::size_of::<UnwindSample>(),
            6 * 4 + 3 * 8 + 8 * crate::record::MAX_STACK_DEPTH + VERIFY_STACK_BYTES
        );
    }
}
