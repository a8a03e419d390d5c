//! `record --verify-unwind`: the eBPF unwinder checked against another one.
//!
//! Every Nth user-stack walk, the kernel sends the frames it found with the
//! registers it started from and a copy of the stack above `sp`
//! ([`UnwindSample`], ring buffer `UNWIND_VERIFY`). Each sample is unwound
//! again here by framehop — its own `.eh_frame` reader and rules, nothing of
//! [`super::build_table`] — over the process's executable mappings as the
//! recorder's snapshots have them, and the two stacks are compared
//! ([`classify`]).

use std::{
    cell::Cell,
    collections::HashMap,
    fmt::Write as _,
    fs,
    mem::offset_of,
    ops::Range,
    os::unix::fs::{FileExt as _, MetadataExt as _},
    sync::Arc,
};

use aya::maps::{MapData, RingBuf};
use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use object::{Object as _, ObjectSection as _};
use profiler_common::{
    record::MAX_STACK_DEPTH,
    unwind::{UnwindSample, UnwindStop, VERIFY_STACK_BYTES},
};

use crate::{
    procmaps::{Location, Mapping, Snapshot},
    profile::VerifyUnwind,
};

/// Samples whose stacks are kept in the profile, of each kind that is not
/// the same.
const EXAMPLES_PER_KIND: usize = 4;
/// Samples kept for the next drain (17 KiB each).
const MAX_AGAIN: usize = 256;
/// Snapshots of one process a sample is tried with, and unwinders kept
/// per process.
const MAX_CANDIDATES: usize = 6;
/// Processes whose framehop modules are kept; past this they are built
/// again when a sample needs them (a mass boot has thousands of
/// short-lived processes).
const MAX_PROCS: usize = 256;

/// How a sample's two stacks compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// The same frames.
    Same,
    /// Frame `frame` (0 is the PC) differs, within the frames both found.
    Differs { frame: usize },
    /// The same frames until framehop needed stack past the copy.
    Short,
    /// The same frames, but the kernel's walk ended where framehop went on
    /// (and not at the kernel's frame limit).
    KernelShorter,
    /// The same frames, but framehop ended, inside the copy, where the
    /// kernel's walk went on.
    FramehopShorter,
}

/// Compares the kernel's frames (`kernel`, the walk ended for
/// `kernel_stop`, an `UnwindStop`) with framehop's (`framehop`: only the
/// frames found before it needed stack past the copy, which
/// `past_copy` says it did).
fn classify(kernel: &[u64], kernel_stop: u32, framehop: &[u64], past_copy: bool) -> Verdict {
    if let Some(frame) = kernel.iter().zip(framehop).position(|(k, f)| k != f) {
        return Verdict::Differs { frame };
    }
    match kernel.len().cmp(&framehop.len()) {
        std::cmp::Ordering::Equal => Verdict::Same,
        // The kernel stops at `--user-stack-depth`; framehop goes on.
        std::cmp::Ordering::Less if kernel_stop == UnwindStop::FrameLimit as u32 => Verdict::Same,
        std::cmp::Ordering::Less => Verdict::KernelShorter,
        std::cmp::Ordering::Greater if past_copy => Verdict::Short,
        std::cmp::Ordering::Greater => Verdict::FramehopShorter,
    }
}

/// One `UnwindSample` as it lies in the ring, read field by field (the
/// record need not be aligned for the struct).
struct Sample<'a> {
    tgid: u32,
    pid: u32,
    stop: u32,
    ip: u64,
    sp: u64,
    bp: u64,
    /// The kernel's frames, `n` × 8 bytes.
    ips: &'a [u8],
    /// The copied stack, from `sp`.
    stack: &'a [u8],
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let mut a = [0; 4];
    a.copy_from_slice(b.get(off..off.checked_add(4)?)?);
    Some(u32::from_ne_bytes(a))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let mut a = [0; 8];
    a.copy_from_slice(b.get(off..off.checked_add(8)?)?);
    Some(u64::from_ne_bytes(a))
}

