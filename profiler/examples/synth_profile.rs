//! A synthetic profile for `./x bench-report`: N on-CPU samples over
//! S distinct stacks (depth 20–40, frames from a pool of a few thousand
//! names, prefixes shared as real call trees share them) in W windows,
//! written as an hvprof profile and, sample for sample, as the text
//! `perf script` prints for the same data (what `inferno-collapse-perf`
//! reads).
//!
//! A second profile to diff against the first: the same frames and
//! distinct stacks (they come from a fixed seed), but `--seed` spreads the
//! samples over them and over the windows differently, and `--extra N`
//! adds N samples in window 2 on a stack ending in `__synth_regression`, a
//! frame the first profile lacks: the known difference a diff must show.
//!
//! ```sh
//! cargo run --release -p profiler --example synth_profile -- OUT_DIR \
//!     [--samples 1000000] [--stacks 50000] [--frames 4000] [--windows 10] \
//!     [--seed 0] [--extra 0]
//! ```

use std::{
    collections::HashSet,
    fs::File,
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
};

use profiler::{
    profile::{FrameTable, Meta, OnCpu, Profile, VmCreation},
    windows::WindowSpec,
};

/// splitmix64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("n is a usize")
    }

    /// Skewed towards 0, as call frequencies are.
    fn skewed(&mut self, n: usize) -> usize {
        let a = self.below(n);
        let b = self.below(n);
        a.min(b)
    }
}

struct Args {
    out: PathBuf,
    samples: u64,
    stacks: usize,
    frames: usize,
    windows: u32,
    seed: u64,
    extra: u64,
}

fn args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        out: PathBuf::new(),
        samples: 1_000_000,
        stacks: 50_000,
        frames: 4000,
        windows: 10,
        seed: 0,
        extra: 0,
    };
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--samples" => a.samples = value("--samples")?,
            "--stacks" => {
                a.stacks = usize::try_from(value("--stacks")?).map_err(|e| e.to_string())?;
            }
            "--frames" => {
                a.frames = usize::try_from(value("--frames")?).map_err(|e| e.to_string())?;
            }
            "--windows" => {
                a.windows = u32::try_from(value("--windows")?).map_err(|e| e.to_string())?;
            }
            "--seed" => a.seed = value("--seed")?,
            "--extra" => a.extra = value("--extra")?,
            _ if a.out.as_os_str().is_empty() && !arg.starts_with('-') => a.out = arg.into(),
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    if a.out.as_os_str().is_empty() {
        return Err(
            "usage: synth_profile OUT_DIR [--samples N] [--stacks N] [--frames N] [--windows N] [--seed N] [--extra N]"
                .into(),
        );
    }
    if a.stacks == 0 || a.frames < 100 || a.windows == 0 || a.samples < a.stacks as u64 {
        return Err(
            "need --stacks ≥ 1, --frames ≥ 100, --windows ≥ 1 and --samples ≥ --stacks".into(),
        );
    }
    Ok(a)
}

const WORDS: [&str; 24] = [
    "vir", "Domain", "Qemu", "Process", "Monitor", "Cgroup", "Command", "Event", "Loop", "Object",
    "Json", "Hash", "Mutex", "Thread", "Pool", "Job", "Start", "Create", "Lookup", "Parse",
    "Format", "Buffer", "Socket", "Poll",
];

/// The distinct stacks (indices into the frame pool, root first) and the
/// index where the pool's kernel functions start.
fn stacks(a: &Args, rng: &mut Rng) -> (Vec<String>, Vec<Vec<usize>>, usize) {
    // The frame pool: names of 2–4 words and a number, the last eighth
    // kernel functions (the leaves of most stacks).
    let kernel_from = a.frames - a.frames / 8;
    let names: Vec<String> = (0..a.frames)
        .map(|i| {
            let words: String = (0..2 + rng.below(3))
                .map(|_| WORDS[rng.below(WORDS.len())])
                .collect();
            if i >= kernel_from {
                format!("__{}_{i}", words.to_lowercase())
            } else {
                format!("{words}{i}")
            }
        })
        .collect();

    // Shared prefixes (the call tree's trunk), then distinct stacks.
    let prefixes: Vec<Vec<usize>> = (0..500)
        .map(|_| {
            let len = 8 + rng.below(8);
            (0..len).map(|_| rng.skewed(kernel_from)).collect()
        })
        .collect();
    let mut seen = HashSet::new();
    let mut stacks: Vec<Vec<usize>> = Vec::with_capacity(a.stacks);
    while stacks.len() < a.stacks {
        let depth = 20 + rng.below(21);
        let mut s = prefixes[rng.skewed(prefixes.len())].clone();
        let kernel = 3 + rng.below(6);
        while s.len() < depth - kernel {
            s.push(rng.skewed(kernel_from));
        }
        while s.len() < depth {
            s.push(kernel_from + rng.below(a.frames - kernel_from));
        }
        if seen.insert(s.clone()) {
            stacks.push(s);
        }
    }
    (names, stacks, kernel_from)
}

