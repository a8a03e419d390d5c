//! Unwind rows for JIT code that describes itself through the GDB JIT
//! interface: QEMU's TCG translation buffer, an anonymous executable
//! mapping where most of a TCG vCPU thread's time goes, and which has no
//! file to read `.eh_frame` from.
//!
//! A program using the interface exports `__jit_debug_descriptor`
//! (`{u32 version, u32 action, entry *relevant, entry *first}`), the head
//! of a list of entries (`{next, prev, const char *symfile, u64 size}`),
//! each an ELF image in the process's memory whose `.debug_frame` covers
//! the code at its absolute addresses. This module finds the descriptor in
//! the executable, walks the list in the live process and turns each
//! image's CFI into rows relative to the start of the code it covers, so
//! that a 32-bit `pc` is enough; `procs` gives them to the anonymous
//! mappings the code lies in.

use std::{collections::HashSet, fs::File, os::unix::fs::FileExt as _, path::Path};

use gimli::{
    BaseAddresses, CieOrFde, DebugFrame, FrameDescriptionEntry, LittleEndian, UnwindContext,
    UnwindSection as _, X86_64,
};
use object::{
    Architecture, Object as _, ObjectSection as _, ObjectSymbol as _, read::ReadCache,
    read::elf::ElfFile64,
};
use profiler_common::unwind::{CFA_UNSUPPORTED, UnwindRow};

use super::{
    procs::load_segments,
    table::{FdeRows, assemble, convert},
};

/// The descriptor's name in the executable's dynamic symbols: GDB finds it
/// by this name, so every program using the interface exports it.
const DESCRIPTOR_SYMBOL: &str = "__jit_debug_descriptor";
/// The only version of the interface GDB defines.
const DESCRIPTOR_VERSION: u32 = 1;
/// The list lives in a process that may be changing it while it is read:
/// a walk is bounded, however the pointers point.
const MAX_ENTRIES: usize = 64;
/// The largest image read; QEMU's is under 1 KiB.
const MAX_SYMFILE_BYTES: u64 = 16 << 20;
/// All the images of one walk together.
const MAX_TOTAL_BYTES: u64 = 16 << 20;

/// JIT code and its rows, whose `pc`s are relative to `start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct JitCode {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) rows: Vec<UnwindRow>,
}

/// Where an executable keeps its JIT descriptor.
#[derive(Clone, Debug)]
pub(super) struct Descriptor {
    /// The symbol's virtual address in the file.
    pub(super) vaddr: u64,
    /// The file's `PT_LOAD` segments, for the load bias of a mapping.
    pub(super) loads: Vec<(u64, u64, u64)>,
}

/// The JIT descriptor of the executable at `path`, if it exports one.
/// Reads the headers and the dynamic symbols, not the whole file (QEMU's
/// is 30 MB).
pub(super) fn find_descriptor(path: &Path) -> Option<Descriptor> {
    let file = File::open(path).ok()?;
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let vaddr = elf
        .dynamic_symbols()
        .find(|s| s.is_definition() && s.name() == Ok(DESCRIPTOR_SYMBOL))?
        .address();
    Some(Descriptor {
        vaddr,
        loads: load_segments(&cache),
    })
}

/// The JIT code `tgid` has registered at the descriptor at `address` (in
/// its address space). Empty if it has none, or is gone, or its list
/// cannot be read.
pub(super) fn read_jit_code(tgid: u32, address: u64) -> Vec<JitCode> {
    let Ok(mem) = File::open(format!("/proc/{tgid}/mem")) else {
        return Vec::new();
    };
    let read = |at: u64, buf: &mut [u8]| mem.read_exact_at(buf, at).is_ok();
    jit_code(read, address)
}

/// [`read_jit_code`] over any reader of the process's memory.
fn jit_code(read: impl Fn(u64, &mut [u8]) -> bool, descriptor: u64) -> Vec<JitCode> {
    let mut budget = MAX_TOTAL_BYTES;
    symfiles(&read, descriptor)
        .into_iter()
        .filter_map(|(at, size)| {
            budget = budget.checked_sub(size)?;
            let mut image = vec![0; usize::try_from(size).ok()?];
            read(at, &mut image).then_some(())?;
            parse_symfile(&image)
        })
        .collect()
}

