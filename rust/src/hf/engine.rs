//! Hugging Face weights into and out of a built engine.
//!
//! Import validates the whole checkpoint first (headers, names, shapes, dtypes), so a bad
//! file changes nothing, then streams one tensor at a time from the memory-mapped files:
//! converted to f32 on the host and uploaded into the parameter, or, for INT8 linears
//! (Q-GaLore), into one scratch buffer the size of the largest linear and quantized from
//! there with the model builder's range; no float copy of the whole model ever exists.
//!
//! Export writes `config.json`, `model.safetensors` (f32, or bf16 rounded to nearest even)
//! and `generation_config.json` into a staging folder renamed into place at the end. The
//! safetensors writer pulls each tensor's bytes only when it writes that tensor (a lazy
//! `View`), dequantizing INT8 weights then, so memory stays one tensor.

use super::folder::{io_err, Staging};
use super::weights::{Checkpoint, SINGLE};
use crate::backend::{Backend, Category};
use crate::error::{Error, Result};
use crate::model::Weight;
use crate::train::Engine;
use rayon::prelude::*;
use safetensors::View;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::cell::RefCell;
use std::path::{Path, PathBuf};

/// The element type an export writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    /// bfloat16, rounded to nearest even (as `torch.Tensor.to(torch.bfloat16)` does).
    Bf16,
}

impl Dtype {
    fn st(self) -> safetensors::Dtype {
        match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::Bf16 => safetensors::Dtype::BF16,
        }
    }
    fn width(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
    /// `torch_dtype` as `transformers` writes it.
    fn torch(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::Bf16 => "bfloat16",
        }
    }
}

/// What `qg_export_hf` takes: `{"dir": "...", "dtype": "bf16"|"f32", "extra": {...},
/// "copy": ["path", ...]}`. `extra` keys go into `config.json` (bos/eos/pad token ids also
/// into `generation_config.json`); `copy` files (tokenizer files) are copied into the
/// folder before it appears.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub dir: PathBuf,
    pub dtype: Dtype,
    pub extra: Map<String, Value>,
    pub copy: Vec<PathBuf>,
}

impl ExportOptions {
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::invalid(format!("export options: {e}")))?;
        let o = v.as_object().ok_or_else(|| Error::invalid("export options: must be a JSON object"))?;
        for k in o.keys() {
            if !matches!(k.as_str(), "dir" | "dtype" | "extra" | "copy") {
                return Err(Error::invalid(format!("export options: unknown key {k} (dir, dtype, extra, copy)")));
            }
        }
        let dir = o.get("dir").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or_else(|| Error::invalid("export options: `dir` must be a folder path"))?;
        let dtype = match o.get("dtype").and_then(Value::as_str) {
            Some("f32") | Some("float32") => Dtype::F32,
            Some("bf16") | Some("bfloat16") => Dtype::Bf16,
            other => return Err(Error::invalid(format!("export options: dtype = {}: must be one of bf16, f32", other.map_or("(missing)".into(), |s| s.to_string())))),
        };
        let extra = match o.get("extra") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(x) => return Err(Error::invalid(format!("export options: extra = {x}: must be an object"))),
        };
        let copy = match o.get("copy") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(PathBuf::from).ok_or_else(|| Error::invalid(format!("export options: copy entry {x} must be a file path"))))
                .collect::<Result<_>>()?,
            Some(x) => return Err(Error::invalid(format!("export options: copy = {x}: must be a list of file paths"))),
        };
        Ok(ExportOptions { dir: PathBuf::from(dir), dtype, extra, copy })
    }
}

/// The files an export writes itself (a copied file may not take these names).
const OWN_FILES: [&str; 3] = ["config.json", SINGLE, "generation_config.json"];

/// Token ids that also belong in `generation_config.json`.
const GENERATION_KEYS: [&str; 3] = ["bos_token_id", "eos_token_id", "pad_token_id"];

