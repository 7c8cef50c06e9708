//! Parameters of a LLaMA decoder (docs/algorithm-spec.md §3): token embedding, per block an
//! RMSNorm + q/k/v/o attention + RMSNorm + gate/up/down SwiGLU MLP, a final RMSNorm and
//! an lm_head — its own matrix, or the embedding itself (`tie_word_embeddings`). Matrices are row-major (out_features, in_features) like
//! `nn.Linear.weight`; initialisation is normal(0, initializer_range), norms are ones.

use crate::backend::{Backend, Category};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::rng;

/// What a parameter is; optimizers treat roles differently (GaLore projects `Linear`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Embed,
    Norm,
    Linear,
    Head,
    /// LoRA's A [r, in] of a target linear (`model::lora`).
    #[serde(rename = "lora_a")]
    LoraA,
    /// LoRA's B [out, r].
    #[serde(rename = "lora_b")]
    LoraB,
}

impl Role {
    pub fn adapter(self) -> bool {
        matches!(self, Role::LoraA | Role::LoraB)
    }
}

/// Storage of a parameter: f32, or quantized codes with no float master copy (docs/algorithm-spec.md §2.1).
pub enum Weight<B: Backend> {
    F(B::Buf),
    Q(B::Q),
    /// QLoRA's frozen NF4 base, resident where the backend computes (device memory on a
    /// GPU, counted under weights) and dequantized there per use.
    N(B::N),
}

pub struct Param<B: Backend> {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub role: Role,
    pub data: Weight<B>,
}

impl<B: Backend> Param<B> {
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// The f32 storage; quantized parameters are read through `Llama::wv`.
    pub fn f(&self) -> &B::Buf {
        match &self.data {
            Weight::F(b) => b,
            Weight::Q(_) | Weight::N(..) => panic!("{} is quantized; read it through Llama::wv", self.name),
        }
    }

    pub fn f_mut(&mut self) -> &mut B::Buf {
        match &mut self.data {
            Weight::F(b) => b,
            Weight::Q(_) | Weight::N(..) => panic!("{} is quantized", self.name),
        }
    }
}

/// Indices into `Llama::params` for one decoder block.
#[derive(Clone, Copy, Debug)]
pub struct Layer {
    pub attn_norm: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub o: usize,
    pub mlp_norm: usize,
    pub gate: usize,
    pub up: usize,
    pub down: usize,
}

impl Layer {
    /// The seven projected matrices of the block (docs/algorithm-spec.md §1.4).
    pub fn linears(&self) -> [usize; 7] {
        [self.q, self.k, self.v, self.o, self.gate, self.up, self.down]
    }
}

pub struct Llama<B: Backend> {
    pub cfg: ModelConfig,
    pub params: Vec<Param<B>>,
    pub layers: Vec<Layer>,
    pub embed: usize,
    pub final_norm: usize,
    /// lm_head's parameter: `embed` itself when the embeddings are tied.
    pub head: usize,
    /// LoRA adapters (lora, qlora): the base parameters are then frozen.
    pub lora: Option<super::lora::LoraModel>,
    /// The token embedding and lm_head are frozen (`OptimConfig::frozen`, freeze_embeddings).
    pub frozen_tables: bool,
    /// Host nanoseconds spent dequantizing NF4 bases for products (qlora): the measured
    /// cost QLoRA pays for its 4-bit base, reported as `timing.dequant_s`.
    pub nf4_ns: std::sync::atomic::AtomicU64,
}

/// The seven linear matrices of every block, in creation order: (kind, rows = out_features,
/// cols = in_features). q, k, v, o belong to `self_attn`, gate, up, down to `mlp`.
pub fn block_linears(cfg: &ModelConfig) -> [(&'static str, usize, usize); 7] {
    let (c, i, kv) = (cfg.hidden_size, cfg.intermediate_size, cfg.kv_dim());
    [("q", c, c), ("k", kv, c), ("v", kv, c), ("o", c, c), ("gate", i, c), ("up", i, c), ("down", c, i)]
}

/// Parameter shapes in creation order: (name, rows, cols, role). Tied embeddings have no
/// `lm_head.weight`: the embedding serves as the head.
pub fn layout(cfg: &ModelConfig) -> Vec<(String, usize, usize, Role)> {
    let (c, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), v, c, Role::Embed)];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), 1, c, Role::Norm));
        for (kind, rows, cols) in block_linears(cfg) {
            let module = if matches!(kind, "gate" | "up" | "down") { "mlp" } else { "self_attn" };
            if kind == "gate" {
                // the MLP's norm precedes its first matrix
                out.push((format!("{p}.post_attention_layernorm.weight"), 1, c, Role::Norm));
            }
            out.push((format!("{p}.{module}.{kind}_proj.weight"), rows, cols, Role::Linear));
        }
    }
    out.push(("model.norm.weight".to_string(), 1, c, Role::Norm));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), v, c, Role::Head));
    }
    out
}

