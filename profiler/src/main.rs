//! The `hvprof` command line: a thin shell over the `profiler` library.

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use profiler::{
    cli::{parse_duration, parse_pids},
    export,
    profile::Profile,
    record::{self, RecordOptions, Target, Tracer, UnwindMode, VmEvent},
    render,
    windows::WindowSpec,
};

/// A profiler for hypervisor management stacks: on-CPU and off-CPU profiles
/// in windows keyed to the Nth VM created.
#[derive(Debug, Parser)]
#[command(name = "hvprof", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show what this kernel and these privileges allow, tracer by tracer,
    /// with the reason and the fix for anything missing. Exits 1 when
    /// something `record` needs is missing.
    Check {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Record on-CPU and off-CPU stacks in windows keyed to the Nth VM
    /// created, then write the profile file, per-window folded stacks and
    /// flame graphs, and a summary.
    Record(RecordArgs),
    /// Render a recorded profile file again: per-window folded stacks, flame
    /// graphs and the summary. Works offline, on any machine.
    #[command(after_help = profiler::ci::GRAMMAR)]
    Report {
        /// The profile file (`profile.hvprof` in a recording directory).
        profile: PathBuf,
        /// Output directory.
        #[arg(short, long, default_value = "hvprof-report")]
        output: PathBuf,
        /// Also write OUTPUT/report.html: one self-contained page (no
        /// network fetches) with the VM timeline, a VM-ordinal heatmap, and
        /// every window's flame graphs, tables and losses.
        #[arg(long)]
        html: bool,
        /// Exit 3 when this condition holds, e.g. `losses>0`,
        /// `lock.total>1s` (repeatable; the language is below).
        #[arg(long = "fail-on", value_name = "EXPR", value_parser = profiler::ci::parse_report_gate)]
        fail_on: Vec<profiler::ci::Gate>,
        /// Append a compact markdown summary (VMs, losses, per-window
        /// metrics, top locks and D-Bus calls, gates) to FILE, e.g.
        /// `"$GITHUB_STEP_SUMMARY"`.
        #[arg(long, value_name = "FILE")]
        markdown_summary: Option<PathBuf>,
    },
    /// Compare two profiles window by window (windows matched by VM range):
    /// differential flame graphs and deltas (A, B, Δ, ratio) of the
    /// per-window metrics and the lock, fork, cgroup and D-Bus tables, as
    /// text, markdown, JSON and HTML.
    #[command(after_help = profiler::ci::GRAMMAR)]
    Diff {
        /// The baseline profile.
        a: PathBuf,
        /// The profile compared with it.
        b: PathBuf,
        /// Output directory.
        #[arg(short, long, default_value = "hvprof-diff")]
        output: PathBuf,
        /// Differential flame graphs of raw counts; by default A's counts
        /// are scaled to B's total so runs of different length compare.
        #[arg(long)]
        no_normalize: bool,
        /// When the profiles' windows differ, diff only the windows both
        /// have (same VM range) instead of failing.
        #[arg(long)]
        common_windows: bool,
        /// Exit 3 when this condition holds, e.g. `regression>10%`,
        /// `losses>0` (repeatable; the language is below).
        #[arg(long = "fail-on", value_name = "EXPR", value_parser = profiler::ci::parse_diff_gate)]
        fail_on: Vec<profiler::ci::Gate>,
        /// Append a compact markdown summary to FILE, e.g.
        /// `"$GITHUB_STEP_SUMMARY"`.
        #[arg(long, value_name = "FILE")]
        markdown_summary: Option<PathBuf>,
    },
    /// Export a recorded profile for other tools: pprof (`go tool pprof`,
    /// Pyroscope, Parca) and speedscope. Per tracer: DIR/TRACER.pb.gz with
    /// every window (samples labelled window, vms, tracer, comm, pid, tid),
    /// DIR/wNN-…/TRACER.pb.gz per window, DIR/TRACER.speedscope.json with
    /// one profile per window.
    Export {
        /// The profile file (`profile.hvprof` in a recording directory).
        profile: PathBuf,
        /// Formats to write (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "pprof,speedscope", value_parser = export::Format::parse)]
        format: Vec<export::Format>,
        /// Output directory.
        #[arg(short, long, default_value = "hvprof-export")]
        output: PathBuf,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "\
Windows: a VM creation is a successful KVM_CREATE_VM ioctl (whoever makes it) or, with \
--vm-event exec:PATTERN, an exec whose comm matches PATTERN. The kernel keeps the count; \
each event is charged to the window the count is in when it happens. Window 0 is the setup \
before the first VM. Events outside every window are not recorded.

Off-CPU time is charged to the window in which the block STARTED, with the stack the task \
blocked in.")]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each bool is a command-line flag"
)]
struct RecordArgs {
    /// Record these processes (comma-separated pids).
    #[arg(short = 'p', long = "pid", value_name = "PID[,PID]", group = "target")]
    pids: Option<String>,
    /// Record processes whose comm is NAME, running now or exec'd later.
    #[arg(long, value_name = "NAME", group = "target")]
    comm: Option<String>,
    /// Record every task on the system.
    #[arg(short = 'a', long = "all", group = "target")]
    all: bool,
    /// Do not follow children (forks, threads and exec'd helpers are
    /// followed by default, decided in the kernel).
    #[arg(long)]
    no_children: bool,
    /// Windows of K VMs: 1–K, K+1–2K, … (default 10).
    #[arg(long, value_name = "K", conflicts_with = "windows")]
    window_size: Option<u32>,
    /// Explicit windows of VM ordinals, e.g. 1-10,101-110,201-210.
    #[arg(long, value_name = "RANGES")]
    windows: Option<String>,
    /// On-CPU sampling frequency (cpu-clock, every CPU).
    #[arg(short = 'F', long, default_value_t = 99, value_name = "HZ")]
    frequency: u64,
    /// Ignore blocks shorter than this (e.g. 1ms, 500us).
    #[arg(long, value_parser = parse_duration, default_value = "1us", value_name = "DURATION")]
    min_block: Duration,
    /// Ignore blocks longer than this.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    max_block: Option<Duration>,
    /// What counts as a VM creation: `kvm` (KVM_CREATE_VM, default) and/or
    /// `exec:PATTERN` (an exec whose comm matches, e.g. exec:qemu-system-*,
    /// for QEMU under TCG, which makes no KVM ioctl). Repeatable.
    #[arg(long = "vm-event", value_name = "EVENT", value_parser = VmEvent::parse)]
    vm_events: Vec<VmEvent>,
    /// Stop after this long (e.g. 30s). Ctrl-C or SIGTERM also stop cleanly.
    #[arg(short, long, value_parser = parse_duration, value_name = "DURATION")]
    duration: Option<Duration>,
    /// Output directory.
    #[arg(short, long, default_value = "hvprof-out")]
    output: PathBuf,
    /// Measure each eBPF program's cost (kernel BPF statistics: runs and
    /// run time) and put it in the summary.
    #[arg(long)]
    bpf_stats: bool,
    /// Distinct stacks the kernel side keeps; each takes 1 KiB of kernel
    /// memory, allocated when recording starts.
    #[arg(long, default_value_t = 65536, value_name = "N")]
    max_stacks: u32,
    /// Most frames walked in a user stack (at most 127; a longer one ends
    /// in `[user stack cut: frame limit]`). Each frame costs a table search
    /// and a read of user memory.
    #[arg(long, alias = "user-stack-depth", default_value_t = 127, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=127))]
    max_user_frames: u32,
    /// Tracers to load: oncpu, offcpu, locks, fork, cgroup, dbus (default: all). A tracer this
    /// kernel cannot run is skipped with a warning; the others still run.
    #[arg(long, value_name = "LIST")]
    tracers: Option<String>,
    /// Time cgroup attaches made by writing to cgroup.procs too. This hooks
    /// every write(2) on the system (~0.2 µs each): without it, attaches are
    /// counted, and mkdir/rmdir are timed.
    #[arg(long)]
    time_cgroup_writes: bool,
    /// Take the stacks of preempted tasks (state R) at switch-out too. By
    /// default their off-CPU time is kept under one `[preempted]` frame: it
    /// is waiting for a CPU, where it was running is what on-CPU samples
    /// show, and walking stacks at every preemption is most of the off-CPU
    /// tracer's cost when CPUs are contended.
    #[arg(long)]
    preempted_stacks: bool,
    /// Walk the stacks at every block. By default a thread that blocks
    /// again at one of its last four sites (same user ip, sp, bp and caller)
    /// reuses the user stack taken there, and the kernel stack too if it is
    /// in the same syscall with the same two innermost kernel return
    /// addresses at the same places on its stack: most blocks of a busy
    /// daemon. Lock waits reuse user stacks from the same sites, and a
    /// sleeping lock's waiter its kernel stack when every return address is
    /// where it was.
    #[arg(long)]
    no_stack_cache: bool,
    /// Check the stack reuses: walk every stack anyway, keep the walk, and
    /// count, per cache, the reuses that would have differed from it ("…
    /// reuses that differed from a walk" in the summary). Costs what
    /// --no-stack-cache costs; for testing the caches on a workload.
    #[arg(long, conflicts_with = "no_stack_cache")]
    verify_stack_cache: bool,
    /// Walk an off-CPU kernel stack only for blocks at least this long
    /// (0 for every block). The walk is done when the task comes back and
    /// costs about 1 µs; shorter blocks keep their time, count and user
    /// stack under one `[kernel stack not walked: blocked < …]` frame.
    #[arg(long, value_parser = parse_duration, default_value = "100us", value_name = "DURATION")]
    kernel_stack_min_block: Duration,
    /// Find fork callers with uprobes on libc's fork functions, as
    /// before. By default hvprof learns at start-up where its own libc's
    /// fork functions keep their caller's return address at the system
    /// call (it makes each call once in a child it traces) and reads it
    /// there in every process with that libc; `-p` targets with another
    /// libc are probed anyway. A probed libc makes each fork of its process
    /// dearer (here about 25 µs, and 45 µs more per probe hit).
    #[arg(long)]
    fork_uprobes: bool,
    /// How user stacks are walked: `dwarf` unwinds them in the kernel from
    /// each file's `.eh_frame` (whole stacks without frame pointers, as
    /// Debian builds libc, glib, libvirt and QEMU), frame pointers only
    /// where a PC has no table; `fp` is the kernel's frame-pointer walk.
    #[arg(long, value_enum, default_value = "dwarf", value_name = "MODE")]
    unwind: UnwindArg,
    /// Unwind-table rows the kernel keeps (16 bytes each, allocated when
    /// recording starts); files that do not fit fall back to frame pointers.
    #[arg(long, default_value_t = 2_000_000, value_name = "N")]
    unwind_max_rows: u32,
    /// Where unwind tables are cached by file, so that the next recording
    /// starts without building them (default: ~/.cache/hvprof/unwind).
    #[arg(long, value_name = "DIR")]
    unwind_cache: Option<PathBuf>,
    /// Check the in-kernel unwinder: every Nth walk (default 16) also copies
    /// the user stack, which hvprof unwinds again with framehop and compares
    /// ("unwind verified" in the summary). For testing; `--unwind dwarf` only.
    #[arg(
        long,
        value_name = "N",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "16",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    verify_unwind: Option<u32>,
    /// Run this command and record it (and its children).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum UnwindArg {
    Fp,
    Dwarf,
}

