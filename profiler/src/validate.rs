//! What a profile read from a file must hold before anything uses it.
//! Profiles travel (CI baselines, bug reports), so the readers check once,
//! here, what the renderers, gates, exports and diffs rely on: every row
//! in a listed window, every frame index in the frame table, histograms no
//! longer than the kernel's, and every count and time column adding up
//! within a `u64` (so no sum any of them takes can overflow).

use std::{collections::HashSet, path::Path};

use profiler_common::record::LOCK_HIST_BUCKETS;

use crate::{
    graphs::period_ns,
    profile::{Profile, ProfileError},
};

/// One row of a per-window table, as the checks see it.
struct Row<'a> {
    /// `on-CPU row 3`.
    what: &'static str,
    index: usize,
    window: u32,
    stack: &'a [u32],
    hist: &'a [u64],
}

impl Profile {
    /// Refuses a profile whose rows point outside it or whose numbers add
    /// up beyond a `u64`, naming the first such row or column:
    /// [`ProfileError::Corrupt`] of `path`.
    pub fn validate(&self, path: &Path) -> Result<(), ProfileError> {
        self.check().map_err(|why| ProfileError::Corrupt {
            path: path.to_path_buf(),
            why,
        })
    }

    fn check(&self) -> Result<(), String> {
        let windows = self.check_windows()?;
        for r in self.rows() {
            let at = || format!("{} {}", r.what, r.index);
            if !windows.contains(&r.window) {
                return Err(format!(
                    "{} is in window {}, which is not among the profile's {} windows",
                    at(),
                    r.window,
                    self.windows.len()
                ));
            }
            if let Some(f) = r.stack.iter().find(|&&f| f as usize >= self.frames.len()) {
                return Err(format!(
                    "{}'s stack names frame {f}, but the frame table has {}",
                    at(),
                    self.frames.len()
                ));
            }
            if r.hist.len() > LOCK_HIST_BUCKETS {
                return Err(format!(
                    "{} has a histogram of {} buckets, more than the {LOCK_HIST_BUCKETS} hvprof records",
                    at(),
                    r.hist.len()
                ));
            }
        }
        self.check_totals()
    }

    /// Unique ids; a window's VM range is both ends or neither (the
    /// setup window), and runs forwards. Returns the ids.
    fn check_windows(&self) -> Result<HashSet<u32>, String> {
        let mut ids = HashSet::with_capacity(self.windows.len());
        for w in &self.windows {
            if !ids.insert(w.id) {
                return Err(format!("window {} is listed twice", w.id));
            }
            match (w.first_vm, w.last_vm) {
                (Some(a), Some(b)) if a > b => {
                    return Err(format!("window {}'s VMs run backwards, {a} to {b}", w.id));
                }
                (Some(_), None) | (None, Some(_)) => {
                    return Err(format!("window {} has only one end of its VM range", w.id));
                }
                _ => {}
            }
        }
        Ok(ids)
    }