/// (address, size) of each image the descriptor's list names, in list
/// order, leaving out empty and oversized ones.
fn symfiles(read: impl Fn(u64, &mut [u8]) -> bool, descriptor: u64) -> Vec<(u64, u64)> {
    let word = |b: &[u8], at: usize| {
        b.get(at..at + 8)
            .and_then(|w| w.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    let mut head = [0; 24];
    if !read(descriptor, &mut head)
        || u32::from_le_bytes([head[0], head[1], head[2], head[3]]) != DESCRIPTOR_VERSION
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut next = word(&head, 16);
    for _ in 0..MAX_ENTRIES {
        // A loop in the list (or one made by a concurrent update) ends it.
        if next == 0 || !seen.insert(next) {
            break;
        }
        let mut entry = [0; 32];
        if !read(next, &mut entry) {
            break;
        }
        let (at, size) = (word(&entry, 16), word(&entry, 24));
        if at != 0 && (1..=MAX_SYMFILE_BYTES).contains(&size) {
            out.push((at, size));
        }
        next = word(&entry, 0);
    }
    out
}

/// The code one in-memory ELF image describes, with its `.debug_frame`
/// turned into rows. `None` if it is not an x86-64 ELF image with CFI
/// there, or its code spans 4 GiB or more.
fn parse_symfile(image: &[u8]) -> Option<JitCode> {
    let elf = ElfFile64::<object::Endianness>::parse(image).ok()?;
    if elf.architecture() != Architecture::X86_64 {
        return None;
    }
    let data = elf.section_by_name(".debug_frame")?.data().ok()?;
    let mut section = DebugFrame::new(data, LittleEndian);
    section.set_address_size(8);
    let bases = BaseAddresses::default();

    let mut fdes = Vec::new();
    let mut entries = section.entries(&bases);
    while let Some(entry) = entries.next().ok()? {
        if let CieOrFde::Fde(partial) = entry
            && let Ok(fde) = partial.parse(DebugFrame::cie_from_offset)
            && fde.len() > 0
        {
            fdes.push(fde);
        }
    }
    let start = fdes
        .iter()
        .map(FrameDescriptionEntry::initial_address)
        .min()?;
    let end = fdes
        .iter()
        .map(|f| f.initial_address().saturating_add(f.len()))
        .max()?;
    // Rows hold the pc as an offset from `start` in 32 bits.
    u32::try_from(end - start).ok()?;

    let mut ctx = UnwindContext::new();
    let fde_rows: Vec<FdeRows> = fdes
        .iter()
        .map(|fde| fde_rows(&section, &bases, &mut ctx, fde, start))
        .collect();
    Some(JitCode {
        start,
        end,
        rows: assemble(&fde_rows),
    })
}

type Slice<'data> = gimli::EndianSlice<'data, LittleEndian>;

/// The rows of one FDE of an image whose code starts at `base`, which the
/// caller has checked is below every address of it, within 4 GiB.
fn fde_rows<'data>(
    section: &DebugFrame<Slice<'data>>,
    bases: &BaseAddresses,
    ctx: &mut UnwindContext<usize>,
    fde: &FrameDescriptionEntry<Slice<'data>>,
    base: u64,
) -> FdeRows {
    let start = fde.initial_address();
    let end = start.saturating_add(fde.len());
    let relative = |address: u64| u32::try_from(address.saturating_sub(base)).unwrap_or(u32::MAX);
    let rule = |cfa_type| UnwindRow {
        cfa_type,
        ..UnwindRow::default()
    };
    // Not "RA at CFA − 8" whatever the rows say: stop there.
    let ra_is_rip = fde.cie().return_address_register() == X86_64::RA;
    let mut rows = Vec::new();
    let evaluated = fde.rows(section, bases, ctx).and_then(|mut table| {
        while let Some(row) = table.next_row()? {
            if row.start_address() >= end {
                continue;
            }
            let mut unwind_row = if ra_is_rip {
                convert(section, row)
            } else {
                rule(CFA_UNSUPPORTED)
            };
            unwind_row.pc = relative(row.start_address());
            rows.push(unwind_row);
        }
        Ok(())
    });
    if evaluated.is_err() {
        rows = vec![UnwindRow {
            pc: relative(start),
            ..rule(CFA_UNSUPPORTED)
        }];
    }
    FdeRows {
        start: start.saturating_sub(base),
        end: end.saturating_sub(base),
        rows,
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::unwind::{CFA_NONE, CFA_RSP, RBP_AT_CFA};

    use super::*;

    /// An ELF image as QEMU's `tcg_register_jit_int` builds it for an
    /// x86-64 host: a `NOBITS` `.text` at the code's address, and a
    /// `.debug_frame` whose one FDE covers it all with the prologue's
    /// frame (CFA = rsp + `frame_size`, the return address and the
    /// callee-saved registers below it).
    fn qemu_image(start: u64, len: u64, frame_size: u16) -> Vec<u8> {
        let mut frame = Vec::new();
        // CIE: version 1, no augmentation, code ×1, data ×−8, RA column 16.
        let cie = [0xff, 0xff, 0xff, 0xff, 1, 0, 1, 0x78, 16, 0, 0, 0];
        frame.extend_from_slice(&u32::try_from(cie.len()).unwrap().to_le_bytes());
        frame.extend_from_slice(&cie);
        let mut fde = vec![0; 4];
        fde.extend_from_slice(&start.to_le_bytes());
        fde.extend_from_slice(&len.to_le_bytes());
        // def_cfa rsp, frame_size (uleb128 in two bytes, as QEMU writes it).
        fde.extend_from_slice(&[
            0x0c,
            7,
            u8::try_from(frame_size & 0x7f).unwrap() | 0x80,
            u8::try_from(frame_size >> 7).unwrap(),
        ]);
        // rip at cfa−8, rbp −16, rbx −24, r12–r15 −32…−56.
        fde.extend_from_slice(&[
            0x90, 1, 0x86, 2, 0x83, 3, 0x8c, 4, 0x8d, 5, 0x8e, 6, 0x8f, 7,
        ]);
        frame.extend_from_slice(&u32::try_from(fde.len()).unwrap().to_le_bytes());
        frame.extend_from_slice(&fde);

        let shstrtab = b"\0.text\0.debug_frame\0.shstrtab\0";
        let frame_at = 64u64;
        let strtab_at = frame_at + frame.len() as u64;
        let shoff = (strtab_at + shstrtab.len() as u64).next_multiple_of(8);

        let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf.extend_from_slice(&object::elf::EM_X86_64.0.to_le_bytes());
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&0u64.to_le_bytes()); // entry
        elf.extend_from_slice(&0u64.to_le_bytes()); // phoff
        elf.extend_from_slice(&shoff.to_le_bytes());
        elf.extend_from_slice(&0u32.to_le_bytes()); // flags
        // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
        for half in [64u16, 56, 0, 64, 4, 3] {
            elf.extend_from_slice(&half.to_le_bytes());
        }
        elf.extend_from_slice(&frame);
        elf.extend_from_slice(shstrtab);
        elf.resize(usize::try_from(shoff).unwrap(), 0);
        let section = |elf: &mut Vec<u8>, name: u32, kind: u32, addr: u64, off: u64, size: u64| {
            elf.extend_from_slice(&name.to_le_bytes());
            elf.extend_from_slice(&kind.to_le_bytes());
            elf.extend_from_slice(&0u64.to_le_bytes()); // flags
            elf.extend_from_slice(&addr.to_le_bytes());
            elf.extend_from_slice(&off.to_le_bytes());
            elf.extend_from_slice(&size.to_le_bytes());
            elf.extend_from_slice(&[0; 4 + 4 + 8 + 8]); // link, info, align, entsize
        };
        section(&mut elf, 0, 0, 0, 0, 0);
        section(&mut elf, 1, object::elf::SHT_NOBITS.0, start, 0, len);
        let frame_len = frame.len() as u64;
        section(
            &mut elf,
            7,
            object::elf::SHT_PROGBITS.0,
            0,
            frame_at,
            frame_len,
        );
        let strtab_len = shstrtab.len() as u64;
        section(
            &mut elf,
            20,
            object::elf::SHT_STRTAB.0,
            0,
            strtab_at,
            strtab_len,
        );
        elf
    }

    /// A process's memory: (address, bytes) regions.
    struct Memory(Vec<(u64, Vec<u8>)>);

    impl Memory {
        fn read(&self, at: u64, buf: &mut [u8]) -> bool {
            self.0.iter().any(|(start, bytes)| {
                let Some(from) = at.checked_sub(*start).and_then(|o| usize::try_from(o).ok())
                else {
                    return false;
                };
                let Some(src) = bytes.get(from..from + buf.len()) else {
                    return false;
                };
                buf.copy_from_slice(src);
                true
            })
        }
    }

    fn descriptor(version: u32, first: u64) -> Vec<u8> {
        let mut d = version.to_le_bytes().to_vec();
        d.extend_from_slice(&1u32.to_le_bytes()); // JIT_REGISTER_FN
        d.extend_from_slice(&first.to_le_bytes()); // relevant
        d.extend_from_slice(&first.to_le_bytes());
        d
    }

    fn entry(next: u64, symfile: u64, size: u64) -> Vec<u8> {
        [next, 0, symfile, size]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    const CODE: u64 = 0x7fbb_4c00_002d;
    const CODE_LEN: u64 = 0x3fff_efd3;

    fn qemu_rows() -> Vec<UnwindRow> {
        vec![
            UnwindRow {
                pc: 0,
                cfa_offset: 1216,
                rbp_offset: -16,
                cfa_type: CFA_RSP,
                rbp_type: RBP_AT_CFA,
            },
            UnwindRow {
                pc: u32::try_from(CODE_LEN).unwrap(),
                cfa_type: CFA_NONE,
                ..UnwindRow::default()
            },
        ]
    }

    #[test]
    fn qemu_image_becomes_rows_relative_to_its_code() {
        assert_eq!(
            parse_symfile(&qemu_image(CODE, CODE_LEN, 1216)),
            Some(JitCode {
                start: CODE,
                end: CODE + CODE_LEN,
                rows: qemu_rows(),
            })
        );
        // 4 GiB of code does not fit 32-bit row addresses.
        assert_eq!(parse_symfile(&qemu_image(CODE, 1 << 32, 1216)), None);
        assert_eq!(parse_symfile(b"\x7fELF"), None);
    }

    #[test]
    fn walks_the_list_in_the_process() {
        let image = qemu_image(CODE, CODE_LEN, 1216);
        let size = image.len() as u64;
        // descriptor → a → b (not an ELF image) → back to a.
        let (d, a, b, sym, junk) = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000);
        let memory = Memory(vec![
            (d, descriptor(1, a)),
            (a, entry(b, sym, size)),
            (b, entry(a, junk, 16)),
            (sym, image),
            (junk, vec![0xaa; 16]),
        ]);
        let read = |at, buf: &mut [u8]| memory.read(at, buf);
        assert_eq!(symfiles(read, d), [(sym, size), (junk, 16)]);
        assert_eq!(
            jit_code(read, d),
            [JitCode {
                start: CODE,
                end: CODE + CODE_LEN,
                rows: qemu_rows(),
            }]
        );

        // Another version of the interface, a descriptor or an entry that
        // cannot be read, an image too large to read: nothing.
        let walk = |regions, at| {
            let memory = Memory(regions);
            symfiles(|a, buf: &mut [u8]| memory.read(a, buf), at)
        };
        let nothing: [(u64, u64); 0] = [];
        assert_eq!(
            walk(vec![(d, descriptor(2, a)), (a, entry(0, sym, size))], d),
            nothing
        );
        assert_eq!(walk(vec![(d, descriptor(1, a))], 0x9000), nothing);
        assert_eq!(walk(vec![(d, descriptor(1, a))], d), nothing);
        let huge = entry(0, sym, MAX_SYMFILE_BYTES + 1);
        assert_eq!(walk(vec![(d, descriptor(1, a)), (a, huge)], d), nothing);
    }
}
