//! PEFT LoRA adapter folders: `adapter_config.json` + `adapter_model.safetensors`, read and
//! written with PEFT's file names, config fields and tensor names
//! (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so an adapter that
//! `peft` saved loads here and one written here loads in `PeftModel.from_pretrained`.
//!
//! `read` validates everything against the model before returning anything: the config
//! (plain LoRA only: every PEFT feature that changes the computation or the base model is
//! refused with a one-line error naming the field), every tensor's name (a module of this
//! LLaMA, a layer it has), shape (A [r, in], B [out, r] for this model's matrix and the
//! config's r), dtype (F32, BF16 or F16, converted exactly to f32) and values (finite), and
//! that every targeted module of every layer has both matrices.
//!
//! `write` writes each file under a temporary name in the folder and renames it into place,
//! and never replaces adapter files already there unless asked to.

use super::engine::{encode, Dtype};
use super::folder::io_err;
use super::weights::{Checkpoint, Entry};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::llama::block_linears;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// PEFT's file names (`peft.utils.constants.CONFIG_NAME`, `SAFETENSORS_WEIGHTS_NAME`).
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What `PeftModelForCausalLM` puts before the base model's module paths when it saves.
pub const PREFIX: &str = "base_model.model.";

// The seven block linears' PEFT names and their module paths have one owner, the engine's
// adapters (`model::lora`); re-exported here for the adapter files' users.
pub use crate::model::lora::{module_path, MODULES};

/// The settings of a LoRA adapter, with PEFT's field names.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// Rank of every adapter pair.
    pub r: usize,
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training, in [0, 1).
    pub lora_dropout: f64,
    /// The adapted modules (PEFT's names, `q_proj` …), in block order, each in every layer.
    pub target_modules: Vec<String>,
    /// Scale alpha/√r (rank-stabilized LoRA) instead of alpha/r.
    pub use_rslora: bool,
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// The factor on B·A: alpha/r, or alpha/√r with rsLoRA (PEFT `LoraLayer.update_layer`).
    pub fn scale(&self) -> f64 {
        let r = self.r as f64;
        self.lora_alpha / if self.use_rslora { r.sqrt() } else { r }
    }
}

/// A matrix: shape and row-major f32 values.
pub type Matrix = (Vec<usize>, Vec<f32>);

/// A LoRA adapter: its config and, per adapted module (`model.layers.0.self_attn.q_proj`),
/// A [r, in] and B [out, r]. `read` returns the modules layer by layer, in block order.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub tensors: Vec<(String, Matrix, Matrix)>,
}

/// One bounded line (names from a file may hold control characters or be huge).
fn line(msg: String) -> Error {
    Error::invalid(crate::state::tensors::printable(&msg, 2000))
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

fn shape_text(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

/// A tensor name split into (layer, linear k, is_a), or None if it is no LoRA weight of a
/// block linear (the caller words why).
fn parse_name(name: &str) -> Option<(usize, usize, bool)> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || (layer.len() > 1 && layer.starts_with('0')) {
        return None;
    }
    let l: usize = layer.parse().ok()?;
    let (module, which) = rest.rsplit_once(".lora_")?;
    let is_a = match which {
        "A.weight" => true,
        "B.weight" => false,
        _ => return None,
    };
    let path = format!("model.layers.{l}.{module}");
    let k = (0..MODULES.len()).find(|&k| module_path(l, k) == path)?;
    Some((l, k, is_a))
}

/// The module a tensor name adapts, for messages about names we do not have
/// (`…lm_head.lora_A.weight` → `lm_head`).
fn module_of(name: &str) -> &str {
    let m = name.rsplit_once(".lora_").map_or(name, |(m, _)| m);
    m.rsplit_once('.').map_or(m, |(_, last)| last)
}

/// A config value that must be null / false / empty for a plain LoRA adapter.
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    }
}

