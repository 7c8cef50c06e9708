//! Run configuration as it arrives from TypeScript (JSON, Hugging Face LlamaConfig names).

use crate::ensure;
use crate::error::{Error, Result};
use serde::Deserialize;

/// LLaMA architecture (algorithm-spec §3). Field names follow `transformers.LlamaConfig`.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub num_hidden_layers: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_init")]
    pub initializer_range: f32,
}

fn default_max_pos() -> usize {
    2048
}
fn default_theta() -> f64 {
    10000.0
}
fn default_eps() -> f32 {
    1e-6
}
fn default_init() -> f32 {
    0.02
}

impl ModelConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads() * self.head_dim()
    }

    pub fn validate(&self) -> Result<()> {
        let pos = |v: usize, name: &str| -> Result<()> {
            ensure!(v > 0, "model {name} = {v}: must be ≥ 1");
            Ok(())
        };
        pos(self.vocab_size, "vocab_size")?;
        pos(self.hidden_size, "hidden_size")?;
        pos(self.intermediate_size, "intermediate_size")?;
        pos(self.num_attention_heads, "num_attention_heads")?;
        pos(self.num_hidden_layers, "num_hidden_layers")?;
        pos(self.kv_heads(), "num_key_value_heads")?;
        pos(self.max_position_embeddings, "max_position_embeddings")?;
        ensure!(
            self.hidden_size % self.num_attention_heads == 0,
            "model num_attention_heads = {}: must divide hidden_size = {}",
            self.num_attention_heads,
            self.hidden_size
        );
        ensure!(
            self.num_attention_heads % self.kv_heads() == 0,
            "model num_key_value_heads = {}: must divide num_attention_heads = {}",
            self.kv_heads(),
            self.num_attention_heads
        );
        ensure!(
            self.head_dim() % 2 == 0,
            "model head dim = {}: must be even for rotary embeddings",
            self.head_dim()
        );
        ensure!(
            self.rope_theta > 0.0 && self.rope_theta.is_finite(),
            "model rope_theta = {}: must be > 0",
            self.rope_theta
        );
        ensure!(
            self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite(),
            "model rms_norm_eps = {}: must be > 0",
            self.rms_norm_eps
        );
        Ok(())
    }
}

/// Optimizer settings. Fields that do not apply to the chosen optimizer are rejected by
/// the front end; the engine ignores them.
#[derive(Clone, Debug, Deserialize)]
pub struct OptimConfig {
    pub name: String,
    #[serde(default = "default_b1")]
    pub beta1: f32,
    #[serde(default = "default_b2")]
    pub beta2: f32,
    #[serde(default = "default_adam_eps")]
    pub eps: f32,
    #[serde(default)]
    pub weight_decay: f32,
    /// Global gradient-norm clipping threshold; 0 disables it.
    #[serde(default)]
    pub clip: f32,
    // GaLore / Q-GaLore (algorithm-spec §1.2–1.6, §2)
    #[serde(default = "default_rank")]
    pub rank: usize,
    #[serde(default = "default_gap")]
    pub update_gap: u64,
    #[serde(default = "default_scale")]
    pub galore_scale: f32,
    /// 8: INT8 projected weights (Q-GaLore); 16: float weights.
    #[serde(default = "default_wbits")]
    pub weight_bits: u8,
    #[serde(default = "default_group")]
    pub weight_group_size: usize,
    /// 4 (packed INT4), 8, 16 (bf16) or 32 (f32) projector storage.
    #[serde(default = "default_pbits")]
    pub proj_bits: u8,
    #[serde(default = "default_group")]
    pub proj_group_size: usize,
    #[serde(default = "yes")]
    pub stochastic_round: bool,
    #[serde(default)]
    pub lazy: bool,
    #[serde(default = "default_cos")]
    pub cos_threshold: f32,
    #[serde(default = "default_queue")]
    pub queue_size: usize,
    #[serde(default = "default_gamma")]
    pub gamma: u64,
    /// "svd" | "eigh" | "randomized"
    #[serde(default = "default_refresh")]
    pub proj_refresh: String,
    /// "signed" (reference: signed top-1 cosine) | "abs" (sign-invariant)
    #[serde(default = "default_cos_mode")]
    pub cos_mode: String,
    /// "zero" (range includes 0, our default) | "reference" (min–max only)
    #[serde(default = "default_qrange")]
    pub quant_range: String,
    /// bnb block size for 8-bit states (2048 in bnb 0.43.1, 256 in later versions).
    #[serde(default = "default_block")]
    pub block_size: usize,
    /// Optimizer steps inside the backward pass (per-layer updates, §1.5).
    #[serde(default)]
    pub fused: bool,
}

fn yes() -> bool {
    true
}
fn default_rank() -> usize {
    128
}
fn default_gap() -> u64 {
    200
}
fn default_scale() -> f32 {
    0.25
}
fn default_wbits() -> u8 {
    16
}
fn default_pbits() -> u8 {
    16
}
fn default_group() -> usize {
    256
}
fn default_cos() -> f32 {
    0.4
}
fn default_queue() -> usize {
    5
}
fn default_gamma() -> u64 {
    2
}
fn default_refresh() -> String {
    "eigh".into()
}
fn default_cos_mode() -> String {
    "signed".into()
}
fn default_qrange() -> String {
    "zero".into()
}
fn default_block() -> usize {
    2048
}

