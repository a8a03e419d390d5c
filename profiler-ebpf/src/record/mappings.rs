//! The executable mappings the unwinder knows (`--unwind dwarf`): a child
//! uses its parent's until it execs, an exec drops the old image's, and a
//! file mapped executable later (a `dlopen`) is announced to userspace,
//! which loads its tables.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
};
use profiler_common::record::{EventKind, MAPPING_SETTLE_NS};

use super::common::{Syscall, Task, current_window, emit, now};
use crate::unwind::{self, UNWIND_ALIAS, UNWIND_PROCS};

/// `mmap`'s `PROT_EXEC` and `MAP_ANONYMOUS`.
const PROT_EXEC: u64 = 0x4;
const MAP_ANONYMOUS: u64 = 0x20;

/// Per thread: an executable file mapping under way in a process the
/// unwinder knows (the thread's tgid).
#[map]
static MMAP_EXEC: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);
/// Per process: when its last executable mapping was announced.
#[map]
static MMAP_ANNOUNCED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);

syscall_program! {
/// `mmap` entered (`--unwind dwarf`): a process the unwinder knows maps a
/// file executable, as the dynamic loader does at a `dlopen` (the text
/// segment, `PROT_READ | PROT_EXEC`). Marked here; announced at the exit,
/// once the mapping is in the process's maps.
pub fn unwind_mmap_enter, unwind_mmap_enter_per_call => |call, _ctx| try_unwind_mmap_enter(call)
}

#[inline(always)]
fn try_unwind_mmap_enter(call: Syscall) -> Option<u32> {
    // mmap(addr, len, prot, flags, fd, off)
    let (prot, flags) = (call.arg::<2>(), call.arg::<3>());
    if prot & PROT_EXEC == 0 || flags & MAP_ANONYMOUS != 0 {
        return None;
    }
    let (tgid, pid) = Task::current().ids();
    // A process whose mappings are not loaded yet gets them all when they
    // are (its exec, or its first walk).
    unwind::owner_of(tgid)?;
    let _ = MMAP_EXEC.insert(&pid, &tgid, 0);
    Some(0)
}

syscall_program! {
/// `mmap` returned: a marked mapping that succeeded is announced
/// (`EventKind::UnwindMapping`), unless one of the process was announced
/// less than `MAPPING_SETTLE_NS` ago: userspace reads the mappings that
/// long after that one, so the read sees this one too.
pub fn unwind_mmap_exit, unwind_mmap_exit_per_call => |call, _ctx| try_unwind_mmap_exit(call)
}

#[inline(always)]
fn try_unwind_mmap_exit(call: Syscall) -> Option<u32> {
    let pid = Task::current().pid();
    // SAFETY: a valid map value, copied.
    let tgid = unsafe { MMAP_EXEC.get(&pid) }.copied()?;
    let _ = MMAP_EXEC.remove(&pid);
    let ret = call.ret();
    // -4095..-1: an errno.
    if (-4095..0).contains(&ret) {
        return None;
    }
    let now = now();
    // SAFETY: a valid map value, read only.
    if let Some(last) = unsafe { MMAP_ANNOUNCED.get(&tgid) }
        && now.saturating_sub(*last) < MAPPING_SETTLE_NS
    {
        return None;
    }
    let _ = MMAP_ANNOUNCED.insert(&tgid, &now, 0);
    emit(
        EventKind::UnwindMapping,
        Task::of(tgid, pid),
        0,
        0,
        current_window(),
    );
    Some(0)
}

/// At a traced fork: a child runs its parent's image until it execs, with
/// the same mappings.
#[inline(always)]
pub(super) fn fork(parent: u32, child: u32) {
    if config!(unwind_dwarf) != 0
        && let Some(owner) = unwind::owner_of(parent)
    {
        let _ = UNWIND_ALIAS.insert(&child, &owner, 0);
    }
}

/// At a traced exec: the old image's mappings are gone, so frame pointers
/// until userspace loads the new ones.
#[inline(always)]
pub(super) fn exec(tgid: u32) {
    if config!(unwind_dwarf) != 0 {
        let _ = UNWIND_PROCS.remove(&tgid);
        let _ = UNWIND_ALIAS.remove(&tgid);
    }
}

/// The exit hook: a mapping the thread was making, and at its process's
/// end the process's alias, go with it.
#[inline(always)]
pub(super) fn task_exited(task: Task) {
    if config!(unwind_dwarf) != 0 {
        let _ = MMAP_EXEC.remove(&task.pid());
        if task.pid() == task.tgid() {
            let _ = UNWIND_ALIAS.remove(&task.tgid());
        }
    }
}
