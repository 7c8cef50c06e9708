//! A generation request (`qg_generate`'s JSON), its checks, and the decoding loop.

use super::decoder::{Cache, HostModel};
use super::sample::{sample, Sampling};
use crate::config::ModelConfig;
use crate::ensure;
use crate::error::{Error, Result};
use serde::Serialize;
use serde_json::{Map, Value};
use std::time::Instant;

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub prompt: Vec<i32>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Any of these ends the generation (and is the last id returned).
    pub eos: Vec<i32>,
    /// Use the key/value cache; false recomputes the whole prefix for every new token.
    pub cache: bool,
}

/// Why the generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// An EOS id was generated (it is the last of `ids`).
    Eos,
    /// `max_new_tokens` were generated.
    Length,
    /// The sequence filled `max_position_embeddings`.
    MaxPositions,
}

/// What `qg_generate` answers.
#[derive(Clone, Debug, Serialize)]
pub struct Generated {
    /// The new ids only.
    pub ids: Vec<i32>,
    pub stop: Stop,
    /// Seconds of prefill and decoding (not reading the weights).
    pub seconds: f64,
    /// Seconds until the first new token's logits (the prompt's forward pass).
    pub prefill_seconds: f64,
    /// Seconds spent reading the weights to the host.
    pub load_seconds: f64,
}

const FIELDS: [&str; 8] = ["prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "eos", "cache"];

fn uint(o: &Map<String, Value>, key: &str, default: Option<u64>) -> Result<u64> {
    match o.get(key) {
        None => default.ok_or_else(|| Error::invalid(format!("generate: {key} is missing (an integer ≥ 0)"))),
        Some(v) => v.as_u64().ok_or_else(|| Error::invalid(format!("generate: {key} = {v}: must be an integer ≥ 0"))),
    }
}

fn ids(o: &Map<String, Value>, key: &str) -> Result<Vec<i32>> {
    let Some(v) = o.get(key) else { return Ok(vec![]) };
    let a = v.as_array().ok_or_else(|| Error::invalid(format!("generate: {key} must be an array of token ids")))?;
    a.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_u64()
                .filter(|&x| x <= i32::MAX as u64)
                .map(|x| x as i32)
                .ok_or_else(|| Error::invalid(format!("generate: {key}[{i}] = {x}: must be a token id (an integer ≥ 0)")))
        })
        .collect()
}

impl Request {
    /// Parses `{ "prompt": [ids], "max_new_tokens": n, "temperature"?: 0, "top_k"?: 0,
    /// "top_p"?: 1, "seed"?: 0, "eos"?: [], "cache"?: true }`; every problem is one line
    /// naming the field.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::invalid(format!("generate: request is not JSON ({e})")))?;
        let o = v.as_object().ok_or_else(|| Error::invalid("generate: request must be a JSON object"))?;
        if let Some(k) = o.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(Error::invalid(format!("generate: unknown field {k} (known: {})", FIELDS.join(", "))));
        }
        ensure!(o.contains_key("prompt"), "generate: prompt is missing (an array of token ids)");
        let num = |key: &str, default: f64| -> Result<f64> {
            match o.get(key) {
                None => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| Error::invalid(format!("generate: {key} = {v}: must be a number"))),
            }
        };
        let temperature = num("temperature", 0.0)?;
        // (f32 is what the engine computes in; larger values would become infinity)
        ensure!(
            (0.0..=f32::MAX as f64).contains(&temperature),
            "generate: temperature = {temperature}: must be a finite number ≥ 0 (0 = greedy)"
        );
        let top_p = num("top_p", 1.0)?;
        ensure!(top_p > 0.0 && top_p <= 1.0, "generate: top_p = {top_p}: must be in (0, 1] (1 = off)");
        let top_k = match o.get("top_k") {
            None => 0,
            Some(v) => v.as_u64().ok_or_else(|| Error::invalid(format!("generate: top_k = {v}: must be an integer ≥ 0 (0 = off)")))?,
        };
        let cache = match o.get("cache") {
            None => true,
            Some(v) => v.as_bool().ok_or_else(|| Error::invalid(format!("generate: cache = {v}: must be true or false")))?,
        };
        Ok(Request {
            prompt: ids(o, "prompt")?,
            // (any count is allowed: generation also stops at max_position_embeddings)
            max_new_tokens: usize::try_from(uint(o, "max_new_tokens", None)?).unwrap_or(usize::MAX),
            sampling: Sampling { temperature: temperature as f32, top_k: top_k as usize, top_p, seed: uint(o, "seed", Some(0))? },
            eos: ids(o, "eos")?,
            cache,
        })
    }

    /// Checks the ids against the model: a non-empty prompt that fits its positions, every
    /// id inside the vocabulary.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let (v, max) = (cfg.vocab_size, cfg.max_position_embeddings);
        ensure!(!self.prompt.is_empty(), "generate: prompt is empty (give at least one token id)");
        ensure!(
            self.prompt.len() <= max,
            "generate: prompt has {} tokens, more than max_position_embeddings {max}",
            self.prompt.len()
        );
        for (key, list) in [("prompt", &self.prompt), ("eos", &self.eos)] {
            if let Some(i) = list.iter().position(|&x| x as usize >= v) {
                return Err(Error::invalid(format!("generate: {key}[{i}] = {}: outside the vocabulary [0, {v})", list[i])));
            }
        }
        Ok(())
    }
}

/// Generates from `req.prompt` with `model` (the request already checked). With the cache,
/// the prompt is one forward pass and each new token one position; without it, every new
/// token recomputes the whole sequence. The cache grows with the tokens produced, so memory
/// follows the sequence's length, not `max_new_tokens`.
pub fn run(model: &HostModel, req: &Request) -> Result<Generated> {
    let t0 = Instant::now();
    let max = model.cfg.max_position_embeddings;
    let mut seq = req.prompt.clone();
    let mut out = Vec::new();
    let mut cache = Cache::new(&model.cfg);
    let mut prefill = 0.0;
    let stop = loop {
        if out.len() >= req.max_new_tokens {
            break Stop::Length;
        }
        if seq.len() >= max {
            break Stop::MaxPositions;
        }
        let logits = if req.cache && !cache.is_empty() {
            model.forward(&mut cache, &seq[seq.len() - 1..], false)?
        } else {
            cache.clear();
            model.forward(&mut cache, &seq, false)?
        };
        if out.is_empty() {
            prefill = t0.elapsed().as_secs_f64();
        }
        let next = sample(&logits, &req.sampling, seq.len());
        seq.push(next);
        out.push(next);
        if req.eos.contains(&next) {
            break Stop::Eos;
        }
    };
    Ok(Generated { ids: out, stop, seconds: t0.elapsed().as_secs_f64(), prefill_seconds: prefill, load_seconds: 0.0 })
}
