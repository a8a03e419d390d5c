//! Loading the recording programs: their configuration (read-only
//! globals, set before load, from the options and the kernel facts), the
//! object itself, and the maps filled before the first probe fires.

use std::os::fd::OwnedFd;

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, RingBuf},
};
use profiler_common::record::{Config, TargetMode, names};

use super::{
    kernel::Facts,
    options::{RecordError, RecordOptions, Target, UnwindMode, VmEvent},
};
use crate::{ebpf, tracer::Tracer, windows::WindowSpec};

/// The kernel side's configuration: who is recorded, how windows are cut,
/// what counts as a VM; [`stack_config`] adds how stacks are taken.
pub(super) fn config(opts: &RecordOptions, facts: &Facts) -> Config {
    let mut config = Config::zeroed();
    config.target_mode = match opts.target {
        Target::All => TargetMode::All as u32,
        _ => TargetMode::Tracked as u32,
    };
    config.follow_children = u32::from(opts.follow_children);
    config.window_mode = opts.windows.mode() as u32;
    if let WindowSpec::Every { size } = opts.windows {
        config.window_size = size;
    }
    config.window_ranges = u32::try_from(opts.windows.kernel_ranges().len()).unwrap_or(0);
    if opts.attribute == crate::windows::Attribution::Vm {
        config.attribute_vm = 1;
        // Every possible CPU (a CPU brought online later has a number below).
        let cpus: u32 = aya::util::nr_cpus().map_or(4096, std::num::NonZero::get);
        config.token_cpu_bits = (cpus - 1).bit_width();
    }
    config.self_tgid = std::process::id();
    config.min_block_ns = u64::try_from(opts.min_block.as_nanos()).unwrap_or(u64::MAX);
    config.max_block_ns = u64::try_from(opts.max_block.as_nanos()).unwrap_or(u64::MAX);
    config.offsets = facts.offsets;
    config.dbus = u32::from(facts.tracers.contains(&Tracer::Dbus));
    config.wakers = u32::from(facts.tracers.contains(&Tracer::Wakers));
    config.thread_size = facts.task.thread_size;
    for (field, nr) in [
        (&mut config.nr_clone, libc::SYS_clone),
        (&mut config.nr_clone3, libc::SYS_clone3),
        (&mut config.nr_fork, libc::SYS_fork),
        (&mut config.nr_vfork, libc::SYS_vfork),
    ] {
        *field = u32::try_from(nr).unwrap_or(u32::MAX);
    }
    if let Some(c) = &facts.calibration {
        for (slot, p) in config.fork_paths.iter_mut().zip(&c.paths) {
            *slot = *p;
        }
    }
    for ev in &opts.vm_events {
        match ev {
            VmEvent::Kvm => config.vm_event_kvm = 1,
            VmEvent::Exec { pattern } => {
                let (comm, len, prefix) = VmEvent::kernel_pattern(pattern);
                config.vm_event_exec = 1;
                config.vm_exec_comm = comm;
                config.vm_exec_len = len;
                config.vm_exec_prefix = u32::from(prefix);
            }
        }
    }
    if let Target::Comm(name) = &opts.target {
        let (comm, len, _) = VmEvent::kernel_pattern(name);
        config.target_comm = comm;
        config.target_comm_len = len;
    }
    stack_config(&mut config, opts, facts);
    config
}

/// How stacks are taken: user-stack depth and unwinder, the off-CPU
/// tracer's reuse of a thread's stacks, and the kernel addresses and
/// `task_struct` offsets that reuse needs.
fn stack_config(config: &mut Config, opts: &RecordOptions, facts: &Facts) {
    config.user_stack_depth = opts.user_stack_depth;
    config.preempted_stacks = u32::from(opts.preempted_stacks);
    config.block_site_cache = u32::from(opts.block_site_cache);
    config.verify_stack_cache = u32::from(opts.verify_stack_cache);
    config.drop_lock_ends = opts.drop_lock_ends;
    config.unwind_dwarf = u32::from(opts.unwind == UnwindMode::Dwarf);
    if opts.unwind == UnwindMode::Dwarf {
        config.verify_unwind = opts.verify_unwind.unwrap_or(0);
    }
    config.task_comm = facts.task.comm;
    config.task_thread_sp = facts.task.thread_sp;
    config.task_run_delay = facts.task.run_delay;
    config.kstack_min_ns =
        u64::try_from(opts.kernel_stack_min_block.as_nanos()).unwrap_or(u64::MAX);
    if let Some((start, end)) = facts.syscall_entry {
        config.syscall_entry = start;
        config.syscall_entry_end = end;
    }
}