impl<'a> Sample<'a> {
    fn parse(b: &'a [u8]) -> Option<Self> {
        let n = (u32_at(b, offset_of!(UnwindSample, n))? as usize).min(MAX_STACK_DEPTH);
        let copied =
            (u32_at(b, offset_of!(UnwindSample, copied))? as usize).min(VERIFY_STACK_BYTES);
        let ips = offset_of!(UnwindSample, ips);
        let stack = offset_of!(UnwindSample, stack);
        Some(Self {
            tgid: u32_at(b, offset_of!(UnwindSample, tgid))?,
            pid: u32_at(b, offset_of!(UnwindSample, pid))?,
            stop: u32_at(b, offset_of!(UnwindSample, stop))?,
            ip: u64_at(b, offset_of!(UnwindSample, ip))?,
            sp: u64_at(b, offset_of!(UnwindSample, sp))?,
            bp: u64_at(b, offset_of!(UnwindSample, bp))?,
            ips: b.get(ips..ips + n * 8)?,
            stack: b.get(stack..stack + copied)?,
        })
    }

    fn frames(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.ips.len() / 8).filter_map(|i| u64_at(self.ips, i * 8))
    }

    /// The word at `addr`, if it is inside the copy.
    fn read(&self, addr: u64) -> Option<u64> {
        let off = usize::try_from(addr.checked_sub(self.sp)?).ok()?;
        u64_at(self.stack, off)
    }

    fn copy_end(&self) -> u64 {
        self.sp + self.stack.len() as u64
    }
}

/// Why framehop's unwind ended.
#[derive(Clone, Copy, Debug)]
enum End {
    /// At a frame it takes for the outermost.
    Root,
    /// `MAX_STACK_DEPTH` frames.
    Limit,
    /// It needed stack past the copy.
    PastCopy,
    Error(framehop::Error),
}

/// A file's sections as framehop reads them, shared by every process that
/// maps it.
struct Sections {
    eh_frame: Option<(Range<u64>, Arc<[u8]>)>,
    eh_frame_hdr: Option<(Range<u64>, Arc<[u8]>)>,
    debug_frame: Option<Arc<[u8]>>,
    text: Option<Range<u64>>,
    got: Option<Range<u64>>,
    /// `PT_LOAD` segments: (file offset, virtual address, file size).
    loads: Vec<(u64, u64, u64)>,
}

impl Sections {
    fn parse(bytes: &[u8]) -> Option<Self> {
        let file = object::File::parse(bytes).ok()?;
        let range = |name: &str| {
            let s = file.section_by_name(name)?;
            Some(s.address()..s.address().saturating_add(s.size()))
        };
        let data = |name: &str| -> Option<(Range<u64>, Arc<[u8]>)> {
            let s = file.section_by_name(name)?;
            // Compressed sections (a .debug_frame) would need inflating.
            let plain = s
                .compressed_file_range()
                .is_ok_and(|r| r.format == object::CompressionFormat::None);
            let data = s.data().ok().filter(|d| plain && !d.is_empty())?;
            Some((
                s.address()..s.address().saturating_add(s.size()),
                Arc::from(data),
            ))
        };
        Some(Self {
            eh_frame: data(".eh_frame"),
            eh_frame_hdr: data(".eh_frame_hdr"),
            debug_frame: data(".debug_frame").map(|(_, d)| d),
            text: range(".text"),
            got: range(".got"),
            loads: super::procs::load_segments(bytes),
        })
    }

    /// The load bias of a mapping of file offset `offset` at `start`: the
    /// segment whose (page-aligned) file range holds the offset says which
    /// virtual address the mapping starts at.
    fn bias(&self, start: u64, offset: u64, path: &str) -> Option<u64> {
        super::procs::bias_of(&self.loads, start, offset, path)
    }

