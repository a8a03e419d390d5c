//! USDT probes (`sys/sdt.h`, `.note.stapsdt`): the sites a file's notes
//! describe, where to put each site's uprobe and its semaphore's reference
//! counter, and its arguments decoded into the [`UsdtSpec`] the eBPF side
//! reads.
//!
//! A site is a `nop` the compiler placed where `STAP_PROBEn(provider,
//! name, …)` was; its note gives the nop's link-time address, the
//! link-time address of `.stapsdt.base` (so that a file whose sections
//! prelink moved can be adjusted), the address of its semaphore (a `u16`
//! in `.probes` the program tests before it prepares the arguments: the
//! site runs only while it is non-zero, which the kernel maintains when a
//! uprobe is attached with a reference-counter offset) and an argument
//! string such as `8@%rax -4@-20(%rbp) 4@$5`, one operand per argument in
//! GNU as's AT&T syntax, with its size in bytes (negative: signed).
//!
//! Only x86-64 files are read: the registers are x86-64's.

use std::path::{Path, PathBuf};

use object::{
    elf::{self, FileHeader64},
    read::elf::{FileHeader as _, ProgramHeader as _, SectionHeader as _},
};
use profiler_common::usdt::{USDT_MAX_ARGS, UsdtArg, UsdtSpec, arg_kind};
use thiserror::Error;

/// The note type of a probe site (`NT_STAPSDT`).
const NT_STAPSDT: u32 = 3;

/// One probe site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub provider: String,
    pub name: String,
    /// The site's link-time address, as the note gives it.
    pub address: u64,
    /// The link-time address of `.stapsdt.base` the note recorded.
    pub base: u64,
    /// The semaphore's link-time address, as the note gives it; 0 when
    /// the site has none.
    pub semaphore: u64,
    /// Where the uprobe goes: the file offset of the site (after the
    /// `.stapsdt.base` adjustment).
    pub offset: u64,
    /// The file offset of the semaphore: the uprobe's reference-counter
    /// offset. `None` when the site has none.
    pub semaphore_offset: Option<u64>,
    /// The argument string, as in the note.
    pub arguments: String,
    /// The arguments decoded, or why they could not be: a site the eBPF
    /// side cannot read does not make the file's other sites unusable.
    pub args: Result<Vec<ArgSpec>, ArgError>,
}

impl Probe {
    /// What the eBPF side reads for this site.
    pub fn spec(&self) -> Result<UsdtSpec, ArgError> {
        let args = self.args.as_ref().map_err(Clone::clone)?;
        let mut spec = UsdtSpec {
            count: u32::try_from(args.len()).unwrap_or(u32::MAX),
            ..UsdtSpec::default()
        };
        for (slot, arg) in spec.args.iter_mut().zip(args) {
            *slot = arg.to_shared();
        }
        Ok(spec)
    }
}

/// Why a file's probes could not be read.
#[derive(Debug, Error)]
pub enum UsdtError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not an ELF file hvprof reads probes from: {why}")]
    Elf { why: String },
    #[error("USDT note {index} is malformed: {why}")]
    Note { index: usize, why: String },
    #[error(
        "probe {provider}:{name}: its {what} address {address:#x} is in no loadable {segment} segment of the file"
    )]
    NoSegment {
        provider: String,
        name: String,
        what: &'static str,
        address: u64,
        segment: &'static str,
    },
    #[error(
        "probe {provider}:{name}: its semaphore at {address:#x} is not 2-byte aligned, which the kernel's reference counter needs"
    )]
    SemaphoreAlignment {
        provider: String,
        name: String,
        address: u64,
    },
}

/// The probe sites of the file at `path` (none if it has no
/// `.note.stapsdt`).
pub fn probes(path: &Path) -> Result<Vec<Probe>, UsdtError> {
    let data = std::fs::read(path).map_err(|source| UsdtError::Read {
        path: path.to_owned(),
        source,
    })?;
    probes_in(&data)
}

