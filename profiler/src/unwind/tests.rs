//! The tables of generated and system binaries against readelf's reading of
//! the same CFI (`readelf --debug-dump=frames-interp`), and the disk cache.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use object::{Object, ObjectSection, ObjectSymbol};
use profiler_common::unwind::{
    CFA_END, CFA_NONE, CFA_PLT, CFA_RBP, CFA_RSP, CFA_SIGNAL, CFA_UNSUPPORTED, RBP_AT_CFA,
    RBP_SAME, RBP_UNKNOWN, UnwindRow,
};

use super::{FileKey, UnwindTable, build_table, file_key, find_row, table_for};

const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
const GLIB: &str = "/usr/lib/x86_64-linux-gnu/libglib-2.0.so.0";
const LIBVIRT: &str = "/usr/lib/x86_64-linux-gnu/libvirt.so.0";

/// A scratch directory for one test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hvprof-unwind-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the scratch directory");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds `samples/unwind/frames.c` into `dir/name`.
fn build_sample(dir: &Path, name: &str, extra_flags: &[&str]) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/unwind/frames.c");
    let out = dir.join(name);
    let status = Command::new("gcc")
        .args(["-O2", "-fomit-frame-pointer", "-Wl,-z,lazy"])
        .args(extra_flags)
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed on {}", source.display());
    out
}

fn table_of(path: &Path) -> UnwindTable {
    let bytes = fs::read(path).expect("read the ELF file");
    build_table(&bytes).expect("build the unwind table")
}

/// Rows whose `pc` is in `[start, end)`, with the one in force at `start`.
fn rows_in(rows: &[UnwindRow], start: u64, end: u64) -> Vec<UnwindRow> {
    let mut found: Vec<UnwindRow> = find_row(rows, u32::try_from(start).unwrap())
        .into_iter()
        .copied()
        .collect();
    found.extend(
        rows.iter()
            .filter(|r| u64::from(r.pc) > start && u64::from(r.pc) < end),
    );
    found
}

/// A symbol's `[start, end)` in the symbol table or, failing that, the
/// dynamic one.
fn symbol_range(path: &Path, name: &str) -> Option<(u64, u64)> {
    let bytes = fs::read(path).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    file.symbols()
        .chain(file.dynamic_symbols())
        .find(|s| s.name() == Ok(name))
        .map(|s| (s.address(), s.address() + s.size()))
}

fn section_range(path: &Path, name: &str) -> Option<(u64, u64)> {
    let bytes = fs::read(path).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    let section = file.section_by_name(name)?;
    Some((section.address(), section.address() + section.size()))
}

/// One row of readelf's interpreted CFI, as printed.
#[derive(Clone, Debug)]
struct ReadelfRow {
    loc: u64,
    cfa: String,
    rbp: Option<String>,
    ra: Option<String>,
}

#[derive(Debug)]
struct ReadelfFde {
    section: String,
    start: u64,
    end: u64,
    /// Its CIE has the `S` augmentation.
    signal: bool,
    rows: Vec<ReadelfRow>,
}