    fn module(&self, m: &Mapping) -> Option<Module<Arc<[u8]>>> {
        let bias = self.bias(m.start, m.offset, &m.path)?;
        let (eh_frame_svma, eh_frame) = self.eh_frame.clone().unzip();
        let (eh_frame_hdr_svma, eh_frame_hdr) = self.eh_frame_hdr.clone().unzip();
        Some(Module::new(
            m.path.clone(),
            m.start..m.end,
            bias,
            ExplicitModuleSectionInfo {
                base_svma: 0,
                text_svma: self.text.clone(),
                got_svma: self.got.clone(),
                eh_frame_svma,
                eh_frame,
                eh_frame_hdr_svma,
                eh_frame_hdr,
                debug_frame: self.debug_frame.clone(),
                ..ExplicitModuleSectionInfo::default()
            },
        ))
    }
}

/// A mapped file: device, inode, size, mtime (a file rewritten in place is
/// another), or the vDSO.
type FileKey = Option<(u64, u64, u64, i64)>;

/// One process's framehop unwinder, for the snapshot it was built from.
struct Proc {
    snapshot: Snapshot,
    unwinder: UnwinderX86_64<Arc<[u8]>>,
}

/// Whether a sample was counted.
enum Checked {
    Done,
    /// To be checked again at the next drain.
    Again,
}

/// Everything but the ring: checks samples.
#[derive(Default)]
struct Checker {
    files: HashMap<FileKey, Option<Arc<Sections>>>,
    /// By tgid, an unwinder for each snapshot tried lately.
    procs: HashMap<u32, Vec<Proc>>,
    cache: CacheX86_64,
    /// Reused for each sample.
    kernel: Vec<u64>,
    framehop: Vec<u64>,
    result: VerifyUnwind,
    /// Examples kept, by kind: differs, kernel shorter, framehop shorter.
    examples: [usize; 3],
}

