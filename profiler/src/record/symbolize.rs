//! Symbolizing the drained stacks: each row's `(tgid, kernel stack, user
//! stack)` becomes frames in the profile's frame table, user frames from
//! the process's snapshots (so a process that is gone still symbolizes),
//! kernel frames from kallsyms. A stack id below `STACK_ID_MIN` is the
//! reason there is no stack, and becomes a frame that says so.
//!
//! One [`Frames`] lives for the whole recording: every flush symbolizes
//! the stacks of what it drained, into the same frame table, with the
//! symbolizer's caches warm.

use std::{collections::HashMap, rc::Rc, time::Duration};

use profiler_common::{
    record::{
        STACK_DEFERRED, STACK_EXITING, STACK_HOLDER_ON_CPU, STACK_HOLDER_USER_UNKNOWN,
        STACK_ID_MIN, STACK_NOT_TAKEN, STACK_NOT_WALKED, STACK_SHORT_BLOCK,
    },
    unwind::{STACK_CUT, UnwindStop},
};

use super::targets::Processes;
use crate::{
    profile::FrameTable,
    symbolize::{SymbolStats, Symbolizer},
    words::human_ns,
};

/// How long a file no frame needed keeps its symbols (see
/// [`Symbolizer::forget_idle_files`]).
const FILES_IDLE: Duration = Duration::from_secs(30);

/// The user "stack" of a task without user space: `bpf_get_stack`'s
/// -EFAULT. With `-a` that is a kernel thread, and no loss.
const STACK_EFAULT: u64 = libc::EFAULT.unsigned_abs() as u64;

/// Flushes between two expiries of the stacks no program can name again
/// (see [`StackStore::expire`]): each reads every thread's entry.
const EXPIRE_EVERY: u64 = 16;

/// The stacks read from the kernel that a row may still name, by id. The
/// kernel's map holds a stack until a flush reads it (then it holds only
/// new ones), but the programs keep stack ids beyond that — a thread's
/// blocking sites reuse theirs, a thread blocked holds the ids taken when
/// it blocked — and name them again without storing the stack again. So
/// a stack is kept while a flush named it lately or a program holds it,
/// and dropped after: a recording of hours keeps what its threads hold
/// now, not every stack it ever met.
#[derive(Default)]
pub(super) struct StackStore {
    stacks: HashMap<u64, Stored>,
    /// Flushes so far.
    flush: u64,
    /// Stacks dropped so far.
    expired: u64,
}

/// A stack's frames, and the last flush that named it.
struct Stored {
    ips: Box<[u64]>,
    named: u64,
}

impl StackStore {
    fn get(&self, id: u64) -> &[u64] {
        self.stacks.get(&id).map_or(&[][..], |s| &s.ips)
    }

    /// Whether the store has stack `id`, which the flush under way names.
    pub fn named(&mut self, id: u64) -> bool {
        let flush = self.flush;
        self.stacks.get_mut(&id).map(|s| s.named = flush).is_some()
    }

    /// Keeps stack `id`, read by the flush under way.
    pub fn insert(&mut self, id: u64, ips: Box<[u64]>) {
        let named = self.flush;
        self.stacks.insert(id, Stored { ips, named });
    }

    /// Ends a flush. Returns whether the next one is to expire stacks: it
    /// reads the stacks the programs hold before it flips the parity, and
    /// gives them to [`StackStore::expire`].
    pub fn flushed(&mut self) -> bool {
        self.flush += 1;
        self.flush.is_multiple_of(EXPIRE_EVERY)
    }

    /// Drops the stacks neither this flush nor the one before named, nor
    /// `held` (the ids the programs held before this flush's flip). A row
    /// drained later names a stack a program held then (kept), or one it
    /// stored anew since (in the kernel's map again), or one this flush
    /// or the one before named, which it deleted from the map (kept).
    pub fn expire(&mut self, held: &std::collections::HashSet<u64>) {
        let since = self.flush.saturating_sub(1);
        let before = self.stacks.len();
        self.stacks
            .retain(|id, s| s.named >= since || held.contains(id));
        self.expired += (before - self.stacks.len()) as u64;
        self.stacks.shrink_to_fit();
    }

    /// Stacks kept, their frames, and stacks dropped so far.
    pub fn kept(&self) -> (u64, u64, u64) {
        let frames = self.stacks.values().map(|s| s.ips.len() as u64).sum();
        (self.stacks.len() as u64, frames, self.expired)
    }
}

