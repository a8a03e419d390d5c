//! Folded stacks, as `hvprof diff` reads them into a differential flame
//! graph.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = profiler::fuzzing::folded(data);
});
