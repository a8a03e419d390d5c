//! Exports for other profiling tools: pprof (gzipped protobuf, as
//! `go tool pprof`, Pyroscope and Parca read it) and speedscope JSON. Like
//! every renderer, it works from a [`Profile`] alone.
//!
//! Layout of an export directory, for each stack-keyed tracer (`oncpu`,
//! `offcpu`, `lockwait`, `dbuswait`, `jobwait`) that was recorded:
//!
//! ```text
//! oncpu.pb.gz               every window; each sample labelled with its window
//! w03-vms-9-12/oncpu.pb.gz  one window (for `go tool pprof -diff_base`)
//! oncpu.speedscope.json     one speedscope profile per window
//! ```
//!
//! The per-tracer pprof file is what a fleet store ingests (Pyroscope and
//! Parca turn sample labels into series labels; `go tool pprof -tagfocus
//! window=3` or `-tagroot comm` slice it); the per-window files are what
//! `go tool pprof -diff_base w01-…/oncpu.pb.gz w04-…/oncpu.pb.gz` compares.
//! Tracers are never mixed in one pprof file: a pprof sample carries one
//! value per sample type, and an on-CPU sample has no off-CPU time.
//!
//! The protobuf is encoded here by hand (a few varint and length-delimited
//! fields of `perftools.profiles.Profile`, see
//! `profiler/tests/data/pprof/profile.proto`): the messages are built once,
//! in one pass, with no build-time `protoc`, and a code generator would buy
//! nothing but dependencies. The tests decode the output with Debian's
//! `protoc` and `go tool pprof`, not with this code.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use serde::Serialize;
use thiserror::Error;

use crate::{
    graphs::{GRAPHS, Graph, Label, StackRow, Tail, period_ns},
    profile::Profile,
    windows::WindowInfo,
};

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "the profile has on-CPU samples but no sampling frequency, so they cannot be turned into CPU time; record it again with `hvprof record -F HZ`"
    )]
    NoFrequency,
}

/// An export format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Pprof,
    Speedscope,
}

impl Format {
    pub const ALL: [Self; 2] = [Self::Pprof, Self::Speedscope];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Pprof => "pprof",
            Self::Speedscope => "speedscope",
        }
    }

    /// Parses `pprof` or `speedscope`.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == text.trim())
            .ok_or_else(|| format!("unknown export format {text:?}: choose pprof or speedscope"))
    }
}

/// A graph's stacks for one window (`None`: every window), refusing
/// samples that cannot be turned into time.
fn rows<'p>(
    profile: &'p Profile,
    graph: &Graph,
    window: Option<u32>,
) -> Result<Vec<StackRow<'p>>, ExportError> {
    let rows = (graph.rows)(profile, window);
    if graph.sampled && !rows.is_empty() && period_ns(profile) == 0 {
        return Err(ExportError::NoFrequency);
    }
    Ok(rows)
}

/// `9-12`, or `setup` for the window before the first VM.
fn vm_range(w: Option<&WindowInfo>) -> String {
    match w.map(|w| (w.first_vm, w.last_vm)) {
        Some((Some(a), Some(b))) => format!("{a}-{b}"),
        _ => "setup".to_owned(),
    }
}

/// A protobuf writer: just the wire types `perftools.profiles` uses.
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            #[expect(clippy::cast_possible_truncation, reason = "low 7 bits")]
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        #[expect(clippy::cast_possible_truncation, reason = "v < 0x80")]
        self.0.push(v as u8);
    }

    /// A varint field (`int64`, `uint64`, `bool`); zero is the default
    /// and is left out, as protobuf encoders do.
    fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.varint(u64::from(field) << 3);
            self.varint(v);
        }
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.varint(u64::from(field) << 3 | 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    /// A packed repeated varint field.
    fn packed(&mut self, field: u32, values: &[u64], scratch: &mut Pb) {
        if values.is_empty() {
            return;
        }
        scratch.0.clear();
        for &v in values {
            scratch.varint(v);
        }
        self.bytes(field, &scratch.0);
    }
}

