//! On-CPU sample keys, and the off-CPU tracer's keys, values and block sites.

use super::{COMM_LEN, HOLDER_UNKNOWN};

/// Key of the on-CPU sample counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub window: u32,
    pub tgid: u32,
    pub pid: u32,
    pub pad: u32,
    /// Key in `STACKS`, or below [`STACK_ID_MIN`] the reason there is none.
    pub kern_stack: u64,
    pub user_stack: u64,
    pub comm: [u8; COMM_LEN],
}

/// Key of the off-CPU times: the blocked task, its stacks when it blocked
/// and the state it blocked in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OffCpuKey {
    pub window: u32,
    pub tgid: u32,
    pub pid: u32,
    /// `prev_state` of `sched_switch`.
    pub state: u32,
    /// The outermost blocking D-Bus call ([`dbus_fn`]) the task was
    /// inside, 0 if none.
    pub dbus: u32,
    pub pad: u32,
    pub kern_stack: u64,
    pub user_stack: u64,
    pub comm: [u8; COMM_LEN],
}

impl OffCpuKey {
    pub const ZERO: Self = Self {
        window: 0,
        tgid: 0,
        pid: 0,
        state: 0,
        dbus: 0,
        pad: 0,
        kern_stack: 0,
        user_stack: 0,
        comm: [0; COMM_LEN],
    };
}

/// Key of a block that went on past its window's end (the VM count moved
/// while the thread was blocked, into another window or out of every
/// one): userspace cuts it at the windows' boundaries, the VMs' creation
/// times.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanKey {
    /// The window it began in, under the flush parity of now.
    pub window: u32,
    pub pid: u32,
    pub start_ns: u64,
}

/// Such a block: its key as the off-CPU tracer's (the window it began
/// in), when it ended, and the VMs created by then.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanBlock {
    pub key: OffCpuKey,
    pub end_ns: u64,
    pub end_vms: u64,
}

/// Entries of `OFFCPU_SPANS`: blocks cut at windows' ends between two
/// flushes.
pub const OFFCPU_SPANS_ENTRIES: u32 = 16384;

/// A task other than the one an event happened to, with its stacks: a
/// lock's holder as a waiter began to wait (the task in the lock's `owner`
/// word), or the task that woke a blocked thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TaskStacks {
    /// Its thread; or for a holder [`HOLDER_UNKNOWN`], [`HOLDER_READERS`],
    /// for a waker [`WAKER_INTERRUPT`].
    pub pid: u32,
    pub tgid: u32,
    pub comm: [u8; COMM_LEN],
    /// Its stacks, as in [`SampleKey`]. A holder's: the kernel stack of
    /// one that is not running ([`STACK_HOLDER_ON_CPU`] for one that is),
    /// the user stack of one blocked where the off-CPU tracer saw it block
    /// ([`STACK_HOLDER_USER_UNKNOWN`] otherwise). A waker's: where it woke
    /// the thread ([`STACK_NOT_WALKED`] for the user stack of an interrupt
    /// or of a process not traced).
    pub kern_stack: u64,
    pub user_stack: u64,
}

impl TaskStacks {
    pub const UNKNOWN: Self = Self {
        pid: HOLDER_UNKNOWN,
        tgid: 0,
        comm: [0; COMM_LEN],
        kern_stack: 0,
        user_stack: 0,
    };
}

/// [`TaskStacks::pid`] of a waker that was an interrupt (a timer, a
/// device): whatever task it interrupted did not wake the thread.
pub const WAKER_INTERRUPT: u32 = u32::MAX;

/// Key of the wakers tracer's times: a block, as the off-CPU tracer keys
/// it, and who woke it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OffWakeKey {
    pub blocked: OffCpuKey,
    pub waker: TaskStacks,
}

/// Off-CPU times of one key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuValue {
    /// Blocks counted.
    pub count: u64,
    /// Switch-out to switch-in.
    pub total_ns: u64,
    pub max_ns: u64,
    /// Of `total_ns`, the part waiting for a CPU: after the wakeup, or all
    /// of a preemption (the kernel's `sched_info.run_delay` growth).
    pub runq_ns: u64,
}

impl OffCpuValue {
    pub const ZERO: Self = Self {
        count: 0,
        total_ns: 0,
        max_ns: 0,
        runq_ns: 0,
    };

    /// One block of `blocked_ns`, `runq_ns` of it waiting for a CPU.
    #[must_use]
    pub const fn block(blocked_ns: u64, runq_ns: u64) -> Self {
        Self {
            count: 1,
            total_ns: blocked_ns,
            max_ns: blocked_ns,
            runq_ns,
        }
    }

    /// Adds run-queue wait of these blocks, measured on the run queue's
    /// clock: capped at their total, which a few µs of difference between
    /// that clock and the tracepoint's could exceed.
    #[inline(always)]
    #[expect(clippy::inline_always, reason = "on the eBPF per-event path")]
    pub fn add_runq(&mut self, ns: u64) {
        self.runq_ns += ns;
        if self.runq_ns > self.total_ns {
            self.runq_ns = self.total_ns;
        }
    }

