//! The targets: who is tracked from the start (`-p` and its descendants,
//! `--comm`, a `-- CMD` held before its `exec`), and what is learned of
//! each process while recording (its mappings, for symbolizing after it is
//! gone, and for the unwinder).

use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    io,
    time::{Duration, Instant},
};

use profiler_common::record::COMM_LEN;

use super::options::{RecordError, RecordOptions, Target};
use crate::{
    procmaps::{self, Snapshot},
    profile::{Process, Restart},
};

/// Who is tracked from the start, and the `-- CMD` child, held.
pub(super) fn initial(opts: &RecordOptions) -> Result<(Vec<u32>, Option<GatedChild>), RecordError> {
    let mut initial: Vec<u32> = Vec::new();
    let mut gated = None;
    match &opts.target {
        Target::Pids(pids) => initial.extend(pids),
        Target::Comm(name) => {
            let want = comm_prefix(name);
            initial.extend(
                procmaps::all_pids()
                    .into_iter()
                    .filter(|&p| procmaps::comm(p).as_deref() == Some(want.as_str())),
            );
        }
        Target::All => {}
        Target::Command(argv) => {
            let g = GatedChild::spawn(argv)?;
            initial.push(g.pid);
            gated = Some(g);
        }
    }
    if opts.follow_children && !initial.is_empty() && !matches!(opts.target, Target::Command(_)) {
        let more = descendants(&initial);
        initial.extend(more);
    }
    Ok((initial, gated))
}

/// The descendants of `roots` that are alive now (from `/proc/*/stat`).
pub(super) fn descendants(roots: &[u32]) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    for pid in procmaps::all_pids() {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
            && let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok())
        {
            parent.insert(pid, ppid);
        }
    }
    let mut set: HashSet<u32> = roots.iter().copied().collect();
    loop {
        let before = set.len();
        for (&pid, ppid) in &parent {
            if set.contains(ppid) {
                set.insert(pid);
            }
        }
        if set.len() == before {
            break;
        }
    }
    let mut out: Vec<u32> = set.into_iter().filter(|p| !roots.contains(p)).collect();
    out.sort_unstable();
    out
}

/// A `-- CMD` child held before `exec` until the probes are attached, so its
/// whole life is recorded. Forked by hand: `std::process::Command::spawn`
/// waits for the exec, which is exactly what must not happen yet.
pub(super) struct GatedChild {
    pub pid: u32,
    gate: Option<std::os::fd::OwnedFd>,
    status: Option<std::process::ExitStatus>,
}

impl GatedChild {
    pub fn spawn(argv: &[OsString]) -> Result<Self, RecordError> {
        use std::os::unix::ffi::OsStrExt as _;
        let command = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let spawn_err = |step, source| RecordError::Spawn {
            command: command.clone(),
            step,
            source,
        };
        let cargs: Vec<std::ffi::CString> = argv
            .iter()
            .map(|a| std::ffi::CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| {
                spawn_err(
                    "passing its arguments",
                    io::Error::new(io::ErrorKind::InvalidInput, e),
                )
            })?;
        let mut ptrs: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        let mut fds = [0i32; 2];
        // SAFETY: fds is a valid 2-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(spawn_err("pipe2 (its gate)", io::Error::last_os_error()));
        }
        // SAFETY: pipe2 returned two fresh fds that we now own.
        let (read, write) = unsafe {
            use std::os::fd::FromRawFd as _;
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        let read_fd = std::os::fd::AsRawFd::as_raw_fd(&read);
        // SAFETY: hvprof is single-threaded here (the event loop has not
        // started); the child only calls async-signal-safe functions.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(spawn_err("fork", io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: child side of fork: read, execvp and _exit only.
            unsafe {
                let mut b = 0u8;
                if libc::read(read_fd, (&raw mut b).cast(), 1) != 1 {
                    // hvprof went away before releasing the gate.
                    libc::_exit(126);
                }
                libc::execvp(ptrs[0], ptrs.as_ptr());
                libc::_exit(127);
            }
        }
        drop(read);
        Ok(Self {
            pid: pid.cast_unsigned(),
            gate: Some(write),
            status: None,
        })
    }

    pub fn release(&mut self) {
        if let Some(w) = self.gate.take() {
            let b = 1u8;
            // SAFETY: w is an open pipe fd; b is one readable byte.
            unsafe {
                libc::write(
                    std::os::fd::AsRawFd::as_raw_fd(&w),
                    (&raw const b).cast(),
                    1,
                )
            };
        }
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt as _;
        if self.status.is_none() {
            let mut status = 0;
            // SAFETY: waiting for our own child, by pid, without blocking.
            let r =
                unsafe { libc::waitpid(self.pid.cast_signed(), &raw mut status, libc::WNOHANG) };
            if r == self.pid.cast_signed() {
                self.status = Some(std::process::ExitStatus::from_raw(status));
            }
        }
        self.status
    }

    /// Ends the child if it still runs: SIGTERM, then SIGKILL after 2 s.
    pub fn end(&mut self) -> Option<std::process::ExitStatus> {
        self.release();
        if self.try_wait().is_some() {
            return self.status;
        }
        // SAFETY: signalling the child we forked, by its pid.
        unsafe { libc::kill(self.pid.cast_signed(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.try_wait().is_some() {
                return self.status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(self.pid.cast_signed(), libc::SIGKILL) };
        while self.try_wait().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.status
    }
}

impl Drop for GatedChild {
    /// Never leave the child we started behind, even on an error path.
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.end();
        }
    }
}

