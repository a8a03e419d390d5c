//! The eBPF object embedded in `hvprof`, and loading it.
//!
//! `profiler/build.rs` builds `profiler-ebpf` with aya-build; the object is
//! embedded here so that `hvprof` is one self-contained executable.

pub mod kfuncs;

use aya::{Ebpf, EbpfError, EbpfLoader};
use thiserror::Error;

/// The compiled eBPF object (ELF, with BTF).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hvprof"));

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("loading the eBPF object failed: {chain}{hint}", chain = chain(source), hint = hint(source))]
    Load {
        #[source]
        source: EbpfError,
    },
    #[error("linking the eBPF object's kernel function calls failed: {source}")]
    Link {
        #[source]
        source: kfuncs::KfuncError,
    },
}

/// The object with its kfunc calls linked to this kernel's (see
/// [`kfuncs`]); without kernel BTF, each such call returns 0.
fn linked_object() -> Result<Vec<u8>, LoadError> {
    let btf = crate::kbtf::Kbtf::from_sys_fs().ok();
    kfuncs::link(OBJECT, &|name| btf.as_ref()?.func_id(name))
        .map_err(|source| LoadError::Link { source })
}

/// An error and its causes (aya's `Display` of a failed system call leaves
/// out the errno).
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

fn hint(err: &EbpfError) -> &'static str {
    let text = chain(err);
    if text.contains("Operation not permitted") || text.contains("Permission denied") {
        ". Run hvprof as root, or grant it CAP_BPF and CAP_PERFMON"
    } else {
        ""
    }
}

/// Loads the embedded object for recording, with its configuration.
pub fn load_with_config(
    config: &profiler_common::record::Config,
    max_stacks: u32,
    unwind_rows: u32,
) -> Result<Ebpf, LoadError> {
    use profiler_common::record::{OFFWAKE_ENTRIES, WAKER_SITES_ENTRIES};
    let _ = crate::sys::raise_memlock();
    // The copies of user stacks for `--verify-unwind` need room; otherwise
    // the ring is one page.
    let verify_ring = if config.verify_unwind != 0 {
        8 << 20
    } else {
        4096
    };
    // The wakers tracer's maps, one entry each when it is off.
    let wakers = |n: u32| if config.wakers != 0 { n } else { 1 };
    EbpfLoader::new()
        .map_max_entries(profiler_common::record::names::UNWIND_VERIFY, verify_ring)
        .map_max_entries(
            profiler_common::record::names::OFFWAKE_TIMES,
            wakers(OFFWAKE_ENTRIES),
        )
        .map_max_entries(
            profiler_common::record::names::WAKER_SITES,
            wakers(WAKER_SITES_ENTRIES),
        )
        .override_global(profiler_common::record::names::CONFIG, config, true)
        .map_max_entries(profiler_common::record::names::STACKS, max_stacks)
        .map_max_entries(profiler_common::record::names::UNWIND_ROWS, unwind_rows)
        .map_max_entries(
            profiler_common::record::names::UNWIND_CHUNKS,
            unwind_chunks(unwind_rows),
        )
        .load(&linked_object()?)
        .map_err(|source| LoadError::Load { source })
}

/// The chunk index entries that go with `unwind_rows` rows: a file has
/// about one per 20 rows (libc, glib, libvirt, QEMU); a file whose index
/// does not fit is searched whole.
#[must_use]
pub fn unwind_chunks(unwind_rows: u32) -> u32 {
    (unwind_rows / 4).max(1)
}

/// A read-only global of the eBPF object, set before load.
pub struct Global<'a> {
    pub name: &'a str,
    pub value: u32,
}

/// Loads the embedded object with the given read-only globals. Raises
/// RLIMIT_MEMLOCK first (needed on kernels before 5.11, harmless after).
pub fn load(globals: &[Global<'_>]) -> Result<Ebpf, LoadError> {
    // A failure here is not fatal: on 5.11+ the limit is not used, and on
    // older kernels the load below fails with a message naming memlock.
    let _ = crate::sys::raise_memlock();
    let mut loader = EbpfLoader::new();
    for g in globals {
        loader.override_global(g.name, &g.value, true);
    }
    loader
        .load(&linked_object()?)
        .map_err(|source| LoadError::Load { source })
}