fn int(v: u64) -> u64 {
    // int64 fields: counts and ns beyond i64::MAX saturate.
    v.min(i64::MAX as u64)
}

/// Builds one pprof profile: strings, functions and locations are interned
/// while samples are encoded.
struct PprofBuilder<'p> {
    profile: &'p Profile,
    strings: Vec<String>,
    string_ids: HashMap<String, u64>,
    /// Function (and location) id of each profile frame, 0 = not yet.
    frame_ids: Vec<u64>,
    leaf_ids: HashMap<String, u64>,
    /// String id of each function's name, by function id - 1.
    functions: Vec<u64>,
    samples: Pb,
    scratch: Pb,
    packed: Pb,
    locations: Vec<u64>,
}

impl<'p> PprofBuilder<'p> {
    fn new(profile: &'p Profile) -> Self {
        let mut b = Self {
            profile,
            strings: Vec::new(),
            string_ids: HashMap::new(),
            frame_ids: vec![0; profile.frames.len()],
            leaf_ids: HashMap::new(),
            functions: Vec::new(),
            samples: Pb::default(),
            scratch: Pb::default(),
            packed: Pb::default(),
            locations: Vec::new(),
        };
        b.string(""); // string_table[0] must be ""
        b
    }

    fn string(&mut self, s: &str) -> u64 {
        if let Some(&i) = self.string_ids.get(s) {
            return i;
        }
        let i = self.strings.len() as u64;
        self.strings.push(s.to_owned());
        self.string_ids.insert(s.to_owned(), i);
        i
    }

    fn function(&mut self, name: &str) -> u64 {
        let name = self.string(name);
        self.functions.push(name);
        self.functions.len() as u64
    }

    fn frame(&mut self, frame: u32) -> u64 {
        let slot = frame as usize;
        match self.frame_ids.get(slot) {
            Some(&id) if id != 0 => id,
            Some(_) => {
                let profile = self.profile;
                let id = self.function(&profile.frames[slot]);
                self.frame_ids[slot] = id;
                id
            }
            None => self.leaf("[bad frame]"),
        }
    }

    fn leaf(&mut self, name: &str) -> u64 {
        if let Some(&id) = self.leaf_ids.get(name) {
            return id;
        }
        let id = self.function(name);
        self.leaf_ids.insert(name.to_owned(), id);
        id
    }

    fn sample(&mut self, row: &StackRow<'_>, labels: &[(&str, Label)]) {
        self.locations.clear();
        for t in row.tail.iter().rev() {
            let id = match t {
                Tail::Frame(f) => self.frame(*f),
                Tail::Name(name) => self.leaf(name),
            };
            self.locations.push(id);
        }
        for &f in row.stack.iter().rev() {
            let id = self.frame(f);
            self.locations.push(id);
        }
        let mut s = Pb::default();
        std::mem::swap(&mut s, &mut self.scratch);
        s.0.clear();
        s.packed(1, &self.locations, &mut self.packed);
        s.packed(2, &[int(row.count), int(row.ns)], &mut self.packed);
        for (key, value) in labels.iter().chain(&row.labels) {
            let mut label = Pb::default();
            let key = self.string(key);
            label.uint(1, key);
            match value {
                Label::Str(v) => {
                    let v = self.string(v);
                    label.uint(2, v);
                }
                Label::Num(n) => label.uint(3, int(*n)),
            }
            s.bytes(3, &label.0);
        }
        self.samples.bytes(2, &s.0);
        std::mem::swap(&mut s, &mut self.scratch);
    }

    fn value_type(&mut self, (ty, unit): (&str, &str)) -> Vec<u8> {
        let mut v = Pb::default();
        let ty = self.string(ty);
        let unit = self.string(unit);
        v.uint(1, ty);
        v.uint(2, unit);
        v.0
    }

