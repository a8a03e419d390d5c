//! One ELF file's call-frame information turned into [`UnwindRow`]s.
//!
//! Every FDE of `.eh_frame` (and of `.debug_frame`, for the code `.eh_frame`
//! leaves out) is evaluated with gimli; each of its rows becomes one
//! [`UnwindRow`] in the few shapes the eBPF unwinder evaluates, and
//! everything else becomes [`CFA_UNSUPPORTED`], so that the walk stops
//! where it would guess.

use std::{io, path::PathBuf};

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, FrameDescriptionEntry,
    LittleEndian, RegisterRule, UnwindContext, UnwindSection, UnwindTableRow, X86_64,
    constants as dw,
};
use object::{Architecture, Object, ObjectSection, ReadRef, read::elf::ElfFile64};
use profiler_common::unwind::{
    CFA_END, CFA_NONE, CFA_PLT, CFA_RBP, CFA_RSP, CFA_SIGNAL, CFA_UNSUPPORTED, RBP_AT_CFA,
    RBP_SAME, RBP_UNKNOWN, UnwindRow,
};
use thiserror::Error;

/// The rows of one file, sorted by `pc`, with no two consecutive rows alike
/// but for their `pc`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnwindTable {
    pub rows: Vec<UnwindRow>,
    pub stats: TableStats,
}

/// What went into a table. A file with neither `.eh_frame` nor
/// `.debug_frame` has an empty table: `fdes` and `rows` are 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// FDEs whose rows are in the table.
    pub fdes: usize,
    /// Rows in the table.
    pub rows: usize,
    /// Rows with [`CFA_UNSUPPORTED`].
    pub unsupported_rows: usize,
    /// Rows with [`CFA_PLT`].
    pub plt_rows: usize,
    /// Rows with [`CFA_SIGNAL`].
    pub signal_rows: usize,
    /// FDEs gimli could not parse (left out) or evaluate (one
    /// [`CFA_UNSUPPORTED`] row over their range).
    pub bad_fdes: usize,
    /// Some FDEs came from `.debug_frame`.
    pub from_debug_frame: bool,
}

#[derive(Debug, Error)]
pub enum TableError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("not a 64-bit ELF file: {source}")]
    Elf { source: object::Error },
    #[error("the ELF file is for {arch}: hvprof builds unwind tables for x86-64 only")]
    Architecture { arch: String },
    #[error("cannot read the ELF section {section}: {source}")]
    Section {
        section: &'static str,
        source: object::Error,
    },
    #[error("{section} is malformed: {source}")]
    Cfi {
        section: &'static str,
        source: gimli::Error,
    },
    #[error(
        "the file's code reaches {address:#x}, above 4 GiB: unwind rows hold 32-bit file addresses"
    )]
    AddressTooHigh { address: u64 },
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        source: Box<TableError>,
    },
}

/// Builds the rows of one ELF file's bytes (x86-64 only; other
/// architectures are an error).
pub fn build_table(elf: &[u8]) -> Result<UnwindTable, TableError> {
    build_from(elf)
}

/// The last row at or below `pc`: the rule in force there. `None` below
/// the first row. The eBPF unwinder does the same search.
#[must_use]
pub fn find_row(rows: &[UnwindRow], pc: u32) -> Option<&UnwindRow> {
    let after = rows.partition_point(|row| row.pc <= pc);
    rows.get(after.checked_sub(1)?)
}

