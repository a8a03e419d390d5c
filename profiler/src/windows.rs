//! Windows keyed to the Nth VM created: parsing `--window-size K` and
//! `--windows 1-10,101-110`, and naming the windows. The kernel side computes
//! the window of each event with `profiler_common::record::window_of`'s rule.

use std::fmt;

use profiler_common::record::{
    MAX_WINDOW_RANGES, SETUP_WINDOW, WindowMode, WindowRange, window_of,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a window holds (`record --attribute`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// The events that happened between the creations of its first VM and
    /// of the VM after its last.
    #[default]
    Time,
    /// The work done for its VMs, whenever it happened: each VM's QEMU,
    /// the libvirtd calls that started it and the helpers they forked. The
    /// rest is in an unattributed window per time window.
    Vm,
}

impl Attribution {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Time => "time",
            Self::Vm => "vm",
        }
    }
}

/// The bit of a window id that marks an unattributed window (`--attribute
/// vm`): the work done for no VM known, during time window `id &
/// !UNATTRIBUTED`.
pub const UNATTRIBUTED: u32 = 1 << 30;

/// How VM ordinals are cut into windows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowSpec {
    /// VMs 1–K, K+1–2K, …
    Every { size: u32 },
    /// Explicit, disjoint, increasing ranges.
    Ranges { ranges: Vec<(u32, u32)> },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WindowSpecError {
    #[error("--window-size must be at least 1")]
    ZeroSize,
    #[error(
        "--windows {text:?}: {why}; write ranges of VM ordinals like 1-10,101-110 (or a single ordinal like 5)"
    )]
    Bad { text: String, why: String },
}

impl WindowSpec {
    /// Parses `--windows` (`1-10,101-110,201`).
    pub fn parse_ranges(text: &str) -> Result<Self, WindowSpecError> {
        let bad = |why: String| WindowSpecError::Bad {
            text: text.to_owned(),
            why,
        };
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(bad("empty range".to_owned()));
            }
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let parse = |s: &str| {
                s.trim()
                    .parse::<u32>()
                    .map_err(|_| bad(format!("{s:?} is not a VM ordinal")))
            };
            let (a, b) = (parse(a)?, parse(b)?);
            if a == 0 {
                return Err(bad(
                    "VM ordinals start at 1 (window 0 is the setup before the first VM)".to_owned(),
                ));
            }
            if a > b {
                return Err(bad(format!("{a}-{b} runs backwards")));
            }
            if let Some(&(_, last)) = ranges.last()
                && a <= last
            {
                return Err(bad(format!(
                    "{a}-{b} overlaps or precedes the range before it"
                )));
            }
            ranges.push((a, b));
        }
        if ranges.len() > MAX_WINDOW_RANGES as usize {
            return Err(bad(format!("at most {MAX_WINDOW_RANGES} ranges")));
        }
        Ok(Self::Ranges { ranges })
    }

    pub fn every(size: u32) -> Result<Self, WindowSpecError> {
        if size == 0 {
            Err(WindowSpecError::ZeroSize)
        } else {
            Ok(Self::Every { size })
        }
    }

    #[must_use]
    pub fn mode(&self) -> WindowMode {
        match self {
            Self::Every { .. } => WindowMode::Every,
            Self::Ranges { .. } => WindowMode::Ranges,
        }
    }

    #[must_use]
    pub fn kernel_ranges(&self) -> Vec<WindowRange> {
        match self {
            Self::Every { .. } => Vec::new(),
            Self::Ranges { ranges } => ranges
                .iter()
                .map(|&(first, last)| WindowRange { first, last })
                .collect(),
        }
    }

    /// The window of the `vms`-th VM (same rule as the kernel).
    #[must_use]
    pub fn window_of(&self, vms: u64) -> Option<u32> {
        let size = match self {
            Self::Every { size } => *size,
            Self::Ranges { .. } => 0,
        };
        window_of(self.mode() as u32, size, vms, &self.kernel_ranges())
    }

    /// The parts of a block from `start` to `end` (ns, on one clock) in
    /// each window, cut where the VMs were created (`created`: their
    /// creation times, ascending; the `k`th VM moves the windows to
    /// `window_of(k)`), in time order, consecutive parts of one window
    /// joined. A part outside every window is left out, as events there
    /// are.
    #[must_use]
    pub fn cut_at_vms(&self, created: &[u64], start: u64, end: u64) -> Vec<(u32, u64)> {
        let mut vms = created.partition_point(|&t| t <= start);
        let mut from = start;
        let mut parts: Vec<(u32, u64)> = Vec::new();
        let mut add = |window: Option<u32>, ns: u64| {
            let Some(w) = window else { return };
            match parts.last_mut() {
                Some((last, n)) if *last == w => *n += ns,
                _ if ns > 0 => parts.push((w, ns)),
                _ => {}
            }
        };
        for &t in created.iter().skip(vms) {
            if t >= end {
                break;
            }
            add(self.window_of(vms as u64), t - from);
            from = t;
            vms += 1;
        }
        add(self.window_of(vms as u64), end.saturating_sub(from));
        parts
    }

    /// The windows a recording that created `vms_created` VMs has: the
    /// setup window, then every window up to the last VM (with `Every`), or
    /// every explicit range.
    #[must_use]
    pub fn windows(&self, vms_created: u64) -> Vec<WindowInfo> {
        let mut out = vec![WindowInfo {
            id: SETUP_WINDOW,
            first_vm: None,
            last_vm: None,
            unattributed: false,
        }];
        match self {
            Self::Every { size } => {
                let last = self.window_of(vms_created).unwrap_or(0);
                for w in 1..=last {
                    let first = u64::from(w - 1) * u64::from(*size) + 1;
                    out.push(WindowInfo {
                        id: w,
                        first_vm: Some(first),
                        last_vm: Some(first + u64::from(*size) - 1),
                        unattributed: false,
                    });
                }
            }
            Self::Ranges { ranges } => {
                for (i, &(a, b)) in ranges.iter().enumerate() {
                    out.push(WindowInfo {
                        id: u32::try_from(i + 1).unwrap_or(u32::MAX),
                        first_vm: Some(u64::from(a)),
                        last_vm: Some(u64::from(b)),
                        unattributed: false,
                    });
                }
            }
        }
        out
    }

    /// The windows of a recording with `--attribute vm`: each window of
    /// VMs (no setup: work for a VM is for VM 1 or later), then an
    /// unattributed window for each time window, the setup's included.
    #[must_use]
    pub fn attributed_windows(&self, vms_created: u64) -> Vec<WindowInfo> {
        let time = self.windows(vms_created);
        let vms = time.iter().filter(|w| w.first_vm.is_some()).cloned();
        let rest = time.iter().map(|w| WindowInfo {
            id: w.id | UNATTRIBUTED,
            unattributed: true,
            ..w.clone()
        });
        vms.chain(rest).collect()
    }
}

