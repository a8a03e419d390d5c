//! Turning raw stack addresses into frame names with blazesym: kernel frames
//! from kallsyms, user frames from the ELF files by file offset (computed
//! from the process snapshots in [`crate::procmaps`], so a process that is
//! gone still symbolizes), with inlined functions and demangled names.
//!
//! Frame naming follows the folded-stack conventions: kernel frames end in
//! `_[k]`, inlined ones in `_[i]`, and a frame that cannot be named shows its
//! module and offset (`[libfoo.so+0x1a2b]`), never a blank.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    rc::Rc,
    time::{Duration, Instant},
};

use blazesym::{
    MaybeDefault,
    symbolize::{
        Input, Symbolized, Symbolizer as Blaze,
        source::{self, Source},
    },
};

use crate::procmaps::{Location, Snapshot};

/// Frames of one address, root first (the function, then what is inlined
/// into it at that address), each name shared by every address that has it.
pub type Frames = Vec<Rc<str>>;

/// Counts of how symbolization went, for the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolStats {
    pub user_frames: u64,
    /// User frames of processes with no snapshot at all: gone before their
    /// maps could be read.
    pub user_unmapped: u64,
    /// User frames outside every mapping of their process: usually a
    /// frame-pointer walk through code built without frame pointers.
    pub user_outside: u64,
    /// User frames in a file, but without a symbol for that offset.
    pub user_unnamed: u64,
    pub kernel_frames: u64,
    pub kernel_unnamed: u64,
}

/// One long-lived symbolizer: blazesym's caches live as long as it does,
/// but for the files no frame needed for a while (see
/// [`Symbolizer::forget_idle_files`]).
pub struct Symbolizer {
    /// For the kernel: kallsyms, read once.
    blaze: Blaze,
    /// For files: each one opened stays mapped (and its symbols and DWARF
    /// parsed) as long as this lives.
    files_blaze: Blaze,
    kernel: HashMap<u64, Frames>,
    /// What is known of each file, by path.
    files: HashMap<String, FileNames>,
    /// Every name of a frame, each once: a function has many addresses,
    /// and hours of recording name hundreds of thousands of them.
    names: HashSet<Rc<str>>,
    /// When `files_blaze` was made.
    files_since: Instant,
    pub stats: SymbolStats,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

fn basename(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or(path)
}

/// What is known of one file.
struct FileNames {
    /// When a frame last needed it.
    used: Instant,
    /// The frames at each offset named so far.
    at: HashMap<u64, Frames>,
}

/// `name`, shared with every other frame of that name in `names`.
fn intern(names: &mut HashSet<Rc<str>>, name: String) -> Rc<str> {
    if let Some(n) = names.get(name.as_str()) {
        return Rc::clone(n);
    }
    let n: Rc<str> = Rc::from(name);
    names.insert(Rc::clone(&n));
    n
}

fn frames_of(sym: &Symbolized<'_>, suffix: &str, names: &mut HashSet<Rc<str>>) -> Option<Frames> {
    let sym = sym.as_sym()?;
    let mut frames = vec![intern(names, format!("{}{suffix}", sym.name))];
    for f in &sym.inlined {
        frames.push(intern(names, format!("{}_[i]", f.name)));
    }
    Some(frames)
}

fn blaze() -> Blaze {
    Blaze::builder()
        .enable_inlined_fns(true)
        .enable_demangling(true)
        .enable_code_info(true)
        .build()
}

impl Symbolizer {
    #[must_use]
    pub fn new() -> Self {
        Self {
            blaze: blaze(),
            files_blaze: blaze(),
            kernel: HashMap::new(),
            files: HashMap::new(),
            names: HashSet::new(),
            files_since: Instant::now(),
            stats: SymbolStats::default(),
        }
    }

    /// Drops what is known of the files no frame needed for `idle`: their
    /// names, and — at most once per `idle`, as blazesym keeps every file
    /// it opened until it is dropped — the file symbolizer, whose files in
    /// use are opened again when a frame needs them. A recording of hours
    /// beside builds meets a new set of binaries every minute.
    pub fn forget_idle_files(&mut self, idle: Duration) {
        if self.files_since.elapsed() < idle {
            return;
        }
        let before = self.files.len();
        self.files.retain(|_, f| f.used.elapsed() < idle);
        if self.files.len() == before {
            return;
        }
        self.names.retain(|n| Rc::strong_count(n) > 1);
        self.files_blaze = blaze();
        self.files_since = Instant::now();
    }

