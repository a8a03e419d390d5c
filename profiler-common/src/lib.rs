//! Types and constants shared by hvprof's eBPF programs and its userspace.
//!
//! Everything here is `#[repr(C)]` with explicit padding so that both sides
//! agree on the layout byte for byte. Nothing in this crate allocates or
//! depends on `std`: it is compiled for `bpfel-unknown-none` as well.
#![no_std]

pub mod check;
pub mod record;
pub mod unwind;
pub mod usdt;