/// `--comm NAME`: the processes of that name being followed, to tell when
/// the target restarted — every one of them gone, then a new one exec'd —
/// which the kernel follows again by itself (it tracks an exec of that
/// name). A process of the name that forks continues in its child.
#[derive(Debug, Default)]
pub(super) struct Restarts {
    /// The name as the kernel compares it (its first 15 bytes); `None`
    /// without `--comm`.
    name: Option<String>,
    alive: HashSet<u32>,
    /// The last one to go, and when, while none is left.
    down: Option<(u32, u64)>,
    pub found: Vec<Restart>,
}

impl Restarts {
    /// Following `initial` (the targets and their descendants) for `target`.
    pub fn new(target: &Target, initial: &[u32]) -> Self {
        let Target::Comm(name) = target else {
            return Self::default();
        };
        let name = comm_prefix(name);
        let alive = initial
            .iter()
            .copied()
            .filter(|&p| procmaps::comm(p).as_deref() == Some(name.as_str()))
            .collect();
        Self {
            name: Some(name),
            alive,
            ..Self::default()
        }
    }

    /// Process `tgid` exec'd `comm`, `at` ns into the recording.
    pub fn exec(&mut self, tgid: u32, comm: &str, at: u64) {
        let Some(name) = &self.name else {
            return;
        };
        if comm != name {
            // Now another program: no longer the target.
            self.exit(tgid, at);
            return;
        }
        if !self.alive.insert(tgid) {
            return;
        }
        if self.alive.len() == 1
            && let Some((old_pid, exited_ns)) = self.down.take()
        {
            self.found.push(Restart {
                comm: name.clone(),
                old_pid,
                exited_ns,
                new_pid: tgid,
                started_ns: at,
            });
        }
    }

    /// Process `parent` forked process `child`.
    pub fn fork(&mut self, parent: u32, child: u32) {
        if self.alive.contains(&parent) {
            self.alive.insert(child);
        }
    }

    /// Process `tgid` exited, `at` ns into the recording.
    pub fn exit(&mut self, tgid: u32, at: u64) {
        if self.alive.remove(&tgid) && self.alive.is_empty() {
            self.down = Some((tgid, at));
        }
    }
}

/// The part of a process name the kernel keeps (and `--comm` compares).
fn comm_prefix(name: &str) -> String {
    name.chars().take(COMM_LEN - 1).collect()
}

/// Per-process knowledge gathered while recording.
#[derive(Default)]
pub(super) struct Processes {
    pub info: HashMap<u32, Process>,
    /// Processes whose `info` changed since the last flush wrote them.
    pub changed: HashSet<u32>,
    pub snapshots: HashMap<u32, Vec<Snapshot>>,
    /// Per process, a number that grows whenever what its stacks are
    /// symbolized with may have changed (its snapshots, its parent): see
    /// [`Self::lineage_version`].
    versions: HashMap<u32, u64>,
    next_version: u64,
    /// Loads each new snapshot's mappings into the user-stack unwinder
    /// (`--unwind dwarf`); gone after the stop.
    pub unwind: Option<crate::unwind::procs::Loader>,
}

impl Processes {
    /// Nothing known yet; each snapshot goes to `unwind` too.
    pub fn with_unwinder(unwind: Option<crate::unwind::procs::Loader>) -> Self {
        Self {
            unwind,
            ..Self::default()
        }
    }

    pub fn entry(&mut self, tgid: u32) -> &mut Process {
        self.changed.insert(tgid);
        self.bump(tgid);
        self.info.entry(tgid).or_insert_with(|| Process {
            tgid,
            comm: String::new(),
            cmdline: None,
            parent: None,
            forked_ns: None,
            exec_ns: None,
            exit_ns: None,
            fork_window: None,
            exec_window: None,
        })
    }

    pub fn snapshot(&mut self, tgid: u32) -> bool {
        match Snapshot::take(tgid) {
            Some(s) => {
                let list = self.snapshots.entry(tgid).or_default();
                if list.last() != Some(&s) {
                    if let Some(u) = &mut self.unwind {
                        u.load(tgid, &s);
                    }
                    list.push(s);
                    self.bump(tgid);
                }
                true
            }
            None => false,
        }
    }