/// The frames of the drained stacks, interned in one frame table.
pub(super) struct Frames {
    sym: Symbolizer,
    table: FrameTable,
    /// The symbolized stacks a flush may find again: kernel stacks by id,
    /// user stacks by process and id (valid while the process's
    /// [`Processes::lineage_version`] is the same). Kept while the flushes
    /// use them: those of 300 QEMUs were symbolized anew at every flush.
    kernel: HashMap<u64, Cached>,
    user: HashMap<(u32, u64), Cached>,
    /// Flushes so far: an entry no flush used since the one before this one
    /// is dropped.
    flush: u64,
    /// `-a`: a task without user space is a kernel thread.
    target_all: bool,
    /// The frame of an off-CPU block too short for a kernel stack walk.
    short_block: String,
}

/// The address to symbolize for frame `i` of a stack: every frame but the
/// innermost holds a return address, which is after its call, so the call
/// itself is looked up (a function that ends in a call would otherwise be
/// named as the one after it).
fn call_site(i: usize, ip: u64) -> u64 {
    if i == 0 { ip } else { ip.saturating_sub(1) }
}

/// A kernel frame of the tracing machinery itself (our program, the
/// tracepoint's BPF runner).
fn is_tracing_frame(name: &str) -> bool {
    ["bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// A symbolized stack, and when it was last used.
struct Cached {
    /// The process's lineage version it was symbolized with (user stacks).
    version: u64,
    used: u64,
    frames: Vec<u32>,
}

/// The addresses one drain's stacks need named (see [`Frames::lookups`]).
pub struct Lookups {
    kernel: Vec<u64>,
    files: Vec<(String, u64)>,
}

impl Frames {
    pub fn new(target_all: bool, kernel_stack_min_block: Duration) -> Self {
        let min_block = u64::try_from(kernel_stack_min_block.as_nanos()).unwrap_or(u64::MAX);
        Self {
            sym: Symbolizer::new(),
            table: FrameTable::default(),
            kernel: HashMap::new(),
            user: HashMap::new(),
            flush: 0,
            target_all,
            short_block: format!(
                "[kernel stack not walked: blocked < {}]",
                human_ns(min_block)
            ),
        }
    }

    /// What `triples`' stacks need looked up: the kernel addresses not
    /// named yet, and the user frames as `(file, offset)` of the stacks not
    /// symbolized with the process's current snapshots (its mappings may
    /// have grown since).
    pub fn lookups(
        &mut self,
        processes: &Processes,
        stacks: &StackStore,
        triples: &[(u32, u64, u64)],
    ) -> Lookups {
        self.flush += 1;
        let recent = self.flush - 1;
        self.user.retain(|_, c| c.used >= recent);
        self.kernel.retain(|_, c| c.used >= recent);
        self.sym.forget_idle_files(FILES_IDLE);
        let kernel: Vec<u64> = triples
            .iter()
            .map(|&(_, k, _)| k)
            .filter(|id| !self.kernel.contains_key(id))
            .flat_map(|id| stacks.get(id))
            .copied()
            .collect();
        let mut files = Vec::new();
        for &(tgid, _, id) in triples {
            if self
                .user
                .get(&(tgid, id))
                .is_some_and(|c| c.version == processes.lineage_version(tgid))
            {
                continue;
            }
            let chain = processes.chain(tgid);
            let ips = stacks.get(id).iter();
            for (i, &ip) in ips.take_while(|&&ip| ip < STACK_CUT).enumerate() {
                if let Some(fo) = Symbolizer::file_offset(&chain, call_site(i, ip)) {
                    files.push(fo);
                }
            }
        }
        files.sort_unstable();
        files.dedup();
        Lookups { kernel, files }
    }

    /// Looks `l` up in batches, for [`Self::stack`] to find: the slow part
    /// of symbolizing (kallsyms and each ELF file are read at their first
    /// use), and all of it that needs no process's mappings, so that it
    /// can run beside the recording's event loop.
    pub fn look_up(&mut self, l: &Lookups) {
        self.sym.prepare_kernel(&l.kernel);
        self.sym.prepare_files(&l.files);
    }

    /// A row's stack, outermost frame first: its user frames, then its
    /// kernel frames.
    pub fn stack(
        &mut self,
        processes: &Processes,
        stacks: &StackStore,
        tgid: u32,
        kern: u64,
        user: u64,
    ) -> Vec<u32> {
        let (flush, version) = (self.flush, processes.lineage_version(tgid));
        let mut out = match self.user.get_mut(&(tgid, user)) {
            Some(c) if c.version == version => {
                c.used = flush;
                c.frames.clone()
            }
            _ => {
                let frames = self.user_stack(processes, stacks, tgid, user);
                let c = Cached {
                    version,
                    used: flush,
                    frames: frames.clone(),
                };
                self.user.insert((tgid, user), c);
                frames
            }
        };
        if let Some(c) = self.kernel.get_mut(&kern) {
            c.used = flush;
        } else {
            let frames = self.kernel_stack(stacks, kern);
            let c = Cached {
                version: 0,
                used: flush,
                frames,
            };
            self.kernel.insert(kern, c);
        }
        out.extend_from_slice(&self.kernel[&kern].frames);
        out
    }

    fn user_stack(
        &mut self,
        processes: &Processes,
        stacks: &StackStore,
        tgid: u32,
        user: u64,
    ) -> Vec<u32> {
        if user < STACK_ID_MIN {
            return match user {
                // No user space: a kernel thread (-a), or exiting.
                STACK_EFAULT if self.target_all => Vec::new(),
                // Its kernel stack says why.
                STACK_EXITING | STACK_HOLDER_ON_CPU | STACK_NOT_WALKED => Vec::new(),
                STACK_NOT_TAKEN => vec![self.table.intern("[preempted]")],
                STACK_HOLDER_USER_UNKNOWN => {
                    vec![self.table.intern("[holder's user stack unknown]")]
                }
                _ => vec![self.table.intern("[missing user stack]")],
            };
        }
        let chain = processes.chain(tgid);
        let ips = stacks.get(user);
        // Walk from the leaf. A frame in no executable mapping means the
        // frame-pointer walk left the stack (code built without frame
        // pointers): what follows it is garbage, so the stack ends in one
        // `[unknown]`.
        let mut leaf_first: Vec<Rc<str>> = Vec::new();
        for (i, &ip) in ips.iter().enumerate() {
            if let Some(stop) = UnwindStop::of_cut(ip) {
                leaf_first.push(Rc::from(format!("[user stack cut: {}]", stop.name())));
                break;
            }
            let addr = call_site(i, ip);
            let mapped = chain.iter().any(|s| s.locate(addr).is_some());
            let names = self.sym.user_frames(&chain, addr);
            // Inlined frames come outermost first: reverse them for this
            // leaf-first walk.
            leaf_first.extend(names.into_iter().rev());
            if !mapped {
                break;
            }
        }
        leaf_first
            .iter()
            .rev()
            .map(|f| self.table.intern(f))
            .collect()
    }

    fn kernel_stack(&mut self, stacks: &StackStore, kern: u64) -> Vec<u32> {
        if kern < STACK_ID_MIN {
            return match kern {
                STACK_SHORT_BLOCK => vec![self.table.intern(&self.short_block)],
                STACK_HOLDER_ON_CPU => {
                    vec![
                        self.table
                            .intern("[holder on CPU: its stack cannot be walked]"),
                    ]
                }
                STACK_DEFERRED => {
                    vec![
                        self.table
                            .intern("[kernel stack not walked: blocked at the stop]"),
                    ]
                }
                _ => Vec::new(),
            };
        }
        let mut names = Vec::new();
        let ips = stacks.get(kern);
        for (i, &ip) in ips.iter().enumerate().rev() {
            names.extend(self.sym.kernel_frames(call_site(i, ip)));
        }
        // A walk from a BTF tracepoint starts in the program and the
        // tracepoint's runner: not where the task was.
        while names.last().is_some_and(|f| is_tracing_frame(f)) {
            names.pop();
        }
        names.iter().map(|f| self.table.intern(f)).collect()
    }

    /// The function whose call returns to `ret` in process `tgid` (the
    /// call instruction is just before the return address).
    pub fn caller(&mut self, processes: &Processes, tgid: u32, ret: u64) -> Option<String> {
        self.sym
            .user_frames(&processes.chain(tgid), ret.saturating_sub(1))
            .first()
            .map(ToString::to_string)
    }

    /// The frame names so far.
    pub fn names(&self) -> &[String] {
        self.table.names()
    }

    /// The symbolizer's kept addresses and names ([`Symbolizer::kept`]).
    pub fn kept(&self) -> (usize, usize) {
        self.sym.kept()
    }

    /// How symbolization went so far.
    pub fn stats(&self) -> &SymbolStats {
        &self.sym.stats
    }
}
