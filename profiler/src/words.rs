//! The words a profile stores for kernel values and durations: lock types
//! as `perf lock contention` names them, and durations for people (in
//! frame names such as `[kernel stack not walked: blocked < 100.0 us]`, and
//! in the tables). The recorder writes them and the renderers show them;
//! neither owns them.

use profiler_common::record::lock_flags;

/// `perf lock contention`'s names for `lock:contention_begin` flags.
#[must_use]
pub fn lock_type_name(flags: u32) -> &'static str {
    use lock_flags::{MUTEX, PERCPU, READ, RT, SPIN, WRITE};
    match flags {
        f if f == SPIN => "spinlock",
        f if f == SPIN | READ => "rwlock:R",
        f if f == SPIN | WRITE => "rwlock:W",
        f if f == READ => "rwsem:R",
        f if f == WRITE => "rwsem:W",
        f if f == RT => "rt-mutex",
        f if f == RT | READ => "rwlock-rt:R",
        f if f == RT | WRITE => "rwlock-rt:W",
        f if f == PERCPU | READ => "pcpu-sem:R",
        f if f == PERCPU | WRITE => "pcpu-sem:W",
        f if f == MUTEX => "mutex",
        f if f == MUTEX | SPIN => "mutex-spin",
        _ => "unknown",
    }
}

/// A duration for people: `812 ns`, `12.3 us`, `4.56 ms`, `1.20 s`.
#[must_use]
pub fn human_ns(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let f = ns as f64;
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} us", f / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2} ms", f / 1e6)
    } else {
        format!("{:.2} s", f / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_for_people() {
        assert_eq!(human_ns(812), "812 ns");
        assert_eq!(human_ns(100_000), "100.0 us");
        assert_eq!(human_ns(4_560_000), "4.56 ms");
        assert_eq!(human_ns(1_200_000_000), "1.20 s");
    }

    #[test]
    fn lock_types() {
        assert_eq!(lock_type_name(lock_flags::SPIN), "spinlock");
        assert_eq!(
            lock_type_name(lock_flags::MUTEX | lock_flags::SPIN),
            "mutex-spin"
        );
        assert_eq!(lock_type_name(lock_flags::WRITE), "rwsem:W");
    }
}