/// PEFT features that change what an adapter computes or which weights it covers: each
/// must be unset (null, false, empty) for qgalore to load the adapter. (key, what it is.)
const REFUSED: [(&str, &str); 14] = [
    ("use_dora", "DoRA (weight-decomposed LoRA) is not supported"),
    ("fan_in_fan_out", "qgalore's linears store [out, in] (fan_in_fan_out is for GPT-2 style Conv1D layers)"),
    ("modules_to_save", "fully trained extra modules are not supported"),
    ("layers_to_transform", "qgalore adapts every layer"),
    ("layers_pattern", "qgalore adapts every layer"),
    ("rank_pattern", "every module must have rank r"),
    ("alpha_pattern", "every module must use lora_alpha"),
    ("exclude_modules", "qgalore adapts every targeted module of every layer"),
    ("lora_bias", "LoRA B biases are not supported"),
    ("use_qalora", "QA-LoRA is not supported"),
    ("layer_replication", "layer replication is not supported"),
    ("trainable_token_indices", "trainable token embeddings are not supported"),
    ("target_parameters", "adapters on parameters (not modules) are not supported"),
    ("alora_invocation_tokens", "activated LoRA is not supported"),
];

/// `init_lora_weights` values whose adapter is relative to a CHANGED base model (the base
/// keeps a residual), so it does not apply to the original weights.
const RESIDUAL_INITS: [&str; 4] = ["pissa", "olora", "corda", "loftq"];

/// Parses and checks `adapter_config.json` (path for messages). Returns the config and the
/// target modules as a bit set over `MODULES` (None: a pattern string, taken from
/// the tensors).
fn parse_config(path: &Path, text: &str) -> Result<(AdapterConfig, Option<u8>)> {
    let bad = |m: String| line(format!("{}: {m}", show(path)));
    let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let o = v.as_object().ok_or_else(|| bad("must be a JSON object".into()))?;
    match o.get("peft_type") {
        Some(Value::String(s)) if s == "LORA" => {}
        Some(x) => return Err(bad(format!("peft_type = {x}: qgalore loads LoRA adapters only (peft_type \"LORA\")"))),
        None => return Err(bad("peft_type is missing: a PEFT adapter config names it (qgalore loads \"LORA\")".into())),
    }
    match o.get("task_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "CAUSAL_LM" => {}
        Some(x) => return Err(bad(format!("task_type = {x}: qgalore loads adapters of causal language models (\"CAUSAL_LM\")"))),
    }
    match o.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(x) => return Err(bad(format!("bias = {x}: qgalore loads adapters without trained biases (bias \"none\")"))),
    }
    for (key, why) in REFUSED {
        if let Some(x) = o.get(key).filter(|x| !is_unset(x)) {
            return Err(bad(format!("{key} = {}: {why}", crate::state::tensors::printable(&x.to_string(), 200))));
        }
    }
    if let Some(Value::String(s)) = o.get("init_lora_weights") {
        let lower = s.to_ascii_lowercase();
        if let Some(kind) = RESIDUAL_INITS.iter().find(|k| lower.starts_with(*k)) {
            return Err(bad(format!(
                "init_lora_weights = {s:?}: a {kind} adapter belongs to a base model {kind} changed; save it with peft's path_initial_model_for_weight_conversion to get a plain LoRA adapter"
            )));
        }
    }
    let r = match o.get("r") {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|r| r >= 1) => n.as_u64().unwrap() as usize,
        Some(x) => return Err(bad(format!("r = {x}: must be a whole number ≥ 1"))),
        None => return Err(bad("r is missing (the rank of every adapter pair)".into())),
    };
    let lora_alpha = match o.get("lora_alpha") {
        Some(Value::Number(n)) if n.as_f64().is_some_and(|a| a.is_finite() && a > 0.0) => n.as_f64().unwrap(),
        Some(x) => return Err(bad(format!("lora_alpha = {x}: must be a number > 0"))),
        // PEFT's default
        None => 8.0,
    };
    let lora_dropout = match o.get("lora_dropout") {
        Some(Value::Number(n)) if n.as_f64().is_some_and(|d| (0.0..1.0).contains(&d)) => n.as_f64().unwrap(),
        Some(x) => return Err(bad(format!("lora_dropout = {x}: must be a number in [0, 1)"))),
        None => 0.0,
    };
    let use_rslora = match o.get("use_rslora") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(x) => return Err(bad(format!("use_rslora = {x}: must be true or false"))),
    };
    let base_model_name_or_path = match o.get("base_model_name_or_path") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(x) => return Err(bad(format!("base_model_name_or_path = {x}: must be a string or null"))),
    };
    let names = MODULES;
    let allowed = || names.join(", ");
    let targets = match o.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Some(0x7f),
        // a regular expression over module paths: the tensors say which modules it matched
        Some(Value::String(_)) => None,
        Some(Value::Array(a)) if !a.is_empty() => {
            let mut bits = 0u8;
            for t in a {
                let Some(t) = t.as_str() else {
                    return Err(bad(format!("target_modules entry {t}: must be a module name")));
                };
                // PEFT matches a name or a path suffix (`model.layers.0.self_attn.q_proj`)
                let last = t.rsplit_once('.').map_or(t, |(_, l)| l);
                let Some(k) = names.iter().position(|n| *n == last) else {
                    return Err(line(format!(
                        "{}: target module {t}: qgalore adapts only the block linears {} (not embeddings, lm_head or other modules)",
                        show(path),
                        allowed()
                    )));
                };
                bits |= 1 << k;
            }
            Some(bits)
        }
        Some(x) => return Err(bad(format!("target_modules = {x}: must be a list of module names ({})", allowed()))),
        None => return Err(bad(format!("target_modules is missing (a list of module names: {})", allowed()))),
    };
    let target_modules = targets.map_or_else(Vec::new, bit_names);
    Ok((AdapterConfig { r, lora_alpha, lora_dropout, target_modules, use_rslora, base_model_name_or_path }, targets))
}

