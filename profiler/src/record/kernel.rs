//! What the kernel tells a recording before anything is loaded: kernel BTF
//! (which every program is loaded with: they are on BTF tracepoints), the
//! offsets of the kernel structure fields the programs read, which tracers
//! this kernel can run, the syscall entry code's addresses, libc's fork
//! paths; and, when the recording is read out, kernel data symbols and
//! cgroup hierarchy names.

use std::{collections::HashMap, thread::JoinHandle};

use aya::{Btf, BtfError};
use profiler_common::record::{KernelOffsets, OFFSET_UNKNOWN};

use super::options::{RecordError, RecordOptions};
use crate::{
    forkpath,
    kbtf::Kbtf,
    tracer::{Part, Tracer},
};

/// Kernel BTF as aya loads programs with it, parsed in a thread meanwhile.
pub(super) type BtfThread = JoinHandle<Result<Btf, BtfError>>;

/// What the kernel allows and where things are in it, for one recording.
pub(super) struct Facts {
    /// Kernel BTF for loading the programs, parsed while the rest is set
    /// up.
    pub btf: Option<BtfThread>,
    pub offsets: KernelOffsets,
    /// The tracers asked for whose tracepoints this kernel has.
    pub tracers: Vec<Tracer>,
    pub task: TaskOffsets,
    /// `entry_SYSCALL_64_after_hwframe` to the next symbol.
    pub syscall_entry: Option<(u64, u64)>,
    /// Where libc's fork functions keep their callers' return addresses
    /// (with the fork tracer, unless `--fork-uprobes`).
    pub calibration: Option<forkpath::Calibration>,
}

impl Facts {
    /// Joins the BTF parse (once).
    pub fn btf(&mut self) -> Result<Btf, RecordError> {
        let parsed = self
            .btf
            .take()
            .map(|t| t.join().unwrap_or(Err(BtfError::InvalidHeader)));
        match parsed {
            Some(Ok(btf)) => Ok(btf),
            Some(Err(e)) => Err(RecordError::Btf {
                cause: crate::ebpf::chain(&e),
            }),
            None => Err(RecordError::Btf {
                cause: "already taken".to_owned(),
            }),
        }
    }
}

/// `task_struct` offsets from kernel BTF; 0 where unknown.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct TaskOffsets {
    /// `comm`, read with plain loads (without it, from a helper call).
    pub comm: u32,
    /// `thread.sp`: where a stopped task's kernel stack is, with which the
    /// off-CPU tracer reuses a thread's kernel stack when it blocks again
    /// the same way.
    pub thread_sp: u32,
    /// `sched_info.run_delay`: the task's total run-queue wait, which gives
    /// each block's wait for a CPU.
    pub run_delay: u32,
    /// The kernel's `THREAD_SIZE` (with the wakers tracer): see
    /// [`thread_size`].
    pub thread_size: u32,
}

