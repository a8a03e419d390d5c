//! The fuzz targets' corpora (`tests/data/fuzz/TARGET/`: what `./x fuzz`
//! minimised, and the reproducers of what the targets found) run through
//! the targets' own functions (`profiler::fuzzing`), on stable and without
//! libFuzzer: no input panics, and each reproducer is refused with the
//! clear error its fix added.

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use profiler::fuzzing;

/// `corpus` (minimised by `cargo fuzz cmin`) or `crashes` (reproducers).
fn dir(target: &str, part: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz")
        .join(target)
        .join(part)
}

/// Every input in a directory, by file name; none when it is not there
/// (a target without reproducers has no `crashes/`).
fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// Runs every input of `target`'s corpus and reproducers through `run`;
/// fails naming every input that panicked.
fn no_panics(target: &str, run: impl Fn(&[u8])) {
    let mut files = Vec::new();
    for part in ["corpus", "crashes"] {
        files.extend(
            inputs(&dir(target, part))
                .into_iter()
                .map(|(name, data)| (format!("{part}/{name}"), data)),
        );
    }
    assert!(!files.is_empty(), "no inputs for {target}");
    let panicked: Vec<&str> = files
        .iter()
        .filter(|(_, data)| catch_unwind(AssertUnwindSafe(|| run(data))).is_err())
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(
        panicked.is_empty(),
        "{} of {} inputs of {target} panicked: {panicked:?}",
        panicked.len(),
        files.len(),
    );
}

/// Each reproducer of `target` (`crashes/NAME`) gets the error `expected`
/// names for it (a part of its message); every reproducer has one.
fn refused(target: &str, expected: &[(&str, &str)], run: impl Fn(&[u8]) -> Result<(), String>) {
    let files = inputs(&dir(target, "crashes"));
    for (name, data) in &files {
        let Some((_, want)) = expected.iter().find(|(n, _)| n == name) else {
            panic!("{target}/crashes/{name} has no expected error in this test");
        };
        match run(data) {
            Ok(()) => panic!("{target}/crashes/{name} was accepted; expected: {want}"),
            Err(e) => assert!(
                e.contains(want),
                "{target}/crashes/{name}: {e}\nexpected: {want}"
            ),
        }
    }
    for (name, _) in expected {
        assert!(
            files.iter().any(|(n, _)| n == name),
            "{target}/crashes/{name} is missing"
        );
    }
}

#[test]
fn profile_file_inputs_never_panic() {
    no_panics("profile_file", |d| {
        let _ = fuzzing::profile_file(d);
    });
}

#[test]
fn profile_json_inputs_never_panic() {
    no_panics("profile_json", |d| {
        let _ = fuzzing::profile_json(d);
    });
}

#[test]
fn folded_inputs_never_panic() {
    no_panics("folded", |d| {
        let _ = fuzzing::folded(d);
    });
}

#[test]
fn fail_on_inputs_never_panic() {
    no_panics("fail_on", |d| {
        let _ = fuzzing::fail_on(d);
    });
}

#[test]
fn profile_file_reproducers_are_refused() {
    refused("profile_file", PROFILE_FILE_CRASHES, |d| {
        fuzzing::profile_file(d).map_err(|e| e.to_string())
    });
}

#[test]
fn profile_json_reproducers_are_refused() {
    refused("profile_json", PROFILE_JSON_CRASHES, |d| {
        fuzzing::profile_json(d).map_err(|e| e.to_string())
    });
}

#[test]
fn folded_reproducers_are_refused() {
    refused("folded", FOLDED_CRASHES, |d| {
        fuzzing::folded(d).map_err(|e| e.to_string())
    });
}

#[test]
fn fail_on_reproducers_are_refused() {
    refused("fail_on", FAIL_ON_CRASHES, |d| {
        fuzzing::fail_on(d).map(|_| ())
    });
}

