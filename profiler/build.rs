//! Builds the eBPF object (profiler-ebpf) with aya-build so that `hvprof` can
//! embed it. The nightly and bpf-linker come from `./x bootstrap`.

use std::{
    env, fs,
    io::{self, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", manifest_dir.display()))?;
    let ebpf_dir = root.join("profiler-ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let nightly = nightly_channel(&toolchain_file)?;

    // bpf-linker is installed per project by `./x bootstrap`; put it
    // first on PATH for the nested cargo that aya-build runs.
    let linker_bin = root.join(".tools").join("bpf-linker").join("bin");
    println!(
        "cargo:rerun-if-changed={}",
        linker_bin.join("bpf-linker").display()
    );
    if env::var_os("AYA_BUILD_SKIP").is_none() && !has_bpf_linker(&linker_bin) {
        bail!(
            "bpf-linker not found in {} or on PATH: run `./x bootstrap` \
             (it installs the pinned nightly {nightly} and a bpf-linker built against its LLVM)",
            linker_bin.display()
        );
    }
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![linker_bin];
    paths.extend(env::split_paths(&path));
    let path = env::join_paths(paths).context("PATH contains an invalid entry")?;
    // SAFETY: build scripts are single-threaded at this point; nothing else
    // reads the environment concurrently.
    unsafe { env::set_var("PATH", path) };

    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", ebpf_dir.display()))?;
    // aya-build relays the nested cargo's whole output (every `Compiling …`
    // line) as build-script warnings, which a newcomer reads as trouble: keep
    // it aside and show it only if the build fails; on success only the
    // compiler's own diagnostics pass.
    let capture_path = PathBuf::from(env::var("OUT_DIR")?).join("ebpf-build.log");
    let capture = fs::File::create(&capture_path)
        .with_context(|| format!("creating {}", capture_path.display()))?;
    let built = with_stdout_to(&capture, || {
        aya_build::build_ebpf(
            [aya_build::Package {
                name: "profiler-ebpf",
                root_dir,
                ..Default::default()
            }],
            aya_build::Toolchain::Custom(&nightly),
        )
    })?;
    let log = fs::read_to_string(&capture_path).unwrap_or_default();
    relay(&log, built.is_ok());
    built.with_context(|| {
        format!("building the eBPF object failed (its output is above); if the toolchain is missing run `./x bootstrap` (nightly {nightly})")
    })
}

/// Runs `f` with this process's standard output going to `file`.
fn with_stdout_to<T>(file: &fs::File, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    io::stdout().flush()?;
    // SAFETY: dup/dup2/close on file descriptors this process owns; fd 1 is
    // restored before returning.
    unsafe {
        let saved = libc::dup(1);
        if saved < 0 || libc::dup2(file.as_raw_fd(), 1) < 0 {
            bail!(
                "redirecting the eBPF build's output: {}",
                io::Error::last_os_error()
            );
        }
        let out = f();
        let _ = io::stdout().flush();
        libc::dup2(saved, 1);
        libc::close(saved);
        Ok(out)
    }
}

/// Passes on what the eBPF build printed: cargo's rerun rules always; its
/// messages all when it failed (to stderr, which cargo shows for a failed
/// build script), else only diagnostics, never cargo's progress lines.
fn relay(log: &str, ok: bool) {
    for line in log.lines() {
        if line.starts_with("cargo::rerun-if") || line.starts_with("cargo:rerun-if") {
            println!("{line}");
            continue;
        }
        let Some(msg) = line
            .strip_prefix("cargo::warning=")
            .or_else(|| line.strip_prefix("cargo:warning="))
        else {
            continue;
        };
        if !ok {
            eprintln!("{msg}");
        } else if !is_progress(msg) {
            println!("cargo::warning={msg}");
        }
    }
}

/// Cargo's status lines: a verb right-aligned in 12 columns.
fn is_progress(line: &str) -> bool {
    const VERBS: &[&str] = &[
        "Compiling",
        "Finished",
        "Checking",
        "Fresh",
        "Running",
        "Blocking",
        "Updating",
        "Downloaded",
        "Downloading",
        "Locking",
        "Adding",
        "Building",
        "Dirty",
        "Packaging",
    ];
    line.starts_with(' ')
        && line
            .split_whitespace()
            .next()
            .is_some_and(|w| VERBS.contains(&w))
}

fn has_bpf_linker(tools_bin: &Path) -> bool {
    tools_bin.join("bpf-linker").is_file()
        || env::var_os("PATH")
            .is_some_and(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
}

/// `channel = "…"` from the eBPF crate's rust-toolchain.toml.
fn nightly_channel(file: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|l| l.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
        .ok_or_else(|| anyhow!("no `channel = \"…\"` in {}", file.display()))
}
