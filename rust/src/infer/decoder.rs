//! A host-side LLaMA decoder over an engine's weights with per-layer key/value caches, so
//! generating one more token costs one position instead of the whole prefix.
//!
//! It computes what `model::pass::forward` computes (the same RMSNorm, rotate-half RoPE
//! from the same table, grouped-query causal attention, SwiGLU, head through
//! `Llama::head`) in f32 on the host, one block of new positions at a time: the prompt in
//! one pass (prefill), then one position per new token. Products of one row use a
//! rayon-parallel matrix–vector loop; larger blocks use the engine's host GEMM.
//!
//! Memory follows the positions actually decoded: the cache's keys, values and RoPE table
//! grow (capacity doubling, up to `max_position_embeddings`) as positions are added, so a
//! large `max_new_tokens` reserves nothing up front, and a growth the allocator refuses is
//! a one-line error rather than an abort of the host process.
//!
//! The weights are read once per `HostModel::read` as f32 on the host: borrowed for CPU
//! float weights, but a second, full f32 copy for device buffers and INT8 weights (4 bytes
//! per parameter on top of the engine's own weights).

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::ensure;
use crate::error::{Error, Result};
use crate::host::matmul::{matmul, par};
use crate::model::Llama;
use rayon::prelude::*;
use std::borrow::Cow;

/// One decoder block's weights on the host.
struct Block<'a> {
    attn_norm: Cow<'a, [f32]>,
    q: Cow<'a, [f32]>,
    k: Cow<'a, [f32]>,
    v: Cow<'a, [f32]>,
    o: Cow<'a, [f32]>,
    mlp_norm: Cow<'a, [f32]>,
    gate: Cow<'a, [f32]>,
    up: Cow<'a, [f32]>,
    down: Cow<'a, [f32]>,
}

/// The model's weights as f32 on the host: borrowed where the engine already keeps them
/// there as f32 (CPU float weights), copied otherwise (device buffers, INT8 weights).
pub struct HostModel<'a> {
    pub cfg: ModelConfig,
    embed: Cow<'a, [f32]>,
    blocks: Vec<Block<'a>>,
    final_norm: Cow<'a, [f32]>,
    /// None when the embeddings are tied: the embedding table is the head.
    head: Option<Cow<'a, [f32]>>,
}

/// Keys and values of the positions seen so far (per layer [len, kv_dim]) and the RoPE
/// table of the positions reserved; both grow as positions are added (`reserve`).
pub struct Cache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// The engine's RoPE table for `cap` positions ([cos(cap×hd/2), sin(cap×hd/2)]).
    rope: Vec<f32>,
    /// Positions reserved in `k`, `v` and `rope`.
    cap: usize,
    len: usize,
}

/// Positions reserved by the first growth (small prompts then grow by doubling).
const MIN_POSITIONS: usize = 16;

impl Cache {
    /// An empty cache for a model of `cfg`'s layers; nothing is reserved yet.
    pub fn new(cfg: &ModelConfig) -> Self {
        let l = cfg.num_hidden_layers;
        Cache { k: vec![Vec::new(); l], v: vec![Vec::new(); l], rope: Vec::new(), cap: 0, len: 0 }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions reserved (at most twice those held, or `MIN_POSITIONS`, or the prompt).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Forgets every position (the buffers stay allocated).
    pub fn clear(&mut self) {
        self.len = 0;
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            b.clear();
        }
    }

    /// Makes room for `need` positions (≤ max_position_embeddings, checked by the caller):
    /// doubles the capacity, at most to max_position_embeddings, with fallible reservations
    /// so that a size the allocator refuses is an error, not an abort.
    fn reserve(&mut self, cfg: &ModelConfig, need: usize) -> Result<()> {
        if need <= self.cap {
            return Ok(());
        }
        let cap = need.max(self.cap.saturating_mul(2)).max(MIN_POSITIONS).min(cfg.max_position_embeddings).max(need);
        let (kv, half, layers) = (cfg.kv_dim(), cfg.head_dim() / 2, cfg.num_hidden_layers);
        let refused = || {
            let gb = 2.0 * layers as f64 * cap as f64 * kv as f64 * 4.0 / 1e9;
            Error::invalid(format!("generate: {cap} positions of K/V cache need {gb:.1} GB, which could not be allocated"))
        };
        let n = cap.checked_mul(kv).ok_or_else(refused)?;
        let rope_n = cap.checked_mul(2 * half).ok_or_else(refused)?;
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            b.try_reserve_exact(n - b.len()).map_err(|_| refused())?;
        }
        // `rope_table_for` allocates infallibly: try its size first. It is rebuilt whole
        // (values depend only on the position, so the table equals the engine's exactly);
        // with doubling the rebuilds cost at most twice the final table.
        Vec::<f32>::new().try_reserve_exact(rope_n).map_err(|_| refused())?;
        self.rope = crate::host::rope::rope_table_for(cfg, cap);
        self.cap = cap;
        Ok(())
    }
}

