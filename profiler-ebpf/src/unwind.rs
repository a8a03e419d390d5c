//! The user-stack unwinder: one walk, shared by every program that takes a
//! user stack, from the task's user registers through the unwind tables
//! userspace built from each file's `.eh_frame` (see
//! `profiler_common::unwind`).
//!
//! Each frame: find the PC's mapping (the last one found is kept, most
//! frames of a stack are in a few files), binary-search the file's rows,
//! compute the CFA, read the return address at CFA − 8 and the caller's
//! rbp if saved. A PC without a table or row takes one frame-pointer step
//! instead. The frames run in a `bpf_loop` callback, which the verifier
//! checks once rather than once per frame.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, pt_regs, task_struct},
    cty::c_void,
    helpers::{bpf_get_current_task_btf, bpf_probe_read_user, bpf_task_pt_regs, generated},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
};
use profiler_common::{
    record::MAX_STACK_DEPTH,
    unwind::{
        CFA_END, CFA_NONE, CFA_PLT, CFA_RBP, CFA_RSP, CFA_SIGNAL, MAX_PROC_MAPPINGS,
        MAX_UNWIND_RULES, MapRow, NO_ROOM, ProcMappings, RBP_AT_CFA, RBP_SAME, ROW_CHUNK_SHIFT,
        RowChunk, SIGFRAME_RBP, SIGFRAME_RIP, SIGFRAME_RSP, SITE_CHECK_BYTES, SITE_CHECK_FRAMES,
        STACK_CUT, UnwindMapping, UnwindRule, UnwindStop,
    },
};

use crate::record::STACK_SCRATCH;

/// Every file's rows, one run per file (userspace writes them through
/// mmap; it sets the size).
#[map]
pub static UNWIND_ROWS: Array<MapRow> = Array::with_max_entries(1, BPF_F_MMAPABLE);
/// The rules the rows name, each once (written through mmap).
#[map]
pub static UNWIND_RULES: Array<UnwindRule> =
    Array::with_max_entries(MAX_UNWIND_RULES, BPF_F_MMAPABLE);
/// Every file's chunk index into its rows (see `ROW_CHUNK_SHIFT`; written
/// through mmap; userspace sets the size).
#[map]
pub static UNWIND_CHUNKS: Array<RowChunk> = Array::with_max_entries(1, BPF_F_MMAPABLE);
/// Each known process's executable mappings, by tgid. Not preallocated:
/// a value is 8 KiB and most of the map stays empty.
#[map]
pub static UNWIND_PROCS: HashMap<u32, ProcMappings> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);
/// A forked child that has not exec'd runs its parent's image: its tgid
/// names the process whose mappings it uses (an 8 KiB copy per fork cost
/// ~14 µs in `task_fork`; this costs a 4-byte insert).
#[map]
pub static UNWIND_ALIAS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// The process whose mappings `tgid` uses: its own, else its parent's (or
/// an earlier ancestor's) while it has not exec'd.
#[inline(always)]
pub fn owner_of(tgid: u32) -> Option<u32> {
    // SAFETY: valid map values, read only.
    unsafe {
        if UNWIND_PROCS.get(&tgid).is_some() {
            return Some(tgid);
        }
        let owner = *UNWIND_ALIAS.get(&tgid)?;
        UNWIND_PROCS.get(&owner).map(|_| owner)
    }
}

/// Per window: how many walks ended for each reason, and the frames found
/// each way (indexed by `UnwindStop`).
#[map]
pub static UNWIND_STOPS: PerCpuHashMap<u32, [u64; UnwindStop::COUNT as usize]> =
    PerCpuHashMap::with_max_entries(4096, 0);

/// Highest user address + 1 on x86-64 (4-level paging; 5-level extends
/// it, and a larger address is rejected by the read anyway).
const USER_END: u64 = 0x00ff_ffff_ffff_f000;
/// Per CPU, direct-mapped: the row last found for a file address. Most
/// return addresses recur from stack to stack (main loops, event
/// dispatch, thread entries), and a hit costs one read where a search
/// reads the chunk index and several rows, each most often a cache miss
/// (about 150 ns apiece on a VM). Rows never change once written, so
/// entries are never invalidated.
#[map]
static ROW_CACHE: PerCpuArray<RowCacheEntry> =
    PerCpuArray::with_max_entries(1 << ROW_CACHE_BITS, 0);
const ROW_CACHE_BITS: u32 = 12;

#[repr(C)]
#[derive(Clone, Copy)]
struct RowCacheEntry {
    /// `(rows_start + 1) << 32 | file address` (0: empty).
    tag: u64,
    rule: UnwindRule,
}

