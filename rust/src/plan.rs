//! The byte plan: every buffer the engine allocates, by tensor and memory category, from the
//! config alone (llm.c's size tables). Nothing is allocated, so planning a 7B model takes
//! microseconds on any machine, GPU or not.
//!
//! The rules that decide a size live here (or in the storage types they name), and the
//! allocators take their sizes from the plan that `Engine::new` builds once: `Llama::build`
//! (the layout, INT8 and bf16 tables), `Grads::new` (`TensorPlan::grad_len`,
//! `grad_chunk_rows`, `Plan::shared_grad`), the optimizers (`TensorPlan::state_len`,
//! `eight_bit_state`, `projector`, `Plan::work`), `Acts::new` (`Plan::activations`, the
//! list of `acts::buffers`) and the storage types (`QTensor::storage_bytes`,
//! `State8::storage_bytes`). So the plan and the engine's tracked bytes are one piece of
//! code; `rust/tests/plan.rs` checks that they agree.
//!
//! Messages name engine-config fields (`weight_group_size = 6: …`); the front end maps the
//! fields to its flags.

use crate::config::{ClipMode, Device, Named, EngineConfig, LoraBase, ModelConfig, OptimConfig, Optimizer, Precision};
use crate::model::acts::{self, ActBuf};
use crate::model::llama::{block_linears, layout, LinearQuant, LoraBuild, Role};
use crate::model::lora::{self, AdapterSpec};
use crate::quant::nf4::Nf4Tensor;
use crate::quant::adam8::{State8, MIN_8BIT_SIZE};
use crate::quant::QTensor;
use serde::Serialize;

/// Bytes by memory category, as `Engine::memory` reports them (also the `memory` of the
/// engine's info).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bytes {
    pub weights: u64,
    /// LoRA adapters (0 for the other optimizers).
    pub adapters: u64,
    pub grads: u64,
    pub optimizer_state: u64,
    pub projector: u64,
    pub activations: u64,
    pub total: u64,
}

impl Bytes {
    /// The categories in `CATEGORIES` order, then the total (the layout of `Engine::memory`).
    pub fn to_array(self) -> [u64; 7] {
        [self.weights, self.adapters, self.grads, self.optimizer_state, self.projector, self.activations, self.total]
    }

    /// The inverse of `to_array`.
    pub fn from_array(a: [u64; 7]) -> Self {
        let [weights, adapters, grads, optimizer_state, projector, activations, total] = a;
        Bytes { weights, adapters, grads, optimizer_state, projector, activations, total }
    }
}

/// Projector geometry of a rows×cols matrix at rank `rank` (docs/algorithm-spec.md §1.2): the right
/// projector Q (r'×cols) when rows ≥ cols, else the left one P (rows×r'), with
/// r' = min(rank, rows, cols).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ProjGeom {
    pub right: bool,
    /// r' = min(rank, rows, cols).
    pub rank: usize,
    /// Elements of the low-rank gradient: rows×r' (right) or r'×cols (left).
    pub low: usize,
    /// Elements of the projector: r'×cols (right) or rows×r' (left).
    pub numel: usize,
}

impl ProjGeom {
    pub fn new(rows: usize, cols: usize, rank: usize) -> Self {
        let right = rows >= cols;
        let r = rank.min(rows).min(cols);
        if right {
            ProjGeom { right, rank: r, low: rows * r, numel: r * cols }
        } else {
            ProjGeom { right, rank: r, low: r * cols, numel: rows * r }
        }
    }

    /// (rows, cols) of the projector matrix of a rows×cols weight.
    pub fn shape(&self, rows: usize, cols: usize) -> (usize, usize) {
        if self.right {
            (self.rank, cols)
        } else {
            (rows, self.rank)
        }
    }
}

/// INT8 projected weights (Q-GaLore, docs/algorithm-spec.md §2.1) when the config asks for them. Validation allows
/// `weight_bits = 8` only for qgalore.
pub fn linear_quant(o: &OptimConfig) -> Option<LinearQuant> {
    o.int8_weights().then(|| LinearQuant { bits: 8, group: o.weight_group_size, range: o.quant_range })
}