/// The probe sites of the ELF file `data`.
pub fn probes_in(data: &[u8]) -> Result<Vec<Probe>, UsdtError> {
    let bad = |why: &dyn std::fmt::Display| UsdtError::Elf {
        why: why.to_string(),
    };
    let header = FileHeader64::<object::Endianness>::parse(data).map_err(|e| bad(&e))?;
    let endian = header.endian().map_err(|e| bad(&e))?;
    if header.e_machine(endian) != elf::EM_X86_64 {
        return Err(bad(&format!(
            "machine {} is not x86-64",
            header.e_machine(endian).0
        )));
    }
    let segments: Vec<Segment> = header
        .program_headers(endian, data)
        .map_err(|e| bad(&e))?
        .iter()
        .filter(|p| p.p_type(endian) == elf::PT_LOAD)
        .map(|p| Segment {
            vaddr: p.p_vaddr(endian),
            memsz: p.p_memsz(endian),
            offset: p.p_offset(endian),
            exec: p.p_flags(endian).0 & elf::PF_X.0 != 0,
        })
        .collect();
    let sections = header.sections(endian, data).map_err(|e| bad(&e))?;
    let Some((_, notes)) = sections.section_by_name(endian, b".note.stapsdt") else {
        return Ok(Vec::new());
    };
    let base_section = sections
        .section_by_name(endian, b".stapsdt.base")
        .map(|(_, s)| s.sh_addr(endian));
    let Some(mut notes) = notes.notes(endian, data).map_err(|e| bad(&e))? else {
        return Err(bad(&".note.stapsdt is not a note section"));
    };
    let mut out = Vec::new();
    let mut index = 0;
    while let Some(note) = notes.next().map_err(|e| UsdtError::Note {
        index,
        why: e.to_string(),
    })? {
        if note.name() == b"stapsdt" && note.n_type(endian).0 == NT_STAPSDT {
            let raw = parse_note(note.desc(), endian).map_err(|why| UsdtError::Note {
                index,
                why: why.to_owned(),
            })?;
            out.push(place(raw, base_section, &segments)?);
        }
        index += 1;
    }
    Ok(out)
}

/// A `PT_LOAD` segment.
struct Segment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    exec: bool,
}

/// A note's fields, before they are placed in the file.
#[derive(Clone, Copy)]
struct RawNote<'a> {
    address: u64,
    base: u64,
    semaphore: u64,
    provider: &'a str,
    name: &'a str,
    arguments: &'a str,
}

/// A note's description: three addresses, then provider, name and
/// arguments, each NUL-terminated.
fn parse_note(desc: &[u8], endian: object::Endianness) -> Result<RawNote<'_>, &'static str> {
    use object::Endian as _;
    let word = |i: usize| -> Option<u64> {
        let bytes: [u8; 8] = desc.get(i * 8..i * 8 + 8)?.try_into().ok()?;
        Some(if endian.is_little_endian() {
            u64::from_le_bytes(bytes)
        } else {
            u64::from_be_bytes(bytes)
        })
    };
    let (Some(address), Some(base), Some(semaphore)) = (word(0), word(1), word(2)) else {
        return Err("shorter than its three addresses");
    };
    let mut strings = desc[24..].split(|&b| b == 0);
    let mut text = |what: &'static str| -> Result<&str, &'static str> {
        let s = strings.next().ok_or(what)?;
        std::str::from_utf8(s).map_err(|_| "a string is not UTF-8")
    };
    let provider = text("no provider")?;
    let name = text("no name")?;
    let arguments = text("no argument string")?;
    // The arguments' NUL must be there: `split` yields one more piece
    // (possibly empty padding) after the last NUL.
    if strings.next().is_none() {
        return Err("the argument string is not NUL-terminated");
    }
    if provider.is_empty() || name.is_empty() {
        return Err("empty provider or probe name");
    }
    Ok(RawNote {
        address,
        base,
        semaphore,
        provider,
        name,
        arguments,
    })
}

