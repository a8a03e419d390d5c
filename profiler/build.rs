//! Builds the eBPF object (profiler-ebpf) with aya-build so that `hvprof` can
//! embed it. The nightly and bpf-linker come from `cargo xtask bootstrap`.

use std::{
    env, fs,
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

    // bpf-linker is installed per project by `cargo xtask bootstrap`; put it
    // first on PATH for the nested cargo that aya-build runs.
    let linker_bin = root.join(".tools").join("bpf-linker").join("bin");
    println!(
        "cargo:rerun-if-changed={}",
        linker_bin.join("bpf-linker").display()
    );
    if env::var_os("AYA_BUILD_SKIP").is_none() && !has_bpf_linker(&linker_bin) {
        bail!(
            "bpf-linker not found in {} or on PATH: run `cargo xtask bootstrap` \
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
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "profiler-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&nightly),
    )
    .with_context(|| {
        format!("building the eBPF object failed; if the toolchain is missing run `cargo xtask bootstrap` (nightly {nightly})")
    })
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