/// How an adapter run (lora, qlora) builds its model: the spec, NF4 linears (qlora), and
/// `alloc_half` base tensors (lora_base bf16, and qlora's embedding, head).
pub fn lora_build(o: &OptimConfig, seed: u64) -> Option<LoraBuild> {
    let spec = AdapterSpec::from_optim(o)?;
    let nf4 = o.name == Optimizer::QLora;
    Some(LoraBuild { spec, seed, nf4, half: nf4 || o.lora_base == LoraBase::Bf16 })
}

/// Whether the embedding and lm_head take `Backend::alloc_half` storage (bf16 under bf16
/// precision): only 8-bit Adam updates them, and the reference keeps them in bf16 there.
pub fn half_tables(o: &OptimConfig) -> bool {
    o.eight_bit()
}

/// Whether the moments of an `n`-element tensor are bnb block-wise 8-bit: 8-bit optimizers
/// from `MIN_8BIT_SIZE` elements on (of the low-rank shape when projected); else two f32
/// buffers.
pub fn eight_bit_state(o: &OptimConfig, n: usize) -> bool {
    o.eight_bit() && n >= MIN_8BIT_SIZE
}

/// Whether the optimizer steps inside the backward: only with one micro-batch per step,
/// since accumulated gradients must persist (GA > 1 takes the exact global step, docs/algorithm-spec.md I-12).
pub fn fused(cfg: &EngineConfig) -> bool {
    cfg.optimizer.fused && cfg.grad_accum == 1
}

/// Whether the fused step can clip without a second backward (docs/algorithm-spec.md §1.5):
/// with clipping on and a projected optimizer, the backward holds each projected matrix's
/// rank-r gradient R (and the small unprojected tensors' whole gradients) in a stash until
/// the global norm is known; the tables' gradients are recomputed from the kept
/// activations. Whether a plan takes the stash is `ClipPlan`'s choice (`clip_mode`).
pub fn clip_stash(cfg: &EngineConfig) -> bool {
    fused(cfg) && cfg.optimizer.clip > 0.0 && cfg.optimizer.projected()
}

/// Share of the memory the engine finds available (the host's `MemAvailable`, the GPU's free
/// bytes) that `clip_mode = auto` lets a plan with the clip stash fill: the plan leaves out
/// the process's own overhead (the CUDA context, cuBLAS workspaces, the allocator's slack),
/// so a stash that would take the plan right up to the limit is not taken.
pub const CLIP_BUDGET_SHARE: f64 = 0.9;

/// The budget `clip_mode = auto` compares a plan with (`CLIP_BUDGET_SHARE` of `available`).
pub fn clip_budget(available: u64) -> u64 {
    (available as f64 * CLIP_BUDGET_SHARE) as u64
}

/// How the planned engine clips, and why (the one place the clip mode is decided; the
/// engine reports it in `info`, `qg_plan` in the plan).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClipPlan {
    /// `stash` (the fused step clips with one backward and the clip stash), `two-backward`
    /// (the fused step measures the norm in a first backward), `unfused` (the global step
    /// clips after its one backward) or `off` (no clipping).
    pub mode: &'static str,
    /// The clip stash's bytes: held in `stash` mode; in `two-backward` mode of a projected
    /// optimizer, what it would have taken (0 where no stash exists).
    pub stash_bytes: u64,
    /// The memory budget `auto` compared the plan with (None: none was known or the mode
    /// was forced).
    pub budget: Option<u64>,
    /// Why this mode, in words.
    pub why: String,
}