/// [`build_table`] over any [`ReadRef`], so that the cache reads only the
/// headers and the CFI sections of a large file.
pub(super) fn build_from<'data, R: ReadRef<'data>>(data: R) -> Result<UnwindTable, TableError> {
    let file = ElfFile64::<object::Endianness, R>::parse(data)
        .map_err(|source| TableError::Elf { source })?;
    if file.architecture() != Architecture::X86_64 {
        return Err(TableError::Architecture {
            arch: format!("{:?}", file.architecture()),
        });
    }
    let address_of = |name: &str| file.section_by_name(name).map(|s| s.address());
    let mut ctx = UnwindContext::new();
    let mut stats = TableStats::default();

    let mut fdes = Vec::new();
    if let Some((address, data)) = section_data(&file, ".eh_frame")? {
        let mut bases = BaseAddresses::default().set_eh_frame(address);
        if let Some(text) = address_of(".text") {
            bases = bases.set_text(text);
        }
        if let Some(got) = address_of(".got") {
            bases = bases.set_got(got);
        }
        let section = EhFrame::new(data, LittleEndian);
        collect(
            &section,
            &bases,
            ".eh_frame",
            &mut ctx,
            &mut fdes,
            &mut stats,
        )?;
    }
    if let Some((_, data)) = section_data(&file, ".debug_frame")? {
        let mut section = DebugFrame::new(data, LittleEndian);
        section.set_address_size(8);
        let mut extra = Vec::new();
        let bases = BaseAddresses::default();
        collect(
            &section,
            &bases,
            ".debug_frame",
            &mut ctx,
            &mut extra,
            &mut stats,
        )?;
        // .eh_frame is what the program's own unwinder trusts: .debug_frame
        // only fills in code that .eh_frame does not describe.
        let covered = union(fdes.iter().map(|f| (f.start, f.end)).collect());
        extra.retain(|f| !overlaps(&covered, f.start, f.end));
        stats.from_debug_frame = !extra.is_empty();
        fdes.append(&mut extra);
    }

    stats.fdes = fdes.len();
    let rows = assemble(&fdes);
    stats.rows = rows.len();
    let count = |kind| rows.iter().filter(|r| r.cfa_type == kind).count();
    stats.unsupported_rows = count(CFA_UNSUPPORTED);
    stats.plt_rows = count(CFA_PLT);
    stats.signal_rows = count(CFA_SIGNAL);
    Ok(UnwindTable { rows, stats })
}

type Slice<'data> = EndianSlice<'data, LittleEndian>;

/// A section's address and bytes, `None` if the file has no such section
/// (or has it compressed: only `.debug_frame` can be, and system libraries
/// ship it, if at all, in separate debug files).
fn section_data<'data, R: ReadRef<'data>>(
    file: &ElfFile64<'data, object::Endianness, R>,
    name: &'static str,
) -> Result<Option<(u64, &'data [u8])>, TableError> {
    let error = |source| TableError::Section {
        section: name,
        source,
    };
    let Some(section) = file.section_by_name(name) else {
        return Ok(None);
    };
    let range = section.compressed_file_range().map_err(error)?;
    if range.format != object::CompressionFormat::None {
        return Ok(None);
    }
    let data = section.data().map_err(error)?;
    Ok((!data.is_empty()).then_some((section.address(), data)))
}

/// One FDE's address range and rows (the first at `start`).
#[derive(Debug)]
pub(super) struct FdeRows {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) rows: Vec<UnwindRow>,
}

/// Evaluates every FDE of one section into `out`.
fn collect<'data, S>(
    section: &S,
    bases: &BaseAddresses,
    name: &'static str,
    ctx: &mut UnwindContext<usize>,
    out: &mut Vec<FdeRows>,
    stats: &mut TableStats,
) -> Result<(), TableError>
where
    S: UnwindSection<Slice<'data>>,
{
    let mut entries = section.entries(bases);
    loop {
        // The entries are framed by their lengths: past a broken one there
        // is nothing to trust.
        let entry = match entries.next() {
            Ok(Some(entry)) => entry,
            Ok(None) => return Ok(()),
            Err(source) => {
                return Err(TableError::Cfi {
                    section: name,
                    source,
                });
            }
        };
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(S::cie_from_offset) else {
            stats.bad_fdes += 1;
            continue;
        };
        let start = fde.initial_address();
        let end = start.saturating_add(fde.len());
        if start == end {
            continue;
        }
        if end > u64::from(u32::MAX) {
            return Err(TableError::AddressTooHigh { address: end });
        }
        let rows = fde_rows(section, bases, ctx, &fde, end).unwrap_or_else(|_| {
            stats.bad_fdes += 1;
            vec![UnwindRow {
                pc: u32::try_from(start).unwrap_or(u32::MAX),
                cfa_type: CFA_UNSUPPORTED,
                ..UnwindRow::default()
            }]
        });
        out.push(FdeRows { start, end, rows });
    }
}