impl Facts {
    /// Asks the kernel; a tracer it cannot run is dropped with a warning.
    pub fn gather(opts: &RecordOptions) -> Result<Self, RecordError> {
        // Kernel BTF takes a while to parse (aya's, to load programs with):
        // do it while the rest is set up, as the kallsyms read.
        let btf = std::thread::spawn(Btf::from_sys_fs);
        let entry = std::thread::spawn(syscall_entry_range);
        let kbtf = Kbtf::from_sys_fs().map_err(|e| RecordError::Btf {
            cause: e.to_string(),
        })?;
        for part in [Part::Targets, Part::Syscalls] {
            if let Some(tp) = missing_tracepoint(&kbtf, part) {
                return Err(RecordError::Btf {
                    cause: format!("it has no BTF tracepoint {tp}"),
                });
            }
        }
        let mut runnable = opts.tracers.clone();
        runnable.retain(|&tracer| match missing_tracepoint(&kbtf, tracer.into()) {
            None => true,
            Some(tp) => {
                eprintln!(
                    "hvprof: warning: the {} tracer is skipped: kernel BTF has no tracepoint {tp} \
                     (`hvprof check` says what this kernel has)",
                    tracer.name()
                );
                false
            }
        });
        if runnable.contains(&Tracer::Wakers) && !runnable.contains(&Tracer::OffCpu) {
            eprintln!(
                "hvprof: warning: the wakers tracer is skipped: it charges off-CPU blocks, and \
                 the offcpu tracer cannot run here"
            );
            runnable.retain(|t| *t != Tracer::Wakers);
        }
        let offsets = kernel_offsets(&kbtf, &mut runnable)?;
        let mut task = task_offsets(&kbtf, opts.tracers.contains(&Tracer::OffCpu));
        if runnable.contains(&Tracer::Wakers) {
            task.thread_size = thread_size();
        }
        drop(kbtf);
        let calibration = (runnable.contains(&Tracer::Fork) && !opts.fork_uprobes)
            .then(calibrate_fork_paths)
            .flatten();
        Ok(Self {
            btf: Some(btf),
            offsets,
            tracers: runnable,
            task,
            syscall_entry: entry.join().ok().flatten(),
            calibration,
        })
    }
}

/// A tracepoint of `part`'s that kernel BTF does not have, if any.
fn missing_tracepoint(kbtf: &Kbtf, part: Part) -> Option<String> {
    let mut tps = part.probes().iter().flat_map(|p| p.tracepoints());
    let missing = tps.find(|tp| !kbtf.has_btf_tracepoint(tp.name))?;
    Some(missing.to_string())
}

/// The fields the programs read from kernel structures: a tracer whose
/// fields kernel BTF does not show is dropped with a warning.
fn kernel_offsets(kbtf: &Kbtf, runnable: &mut Vec<Tracer>) -> Result<KernelOffsets, RecordError> {
    let mut offsets = KernelOffsets {
        task_pid: kbtf
            .offset_of("task_struct", &["pid"])
            .map_err(|e| RecordError::Btf {
                cause: e.to_string(),
            })?,
        task_stack: OFFSET_UNKNOWN,
        ..KernelOffsets::default()
    };
    if runnable.contains(&Tracer::Wakers) {
        match kbtf.offset_of("task_struct", &["stack"]) {
            Ok(off) => offsets.task_stack = off,
            Err(e) => eprintln!(
                "hvprof: note: wakeups from interrupts are charged to the task they \
                 interrupted: kernel BTF: {e}"
            ),
        }
    }
    if runnable.contains(&Tracer::Cgroup) {
        match (
            kbtf.offset_of("cgroup", &["root"]),
            kbtf.offset_of("cgroup_root", &["hierarchy_id"]),
        ) {
            (Ok(root), Ok(id)) => {
                offsets.cgroup_root = root;
                offsets.cgroup_hierarchy_id = id;
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("hvprof: warning: the cgroup tracer is skipped: kernel BTF: {e}");
                runnable.retain(|t| *t != Tracer::Cgroup);
            }
        }
    }
    if runnable.contains(&Tracer::Locks) {
        match (
            kbtf.offset_of("task_struct", &["nvcsw"]),
            kbtf.offset_of("task_struct", &["nivcsw"]),
        ) {
            (Ok(voluntary), Ok(involuntary)) => {
                offsets.task_nvcsw = voluntary;
                offsets.task_nivcsw = involuntary;
                holder_offsets(kbtf, &mut offsets);
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("hvprof: warning: the locks tracer is skipped: kernel BTF: {e}");
                runnable.retain(|t| *t != Tracer::Locks);
            }
        }
    }
    Ok(offsets)
}

