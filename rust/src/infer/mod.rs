//! Looking at a model: the engine's forward pass as logits (`Engine::logits`, the same
//! numerics as training, so scoring them gives the training loss) and text generation
//! with a key/value cache (`Engine::generate`, a host-side decoder over the engine's
//! weights: `decoder`, `sample`, `generate`).

pub mod decoder;
pub mod generate;
pub mod sample;

pub use decoder::{Cache, HostModel};
pub use generate::{Generated, Request, Stop};
pub use sample::{argmax, sample, Sampling};

use crate::backend::Backend;
use crate::ensure;
use crate::error::{Error, Result};
use crate::model::pass;
use crate::train::Engine;
use std::time::Instant;

impl<B: Backend> Engine<B> {
    /// Logits of `batch × seq` input ids (batch and seq must be the engine's) into `out`
    /// (batch × seq × vocab, row-major), computed by the training forward on the engine's
    /// activation buffers.
    pub fn logits(&mut self, tokens: &[i32], batch: usize, seq: usize, out: &mut [f32]) -> Result<()> {
        let (b, t, v) = (self.cfg.batch_size, self.cfg.seq_len, self.cfg.model.vocab_size);
        ensure!(
            batch == b && seq == t,
            "logits: batch {batch} × seq {seq} differs from this engine's batch_size {b} × seq_len {t}"
        );
        ensure!(tokens.len() == b * t, "logits: got {} token ids, expected batch {b} × seq {t} = {}", tokens.len(), b * t);
        if let Some(bad) = tokens.iter().find(|&&x| x < 0 || x as usize >= v) {
            return Err(Error::invalid(format!("logits: token id {bad} is outside the vocabulary [0, {v})")));
        }
        let n = b * t * v;
        ensure!(out.len() >= n, "logits: the output holds {} values, batch {b} × seq {t} × vocab {v} = {n} are needed", out.len());
        // `load_tokens` takes windows of inputs and targets; the targets are not used here.
        let mut windows = Vec::with_capacity(b * (t + 1));
        for row in tokens.chunks(t) {
            windows.extend_from_slice(row);
            windows.push(0);
        }
        self.acts.set_len(&self.be, t)?;
        self.acts.load_tokens(&windows, None);
        pass::forward(&self.be, &self.model, &mut self.acts);
        self.be.download(&self.acts.logits, &mut out[..n])?;
        self.be.sync()
    }

    /// Generates new tokens after `req.prompt` (see `generate::run`); it stops at
    /// max_position_embeddings whatever `max_new_tokens` asks, and the key/value cache
    /// grows with the tokens produced.
    ///
    /// Limitation: the weights are read to the host as f32 on every call. CPU float
    /// weights are borrowed, but INT8 weights and GPU buffers are copied: a second, full
    /// f32 copy of the model (4 bytes per parameter) for the call's duration, and the time
    /// to make it (`load_seconds`).
    pub fn generate(&mut self, req: &Request) -> Result<Generated> {
        req.check(&self.cfg.model)?;
        let t0 = Instant::now();
        let model = HostModel::read(&self.be, &self.model, &mut self.acts.wq)?;
        let load = t0.elapsed().as_secs_f64();
        let mut g = generate::run(&model, req)?;
        g.load_seconds = load;
        Ok(g)
    }
}