/// The rows of one FDE whose range is below 4 GiB.
fn fde_rows<'data, S: UnwindSection<Slice<'data>>>(
    section: &S,
    bases: &BaseAddresses,
    ctx: &mut UnwindContext<usize>,
    fde: &FrameDescriptionEntry<Slice<'data>>,
    end: u64,
) -> gimli::Result<Vec<UnwindRow>> {
    let cie = fde.cie();
    let signal = cie.is_signal_trampoline();
    let ra_is_rip = cie.return_address_register() == X86_64::RA;
    let mut rows = Vec::new();
    let mut table = fde.rows(section, bases, ctx)?;
    while let Some(row) = table.next_row()? {
        let start = row.start_address();
        if start >= end || start >= row.end_address() {
            continue;
        }
        let pc = u32::try_from(start).map_err(|_| gimli::Error::AddressOverflow)?;
        let mut unwind_row = if signal {
            // The trampoline's own CFI describes the sigcontext with
            // expressions; the unwinder reads the sigcontext directly.
            rule(CFA_SIGNAL, 0)
        } else if !ra_is_rip {
            rule(CFA_UNSUPPORTED, 0)
        } else {
            convert(section, row)
        };
        unwind_row.pc = pc;
        rows.push(unwind_row);
    }
    Ok(rows)
}

/// A row of `cfa_type` with no offsets (the rbp rule does not matter).
fn rule(cfa_type: u8, cfa_offset: i32) -> UnwindRow {
    UnwindRow {
        cfa_type,
        cfa_offset,
        ..UnwindRow::default()
    }
}

/// One gimli row (not a signal frame's) in the eBPF unwinder's terms; `pc`
/// is left 0.
pub(super) fn convert<'data, S: UnwindSection<Slice<'data>>>(
    section: &S,
    row: &UnwindTableRow<usize>,
) -> UnwindRow {
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => return rule(CFA_END, 0),
        Some(RegisterRule::Offset(-8)) => {}
        _ => return rule(CFA_UNSUPPORTED, 0),
    }
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let cfa_type = match *register {
                X86_64::RSP => CFA_RSP,
                X86_64::RBP => CFA_RBP,
                _ => return rule(CFA_UNSUPPORTED, 0),
            };
            match i32::try_from(*offset) {
                Ok(offset) => rule(cfa_type, offset),
                Err(_) => return rule(CFA_UNSUPPORTED, 0),
            }
        }
        CfaRule::Expression(expression) => {
            match expression
                .get(section)
                .ok()
                .and_then(|e| plt_threshold(e.0.slice()))
            {
                Some(threshold) => rule(CFA_PLT, threshold),
                None => return rule(CFA_UNSUPPORTED, 0),
            }
        }
    };
    let (rbp_type, rbp_offset) = match row.register(X86_64::RBP) {
        // No rule: rbp is callee-saved on x86-64, so unchanged.
        None | Some(RegisterRule::SameValue) => (RBP_SAME, 0),
        Some(RegisterRule::Offset(offset)) => match i16::try_from(offset) {
            Ok(offset) => (RBP_AT_CFA, offset),
            Err(_) => (RBP_UNKNOWN, 0),
        },
        Some(_) => (RBP_UNKNOWN, 0),
    };
    UnwindRow {
        rbp_type,
        rbp_offset,
        ..cfa
    }
}

