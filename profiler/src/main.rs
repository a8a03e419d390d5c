//! The `hvprof` command line: a thin shell over the `profiler` library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A profiler for hypervisor management stacks: on-CPU, off-CPU, lock, fork,
/// cgroup and D-Bus profiles in windows keyed to the Nth VM created.
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Check { json } => {
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
    }
}
