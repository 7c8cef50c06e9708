//! Hugging Face formats: LLaMA weights in safetensors files, read (`weights`) into an
//! engine and written back out (`engine`) as a folder `transformers` loads (`config`,
//! `folder`).

pub mod adapter;
pub mod engine;
pub mod folder;
pub mod peft;
pub mod weights;

pub use engine::{Dtype, ExportOptions, HfSession};
pub use weights::{inspect_json, Checkpoint, MAX_HEADER_BYTES};