    /// Loads `tgid`'s latest mappings into the unwinder again even if they
    /// did not change (its JIT code may have), at most every 100 ms.
    pub fn reload_unwind(&mut self, tgid: u32) {
        let Some(u) = &mut self.unwind else {
            return;
        };
        if u.loaded_within(tgid, Duration::from_millis(100)) {
            return;
        }
        if let Some(s) = self.snapshots.get(&tgid).and_then(|l| l.last()) {
            u.load(tgid, s);
        }
    }

    pub fn learn(&mut self, tgid: u32) {
        if !self.snapshots.contains_key(&tgid) {
            self.snapshot(tgid);
        }
        let cmdline = procmaps::cmdline(tgid);
        let comm = procmaps::comm(tgid);
        let p = self.entry(tgid);
        if p.cmdline.is_none() {
            p.cmdline = cmdline;
        }
        if p.comm.is_empty()
            && let Some(c) = comm
        {
            p.comm = c;
        }
    }

    /// The processes changed since the last call, for a flush to write.
    pub fn take_changed(&mut self) -> Vec<Process> {
        let mut out: Vec<Process> = self
            .changed
            .drain()
            .filter_map(|t| self.info.get(&t).cloned())
            .collect();
        out.sort_by_key(|p| p.tgid);
        out
    }

    /// Drops the mappings of the processes that exited before `before_ns`
    /// (since the start), unless a live process symbolizes with them (a
    /// forked child runs its parent's image until it execs): a long
    /// recording of many short processes keeps the mappings of those alive.
    pub fn forget_exited_before(&mut self, before_ns: u64) {
        let mut needed = HashSet::new();
        for (&tgid, p) in &self.info {
            if p.exit_ns.is_some_and(|e| e < before_ns) {
                continue;
            }
            let mut cur = tgid;
            while needed.insert(cur) && needed.len() <= self.info.len() {
                match self.info.get(&cur).and_then(|p| p.parent) {
                    Some(parent) => cur = parent,
                    None => break,
                }
            }
        }
        let info = &self.info;
        let mut forgotten = Vec::new();
        self.snapshots.retain(|&t, _| {
            let keep = needed.contains(&t) || !info.contains_key(&t);
            if !keep {
                forgotten.push(t);
            }
            keep
        });
        for t in forgotten {
            self.bump(t);
        }
    }

    fn bump(&mut self, tgid: u32) {
        self.next_version += 1;
        self.versions.insert(tgid, self.next_version);
    }

    /// A number that changes whenever the snapshots [`Self::chain`] gives
    /// for `tgid` may have: the sum of its lineage's versions, each of
    /// which only grows.
    pub fn lineage_version(&self, tgid: u32) -> u64 {
        self.lineage(tgid)
            .iter()
            .map(|t| self.versions.get(t).copied().unwrap_or(0))
            .fold(0, u64::wrapping_add)
    }

    /// `tgid` and its ancestors, nearest first.
    fn lineage(&self, tgid: u32) -> Vec<u32> {
        let mut lineage = vec![tgid];
        let mut cur = tgid;
        while let Some(parent) = self.info.get(&cur).and_then(|p| p.parent) {
            if lineage.contains(&parent) || lineage.len() > 32 {
                break;
            }
            lineage.push(parent);
            cur = parent;
        }
        lineage
    }

    /// Snapshots to symbolize `tgid`'s stacks with, oldest first: its
    /// ancestors' (a forked child runs its parent's image until it execs),
    /// then its own.
    pub fn chain(&self, tgid: u32) -> Vec<&Snapshot> {
        self.lineage(tgid)
            .iter()
            .rev()
            .filter_map(|t| self.snapshots.get(t))
            .flat_map(|v| v.iter())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comm_target_restarts_when_all_of_it_went_and_one_came_back() {
        let mut r = Restarts {
            name: Some("libvirtd".to_owned()),
            alive: [10].into(),
            ..Restarts::default()
        };
        // Daemonizing: 10 forks 11 and exits; 11 is the daemon.
        r.fork(10, 11);
        r.exit(10, 5);
        // A helper exec'd from a fork of the daemon is not the daemon.
        r.fork(11, 12);
        r.exec(12, "qemu-system-x86", 6);
        r.exit(12, 7);
        assert_eq!(r.found, []);
        // Killed, and started again.
        r.exit(11, 100);
        r.exec(20, "libvirtd", 150);
        // A second instance beside it is no restart.
        r.exec(21, "libvirtd", 160);
        r.exec(20, "libvirtd", 170);
        assert_eq!(
            r.found,
            [Restart {
                comm: "libvirtd".to_owned(),
                old_pid: 11,
                exited_ns: 100,
                new_pid: 20,
                started_ns: 150,
            }]
        );
        let mut none = Restarts::new(&Target::All, &[1]);
        none.exit(1, 1);
        none.exec(2, "libvirtd", 2);
        assert_eq!(none.found, []);
    }

    #[test]
    fn finds_own_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let d = descendants(&[std::process::id()]);
        assert!(d.contains(&child.id()), "{d:?}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
