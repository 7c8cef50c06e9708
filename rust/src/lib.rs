//! qgalore engine: LLaMA pre-training with full-rank AdamW, GaLore and Q-GaLore.
//!
//! Layout: `backend` (the seam: CPU now, CUDA later), `model` (parameters, activations,
//! forward/backward), `optim` (optimizers), `train` (one run), `ffi` (the C ABI).

pub mod backend;
pub mod config;
pub mod error;
pub mod ffi;
pub mod model;
pub mod optim;
pub mod plan;
pub mod quant;
pub mod rng;
pub mod state;
pub mod train;