fn readelf_fdes(path: &Path) -> Vec<ReadelfFde> {
    let out = Command::new("readelf")
        .arg("--debug-dump=frames-interp")
        .arg(path)
        .output()
        .expect("run readelf");
    // readelf exits 1 on Debian's libc with nothing on stderr (a separate
    // debug file it does not find?), having printed the frames all right.
    let text = String::from_utf8(out.stdout).expect("readelf prints UTF-8");
    assert!(
        text.contains("Contents of the"),
        "readelf printed no frames for {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_readelf(&text)
}

/// Whitespace-separated, except that readelf prints a register rule as
/// `r9 (r9)`: one value.
fn tokens(line: &str) -> Vec<String> {
    let mut tokens: Vec<String> = Vec::new();
    for word in line.split_whitespace() {
        match tokens.last_mut() {
            Some(last) if word.starts_with('(') => {
                last.push(' ');
                last.push_str(word);
            }
            _ => tokens.push(word.to_owned()),
        }
    }
    tokens
}

fn hex(text: &str) -> u64 {
    u64::from_str_radix(text, 16).unwrap_or_else(|_| panic!("not hex: {text}"))
}

fn parse_readelf(text: &str) -> Vec<ReadelfFde> {
    struct Cie {
        signal: bool,
        row: Option<ReadelfRow>,
    }
    let mut section = String::new();
    // By (section, offset).
    let mut cies: HashMap<(String, u64), Cie> = HashMap::new();
    let mut cie_rows_of_fdes = Vec::new();
    let mut fdes: Vec<ReadelfFde> = Vec::new();
    // The CIE whose rows are being read, or `None` for the last FDE.
    let mut in_cie: Option<(String, u64)> = None;
    let mut columns: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Contents of the ") {
            section = rest.split(' ').next().unwrap().to_owned();
            continue;
        }
        let tokens = tokens(line);
        match tokens.get(3).map(String::as_str) {
            Some("CIE") => {
                let key = (section.clone(), hex(&tokens[0]));
                let signal = tokens[4].trim_matches('"').contains('S');
                cies.insert(key.clone(), Cie { signal, row: None });
                in_cie = Some(key);
                columns.clear();
                continue;
            }
            Some("FDE") => {
                let cie_offset = hex(tokens[4].strip_prefix("cie=").unwrap());
                let (start, end) = tokens[5]
                    .strip_prefix("pc=")
                    .and_then(|r| r.split_once(".."))
                    .unwrap();
                let cie = &cies[&(section.clone(), cie_offset)];
                fdes.push(ReadelfFde {
                    section: section.clone(),
                    start: hex(start),
                    end: hex(end),
                    signal: cie.signal,
                    rows: Vec::new(),
                });
                cie_rows_of_fdes.push(cie.row.clone());
                in_cie = None;
                columns.clear();
                continue;
            }
            _ => {}
        }
        if tokens.first().map(String::as_str) == Some("LOC") {
            columns = tokens[1..].to_vec();
            continue;
        }
        let is_row = tokens.len() >= 2
            && tokens[0].len() == 16
            && tokens[0].bytes().all(|b| b.is_ascii_hexdigit());
        if !is_row || columns.is_empty() {
            continue;
        }
        let value = |name: &str| {
            let i = columns.iter().position(|c| c == name)?;
            tokens.get(i + 1).cloned()
        };
        let row = ReadelfRow {
            loc: hex(&tokens[0]),
            cfa: tokens[1].clone(),
            rbp: value("rbp"),
            ra: value("ra"),
        };
        match &in_cie {
            Some(key) => cies.get_mut(key).unwrap().row = Some(row),
            None => fdes.last_mut().unwrap().rows.push(row),
        }
    }
    // readelf prints no rows for an FDE without instructions: its CIE's
    // rules hold throughout.
    for (fde, cie_row) in fdes.iter_mut().zip(cie_rows_of_fdes) {
        if fde.rows.is_empty()
            && let Some(row) = cie_row
        {
            fde.rows.push(ReadelfRow {
                loc: fde.start,
                ..row
            });
        }
    }
    fdes
}

/// What a row must say, from readelf's text.
#[derive(Debug, PartialEq)]
enum Want {
    /// Only the CFA type matters (end, signal, unsupported).
    Kind(u8),
    /// A CFA expression: the PLT's (then with this rbp rule) or
    /// unsupported.
    Expression {
        rbp_type: u8,
        rbp_offset: i16,
    },
    Rule(UnwindRow),
}

fn want(signal: bool, row: &ReadelfRow) -> Want {
    if signal {
        return Want::Kind(CFA_SIGNAL);
    }
    match row.ra.as_deref() {
        Some("u") => return Want::Kind(CFA_END),
        Some("c-8") => {}
        _ => return Want::Kind(CFA_UNSUPPORTED),
    }
    // readelf prints `u` both for an explicit undefined rule and for a
    // register with no rule yet; `s` is same-value.
    let (rbp_type, rbp_offset) = match row.rbp.as_deref() {
        None | Some("u" | "s") => (RBP_SAME, 0),
        Some(v) => match v.strip_prefix('c').and_then(|n| n.parse::<i16>().ok()) {
            Some(n) => (RBP_AT_CFA, n),
            None => (RBP_UNKNOWN, 0),
        },
    };
    if row.cfa == "exp" {
        return Want::Expression {
            rbp_type,
            rbp_offset,
        };
    }
    let Some(split) = row.cfa.rfind(['+', '-']) else {
        return Want::Kind(CFA_UNSUPPORTED);
    };
    let (register, offset) = row.cfa.split_at(split);
    let cfa_type = match register {
        "rsp" => CFA_RSP,
        "rbp" => CFA_RBP,
        _ => return Want::Kind(CFA_UNSUPPORTED),
    };
    let Ok(cfa_offset) = offset.parse::<i32>() else {
        return Want::Kind(CFA_UNSUPPORTED);
    };
    Want::Rule(UnwindRow {
        pc: 0,
        cfa_offset,
        rbp_offset,
        cfa_type,
        rbp_type,
    })
}

