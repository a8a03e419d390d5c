//! Debian packages the sample runs and tests need, installed if missing,
//! and source packages the generators read (`./x gen-libvirt-procs`).
//!
//! The system's apt sources are never changed. Where packages must come
//! from the release's backports suite, that suite is added for one apt run
//! through a temporary sources directory, with the mirror and keyring of the
//! system's own entry for the release; source packages come through a
//! private apt state (sources, lists, cache) of their own.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, ensure};

/// Which suite a set of packages comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// The release's own suites, as the system's apt sources list them.
    Release,
    /// `<codename>-backports`, preferred for the packages *and* their
    /// dependencies (`apt-get -t`): a package from backports usually needs
    /// its dependencies from there too (QEMU 10 needs its own
    /// qemu-system-data and seabios).
    Backports,
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The installed version of a package, if it is installed.
pub fn version(pkg: &str) -> Option<String> {
    if !installed(pkg) {
        return None;
    }
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()).filter(|v| !v.is_empty())
}

/// The source package an installed package was built from, and its
/// version (which a binary-only rebuild can make differ from the package's).
pub fn source_of(pkg: &str) -> Option<(String, String)> {
    if !installed(pkg) {
        return None;
    }
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${source:Package} ${source:Version}", pkg])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (name, version) = text.trim().split_once(' ')?;
    Some((name.to_owned(), version.to_owned()))
}

/// Runs a command; its stdout, or an error with the command, its status
/// and its output.
pub fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One apt source as deb822 fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Source {
    types: Vec<String>,
    uris: Vec<String>,
    suites: Vec<String>,
    components: Vec<String>,
    signed_by: Option<String>,
}

/// The stanzas of a deb822 `.sources` file (disabled ones left out).
fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut s = Source::default();
        let mut enabled = true;
        for line in stanza.lines() {
            let line = line.trim_end();
            if line.starts_with('#') || line.starts_with(' ') || line.starts_with('\t') {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let words = || value.split_whitespace().map(str::to_owned).collect();
            match key.trim().to_ascii_lowercase().as_str() {
                "types" => s.types = words(),
                "uris" => s.uris = words(),
                "suites" => s.suites = words(),
                "components" => s.components = words(),
                "signed-by" => s.signed_by = Some(value.trim().to_owned()),
                "enabled" => enabled = !value.trim().eq_ignore_ascii_case("no"),
                _ => {}
            }
        }
        if enabled && !s.uris.is_empty() && !s.suites.is_empty() {
            out.push(s);
        }
    }
    out
}

/// The entries of a one-line-style `sources.list`.
fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut rest = line;
        let Some((ty, r)) = rest.split_once(char::is_whitespace) else {
            continue;
        };
        rest = r.trim_start();
        let mut signed_by = None;
        if let Some(r) = rest.strip_prefix('[') {
            let Some((opts, r)) = r.split_once(']') else {
                continue;
            };
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_owned);
            rest = r.trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(Source {
            types: vec![ty.to_owned()],
            uris: vec![uri.to_owned()],
            suites: vec![suite.to_owned()],
            components: words.map(str::to_owned).collect(),
            signed_by,
        });
    }
    out
}