    /// How many addresses (kernel and in files) and distinct names it keeps.
    #[must_use]
    pub fn kept(&self) -> (usize, usize) {
        let addresses = self.kernel.len() + self.files.values().map(|f| f.at.len()).sum::<usize>();
        (addresses, self.names.len())
    }

    /// Symbolizes kernel addresses in one batch; later lookups hit the cache.
    pub fn prepare_kernel(&mut self, addrs: &[u64]) {
        let mut todo: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|a| !self.kernel.contains_key(a))
            .collect();
        todo.sort_unstable();
        todo.dedup();
        if todo.is_empty() {
            return;
        }
        let src = Source::Kernel(source::Kernel {
            kallsyms: MaybeDefault::Default,
            vmlinux: MaybeDefault::None,
            kaslr_offset: None,
            debug_syms: false,
            ..source::Kernel::default()
        });
        let syms = self.blaze.symbolize(&src, Input::AbsAddr(&todo));
        for (i, &addr) in todo.iter().enumerate() {
            let frames = syms
                .as_ref()
                .ok()
                .and_then(|s| s.get(i))
                .and_then(|s| frames_of(s, "_[k]", &mut self.names));
            let frames = frames
                .unwrap_or_else(|| vec![intern(&mut self.names, format!("[kernel+{addr:#x}]"))]);
            self.kernel.insert(addr, frames);
        }
    }

    /// The frames of a kernel address (after [`Self::prepare_kernel`]).
    pub fn kernel_frames(&mut self, addr: u64) -> Frames {
        if !self.kernel.contains_key(&addr) {
            self.prepare_kernel(&[addr]);
        }
        let f = self.kernel.get(&addr).cloned().unwrap_or_default();
        self.stats.kernel_frames += 1;
        if f.first().is_some_and(|n| n.starts_with("[kernel+")) {
            self.stats.kernel_unnamed += 1;
        }
        f
    }

    /// Symbolizes many `(file, offset)` pairs, batching per file.
    pub fn prepare_files(&mut self, items: &[(String, u64)]) {
        let mut by_file: HashMap<&str, Vec<u64>> = HashMap::new();
        for (path, off) in items {
            if !self.files.get(path).is_some_and(|f| f.at.contains_key(off)) {
                by_file.entry(path).or_default().push(*off);
            }
        }
        let now = Instant::now();
        for (path, mut offs) in by_file {
            offs.sort_unstable();
            offs.dedup();
            // DWARF first (inlined functions, better names); some files make
            // blazesym's DWARF reader fail as a whole (seen with Debian's
            // libc), and then the symbol tables alone still name functions.
            let src = Source::Elf(source::Elf::new(path));
            let syms = self
                .files_blaze
                .symbolize(&src, Input::FileOffset(&offs))
                .or_else(|_| {
                    let mut elf = source::Elf::new(path);
                    elf.debug_syms = false;
                    self.files_blaze
                        .symbolize(&Source::Elf(elf), Input::FileOffset(&offs))
                });
            let file = self
                .files
                .entry(path.to_owned())
                .or_insert_with(|| FileNames {
                    used: now,
                    at: HashMap::new(),
                });
            file.used = now;
            for (i, &off) in offs.iter().enumerate() {
                let frames = syms
                    .as_ref()
                    .ok()
                    .and_then(|s| s.get(i))
                    .and_then(|s| frames_of(s, "", &mut self.names));
                let frames = frames.unwrap_or_else(|| {
                    vec![intern(
                        &mut self.names,
                        format!("[{}+{off:#x}]", basename(path)),
                    )]
                });
                file.at.insert(off, frames);
            }
        }
    }

