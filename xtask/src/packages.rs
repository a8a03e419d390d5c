//! Debian packages the sample runs and tests need, installed if missing.
//!
//! The system's apt sources are never changed. Where packages must come
//! from the release's backports suite, that suite is added for one apt run
//! through a temporary sources directory, with the mirror and keyring of the
//! system's own entry for the release.

use std::{fmt::Write as _, fs, path::Path, process::Command};

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

/// The deb822 stanza that adds `<codename>-backports` from the mirror and
/// keyring of the system's entry for the release itself, or `None` when
/// the system already lists backports.
fn backports_stanza(sources: &[Source], codename: &str) -> anyhow::Result<Option<String>> {
    let suite = format!("{codename}-backports");
    let debs = || {
        sources
            .iter()
            .filter(|s| s.types.iter().any(|t| t == "deb"))
    };
    if debs().any(|s| s.suites.contains(&suite)) {
        return Ok(None);
    }
    let release = debs()
        .find(|s| s.suites.iter().any(|x| x == codename))
        .ok_or_else(|| {
            anyhow!(
                "no apt source of this system lists the suite {codename}, so there is no mirror \
                 to take {suite} from; add {suite} to the apt sources by hand"
            )
        })?;
    let mut stanza = format!(
        "Types: deb\nURIs: {}\nSuites: {suite}\nComponents: {}\n",
        release.uris.join(" "),
        if release.components.is_empty() {
            "main".to_owned()
        } else {
            release.components.join(" ")
        }
    );
    if let Some(key) = &release.signed_by {
        let _ = writeln!(stanza, "Signed-By: {key}");
    }
    Ok(Some(stanza))
}

/// Installs the missing packages, and only those, from `suite`.
pub fn ensure(who: &str, packages: &[&str], suite: Suite) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("{who}: packages present");
        return Ok(());
    }
    let target = match suite {
        Suite::Release => None,
        Suite::Backports => Some(format!("{}-backports", codename()?)),
    };
    println!(
        "{who}: installing {}{} (a minute)…",
        missing.join(" "),
        target
            .as_deref()
            .map(|t| format!(" from {t}"))
            .unwrap_or_default()
    );
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
        if let Some(t) = &target {
            install.args(["-t", t]);
        }
        install.args(&missing);
        sh(&mut install).with_context(|| format!("installing {} failed", missing.join(" ")))?;
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
}