/// Row searches: enough for 2^24 rows in one file.
const ROW_STEPS: u32 = 24;
/// Mapping searches: enough for `MAX_PROC_MAPPINGS`.
const MAPPING_STEPS: u32 = 9;
/// Not yet stopped.
const RUNNING: u32 = u32::MAX;

/// The walk's state, in a per-CPU map value rather than on the stack: the
/// verifier knows nothing of a map value's contents, so the frame count
/// and flags are not constants to it and the step converges after a few
/// passes instead of being verified once per frame.
#[map]
static UNWIND_WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Walk {
    ip: u64,
    sp: u64,
    bp: u64,
    /// The mapping the last PC was in, and the one before it (stacks go
    /// back and forth between a few files: libvirt, glib, libc).
    map: UnwindMapping,
    map2: UnwindMapping,
    tgid: u32,
    /// Frames written.
    n: u32,
    max: u32,
    /// `UnwindStop`, or `RUNNING`.
    stop: u32,
    /// Nonzero: `ip` is exact (frame 0, or the interrupted PC of a signal
    /// frame), not a return address.
    exact: u32,
    /// Nonzero: `bp` holds the frame's rbp.
    bp_ok: u32,
    dwarf: u32,
    fp: u32,
    /// A mapping search's bounds, kept here so that each step reads them
    /// from the map (see `find_mapping`).
    lo: u32,
    hi: u32,
    /// Frame 0's sp, and where the first frames' return addresses sit
    /// above it (16-bit offsets, packed; see `SITE_CHECK_FRAMES`).
    base_sp: u64,
    check: [u64; 2],
    /// Nonzero while every frame so far had its slot recorded.
    check_open: u32,
    /// Nonzero once a PC was in no known mapping (a `dlopen` since the
    /// mappings were read), wherever the walk then ended.
    unknown_mapping: u32,
}

/// How a walk went.
pub struct Walked {
    /// Frames in `STACK_SCRATCH`.
    pub frames: usize,
    /// A PC was in no mapping the unwinder knows: the process's mappings
    /// should be read again (a `dlopen`).
    pub unknown_mapping: bool,
}

/// Why no walk was made.
pub enum NoWalk {
    /// The task has no user registers (a kernel thread) or they are not
    /// user addresses.
    NoUserStack,
    /// No mappings are loaded for the process yet.
    NotLoaded,
}

/// Walks the current task's user stack into `STACK_SCRATCH`, at most
/// `max` frames, counting why it stopped in `window`.
#[inline(always)]
pub fn walk_current(tgid: u32, window: u32, max: u32) -> Result<Walked, NoWalk> {
    let r = hvprof_unwind_walk(tgid, window, max);
    match r {
        WALK_NOT_LOADED => Err(NoWalk::NotLoaded),
        r if r < 0 => Err(NoWalk::NoUserStack),
        r => Ok(Walked {
            frames: (r & 0xffff) as usize,
            unknown_mapping: r & WALK_UNKNOWN_MAPPING != 0,
        }),
    }
}

const WALK_NOT_LOADED: i64 = -1;
const WALK_NO_USER_STACK: i64 = -2;
const WALK_UNKNOWN_MAPPING: i64 = 1 << 16;

/// [`walk_current`] as a global BPF function (exported to the linker by
/// `build.rs`): the verifier checks a global function once per program,
/// on its own, instead of again at every place a program walks (the lock
/// end walks at up to four). Returns the frame count, with
/// `WALK_UNKNOWN_MAPPING` set if a PC was in no known mapping, or
/// `WALK_NOT_LOADED` / `WALK_NO_USER_STACK`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn hvprof_unwind_walk(tgid: u32, window: u32, max: u32) -> i64 {
    match walk(tgid, window, max) {
        Ok(w) => {
            w.frames as i64
                | if w.unknown_mapping {
                    WALK_UNKNOWN_MAPPING
                } else {
                    0
                }
        }
        Err(NoWalk::NotLoaded) => WALK_NOT_LOADED,
        Err(NoWalk::NoUserStack) => WALK_NO_USER_STACK,
    }
}

/// The saved user ip, sp and bp of `task` (a BTF task pointer; 0s if
/// unreadable).
#[inline(always)]
pub fn user_regs(task: *mut task_struct) -> [u64; 3] {
    // SAFETY: the helper takes the task's BTF pointer; a BTF pointer: plain
    // loads (the verifier makes them faulting loads), no helper call each.
    unsafe {
        let regs = bpf_task_pt_regs(task) as *const pt_regs;
        [
            core::ptr::read_volatile(&raw const (*regs).rip),
            core::ptr::read_volatile(&raw const (*regs).rsp),
            core::ptr::read_volatile(&raw const (*regs).rbp),
        ]
    }
}