fn bit_names(bits: u8) -> Vec<String> {
    MODULES.iter().enumerate().filter(|(k, _)| bits & (1 << k) != 0).map(|(_, n)| n.to_string()).collect()
}

/// The two files of an adapter folder, checked to be there (one line naming what is not).
fn files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(line(format!("{}: not a folder (a PEFT adapter is a folder holding {CONFIG_FILE} and {WEIGHTS_FILE})", show(dir)))),
        Err(e) => return Err(line(format!("{}: cannot read the adapter folder: {e}", show(dir)))),
    }
    let cpath = dir.join(CONFIG_FILE);
    let wpath = dir.join(WEIGHTS_FILE);
    if !cpath.is_file() {
        return Err(line(format!("{}: no {CONFIG_FILE}: not a PEFT adapter folder (it holds {CONFIG_FILE} and {WEIGHTS_FILE})", show(dir))));
    }
    if !wpath.is_file() {
        let why = if dir.join("adapter_model.bin").is_file() {
            "it holds adapter_model.bin (a PyTorch pickle), which qgalore does not read: save the adapter with peft's safe_serialization=True"
        } else {
            "a PEFT adapter folder holds both files"
        };
        return Err(line(format!("{}: no {WEIGHTS_FILE} next to {CONFIG_FILE}: {why}", show(dir))));
    }
    Ok((cpath, wpath))
}

/// The config of an adapter folder without a model: what an engine for it must be built
/// with (rank, alpha, dropout, targets, rsLoRA). A `target_modules` pattern string is
/// resolved to the modules the weights file's tensor names adapt. `read` checks the rest.
pub fn read_config(dir: &Path) -> Result<AdapterConfig> {
    let (cpath, wpath) = files(dir)?;
    let text = fs::read_to_string(&cpath).map_err(|e| line(format!("{}: cannot read: {e}", show(&cpath))))?;
    let (mut config, targets) = parse_config(&cpath, &text)?;
    if targets.is_none() {
        let ck = Checkpoint::open(&wpath)?;
        let bits = ck.tensors.keys().filter_map(|n| parse_name(n)).fold(0u8, |b, (_, k, _)| b | (1 << k));
        if bits == 0 {
            return Err(line(format!("{}: holds no LoRA tensors of the block linears ({})", show(&wpath), MODULES.join(", "))));
        }
        config.target_modules = bit_names(bits);
    }
    Ok(config)
}

