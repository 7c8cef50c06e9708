//! The LLaMA decoder: parameter layout (`llama`), the activation plan (`acts`), and the
//! hand-written forward and backward passes (`pass`).

pub mod acts;
pub mod llama;
pub mod lora;
pub mod pass;

pub use acts::Acts;
pub use llama::{Grads, Layer, LinearQuant, Llama, LoraBuild, Param, Role, Weight};
pub use lora::{AdapterSpec, LoraActs, LoraModel, Targets};