#[inline(always)]
fn walk(tgid: u32, window: u32, max: u32) -> Result<Walked, NoWalk> {
    // SAFETY: the helper has no preconditions.
    let [ip, sp, bp] = user_regs(unsafe { bpf_get_current_task_btf() }.cast());
    if ip == 0 || ip >= USER_END || sp == 0 {
        return Err(NoWalk::NoUserStack);
    }
    let Some(owner) = owner_of(tgid) else {
        count_stop(window, UnwindStop::NotLoaded, 0, 0);
        return Err(NoWalk::NotLoaded);
    };
    let Some(w) = start(owner, ip, sp, bp, max) else {
        return Err(NoWalk::NoUserStack);
    };
    // SAFETY: this CPU's walk state, just set up.
    unsafe {
        run(MAX_STACK_DEPTH as u32 + 1);
        if (*w).stop == RUNNING {
            (*w).stop = UnwindStop::FrameLimit as u32;
        }
        let stop = (*w).stop;
        count_stop_raw(window, stop, (*w).dwarf, (*w).fp);
        if verify::due() {
            verify::send(ip, sp, bp);
        }
        // A stack that does not reach its entry says so, and why, in its
        // outermost frame (the last frame gives way at the frame limit).
        if stop != UnwindStop::Complete as u32 {
            // One conversion to usize: the verifier must see the bound
            // checked on the register that indexes.
            let n = (*w).n as usize;
            let at = if n >= MAX_STACK_DEPTH {
                MAX_STACK_DEPTH - 1
            } else {
                n
            };
            if let Some(buf) = STACK_SCRATCH.get_ptr_mut(0)
                && at < MAX_STACK_DEPTH
            {
                (*buf).ips[at] = STACK_CUT + u64::from(stop);
                (*w).n = at as u32 + 1;
            }
        }
        Ok(Walked {
            frames: (*w).n as usize,
            unknown_mapping: (*w).unknown_mapping != 0,
        })
    }
}

/// The return address of the function at `ip` (the current task's frame
/// 0, with its `sp` and `bp`), from its unwind row: with ip, sp and bp, the
/// key of a blocking site. `None` if the tables have nothing for it.
#[inline(always)]
pub fn return_address(tgid: u32, ip: u64, sp: u64, bp: u64) -> Option<u64> {
    let ret = hvprof_unwind_return(tgid, ip, sp, bp);
    (ret != 0).then_some(ret)
}

/// [`return_address`] as a global BPF function (see
/// [`hvprof_unwind_walk`]); 0 for none.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn hvprof_unwind_return(tgid: u32, ip: u64, sp: u64, bp: u64) -> u64 {
    let Some(owner) = owner_of(tgid) else {
        return 0;
    };
    let Some(w) = start(owner, ip, sp, bp, 1) else {
        return 0;
    };
    // SAFETY: this CPU's walk state, just set up.
    unsafe {
        run(1);
        if (*w).stop == RUNNING && (*w).dwarf == 1 {
            (*w).ip
        } else {
            0
        }
    }
}

/// Sets up this CPU's walk state.
#[inline(always)]
fn start(tgid: u32, ip: u64, sp: u64, bp: u64, max: u32) -> Option<*mut Walk> {
    let w = UNWIND_WALK.get_ptr_mut(0)?;
    // SAFETY: this CPU's walk state. A walk is not interrupted by another
    // on this CPU: a program of hvprof's does not start while another runs
    // there (`record::common::Running`), and sched_switch runs with
    // interrupts off. (The same holds for `STACK_SCRATCH`.)
    unsafe {
        *w = Walk {
            ip,
            sp,
            bp,
            map: UnwindMapping::EMPTY,
            map2: UnwindMapping::EMPTY,
            tgid,
            n: 0,
            max: if max == 0 || max as usize > MAX_STACK_DEPTH {
                MAX_STACK_DEPTH as u32
            } else {
                max
            },
            stop: RUNNING,
            exact: 1,
            bp_ok: 1,
            dwarf: 0,
            fp: 0,
            lo: 0,
            hi: 0,
            base_sp: sp,
            check: [0; 2],
            check_open: 1,
            unknown_mapping: 0,
        };
    }
    Some(w)
}

