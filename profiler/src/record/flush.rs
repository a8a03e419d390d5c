//! Flushing: every `--flush-interval` while recording, what the programs
//! wrote since the last flush is drained from the kernel's maps,
//! symbolized, and appended to the profile file as one record (see
//! [`crate::profile::Record`]). So a killed recording loses only its last
//! interval, the kernel's maps hold what two intervals add however long
//! the recording runs, and the stop has little left to do. At the stop the
//! rest is drained, everything is added up, and the file is replaced by the
//! whole profile.

use std::time::{Duration, Instant};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};

use super::{
    assemble,
    drain::{self, Drained, Seen, Take},
    events::{Recorder, Stop},
    monotonic_ns,
    options::{RecordError, Target},
    symbolize::{Frames, StackStore},
};
use crate::profile::{self, Profile, ProfileLog, Record, merge::Rows};

/// `HVPROF_TEST_SLOW_LOOKUP_MS`: makes each flush's symbol lookup take
/// that much longer, as a first flush does on a slow machine or a flush of
/// hundreds of QEMUs, for the tests of what goes on meanwhile.
fn slow_lookup_for_tests() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let ms = std::env::var("HVPROF_TEST_SLOW_LOOKUP_MS").ok()?;
        ms.parse().ok().map(Duration::from_millis)
    })
}

/// The recording's file, and what has been drained into it.
pub(super) struct Flusher {
    log: ProfileLog,
    frames: Frames,
    stacks: StackStore,
    seen: Seen,
    /// The rows of the flushes whose record could not be appended (the
    /// others are read back from the file at the stop).
    unwritten: Rows,
    /// This flush expires the stacks no program can name again.
    expire_stacks: bool,
    /// The flush parity the programs write under now.
    parity: bool,
    vms_written: usize,
    /// `--attribute vm`: the calls with a token written so far.
    calls_written: usize,
    /// Since the start: when the last flush flipped the parity.
    last_flip_ns: u64,
    /// An append failed (and said so): a kill may lose the recording.
    append_failed: bool,
    flushes: u64,
    /// The time spent flushing.
    busy: Duration,
}

impl Flusher {
    /// Creates the profile file with what the recording is.
    pub fn create(rec: &Recorder) -> Result<Self, RecordError> {
        let path = rec.opts.output.join(profile::FILE_NAME);
        let first = Record {
            until_ns: 0,
            last: false,
            part: Profile {
                meta: assemble::meta(rec, "recording".to_owned(), 0),
                windows: rec.opts.windows.windows(0),
                ..Profile::default()
            },
        };
        Ok(Self {
            log: ProfileLog::create(&path, &first)?,
            frames: Frames::new(
                matches!(rec.opts.target, Target::All),
                rec.opts.kernel_stack_min_block,
            ),
            stacks: StackStore::default(),
            seen: Seen::default(),
            unwritten: Rows::default(),
            expire_stacks: false,
            parity: false,
            vms_written: 0,
            calls_written: 0,
            last_flip_ns: 0,
            append_failed: false,
            flushes: 0,
            busy: Duration::ZERO,
        })
    }

    /// Drains what the programs wrote under the parity until now and
    /// appends it to the file.
    pub fn flush(
        &mut self,
        rec: &mut Recorder,
        bpf: &mut Ebpf,
        ring: &mut RingBuf<MapData>,
    ) -> Result<(), RecordError> {
        let started = Instant::now();
        // Before the flip: what the programs hold then may be in any row
        // drained from now on.
        let held = if self.expire_stacks {
            Some(drain::held_stacks(bpf)?)
        } else {
            None
        };
        let inactive = self.parity;
        self.parity = !self.parity;
        drain::flip(bpf, self.parity)?;
        let flip_ns = monotonic_ns().saturating_sub(rec.start_ns);
        let mut drained = drain::drain(
            rec,
            bpf,
            Take::Parity(inactive),
            &mut self.seen,
            &mut self.stacks,
        )?;
        // The QMP messages paired since the last flush go with it.
        if let Some(q) = &mut rec.qmp {
            q.read();
            drained.libvirt.extend(q.take());
        }
        // The mappings of the processes with rows that may have mapped a
        // library since their last snapshot (a dlopen not settled yet), read
        // again now: its frames must symbolize. With `--unwind dwarf` the
        // kernel announces every executable mapping of a process it knows,
        // and the snapshot follows: only a process with a snapshot still due,
        // or none, is read. Reading every QEMU's maps at every flush was most
        // of a flush's time with a hundred of them.
        let drained_at = started.elapsed();
        let mut tgids: Vec<u32> = drained.triples().iter().map(|t| t.0).collect();
        tgids.sort_unstable();
        tgids.dedup();
        let announced = rec.processes.unwind.is_some();
        for tgid in tgids {
            if !announced || rec.snapshot_due(tgid) || !rec.processes.snapshots.contains_key(&tgid)
            {
                rec.processes.snapshot(tgid);
            }
        }
        let snapshots_at = started.elapsed();
        self.look_up_beside_the_loop(rec, ring, &drained);
        let looked_up_at = started.elapsed();
        let mut record = Record {
            until_ns: flip_ns,
            last: false,
            part: assemble::part(rec, &mut drained, &mut self.frames, &self.stacks),
        };
        let assembled_at = started.elapsed();
        let vms = assemble::vms(rec);
        record.part.windows = rec.opts.windows.windows(vms.len() as u64);
        record.part.vms = vms.into_iter().skip(self.vms_written).collect();
        self.vms_written += record.part.vms.len();
        record.part.calls = rec.calls[self.calls_written.min(rec.calls.len())..].to_vec();
        self.calls_written = rec.calls.len();
        record.part.processes = rec.processes.take_changed();
        if let Some(held) = held {
            self.stacks.expire(&held);
        }
        self.expire_stacks = self.stacks.flushed();
        if let Err(e) = self.log.append(&mut record, self.frames.names()) {
            // The rows stay in memory and are written at the stop.
            if !self.append_failed {
                eprintln!(
                    "hvprof: warning: {e}; recording goes on, but until the stop writes the \
                     profile a kill would lose what is not written"
                );
            }
            self.append_failed = true;
            self.unwritten.add(&mut record.part);
        }
        // What a process that exited before the last flip left in the
        // maps is drained now: its mappings are needed no more.
        rec.processes.forget_exited_before(self.last_flip_ns);
        self.last_flip_ns = flip_ns;
        crate::sys::release_free_heap();
        crate::sys::release_mapped_files();
        self.flushes += 1;
        self.busy += started.elapsed();
        let ms = |from: Duration, to: Duration| to.saturating_sub(from).as_secs_f64() * 1e3;
        super::timing_detail(&format!(
            "flush {}: drain {:.1} ms, snapshots {:.1} ms, symbols {:.1} ms, rows {:.1} ms, \
             append {:.1} ms",
            self.flushes,
            ms(Duration::ZERO, drained_at),
            ms(drained_at, snapshots_at),
            ms(snapshots_at, looked_up_at),
            ms(looked_up_at, assembled_at),
            ms(assembled_at, started.elapsed()),
        ));
        Ok(())
    }