    fn finish(mut self, graph: &Graph, comments: &[String]) -> Vec<u8> {
        let mut out = Pb::default();
        let types = graph.sample_types;
        for t in types {
            let vt = self.value_type(t);
            out.bytes(1, &vt);
        }
        out.0.extend_from_slice(&self.samples.0);
        // One mapping for every location: the frames are symbolized already,
        // and a bracketed name tells pprof there is no binary to look at.
        let mut mapping = Pb::default();
        mapping.uint(1, 1);
        let file = self.string("[hvprof]");
        mapping.uint(5, file);
        mapping.uint(7, 1); // has_functions
        out.bytes(3, &mapping.0);
        for (i, &name) in self.functions.iter().enumerate() {
            let id = i as u64 + 1;
            let mut line = Pb::default();
            line.uint(1, id);
            let mut loc = Pb::default();
            loc.uint(1, id);
            loc.uint(2, 1);
            loc.bytes(4, &line.0);
            out.bytes(4, &loc.0);
            let mut func = Pb::default();
            func.uint(1, id);
            func.uint(2, name);
            func.uint(3, name);
            out.bytes(5, &func.0);
        }
        let meta = &self.profile.meta;
        out.uint(9, int(meta.started_unix_ms.saturating_mul(1_000_000)));
        out.uint(10, int(meta.duration_ns));
        // On-CPU is sampled every `period` ns of CPU time; the other tracers
        // see every event, one at a time.
        let (period_type, period) = if graph.sampled {
            (types[1], period_ns(self.profile))
        } else {
            (types[0], 1)
        };
        let pt = self.value_type(period_type);
        out.bytes(11, &pt);
        out.uint(12, period);
        let comments: Vec<u64> = comments.iter().map(|c| self.string(c)).collect();
        out.packed(13, &comments, &mut self.packed);
        let default = self.string(types[1].0);
        out.uint(14, default);
        for s in &self.strings {
            out.bytes(6, s.as_bytes());
        }
        out.0
    }
}

/// The uncompressed `perftools.profiles.Profile` of one tracer, for one
/// window or (`None`) every window. Each sample is labelled with strings
/// `window` (`w03`, as the directories are named), `vms` (`9-12`, `setup`),
/// `tracer`, `comm`, the tracer's own (`state`; `lock`, `lock_type`;
/// `dbus_library`, `dbus_destination`, `dbus_method`), and with numbers
/// `pid` (the process), `tid` (the thread, where recorded), `first_vm` and
/// `last_vm` (not in the setup window).
pub fn pprof(
    profile: &Profile,
    graph: &Graph,
    window: Option<u32>,
) -> Result<Vec<u8>, ExportError> {
    let rows = rows(profile, graph, window)?;
    let mut b = PprofBuilder::new(profile);
    let windows: HashMap<u32, &WindowInfo> = profile.windows.iter().map(|w| (w.id, w)).collect();
    for row in &rows {
        let info = windows.get(&row.window).copied();
        let mut labels = vec![
            ("window", Label::Str(format!("w{:02}", row.window))),
            ("vms", Label::Str(vm_range(info))),
            ("tracer", Label::Str(graph.name.to_owned())),
            ("comm", Label::Str(row.comm.to_owned())),
            ("pid", Label::Num(row.tgid.into())),
        ];
        if let Some(tid) = row.tid {
            labels.push(("tid", Label::Num(tid.into())));
        }
        if let Some(w) = info
            && let (Some(first), Some(last)) = (w.first_vm, w.last_vm)
        {
            labels.push(("first_vm", Label::Num(first)));
            labels.push(("last_vm", Label::Num(last)));
        }
        b.sample(row, &labels);
    }
    let meta = &profile.meta;
    let scope = match window.map(|w| windows.get(&w).copied()) {
        Some(Some(w)) => format!("window {} ({})", w.name(), w.label()),
        Some(None) => format!("window {}", window.unwrap_or_default()),
        None => "every window (label `window`)".to_owned(),
    };
    let comments = [
        format!("hvprof {}: {}", graph.title, scope),
        format!(
            "recorded by hvprof {} on {} (kernel {}): {}",
            meta.hvprof_version, meta.hostname, meta.kernel, meta.target
        ),
    ];
    Ok(b.finish(graph, &comments))
}

