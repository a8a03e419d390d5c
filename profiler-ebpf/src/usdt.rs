//! USDT (`sys/sdt.h`) probe arguments: the specs userspace decoded from
//! each site's note, by spec id, and [`usdt_arg`], which reads one
//! argument where the site's uprobe fired. The spec id is the uprobe's
//! attach cookie.
//!
//! `check_usdt` is `hvprof check`'s program (and the USDT tests'): it
//! records the arguments of every site it fires on.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid, generated},
    macros::{map, uprobe},
    maps::{Array, RingBuf},
    programs::ProbeContext,
};
use profiler_common::usdt::{USDT_MAX_ARGS, USDT_MAX_SPECS, UsdtHit, UsdtSpec, arg_kind};

#[map]
static USDT_SPECS: Array<UsdtSpec> = Array::with_max_entries(USDT_MAX_SPECS, 0);

/// The spec id and spec of the site this uprobe fired on.
#[inline(always)]
pub fn usdt_spec(ctx: &ProbeContext) -> Option<(u32, &'static UsdtSpec)> {
    // SAFETY: the context is the probe's.
    let id = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    Some((id, USDT_SPECS.get(id)?))
}

/// Argument `i` of the site `spec` describes, sign- or zero-extended to 64
/// bits; `None` past the site's arguments or when its memory cannot be
/// read.
#[inline(always)]
pub fn usdt_arg(ctx: &ProbeContext, spec: &UsdtSpec, i: usize) -> Option<u64> {
    if i >= USDT_MAX_ARGS || i >= spec.count as usize {
        return None;
    }
    let arg = &spec.args[i];
    let raw = match arg.kind {
        arg_kind::CONST => arg.value,
        arg_kind::REG => register(ctx, arg.reg_off)?,
        arg_kind::REG_DEREF => {
            let addr = register(ctx, arg.reg_off)?.wrapping_add(arg.value);
            // Exactly the argument's bytes (little-endian: the low ones of
            // `v`), so one at the end of a mapped page still reads. 1, 2,
            // 4 and 8 stay themselves; written so that the verifier sees
            // 1..=8 (a range check LLVM may turn into one on `size - 1`,
            // which the verifier does not carry back to `size`).
            let size = (u32::from(arg.size).wrapping_sub(1) & 7) + 1;
            let mut v: u64 = 0;
            // SAFETY: the helper checks the user address; `v` has room
            // for the at most 8 bytes `size` can be.
            let rc = unsafe {
                generated::bpf_probe_read_user(
                    (&raw mut v).cast::<c_void>(),
                    size,
                    addr as *const c_void,
                )
            };
            if rc != 0 {
                return None;
            }
            v
        }
        _ => return None,
    };
    // Keep the low `size` bytes, extended by the sign when signed.
    let shift = (64 - 8 * u32::from(arg.size)) & 63;
    let high = raw << shift;
    Some(if arg.signed != 0 {
        ((high as i64) >> shift) as u64
    } else {
        high >> shift
    })
}

/// The register at byte `off` of the probed task's `pt_regs` (the offset
/// is the spec's, not a constant, and the verifier allows only constant
/// offsets into the context, so it is a read of kernel memory).
#[inline(always)]
fn register(ctx: &ProbeContext, off: u16) -> Option<u64> {
    let mut v: u64 = 0;
    // SAFETY: the helper checks the address; `ctx.regs` is the task's
    // register file, valid for the program's run, and userspace gives
    // offsets inside it.
    let rc = unsafe {
        generated::bpf_probe_read_kernel(
            (&raw mut v).cast::<c_void>(),
            8,
            ctx.regs.cast::<u8>().add(usize::from(off)).cast::<c_void>(),
        )
    };
    (rc == 0).then_some(v)
}

#[map]
static CHECK_USDT_HITS: RingBuf = RingBuf::with_byte_size(64 << 10, 0);

/// Records the arguments of the site it fired on (a `uprobe.multi`
/// program, attached with the sites' semaphores).
#[uprobe(multi)]
pub fn check_usdt(ctx: ProbeContext) -> u32 {
    try_check_usdt(&ctx).unwrap_or(0)
}

#[inline(always)]
fn try_check_usdt(ctx: &ProbeContext) -> Option<u32> {
    let (id, spec) = usdt_spec(ctx)?;
    let mut hit = UsdtHit {
        spec_id: id,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        count: spec.count,
        read: 0,
        args: [0; USDT_MAX_ARGS],
    };
    // Unrolled with constant indices: a loop over `i` made the verifier
    // walk every combination of the arguments' kinds (over its 1 M
    // instruction limit); straight-line code lets the paths of each
    // argument join before the next.
    macro_rules! read {
        ($($i:literal)*) => {$(
            if let Some(v) = usdt_arg(ctx, spec, $i) {
                hit.args[$i] = v;
                hit.read |= 1 << $i;
            }
        )*};
    }
    read!(0 1 2 3 4 5 6 7 8 9 10 11);
    CHECK_USDT_HITS.output(&hit, 0).ok()?;
    Some(0)
}