impl Checker {
    /// Checks one sample against the mappings its process may have had
    /// when the kernel walked: the kernel's tables are those of the
    /// snapshot userspace loaded last, which can be older than the newest
    /// (a library mapped since, read at the next snapshot), so a sample
    /// that is not the same with the likeliest snapshot is tried with the
    /// others. A wrong rule gives the same wrong frame with any of them.
    ///
    /// Unless `last`, a sample that is not the same with any is left for
    /// later ([`Checked::Again`]): its process's exec, fork or new mapping
    /// may not have reached the recorder yet.
    fn check<'s>(
        &mut self,
        bytes: &[u8],
        snapshots_of: &dyn Fn(u32) -> Vec<&'s Snapshot>,
        last: bool,
    ) -> Checked {
        let Some(s) = Sample::parse(bytes) else {
            return Checked::Done;
        };
        self.kernel.clear();
        self.kernel.extend(s.frames());
        let candidates = candidates(&snapshots_of(s.tgid), &self.kernel);
        for (i, snapshot) in candidates.iter().enumerate() {
            match self.verdict(&s, snapshot).0 {
                Verdict::Same => self.result.same += 1,
                Verdict::Short => self.result.short += 1,
                _ => continue,
            }
            self.result.samples += 1;
            self.result.same_with_older_mappings += u64::from(i > 0);
            return Checked::Done;
        }
        if !last {
            return Checked::Again;
        }
        self.result.samples += 1;
        let Some(&likeliest) = candidates.first() else {
            self.result.unchecked += 1;
            return Checked::Done;
        };
        let (verdict, end) = self.verdict(&s, likeliest);
        let kind = match verdict {
            Verdict::Same | Verdict::Short => return Checked::Done,
            Verdict::Differs { .. } => {
                self.result.differs += 1;
                0
            }
            Verdict::KernelShorter => {
                self.result.kernel_shorter += 1;
                1
            }
            Verdict::FramehopShorter => {
                self.result.framehop_shorter += 1;
                2
            }
        };
        if self.examples[kind] < EXAMPLES_PER_KIND {
            self.examples[kind] += 1;
            let text = example(&s, verdict, end, &self.kernel, &self.framehop, likeliest);
            self.result.examples.push(text);
        }
        Checked::Done
    }

    /// Unwinds `s` with framehop over `snapshot`'s mappings and compares.
    /// Where framehop goes on past the kernel's last frame to an address in
    /// no mapping, that is its own fallback to frame pointers running into
    /// garbage (where the kernel stopped at a rule it does not evaluate,
    /// say): not a frame the kernel missed.
    fn verdict(&mut self, s: &Sample<'_>, snapshot: &Snapshot) -> (Verdict, End) {
        let end = self.unwind(s, snapshot);
        let k = self.kernel.len();
        if self
            .framehop
            .get(k)
            .is_some_and(|&ip| snapshot.locate(ip.wrapping_sub(1)).is_none())
        {
            self.framehop.truncate(k);
        }
        let past_copy = matches!(end, End::PastCopy);
        let verdict = classify(&self.kernel, s.stop, &self.framehop, past_copy);
        (verdict, end)
    }

    /// Unwinds `s` with framehop into `self.framehop`, over `snapshot`'s
    /// mappings.
    fn unwind(&mut self, s: &Sample<'_>, snapshot: &Snapshot) -> End {
        let i = self.proc_index(s.tgid, snapshot);
        match self.procs.get(&s.tgid).and_then(|p| p.get(i)) {
            Some(p) => {
                let trampoline = |addr| is_trampoline(s.tgid, snapshot, addr);
                unwind(
                    &p.unwinder,
                    &mut self.cache,
                    s,
                    &trampoline,
                    &mut self.framehop,
                )
            }
            None => End::Root,
        }
    }

    /// Where `tgid`'s unwinder for `snapshot` is, built if it is new.
    fn proc_index(&mut self, tgid: u32, snapshot: &Snapshot) -> usize {
        if let Some(i) = self
            .procs
            .get(&tgid)
            .and_then(|ps| ps.iter().position(|p| p.snapshot == *snapshot))
        {
            return i;
        }
        if self.procs.len() >= MAX_PROCS {
            self.procs.clear();
        }
        let mut unwinder = UnwinderX86_64::new();
        for m in &snapshot.mappings {
            if let Some(module) = self.sections(tgid, m).and_then(|s| s.module(m)) {
                unwinder.add_module(module);
            }
        }
        let ps = self.procs.entry(tgid).or_default();
        if ps.len() >= MAX_CANDIDATES {
            ps.remove(0);
        }
        ps.push(Proc {
            snapshot: snapshot.clone(),
            unwinder,
        });
        ps.len() - 1
    }

    /// The sections of the file mapped at `m` in `tgid`: read through
    /// `/proc/TGID/map_files/` while the process lives (the file it runs,
    /// even if replaced since), else from its path.
    fn sections(&mut self, tgid: u32, m: &Mapping) -> Option<Arc<Sections>> {
        if m.path == "[vdso]" {
            return self
                .files
                .entry(None)
                .or_insert_with(|| {
                    super::procs::vdso_image()
                        .and_then(|b| Sections::parse(&b))
                        .map(Arc::new)
                })
                .clone();
        }
        if !m.path.starts_with('/') {
            return None;
        }
        let mapped = format!("/proc/{tgid}/map_files/{:x}-{:x}", m.start, m.end);
        let path = [mapped.as_str(), m.path.as_str()]
            .into_iter()
            .find(|p| fs::metadata(p).is_ok())?;
        let meta = fs::metadata(path).ok()?;
        let key = Some((meta.dev(), meta.ino(), meta.size(), meta.mtime()));
        self.files
            .entry(key)
            .or_insert_with(|| {
                let bytes = fs::read(path).ok()?;
                Sections::parse(&bytes).map(Arc::new)
            })
            .clone()
    }
}