/// Runs up to `frames` steps of the walk set up by `start`.
#[inline(always)]
fn run(frames: u32) {
    // SAFETY: `step` has the callback signature bpf_loop expects; it finds
    // the state itself.
    unsafe {
        generated::bpf_loop(frames, step as *mut c_void, core::ptr::null_mut(), 0);
    }
}

#[inline(always)]
fn count_stop(window: u32, stop: UnwindStop, dwarf: u32, fp: u32) {
    count_stop_raw(window, stop as u32, dwarf, fp);
}

#[inline(always)]
fn count_stop_raw(window: u32, stop: u32, dwarf: u32, fp: u32) {
    let counts = match UNWIND_STOPS.get_ptr_mut(&window) {
        Some(c) => c,
        None => {
            let zero = [0u64; UnwindStop::COUNT as usize];
            if UNWIND_STOPS.insert(&window, &zero, 0).is_err() {
                return;
            }
            match UNWIND_STOPS.get_ptr_mut(&window) {
                Some(c) => c,
                None => return,
            }
        }
    };
    // SAFETY: this CPU's value; the indices are checked.
    unsafe {
        if stop < UnwindStop::COUNT {
            (*counts)[stop as usize] += 1;
        }
        (*counts)[UnwindStop::FramesDwarf as usize] += u64::from(dwarf);
        (*counts)[UnwindStop::FramesFp as usize] += u64::from(fp);
    }
}

#[inline(always)]
fn read_user(addr: u64) -> Option<u64> {
    // SAFETY: a user address, read with the checked helper.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

#[inline(always)]
fn read_user_pair(addr: u64) -> Option<[u64; 2]> {
    // SAFETY: a user address, read with the checked helper.
    unsafe { bpf_probe_read_user(addr as *const [u64; 2]) }.ok()
}

/// Ends the walk.
///
/// Every function below takes the walk state as a raw pointer (`*mut
/// Walk`, this CPU's `UNWIND_WALK` value), never `&mut`: a search step
/// changes it while `bpf_loop` runs, which a `&mut` would let the compiler
/// assume cannot happen.
#[inline(always)]
unsafe fn stop(w: *mut Walk, why: UnwindStop) -> i64 {
    // SAFETY: (all functions below) w is this CPU's walk state.
    unsafe { (*w).stop = why as u32 };
    1
}

/// One frame (a `bpf_loop` callback: 0 goes on, 1 stops).
#[inline(never)]
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(w) = UNWIND_WALK.get_ptr_mut(0) else {
        return 1;
    };
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: w is this CPU's walk state, buf its stack scratch.
    unsafe {
        let n = (*w).n;
        if n >= (*w).max || n as usize >= MAX_STACK_DEPTH {
            return stop(w, UnwindStop::FrameLimit);
        }
        (*buf).ips[n as usize] = (*w).ip;
        (*w).n = n + 1;
        // A return address is after its call: look up the call itself.
        let leaf = (*w).exact != 0;
        let pc = if leaf { (*w).ip } else { (*w).ip - 1 };
        (*w).exact = 0;
        if pc < (*w).map.start || pc >= (*w).map.end {
            let last = (*w).map;
            if pc >= (*w).map2.start && pc < (*w).map2.end {
                (*w).map = (*w).map2;
            } else if !find_mapping(w, pc) {
                (*w).unknown_mapping = 1;
                return fp_step(w, UnwindStop::NoMapping);
            }
            (*w).map2 = last;
        }
        if (*w).map.rows_len == 0 {
            // Userspace is asked again too: JIT code (QEMU's TCG buffer) is
            // registered after its mapping was read.
            (*w).unknown_mapping = 1;
            let why = if (*w).map.chunk_base == NO_ROOM {
                UnwindStop::TablesFull
            } else {
                UnwindStop::NoTable
            };
            return no_info_step(w, why, leaf);
        }
        let rel = pc.wrapping_sub((*w).map.bias);
        if rel > u64::from(u32::MAX) {
            return no_info_step(w, UnwindStop::NoRow, leaf);
        }
        let Some(row) = cached_row(w, rel as u32) else {
            return no_info_step(w, UnwindStop::NoRow, leaf);
        };
        let cfa = match row.cfa_type {
            CFA_RSP => (*w).sp.wrapping_add(row.cfa_offset as i64 as u64),
            CFA_RBP => {
                if (*w).bp_ok == 0 {
                    return stop(w, UnwindStop::Unsupported);
                }
                (*w).bp.wrapping_add(row.cfa_offset as i64 as u64)
            }
            CFA_PLT => {
                let pushed = if ((*w).ip & 15) >= row.cfa_offset as u64 {
                    8
                } else {
                    0
                };
                (*w).sp + 8 + pushed
            }
            CFA_SIGNAL => return signal_frame(w),
            CFA_END => return stop(w, UnwindStop::Complete),
            CFA_NONE => return no_info_step(w, UnwindStop::NoRow, leaf),
            _ => return stop(w, UnwindStop::Unsupported),
        };
        // The caller's rbp saved right below the return address (every
        // function that pushes rbp first) comes in the same read: helper
        // calls are most of a frame's cost.
        let ra = if row.rbp_type == RBP_AT_CFA && row.rbp_offset == -16 {
            let Some([bp, ra]) = read_user_pair(cfa.wrapping_sub(16)) else {
                return stop(w, UnwindStop::ReadFault);
            };
            (*w).bp = bp;
            ra
        } else {
            let Some(ra) = read_user(cfa.wrapping_sub(8)) else {
                return stop(w, UnwindStop::ReadFault);
            };
            match row.rbp_type {
                RBP_AT_CFA => {
                    let at = cfa.wrapping_add(row.rbp_offset as i64 as u64);
                    let Some(bp) = read_user(at) else {
                        return stop(w, UnwindStop::ReadFault);
                    };
                    (*w).bp = bp;
                }
                RBP_SAME => {}
                _ => (*w).bp_ok = 0,
            }
            ra
        };
        if ra == 0 || cfa <= (*w).sp {
            return stop(w, UnwindStop::ZeroReturn);
        }
        note_slot(w, cfa - 8);
        (*w).sp = cfa;
        (*w).ip = ra;
        (*w).dwarf += 1;
        0
    }
}

