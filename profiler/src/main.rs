//! The `hvprof` command line: a thin shell over the `profiler` library.

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use profiler::{
    cli::{DurationOrForever, parse_duration, parse_duration_or_forever, parse_pids},
    export,
    profile::Profile,
    record::{self, RecordOptions, Target, Tracer, UnwindMode, VmEvent},
    render,
    windows::{Attribution, WindowSpec},
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
    /// Check what hvprof can trace here and how to fix what is missing; exits 1 if `record`
    /// cannot run.
    Check {
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Record where the time goes while VMs are created, in windows keyed to the Nth VM.
    Record(Box<RecordArgs>),
    /// Render a profile again, offline on any machine: flame graphs, tables, HTML, CI
    /// gates.
    #[command(after_help = profiler::ci::GRAMMAR.as_str())]
    Report {
        /// The profile file (`profile.hvprof` in a recording directory).
        profile: PathBuf,
        /// Where to write the flame graphs, tables and summary.
        #[arg(short, long, default_value = "hvprof-report")]
        output: PathBuf,
        /// Also write OUTPUT/report.html: one self-contained page to browse or keep as a CI
        /// artifact.
        #[arg(long)]
        html: bool,
        /// Fail a CI job (exit 3) when this holds, e.g. `losses>0`; repeatable, the
        /// language is below.
        #[arg(long = "fail-on", value_name = "EXPR", value_parser = profiler::ci::parse_report_gate)]
        fail_on: Vec<profiler::ci::Gate>,
        /// Append a markdown summary (metrics, top locks and D-Bus calls, gates) to FILE,
        /// e.g. `"$GITHUB_STEP_SUMMARY"`.
        #[arg(long, value_name = "FILE")]
        markdown_summary: Option<PathBuf>,
    },
    /// Compare two profiles (two kernels, two builds) window by window; CI gates.
    #[command(after_help = profiler::ci::GRAMMAR.as_str())]
    Diff {
        /// The baseline profile and the one compared with it (`A B`); or, with --vs, the
        /// baseline's runs. A directory stands for its recording, or for every recording or
        /// profile in it.
        #[arg(required = true, num_args = 1.., value_name = "PROFILE")]
        profiles: Vec<PathBuf>,
        /// The runs compared with the baseline's: then each side's metrics are medians, and a
        /// regression gate fails only where B's runs are also significantly more than the
        /// bound above A's (one-sided Welch t-test on the logarithms, p-values Holm-adjusted
        /// over the gate's values, at 0.05).
        #[arg(long, num_args = 1.., value_name = "PROFILE")]
        vs: Vec<PathBuf>,
        /// Where to write the differential flame graphs and the deltas.
        #[arg(short, long, default_value = "hvprof-diff")]
        output: PathBuf,
        /// Draw the differential flame graphs from raw counts, for runs of equal length (by
        /// default A is scaled to B's total).
        #[arg(long)]
        no_normalize: bool,
        /// Diff only the windows both profiles have, instead of failing when they differ.
        #[arg(long)]
        common_windows: bool,
        /// Fail a CI job (exit 3) when this holds, e.g. `regression>10%`; repeatable, the
        /// language is below.
        #[arg(long = "fail-on", value_name = "EXPR", value_parser = profiler::ci::parse_diff_gate)]
        fail_on: Vec<profiler::ci::Gate>,
        /// Append a markdown summary (A → B per window, largest changes, gates) to FILE,
        /// e.g. `"$GITHUB_STEP_SUMMARY"`.
        #[arg(long, value_name = "FILE")]
        markdown_summary: Option<PathBuf>,
    },
    /// Export a profile for pprof (go tool pprof, Pyroscope, Parca) and speedscope.
    Export {
        /// The profile file (`profile.hvprof` in a recording directory).
        profile: PathBuf,
        /// Formats to write, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "pprof,speedscope", value_parser = export::Format::parse)]
        format: Vec<export::Format>,
        /// Where to write the pprof and speedscope files.
        #[arg(short, long, default_value = "hvprof-export")]
        output: PathBuf,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "\
Windows: the kernel counts VM creations (whoever makes them); each event is charged to the \
window the count is in when it happens. Off-CPU time in a window is the time blocked within \
it: a block going on past its window is cut where the VMs that moved the windows were \
created (and counted once, in the window it began in); blocks still going at the stop are \
kept apart, under [still blocked at the stop], out of the windows' totals, the heatmap and \
the gates. Window 0 is the setup before the first VM.

--attribute vm: a window of VMs N-M holds the work done for those VMs, whenever it happened, \
which is what a concurrent boot (many VMs started at once) needs. Each QEMU process and its \
threads work for the VM it created; a libvirtd worker works, from the start of a call that \
can start a VM (virNetServerProgramDispatch: DomainCreate*, DomainRestore*, \
DomainMigratePrepare*, DomainSnapshotRevert) to its reply, for the VM whose QEMU that call \
started; a process forked meanwhile (QEMU, a hook script, a helper) works for it too; a call \
on a running domain (DomainGetInfo, DomainDestroy, ...) works for that domain's VM. The \
rest is shown apart, in an \"unattributed\" window for each time window, with its share.

How each tracer works and what each option changes: docs/internals.md in hvprof's source.")]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each bool is a command-line flag"
)]
struct RecordArgs {
    /// Record these running processes (comma-separated pids) and what they start.
    #[arg(short = 'p', long = "pid", value_name = "PID[,PID]", group = "target")]
    pids: Option<String>,
    /// Record the processes named NAME, running now or started later (e.g. libvirtd).
    #[arg(long, value_name = "NAME", group = "target")]
    comm: Option<String>,
    /// Record every task on the system, when you do not know which process makes the VMs.
    #[arg(short = 'a', long = "all", group = "target")]
    all: bool,
    /// Record only the targets, not the forks, threads and helpers (e.g. QEMU) they start.
    #[arg(long)]
    no_children: bool,
    /// Cut the recording into windows of K VMs: 1–K, K+1–2K, … (default 10).
    #[arg(long, value_name = "K", conflicts_with = "windows")]
    window_size: Option<u32>,
    /// Record only these VM ordinal ranges, e.g. 1-10,101-110,201-210 (nothing outside is
    /// kept).
    #[arg(long, value_name = "RANGES")]
    windows: Option<String>,
    /// What a window holds: `time`, the events between the creations of its VMs; or `vm`,
    /// the work done for its VMs whenever it happened (for concurrent boots; see below).
    #[arg(long, value_enum, default_value_t = Attribution::Time, value_name = "MODE")]
    attribute: Attribution,
    /// On-CPU samples per second per CPU; higher is finer and costs more.
    #[arg(short = 'F', long, default_value_t = 99, value_name = "HZ")]
    frequency: u64,
    /// Leave out off-CPU blocks shorter than this, to keep only the waits that matter.
    #[arg(long, value_parser = parse_duration, default_value = "1us", value_name = "DURATION")]
    min_block: Duration,
    /// Leave out off-CPU blocks longer than this, e.g. threads idle for the whole run.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    max_block: Option<Duration>,
    /// What counts as a VM creation: `kvm` (KVM_CREATE_VM, default) or `exec:PATTERN`, e.g.
    /// exec:qemu-system-* for QEMU under TCG, which never calls KVM. Repeatable.
    #[arg(long = "vm-event", value_name = "EVENT", value_parser = VmEvent::parse)]
    vm_events: Vec<VmEvent>,
    /// Stop after this long (e.g. 10m); otherwise at Ctrl-C, SIGTERM or when the target
    /// exits.
    #[arg(short, long, value_parser = parse_duration, value_name = "DURATION")]
    duration: Option<Duration>,
    /// Where to write the profile, summary, tables and flame graphs.
    #[arg(short, long, default_value = "hvprof-out")]
    output: PathBuf,
    /// Add each eBPF program's run count and run time to the summary, to see what hvprof
    /// costs.
    #[arg(long)]
    bpf_stats: bool,
    /// Distinct stacks kept, 1 KiB of kernel memory each; raise it on stack-map collisions.
    #[arg(long, default_value_t = 65536, value_name = "N")]
    max_stacks: u32,
    /// Deepest user stack walked, at most 127; deeper ones end in `[user stack cut: frame
    /// limit]`.
    #[arg(long, alias = "user-stack-depth", default_value_t = 127, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=127))]
    max_user_frames: u32,
    /// Tracers to run: oncpu, offcpu, locks, fork, cgroup, dbus, libvirt (default: these),
    /// wakers (who woke each off-CPU block; needs offcpu; a program at every wakeup); fewer
    /// cost less.
    #[arg(long, value_name = "LIST")]
    tracers: Option<String>,
    /// Also time attaches made by writing cgroup.procs (always counted); hooks every
    /// write(2) system-wide.
    #[arg(long)]
    time_cgroup_writes: bool,
    /// Show where preempted tasks were, instead of one `[preempted]` frame; costly when
    /// CPUs are contended.
    #[arg(long)]
    preempted_stacks: bool,
    /// Walk every stack instead of reusing the one from the same call site, to rule out the
    /// cache.
    #[arg(long)]
    no_stack_cache: bool,
    /// Walk every stack and count the cache reuses that would have differed: to test the
    /// cache.
    #[arg(long, conflicts_with = "no_stack_cache")]
    verify_stack_cache: bool,
    /// Drop one lock contention end in N at random, as if the kernel had kept the program
    /// from running: to test that the begins left behind are never paired.
    #[arg(long, hide = true, value_name = "N", default_value = "0")]
    drop_lock_ends: u32,
    /// Drain the kernel's maps into the profile file this often: a killed recording keeps
    /// all but its last interval, and the maps hold only what two intervals add.
    #[arg(long, value_parser = parse_duration, default_value = "2s", value_name = "DURATION")]
    flush_interval: Duration,
    /// Time system calls through one program on every system call of the machine for this
    /// long (`forever`: the whole recording), then through the calls' own tracepoints, which
    /// cost nothing on other calls but take ~70 ms each to detach at the stop (1-2 s).
    #[arg(long, value_parser = parse_duration_or_forever, default_value = "10s", value_name = "DURATION")]
    syscall_dispatch_for: DurationOrForever,
    /// Take off-CPU kernel stacks of sleeps at least this long (0: all, which costs more).
    #[arg(long, value_parser = parse_duration, default_value = "100us", value_name = "DURATION")]
    kernel_stack_min_block: Duration,
    /// Find fork callers with uprobes on libc (the old way), e.g. to compare; makes forks
    /// dearer.
    #[arg(long)]
    fork_uprobes: bool,
    /// User stacks from `.eh_frame` (`dwarf`: whole without frame pointers) or frame
    /// pointers (`fp`).
    #[arg(long, value_enum, default_value = "dwarf", value_name = "MODE")]
    unwind: UnwindArg,
    /// Unwind-table rows kept, 10 bytes each with their index; raise it if the summary counts
    /// user stacks cut because the unwind tables were full (rustc's two libraries take 2 M
    /// rows).
    #[arg(long, default_value_t = 8_000_000, value_name = "N")]
    unwind_max_rows: u32,
    /// Where built unwind tables are kept, so later recordings start sooner (default:
    /// ~/.cache/hvprof/unwind).
    #[arg(long, value_name = "DIR")]
    unwind_cache: Option<PathBuf>,
    /// Unwind every Nth stack (default 16) again in userspace and count mismatches, to test
    /// the unwinder.
    #[arg(
        long,
        value_name = "N",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "16",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    verify_unwind: Option<u32>,
    /// Start this command and record it (and what it starts).
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
        Cmd::Record(args) => match record_cmd(*args) {
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
            profiles,
            vs,
            output,
            no_normalize,
            common_windows,
            fail_on,
            markdown_summary,
        } => {
            let (a, b) = match (profiles.as_slice(), vs.is_empty()) {
                ([a, b], true) => (vec![a.clone()], vec![b.clone()]),
                (_, true) => {
                    eprintln!(
                        "hvprof: diff: name two profiles (A B), or A's runs, then --vs and B's \
                         runs"
                    );
                    return ExitCode::from(profiler::ci::EXIT_ERROR);
                }
                (a, false) => (a.to_vec(), vs),
            };
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
        attribute: args.attribute,
        frequency_hz: args.frequency,
        min_block: args.min_block,
        max_block,
        vm_events,
        duration: args.duration,
        flush_interval: args.flush_interval.max(Duration::from_millis(100)),
        syscall_dispatch_for: args.syscall_dispatch_for.0,
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
        drop_lock_ends: args.drop_lock_ends,
        tracers: match args.tracers.as_deref() {
            Some(t) => Tracer::parse_list(t).map_err(|e| anyhow::anyhow!("--tracers: {e}"))?,
            None => Tracer::DEFAULT.to_vec(),
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
    let _ = std::io::Write::flush(&mut std::io::stdout());
    record::timing("summary printed");
    if let Some(status) = outcome.command_status
        && !status.success()
    {
        eprintln!("hvprof: the recorded command ended with {status}");
    }
    // Waits for the last probes to be detached: none is left behind.
    drop(outcome);
    record::timing("every probe detached");
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
    let profile = Profile::open(path)?;
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
    let profile = Profile::open(path)?;
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