/// Parameter `idx` as f32 values: quantized weights are dequantized with the backend's
/// `q_dequantize` into `scratch` (the engine's own dequantization buffer), exactly the
/// values the training forward multiplies with.
fn read<'a, B: Backend>(be: &B, m: &'a Llama<B>, idx: usize, scratch: &mut B::Buf) -> Result<Cow<'a, [f32]>> {
    // a LoRA model's linears are read with their adapters merged in (the adapted model)
    crate::model::lora::merged(be, m, idx, scratch)
}

impl<'a> HostModel<'a> {
    /// Reads every parameter of `m` once (a full f32 copy unless `m` holds f32 weights on
    /// the host).
    pub fn read<B: Backend>(be: &B, m: &'a Llama<B>, scratch: &mut B::Buf) -> Result<Self> {
        let cfg = m.cfg.clone();
        let mut rd = |idx: usize| read(be, m, idx, scratch);
        let embed = rd(m.embed)?;
        let mut blocks = Vec::with_capacity(m.layers.len());
        for ly in &m.layers {
            blocks.push(Block {
                attn_norm: rd(ly.attn_norm)?,
                q: rd(ly.q)?,
                k: rd(ly.k)?,
                v: rd(ly.v)?,
                o: rd(ly.o)?,
                mlp_norm: rd(ly.mlp_norm)?,
                gate: rd(ly.gate)?,
                up: rd(ly.up)?,
                down: rd(ly.down)?,
            });
        }
        let final_norm = rd(m.final_norm)?;
        // Tied embeddings: `head` is the embedding's index, one table serves both.
        let head = if m.head == m.embed { None } else { Some(rd(m.head)?) };
        be.sync()?;
        Ok(HostModel { cfg, embed, blocks, final_norm, head })
    }

    /// Runs `tokens` at the positions after the cache's, appending their keys and values
    /// to it; returns the logits of every row (`all`) or of the last row only. No tokens,
    /// ids outside the vocabulary, positions past max_position_embeddings and a cache
    /// growth the allocator refuses are errors (the cache is then unchanged).
    pub fn forward(&self, cache: &mut Cache, tokens: &[i32], all: bool) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (m, c, inter, kv, vocab) = (tokens.len(), cfg.hidden_size, cfg.intermediate_size, cfg.kv_dim(), cfg.vocab_size);
        let (h, kvh, hd, eps) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim(), cfg.rms_norm_eps);
        let (p0, max) = (cache.len, cfg.max_position_embeddings);
        ensure!(m > 0, "generate: no token ids to run");
        ensure!(m <= max.saturating_sub(p0), "generate: positions {p0} + {m} exceed max_position_embeddings {max}");
        if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(Error::invalid(format!("generate: token id {bad} is outside the vocabulary [0, {vocab})")));
        }
        cache.reserve(cfg, p0 + m)?;
        let mut x = vec![0.0f32; m * c];
        for (row, &t) in x.chunks_mut(c).zip(tokens) {
            row.copy_from_slice(&self.embed[t as usize * c..(t as usize + 1) * c]);
        }
        // query width h·hd (equal to c unless a config sets head_dim apart from c / h)
        let qd = h * hd;
        let (mut xn, mut q, mut ao) = (vec![0.0f32; m * c], vec![0.0f32; m * qd], vec![0.0f32; m * qd]);
        let (mut k, mut v) = (vec![0.0f32; m * kv], vec![0.0f32; m * kv]);
        let (mut gate, mut up) = (vec![0.0f32; m * inter], vec![0.0f32; m * inter]);
        for (l, b) in self.blocks.iter().enumerate() {
            rmsnorm(&mut xn, &x, &b.attn_norm, c, eps);
            linear(&mut q, &xn, &b.q, m, c, qd, false);
            linear(&mut k, &xn, &b.k, m, c, kv, false);
            linear(&mut v, &xn, &b.v, m, c, kv, false);
            rotate(&mut q, &cache.rope, cache.cap, p0, h, hd);
            rotate(&mut k, &cache.rope, cache.cap, p0, kvh, hd);
            // within the reserved capacity: no reallocation, nothing can fail from here on
            cache.k[l].extend_from_slice(&k);
            cache.v[l].extend_from_slice(&v);
            attend(&mut ao, &q, &cache.k[l], &cache.v[l], p0, h, kvh, hd);
            // the residual stream takes the attention output in place (xm = x + ao·Woᵀ)
            linear(&mut x, &ao, &b.o, m, qd, c, true);
            rmsnorm(&mut xn, &x, &b.mlp_norm, c, eps);
            linear(&mut gate, &xn, &b.gate, m, c, inter, false);
            linear(&mut up, &xn, &b.up, m, c, inter, false);
            gate.par_chunks_mut(4096).zip(up.par_chunks(4096)).for_each(|(g, u)| {
                for (g, &u) in g.iter_mut().zip(u) {
                    *g = *g * (1.0 / (1.0 + (-*g).exp())) * u;
                }
            });
            linear(&mut x, &gate, &b.down, m, inter, c, true);
        }
        cache.len = p0 + m;
        let first = if all { 0 } else { m - 1 };
        let rows = m - first;
        let mut xf = vec![0.0f32; rows * c];
        rmsnorm(&mut xf, &x[first * c..], &self.final_norm, c, eps);
        let mut logits = vec![0.0f32; rows * vocab];
        let head = self.head.as_deref().unwrap_or(&self.embed);
        linear(&mut logits, &xf, head, rows, c, vocab, false);
        Ok(logits)
    }
}

