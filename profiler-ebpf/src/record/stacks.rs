//! Kernel and user stacks, stored in [`STACKS`] by content hash: the one
//! user-stack path (the unwinder where the process's tables are loaded,
//! else the kernel's frame-pointer walk), and the reasons a stack is
//! missing, counted as losses where they are.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_stack, bpf_probe_read_user},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use profiler_common::record::{
    Counter, EventKind, Loss, MAX_STACK_DEPTH, STACK_EXITING, STACK_ID_MIN, StackBuf, TargetMode,
};

use super::{
    common::{Task, count, emit, lose, now},
    tasks,
};
use crate::unwind::{self, NoWalk};

pub(super) const EFAULT: i32 = 14;
pub(super) const ENOMEM: i32 = 12;
const E2BIG: i32 = 7;

/// Stacks by content hash (see `StackBuf`). Preallocated: an insert from
/// the sampling interrupt must not fail for want of memory. Userspace sets
/// the size (`--max-stacks`).
#[map]
static STACKS: HashMap<u64, StackBuf> = HashMap::with_max_entries(65536, 0);
/// Per-CPU scratch for `bpf_get_stack`: a stack is larger than the BPF stack.
#[map]
pub(crate) static STACK_SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(1, 0);
/// When each process last asked userspace for its unwind tables.
#[map]
static UNWIND_ASKED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);

/// Takes the current stack (kernel, or user with `BPF_F_USER_STACK`),
/// stores it in `STACKS` under its content hash and returns the hash.
#[inline(always)]
pub(super) fn stack_id<C: EbpfContext>(ctx: &C, flags: u64) -> Result<u64, i32> {
    walk_stack(ctx, flags).0
}

/// [`stack_id`], and the number of frames, which stay in `STACK_SCRATCH`.
#[inline(always)]
pub(super) fn walk_stack<C: EbpfContext>(ctx: &C, flags: u64) -> (Result<u64, i32>, usize) {
    walk_stack_upto(ctx, flags, MAX_STACK_DEPTH)
}

/// [`walk_stack`] of at most `frames` kernel frames (user stacks get
/// `user_stack_depth`).
#[inline(always)]
pub(super) fn walk_stack_upto<C: EbpfContext>(
    ctx: &C,
    flags: u64,
    frames: usize,
) -> (Result<u64, i32>, usize) {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return (Err(-ENOMEM), 0);
    };
    // The buffer size bounds the walk. User stacks get `user_stack_depth`
    // frames: without frame pointers (Debian's libvirt, glib, QEMU) a walk
    // runs on through garbage, and every frame costs a user-memory read.
    let size = if flags & u64::from(BPF_F_USER_STACK) != 0 {
        let d = config!(user_stack_depth) as usize;
        let d = if d == 0 || d > MAX_STACK_DEPTH {
            MAX_STACK_DEPTH
        } else {
            d
        };
        d * 8
    } else if frames < MAX_STACK_DEPTH {
        frames * 8
    } else {
        core::mem::size_of::<StackBuf>()
    };
    // SAFETY: buf is this CPU's scratch value, at least `size` bytes.
    let n = unsafe { bpf_get_stack(ctx.as_ptr(), buf.cast(), size as u32, flags) };
    (store_stack(n), n.max(0) as usize / 8)
}

/// Stores the `n` bytes of frames a stack helper (or the unwinder) left in
/// `STACK_SCRATCH` in `STACKS` under their content hash, and returns the
/// hash.
#[inline(always)]
pub(super) fn store_stack(n: i64) -> Result<u64, i32> {
    if n < 0 {
        return Err(n as i32);
    }
    match hvprof_store_stack(n as u64 / 8) {
        id if id < STACK_ID_MIN => Err(-(id as i32)),
        id => Ok(id),
    }
}

/// [`store_stack`] of the `frames` frames in this CPU's `STACK_SCRATCH`,
/// as a global BPF function (exported by `build.rs`): verified once per
/// program rather than at each of its many call sites, where its two loops
/// over the frames multiplied the paths. Returns the hash, or an errno
/// below `STACK_ID_MIN`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn hvprof_store_stack(frames: u64) -> u64 {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return ENOMEM as u64;
    };
    if frames == 0 {
        return EFAULT as u64;
    }
    let frames = frames as usize;
    // FNV-1a over the frames.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < MAX_STACK_DEPTH {
        if i >= frames {
            break;
        }
        // SAFETY: i < MAX_STACK_DEPTH, inside the scratch buffer.
        let ip = unsafe { (*buf).ips[i] };
        h = (h ^ ip).wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    if h < STACK_ID_MIN {
        h |= 1 << 63;
    }
    // SAFETY: only presence is tested.
    if unsafe { STACKS.get(&h) }.is_none() {
        // A new stack (rare once warm): clear what an earlier, deeper stack
        // left in the scratch, so the stored copy ends with zeros.
        let mut i = 0;
        while i < MAX_STACK_DEPTH {
            if i >= frames {
                // SAFETY: i < MAX_STACK_DEPTH, inside the scratch buffer.
                // Volatile: a loop of plain stores becomes a memset the
                // verifier rejects.
                unsafe { core::ptr::write_volatile(&raw mut (*buf).ips[i], 0) };
            }
            i += 1;
        }
        // SAFETY: buf is valid for reads of one StackBuf.
        if let Err(e) = STACKS.insert(&h, unsafe { &*buf }, 0) {
            return u64::from((-e) as u32);
        }
    }
    h
}

