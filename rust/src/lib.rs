//! qgalore engine: LLaMA pre-training with full-rank AdamW, GaLore and Q-GaLore.
//!
//! Layout: `backend` (the seam: CPU and CUDA), `host` (host numerics both backends use),
//! `quant` (quantized tensors, 8-bit Adam state), `adam` (Adam hyper-parameters), `model`
//! (parameters, activations, forward/backward), `optim` (optimizers), `state`
//! (checkpoints), `train` (one run), `ffi` (the C ABI).

pub mod adam;
pub mod backend;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod ffi;
pub mod hf;
pub mod host;
pub mod infer;
pub mod model;
pub mod optim;
pub mod plan;
pub mod quant;
pub mod rng;
pub mod state;
pub mod train;