    /// Adds `other`'s blocks (the kernel's per-thread sums, its map, and
    /// userspace's merge all add this way).
    #[inline(always)]
    #[expect(clippy::inline_always, reason = "on the eBPF per-event path")]
    pub fn add(&mut self, other: &Self) {
        self.count += other.count;
        self.total_ns += other.total_ns;
        self.runq_ns += other.runq_ns;
        if other.max_ns > self.max_ns {
            self.max_ns = other.max_ns;
        }
    }
}

/// A thread's blocks of one key not yet added to the off-CPU map: a thread
/// blocking the same way again and again (a ping-pong, a worker on its
/// queue) costs no map update per block. Added when the key changes, when
/// the site is replaced and when the thread exits; userspace adds what is
/// left at the stop.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffCpuAcc {
    pub key: OffCpuKey,
    pub value: OffCpuValue,
}

impl OffCpuAcc {
    pub const ZERO: Self = Self {
        key: OffCpuKey::ZERO,
        value: OffCpuValue::ZERO,
    };
}

/// Return addresses of a remembered live kernel stack that are checked.
pub const LIVE_KSTACK_FRAMES: usize = 16;
/// Words below the task's entry registers (the top of its kernel stack)
/// searched for them (4 KiB).
pub const LIVE_KSTACK_WORDS: usize = 512;

/// A kernel stack of the current task walked once (at a contention end, at
/// a wakeup), and where its return addresses sat in the 4 KiB at the top
/// of its kernel stack. The kernel moves the frames below the syscall
/// entry by a random offset at every syscall, all by the same amount: the
/// same syscall and return addresses at the same places (after finding the
/// innermost one) mean the same kernel call chain, without walking it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveKstack {
    /// The stack id (0: empty).
    pub id: u64,
    pub syscall: u64,
    /// Its frames, innermost first, all in `ret` and `at`.
    pub found: u32,
    /// Scratch for the search (in the map value, not a register, for the
    /// verifier's sake).
    pub search: u32,
    pub ret: [u64; LIVE_KSTACK_FRAMES],
    /// Word index in the 4 KiB window.
    pub at: [u32; LIVE_KSTACK_FRAMES],
}

impl LiveKstack {
    pub const EMPTY: Self = Self {
        id: 0,
        syscall: 0,
        found: 0,
        search: 0,
        ret: [0; LIVE_KSTACK_FRAMES],
        at: [0; LIVE_KSTACK_FRAMES],
    };
}

/// Entries of the wakers tracer's maps (`OFFWAKE_TIMES`, `WAKER_SITES`);
/// one each when it is off.
pub const OFFWAKE_ENTRIES: u32 = 65536;
pub const WAKER_SITES_ENTRIES: u32 = 8192;

/// Wake sites a waker's entry remembers.
pub const WAKE_SITES: usize = 2;

/// A place a thread woke others from (the wakers tracer): its user site,
/// keyed as a [`BlockSite`]'s, with the user stack walked there, and the
/// kernel stack of its last wakeup there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WakeSite {
    /// As [`BlockSite::user`], [`BlockSite::user_check`] and
    /// [`BlockSite::user_check_hash`].
    pub user: [u64; 4],
    pub user_stack: u64,
    pub user_check: [u64; 2],
    pub user_check_hash: u64,
    pub kstack: LiveKstack,
}

/// Per waker thread (keyed by task pointer, in an LRU map: no exit hook
/// removes it): where it last woke others from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WakerSites {
    /// The thread (a reused `task_struct` is another thread).
    pub pid: u32,
    /// The site a new one replaces next.
    pub next: u32,
    pub sites: [WakeSite; WAKE_SITES],
}

impl WakerSites {
    pub const EMPTY: Self = Self {
        pid: 0,
        next: 0,
        sites: [WakeSite {
            user: [0; 4],
            user_stack: 0,
            user_check: [0; 2],
            user_check_hash: 0,
            kstack: LiveKstack::EMPTY,
        }; WAKE_SITES],
    };

    /// The stack ids it holds.
    pub fn stacks(&self) -> impl Iterator<Item = u64> + '_ {
        self.sites.iter().flat_map(|s| [s.user_stack, s.kstack.id])
    }
}

/// Sites a thread's off-CPU entry remembers (a QEMU vCPU thread alternates
/// between the BQL, its halt condition and a few locks).
pub const BLOCK_SITES: usize = 4;
/// [`OffCpuStart::slot`] when the block in progress has no site (its
/// blocks go to [`OffCpuStart::acc`]).
pub const NO_SITE: u32 = 4;
/// [`OffCpuStart::charged`] when the last block went nowhere (filtered out,
/// outside the windows, or its wait already settled).
pub const NOT_CHARGED: u32 = u32::MAX;
const _: () = assert!(NO_SITE as usize == BLOCK_SITES && BLOCK_SITES.is_power_of_two());

