//! `./x gen-libvirt-procs`: writes `profiler/src/libvirt/procs.rs`, the
//! names of the RPC programs libvirtd serves and of their procedures, from
//! Debian's libvirt source package for the installed libvirt.
//!
//! libvirtd's probes give a program and a procedure number; the names are
//! read from libvirt's own protocol definitions (`*.x`, XDR) and spelled as
//! libvirt's own generator spells them (`fixup_name` and `name_to_ProcName`
//! of `src/rpc/gendispatch.pl`, whose substitutions are read from the same
//! source package): `REMOTE_PROC_DOMAIN_CREATE_XML` → `DomainCreateXML`.
//! The generated file is committed: CI cannot download sources.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail, ensure};

use crate::{packages, toolchain};

/// The protocol file of each program libvirtd serves on its sockets, in the
/// order the generated table lists them.
const PROTOCOLS: [&str; 5] = [
    "src/remote/remote_protocol.x",
    "src/remote/qemu_protocol.x",
    "src/remote/lxc_protocol.x",
    "src/admin/admin_protocol.x",
    "src/rpc/virkeepaliveprotocol.x",
];

/// libvirt's generator, whose `fixup_name` says which words are spelled in
/// capitals (`Xml` → `XML`, `Uuid` → `UUID`, …).
const GENDISPATCH: &str = "src/rpc/gendispatch.pl";

/// Programs whose names are checked against their public API symbols, as
/// a check of the spelling: (program, symbol file, API prefix).
const API_SYMBOLS: [(&str, &str, &str); 2] = [
    ("remote", "src/libvirt_public.syms", "vir"),
    ("admin", "src/admin/libvirt_admin_public.syms", "virAdm"),
];

/// Where the table goes, under the workspace root.
const OUTPUT: &str = "profiler/src/libvirt/procs.rs";

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// The Debian version of libvirt's source package; default: the
    /// installed libvirt-daemon's.
    #[arg(long)]
    version: Option<String>,
    /// Read this unpacked Debian libvirt source tree instead of downloading
    /// one (its debian/changelog names the version).
    #[arg(long, conflicts_with = "version")]
    source_dir: Option<PathBuf>,
}

/// A program as its protocol file defines it.
#[derive(Debug, PartialEq, Eq)]
struct Program {
    /// The word before `_PROGRAM` (`REMOTE`, `QEMU`, …).
    prefix: String,
    number: u32,
    file: String,
    /// (number, name), sorted by number.
    procedures: Vec<(u32, String)>,
}

/// One substitution of gendispatch.pl's `fixup_name`, applied to each
/// word of a name: `s/Xml$/XML/` (`at_end`) or `s/Pm/PM/`.
#[derive(Debug, PartialEq, Eq)]
struct Fixup {
    from: String,
    to: String,
    at_end: bool,
}

