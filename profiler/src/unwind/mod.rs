//! Unwind tables for the eBPF user-stack unwinder: each executable file's
//! `.eh_frame` (and `.debug_frame`) turned into the sorted
//! [`UnwindRow`](profiler_common::unwind::UnwindRow)s the kernel side
//! searches, because Debian builds glibc, glib, libvirt and QEMU without
//! frame pointers.
//!
//! This module owns the userspace half: [`build_table`] evaluates one ELF
//! file's CFI (x86-64 only), [`table_for`] caches the result on disk by the
//! file's build-id, so that a mass boot of identical VMs builds each
//! library's table once. [`procs`] turns each process's mappings into
//! (table, load bias) and loads both into the maps; the walk itself is
//! `profiler-ebpf/src/unwind.rs`.

mod cache;
mod jit;
pub mod procs;
mod table;
pub mod verify;

pub use cache::{FileKey, file_key, table_for, table_of};
pub use table::{TableError, TableStats, UnwindTable, build_table, find_row};

#[cfg(test)]
mod tests;
