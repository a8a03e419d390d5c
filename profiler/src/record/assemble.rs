//! Assembling the profile: the drained rows, with their stacks symbolized
//! and their kernel values named, sorted; the VM timeline, the processes,
//! the losses and what the recording was.

use std::{cell::OnceCell, collections::HashMap};

use profiler_common::record::{
    DBUS_TIMEOUT_DEFAULT, VM_SOURCE_EXEC, WINDOW_PARITY, cgroup_op, dbus_fn, fork_kind, job_outcome,
};

use super::{
    comm_str,
    drain::Drained,
    events::{Recorder, Stop},
    kernel,
    symbolize::{Frames, StackStore},
};
use crate::{
    procmaps,
    profile::{
        CgroupOp, DbusCall, ForkCall, Holder, LibvirtCall, LockWait, LossCount, Meta, OffCpu,
        OffWake, OnCpu, Process, Profile, VmCreation, Waker, merge::Rows,
    },
    sys,
    tracer::dbus_function,
    words::lock_type_name,
};

/// `ps`-style letter of a `sched_switch` `prev_state`.
#[must_use]
pub fn task_state_name(state: u32) -> &'static str {
    // TASK_REPORT_MAX (0x100 on current kernels) marks a preempted task.
    if state == 0 || state & 0x100 != 0 {
        return "R";
    }
    match state.isolate_lowest_one() {
        0x01 => "S",
        0x02 => "D",
        0x04 => "T",
        0x08 => "t",
        0x10 => "X",
        0x20 => "Z",
        0x40 => "P",
        0x80 => "I",
        _ => "?",
    }
}

/// The system call of a [`fork_kind`].
fn fork_syscall_name(kind: u32) -> &'static str {
    match kind & 0xff {
        fork_kind::CLONE => "clone",
        fork_kind::CLONE3 => "clone3",
        fork_kind::FORK => "fork",
        fork_kind::VFORK => "vfork",
        _ => "?",
    }
}

/// A kernel log2 histogram without its empty tail buckets.
pub(super) fn trim_hist(hist: &[u64]) -> Vec<u64> {
    let n = hist.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
    hist[..n].to_vec()
}

/// A NUL-terminated name the kernel copied; `None` when empty.
fn c_name(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    (end > 0).then(|| String::from_utf8_lossy(&b[..end]).into_owned())
}

/// The rows of one drain, symbolized into `frames`' table (its
/// [`Frames::lookups`] looked up first), as a part of the profile (its
/// other fields empty).
pub(super) fn part(
    rec: &Recorder,
    drained: &mut Drained,
    frames: &mut Frames,
    stacks: &StackStore,
) -> Profile {
    let mut s = Symbolize {
        frames,
        processes: &rec.processes,
        stacks,
    };
    Profile {
        oncpu: oncpu(drained, &mut s),
        offcpu: offcpu(drained, &mut s),
        offwake: offwake(drained, &mut s),
        locks: locks(drained, &mut s, &rec.data_symbols),
        forks: forks(drained, &mut s),
        dbus: dbus(drained, &mut s),
        cgroups: cgroups(drained),
        libvirt: libvirt(drained, &mut s),
        losses: std::mem::take(&mut drained.losses),
        unwind: std::mem::take(&mut drained.unwind),
        ..Profile::default()
    }
}

/// Symbolizing one drain's stacks.
struct Symbolize<'a> {
    frames: &'a mut Frames,
    processes: &'a super::targets::Processes,
    stacks: &'a StackStore,
}

impl Symbolize<'_> {
    fn stack(&mut self, tgid: u32, kern: u64, user: u64) -> Vec<u32> {
        self.frames
            .stack(self.processes, self.stacks, tgid, kern, user)
    }
}

/// The window of a kernel row, without its flush parity.
fn window(recorded: u32) -> u32 {
    recorded & !WINDOW_PARITY
}