/// A signal trampoline: the interrupted registers are in the `ucontext` at
/// rsp; the interrupted PC is exact.
#[inline(always)]
unsafe fn signal_frame(w: *mut Walk) -> i64 {
    unsafe {
        let sp = (*w).sp;
        let (Some(ip), Some(nsp), Some(bp)) = (
            read_user(sp + SIGFRAME_RIP),
            read_user(sp + SIGFRAME_RSP),
            read_user(sp + SIGFRAME_RBP),
        ) else {
            return stop(w, UnwindStop::ReadFault);
        };
        if ip == 0 {
            return stop(w, UnwindStop::ZeroReturn);
        }
        // The interrupted frame's registers come from the signal frame, not
        // from a slot: the check stops here.
        (*w).check_open = 0;
        (*w).ip = ip;
        (*w).sp = nsp;
        (*w).bp = bp;
        (*w).bp_ok = 1;
        (*w).exact = 1;
        (*w).dwarf += 1;
        0
    }
}

/// A PC the tables say nothing of. Where it is the exact PC of the
/// innermost frame (or of a signal's interrupted frame), it is most often
/// at a function's first instruction or in an assembly stub without CFI
/// (`_fini`, the gap around `clone3`'s `syscall`): the return address is at
/// [rsp]. It is taken if it lies in a mapping with tables; otherwise, and
/// for return addresses, one frame-pointer step.
#[inline(always)]
unsafe fn no_info_step(w: *mut Walk, why: UnwindStop, leaf: bool) -> i64 {
    unsafe {
        if leaf {
            let sp = (*w).sp;
            if let Some(ra) = read_user(sp)
                && ra > 1
                && ra < USER_END
                && find_mapping(w, ra - 1)
                && (*w).map.rows_len != 0
            {
                note_slot(w, sp);
                (*w).sp = sp + 8;
                (*w).ip = ra;
                (*w).fp += 1;
                return 0;
            }
        }
        fp_step(w, why)
    }
}

/// One frame-pointer step, where the tables have nothing for the PC;
/// `why` ends the walk if there is no frame to follow.
#[inline(always)]
unsafe fn fp_step(w: *mut Walk, why: UnwindStop) -> i64 {
    unsafe {
        let bp = (*w).bp;
        // rbp == rsp is a frame too: just after `mov %rsp,%rbp; call`.
        if (*w).bp_ok == 0 || bp < (*w).sp || bp >= USER_END {
            return stop(w, why);
        }
        let (Some(ra), Some(next_bp)) = (read_user(bp + 8), read_user(bp)) else {
            return stop(w, UnwindStop::ReadFault);
        };
        if ra == 0 {
            return stop(w, UnwindStop::FpEnd);
        }
        note_slot(w, bp + 8);
        (*w).sp = bp + 16;
        (*w).bp = next_bp;
        (*w).ip = ra;
        (*w).fp += 1;
        0
    }
}