/// Of a process's snapshots (oldest first: its lineage's, then its own),
/// those it may have had when the kernel walked `kernel`, likeliest first:
/// the most of the kernel's frames mapped, then the newest. (The newest
/// alone can be wrong: a sample taken before an exec is checked after
/// it.)
fn candidates<'s>(snapshots: &[&'s Snapshot], kernel: &[u64]) -> Vec<&'s Snapshot> {
    let mapped = |s: &Snapshot| {
        kernel
            .iter()
            .enumerate()
            .filter(|&(i, &ip)| {
                s.locate(if i == 0 { ip } else { ip.wrapping_sub(1) })
                    .is_some()
            })
            .count()
    };
    let mut out: Vec<(usize, &Snapshot)> = Vec::new();
    for &s in snapshots.iter().rev() {
        if !out.iter().any(|(_, o)| *o == s) {
            out.push((mapped(s), s));
        }
    }
    // Stable: the newest first among equals.
    out.sort_by_key(|&(n, _)| std::cmp::Reverse(n));
    out.into_iter()
        .take(MAX_CANDIDATES)
        .map(|(_, s)| s)
        .collect()
}

/// Unwinds `s` with framehop into `out`, leaving out any frame found after
/// it needed stack past the copy (a read refused there can send it down a
/// fallback rule).
///
/// framehop knows nothing of signal frames: where a return address is a
/// signal trampoline (`is_trampoline`), the interrupted registers are
/// taken from the `ucontext` at the stack pointer, as libgcc's unwinder
/// does, and the walk goes on from the interrupted PC.
fn unwind(
    unwinder: &UnwinderX86_64<Arc<[u8]>>,
    cache: &mut CacheX86_64,
    s: &Sample<'_>,
    is_trampoline: &dyn Fn(u64) -> bool,
    out: &mut Vec<u64>,
) -> End {
    out.clear();
    let past_copy = Cell::new(false);
    let mut read = |addr: u64| {
        s.read(addr).ok_or_else(|| {
            if addr >= s.sp && addr.saturating_add(8) > s.copy_end() {
                past_copy.set(true);
            }
        })
    };
    let mut regs = UnwindRegsX86_64::new(s.ip, s.sp, s.bp);
    let mut frame = FrameAddress::from_instruction_pointer(s.ip);
    out.push(s.ip);
    loop {
        if out.len() >= MAX_STACK_DEPTH {
            return End::Limit;
        }
        if frame.is_return_address() && is_trampoline(frame.address()) {
            let sp = regs.sp();
            let greg = |r: i32| {
                let at = offset_of!(libc::ucontext_t, uc_mcontext)
                    + offset_of!(libc::mcontext_t, gregs)
                    + 8 * usize::try_from(r).unwrap_or(0);
                read(sp.wrapping_add(at as u64))
            };
            let (Ok(ip), Ok(sp), Ok(bp)) = (
                greg(libc::REG_RIP),
                greg(libc::REG_RSP),
                greg(libc::REG_RBP),
            ) else {
                return if past_copy.get() {
                    End::PastCopy
                } else {
                    End::Error(framehop::Error::CouldNotReadStack(sp))
                };
            };
            regs = UnwindRegsX86_64::new(ip, sp, bp);
            frame = FrameAddress::from_instruction_pointer(ip);
            out.push(ip);
            continue;
        }
        let next = unwinder.unwind_frame(frame, &mut regs, cache, &mut read);
        if past_copy.get() {
            return End::PastCopy;
        }
        match next {
            Ok(Some(ra)) => match FrameAddress::from_return_address(ra) {
                Some(f) => {
                    frame = f;
                    out.push(ra);
                }
                None => return End::Error(framehop::Error::ReturnAddressIsNull),
            },
            Ok(None) => return End::Root,
            Err(e) => return End::Error(e),
        }
    }
}