/// The CFA expression GNU ld and gold emit for `.plt` entries:
/// `rsp + 8 + (((rip & 15) >= N) << 3)`, 8 more once the entry has pushed
/// its relocation index. Returns N: 11 in the classic entry (a 6-byte
/// `jmp *GOT(%rip)`, then the 5-byte `push`), 9 in ld's IBT entry
/// (`endbr64` first, `-z ibtplt`). Any N in 0..=15 reads the same way.
fn plt_threshold(expression: &[u8]) -> Option<i32> {
    const HEAD: [u8; 6] = [
        dw::DW_OP_breg7.0,
        8,
        dw::DW_OP_breg16.0,
        0,
        dw::DW_OP_lit15.0,
        dw::DW_OP_and.0,
    ];
    const TAIL: [u8; 4] = [
        dw::DW_OP_ge.0,
        dw::DW_OP_lit3.0,
        dw::DW_OP_shl.0,
        dw::DW_OP_plus.0,
    ];
    let (head, rest) = expression.split_at_checked(HEAD.len())?;
    let (&lit, tail) = rest.split_first()?;
    if head != HEAD || tail != TAIL {
        return None;
    }
    match lit.checked_sub(dw::DW_OP_lit0.0)? {
        n @ 0..=15 => Some(i32::from(n)),
        _ => None,
    }
}

/// The union of ranges, as sorted disjoint ranges (touching ones joined).
fn union(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut union: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match union.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => union.push((start, end)),
        }
    }
    union
}

/// Whether `[start, end)` meets any range of a [`union`].
fn overlaps(union: &[(u64, u64)], start: u64, end: u64) -> bool {
    // Only the last range starting before `end` can: the ones before it
    // end before it starts.
    let before_end = union.partition_point(|&(s, _)| s < end);
    before_end
        .checked_sub(1)
        .is_some_and(|i| union[i].1 > start)
}

/// Sorts the FDEs' rows into one table: a [`CFA_NONE`] row where the code
/// with CFI ends, the row of the FDE starting at a `pc` over any other,
/// consecutive identical rules merged.
pub(super) fn assemble(fdes: &[FdeRows]) -> Vec<UnwindRow> {
    // Lower sorts first and wins a tie on `pc`.
    const FDE_START: u8 = 0;
    const FDE_ROW: u8 = 1;
    const GAP: u8 = 2;

    let mut keyed: Vec<(UnwindRow, u8)> = Vec::new();
    for fde in fdes {
        for row in &fde.rows {
            let rank = if u64::from(row.pc) == fde.start {
                FDE_START
            } else {
                FDE_ROW
            };
            keyed.push((*row, rank));
        }
    }
    for (_, end) in union(fdes.iter().map(|f| (f.start, f.end)).collect()) {
        // `collect` has checked every FDE ends below 4 GiB.
        if let Ok(pc) = u32::try_from(end) {
            keyed.push((
                UnwindRow {
                    pc,
                    ..rule(CFA_NONE, 0)
                },
                GAP,
            ));
        }
    }
    keyed.sort_by_key(|&(row, rank)| (row.pc, rank));
    keyed.dedup_by_key(|(row, _)| row.pc);

    let mut rows: Vec<UnwindRow> = Vec::with_capacity(keyed.len());
    for (row, _) in keyed {
        if let Some(last) = rows.last()
            && same_rule(last, &row)
        {
            continue;
        }
        rows.push(row);
    }
    rows
}