/// Records where frame `n - 1`'s return address was read, for the site
/// check, while the first frames all have theirs within reach.
#[inline(always)]
unsafe fn note_slot(w: *mut Walk, slot: u64) {
    unsafe {
        let i = (*w).n as u64 - 1;
        let off = slot.wrapping_sub((*w).base_sp);
        if (*w).check_open == 0 || i >= SITE_CHECK_FRAMES as u64 {
            return;
        }
        if off >= SITE_CHECK_BYTES as u64 || off & 7 != 0 {
            (*w).check_open = 0;
            return;
        }
        // Kept as the word index + 1: 0 ends the list.
        let word = (i / 4) as usize & 1;
        (*w).check[word] |= (off / 8 + 1) << ((i % 4) * 16);
    }
}

/// The slot of the site check's frame `i` (`i < SITE_CHECK_FRAMES`): the
/// word index above sp + 1, 0 for none.
#[inline(always)]
fn check_slot(check: [u64; 2], i: usize) -> u64 {
    let packed = if i < 4 { check[0] } else { check[1] };
    (packed >> ((i % 4) * 16)) & 0xffff
}

/// One step of the hash of the return addresses a site check expects.
#[inline(always)]
fn check_hash_step(h: u64, ret: u64) -> u64 {
    (h ^ ret).wrapping_mul(0x0000_0100_0000_01b3)
}

const CHECK_HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// Where the last walk found its first return addresses (a site's
/// `user_check`; 0s if none were recorded), and the hash of those return
/// addresses (`user_check_hash`), from the walk still in `STACK_SCRATCH`.
#[inline(always)]
pub fn last_site_check() -> ([u64; 2], u64) {
    let (Some(w), Some(buf)) = (UNWIND_WALK.get_ptr_mut(0), STACK_SCRATCH.get_ptr_mut(0)) else {
        return ([0; 2], 0);
    };
    // SAFETY: this CPU's walk state and scratch, read after the walk.
    unsafe {
        let check = (*w).check;
        let mut h = CHECK_HASH_SEED;
        let mut i = 0;
        while i < SITE_CHECK_FRAMES {
            if check_slot(check, i) == 0 {
                break;
            }
            // Frame i's return address is frame i + 1's ip.
            h = check_hash_step(h, (*buf).ips[i + 1]);
            i += 1;
        }
        (check, h)
    }
}

/// Per CPU: the stack words above sp that a site check compares.
#[map]
static SITE_CHECK_SCRATCH: PerCpuArray<[u64; SITE_CHECK_BYTES / 8]> =
    PerCpuArray::with_max_entries(1, 0);

/// Whether the current task, blocking again at a site, still has the
/// return addresses its walk found (`hash`, from `last_site_check`) in the
/// same slots (`check`). One user read and no map lookup: the stack is not
/// looked up. A global BPF function (exported by `build.rs`): verified
/// once per program.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn hvprof_site_matches(hash: u64, sp: u64, check0: u64, check1: u64) -> u64 {
    let check = [check0, check1];
    if check0 == 0 {
        // Nothing recorded (frame pointers, or a walk of one frame).
        return 1;
    }
    let Some(words) = SITE_CHECK_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // The farthest slot decides how much to read: near the top of a
    // thread's stack a fixed 2 KiB read could run past its end.
    let mut far = 0u64;
    let mut i = 0;
    while i < SITE_CHECK_FRAMES {
        let slot = check_slot(check, i);
        if slot > far {
            far = slot;
        }
        i += 1;
    }
    // Words 0..far (the farthest slot's index + 1).
    let len = (far * 8) & (SITE_CHECK_BYTES as u64 * 2 - 1);
    if len == 0 || len > SITE_CHECK_BYTES as u64 {
        return 0;
    }
    // SAFETY: a user read of at most the scratch's size, checked by the
    // helper.
    let read =
        unsafe { generated::bpf_probe_read_user(words.cast(), len as u32, sp as *const c_void) };
    if read != 0 {
        return 0;
    }
    let mut h = CHECK_HASH_SEED;
    let mut i = 0;
    while i < SITE_CHECK_FRAMES {
        let slot = check_slot(check, i);
        if slot == 0 {
            break;
        }
        let word = (slot - 1) as usize & (SITE_CHECK_BYTES / 8 - 1);
        // SAFETY: word < the scratch's length.
        h = check_hash_step(h, unsafe { (*words)[word] });
        i += 1;
    }
    u64::from(h == hash)
}