/// A speedscope file (<https://www.speedscope.app/file-format-schema.json>)
/// of one tracer: one "sampled" profile per window, frames shared.
#[derive(Debug, Serialize)]
pub struct Speedscope {
    #[serde(rename = "$schema")]
    pub schema: &'static str,
    pub shared: SpeedscopeShared,
    pub profiles: Vec<SpeedscopeProfile>,
    pub name: String,
    #[serde(rename = "activeProfileIndex")]
    pub active_profile_index: usize,
    pub exporter: String,
}

#[derive(Debug, Serialize)]
pub struct SpeedscopeShared {
    pub frames: Vec<SpeedscopeFrame>,
}

#[derive(Debug, Serialize)]
pub struct SpeedscopeFrame {
    pub name: String,
}

#[derive(Debug, Serialize)]
pub struct SpeedscopeProfile {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub name: String,
    pub unit: &'static str,
    #[serde(rename = "startValue")]
    pub start_value: u64,
    #[serde(rename = "endValue")]
    pub end_value: u64,
    /// Stacks of indices into the shared frames, root first; the root is
    /// the process's comm, as in the folded files.
    pub samples: Vec<Vec<u32>>,
    pub weights: Vec<u64>,
}

/// The speedscope export of one tracer. Weights are nanoseconds (on-CPU:
/// samples × the sampling period), so every tracer reads as time.
pub fn speedscope(profile: &Profile, graph: &Graph) -> Result<Speedscope, ExportError> {
    let mut frames: Vec<SpeedscopeFrame> = Vec::new();
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut intern = |name: &str| -> u32 {
        if let Some(&i) = ids.get(name) {
            return i;
        }
        let i = u32::try_from(frames.len()).unwrap_or(u32::MAX);
        frames.push(SpeedscopeFrame {
            name: name.to_owned(),
        });
        ids.insert(name.to_owned(), i);
        i
    };
    let mut profiles = Vec::new();
    for w in &profile.windows {
        // Equal stacks of different threads merge; sorted, so the output
        // is the same every time.
        let mut stacks: BTreeMap<Vec<u32>, u64> = BTreeMap::new();
        for row in rows(profile, graph, Some(w.id))? {
            let comm = if row.comm.is_empty() {
                "[unknown]"
            } else {
                row.comm
            };
            let mut stack = Vec::with_capacity(row.stack.len() + 2);
            stack.push(intern(comm));
            stack.extend(profile.frame_names(row.stack).map(&mut intern));
            for t in &row.tail {
                stack.push(match t {
                    Tail::Frame(f) => intern(
                        profile
                            .frames
                            .get(*f as usize)
                            .map_or("[bad frame]", String::as_str),
                    ),
                    Tail::Name(name) => intern(name),
                });
            }
            *stacks.entry(stack).or_default() += row.ns;
        }
        let (samples, weights): (Vec<_>, Vec<_>) = stacks.into_iter().unzip();
        profiles.push(SpeedscopeProfile {
            kind: "sampled",
            name: graph.title_for(w),
            unit: "nanoseconds",
            start_value: 0,
            end_value: weights.iter().sum(),
            samples,
            weights,
        });
    }
    Ok(Speedscope {
        schema: "https://www.speedscope.app/file-format-schema.json",
        shared: SpeedscopeShared { frames },
        profiles,
        name: format!("hvprof {}: {}", graph.title, profile.meta.target),
        active_profile_index: 0,
        exporter: format!("hvprof {}", env!("CARGO_PKG_VERSION")),
    })
}

