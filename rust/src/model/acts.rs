//! Activation plan: every buffer the forward keeps for the backward, and the backward's
//! scratch, sized once for (batch, seq) like llm.c's `ActivationTensors`. Nothing is
//! allocated per step.
//!
//! With activation checkpointing only the residual stream x[l] is kept per layer; the
//! per-layer buffers exist once (slot 0) and the backward recomputes each block's forward
//! into them from x[l] before differentiating it.

use crate::host::rope::rope_table;
use crate::backend::{AttnDims, Backend, Category};
use crate::config::ModelConfig;
use crate::error::Result;

pub struct Acts<B: Backend> {
    pub b: usize,
    pub t: usize,
    /// Activation checkpointing: one slot of per-layer buffers, recomputed in the backward.
    pub ckpt: bool,
    /// Residual stream: x[l] enters block l; x[L] enters the final norm.
    pub x: Vec<B::Buf>,
    pub xn1: Vec<B::Buf>,
    pub rstd1: Vec<B::Buf>,
    pub q: Vec<B::Buf>,
    pub k: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    pub att: Vec<B::Buf>,
    pub ao: Vec<B::Buf>,
    pub xm: Vec<B::Buf>,
    pub xn2: Vec<B::Buf>,
    pub rstd2: Vec<B::Buf>,
    pub gate: Vec<B::Buf>,
    pub up: Vec<B::Buf>,
    pub act: Vec<B::Buf>,
    pub xnf: B::Buf,
    pub rstdf: B::Buf,
    /// Logits, overwritten in place by their gradient.
    pub logits: B::Buf,
    pub rope: B::Buf,
    // backward scratch, reused by every block
    pub dres: B::Buf,
    pub dxn: B::Buf,
    pub dq: B::Buf,
    pub dk: B::Buf,
    pub dv: B::Buf,
    pub dao: B::Buf,
    pub datt: B::Buf,
    pub dgate: B::Buf,
    pub dup: B::Buf,
    pub dact: B::Buf,
    /// Dequantized weight of the matrix being used (quantized models only).
    pub wq: B::Buf,
    // host side
    pub tokens: Vec<i32>,
    pub targets: Vec<i32>,
    pub losses: Vec<f32>,
}

impl<B: Backend> Acts<B> {
    /// `wq` is the size of the largest quantized matrix (0 for float models); `ckpt` keeps
    /// one slot of per-layer buffers instead of one per layer (activation checkpointing).
    pub fn new(be: &B, cfg: &ModelConfig, b: usize, t: usize, wq: usize, ckpt: bool) -> Result<Self> {
        let n = b * t;
        let (c, i, v, kv, h, l) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.kv_dim(),
            cfg.num_attention_heads,
            cfg.num_hidden_layers,
        );
        let a = |len: usize| be.alloc(len, Category::Activations);
        // kept in f32 whatever the precision: statistics, tables and the loss input
        let f = |len: usize| be.alloc_fp32(len, Category::Activations);
        let slots = if ckpt { 1 } else { l };
        let perf = |len: usize| -> Result<Vec<B::Buf>> { (0..slots).map(|_| f(len)).collect() };
        let per = |len: usize| -> Result<Vec<B::Buf>> { (0..slots).map(|_| a(len)).collect() };
        let mut rope = f(t * cfg.head_dim())?;
        be.upload(&mut rope, &rope_table(t, cfg.head_dim(), cfg.rope_theta))?;
        Ok(Acts {
            b,
            t,
            ckpt,
            x: (0..=l).map(|_| a(n * c)).collect::<Result<_>>()?,
            xn1: per(n * c)?,
            rstd1: perf(n)?,
            q: per(n * c)?,
            k: per(n * kv)?,
            v: per(n * kv)?,
            att: per(b * h * t * t)?,
            ao: per(n * c)?,
            xm: per(n * c)?,
            xn2: per(n * c)?,
            rstd2: perf(n)?,
            gate: per(n * i)?,
            up: per(n * i)?,
            act: per(n * i)?,
            xnf: a(n * c)?,
            rstdf: f(n)?,
            logits: f(n * v)?,
            rope,
            dres: a(n * c)?,
            dxn: a(n * c)?,
            dq: a(n * c)?,
            dk: a(n * kv)?,
            dv: a(n * kv)?,
            dao: a(n * c)?,
            datt: a(b * h * t * t)?,
            dgate: a(n * i)?,
            dup: a(n * i)?,
            dact: a(n * i)?,
            wq: a(wq)?,
            tokens: vec![0; n],
            targets: vec![0; n],
            losses: vec![0.0; n],
        })
    }

    /// Index of layer `l`'s buffers in the per-layer vectors.
    pub fn slot(&self, l: usize) -> usize {
        if self.ckpt {
            0
        } else {
            l
        }
    }

    pub fn dims(&self, cfg: &ModelConfig) -> AttnDims {
        AttnDims {
            b: self.b,
            t: self.t,
            h: cfg.num_attention_heads,
            kvh: cfg.kv_heads(),
            hd: cfg.head_dim(),
        }
    }

    /// Splits `rows` windows of t+1 ids into inputs (first t) and targets (last t).
    pub fn load_tokens(&mut self, windows: &[i32]) {
        let t = self.t;
        for (r, w) in windows.chunks(t + 1).enumerate() {
            self.tokens[r * t..(r + 1) * t].copy_from_slice(&w[..t]);
            self.targets[r * t..(r + 1) * t].copy_from_slice(&w[1..]);
        }
    }
}