/// Rotary embedding of rows at positions p0, p0+1, … (the engine's rotate-half rule) from
/// `rope`, a table of `cap` positions.
fn rotate(x: &mut [f32], rope: &[f32], cap: usize, p0: usize, heads: usize, hd: usize) {
    let half = hd / 2;
    let (cos, sin) = rope.split_at(cap * half);
    x.par_chunks_mut(heads * hd).enumerate().for_each(|(i, row)| {
        let p = p0 + i;
        let (cr, sr) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
        for head in row.chunks_mut(hd) {
            let (x1, x2) = head.split_at_mut(half);
            for j in 0..half {
                let (a, b, c, s) = (x1[j], x2[j], cr[j], sr[j]);
                x1[j] = a * c - b * s;
                x2[j] = b * c + a * s;
            }
        }
    });
}

/// Row-wise RMSNorm as the engine computes it: w ⊙ (x · rsqrt(mean(x²) + eps)).
fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
    out.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(o, xr)| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let s = 1.0 / (ms + eps).sqrt();
        for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
            *o = wv * (xv * s);
        }
    });
}

/// out[m, oc] (+)= inp[m, ic] · w[oc, ic]ᵀ through the host GEMM (its matrix–vector path
/// for one row measured faster than a rayon loop of dot products on 2 cores).
#[allow(clippy::too_many_arguments)]
fn linear(out: &mut [f32], inp: &[f32], w: &[f32], m: usize, ic: usize, oc: usize, acc: bool) {
    matmul(out, inp, w, m, ic, oc, acc, par(rayon::current_num_threads()));
}

/// Dot product with eight independent partial sums (vectorizes without reassociation).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..8 {
            s[j] += x[j] * y[j];
        }
    }
    let mut t = (s[0] + s[4]) + (s[1] + s[5]) + (s[2] + s[6]) + (s[3] + s[7]);
    for (x, y) in ar.iter().zip(br) {
        t += x * y;
    }
    t
}

/// Causal attention of m query rows at positions p0.. over the cached keys and values
/// 0..=p (grouped-query: query head hi reads kv head hi / (h / kvh)).
#[allow(clippy::too_many_arguments)]
fn attend(out: &mut [f32], q: &[f32], kc: &[f32], vc: &[f32], p0: usize, h: usize, kvh: usize, hd: usize) {
    let (kv, group) = (kvh * hd, h / kvh);
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each(|(task, o)| {
        let (i, hi) = (task / h, task % h);
        let p = p0 + i;
        let g = hi / group;
        let qr = &q[task * hd..(task + 1) * hd];
        let mut s: Vec<f32> = (0..=p).map(|j| scale * dot(qr, &kc[j * kv + g * hd..j * kv + (g + 1) * hd])).collect();
        let mx = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0.0f32;
        for z in &mut s {
            *z = (*z - mx).exp();
            sum += *z;
        }
        let inv = 1.0 / sum;
        o.fill(0.0);
        for (j, &z) in s.iter().enumerate() {
            let a = z * inv;
            let vr = &vc[j * kv + g * hd..j * kv + (g + 1) * hd];
            for (o, &vv) in o.iter_mut().zip(vr) {
                *o += a * vv;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_growth_the_allocator_refuses_is_an_error() {
        let cfg = ModelConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            num_hidden_layers: 2,
            max_position_embeddings: 1 << 50,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-6,
            initializer_range: 0.02,
            rope_scaling: None,
            tie_word_embeddings: false,
        };
        let mut cache = Cache::new(&cfg);
        // 2^50 positions × 16 values × 4 bytes per layer buffer: past any address space
        let msg = cache.reserve(&cfg, 1 << 50).unwrap_err().msg;
        assert_eq!(msg, "generate: 1125899906842624 positions of K/V cache need 288230376.2 GB, which could not be allocated");
        assert_eq!(cache.capacity(), 0);
        // still usable at a size that fits
        cache.reserve(&cfg, 5).unwrap();
        assert_eq!(cache.capacity(), 16);
        assert_eq!(cache.rope, crate::host::rope::rope_table_for(&cfg, 16));
    }
}