/// A file written by [`export`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub path: PathBuf,
    pub format: Format,
    /// The graph's name.
    pub graph: &'static str,
    /// `None`: every window.
    pub window: Option<u32>,
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    fs::write(path, bytes).map_err(|source| ExportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn gzip(bytes: &[u8], path: &Path) -> Result<Vec<u8>, ExportError> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes)
        .and_then(|()| gz.finish())
        .map_err(|source| ExportError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes the exports of every tracer the profile has into `dir` (see the
/// module docs for the layout).
pub fn export(
    profile: &Profile,
    dir: &Path,
    formats: &[Format],
) -> Result<Vec<Written>, ExportError> {
    fs::create_dir_all(dir).map_err(|source| ExportError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    render(profile, dir, formats, &mut |w, bytes| {
        if let Some(parent) = w.path.parent() {
            fs::create_dir_all(parent).map_err(|source| ExportError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        write(&w.path, bytes)?;
        written.push(w);
        Ok(())
    })?;
    Ok(written)
}

/// A function that takes each exported file: what it is and its contents.
pub type Emit<'a> = dyn FnMut(Written, &[u8]) -> Result<(), ExportError> + 'a;

/// Renders what [`export`] writes, handing each file to `emit` (where it
/// goes under `dir` and what it is, and its contents): the fuzz targets
/// export a profile without a disk.
pub fn render(
    profile: &Profile,
    dir: &Path,
    formats: &[Format],
    emit: &mut Emit<'_>,
) -> Result<(), ExportError> {
    for graph in GRAPHS.into_iter().filter(|g| g.in_profile(profile)) {
        if formats.contains(&Format::Pprof) {
            let path = dir.join(format!("{}.pb.gz", graph.name));
            let bytes = gzip(&pprof(profile, graph, None)?, &path)?;
            let w = Written {
                path,
                format: Format::Pprof,
                graph: graph.name,
                window: None,
            };
            emit(w, &bytes)?;
            for win in &profile.windows {
                let path = dir
                    .join(win.dir_name())
                    .join(format!("{}.pb.gz", graph.name));
                let bytes = gzip(&pprof(profile, graph, Some(win.id))?, &path)?;
                let w = Written {
                    path,
                    format: Format::Pprof,
                    graph: graph.name,
                    window: Some(win.id),
                };
                emit(w, &bytes)?;
            }
        }
        if formats.contains(&Format::Speedscope) {
            let path = dir.join(format!("{}.speedscope.json", graph.name));
            let json = serde_json::to_vec(&speedscope(profile, graph)?).map_err(|e| {
                ExportError::Write {
                    path: path.clone(),
                    source: io::Error::other(e),
                }
            })?;
            let w = Written {
                path,
                format: Format::Speedscope,
                graph: graph.name,
                window: None,
            };
            emit(w, &json)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_protobufs() {
        // The examples of the protobuf encoding guide.
        let mut pb = Pb::default();
        pb.uint(1, 150);
        assert_eq!(pb.0, [0x08, 0x96, 0x01]);
        let mut pb = Pb::default();
        pb.bytes(2, b"testing");
        assert_eq!(pb.0, b"\x12\x07testing");
        let mut pb = Pb::default();
        pb.packed(4, &[3, 270, 86942], &mut Pb::default());
        assert_eq!(pb.0, [0x22, 0x06, 0x03, 0x8E, 0x02, 0x9E, 0xA7, 0x05]);
        let mut pb = Pb::default();
        pb.uint(1, 0);
        assert!(pb.0.is_empty(), "zero is the default and is left out");
    }

    #[test]
    fn formats_parse() {
        assert_eq!(Format::parse("pprof"), Ok(Format::Pprof));
        assert_eq!(Format::parse(" speedscope"), Ok(Format::Speedscope));
        assert!(
            Format::parse("json")
                .unwrap_err()
                .contains("pprof or speedscope")
        );
    }
}
