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
        ensure!(
            self.device == "cpu" || self.device == "auto" || self.device == "cuda",
            "device = {}: must be cpu, cuda or auto",
            self.device
        );
        Ok(())
    }
}