/// Exact trainable parameter count for a config.
pub fn param_count(cfg: &ModelConfig) -> usize {
    layout(cfg).iter().map(|(_, r, c, _)| r * c).sum()
}

/// How an adapter run stores its frozen base (`Llama::build_with`).
#[derive(Clone, Debug)]
pub struct LoraBuild {
    pub spec: super::lora::AdapterSpec,
    /// Seeds the adapters' A (also when the base is loaded from a file).
    pub seed: u64,
    /// Linears in NF4 (qlora).
    pub nf4: bool,
    /// Base tensors in `alloc_half` storage (lora with lora_base bf16; qlora's tables).
    pub half: bool,
}

/// Quantization applied to the projected matrices while the model is built.
#[derive(Clone, Copy, Debug)]
pub struct LinearQuant {
    pub bits: u8,
    pub group: usize,
    pub range: crate::quant::Range,
}

impl<B: Backend> Llama<B> {
    pub fn new(be: &B, cfg: &ModelConfig, seed: u64) -> Result<Self> {
        Self::build(be, cfg, Some(seed), None, false)
    }

    /// Builds the model; with `quant`, each projected matrix is quantized (round to
    /// nearest, docs/algorithm-spec.md §2.2) as soon as it is initialised, so a float copy of the whole model
    /// never exists (a 7B model fits where its f32 weights would not). `half` stores the
    /// embedding and lm_head with `Backend::alloc_half` (bf16 on a bf16-precision GPU; the
    /// caller sets it only for optimizers that update them with 8-bit Adam). With `seed`
    /// None the weights start at zero (norms at one) because the caller loads them next
    /// (`Engine::import_hf`): a 7B model then costs no billions of random draws.
    pub fn build(be: &B, cfg: &ModelConfig, seed: Option<u64>, quant: Option<LinearQuant>, half: bool) -> Result<Self> {
        Self::build_with(be, cfg, seed, quant, half, None)
    }

