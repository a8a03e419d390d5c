//! The profile on disk.
//!
//! The 8-byte magic `HVPROF\0\n` and a little-endian `u32` format version,
//! then (version 2) records, each a little-endian `u32` length, the CRC-32
//! of the bytes that follow, and that many bytes: the gzip-compressed JSON
//! of a [`Record`]. `record` appends one record when it starts and one at
//! every flush while it records, each holding what was drained since the
//! last; at the stop it reads their rows back (it does not keep them in
//! memory while it records), adds the last part, and replaces the whole
//! file with a single last record (the merged profile). A recording that was killed leaves the records it
//! appended: the reader adds them up, stops at the first incomplete or
//! damaged one, and marks the profile incomplete ([`Incomplete`]).
//!
//! Version 1 (before records): the gzip-compressed JSON of a [`Profile`].

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{Incomplete, Profile, merge::Rows};

pub const MAGIC: &[u8; 8] = b"HVPROF\0\n";
/// Bumped on every incompatible change of the file or of [`Profile`].
pub const FORMAT_VERSION: u32 = 2;
/// The version before records: one gzip-compressed JSON [`Profile`].
const FORMAT_VERSION_WHOLE: u32 = 1;
/// The conventional file name inside a recording directory.
pub const FILE_NAME: &str = "profile.hvprof";

#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write profile {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not an hvprof profile (it does not start with the hvprof magic); pass the profile.hvprof written by `hvprof record`"
    )]
    Foreign { path: PathBuf },
    #[error(
        "{path} is a profile of format version {found}, this hvprof reads versions {FORMAT_VERSION_WHOLE} and {FORMAT_VERSION}; use the hvprof that recorded it, or record again"
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "{path} is truncated or corrupt ({why}); it cannot be read — record again, or re-copy the file"
    )]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "{path} inflates to more than {limit_mib} MiB, the most hvprof reads of a profile (real ones are far smaller: the file is likely corrupt or not a profile); to read it anyway, set {MAX_INFLATED_ENV} to a larger number of MiB"
    )]
    TooLarge { path: PathBuf, limit_mib: u64 },
}

/// The environment variable that raises [`DEFAULT_MAX_INFLATED_MIB`].
pub const MAX_INFLATED_ENV: &str = "HVPROF_MAX_PROFILE_MIB";

/// The most a profile's JSON may inflate to, in MiB: profiles travel (CI
/// baselines, bug reports), so a small file must not make the reader
/// allocate without bound (4 GiB of zeros gzip to 4 MB). The sample workload's
/// profile inflates to 17 KB.
pub const DEFAULT_MAX_INFLATED_MIB: u64 = 1024;

/// [`DEFAULT_MAX_INFLATED_MIB`], or what [`MAX_INFLATED_ENV`] says.
fn max_inflated_mib() -> u64 {
    std::env::var(MAX_INFLATED_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_INFLATED_MIB)
}

/// One record of a version-2 file: a part of the recording.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    /// Since the start of the recording: what happened up to here is in
    /// this record and the ones before it.
    pub until_ns: u64,
    /// The record of a recording that ended normally: nothing follows.
    pub last: bool,
    /// The part: its frames are appended to the frame table of the records
    /// before it (its stacks index the whole table); its rows, losses and
    /// VMs are added; its processes replace those of the same pid; its
    /// windows, when it has any, and its meta, in the first and the last
    /// record, replace what came before.
    pub part: Profile,
}

/// [`Record`] as written, borrowing its part (a whole profile is not
/// copied to be written).
#[derive(Serialize)]
struct RecordRef<'a> {
    until_ns: u64,
    last: bool,
    part: &'a Profile,
}

impl<'a> From<&'a Record> for RecordRef<'a> {
    fn from(r: &'a Record) -> Self {
        Self {
            until_ns: r.until_ns,
            last: r.last,
            part: &r.part,
        }
    }
}

/// A record's frame: length and CRC-32, little-endian.
const RECORD_HEAD: usize = 8;