/// Reads and validates a PEFT LoRA adapter folder for the model of `cfg` (see the module
/// doc). Every problem is one line naming the file and what is wrong.
pub fn read(dir: &Path, cfg: &ModelConfig) -> Result<Adapter> {
    let (cpath, wpath) = files(dir)?;
    let text = fs::read_to_string(&cpath).map_err(|e| line(format!("{}: cannot read: {e}", show(&cpath))))?;
    let (mut config, targets) = parse_config(&cpath, &text)?;
    let ck = Checkpoint::open(&wpath)?;
    let wfile = show(&wpath);
    let bad = |m: String| line(format!("{wfile}: {m}"));

    // every tensor: a LoRA matrix of a block linear of a layer this model has
    let lin = block_linears(cfg);
    let names = MODULES;
    let layers = cfg.num_hidden_layers;
    let mut found: BTreeMap<(usize, usize), [Option<&Entry>; 2]> = BTreeMap::new();
    for (name, e) in &ck.tensors {
        let Some((l, k, is_a)) = parse_name(name) else {
            let m = module_of(name);
            if name.contains(".lora_") && !names.contains(&m) {
                return Err(bad(format!(
                    "tensor {name} adapts {m}, a module qgalore does not adapt (only the block linears {})",
                    names.join(", ")
                )));
            }
            return Err(bad(format!(
                "unexpected tensor {name} (a LoRA adapter of a LLaMA model holds {PREFIX}model.layers.<i>.{{self_attn,mlp}}.<module>.lora_A.weight and .lora_B.weight)"
            )));
        };
        if l >= layers {
            return Err(bad(format!("adapter for another model: {name} is for layer {l} but this model has {layers} layers")));
        }
        if let Some(t) = targets.filter(|t| t & (1 << k) == 0) {
            return Err(bad(format!(
                "tensor {name} adapts {}, which {CONFIG_FILE} target_modules ({}) does not name",
                names[k],
                bit_names(t).join(", ")
            )));
        }
        found.entry((l, k)).or_default()[usize::from(!is_a)] = Some(e);
    }
    if found.is_empty() {
        return Err(bad("holds no LoRA tensors".into()));
    }
    // the targets of a pattern string: the modules the file adapts
    let bits = targets.unwrap_or_else(|| found.keys().fold(0u8, |b, (_, k)| b | (1 << k)));
    config.target_modules = bit_names(bits);
    let r = config.r;
    let mut tensors = Vec::new();
    for l in 0..layers {
        for (k, &(_, rows, cols)) in lin.iter().enumerate() {
            if bits & (1 << k) == 0 {
                continue;
            }
            let path = module_path(l, k);
            let pair = found.get(&(l, k)).copied().unwrap_or_default();
            let mut mats = Vec::with_capacity(2);
            for (i, (suffix, need)) in [("lora_A", [r, cols]), ("lora_B", [rows, r])].into_iter().enumerate() {
                let name = format!("{PREFIX}{path}.{suffix}.weight");
                let Some(e) = pair[i] else {
                    return Err(bad(format!(
                        "tensor {name} is missing ({CONFIG_FILE} targets {} in every layer, and each needs lora_A and lora_B)",
                        names[k]
                    )));
                };
                if e.shape.len() != 2 {
                    return Err(bad(format!("tensor {name} has shape {}: a LoRA matrix is 2-D, {}", shape_text(&e.shape), shape_text(&need))));
                }
                // the rank side first: a rank that disagrees with the config is not another model
                let rank = if i == 0 { e.shape[0] } else { e.shape[1] };
                if rank != r {
                    return Err(bad(format!("tensor {name} has shape {}, rank {rank}, but {CONFIG_FILE} has r = {r}", shape_text(&e.shape))));
                }
                if e.shape != need {
                    return Err(bad(format!(
                        "adapter for another model: {name} has shape {} but this model's {path} ({rows}×{cols}, out × in) needs {}",
                        shape_text(&e.shape),
                        shape_text(&need)
                    )));
                }
                let mut v = vec![0.0f32; need[0] * need[1]];
                ck.read_f32(&name, &mut v)?;
                if let Some(j) = v.iter().position(|x| !x.is_finite()) {
                    return Err(bad(format!("tensor {name} element {j} is {}: adapter values must be finite", v[j])));
                }
                mats.push((need.to_vec(), v));
            }
            let b = mats.pop().unwrap();
            let a = mats.pop().unwrap();
            tensors.push((path, a, b));
        }
    }
    Ok(Adapter { config, tensors })
}

/// How `write` writes.
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    /// Element type of the tensors (PEFT saves the model's dtype; f32 by default).
    pub dtype: Dtype,
    /// Replace adapter files already in the folder (other files are never touched).
    pub overwrite: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { dtype: Dtype::F32, overwrite: false }
    }
}