/// Every enabled apt source of the system.
fn system_sources() -> anyhow::Result<Vec<Source>> {
    let mut out = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        out.extend(parse_one_line(&text));
    }
    let dir = Path::new("/etc/apt/sources.list.d");
    if dir.is_dir() {
        for entry in fs::read_dir(dir).context("reading /etc/apt/sources.list.d")? {
            let p = entry?.path();
            let Ok(text) = fs::read_to_string(&p) else {
                continue;
            };
            match p.extension().and_then(|e| e.to_str()) {
                Some("sources") => out.extend(parse_deb822(&text)),
                Some("list") => out.extend(parse_one_line(&text)),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// `VERSION_CODENAME` of /etc/os-release (e.g. `bookworm`).
fn codename() -> anyhow::Result<String> {
    let text = fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| anyhow!("/etc/os-release names no VERSION_CODENAME: is this Debian?"))
}

impl Source {
    /// This entry's mirror, components and keyring as one deb822 stanza of
    /// `types` for `suites`.
    fn stanza(&self, types: &str, suites: &[&str]) -> String {
        let mut stanza = format!(
            "Types: {types}\nURIs: {}\nSuites: {}\nComponents: {}\n",
            self.uris.join(" "),
            suites.join(" "),
            if self.components.is_empty() {
                "main".to_owned()
            } else {
                self.components.join(" ")
            }
        );
        if let Some(key) = &self.signed_by {
            let _ = writeln!(stanza, "Signed-By: {key}");
        }
        stanza
    }

    fn is_deb(&self) -> bool {
        self.types.iter().any(|t| t == "deb")
    }
}

/// The system's `deb` entry for the release itself, whose mirror and
/// keyring the release's other suites are taken from.
fn release_entry<'a>(sources: &'a [Source], codename: &str) -> anyhow::Result<&'a Source> {
    sources
        .iter()
        .filter(|s| s.is_deb())
        .find(|s| s.suites.iter().any(|x| x == codename))
        .ok_or_else(|| {
            anyhow!(
                "no apt source of this system lists the suite {codename}, so there is no mirror \
                 to take {codename}-backports or source packages from; add {codename}-backports \
                 (and deb-src entries) to the apt sources by hand"
            )
        })
}

/// The deb822 stanza that adds `<codename>-backports` from the mirror and
/// keyring of the system's entry for the release itself, or `None` when
/// the system already lists backports.
fn backports_stanza(sources: &[Source], codename: &str) -> anyhow::Result<Option<String>> {
    let suite = format!("{codename}-backports");
    if sources
        .iter()
        .filter(|s| s.is_deb())
        .any(|s| s.suites.contains(&suite))
    {
        return Ok(None);
    }
    Ok(Some(
        release_entry(sources, codename)?.stanza("deb", &[&suite]),
    ))
}

/// `deb-src` stanzas for every suite of the release the system's `deb`
/// entries list (`bookworm`, `bookworm-updates`, `bookworm-security`, …),
/// each from its own entry's mirror and keyring, plus `<codename>-backports`
/// from the release's mirror when no entry lists it.
fn deb_src_stanzas(sources: &[Source], codename: &str) -> anyhow::Result<String> {
    let backports = format!("{codename}-backports");
    let of_release = |suite: &str| {
        suite == codename
            || suite
                .strip_prefix(codename)
                .is_some_and(|rest| rest.starts_with('-'))
    };
    let mut stanzas = Vec::new();
    let mut has_backports = false;
    for s in sources.iter().filter(|s| s.is_deb()) {
        let suites: Vec<&str> = s
            .suites
            .iter()
            .map(String::as_str)
            .filter(|x| of_release(x))
            .collect();
        if !suites.is_empty() {
            has_backports |= suites.contains(&backports.as_str());
            stanzas.push(s.stanza("deb-src", &suites));
        }
    }
    if !has_backports {
        stanzas.push(release_entry(sources, codename)?.stanza("deb-src", &[&backports]));
    }
    Ok(stanzas.join("\n"))
}

/// What `download_source` got.
#[derive(Debug)]
pub enum SourceFiles {
    /// The whole source package: its `.dsc`, for `dpkg-source -x`.
    Dsc(PathBuf),
    /// Only the upstream tarball (`*.orig.tar.*`), checked against the
    /// signed index as every apt download is: the mirror had not the rest
    /// (the `.dsc` and Debian's changes).
    OrigTarball(PathBuf),
}