/// A temporary directory, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn run(opts: &Opts) -> anyhow::Result<()> {
    let scratch =
        Scratch(std::env::temp_dir().join(format!("hvprof-libvirt-src-{}", std::process::id())));
    let (tree, version, how) = if let Some(dir) = &opts.source_dir {
        (
            dir.clone(),
            changelog_version(dir)?,
            "an unpacked tree".to_owned(),
        )
    } else {
        let version = match &opts.version {
            Some(v) => v.clone(),
            None => installed_version()?,
        };
        let (tree, how) = fetch(&version, &scratch.0)?;
        (tree, version, how)
    };
    let fixups = parse_fixups(&read(&tree, GENDISPATCH)?)
        .with_context(|| format!("reading fixup_name of {GENDISPATCH}"))?;
    let programs = PROTOCOLS
        .iter()
        .map(|file| {
            parse_protocol(&read(&tree, file)?, file, &fixups)
                .with_context(|| format!("parsing {file} of libvirt {version}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for p in &programs {
        println!(
            "gen-libvirt-procs: {} (0x{:08x}): {} procedures, numbers {}..={}",
            p.prefix.to_ascii_lowercase(),
            p.number,
            p.procedures.len(),
            p.procedures.first().map_or(0, |x| x.0),
            p.procedures.last().map_or(0, |x| x.0),
        );
    }
    for (program, syms, api_prefix) in API_SYMBOLS {
        let p = programs
            .iter()
            .find(|p| p.prefix.eq_ignore_ascii_case(program))
            .ok_or_else(|| anyhow!("no {program} program"))?;
        report_api_names(p, &read(&tree, syms)?, syms, api_prefix);
    }
    let out = toolchain::root().join(OUTPUT);
    fs::write(&out, render(&version, &how, &programs))
        .with_context(|| format!("writing {}", out.display()))?;
    packages::sh(
        Command::new("rustfmt")
            .args(["--edition", "2024"])
            .arg(&out)
            .current_dir(toolchain::root()),
    )?;
    println!(
        "gen-libvirt-procs: wrote {} from Debian's libvirt {version} ({how})",
        out.display()
    );
    Ok(())
}

/// The Debian version of libvirt's source package the installed daemon
/// was built from.
fn installed_version() -> anyhow::Result<String> {
    for pkg in ["libvirt-daemon", "libvirt0"] {
        if let Some((source, version)) = packages::source_of(pkg) {
            ensure!(
                source == "libvirt",
                "{pkg} is built from the source package {source}, not libvirt: \
                 say which libvirt version to read with --version"
            );
            return Ok(version);
        }
    }
    bail!(
        "libvirt is not installed (neither libvirt-daemon nor libvirt0): install it, \
         or say which Debian version of libvirt to read with --version"
    )
}

/// Downloads libvirt's source package under `dir` and unpacks it, with
/// Debian's patches; or, when the mirror has only its upstream tarball,
/// the files read here from that. Returns the tree and how it was made,
/// for the generated file's header.
fn fetch(version: &str, dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    println!("gen-libvirt-procs: downloading Debian's libvirt {version} source package…");
    let tree = dir.join("libvirt");
    match packages::download_source("libvirt", version, dir)? {
        packages::SourceFiles::Dsc(dsc) => {
            packages::sh(Command::new("dpkg-source").arg("-x").arg(&dsc).arg(&tree))
                .context("unpacking the source package failed (dpkg-source is in dpkg-dev)")?;
            let unpacked = changelog_version(&tree)?;
            ensure!(
                unpacked == version,
                "asked apt for libvirt {version}, got {unpacked}"
            );
            Ok((tree, "unpacked with Debian's patches".to_owned()))
        }
        packages::SourceFiles::OrigTarball(tarball) => {
            let name = tarball
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            println!(
                "gen-libvirt-procs: the mirror has only the upstream tarball {name} of this \
                 version; reading it, without Debian's patches"
            );
            fs::create_dir_all(&tree)?;
            let mut tar = Command::new("tar");
            tar.arg("-xf")
                .arg(&tarball)
                .arg("-C")
                .arg(&tree)
                .args(["--strip-components=1", "--wildcards"]);
            for file in PROTOCOLS
                .iter()
                .chain([&GENDISPATCH])
                .chain(API_SYMBOLS.iter().map(|(_, syms, _)| syms))
            {
                tar.arg(format!("*/{file}"));
            }
            packages::sh(&mut tar).with_context(|| format!("unpacking {name} failed"))?;
            Ok((
                tree,
                format!("its upstream tarball `{name}`, without Debian's patches"),
            ))
        }
    }
}

/// The version of the first entry of `debian/changelog`:
/// `libvirt (11.3.0-2~bpo12+1) bookworm-backports; urgency=medium`.
fn changelog_version(tree: &Path) -> anyhow::Result<String> {
    let text = read(tree, "debian/changelog").with_context(|| {
        format!(
            "{} is not an unpacked Debian source package (no debian/changelog): \
             unpack one with `dpkg-source -x`",
            tree.display()
        )
    })?;
    let first = text.lines().next().unwrap_or_default();
    let version = first
        .split_once('(')
        .and_then(|(name, rest)| {
            (name.trim() == "libvirt").then(|| rest.split_once(')').map(|(v, _)| v))
        })
        .flatten()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            anyhow!("debian/changelog starts with {first:?}, not `libvirt (VERSION)`")
        })?;
    Ok(version.to_owned())
}

