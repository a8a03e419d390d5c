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
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, pt_regs},
    cty::c_void,
    helpers::{bpf_get_current_task_btf, bpf_probe_read_user, bpf_task_pt_regs, generated},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
};
use profiler_common::{
    record::MAX_STACK_DEPTH,
    unwind::{
        CFA_END, CFA_NONE, CFA_PLT, CFA_RBP, CFA_RSP, CFA_SIGNAL, MAX_PROC_MAPPINGS, ProcMappings,
        RBP_AT_CFA, RBP_SAME, SIGFRAME_RBP, SIGFRAME_RIP, SIGFRAME_RSP, UnwindMapping, UnwindRow,
        UnwindStop,
    },
};

use crate::record::STACK_SCRATCH;

/// Every file's rows, one run per file (userspace writes them through
/// mmap; it sets the size).
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, BPF_F_MMAPABLE);
/// Each known process's executable mappings, by tgid. Not preallocated:
/// a value is 8 KiB and most of the map stays empty.
#[map]
pub static UNWIND_PROCS: HashMap<u32, ProcMappings> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);
/// Per window: how many walks ended for each reason, and the frames found
/// each way (indexed by `UnwindStop`).
#[map]
pub static UNWIND_STOPS: PerCpuHashMap<u32, [u64; UnwindStop::COUNT as usize]> =
    PerCpuHashMap::with_max_entries(4096, 0);

/// Highest user address + 1 on x86-64 (4-level paging; 5-level extends
/// it, and a larger address is rejected by the read anyway).
const USER_END: u64 = 0x00ff_ffff_ffff_f000;
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
    /// The mapping the last PC was in.
    map: UnwindMapping,
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
    /// A binary search under way: the PC (file-relative for rows) and the
    /// bounds, kept here so that each search step reads them from the map.
    pc: u64,
    lo: u32,
    hi: u32,
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
    // SAFETY: the current task's BTF pointer; plain loads of its saved user
    // registers (the verifier makes them faulting loads).
    let (ip, sp, bp) = unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        (
            core::ptr::read_volatile(&raw const (*regs).rip),
            core::ptr::read_volatile(&raw const (*regs).rsp),
            core::ptr::read_volatile(&raw const (*regs).rbp),
        )
    };
    if ip == 0 || ip >= USER_END || sp == 0 {
        return Err(NoWalk::NoUserStack);
    }
    // SAFETY: only presence is tested.
    if unsafe { UNWIND_PROCS.get(&tgid) }.is_none() {
        count_stop(window, UnwindStop::NotLoaded, 0, 0);
        return Err(NoWalk::NotLoaded);
    }
    let Some(w) = start(tgid, ip, sp, bp, max) else {
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
        Ok(Walked {
            frames: (*w).n as usize,
            unknown_mapping: stop == UnwindStop::NoMapping as u32,
        })
    }
}

/// The return address of the function at `ip` (the current task's frame
/// 0, with its `sp` and `bp`), from its unwind row: with ip, sp and bp, the
/// key of a blocking site. `None` if the tables have nothing for it.
#[inline(always)]
pub fn return_address(tgid: u32, ip: u64, sp: u64, bp: u64) -> Option<u64> {
    let w = start(tgid, ip, sp, bp, 1)?;
    // SAFETY: this CPU's walk state, just set up.
    unsafe {
        run(1);
        ((*w).stop == RUNNING && (*w).dwarf == 1).then_some((*w).ip)
    }
}