/// Where a lock waiter finds its holder: the `owner` word of a mutex and
/// of an rwsem, and the holder task's thread group. Without one, the
/// holders of those locks are not recorded (said once).
fn holder_offsets(kbtf: &Kbtf, offsets: &mut KernelOffsets) {
    let mut missing = Vec::new();
    let mut off = |structure: &str, field: &str| {
        kbtf.offset_of(structure, &[field]).unwrap_or_else(|e| {
            missing.push(e.to_string());
            OFFSET_UNKNOWN
        })
    };
    offsets.task_tgid = off("task_struct", "tgid");
    offsets.mutex_owner = off("mutex", "owner");
    offsets.rwsem_owner = off("rw_semaphore", "owner");
    offsets.task_on_cpu = off("task_struct", "on_cpu");
    if !missing.is_empty() {
        eprintln!(
            "hvprof: note: some lock holders are not recorded: kernel BTF: {}",
            missing.join("; ")
        );
    }
}

/// `task_struct`'s `comm`, and for the off-CPU tracer `thread.sp` and
/// `sched_info.run_delay`, with a note for each that is missing and what
/// goes without it.
fn task_offsets(kbtf: &Kbtf, offcpu: bool) -> TaskOffsets {
    let off = |path: &[&str]| kbtf.offset_of("task_struct", path);
    let mut out = TaskOffsets {
        comm: off(&["comm"]).unwrap_or(0),
        ..TaskOffsets::default()
    };
    if offcpu {
        match off(&["thread", "sp"]) {
            Ok(off) => out.thread_sp = off,
            Err(e) => eprintln!(
                "hvprof: note: off-CPU kernel stacks are walked at every long block, none reused \
                 (kernel BTF: {e})"
            ),
        }
        match off(&["sched_info", "run_delay"]) {
            Ok(off) => out.run_delay = off,
            Err(e) => eprintln!(
                "hvprof: note: off-CPU run-queue wait is not measured: it needs \
                 task_struct.sched_info.run_delay (CONFIG_SCHED_INFO, selected by \
                 CONFIG_SCHEDSTATS or CONFIG_TASK_DELAY_ACCT) in kernel BTF ({e})"
            ),
        }
    }
    out
}

/// The kernel's `THREAD_SIZE`, the size of a task's kernel stack: a
/// wakeup whose program does not run on the current task's stack runs on
/// an interrupt's (x86-64 and arm64 run hard and soft interrupts on
/// per-CPU stacks). 16 KiB on both, twice that with KASAN, which the
/// kernel's config says (`/proc/config.gz`, or `/boot/config-RELEASE`).
/// Without a config, 32 KiB: a task's stack is never taken for an
/// interrupt's; an interrupt stack lying within 32 KiB above a task's
/// stack base would be taken for that task's.
#[must_use]
pub(super) fn thread_size() -> u32 {
    const BASE: u32 = 16 << 10;
    match kernel_config() {
        Some(text) if text.lines().any(|l| l == "CONFIG_KASAN=y") => BASE * 2,
        Some(_) => BASE,
        None => BASE * 2,
    }
}

/// The running kernel's build configuration, where it can be read.
fn kernel_config() -> Option<String> {
    use std::io::Read as _;
    if let Ok(f) = std::fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .is_ok()
        {
            return Some(text);
        }
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()
}

/// libc's fork paths, or `None` with a warning saying what that costs.
fn calibrate_fork_paths() -> Option<forkpath::Calibration> {
    match forkpath::calibrate() {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!(
                "hvprof: warning: libc's fork paths could not be learned ({e}): fork callers \
                 come from uprobes on libc's fork functions, which make each fork dearer"
            );
            None
        }
    }
}

/// Exact addresses of kernel data symbols (static locks such as
/// `cgroup_mutex`), when kallsyms lists data (CONFIG_KALLSYMS_ALL); or
/// why no address can be had, and what to do.
pub(super) fn kernel_data_symbols() -> Result<HashMap<u64, String>, String> {
    let text = std::fs::read_to_string("/proc/kallsyms")
        .map_err(|e| format!("/proc/kallsyms is unreadable ({e}); run hvprof as root"))?;
    data_symbols(&text)
}

