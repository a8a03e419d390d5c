//! Just enough of a BTF reader to find where a field of a kernel structure
//! is: the eBPF side is built without CO-RE, so a field it reads from a
//! kernel object (the saved kernel stack pointer of a task) gets its offset
//! from here, read from `/sys/kernel/btf/vmlinux` at record time; and which
//! BTF tracepoints the kernel has.

use std::collections::{HashMap, HashSet};

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KbtfError {
    #[error("not BTF (bad magic or a truncated header)")]
    NotBtf,
    #[error("BTF type {0} is truncated or of unknown kind {1}")]
    BadType(u32, u32),
    #[error("no struct `{0}` in kernel BTF")]
    NoStruct(String),
    #[error("`{0}` has no member `{1}`")]
    NoMember(String, String),
}

struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

struct Type {
    name: u32,
    kind: u32,
    /// The referenced type, for typedefs and qualifiers.
    ty: u32,
    members: Vec<Member>,
}

/// The parsed types of one BTF blob (types are numbered from 1).
pub struct Kbtf {
    strings: Vec<u8>,
    types: Vec<Type>,
    structs: HashMap<String, u32>,
    /// The BTF tracepoints: `NAME` of each `btf_trace_NAME` typedef.
    tracepoints: HashSet<String>,
    /// Functions (kfuncs among them) by name.
    funcs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Kbtf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> std::io::Result<Self> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux")?;
        Self::parse(&data).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(data: &[u8]) -> Result<Self, KbtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(KbtfError::NotBtf);
        }
        let word = |at| u32_at(data, at).ok_or(KbtfError::NotBtf);
        let hdr_len = word(4)? as usize;
        let (type_off, type_len) = (word(8)? as usize, word(12)? as usize);
        let (str_off, str_len) = (word(16)? as usize, word(20)? as usize);
        let types_bytes = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(KbtfError::NotBtf)?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(KbtfError::NotBtf)?
            .to_vec();
        // Type 0 is void.
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            ty: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < types_bytes.len() {
            let id = u32::try_from(types.len()).map_err(|_| KbtfError::NotBtf)?;
            let (Some(name), Some(info), Some(size_or_type)) = (
                u32_at(types_bytes, at),
                u32_at(types_bytes, at + 4),
                u32_at(types_bytes, at + 8),
            ) else {
                return Err(KbtfError::BadType(id, 0));
            };
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 != 0;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for m in 0..vlen {
                        let base = at + m * 12;
                        let (Some(n), Some(t), Some(off)) = (
                            u32_at(types_bytes, base),
                            u32_at(types_bytes, base + 4),
                            u32_at(types_bytes, base + 8),
                        ) else {
                            return Err(KbtfError::BadType(id, kind));
                        };
                        members.push(Member {
                            name: n,
                            ty: t,
                            bit_offset: if kind_flag { off & 0x00ff_ffff } else { off },
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                2 | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC
                | 16 | KIND_TYPE_TAG => 0,
                _ => return Err(KbtfError::BadType(id, kind)),
            };
            at += extra;
            if at > types_bytes.len() {
                return Err(KbtfError::BadType(id, kind));
            }
            types.push(Type {
                name,
                kind,
                ty: size_or_type,
                members,
            });
        }
        let mut btf = Self {
            strings,
            types,
            structs: HashMap::new(),
            tracepoints: HashSet::new(),
            funcs: HashMap::new(),
        };
        let mut structs = HashMap::new();
        let mut tracepoints = HashSet::new();
        let mut funcs = HashMap::new();
        for (id, t) in (0u32..).zip(&btf.types) {
            if t.kind == KIND_FUNC && t.name != 0 {
                funcs.entry(btf.name(t.name).to_owned()).or_insert(id);
            } else if t.kind == KIND_STRUCT && t.name != 0 {
                // The first (complete) definition wins.
                structs.entry(btf.name(t.name).to_owned()).or_insert(id);
            } else if t.kind == KIND_TYPEDEF
                && let Some(tp) = btf.name(t.name).strip_prefix("btf_trace_")
            {
                tracepoints.insert(tp.to_owned());
            }
        }
        btf.structs = structs;
        btf.tracepoints = tracepoints;
        btf.funcs = funcs;
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.ty;
                }
                _ => break,
            }
        }
        id
    }

    /// Bit offset of member `name` of struct or union `id`, looking into
    /// anonymous members, and the member's type.
    fn member(&self, id: u32, name: &str) -> Option<(u32, u32)> {
        let t = self.types.get(id as usize)?;
        for m in &t.members {
            if m.name == 0 {
                let inner = self.resolve(m.ty);
                if let Some((off, ty)) = self.member(inner, name) {
                    return Some((m.bit_offset + off, ty));
                }
            } else if self.name(m.name) == name {
                return Some((m.bit_offset, m.ty));
            }
        }
        None
    }

    /// The type id of function `name` (a kfunc's, for a call to it).
    #[must_use]
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.funcs.get(name).copied()
    }

    /// Whether the kernel has BTF tracepoint `name` (`sched_switch`): a
    /// `btf_trace_NAME` typedef, which loading a program on it needs.
    #[must_use]
    pub fn has_btf_tracepoint(&self, name: &str) -> bool {
        self.tracepoints.contains(name)
    }

    /// Byte offset of `path` (e.g. `["thread", "sp"]`) inside struct
    /// `structure`.
    pub fn offset_of(&self, structure: &str, path: &[&str]) -> Result<u32, KbtfError> {
        let mut id = *self
            .structs
            .get(structure)
            .ok_or_else(|| KbtfError::NoStruct(structure.to_owned()))?;
        let mut bits = 0;
        let mut at = structure.to_owned();
        for field in path {
            let (off, ty) = self
                .member(id, field)
                .ok_or_else(|| KbtfError::NoMember(at.clone(), (*field).to_owned()))?;
            bits += off;
            id = self.resolve(ty);
            at = format!("{at}.{field}");
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `struct inner { long a; long sp; }`, `struct outer { int
    /// x; union { int y; }; struct inner thread; }` plus a typedef.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0sp\0outer\0x\0y\0thread\0inner_t\0";
        let name = |s: &str| {
            let pos = strings
                .windows(s.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=s.len()] == s.as_bytes() && w[s.len() + 1] == 0)
                .unwrap();
            u32::try_from(pos).unwrap() + 1
        };
        let mut t = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                t.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int (8 bytes)
        push(&[name("int"), KIND_INT << 24, 8, 64]);
        // 2: struct inner { a @0, sp @64 bits }
        push(&[name("inner"), KIND_STRUCT << 24 | 2, 16]);
        push(&[name("a"), 1, 0, name("sp"), 1, 64]);
        // 3: union { y }
        push(&[0, KIND_UNION << 24 | 1, 8]);
        push(&[name("y"), 1, 0]);
        // 4: typedef inner_t -> 2
        push(&[name("inner_t"), KIND_TYPEDEF << 24, 2]);
        // 5: struct outer { x @0, <anon union> @64, thread @128 (via typedef) }
        push(&[name("outer"), KIND_STRUCT << 24 | 3, 32]);
        push(&[name("x"), 1, 0, 0, 3, 64, name("thread"), 4, 128]);
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        let (tl, sl) = (
            u32::try_from(t.len()).unwrap(),
            u32::try_from(strings.len()).unwrap(),
        );
        for w in [24u32, 0, tl, tl, sl] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn finds_nested_and_anonymous_members() {
        let btf = Kbtf::parse(&blob()).unwrap();
        assert_eq!(btf.offset_of("outer", &["thread", "sp"]), Ok(24));
        assert_eq!(btf.offset_of("outer", &["y"]), Ok(8));
        assert_eq!(btf.offset_of("inner", &["sp"]), Ok(8));
        assert!(matches!(
            btf.offset_of("outer", &["thread", "ip"]),
            Err(KbtfError::NoMember(at, f)) if at == "outer.thread" && f == "ip"
        ));
        assert!(matches!(
            btf.offset_of("nope", &["x"]),
            Err(KbtfError::NoStruct(_))
        ));
        assert!(matches!(
            Kbtf::parse(b"garbage that is long enough"),
            Err(KbtfError::NotBtf)
        ));
        let mut cut = blob();
        cut[12] = 0xff;
        assert!(Kbtf::parse(&cut).is_err());
    }

    #[test]
    fn reads_the_running_kernel() {
        // Every kernel this tool runs on has BTF (the BTF tracepoints need
        // it); x86-64's saved kernel stack pointer sits inside task_struct.
        let btf = Kbtf::from_sys_fs().expect("/sys/kernel/btf/vmlinux");
        let off = btf.offset_of("task_struct", &["thread", "sp"]).unwrap();
        assert!(off > 0 && off < 16384, "{off}");
    }
}
