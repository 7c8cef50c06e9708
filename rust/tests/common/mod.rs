//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod mpi;

use qgalore::config::{Device, EngineConfig, ModelConfig, OptimConfig, Precision};

pub fn tiny_model(vocab: usize, hidden: usize, inter: usize, heads: usize, kv: usize, layers: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv),
        num_hidden_layers: layers,
        max_position_embeddings: 512,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-6,
        initializer_range: 0.02,
        rope_scaling: None,
        tie_word_embeddings: false,
    }
}

pub fn adamw(clip: f32) -> OptimConfig {
    optim("adamw", clip)
}

/// An optimizer config with the engine's defaults (as JSON would give them), except the
/// settings these tests were written against: β2 0.999, ε 1e-8, float weights and bf16
/// projectors, no lazy refresh, global (not fused) steps.
pub fn optim(name: &str, clip: f32) -> OptimConfig {
    let mut o: OptimConfig = serde_json::from_str(&format!("{{\"name\":\"{name}\",\"clip\":{clip}}}")).unwrap();
    (o.beta2, o.eps, o.weight_bits, o.proj_bits, o.lazy, o.fused) = (0.999, 1e-8, 16, 16, false, false);
    o
}

pub fn engine_cfg(model: ModelConfig, b: usize, t: usize, seed: u64) -> EngineConfig {
    EngineConfig { model, batch_size: b, seq_len: t, optimizer: adamw(0.0), seed, device: Device::Cpu, threads: 2, grad_accum: 1, precision: Precision::Auto, checkpointing: false }
}

/// Deterministic pseudo-random token windows: `rows` × (t + 1) ids below `vocab`.
pub fn tokens(rows: usize, t: usize, vocab: usize, seed: u64) -> Vec<i32> {
    (0..rows * (t + 1)).map(|i| (qgalore::rng::bits32(seed, i as u64) % vocab as u32) as i32).collect()
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n).map(|i| 2.0 * qgalore::rng::uniform(seed, i as u64) - 1.0).collect()
}

/// Compares an analytic gradient with central finite differences of `f` at the sampled
/// indices: cosine similarity and relative error of the sampled vectors.
pub fn grad_check(name: &str, analytic: &[f32], x: &mut [f32], eps: f32, samples: usize, mut f: impl FnMut(&[f32]) -> f64) {
    let n = x.len();
    let step = (n / samples.max(1)).max(1);
    let (mut dot, mut na, mut nn, mut diff) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut i = 0;
    while i < n {
        let orig = x[i];
        x[i] = orig + eps;
        let lp = f(x);
        x[i] = orig - eps;
        let lm = f(x);
        x[i] = orig;
        let num = (lp - lm) / (2.0 * eps as f64);
        let a = analytic[i] as f64;
        dot += a * num;
        na += a * a;
        nn += num * num;
        diff += (a - num) * (a - num);
        i += step;
    }
    assert!(na > 0.0 && nn > 0.0, "{name}: zero gradient (analytic {na}, numeric {nn})");
    let cos = dot / (na.sqrt() * nn.sqrt());
    let rel = diff.sqrt() / nn.sqrt();
    assert!(cos > 0.9999 && rel < 1e-2, "{name}: cosine {cos}, relative error {rel}");
}
