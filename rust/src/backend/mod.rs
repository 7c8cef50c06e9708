//! The backend seam. Model and optimizer code call these operations on opaque buffers;
//! a backend decides where buffers live (host memory, device memory), which dtype they
//! hold internally (f32 on the CPU; bf16 activations on a GPU) and how work is scheduled
//! (rayon on the CPU; an asynchronous stream on a GPU, synchronised by `sync`).
//!
//! The seam is one trait per concern, one file each: `Memory` (buffers, transfers,
//! element-wise ops, reductions; every other trait builds on it), `Layers` (the model's
//! forward and backward), `Optimizers` (update rules and 8-bit state), `Quantization`
//! (quantized weights and projectors) and `Linalg` (the projector refresh). `Backend` is
//! all five. Checkpoints (`crate::state`) and benchmarks are built on top, outside it.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod layers;
mod linalg;
mod memory;
mod optimizers;
mod quantization;

pub use crate::adam::AdamHp;
pub use crate::host::linalg::Refresh;
pub use layers::{AttnDims, Layers};
pub use linalg::Linalg;
pub use memory::{Category, MemTracker, Memory, Runner, Tracked, CATEGORIES};
pub use optimizers::Optimizers;
pub use quantization::Quantization;

/// Collectives a backend runs on its own buffers across the ranks of a data-parallel job.
pub trait Collectives: Memory {
    /// Sums `buf[..n]` over every rank in place on the device (NCCL on CUDA) and returns
    /// true, or returns false, touching nothing, when the backend has no device collective
    /// for this job (the caller then sums through host memory and MPI). Collective: every
    /// rank calls it for the same buffers in the same order.
    fn allreduce_sum(&self, _buf: &mut Self::Buf, _n: usize) -> crate::error::Result<bool> {
        Ok(false)
    }
}

impl Collectives for cpu::Cpu {}
impl Collectives for cpu::bf16::CpuBf16 {}

/// Everything a backend provides; model and optimizer code ask for this one bound.
pub trait Backend: Memory + Layers + Optimizers + Quantization + Linalg + Collectives {}

impl<B: Memory + Layers + Optimizers + Quantization + Linalg + Collectives> Backend for B {}