impl<B: Backend> Engine<B> {
    /// Loads Hugging Face LLaMA weights (a model folder, an index file or one .safetensors
    /// file) into this engine's parameters. The optimizer state stays as built (fresh), so
    /// this is for a new engine; a checkpoint that does not match changes nothing.
    pub fn import_hf(&mut self, path: &Path) -> Result<()> {
        // a half-loaded engine's optimizer state is neither fresh nor a checkpoint's
        self.usable()?;
        let steps = self.opt.steps();
        crate::ensure!(steps == 0, "{}: this engine has already run {steps} optimizer steps; import Hugging Face weights into a new engine (its optimizer state would not match them)", path.display());
        let ck = Checkpoint::open(path)?;
        let layout = ck.match_layout(&self.cfg.model)?;
        for p in self.model.params.iter().filter(|p| !p.role.adapter()) {
            // the engine's parameters are the layout's (an engine bug otherwise)
            if !layout.iter().any(|m| m.name == p.name && m.rows * m.cols == p.numel()) {
                return Err(Error::invalid(format!("{}: the engine's parameter {} is not in the layout", ck.label(), p.name)));
            }
        }
        let quant = crate::plan::linear_quant(&self.cfg.optimizer);
        let be = &self.be;
        let biggest = self.model.params.iter().filter(|p| matches!(p.data, Weight::Q(_))).map(|p| p.numel()).max();
        // f32 under every precision (an Activations buffer would be bf16 on a bf16 GPU and
        // round the weights before they are quantized), as the model builder's own buffer
        let mut scratch = match biggest {
            Some(n) => Some(be.alloc(n, Category::Weights)?),
            None => None,
        };
        be.runner().run(|| -> Result<()> {
            // adapters are not in a base checkpoint: they keep their initialisation
            let names: Vec<String> = self.model.params.iter().filter(|p| !p.role.adapter()).map(|p| p.name.clone()).collect();
            if let Some(first) = names.first() {
                ck.prefetch(first);
            }
            for (i, p) in self.model.params.iter_mut().filter(|p| !p.role.adapter()).enumerate() {
                if let Some(next) = names.get(i + 1) {
                    ck.prefetch(next);
                }
                let n = p.numel();
                match &mut p.data {
                    Weight::F(b) => be.from_host(b, n, |h| ck.read_f32(&p.name, h))?,
                    Weight::Q(q) => {
                        let s = scratch.as_mut().expect("scratch for quantized weights");
                        be.from_host(s, n, |h| ck.read_f32(&p.name, h))?;
                        let range = quant.map(|q| q.range).ok_or_else(|| Error::invalid(format!("{} is quantized but the optimizer keeps float weights", p.name)))?;
                        be.q_quantize(q, s, range);
                    }
                    Weight::N(t) => {
                        // QLoRA: the base is quantized to NF4 as it loads (bnb's Linear4bit)
                        let mut h = vec![0.0f32; n];
                        ck.read_f32(&p.name, &mut h)?;
                        let q = crate::quant::nf4::Nf4Tensor::quantize(&h).map_err(|e| Error::invalid(format!("{}: {}", p.name, e.msg)))?;
                        *t = be.nf4_new(q, Category::Weights)?;
                    }
                }
                ck.release(&p.name);
            }
            Ok(())
        })?;
        be.sync()
    }

    /// Writes the model as a Hugging Face folder (`config.json`, `model.safetensors`,
    /// `generation_config.json`); `extra` keys (bos_token_id, eos_token_id, …) go into the
    /// configs. See `export_hf_with`.
    pub fn export_hf(&self, dir: &Path, dtype: Dtype, extra: &Map<String, Value>) -> Result<()> {
        self.export_hf_with(&ExportOptions { dir: dir.to_path_buf(), dtype, extra: extra.clone(), copy: Vec::new() })
    }

    /// `export_hf` with files to copy into the folder (tokenizer files). The folder must not
    /// exist or be empty; it appears complete or not at all.
    pub fn export_hf_with(&self, o: &ExportOptions) -> Result<()> {
        // never export the weights of a load that failed part-way
        self.usable()?;
        let mut names: Vec<String> = Vec::new();
        for src in &o.copy {
            let name = src.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            // existence is checked by the copy itself (after the weights are written; a
            // failure then removes the staging folder like any other)
            if name.is_empty() {
                return Err(Error::invalid(format!("{}: not a file to copy into the export", src.display())));
            }
            if OWN_FILES.contains(&name.as_str()) || names.contains(&name) {
                return Err(Error::invalid(format!("{}: the export already has a file named {name}", src.display())));
            }
            names.push(name);
        }
        let mut config = self.cfg.model.hf_config();
        config.insert("torch_dtype".into(), o.dtype.torch().into());
        config.insert("dtype".into(), o.dtype.torch().into());
        for (k, v) in &o.extra {
            match config.get(k) {
                Some(old) if old != v && !matches!(k.as_str(), "torch_dtype" | "dtype") => {
                    return Err(Error::invalid(format!("export extra key {k} = {v} disagrees with the model's config ({old})")));
                }
                _ => {
                    config.insert(k.clone(), v.clone());
                }
            }
        }
        let mut generation = Map::new();
        generation.insert("_from_model_config".into(), true.into());
        for k in GENERATION_KEYS {
            if let Some(v) = o.extra.get(k) {
                generation.insert(k.into(), v.clone());
            }
        }

        let stage = Staging::new(&o.dir)?;
        let json = |m: &Map<String, Value>| serde_json::to_string_pretty(m).map(|s| s + "\n").unwrap_or_default();
        stage.write("config.json", json(&config).as_bytes())?;
        stage.write("generation_config.json", json(&generation).as_bytes())?;
        self.write_safetensors(&stage.path(SINGLE), o.dtype)?;
        stage.sync(SINGLE)?;
        for (src, name) in o.copy.iter().zip(&names) {
            let dst = stage.path(name);
            std::fs::copy(src, &dst).map_err(|e| Error::invalid(format!("{}: cannot copy into the export: {e}", src.display())))?;
            stage.sync(name)?;
        }
        stage.commit()
    }

