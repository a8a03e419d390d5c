//! `./x`: toolchain bootstrap, build, tests and the sample run.
//!
//! Every set-up step a fresh machine needs is here, so that README.md's two
//! commands (`./x sample`, `./x test`) are all a newcomer runs.

mod bench;
mod bench_report;
mod fuzz;
mod libvirt_procs;
mod massboot;
mod packages;
mod soak;
mod toolchain;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "./x", bin_name = "./x")]
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
    Sample {
        /// Where the report goes.
        #[arg(short, long, default_value = "target/hvprof-sample")]
        output: PathBuf,
    },
    /// Measure: the sample workload with and without `hvprof record`,
    /// alternating; prints the overhead ratio, per-event eBPF cost, losses
    /// and the time from stop to files written.
    Bench {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 30)]
        vms: usize,
        /// Extra argument for `hvprof record` (repeatable), e.g.
        /// `--hvprof-arg=--kernel-stack-min-block=0`.
        #[arg(long = "hvprof-arg", allow_hyphen_values = true)]
        hvprof_args: Vec<String>,
    },
    /// Measure a long recording: `hvprof record -a` for minutes beside a
    /// clean build of this project in a loop; prints hvprof's memory over
    /// time, its CPU, losses by kind, the time from stop to files written
    /// and the profile's size.
    Soak(soak::Opts),
    /// Measure `hvprof report` on a synthetic profile of 1 M on-CPU samples
    /// and 50 k distinct stacks against `perf script | inferno-collapse-perf
    /// | inferno-flamegraph` on the same samples; prints both and the ratio.
    BenchReport(bench_report::Opts),
    /// Profile a real libvirtd mass boot end to end: install libvirt and
    /// QEMU if missing, start the daemons by hand, boot N transient guests
    /// over the libvirt API while `hvprof record` follows libvirtd, then
    /// tear everything down (needs root).
    Massboot(massboot::Opts),
    /// Run the fuzz targets (profiler/fuzz/) with the pinned nightly, from
    /// their committed corpora; installs cargo-fuzz into .tools/.
    Fuzz(fuzz::Opts),
    /// Write profiler/src/libvirt/procs.rs, the names of libvirt's RPC
    /// procedures, from Debian's libvirt source package for the installed
    /// libvirt (downloaded with `apt-get source`; the system's apt sources
    /// are not changed).
    GenLibvirtProcs(libvirt_procs::Opts),
    /// (internal) Run a command under a child subreaper that reaps orphans.
    #[command(hide = true)]
    Subreaper {
        #[arg(long)]
        pidfile: PathBuf,
        #[arg(last = true)]
        cmd: Vec<String>,
    },
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

/// Builds `hvprof` and the sample workload (release); returns their paths.
fn build_release() -> anyhow::Result<(PathBuf, PathBuf)> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "profiler",
        "--package",
        "vmload",
    ]))?;
    let dir = toolchain::root().join("target/release");
    Ok((dir.join("hvprof"), dir.join("vmload")))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Bootstrap => toolchain::bootstrap(),
        Cmd::Build => toolchain::bootstrap().and_then(|()| {
            let (exe, _) = build_release()?;
            println!("xtask: built {}", exe.display());
            Ok(())
        }),
        Cmd::Test { args } => toolchain::bootstrap().and_then(|()| test(&args)),
        Cmd::Sample { output } => toolchain::bootstrap().and_then(|()| sample(&output)),
        Cmd::Massboot(opts) => {
            let hvprof = match &opts.hvprof {
                Some(p) => Ok(p.clone()),
                None => toolchain::bootstrap().and_then(|()| build_release().map(|(h, _)| h)),
            };
            hvprof.and_then(|h| massboot::run(&opts, &h).map(|_| ()))
        }
        Cmd::Subreaper { pidfile, cmd } => match massboot::subreaper(&pidfile, &cmd) {
            Ok(code) => return ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => Err(e),
        },
        Cmd::Fuzz(opts) => fuzz::run_targets(&opts),
        Cmd::GenLibvirtProcs(opts) => libvirt_procs::run(&opts),
        Cmd::BenchReport(opts) => toolchain::bootstrap().and_then(|()| {
            run(cargo().args([
                "build",
                "--release",
                "--package",
                "profiler",
                "--bin",
                "hvprof",
                "--example",
                "synth_profile",
            ]))?;
            let dir = toolchain::root().join("target/release");
            bench_report::run(
                &opts,
                &dir.join("hvprof"),
                &dir.join("examples/synth_profile"),
            )
        }),
        Cmd::Bench {
            rounds,
            vms,
            hvprof_args,
        } => toolchain::bootstrap().and_then(|()| {
            let (hvprof, vmload) = build_release()?;
            bench::run(&hvprof, &vmload, rounds, vms, &hvprof_args)
        }),
        Cmd::Soak(opts) => {
            let hvprof = match &opts.hvprof {
                Some(p) => Ok(p.clone()),
                None => toolchain::bootstrap().and_then(|()| build_release().map(|(h, _)| h)),
            };
            hvprof.and_then(|h| soak::run(&opts, &h))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the tests drive besides hvprof: the D-Bus daemon and the three
/// client libraries' command-line clients, python3-gi for the sample D-Bus
/// service, a browser for the HTML report, and the independent decoders of
/// hvprof's exports (`protoc`, `go tool pprof`, the speedscope schema
/// validator).
const TEST_PACKAGES: &[&str] = &[
    "dbus-daemon",
    "dbus-bin",
    "libglib2.0-bin",
    "python3-gi",
    "systemd",
    "chromium",
    "protobuf-compiler",
    "golang-go",
    "python3-jsonschema",
    "linux-perf",
    "bpftrace",
];

fn test(args: &[String]) -> anyhow::Result<()> {
    packages::ensure("test", TEST_PACKAGES, packages::Suite::Release)?;
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

/// The sample run: hvprof records the sample workload, which creates 6 VMs
/// through /dev/kvm with named work between them, in windows of 2 VMs.
fn sample(output: &std::path::Path) -> anyhow::Result<()> {
    let (hvprof, vmload) = build_release()?;
    run(Command::new(&hvprof).arg("check"))
        .context("this machine cannot record: see the table above")?;
    let plan =
        "busy:400,vm,busy:600,block:400,vm,vm,child:300,vm,vm,spawn:300,thread:300,vm,block:300";
    run(Command::new(&hvprof)
        .args(["record", "--window-size", "2", "-o"])
        .arg(output)
        .arg("--")
        .arg(&vmload)
        .arg(plan))?;
    println!(
        "\nxtask: flame graphs per window in {}/w*/oncpu.svg and offcpu.svg; re-render with `hvprof report {}/profile.hvprof -o DIR`",
        output.display(),
        output.display()
    );
    Ok(())
}
