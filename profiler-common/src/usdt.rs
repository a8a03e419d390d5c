//! USDT probe arguments (`sys/sdt.h` probes), as the eBPF side reads them.
//!
//! Userspace decodes each probe site's argument string (`8@%rax
//! -4@-20(%rbp) 4@$5`, from its `.note.stapsdt` note) into a [`UsdtSpec`]
//! and stores it in [`USDT_SPECS_MAP`] under a spec id; the site's uprobe
//! carries that id as its attach cookie. A probe program then reads
//! argument N with one register read and, for a memory argument, one user
//! memory read.

/// Arguments a spec holds: what GNU as emits for `STAP_PROBE12`, the most
/// `sys/sdt.h` defines.
pub const USDT_MAX_ARGS: usize = 12;

/// Entries of [`USDT_SPECS_MAP`]: distinct argument layouts (sites with the
/// same argument string share one).
pub const USDT_MAX_SPECS: u32 = 256;

/// Array of [`UsdtSpec`], indexed by spec id (the uprobe's attach cookie).
pub const USDT_SPECS_MAP: &str = "USDT_SPECS";

/// Where an argument is.
pub mod arg_kind {
    /// A constant: [`super::UsdtArg::value`].
    pub const CONST: u8 = 0;
    /// The register at [`super::UsdtArg::reg_off`] in `struct pt_regs`.
    pub const REG: u8 = 1;
    /// User memory at that register plus [`super::UsdtArg::value`]
    /// (a signed displacement, two's complement).
    pub const REG_DEREF: u8 = 2;
}

/// One argument of a probe site.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtArg {
    /// The constant ([`arg_kind::CONST`]) or the displacement
    /// ([`arg_kind::REG_DEREF`]); 0 for a register.
    pub value: u64,
    /// Byte offset of the register in the x86-64 `struct pt_regs`.
    pub reg_off: u16,
    /// [`arg_kind`].
    pub kind: u8,
    /// Bytes: 1, 2, 4 or 8. The value read is cut to this size, then
    /// sign- or zero-extended to 64 bits.
    pub size: u8,
    /// 1 when the argument is signed (a negative size in the note).
    pub signed: u8,
    pub pad: [u8; 3],
}

/// A probe site's arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtSpec {
    pub args: [UsdtArg; USDT_MAX_ARGS],
    /// How many of `args` the site has.
    pub count: u32,
    pub pad: u32,
}

/// `hvprof check`'s USDT program: it records the arguments of every site
/// it fires on into [`CHECK_USDT_HITS_MAP`].
pub const CHECK_USDT_PROGRAM: &str = "check_usdt";

/// Ring buffer of [`UsdtHit`], one per firing of [`CHECK_USDT_PROGRAM`].
pub const CHECK_USDT_HITS_MAP: &str = "CHECK_USDT_HITS";

/// One firing of [`CHECK_USDT_PROGRAM`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtHit {
    /// The site's spec id (its attach cookie).
    pub spec_id: u32,
    /// The process it fired in.
    pub tgid: u32,
    /// The spec's argument count.
    pub count: u32,
    /// Bit N set when argument N was read (a failed memory read leaves it
    /// clear and the argument 0).
    pub read: u32,
    pub args: [u64; USDT_MAX_ARGS],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): plain `#[repr(C)]` integers with the padding spelled
    // out as fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::UsdtArg {}
    unsafe impl aya::Pod for super::UsdtSpec {}
    unsafe impl aya::Pod for super::UsdtHit {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No implicit padding: the eBPF side and userspace agree byte for byte.
    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<UsdtArg>(), 16);
        assert_eq!(size_of::<UsdtSpec>(), 16 * USDT_MAX_ARGS + 8);
        assert_eq!(size_of::<UsdtHit>(), 16 + 8 * USDT_MAX_ARGS);
    }
}
