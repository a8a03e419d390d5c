//! hvprof's eBPF programs. One object; userspace picks which programs to load.
#![no_std]
#![no_main]
// BPF atomic add: core's atomic types have no read-modify-write on this target.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd is the only BPF atomic add")]

/// A classic tracepoint program (section `tracepoint`, attached by name
/// from userspace) that runs its body and returns 1, whatever the body
/// did. aya's `#[tracepoint]` returns 0, and when the programs on a
/// tracepoint return 0 the kernel drops the event for every perf user of
/// it (`perf_trace_run_bpf_submit`): `perf stat`, `perf lock record`,
/// trace-cmd and other profilers would see nothing while hvprof records.
/// With no perf user listening, the kernel returns before it looks.
macro_rules! tracepoint_program {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident($ctx:ident: TracePointContext) $body:block
    ) => {
        tracepoint_program! {
            $(#[$attr])*
            $vis fn $name($ctx: TracePointContext) -> () $body
        }
    };
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident($ctx:ident: TracePointContext) -> $ret:ty $body:block
    ) => {
        $(#[$attr])*
        #[unsafe(no_mangle)]
        #[unsafe(link_section = "tracepoint")]
        $vis fn $name(ctx: *mut ::core::ffi::c_void) -> u32 {
            #[inline(always)]
            fn program($ctx: ::aya_ebpf::programs::TracePointContext) -> $ret $body
            let _ = program(::aya_ebpf::programs::TracePointContext::new(ctx));
            1
        }
    };
}

mod check;
mod record;
mod unwind;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach this loop.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