/// The site's and semaphore's file offsets, and its arguments decoded.
fn place(
    raw: RawNote<'_>,
    base_section: Option<u64>,
    segments: &[Segment],
) -> Result<Probe, UsdtError> {
    // Prelink moves sections but cannot rewrite the (unallocated) notes:
    // the distance `.stapsdt.base` moved is how far the site and its
    // semaphore moved. libbpf adjusts only the site; SystemTap's
    // description of the format adjusts both (0 here on every file not
    // prelinked).
    let shift = match base_section {
        Some(now) if raw.base != 0 => now.wrapping_sub(raw.base),
        _ => 0,
    };
    let no_segment = |what, address, segment| UsdtError::NoSegment {
        provider: raw.provider.to_owned(),
        name: raw.name.to_owned(),
        what,
        address,
        segment,
    };
    let address = raw.address.wrapping_add(shift);
    let offset = file_offset(segments, address, true)
        .ok_or_else(|| no_segment("site", address, "executable"))?;
    let semaphore_offset = if raw.semaphore == 0 {
        None
    } else {
        let address = raw.semaphore.wrapping_add(shift);
        let off = file_offset(segments, address, false)
            .ok_or_else(|| no_segment("semaphore", address, "writable (non-executable)"))?;
        if off % 2 != 0 {
            return Err(UsdtError::SemaphoreAlignment {
                provider: raw.provider.to_owned(),
                name: raw.name.to_owned(),
                address,
            });
        }
        Some(off)
    };
    Ok(Probe {
        provider: raw.provider.to_owned(),
        name: raw.name.to_owned(),
        address: raw.address,
        base: raw.base,
        semaphore: raw.semaphore,
        offset,
        semaphore_offset,
        arguments: raw.arguments.to_owned(),
        args: parse_args(raw.arguments),
    })
}

/// The file offset of `address` in the loadable segment that holds it,
/// which must be executable (a site) or not (a semaphore).
fn file_offset(segments: &[Segment], address: u64, exec: bool) -> Option<u64> {
    segments
        .iter()
        .find(|s| s.vaddr <= address && address - s.vaddr < s.memsz)
        .filter(|s| s.exec == exec)
        .and_then(|s| (address - s.vaddr).checked_add(s.offset))
}

/// One decoded argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    /// Bytes: 1, 2, 4 or 8.
    pub size: u8,
    pub signed: bool,
    pub location: ArgLocation,
}

/// Where an argument is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgLocation {
    /// `$5`.
    Const(i64),
    /// `%rax`, `%esi`, `%r8w`, `%dil`: the register, by its offset in
    /// `struct pt_regs`.
    Reg { reg_off: u16 },
    /// `-20(%rbp)`, `(%rsp)`: memory at the register plus a displacement.
    Deref { reg_off: u16, displacement: i64 },
}

impl ArgSpec {
    /// As the eBPF side reads it.
    #[must_use]
    pub fn to_shared(&self) -> UsdtArg {
        let (kind, reg_off, value) = match self.location {
            ArgLocation::Const(v) => (arg_kind::CONST, 0, v.cast_unsigned()),
            ArgLocation::Reg { reg_off } => (arg_kind::REG, reg_off, 0),
            ArgLocation::Deref {
                reg_off,
                displacement,
            } => (arg_kind::REG_DEREF, reg_off, displacement.cast_unsigned()),
        };
        UsdtArg {
            value,
            reg_off,
            kind,
            size: self.size,
            signed: u8::from(self.signed),
            pad: [0; 3],
        }
    }
}

/// Why an argument string could not be decoded.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ArgError {
    #[error("argument {index} ({text:?}): {why}")]
    Arg {
        index: usize,
        text: String,
        why: String,
    },
    #[error("{count} arguments, more than the {USDT_MAX_ARGS} hvprof reads")]
    TooMany { count: usize },
}

/// Decodes an argument string: operands separated by spaces.
pub fn parse_args(text: &str) -> Result<Vec<ArgSpec>, ArgError> {
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    if words.len() > USDT_MAX_ARGS {
        return Err(ArgError::TooMany { count: words.len() });
    }
    words
        .iter()
        .enumerate()
        .map(|(index, word)| {
            parse_arg(word).map_err(|why| ArgError::Arg {
                index,
                text: (*word).to_owned(),
                why,
            })
        })
        .collect()
}

