//! The eBPF toolchain: the pinned nightly (named once, in
//! `profiler-ebpf/rust-toolchain.toml`) with rust-src, and a bpf-linker built
//! against that nightly's own libLLVM, installed under `.tools/`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail, ensure};

/// bpf-linker release; its `llvm-NN` features must include the nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What bpf-linker was built against, recorded next to it so that a second
/// bootstrap can tell that nothing needs rebuilding.
#[derive(Debug, PartialEq, Eq)]
pub struct Llvm {
    /// e.g. 23
    pub major: u32,
    /// The library to link, without `lib` and `.so`: `LLVM-23-rust-1.101.0-nightly`.
    pub lib: String,
    /// `<sysroot>/lib`, where that library lives.
    pub lib_dir: PathBuf,
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn tools_dir() -> PathBuf {
    root().join(".tools")
}

pub fn bpf_linker_root() -> PathBuf {
    tools_dir().join("bpf-linker")
}

/// The nightly named in `profiler-ebpf/rust-toolchain.toml`.
pub fn nightly() -> anyhow::Result<String> {
    let file = root().join("profiler-ebpf").join("rust-toolchain.toml");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    parse_channel(&text).ok_or_else(|| anyhow!("no `channel = \"…\"` in {}", file.display()))
}

fn parse_channel(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|l| l.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
}

/// `LLVM version: 23.1.4` → 23.
fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))?
        .trim()
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The LLVM shared library of a sysroot's `lib/`, for the given major:
/// `libLLVM-23-rust-1.101.0-nightly.so` → `LLVM-23-rust-1.101.0-nightly`.
fn find_llvm_lib<'a>(names: impl IntoIterator<Item = &'a str>, major: u32) -> Option<String> {
    let prefix = format!("LLVM-{major}");
    names
        .into_iter()
        .filter_map(|n| n.strip_prefix("lib")?.strip_suffix(".so"))
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .min_by_key(String::len)
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the nightly with rust-src unless it is already there.
pub fn ensure_nightly(nightly: &str) -> anyhow::Result<PathBuf> {
    if Command::new("rustup").arg("--version").output().is_err() {
        bail!(
            "rustup is not installed: the eBPF build needs the pinned nightly {nightly}; \
             install rustup (https://rustup.rs is not reachable here: use your distribution's rustup package)"
        );
    }
    let sysroot = |n: &str| {
        run_ok(Command::new("rustup").args(["run", n, "rustc", "--print", "sysroot"]))
            .map(|s| PathBuf::from(s.trim()))
    };
    if let Ok(sysroot) = sysroot(nightly)
        && sysroot.join("lib/rustlib/src/rust/library/core").is_dir()
    {
        println!("xtask: nightly {nightly} with rust-src: present");
        return Ok(sysroot);
    }
    println!("xtask: installing nightly {nightly} with rust-src (about a minute)…");
    let status = Command::new("rustup")
        .args([
            "toolchain",
            "install",
            nightly,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ])
        .status()
        .context("running rustup")?;
    ensure!(
        status.success(),
        "installing the nightly toolchain {nightly} failed ({status}). It is pinned in \
         profiler-ebpf/rust-toolchain.toml; check that the Rust release server is reachable, \
         or pin a nightly that is already installed (`rustup toolchain list`)"
    );
    sysroot(nightly).context("the nightly installed but has no sysroot")
}

/// Reads the LLVM major and library name from the nightly itself.
pub fn llvm_of(nightly: &str, sysroot: &Path) -> anyhow::Result<Llvm> {
    let vv = run_ok(Command::new("rustup").args(["run", nightly, "rustc", "-vV"]))?;
    let major = parse_llvm_major(&vv)
        .ok_or_else(|| anyhow!("`rustc +{nightly} -vV` names no LLVM version:\n{vv}"))?;
    let lib_dir = sysroot.join("lib");
    let names: Vec<String> = fs::read_dir(&lib_dir)
        .with_context(|| format!("listing {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let lib = find_llvm_lib(names.iter().map(String::as_str), major).ok_or_else(|| {
        anyhow!(
            "no libLLVM-{major}*.so in {}: this nightly does not ship its LLVM as a shared library, \
             so bpf-linker cannot link it; pin another nightly in profiler-ebpf/rust-toolchain.toml",
            lib_dir.display()
        )
    })?;
    Ok(Llvm {
        major,
        lib,
        lib_dir,
    })
}

fn stamp_text(nightly: &str, llvm: &Llvm) -> String {
    format!(
        "bpf-linker {BPF_LINKER_VERSION}\nnightly {nightly}\nllvm {}\nlib {}\n",
        llvm.major, llvm.lib
    )
}

/// Builds bpf-linker against the nightly's libLLVM, unless the same build is
/// already installed. Returns its `bin/` directory.
pub fn ensure_bpf_linker(nightly: &str, llvm: &Llvm) -> anyhow::Result<PathBuf> {
    let root = bpf_linker_root();
    let bin = root.join("bin");
    let exe = bin.join("bpf-linker");
    let stamp = root.join("hvprof-stamp");
    let want = stamp_text(nightly, llvm);
    let works = || {
        Command::new(&exe)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if fs::read_to_string(&stamp).is_ok_and(|s| s == want) && works() {
        println!(
            "xtask: bpf-linker {BPF_LINKER_VERSION} for LLVM {} ({}): present",
            llvm.major, llvm.lib
        );
        return Ok(bin);
    }
    println!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} from {} (a few minutes)…",
        llvm.lib,
        llvm.lib_dir.display()
    );
    let lib_dir = llvm.lib_dir.display();
    let rustflags = format!(
        "-L native={lib_dir} -l dylib={} -C link-arg=-Wl,-rpath,{lib_dir}",
        llvm.lib
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{},no-llvm-linking", llvm.major))
        .arg("--root")
        .arg(&root)
        .env("RUSTFLAGS", rustflags)
        .status()
        .context("running cargo install")?;
    ensure!(
        status.success(),
        "building bpf-linker failed ({status}). It links {} from {}; if bpf-linker \
         {BPF_LINKER_VERSION} has no `llvm-{}` feature, pin a nightly whose LLVM it supports \
         in profiler-ebpf/rust-toolchain.toml",
        llvm.lib,
        llvm.lib_dir.display(),
        llvm.major
    );
    ensure!(
        works(),
        "{} was built but does not run; remove {} and run `./x bootstrap` again",
        exe.display(),
        root.display()
    );
    fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(bin)
}

/// The whole bootstrap. Idempotent: a second run only checks.
pub fn bootstrap() -> anyhow::Result<()> {
    let nightly = nightly()?;
    let sysroot = ensure_nightly(&nightly)?;
    let llvm = llvm_of(&nightly, &sysroot)?;
    ensure_bpf_linker(&nightly, &llvm)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_channel() {
        let t = "# comment\n[toolchain]\nchannel = \"nightly-2026-10-29\"\ncomponents = [\"rust-src\"]\n";
        assert_eq!(parse_channel(t).as_deref(), Some("nightly-2026-10-29"));
        assert_eq!(parse_channel("[toolchain]\n"), None);
    }

    #[test]
    fn reads_llvm_major() {
        let vv = "rustc 1.101.0-nightly (92ffebece 2026-10-28)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 23.1.4\n";
        assert_eq!(parse_llvm_major(vv), Some(23));
        assert_eq!(parse_llvm_major("rustc 1.0"), None);
    }

    #[test]
    fn finds_llvm_library() {
        let names = [
            "libLLVM-23-rust-1.101.0-nightly.so",
            "libLLVM.so.23.1-rust-1.101.0-nightly",
            "librustc_driver-23e18013e8e3f5f8.so",
            "rustlib",
        ];
        assert_eq!(
            find_llvm_lib(names, 23).as_deref(),
            Some("LLVM-23-rust-1.101.0-nightly")
        );
        assert_eq!(find_llvm_lib(names, 22), None);
    }
}