/// Finds the mapping of `pc` in the process's sorted mappings into
/// `map`: a plain bounded loop (no callback per halving, no map lookup per
/// step). The bounds go through the walk state's map value at each step,
/// where the verifier knows nothing of them: it checks one step and prunes
/// the rest, instead of following every path of the search with the
/// bounds in registers.
#[inline(always)]
unsafe fn find_mapping(w: *mut Walk, pc: u64) -> bool {
    unsafe {
        let Some(procs) = UNWIND_PROCS.get(&(*w).tgid) else {
            return false;
        };
        core::ptr::write_volatile(&raw mut (*w).lo, 0);
        core::ptr::write_volatile(&raw mut (*w).hi, procs.count);
        let mut i = 0;
        while i < MAPPING_STEPS {
            let lo = core::ptr::read_volatile(&raw const (*w).lo);
            let hi = core::ptr::read_volatile(&raw const (*w).hi);
            if lo >= hi {
                break;
            }
            let mid = lo + (hi - lo) / 2;
            // Masked: the verifier must see the index in range.
            let Some(m) = procs.mappings.get((mid as usize) & (MAX_PROC_MAPPINGS - 1)) else {
                return false;
            };
            if m.start <= pc {
                core::ptr::write_volatile(&raw mut (*w).lo, mid + 1);
            } else {
                core::ptr::write_volatile(&raw mut (*w).hi, mid);
            }
            i += 1;
        }
        // The last mapping starting at or below pc.
        let lo = core::ptr::read_volatile(&raw const (*w).lo);
        if lo == 0 {
            return false;
        }
        let Some(m) = procs
            .mappings
            .get(((lo - 1) as usize) & (MAX_PROC_MAPPINGS - 1))
        else {
            return false;
        };
        if pc < m.start || pc >= m.end {
            return false;
        }
        (*w).map = *m;
        true
    }
}

/// [`find_row`] through `ROW_CACHE`.
#[inline(always)]
unsafe fn cached_row(w: *mut Walk, pc: u32) -> Option<UnwindRule> {
    unsafe {
        let tag = ((u64::from((*w).map.rows_start) + 1) << 32) | u64::from(pc);
        let slot = (tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - ROW_CACHE_BITS)) as u32;
        let entry = ROW_CACHE.get_ptr_mut(slot);
        if let Some(e) = entry
            && (*e).tag == tag
        {
            return Some((*e).rule);
        }
        let rule = *UNWIND_RULES.get(find_row(w, pc)?.rule)?;
        if let Some(e) = entry {
            (*e).tag = tag;
            (*e).rule = rule;
        }
        Some(rule)
    }
}

/// The last row at or below `pc` (a file address) of the file of `map`:
/// a binary search of the rows its chunk index names (all the file's rows
/// without one).
#[inline(always)]
unsafe fn find_row(w: *mut Walk, pc: u32) -> Option<MapRow> {
    unsafe {
        let map = &raw const (*w).map;
        let rows_len = (*map).rows_len;
        let (mut lo, mut hi) = (0u32, rows_len);
        if (*map).chunks_len != 0 {
            let chunk = (pc >> ROW_CHUNK_SHIFT).wrapping_sub((*map).chunk_base);
            if chunk >= (*map).chunks_len {
                // Below the first row, or past the last row's chunk (the
                // last row covers it).
                if pc >> ROW_CHUNK_SHIFT < (*map).chunk_base {
                    return None;
                }
                lo = rows_len - 1;
            } else {
                let c = UNWIND_CHUNKS.get((*map).chunks_start.wrapping_add(chunk))?;
                lo = c.lo;
                hi = if c.hi < rows_len { c.hi } else { rows_len };
            }
        }
        // A plain bounded loop: the step is verified once (it runs inside
        // a global function), and a loop costs no callback per halving.
        let start = (*map).rows_start;
        let mut i = 0;
        while i < ROW_STEPS {
            if lo >= hi {
                break;
            }
            let mid = lo + (hi - lo) / 2;
            let row = UNWIND_ROWS.get(start.wrapping_add(mid))?;
            if row.pc <= pc {
                lo = mid + 1;
            } else {
                hi = mid;
            }
            i += 1;
        }
        if lo == 0 {
            return None;
        }
        UNWIND_ROWS.get(start.wrapping_add(lo - 1)).copied()
    }
}

/// `--verify-unwind`: every Nth walk is sent to userspace with the
/// registers it started from and a copy of the user stack, to be unwound
/// again there by another unwinder and compared.
mod verify {
    use aya_ebpf::{
        bindings::BPF_RB_NO_WAKEUP,
        cty::c_void,
        helpers::{bpf_get_current_pid_tgid, generated},
        macros::map,
        maps::{PerCpuArray, RingBuf},
    };
    use profiler_common::unwind::{UnwindSample, VERIFY_STACK_BYTES};