impl fmt::Display for WindowSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Every { size } => write!(f, "every {size} VMs"),
            Self::Ranges { ranges } => {
                let parts: Vec<String> = ranges
                    .iter()
                    .map(|(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                write!(f, "VMs {}", parts.join(","))
            }
        }
    }
}

/// One window of a recording.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowInfo {
    pub id: u32,
    /// `None` for the setup window.
    pub first_vm: Option<u64>,
    pub last_vm: Option<u64>,
    /// `--attribute vm`: the work for no VM known, done while this time
    /// window's VMs were created (its id has [`UNATTRIBUTED`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unattributed: bool,
}

/// How window `id` is written: `3`, or `u3` for an unattributed window.
#[must_use]
pub fn window_name(id: u32) -> String {
    if id & UNATTRIBUTED == 0 {
        id.to_string()
    } else {
        format!("u{}", id & !UNATTRIBUTED)
    }
}

impl WindowInfo {
    /// [`window_name`].
    #[must_use]
    pub fn name(&self) -> String {
        window_name(self.id)
    }

    /// A short tag: `w3`, or `u3` for an unattributed window.
    #[must_use]
    pub fn tag(&self) -> String {
        if self.unattributed {
            self.name()
        } else {
            format!("w{}", self.id)
        }
    }

    /// `setup (before VM 1)` or `VMs 11–20`.
    #[must_use]
    pub fn label(&self) -> String {
        let time = match (self.first_vm, self.last_vm) {
            (Some(a), Some(b)) if a == b => format!("VM {a}"),
            (Some(a), Some(b)) => format!("VMs {a}\u{2013}{b}"),
            _ => "setup (before VM 1)".to_owned(),
        };
        if self.unattributed {
            format!("unattributed, during {time}")
        } else {
            time
        }
    }