fn matches(want: &Want, ours: &UnwindRow) -> bool {
    match *want {
        Want::Kind(kind) => ours.cfa_type == kind,
        Want::Expression {
            rbp_type,
            rbp_offset,
        } => {
            ours.cfa_type == CFA_UNSUPPORTED
                || (ours.cfa_type == CFA_PLT
                    && (0..=15).contains(&ours.cfa_offset)
                    && ours.rbp_type == rbp_type
                    && ours.rbp_offset == rbp_offset)
        }
        Want::Rule(rule) => UnwindRow { pc: 0, ..*ours } == rule,
    }
}

/// Checks the row in force at every row readelf prints, and a gap row
/// where an FDE ends and no other goes on. Returns how many rows it checked.
fn compare_with_readelf(path: &Path, table: &UnwindTable) -> usize {
    let fdes: Vec<ReadelfFde> = readelf_fdes(path)
        .into_iter()
        .filter(|f| f.start < f.end)
        .collect();
    let eh_ranges: Vec<(u64, u64)> = fdes
        .iter()
        .filter(|f| f.section == ".eh_frame")
        .map(|f| (f.start, f.end))
        .collect();
    let mut starts: Vec<(u64, u64)> = fdes.iter().map(|f| (f.start, f.end)).collect();
    starts.sort_unstable();
    let mut mismatches = Vec::new();
    let mut checked = 0;
    for fde in &fdes {
        let shadowed = fde.section == ".debug_frame"
            && eh_ranges.iter().any(|&(s, e)| s < fde.end && fde.start < e);
        if shadowed {
            continue;
        }
        for row in fde.rows.iter().filter(|r| r.loc < fde.end) {
            checked += 1;
            let want = want(fde.signal, row);
            let ours = find_row(&table.rows, u32::try_from(row.loc).unwrap());
            if !ours.is_some_and(|ours| matches(&want, ours)) {
                mismatches.push(format!(
                    "{} FDE {:#x}..{:#x} at {:#x} (cfa {} rbp {:?} ra {:?}): want {want:?}, have {ours:?}",
                    fde.section, fde.start, fde.end, row.loc, row.cfa, row.rbp, row.ra
                ));
            }
        }
        let continued = starts
            .iter()
            .take_while(|&&(s, _)| s <= fde.end)
            .any(|&(_, e)| e > fde.end);
        let at_end = find_row(&table.rows, u32::try_from(fde.end).unwrap());
        if !continued && at_end.map(|r| r.cfa_type) != Some(CFA_NONE) {
            mismatches.push(format!(
                "{} FDE {:#x}..{:#x}: no gap row at its end, have {at_end:?}",
                fde.section, fde.start, fde.end
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {checked} readelf rows of {} differ:\n{}",
        mismatches.len(),
        path.display(),
        mismatches[..mismatches.len().min(30)].join("\n")
    );
    checked
}

#[test]
fn sample_rows_match_readelf() {
    let scratch = Scratch::new("sample");
    let binary = build_sample(&scratch.0, "frames", &[]);
    let table = table_of(&binary);
    assert!(!table.stats.from_debug_frame);
    assert_eq!(table.stats.rows, table.rows.len());
    assert!(table.rows.windows(2).all(|w| w[0].pc < w[1].pc));
    compare_with_readelf(&binary, &table);

    // The sample has the frame shapes it is meant to have.
    let rows_of = |name| {
        let (start, end) = symbol_range(&binary, name).expect("symbol in the sample");
        rows_in(&table.rows, start, end)
    };
    assert!(
        rows_of("leaf")
            .iter()
            .all(|r| (r.cfa_type, r.cfa_offset) == (CFA_RSP, 8)),
        "leaf: {:?}",
        rows_of("leaf")
    );
    assert!(
        rows_of("vla").iter().any(|r| r.cfa_type == CFA_RBP
            && r.cfa_offset == 16
            && (r.rbp_type, r.rbp_offset) == (RBP_AT_CFA, -16)),
        "vla: {:?}",
        rows_of("vla")
    );
    assert!(
        rows_of("recurse")
            .iter()
            .any(|r| r.cfa_type == CFA_RSP && r.cfa_offset > 8),
        "recurse: {:?}",
        rows_of("recurse")
    );
    assert!(
        rows_of("_start").iter().any(|r| r.cfa_type == CFA_END),
        "_start: {:?}",
        rows_of("_start")
    );
}

#[test]
fn comparison_with_readelf_notices_a_wrong_row() {
    let scratch = Scratch::new("wrong-row");
    let binary = build_sample(&scratch.0, "frames", &[]);
    let table = table_of(&binary);
    let rbp_based = table
        .rows
        .iter()
        .position(|r| r.cfa_type == CFA_RBP)
        .unwrap();
    let gap = table
        .rows
        .iter()
        .position(|r| r.cfa_type == CFA_NONE)
        .unwrap();
    let mut wrong_offset = table.clone();
    wrong_offset.rows[rbp_based].cfa_offset += 8;
    let mut wrong_rbp = table.clone();
    wrong_rbp.rows[rbp_based].rbp_type = RBP_SAME;
    let mut no_gap = table.clone();
    no_gap.rows.remove(gap);
    for (what, wrong) in [
        ("CFA offset", wrong_offset),
        ("rbp rule", wrong_rbp),
        ("gap", no_gap),
    ] {
        let caught = std::panic::catch_unwind(|| compare_with_readelf(&binary, &wrong));
        assert!(caught.is_err(), "a wrong {what} went unnoticed");
    }
}

#[test]
fn lazy_plt_has_plt_rows() {
    let scratch = Scratch::new("plt");
    // The classic lazy PLT, and ld's IBT one (endbr64 first).
    for (name, flags, threshold) in [
        ("frames", &[][..], 11),
        ("frames-ibt", &["-Wl,-z,ibtplt"][..], 9),
    ] {
        let binary = build_sample(&scratch.0, name, flags);
        let table = table_of(&binary);
        let (start, end) = section_range(&binary, ".plt").expect("a lazily bound binary has .plt");
        assert!(end - start > 16, "{name}: only PLT0 in .plt");
        // PLT0 pushes the link map, then jumps: plain rsp rules.
        let plt0 = find_row(&table.rows, u32::try_from(start).unwrap()).unwrap();
        assert_eq!((plt0.cfa_type, plt0.cfa_offset), (CFA_RSP, 16), "{name}");
        for pc in start + 16..end {
            let row = find_row(&table.rows, u32::try_from(pc).unwrap()).unwrap();
            assert_eq!(
                (row.cfa_type, row.cfa_offset),
                (CFA_PLT, threshold),
                "{name} at {pc:#x}"
            );
        }
        assert!(table.stats.plt_rows >= 1);
        compare_with_readelf(&binary, &table);
    }
}

#[test]
fn debug_frame_fills_in_what_eh_frame_lacks() {
    let scratch = Scratch::new("debug-frame");
    // gcc then describes the sample's own functions in .debug_frame only;
    // crt1.o and friends keep theirs in .eh_frame.
    let binary = build_sample(
        &scratch.0,
        "frames",
        &[
            "-g",
            "-fno-asynchronous-unwind-tables",
            "-fno-unwind-tables",
        ],
    );
    let table = table_of(&binary);
    assert!(table.stats.from_debug_frame);
    compare_with_readelf(&binary, &table);
    let (start, end) = symbol_range(&binary, "vla").unwrap();
    assert!(
        rows_in(&table.rows, start, end)
            .iter()
            .any(|r| r.cfa_type == CFA_RBP),
        "vla has no rbp-based rows"
    );
}

#[test]
fn libc_matches_readelf() {
    let libc = Path::new(LIBC);
    if !libc.exists() {
        return;
    }
    let bytes = fs::read(libc).unwrap();
    let started = Instant::now();
    let table = build_table(&bytes).unwrap();
    let took = started.elapsed();
    eprintln!("{LIBC}: {:?} in {took:?}", table.stats);
    assert!(
        (10_000..60_000).contains(&table.rows.len()),
        "{} rows",
        table.rows.len()
    );
    let checked = compare_with_readelf(libc, &table);
    eprintln!("{checked} readelf rows checked");

    // __restore_rt is local (not in .dynsym): its FDE is the one whose
    // CIE has the S augmentation, which the comparison checked.
    assert!(readelf_fdes(libc).iter().any(|f| f.signal));
    assert!(table.stats.signal_rows >= 1);
    // clone's child and clone3's mark the end of a thread's stack.
    let (start, end) = symbol_range(libc, "clone").expect("libc exports clone");
    assert!(
        rows_in(&table.rows, start, end)
            .iter()
            .any(|r| r.cfa_type == CFA_END),
        "no end row in clone"
    );
    assert!(table.rows.iter().filter(|r| r.cfa_type == CFA_END).count() >= 2);
}

#[test]
fn glib_matches_readelf() {
    let glib = Path::new(GLIB);
    if !glib.exists() {
        return;
    }
    let table = table_of(glib);
    eprintln!("{GLIB}: {:?}", table.stats);
    compare_with_readelf(glib, &table);
}

/// `cargo test -p profiler --lib unwind::tests::measure -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn measure_system_libraries() {
    for path in [LIBC, GLIB, LIBVIRT, "/usr/bin/qemu-system-x86_64"] {
        let Ok(bytes) = fs::read(path) else {
            continue;
        };
        let started = Instant::now();
        let table = build_table(&bytes).unwrap();
        println!(
            "{path}: {} rows from {} FDEs in {:?} ({} unsupported, {} PLT, {} signal, {} bad FDEs)",
            table.stats.rows,
            table.stats.fdes,
            started.elapsed(),
            table.stats.unsupported_rows,
            table.stats.plt_rows,
            table.stats.signal_rows,
            table.stats.bad_fdes,
        );
    }
}

#[test]
fn cache_returns_the_same_rows_and_survives_damage() {
    let scratch = Scratch::new("cache");
    let binary = build_sample(&scratch.0, "frames", &[]);
    let cache_dir = scratch.0.join("cache");

    let (built, from_cache) = table_for(&binary, &cache_dir).unwrap();
    assert!(!from_cache);
    assert_eq!(built, table_of(&binary));
    let (cached, from_cache) = table_for(&binary, &cache_dir).unwrap();
    assert!(from_cache);
    assert_eq!(cached, built);

    let key = file_key(&binary).unwrap();
    assert!(matches!(key, FileKey::BuildId(_)), "{key:?}");
    let cache_file = cache_dir.join(format!("{key}.rows"));
    let good = fs::read(&cache_file).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    let mut huge_count = good.clone();
    huge_count[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    let damaged: [(&str, Vec<u8>); 6] = [
        ("truncated", good[..good.len() - 5].to_vec()),
        ("header only", good[..48].to_vec()),
        ("empty", Vec::new()),
        ("flipped bit", flipped),
        ("huge row count", huge_count),
        ("not a cache file", b"hello, world".repeat(10)),
    ];
    for (what, bytes) in damaged {
        fs::write(&cache_file, bytes).unwrap();
        let (rebuilt, from_cache) = table_for(&binary, &cache_dir).unwrap();
        assert!(!from_cache, "{what}: taken from the cache");
        assert_eq!(rebuilt, built, "{what}");
        assert_eq!(
            fs::read(&cache_file).unwrap(),
            good,
            "{what}: not rewritten"
        );
    }
}

#[test]
fn file_without_build_id_is_keyed_by_inode() {
    let scratch = Scratch::new("no-build-id");
    let binary = build_sample(&scratch.0, "frames", &["-Wl,--build-id=none"]);
    let key = file_key(&binary).unwrap();
    assert!(matches!(key, FileKey::Inode { .. }), "{key:?}");
    assert!(key.to_string().starts_with("inode-"));
    let (_, from_cache) = table_for(&binary, &scratch.0.join("cache")).unwrap();
    assert!(!from_cache);
    let (_, from_cache) = table_for(&binary, &scratch.0.join("cache")).unwrap();
    assert!(from_cache);
}