impl OptimConfig {
    pub fn projected(&self) -> bool {
        matches!(self.name.as_str(), "galore" | "galore8bit" | "qgalore")
    }
    /// bnb-style Adam (8-bit states ≥ 4096 elements) for the non-projected tensors.
    pub fn eight_bit(&self) -> bool {
        matches!(self.name.as_str(), "adam8bit" | "galore8bit" | "qgalore")
    }
    pub fn refresh(&self) -> crate::backend::Refresh {
        match self.proj_refresh.as_str() {
            "svd" => crate::backend::Refresh::Svd,
            "randomized" => crate::backend::Refresh::Randomized,
            _ => crate::backend::Refresh::Eigh,
        }
    }
    pub fn range(&self) -> crate::quant::Range {
        if self.quant_range == "reference" {
            crate::quant::Range::Reference
        } else {
            crate::quant::Range::WithZero
        }
    }
}

fn default_b1() -> f32 {
    0.9
}
fn default_b2() -> f32 {
    0.999
}
fn default_adam_eps() -> f32 {
    1e-8
}

/// Everything the engine needs to build a trainable model.
#[derive(Clone, Debug, Deserialize)]
pub struct EngineConfig {
    pub model: ModelConfig,
    pub batch_size: usize,
    pub seq_len: usize,
    pub optimizer: OptimConfig,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_device")]
    pub device: String,
    /// Worker threads for this engine; 0 means all cores.
    #[serde(default)]
    pub threads: usize,
    /// Micro-batches per optimizer step (every `train_step` must pass this many).
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Activation and GEMM precision: `fp32`, `bf16` (CUDA only: bf16 activations and
    /// bf16 GEMM inputs with fp32 accumulation) or `auto` (bf16 on a GPU, fp32 on the CPU).
    #[serde(default = "default_precision")]
    pub precision: String,
    /// Activation checkpointing: keep only each block's input and recompute the block's
    /// forward in the backward (one extra forward per step; the gradients are identical).
    #[serde(default)]
    pub checkpointing: bool,
}

fn default_precision() -> String {
    "auto".into()
}

fn one() -> usize {
    1
}

fn default_device() -> String {
    "cpu".into()
}

impl EngineConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: EngineConfig = serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("engine config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        ensure!(self.batch_size > 0, "batch_size = 0: must be ≥ 1");
        ensure!(self.seq_len > 0, "seq_len = 0: must be ≥ 1");
        ensure!(
            self.seq_len <= self.model.max_position_embeddings,
            "seq_len = {}: must be ≤ the model's max_position_embeddings = {}",
            self.seq_len,
            self.model.max_position_embeddings
        );
        let o = &self.optimizer;
        ensure!(
            (0.0..1.0).contains(&o.beta1),
            "beta1 = {}: must be in [0, 1)",
            o.beta1
        );
        ensure!(
            (0.0..1.0).contains(&o.beta2),
            "beta2 = {}: must be in [0, 1)",
            o.beta2
        );
        ensure!(o.eps > 0.0, "eps = {}: must be > 0", o.eps);
        ensure!(
            o.weight_decay >= 0.0,
            "weight_decay = {}: must be ≥ 0",
            o.weight_decay
        );
        ensure!(o.clip >= 0.0, "clip = {}: must be ≥ 0 (0 disables clipping)", o.clip);
        ensure!(self.grad_accum >= 1, "grad_accum = 0: must be ≥ 1");
        let names = ["adamw", "adam8bit", "galore", "galore8bit", "qgalore"];
        ensure!(
            names.contains(&o.name.as_str()),
            "optimizer = {}: must be one of {}",
            o.name,
            names.join(", ")
        );
        ensure!(o.rank >= 1, "rank = {}: must be ≥ 1", o.rank);
        ensure!(o.update_gap >= 1, "update_gap = {}: must be ≥ 1", o.update_gap);
        ensure!(o.galore_scale > 0.0, "galore_scale = {}: must be > 0", o.galore_scale);
        ensure!(matches!(o.weight_bits, 8 | 16), "weight_bits = {}: must be 8 or 16", o.weight_bits);
        ensure!(matches!(o.proj_bits, 4 | 8 | 16 | 32), "proj_bits = {}: must be 4, 8, 16 or 32", o.proj_bits);
        ensure!(o.weight_bits == 16 || o.name == "qgalore", "weight_bits = 8: only qgalore keeps INT8 weights");
        for (name, g) in [("weight_group_size", o.weight_group_size), ("proj_group_size", o.proj_group_size)] {
            ensure!((2..=1024).contains(&g) && g % 2 == 0, "{name} = {g}: must be an even number in [2, 1024]");
        }
        ensure!(o.queue_size >= 1, "queue_size = {}: must be ≥ 1", o.queue_size);
        ensure!(o.gamma >= 1, "gamma = {}: must be ≥ 1", o.gamma);
        ensure!(
            matches!(o.proj_refresh.as_str(), "svd" | "eigh" | "randomized"),
            "proj_refresh = {}: must be svd, eigh or randomized",
            o.proj_refresh
        );
        ensure!(matches!(o.cos_mode.as_str(), "signed" | "abs"), "cos_mode = {}: must be signed or abs", o.cos_mode);
        ensure!(
            matches!(o.quant_range.as_str(), "zero" | "reference"),
            "quant_range = {}: must be zero or reference",
            o.quant_range
        );
        ensure!(matches!(o.block_size, 256 | 2048), "block_size = {}: must be 256 or 2048", o.block_size);
        ensure!(
            self.device == "cpu" || self.device == "auto" || self.device == "cuda",
            "device = {}: must be cpu, cuda or auto",
            self.device
        );
        ensure!(
            matches!(self.precision.as_str(), "auto" | "fp32" | "bf16"),
            "precision = {}: must be auto, fp32 or bf16",
            self.precision
        );
        ensure!(
            !(self.device == "cpu" && self.precision == "bf16"),
            "precision = bf16 needs a GPU (--device cuda or auto); the CPU engine computes in fp32"
        );
        Ok(())
    }
}
