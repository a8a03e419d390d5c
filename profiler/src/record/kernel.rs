//! What the kernel tells a recording before anything is loaded: the field
//! offsets of the tracepoints the programs read, which tracers this kernel
//! can run, `task_struct` offsets from kernel BTF, the syscall entry code's
//! addresses, libc's fork paths; and, when the recording is read out,
//! kernel data symbols and cgroup hierarchy names.

use std::{collections::HashMap, thread::JoinHandle};

use aya::{Btf, BtfError};
use profiler_common::record::TracepointOffsets;

use super::options::{RecordError, RecordOptions, UnwindMode};
use crate::{
    forkpath,
    tracefs::{Tracefs, TracefsError, Tracepoint},
    tracer::{CGROUP_SYSCALLS, FORK_SYSCALLS, Tracer, UNWIND_SYSCALLS, VM_SYSCALLS, syscall_pair},
};

/// What the kernel allows and where things are in it, for one recording.
pub(super) struct Facts {
    /// Kernel BTF (for the off-CPU tracer's BTF tracepoint), parsed while
    /// the rest is set up; `None` without that tracer.
    pub btf: Option<JoinHandle<Result<Btf, BtfError>>>,
    pub offsets: TracepointOffsets,
    /// The tracers asked for whose tracepoints this kernel has.
    pub tracers: Vec<Tracer>,
    /// A library mapped during the recording is announced to the
    /// unwinder (`sys_enter/exit_mmap`).
    pub mmap_hook: bool,
    pub task: TaskOffsets,
    /// `entry_SYSCALL_64_after_hwframe` to the next symbol.
    pub syscall_entry: Option<(u64, u64)>,
    /// Where libc's fork functions keep their callers' return addresses
    /// (with the fork tracer, unless `--fork-uprobes`).
    pub calibration: Option<forkpath::Calibration>,
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
}

/// Reads a tracer's tracepoint offsets, or says why they cannot be used.
type OffsetReader = fn(&Tracefs, &mut TracepointOffsets) -> Result<(), TracefsError>;

impl Facts {
    /// Asks the kernel; a tracer it cannot run is dropped with a warning.
    pub fn gather(opts: &RecordOptions) -> Result<Self, RecordError> {
        let offcpu = opts.tracers.contains(&Tracer::OffCpu);
        // Kernel BTF takes a while to parse: do it while the rest is set up.
        let btf = offcpu.then(|| std::thread::spawn(Btf::from_sys_fs));
        // And task_struct offsets (a few ms of parsing, also done meanwhile).
        let task = std::thread::spawn(task_offsets);
        let (tracefs, _) = Tracefs::locate_or_mount()?;
        let mut offsets = offsets(&tracefs)?;
        let mut runnable = opts.tracers.clone();
        let readers: [(Tracer, OffsetReader); 3] = [
            (Tracer::Locks, lock_offsets),
            (Tracer::Fork, fork_offsets),
            (Tracer::Cgroup, cgroup_offsets),
        ];
        for (tracer, read) in readers {
            if runnable.contains(&tracer)
                && let Err(e) = read(&tracefs, &mut offsets)
            {
                eprintln!(
                    "hvprof: warning: the {} tracer is skipped: {e}",
                    tracer.name()
                );
                runnable.retain(|t| *t != tracer);
            }
        }
        let mmap_hook = opts.unwind == UnwindMode::Dwarf
            && match mmap_offsets(&tracefs, &mut offsets) {
                Ok(()) => true,
                Err(e) => {
                    eprintln!(
                        "hvprof: warning: a library mapped during the recording gets its unwind tables at the first stack that meets it: {e}"
                    );
                    false
                }
            };
        let task = join_task_offsets(task, offcpu);
        let syscall_entry = syscall_entry_range();
        let calibration = (runnable.contains(&Tracer::Fork) && !opts.fork_uprobes)
            .then(calibrate_fork_paths)
            .flatten();
        Ok(Self {
            btf,
            offsets,
            tracers: runnable,
            mmap_hook,
            task,
            syscall_entry,
            calibration,
        })
    }
}

type TaskOffsetResults = (
    Result<u32, String>,
    Result<u32, String>,
    Result<u32, String>,
);

/// `task_struct`'s `thread.sp`, `sched_info.run_delay` and `comm`.
fn task_offsets() -> Result<TaskOffsetResults, String> {
    let btf = crate::kbtf::Kbtf::from_sys_fs().map_err(|e| e.to_string())?;
    let off = |path: &[&str]| {
        btf.offset_of("task_struct", path)
            .map_err(|e| e.to_string())
    };
    Ok((
        off(&["thread", "sp"]),
        off(&["sched_info", "run_delay"]),
        off(&["comm"]),
    ))
}