    /// The frames of a user address, trying the process's snapshots from
    /// newest to oldest (an exec changes the address space).
    pub fn user_frames(&mut self, snapshots: &[&Snapshot], addr: u64) -> Frames {
        self.stats.user_frames += 1;
        let Some(loc) = snapshots.iter().rev().find_map(|s| s.locate(addr)) else {
            if snapshots.is_empty() {
                self.stats.user_unmapped += 1;
            } else {
                self.stats.user_outside += 1;
            }
            return vec![intern(&mut self.names, "[unknown]".to_owned())];
        };
        match loc {
            Location::File { path, offset } => {
                let known = self.files.get_mut(path).and_then(|f| {
                    f.used = Instant::now();
                    f.at.get(&offset).cloned()
                });
                let f = known.unwrap_or_else(|| {
                    self.prepare_files(&[(path.to_owned(), offset)]);
                    self.files
                        .get(path)
                        .and_then(|f| f.at.get(&offset).cloned())
                        .unwrap_or_default()
                });
                if f.first().is_some_and(|n| n.starts_with('[')) {
                    self.stats.user_unnamed += 1;
                }
                f
            }
            Location::Pseudo { name, offset } => {
                let name = format!("[{}+{offset:#x}]", name.trim_matches(['[', ']']));
                vec![intern(&mut self.names, name)]
            }
        }
    }

    /// The `(file, offset)` of a user address, for batching.
    #[must_use]
    pub fn file_offset(snapshots: &[&Snapshot], addr: u64) -> Option<(String, u64)> {
        match snapshots.iter().rev().find_map(|s| s.locate(addr))? {
            Location::File { path, offset } => Some((path.to_owned(), offset)),
            Location::Pseudo { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(frames: &Frames) -> Vec<&str> {
        frames.iter().map(|f| &**f).collect()
    }

    #[inline(never)]
    #[unsafe(no_mangle)]
    pub extern "C" fn hvprof_symbolize_test_target() -> u64 {
        std::hint::black_box(42)
    }

    /// The return address of its call: an address inside the caller.
    #[cfg(target_arch = "x86_64")]
    #[inline(never)]
    fn return_address() -> u64 {
        let ra: u64;
        // SAFETY: frame pointers are forced (.cargo/config.toml), so [rbp+8]
        // is this function's return address.
        unsafe { std::arch::asm!("mov {}, [rbp + 8]", out(reg) ra) };
        ra
    }

    #[cfg(target_arch = "x86_64")]
    #[expect(
        clippy::inline_always,
        reason = "the test needs it inlined even without optimization"
    )]
    #[inline(always)]
    fn hvprof_inlined_helper() -> u64 {
        return_address()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(never)]
    #[unsafe(no_mangle)]
    pub extern "C" fn hvprof_symbolize_outer() -> u64 {
        std::hint::black_box(hvprof_inlined_helper())
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn inlined_functions_become_frames() {
        let snap = Snapshot::take(std::process::id()).unwrap();
        let mut s = Symbolizer::new();
        // A return address points after the call: symbolize the call itself.
        let frames = s.user_frames(&[&snap], hvprof_symbolize_outer() - 1);
        assert_eq!(&*frames[0], "hvprof_symbolize_outer", "{frames:?}");
        assert!(
            frames[1..]
                .iter()
                .any(|f| f.ends_with("hvprof_inlined_helper_[i]")),
            "{frames:?}"
        );
    }

    #[test]
    fn names_a_function_of_this_binary_by_file_offset() {
        let snap = Snapshot::take(std::process::id()).unwrap();
        let mut s = Symbolizer::new();
        let addr = hvprof_symbolize_test_target as extern "C" fn() -> u64 as usize as u64;
        let frames = s.user_frames(&[&snap], addr);
        assert_eq!(names(&frames), ["hvprof_symbolize_test_target"]);
        // The same address in no snapshot: unknown, counted.
        assert_eq!(names(&s.user_frames(&[], addr)), ["[unknown]"]);
        assert_eq!(s.stats.user_unmapped, 1);
    }

    #[test]
    fn unknown_offsets_show_module_and_offset() {
        let exe = std::env::current_exe().unwrap();
        let path = exe.to_str().unwrap().to_owned();
        // Past the end of the file: no segment maps it.
        let past = std::fs::metadata(&exe).unwrap().len() + 0x1000;
        let mut s = Symbolizer::new();
        let snap = Snapshot {
            mappings: vec![crate::procmaps::Mapping {
                start: 0x1000,
                end: 0x2000,
                offset: past,
                path: path.clone(),
            }],
        };
        let f = s.user_frames(&[&snap], 0x1000);
        let name = exe.file_name().unwrap().to_str().unwrap();
        assert_eq!(names(&f), [format!("[{name}+{past:#x}]")]);
        assert_eq!(s.stats.user_unnamed, 1);
    }
}
