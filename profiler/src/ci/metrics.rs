//! The per-window metrics a gate can name and a diff compares, each
//! defined once, and a profile's values of them.

use serde::Serialize;

use crate::{
    profile::Profile,
    render::{self, WindowSummary},
    tables::human_ns,
    tracer::Tracer,
    windows::WindowInfo,
};

/// A per-window figure that a gate can name and a diff compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Oncpu,
    Offcpu,
    Lockwait,
    Contentions,
    Forks,
    Cgroups,
    Dbuswait,
    Dbuscalls,
    Dbustimeouts,
    Apiwait,
    Apicalls,
    Qmpwait,
    Wakewait,
    Losses,
}

/// How a value reads and which noise floor it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Samples,
    Ns,
    Count,
    /// D-Bus timeouts: each one is a whole timeout (25 s by default).
    Timeouts,
}

impl Unit {
    /// Values of B under this are ignored by percentage gates.
    #[must_use]
    pub fn noise_floor(self) -> u64 {
        match self {
            Self::Samples => 20,
            Self::Ns => 10_000_000,
            Self::Count => 10,
            Self::Timeouts => 1,
        }
    }

    #[must_use]
    pub fn format(self, v: u64) -> String {
        match self {
            Self::Ns => human_ns(v),
            _ => v.to_string(),
        }
    }

    /// A signed difference, `+12.0 ms` / `-3`.
    #[must_use]
    pub fn format_delta(self, a: u64, b: u64) -> String {
        let (sign, d) = if b >= a { ('+', b - a) } else { ('-', a - b) };
        if d == 0 {
            return "0".to_owned();
        }
        format!("{sign}{}", self.format(d))
    }
}

impl Metric {
    pub const ALL: [Self; 14] = [
        Self::Oncpu,
        Self::Offcpu,
        Self::Lockwait,
        Self::Contentions,
        Self::Forks,
        Self::Cgroups,
        Self::Dbuswait,
        Self::Dbuscalls,
        Self::Dbustimeouts,
        Self::Apiwait,
        Self::Apicalls,
        Self::Qmpwait,
        Self::Wakewait,
        Self::Losses,
    ];

    pub(super) fn def(self) -> &'static MetricDef {
        &METRICS[self as usize]
    }

    #[must_use]
    pub fn name(self) -> &'static str {
        self.def().name
    }

    /// What it is, in the user's words.
    #[must_use]
    pub fn describe(self) -> &'static str {
        self.def().describe
    }

    #[must_use]
    pub fn unit(self) -> Unit {
        self.def().unit
    }

    /// The tracer that measures it (`None`: hvprof itself).
    #[must_use]
    pub fn tracer(self) -> Option<Tracer> {
        self.def().tracer
    }

    /// The HTML heatmap's name for its row, if it has one (those with one
    /// are also the markdown summaries' columns).
    #[must_use]
    pub fn heatmap(self) -> Option<&'static str> {
        self.def().heatmap
    }

    /// Its value in one window's summary.
    #[must_use]
    pub fn of(self, w: &WindowSummary) -> u64 {
        (self.def().of)(w)
    }

    pub(super) fn parse(name: &str) -> Option<Self> {
        let (base, total) = match name.strip_suffix(".total") {
            Some(b) => (b, true),
            None => (name, false),
        };
        let m = Self::ALL.into_iter().find(|m| m.name() == base)?;
        (!total || m.unit() == Unit::Ns).then_some(m)
    }
}

/// One metric, defined once.
pub(super) struct MetricDef {
    name: &'static str,
    /// What it is, in `--fail-on`'s grammar.
    pub(super) help: &'static str,
    describe: &'static str,
    unit: Unit,
    tracer: Option<Tracer>,
    heatmap: Option<&'static str>,
    of: fn(&WindowSummary) -> u64,
}

