//! A profile file is untrusted input (CI baselines, bug-report
//! attachments): a small file that inflates without bound must be refused
//! with an error naming the limit and how to raise it, in bounded memory.
//! (Its own test binary, so the peak memory of its children is its own.)

use std::{io::Write as _, process::Command};

use profiler::profile::{FORMAT_VERSION, MAGIC, MAX_INFLATED_ENV};

/// `mib` MiB of zeros through gzip.
fn gzipped_zeros(mib: usize) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..mib {
        gz.write_all(&zeros).unwrap();
    }
    gz.finish().unwrap()
}

/// The header of a profile of `version`, then `mib` MiB of zeros through
/// gzip: as the whole file (version 1) or as one record with a good
/// checksum (version 2).
fn zip_bomb(version: u32, mib: usize) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    let gz = gzipped_zeros(mib);
    if version >= 2 {
        let mut crc = flate2::Crc::new();
        crc.update(&gz);
        out.extend_from_slice(&u32::try_from(gz.len()).unwrap().to_le_bytes());
        out.extend_from_slice(&crc.sum().to_le_bytes());
    }
    out.extend_from_slice(&gz);
    out
}

/// The largest resident set of the children waited for so far, in MiB.
fn children_max_rss_mib() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &raw mut usage) };
    usage.ru_maxrss / 1024
}

#[test]
fn a_profile_that_inflates_without_bound_is_refused_in_bounded_memory() {
    let dir = std::env::temp_dir().join(format!("hvprof-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut runs = Vec::new();
    for version in [1, FORMAT_VERSION] {
        let bomb = dir.join(format!("bomb-v{version}.hvprof"));
        let bytes = zip_bomb(version, 512);
        assert!(bytes.len() < 4 << 20, "{} bytes", bytes.len());
        std::fs::write(&bomb, &bytes).unwrap();
        runs.push((bomb, ["report"]));
        runs.push((dir.join(format!("bomb-v{version}.hvprof")), ["export"]));
    }
    for (bomb, cmd) in &runs {
        let limit = "64";
        let out = Command::new(env!("CARGO_BIN_EXE_hvprof"))
            .args(cmd)
            .arg(bomb)
            .arg("-o")
            .arg(dir.join("out"))
            .env(MAX_INFLATED_ENV, limit)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {stderr}");
        assert!(
            stderr.contains("inflates to more than 64 MiB") && stderr.contains(MAX_INFLATED_ENV),
            "{cmd:?} {}: {stderr}",
            bomb.display()
        );
    }
    // 512 MiB of JSON was never held: the reader stopped at the limit.
    let rss = children_max_rss_mib();
    assert!(rss < 256, "hvprof reached {rss} MiB");
    let _ = std::fs::remove_dir_all(&dir);
}