/// What each reproducer crashed before its fix, and the error it gets now.
/// `profile_file`'s are two of `profile_json`'s, as files.
const PROFILE_FILE_CRASHES: &[(&str, &str)] = &[
    ("duplicate-window.hvprof", "(window 2 is listed twice)"),
    (
        "window-summary-sum.hvprof",
        "(its off-CPU blocks add up to more than 2^64)",
    ),
];
/// Each overflowed adding up a column (a `u64` in debug builds and in the
/// fuzz targets; wrapped silently in release builds).
const PROFILE_JSON_CRASHES: &[(&str, &str)] = &[
    // One row of 2^63 samples in window 2, listed twice: the whole
    // recording's metrics added window 2's twice.
    ("duplicate-window.json", "(window 2 is listed twice)"),
    // The summary's off-CPU blocks of a window.
    (
        "window-summary-sum.json",
        "(its off-CPU blocks add up to more than 2^64)",
    ),
    // The summary's losses.
    (
        "loss-counts.json",
        "(its loss counts add up to more than 2^64)",
    ),
    // The lock table's contentions of one lock.
    (
        "lock-table-sums.json",
        "(its lock contentions add up to more than 2^64)",
    ),
    // The lock table's p50/p99 from a histogram.
    (
        "lock-histogram.json",
        "(its lock wait histograms add up to more than 2^64)",
    ),
    // The D-Bus table's p50/p99 from a histogram.
    (
        "dbus-histogram.json",
        "(its D-Bus histograms add up to more than 2^64)",
    ),
    // Two calls' histograms merged bucket by bucket.
    (
        "merged-histograms.json",
        "(its D-Bus histograms add up to more than 2^64)",
    ),
    // A window's flame graph (inferno adds up the folded counts).
    (
        "flame-graph-total.json",
        "(its on-CPU samples add up to more than 2^64)",
    ),
    // The speedscope export's total of on-CPU time, samples × period.
    (
        "speedscope-total.json",
        "on-CPU samples at 99 Hz come to more than 2^64 ns of CPU time",
    ),
];
const FOLDED_CRASHES: &[(&str, &str)] = &[
    // A: `x 18446744073709551615`, `y 1`: adding up A's counts overflowed.
    (
        "sum-overflow",
        "more than a differential flame graph can draw",
    ),
    // A: `x 1`, B: `x 9223372036854775808`: inferno's B − A as isize
    // overflowed.
    (
        "inferno-delta-overflow",
        "more than a differential flame graph can draw",
    ),
    // B 6.2e16 against A 1 (minimised by libFuzzer): inferno's colour of
    // a change, 150 × it as isize, overflowed.
    (
        "inferno-colour-overflow",
        "more than a differential flame graph can draw",
    ),
];
const FAIL_ON_CRASHES: &[(&str, &str)] = &[];

/// Writes the seeds the corpora started from (`seed-*`), from
/// [`fuzzing::fixture`]: after the profile model changes,
/// `cargo test -p profiler --test fuzz_corpora -- --ignored` and
/// `./x fuzz` again.
#[test]
#[ignore = "writes the seeds into the corpora"]
fn write_seeds() {
    let p = fuzzing::fixture();
    let tmp = std::env::temp_dir().join(format!("hvprof-seed-{}.hvprof", std::process::id()));
    p.write(&tmp).unwrap();
    fs::copy(
        &tmp,
        dir("profile_file", "corpus").join("seed-fixture.hvprof"),
    )
    .unwrap();
    profiler::profile::Profile::default().write(&tmp).unwrap();
    fs::copy(
        &tmp,
        dir("profile_file", "corpus").join("seed-empty.hvprof"),
    )
    .unwrap();
    fs::remove_file(&tmp).unwrap();
    fs::write(
        dir("profile_json", "corpus").join("seed-fixture.json"),
        serde_json::to_vec(&p).unwrap(),
    )
    .unwrap();
    let folded = |window| {
        profiler::graphs::GRAPHS
            .iter()
            .flat_map(|g| g.folded(&p, window))
            .collect::<Vec<_>>()
            .join("\n")
    };
    fs::write(
        dir("folded", "corpus").join("seed-fixture"),
        format!("\u{1}{}\0{}", folded(1), folded(2)),
    )
    .unwrap();
    for (i, gate) in [
        "losses>0",
        "window:1.oncpu>=500",
        "metric:lockwait>25%",
        "lock:cgroup_mutex.max>50ms",
        "dbus:org.example.Service.Work.timeouts>0",
        "regression>10%",
        "offcpu.total>2m",
    ]
    .iter()
    .enumerate()
    {
        fs::write(dir("fail_on", "corpus").join(format!("seed-{i}")), gate).unwrap();
    }
}