    /// `model.safetensors` of every parameter (norms 1-D, as Hugging Face stores them).
    fn write_safetensors(&self, path: &Path, dtype: Dtype) -> Result<()> {
        let be = &self.be;
        let biggest = self.model.params.iter().filter(|p| matches!(p.data, Weight::Q(_))).map(|p| p.numel()).max();
        // a LoRA model exports merged: W + s·B·A in place of each adapted W, no adapters
        let src = Source {
            eng: self,
            dtype,
            scratch: RefCell::new(match biggest {
                Some(n) => Some(be.alloc(n, Category::Weights)?),
                None => None,
            }),
            err: RefCell::new(None),
        };
        let views: Vec<(String, Lazy<'_, B>)> = self
            .model
            .params
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.role.adapter())
            .map(|(idx, p)| {
                let shape = if p.rows == 1 { vec![p.cols] } else { vec![p.rows, p.cols] };
                (p.name.clone(), Lazy { src: &src, idx, shape })
            })
            .collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let r = safetensors::serialize_to_file(views, Some(meta), path);
        if let Some(e) = src.err.borrow_mut().take() {
            return Err(e);
        }
        r.map_err(|e| match e {
            safetensors::SafeTensorError::IoError(e) => io_err(path, e),
            e => Error::invalid(format!("{}: {e}", path.display())),
        })
    }
}

/// What every lazy view reads through: the engine, one scratch buffer for dequantized
/// weights, and the first error (a `View` cannot return one; the export fails after).
struct Source<'a, B: Backend> {
    eng: &'a Engine<B>,
    dtype: Dtype,
    scratch: RefCell<Option<B::Buf>>,
    err: RefCell<Option<Error>>,
}

impl<B: Backend> Source<'_, B> {
    /// One parameter's bytes in the export dtype.
    fn bytes(&self, idx: usize) -> Vec<u8> {
        let (be, p) = (&self.eng.be, &self.eng.model.params[idx]);
        let n = p.numel();
        let r = match &p.data {
            Weight::F(b) if self.eng.model.lora.is_none() => be.to_host(b, n).map(|h| encode(&h, self.dtype)),
            Weight::F(_) | Weight::N(..) => {
                let mut s = self.scratch.borrow_mut();
                match s.as_mut() {
                    Some(s) => crate::model::lora::merged(be, &self.eng.model, idx, s).map(|h| encode(&h, self.dtype)),
                    None => be
                        .alloc_fp32(0, Category::Activations)
                        .and_then(|mut s| crate::model::lora::merged(be, &self.eng.model, idx, &mut s).map(|h| encode(&h, self.dtype))),
                }
            }
            Weight::Q(q) => {
                let mut s = self.scratch.borrow_mut();
                let s = s.as_mut().expect("scratch for quantized weights");
                be.q_dequantize(s, q);
                be.to_host(s, n).map(|h| encode(&h, self.dtype))
            }
        };
        r.unwrap_or_else(|e| {
            self.err.borrow_mut().get_or_insert(e);
            vec![0; n * self.dtype.width()]
        })
    }
}

/// f32 values as little-endian bytes of `dtype` (bf16: round to nearest even).
pub fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    let w = dtype.width();
    let mut out = vec![0u8; v.len() * w];
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK * w).zip(v.par_chunks(CHUNK)).for_each(|(o, x)| match dtype {
        Dtype::F32 => {
            for (c, x) in o.chunks_exact_mut(4).zip(x) {
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        Dtype::Bf16 => {
            for (c, x) in o.chunks_exact_mut(2).zip(x) {
                c.copy_from_slice(&half::bf16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
    });
    out
}

/// A tensor the safetensors writer asks for only when it writes it.
struct Lazy<'a, B: Backend> {
    src: &'a Source<'a, B>,
    idx: usize,
    shape: Vec<usize>,
}

impl<B: Backend> View for Lazy<'_, B> {
    fn dtype(&self) -> safetensors::Dtype {
        self.src.dtype.st()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.src.bytes(self.idx))
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.src.dtype.width()
    }
}

/// The engine-independent face of import and export, for the C ABI's `dyn Session`.
pub trait HfSession {
    fn import_hf(&mut self, path: &Path) -> Result<()>;
    fn export_hf(&mut self, o: &ExportOptions) -> Result<()>;
}

impl<B: Backend> HfSession for Engine<B> {
    fn import_hf(&mut self, path: &Path) -> Result<()> {
        Engine::import_hf(self, path)
    }
    fn export_hf(&mut self, o: &ExportOptions) -> Result<()> {
        // the writer's conversions run on the engine's threads; `&mut` moves across (the
        // engine is Send, not Sync)
        let (runner, me) = (self.be.runner(), &mut *self);
        runner.run(move || Engine::export_hf_with(me, o))
    }
}
