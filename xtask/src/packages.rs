//! Debian packages the sample runs and tests need, installed if missing.

use std::{fs, process::Command};

use anyhow::{Context as _, ensure};

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
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

/// Installs the missing packages, and only those (`(name, Some(suite))`
/// takes the package from that suite, e.g. `bookworm-backports`). Backports
/// are added for this one apt run through a temporary sources directory;
/// the system's apt sources are not changed.
pub fn ensure(who: &str, packages: &[(&str, Option<&str>)]) -> anyhow::Result<()> {
    let missing: Vec<_> = packages.iter().filter(|(p, _)| !installed(p)).collect();
    if missing.is_empty() {
        println!("{who}: packages present");
        return Ok(());
    }
    let names: Vec<String> = missing
        .iter()
        .map(|(p, suite)| suite.map_or_else(|| (*p).to_owned(), |s| format!("{p}/{s}")))
        .collect();
    println!("{who}: installing {} (a minute)…", names.join(" "));
    let parts = std::env::temp_dir().join(format!("hvprof-apt-{}", std::process::id()));
    fs::create_dir_all(&parts)?;
    let result = (|| {
        for entry in
            fs::read_dir("/etc/apt/sources.list.d").context("reading /etc/apt/sources.list.d")?
        {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "list" || e == "sources") {
                fs::copy(&p, parts.join(p.file_name().unwrap_or_default()))?;
            }
        }
        fs::write(
            parts.join("hvprof-bookworm-backports.sources"),
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )?;
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
        install.args(&names);
        sh(&mut install).with_context(|| format!("installing {} failed", names.join(" ")))?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&parts);
    result
}