fn read(tree: &Path, file: &str) -> anyhow::Result<String> {
    let path = tree.join(file);
    fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The words of XDR text: identifiers and numbers as runs of
/// `[A-Za-z0-9_]`, every other visible character alone. Comments go, and so
/// do rpcgen's pass-through lines (`%#include "internal.h"`).
fn tokens(text: &str) -> anyhow::Result<Vec<&str>> {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    let mut line_start = true;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\n' {
            line_start = true;
            i += 1;
        } else if b.is_ascii_whitespace() {
            i += 1;
        } else if b == b'%' && line_start {
            i = text[i..].find('\n').map_or(bytes.len(), |n| i + n);
        } else if text[i..].starts_with("/*") {
            let end = text[i + 2..].find("*/").ok_or_else(|| {
                let line = text[..i].lines().count() + 1;
                anyhow!("a comment opened on line {line} is not closed")
            })?;
            i += 2 + end + 2;
            line_start = false;
        } else if word(b) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            out.push(&text[start..i]);
            line_start = false;
        } else {
            let len = text[i..].chars().next().map_or(1, char::len_utf8);
            out.push(&text[i..i + len]);
            i += len;
            line_start = false;
        }
    }
    Ok(out)
}

/// A number as XDR (and C) writes it: `0x20008086`, `017`, `42`.
fn number(word: &str) -> Option<u32> {
    if let Some(hex) = word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else if word.len() > 1 && word.starts_with('0') {
        u32::from_str_radix(&word[1..], 8).ok()
    } else {
        word.parse().ok()
    }
}

/// The constants (`const NAME = VALUE;`) and enums
/// (`enum NAME { A = 1, B = 2 };`) of XDR text; everything else is skipped.
type Definitions<'a> = (
    BTreeMap<&'a str, &'a str>,
    Vec<(&'a str, Vec<(&'a str, &'a str)>)>,
);

fn definitions<'a>(tokens: &[&'a str]) -> anyhow::Result<Definitions<'a>> {
    let mut consts = BTreeMap::new();
    let mut enums = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        match tokens[i..] {
            // The value may be a C macro (`VIR_SECURITY_MODEL_BUFLEN`):
            // only the constants used are read as numbers.
            ["const", name, "=", value, ";", ..] => {
                consts.insert(name, value);
                i += 5;
            }
            ["enum", name, "{", ..] => {
                let mut members = Vec::new();
                i += 3;
                loop {
                    match tokens[i..] {
                        [member, "=", value, sep @ ("," | "}"), ..] => {
                            members.push((member, value));
                            i += 4;
                            if sep == "}" {
                                break;
                            }
                        }
                        ["}", ..] => {
                            i += 1;
                            break;
                        }
                        _ => bail!(
                            "enum {name}: expected `NAME = VALUE,` or `}}` after {:?}, found {:?}",
                            members.last().map_or("{", |m: &(&str, &str)| m.0),
                            tokens[i..].iter().take(4).collect::<Vec<_>>()
                        ),
                    }
                }
                enums.push((name, members));
            }
            _ => i += 1,
        }
    }
    Ok((consts, enums))
}

/// The program a protocol file defines: its `PREFIX_PROGRAM` constant and
/// its `prefix_procedure` enum of `PREFIX_PROC_*` members, named.
fn parse_protocol(text: &str, file: &str, fixups: &[Fixup]) -> anyhow::Result<Program> {
    let tokens = tokens(text)?;
    let (consts, enums) = definitions(&tokens)?;
    let programs: Vec<(&str, &str)> = consts
        .iter()
        .filter_map(|(name, v)| Some((name.strip_suffix("_PROGRAM")?, *v)))
        .collect();
    let [(prefix, value)] = programs[..] else {
        bail!(
            "expected one `const PREFIX_PROGRAM = NUMBER;`, found {}",
            programs.len()
        );
    };
    let program_number =
        number(value).ok_or_else(|| anyhow!("{prefix}_PROGRAM = {value}: not a number"))?;
    let enum_name = format!("{}_procedure", prefix.to_ascii_lowercase());
    let (_, members) = enums
        .iter()
        .find(|(name, _)| *name == enum_name)
        .ok_or_else(|| anyhow!("no `enum {enum_name}`"))?;
    let proc_prefix = format!("{prefix}_PROC_");
    // gendispatch.pl splits every admin name into words ($forcefix); the
    // keepalive program never goes through it and its names are single
    // words (PING), spelled as the admin ones are.
    let forcefix = matches!(prefix, "ADMIN" | "KEEPALIVE");
    let mut procedures: BTreeMap<u32, String> = BTreeMap::new();
    let mut names = BTreeSet::new();
    for (member, value) in members {
        let tail = member
            .strip_prefix(&proc_prefix)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                anyhow!("enum {enum_name}: {member} does not start with {proc_prefix}")
            })?;
        let n = number(value)
            .or_else(|| consts.get(value).copied().and_then(number))
            .ok_or_else(|| anyhow!("{member} = {value}: not a number"))?;
        let name = api_name(tail, fixups, forcefix);
        ensure!(
            names.insert(name.clone()),
            "{member}: the name {name} is taken twice"
        );
        if let Some(other) = procedures.insert(n, name) {
            bail!("{member} = {n}: the number is already {other}'s");
        }
    }
    ensure!(!procedures.is_empty(), "enum {enum_name} is empty");
    Ok(Program {
        prefix: prefix.to_owned(),
        number: program_number,
        file: file.to_owned(),
        procedures: procedures.into_iter().collect(),
    })
}

