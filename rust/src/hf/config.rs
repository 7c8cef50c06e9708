//! The `config.json` of an exported model, as `transformers.LlamaConfig` reads it.

use crate::config::ModelConfig;
use crate::model::llama::layout;
use serde_json::{Map, Value};

/// A complete Hugging Face config for `cfg`: the architecture keys `LlamaForCausalLM`
/// needs (SiLU MLP, no biases), every `ModelConfig` field, and the derived ones
/// (`head_dim`, `num_key_value_heads`, `tie_word_embeddings`) written out so that no
/// `transformers` default decides them.
pub fn hf_config_of(cfg: &ModelConfig) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
    m.insert("model_type".into(), "llama".into());
    m.insert("hidden_act".into(), "silu".into());
    m.insert("attention_bias".into(), false.into());
    m.insert("mlp_bias".into(), false.into());
    m.insert("attention_dropout".into(), 0.0.into());
    for (k, v) in cfg.to_map() {
        m.insert(k, v);
    }
    m.entry("num_key_value_heads").or_insert_with(|| cfg.kv_heads().into());
    m.entry("head_dim").or_insert_with(|| cfg.head_dim().into());
    // the layout omits lm_head exactly when the embedding serves as the head
    let tied = !layout(cfg).iter().any(|(n, ..)| n == "lm_head.weight");
    m.entry("tie_word_embeddings").or_insert_with(|| tied.into());
    m
}