/// `$XDG_CACHE_HOME/hvprof/unwind`, else `~/.cache/hvprof/unwind`.
fn default_unwind_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("hvprof/unwind")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Check { json } => check(json),
        Cmd::Record(args) => match record_cmd(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hvprof: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Report {
            profile,
            output,
            html,
            fail_on,
            markdown_summary,
        } => match report(
            &profile,
            &output,
            html,
            &fail_on,
            markdown_summary.as_deref(),
        ) {
            Ok(gates_passed) => gate_exit(gates_passed),
            Err(e) => {
                eprintln!("hvprof: {e}");
                ExitCode::from(profiler::ci::EXIT_ERROR)
            }
        },
        Cmd::Diff {
            a,
            b,
            output,
            no_normalize,
            common_windows,
            fail_on,
            markdown_summary,
        } => {
            let args = profiler::diff::DiffArgs {
                a: &a,
                b: &b,
                output: &output,
                normalize: !no_normalize,
                common_windows,
                gates: &fail_on,
                markdown_summary: markdown_summary.as_deref(),
            };
            match profiler::diff::run(&args) {
                Ok(outcome) => {
                    for w in &outcome.warnings {
                        eprintln!("hvprof: warning: {w}");
                    }
                    print!("{}", outcome.text);
                    gate_exit(!outcome.gate_failed())
                }
                Err(e) => {
                    eprintln!("hvprof: {e}");
                    ExitCode::from(profiler::ci::EXIT_ERROR)
                }
            }
        }
        Cmd::Export {
            profile,
            format,
            output,
        } => match export_cmd(&profile, &format, &output) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hvprof: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn gate_exit(passed: bool) -> ExitCode {
    ExitCode::from(if passed {
        profiler::ci::EXIT_OK
    } else {
        profiler::ci::EXIT_GATE_FAILED
    })
}

fn check(json: bool) -> ExitCode {
    let report = profiler::check::run();
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("hvprof: cannot encode the report as JSON: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", report.to_text());
    }
    if report.record_ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The whole recording's tables of the tracers that ran, 15 rows each.
fn print_tables(profile: &Profile) {
    for t in profiler::tables::TABLES {
        if profile.recorded(t.tracer()) {
            print!("{}", profiler::tables::whole_recording_text(t, profile, 15));
        }
    }
}

fn record_cmd(args: RecordArgs) -> anyhow::Result<()> {
    let pids = args
        .pids
        .as_deref()
        .map(parse_pids)
        .transpose()
        .map_err(|e| anyhow::anyhow!("-p: {e}"))?;
    let target = match (pids, args.comm, args.all, args.command.is_empty()) {
        (Some(p), None, false, true) => Target::Pids(p),
        (None, Some(c), false, true) => Target::Comm(c),
        (None, None, true, true) => Target::All,
        (None, None, false, false) => Target::Command(args.command),
        (None, None, false, true) => anyhow::bail!(
            "say what to record: -p PID, --comm NAME, -a, or -- CMD ARGS (see `hvprof record --help`)"
        ),
        _ => anyhow::bail!("give one target: -p PID, --comm NAME, -a, or -- CMD ARGS, not several"),
    };
    let windows = match (args.window_size, args.windows) {
        (_, Some(w)) => WindowSpec::parse_ranges(&w)?,
        (k, None) => WindowSpec::every(k.unwrap_or(10))?,
    };
    anyhow::ensure!(
        (1..=100_000).contains(&args.frequency),
        "-F {}: the sampling frequency must be between 1 and 100000 Hz",
        args.frequency
    );
    let max_block = args.max_block.unwrap_or(Duration::from_nanos(u64::MAX));
    anyhow::ensure!(
        args.min_block <= max_block,
        "--min-block is larger than --max-block"
    );
    anyhow::ensure!(
        args.verify_unwind.is_none() || matches!(args.unwind, UnwindArg::Dwarf),
        "--verify-unwind checks the tables' unwinder: it needs --unwind dwarf (the default)"
    );
    let mut vm_events = args.vm_events;
    if vm_events.is_empty() {
        vm_events.push(VmEvent::Kvm);
    }
    let opts = RecordOptions {
        target,
        follow_children: !args.no_children,
        windows,
        frequency_hz: args.frequency,
        min_block: args.min_block,
        max_block,
        vm_events,
        duration: args.duration,
        output: args.output,
        command_line: std::env::args().collect(),
        bpf_stats: args.bpf_stats,
        max_stacks: args.max_stacks.max(1024),
        user_stack_depth: args.max_user_frames,
        time_cgroup_writes: args.time_cgroup_writes,
        preempted_stacks: args.preempted_stacks,
        block_site_cache: !args.no_stack_cache,
        verify_stack_cache: args.verify_stack_cache,
        kernel_stack_min_block: args.kernel_stack_min_block,
        fork_uprobes: args.fork_uprobes,
        unwind: match args.unwind {
            UnwindArg::Fp => UnwindMode::Fp,
            UnwindArg::Dwarf => UnwindMode::Dwarf,
        },
        unwind_max_rows: args.unwind_max_rows,
        unwind_cache: args.unwind_cache.unwrap_or_else(default_unwind_cache),
        verify_unwind: args.verify_unwind,
        tracers: match args.tracers.as_deref() {
            Some(t) => Tracer::parse_list(t).map_err(|e| anyhow::anyhow!("--tracers: {e}"))?,
            None => Tracer::ALL.to_vec(),
        },
    };
    let outcome = record::record(opts)?;
    print!("{}", outcome.summary.to_text());
    print_tables(&outcome.profile);
    println!(
        "\nwrote {} (profile: {}) in {} ms after the stop",
        outcome.output.display(),
        outcome.profile_path.display(),
        outcome.stop_to_written.as_millis()
    );
    if let Some(status) = outcome.command_status
        && !status.success()
    {
        eprintln!("hvprof: the recorded command ended with {status}");
    }
    Ok(())
}

/// Returns whether every gate passed.
fn report(
    path: &std::path::Path,
    output: &std::path::Path,
    html: bool,
    gates: &[profiler::ci::Gate],
    markdown_summary: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    let profile = Profile::read(path)?;
    let summary = render::write_all(&profile, output)?;
    print!("{}", summary.to_text());
    if html {
        let page = output.join(profiler::html::FILE_NAME);
        profiler::html::write_report(&profile, &page)?;
        println!("\nHTML report: {}", page.display());
    }
    println!("\nwrote {}", output.display());
    let results = profiler::ci::check_report(&profile, path, gates, markdown_summary)?;
    if !results.is_empty() {
        print!("\n{}", profiler::ci::gates_text(&results));
    }
    Ok(results.iter().all(|r| r.passed))
}

fn export_cmd(
    path: &std::path::Path,
    formats: &[export::Format],
    output: &std::path::Path,
) -> anyhow::Result<()> {
    let profile = Profile::read(path)?;
    let written = export::export(&profile, output, formats)?;
    for w in written.iter().filter(|w| w.window.is_none()) {
        println!("wrote {}", w.path.display());
    }
    let per_window = written.iter().filter(|w| w.window.is_some()).count();
    if per_window > 0 {
        println!(
            "wrote {per_window} per-window pprof files in {}/w*/",
            output.display()
        );
    }
    Ok(())
}