    /// A directory name: `w00-setup`, `w02-vms-11-20`.
    #[must_use]
    pub fn dir_name(&self) -> String {
        let (letter, id) = if self.unattributed {
            ('u', self.id & !UNATTRIBUTED)
        } else {
            ('w', self.id)
        };
        match (self.first_vm, self.last_vm) {
            (Some(a), Some(b)) => format!("{letter}{id:02}-vms-{a}-{b}"),
            _ => format!("{letter}{id:02}-setup"),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_block_is_cut_where_vms_moved_the_windows() {
        let every2 = WindowSpec::every(2).unwrap();
        // VMs at 100, 200, 300, 400: window 1 from 100 (VMs 1-2), window 2
        // from 300.
        let vms = [100, 200, 300, 400];
        assert_eq!(every2.cut_at_vms(&vms, 50, 90), [(0, 40)]);
        assert_eq!(
            every2.cut_at_vms(&vms, 50, 350),
            [(0, 50), (1, 200), (2, 50)]
        );
        // Starting on a creation: after it.
        assert_eq!(every2.cut_at_vms(&vms, 100, 150), [(1, 50)]);
        assert_eq!(every2.cut_at_vms(&vms, 250, 1000), [(1, 50), (2, 700)]);
        // Outside every explicit range: left out.
        let ranges = WindowSpec::parse_ranges("2-2").unwrap();
        assert_eq!(ranges.cut_at_vms(&vms, 150, 350), [(1, 100)]);
        assert_eq!(ranges.cut_at_vms(&vms, 0, 50), [(0, 50)]);
        // A VM not known yet: the rest stays in the last window known.
        assert_eq!(every2.cut_at_vms(&vms[..1], 50, 350), [(0, 50), (1, 250)]);
    }

    use super::*;

    #[test]
    fn parses_ranges() {
        let s = WindowSpec::parse_ranges("1-10, 101-110,201-210,300").unwrap();
        assert_eq!(
            s,
            WindowSpec::Ranges {
                ranges: vec![(1, 10), (101, 110), (201, 210), (300, 300)]
            }
        );
        assert_eq!(s.to_string(), "VMs 1-10,101-110,201-210,300");
        assert_eq!(s.window_of(0), Some(0));
        assert_eq!(s.window_of(5), Some(1));
        assert_eq!(s.window_of(50), None);
        assert_eq!(s.window_of(300), Some(4));
    }

    #[test]
    fn rejects_bad_ranges() {
        for bad in ["", "0-3", "5-3", "1-10,5-20", "a-b", "1-10,,20", "10,3"] {
            let e = WindowSpec::parse_ranges(bad).unwrap_err();
            assert!(e.to_string().contains("write ranges"), "{bad}: {e}");
        }
        let many: Vec<String> = (1..=65).map(|i| (i * 2).to_string()).collect();
        assert!(WindowSpec::parse_ranges(&many.join(",")).is_err());
        assert_eq!(WindowSpec::every(0), Err(WindowSpecError::ZeroSize));
    }

    #[test]
    fn lists_windows_and_labels() {
        let s = WindowSpec::every(4).unwrap();
        let w = s.windows(10);
        assert_eq!(w.len(), 4);
        assert_eq!(w[0].label(), "setup (before VM 1)");
        assert_eq!(w[0].dir_name(), "w00-setup");
        assert_eq!(w[1].label(), "VMs 1\u{2013}4");
        assert_eq!(w[3].dir_name(), "w03-vms-9-12");
        assert_eq!(s.windows(0).len(), 1);
        let a = s.attributed_windows(10);
        let ids: Vec<u32> = a.iter().map(|w| w.id).collect();
        assert_eq!(
            ids,
            [
                1,
                2,
                3,
                UNATTRIBUTED,
                UNATTRIBUTED | 1,
                UNATTRIBUTED | 2,
                UNATTRIBUTED | 3
            ]
        );
        assert_eq!(a[0].label(), "VMs 1\u{2013}4");
        assert_eq!(a[4].label(), "unattributed, during VMs 1\u{2013}4");
        assert_eq!(a[3].dir_name(), "u00-setup");
        assert_eq!(a[5].dir_name(), "u02-vms-5-8");
        let r = WindowSpec::parse_ranges("2-3,7").unwrap();
        let w = r.windows(1);
        assert_eq!(w.len(), 3);
        assert_eq!(w[2].label(), "VM 7");
    }
}
