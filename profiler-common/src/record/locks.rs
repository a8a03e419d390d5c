//! The kernel lock contention tracer's keys, values and in-flight waits.

use super::{COMM_LEN, LiveKstack, TaskStacks};

/// `lock:contention_begin` flags (include/trace/events/lock.h).
pub mod lock_flags {
    pub const SPIN: u32 = 1 << 0;
    pub const READ: u32 = 1 << 1;
    pub const WRITE: u32 = 1 << 2;
    pub const RT: u32 = 1 << 3;
    pub const PERCPU: u32 = 1 << 4;
    pub const MUTEX: u32 = 1 << 5;

    /// A lock whose waiters sleep (mutex, rwsem, rt-mutex, percpu-rwsem,
    /// and a mutex's optimistic spin): only taken in process context.
    #[must_use]
    pub const fn sleeps(flags: u32) -> bool {
        flags & SPIN == 0 || flags & MUTEX != 0
    }

    /// A wait that spins (a spinlock, an rwlock, a mutex's optimistic
    /// spin): with preemption off, so its task is not switched out before
    /// it ends.
    #[must_use]
    pub const fn spins(flags: u32) -> bool {
        flags & SPIN != 0
    }

    /// A lock that records its holder task in an `owner` word: a mutex
    /// (spinning or sleeping) and an rwsem (not a percpu one, whose
    /// writer is not recorded).
    #[must_use]
    pub const fn has_owner(flags: u32) -> bool {
        flags & MUTEX != 0 || (flags & (SPIN | RT | PERCPU) == 0 && flags & (READ | WRITE) != 0)
    }

    /// A mutex's optimistic spin going on to sleep: the kernel begins the
    /// same contention a second time (`__mutex_lock_common`), one wait.
    #[must_use]
    pub const fn spin_then_sleep(pending: u32, new: u32) -> bool {
        pending == MUTEX | SPIN && new & MUTEX != 0 && new & SPIN == 0
    }
}

/// log2 buckets of lock wait time: bucket `i` holds waits in
/// `[2^i, 2^(i+1))` ns (bucket 0 also 0–1 ns); the last collects the rest.
pub const LOCK_HIST_BUCKETS: usize = 40;

/// [`TaskStacks::pid`] of a wait whose lock records no holder (a spinlock),
/// or did not have one at the begin (being handed over).
pub const HOLDER_UNKNOWN: u32 = 0;
/// [`TaskStacks::pid`] of a wait for an rwsem held for reading: readers
/// are not recorded, one at most is hinted at.
pub const HOLDER_READERS: u32 = u32::MAX;

/// Key of the lock-wait aggregation: one lock, waited for from one stack
/// while one holder held it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LockKey {
    pub window: u32,
    pub tgid: u32,
    /// `lock:contention_begin` flags ([`lock_flags`]).
    pub flags: u32,
    pub pad: u32,
    pub lock: u64,
    /// The waiter's stacks, as in [`SampleKey`].
    pub kern_stack: u64,
    pub user_stack: u64,
    pub comm: [u8; COMM_LEN],
    pub holder: TaskStacks,
}

/// Waits of one [`LockKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockValue {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub hist: [u64; LOCK_HIST_BUCKETS],
}

/// Most contentions one task can be inside at once: a spinlock taken in a
/// mutex's slow path, an interrupt contending while the task waits, …
pub const MAX_LOCK_NESTING: usize = 4;

/// One contention in progress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockBegin {
    pub lock: u64,
    pub start_ns: u64,
    /// The CPU the wait began on (the end may come on another).
    pub cpu: u32,
    /// The task's context switches at the begin (the low half of
    /// `nvcsw + nivcsw`): a spinning wait whose task has switched out
    /// since has ended unseen.
    pub switches: u32,
    pub flags: u32,
    /// The window at the begin (waits are charged there).
    pub window: u32,
    /// Who held the lock at the begin.
    pub holder: TaskStacks,
}

/// The contentions a task is inside, innermost last. An end pops the entry
/// of its lock, wherever it is, so nesting and interrupts pair correctly.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockPending {
    pub depth: u32,
    /// The slot of `kstacks` a new kernel stack replaces next.
    pub kstack_next: u32,
    pub entries: [LockBegin; MAX_LOCK_NESTING],
    /// The thread's last kernel stacks walked at a contention end.
    pub kstacks: [LiveKstack; LOCK_KSTACKS],
}

impl LockPending {
    /// The stack ids the thread's kernel-stack cache holds (see
    /// [`OffCpuStart::stacks`](super::OffCpuStart::stacks)).
    pub fn stacks(&self) -> impl Iterator<Item = u64> + '_ {
        self.kstacks.iter().map(|k| k.id)
    }

    pub const ZERO: Self = Self {
        depth: 0,
        kstack_next: 0,
        entries: [LockBegin {
            lock: 0,
            start_ns: 0,
            cpu: 0,
            switches: 0,
            flags: 0,
            window: 0,
            holder: TaskStacks::UNKNOWN,
        }; MAX_LOCK_NESTING],
        kstacks: [LiveKstack::EMPTY; LOCK_KSTACKS],
    };
}

/// Kernel stacks a thread's lock entry remembers.
pub const LOCK_KSTACKS: usize = 2;
