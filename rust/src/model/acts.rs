//! Activation plan: every buffer the forward keeps for the backward, and the backward's
//! scratch, sized once for (batch, seq) like llm.c's `ActivationTensors`. Nothing is
//! allocated per step.
//!
//! With activation checkpointing only the residual stream x[l] is kept per layer; the
//! per-layer buffers exist once (slot 0) and the backward recomputes each block's forward
//! into them from x[l] before differentiating it.

use crate::host::rope::rope_table_for;
use crate::backend::{AttnDims, Backend, Category};
use crate::config::ModelConfig;
use crate::error::Result;

pub struct Acts<B: Backend> {
    pub b: usize,
    /// Active sequence length (`set_len`): every op of the passes runs on b × t rows, the
    /// first b·t rows of buffers sized for `cap`.
    pub t: usize,
    /// Sequence length the buffers were sized for (the engine's seq_len).
    pub cap: usize,
    /// The RoPE table laid out for `t` positions ([cos(t×hd/2), sin(t×hd/2)]): re-uploaded
    /// when the active length changes, as the rope kernels index it by t.
    rope_t: usize,
    /// Host copy of the full (cap-position) table: a shorter table is its first rows.
    rope_host: Vec<f32>,
    /// Half the head size (columns of the RoPE table).
    rope_half: usize,
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
    /// LoRA adapters' buffers (`model::lora`; planned apart, set by the engine).
    pub lora: Option<super::lora::LoraActs<B>>,
}

/// One kind of activation buffer: `copies` buffers of `len` values each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ActBuf {
    pub name: &'static str,
    pub len: usize,
    pub copies: usize,
    /// Kept in f32 whatever the precision (norm statistics, the RoPE table, the logits);
    /// the others take the backend's activation dtype (bf16 under bf16 precision).
    pub fp32: bool,
}

/// Every buffer `Acts::new` allocates for a b×t micro-batch (n = b·t rows): per layer (or
/// once, with checkpointing) the forward's kept buffers, the residual stream x[0..=L], the
/// final norm, logits and RoPE table, and the backward's scratch. `wq` is the size of the
/// largest quantized matrix (0 for float models). The byte plan sums the same list.
pub fn buffers(cfg: &ModelConfig, b: usize, t: usize, wq: usize, ckpt: bool) -> Vec<ActBuf> {
    let n = b * t;
    let (c, i, v, kv, h, l) =
        (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.kv_dim(), cfg.num_attention_heads, cfg.num_hidden_layers);
    let slots = if ckpt { 1 } else { l };
    let buf = |name, len, copies, fp32| ActBuf { name, len, copies, fp32 };
    let per = |name, len| buf(name, len, slots, false);
    let one = |name, len| buf(name, len, 1, false);
    vec![
        buf("rope", t * cfg.head_dim(), 1, true),
        buf("x", n * c, l + 1, false),
        per("xn1", n * c),
        buf("rstd1", n, slots, true),
        per("q", n * c),
        per("k", n * kv),
        per("v", n * kv),
        per("att", b * h * t * t),
        per("ao", n * c),
        per("xm", n * c),
        per("xn2", n * c),
        buf("rstd2", n, slots, true),
        per("gate", n * i),
        per("up", n * i),
        per("act", n * i),
        one("xnf", n * c),
        buf("rstdf", n, 1, true),
        buf("logits", n * v, 1, true),
        one("dres", n * c),
        one("dxn", n * c),
        one("dq", n * c),
        one("dk", n * kv),
        one("dv", n * kv),
        one("dao", n * c),
        one("datt", b * h * t * t),
        one("dgate", n * i),
        one("dup", n * i),
        one("dact", n * i),
        one("wq", wq),
    ]
}