/// A kernel stack id, or the reason there is none, counting what is lost.
#[inline(always)]
pub(super) fn kern_stack_or_reason(id: Result<u64, i32>, window: u32) -> u64 {
    match id {
        Ok(id) => id,
        Err(e) => {
            // -EFAULT: no kernel stack (the task was in user mode).
            match -e {
                EFAULT => {}
                E2BIG | ENOMEM => lose(window, Loss::StackMapFull),
                _ => lose(window, Loss::KernStackError),
            }
            u64::from((-e) as u32)
        }
    }
}

/// The current task's kernel stack id, or the reason there is none.
#[inline(always)]
pub(super) fn kern_stack<C: EbpfContext>(ctx: &C, window: u32) -> u64 {
    kern_stack_or_reason(stack_id(ctx, 0), window)
}

/// The current task's user stack id, or the reason there is none: from
/// the unwind tables (`--unwind dwarf`) where the process's are loaded,
/// else the kernel's frame-pointer walk.
#[inline(always)]
pub(super) fn user_stack<C: EbpfContext>(ctx: &C, window: u32) -> u64 {
    user_stack_walk(ctx, window).0
}

/// [`user_stack`], and whether the stack may be remembered for the site:
/// not when the walk stopped for want of tables that are on their way (a
/// process not loaded yet, a PC in a mapping not read yet), or a thread
/// blocking again there would keep the short stack.
#[inline(always)]
pub(super) fn user_stack_walk<C: EbpfContext>(ctx: &C, window: u32) -> (u64, bool) {
    let mut cacheable = true;
    if config!(unwind_dwarf) != 0 {
        let task = Task::current();
        match unwind::walk_current(task.tgid(), window, config!(user_stack_depth)) {
            Ok(walked) => {
                if walked.unknown_mapping {
                    ask_tables(task, window);
                }
                let id = store_stack((walked.frames * 8) as i64);
                return (user_stack_or_reason(id, window), !walked.unknown_mapping);
            }
            // Not dropped: frame pointers meanwhile, and the tables asked
            // for.
            Err(NoWalk::NotLoaded) => {
                ask_tables(task, window);
                cacheable = false;
            }
            Err(NoWalk::NoUserStack) => {}
        }
    }
    let id = stack_id(ctx, u64::from(BPF_F_USER_STACK));
    (user_stack_or_reason(id, window), cacheable)
}

/// A user stack id, or the reason there is none, counting what is lost.
#[inline(always)]
fn user_stack_or_reason(id: Result<u64, i32>, window: u32) -> u64 {
    match id {
        Ok(id) => id,
        Err(e) => {
            match -e {
                E2BIG | ENOMEM => lose(window, Loss::StackMapFull),
                // With -a, kernel threads have no user stack: not a loss.
                EFAULT if config!(target_mode) == TargetMode::All as u32 => {}
                EFAULT if tasks::is_exiting() => return STACK_EXITING,
                _ => lose(window, Loss::UserStackMissing),
            }
            u64::from((-e) as u32)
        }
    }
}

/// Asks userspace to read the current process's mappings and load their tables
/// (at most every 50 ms per process).
#[inline(always)]
fn ask_tables(task: Task, window: u32) {
    let tgid = task.tgid();
    let now = now();
    // SAFETY: a valid map value, read only.
    if let Some(last) = unsafe { UNWIND_ASKED.get(&tgid) }
        && now.saturating_sub(*last) < 50_000_000
    {
        return;
    }
    let _ = UNWIND_ASKED.insert(&tgid, &now, 0);
    emit(EventKind::UnwindTables, task, 0, 0, Some(window));
}

/// Kernel and user stack ids of the current task, counting what is lost.
#[inline(always)]
pub(super) fn stacks<C: EbpfContext>(ctx: &C, window: u32) -> (u64, u64) {
    (kern_stack(ctx, window), user_stack(ctx, window))
}

/// The return address of the function blocking at `regs` (the current
/// task's ip, sp, bp): the one its unwind row gives (`--unwind dwarf`),
/// else the word at bp+8 (right only where the function keeps a frame
/// pointer); 0 if unreadable. Two blocks of a thread with the same four
/// are at the same site, with the same user call chain.
#[inline(always)]
pub(super) fn site_return(regs: [u64; 3]) -> u64 {
    let [ip, sp, bp] = regs;
    let from_tables = if config!(unwind_dwarf) != 0 {
        unwind::return_address(Task::current().tgid(), ip, sp, bp)
    } else {
        None
    };
    // SAFETY: a user read, checked by the helper.
    from_tables
        .unwrap_or_else(|| unsafe { bpf_probe_read_user((bp + 8) as *const u64) }.unwrap_or(0))
}

/// With `verify_stack_cache`: the stack `walked` anyway where `reused`
/// would have been taken, counting a difference.
#[inline(always)]
pub(super) fn verified(reused: u64, walked: u64, differs: Counter) -> u64 {
    if walked >= STACK_ID_MIN && walked != reused {
        count(differs);
    }
    walked
}
