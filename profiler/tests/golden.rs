//! Golden files (no root): the checked-in profile of a real libvirtd mass
//! boot (`samples/massboot/profile.hvprof`) rendered by `render::write_all`
//! — what `hvprof report` writes — must give exactly the tables (txt, md,
//! csv, json), folded stacks and summaries checked in under
//! `tests/golden/massboot/`, for a few windows and the whole recording.
//!
//! After an intended change of the output, rewrite them and review the diff:
//!
//! ```sh
//! HVPROF_BLESS=1 cargo test -p profiler --test golden
//! ```

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use profiler::{profile::Profile, render};

const BLESS: &str = "HVPROF_BLESS";

/// The setup window, the first VM window and the last.
const WINDOWS: [&str; 3] = ["w00-setup", "w01-vms-1-4", "w04-vms-13-16"];

const FOLDED: [&str; 4] = ["oncpu", "offcpu", "lockwait", "dbuswait"];
const TABLES: [&str; 4] = ["locks", "forks", "cgroups", "dbus"];
const TABLE_FORMATS: [&str; 4] = ["txt", "md", "csv", "json"];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/massboot")
}

/// The files under test, relative to the report directory.
fn compared_files() -> Vec<String> {
    let mut files = Vec::new();
    let tables = |prefix: &str, files: &mut Vec<String>| {
        for t in TABLES {
            for ext in TABLE_FORMATS {
                files.push(format!("{prefix}{t}.{ext}"));
            }
        }
    };
    for w in WINDOWS {
        for f in FOLDED {
            files.push(format!("{w}/{f}.folded"));
        }
        tables(&format!("{w}/"), &mut files);
    }
    tables("", &mut files);
    files.push("summary.txt".to_owned());
    files.push("summary.json".to_owned());
    files
}

/// A short unified-style diff: the common head and tail are cut, and the
/// first differing lines shown with a little context.
fn short_diff(expected: &str, actual: &str) -> String {
    const MAX: usize = 12;
    let e: Vec<&str> = expected.lines().collect();
    let a: Vec<&str> = actual.lines().collect();
    let head = e.iter().zip(&a).take_while(|(x, y)| x == y).count();
    let tail = e[head..]
        .iter()
        .rev()
        .zip(a[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (e_mid, a_mid) = (&e[head..e.len() - tail], &a[head..a.len() - tail]);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "@@ -{},{} +{},{} @@",
        head + 1,
        e_mid.len(),
        head + 1,
        a_mid.len()
    );
    for l in &e[head.saturating_sub(2)..head] {
        let _ = writeln!(out, " {l}");
    }
    for l in e_mid.iter().take(MAX) {
        let _ = writeln!(out, "-{l}");
    }
    if e_mid.len() > MAX {
        let _ = writeln!(out, "-… {} more", e_mid.len() - MAX);
    }
    for l in a_mid.iter().take(MAX) {
        let _ = writeln!(out, "+{l}");
    }
    if a_mid.len() > MAX {
        let _ = writeln!(out, "+… {} more", a_mid.len() - MAX);
    }
    if expected.ends_with('\n') != actual.ends_with('\n') {
        out.push_str("(the files differ in their final newline)\n");
    }
    out
}

fn files_under(dir: &Path, base: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, base, out);
        } else {
            out.insert(
                path.strip_prefix(base)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
}

#[test]
fn report_of_the_sample_matches_the_golden_files() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/massboot/profile.hvprof");
    let profile = Profile::read(&path).expect("the checked-in sample profile reads");
    let out = std::env::temp_dir().join(format!("hvprof-golden-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    render::write_all(&profile, &out).expect("the report renders");
    let golden = golden_dir();
    let files = compared_files();

    if std::env::var_os(BLESS).is_some_and(|v| v != "0") {
        let _ = std::fs::remove_dir_all(&golden);
        for f in &files {
            let dest = golden.join(f);
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(out.join(f), &dest)
                .unwrap_or_else(|e| panic!("blessing {f}: the report has no such file ({e})"));
        }
        eprintln!(
            "blessed {} golden files in {}",
            files.len(),
            golden.display()
        );
        let _ = std::fs::remove_dir_all(&out);
        return;
    }

    let mut failures = Vec::new();
    for f in &files {
        let actual = std::fs::read_to_string(out.join(f))
            .unwrap_or_else(|e| format!("<the report did not write {f}: {e}>\n"));
        match std::fs::read_to_string(golden.join(f)) {
            Ok(expected) if expected == actual => {}
            Ok(expected) => failures.push(format!(
                "{f} differs (- golden, + now):\n{}",
                short_diff(&expected, &actual)
            )),
            Err(e) => failures.push(format!("{f}: no golden file ({e})")),
        }
    }
    let mut present = BTreeSet::new();
    files_under(&golden, &golden, &mut present);
    let wanted: BTreeSet<String> = files.iter().cloned().collect();
    for stale in present.difference(&wanted) {
        failures.push(format!("{stale}: a golden file that no test compares"));
    }
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        failures.is_empty(),
        "the report of samples/massboot/profile.hvprof does not match its golden files \
         ({} problems, {} files compared):\n\n{}\n\
         If the change is intended, rewrite them and review the diff:\n  \
         {BLESS}=1 cargo test -p profiler --test golden",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn short_diff_shows_the_change_with_context() {
    let d = short_diff("a\nb\nc\nd\ne\n", "a\nb\nX\nd\ne\n");
    assert_eq!(d, "@@ -3,1 +3,1 @@\n a\n b\n-c\n+X\n");
    let d = short_diff("a\nb\n", "a\nb\nc\n");
    assert_eq!(d, "@@ -3,0 +3,1 @@\n a\n b\n+c\n");
    let d = short_diff("a\n", "a");
    assert!(d.contains("final newline"), "{d}");
}
