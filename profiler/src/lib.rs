//! hvprof: a profiler for hypervisor management stacks.
//!
//! Data flows one way — probes (the eBPF object) → drain → symbolize →
//! profile file → renderers — and each step is one module. The `hvprof`
//! binary is a thin clap shell over this library.

pub mod check;
pub mod ci;
pub mod cli;
pub mod diff;
pub mod ebpf;
pub mod export;
pub mod forkpath;
#[doc(hidden)]
pub mod fuzzing;
pub mod graphs;
pub mod html;
pub mod kbtf;
pub mod libvirt;
pub mod procmaps;
pub mod profile;
pub mod record;
pub mod render;
pub mod symbolize;
pub mod sys;
pub mod tables;
pub mod tracefs;
pub mod tracer;
pub mod unwind;
pub mod usdt;
pub mod validate;
pub mod windows;
pub mod words;