fn profile(a: &Args, rng: &mut Rng) -> Result<(Profile, usize), String> {
    let (names, stacks, kernel_from) = stacks(a, rng);
    // Seed 0 goes on with the same generator (the first profile as it
    // always was); another seed places the same stacks' samples anew.
    if a.seed != 0 {
        *rng = Rng(rng.0 ^ a.seed.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    }

    // Samples: every stack at least one, the rest skewed; each stack's
    // samples in one to three windows; threads of a few processes.
    let mut counts = vec![1u64; a.stacks];
    for _ in 0..a.samples - a.stacks as u64 {
        counts[rng.skewed(a.stacks)] += 1;
    }
    let comms = [
        "rpc-libvirtd",
        "libvirtd",
        "qemu-system-x86",
        "prio-rpc-libvir",
        "udev-event",
    ];
    let mut table = FrameTable::default();
    let ids: Vec<u32> = names.iter().map(|n| table.intern(n)).collect();
    let mut rows = Vec::new();
    for (i, (stack, &n)) in stacks.iter().zip(&counts).enumerate() {
        let proc_ix = i % comms.len();
        let tgid = 1000 + u32::try_from(proc_ix).expect("few processes");
        let pid = tgid * 10 + u32::try_from(rng.below(8)).expect("few threads");
        let parts = (1 + rng.below(3)).min(usize::try_from(n).unwrap_or(1));
        let mut left = n;
        for p in 0..parts {
            let share = if p + 1 == parts { left } else { left / 2 };
            left -= share;
            rows.push(OnCpu {
                window: 1 + u32::try_from(rng.below(a.windows as usize)).expect("u32 windows"),
                tgid,
                pid,
                comm: comms[proc_ix].to_owned(),
                stack: stack.iter().map(|&f| ids[f]).collect(),
                samples: share,
            });
        }
    }

    if a.extra > 0 {
        let mut stack: Vec<u32> = stacks[0].iter().map(|&f| ids[f]).collect();
        stack.push(table.intern("__synth_regression"));
        rows.push(OnCpu {
            window: 2.min(a.windows),
            tgid: 1001,
            pid: 10010,
            comm: comms[1].to_owned(),
            stack,
            samples: a.extra,
        });
    }

    let spec = WindowSpec::every(4).map_err(|e| e.to_string())?;
    let vms = u64::from(a.windows) * 4;
    let frequency_hz = 999;
    let profile = Profile {
        meta: Meta {
            hvprof_version: env!("CARGO_PKG_VERSION").to_owned(),
            hostname: "synthetic".to_owned(),
            target: "synthetic".to_owned(),
            frequency_hz,
            duration_ns: (a.samples + a.extra) * 1_000_000_000 / frequency_hz / 2,
            window_spec: Some(spec.clone()),
            tracers: vec!["oncpu".to_owned()],
            ..Meta::default()
        },
        windows: spec.windows(vms),
        vms: (1..=vms)
            .map(|ordinal| VmCreation {
                ordinal,
                time_ns: ordinal * 1_000_000,
                pid: 1002,
                tid: 1002,
                comm: "qemu-system-x86".to_owned(),
                source: "kvm".to_owned(),
                cmdline: None,
                name: Some(format!("vm{ordinal}")),
                token: None,
            })
            .collect(),
        frames: table.into_names(),
        oncpu: rows,
        ..Profile::default()
    };
    Ok((profile, kernel_from))
}

/// The same samples as `perf script` prints them, one event per sample,
/// leaf first.
fn write_perf_script(profile: &Profile, kernel_from: usize, script: &Path) -> Result<(), String> {
    let mut out = BufWriter::with_capacity(
        1 << 20,
        File::create(script).map_err(|e| format!("{}: {e}", script.display()))?,
    );
    let period = 1_000_000_000 / profile.meta.frequency_hz;
    let mut t: u64 = 1_000_000_000_000;
    let write_err = |e: std::io::Error| format!("{}: {e}", script.display());
    for row in &profile.oncpu {
        for _ in 0..row.samples {
            t += period / 2;
            writeln!(
                out,
                "{} {}/{} [{:03}] {}.{:06}: {period} cpu-clock:pppH: ",
                row.comm,
                row.tgid,
                row.pid,
                t % 2,
                t / 1_000_000_000,
                (t / 1000) % 1_000_000
            )
            .map_err(write_err)?;
            for &f in row.stack.iter().rev() {
                let f = f as usize;
                let (addr, module) = if f >= kernel_from {
                    (
                        0xffff_ffff_8100_0000_u64 + (f as u64) * 0x140,
                        "[kernel.kallsyms]",
                    )
                } else {
                    (
                        0x5600_0000_0000_u64 + (f as u64) * 0x1c0,
                        "/usr/sbin/libvirtd",
                    )
                };
                writeln!(
                    out,
                    "\t{addr:16x} {}+0x{:x} ({module})",
                    profile.frames[f],
                    (f * 7) % 0x200
                )
                .map_err(write_err)?;
            }
            writeln!(out).map_err(write_err)?;
        }
    }
    out.flush().map_err(write_err)
}

fn main() -> Result<(), String> {
    let a = args()?;
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let mut rng = Rng(0x5EED);
    let (profile, kernel_from) = profile(&a, &mut rng)?;
    let path = a.out.join(profiler::profile::FILE_NAME);
    profile.write(&path).map_err(|e| e.to_string())?;
    let script = a.out.join("perf-script.txt");
    write_perf_script(&profile, kernel_from, &script)?;
    println!(
        "synth_profile: {} samples, {} distinct stacks, {} rows, {} frames, {} windows: {} and {}",
        a.samples + a.extra,
        a.stacks + usize::from(a.extra > 0),
        profile.oncpu.len(),
        profile.frames.len(),
        a.windows,
        path.display(),
        script.display()
    );
    Ok(())
}