/// Whether the code at `addr` of `snapshot`'s process is the x86-64
/// signal trampoline, `mov $15, %rax; syscall` (`rt_sigreturn`): glibc's
/// `__restore_rt`, the return address of every signal handler.
fn is_trampoline(tgid: u32, snapshot: &Snapshot, addr: u64) -> bool {
    const RESTORE_RT: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0, 0, 0, 0x0f, 0x05];
    let Some(m) = snapshot
        .mappings
        .iter()
        .find(|m| m.start <= addr && addr < m.end && m.path.starts_with('/'))
    else {
        return false;
    };
    let mapped = format!("/proc/{tgid}/map_files/{:x}-{:x}", m.start, m.end);
    let mut code = [0; 9];
    [mapped.as_str(), m.path.as_str()].iter().any(|p| {
        fs::File::open(p)
            .and_then(|f| f.read_exact_at(&mut code, addr - m.start + m.offset))
            .is_ok()
    }) && code == RESTORE_RT
}

/// A sample that is not the same, for the report: both stacks, each frame
/// with its file and offset.
fn example(
    s: &Sample<'_>,
    verdict: Verdict,
    end: End,
    kernel: &[u64],
    framehop: &[u64],
    snapshot: &Snapshot,
) -> String {
    let what = match verdict {
        Verdict::Differs { frame } => format!("frame {frame} differs"),
        Verdict::KernelShorter => "the kernel's walk ended sooner".to_owned(),
        Verdict::FramehopShorter => "framehop ended sooner".to_owned(),
        Verdict::Same | Verdict::Short => String::new(),
    };
    let stop = UnwindStop::ALL
        .get(s.stop as usize)
        .map_or("?", |k| k.name());
    let end = match end {
        End::Root => "outermost frame".to_owned(),
        End::Limit => "frame limit".to_owned(),
        End::PastCopy => "end of the copy".to_owned(),
        End::Error(e) => e.to_string(),
    };
    let frames = |ips: &[u64]| {
        let mut out = String::new();
        for (i, &ip) in ips.iter().enumerate() {
            // A return address is looked up at its call.
            let at = if i == 0 { ip } else { ip.saturating_sub(1) };
            let _ = write!(out, " {ip:#x}");
            match snapshot.locate(at) {
                Some(Location::File { path, offset }) => {
                    let name = path.rsplit('/').next().unwrap_or(path);
                    let _ = write!(out, "({name}+{:#x})", offset + at.abs_diff(ip));
                }
                Some(Location::Pseudo { name, offset }) => {
                    let _ = write!(out, "({name}+{:#x})", offset + at.abs_diff(ip));
                }
                None => {}
            }
        }
        out
    };
    format!(
        "tgid {} pid {}: {what}; ip {:#x} sp {:#x} bp {:#x}, {} bytes of stack copied\n  \
         kernel ({stop}):{}\n  framehop ({end}):{}",
        s.tgid,
        s.pid,
        s.ip,
        s.sp,
        s.bp,
        s.stack.len(),
        frames(kernel),
        frames(framehop),
    )
}

/// Takes the samples out of the `UNWIND_VERIFY` ring and checks them.
pub struct Verifier {
    ring: RingBuf<MapData>,
    checker: Checker,
    /// Samples to check again at the next drain.
    again: Vec<Vec<u8>>,
}

impl Verifier {
    #[must_use]
    pub fn new(ring: RingBuf<MapData>) -> Self {
        Self {
            ring,
            checker: Checker::default(),
            again: Vec::new(),
        }
    }