    /// Looks up the symbols of `drained`'s stacks on another thread (the
    /// first flush reads kallsyms and every ELF file, a flush of hundreds
    /// of QEMUs reads their frames again: up to a second), while this one
    /// goes on handling the recording's events. A process exec'd meanwhile
    /// must be snapshotted while it lives, and a QEMU started meanwhile
    /// needs its unwind tables loaded: its stacks would be cut till then.
    fn look_up_beside_the_loop(
        &mut self,
        rec: &mut Recorder,
        ring: &mut RingBuf<MapData>,
        drained: &Drained,
    ) {
        let lookups = self
            .frames
            .lookups(&rec.processes, &self.stacks, &drained.triples());
        let read_data_symbols = !drained.locks.is_empty() && rec.data_symbols.get().is_none();
        let frames = &mut self.frames;
        let data_symbols = rec.beside_the_loop(ring, || {
            if let Some(d) = slow_lookup_for_tests() {
                std::thread::sleep(d);
            }
            frames.look_up(&lookups);
            read_data_symbols.then(assemble::read_data_symbols)
        });
        if let Some(d) = data_symbols {
            let _ = rec.data_symbols.set(d);
        }
    }

    /// Drains the rest of the frozen recording and adds everything up.
    pub fn finish(
        mut self,
        rec: &Recorder,
        bpf: &mut Ebpf,
        stop: &Stop,
        stop_ns: u64,
    ) -> Result<Profile, RecordError> {
        let started = Instant::now();
        // The flushes' rows are read back from the file (every CPU decodes
        // records) while the rest is drained and symbolized here.
        let log = &self.log;
        let (rows, part) = std::thread::scope(|scope| {
            let read_back = scope.spawn(|| {
                let rows = log.rows();
                (rows, started.elapsed())
            });
            let part = (|| {
                let mut drained = drain::drain(
                    rec,
                    bpf,
                    Take::Rest { stop_ns },
                    &mut self.seen,
                    &mut self.stacks,
                )?;
                drained.libvirt.extend(rec.qmp_at_stop.iter().cloned());
                let lookups = self
                    .frames
                    .lookups(&rec.processes, &self.stacks, &drained.triples());
                self.frames.look_up(&lookups);
                let part = assemble::part(rec, &mut drained, &mut self.frames, &self.stacks);
                Ok::<_, RecordError>((part, drained, started.elapsed()))
            })();
            let read_back = read_back
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (read_back, part)
        });
        let (rows, read_ms) = rows;
        let (mut part, mut drained, rest_ms) = part?;
        let mut rows = rows?;
        super::timing_detail(&format!(
            "{} flushed records read back in {} ms, beside the rest drained and symbolized in {} ms",
            self.flushes,
            read_ms.as_millis(),
            rest_ms.as_millis()
        ));
        for part in [&mut self.unwritten.into_profile_part(), &mut part] {
            rows.add(part);
        }
        let mut profile = assemble::profile(rec, rows, &self.frames, &mut drained, stop, stop_ns);
        super::timing_detail(&format!(
            "profile assembled: {} ms",
            started.elapsed().as_millis()
        ));
        let counters = &mut profile.meta.counters;
        counters.insert("flushes while recording".to_owned(), self.flushes);
        if let Some(ns) = rec.per_call_since_ns {
            counters.insert(
                "system calls timed on their own tracepoints from: ms".to_owned(),
                ns / 1_000_000,
            );
        }
        let (stacks, frames, expired) = self.stacks.kept();
        counters.insert("stacks kept for the programs' reuse".to_owned(), stacks);
        counters.insert(
            "stacks kept for the programs' reuse: frames".to_owned(),
            frames,
        );
        counters.insert("stacks dropped: no program held them".to_owned(), expired);
        let (addresses, names) = self.frames.kept();
        counters.insert("symbolizer: addresses kept".to_owned(), addresses as u64);
        counters.insert("symbolizer: names kept".to_owned(), names as u64);
        counters.insert(
            "flushes while recording: ms".to_owned(),
            u64::try_from(self.busy.as_millis()).unwrap_or(u64::MAX),
        );
        Ok(profile)
    }
}