    /// `build`, with LoRA adapters appended after the base parameters when `lora` is set:
    /// the base is frozen in its storage (NF4 linears for qlora, `alloc_half` tensors for a
    /// bf16 base) and A ~ U(−1/√in, 1/√in), B = 0 as PEFT initialises them.
    pub fn build_with(be: &B, cfg: &ModelConfig, seed: Option<u64>, quant: Option<LinearQuant>, half: bool, lora: Option<&LoraBuild>) -> Result<Self> {
        let shapes = layout(cfg);
        let mut params = Vec::with_capacity(shapes.len());
        let mut host = Vec::new();
        for (idx, (name, rows, cols, role)) in shapes.into_iter().enumerate() {
            let n = rows * cols;
            let nf4 = lora.is_some_and(|l| l.nf4) && role == Role::Linear;
            let lhalf = lora.is_some_and(|l| l.half && (role != Role::Norm) && !nf4);
            let mut data = if nf4 {
                be.alloc_fp32(0, Category::Weights)?
            } else if lhalf || (half && matches!(role, Role::Embed | Role::Head)) {
                be.alloc_half(n, Category::Weights)?
            } else {
                be.alloc(n, Category::Weights)?
            };
            host.clear();
            match seed {
                _ if role == Role::Norm => host.resize(n, 1.0),
                None => host.resize(n, 0.0),
                Some(seed) => {
                    let key = rng::stream_key(seed, 0x1417 + idx as u64, 0);
                    host.extend((0..n as u64).map(|i| cfg.initializer_range * rng::normal(key, i)));
                }
            }
            if nf4 {
                let t = crate::quant::nf4::Nf4Tensor::quantize(&host)?;
                params.push(Param { name, rows, cols, role, data: Weight::N(be.nf4_new(t, Category::Weights)?) });
                continue;
            }
            be.upload(&mut data, &host)?;
            let data = match quant {
                Some(q) if role == Role::Linear => {
                    let mut qt = be.q_new(n, q.bits, q.group, Category::Weights).map_err(|e| {
                        crate::error::Error::invalid(format!("weight_group_size = {}: {} ({name})", q.group, e.msg))
                    })?;
                    be.q_quantize(&mut qt, &data, q.range);
                    Weight::Q(qt)
                }
                _ => Weight::F(data),
            };
            params.push(Param { name, rows, cols, role, data });
        }
        let per = 9;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let b = 1 + l * per;
                Layer {
                    attn_norm: b,
                    q: b + 1,
                    k: b + 2,
                    v: b + 3,
                    o: b + 4,
                    mlp_norm: b + 5,
                    gate: b + 6,
                    up: b + 7,
                    down: b + 8,
                }
            })
            .collect();
        let final_norm = 1 + cfg.num_hidden_layers * per;
        let head = if cfg.tie_word_embeddings { 0 } else { final_norm + 1 };
        let mut m = Llama { cfg: cfg.clone(), params, layers, embed: 0, final_norm, head, lora: None, frozen_tables: false, nf4_ns: Default::default() };
        if let Some(lb) = lora {
            m.add_adapters(be, lb)?;
        }
        Ok(m)
    }

    /// Appends the adapters of `lb.spec` (`lora::layout` order) and records their pairs.
    fn add_adapters(&mut self, be: &B, lb: &LoraBuild) -> Result<()> {
        let cfg = self.cfg.clone();
        let mut pairs: Vec<[Option<(usize, usize)>; 7]> = vec![[None; 7]; cfg.num_hidden_layers];
        let list = super::lora::adapter_list(&cfg, &lb.spec);
        let shapes = super::lora::layout(&cfg, &lb.spec);
        for (j, (name, rows, cols, role)) in shapes.into_iter().enumerate() {
            let n = rows * cols;
            let mut data = be.alloc_fp32(n, Category::Adapters)?;
            if role == Role::LoraA {
                // kaiming_uniform_(a=√5) on [r, in]: bound = √(6 / ((1 + 5)·in)) = 1/√in
                let bound = 1.0 / (cols as f64).sqrt();
                let key = rng::stream_key(lb.seed, 0x10_4a00 + j as u64, 0);
                let host: Vec<f32> = (0..n as u64).map(|i| ((2.0 * rng::uniform(key, i) as f64 - 1.0) * bound) as f32).collect();
                be.upload(&mut data, &host)?;
            }
            let idx = self.params.len();
            let (l, k, _, _) = list[j / 2];
            match role {
                Role::LoraA => pairs[l][k] = Some((idx, usize::MAX)),
                _ => {
                    if let Some(p) = pairs[l][k].as_mut() {
                        p.1 = idx;
                    }
                }
            }
            self.params.push(Param { name, rows, cols, role, data: Weight::F(data) });
        }
        let scale = lb.spec.scale();
        self.lora = Some(super::lora::LoraModel { spec: lb.spec.clone(), scale, pairs, dropout_key: None });
        Ok(())
    }

    /// Whether parameter `idx` is trained: every parameter, or only the adapters of a
    /// LoRA model (its base is frozen: no gradient, no optimizer state), less the
    /// embedding and lm_head when `frozen_tables` (the engine sets it from
    /// `OptimConfig::frozen`, which the plan follows too).
    #[inline]
    pub fn trainable(&self, idx: usize) -> bool {
        let role = self.params[idx].role;
        match &self.lora {
            Some(_) => role.adapter(),
            None => !(self.frozen_tables && matches!(role, Role::Embed | Role::Head)),
        }
    }

    /// Trainable parameter count.
    pub fn trainable_numel(&self) -> usize {
        (0..self.params.len()).filter(|&i| self.trainable(i)).map(|i| self.params[i].numel()).sum()
    }

    /// Parameter `idx` as f32 values on the host: borrowed where it already lives there,
    /// else copied (quantized weights dequantized through `scratch`, as `wv`).
    pub fn read_host<'a>(&'a self, be: &B, idx: usize, scratch: &mut B::Buf) -> Result<std::borrow::Cow<'a, [f32]>> {
        let n = self.params[idx].numel();
        match &self.params[idx].data {
            Weight::F(b) => be.to_host(b, n),
            Weight::Q(q) => {
                be.q_dequantize(scratch, q);
                Ok(std::borrow::Cow::Owned(be.to_host(scratch, n)?.into_owned()))
            }
            Weight::N(t) => {
                // on the host from the codes: exact whatever the scratch's dtype
                let mut h = vec![0.0f32; n];
                be.nf4_to_host(t)?.dequantize(&mut h);
                Ok(std::borrow::Cow::Owned(h))
            }
        }
    }

    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.numel()).sum()
    }

    /// Whether one table serves the embedding and lm_head.
    pub fn tied(&self) -> bool {
        self.head == self.embed
    }

    #[inline]
    pub fn w(&self, idx: usize) -> &B::Buf {
        self.params[idx].f()
    }

    /// A weight as f32 values: the stored buffer, or the quantized codes dequantized into
    /// `scratch` with the same function the optimizer uses (docs/algorithm-spec.md I-11).
    pub fn wv<'a>(&'a self, be: &B, idx: usize, scratch: &'a mut B::Buf) -> &'a B::Buf {
        match &self.params[idx].data {
            Weight::F(b) => b,
            Weight::Q(q) => {
                be.q_dequantize(scratch, q);
                scratch
            }
            Weight::N(t) => {
                // QLoRA computes with the dequantized base (bnb dequantize_4bit, then the
                // GEMM), dequantized where it lives: no host round trip per product
                let p = &self.params[idx];
                let t0 = std::time::Instant::now();
                be.nf4_dequantize_rows(scratch, t, p.cols, 0..p.rows);
                // host time: the dequantization itself on the CPU, its launch on a GPU
                let ns = t0.elapsed().as_nanos() as u64;
                self.nf4_ns.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
                scratch
            }
        }
    }
}

