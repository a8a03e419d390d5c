//! Adding up rows that count the same thing: a recording is drained in
//! parts (every flush, then the stop), and a row's key can come back in a
//! later part — the same stack in the same window again, or a block that
//! began before a flush and ended after it. Each kind of row says what
//! makes two rows the same ([`Row::Key`]) and how their values add.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
};

use super::{
    CgroupOp, DbusCall, ForkCall, Holder, LibvirtCall, LockWait, LossCount, OffCpu, OffWake, OnCpu,
    Profile, Waker,
};

/// A row of the profile that adds up events.
pub trait Row: Clone {
    /// What makes two rows count the same thing.
    type Key<'a>: Hash + Eq
    where
        Self: 'a;
    fn key(&self) -> Self::Key<'_>;
    /// Adds `other`'s values (its key is the same) to this row's.
    fn add(&mut self, other: &Self);
    /// The window it counts in (`None`: a loss tied to no window).
    fn window_mut(&mut self) -> Option<&mut u32>;
}

/// The row kinds, each named once: `$m!(field)` for every kind of row that
/// counts in a window.
macro_rules! windowed_rows {
    ($m:ident) => {
        $m!(oncpu);
        $m!(offcpu);
        $m!(offwake);
        $m!(locks);
        $m!(forks);
        $m!(cgroups);
        $m!(dbus);
        $m!(libvirt);
    };
}

/// Moves every row to the window `f` gives for its own (`None`: the row is
/// left out, as are the losses of that window), adding up the rows that
/// then count the same thing; a process's fork or exec window that `f`
/// leaves out becomes none.
pub fn map_windows(profile: &mut Profile, f: &dyn Fn(u32) -> Option<u32>) {
    fn map<R: Row>(rows: &mut Vec<R>, f: &dyn Fn(u32) -> Option<u32>) {
        let mut merged = Merged::default();
        for mut row in std::mem::take(rows) {
            if let Some(w) = row.window_mut() {
                let Some(to) = f(*w) else { continue };
                *w = to;
            }
            merged.add(row);
        }
        *rows = merged.into_rows();
    }
    macro_rules! map_field {
        ($field:ident) => {
            map(&mut profile.$field, f)
        };
    }
    windowed_rows!(map_field);
    map(&mut profile.losses, f);
    map(&mut profile.unwind, f);
    for p in &mut profile.processes {
        p.fork_window = p.fork_window.and_then(f);
        p.exec_window = p.exec_window.and_then(f);
    }
    profile.sort_rows();
}

/// Adds `other` to `acc` bucket by bucket (log2 histograms).
fn add_hist(acc: &mut Vec<u64>, other: &[u64]) {
    if acc.len() < other.len() {
        acc.resize(other.len(), 0);
    }
    for (a, b) in acc.iter_mut().zip(other) {
        *a = a.saturating_add(*b);
    }
}

impl Row for OnCpu {
    type Key<'a> = (u32, u32, u32, &'a str, &'a [u32]);
    fn key(&self) -> Self::Key<'_> {
        (self.window, self.tgid, self.pid, &self.comm, &self.stack)
    }
    fn window_mut(&mut self) -> Option<&mut u32> {
        Some(&mut self.window)
    }
    fn add(&mut self, o: &Self) {
        self.samples = self.samples.saturating_add(o.samples);
    }
}

impl Row for OffCpu {
    type Key<'a> = (
        u32,
        u32,
        u32,
        &'a str,
        &'a str,
        &'a [u32],
        Option<&'a str>,
        bool,
    );
    fn key(&self) -> Self::Key<'_> {
        (
            self.window,
            self.tgid,
            self.pid,
            &self.comm,
            &self.state,
            &self.stack,
            self.dbus.as_deref(),
            self.unfinished,
        )
    }
    fn window_mut(&mut self) -> Option<&mut u32> {
        Some(&mut self.window)
    }
    fn add(&mut self, o: &Self) {
        self.blocks = self.blocks.saturating_add(o.blocks);
        self.total_ns = self.total_ns.saturating_add(o.total_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
        self.runq_ns = self.runq_ns.saturating_add(o.runq_ns);
    }
}

