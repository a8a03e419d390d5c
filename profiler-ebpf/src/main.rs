//! hvprof's eBPF programs. One object; userspace picks which programs to load.
#![no_std]
#![no_main]
// BPF atomic add: core's atomic types have no read-modify-write on this target.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd is the only BPF atomic add")]

mod check;
mod record;
mod unwind;
mod usdt;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach this loop.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