/// Takes the buffers planned under `name` out of `bufs`.
fn take<T>(bufs: &mut [(&'static str, Vec<T>)], name: &str) -> Vec<T> {
    let i = bufs.iter().position(|(n, _)| *n == name).unwrap_or_else(|| panic!("activation buffer {name} is not planned"));
    std::mem::take(&mut bufs[i].1)
}

fn take_one<T>(bufs: &mut [(&'static str, Vec<T>)], name: &str) -> T {
    take(bufs, name).pop().unwrap_or_else(|| panic!("activation buffer {name} is planned without a copy"))
}

impl<B: Backend> Acts<B> {
    /// Allocates exactly `planned`: the byte plan's `activations`, `buffers(cfg, b, t, wq,
    /// ckpt)`. `ckpt` (activation checkpointing) is what the list was planned with: one slot
    /// of per-layer buffers instead of one per layer.
    pub fn new(be: &B, cfg: &ModelConfig, b: usize, t: usize, ckpt: bool, planned: &[ActBuf]) -> Result<Self> {
        let cat = Category::Activations;
        let mut bufs = planned
            .iter()
            .map(|p| {
                let copies = (0..p.copies)
                    .map(|_| if p.fp32 { be.alloc_fp32(p.len, cat) } else { be.alloc(p.len, cat) })
                    .collect::<Result<Vec<_>>>()?;
                Ok((p.name, copies))
            })
            .collect::<Result<Vec<_>>>()?;
        let bufs = &mut bufs[..];
        let mut rope = take_one(bufs, "rope");
        let rope_host = rope_table_for(cfg, t);
        be.upload(&mut rope, &rope_host)?;
        let n = b * t;
        Ok(Acts {
            b,
            t,
            cap: t,
            rope_t: t,
            rope_host,
            rope_half: cfg.head_dim() / 2,
            ckpt,
            x: take(bufs, "x"),
            xn1: take(bufs, "xn1"),
            rstd1: take(bufs, "rstd1"),
            q: take(bufs, "q"),
            k: take(bufs, "k"),
            v: take(bufs, "v"),
            att: take(bufs, "att"),
            ao: take(bufs, "ao"),
            xm: take(bufs, "xm"),
            xn2: take(bufs, "xn2"),
            rstd2: take(bufs, "rstd2"),
            gate: take(bufs, "gate"),
            up: take(bufs, "up"),
            act: take(bufs, "act"),
            xnf: take_one(bufs, "xnf"),
            rstdf: take_one(bufs, "rstdf"),
            logits: take_one(bufs, "logits"),
            rope,
            dres: take_one(bufs, "dres"),
            dxn: take_one(bufs, "dxn"),
            dq: take_one(bufs, "dq"),
            dk: take_one(bufs, "dk"),
            dv: take_one(bufs, "dv"),
            dao: take_one(bufs, "dao"),
            datt: take_one(bufs, "datt"),
            dgate: take_one(bufs, "dgate"),
            dup: take_one(bufs, "dup"),
            dact: take_one(bufs, "dact"),
            wq: take_one(bufs, "wq"),
            tokens: vec![0; n],
            targets: vec![0; n],
            losses: vec![0.0; n],
            lora: None,
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

    /// Sets the active sequence length (1 ≤ t ≤ cap): the passes then run on b × t rows
    /// and cost what a t-long batch costs. Positions are 0..t as in a full window, so a
    /// row's values equal the first t positions of a longer row (causal attention).
    pub fn set_len(&mut self, be: &B, t: usize) -> Result<()> {
        assert!((1..=self.cap).contains(&t), "active length {t} outside 1..={}", self.cap);
        let n = self.b * t;
        self.t = t;
        self.tokens.resize(n, 0);
        self.targets.resize(n, 0);
        self.losses.resize(n, 0.0);
        if self.rope_t != t {
            // [cos, sin] of the first t positions: the same values as the full table's rows
            let (h, cap) = (self.rope_half, self.cap);
            let (cos, sin) = self.rope_host.split_at(cap * h);
            let tab: Vec<f32> = cos[..t * h].iter().chain(&sin[..t * h]).copied().collect();
            be.upload(&mut self.rope, &tab)?;
            self.rope_t = t;
        }
        Ok(())
    }

    /// Splits `rows` windows of t+1 ids into inputs (first t) and targets (last t). With
    /// `mask` (same layout as `windows`), a target whose mask entry is 0 becomes −1: the
    /// cross-entropy gives it no loss and no gradient.
    pub fn load_tokens(&mut self, windows: &[i32], mask: Option<&[u8]>) {
        let t = self.t;
        for (r, w) in windows.chunks(t + 1).enumerate() {
            self.tokens[r * t..(r + 1) * t].copy_from_slice(&w[..t]);
            self.targets[r * t..(r + 1) * t].copy_from_slice(&w[1..]);
            if let Some(m) = mask {
                let mr = &m[r * (t + 1) + 1..(r + 1) * (t + 1)];
                for (tg, &keep) in self.targets[r * t..(r + 1) * t].iter_mut().zip(mr) {
                    if keep == 0 {
                        *tg = -1;
                    }
                }
            }
        }
    }
}