    fn rows(&self) -> impl Iterator<Item = Row<'_>> {
        let oncpu = self.oncpu.iter().enumerate().map(|(index, r)| Row {
            what: "on-CPU row",
            index,
            window: r.window,
            stack: &r.stack,
            hist: &[],
        });
        let offcpu = self.offcpu.iter().enumerate().map(|(index, r)| Row {
            what: "off-CPU row",
            index,
            window: r.window,
            stack: &r.stack,
            hist: &[],
        });
        let offwake = self.offwake.iter().enumerate().flat_map(|(index, r)| {
            [
                ("off-CPU waker row", r.stack.as_slice()),
                ("off-CPU waker row's waker", r.waker.stack()),
            ]
            .map(|(what, stack)| Row {
                what,
                index,
                window: r.window,
                stack,
                hist: &[],
            })
        });
        let locks = self.locks.iter().enumerate().map(|(index, r)| Row {
            what: "lock wait row",
            index,
            window: r.window,
            stack: &r.stack,
            hist: &r.hist,
        });
        let holders = self.locks.iter().enumerate().filter_map(|(index, r)| {
            let Some(crate::profile::Holder::Task { stack, .. }) = &r.holder else {
                return None;
            };
            Some(Row {
                what: "lock wait row's holder",
                index,
                window: r.window,
                stack,
                hist: &[],
            })
        });
        let forks = self.forks.iter().enumerate().map(|(index, r)| Row {
            what: "fork row",
            index,
            window: r.window,
            stack: &r.stack,
            hist: &[],
        });
        let cgroups = self.cgroups.iter().enumerate().map(|(index, r)| Row {
            what: "cgroup row",
            index,
            window: r.window,
            stack: &[],
            hist: &[],
        });
        let dbus = self.dbus.iter().enumerate().map(|(index, r)| Row {
            what: "D-Bus row",
            index,
            window: r.window,
            stack: &r.stack,
            hist: &r.hist,
        });
        let libvirt = self.libvirt.iter().enumerate().map(|(index, r)| Row {
            what: "libvirt row",
            index,
            window: r.window,
            stack: &r.stack,
            hist: &r.hist,
        });
        oncpu
            .chain(offcpu)
            .chain(offwake)
            .chain(locks)
            .chain(holders)
            .chain(forks)
            .chain(cgroups)
            .chain(dbus)
            .chain(libvirt)
    }

    /// Every column that reports, summaries, gates or diffs add up, added
    /// up over the whole profile: any sum they take of it is a part of
    /// this one.
    fn check_totals(&self) -> Result<(), String> {
        let samples = total("on-CPU samples", self.oncpu.iter().map(|r| r.samples))?;
        if samples.checked_mul(period_ns(self)).is_none() {
            return Err(format!(
                "its {samples} on-CPU samples at {} Hz come to more than 2^64 ns of CPU time",
                self.meta.frequency_hz
            ));
        }
        total("off-CPU blocks", self.offcpu.iter().map(|r| r.blocks))?;
        total("off-CPU times", self.offcpu.iter().map(|r| r.total_ns))?;
        total(
            "off-CPU run-queue times",
            self.offcpu.iter().map(|r| r.runq_ns),
        )?;
        total(
            "off-CPU waker blocks",
            self.offwake.iter().map(|r| r.blocks),
        )?;
        total(
            "off-CPU waker times",
            self.offwake.iter().map(|r| r.total_ns),
        )?;
        total("lock contentions", self.locks.iter().map(|r| r.count))?;
        total("lock wait times", self.locks.iter().map(|r| r.total_ns))?;
        let hists = self.locks.iter().flat_map(|r| r.hist.iter().copied());
        total("lock wait histograms", hists)?;
        total("fork counts", self.forks.iter().map(|r| r.count))?;
        total("fork times", self.forks.iter().map(|r| r.total_ns))?;
        total(
            "cgroup operation counts",
            self.cgroups.iter().map(|r| r.count),
        )?;
        total(
            "timed cgroup operations",
            self.cgroups.iter().map(|r| r.timed),
        )?;
        total(
            "cgroup operation times",
            self.cgroups.iter().map(|r| r.total_ns),
        )?;
        total("D-Bus calls", self.dbus.iter().map(|r| r.calls))?;
        total("D-Bus timeouts", self.dbus.iter().map(|r| r.timeouts))?;
        total("D-Bus call times", self.dbus.iter().map(|r| r.total_ns))?;
        let hists = self.dbus.iter().flat_map(|r| r.hist.iter().copied());
        total("D-Bus histograms", hists)?;
        total("libvirt calls", self.libvirt.iter().map(|r| r.calls))?;
        total(
            "libvirt call times",
            self.libvirt.iter().map(|r| r.total_ns),
        )?;
        let hists = self.libvirt.iter().flat_map(|r| r.hist.iter().copied());
        total("libvirt histograms", hists)?;
        total("loss counts", self.losses.iter().map(|r| r.count))?;
        total("unwinder counts", self.unwind.iter().map(|r| r.count))?;
        Ok(())
    }
}

fn total(what: &str, values: impl Iterator<Item = u64>) -> Result<u64, String> {
    let mut sum: u64 = 0;
    for v in values {
        sum = sum
            .checked_add(v)
            .ok_or_else(|| format!("its {what} add up to more than 2^64"))?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::fixture;

    fn refused(p: &Profile) -> String {
        match p.validate(Path::new("p.hvprof")) {
            Ok(()) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_fixture_is_valid() {
        fixture().validate(Path::new("p.hvprof")).unwrap();
    }

    #[test]
    fn refuses_rows_outside_the_profile() {
        let mut p = fixture();
        p.locks[1].window = 7;
        assert_eq!(
            refused(&p),
            "p.hvprof is truncated or corrupt (lock wait row 1 is in window 7, which is not \
             among the profile's 3 windows); it cannot be read \u{2014} record again, or re-copy \
             the file"
        );
        let mut p = fixture();
        p.dbus[0].stack.push(6);
        assert!(
            refused(&p).contains("D-Bus row 0's stack names frame 6, but the frame table has 6"),
            "{}",
            refused(&p)
        );
        let mut p = fixture();
        p.locks[0].hist = vec![1; LOCK_HIST_BUCKETS + 1];
        assert!(refused(&p).contains("lock wait row 0 has a histogram of 41 buckets"));
    }

    #[test]
    fn refuses_windows_that_do_not_hold_together() {
        let mut p = fixture();
        p.windows[2].id = 1;
        assert!(refused(&p).contains("window 1 is listed twice"));
        let mut p = fixture();
        p.windows[1].last_vm = None;
        assert!(refused(&p).contains("window 1 has only one end of its VM range"));
        let mut p = fixture();
        p.windows[2].first_vm = Some(9);
        assert!(refused(&p).contains("window 2's VMs run backwards, 9 to 4"));
    }

    #[test]
    fn refuses_totals_beyond_u64() {
        let mut p = fixture();
        p.locks[0].total_ns = u64::MAX;
        assert!(refused(&p).contains("its lock wait times add up to more than 2^64"));
        let mut p = fixture();
        p.dbus[1].hist[0] = u64::MAX;
        assert!(refused(&p).contains("its D-Bus histograms add up to more than 2^64"));
        // Each total fits, but not as CPU time.
        let mut p = fixture();
        p.oncpu[0].samples = u64::MAX / 1000;
        assert!(
            refused(&p).contains("on-CPU samples at 99 Hz come to more than 2^64 ns"),
            "{}",
            refused(&p)
        );
        // At the edge: exactly u64::MAX in all is fine.
        let mut p = fixture();
        let rest: u64 = p.forks.iter().skip(1).map(|f| f.count).sum();
        p.forks[0].count = u64::MAX - rest;
        p.validate(Path::new("p.hvprof")).unwrap();
    }
}