/// Writes `adapter` as PEFT saves it (f32, refusing to replace an adapter already there).
pub fn write(dir: &Path, adapter: &Adapter) -> Result<()> {
    write_with(dir, adapter, &WriteOptions::default())
}

/// A whole number as a JSON integer (PEFT writes `lora_alpha: 16`), anything else as it is.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

/// `adapter_config.json` as `peft` writes it for this config: the fields every PEFT version
/// since 0.10 knows (newer versions fill the ones they add with their defaults, older ones
/// would warn about fields they do not know), sorted, indented by 2 as `json.dumps(...,
/// indent=2, sort_keys=True)`.
pub fn config_json(c: &AdapterConfig) -> String {
    let mut m = Map::new();
    m.insert("alpha_pattern".into(), Value::Object(Map::new()));
    m.insert("auto_mapping".into(), Value::Null);
    m.insert("base_model_name_or_path".into(), c.base_model_name_or_path.clone().map_or(Value::Null, Value::from));
    m.insert("bias".into(), "none".into());
    m.insert("fan_in_fan_out".into(), false.into());
    m.insert("inference_mode".into(), true.into());
    m.insert("init_lora_weights".into(), true.into());
    m.insert("layer_replication".into(), Value::Null);
    m.insert("layers_pattern".into(), Value::Null);
    m.insert("layers_to_transform".into(), Value::Null);
    m.insert("loftq_config".into(), Value::Object(Map::new()));
    m.insert("lora_alpha".into(), number(c.lora_alpha));
    m.insert("lora_dropout".into(), Value::from(c.lora_dropout));
    m.insert("megatron_config".into(), Value::Null);
    m.insert("megatron_core".into(), "megatron.core".into());
    m.insert("modules_to_save".into(), Value::Null);
    m.insert("peft_type".into(), "LORA".into());
    m.insert("r".into(), Value::from(c.r as u64));
    m.insert("rank_pattern".into(), Value::Object(Map::new()));
    m.insert("revision".into(), Value::Null);
    m.insert("target_modules".into(), Value::from(c.target_modules.clone()));
    m.insert("task_type".into(), "CAUSAL_LM".into());
    m.insert("use_dora".into(), false.into());
    m.insert("use_rslora".into(), c.use_rslora.into());
    // serde_json's Map is a BTreeMap here: keys come out sorted, as peft's sort_keys=True
    serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_default()
}

/// Checks that an adapter is one PEFT can describe: a known rank, alpha and dropout, known
/// targets, each module once, every layer 0..L with every target, A [r, in] and B [out, r]
/// with as many values as the shapes say, the same in/out for a module kind in every layer.
fn check(a: &Adapter) -> Result<()> {
    let c = &a.config;
    crate::ensure!(c.r >= 1, "adapter r = {}: must be ≥ 1", c.r);
    crate::ensure!(c.lora_alpha.is_finite() && c.lora_alpha > 0.0, "adapter lora_alpha = {}: must be a number > 0", c.lora_alpha);
    crate::ensure!((0.0..1.0).contains(&c.lora_dropout), "adapter lora_dropout = {}: must be in [0, 1)", c.lora_dropout);
    let names = MODULES;
    let mut bits = 0u8;
    for t in &c.target_modules {
        let k = names.iter().position(|n| n == t).ok_or_else(|| line(format!("adapter target module {t}: must be one of {}", names.join(", "))))?;
        crate::ensure!(bits & (1 << k) == 0, "adapter target module {t} is named twice");
        bits |= 1 << k;
    }
    crate::ensure!(bits != 0, "adapter has no target modules");
    crate::ensure!(!a.tensors.is_empty(), "adapter has no tensors (a pair A, B per target module of every layer)");
    let mut seen: HashMap<(usize, usize), ()> = HashMap::new();
    let mut dims: [Option<(usize, usize)>; 7] = [None; 7];
    let mut layers = 0;
    for (path, (sa, va), (sb, vb)) in &a.tensors {
        let (l, k, _) = parse_name(&format!("{PREFIX}{path}.lora_A.weight"))
            .ok_or_else(|| line(format!("adapter module {path}: not a block linear's path (model.layers.<i>.self_attn.q_proj …)")))?;
        crate::ensure!(bits & (1 << k) != 0, "adapter module {path}: {} is not among target_modules ({})", names[k], c.target_modules.join(", "));
        crate::ensure!(seen.insert((l, k), ()).is_none(), "adapter module {path} appears twice");
        let ok = sa.len() == 2 && sb.len() == 2 && sa[0] == c.r && sb[1] == c.r;
        crate::ensure!(ok, "adapter module {path}: A {} and B {} must be [r, in] and [out, r] with r = {}", shape_text(sa), shape_text(sb), c.r);
        crate::ensure!(va.len() == sa[0] * sa[1] && vb.len() == sb[0] * sb[1], "adapter module {path}: {} and {} values for shapes {} and {}", va.len(), vb.len(), shape_text(sa), shape_text(sb));
        let d = (sb[0], sa[1]);
        match dims[k] {
            Some(p) if p != d => return Err(line(format!("adapter module {path} is {}×{} but {} of another layer is {}×{}", d.0, d.1, names[k], p.0, p.1))),
            _ => dims[k] = Some(d),
        }
        layers = layers.max(l + 1);
    }
    for l in 0..layers {
        for k in (0..7).filter(|k| bits & (1 << k) != 0) {
            crate::ensure!(seen.contains_key(&(l, k)), "adapter lacks {} (every layer 0..{layers} needs every target module)", module_path(l, k));
        }
    }
    Ok(())
}

