//! LoRA / QLoRA adapters (Hu et al. 2021; Dettmers et al. 2023) as PEFT defines them:
//! each target projection y = x Wᵀ of every block becomes y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ
//! with A [r, in] ~ U(−1/√in, 1/√in) (kaiming_uniform(a = √5)), B [out, r] = 0 (so step 0
//! is the base model), s = alpha / r (alpha / √r with rsLoRA). The base weights are frozen.
//!
//! The adapters are ordinary parameters (roles `LoraA`, `LoraB`) appended after the base
//! ones, named after PEFT's module path (`model.layers.0.self_attn.q_proj.lora_A.weight`).
//! Their forward keeps v = s · A·xd (n × r) per target for the backward; dropout masks are
//! a pure function of (key, layer, module, element), so the backward and checkpointing's
//! recomputation regenerate them instead of storing them.

use super::acts::ActBuf;
use super::llama::{block_linears, Llama, Role};
use super::Grads;
use crate::backend::{Backend, Category};
use crate::config::{ModelConfig, OptimConfig};
use crate::error::Result;
use crate::rng;
use std::borrow::Cow;

/// PEFT's module names of the seven block linears, in `block_linears` order.
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The adapted modules: bit k = `MODULES[k]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Targets(pub u8);

impl Targets {
    /// PEFT's default for LLaMA: q_proj and v_proj.
    pub const DEFAULT: Targets = Targets(0b101);
    pub const ALL: Targets = Targets(0x7f);

    pub fn has(self, k: usize) -> bool {
        self.0 & (1 << k) != 0
    }

    /// "q_proj,v_proj" or "all-linear" (every linear but lm_head, as PEFT resolves it).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if text == "all-linear" {
            return Some(Targets::ALL);
        }
        let mut bits = 0u8;
        for part in text.split(',') {
            let k = MODULES.iter().position(|m| *m == part.trim())?;
            bits |= 1 << k;
        }
        (bits != 0).then_some(Targets(bits))
    }

    pub fn text(self) -> String {
        if self == Targets::ALL {
            return "all-linear".into();
        }
        MODULES.iter().enumerate().filter(|(k, _)| self.has(*k)).map(|(_, m)| *m).collect::<Vec<_>>().join(",")
    }

    /// Module names, in block order.
    pub fn names(self) -> Vec<&'static str> {
        MODULES.iter().enumerate().filter(|(k, _)| self.has(*k)).map(|(_, m)| *m).collect()
    }
}

/// Adapters on the host: (PEFT parameter name, shape [rows, cols], values), in model order.
pub type HostTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The adapter settings of a run (`Engine::adapters`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Targets,
    pub rslora: bool,
}

impl AdapterSpec {
    /// The spec of an adapter optimizer's config; None for the others.
    pub fn from_optim(o: &OptimConfig) -> Option<Self> {
        o.name.adapter().then_some(AdapterSpec {
            rank: o.lora_rank,
            alpha: o.lora_alpha,
            dropout: o.lora_dropout,
            targets: o.lora_targets,
            rslora: o.lora_rslora,
        })
    }

    /// s = alpha / r, or alpha / √r (rsLoRA), in f32 as PEFT computes it in Python floats.
    pub fn scale(&self) -> f32 {
        let r = self.rank as f64;
        (self.alpha as f64 / if self.rslora { r.sqrt() } else { r }) as f32
    }
}

/// The hf module path of block `l`'s linear `k` (`model.layers.0.self_attn.q_proj`).
pub fn module_path(l: usize, k: usize) -> String {
    let part = if k >= 4 { "mlp" } else { "self_attn" };
    format!("model.layers.{l}.{part}.{}", MODULES[k])
}

/// One adapter pair in creation order: (layer, module k, rows = out, cols = in).
pub fn adapter_list(cfg: &ModelConfig, spec: &AdapterSpec) -> Vec<(usize, usize, usize, usize)> {
    let lin = block_linears(cfg);
    let mut out = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for (k, &(_, rows, cols)) in lin.iter().enumerate() {
            if spec.targets.has(k) {
                out.push((l, k, rows, cols));
            }
        }
    }
    out
}

/// Adapter parameter shapes in creation order (A then B of each pair): (name, rows, cols, role).
pub fn layout(cfg: &ModelConfig, spec: &AdapterSpec) -> Vec<(String, usize, usize, Role)> {
    let r = spec.rank;
    let mut out = Vec::new();
    for (l, k, rows, cols) in adapter_list(cfg, spec) {
        let p = module_path(l, k);
        out.push((format!("{p}.lora_A.weight"), r, cols, Role::LoraA));
        out.push((format!("{p}.lora_B.weight"), rows, r, Role::LoraB));
    }
    out
}

/// The first adapter that does not fit its matrix (rank > min(rows, cols)), as a message.
pub fn rank_problem(cfg: &ModelConfig, spec: &AdapterSpec) -> Option<String> {
    let lin = block_linears(cfg);
    lin.iter().enumerate().find(|(k, (_, rows, cols))| spec.targets.has(*k) && spec.rank > (*rows).min(*cols)).map(|(k, (_, rows, cols))| {
        format!(
            "exceeds the {rows}×{cols} {} matrix (out × in); use a rank ≤ {}",
            MODULES[k],
            (*rows).min(*cols)
        )
    })
}

/// The adapters of a built model.
pub struct LoraModel {
    pub spec: AdapterSpec,
    pub scale: f32,
    /// Per layer, per module k: the (A, B) parameter indices of its adapter.
    pub pairs: Vec<[Option<(usize, usize)>; 7]>,
    /// Dropout key of the training forward now running (None: no dropout, as in eval).
    pub dropout_key: Option<u64>,
}

/// Activation buffers of the adapters, planned like `acts::buffers`: v = s·A·xd per layer
/// and target (n × r), the backward's du (n × r), the dropped-out input xd (n × largest
/// in, only with dropout) and a scratch for the gradient of a frozen norm (c, f32).
pub fn act_buffers(cfg: &ModelConfig, spec: &AdapterSpec, b: usize, t: usize) -> Vec<ActBuf> {
    let (n, r) = (b * t, spec.rank);
    let pairs = adapter_list(cfg, spec);
    let big_in = pairs.iter().map(|p| p.3).max().unwrap_or(0);
    let mut out = vec![
        // f32 under every precision: the adapter scale is applied to them in place
        // (`Memory::scale` works on f32 buffers), and they are only n × r
        ActBuf { name: "lora_v", len: n * r, copies: pairs.len(), fp32: true },
        ActBuf { name: "lora_du", len: n * r, copies: 1, fp32: true },
        ActBuf { name: "lora_dnorm", len: cfg.hidden_size, copies: 1, fp32: true },
    ];
    if spec.dropout > 0.0 {
        out.push(ActBuf { name: "lora_xd", len: n * big_in, copies: 1, fp32: false });
    }
    out
}

/// The adapters' activation buffers (`act_buffers`).
pub struct LoraActs<B: Backend> {
    /// Per layer, per module k: v = s·A·xd of the last forward.
    pub v: Vec<[Option<B::Buf>; 7]>,
    pub du: B::Buf,
    pub dnorm: B::Buf,
    pub xd: Option<B::Buf>,
}

impl<B: Backend> LoraActs<B> {
    pub fn new(be: &B, cfg: &ModelConfig, spec: &AdapterSpec, b: usize, t: usize) -> Result<Self> {
        let cat = Category::Activations;
        let n = b * t;
        let pairs = adapter_list(cfg, spec);
        let mut v: Vec<[Option<B::Buf>; 7]> = (0..cfg.num_hidden_layers).map(|_| Default::default()).collect();
        for &(l, k, _, _) in &pairs {
            v[l][k] = Some(be.alloc_fp32(n * spec.rank, cat)?);
        }
        let big_in = pairs.iter().map(|p| p.3).max().unwrap_or(0);
        let xd = if spec.dropout > 0.0 { Some(be.alloc(n * big_in, cat)?) } else { None };
        Ok(LoraActs { v, du: be.alloc_fp32(n * spec.rank, cat)?, dnorm: be.alloc_fp32(cfg.hidden_size, cat)?, xd })
    }
}

/// Dropout key of one training micro-batch: a function of the seed, the optimizer step and
/// the micro-batch, so a resumed run draws the same masks.
pub fn dropout_key(seed: u64, step: u64, micro: usize) -> u64 {
    rng::stream_key(seed, 0x4c6f_5241, step.wrapping_mul(1 << 20).wrapping_add(micro as u64))
}

/// xd = x ⊙ mask / (1 − p) into `xd` (n × cols), the mask drawn per (key, layer, module,
/// element) with keep probability 1 − p (torch's inverted dropout). Host-side: the same
/// numbers on every backend.
#[allow(clippy::too_many_arguments)]
fn dropout<B: Backend>(be: &B, key: u64, p: f32, l: usize, k: usize, x: &B::Buf, xd: &mut B::Buf, len: usize) -> Result<()> {
    let key = rng::mix64(key, (l * 7 + k) as u64);
    let h = be.to_host(x, len)?;
    let keep = 1.0 / (1.0 - p);
    // a data-parallel rank draws its elements after those of the ranks before it (every rank
    // the same len), so no two ranks share a mask
    let at = (crate::dist::rank() * len) as u64;
    let out: Vec<f32> = h.iter().enumerate().map(|(i, &v)| if rng::uniform(key, at + i as u64) >= p { v * keep } else { 0.0 }).collect();
    be.upload(xd, &out)
}

/// Adds block `l`'s adapter on module `k` (if any) to y (n × out): y += v·Bᵀ with
/// v = s·(xd·Aᵀ) kept for the backward.
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(be: &B, m: &Llama<B>, la: &mut LoraActs<B>, l: usize, k: usize, x: &B::Buf, y: &mut B::Buf, n: usize, cin: usize, cout: usize) {
    let Some(ib) = forward_keep(be, m, la, l, k, x, n, cin) else { return };
    let r = m.lora.as_ref().map_or(0, |lm| lm.spec.rank);
    let v = la.v[l][k].as_ref().expect("adapter activation");
    be.matmul(y, v, m.w(ib), n, r, cout, true);
}

/// Only v = s·(xd·Aᵀ) of block `l`'s adapter on module `k` (the recomputation of a block
/// whose output is kept); returns B's index when the module has an adapter.
#[allow(clippy::too_many_arguments)]
pub fn forward_keep<B: Backend>(be: &B, m: &Llama<B>, la: &mut LoraActs<B>, l: usize, k: usize, x: &B::Buf, n: usize, cin: usize) -> Option<usize> {
    let lm = m.lora.as_ref()?;
    let (ia, ib) = lm.pairs[l][k]?;
    let r = lm.spec.rank;
    let LoraActs { v, xd, .. } = la;
    let v = v[l][k].as_mut().expect("adapter activation");
    let inp: &B::Buf = match (lm.dropout_key, xd.as_mut()) {
        (Some(key), Some(xd)) if lm.spec.dropout > 0.0 => {
            dropout(be, key, lm.spec.dropout, l, k, x, xd, n * cin).expect("adapter dropout");
            xd
        }
        _ => x,
    };
    be.matmul(v, inp, m.w(ia), n, cin, r, false);
    be.scale(v, lm.scale);
    Some(ib)
}

/// Backward of block `l`'s adapter on module `k` given dy (n × out): dB (+)= dyᵀ·v,
/// du = s·dy·B, dA (+)= duᵀ·xd, dx += dropout'(du·A). Reports A and B to `hook`.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    be: &B,
    m: &mut Llama<B>,
    g: &mut Grads<B>,
    la: &mut LoraActs<B>,
    l: usize,
    k: usize,
    x: &B::Buf,
    dy: &B::Buf,
    dx: &mut B::Buf,
    n: usize,
    cin: usize,
    cout: usize,
    acc: bool,
    hook: &mut super::pass::Hook<B>,
) {
    let Some(lm) = &m.lora else { return };
    let Some((ia, ib)) = lm.pairs[l][k] else { return };
    let (r, s, p, key) = (lm.spec.rank, lm.scale, lm.spec.dropout, lm.dropout_key);
    let LoraActs { v, du, xd, .. } = la;
    let v = v[l][k].as_ref().expect("adapter activation");
    // Each matrix is read before `hook` may update it (a fused step updates inside the
    // backward), and each gradient is reported before the next one is written (a fused
    // step routes them through one shared buffer).
    be.matmul_dinp(du, dy, m.w(ib), n, r, cout, false);
    be.scale(du, s);
    let accb = acc && !g.is_shared(ib);
    be.matmul_dw(g.get_mut(ib), dy, v, n, r, cout, accb);
    hook(ib, None, m, g);
    let dropped = match (key, xd.as_mut()) {
        (Some(key), Some(xd)) if p > 0.0 => {
            dropout(be, key, p, l, k, x, xd, n * cin).expect("adapter dropout");
            Some(xd)
        }
        _ => None,
    };
    let acca = acc && !g.is_shared(ia);
    match dropped {
        Some(xd) => {
            be.matmul_dw(g.get_mut(ia), du, xd, n, cin, r, acca);
            // d(xd)/dx is the same mask and 1/(1 − p): push du·A through it on the host
            be.matmul_dinp(xd, du, m.w(ia), n, cin, r, false);
            let key2 = rng::mix64(key.unwrap_or(0), (l * 7 + k) as u64);
            let keep = 1.0 / (1.0 - p);
            let h = be.to_host(xd, n * cin).expect("adapter dropout");
            let mut out = be.to_host(dx, n * cin).expect("adapter dropout").into_owned();
            for (i, (o, v)) in out.iter_mut().zip(h.iter()).enumerate() {
                if rng::uniform(key2, i as u64) >= p {
                    *o += *v * keep;
                }
            }
            // only the first n·cin values: the scratch xd may be wider than dx
            be.upload(dx, &out).expect("adapter dropout");
        }
        None => {
            be.matmul_dw(g.get_mut(ia), du, x, n, cin, r, acca);
            be.matmul_dinp(dx, du, m.w(ia), n, cin, r, true);
        }
    }
    hook(ia, None, m, g);
}

/// A base linear's values with its adapter merged in: W + s·B·A (f32, host), or the plain
/// (dequantized) weight when the matrix has no adapter. For exports and the host decoder.
pub fn merged<'a, B: Backend>(be: &B, m: &'a Llama<B>, idx: usize, scratch: &mut B::Buf) -> Result<Cow<'a, [f32]>> {
    let p = &m.params[idx];
    let n = p.numel();
    let base = m.read_host(be, idx, scratch)?;
    let Some(lm) = &m.lora else { return Ok(base) };
    let Some((l, k)) = m.layers.iter().enumerate().find_map(|(l, ly)| ly.linears().iter().position(|&i| i == idx).map(|k| (l, k))) else {
        return Ok(base);
    };
    let Some((ia, ib)) = lm.pairs[l][k] else { return Ok(base) };
    let (rows, cols, r) = (p.rows, p.cols, lm.spec.rank);
    let a = be.to_host(m.w(ia), r * cols)?;
    let b = be.to_host(m.w(ib), rows * r)?;
    let mut w = base.into_owned();
    debug_assert_eq!(w.len(), n);
    // W[i, j] += s · Σ_q B[i, q] A[q, j], the sum in f32 as torch's B @ A
    for i in 0..rows {
        let row = &mut w[i * cols..(i + 1) * cols];
        for q in 0..r {
            let bq = lm.scale * b[i * r + q];
            if bq != 0.0 {
                for (wv, &av) in row.iter_mut().zip(&a[q * cols..(q + 1) * cols]) {
                    *wv += bq * av;
                }
            }
        }
    }
    Ok(Cow::Owned(w))
}