/// The substitutions of gendispatch.pl's `sub fixup_name`, in order. A
/// line of another shape is an error, so that a new kind of rule is seen
/// rather than ignored.
fn parse_fixups(perl: &str) -> anyhow::Result<Vec<Fixup>> {
    let (_, body) = perl
        .split_once("sub fixup_name {")
        .ok_or_else(|| anyhow!("no `sub fixup_name`"))?;
    let mut out = Vec::new();
    for line in body.lines().map(str::trim) {
        if line == "return $name;" {
            ensure!(!out.is_empty(), "fixup_name has no substitutions");
            return Ok(out);
        }
        if line.is_empty() || line == "my $name = shift;" {
            continue;
        }
        let (from, to) = line
            .strip_prefix("$name =~ s/")
            .and_then(|s| s.strip_suffix("/;"))
            .and_then(|s| s.split_once('/'))
            .ok_or_else(|| anyhow!("fixup_name: a line this generator does not know: {line}"))?;
        let (from, at_end) = from.strip_suffix('$').map_or((from, false), |f| (f, true));
        let literal = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
        ensure!(
            literal(from) && literal(to),
            "fixup_name: a substitution that is not of one word by another: {line}"
        );
        out.push(Fixup {
            from: from.to_owned(),
            to: to.to_owned(),
            at_end,
        });
    }
    bail!("fixup_name does not end in `return $name;`")
}

/// gendispatch.pl's `name_to_ProcName`: a name of several words (or any
/// name, with `forcefix`) is split at `_`, each word lower-cased with a
/// capital first letter, then each word goes through `fixup_name`.
fn api_name(tail: &str, fixups: &[Fixup], forcefix: bool) -> String {
    let lower = tail.to_ascii_lowercase();
    let words: Vec<String> =
        if forcefix || tail.contains('_') || lower == "open" || lower == "close" {
            lower
                .split('_')
                .filter(|w| !w.is_empty())
                .map(|w| w[..1].to_ascii_uppercase() + &w[1..])
                .collect()
        } else {
            vec![tail.to_owned()]
        };
    words
        .into_iter()
        .map(|mut word| {
            for f in fixups {
                if f.at_end {
                    if let Some(stem) = word.strip_suffix(f.from.as_str()) {
                        word = format!("{stem}{}", f.to);
                    }
                } else {
                    word = word.replacen(f.from.as_str(), &f.to, 1);
                }
            }
            word
        })
        .collect()
}

/// Says how many of a program's names are public API functions (`vir` +
/// name): a check of the spelling by eye. The others are procedures with
/// no public function of that name (events, migration steps, internals).
fn report_api_names(program: &Program, syms: &str, syms_file: &str, api_prefix: &str) {
    let symbols: BTreeSet<&str> = syms
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("vir"))
        .collect();
    let (public, other): (Vec<&str>, Vec<&str>) = program
        .procedures
        .iter()
        .map(|(_, name)| name.as_str())
        .partition(|name| symbols.contains(format!("{api_prefix}{name}").as_str()));
    println!(
        "gen-libvirt-procs: {} of {} {} names are {api_prefix}NAME in {syms_file}; the others: {}",
        public.len(),
        program.procedures.len(),
        program.prefix.to_ascii_lowercase(),
        other.join(" ")
    );
}