/// Gradient storage. Every parameter normally owns a buffer; a fused per-layer optimizer
/// may instead route several parameters through one shared scratch buffer, which is
/// consumed (by the optimizer hook) before the next parameter's gradient is written.
pub struct Grads<B: Backend> {
    own: Vec<Option<B::Buf>>,
    shared: Option<B::Buf>,
    /// The second half of a double-buffered shared buffer (data-parallel fused step,
    /// `dist::overlap`): holds one tensor's gradient while its all-reduce is in flight and
    /// the backward writes the next tensor's into `shared`. None until `add_spare`.
    spare: Option<B::Buf>,
    /// Rows per chunk for the parameters whose gradient the fused step produces and
    /// consumes in row chunks (the embedding and head when they dwarf every other tensor).
    chunk: Vec<Option<usize>>,
}

impl<B: Backend> Grads<B> {
    /// Sizes come from the byte plan: per parameter in model order, the elements of its own
    /// buffer (None: it uses the shared one) and the rows per chunk in which the fused step
    /// hands its gradient over (`TensorPlan::grad_len`, `grad_chunk_rows`); `shared`
    /// elements of the shared buffer (`Plan::shared_grad`; 0: none).
    pub fn new(be: &B, tensors: impl IntoIterator<Item = (Option<usize>, Option<usize>)>, shared: usize) -> Result<Self> {
        let mut own = Vec::new();
        let mut chunk = Vec::new();
        for (len, rows) in tensors {
            own.push(match len {
                Some(n) => Some(be.alloc(n, Category::Grads)?),
                None => None,
            });
            chunk.push(rows);
        }
        let shared = if shared > 0 { Some(be.alloc(shared, Category::Grads)?) } else { None };
        Ok(Grads { own, shared, spare: None, chunk })
    }

    /// Rows per chunk when parameter `idx`'s gradient comes in row chunks.
    pub fn chunk_rows(&self, idx: usize) -> Option<usize> {
        self.chunk[idx]
    }

    pub fn is_shared(&self, idx: usize) -> bool {
        self.own[idx].is_none()
    }

    pub fn get(&self, idx: usize) -> &B::Buf {
        match &self.own[idx] {
            Some(b) => b,
            None => self.shared.as_ref().expect("shared gradient buffer"),
        }
    }

    pub fn get_mut(&mut self, idx: usize) -> &mut B::Buf {
        match &mut self.own[idx] {
            Some(b) => b,
            None => self.shared.as_mut().expect("shared gradient buffer"),
        }
    }

    /// Elements of the shared buffer (0 without one).
    pub fn shared_len(&self, be: &B) -> usize {
        self.shared.as_ref().map_or(0, |b| be.len(b))
    }

    /// Allocates the spare half of the shared buffer (as large as it, counted as gradient
    /// memory) unless it exists; a no-op without a shared buffer.
    pub fn add_spare(&mut self, be: &B) -> Result<()> {
        if self.spare.is_none() && self.shared.is_some() {
            self.spare = Some(be.alloc_fp32(self.shared_len(be), Category::Grads)?);
        }
        Ok(())
    }

    /// The spare half of the shared buffer (`add_spare`).
    pub fn spare_mut(&mut self) -> Option<&mut B::Buf> {
        self.spare.as_mut()
    }

    /// Exchanges the shared buffer and its spare (moves the buffers' handles; the values
    /// stay where they are). A no-op without a spare.
    pub fn swap_shared(&mut self) {
        if let (Some(a), Some(b)) = (self.shared.as_mut(), self.spare.as_mut()) {
            std::mem::swap(a, b);
        }
    }
}