fn encode_record(record: &RecordRef<'_>) -> io::Result<Vec<u8>> {
    // Buffered in front of the encoder: serde writes a few bytes at a
    // time, and each write into the encoder zeroed its 32 KiB output buffer
    // (a quarter of a 50-guest recording's CPU, after the stop).
    let mut gz = BufWriter::with_capacity(
        1 << 16,
        // Level 3: a third of level 6's time (0.22 s against 0.63 s for a
        // 10-minute `-a` recording's 42 MB of JSON) for a file a quarter
        // larger; the stop waits for it.
        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(3)),
    );
    serde_json::to_writer(&mut gz, record).map_err(io::Error::other)?;
    let payload = gz
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?
        .finish()?;
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::other("a profile record larger than 4 GiB"))?;
    let mut crc = flate2::Crc::new();
    crc.update(&payload);
    let mut out = Vec::with_capacity(RECORD_HEAD + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn header() -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// A profile being recorded: the file `record` appends to as it goes, so
/// that a kill loses only what was not yet flushed.
#[derive(Debug)]
pub struct ProfileLog {
    path: PathBuf,
    file: File,
    /// Frames already written: a record carries only the new ones.
    frames_written: usize,
    pub bytes: u64,
}

impl ProfileLog {
    /// Creates `path` with the header and a first record holding `meta`
    /// (what was asked, where: known before anything is recorded).
    pub fn create(path: &Path, first: &Record) -> Result<Self, ProfileError> {
        let err = |source| ProfileError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::create(path).map_err(err)?;
        file.write_all(&header()).map_err(err)?;
        let mut log = Self {
            path: path.to_path_buf(),
            file,
            frames_written: 0,
            bytes: 12,
        };
        log.append(&mut first.clone(), &[])?;
        Ok(log)
    }

    /// Appends a record; `frames` is the whole frame table so far, of which
    /// the record carries the frames not yet written (its own are
    /// replaced). Written with one `write`: a kill leaves a whole record or
    /// a short one, which the reader leaves out.
    pub fn append(&mut self, record: &mut Record, frames: &[String]) -> Result<(), ProfileError> {
        let err = |source| ProfileError::Write {
            path: self.path.clone(),
            source,
        };
        record.part.frames = frames
            .get(self.frames_written..)
            .unwrap_or_default()
            .to_vec();
        let bytes = encode_record(&RecordRef::from(&*record)).map_err(err)?;
        record.part.frames.clear();
        if let Err(e) = self.file.write_all(&bytes) {
            // What a short write left is cut off again, so that the file
            // holds exactly the records appended (the caller keeps this
            // one's rows).
            let _ = self.file.set_len(self.bytes);
            let _ = self.file.seek(SeekFrom::Start(self.bytes));
            return Err(err(e));
        }
        self.frames_written = frames.len();
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// The rows of every record appended so far, added up: the writer's
    /// read-back at the stop, so that it need not keep them in memory while
    /// it records.
    pub fn rows(&self) -> Result<Rows, ProfileError> {
        let file = File::open(&self.path).map_err(|source| ProfileError::Read {
            path: self.path.clone(),
            source,
        })?;
        let mut input = BufReader::new(file).take(self.bytes);
        let mut head = [0u8; 12];
        read_full(&mut input, &mut head).map_err(|source| ProfileError::Read {
            path: self.path.clone(),
            source,
        })?;
        let reader = Reader {
            path: &self.path,
            budget: max_inflated_mib().saturating_mul(1 << 20),
            limit_mib: max_inflated_mib(),
        };
        // The records' bytes first (compressed: a few MB); then inflated
        // and parsed on every CPU, a few at a time (parsed rows take far
        // more room than merged ones), and added up in order.
        let mut payloads = Vec::new();
        loop {
            match record_payload(&mut input) {
                Ok(Some(p)) => payloads.push(p),
                Ok(None) => break,
                Err(RecordFault::Fatal(e)) => return Err(e),
                Err(RecordFault::Cut) => {
                    return Err(reader.corrupt("a record was cut short".to_owned()));
                }
                Err(RecordFault::Damaged(why)) => return Err(reader.corrupt(why)),
            }
        }
        let mut rows = Rows::default();
        let batch = 2 * std::thread::available_parallelism().map_or(1, usize::from);
        for some in payloads.chunks(batch) {
            let parts = crate::render::parallel_map(some, |p| {
                let json = reader.inflate_alone(&p[..])?;
                serde_json::from_slice::<Record>(&json).map_err(|e| reader.corrupt(e.to_string()))
            })?;
            for mut r in parts {
                rows.add(&mut r.part);
            }
        }
        Ok(rows)
    }
}

impl Profile {
    /// Writes the profile as one last record (atomically: to a temporary
    /// name, then renamed, so that it replaces a recording's records only
    /// once it is whole).
    pub fn write(&self, path: &Path) -> Result<(), ProfileError> {
        let err = |source| ProfileError::Write {
            path: path.to_path_buf(),
            source,
        };
        let record = RecordRef {
            until_ns: self.meta.duration_ns,
            last: true,
            part: self,
        };
        let bytes = encode_record(&record).map_err(err)?;
        let tmp = path.with_extension("hvprof.tmp");
        let mut file = File::create(&tmp).map_err(err)?;
        file.write_all(&header()).map_err(err)?;
        file.write_all(&bytes).map_err(err)?;
        file.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// [`Profile::read`] for a command that uses the profile: one whose
    /// recording has no end is read, with a warning naming the window cut
    /// short.
    pub fn open(path: &Path) -> Result<Self, ProfileError> {
        let p = Self::read(path)?;
        if let Some(w) = p.incomplete_warning() {
            eprintln!("hvprof: warning: {}: {w}", path.display());
        }
        Ok(p)
    }

    /// Reads a profile, rejecting foreign, newer and damaged files with an
    /// error that says which.
    pub fn read(path: &Path) -> Result<Self, ProfileError> {
        let file = File::open(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_reader(BufReader::new(file), path)
    }

    pub fn from_reader(mut input: impl Read, path: &Path) -> Result<Self, ProfileError> {
        let mut head = [0u8; 12];
        let got = read_full(&mut input, &mut head).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if got < MAGIC.len() || &head[..8] != MAGIC {
            return Err(ProfileError::Foreign {
                path: path.to_path_buf(),
            });
        }
        let mut reader = Reader {
            path,
            budget: max_inflated_mib().saturating_mul(1 << 20),
            limit_mib: max_inflated_mib(),
        };
        if got < head.len() {
            return Err(reader.corrupt("it ends inside the header".to_owned()));
        }
        let profile: Self = match u32::from_le_bytes([head[8], head[9], head[10], head[11]]) {
            FORMAT_VERSION => reader.records(input)?,
            FORMAT_VERSION_WHOLE => {
                let json = reader.inflate(input)?;
                serde_json::from_slice(&json).map_err(|e| reader.corrupt(e.to_string()))?
            }
            found => {
                return Err(ProfileError::Version {
                    path: path.to_path_buf(),
                    found,
                });
            }
        };
        profile.validate(path)?;
        Ok(profile)
    }
}

/// Reads until `buf` is full or the input ends; how much was read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reading one file: what may still be inflated.
struct Reader<'a> {
    path: &'a Path,
    budget: u64,
    limit_mib: u64,
}

impl Reader<'_> {
    fn corrupt(&self, why: String) -> ProfileError {
        ProfileError::Corrupt {
            path: self.path.to_path_buf(),
            why,
        }
    }

    /// Inflates gzip data within the budget left.
    fn inflate(&mut self, input: impl Read) -> Result<Vec<u8>, ProfileError> {
        let json = self.inflate_alone(input)?;
        self.budget -= json.len() as u64;
        Ok(json)
    }

    /// Inflates gzip data within the budget left, without spending it (the
    /// writer reading back its own records, several at once).
    fn inflate_alone(&self, input: impl Read) -> Result<Vec<u8>, ProfileError> {
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(input)
            .take(self.budget.saturating_add(1))
            .read_to_end(&mut json)
            .map_err(|e| self.corrupt(e.to_string()))?;
        if json.len() as u64 > self.budget {
            return Err(ProfileError::TooLarge {
                path: self.path.to_path_buf(),
                limit_mib: self.limit_mib,
            });
        }
        Ok(json)
    }

    /// The next record; `Ok(None)` at the end of the input, `Err` with
    /// why for a record cut short or damaged.
    fn record(&mut self, input: &mut impl Read) -> Result<Option<Record>, RecordFault> {
        let Some(payload) = record_payload(input)? else {
            return Ok(None);
        };
        let json = self.inflate(&payload[..]).map_err(RecordFault::Fatal)?;
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|e| RecordFault::Damaged(e.to_string()))
    }

    /// A version-2 file: its records added up.
    fn records(&mut self, mut input: impl Read) -> Result<Profile, ProfileError> {
        let mut acc = Assembly::default();
        // Why the records ended before a last one, if the file is damaged
        // (rather than cut short).
        let damaged = loop {
            match self.record(&mut input) {
                Ok(Some(r)) => {
                    let last = r.last;
                    acc.add(r);
                    if last {
                        break None;
                    }
                }
                Ok(None) | Err(RecordFault::Cut) => break None,
                Err(RecordFault::Fatal(e)) => return Err(e),
                Err(RecordFault::Damaged(why)) => break Some(why),
            }
        };
        if acc.records == 0 {
            return Err(self.corrupt(damaged.unwrap_or_else(|| "it has no record".to_owned())));
        }
        Ok(acc.finish(damaged))
    }
}

/// The next record's compressed bytes, their checksum checked.
fn record_payload(input: &mut impl Read) -> Result<Option<Vec<u8>>, RecordFault> {
    let mut head = [0u8; RECORD_HEAD];
    match read_full(input, &mut head) {
        Ok(0) => return Ok(None),
        Ok(RECORD_HEAD) => {}
        Ok(_) => return Err(RecordFault::Cut),
        Err(e) => return Err(RecordFault::Damaged(e.to_string())),
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    // Read in steps: a length the file does not have must not allocate.
    let mut payload = Vec::new();
    let got = input
        .take(u64::from(len))
        .read_to_end(&mut payload)
        .map_err(|e| RecordFault::Damaged(e.to_string()))?;
    if got < len as usize {
        return Err(RecordFault::Cut);
    }
    let mut sum = flate2::Crc::new();
    sum.update(&payload);
    if sum.sum() != crc {
        return Err(RecordFault::Damaged(
            "a record's checksum does not match".to_owned(),
        ));
    }
    Ok(Some(payload))
}

/// Why reading records stopped early.
enum RecordFault {
    /// The input ends inside a record: the writer was killed.
    Cut,
    /// A record that is not what was written.
    Damaged(String),
    /// Nothing more may be read (the size limit).
    Fatal(ProfileError),
}

/// Records being added up into a profile.
#[derive(Default)]
struct Assembly {
    /// A file of one last record (what `record` leaves): that profile as
    /// it is.
    whole: Option<Profile>,
    profile: Profile,
    rows: Rows,
    processes: BTreeMap<u32, super::Process>,
    records: usize,
    last: bool,
    until_ns: u64,
}

impl Assembly {
    fn add(&mut self, mut r: Record) {
        if self.records == 0 && r.last {
            self.records = 1;
            self.last = true;
            self.whole = Some(r.part);
            return;
        }
        let part = &mut r.part;
        if self.records == 0 || r.last {
            self.profile.meta = std::mem::take(&mut part.meta);
        }
        self.records += 1;
        self.last = r.last;
        self.until_ns = self.until_ns.max(r.until_ns);
        self.profile.frames.append(&mut part.frames);
        self.rows.add(part);
        self.profile.vms.append(&mut part.vms);
        self.profile.calls.append(&mut part.calls);
        for p in std::mem::take(&mut part.processes) {
            self.processes.insert(p.tgid, p);
        }
        if !part.windows.is_empty() {
            self.profile.windows = std::mem::take(&mut part.windows);
        }
    }

    /// The profile; `damaged` says why the records ended without a last
    /// one, if the file is damaged rather than cut short.
    fn finish(self, damaged: Option<String>) -> Profile {
        if let Some(p) = self.whole {
            return p;
        }
        let mut p = self.profile;
        self.rows.into_profile(&mut p);
        p.processes = self.processes.into_values().collect();
        if !self.last {
            p.vms.sort_by_key(|v| v.time_ns);
            if p.windows.is_empty()
                && let Some(spec) = &p.meta.window_spec
            {
                p.windows = spec.windows(p.vms.len() as u64);
            }
            let window = p.windows.last().map(|w| w.id);
            p.meta.duration_ns = self.until_ns;
            p.meta.incomplete = Some(Incomplete {
                until_ns: self.until_ns,
                window,
                damaged,
            });
            p.meta.stop_reason = p.incomplete_warning().unwrap_or_default();
            super::attribute::resolve(&mut p);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        profile::{Meta, OnCpu, VmCreation},
        windows::WindowSpec,
    };

    fn sample() -> Profile {
        let mut frames = crate::profile::FrameTable::default();
        let main = frames.intern("main");
        let busy = frames.intern("vmload_busy");
        assert_eq!(frames.intern("main"), main);
        Profile {
            meta: Meta {
                hvprof_version: "0.1.0".into(),
                target: "pid 1".into(),
                window_spec: Some(WindowSpec::Every { size: 2 }),
                ..Meta::default()
            },
            windows: WindowSpec::Every { size: 2 }.windows(3),
            vms: vec![VmCreation {
                ordinal: 1,
                time_ns: 5,
                pid: 1,
                tid: 1,
                comm: "vmload".into(),
                source: "kvm".into(),
                cmdline: None,
                name: None,
                token: None,
            }],
            frames: frames.into_names(),
            oncpu: vec![OnCpu {
                window: 1,
                tgid: 1,
                pid: 1,
                comm: "vmload".into(),
                stack: vec![main, busy],
                samples: 7,
            }],
            ..Profile::default()
        }
    }

    #[test]
    fn round_trips() {
        let dir = std::env::temp_dir().join(format!("hvprof-profile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        let p = sample();
        p.write(&path).unwrap();
        let q = Profile::read(&path).unwrap();
        assert_eq!(p, q);
        assert_eq!(
            q.frame_names(&q.oncpu[0].stack).collect::<Vec<_>>(),
            ["main", "vmload_busy"]
        );

        // Truncated: every prefix is rejected with a clear error, not a panic.
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 4, 8, 11, 12, 20, bytes.len() / 2, bytes.len() - 1] {
            let err = Profile::from_reader(&bytes[..cut], &path)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("not an hvprof profile") || err.contains("truncated or corrupt"),
                "cut {cut}: {err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A recording's records, as `record` appends them: a first one with
    /// the meta, then parts whose rows add up and whose frames extend the
    /// table.
    fn log(path: &Path) -> (Vec<u8>, Vec<usize>) {
        let full = sample();
        let mut first = Profile {
            meta: full.meta.clone(),
            ..Profile::default()
        };
        first.meta.stop_reason = "recording".into();
        let mut log = ProfileLog::create(
            path,
            &Record {
                part: first,
                ..Record::default()
            },
        )
        .unwrap();
        let mut ends = vec![usize::try_from(log.bytes).unwrap()];
        for (i, samples) in [3, 4].into_iter().enumerate() {
            let mut part = full.clone();
            part.meta = Meta::default();
            part.oncpu[0].samples = samples;
            part.vms.truncate(i);
            let mut record = Record {
                until_ns: 1_000_000_000 * (i as u64 + 1),
                last: false,
                part,
            };
            log.append(&mut record, &full.frames).unwrap();
            ends.push(usize::try_from(log.bytes).unwrap());
        }
        (std::fs::read(path).unwrap(), ends)
    }

    #[test]
    fn a_killed_recording_reads_up_to_its_last_whole_record() {
        let dir = std::env::temp_dir().join(format!("hvprof-log-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        let (bytes, ends) = log(&path);
        // Both parts: their samples add up, the frames were written once.
        let p = Profile::read(&path).unwrap();
        assert_eq!(p.oncpu.len(), 1);
        assert_eq!(p.oncpu[0].samples, 7);
        assert_eq!(p.frames, sample().frames);
        assert_eq!(
            p.frame_names(&p.oncpu[0].stack).collect::<Vec<_>>(),
            ["main", "vmload_busy"]
        );
        let inc = p
            .meta
            .incomplete
            .as_ref()
            .expect("no last record: incomplete");
        assert_eq!(
            (inc.until_ns, inc.window, inc.damaged.as_deref()),
            (2_000_000_000, Some(2), None)
        );
        assert_eq!(p.meta.target, "pid 1");
        assert_eq!(
            p.meta.stop_reason,
            "the recording has no end: it holds the first 2.00 s and window 2 (VMs 3–4) is incomplete"
        );
        let warning = p.incomplete_warning().unwrap();
        assert!(
            warning.contains("window 2 (VMs 3–4) is incomplete"),
            "{warning}"
        );
        // Cut anywhere: what was whole is read, the rest is left out.
        for cut in ends[0]..bytes.len() {
            let p = Profile::from_reader(&bytes[..cut], &path).unwrap();
            let whole = ends.iter().filter(|&&e| e <= cut).count() - 1;
            let samples: u64 = p.oncpu.iter().map(|r| r.samples).sum();
            assert_eq!(samples, [0, 3, 7][whole], "cut at {cut}");
            assert!(p.meta.incomplete.is_some());
        }
        // Cut inside the first record: nothing to read.
        for cut in 12..ends[0] {
            let err = Profile::from_reader(&bytes[..cut], &path).unwrap_err();
            assert!(
                matches!(err, ProfileError::Corrupt { .. }),
                "cut {cut}: {err}"
            );
        }
        // A flipped byte in the second part: the first part is read, and
        // the damage is named.
        let mut damaged = bytes.clone();
        damaged[ends[1] + 20] ^= 0xff;
        let p = Profile::from_reader(&damaged[..], &path).unwrap();
        assert_eq!(p.oncpu[0].samples, 3);
        let inc = p.meta.incomplete.clone().unwrap();
        assert_eq!(
            inc.damaged.as_deref(),
            Some("a record's checksum does not match")
        );
        // The end of a recording replaces the records with the whole.
        let mut whole = p.clone();
        whole.meta.incomplete = None;
        whole.write(&path).unwrap();
        assert_eq!(Profile::read(&path).unwrap(), whole);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The writer reads back the rows of the records it appended (what
    /// the stop adds up, rather than keeping them in memory); a record it
    /// could not append (here: the file is read-only) is not among them.
    #[test]
    fn the_writer_reads_its_rows_back() {
        let dir = std::env::temp_dir().join(format!("hvprof-rows-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        let full = sample();
        let mut log = ProfileLog::create(&path, &Record::default()).unwrap();
        let part = |samples| Record {
            part: Profile {
                oncpu: vec![OnCpu {
                    samples,
                    ..full.oncpu[0].clone()
                }],
                ..Profile::default()
            },
            ..Record::default()
        };
        for samples in [3, 4] {
            log.append(&mut part(samples), &full.frames).unwrap();
        }
        let rows = log.rows().unwrap().into_profile_part();
        assert_eq!(rows.oncpu.len(), 1);
        assert_eq!(rows.oncpu[0].samples, 7);
        log.file = File::open(&path).unwrap();
        assert!(log.append(&mut part(5), &full.frames).is_err());
        assert_eq!(log.rows().unwrap().into_profile_part().oncpu[0].samples, 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A version-1 file (one gzip-compressed JSON profile) still reads.
    #[test]
    fn reads_version_1() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        let mut gz = flate2::write::GzEncoder::new(bytes, flate2::Compression::default());
        serde_json::to_writer(&mut gz, &sample()).unwrap();
        let bytes = gz.finish().unwrap();
        assert_eq!(
            Profile::from_reader(&bytes[..], Path::new("v1")).unwrap(),
            sample()
        );
    }

    #[test]
    fn rejects_foreign_and_newer_files() {
        let path = Path::new("x.svg");
        let err = Profile::from_reader(&b"<svg xmlns=...>"[..], path).unwrap_err();
        assert!(matches!(err, ProfileError::Foreign { .. }), "{err}");
        let mut newer = MAGIC.to_vec();
        newer.extend_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let err = Profile::from_reader(&newer[..], path).unwrap_err();
        assert!(err.to_string().contains("format version 3"), "{err}");
        let mut garbage = MAGIC.to_vec();
        garbage.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        garbage.extend_from_slice(b"not gzip at all");
        let err = Profile::from_reader(&garbage[..], path).unwrap_err();
        assert!(matches!(err, ProfileError::Corrupt { .. }), "{err}");
    }
}