    use super::UNWIND_WALK;
    use crate::record::STACK_SCRATCH;

    /// The samples (about 17 KiB each), drained by userspace at its tick.
    #[map]
    static UNWIND_VERIFY: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

    /// Walks on this CPU since the last one sent.
    #[map]
    static UNWIND_VERIFY_TICK: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

    /// Whether this walk is to be sent. Without `--verify-unwind` the
    /// verifier knows the read-only config is 0 and skips the rest.
    #[inline(always)]
    pub(super) fn due() -> bool {
        // SAFETY: CONFIG is a plain static set before load.
        let every =
            unsafe { core::ptr::read_volatile(&raw const crate::record::CONFIG.verify_unwind) };
        if every == 0 {
            return false;
        }
        let Some(tick) = UNWIND_VERIFY_TICK.get_ptr_mut(0) else {
            return false;
        };
        // SAFETY: this CPU's counter.
        unsafe {
            *tick += 1;
            if *tick < every {
                return false;
            }
            *tick = 0;
        }
        true
    }

    /// Sends the walk just made (its frames in `STACK_SCRATCH`, its
    /// count and stop in `UNWIND_WALK`), which started from `ip`, `sp` and
    /// `bp`, with the user stack above `sp`. A call of its own: its code is
    /// in each program once, not at every place that walks.
    #[inline(never)]
    pub(super) fn send(ip: u64, sp: u64, bp: u64) {
        let (Some(w), Some(buf)) = (UNWIND_WALK.get_ptr(0), STACK_SCRATCH.get_ptr(0)) else {
            return;
        };
        // Full: this sample is skipped; the next due one is tried again.
        let Some(mut entry) = UNWIND_VERIFY.reserve::<UnwindSample>(0) else {
            return;
        };
        let s = entry.as_mut_ptr();
        // SAFETY: s is the reserved record, w and buf this CPU's walk state
        // and stack scratch; the copies are checked by the helpers. No
        // return before the record is submitted or discarded.
        let copied = unsafe {
            (*s).tgid = (*w).tgid;
            (*s).pid = bpf_get_current_pid_tgid() as u32;
            (*s).n = (*w).n;
            (*s).stop = (*w).stop;
            (*s).pad = 0;
            (*s).ip = ip;
            (*s).sp = sp;
            (*s).bp = bp;
            generated::bpf_probe_read_kernel(
                (&raw mut (*s).ips).cast(),
                size_of_val(&(*buf).ips) as u32,
                (&raw const (*buf).ips).cast(),
            );
            let copied = copy_stack((&raw mut (*s).stack).cast(), sp);
            (*s).copied = copied;
            copied
        };
        if copied == 0 {
            entry.discard(0);
        } else {
            entry.submit(u64::from(BPF_RB_NO_WAKEUP));
        }
    }

    /// Copies as much of the user stack above `sp` as can be read, up to
    /// `VERIFY_STACK_BYTES`, into `dst`; returns the bytes copied (0:
    /// none). A read fails whole where it crosses the end of the stack's
    /// mapping (a shallow stack, near its top), so smaller copies are
    /// tried after a larger one failed, in steps of an eighth at each
    /// power of two: what is lost at the top is at most an eighth of
    /// the stack, mostly the environment strings above the outermost
    /// frame. One read per size, each a constant as the helper needs, and
    /// no path joins another: paths that joined after reads at several
    /// offsets made the program too large for the verifier.
    #[inline(always)]
    unsafe fn copy_stack(dst: *mut u8, sp: u64) -> u32 {
        macro_rules! first_that_reads {
            ($($size:literal)*) => {
                $(
                    // SAFETY: dst holds VERIFY_STACK_BYTES bytes, at least
                    // $size.
                    if unsafe { read(dst, $size, sp) } {
                        return $size;
                    }
                )*
            };
        }
        const _: () = assert!(VERIFY_STACK_BYTES == 16384, "the sizes below");
        first_that_reads!(
            16384 14336 12288 10240
            8192 7168 6144 5120
            4096 3584 3072 2560
            2048 1792 1536 1280
            1024 512 256
        );
        0
    }

    /// One read of `size` bytes at `sp` into `dst`.
    #[inline(always)]
    unsafe fn read(dst: *mut u8, size: u32, sp: u64) -> bool {
        // SAFETY: the caller's dst holds `size` bytes; the source is a user
        // address, read by the checked helper.
        unsafe {
            generated::bpf_probe_read_user(dst.cast::<c_void>(), size, sp as *const c_void) == 0
        }
    }
}