/// Downloads the Debian source package `package` at `version` into `dir`
/// (`apt-get source --download-only`), or, when the mirror serves only
/// part of it, its upstream tarball (`--tar-only`).
///
/// apt runs with a state of its own under `dir/apt`: sources (the `deb-src`
/// twins of the system's entries for the release, and its backports), lists
/// and cache. The system's apt sources, lists and cache are not touched.
pub fn download_source(package: &str, version: &str, dir: &Path) -> anyhow::Result<SourceFiles> {
    let stanzas = deb_src_stanzas(&system_sources()?, &codename()?)?;
    let apt_dir = dir.join("apt");
    let parts = apt_dir.join("sources.list.d");
    for d in [
        parts.clone(),
        apt_dir.join("lists/partial"),
        apt_dir.join("cache/archives/partial"),
    ] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    fs::write(parts.join("hvprof-src.sources"), stanzas)?;
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.arg("-o")
            .arg(format!("Dir::Etc::SourceParts={}", parts.display()))
            .args(["-o", "Dir::Etc::SourceList=/dev/null"])
            .arg("-o")
            .arg(format!(
                "Dir::State::Lists={}",
                apt_dir.join("lists").display()
            ))
            .arg("-o")
            .arg(format!("Dir::Cache={}", apt_dir.join("cache").display()))
            .args(args)
            .current_dir(dir)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    sh(&mut apt(&["update", "-qq"])).context("apt-get update (of the source lists) failed")?;
    let wanted = format!("{package}={version}");
    if let Err(whole) = sh(&mut apt(&["source", "--download-only", "-q", &wanted])) {
        sh(&mut apt(&[
            "source",
            "--download-only",
            "--tar-only",
            "-q",
            &wanted,
        ]))
        .map_err(|tar| {
            anyhow!(
                "apt-get source {wanted} failed, and so did its upstream tarball alone: \
                     is that version still on the mirror? (an old version may only be on a \
                     snapshot archive; pass --source-dir)\n{whole:#}\n{tar:#}"
            )
        })?;
        let tarball = file_in(dir, |p| {
            p.to_string_lossy().contains(".orig.tar.") && p.extension().is_some_and(|e| e != "asc")
        })
        .ok_or_else(|| {
            anyhow!(
                "apt-get source --tar-only left no tarball in {}",
                dir.display()
            )
        })?;
        return Ok(SourceFiles::OrigTarball(tarball));
    }
    file_in(dir, |p| p.extension().is_some_and(|e| e == "dsc"))
        .map(SourceFiles::Dsc)
        .ok_or_else(|| anyhow!("apt-get source left no .dsc in {}", dir.display()))
}

/// The first file of `dir` that is `wanted`.
fn file_in(dir: &Path, wanted: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| wanted(p))
}

/// Installs the missing packages, and only those, from `suite`.
pub fn ensure(who: &str, packages: &[&str], suite: Suite) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("{who}: packages present");
        return Ok(());
    }
    install(who, &missing, suite, false)
}

/// The version of `pkg` the release's own suites have (not backports'),
/// from apt's lists.
pub fn release_version(pkg: &str) -> anyhow::Result<String> {
    let code = codename()?;
    let out = Command::new("apt-cache")
        .args(["madison", pkg])
        .output()
        .context("running apt-cache madison")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut f = l.split('|').map(str::trim);
            let (_, version, archive) = (f.next()?, f.next()?, f.next()?);
            let suite = archive.split_whitespace().nth(1)?;
            (suite.split('/').next() == Some(code.as_str())).then(|| version.to_owned())
        })
        .ok_or_else(|| anyhow!("apt knows no {pkg} of {code} (run apt-get update?)"))
}

