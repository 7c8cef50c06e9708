//! PEFT adapter folders into and out of a LoRA / QLoRA engine (`hf::peft` reads and writes
//! the files; this file moves their tensors in and out of the engine's adapter parameters).
//!
//! Design: the engine's adapter settings (optimizer options `lora_rank`, `lora_alpha`,
//! `lora_targets`, `lora_rslora`) decide its parameters when it is built, so an adapter is
//! loaded into an engine built with the adapter's settings: `load_adapter` refuses one whose
//! r, lora_alpha, target modules or use_rslora differ (one line naming the first difference
//! and the settings the adapter needs). Front ends that open a model "with an adapter" build
//! the engine from `peft::read_config` (`qg_adapter_config`) so the two agree by
//! construction; a user who also gives the options explicitly must give the adapter's.
//! `lora_dropout` is a training setting only and may differ (the engine keeps its own).
//!
//! `save_adapter` writes the engine's adapters with PEFT's names, config fields and the
//! engine's settings; `base_model_name_or_path` is what the caller says the base is (the
//! Hugging Face folder the engine was loaded from).

use super::engine::Dtype;
use super::peft::{self, Adapter, AdapterConfig, WriteOptions};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::lora::AdapterSpec;
use crate::model::Targets;
use crate::train::Engine;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// What `qg_save_adapter` takes: `{"dir": "...", "dtype"?: "f32" | "bf16", "base_model"?:
/// "path" | null, "overwrite"?: false}`.
#[derive(Clone, Debug)]
pub struct SaveAdapterOptions {
    pub dir: PathBuf,
    /// Element type of the adapter tensors (PEFT saves the model's dtype; f32 by default).
    pub dtype: Dtype,
    /// `base_model_name_or_path` of the config (the model folder), or null.
    pub base_model: Option<String>,
    /// Replace adapter files already in `dir` (never other files).
    pub overwrite: bool,
}

impl SaveAdapterOptions {
    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |m: String| Error::invalid(format!("adapter save options: {m}"));
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let o = v.as_object().ok_or_else(|| bad("must be a JSON object".into()))?;
        for k in o.keys() {
            if !matches!(k.as_str(), "dir" | "dtype" | "base_model" | "overwrite") {
                return Err(bad(format!("unknown key {k} (dir, dtype, base_model, overwrite)")));
            }
        }
        let dir = o.get("dir").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or_else(|| bad("`dir` must be a folder path".into()))?;
        let dtype = match o.get("dtype") {
            None | Some(Value::Null) => Dtype::F32,
            Some(Value::String(s)) if s == "f32" || s == "float32" => Dtype::F32,
            Some(Value::String(s)) if s == "bf16" || s == "bfloat16" => Dtype::Bf16,
            Some(x) => return Err(bad(format!("dtype = {x}: must be one of f32, bf16"))),
        };
        let base_model = match o.get("base_model") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(x) => return Err(bad(format!("base_model = {x}: must be a path or null"))),
        };
        let overwrite = match o.get("overwrite") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(x) => return Err(bad(format!("overwrite = {x}: must be true or false"))),
        };
        Ok(SaveAdapterOptions { dir: PathBuf::from(dir), dtype, base_model, overwrite })
    }
}

/// The engine option that a config field corresponds to, for messages.
fn settings_text(c: &AdapterConfig) -> String {
    format!(
        "lora_rank {}, lora_alpha {}, lora_targets {}, lora_rslora {}",
        c.r,
        short(c.lora_alpha),
        c.target_modules.join(","),
        c.use_rslora
    )
}

/// A float as its shortest text (`0.1`, `16`).
fn short(x: f64) -> String {
    let s = format!("{x}");
    s.strip_suffix(".0").map_or(s.clone(), str::to_string)
}

/// An f32 setting as the f64 its shortest decimal text means (0.1f32 → 0.1, not 0.100000001…).
fn decimal(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(x as f64)
}

/// The first way an adapter's config differs from the engine's adapter settings, as a
/// message naming the config field and the engine option.
fn mismatch(spec: &AdapterSpec, c: &AdapterConfig) -> Option<String> {
    if c.r != spec.rank {
        return Some(format!("r = {} but this engine's lora_rank is {}", c.r, spec.rank));
    }
    if c.lora_alpha as f32 != spec.alpha {
        return Some(format!("lora_alpha = {} but this engine's lora_alpha is {}", short(c.lora_alpha), spec.alpha));
    }
    if c.use_rslora != spec.rslora {
        return Some(format!("use_rslora = {} but this engine's lora_rslora is {}", c.use_rslora, spec.rslora));
    }
    let targets = Targets::parse(&c.target_modules.join(","));
    if targets != Some(spec.targets) {
        return Some(format!("target_modules = {} but this engine's lora_targets is {}", c.target_modules.join(","), spec.targets.text()));
    }
    None
}

