//! The model's layers, forward and backward: GEMMs, embedding, RMSNorm, RoPE, attention,
//! SwiGLU and the fused softmax cross-entropy.
//!
//! Shapes are passed explicitly, llm.c style: `n` rows of activations (batch × seq),
//! `c` channels, and matrices stored row-major as (out_features, in_features) like
//! `nn.Linear.weight`.

use super::memory::Memory;
use crate::error::Result;

/// Shape of one attention call: `b` sequences of `t` tokens, `h` query heads sharing
/// `kvh` key/value heads of width `hd`. q is (b, t, h, hd); k, v are (b, t, kvh, hd);
/// the probabilities `att` are (b, h, t, t).
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub kvh: usize,
    pub hd: usize,
}

/// Forward and backward of the model's layers.
#[allow(clippy::too_many_arguments)] // every shape is an explicit argument
pub trait Layers: Memory {
    /// Seconds per op kind since the backend was built, when profiling is on (the CPU's
    /// `QGALORE_PROFILE=1`); None otherwise.
    fn profile(&self) -> Option<std::collections::BTreeMap<String, f64>> {
        None
    }
    /// out[n, oc] (+)= inp[n, ic] · w[oc, ic]ᵀ
    fn matmul(&self, out: &mut Self::Buf, inp: &Self::Buf, w: &Self::Buf, n: usize, ic: usize, oc: usize, acc: bool);
    /// dinp[n, ic] (+)= dout[n, oc] · w[oc, ic]
    fn matmul_dinp(&self, dinp: &mut Self::Buf, dout: &Self::Buf, w: &Self::Buf, n: usize, ic: usize, oc: usize, acc: bool);
    /// dw[oc, ic] (+)= dout[n, oc]ᵀ · inp[n, ic]
    fn matmul_dw(&self, dw: &mut Self::Buf, dout: &Self::Buf, inp: &Self::Buf, n: usize, ic: usize, oc: usize, acc: bool);
    /// Rows r0 .. r0 + rows of `matmul_dw`: dw[r, :] = Σ_i dout[i, r0 + r] · inp[i, :]
    /// (a row chunk of a weight gradient, overwritten).
    fn matmul_dw_rows(&self, dw: &mut Self::Buf, dout: &Self::Buf, inp: &Self::Buf, n: usize, ic: usize, oc: usize, r0: usize, rows: usize);

    /// out[i, :] = table[tokens[i], :]
    fn embedding(&self, out: &mut Self::Buf, tokens: &[i32], table: &Self::Buf, c: usize);
    /// dtable[tokens[i], :] += dout[i, :]
    fn embedding_bwd(&self, dtable: &mut Self::Buf, dout: &Self::Buf, tokens: &[i32], c: usize);
    /// Rows r0 .. r0 + rows of `embedding_bwd`: dchunk[t − r0, :] += dout[i, :] for the
    /// tokens t = tokens[i] in that range, in row order.
    fn embedding_bwd_rows(&self, dchunk: &mut Self::Buf, dout: &Self::Buf, tokens: &[i32], c: usize, r0: usize, rows: usize);
    /// out = w ⊙ x · rsqrt(mean(x²) + eps) per row; rstd keeps the rsqrt for backward.
    fn rmsnorm(&self, out: &mut Self::Buf, rstd: &mut Self::Buf, x: &Self::Buf, w: &Self::Buf, n: usize, c: usize, eps: f32);
    /// dx += ∂/∂x, dw += ∂/∂w
    fn rmsnorm_bwd(&self, dx: &mut Self::Buf, dw: &mut Self::Buf, dout: &Self::Buf, x: &Self::Buf, w: &Self::Buf, rstd: &Self::Buf, n: usize, c: usize);
    /// Rotary embedding in place on (b, t, heads, hd) using the (t, hd/2) cos/sin table;
    /// `inverse` applies the transpose rotation (the backward).
    fn rope(&self, x: &mut Self::Buf, table: &Self::Buf, b: usize, t: usize, heads: usize, hd: usize, inverse: bool);
    fn attention(&self, out: &mut Self::Buf, att: &mut Self::Buf, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf, d: AttnDims);
    fn attention_bwd(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        scratch: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        att: &Self::Buf,
        d: AttnDims,
    );
    /// out = silu(gate) ⊙ up on the first `n` values (the active rows × intermediate size)
    fn swiglu(&self, out: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf, n: usize);
    fn swiglu_bwd(&self, dgate: &mut Self::Buf, dup: &mut Self::Buf, dout: &Self::Buf, gate: &Self::Buf, up: &Self::Buf, n: usize);
    /// Softmax cross-entropy of `n` rows of `v` logits against `targets`. Writes the
    /// per-row loss into `losses` (host) and, when `grad_scale` is given, overwrites the
    /// logits with `grad_scale · (softmax − onehot)` (llm.c's fused classifier). A target
    /// < 0 is ignored (completion-only loss, padding): its row's loss and gradient are 0.
    fn cross_entropy(&self, logits: &mut Self::Buf, targets: &[i32], losses: &mut [f32], n: usize, v: usize, grad_scale: Option<f32>) -> Result<()>;
}
