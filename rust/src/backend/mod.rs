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

/// Everything a backend provides; model and optimizer code ask for this one bound.
pub trait Backend: Memory + Layers + Optimizers + Quantization + Linalg {}

impl<B: Memory + Layers + Optimizers + Quantization + Linalg> Backend for B {}
