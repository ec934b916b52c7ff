//! nmi-agent's kernel side.
//!
//! [`abi`] holds the map keys, values and constants that the kernel programs and the agent share. It compiles for the
//! host too, so every byte-order conversion is unit-tested without a kernel. The programs themselves live in
//! [`programs`] (bpf target only); `main.rs` holds nothing but their thin entry points.
#![cfg_attr(target_arch = "bpf", no_std)]
// The BPF target has no atomic read-modify-write in `core`; `programs::maps` issues the one it needs by hand.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

pub mod abi;

#[cfg(target_arch = "bpf")]
pub mod programs;