impl Row for OffWake {
    type Key<'a> = (u32, u32, u32, &'a str, &'a str, &'a [u32], &'a Waker);
    fn key(&self) -> Self::Key<'_> {
        (
            self.window,
            self.tgid,
            self.pid,
            &self.comm,
            &self.state,
            &self.stack,
            &self.waker,
        )
    }
    fn window_mut(&mut self) -> Option<&mut u32> {
        Some(&mut self.window)
    }
    fn add(&mut self, o: &Self) {
        self.blocks = self.blocks.saturating_add(o.blocks);
        self.total_ns = self.total_ns.saturating_add(o.total_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
    }
}

impl Row for LockWait {
    type Key<'a> = (
        u32,
        u32,
        &'a str,
        u64,
        &'a str,
        &'a [u32],
        Option<&'a Holder>,
    );
    fn key(&self) -> Self::Key<'_> {
        (
            self.window,
            self.tgid,
            &self.comm,
            self.lock,
            &self.lock_type,
            &self.stack,
            self.holder.as_ref(),
        )
    }
    fn window_mut(&mut self) -> Option<&mut u32> {
        Some(&mut self.window)
    }
    fn add(&mut self, o: &Self) {
        self.count = self.count.saturating_add(o.count);
        self.total_ns = self.total_ns.saturating_add(o.total_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
        add_hist(&mut self.hist, &o.hist);
        if self.lock_name.is_none() {
            self.lock_name.clone_from(&o.lock_name);
        }
    }
}

impl Row for ForkCall {
    type Key<'a> = (u32, u32, &'a str, &'a str, bool, &'a [u32], Option<&'a str>);
    fn key(&self) -> Self::Key<'_> {
        (
            self.window,
            self.tgid,
            &self.comm,
            &self.syscall,
            self.thread,
            &self.stack,
            self.caller.as_deref(),
        )
    }
    fn window_mut(&mut self) -> Option<&mut u32> {
        Some(&mut self.window)
    }
    fn add(&mut self, o: &Self) {
        self.count = self.count.saturating_add(o.count);
        self.total_ns = self.total_ns.saturating_add(o.total_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
    }
}

impl Row for CgroupOp {
    type Key<'a> = (u32, u32, &'a str, &'a str, &'a str, &'a str);
    fn key(&self) -> Self::Key<'_> {
        (
            self.window,
            self.tgid,
            &self.comm,
            &self.op,
            &self.hierarchy,
            &self.path,
        )
    }
    fn window_mut(&mut self) -> Option<&mut u32> {
        Some(&mut self.window)
    }
    fn add(&mut self, o: &Self) {
        self.count = self.count.saturating_add(o.count);
        self.timed = self.timed.saturating_add(o.timed);
        self.total_ns = self.total_ns.saturating_add(o.total_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
    }
}

/// Everything that tells two D-Bus rows apart but the stack: the call.
type DbusCallKey<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<i64>,
);

impl Row for LibvirtCall {
    type Key<'a> = (u32, u32, &'a str, &'a str, &'a str, &'a str, &'a [u32]);
    fn key(&self) -> Self::Key<'_> {
        (
            self.window,
            self.tgid,
            &self.kind,
            &self.name,
            &self.status,
            &self.comm,
            &self.stack,
        )
    }
    fn window_mut(&mut self) -> Option<&mut u32> {
        Some(&mut self.window)
    }
    fn add(&mut self, o: &Self) {
        self.calls = self.calls.saturating_add(o.calls);
        self.total_ns = self.total_ns.saturating_add(o.total_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
        add_hist(&mut self.hist, &o.hist);
    }
}

impl Row for DbusCall {
    type Key<'a> = (u32, u32, &'a str, DbusCallKey<'a>, &'a [u32]);
    fn key(&self) -> Self::Key<'_> {
        (
            self.window,
            self.tgid,
            &self.comm,
            (
                &self.library,
                &self.function,
                self.destination.as_deref(),
                self.path.as_deref(),
                self.interface.as_deref(),
                self.member.as_deref(),
                self.timeout_ms,
            ),
            &self.stack,
        )
    }
    fn window_mut(&mut self) -> Option<&mut u32> {
        Some(&mut self.window)
    }
    fn add(&mut self, o: &Self) {
        self.calls = self.calls.saturating_add(o.calls);
        self.timeouts = self.timeouts.saturating_add(o.timeouts);
        self.total_ns = self.total_ns.saturating_add(o.total_ns);
        self.max_ns = self.max_ns.max(o.max_ns);
        add_hist(&mut self.hist, &o.hist);
    }
}

