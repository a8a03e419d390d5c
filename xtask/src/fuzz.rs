//! `./x fuzz`: the fuzz targets of `profiler/fuzz/` (cargo-fuzz, libFuzzer)
//! with the pinned nightly, cargo-fuzz installed under `.tools/`. Each
//! target starts from its committed corpus (`profiler/tests/data/fuzz/`),
//! which `cargo test` also runs on stable; new inputs go to the fuzz
//! crate's own `corpus/` and crashes to its `artifacts/` (both ignored by
//! git).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use crate::{describe, run, toolchain};

/// cargo-fuzz release, installed into `.tools/cargo-fuzz`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// A fuzz target (a `[[bin]]` of `profiler/fuzz/Cargo.toml`) and the
/// longest input worth trying on it.
pub struct Target {
    pub name: &'static str,
    pub max_len: usize,
}

/// Every target, in the order `./x fuzz` runs them.
pub const TARGETS: [Target; 4] = [
    // A small profile file: the 12-byte header and gzip behind it.
    Target {
        name: "profile_file",
        max_len: 8192,
    },
    // The fixture's JSON is 3.5 kB, the trimmed sample's 6.5 kB.
    Target {
        name: "profile_json",
        max_len: 16384,
    },
    Target {
        name: "folded",
        max_len: 4096,
    },
    Target {
        name: "fail_on",
        max_len: 256,
    },
];

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// The target to run; default: each in turn.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS.map(|t| t.name)))]
    target: Option<String>,
    /// How long each target runs.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Afterwards, add the inputs that reached new code to the committed
    /// corpus (profiler/tests/data/fuzz/TARGET/corpus), for a commit.
    #[arg(long)]
    merge: bool,
}

fn fuzz_dir() -> PathBuf {
    toolchain::root().join("profiler/fuzz")
}

/// The committed inputs of a target: `corpus/` (minimised by
/// `cargo fuzz cmin`) and `crashes/` (reproducers of fixed bugs).
fn committed(target: &str, part: &str) -> PathBuf {
    toolchain::root()
        .join("profiler/tests/data/fuzz")
        .join(target)
        .join(part)
}

/// Installs cargo-fuzz into `.tools/cargo-fuzz` unless that version is
/// there; returns its `bin/`.
fn ensure_cargo_fuzz() -> anyhow::Result<PathBuf> {
    let root = toolchain::tools_dir().join("cargo-fuzz");
    let bin = root.join("bin");
    let want = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    let installed = Command::new(bin.join("cargo-fuzz"))
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == want);
    if installed {
        println!("xtask: {want}: present");
        return Ok(bin);
    }
    println!("xtask: installing {want} into {} …", root.display());
    run(crate::cargo()
        .args(["install", "cargo-fuzz", "--locked", "--force", "--version"])
        .arg(CARGO_FUZZ_VERSION)
        .arg("--root")
        .arg(&root))
    .context("installing cargo-fuzz")?;
    Ok(bin)
}

/// `cargo fuzz …` with the nightly, cargo-fuzz first on PATH, in the
/// fuzz crate's directory.
fn cargo_fuzz(nightly: &str, bin: &Path) -> anyhow::Result<Command> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&path)),
    )
    .context("PATH contains an invalid entry")?;
    let mut cmd = Command::new("rustup");
    cmd.args(["run", nightly, "cargo", "fuzz"])
        .current_dir(toolchain::root().join("profiler"))
        .env("PATH", path);
    Ok(cmd)
}

pub fn run_targets(opts: &Opts) -> anyhow::Result<()> {
    let targets: Vec<&Target> = match &opts.target {
        None => TARGETS.iter().collect(),
        Some(name) => match TARGETS.iter().find(|t| t.name == name) {
            Some(t) => vec![t],
            None => bail!(
                "no fuzz target {name:?}: the targets are {}",
                TARGETS.map(|t| t.name).join(", ")
            ),
        },
    };
    // The profiler crate's build script builds the eBPF object: it needs
    // bpf-linker too.
    toolchain::bootstrap()?;
    let nightly = toolchain::nightly()?;
    let bin = ensure_cargo_fuzz()?;
    for t in targets {
        fuzz_one(t, &nightly, &bin, opts)?;
    }
    Ok(())
}

fn fuzz_one(t: &Target, nightly: &str, bin: &Path, opts: &Opts) -> anyhow::Result<()> {
    let work = fuzz_dir().join("corpus").join(t.name);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let mut libfuzzer = vec![
        format!("-max_total_time={}", opts.seconds),
        format!("-max_len={}", t.max_len),
        "-print_final_stats=1".to_owned(),
    ];
    let dict = fuzz_dir().join("dict").join(format!("{}.dict", t.name));
    if dict.is_file() {
        libfuzzer.push(format!("-dict={}", dict.display()));
    }
    let mut cmd = cargo_fuzz(nightly, bin)?;
    cmd.args(["run", t.name]).arg(&work);
    // libFuzzer refuses a seed directory that is not there: a target
    // without reproducers has no `crashes/`.
    for part in ["corpus", "crashes"] {
        let seeds = committed(t.name, part);
        if seeds.is_dir() {
            cmd.arg(seeds);
        }
    }
    cmd.arg("--").args(&libfuzzer);
    println!("xtask: running {}", describe(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(&cmd)))?;
    ensure!(
        status.success(),
        "fuzz target {} failed ({status}): the input that broke it is in {}; \
         fix the bug, then copy the input (after `cargo fuzz tmin {}`) into {} and give \
         profiler/tests/fuzz_corpora.rs the error it must now get",
        t.name,
        fuzz_dir().join("artifacts").join(t.name).display(),
        t.name,
        committed(t.name, "crashes").display()
    );
    if opts.merge {
        // New edges only, not new hit counts or comparisons: what is
        // committed stays small.
        let mut merge = cargo_fuzz(nightly, bin)?;
        run(merge
            .args(["run", t.name])
            .arg(committed(t.name, "corpus"))
            .arg(&work)
            .args(["--", "-merge=1", "-use_counters=0", "-use_cmp=0"])
            .arg(format!("-max_len={}", t.max_len)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `[[bin]]` of the fuzz crate is a target here, and nothing else.
    #[test]
    fn targets_are_the_fuzz_crates_bins() {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        let mut bins: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.trim().strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|n| *n != "profiler-fuzz")
            .collect();
        let mut ours: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        bins.sort_unstable();
        ours.sort_unstable();
        assert_eq!(bins, ours);
    }
}