/// Sets up this CPU's walk state.
#[inline(always)]
fn start(tgid: u32, ip: u64, sp: u64, bp: u64, max: u32) -> Option<*mut Walk> {
    let w = UNWIND_WALK.get_ptr_mut(0)?;
    // SAFETY: this CPU's walk state. A walk is never interrupted by
    // another: the programs that walk do not run nested on one CPU (the
    // cpu-clock sample, in an interrupt, skips while one runs: see
    // `run`).
    unsafe {
        *w = Walk {
            ip,
            sp,
            bp,
            map: UnwindMapping::EMPTY,
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
            pc: 0,
            lo: 0,
            hi: 0,
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
        let pc = if (*w).exact != 0 {
            (*w).ip
        } else {
            (*w).ip - 1
        };
        (*w).exact = 0;
        if (pc < (*w).map.start || pc >= (*w).map.end) && !find_mapping(w, pc) {
            return fp_step(w, UnwindStop::NoMapping);
        }
        if (*w).map.rows_len == 0 {
            return fp_step(w, UnwindStop::NoTable);
        }
        let rel = pc.wrapping_sub((*w).map.bias);
        if rel > u64::from(u32::MAX) {
            return fp_step(w, UnwindStop::NoRow);
        }
        let Some(row) = find_row(w, rel as u32) else {
            return fp_step(w, UnwindStop::NoRow);
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
            CFA_NONE => return fp_step(w, UnwindStop::NoRow),
            _ => return stop(w, UnwindStop::Unsupported),
        };
        let Some(ra) = read_user(cfa.wrapping_sub(8)) else {
            return stop(w, UnwindStop::ReadFault);
        };
        match row.rbp_type {
            RBP_AT_CFA => {
                let Some(bp) = read_user(cfa.wrapping_add(row.rbp_offset as i64 as u64)) else {
                    return stop(w, UnwindStop::ReadFault);
                };
                (*w).bp = bp;
            }
            RBP_SAME => {}
            _ => (*w).bp_ok = 0,
        }
        if ra == 0 || cfa <= (*w).sp {
            return stop(w, UnwindStop::ZeroReturn);
        }
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
        (*w).ip = ip;
        (*w).sp = nsp;
        (*w).bp = bp;
        (*w).bp_ok = 1;
        (*w).exact = 1;
        (*w).dwarf += 1;
        0
    }
}

/// One frame-pointer step, where the tables have nothing for the PC;
/// `why` ends the walk if there is no frame to follow.
#[inline(always)]
unsafe fn fp_step(w: *mut Walk, why: UnwindStop) -> i64 {
    unsafe {
        let bp = (*w).bp;
        if (*w).bp_ok == 0 || bp <= (*w).sp || bp >= USER_END {
            return stop(w, why);
        }
        let (Some(ra), Some(next_bp)) = (read_user(bp + 8), read_user(bp)) else {
            return stop(w, UnwindStop::ReadFault);
        };
        if ra == 0 {
            return stop(w, UnwindStop::FpEnd);
        }
        (*w).sp = bp + 16;
        (*w).bp = next_bp;
        (*w).ip = ra;
        (*w).fp += 1;
        0
    }
}

/// Runs `search_step` (one halving of `lo..hi` per call) to the end. Each
/// step reads the bounds from the map, so the verifier checks one step,
/// not every path of the search.
#[inline(always)]
fn search(steps: u32, search_step: extern "C" fn(u64, *mut c_void) -> i64) {
    // SAFETY: the callback has the signature bpf_loop expects and finds
    // its state itself.
    unsafe {
        generated::bpf_loop(steps, search_step as *mut c_void, core::ptr::null_mut(), 0);
    }
}

/// Finds the mapping of `pc` in the process's sorted mappings into
/// `map`.
#[inline(always)]
unsafe fn find_mapping(w: *mut Walk, pc: u64) -> bool {
    unsafe {
        let Some(procs) = UNWIND_PROCS.get(&(*w).tgid) else {
            return false;
        };
        (*w).pc = pc;
        (*w).lo = 0;
        (*w).hi = procs.count;
        search(MAPPING_STEPS, mapping_step);
        // The last mapping starting at or below pc.
        let lo = (*w).lo;
        if lo == 0 {
            return false;
        }
        // Masked: the verifier must see the index in range.
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

#[inline(never)]
extern "C" fn mapping_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(w) = UNWIND_WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's walk state; a valid map value, read only.
    unsafe {
        let (lo, hi) = ((*w).lo, (*w).hi);
        if lo >= hi {
            return 1;
        }
        let Some(procs) = UNWIND_PROCS.get(&(*w).tgid) else {
            return 1;
        };
        let mid = lo + (hi - lo) / 2;
        let Some(m) = procs.mappings.get((mid as usize) & (MAX_PROC_MAPPINGS - 1)) else {
            (*w).hi = lo;
            return 1;
        };
        if m.start <= (*w).pc {
            (*w).lo = mid + 1;
        } else {
            (*w).hi = mid;
        }
        0
    }
}

/// The last row at or below `pc` of the file of `map`.
#[inline(always)]
unsafe fn find_row(w: *mut Walk, pc: u32) -> Option<UnwindRow> {
    unsafe {
        (*w).pc = u64::from(pc);
        (*w).lo = 0;
        (*w).hi = (*w).map.rows_len;
        search(ROW_STEPS, row_step);
        let lo = (*w).lo;
        if lo == 0 {
            return None;
        }
        UNWIND_ROWS
            .get((*w).map.rows_start.wrapping_add(lo - 1))
            .copied()
    }
}

#[inline(never)]
extern "C" fn row_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(w) = UNWIND_WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's walk state.
    unsafe {
        let (lo, hi) = ((*w).lo, (*w).hi);
        if lo >= hi {
            return 1;
        }
        let mid = lo + (hi - lo) / 2;
        let Some(row) = UNWIND_ROWS.get((*w).map.rows_start.wrapping_add(mid)) else {
            (*w).hi = lo;
            return 1;
        };
        if u64::from(row.pc) <= (*w).pc {
            (*w).lo = mid + 1;
        } else {
            (*w).hi = mid;
        }
        0
    }
}
