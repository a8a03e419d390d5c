//! The event loop: from the attach to the stop, it drains the ring buffer
//! (forks, execs, exits, VM creations, unwinder requests), snapshots new
//! processes while they live, and watches for the stop — the duration,
//! Ctrl-C, SIGTERM, or the targets exiting.

use std::{
    collections::HashSet,
    fmt, io,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use profiler_common::record::{Event, EventKind, MAPPING_SETTLE_NS, recorded_window};

use super::{
    comm_str,
    flush::Flusher,
    options::{RecordError, RecordOptions, Target},
    targets::{GatedChild, Processes, Restarts},
};
use crate::{procmaps, tracer::Tracer};

/// A recording's state, from the attach to the profile.
pub(super) struct Recorder {
    pub opts: RecordOptions,
    pub start_ns: u64,
    /// hvprof's own CPU time when the recording starts (the programs are
    /// attached), and after the stop what it used meanwhile.
    pub start_cpu_ns: u64,
    pub self_cpu_ns: u64,
    pub started_unix_ms: u64,
    pub processes: Processes,
    pub vms: Vec<(Event, Option<String>)>,
    /// `--attribute vm`: the calls that got a token, in order.
    pub calls: Vec<crate::profile::CallToken>,
    /// `--attribute vm`: the kernel's VMs by domain UUID, for the calls on a
    /// domain.
    pub vm_uuids: Option<aya::maps::HashMap<aya::maps::MapData, [u8; 16], u32>>,
    target_pids: HashSet<u32>,
    /// Every `-p` target has exited.
    targets_gone: bool,
    /// The tracers actually attached.
    pub tracers: Vec<Tracer>,
    /// The threads blocked (and alive) when the off-CPU tracer stopped.
    pub blocked_at_stop: HashSet<u32>,
    /// `--comm`: when the target restarted.
    pub restarts: Restarts,
    /// The uprobe links, detached together at the stop.
    pub uprobe_links: Vec<(&'static str, aya::programs::uprobe::UProbeLinkId)>,
    /// libvirt's USDT probes' links, detached when the recording goes.
    pub usdt_links: Vec<std::os::fd::OwnedFd>,
    /// The QEMU monitor messages, paired (the libvirt tracer).
    pub qmp: Option<super::qmp::Qmp>,
    /// What [`Recorder::qmp`] paired after the last flush, at the stop.
    pub qmp_at_stop: Vec<crate::profile::LibvirtCall>,
    /// The system-call dispatch's links, while it runs.
    pub dispatch_links: Vec<(&'static str, aya::programs::tp_btf::BtfTracePointLinkId)>,
    /// When the system-call programs move to the calls' own tracepoints
    /// (`--syscall-dispatch-for` after the start), until they do.
    pub syscall_switch_at: Option<Instant>,
    /// Since the start, when they moved.
    pub per_call_since_ns: Option<u64>,
    /// Their links there, detached at the stop.
    pub per_call_links: Vec<aya::programs::trace_point::TracePointLink>,
    pub ring_losses: u64,
    /// Snapshots to take again: at exec only the binary and the dynamic
    /// loader are mapped, the libraries come a moment later.
    resnap: Vec<(Instant, u32)>,
    /// What the unwind-table loader did, kept at the stop.
    pub unwind_stats: Option<crate::unwind::procs::LoaderStats>,
    /// `--verify-unwind`: checks the sampled walks.
    pub verifier: Option<crate::unwind::verify::Verifier>,
    /// The kernel's data symbols, to name static locks: read at the first
    /// lock wait drained.
    pub data_symbols: std::cell::OnceCell<std::collections::HashMap<u64, String>>,
}

/// Why the recording stopped.
#[derive(Clone, Debug)]
pub(super) enum Stop {
    Duration,
    Signal(&'static str),
    TargetExited(String),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Duration => f.write_str("duration reached"),
            Self::Signal(s) => write!(f, "{s}"),
            Self::TargetExited(s) => write!(f, "target exited ({s})"),
        }
    }
}

/// How long the event loop's work beside a flush or a load waits for the
/// ring at a time: the work's end is noticed this late at most.
const SERVE_EVERY: Duration = Duration::from_millis(5);

fn runtime_err(step: &'static str) -> impl FnOnce(io::Error) -> RecordError {
    move |source| RecordError::Runtime { step, source }
}

impl Recorder {
    pub fn new(
        opts: RecordOptions,
        unwind: Option<crate::unwind::procs::Loader>,
        verifier: Option<crate::unwind::verify::Verifier>,
    ) -> Self {
        Self {
            start_ns: super::monotonic_ns(),
            start_cpu_ns: 0,
            self_cpu_ns: 0,
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)),
            processes: Processes::with_unwinder(unwind),
            vms: Vec::new(),
            calls: Vec::new(),
            vm_uuids: None,
            target_pids: match &opts.target {
                Target::Pids(p) => p.iter().copied().collect(),
                _ => HashSet::new(),
            },
            targets_gone: false,
            tracers: Vec::new(),
            blocked_at_stop: HashSet::new(),
            uprobe_links: Vec::new(),
            usdt_links: Vec::new(),
            qmp: None,
            qmp_at_stop: Vec::new(),
            dispatch_links: Vec::new(),
            syscall_switch_at: None,
            per_call_since_ns: None,
            per_call_links: Vec::new(),
            restarts: Restarts::default(),
            ring_losses: 0,
            resnap: Vec::new(),
            unwind_stats: None,
            verifier,
            data_symbols: std::cell::OnceCell::new(),
            opts,
        }
    }

    /// Runs until the stop, flushing as it goes, and says why it came.
    pub fn run_loop(
        &mut self,
        events: &mut RingBuf<MapData>,
        gated: Option<&mut GatedChild>,
        bpf: &mut Ebpf,
        flusher: &mut Flusher,
    ) -> Result<Stop, RecordError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(runtime_err("creating its runtime"))?;
        rt.block_on(self.wait_for_stop(events, gated, bpf, flusher))
    }

    async fn wait_for_stop(
        &mut self,
        events: &mut RingBuf<MapData>,
        mut gated: Option<&mut GatedChild>,
        bpf: &mut Ebpf,
        flusher: &mut Flusher,
    ) -> Result<Stop, RecordError> {
        use std::os::fd::AsRawFd;
        use tokio::{
            io::{Interest, unix::AsyncFd},
            signal::unix::{SignalKind, signal},
        };
        let mut sigint = signal(SignalKind::interrupt())
            .map_err(runtime_err("installing its SIGINT handler"))?;
        let mut sigterm = signal(SignalKind::terminate())
            .map_err(runtime_err("installing its SIGTERM handler"))?;
        let mut sigchld =
            signal(SignalKind::child()).map_err(runtime_err("installing its SIGCHLD handler"))?;
        // Woken by the ring buffer itself (its epoll readiness) for an
        // exec, whose snapshot is taken at once; the other events (forks,
        // exits, VMs) wait for it or for the tick, rather than waking
        // hvprof one by one. A 10 ms tick cost 1.5 % of a CPU doing
        // nothing.
        // SAFETY: the fd is the ring map's, which `events` keeps open
        // for longer than this loop (and so the AsyncFd) lives.
        let ring =
            unsafe { AsyncFd::register_with_interest(events.as_raw_fd(), Interest::READABLE) }
                .map_err(|e| RecordError::Runtime {
                    step: "watching the ring buffer",
                    source: e.into_parts().1,
                })?;
        let deadline = self.opts.duration.map(|d| tokio::time::Instant::now() + d);
        // The drain of the events that do not wake, and slow checks:
        // targets gone without an exit event (lost, or a pid that was
        // never ours).
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval_at(
            tokio::time::Instant::now() + self.opts.flush_interval,
            self.opts.flush_interval,
        );
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let resnap_at = self.resnap.iter().map(|&(at, _)| at).min();
            let resnap = async {
                match resnap_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let switch_at = self.syscall_switch_at;
            let switch = async {
                match switch_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let mut slow = false;
            tokio::select! {
                _ = sigint.recv() => return Ok(Stop::Signal("SIGINT")),
                _ = sigterm.recv() => return Ok(Stop::Signal("SIGTERM")),
                () = sleep => return Ok(Stop::Duration),
                ready = ring.readable() => {
                    // Cleared before the drain: an event committed during
                    // it makes the fd ready again, so none waits.
                    ready.map_err(runtime_err("waiting for the ring buffer"))?.clear_ready();
                    self.drain_events(events);
                }
                () = resnap => self.resnapshot_due(),
                () = switch => self.switch_syscalls(bpf, events),
                _ = sigchld.recv() => {}
                _ = tick.tick() => {
                    self.drain_events(events);
                    if let Some(q) = &mut self.qmp {
                        q.read();
                    }
                    self.drain_verifier(false);
                    slow = true;
                }
                _ = flush.tick() => {
                    // The processes and VMs first: the flush writes them.
                    self.drain_events(events);
                    flusher.flush(self, bpf, events)?;
                }
            }
            if let Some(stop) = self.targets_stop(gated.as_deref_mut(), slow) {
                return Ok(stop);
            }
        }
    }

    /// The stop, if the targets are gone: the `-- CMD` exited, or every
    /// `-p` pid (checked on `slow` turns, for pids gone without an exit
    /// event).
    fn targets_stop(&mut self, gated: Option<&mut GatedChild>, slow: bool) -> Option<Stop> {
        if let Some(g) = gated
            && let Some(status) = g.try_wait()
        {
            return Some(Stop::TargetExited(status.to_string()));
        }
        if self.targets_gone
            || (slow
                && !self.target_pids.is_empty()
                && self.target_pids.iter().all(|&p| !procmaps::alive(p)))
        {
            return Some(Stop::TargetExited("every target pid is gone".to_owned()));
        }
        None
    }

    /// `--syscall-dispatch-for` is up: the system-call programs move to the
    /// calls' own tracepoints; if they cannot, they stay on the dispatch
    /// (with a warning).
    fn switch_syscalls(&mut self, bpf: &mut Ebpf, ring: &mut RingBuf<MapData>) {
        self.syscall_switch_at = None;
        let hooks = super::attach::per_call_hooks(&self.tracers, &self.opts);
        let mut dispatch = std::mem::take(&mut self.dispatch_links);
        let switched = self
            .beside_the_loop(ring, || super::attach::load_per_call(bpf, &hooks))
            .and_then(|()| super::attach::switch_to_per_call(bpf, &hooks, &mut dispatch));
        match switched {
            Ok(links) => {
                self.per_call_links = links;
                self.per_call_since_ns = Some(super::monotonic_ns().saturating_sub(self.start_ns));
            }
            Err(e) => {
                eprintln!(
                    "hvprof: warning: the timed system calls stay on the dispatch on every system \
                     call ({e}); `hvprof check` says what this kernel lacks"
                );
                self.dispatch_links = dispatch;
            }
        }
    }

    /// Runs `work` on this thread while another does the event loop's work
    /// ([`Self::serve_events`]) until it is done: a flush's symbol lookup
    /// (blazesym's symbolizer cannot move to another thread), the load of
    /// programs. A process exec'd meanwhile is snapshotted while it lives,
    /// a QEMU started meanwhile gets its unwind tables at once.
    pub fn beside_the_loop<T>(
        &mut self,
        ring: &mut RingBuf<MapData>,
        work: impl FnOnce() -> T,
    ) -> T {
        use std::{
            panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
            sync::atomic::{AtomicBool, Ordering},
        };
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let server = s.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    self.serve_events(ring, SERVE_EVERY);
                }
            });
            let result = catch_unwind(AssertUnwindSafe(work));
            done.store(true, Ordering::Release);
            if let Err(panic) = server.join() {
                resume_unwind(panic);
            }
            result.unwrap_or_else(|panic| resume_unwind(panic))
        })
    }

    /// The event loop's work while a flush keeps it from the loop: waits
    /// up to `wait` for the ring, handles its events, takes the snapshots
    /// due and checks the walks sent.
    pub fn serve_events(&mut self, ring: &mut RingBuf<MapData>, wait: Duration) {
        use std::os::fd::AsRawFd;
        let mut fd = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, the ring's fd, open while `ring` lives.
        unsafe { libc::poll(&raw mut fd, 1, ms) };
        self.drain_events(ring);
        self.resnapshot_due();
        self.drain_verifier(false);
    }

    /// Whether a snapshot of `tgid` is due (after its exec, or a mapping
    /// the kernel announced).
    pub fn snapshot_due(&self, tgid: u32) -> bool {
        self.resnap.iter().any(|&(_, t)| t == tgid)
    }

    /// Takes the snapshots that are due again (a snapshot equal to the
    /// last one is not kept twice).
    fn resnapshot_due(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        self.resnap.retain(|&(at, tgid)| {
            if at <= now {
                due.push(tgid);
                false
            } else {
                true
            }
        });
        for tgid in due {
            if !self.processes.snapshot(tgid) {
                continue;
            }
            // Unchanged mappings may have new JIT code (QEMU registers
            // its TCG buffer once the accelerator starts).
            self.processes.reload_unwind(tgid);
        }
    }

    /// Handles every pending ring-buffer event. Exec and fork events are
    /// acted on at once: the snapshot of a short-lived process must be taken
    /// while it lives.
    pub fn drain_events(&mut self, ring: &mut RingBuf<MapData>) {
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<Event>() {
                // SAFETY: the kernel wrote an Event (plain old data) here;
                // read_unaligned copes with any alignment.
                events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
            }
        }
        for ev in events {
            self.handle(ev);
        }
    }

    /// `--verify-unwind`: checks the walks sent since the last drain, each
    /// with its process's mappings (a forked child's are its parent's
    /// until it execs). After `drain_events`, so that a new process is
    /// known; `last` after the stop.
    pub fn drain_verifier(&mut self, last: bool) {
        let processes = &self.processes;
        if let Some(v) = &mut self.verifier {
            v.drain(|tgid| processes.chain(tgid), last);
        }
    }

    fn handle(&mut self, ev: Event) {
        let rel = ev.ts_ns.saturating_sub(self.start_ns);
        match ev.kind {
            k if k == EventKind::Exec as u32 => self.on_exec(&ev, rel),
            k if k == EventKind::Fork as u32 => self.on_fork(&ev, rel),
            k if k == EventKind::UnwindTables as u32 => {
                // A process the unwinder met without its mappings (a child
                // that exec'd, or a dlopen), or in code without a table
                // (JIT code registered since): read them again.
                if !self.processes.snapshot(ev.tgid) {
                    self.processes.learn(ev.tgid);
                }
                self.processes.reload_unwind(ev.tgid);
            }
            k if k == EventKind::UnwindMapping as u32 => self.on_mapping(ev.tgid),
            k if k == EventKind::Exit as u32 => self.on_exit(&ev, rel),
            k if k == EventKind::VmCreated as u32 => {
                let cmdline = procmaps::cmdline(ev.tgid);
                if let (Some(map), Some(uuid)) = (
                    self.vm_uuids.as_mut(),
                    cmdline.as_deref().and_then(procmaps::qemu_uuid),
                ) && ev.token != 0
                {
                    // Full: that VM's later calls are unattributed.
                    let _ = map.insert(&uuid, &ev.token, 0);
                }
                self.vms.push((ev, cmdline));
            }
            k if k == EventKind::CallStarted as u32 => {
                self.calls.push(crate::profile::CallToken {
                    token: ev.token,
                    window: recorded_window(ev.window),
                    procedure: ev.child,
                    time_ns: rel,
                });
            }
            _ => self.ring_losses += 1,
        }
    }

    fn on_exec(&mut self, ev: &Event, rel: u64) {
        // A new image: nothing of the old one's mappings holds.
        if let Some(u) = &mut self.processes.unwind {
            u.forget(ev.tgid);
        }
        self.processes.snapshot(ev.tgid);
        // Again once the dynamic loader has mapped the libraries
        // (a short-lived process may be gone by the later one), and
        // after early dlopens (QEMU's accelerator modules). A process
        // alive at the stop gets its last snapshot then; each read of
        // a QEMU's maps costs about 0.5 ms.
        let now = Instant::now();
        for ms in [20, 300] {
            self.resnap.push((now + Duration::from_millis(ms), ev.tgid));
        }
        let cmdline = procmaps::cmdline(ev.tgid);
        let comm = comm_str(&ev.comm);
        self.restarts.exec(ev.tgid, &comm, rel);
        let p = self.processes.entry(ev.tgid);
        p.exec_ns = Some(rel);
        p.exec_window = recorded_window(ev.window);
        p.comm = comm;
        if cmdline.is_some() {
            p.cmdline = cmdline;
        }
    }

    fn on_fork(&mut self, ev: &Event, rel: u64) {
        // A parent born during the recording (forked or exec'd) is
        // symbolized from its lineage's snapshots: reading its maps
        // again (a libvirtd child forking once more) adds nothing.
        let born_here = self
            .processes
            .info
            .get(&ev.tgid)
            .is_some_and(|p| p.parent.is_some() || p.exec_ns.is_some());
        if !born_here && !self.processes.snapshots.contains_key(&ev.tgid) {
            self.processes.learn(ev.tgid);
        }
        // A thread's "child" is in the same thread group: skip it.
        if procmaps::exe(ev.child).is_some()
            && std::fs::read_to_string(format!("/proc/{}/status", ev.child))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Tgid:"))
                        .and_then(|v| v.trim().parse::<u32>().ok())
                })
                .is_some_and(|tgid| tgid == ev.tgid)
        {
            return;
        }
        self.restarts.fork(ev.tgid, ev.child);
        let comm = comm_str(&ev.comm);
        let p = self.processes.entry(ev.child);
        p.parent = Some(ev.tgid);
        p.forked_ns = Some(rel);
        p.fork_window = recorded_window(ev.window);
        if p.comm.is_empty() {
            p.comm = comm;
        }
    }

    /// A library mapped executable: its mappings are read again once the
    /// loader is done (a dlopen maps a few segments, an exec'd process's
    /// loader dozens of libraries within a few ms). The kernel announces no
    /// other mapping of the process for `MAPPING_SETTLE_NS`, so the read
    /// must come after that: one already due then (an exec's 20 ms
    /// snapshot) serves.
    fn on_mapping(&mut self, tgid: u32) {
        let settled = Instant::now() + Duration::from_nanos(MAPPING_SETTLE_NS);
        let serves = settled..=settled + Duration::from_millis(20);
        if !self
            .resnap
            .iter()
            .any(|&(at, t)| t == tgid && serves.contains(&at))
        {
            self.resnap.push((settled, tgid));
        }
    }

    fn on_exit(&mut self, ev: &Event, rel: u64) {
        if let Some(u) = &mut self.processes.unwind {
            u.forget(ev.tgid);
        }
        self.target_pids.remove(&ev.tgid);
        self.restarts.exit(ev.tgid, rel);
        if self.target_pids.is_empty() && matches!(self.opts.target, Target::Pids(_)) {
            self.targets_gone = true;
        }
        let comm = comm_str(&ev.comm);
        let p = self.processes.entry(ev.tgid);
        p.exit_ns = Some(rel);
        if p.comm.is_empty() {
            p.comm = comm;
        }
    }
}