/// Decodes one operand: `SIZE@%REG`, `SIZE@DISP(%REG)`, `SIZE@(%REG)` or
/// `SIZE@$IMM`.
pub fn parse_arg(text: &str) -> Result<ArgSpec, String> {
    let (size, operand) = text
        .split_once('@')
        .ok_or_else(|| "no SIZE@ before the operand".to_owned())?;
    let size: i32 = size
        .parse()
        .map_err(|_| format!("size {size:?} is not a number"))?;
    let (signed, size) = (size < 0, size.unsigned_abs());
    if !matches!(size, 1 | 2 | 4 | 8) {
        return Err(format!("size {size} is not 1, 2, 4 or 8 bytes"));
    }
    let location = if let Some(imm) = operand.strip_prefix('$') {
        ArgLocation::Const(
            parse_int(imm).ok_or_else(|| format!("constant {imm:?} is not a number"))?,
        )
    } else if let Some(reg) = operand.strip_prefix('%') {
        ArgLocation::Reg {
            reg_off: register(reg)?,
        }
    } else if let Some((disp, rest)) = operand.split_once('(') {
        let inner = rest
            .strip_suffix(')')
            .ok_or_else(|| "a memory operand without its closing ')'".to_owned())?;
        if inner.contains(',') {
            return Err(
                "an indexed memory operand (base, index, scale) is not supported".to_owned(),
            );
        }
        let reg = inner
            .strip_prefix('%')
            .ok_or_else(|| format!("base {inner:?} is not a register"))?;
        let displacement = if disp.is_empty() {
            0
        } else {
            parse_int(disp).ok_or_else(|| {
                format!("displacement {disp:?} is not a number (a symbol is not supported)")
            })?
        };
        ArgLocation::Deref {
            reg_off: register(reg)?,
            displacement,
        }
    } else {
        return Err(format!(
            "operand {operand:?} is not a register, memory operand or constant"
        ));
    };
    Ok(ArgSpec {
        size: u8::try_from(size).unwrap_or(8),
        signed,
        location,
    })
}

/// A decimal or `0x` hexadecimal integer, possibly negative; a value above
/// `i64::MAX` (an unsigned 64-bit constant) keeps its bits.
fn parse_int(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let magnitude = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse().ok()?
        }
        None => return None,
    };
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        Some(magnitude.cast_signed())
    }
}

/// Byte offsets of the registers in the x86-64 `struct pt_regs`
/// (arch/x86/include/asm/ptrace.h), each with its 64-, 32-, 16- and 8-bit
/// names.
const REGISTERS: [(u16, [&str; 4]); 16] = [
    (0, ["r15", "r15d", "r15w", "r15b"]),
    (8, ["r14", "r14d", "r14w", "r14b"]),
    (16, ["r13", "r13d", "r13w", "r13b"]),
    (24, ["r12", "r12d", "r12w", "r12b"]),
    (32, ["rbp", "ebp", "bp", "bpl"]),
    (40, ["rbx", "ebx", "bx", "bl"]),
    (48, ["r11", "r11d", "r11w", "r11b"]),
    (56, ["r10", "r10d", "r10w", "r10b"]),
    (64, ["r9", "r9d", "r9w", "r9b"]),
    (72, ["r8", "r8d", "r8w", "r8b"]),
    (80, ["rax", "eax", "ax", "al"]),
    (88, ["rcx", "ecx", "cx", "cl"]),
    (96, ["rdx", "edx", "dx", "dl"]),
    (104, ["rsi", "esi", "si", "sil"]),
    (112, ["rdi", "edi", "di", "dil"]),
    (152, ["rsp", "esp", "sp", "spl"]),
];

/// The `pt_regs` offset of a register named without its `%`.
fn register(name: &str) -> Result<u16, String> {
    if let Some(&(off, _)) = REGISTERS.iter().find(|(_, names)| names.contains(&name)) {
        return Ok(off);
    }
    Err(match name {
        "ah" | "bh" | "ch" | "dh" => {
            format!("%{name} (bits 8-15 of a register) is not supported")
        }
        "rip" | "eip" => {
            "an address relative to %rip is not supported (the uprobe sees the site's address, not the next instruction's)"
                .to_owned()
        }
        _ => format!("unknown register %{name}"),
    })
}

#[cfg(test)]
mod tests;
