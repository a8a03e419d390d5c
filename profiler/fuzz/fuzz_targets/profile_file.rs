//! A profile file, read as `hvprof report` reads one, and rendered.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = profiler::fuzzing::profile_file(data);
});