/// The whole profile at the stop: the rows of every drain, added up, with
/// the VM timeline, the processes, what symbolization could not do, and
/// what the recording was.
pub(super) fn profile(
    rec: &Recorder,
    rows: Rows,
    frames: &Frames,
    last: &mut Drained,
    stop: &Stop,
    stop_ns: u64,
) -> Profile {
    let mut profile = Profile::default();
    rows.into_profile(&mut profile);
    let stats = frames.stats();
    if stats.user_unmapped > 0 {
        profile.losses.push(LossCount {
            window: None,
            kind: "user frames of processes gone before their maps were read".to_owned(),
            count: stats.user_unmapped,
        });
    }
    let vms = vms(rec);
    let vm_count = last.vm_count.unwrap_or(vms.len() as u64);
    if vms.len() as u64 != vm_count {
        profile.losses.push(LossCount {
            window: None,
            kind: "VM creation events missing (count from the kernel's counter)".to_owned(),
            count: vm_count.saturating_sub(vms.len() as u64),
        });
    }
    let mut processes: Vec<Process> = rec.processes.info.values().cloned().collect();
    processes.sort_by_key(|p| p.tgid);
    profile.meta = meta(rec, stop.to_string(), stop_ns.saturating_sub(rec.start_ns));
    profile.meta.counters = std::mem::take(&mut last.counters);
    profile.windows = rec.opts.windows.windows(vm_count);
    profile.vms = vms;
    profile.frames = frames.names().to_vec();
    profile.processes = processes;
    profile.calls.clone_from(&rec.calls);
    crate::profile::attribute::resolve(&mut profile);
    profile
}

fn oncpu(drained: &Drained, frames: &mut Symbolize<'_>) -> Vec<OnCpu> {
    drained
        .oncpu
        .iter()
        .map(|(k, n)| OnCpu {
            window: window(k.window),
            tgid: k.tgid,
            pid: k.pid,
            comm: comm_str(&k.comm),
            stack: frames.stack(k.tgid, k.kern_stack, k.user_stack),
            samples: *n,
        })
        .collect()
}

/// The off-CPU rows: the windows' blocks, and (at the stop) those still
/// going, marked [`OffCpu::unfinished`].
fn offcpu(drained: &Drained, frames: &mut Symbolize<'_>) -> Vec<OffCpu> {
    let done = drained.offcpu.iter().map(|r| (r, false));
    let unfinished = drained.unfinished.iter().map(|r| (r, true));
    done.chain(unfinished)
        .map(|((k, v), unfinished)| OffCpu {
            window: window(k.window),
            tgid: k.tgid,
            pid: k.pid,
            comm: comm_str(&k.comm),
            state: task_state_name(k.state).to_owned(),
            dbus: (k.dbus != 0).then(|| dbus_function(k.dbus).1.to_owned()),
            stack: frames.stack(k.tgid, k.kern_stack, k.user_stack),
            blocks: v.count,
            total_ns: v.total_ns,
            max_ns: v.max_ns,
            runq_ns: v.runq_ns,
            unfinished,
        })
        .collect()
}

fn offwake(drained: &Drained, frames: &mut Symbolize<'_>) -> Vec<OffWake> {
    use profiler_common::record::WAKER_INTERRUPT;
    drained
        .offwake
        .iter()
        .map(|(k, v)| {
            let (b, w) = (&k.blocked, &k.waker);
            let stack = frames.stack(w.tgid, w.kern_stack, w.user_stack);
            let waker = match interrupt_entry(&stack, frames.frames.names()) {
                Some(i) => Waker::Interrupt {
                    stack: stack[i..].to_vec(),
                },
                None if w.pid == WAKER_INTERRUPT => Waker::Interrupt { stack },
                None => Waker::Task {
                    tgid: w.tgid,
                    pid: w.pid,
                    comm: comm_str(&w.comm),
                    stack,
                },
            };
            OffWake {
                window: window(b.window),
                tgid: b.tgid,
                pid: b.pid,
                comm: comm_str(&b.comm),
                state: task_state_name(b.state).to_owned(),
                stack: frames.stack(b.tgid, b.kern_stack, b.user_stack),
                waker,
                blocks: v.count,
                total_ns: v.total_ns,
                max_ns: v.max_ns,
            }
        })
        .collect()
}

/// Where a waker's stack enters an interrupt (`asm_sysvec_…`,
/// `asm_common_interrupt`: x86-64's interrupt entry points), if it does:
/// the wakeup was the interrupt's, whatever task it interrupted (the
/// program tells only an interrupt on its own stack; one that came in user
/// mode runs on the task's). Its stack from there on: what it interrupted
/// had no part in the wakeup, and would split one waker into as many rows
/// as places it happened to interrupt.
fn interrupt_entry(stack: &[u32], names: &[String]) -> Option<usize> {
    stack.iter().rposition(|&f| {
        names.get(f as usize).is_some_and(|n| {
            [
                "asm_sysvec_",
                "asm_common_interrupt",
                "asm_spurious_interrupt",
            ]
            .iter()
            .any(|p| n.starts_with(p))
        })
    })
}