/// `0x2000_8086`: clippy's readable spelling of a program number.
fn hex(n: u32) -> String {
    format!("0x{:04x}_{:04x}", n >> 16, n & 0xffff)
}

/// `text` as `//! ` lines of at most 79 columns, broken between words
/// (rustfmt leaves comments as they are).
fn doc_lines(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::from("//!");
    for word in text.split_whitespace() {
        if line.len() + 1 + word.len() > 79 && line != "//!" {
            out.push_str(&line);
            out.push('\n');
            line = String::from("//!");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// The generated Rust file (rustfmt formats it after).
fn render(version: &str, how: &str, programs: &[Program]) -> String {
    let files = programs
        .iter()
        .map(|p| format!("`{}`", p.file))
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = String::new();
    s.push_str("//! libvirt's RPC programs and the names of their procedures.\n//!\n");
    s.push_str(&doc_lines(&format!(
        "Generated by `./x gen-libvirt-procs` from Debian's libvirt source package \
         {version} ({how}): {files}; names spelled by the rule of \
         `src/rpc/gendispatch.pl`. Do not edit: run the command again."
    )));
    let _ = writeln!(
        s,
        "\n\
         use super::Program;\n\
         \n\
         /// The Debian source package the names were read from.\n\
         pub const SOURCE_PACKAGE: &str = \"libvirt {version}\";\n\
         \n\
         /// Each program libvirtd serves, with its procedures sorted by number.\n\
         pub static PROGRAMS: &[Program] = &["
    );
    for p in programs {
        let _ = writeln!(
            s,
            "    Program {{\n        number: {},\n        name: {:?},\n        file: {:?},\n        procedures: &[",
            hex(p.number),
            p.prefix.to_ascii_lowercase(),
            p.file
        );
        for (n, name) in &p.procedures {
            let _ = writeln!(s, "            ({n}, {name:?}),");
        }
        s.push_str("        ],\n    },\n");
    }
    s.push_str("];\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes of `fixup_name` in `gendispatch.pl` (libvirt 11).
    const GENDISPATCH_EXCERPT: &str = r"
sub fixup_name {
    my $name = shift;

    $name =~ s/Nwfilter/NWFilter/;
    $name =~ s/Xml$/XML/;
    $name =~ s/Xml2$/XML2/;
    $name =~ s/Uri$/URI/;
    $name =~ s/Uuid$/UUID/;
    $name =~ s/Id$/ID/;
    $name =~ s/Cpu$/CPU/;
    $name =~ s/Pm/PM/;
    $name =~ s/Iothread$/IOThread/;
    $name =~ s/Scsi/SCSI/;

    return $name;
}

# Convert name_of_call to NameOfCall.
sub name_to_ProcName {
";

    /// The shapes of `remote_protocol.x` (libvirt 11.3.0's numbers):
    /// rpcgen pass-through lines, constants that are C macros, structs,
    /// a comment that mentions an enum member, annotation comments before
    /// members, a member with a comment after it, no comma after the last.
    const PROTOCOL_EXCERPT: &str = r"/* -*- c -*-
 * remote_protocol.x: private protocol for communicating between
 */
%#include <libvirt/libvirt.h>
%#include /* not a comment */ <arpa/inet.h>

const REMOTE_STRING_MAX = 4194304;
const REMOTE_SECURITY_MODEL_MAX = VIR_SECURITY_MODEL_BUFLEN;
struct remote_domain_create_xml_args {
    remote_nonnull_string xml_desc;
    unsigned int flags;
};
enum remote_auth_type {
    REMOTE_AUTH_NONE = 0,
    REMOTE_AUTH_SASL = 1
};

/*----- Protocol. -----*/

/* Define the program number, protocol version and procedure numbers here. */
const REMOTE_PROGRAM = 0x20008086;
const REMOTE_PROTOCOL_VERSION = 1;

enum remote_procedure {
    /* Each function must be preceded by a comment providing one or
     * more annotations, e.g. REMOTE_PROC_FAKE = 999, in a comment:
     *
     * - @generate: none|client|server|both
     */

    /**
     * @generate: none
     * @priority: high
     * @acl: connect:getattr
     */
    REMOTE_PROC_CONNECT_OPEN = 1,

    /**
     * @generate: both
     * @acl: domain:write
     * @acl: domain:save:!VIR_DOMAIN_AFFECT_CONFIG|VIR_DOMAIN_AFFECT_LIVE
     */
    REMOTE_PROC_DOMAIN_CREATE_XML = 10, /* autogen autogen */

    /** @generate: both */
    REMOTE_PROC_DOMAIN_GET_XML_DESC = 14,
    REMOTE_PROC_DOMAIN_LOOKUP_BY_UUID = 0x18,
    REMOTE_PROC_NODE_GET_CPU_MAP = 293,
    REMOTE_PROC_DOMAIN_PM_SUSPEND_FOR_DURATION = 261,
    REMOTE_PROC_CONNECT_LIST_ALL_NWFILTERS = 286,
    REMOTE_PROC_DOMAIN_GET_IOTHREAD_INFO = 351,

    /**
     * @generate: both
     * @acl: domain:read
     */
    REMOTE_PROC_CONNECT_LIST_ALL_DOMAINS = 273
};
";

    fn fixups() -> Vec<Fixup> {
        parse_fixups(GENDISPATCH_EXCERPT).unwrap()
    }

    #[test]
    fn fixups_are_read_in_order_with_their_anchor() {
        let f = fixups();
        assert_eq!(f.len(), 10);
        assert_eq!(
            f[1],
            Fixup {
                from: "Xml".into(),
                to: "XML".into(),
                at_end: true
            }
        );
        assert!(!f[7].at_end, "s/Pm/PM/ is not anchored");
        let unknown = GENDISPATCH_EXCERPT.replace("s/Scsi/SCSI/", "s/S(csi)/SCSI/");
        assert!(parse_fixups(&unknown).is_err(), "a regex is not a literal");
        assert!(parse_fixups("sub other {\n}\n").is_err());
    }

    #[test]
    fn names_are_spelled_as_gendispatch_spells_them() {
        let f = fixups();
        let name = |tail| api_name(tail, &f, false);
        assert_eq!(name("DOMAIN_CREATE_XML"), "DomainCreateXML");
        assert_eq!(name("DOMAIN_GET_XML_DESC"), "DomainGetXMLDesc");
        assert_eq!(name("DOMAIN_LOOKUP_BY_UUID"), "DomainLookupByUUID");
        assert_eq!(name("DOMAIN_LOOKUP_BY_ID"), "DomainLookupByID");
        assert_eq!(name("NODE_GET_CPU_MAP"), "NodeGetCPUMap");
        assert_eq!(name("CONNECT_LIST_ALL_DOMAINS"), "ConnectListAllDomains");
        assert_eq!(
            name("CONNECT_LIST_ALL_NWFILTERS"),
            "ConnectListAllNWFilters"
        );
        assert_eq!(
            name("DOMAIN_PM_SUSPEND_FOR_DURATION"),
            "DomainPMSuspendForDuration"
        );
        assert_eq!(name("DOMAIN_GET_IOTHREAD_INFO"), "DomainGetIOThreadInfo");
        // `Xml$` is anchored: a word that merely contains it is left alone.
        assert_eq!(name("XMLISH_THING"), "XmlishThing");
        // One word stays as it is, but for open and close and forced names.
        assert_eq!(name("OPEN"), "Open");
        assert_eq!(name("PING"), "PING");
        assert_eq!(api_name("PING", &f, true), "Ping");
    }

    #[test]
    fn a_protocol_file_gives_its_program_and_named_procedures() {
        let p =
            parse_protocol(PROTOCOL_EXCERPT, "src/remote/remote_protocol.x", &fixups()).unwrap();
        assert_eq!(p.prefix, "REMOTE");
        assert_eq!(p.number, 0x2000_8086);
        let names: Vec<(u32, &str)> = p.procedures.iter().map(|(n, s)| (*n, s.as_str())).collect();
        assert_eq!(
            names,
            [
                (1, "ConnectOpen"),
                (10, "DomainCreateXML"),
                (14, "DomainGetXMLDesc"),
                (24, "DomainLookupByUUID"),
                (261, "DomainPMSuspendForDuration"),
                (273, "ConnectListAllDomains"),
                (286, "ConnectListAllNWFilters"),
                (293, "NodeGetCPUMap"),
                (351, "DomainGetIOThreadInfo"),
            ],
            "sorted by number; nothing from comments or other enums"
        );
    }

    #[test]
    fn the_small_programs_parse() {
        let keepalive = "const KEEPALIVE_PROGRAM = 0x6b656570;\n\
                         const KEEPALIVE_PROTOCOL_VERSION = 1;\n\n\
                         enum keepalive_procedure {\n    KEEPALIVE_PROC_PING = 1,\n    \
                         KEEPALIVE_PROC_PONG = 2\n};\n";
        let p = parse_protocol(keepalive, "k.x", &fixups()).unwrap();
        assert_eq!(p.number, 0x6b65_6570);
        assert_eq!(p.procedures, [(1, "Ping".into()), (2, "Pong".into())]);
        let lxc = "const LXC_PROGRAM = 0x00068000;\nenum lxc_procedure {\n    \
                   LXC_PROC_DOMAIN_OPEN_NAMESPACE = 1 /* skipgen skipgen priority:low */\n};\n";
        let p = parse_protocol(lxc, "l.x", &fixups()).unwrap();
        assert_eq!(p.number, 0x0006_8000);
        assert_eq!(p.procedures, [(1, "DomainOpenNamespace".into())]);
    }

    #[test]
    fn broken_protocol_files_are_errors() {
        let f = fixups();
        let dup = PROTOCOL_EXCERPT.replace("= 14,", "= 10,");
        let e = parse_protocol(&dup, "x", &f).unwrap_err().to_string();
        assert!(e.contains("already DomainCreateXML"), "{e}");
        let unclosed = format!("{PROTOCOL_EXCERPT}/* @generate: both\n");
        let e = parse_protocol(&unclosed, "x", &f).unwrap_err().to_string();
        assert!(e.contains("not closed"), "{e}");
        let no_program = PROTOCOL_EXCERPT.replace("REMOTE_PROGRAM", "REMOTE_PROGRAMME");
        assert!(parse_protocol(&no_program, "x", &f).is_err());
        let stranger = PROTOCOL_EXCERPT.replace("REMOTE_PROC_NODE", "QEMU_PROC_NODE");
        assert!(parse_protocol(&stranger, "x", &f).is_err());
        let no_value = PROTOCOL_EXCERPT.replace("= 293,", ",");
        assert!(parse_protocol(&no_value, "x", &f).is_err());
    }

    #[test]
    fn the_changelog_names_the_version() {
        let dir = std::env::temp_dir().join(format!("hvprof-changelog-{}", std::process::id()));
        let _guard = Scratch(dir.clone());
        fs::create_dir_all(dir.join("debian")).unwrap();
        fs::write(
            dir.join("debian/changelog"),
            "libvirt (11.3.0-2~bpo12+1) bookworm-backports; urgency=medium\n\n  * Rebuild\n",
        )
        .unwrap();
        assert_eq!(changelog_version(&dir).unwrap(), "11.3.0-2~bpo12+1");
        fs::write(dir.join("debian/changelog"), "qemu (1:10.0) sid\n").unwrap();
        assert!(changelog_version(&dir).is_err());
    }

    #[test]
    fn the_generated_file_lists_programs_and_says_where_from() {
        let p =
            parse_protocol(PROTOCOL_EXCERPT, "src/remote/remote_protocol.x", &fixups()).unwrap();
        let text = render("11.3.0-2~bpo12+1", "unpacked with Debian's patches", &[p]);
        assert!(text.contains("Generated by `./x gen-libvirt-procs`"));
        let doc: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .map(str::trim)
            .collect();
        assert!(
            doc.join(" ").contains(
                "package 11.3.0-2~bpo12+1 (unpacked with Debian's patches): \
                 `src/remote/remote_protocol.x`;"
            ),
            "{text}"
        );
        assert!(text.lines().all(|l| l.len() <= 79), "{text}");
        assert!(text.contains("SOURCE_PACKAGE: &str = \"libvirt 11.3.0-2~bpo12+1\""));
        assert!(text.contains("number: 0x2000_8086,"));
        assert!(text.contains("name: \"remote\","));
        assert!(text.contains("            (10, \"DomainCreateXML\"),\n"));
    }
}
