//! Quantized storage of weights and projectors (INT8/INT4 codes with a scale and zero
//! point per group, or bf16) and the fused Q-GaLore weight update; the host reference
//! is `crate::quant::QTensor`.

use super::memory::{Category, Memory};
use crate::error::Result;
use crate::quant::{QTensor, Range};
use std::borrow::Cow;

/// Quantized tensors on the backend.
pub trait Quantization: Memory {
    /// Quantized storage (INT8/INT4 codes with group scale and zero, or bf16).
    type Q: Send;

    fn q_new(&self, numel: usize, bits: u8, group: usize, cat: Category) -> Result<Self::Q>;
    fn q_bytes(&self, q: &Self::Q) -> usize;
    /// Round-to-nearest quantization of `src` into `q`.
    fn q_quantize(&self, q: &mut Self::Q, src: &Self::Buf, range: Range);
    fn q_dequantize(&self, dst: &mut Self::Buf, q: &Self::Q);
    /// Fused dequantize → += delta → ·decay → new group range → requantize (SR when keyed).
    fn q_update(&self, q: &mut Self::Q, delta: &Self::Buf, decay: f32, range: Range, sr: Option<u64>);
    /// The tensor as host codes (borrowed where it lives on the host, copied otherwise).
    fn q_to_host<'a>(&self, q: &'a Self::Q) -> Result<Cow<'a, QTensor>>;
    /// Overwrites `q` with what `fill` writes into a host tensor of its shape (`q`'s own
    /// storage where it lives on the host).
    fn q_from_host(&self, q: &mut Self::Q, fill: impl FnOnce(&mut QTensor) -> Result<()>) -> Result<()>;
}