/// The optional `memory_budget` of a config as `qg_plan` receives it (bytes the plan may
/// fill, for `clip_mode = auto`; absent or null: none known).
pub fn budget_field(config_json: &str) -> crate::error::Result<Option<u64>> {
    let v: serde_json::Value =
        serde_json::from_str(config_json).map_err(|e| crate::error::Error::invalid(format!("engine config: {e}")))?;
    match v.get("memory_budget") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(b) => b.as_u64().filter(|&n| n > 0).map(Some).ok_or_else(|| {
            crate::error::Error::invalid(format!("memory_budget = {b}: must be a whole number of bytes ≥ 1"))
        }),
    }
}

fn gb(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

/// Elements the clip stash holds for a trained tensor (`clip_stash`): its low-rank gradient
/// when projected, the whole gradient of a tensor that is neither projected nor a table
/// (the norms), 0 for the tables (recomputed).
pub fn stash_len(role: Role, numel: usize, projector: Option<&ProjPlan>) -> usize {
    match (role, projector) {
        (_, Some(p)) => p.geom.low,
        (Role::Embed | Role::Head, None) => 0,
        _ => numel,
    }
}

/// Whether a stored projector is a plain f32 buffer (`proj_bits = 32`); else it is `QTensor`
/// codes (bf16 at 16, group-quantized at 8 and 4).
pub fn f32_projector(bits: u8) -> bool {
    bits == 32
}

/// Bytes of a stored projector of `numel` elements (`f32_projector`).
pub fn projector_bytes(numel: usize, bits: u8, group: usize) -> usize {
    if f32_projector(bits) {
        4 * numel
    } else {
        QTensor::storage_bytes(numel, bits, group)
    }
}

/// Rows per chunk for the fused update of a v×c embedding and head whose 8-bit Adam has
/// blocks of `block` elements (None when they are not updated block-wise), when they are
/// larger than every other tensor (`other` elements at most): chunks as large as that
/// tensor and a whole number of blocks, so the shared gradient buffer never has to hold a
/// whole vocabulary-sized gradient (0.5 GB in f32 for llama-7b).
pub fn table_chunk_rows(v: usize, c: usize, other: usize, block: Option<usize>) -> Option<usize> {
    let block = block?;
    if v * c <= other {
        return None;
    }
    let unit = block / gcd(c, block); // rows per whole number of blocks
    let rows = (other / c / unit * unit).max(unit);
    (rows < v).then_some(rows)
}

/// Elements the shared gradient buffer needs for one tensor: all of it, or one row chunk.
pub fn shared_grad_len(numel: usize, cols: usize, chunk_rows: Option<usize>) -> usize {
    chunk_rows.map_or(numel, |r| r * cols)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A setting judged against the model: `field = value: why`, with the field of the engine
/// config (the front end names its flag instead).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Note {
    pub field: &'static str,
    pub value: u64,
    pub why: String,
}

impl Note {
    pub fn message(&self) -> String {
        format!("{} = {}: {}", self.field, self.value, self.why)
    }
}

/// Whether the optimizer's settings fit the model's matrices.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Fit {
    /// A setting the engine cannot be built with (the first one found).
    pub problem: Option<Note>,
    /// Settings the engine adapts, such as a rank clamped to a matrix's size.
    pub notices: Vec<Note>,
}

