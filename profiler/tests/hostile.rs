//! A profile file is untrusted input (CI baselines, bug-report
//! attachments): a small file that inflates without bound must be refused
//! with an error naming the limit and how to raise it, in bounded memory.
//! (Its own test binary, so the peak memory of its children is its own.)

use std::{io::Write as _, process::Command};

use profiler::profile::{FORMAT_VERSION, MAGIC, MAX_INFLATED_ENV};

/// The header of a profile, then `mib` MiB of zeros through gzip.
fn zip_bomb(mib: usize) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..mib {
        gz.write_all(&zeros).unwrap();
    }
    gz.finish().unwrap()
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
    let bomb = dir.join("bomb.hvprof");
    let bytes = zip_bomb(512);
    assert!(bytes.len() < 4 << 20, "{} bytes", bytes.len());
    std::fs::write(&bomb, &bytes).unwrap();
    for (cmd, limit) in [(&["report"][..], "64"), (&["export"][..], "64")] {
        let out = Command::new(env!("CARGO_BIN_EXE_hvprof"))
            .args(cmd)
            .arg(&bomb)
            .arg("-o")
            .arg(dir.join("out"))
            .env(MAX_INFLATED_ENV, limit)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {stderr}");
        assert!(
            stderr.contains("inflates to more than 64 MiB") && stderr.contains(MAX_INFLATED_ENV),
            "{cmd:?}: {stderr}"
        );
    }
    // 512 MiB of JSON was never held: the reader stopped at the limit.
    let rss = children_max_rss_mib();
    assert!(rss < 256, "hvprof reached {rss} MiB");
    let _ = std::fs::remove_dir_all(&dir);
}