/// Writes `adapter` into `dir` (created if missing) as `adapter_config.json` and
/// `adapter_model.safetensors` with PEFT's names. An existing folder may hold other files;
/// adapter files already there are replaced only with `overwrite`. Each file is written and
/// fsync'd under a temporary name, then renamed into place (weights first, so a config never
/// names weights that are not there).
pub fn write_with(dir: &Path, adapter: &Adapter, o: &WriteOptions) -> Result<()> {
    check(adapter)?;
    // a link to a folder is that folder (an output folder may be linked elsewhere)
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(line(format!("{}: exists and is not a folder; an adapter is written into a folder", show(dir)))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| line(format!("{}: cannot create folder: {e}", show(dir))))?;
        }
        Err(e) => return Err(line(format!("{}: cannot check the folder: {e}", show(dir)))),
    }
    if !o.overwrite {
        for f in [CONFIG_FILE, WEIGHTS_FILE] {
            if fs::symlink_metadata(dir.join(f)).is_ok() {
                return Err(line(format!("{}: already holds an adapter ({f}); write it to another folder or ask to overwrite", show(dir))));
            }
        }
    }
    let (st, width) = match o.dtype {
        Dtype::F32 => (safetensors::Dtype::F32, 4),
        Dtype::Bf16 => (safetensors::Dtype::BF16, 2),
    };
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(2 * adapter.tensors.len());
    for (path, (sa, va), (sb, vb)) in &adapter.tensors {
        bytes.push((format!("{PREFIX}{path}.lora_A.weight"), sa.clone(), encode(va, o.dtype)));
        bytes.push((format!("{PREFIX}{path}.lora_B.weight"), sb.clone(), encode(vb, o.dtype)));
    }
    let mut views = Vec::with_capacity(bytes.len());
    for (name, shape, b) in &bytes {
        debug_assert_eq!(b.len(), shape.iter().product::<usize>() * width);
        let v = safetensors::tensor::TensorView::new(st, shape.clone(), b).map_err(|e| line(format!("adapter tensor {name}: {e}")))?;
        views.push((name.as_str(), v));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let weights = safetensors::serialize(views, Some(meta)).map_err(|e| line(format!("{}: {e}", show(&dir.join(WEIGHTS_FILE)))))?;
    let config = config_json(&adapter.config) + "\n";
    put(dir, WEIGHTS_FILE, &weights)?;
    put(dir, CONFIG_FILE, config.as_bytes())?;
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(())
}

/// Writes `dir/name` through a temporary file in the same folder (removed on failure).
fn put(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let tmp: PathBuf = dir.join(format!(".{name}.partial-{}-{nanos}", std::process::id()));
    let r = (|| {
        // create_new: never write through a file (or link) someone else made
        let mut f = File::options().write(true).create_new(true).open(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(data).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        let dst = dir.join(name);
        fs::rename(&tmp, &dst).map_err(|e| line(format!("{}: cannot move the adapter file into place: {e}", show(&dst))))
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}
