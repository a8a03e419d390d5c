#![no_std]
// This file exists so that profiler/ can list this crate as a build
// dependency (cargo then rebuilds hvprof when the eBPF sources change). The
// programs are in main.rs's modules.