impl<B: Backend> Engine<B> {
    /// The engine's adapters as a PEFT adapter (config from the engine's settings,
    /// `base_model_name_or_path` = `base`).
    pub fn peft_adapter(&self, base: Option<String>) -> Result<Adapter> {
        let spec = self.adapters().ok_or_else(|| no_adapters(&self.cfg.optimizer.name))?;
        let config = AdapterConfig {
            r: spec.rank,
            lora_alpha: decimal(spec.alpha),
            lora_dropout: decimal(spec.dropout),
            target_modules: spec.targets.names().into_iter().map(String::from).collect(),
            use_rslora: spec.rslora,
            base_model_name_or_path: base,
        };
        // adapter_tensors lists A then B of each adapted module, in model order
        let mut tensors = Vec::new();
        let mut it = self.adapter_tensors()?.into_iter();
        while let (Some((na, sa, va)), Some((nb, sb, vb))) = (it.next(), it.next()) {
            let path = na.strip_suffix(".lora_A.weight").ok_or_else(|| Error::backend(format!("adapter tensor {na}: expected a lora_A")))?;
            crate::ensure!(nb.strip_suffix(".lora_B.weight") == Some(path), "adapter tensor {nb}: expected {path}.lora_B.weight");
            tensors.push((path.to_string(), (sa, va), (sb, vb)));
        }
        Ok(Adapter { config, tensors })
    }

    /// Writes the engine's adapters as a PEFT adapter folder (`peft::write_with`).
    pub fn save_adapter(&self, o: &SaveAdapterOptions) -> Result<()> {
        self.usable()?;
        let a = self.peft_adapter(o.base_model.clone())?;
        peft::write_with(&o.dir, &a, &WriteOptions { dtype: o.dtype, overwrite: o.overwrite })
    }

    /// Loads a PEFT adapter folder into this new lora/qlora engine's adapters (the base
    /// stays as it is). The folder is read and checked whole first (`peft::read`: files,
    /// config, names, shapes for this model, values) and its settings against the engine's;
    /// a refused load changes nothing.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        self.usable()?;
        let spec = self.adapters().ok_or_else(|| no_adapters(&self.cfg.optimizer.name))?;
        let steps = self.opt.steps();
        crate::ensure!(
            steps == 0,
            "{}: this engine has already run {steps} optimizer steps; load an adapter into a new engine (its optimizer state would not match it)",
            dir.display()
        );
        let a = peft::read(dir, &self.cfg.model)?;
        if let Some(m) = mismatch(&spec, &a.config) {
            return Err(Error::invalid(format!(
                "{}: {} {m}; build the engine with the adapter's settings ({})",
                dir.display(),
                peft::CONFIG_FILE,
                settings_text(&a.config)
            )));
        }
        // same rank and targets on the same model: the engine has exactly these tensors
        let have = self.adapter_tensors()?;
        crate::ensure!(have.len() == 2 * a.tensors.len(), "{}: {} adapter tensors for the engine's {}", dir.display(), 2 * a.tensors.len(), have.len());
        for (path, (_, va), (_, vb)) in &a.tensors {
            self.set_adapter_tensor(&format!("{path}.lora_A.weight"), va)?;
            self.set_adapter_tensor(&format!("{path}.lora_B.weight"), vb)?;
        }
        self.be.sync()
    }
}

fn no_adapters(opt: &crate::config::Optimizer) -> Error {
    use crate::config::Named;
    Error::invalid(format!(
        "a PEFT adapter needs an adapter engine (optimizer lora or qlora); this engine's optimizer is {}",
        opt.name()
    ))
}

/// The engine-independent face of adapter loading and saving, for the C ABI's `dyn Session`.
pub trait AdapterSession {
    fn load_adapter(&mut self, dir: &Path) -> Result<()>;
    fn save_adapter(&mut self, o: &SaveAdapterOptions) -> Result<()>;
}

impl<B: Backend> AdapterSession for Engine<B> {
    fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let (runner, me) = (self.be.runner(), &mut *self);
        runner.run(move || Engine::load_adapter(me, dir))
    }
    fn save_adapter(&mut self, o: &SaveAdapterOptions) -> Result<()> {
        let (runner, me) = (self.be.runner(), &mut *self);
        runner.run(move || Engine::save_adapter(me, o))
    }
}

/// `peft::read_config` as JSON for front ends that build an engine for an adapter: `{"r",
/// "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "base_model_name_or_path",
/// "error"}` (`error`: null, or the one-line problem).
pub fn config_json(dir: &Path) -> String {
    match peft::read_config(dir) {
        Ok(c) => serde_json::json!({
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout,
            "target_modules": c.target_modules,
            "use_rslora": c.use_rslora,
            "base_model_name_or_path": c.base_model_name_or_path,
            "error": null,
        }),
        Err(e) => serde_json::json!({ "error": e.msg }),
    }
    .to_string()
}
