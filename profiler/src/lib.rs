//! hvprof: a profiler for hypervisor management stacks.
//!
//! Data flows one way — probes (the eBPF object) → drain → symbolize →
//! profile file → renderers — and each step is one module. The `hvprof`
//! binary is a thin clap shell over this library.

pub mod check;
pub mod ebpf;
pub mod sys;
pub mod tracefs;