/// Checks the group sizes against every quantized matrix and projector, and notes the ranks
/// clamped per matrix. Every block has the same seven linears, so one block decides.
/// `label` names the model in the messages.
pub fn fit(model: &ModelConfig, o: &OptimConfig, label: &str) -> Fit {
    let linears = block_linears(model);
    let mut out = Fit::default();
    if let Some(spec) = AdapterSpec::from_optim(o) {
        if let Some(why) = lora::rank_problem(model, &spec) {
            out.problem = Some(Note { field: "lora_rank", value: spec.rank as u64, why: format!("{why} ({label})") });
        }
        return out;
    }
    if let Some(q) = linear_quant(o) {
        let g = q.group;
        if let Some(&(kind, rows, cols)) = linears.iter().find(|(_, r, c)| (r * c) % g != 0) {
            let d = linears.iter().map(|(_, r, c)| r * c).fold(0, gcd);
            out.problem = Some(Note {
                field: "weight_group_size",
                value: g as u64,
                why: format!(
                    "does not divide the {rows}×{cols} {kind} matrix of {label} ({} elements); use an even divisor of {d}",
                    rows * cols
                ),
            });
            return out;
        }
    }
    if !o.projected() {
        return out;
    }
    let geo: Vec<_> = linears.iter().map(|&(kind, rows, cols)| (kind, rows, cols, ProjGeom::new(rows, cols, o.rank))).collect();
    if matches!(o.proj_bits, 4 | 8) {
        let g = o.proj_group_size;
        if let Some(&(kind, rows, cols, p)) = geo.iter().find(|x| x.3.numel % g != 0) {
            let (pr, pc) = p.shape(rows, cols);
            let d = geo.iter().map(|x| x.3.numel).fold(0, gcd);
            out.problem = Some(Note {
                field: "proj_group_size",
                value: g as u64,
                why: format!(
                    "does not divide the {pr}×{pc} projector of the {kind} matrix of {label} ({} elements at rank {}); use an even divisor of {d}",
                    p.numel, p.rank
                ),
            });
            return out;
        }
    }
    // clamped ranks, grouped by rank in order of first appearance
    let mut by_rank: Vec<(usize, Vec<&str>)> = Vec::new();
    for (kind, _, _, p) in geo.iter().filter(|x| x.3.rank < o.rank) {
        match by_rank.iter_mut().find(|(r, _)| *r == p.rank) {
            Some((_, kinds)) => kinds.push(kind),
            None => by_rank.push((p.rank, vec![kind])),
        }
    }
    if !by_rank.is_empty() {
        let list: Vec<String> = by_rank.iter().map(|(r, kinds)| format!("{r} for {}", kinds.join(", "))).collect();
        out.notices.push(Note {
            field: "rank",
            value: o.rank as u64,
            why: format!(
                "exceeds the size of some {label} matrices; clamped per matrix to min(rank, rows, cols): {}",
                list.join("; ")
            ),
        });
    }
    out
}

/// One parameter tensor's share of the plan.
#[derive(Clone, Debug, Serialize)]
pub struct TensorPlan {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub role: Role,
    /// f32, bf16 (tables under bf16 precision) or INT8 codes with f32 scale and zero per group.
    pub weight_bytes: u64,
    /// Its own f32 gradient buffer; 0 when the fused step routes it through the shared one.
    pub grad_bytes: u64,
    /// Elements of its own gradient buffer (`grad_bytes`); None: the shared one.
    #[serde(skip)]
    pub grad_len: Option<usize>,
    /// Rows per chunk in which the fused step hands over its gradient (the tables, when
    /// chunked; `Plan::table_chunk_rows`).
    #[serde(skip)]
    pub grad_chunk_rows: Option<usize>,
    /// Adam moments: two f32 values per element, or 8-bit codes with f32 absmax per block.
    pub state_bytes: u64,
    /// Elements the moments cover: the tensor's, or its low-rank gradient's when projected.
    #[serde(skip)]
    pub state_len: usize,
    pub eight_bit_state: bool,
    /// Elements of its clip stash (`clip_stash`; 0: none), counted with the gradients.
    #[serde(skip)]
    pub stash_len: usize,
    /// GaLore projector of a projected linear.
    pub projector: Option<ProjPlan>,
}

/// A projected matrix: its projector geometry and its stored projector's bytes.
#[derive(Clone, Debug, Serialize)]
pub struct ProjPlan {
    #[serde(flatten)]
    pub geom: ProjGeom,
    /// Bytes of the stored projector, held from the matrix's first refresh on.
    pub stored_bytes: u64,
}

/// The optimizer's f32 working buffers, in elements (0: not allocated).
#[derive(Clone, Copy, Debug, Default)]
pub struct Work {
    /// The projector in use (dequantized) and a fresh one during a refresh (`Projector`).
    pub projector: usize,
    pub projector_new: usize,
    /// The low-rank gradient R, then the low-rank update; and the 8-bit update U (`Grads`).
    pub low: usize,
    pub update: usize,
}