/// Installs `packages` (each `name` or `name=version`) from `suite`,
/// installed or not; `downgrade`: allowing older versions than those
/// installed (and the removal of what only the newer ones had).
pub fn install(who: &str, packages: &[&str], suite: Suite, downgrade: bool) -> anyhow::Result<()> {
    let target = match suite {
        Suite::Release => None,
        Suite::Backports => Some(format!("{}-backports", codename()?)),
    };
    println!(
        "{who}: installing {}{} (a minute)…",
        packages.join(" "),
        target
            .as_deref()
            .map(|t| format!(" from {t}"))
            .unwrap_or_default()
    );
    let missing = packages;
    let parts = std::env::temp_dir().join(format!("hvprof-apt-{}", std::process::id()));
    fs::create_dir_all(&parts)?;
    let result = (|| {
        // apt reads one sources directory: the system's files, copied, plus
        // the backports stanza; /etc/apt is not written.
        let dir = Path::new("/etc/apt/sources.list.d");
        if dir.is_dir() {
            for entry in fs::read_dir(dir).context("reading /etc/apt/sources.list.d")? {
                let p = entry?.path();
                if p.extension().is_some_and(|e| e == "list" || e == "sources") {
                    fs::copy(&p, parts.join(p.file_name().unwrap_or_default()))?;
                }
            }
        }
        if suite == Suite::Backports
            && let Some(stanza) = backports_stanza(&system_sources()?, &codename()?)?
        {
            fs::write(parts.join("hvprof-backports.sources"), stanza)?;
        }
        let apt = |args: &[&str]| {
            let mut c = Command::new("apt-get");
            c.arg("-o")
                .arg(format!("Dir::Etc::SourceParts={}", parts.display()))
                .args(["-o", "Dir::Etc::SourceList=/etc/apt/sources.list"])
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive");
            c
        };
        sh(&mut apt(&["update", "-qq"])).context("apt-get update failed")?;
        let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
        if downgrade {
            install.arg("--allow-downgrades");
        }
        if let Some(t) = &target {
            install.args(["-t", t]);
        }
        install.args(missing);
        sh(&mut install).with_context(|| format!("installing {} failed", missing.join(" ")))?;
        if downgrade {
            // A package the newer set split out and apt removes takes the
            // files the older one has back with it (libvirt-common's
            // /usr/share/libvirt/cpu_map, libvirt0's in 9.0): put them
            // back.
            let mut again = apt(&["install", "-y", "-q", "--no-install-recommends"]);
            again
                .args(["--reinstall", "--allow-downgrades"])
                .args(missing);
            sh(&mut again).with_context(|| format!("reinstalling {} failed", missing.join(" ")))?;
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&parts);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian\n\
        Suites: bookworm bookworm-updates\nComponents: main contrib\n\
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
        Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n\
        Components: main\n\nTypes: deb\nURIs: http://other.invalid\nSuites: bookworm\n\
        Components: main\nEnabled: no\n";

    #[test]
    fn backports_take_the_release_entrys_mirror_and_key() {
        let sources = parse_deb822(DEB822);
        assert_eq!(sources.len(), 2, "the disabled stanza is left out");
        let stanza = backports_stanza(&sources, "bookworm").unwrap().unwrap();
        assert_eq!(
            stanza,
            "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm-backports\n\
             Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        );
    }

    #[test]
    fn one_line_sources_and_existing_backports() {
        let text = "deb [arch=amd64 signed-by=/k.gpg] http://m.invalid/debian bookworm main\n\
                    # deb http://x.invalid bookworm main\n\
                    deb-src http://m.invalid/debian bookworm main\n";
        let sources = parse_one_line(text);
        assert_eq!(sources.len(), 2);
        let stanza = backports_stanza(&sources, "bookworm").unwrap().unwrap();
        assert!(
            stanza.contains("URIs: http://m.invalid/debian\n"),
            "{stanza}"
        );
        assert!(stanza.contains("Signed-By: /k.gpg\n"), "{stanza}");
        let with = parse_one_line("deb http://m.invalid/debian bookworm-backports main\n");
        assert_eq!(backports_stanza(&with, "bookworm").unwrap(), None);
        assert!(backports_stanza(&sources, "trixie").is_err());
    }

    #[test]
    fn source_stanzas_twin_each_release_entry_and_add_backports() {
        let sources = parse_deb822(DEB822);
        let stanzas = deb_src_stanzas(&sources, "bookworm").unwrap();
        assert_eq!(
            stanzas,
            "Types: deb-src\nURIs: http://mirror.invalid/debian\n\
             Suites: bookworm bookworm-updates\nComponents: main contrib\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb-src\nURIs: http://mirror.invalid/debian-security\n\
             Suites: bookworm-security\nComponents: main\n\n\
             Types: deb-src\nURIs: http://mirror.invalid/debian\n\
             Suites: bookworm-backports\nComponents: main contrib\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        );
        // Another release's suites, and a listed backports suite, are not doubled.
        let mixed = parse_one_line(
            "deb http://m.invalid/debian bookworm main\n\
             deb http://m.invalid/debian bookworm-backports main\n\
             deb http://m.invalid/debian trixie main\n\
             deb http://m.invalid/debian bookwormish main\n",
        );
        let stanzas = deb_src_stanzas(&mixed, "bookworm").unwrap();
        assert_eq!(stanzas.matches("Types: deb-src").count(), 2, "{stanzas}");
        assert!(!stanzas.contains("trixie") && !stanzas.contains("bookwormish"));
        assert!(deb_src_stanzas(&mixed, "sid").is_err());
    }
}
