//! `cargo xtask`: toolchain bootstrap, build, tests and the sample run.
//!
//! Every set-up step a fresh machine needs is here, so that README.md's two
//! commands (`cargo xtask sample`, `cargo xtask test`) are all a newcomer runs.

mod toolchain;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the pinned nightly (with rust-src) and build bpf-linker against
    /// its LLVM into .tools/. Idempotent: a second run only checks.
    Bootstrap,
    /// Bootstrap, then build `hvprof` (release) and print its path.
    Build,
    /// Bootstrap, then run every check and test: rustfmt, clippy, unit tests
    /// and the privileged integration tests (need root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Bootstrap, build, and run hvprof on the built-in sample workload.
    Sample,
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.current_dir(toolchain::root());
    cmd
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    println!("xtask: running {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    ensure!(status.success(), "{} failed ({status})", describe(cmd));
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn build_release() -> anyhow::Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "profiler",
        "--bin",
        "hvprof",
    ]))?;
    Ok(toolchain::root().join("target/release/hvprof"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Bootstrap => toolchain::bootstrap(),
        Cmd::Build => toolchain::bootstrap().and_then(|()| {
            let exe = build_release()?;
            println!("xtask: built {}", exe.display());
            Ok(())
        }),
        Cmd::Test { args } => toolchain::bootstrap().and_then(|()| test(&args)),
        Cmd::Sample => toolchain::bootstrap().and_then(|()| sample()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn test(args: &[String]) -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // Privileged integration tests share kernel state (tracepoints, the VM
    // counter), so they run one at a time, as aya's own do.
    run(cargo()
        .args(["test", "--all-targets"])
        .args(args)
        .args(["--", "--test-threads=1"]))?;
    Ok(())
}

fn sample() -> anyhow::Result<()> {
    let exe = build_release()?;
    run(Command::new(&exe).arg("check"))
}