    /// Checks every sample in the ring, with the mappings `snapshots_of`
    /// gives for a tgid (its own snapshots and its lineage's, oldest
    /// first). To be called after the recorder has handled the events
    /// that came before the samples; with `last` (after the stop, with
    /// every event handled) nothing is left for later.
    pub fn drain<'s>(&mut self, snapshots_of: impl Fn(u32) -> Vec<&'s Snapshot>, last: bool) {
        // Their events had a drain to arrive: judged now.
        for bytes in std::mem::take(&mut self.again) {
            self.checker.check(&bytes, &snapshots_of, true);
        }
        while let Some(item) = self.ring.next() {
            let room = self.again.len() < MAX_AGAIN;
            if let Checked::Again = self.checker.check(&item, &snapshots_of, last || !room) {
                self.again.push(item.to_vec());
            }
        }
    }

    /// What was found so far.
    #[must_use]
    pub fn result(&self) -> VerifyUnwind {
        self.checker.result.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPLETE: u32 = UnwindStop::Complete as u32;
    const LIMIT: u32 = UnwindStop::FrameLimit as u32;

    #[test]
    fn same_frames_are_the_same() {
        let k = [0x1000, 0x2005, 0x3009];
        assert_eq!(classify(&k, COMPLETE, &k, false), Verdict::Same);
        // A copy that ended right after the last frame changes nothing.
        assert_eq!(classify(&k, COMPLETE, &k, true), Verdict::Same);
    }

    #[test]
    fn a_different_frame_differs_wherever_the_stacks_end() {
        let k = [0x1000, 0x2005, 0x3009, 0x4000];
        let f = [0x1000, 0x2005, 0x3999];
        for past_copy in [false, true] {
            assert_eq!(
                classify(&k, COMPLETE, &f, past_copy),
                Verdict::Differs { frame: 2 }
            );
        }
        assert_eq!(
            classify(&k[..1], COMPLETE, &[0x1001], false),
            Verdict::Differs { frame: 0 }
        );
    }

    #[test]
    fn framehop_cut_by_the_copy_is_short() {
        let k = [0x1000, 0x2005, 0x3009, 0x4000];
        assert_eq!(classify(&k, COMPLETE, &k[..2], true), Verdict::Short);
        // Not for want of stack: it ended on its own.
        assert_eq!(
            classify(&k, COMPLETE, &k[..2], false),
            Verdict::FramehopShorter
        );
    }

    #[test]
    fn the_kernels_frame_limit_is_not_a_difference() {
        let f = [0x1000, 0x2005, 0x3009, 0x4000];
        assert_eq!(classify(&f[..3], LIMIT, &f, false), Verdict::Same);
        assert_eq!(
            classify(&f[..3], UnwindStop::ReadFault as u32, &f, false),
            Verdict::KernelShorter
        );
    }

    fn snapshot(ranges: &[(u64, u64)]) -> Snapshot {
        Snapshot {
            mappings: ranges
                .iter()
                .map(|&(start, end)| Mapping {
                    start,
                    end,
                    offset: 0,
                    path: format!("/lib/{start:x}.so"),
                })
                .collect(),
        }
    }

    #[test]
    fn the_snapshot_with_the_kernels_frames_is_tried_first() {
        let exe = snapshot(&[(0x1000, 0x2000)]);
        let with_libc = snapshot(&[(0x1000, 0x2000), (0x9000, 0xa000)]);
        let after_exec = snapshot(&[(0x5000, 0x6000)]);
        let chain = [&exe, &with_libc, &with_libc, &after_exec];
        // A walk before the exec: the newest with most frames mapped, each
        // snapshot once.
        let c = candidates(&chain, &[0x9100, 0x1100]);
        assert_eq!(c, [&with_libc, &exe, &after_exec]);
        // Nothing mapped anywhere: the newest first.
        assert_eq!(candidates(&chain, &[0x42])[0], &after_exec);
        assert_eq!(candidates(&[], &[0x42]), Vec::<&Snapshot>::new());
    }

    /// `unwind` with no modules (framehop follows frame pointers and the
    /// trampolines `is_trampoline` names): the frames and how it ended.
    fn framehop_alone(s: &Sample<'_>, is_trampoline: &dyn Fn(u64) -> bool) -> (Vec<u64>, End) {
        let mut out = Vec::new();
        let end = unwind(
            &UnwinderX86_64::new(),
            &mut CacheX86_64::new(),
            s,
            is_trampoline,
            &mut out,
        );
        (out, end)
    }

    fn record(stack_words: &[u64], ips: &[u64]) -> Vec<u8> {
        let mut b = vec![0u8; size_of::<UnwindSample>()];
        let put32 = |b: &mut Vec<u8>, off: usize, v: u32| {
            b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        };
        let put64 = |b: &mut Vec<u8>, off: usize, v: u64| {
            b[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        };
        put32(&mut b, std::mem::offset_of!(UnwindSample, tgid), 7);
        put32(
            &mut b,
            std::mem::offset_of!(UnwindSample, n),
            u32::try_from(ips.len()).unwrap(),
        );
        put32(
            &mut b,
            std::mem::offset_of!(UnwindSample, copied),
            u32::try_from(stack_words.len() * 8).unwrap(),
        );
        put64(&mut b, std::mem::offset_of!(UnwindSample, sp), 0x7000);
        put64(&mut b, std::mem::offset_of!(UnwindSample, ip), ips[0]);
        for (i, &ip) in ips.iter().enumerate() {
            put64(&mut b, std::mem::offset_of!(UnwindSample, ips) + i * 8, ip);
        }
        for (i, &w) in stack_words.iter().enumerate() {
            put64(&mut b, std::mem::offset_of!(UnwindSample, stack) + i * 8, w);
        }
        b
    }

    #[test]
    fn a_sample_reads_only_its_copy() {
        let b = record(&[11, 22, 33], &[0x1000, 0x2005]);
        let s = Sample::parse(&b).expect("a whole record");
        assert_eq!(s.tgid, 7);
        assert_eq!(s.frames().collect::<Vec<_>>(), [0x1000, 0x2005]);
        assert_eq!(s.read(0x7000), Some(11));
        assert_eq!(s.read(0x7010), Some(33));
        assert_eq!(s.read(0x7014), None, "crosses the end of the copy");
        assert_eq!(s.read(0x6ff8), None, "below sp");
        assert_eq!(s.read(u64::MAX), None);
        assert!(Sample::parse(&b[..100]).is_none());
    }

    #[test]
    fn a_signal_frame_goes_on_from_the_interrupted_registers() {
        // Frame 0 (by frame pointer) returns to the trampoline at 0x9000;
        // the ucontext is above, at 0x7010; the interrupted frame at
        // 0x7200 returns to 0x5555 and ends the chain.
        let mut words = vec![0u64; 66];
        words[1] = 0x9000;
        let greg = |r: i32| {
            (0x10
                + offset_of!(libc::ucontext_t, uc_mcontext)
                + offset_of!(libc::mcontext_t, gregs)
                + 8 * usize::try_from(r).unwrap())
                / 8
        };
        words[greg(libc::REG_RIP)] = 0x4444;
        words[greg(libc::REG_RSP)] = 0x7200;
        words[greg(libc::REG_RBP)] = 0x7200;
        words[0x208 / 8] = 0x5555;
        let b = record(&words, &[0x1000]);
        let s = Sample {
            bp: 0x7000,
            ..Sample::parse(&b).expect("a whole record")
        };
        let (out, end) = framehop_alone(&s, &|addr| addr == 0x9000);
        assert_eq!(out, [0x1000, 0x9000, 0x4444, 0x5555]);
        assert!(matches!(end, End::Root), "{end:?}");
    }

    #[test]
    fn framehop_stops_where_the_copy_ends() {
        // No modules: framehop follows frame pointers. rbp chain: the frame
        // at 0x7000 returns to 0x2005 and points at 0x7010, which returns
        // to 0x3009 and points past the copy.
        let b = record(&[0x7010, 0x2005, 0x7100, 0x3009], &[0x1000]);
        let s = Sample {
            bp: 0x7000,
            ..Sample::parse(&b).expect("a whole record")
        };
        let (out, end) = framehop_alone(&s, &|_| false);
        assert_eq!(out, [0x1000, 0x2005, 0x3009]);
        assert!(matches!(end, End::PastCopy), "{end:?}");
    }
}