/// libvirt's rows: those drained as they are, and the job waits with their
/// stacks.
fn libvirt(drained: &mut Drained, frames: &mut Symbolize<'_>) -> Vec<LibvirtCall> {
    let mut rows = std::mem::take(&mut drained.libvirt);
    rows.extend(drained.jobs.iter().map(|(k, v)| {
        let status = match k.outcome {
            job_outcome::GOT => LibvirtCall::OK,
            job_outcome::TIMEOUT => LibvirtCall::TIMEOUT,
            _ => LibvirtCall::ERROR,
        };
        LibvirtCall {
            window: window(k.window),
            tgid: k.tgid,
            kind: LibvirtCall::JOB.to_owned(),
            name: String::new(),
            status: status.to_owned(),
            comm: comm_str(&k.comm),
            stack: frames.stack(k.tgid, 0, k.user_stack),
            calls: v.count,
            total_ns: v.total_ns,
            max_ns: v.max_ns,
            hist: trim_hist(&v.hist),
        }
    }));
    rows
}

/// The kernel's data symbols, to name static locks: read once, at the
/// first flush with lock waits (or a warning saying why they cannot be).
pub(super) fn read_data_symbols() -> HashMap<u64, String> {
    kernel::kernel_data_symbols().unwrap_or_else(|why| {
        eprintln!("hvprof: warning: locks are named by address only: {why}");
        HashMap::new()
    })
}

fn locks(
    drained: &Drained,
    frames: &mut Symbolize<'_>,
    data_symbols: &OnceCell<HashMap<u64, String>>,
) -> Vec<LockWait> {
    if drained.locks.is_empty() {
        return Vec::new();
    }
    let data_symbols = data_symbols.get_or_init(read_data_symbols);
    drained
        .locks
        .iter()
        .map(|(k, v)| LockWait {
            window: window(k.window),
            tgid: k.tgid,
            comm: comm_str(&k.comm),
            lock: k.lock,
            lock_name: data_symbols.get(&k.lock).cloned(),
            lock_type: lock_type_name(k.flags).to_owned(),
            stack: frames.stack(k.tgid, k.kern_stack, k.user_stack),
            count: v.count,
            total_ns: v.total_ns,
            max_ns: v.max_ns,
            hist: trim_hist(&v.hist),
            holder: holder(&k.holder, frames),
        })
        .collect()
}

/// A wait's holder as the lock tracer found it.
fn holder(h: &profiler_common::record::TaskStacks, frames: &mut Symbolize<'_>) -> Option<Holder> {
    use profiler_common::record::{HOLDER_READERS, HOLDER_UNKNOWN};
    match h.pid {
        HOLDER_UNKNOWN => None,
        HOLDER_READERS => Some(Holder::Readers),
        pid => Some(Holder::Task {
            tgid: h.tgid,
            pid,
            comm: comm_str(&h.comm),
            stack: frames.stack(h.tgid, h.kern_stack, h.user_stack),
        }),
    }
}

fn forks(drained: &Drained, frames: &mut Symbolize<'_>) -> Vec<ForkCall> {
    drained
        .forks
        .iter()
        .map(|(k, v)| ForkCall {
            window: window(k.window),
            tgid: k.tgid,
            comm: comm_str(&k.comm),
            syscall: fork_syscall_name(k.kind).to_owned(),
            thread: k.kind & fork_kind::THREAD != 0,
            stack: frames.stack(k.tgid, 0, k.user_stack),
            caller: (k.caller != 0)
                .then(|| frames.frames.caller(frames.processes, k.tgid, k.caller))
                .flatten(),
            count: v.count,
            total_ns: v.total_ns,
            max_ns: v.max_ns,
        })
        .collect()
}

fn dbus(drained: &Drained, frames: &mut Symbolize<'_>) -> Vec<DbusCall> {
    drained
        .dbus
        .iter()
        .map(|(k, v)| {
            let (library, function) = dbus_function(k.function);
            DbusCall {
                window: window(k.window),
                tgid: k.tgid,
                comm: comm_str(&k.comm),
                library: library.to_owned(),
                function: function.to_owned(),
                destination: c_name(&k.names.destination),
                path: c_name(&k.names.path),
                interface: c_name(&k.names.interface),
                member: c_name(&k.names.member),
                timeout_ms: (k.function != dbus_fn::LIBDBUS_PENDING_BLOCK
                    || k.timeout_ms != DBUS_TIMEOUT_DEFAULT)
                    .then_some(k.timeout_ms),
                stack: frames.stack(k.tgid, 0, k.user_stack),
                calls: v.count,
                timeouts: v.timeouts,
                total_ns: v.total_ns,
                max_ns: v.max_ns,
                hist: trim_hist(&v.hist),
            }
        })
        .collect()
}