/// The offsets the thread found; for the off-CPU tracer, a note for each
/// that is missing and what goes without it.
fn join_task_offsets(
    task: JoinHandle<Result<TaskOffsetResults, String>>,
    offcpu: bool,
) -> TaskOffsets {
    let (sp, run_delay, comm) = match task.join() {
        Ok(Ok(offsets)) => offsets,
        Ok(Err(e)) => (Err(e.clone()), Err(e.clone()), Err(e)),
        Err(_) => {
            let e = || "panicked".to_owned();
            (Err(e()), Err(e()), Err(e()))
        }
    };
    let mut out = TaskOffsets {
        comm: comm.unwrap_or(0),
        ..TaskOffsets::default()
    };
    if offcpu {
        match sp {
            Ok(off) => out.thread_sp = off,
            Err(e) => eprintln!(
                "hvprof: note: off-CPU kernel stacks are walked at every long block, none reused \
                 (kernel BTF: {e})"
            ),
        }
        match run_delay {
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
/// `entry_SYSCALL_64_after_hwframe` to the next symbol in kallsyms.
fn syscall_entry_range() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/kallsyms").ok()?;
    let mut start = None;
    let mut all = Vec::new();
    for (addr, _, name) in kallsyms(&text) {
        if name == "entry_SYSCALL_64_after_hwframe" {
            start = Some(addr);
        }
        all.push(addr);
    }
    let start = start.filter(|&a| a != 0)?;
    let end = all.into_iter().filter(|&a| a > start).min()?;
    Some((start, end))
}

/// Reads the tracepoint field offsets the programs need.
fn offsets(tracefs: &Tracefs) -> Result<TracepointOffsets, TracefsError> {
    let fork = tracefs.format(Tracepoint::new("sched", "sched_process_fork"))?;
    let [enter, exit] = syscall_pair(VM_SYSCALLS[0]);
    let (enter, exit) = (tracefs.format(enter)?, tracefs.format(exit)?);
    Ok(TracepointOffsets {
        fork_parent_pid: fork.offset("parent_pid", &[4])?,
        fork_child_pid: fork.offset("child_pid", &[4])?,
        ioctl_enter_cmd: enter.offset("cmd", &[8])?,
        ioctl_exit_ret: exit.offset("ret", &[8])?,
        ..TracepointOffsets::default()
    })
}

/// Offsets of the fork-syscall tracepoints, or why they cannot be used.
fn fork_offsets(tracefs: &Tracefs, offsets: &mut TracepointOffsets) -> Result<(), TracefsError> {
    let clone = tracefs.format(Tracepoint::new("syscalls", "sys_enter_clone"))?;
    let clone3 = tracefs.format(Tracepoint::new("syscalls", "sys_enter_clone3"))?;
    let exit = tracefs.format(Tracepoint::new("syscalls", "sys_exit_clone"))?;
    for tp in FORK_SYSCALLS.into_iter().flat_map(syscall_pair) {
        tracefs.id(tp)?;
    }
    offsets.syscall_nr = clone.offset("__syscall_nr", &[4])?;
    offsets.clone_flags = clone.offset("clone_flags", &[8])?;
    offsets.clone3_uargs = clone3.offset("uargs", &[8])?;
    offsets.fork_exit_ret = exit.offset("ret", &[8])?;
    Ok(())
}

/// Offsets of `sys_enter_mmap`/`sys_exit_mmap`, which tell the unwinder
/// of a library mapped executable (`dlopen`), or why they cannot be used.
fn mmap_offsets(tracefs: &Tracefs, offsets: &mut TracepointOffsets) -> Result<(), TracefsError> {
    let [enter, exit] = syscall_pair(UNWIND_SYSCALLS[0]);
    let (enter, exit) = (tracefs.format(enter)?, tracefs.format(exit)?);
    offsets.mmap_prot = enter.offset("prot", &[8])?;
    offsets.mmap_flags = enter.offset("flags", &[8])?;
    offsets.mmap_exit_ret = exit.offset("ret", &[8])?;
    Ok(())
}

/// Offsets of the cgroup tracepoints, or why they cannot be used.
fn cgroup_offsets(tracefs: &Tracefs, offsets: &mut TracepointOffsets) -> Result<(), TracefsError> {
    let mkdir = tracefs.format(Tracepoint::new("cgroup", "cgroup_mkdir"))?;
    tracefs.format(Tracepoint::new("cgroup", "cgroup_rmdir"))?;
    let attach = tracefs.format(Tracepoint::new("cgroup", "cgroup_attach_task"))?;
    for tp in CGROUP_SYSCALLS.into_iter().flat_map(syscall_pair) {
        tracefs.id(tp)?;
    }
    offsets.cgroup_root = mkdir.offset("root", &[4])?;
    offsets.cgroup_path = mkdir.offset("path", &[4])?;
    offsets.cgroup_attach_root = attach.offset("dst_root", &[4])?;
    offsets.cgroup_attach_path = attach.offset("dst_path", &[4])?;
    Ok(())
}

/// Offsets of the lock-contention tracepoints, or why they cannot be used.
fn lock_offsets(tracefs: &Tracefs, offsets: &mut TracepointOffsets) -> Result<(), TracefsError> {
    let begin = tracefs.format(Tracepoint::new("lock", "contention_begin"))?;
    let end = tracefs.format(Tracepoint::new("lock", "contention_end"))?;
    offsets.lock_begin_addr = begin.offset("lock_addr", &[8])?;
    offsets.lock_begin_flags = begin.offset("flags", &[4])?;
    offsets.lock_end_addr = end.offset("lock_addr", &[8])?;
    Ok(())
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