/// With `--bpf-stats`, turns on the kernel's BPF run-time statistics; they
/// stay on while the returned descriptor is open.
pub(super) fn enable_stats(opts: &RecordOptions) -> Result<Option<OwnedFd>, RecordError> {
    if !opts.bpf_stats {
        return Ok(None);
    }
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map(Some)
        .map_err(|e| RecordError::BpfStats { source: e.io_error })
}

/// The loaded object, and what userspace keeps of it.
pub(super) struct Loaded {
    pub bpf: Ebpf,
    /// Loads each process's unwind tables (`--unwind dwarf`).
    pub unwinder: Option<crate::unwind::procs::Loader>,
    /// `--verify-unwind`.
    pub verifier: Option<crate::unwind::verify::Verifier>,
}

/// Loads the object with `config`, takes the maps userspace fills while
/// recording, and fills those the programs read from the start: the
/// window ranges and the processes tracked from the start.
pub(super) fn load(
    opts: &RecordOptions,
    config: &Config,
    initial: &[u32],
) -> Result<Loaded, RecordError> {
    let unwind_rows = if opts.unwind == UnwindMode::Dwarf {
        opts.unwind_max_rows.max(1)
    } else {
        1
    };
    let mut bpf = ebpf::load_with_config(config, opts.max_stacks, unwind_rows)?;
    let unwinder = if opts.unwind == UnwindMode::Dwarf {
        let take = |bpf: &mut Ebpf, name: &'static str| {
            bpf.take_map(name).ok_or(RecordError::Missing { name })
        };
        let rows = take(&mut bpf, names::UNWIND_ROWS)?;
        let chunks = take(&mut bpf, names::UNWIND_CHUNKS)?;
        let rules = take(&mut bpf, names::UNWIND_RULES)?;
        let procs = take(&mut bpf, names::UNWIND_PROCS)?;
        Some(crate::unwind::procs::Loader::new(
            rows,
            chunks,
            rules,
            procs,
            (unwind_rows, ebpf::unwind_chunks(unwind_rows)),
            opts.unwind_cache.clone(),
        )?)
    } else {
        None
    };
    let verifier = if config.verify_unwind == 0 {
        None
    } else {
        let name = names::UNWIND_VERIFY;
        let map = bpf.take_map(name).ok_or(RecordError::Missing { name })?;
        let ring = RingBuf::try_from(map).map_err(|source| RecordError::Map { name, source })?;
        Some(crate::unwind::verify::Verifier::new(ring))
    };
    fill_maps(&mut bpf, opts, initial)?;
    Ok(Loaded {
        bpf,
        unwinder,
        verifier,
    })
}

fn fill_maps(bpf: &mut Ebpf, opts: &RecordOptions, initial: &[u32]) -> Result<(), RecordError> {
    let windows = &opts.windows;
    let map_err = |name: &'static str| move |source| RecordError::Map { name, source };
    let name = names::WINDOW_RANGES;
    let mut map: Array<&mut MapData, profiler_common::record::WindowRange> =
        Array::try_from(bpf.map_mut(name).ok_or(RecordError::Missing { name })?)
            .map_err(map_err(name))?;
    for (i, r) in windows.kernel_ranges().iter().enumerate() {
        map.set(u32::try_from(i).unwrap_or(0), r, 0)
            .map_err(map_err(name))?;
    }
    let name = names::TRACKED;
    let mut tracked: BpfHashMap<&mut MapData, u32, u32> =
        BpfHashMap::try_from(bpf.map_mut(name).ok_or(RecordError::Missing { name })?)
            .map_err(map_err(name))?;
    for &pid in initial {
        tracked.insert(&pid, &pid, 0).map_err(map_err(name))?;
    }
    if opts.attribute == crate::windows::Attribution::Vm {
        let name = names::VM_CALLS;
        let mut calls: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(bpf.map_mut(name).ok_or(RecordError::Missing { name })?)
                .map_err(map_err(name))?;
        for procedure in crate::libvirt::vm_starting_procedures() {
            calls.insert(&procedure, &1, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}