/// The metrics, in [`Metric::ALL`]'s order.
static METRICS: [MetricDef; Metric::ALL.len()] = [
    MetricDef {
        name: "oncpu",
        help: "on-CPU samples",
        describe: "on-CPU samples",
        unit: Unit::Samples,
        tracer: Some(Tracer::OnCpu),
        heatmap: Some("on-CPU samples"),
        of: |w| w.oncpu_samples,
    },
    MetricDef {
        name: "offcpu",
        help: "off-CPU time (offcpu.total: the same)",
        describe: "off-CPU time",
        unit: Unit::Ns,
        tracer: Some(Tracer::OffCpu),
        heatmap: Some("off-CPU time"),
        of: |w| w.offcpu_ns,
    },
    MetricDef {
        name: "lockwait",
        help: "kernel lock wait, all locks (lockwait.total)",
        describe: "lock wait",
        unit: Unit::Ns,
        tracer: Some(Tracer::Locks),
        heatmap: Some("lock wait"),
        of: |w| w.lock_wait_ns,
    },
    MetricDef {
        name: "contentions",
        help: "kernel lock contentions",
        describe: "lock contentions",
        unit: Unit::Count,
        tracer: Some(Tracer::Locks),
        heatmap: None,
        of: |w| w.lock_contentions,
    },
    MetricDef {
        name: "forks",
        help: "fork/clone/thread creations",
        describe: "forks",
        unit: Unit::Count,
        tracer: Some(Tracer::Fork),
        heatmap: Some("forks"),
        of: |w| w.forks,
    },
    MetricDef {
        name: "cgroups",
        help: "cgroup operations",
        describe: "cgroup ops",
        unit: Unit::Count,
        tracer: Some(Tracer::Cgroup),
        heatmap: Some("cgroup ops"),
        of: |w| w.cgroup_ops,
    },
    MetricDef {
        name: "dbuswait",
        help: "blocking D-Bus call time, all calls (dbuswait.total)",
        describe: "D-Bus wait",
        unit: Unit::Ns,
        tracer: Some(Tracer::Dbus),
        heatmap: Some("D-Bus time"),
        of: |w| w.dbus_ns,
    },
    MetricDef {
        name: "dbuscalls",
        help: "blocking D-Bus calls",
        describe: "D-Bus calls",
        unit: Unit::Count,
        tracer: Some(Tracer::Dbus),
        heatmap: None,
        of: |w| w.dbus_calls,
    },
    MetricDef {
        name: "dbustimeouts",
        help: "D-Bus calls that ran into their timeout",
        describe: "D-Bus timeouts",
        unit: Unit::Timeouts,
        tracer: Some(Tracer::Dbus),
        heatmap: Some("D-Bus timeouts"),
        of: |w| w.dbus_timeouts,
    },
    MetricDef {
        name: "apiwait",
        help: "libvirt API call time, all calls answered (apiwait.total)",
        describe: "libvirt API time",
        unit: Unit::Ns,
        tracer: Some(Tracer::Libvirt),
        heatmap: Some("libvirt API time"),
        of: |w| w.api_ns,
    },
    MetricDef {
        name: "apicalls",
        help: "libvirt API calls answered",
        describe: "libvirt API calls",
        unit: Unit::Count,
        tracer: Some(Tracer::Libvirt),
        heatmap: None,
        of: |w| w.api_calls,
    },
    MetricDef {
        name: "qmpwait",
        help: "QEMU monitor command time, all commands answered (qmpwait.total)",
        describe: "QMP time",
        unit: Unit::Ns,
        tracer: Some(Tracer::Libvirt),
        heatmap: Some("QMP time"),
        of: |w| w.qmp_ns,
    },
    MetricDef {
        name: "wakewait",
        help: "off-CPU time of the blocks another task woke (wakers tracer)",
        describe: "off-CPU time woken by a task",
        unit: Unit::Ns,
        tracer: Some(Tracer::Wakers),
        heatmap: None,
        of: |w| w.task_woken_ns,
    },
    MetricDef {
        name: "losses",
        help: "events lost, every kind",
        describe: "losses",
        unit: Unit::Count,
        tracer: None,
        heatmap: Some("losses"),
        of: |w| w.losses.values().sum(),
    },
];

/// The metrics of one window or of the whole recording, indexed by
/// [`Metric`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricValues([u64; Metric::ALL.len()]);

impl MetricValues {
    #[must_use]
    pub fn get(&self, m: Metric) -> u64 {
        self.0[m as usize]
    }

    pub(super) fn add(&mut self, m: Metric, v: u64) {
        self.0[m as usize] += v;
    }
}

impl Serialize for MetricValues {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(Metric::ALL.len()))?;
        for m in Metric::ALL {
            map.serialize_entry(m.name(), &self.get(m))?;
        }
        map.end()
    }
}

/// A profile with its per-window metrics computed once.
pub struct WindowMetrics<'a> {
    pub profile: &'a Profile,
    pub windows: Vec<(WindowInfo, MetricValues)>,
    pub whole: MetricValues,
}

impl<'a> WindowMetrics<'a> {
    /// Each window's and the whole recording's metrics set to their
    /// medians over `runs` (which have this one's windows).
    pub fn set_medians(&mut self, runs: &[WindowMetrics<'_>]) {
        let median_of = |get: &dyn Fn(&WindowMetrics<'_>) -> Option<u64>| -> u64 {
            let v: Vec<u64> = runs.iter().filter_map(get).collect();
            super::stats::median(&v)
        };
        for m in Metric::ALL {
            for (info, values) in &mut self.windows {
                let id = info.id;
                values.0[m as usize] = median_of(&|r| r.window(id).map(|(_, v)| v.get(m)));
            }
            self.whole.0[m as usize] = median_of(&|r| Some(r.whole.get(m)));
        }
    }

    #[must_use]
    pub fn new(profile: &'a Profile) -> Self {
        let summary = render::summary(profile);
        let mut whole = MetricValues::default();
        let windows = profile
            .windows
            .iter()
            .zip(&summary.windows)
            .map(|(info, w)| {
                let mut v = MetricValues::default();
                for m in Metric::ALL {
                    let x = m.of(w);
                    v.add(m, x);
                    if m != Metric::Losses {
                        whole.add(m, x);
                    }
                }
                (info.clone(), v)
            })
            .collect();
        // Losses of the whole recording include those outside every window.
        whole.add(Metric::Losses, summary.total_losses);
        Self {
            profile,
            windows,
            whole,
        }
    }

    pub(super) fn window(&self, id: u32) -> Option<&(WindowInfo, MetricValues)> {
        self.windows.iter().find(|(w, _)| w.id == id)
    }
}