impl Work {
    /// (grads, projector) bytes.
    fn bytes(&self) -> (u64, u64) {
        (4 * (self.low + self.update) as u64, 4 * (self.projector + self.projector_new) as u64)
    }
}

/// What an engine built from a config allocates.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// Trainable parameters.
    pub params: u64,
    /// Activation precision planned for: `fp32` or `bf16`.
    pub precision: &'static str,
    /// Whether the optimizer steps inside the backward.
    pub fused: bool,
    /// Rows per chunk of the embedding and head gradients in the fused step, when chunked.
    pub table_chunk_rows: Option<usize>,
    /// Elements of the fused step's shared gradient buffer (0 without the fused step).
    pub shared_grad: u64,
    /// Elements of the fused step's clip stash, all tensors together (`clip_stash`; 0: none,
    /// also when `clip` chose two backwards).
    pub clip_stash: u64,
    /// How the engine clips and why (`Plan::with_budget`).
    pub clip: ClipPlan,
    /// Elements of the largest low-rank gradient and of the largest projector (the
    /// optimizer's scratch and working copies).
    pub largest_low: u64,
    pub largest_projector: u64,
    /// The optimizer's working buffers (from `largest_low` and `largest_projector`).
    #[serde(skip)]
    pub work: Work,
    /// Bytes tracked by a freshly built engine (no projector stored yet).
    pub initial: Bytes,
    /// Bytes tracked once every projector is stored (after the first update).
    pub stepped: Bytes,
    pub tensors: Vec<TensorPlan>,
    /// The forward's kept buffers and the backward's scratch, one entry per kind.
    pub activations: Vec<ActBuf>,
    /// The LoRA adapters' activation buffers (`lora::act_buffers`; empty without adapters).
    pub lora_activations: Vec<ActBuf>,
    #[serde(flatten)]
    pub fit: Fit,
}

impl Plan {
    /// Plans `cfg` (validated) with bf16 activation buffers when `bf16`; `label` names the
    /// model in the fit messages. No memory budget is known: `clip_mode = auto` takes the
    /// stash (`with_budget`).
    pub fn new(cfg: &EngineConfig, bf16: bool, label: &str) -> Plan {
        Plan::with_budget(cfg, bf16, label, None)
    }

    /// `new`, with `clip_mode = auto` deciding against a memory `budget` in bytes: the clip
    /// stash is taken when the plan with it (its `stepped` total, every projector stored)
    /// fits the budget, or when no budget is known; otherwise the fused step runs two
    /// backwards and the stash is not allocated. `stash` and `two-backward` are taken as
    /// asked. Every mode computes the same numbers (rust/tests/clip_mode.rs).
    pub fn with_budget(cfg: &EngineConfig, bf16: bool, label: &str, budget: Option<u64>) -> Plan {
        let o = &cfg.optimizer;
        if !clip_stash(cfg) {
            let mut p = Plan::build(cfg, bf16, label, false);
            let (mode, why) = if o.clip <= 0.0 {
                ("off", "clipping is off (clip = 0)".to_string())
            } else if !p.fused {
                ("unfused", "the global step clips after its one backward (fused = false)".to_string())
            } else {
                ("two-backward", format!("{} has no clip stash (not a projected optimizer): the fused step measures the norm in a first backward", o.name.name()))
            };
            p.clip = ClipPlan { mode, stash_bytes: 0, budget: None, why };
            return p;
        }
        let with = Plan::build(cfg, bf16, label, true);
        let stash_bytes = 4 * with.clip_stash;
        let two = |why: String, budget: Option<u64>| {
            let mut p = Plan::build(cfg, bf16, label, false);
            p.clip = ClipPlan { mode: "two-backward", stash_bytes, budget, why };
            p
        };
        let stash = |mut p: Plan, why: String, budget: Option<u64>| {
            p.clip = ClipPlan { mode: "stash", stash_bytes, budget, why };
            p
        };
        let need = with.stepped.total;
        match (o.clip_mode, budget) {
            (ClipMode::Stash, _) => stash(with, "clip_mode = stash".to_string(), None),
            (ClipMode::TwoBackward, _) => two(format!("clip_mode = two-backward (the clip stash would take {})", gb(stash_bytes)), None),
            (ClipMode::Auto, None) => stash(with, format!("clip_mode = auto, no memory budget known: the clip stash ({}) is taken", gb(stash_bytes)), None),
            (ClipMode::Auto, Some(b)) if need <= b => stash(
                with,
                format!("clip_mode = auto: the plan with the clip stash ({}) needs {}, within the {} budget", gb(stash_bytes), gb(need), gb(b)),
                Some(b),
            ),
            (ClipMode::Auto, Some(b)) => two(
                format!(
                    "clip_mode = auto: the plan with the clip stash ({}) would need {}, beyond the {} budget; the fused step runs two backwards",
                    gb(stash_bytes),
                    gb(need),
                    gb(b)
                ),
                Some(b),
            ),
        }
    }

