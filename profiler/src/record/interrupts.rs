//! Ctrl-C and SIGTERM, counted from the start: the first stops the
//! recording (the event loop sees it too), and everything recorded is
//! written; a second, from an impatient user, only says that hvprof is
//! writing and what one more would lose; a third aborts, saying what is
//! lost. Before the recording starts, the first aborts: nothing is
//! recorded yet.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    thread::JoinHandle,
};

/// How far the recording is, which says what an abort loses.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Loading and attaching: nothing is recorded yet.
    Starting = 0,
    Recording = 1,
    /// Stopped: draining, symbolizing, writing the profile.
    Writing = 2,
    /// The profile is written; its flame graphs and tables are being.
    Rendering = 3,
    /// Every file is written.
    Written = 4,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Starting,
            1 => Self::Recording,
            2 => Self::Writing,
            3 => Self::Rendering,
            _ => Self::Written,
        }
    }
}

/// Watches for Ctrl-C and SIGTERM in a thread of its own until dropped.
pub(super) struct Interrupts {
    phase: Arc<AtomicU8>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Interrupts {
    /// Starts watching; `output` is where the recording goes, `profile`
    /// the profile file in it. Without a way to watch (no runtime), the
    /// first signal still stops the recording: only the later ones go
    /// unanswered.
    pub fn watch(output: &Path, profile: &Path) -> Self {
        let phase = Arc::new(AtomicU8::new(Phase::Starting as u8));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let lost = Lost {
            output: output.to_path_buf(),
            profile: profile.to_path_buf(),
        };
        let watched = Arc::clone(&phase);
        let thread = std::thread::Builder::new()
            .name("hvprof-signals".to_owned())
            .spawn(move || watch(&watched, &lost, stopped))
            .ok();
        Self {
            phase,
            stop: Some(stop),
            thread,
        }
    }

    pub fn phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What an abort loses, by phase.
struct Lost {
    output: PathBuf,
    profile: PathBuf,
}

impl Lost {
    fn at(&self, phase: Phase) -> String {
        let output = self.output.display();
        match phase {
            Phase::Starting => "nothing was recorded yet".to_owned(),
            Phase::Recording | Phase::Writing => format!(
                "what was recorded since the last flush (at most --flush-interval): {profile} \
                 holds the rest, marked incomplete (`hvprof report {profile} -o {output}` reads \
                 it)",
                profile = self.profile.display()
            ),
            Phase::Rendering => format!(
                "{profile} is written whole, but not all of its flame graphs and tables \
                 (`hvprof report {profile} -o {output}` writes them)",
                profile = self.profile.display()
            ),
            Phase::Written => {
                "nothing: every file is written, and the kernel detaches the last probes as \
                 hvprof exits"
                    .to_owned()
            }
        }
    }
}

/// The exit status of a process ended by SIGINT, as shells report it.
const ABORTED: i32 = 130;

fn watch(phase: &AtomicU8, lost: &Lost, mut stopped: tokio::sync::oneshot::Receiver<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        let mut count = 0;
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            count += 1;
            let now = Phase::from_u8(phase.load(Ordering::SeqCst));
            match (now, count) {
                (Phase::Starting, _) | (_, 3..) => {
                    eprintln!("hvprof: aborted; lost: {}", lost.at(now));
                    std::process::exit(ABORTED);
                }
                (_, 1) => {}
                (_, _) => eprintln!(
                    "hvprof: stopping: writing everything recorded to {}; Ctrl-C once more \
                     aborts, and loses {}",
                    lost.output.display(),
                    lost.at(now)
                ),
            }
        }
    });
}
