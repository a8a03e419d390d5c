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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_has_no_padding() {
        assert_eq!(core::mem::size_of::<UnwindRow>(), 12);
        assert_eq!(core::mem::align_of::<UnwindRow>(), 4);
    }
}