impl Row for LossCount {
    type Key<'a> = (Option<u32>, &'a str);
    fn key(&self) -> Self::Key<'_> {
        (self.window, &self.kind)
    }
    fn window_mut(&mut self) -> Option<&mut u32> {
        self.window.as_mut()
    }
    fn add(&mut self, o: &Self) {
        self.count = self.count.saturating_add(o.count);
    }
}

/// Rows of one kind, each key once: a row whose key is already there is
/// added to it. Indexed by the key's hash alone (the rows hold the keys),
/// so that the index costs a few words per row.
#[derive(Debug)]
pub struct Merged<R: Row> {
    rows: Vec<R>,
    by_hash: HashMap<u64, u32>,
    hasher: RandomState,
}

impl<R: Row> Default for Merged<R> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            by_hash: HashMap::new(),
            hasher: RandomState::new(),
        }
    }
}

impl<R: Row> Merged<R> {
    /// Adds `row`: to the row of the same key, or as a new one.
    pub fn add(&mut self, row: R) {
        let mut h = self.hasher.hash_one(row.key());
        // Open addressing over the hash: another key with the same hash
        // moves on to the next slot.
        loop {
            match self.by_hash.get(&h) {
                Some(&i) if self.rows[i as usize].key() == row.key() => {
                    self.rows[i as usize].add(&row);
                    return;
                }
                Some(_) => h = h.wrapping_add(0x9e37_79b9_7f4a_7c15),
                None => {
                    let i = u32::try_from(self.rows.len()).unwrap_or(u32::MAX);
                    self.by_hash.insert(h, i);
                    self.rows.push(row);
                    return;
                }
            }
        }
    }

    pub fn extend(&mut self, rows: impl IntoIterator<Item = R>) {
        for r in rows {
            self.add(r);
        }
    }

    #[must_use]
    pub fn into_rows(self) -> Vec<R> {
        self.rows
    }
}

/// `rows` with each key once.
#[must_use]
pub fn merge_rows<R: Row>(rows: Vec<R>) -> Vec<R> {
    let mut m = Merged::default();
    m.extend(rows);
    m.into_rows()
}

/// Several runs of one workload as one profile (`hvprof diff A1 A2 A3 --vs
/// …`'s merged graphs and tables): their rows added up, their stacks
/// interned into one frame table; the first run's meta, windows and VMs.
/// `None` for no runs.
#[must_use]
pub fn merge_runs(runs: &[Profile]) -> Option<Profile> {
    let first = runs.first()?;
    let mut frames = super::FrameTable::default();
    let mut rows = Rows::default();
    for run in runs {
        let map: Vec<u32> = run.frames.iter().map(|f| frames.intern(f)).collect();
        let mut part = run.clone();
        part.remap_stacks(&|f| map.get(f as usize).copied().unwrap_or(u32::MAX));
        rows.add(&mut part);
    }
    let mut out = Profile {
        meta: first.meta.clone(),
        windows: first.windows.clone(),
        vms: first.vms.clone(),
        processes: first.processes.clone(),
        ..Profile::default()
    };
    rows.into_profile(&mut out);
    out.frames = frames.into_names();
    Some(out)
}

/// A profile's rows being added up, part after part.
#[derive(Debug, Default)]
pub struct Rows {
    pub oncpu: Merged<OnCpu>,
    pub offcpu: Merged<OffCpu>,
    pub offwake: Merged<OffWake>,
    pub locks: Merged<LockWait>,
    pub forks: Merged<ForkCall>,
    pub cgroups: Merged<CgroupOp>,
    pub dbus: Merged<DbusCall>,
    pub libvirt: Merged<LibvirtCall>,
    pub losses: Merged<LossCount>,
    pub unwind: Merged<LossCount>,
}

