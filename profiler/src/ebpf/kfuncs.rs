//! Calls to kernel functions (kfuncs) in the eBPF object, linked before
//! aya loads it.
//!
//! The programs declare a kfunc as an `extern "C"` function and call it.
//! rustc emits no debug information for a foreign declaration, so the
//! object's BTF has no extern entry for it, which aya needs to resolve the
//! call; the call is left as a plain `call` with a relocation against an
//! undefined symbol. Here each such call becomes what the kernel expects of
//! a kfunc call (`src_reg` `BPF_PSEUDO_KFUNC_CALL`, `imm` the function's
//! id in the kernel's BTF, `off` 0 for vmlinux), and its relocation is
//! taken out of the object (moved past the end of its section, whose size
//! is cut), so that aya never sees it. A kfunc this kernel lacks becomes
//! `r0 = 0`: the programs treat a null result as "not available".

use std::collections::HashMap;

/// The kfuncs the programs call.
pub const KFUNCS: [&str; 2] = ["bpf_task_from_pid", "bpf_task_release"];

const SHT_SYMTAB: u32 = 2;
const SHT_REL: u32 = 9;
const SHN_UNDEF: u16 = 0;
const SECTION_HEADER: usize = 64;
const SYMBOL: usize = 24;
const REL: usize = 16;
const INSN: usize = 8;
/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
/// `BPF_ALU64 | BPF_MOV | BPF_K`.
const MOV64_IMM: u8 = 0xb7;
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum KfuncError {
    #[error("the eBPF object is malformed: {0}")]
    Malformed(&'static str),
    #[error("the eBPF object calls {0} at byte {1} of a section, which is not a call")]
    NotACall(String, u64),
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, KfuncError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(KfuncError::Malformed("truncated"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, KfuncError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(KfuncError::Malformed("truncated"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, KfuncError> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
        .ok_or(KfuncError::Malformed("truncated"))
}

fn usize_at(b: &[u8], at: usize) -> Result<usize, KfuncError> {
    usize::try_from(u64_at(b, at)?).map_err(|_| KfuncError::Malformed("offset"))
}

/// One section header's fields this needs.
struct Section {
    header: usize,
    kind: u32,
    offset: usize,
    size: usize,
    link: u32,
    info: u32,
}

fn sections(elf: &[u8]) -> Result<Vec<Section>, KfuncError> {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(KfuncError::Malformed("not a little-endian ELF64 file"));
    }
    let shoff = usize_at(elf, 0x28)?;
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    (0..shnum)
        .map(|i| {
            let h = shoff + i * SECTION_HEADER;
            Ok(Section {
                header: h,
                kind: u32_at(elf, h + 4)?,
                offset: usize_at(elf, h + 24)?,
                size: usize_at(elf, h + 32)?,
                link: u32_at(elf, h + 40)?,
                info: u32_at(elf, h + 44)?,
            })
        })
        .collect()
}

/// The undefined symbols that name a kfunc of [`KFUNCS`], by index.
fn kfunc_symbols(elf: &[u8], sections: &[Section]) -> Result<HashMap<u64, String>, KfuncError> {
    let mut out = HashMap::new();
    for symtab in sections.iter().filter(|s| s.kind == SHT_SYMTAB) {
        let strtab = sections
            .get(symtab.link as usize)
            .ok_or(KfuncError::Malformed("symbol names"))?;
        for i in 0..symtab.size / SYMBOL {
            let at = symtab.offset + i * SYMBOL;
            if u16_at(elf, at + 6)? != SHN_UNDEF {
                continue;
            }
            let name_at = strtab.offset + u32_at(elf, at)? as usize;
            let name = elf
                .get(name_at..)
                .and_then(|rest| rest.split(|&b| b == 0).next())
                .ok_or(KfuncError::Malformed("symbol name"))?;
            if let Some(k) = KFUNCS.iter().find(|k| k.as_bytes() == name) {
                out.insert(i as u64, (*k).to_owned());
            }
        }
    }
    Ok(out)
}

/// The object with its kfunc calls linked against `ids` (a kfunc's id in
/// kernel BTF, `None` where the kernel lacks it); the object unchanged if
/// it calls none.
pub fn link(object: &[u8], ids: &dyn Fn(&str) -> Option<u32>) -> Result<Vec<u8>, KfuncError> {
    let mut elf = object.to_vec();
    let sections = sections(&elf)?;
    let kfuncs = kfunc_symbols(&elf, &sections)?;
    if kfuncs.is_empty() {
        return Ok(elf);
    }
    for rel in sections.iter().filter(|s| s.kind == SHT_REL) {
        let target = sections
            .get(rel.info as usize)
            .ok_or(KfuncError::Malformed("relocated section"))?;
        let entries = rel.size / REL;
        let mut kept = Vec::with_capacity(rel.size);
        let mut taken = Vec::new();
        for i in 0..entries {
            let at = rel.offset + i * REL;
            let entry = elf[at..at + REL].to_vec();
            let (offset, info) = (u64_at(&entry, 0)?, u64_at(&entry, 8)?);
            let Some(name) = kfuncs.get(&(info >> 32)) else {
                kept.extend_from_slice(&entry);
                continue;
            };
            let insn = target.offset
                + usize::try_from(offset).map_err(|_| KfuncError::Malformed("offset"))?;
            if insn + INSN > target.offset + target.size || elf[insn] != CALL {
                return Err(KfuncError::NotACall(name.clone(), offset));
            }
            match ids(name) {
                Some(id) => {
                    elf[insn + 1] = (elf[insn + 1] & 0x0f) | (BPF_PSEUDO_KFUNC_CALL << 4);
                    elf[insn + 2..insn + 4].copy_from_slice(&0u16.to_le_bytes());
                    elf[insn + 4..insn + 8].copy_from_slice(&id.to_le_bytes());
                }
                None => {
                    elf[insn..insn + 8].copy_from_slice(&[MOV64_IMM, 0, 0, 0, 0, 0, 0, 0]);
                }
            }
            taken.extend_from_slice(&entry);
        }
        if taken.is_empty() {
            continue;
        }
        let size = kept.len();
        kept.extend_from_slice(&taken);
        elf[rel.offset..rel.offset + rel.size].copy_from_slice(&kept);
        elf[rel.header + 32..rel.header + 40].copy_from_slice(&(size as u64).to_le_bytes());
    }
    Ok(elf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded object: every call to a kfunc becomes a kfunc call, no
    /// relocation names one any more, and the rest is unchanged.
    #[test]
    fn links_the_objects_kfunc_calls() {
        let object = crate::ebpf::OBJECT;
        let before = sections(object).unwrap();
        let syms = kfunc_symbols(object, &before).unwrap();
        assert_eq!(syms.len(), KFUNCS.len(), "{syms:?}");
        let ids = |name: &str| {
            KFUNCS
                .iter()
                .position(|k| *k == name)
                .map(|i| 1000 + u32::try_from(i).unwrap())
        };
        let linked = link(object, &ids).unwrap();
        assert_eq!(linked.len(), object.len());
        let after = sections(&linked).unwrap();
        let mut calls = 0;
        for (rel, was) in after.iter().zip(&before).filter(|(s, _)| s.kind == SHT_REL) {
            let target = &after[rel.info as usize];
            let taken = (was.size - rel.size) / REL;
            for i in 0..was.size / REL {
                let at = rel.offset + i * REL;
                let sym = u64_at(&linked, at + 8).unwrap() >> 32;
                // Kept entries first, then the ones taken out.
                assert_eq!(syms.contains_key(&sym), i >= was.size / REL - taken);
                if syms.contains_key(&sym) {
                    let insn = target.offset + usize_at(&linked, at).unwrap();
                    assert_eq!(linked[insn], CALL);
                    assert_eq!(linked[insn + 1] >> 4, BPF_PSEUDO_KFUNC_CALL);
                    let id = u32_at(&linked, insn + 4).unwrap();
                    assert_eq!(Some(id), ids(&syms[&sym]));
                    calls += 1;
                }
            }
        }
        assert!(calls >= KFUNCS.len(), "{calls} kfunc calls");
        // A kernel without them: each call returns 0.
        let none = link(object, &|_| None).unwrap();
        assert_ne!(none, linked);
        assert!(link(b"not an ELF", &ids).is_err());
    }
}