fn cgroups(drained: &Drained) -> Vec<CgroupOp> {
    if drained.cgroups.is_empty() {
        return Vec::new();
    }
    let hierarchies = kernel::cgroup_hierarchies();
    drained
        .cgroups
        .iter()
        .map(|(k, v)| CgroupOp {
            window: window(k.window),
            tgid: k.tgid,
            comm: comm_str(&k.comm),
            op: match k.kind {
                cgroup_op::MKDIR => "mkdir",
                cgroup_op::RMDIR => "rmdir",
                _ => "attach",
            }
            .to_owned(),
            hierarchy: hierarchies
                .get(&k.root)
                .cloned()
                .unwrap_or_else(|| format!("hierarchy {}", k.root)),
            path: c_name(&k.path).unwrap_or_default(),
            count: v.count,
            timed: v.timed,
            total_ns: v.total_ns,
            max_ns: v.max_ns,
        })
        .collect()
}

/// VM creations, numbered by time (see the kernel's `vm_created`).
pub(super) fn vms(rec: &Recorder) -> Vec<VmCreation> {
    let mut events = rec.vms.clone();
    events.sort_by_key(|(e, _)| e.ts_ns);
    events
        .into_iter()
        .enumerate()
        .map(|(i, (e, cmdline))| {
            let name = cmdline.as_deref().and_then(procmaps::qemu_vm_name);
            VmCreation {
                ordinal: i as u64 + 1,
                time_ns: e.ts_ns.saturating_sub(rec.start_ns),
                pid: e.tgid,
                tid: e.pid,
                comm: comm_str(&e.comm),
                source: if e.child == VM_SOURCE_EXEC {
                    "exec"
                } else {
                    "kvm"
                }
                .to_owned(),
                cmdline,
                name,
                token: (e.token != 0).then_some(e.token),
            }
        })
        .collect()
}

/// What the recording was: host, options, why it stopped, what it cost.
pub(super) fn meta(rec: &Recorder, stop_reason: String, duration_ns: u64) -> Meta {
    let opts = &rec.opts;
    Meta {
        hvprof_version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        kernel: sys::kernel_release(),
        cpus: sys::online_cpus().map_or(0, |c| c.len()),
        started_unix_ms: rec.started_unix_ms,
        duration_ns,
        command_line: opts.command_line.clone(),
        target: opts.target.to_string(),
        follow_children: opts.follow_children,
        frequency_hz: opts.frequency_hz,
        window_spec: Some(opts.windows.clone()),
        min_block_ns: u64::try_from(opts.min_block.as_nanos()).unwrap_or(u64::MAX),
        max_block_ns: u64::try_from(opts.max_block.as_nanos()).unwrap_or(u64::MAX),
        vm_events: opts.vm_events.iter().map(ToString::to_string).collect(),
        stop_reason,
        tracers: rec.tracers.iter().map(|t| t.name().to_owned()).collect(),
        program_stats: Vec::new(),
        self_cpu_ns: Some(rec.self_cpu_ns),
        counters: std::collections::BTreeMap::new(),
        incomplete: None,
        verify_unwind: rec
            .verifier
            .as_ref()
            .map(crate::unwind::verify::Verifier::result),
        restarts: rec.restarts.found.clone(),
        offcpu_cut_at_windows: true,
        attribute: opts.attribute,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_states() {
        assert_eq!(task_state_name(0), "R");
        assert_eq!(task_state_name(0x100), "R");
        assert_eq!(task_state_name(1), "S");
        assert_eq!(task_state_name(2), "D");
        assert_eq!(task_state_name(0x402), "D");
        assert_eq!(task_state_name(0x80), "I");
    }

    /// The fork tracer's kinds, by the numbers the kernel side uses.
    #[test]
    fn fork_syscalls() {
        assert_eq!(
            fork_syscall_name(fork_kind::CLONE | fork_kind::THREAD),
            "clone"
        );
        assert_eq!(fork_syscall_name(fork_kind::CLONE3), "clone3");
        assert_eq!(fork_syscall_name(fork_kind::FORK), "fork");
        assert_eq!(fork_syscall_name(fork_kind::VFORK), "vfork");
        assert_eq!(fork_syscall_name(0), "?");
    }
}