impl Rows {
    /// Adds the rows of `part` (its stacks index the same frame table).
    pub fn add(&mut self, part: &mut Profile) {
        self.oncpu.extend(std::mem::take(&mut part.oncpu));
        self.offcpu.extend(std::mem::take(&mut part.offcpu));
        self.offwake.extend(std::mem::take(&mut part.offwake));
        self.locks.extend(std::mem::take(&mut part.locks));
        self.forks.extend(std::mem::take(&mut part.forks));
        self.cgroups.extend(std::mem::take(&mut part.cgroups));
        self.dbus.extend(std::mem::take(&mut part.dbus));
        self.libvirt.extend(std::mem::take(&mut part.libvirt));
        self.losses.extend(std::mem::take(&mut part.losses));
        self.unwind.extend(std::mem::take(&mut part.unwind));
    }

    /// The rows as a profile part (its other fields empty).
    #[must_use]
    pub fn into_profile_part(self) -> Profile {
        let mut part = Profile::default();
        self.into_profile(&mut part);
        part
    }

    /// Moves the rows into `profile`, each kind in its profile order.
    pub fn into_profile(self, profile: &mut Profile) {
        profile.oncpu = self.oncpu.into_rows();
        profile.offcpu = self.offcpu.into_rows();
        profile.offwake = self.offwake.into_rows();
        profile.locks = self.locks.into_rows();
        profile.forks = self.forks.into_rows();
        profile.cgroups = self.cgroups.into_rows();
        profile.dbus = self.dbus.into_rows();
        profile.libvirt = self.libvirt.into_rows();
        profile.losses = self.losses.into_rows();
        profile.unwind = self.unwind.into_rows();
        profile.sort_rows();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(window: u32, stack: Vec<u32>, samples: u64) -> OnCpu {
        OnCpu {
            window,
            tgid: 1,
            pid: 1,
            comm: "a".into(),
            stack,
            samples,
        }
    }

    #[test]
    fn same_keys_add_up_and_others_stay() {
        let rows = merge_rows(vec![
            on(1, vec![0, 1], 2),
            on(1, vec![0, 2], 5),
            on(1, vec![0, 1], 3),
            on(2, vec![0, 1], 7),
        ]);
        assert_eq!(
            rows.iter().map(|r| r.samples).collect::<Vec<_>>(),
            [5, 5, 7]
        );
    }

    #[test]
    fn runs_merge_into_one_frame_table() {
        let run = |frames: &[&str], stack: Vec<u32>, samples| Profile {
            frames: frames.iter().map(|f| (*f).to_owned()).collect(),
            oncpu: vec![on(1, stack, samples)],
            ..Profile::default()
        };
        // The same stack main;busy, numbered differently in each run, and
        // another stack in the second.
        let a = run(&["main", "busy"], vec![0, 1], 3);
        let mut b = run(&["busy", "idle", "main"], vec![2, 0], 4);
        b.oncpu.push(on(1, vec![2, 1], 1));
        let m = merge_runs(&[a, b]).unwrap();
        let named: Vec<(Vec<&str>, u64)> = m
            .oncpu
            .iter()
            .map(|r| (m.frame_names(&r.stack).collect(), r.samples))
            .collect();
        assert_eq!(
            named,
            [(vec!["main", "busy"], 7), (vec!["main", "idle"], 1)]
        );
        assert!(merge_runs(&[]).is_none());
    }

    #[test]
    fn histograms_and_maxima() {
        let w = |hist: Vec<u64>, max_ns| LockWait {
            window: 1,
            tgid: 1,
            comm: "a".into(),
            lock: 9,
            lock_name: None,
            lock_type: "mutex".into(),
            stack: vec![],
            count: hist.iter().sum(),
            total_ns: max_ns,
            max_ns,
            hist,
            holder: None,
        };
        let rows = merge_rows(vec![w(vec![1, 0, 2], 7), w(vec![0, 1, 0, 0, 1], 30)]);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].hist, [1, 1, 2, 0, 1]);
        assert_eq!(
            (rows[0].count, rows[0].total_ns, rows[0].max_ns),
            (5, 37, 30)
        );
    }
}
