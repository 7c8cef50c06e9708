//! An engine's state in and out of a checkpoint (the format is described in `super`).
//! The model's weights come first, under their engine names, then the optimizer's
//! tensors (`Optimizer::describe`), which depend on its scalars: the same description
//! plans the header, writes the data, and tells a load which tensors a checkpoint's
//! scalars imply.

use super::meta::{self, EngineState};
use super::read::{self, In, Source};
use super::tensors::{matrix, Entry};
use super::write::{self, Out, Target};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Weight;
use crate::train::Engine;
use std::path::Path;

/// How much of the stored engine config must equal the live engine's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Every trajectory-relevant field (`meta::check_config`): the run continues.
    Resume,
    /// Model and optimizer only: the engine uses the state without continuing the run.
    Weights,
}

impl<B: Backend> Engine<B> {
    /// The `state` metadata of this engine now.
    fn state(&self) -> Result<EngineState> {
        let base = match self.model.lora {
            Some(_) => Some(self.base_fingerprint()?),
            None => None,
        };
        Ok(EngineState { optimizer: self.opt.name().into(), step: self.opt.steps(), precision: self.be.precision().into(), optim: self.opt.scalars(), base })
    }

    /// Every tensor, in data order: the weights, then the optimizer's tensors as
    /// `optim` (scalars: this engine's own, or a checkpoint's being checked) implies them.
    fn describe(&self, optim: &serde_json::Value, out: &mut Out) -> Result<()> {
        let be = &self.be;
        let quant = crate::plan::linear_quant(&self.cfg.optimizer);
        // a LoRA model's frozen base is not stored (its fingerprint is): only the adapters
        for (_, p) in self.model.params.iter().enumerate().filter(|(i, _)| self.model.trainable(*i)) {
            let shape = matrix(p.rows, p.cols);
            match &p.data {
                Weight::F(b) => out.buf(be, p.name.clone(), shape, b, p.numel())?,
                Weight::Q(q) => {
                    let l = quant.as_ref().ok_or_else(|| Error::backend("internal: INT8 weights without a quantization config"))?;
                    out.q(be, &p.name, shape, (l.bits, l.group, p.numel()), || Ok(q))?
                }
                Weight::N(..) => return Err(Error::backend("internal: an NF4 weight is frozen and never stored")),
            }
        }
        self.opt.describe(be, &self.model.params, optim, out)
    }

    /// The tensors a checkpoint with state `st` must hold for this engine (checks the
    /// optimizer scalars' ranges on the way).
    fn expected(&self, st: &EngineState) -> Result<Vec<Entry>> {
        let mut plan = Out::plan();
        self.describe(&st.optim, &mut plan)?;
        Ok(plan.into_entries())
    }

    /// Writes a checkpoint into `w`; `run`: the front end's JSON text, stored verbatim.
    pub fn save_to(&self, w: &mut dyn Target, run: Option<&str>) -> Result<()> {
        self.usable()?;
        if let Some(r) = run {
            meta::check_run(r)?;
        }
        let st = self.state()?;
        let entries = self.expected(&st)?;
        let state = serde_json::to_string(&st).map_err(|e| Error::backend(format!("checkpoint state: {e}")))?;
        let mut meta = vec![
            ("format", super::FORMAT.to_string()),
            ("format_version", super::FORMAT_VERSION.to_string()),
            ("engine_config", meta::config_json(&self.cfg).to_string()),
            ("state", state),
        ];
        if let Some(r) = run {
            meta.push(("run", r.to_string()));
        }
        write::write(w, &meta, &entries, |out| self.describe(&st.optim, out))?;
        self.be.sync()
    }

    /// The checkpoint as bytes in memory (tests, fuzzing).
    pub fn save_state(&self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.save_to(&mut v, None)?;
        Ok(v)
    }

    /// Writes a checkpoint file atomically and durably (`file::write_atomic`).
    pub fn save_file(&self, path: &Path, run: Option<&str>) -> Result<()> {
        self.usable()?;
        super::file::write_atomic(path, |f| {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            self.save_to(&mut w, run)?;
            std::io::Write::flush(&mut w).map_err(|e| Error::invalid(format!("cannot write checkpoint: {e}")))
        })
    }