    /// The plan, with the clip stash allocated when `stash` (only where `clip_stash` holds).
    fn build(cfg: &EngineConfig, bf16: bool, label: &str, stash: bool) -> Plan {
        let (m, o) = (&cfg.model, &cfg.optimizer);
        let quant = linear_quant(o);
        let half = bf16 && half_tables(o);
        let fused = fused(cfg);
        let stash = stash && clip_stash(cfg);
        let lb = lora_build(o, cfg.seed);
        let mut shapes = layout(m);
        if let Some(lb) = &lb {
            shapes.extend(lora::layout(m, &lb.spec));
        }
        let (mut big_low, mut big_proj, mut wq, mut other) = (0usize, 0usize, 0usize, 0usize);
        let mut tensors = Vec::with_capacity(shapes.len());
        for (name, rows, cols, role) in shapes {
            let n = rows * cols;
            // frozen (no grad, no state): a LoRA model's base; the tables with freeze_embeddings
            let frozen = o.frozen(role);
            let weight_bytes = match (role, quant) {
                (Role::Linear, _) if lb.as_ref().is_some_and(|l| l.nf4) => {
                    wq = wq.max(n);
                    Nf4Tensor::storage_bytes(n)
                }
                (Role::Linear, Some(q)) => {
                    wq = wq.max(n);
                    QTensor::storage_bytes(n, q.bits, q.group)
                }
                (Role::LoraA | Role::LoraB, _) => 4 * n,
                (Role::Linear | Role::Embed | Role::Head, _) if bf16 && lb.as_ref().is_some_and(|l| l.half) => 2 * n,
                (Role::Embed | Role::Head, _) if half => 2 * n,
                _ => 4 * n,
            };
            if !matches!(role, Role::Embed | Role::Head) {
                other = other.max(n);
            }
            let projector = (o.projected() && role == Role::Linear).then(|| {
                let geom = ProjGeom::new(rows, cols, o.rank);
                big_low = big_low.max(geom.low);
                big_proj = big_proj.max(geom.numel);
                let stored_bytes = projector_bytes(geom.numel, o.proj_bits, o.proj_group_size) as u64;
                ProjPlan { geom, stored_bytes }
            });
            let sn = if frozen { 0 } else { projector.as_ref().map_or(n, |p| p.geom.low) };
            let eight = eight_bit_state(o, sn);
            let state_bytes = if eight { State8::storage_bytes(sn, o.block_size) } else { 2 * 4 * sn };
            let grad_len = (!fused && !frozen).then_some(n);
            let stash_len = if stash && !frozen { stash_len(role, n, projector.as_ref()) } else { 0 };
            tensors.push(TensorPlan {
                name,
                rows,
                cols,
                role,
                weight_bytes: weight_bytes as u64,
                grad_bytes: 4 * grad_len.unwrap_or(0) as u64,
                grad_len,
                grad_chunk_rows: None,
                state_bytes: state_bytes as u64,
                state_len: sn,
                eight_bit_state: eight,
                stash_len,
                projector,
            });
        }
        let (v, c) = (m.vocab_size, m.hidden_size);
        let table_block = (fused && eight_bit_state(o, v * c)).then_some(o.block_size);
        let chunk = table_chunk_rows(v, c, other, table_block).filter(|_| !o.frozen(Role::Embed));
        let mut shared_grad = 0;
        for t in tensors.iter_mut().filter(|t| t.grad_len.is_none() && !o.frozen(t.role)) {
            let table = matches!(t.role, Role::Embed | Role::Head);
            t.grad_chunk_rows = chunk.filter(|_| table);
            shared_grad = shared_grad.max(shared_grad_len(t.rows * t.cols, t.cols, t.grad_chunk_rows));
        }
        let activations = acts::buffers(m, cfg.batch_size, cfg.seq_len, wq, cfg.checkpointing);
        let lora_activations = lb.as_ref().map_or_else(Vec::new, |l| lora::act_buffers(m, &l.spec, cfg.batch_size, cfg.seq_len));
        let act_bytes: usize =
            activations.iter().chain(&lora_activations).map(|a| a.copies * a.len * if a.fp32 || !bf16 { 4 } else { 2 }).sum();
        let sum = |f: fn(&TensorPlan) -> u64| tensors.iter().map(f).sum::<u64>();
        let base_w = |t: &TensorPlan| if t.role.adapter() { 0 } else { t.weight_bytes };
        let adapter_w = |t: &TensorPlan| if t.role.adapter() { t.weight_bytes } else { 0 };
        let work = Work { projector: big_proj, projector_new: big_proj, low: big_low, update: if o.eight_bit() { big_low } else { 0 } };
        let (work_grads, work_projector) = work.bytes();
        let mut initial = Bytes {
            weights: tensors.iter().map(base_w).sum(),
            adapters: tensors.iter().map(adapter_w).sum(),
            grads: sum(|t| t.grad_bytes + 4 * t.stash_len as u64) + 4 * shared_grad as u64 + work_grads,
            optimizer_state: sum(|t| t.state_bytes),
            projector: work_projector,
            activations: act_bytes as u64,
            total: 0,
        };
        initial.total = initial.weights + initial.adapters + initial.grads + initial.optimizer_state + initial.projector + initial.activations;
        let stored = sum(|t| t.projector.as_ref().map_or(0, |p| p.stored_bytes));
        let stepped = Bytes { projector: initial.projector + stored, total: initial.total + stored, ..initial };
        Plan {
            params: tensors.iter().filter(|t| !o.frozen(t.role)).map(|t| (t.rows * t.cols) as u64).sum(),
            precision: if bf16 { "bf16" } else { "fp32" },
            fused,
            table_chunk_rows: chunk,
            shared_grad: shared_grad as u64,
            clip_stash: tensors.iter().map(|t| t.stash_len as u64).sum(),
            clip: ClipPlan { mode: "off", stash_bytes: 0, budget: None, why: String::new() },
            largest_low: big_low as u64,
            largest_projector: big_proj as u64,
            work,
            initial,
            stepped,
            tensors,
            activations,
            lora_activations,
            fit: fit(m, o, label),
        }
    }

    /// Plans a config as `qg_plan` receives it: bf16 when `precision` says so, or `auto` on
    /// `device = cuda` (as the CUDA engine resolves it). Planning never probes for a GPU, so
    /// `device = auto` with `precision = auto` is planned as the CPU runs it (fp32).
    /// `budget`: bytes `clip_mode = auto` plans for (`with_budget`); None: none known.
    pub fn for_config(cfg: &EngineConfig, label: &str, budget: Option<u64>) -> Plan {
        let bf16 = cfg.precision == Precision::Bf16 || (cfg.precision == Precision::Auto && cfg.device == Device::Cuda);
        Plan::with_budget(cfg, bf16, label, budget)
    }
}