/// The data symbols of `/proc/kallsyms` text, by address.
fn data_symbols(text: &str) -> Result<HashMap<u64, String>, String> {
    let mut any_address = false;
    let mut symbols = HashMap::new();
    for (addr, ty, name) in kallsyms(text) {
        any_address |= addr != 0;
        if addr != 0 && matches!(ty, "d" | "D" | "b" | "B") {
            symbols.insert(addr, name.to_owned());
        }
    }
    if !any_address {
        return Err(
            "/proc/kallsyms shows no address to this process (kernel.kptr_restrict); run \
             hvprof as root, or lower it (`sysctl kernel.kptr_restrict=0`)"
                .to_owned(),
        );
    }
    Ok(symbols)
}

/// The `(address, type, name)` lines of `/proc/kallsyms` text.
fn kallsyms(text: &str) -> impl Iterator<Item = (u64, &str, &str)> {
    text.lines().filter_map(|l| {
        let mut f = l.split_whitespace();
        let addr = u64::from_str_radix(f.next()?, 16).ok()?;
        Some((addr, f.next()?, f.next()?))
    })
}

/// The addresses of the syscall entry code that calls into C: from
/// `entry_SYSCALL_64_after_hwframe` to the next symbol in kallsyms. Read
/// only up to there: the kernel's symbols come in address order, the entry
/// code among the first, and reading all of kallsyms takes 0.1 to 0.2 s.
fn syscall_entry_range() -> Option<(u64, u64)> {
    use std::io::BufRead as _;
    let file = std::fs::File::open("/proc/kallsyms").ok()?;
    let mut start = None;
    for line in std::io::BufReader::new(file).lines() {
        let line = line.ok()?;
        let Some((addr, _, name)) = kallsyms(&line).next() else {
            continue;
        };
        match start {
            None if name == "entry_SYSCALL_64_after_hwframe" => {
                start = Some(addr).filter(|&a| a != 0);
            }
            Some(s) if addr > s => return Some((s, addr)),
            _ => {}
        }
    }
    None
}

/// Hierarchy ids to names, from `/proc/cgroups` (0 is cgroup v2).
pub(super) fn cgroup_hierarchies() -> HashMap<u32, String> {
    let mut out: HashMap<u32, Vec<String>> = HashMap::new();
    for line in std::fs::read_to_string("/proc/cgroups")
        .unwrap_or_default()
        .lines()
        .skip(1)
    {
        let mut f = line.split_whitespace();
        if let (Some(name), Some(id)) = (f.next(), f.next().and_then(|i| i.parse().ok())) {
            out.entry(id).or_default().push(name.to_owned());
        }
    }
    let mut names: HashMap<u32, String> = out
        .into_iter()
        .filter(|(id, _)| *id != 0)
        .map(|(id, mut v)| {
            v.sort();
            (id, v.join(","))
        })
        .collect();
    names.insert(0, "v2".to_owned());
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_symbols_or_why_not() {
        let text = "ffffffff81000000 T _text\nffffffff82a0b2c0 d cgroup_mutex\n";
        let symbols = data_symbols(text).unwrap();
        assert_eq!(symbols.len(), 1);
        assert_eq!(symbols[&0xffff_ffff_82a0_b2c0], "cgroup_mutex");
        // What an unprivileged reader sees with kernel.kptr_restrict=1.
        let hidden = "0000000000000000 T _text\n0000000000000000 d cgroup_mutex\n";
        let why = data_symbols(hidden).unwrap_err();
        assert!(
            why.contains("kptr_restrict") && why.contains("as root"),
            "{why}"
        );
    }

    #[test]
    fn kallsyms_lines() {
        let text = "ffffffff81000000 T _text\nffffffff82a0b2c0 d cgroup_mutex\nbad line\n";
        let got: Vec<_> = kallsyms(text).collect();
        assert_eq!(
            got,
            [
                (0xffff_ffff_8100_0000, "T", "_text"),
                (0xffff_ffff_82a0_b2c0, "d", "cgroup_mutex")
            ]
        );
    }
}
