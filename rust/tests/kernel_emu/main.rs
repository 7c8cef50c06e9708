//! The CUDA kernels, run on the host and checked against the CPU reference.
//!
//! No GPU is needed: every module of `kernels::MODULES` (PRELUDE + source, with the
//! preprocessor defines its NVRTC options carry) is compiled by the host C++ compiler
//! with `tests/emu/emu.h` force-included, a header that emulates the CUDA execution model
//! (fibers for the threads of a block, real barriers and warp shuffles, guard pages after
//! every buffer). Each kernel is launched with the grid and block of
//! `backend/cuda/launch.rs` and the argument types that `backend/cuda/device/*.rs` passes,
//! and its results must equal the CPU backend's: bit for bit for the quantization,
//! optimizer and linear-algebra kernels (NVRTC compiles them with --fmad=false; here
//! -ffp-contract=off), within a tolerance for the layer kernels (NVRTC may contract their
//! multiply-adds, and their reductions run in another order).
//!
//! Every launch also runs twice, with the threads between two barriers taken in
//! ascending and in descending order: different results mean a missing barrier. The
//! argument list of every launch is checked against the kernel's parameter types.
//! Without a C++ compiler each test prints `skipped: no C++ compiler` and passes.
//!
//! Layout: `harness` builds, loads and launches the emulated modules and compares
//! results; one file per kernel module (`quant`, `optim`, `linalg`, `nn`) holds its
//! tests, which launch every kernel with the shape the device code gives it
//! (`backend/cuda/launch.rs`); `coverage` checks that every kernel of the
//! sources is registered and exercised; `selftest` shows that the emulator catches the
//! defects it promises to catch.
#![cfg(feature = "cuda")]

mod coverage;
mod harness;
mod linalg;
mod nf4;
mod nn;
mod optim;
mod quant;
mod selftest;

use qgalore::backend::cpu::Cpu;
use qgalore::backend::{Category, Memory};
use qgalore::rng;

/// Deterministic values in [-scale, scale).
fn vals(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (2.0 * rng::uniform(seed, i as u64) - 1.0) * scale)
        .collect()
}

/// Token ids below `vocab`.
fn ids(n: usize, seed: u64, vocab: usize) -> Vec<i32> {
    (0..n)
        .map(|i| (rng::bits32(seed, i as u64) % vocab as u32) as i32)
        .collect()
}

fn cpu() -> Cpu {
    Cpu::new(2).unwrap()
}

fn cbuf(be: &Cpu, v: &[f32]) -> <Cpu as Memory>::Buf {
    let mut b = be.alloc(v.len(), Category::Activations).unwrap();
    be.upload(&mut b, v).unwrap();
    b
}