    /// Restores a checkpoint from `src`. Everything is checked first — header, engine
    /// config, scalars, the tensor list, then checksum and values — and a refusal changes
    /// nothing.
    /// Only a read failure or a file that changes during the final pass can leave the
    /// engine half-loaded; it then refuses all work until a load succeeds.
    pub fn load_from(&mut self, src: &dyn Source) -> Result<()> {
        self.load_checked(src, Check::Resume)
    }

    /// `load_from` for an engine that will not continue the run (inference, evaluation):
    /// only the model and optimizer config must match (`Check::Weights`).
    pub fn load_weights_from(&mut self, src: &dyn Source) -> Result<()> {
        self.load_checked(src, Check::Weights)
    }

    fn load_checked(&mut self, src: &dyn Source, check: Check) -> Result<()> {
        // every message is one bounded line, whatever names the file holds
        self.load_inner(src, check).map_err(|e| Error { code: e.code, msg: super::tensors::printable(&e.msg, 2000) })
    }

    fn load_inner(&mut self, src: &dyn Source, check: Check) -> Result<()> {
        let p = read::parse(src)?;
        // the header against this engine first: a file whose tensors this engine would not
        // hold is refused before its payload is read, so the read below is bounded by the
        // engine's own state size (not by what a crafted, sparse file claims)
        let st = EngineState::parse(&p.state)?;
        if st.optimizer != self.opt.name() {
            return Err(Error::invalid(format!("checkpoint is for optimizer {}, this engine uses {}", super::tensors::shown(&st.optimizer), self.opt.name())));
        }
        meta::check_config(&p.engine_config, &self.cfg, &st.precision, self.be.precision(), check == Check::Resume)?;
        if self.model.lora.is_some() {
            let mine = self.base_fingerprint()?;
            match &st.base {
                Some(b) if *b == mine => {}
                Some(b) => {
                    return Err(Error::invalid(format!(
                        "checkpoint's adapters were trained on another base model (fingerprint {}, this engine's base is {mine}); load the base it was trained on",
                        super::tensors::shown(b)
                    )))
                }
                None => return Err(Error::invalid("checkpoint has no base fingerprint; it is not a lora/qlora checkpoint")),
            }
        }
        read::match_layout(&p, &self.expected(&st)?)?;
        read::verify(src, &p)?;
        // nothing above touched the engine; from here on it is overwritten
        let r = In::new(src, &p).and_then(|mut inp| {
            self.apply(&st, &mut inp)?;
            inp.finish()
        });
        match r {
            Ok(()) => {
                self.poisoned = None;
                self.be.sync()
            }
            Err(e) => {
                self.poisoned = Some(format!("the last checkpoint load failed part-way ({}); load a good checkpoint before going on", e.msg));
                Err(e)
            }
        }
    }

    fn apply(&mut self, st: &EngineState, inp: &mut In) -> Result<()> {
        let be = &self.be;
        let frozen = self.model.lora.is_some();
        for p in self.model.params.iter_mut().filter(|p| !frozen || p.role.adapter()) {
            let n = p.numel();
            match &mut p.data {
                Weight::F(b) => inp.buf(be, &p.name, b, n)?,
                Weight::Q(q) => inp.q(be, &p.name, q)?,
                Weight::N(..) => return Err(Error::backend("internal: an NF4 weight is frozen and never loaded")),
            }
        }
        self.opt.load(be, &self.model.params, &st.optim, inp)
    }

    /// `load_from` a checkpoint in memory.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        self.load_from(&super::Mem(bytes))
    }

    /// `load_weights_from` a checkpoint in memory.
    pub fn load_state_weights(&mut self, bytes: &[u8]) -> Result<()> {
        self.load_weights_from(&super::Mem(bytes))
    }

    /// Loads a checkpoint file (a regular file, opened without blocking); messages name
    /// the file.
    pub fn load_file_checked(&mut self, path: &Path, check: Check) -> Result<()> {
        let f = super::file::open_read(path)?;
        self.load_checked(&f, check).map_err(|e| super::file::at_path(path, e))
    }

    /// `load_from` a checkpoint file.
    pub fn load_file(&mut self, path: &Path) -> Result<()> {
        self.load_file_checked(path, Check::Resume)
    }

    /// Refuses work after a load that failed part-way.
    pub fn usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(Error::invalid(format!("engine state is incomplete: {why}"))),
            None => Ok(()),
        }
    }
}