/// Whether two rows say the same but for where they start.
fn same_rule(a: &UnwindRow, b: &UnwindRow) -> bool {
    UnwindRow { pc: 0, ..*a } == UnwindRow { pc: 0, ..*b }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pc: u32, cfa_type: u8, cfa_offset: i32) -> UnwindRow {
        UnwindRow {
            pc,
            cfa_type,
            cfa_offset,
            ..UnwindRow::default()
        }
    }

    fn fde(start: u64, end: u64, rows: &[UnwindRow]) -> FdeRows {
        FdeRows {
            start,
            end,
            rows: rows.to_vec(),
        }
    }

    #[test]
    fn gap_row_where_no_fde_goes_on() {
        let rows = assemble(&[
            fde(0x10, 0x20, &[row(0x10, CFA_RSP, 8), row(0x14, CFA_RSP, 16)]),
            fde(0x20, 0x30, &[row(0x20, CFA_RSP, 16)]),
            fde(0x40, 0x50, &[row(0x40, CFA_RSP, 8)]),
        ]);
        assert_eq!(
            rows,
            [
                row(0x10, CFA_RSP, 8),
                // 0x20 says what 0x14 says: merged.
                row(0x14, CFA_RSP, 16),
                row(0x30, CFA_NONE, 0),
                row(0x40, CFA_RSP, 8),
                row(0x50, CFA_NONE, 0),
            ]
        );
    }

    #[test]
    fn the_fde_starting_at_a_pc_wins_it() {
        // A nested FDE: its start beats the outer FDE's row there, and its
        // end is no gap.
        let rows = assemble(&[
            fde(0x10, 0x40, &[row(0x10, CFA_RSP, 8), row(0x20, CFA_RSP, 16)]),
            fde(0x20, 0x28, &[row(0x20, CFA_RBP, 16)]),
        ]);
        assert_eq!(
            rows,
            [
                row(0x10, CFA_RSP, 8),
                row(0x20, CFA_RBP, 16),
                row(0x40, CFA_NONE, 0),
            ]
        );
        // Listed the other way round, the same.
        let rows_reversed = assemble(&[
            fde(0x20, 0x28, &[row(0x20, CFA_RBP, 16)]),
            fde(0x10, 0x40, &[row(0x10, CFA_RSP, 8), row(0x20, CFA_RSP, 16)]),
        ]);
        assert_eq!(rows_reversed, rows);
    }

    #[test]
    fn find_row_takes_the_last_row_at_or_below() {
        let rows = [row(0x10, CFA_RSP, 8), row(0x20, CFA_NONE, 0)];
        assert_eq!(find_row(&rows, 0xf), None);
        assert_eq!(find_row(&rows, 0x10), Some(&rows[0]));
        assert_eq!(find_row(&rows, 0x1f), Some(&rows[0]));
        assert_eq!(find_row(&rows, 0x20), Some(&rows[1]));
        assert_eq!(find_row(&rows, u32::MAX), Some(&rows[1]));
        assert_eq!(find_row(&[], 0x10), None);
    }

    const PLT_EXPRESSION: [u8; 11] = [
        0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22,
    ];

    #[test]
    fn plt_expression_is_recognised_exactly() {
        assert_eq!(plt_threshold(&PLT_EXPRESSION), Some(11));
        let mut ibt = PLT_EXPRESSION;
        ibt[6] = dw::DW_OP_lit9.0;
        assert_eq!(plt_threshold(&ibt), Some(9));
        let mut lit16 = PLT_EXPRESSION;
        lit16[6] = dw::DW_OP_lit16.0;
        assert_eq!(plt_threshold(&lit16), None);
        let mut other_base = PLT_EXPRESSION;
        other_base[1] = 16;
        assert_eq!(plt_threshold(&other_base), None);
        assert_eq!(plt_threshold(&PLT_EXPRESSION[..10]), None);
        assert_eq!(
            plt_threshold(&[PLT_EXPRESSION.as_slice(), &[0x22]].concat()),
            None
        );
        assert_eq!(plt_threshold(&[]), None);
    }

    /// A `.debug_frame` with one CIE (CFA = rsp + 8, return address at
    /// CFA − 8, then `cie_tail`) and FDEs of (start, length, instructions).
    fn debug_frame(cie_tail: &[u8], fdes: &[(u64, u64, &[u8])]) -> Vec<u8> {
        let mut cie = vec![0xff, 0xff, 0xff, 0xff, 1, 0, 1, 0x78, 16];
        cie.extend_from_slice(&[0x0c, 7, 8, 0x90, 1]);
        cie.extend_from_slice(cie_tail);
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(cie.len()).unwrap().to_le_bytes());
        out.extend_from_slice(&cie);
        for &(start, len, instructions) in fdes {
            let mut body = vec![0; 4];
            body.extend_from_slice(&start.to_le_bytes());
            body.extend_from_slice(&len.to_le_bytes());
            body.extend_from_slice(instructions);
            out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
            out.extend_from_slice(&body);
        }
        out
    }

    fn rows_of(cfi: &[u8]) -> Result<(Vec<UnwindRow>, TableStats), TableError> {
        let mut section = DebugFrame::new(cfi, LittleEndian);
        section.set_address_size(8);
        let mut fdes = Vec::new();
        let mut stats = TableStats::default();
        let bases = BaseAddresses::default();
        let mut ctx = UnwindContext::new();
        collect(
            &section,
            &bases,
            ".debug_frame",
            &mut ctx,
            &mut fdes,
            &mut stats,
        )?;
        Ok((assemble(&fdes), stats))
    }

    fn rows_of_fde(instructions: &[u8]) -> Vec<UnwindRow> {
        let cfi = debug_frame(&[], &[(0x1000, 0x10, instructions)]);
        let (rows, stats) = rows_of(&cfi).unwrap();
        assert_eq!(stats.bad_fdes, 0);
        rows
    }

    #[test]
    fn rules_become_rows() {
        const ADVANCE_1: u8 = 0x41;
        let at_cfa = |pc, cfa_type, cfa_offset, rbp_offset| UnwindRow {
            rbp_type: RBP_AT_CFA,
            rbp_offset,
            ..row(pc, cfa_type, cfa_offset)
        };
        // push rbp; mov rsp, rbp
        assert_eq!(
            rows_of_fde(&[ADVANCE_1, 0x0e, 16, 0x86, 2, ADVANCE_1, 0x0d, 6]),
            [
                row(0x1000, CFA_RSP, 8),
                at_cfa(0x1001, CFA_RSP, 16, -16),
                at_cfa(0x1002, CFA_RBP, 16, -16),
                row(0x1010, CFA_NONE, 0),
            ]
        );
        let second = |instructions: &[u8]| rows_of_fde(instructions)[1];
        // The return address undefined: the outermost frame.
        assert_eq!(second(&[ADVANCE_1, 0x07, 16]), row(0x1001, CFA_END, 0));
        // The return address elsewhere than CFA − 8.
        assert_eq!(
            second(&[ADVANCE_1, 0x90, 2]),
            row(0x1001, CFA_UNSUPPORTED, 0)
        );
        // CFA from r10.
        assert_eq!(
            second(&[ADVANCE_1, 0x0d, 10]),
            row(0x1001, CFA_UNSUPPORTED, 0)
        );
        // A CFA offset beyond i32.
        assert_eq!(
            second(&[ADVANCE_1, 0x0e, 0x80, 0x80, 0x80, 0x80, 0x10]),
            row(0x1001, CFA_UNSUPPORTED, 0)
        );
        // The PLT expression, and another one.
        let mut plt = vec![ADVANCE_1, 0x0f, 11];
        plt.extend_from_slice(&PLT_EXPRESSION);
        assert_eq!(second(&plt), row(0x1001, CFA_PLT, 11));
        assert_eq!(
            second(&[ADVANCE_1, 0x0f, 2, 0x77, 0x08]),
            row(0x1001, CFA_UNSUPPORTED, 0)
        );
        // rbp: an offset beyond i16, kept in rbx, said to be the same.
        let rbp_of = |instructions: &[u8]| {
            let r = second(instructions);
            (r.rbp_type, r.rbp_offset)
        };
        assert_eq!(rbp_of(&[ADVANCE_1, 0x86, 0x88, 0x27]), (RBP_UNKNOWN, 0));
        assert_eq!(rbp_of(&[ADVANCE_1, 0x09, 6, 3]), (RBP_UNKNOWN, 0));
        assert_eq!(rbp_of(&[0x86, 2, ADVANCE_1, 0x08, 6]), (RBP_SAME, 0));
    }

    #[test]
    fn signal_trampoline_rows_are_signal_rows() {
        // An .eh_frame CIE with "zRS": the frame is a signal frame whatever
        // its rules say.
        let cie: &[u8] = &[
            0, 0, 0, 0, 1, b'z', b'R', b'S', 0, 1, 0x78, 16, 1, 0x1b, 0x0c, 7, 8, 0x90, 1,
        ];
        let mut cfi = Vec::new();
        cfi.extend_from_slice(&u32::try_from(cie.len()).unwrap().to_le_bytes());
        cfi.extend_from_slice(cie);
        let fde_offset = cfi.len();
        let mut fde = Vec::new();
        // The CIE pointer: back from here to offset 0.
        fde.extend_from_slice(&u32::try_from(fde_offset + 4).unwrap().to_le_bytes());
        // pc-relative start 0x1000 (the section is at address 0).
        let start = 0x1000 - i32::try_from(fde_offset + 8).unwrap();
        fde.extend_from_slice(&start.to_le_bytes());
        fde.extend_from_slice(&8u32.to_le_bytes());
        fde.push(0);
        fde.extend_from_slice(&[0x41, 0x0e, 16]);
        cfi.extend_from_slice(&u32::try_from(fde.len()).unwrap().to_le_bytes());
        cfi.extend_from_slice(&fde);

        let section = EhFrame::new(&cfi, LittleEndian);
        let bases = BaseAddresses::default().set_eh_frame(0);
        let (mut fdes, mut stats) = (Vec::new(), TableStats::default());
        let mut ctx = UnwindContext::new();
        collect(
            &section,
            &bases,
            ".eh_frame",
            &mut ctx,
            &mut fdes,
            &mut stats,
        )
        .unwrap();
        assert_eq!(
            assemble(&fdes),
            [row(0x1000, CFA_SIGNAL, 0), row(0x1008, CFA_NONE, 0)]
        );
    }

    #[test]
    fn bad_fde_is_one_unsupported_row() {
        // 0x3f is DW_CFA_hi_user: no instruction gimli knows.
        let cfi = debug_frame(&[], &[(0x1000, 0x10, &[0x41, 0x3f])]);
        let (rows, stats) = rows_of(&cfi).unwrap();
        assert_eq!(stats.bad_fdes, 1);
        assert_eq!(
            rows,
            [row(0x1000, CFA_UNSUPPORTED, 0), row(0x1010, CFA_NONE, 0)]
        );
    }

    #[test]
    fn code_above_4_gib_is_an_error() {
        let cfi = debug_frame(&[], &[(0xffff_fff0, 0x20, &[])]);
        assert!(matches!(
            rows_of(&cfi),
            Err(TableError::AddressTooHigh {
                address: 0x1_0000_0010
            })
        ));
        let mut broken = debug_frame(&[], &[(0x1000, 0x10, &[])]);
        // The FDE's length now runs past the section.
        let fde_at =
            4 + usize::try_from(u32::from_le_bytes(broken[..4].try_into().unwrap())).unwrap();
        broken[fde_at..fde_at + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(rows_of(&broken), Err(TableError::Cfi { .. })));
    }

    /// An ELF header with no sections or segments.
    fn elf_header(class: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![
            0x7f, b'E', b'L', b'F', class, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        h.extend_from_slice(&3u16.to_le_bytes()); // ET_DYN
        h.extend_from_slice(&machine.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&[0; 8 + 8 + 8 + 4]); // entry, phoff, shoff, flags
        for half in [64u16, 56, 0, 64, 0, 0] {
            h.extend_from_slice(&half.to_le_bytes());
        }
        h
    }

    #[test]
    fn only_x86_64_elf_files() {
        let x86_64 = build_table(&elf_header(2, object::elf::EM_X86_64.0)).unwrap();
        assert_eq!(x86_64, UnwindTable::default());
        assert!(matches!(
            build_table(&elf_header(2, object::elf::EM_AARCH64.0)),
            Err(TableError::Architecture { .. })
        ));
        for not_elf64 in [
            elf_header(1, object::elf::EM_386.0),
            b"#!/bin/sh\n".to_vec(),
            Vec::new(),
        ] {
            assert!(matches!(
                build_table(&not_elf64),
                Err(TableError::Elf { .. })
            ));
        }
    }
}
