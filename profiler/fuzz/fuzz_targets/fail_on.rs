//! A `--fail-on` condition, parsed and evaluated.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = profiler::fuzzing::fail_on(data);
});
