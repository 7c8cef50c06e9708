//! Quantized storage of weights and projectors (INT8/INT4 codes with a scale and zero
//! point per group, or bf16) and the fused Q-GaLore weight update; the host reference
//! is `crate::quant::QTensor`. Also QLoRA's frozen NF4 base, resident where the backend
//! computes and dequantized there per use; its host reference is `crate::quant::nf4::Nf4Tensor`.

use super::memory::{Category, Memory};
use crate::error::Result;
use crate::quant::nf4::Nf4Tensor;
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

    /// A frozen NF4 tensor (codes, u8 block constants, second-level absmax, offset) where
    /// the backend computes, counted as `Nf4Tensor::storage_bytes` of its elements.
    type N: Send;

    /// Stores `t` on the backend (moved where it lives on the host), counted under `cat`.
    fn nf4_new(&self, t: Nf4Tensor, cat: Category) -> Result<Self::N>;
    /// Elements of the tensor.
    fn nf4_numel(&self, t: &Self::N) -> usize;
    /// dst[..rows.len()·cols] = rows `rows` of the tensor viewed as [numel/cols, cols],
    /// dequantized as `Nf4Tensor::dequantize_rows` computes them (rounded to bf16, nearest
    /// even, where `dst` holds bf16).
    fn nf4_dequantize_rows(&self, dst: &mut Self::Buf, t: &Self::N, cols: usize, rows: std::ops::Range<usize>);
    /// The tensor on the host (borrowed where it lives there, downloaded otherwise).
    fn nf4_to_host<'a>(&self, t: &'a Self::N) -> Result<Cow<'a, Nf4Tensor>>;
}