/// Words above a stopped task's saved kernel stack pointer searched for the
/// return addresses of its kernel stack (2 KiB).
pub const KSTACK_SCAN_WORDS: usize = 256;
/// [`BlockSite::kern_ret_at`] of a return address not found there.
pub const KSTACK_UNCHECKED: u32 = u32::MAX;

/// A place a thread blocked, and the stacks taken there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSite {
    /// User ip, sp, bp and the return address (0s: empty). Two blocks of a
    /// thread with the same four are at the same site, with the same user
    /// call chain. The return address is 0 where `user_check` is set: the
    /// check covers frame 0's return address, and more.
    pub user: [u64; 4],
    /// The user stack id taken there.
    pub user_stack: u64,
    /// Where its first return addresses sit above sp (see
    /// `unwind::SITE_CHECK_FRAMES`); 0s: not checked (frame pointers).
    pub user_check: [u64; 2],
    /// The hash of the return addresses expected in those slots.
    pub user_check_hash: u64,
    /// The kernel stack id walked when a block here last came back (0:
    /// none yet), and the syscall number of that block.
    pub kern_stack: u64,
    pub syscall: u64,
    /// That kernel stack's two innermost return addresses, and where they
    /// sat: in words above the saved kernel stack pointer. The kernel
    /// randomizes the stack offset at every syscall, so positions are
    /// relative; the same addresses at the same places (and the same
    /// syscall at the same user site) mean the same kernel call chain.
    pub kern_ret: [u64; 2],
    pub kern_ret_at: [u32; 2],
    /// The blocks here not yet in the off-CPU map: one per site, so a
    /// thread alternating between its sites (a QEMU vCPU between the BQL
    /// and its halt) still adds up in place.
    pub acc: OffCpuAcc,
}

impl BlockSite {
    pub const EMPTY: Self = Self {
        user: [0; 4],
        user_stack: 0,
        user_check: [0; 2],
        user_check_hash: 0,
        kern_stack: 0,
        syscall: 0,
        kern_ret: [0; 2],
        kern_ret_at: [KSTACK_UNCHECKED; 2],
        acc: OffCpuAcc::ZERO,
    };
}

/// Per thread (keyed by task pointer): its block in progress, if any, and
/// the last places it blocked. The entry lives as long as the thread, so a
/// context switch updates it in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffCpuStart {
    pub key: OffCpuKey,
    /// When the block in progress began; 0 when the thread is not blocked.
    pub start_ns: u64,
    /// The thread's `sched_info.run_delay` when it last switched out. The
    /// kernel adds a run-queue wait when the task is switched in, after the
    /// tracepoint, so a block's wait is settled at the next switch-out (or
    /// exit, or stop) as the growth since.
    pub run_delay: u64,
    /// The site of the block in progress, an index into `sites`, or
    /// [`NO_SITE`].
    pub slot: u32,
    /// The slot a new site replaces next (first in, first out).
    pub next_slot: u32,
    /// Where the last block went, its run-queue wait still to add: a slot
    /// of `sites`, [`NO_SITE`] for `acc`, or [`NOT_CHARGED`].
    pub charged: u32,
    pub pad: u32,
    /// The blocks without a site (preemptions, unreadable user registers)
    /// not yet in the off-CPU map; those with one are in their site.
    pub acc: OffCpuAcc,
    pub sites: [BlockSite; BLOCK_SITES],
    /// The wakers tracer's: who last woke the thread, and when (0: nobody
    /// since its last block was charged). Written by the waker's program,
    /// on the waker's CPU, read when the thread is switched in.
    pub waker: TaskStacks,
    pub woken_ns: u64,
    /// VMs created when the block in progress began: a block that comes
    /// back with another count may have gone on past its window.
    pub start_vms: u64,
}

impl OffCpuStart {
    /// The accumulator `charged` names, if any.
    #[must_use]
    pub fn charged_acc_mut(&mut self) -> Option<&mut OffCpuAcc> {
        match self.charged {
            NO_SITE => Some(&mut self.acc),
            i => self.sites.get_mut(i as usize).map(|s| &mut s.acc),
        }
    }

    /// Every stack id the entry holds, which the programs may name again
    /// in a row without storing the stack again: its block in progress,
    /// its pending blocks and its sites.
    pub fn stacks(&self) -> impl Iterator<Item = u64> + '_ {
        [
            self.key.kern_stack,
            self.key.user_stack,
            self.acc.key.kern_stack,
            self.acc.key.user_stack,
        ]
        .into_iter()
        .chain(self.sites.iter().flat_map(|s| {
            [
                s.user_stack,
                s.kern_stack,
                s.acc.key.kern_stack,
                s.acc.key.user_stack,
            ]
        }))
        .chain([self.waker.kern_stack, self.waker.user_stack])
    }

    /// The blocks not yet in the off-CPU map, by key.
    pub fn pending(&self) -> impl Iterator<Item = &OffCpuAcc> {
        core::iter::once(&self.acc)
            .chain(self.sites.iter().map(|s| &s.acc))
            .filter(|a| a.value.count != 0)
    }
}
