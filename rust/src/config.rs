//! Run configuration as it arrives from TypeScript (JSON, Hugging Face LlamaConfig names),
//! and the option schema: every optimizer option's type, range, per-optimizer default and
//! applicability, written once in `optim_options!` below. The engine checks and fills
//! configs from it, and `qg_options` hands it to the front end, which only adds flags and
//! help text. Errors name config fields (`weight_group_size = 3: …`), never CLI flags.

use crate::backend::Refresh;
use crate::ensure;
use crate::error::{Error, Result};
use crate::quant::Range;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub mod model;
pub mod rope;

pub use model::{ModelConfig, ModelProblem};

/// A closed set of names that travels as a JSON string (`"qgalore"`, `"eigh"`, …).
pub trait Named: Sized + Copy + PartialEq + 'static {
    /// Every value with its name, in the order messages and `--help` list them.
    const ALL: &'static [(Self, &'static str)];
    fn name(self) -> &'static str {
        Self::ALL.iter().find(|(v, _)| *v == self).map(|(_, n)| *n).unwrap_or("?")
    }
    fn parse(text: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == text).map(|(v, _)| *v)
    }
    fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|(_, n)| *n).collect()
    }
}

/// Optimizers the engine implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optimizer {
    AdamW,
    Adam8bit,
    Galore,
    Galore8bit,
    QGalore,
    /// Frozen base (bf16 or f32), trainable low-rank adapters (LoRA), AdamW on the adapters.
    Lora,
    /// Frozen NF4 base with double quantization (QLoRA), adapters as `Lora`.
    QLora,
}

impl Named for Optimizer {
    const ALL: &'static [(Self, &'static str)] = &[
        (Optimizer::AdamW, "adamw"),
        (Optimizer::Adam8bit, "adam8bit"),
        (Optimizer::Galore, "galore"),
        (Optimizer::Galore8bit, "galore8bit"),
        (Optimizer::QGalore, "qgalore"),
        (Optimizer::Lora, "lora"),
        (Optimizer::QLora, "qlora"),
    ];
}

impl Optimizer {
    /// Projects the 7 linear matrices of each block (GaLore, docs/algorithm-spec.md §1.4).
    pub fn projected(self) -> bool {
        matches!(self, Optimizer::Galore | Optimizer::Galore8bit | Optimizer::QGalore)
    }
    /// bnb-style block-wise 8-bit Adam states (≥ 4096 elements) for the non-projected
    /// tensors (docs/algorithm-spec.md §1.6).
    pub fn eight_bit(self) -> bool {
        matches!(self, Optimizer::Adam8bit | Optimizer::Galore8bit | Optimizer::QGalore)
    }
    /// Trains low-rank adapters on a frozen base (the "adapter" family: lora, qlora).
    pub fn adapter(self) -> bool {
        matches!(self, Optimizer::Lora | Optimizer::QLora)
    }
    /// The optimizer family the schema reports.
    pub fn family(self) -> &'static str {
        match self {
            Optimizer::AdamW | Optimizer::Adam8bit => "full",
            Optimizer::Galore | Optimizer::Galore8bit | Optimizer::QGalore => "galore",
            Optimizer::Lora | Optimizer::QLora => "adapter",
        }
    }
    /// May keep INT8 projected weights (Q-GaLore).
    pub fn int8_capable(self) -> bool {
        self == Optimizer::QGalore
    }
    /// The refusal of `weight_bits = 8` for an optimizer that cannot keep INT8 weights.
    fn no_int8(self) -> String {
        let capable: Vec<&str> = Self::ALL.iter().filter(|(o, _)| o.int8_capable()).map(|(_, n)| *n).collect();
        format!("weight_bits = 8: only {} keeps INT8 weights (not {})", capable.join(", "), self.name())
    }
    /// Refuses INT8 weights that `resolve` found given to an optimizer without them (every
    /// other option that does not apply is ignored by the engine).
    fn refuse_int8(self, off: &[NotApplicable]) -> Result<()> {
        ensure!(!off.iter().any(|n| n.when == When::Int8Capable), "{}", self.no_int8());
        Ok(())
    }
}

/// Storage of lora's frozen base: bf16 (`Backend::alloc_half`: bf16 under bf16 precision,
/// f32 on the CPU) or f32. qlora's base is always NF4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraBase {
    Bf16,
    F32,
}

impl Named for LoraBase {
    const ALL: &'static [(Self, &'static str)] = &[(LoraBase::Bf16, "bf16"), (LoraBase::F32, "f32")];
}

impl Named for Refresh {
    const ALL: &'static [(Self, &'static str)] = &[(Refresh::Svd, "svd"), (Refresh::Eigh, "eigh"), (Refresh::Randomized, "randomized")];
}

impl Named for Range {
    const ALL: &'static [(Self, &'static str)] = &[(Range::WithZero, "zero"), (Range::Reference, "reference")];
}

/// Lazy-refresh similarity: the reference's signed top-1 cosine, or its absolute value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CosMode {
    Signed,
    Abs,
}

impl Named for CosMode {
    const ALL: &'static [(Self, &'static str)] = &[(CosMode::Signed, "signed"), (CosMode::Abs, "abs")];
}

/// How the fused step clips (docs/algorithm-spec.md §1.5): `Stash` keeps the projected
/// optimizers' rank-r gradients until the global norm is known (one backward, the stash's
/// memory), `TwoBackward` measures the norm in a first backward (no stash), `Auto` takes
/// the stash when the plan with it fits the memory budget (`plan::ClipPlan`). Every mode
/// gives the same numbers bit for bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipMode {
    Auto,
    Stash,
    TwoBackward,
}

impl Named for ClipMode {
    const ALL: &'static [(Self, &'static str)] = &[(ClipMode::Auto, "auto"), (ClipMode::Stash, "stash"), (ClipMode::TwoBackward, "two-backward")];
}

/// How a projected matrix's rank-r gradient R is formed (docs/algorithm-spec.md §1.5b):
/// `Full`, the references' way: the whole gradient G = dYᵀ·X, then R = G·Qᵀ or Pᵀ·G;
/// `Factored`, R straight from the product's factors, dYᵀ·(X·Qᵀ) or (dY·P)ᵀ·X, on every
/// step that does not refresh the projector (a refresh needs G): fewer multiply-adds by
/// (1 − r·(m+n)/(m·n)) of each such product, the same R up to rounding. It needs clipping
/// off (the global norm is G's) and one process (`Engine::build` refuses it otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjGrad {
    Full,
    Factored,
}

impl Named for ProjGrad {
    const ALL: &'static [(Self, &'static str)] = &[(ProjGrad::Full, "full"), (ProjGrad::Factored, "factored")];
}

/// What the ranks of a data-parallel run all-reduce for a projected matrix (`dist::lowrank`,
/// docs/algorithm-spec.md §1.5a): `Full`, the whole gradient (exact, clipping included);
/// `LowRank`, its rank-r projection R between projector refreshes (exact without clipping;
/// with clipping the norm is taken over what the optimizer consumes); `Auto`, `LowRank`
/// when clipping is off and `Full` when it is on. No effect in a one-process run, nor for an
/// optimizer that projects nothing (it all-reduces whole gradients either way). Only the
/// global step sends R: the fused step (`dist::overlap`) sums whole gradients, and the front
/// end turns it off for `lowrank` (lib/dist.ts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpComm {
    Auto,
    Full,
    LowRank,
}

impl Named for DpComm {
    const ALL: &'static [(Self, &'static str)] = &[(DpComm::Auto, "auto"), (DpComm::Full, "full"), (DpComm::LowRank, "lowrank")];
}

impl DpComm {
    /// What a run with `cfg` uses: `Full` or `LowRank` (never `Auto`).
    pub fn resolve(cfg: &OptimConfig) -> DpComm {
        match cfg.dp_comm {
            _ if !cfg.projected() => DpComm::Full,
            DpComm::Auto if cfg.clip > 0.0 => DpComm::Full,
            DpComm::Auto => DpComm::LowRank,
            c => c,
        }
    }
}

/// Where the engine runs; `Auto` takes CUDA when a usable device is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
    Auto,
}

impl Named for Device {
    const ALL: &'static [(Self, &'static str)] = &[(Device::Cpu, "cpu"), (Device::Cuda, "cuda"), (Device::Auto, "auto")];
}

/// Activation and GEMM precision: `Bf16` keeps activations and GEMM inputs in bf16 with
/// fp32 accumulation (on a GPU, or on a CPU with AVX512-BF16 or AMX-BF16); `Auto` is bf16
/// on a GPU and fp32 on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Auto,
    Fp32,
    Bf16,
}

impl Named for Precision {
    const ALL: &'static [(Self, &'static str)] = &[(Precision::Auto, "auto"), (Precision::Fp32, "fp32"), (Precision::Bf16, "bf16")];
}

/// Allowed numeric values (the front end formats the same data in its messages).
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bounds {
    #[serde(skip_serializing_if = "is_false")]
    pub int: bool,
    /// Lower bound; `open` makes it strict.
    pub min: f64,
    #[serde(skip_serializing_if = "is_false")]
    pub open: bool,
    /// Upper bound; `max_open` makes it strict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(skip_serializing_if = "is_false")]
    pub max_open: bool,
    /// The only values allowed.
    #[serde(skip_serializing_if = "<[f64]>::is_empty")]
    pub one_of: &'static [f64],
    #[serde(skip_serializing_if = "is_false")]
    pub even: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

// The engine takes floats as f32; anything larger would arrive as infinity.
const F32_MAX: f64 = 3.4e38;

/// The largest count (batch, sequence, rank, gap, threads, model sizes) the engine takes:
/// 2^31 keeps every product of two counts inside an i64/usize index and any loop bounded,
/// and is far beyond anything a real run addresses.
pub const MAX_COUNT: f64 = 2147483648.0;

impl Bounds {
    const fn at_least(min: f64) -> Self {
        Bounds { int: false, min, open: false, max: None, max_open: false, one_of: &[], even: false }
    }
    const fn int(min: f64) -> Self {
        Bounds { int: true, ..Bounds::at_least(min) }
    }
    const fn above(min: f64) -> Self {
        Bounds { open: true, ..Bounds::at_least(min) }
    }
    const fn max(self, max: f64) -> Self {
        Bounds { max: Some(max), ..self }
    }
    const fn below(self, max: f64) -> Self {
        Bounds { max: Some(max), max_open: true, ..self }
    }
    const fn even(self) -> Self {
        Bounds { even: true, ..self }
    }
    const fn one_of(self, values: &'static [f64]) -> Self {
        Bounds { one_of: values, ..self }
    }

    pub fn contains(&self, v: f64) -> bool {
        v.is_finite()
            && (!self.int || v.fract() == 0.0)
            && (if self.open { v > self.min } else { v >= self.min })
            && self.max.is_none_or(|m| if self.max_open { v < m } else { v <= m })
            && (self.one_of.is_empty() || self.one_of.contains(&v))
            && (!self.even || v % 2.0 == 0.0)
    }

    /// "an even integer in [2, 1024]", "one of 256, 2048", "a number > 0".
    pub fn describe(&self) -> String {
        if !self.one_of.is_empty() {
            return format!("one of {}", self.one_of.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "));
        }
        let kind = if self.even { "an even integer" } else if self.int { "an integer" } else { "a number" };
        match self.max {
            // the count limit reads as a cap on "≥ min", so "≥ 1" messages keep their start
            Some(m) if m == MAX_COUNT && !self.open => format!("{kind} ≥ {} and ≤ {m}", self.min),
            None => format!("{kind} {} {}", if self.open { ">" } else { "≥" }, self.min),
            Some(m) => format!(
                "{kind} in {}{}, {}{}",
                if self.open { "(" } else { "[" },
                self.min,
                m,
                if self.max_open { ")" } else { "]" }
            ),
        }
    }
}

/// When an option applies, given the optimizer and the other options. A failed condition
/// is reported by name; the front end words it with its flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    All,
    /// The projected optimizers (galore, galore8bit, qgalore).
    Projected,
    /// The optimizers with 8-bit Adam states.
    EightBit,
    /// Value 8 (INT8 weights) needs qgalore; 16 (float weights) is every optimizer's.
    Int8Capable,
    /// INT8 weights: qgalore with weight_bits 8.
    Int8Weights,
    /// A projected optimizer whose projectors are quantized (proj_bits 4 or 8).
    QuantizedProjector,
    /// INT8 weights or quantized projectors.
    Quantized,
    /// A projected optimizer with the lazy refresh on.
    Lazy,
    /// Fused steps need one micro-batch per update (accumulated gradients must persist).
    OneMicroBatch,
    /// The adapter optimizers (lora, qlora).
    Adapter,
    /// lora only (qlora's base is always NF4).
    Lora,
}

/// How an option's value travels as JSON and where it is checked.
pub trait OptionValue: Sized + Copy {
    /// "number", "integer", "switch" or "choice".
    const TYPE: &'static str;
    fn choices() -> Vec<&'static str> {
        Vec::new()
    }
    fn from_json(v: &Value, bounds: Option<&Bounds>) -> Option<Self>;
    fn to_json(self) -> Value;
    /// What is allowed, in words, when the type says more than its bounds (lists).
    fn allowed() -> Option<String> {
        None
    }
}

/// `lora_targets`: a comma list of module names or `all-linear` (`model::lora::Targets`).
impl OptionValue for crate::model::lora::Targets {
    const TYPE: &'static str = "string";
    fn from_json(v: &Value, _: Option<&Bounds>) -> Option<Self> {
        v.as_str().and_then(crate::model::lora::Targets::parse)
    }
    fn to_json(self) -> Value {
        Value::String(self.text())
    }
    fn allowed() -> Option<String> {
        Some(format!("a comma list of {}, or all-linear", crate::model::lora::MODULES.join(", ")))
    }
}

fn number(v: &Value, bounds: Option<&Bounds>) -> Option<f64> {
    v.as_f64().filter(|x| bounds.is_none_or(|b| b.contains(*x)))
}

macro_rules! numeric_value {
    ($t:ty, $kind:literal) => {
        impl OptionValue for $t {
            const TYPE: &'static str = $kind;
            fn from_json(v: &Value, bounds: Option<&Bounds>) -> Option<Self> {
                number(v, bounds).map(|x| x as $t)
            }
            fn to_json(self) -> Value {
                serde_json::json!(self)
            }
        }
    };
}
numeric_value!(usize, "integer");
numeric_value!(u64, "integer");
numeric_value!(u8, "integer");

impl OptionValue for f32 {
    const TYPE: &'static str = "number";
    fn from_json(v: &Value, bounds: Option<&Bounds>) -> Option<Self> {
        number(v, bounds).map(|x| x as f32)
    }
    fn to_json(self) -> Value {
        f32_json(self)
    }
}

/// The shortest decimal that reads back as this f32 (0.95, not 0.949999988…): how every f32
/// the engine reports (schema, resolved configs, messages) is written.
pub(crate) fn f32_json(x: f32) -> Value {
    serde_json::json!(x.to_string().parse::<f64>().unwrap_or(x as f64))
}

impl OptionValue for bool {
    const TYPE: &'static str = "switch";
    fn from_json(v: &Value, _: Option<&Bounds>) -> Option<Self> {
        v.as_bool()
    }
    fn to_json(self) -> Value {
        Value::Bool(self)
    }
}

macro_rules! choice_value {
    ($($t:ty),*) => {$(
        impl OptionValue for $t {
            const TYPE: &'static str = "choice";
            fn choices() -> Vec<&'static str> {
                <$t>::names()
            }
            fn from_json(v: &Value, _: Option<&Bounds>) -> Option<Self> {
                v.as_str().and_then(<$t>::parse)
            }
            fn to_json(self) -> Value {
                Value::String(self.name().into())
            }
        }
    )*};
}
choice_value!(Refresh, Range, CosMode, Device, Precision, LoraBase, ClipMode, DpComm, ProjGrad);

/// Parses one option; the message names the field, the value and what is allowed.
fn option<T: OptionValue>(field: &str, v: &Value, bounds: Option<&Bounds>) -> Result<T> {
    T::from_json(v, bounds).ok_or_else(|| {
        let shown = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        let allowed = match (T::TYPE, bounds) {
            _ if T::allowed().is_some() => T::allowed().unwrap_or_default(),
            ("switch", _) => "true or false".to_string(),
            ("choice", _) => format!("one of {}", T::choices().join(", ")),
            (_, Some(b)) => b.describe(),
            (_, None) => "a number".to_string(),
        };
        Error::invalid(format!("{field} = {shown}: must be {allowed}"))
    })
}

/// A config field's name and allowed values, as the schema states them.
#[derive(Clone, Debug, Serialize)]
pub struct ValueSpec {
    pub name: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<Bounds>,
}

impl ValueSpec {
    fn of<T: OptionValue>(name: &'static str, range: Option<Bounds>) -> Self {
        ValueSpec { name, kind: T::TYPE, choices: T::choices(), range }
    }
}

/// One optimizer option as the schema states it.
#[derive(Clone, Debug, Serialize)]
pub struct OptionSpec {
    #[serde(flatten)]
    pub value: ValueSpec,
    pub applies: When,
    /// Default per optimizer, for the optimizers it applies to by default.
    pub default: Map<String, Value>,
}

/// An option the caller set that does not apply (`not_applicable` of `resolve`).
#[derive(Clone, Debug, Serialize)]
pub struct NotApplicable {
    pub field: &'static str,
    /// The condition that failed.
    pub when: When,
}

/// Declares the optimizer options once: field, type, range, default (a function of the
/// optimizer and of grad_accum) and when it applies. The order is the order in which
/// options that do not apply are reported.
macro_rules! optim_options {
    ($( $(#[$doc:meta])* $field:ident : $t:ty, $bounds:expr, $default:expr, $when:ident; )*) => {
        /// Optimizer settings, every one filled (from the schema's defaults when absent).
        #[derive(Clone, Debug)]
        pub struct OptimConfig {
            pub name: Optimizer,
            $( $(#[$doc])* pub $field: $t, )*
        }

        impl OptimConfig {
            /// Every option's schema entry.
            pub fn specs() -> Vec<OptionSpec> {
                let mut out = Vec::new();
                $({
                    let mut default = Map::new();
                    for &(o, name) in Optimizer::ALL {
                        let d = OptimConfig::defaults(o, DEFAULT_GRAD_ACCUM);
                        if d.applies(When::$when, false, DEFAULT_GRAD_ACCUM).is_ok() {
                            default.insert(name.into(), d.$field.to_json());
                        }
                    }
                    out.push(OptionSpec {
                        value: ValueSpec::of::<$t>(stringify!($field), $bounds),
                        applies: When::$when,
                        default,
                    });
                })*
                out
            }

            /// Every option at `name`'s default (with `grad_accum` micro-batches per update).
            pub fn defaults(name: Optimizer, grad_accum: usize) -> Self {
                OptimConfig { name, $( $field: ($default)(name, grad_accum), )* }
            }

            /// Parses a JSON optimizer section: checks every given option against its range
            /// and fills the others with `name`'s defaults. Returns the config and the given
            /// options that do not apply (front ends reject those; the engine ignores them).
            pub fn resolve(obj: &Map<String, Value>, grad_accum: usize) -> Result<(Self, Vec<NotApplicable>)> {
                OptimConfig::resolve_with(obj, grad_accum, false)
            }

            /// `resolve`; when `lenient`, a given value out of range is an error only if its
            /// option applies (an estimate ignores settings that do not apply, valid or not).
            pub fn resolve_with(obj: &Map<String, Value>, grad_accum: usize, lenient: bool) -> Result<(Self, Vec<NotApplicable>)> {
                let name: Optimizer = match obj.get("name") {
                    Some(v) => v.as_str().and_then(Optimizer::parse).ok_or_else(|| {
                        let shown = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                        Error::invalid(format!("optimizer = {shown}: must be one of {}", Optimizer::names().join(", ")))
                    })?,
                    None => return Err(Error::invalid("optimizer name: missing")),
                };
                let mut cfg = OptimConfig::defaults(name, grad_accum);
                // the invalid values, in declaration order (their options keep the default)
                let mut bad: Vec<(&str, Error)> = Vec::new();
                $(
                    if let Some(v) = obj.get(stringify!($field)).filter(|v| !v.is_null()) {
                        match option(stringify!($field), v, $bounds.as_ref()) {
                            Ok(x) => cfg.$field = x,
                            Err(e) => bad.push((stringify!($field), e)),
                        }
                    }
                )*
                if !lenient {
                    if let Some((_, e)) = bad.into_iter().next() {
                        return Err(e);
                    }
                    bad = Vec::new();
                }
                let mut off = Vec::new();
                $(
                    let given = obj.get(stringify!($field)).is_some_and(|v| !v.is_null());
                    if let Err(when) = cfg.applies(When::$when, given, grad_accum) {
                        if given {
                            off.push(NotApplicable { field: stringify!($field), when });
                        }
                    }
                )*
                if let Some((_, e)) = bad.into_iter().find(|(f, _)| !off.iter().any(|n| n.field == *f)) {
                    return Err(e);
                }
                cfg.check_freeze()?;
                cfg.check_proj_grad()?;
                Ok((cfg, off))
            }

            /// Every option as JSON.
            pub fn to_map(&self) -> Map<String, Value> {
                let mut out = Map::new();
                out.insert("name".into(), Value::String(self.name.name().into()));
                $( out.insert(stringify!($field).into(), self.$field.to_json()); )*
                out
            }

            /// The options that apply, as JSON (what a front end reports and sends back).
            pub fn applicable(&self, given: &Map<String, Value>) -> Map<String, Value> {
                let mut out = Map::new();
                out.insert("name".into(), Value::String(self.name.name().into()));
                $(
                    let g = given.get(stringify!($field)).is_some_and(|v| !v.is_null());
                    if self.applies(When::$when, g, DEFAULT_GRAD_ACCUM).is_ok() {
                        out.insert(stringify!($field).into(), self.$field.to_json());
                    }
                )*
                out
            }
        }
    };
}

fn all<T: Copy>(v: T) -> impl Fn(Optimizer, usize) -> T {
    move |_, _| v
}

fn per<T: Copy>(other: T, qgalore: T) -> impl Fn(Optimizer, usize) -> T {
    move |o, _| if o == Optimizer::QGalore { qgalore } else { other }
}

// Defaults: the reference runs of docs/algorithm-spec.md §1.7 (GaLore: ε 1e-6, β2 0.999, r 128,
// T 200, α 0.25, bf16 projectors), §1.6 (8-bit Adam: ε 1e-8, block 2048) and §2.6 (Q-GaLore
// C4 runs: β2 0.95, INT8 weights with stochastic rounding, INT4 projectors, lazy refresh
// with threshold 0.4, queue 5, γ 2). Projectors refresh by `eigh` (exact and faster than the
// reference `svd`). The GaLore family steps inside the backward when grad_accum is 1.
optim_options! {
    beta1: f32, Some(Bounds::at_least(0.0).below(1.0)), all(0.9), All;
    beta2: f32, Some(Bounds::at_least(0.0).below(1.0)), per(0.999, 0.95), All;
    eps: f32, Some(Bounds::above(0.0)), |o: Optimizer, _| if o == Optimizer::Galore { 1e-6 } else { 1e-8 }, All;
    weight_decay: f32, Some(Bounds::at_least(0.0)), all(0.0), All;
    /// Global gradient-norm clipping threshold; 0 disables it.
    clip: f32, Some(Bounds::at_least(0.0)), all(0.0), All;
    // GaLore / Q-GaLore (docs/algorithm-spec.md §1.2–1.6, §2)
    rank: usize, Some(COUNT), all(128), Projected;
    update_gap: u64, Some(COUNT), all(200), Projected;
    galore_scale: f32, Some(Bounds::above(0.0).max(F32_MAX)), all(0.25), Projected;
    /// 4 (packed INT4), 8, 16 (bf16) or 32 (f32) projector storage.
    proj_bits: u8, Some(Bounds::int(4.0).one_of(&[4.0, 8.0, 16.0, 32.0])), per(16, 4), Projected;
    proj_refresh: Refresh, None, all(Refresh::Eigh), Projected;
    /// Lazy layer-wise subspace refresh (docs/algorithm-spec.md §2.5).
    lazy: bool, None, per(false, true), Projected;
    /// bnb block size for 8-bit states (2048 in bnb 0.43.1, 256 in later versions).
    block_size: usize, Some(Bounds::int(256.0).one_of(&[256.0, 2048.0])), all(2048), EightBit;
    /// 8: INT8 projected weights (Q-GaLore); 16: float weights.
    weight_bits: u8, Some(Bounds::int(8.0).one_of(&[8.0, 16.0])), per(16, 8), Int8Capable;
    stochastic_round: bool, None, all(true), Int8Weights;
    weight_group_size: usize, Some(Bounds::int(2.0).max(crate::quant::MAX_GROUP as f64).even()), all(256), Int8Weights;
    proj_group_size: usize, Some(Bounds::int(2.0).max(crate::quant::MAX_GROUP as f64).even()), all(256), QuantizedProjector;
    quant_range: Range, None, all(Range::WithZero), Quantized;
    cos_threshold: f32, Some(Bounds::at_least(-1.0).max(1.0)), all(0.4), Lazy;
    queue_size: usize, Some(Bounds::int(1.0).max(1e6)), all(5), Lazy;
    gamma: u64, Some(Bounds::int(1.0).max(1e6)), all(2), Lazy;
    cos_mode: CosMode, None, all(CosMode::Signed), Lazy;
    /// Optimizer steps inside the backward pass (per-layer updates, docs/algorithm-spec.md §1.5).
    fused: bool, None, |o: Optimizer, ga: usize| o.projected() && ga == 1, OneMicroBatch;
    /// How the fused step clips (`ClipMode`): auto, stash or two-backward.
    clip_mode: ClipMode, None, all(ClipMode::Auto), Projected;
    /// How R is formed (`ProjGrad`): full (G, then its projection) or factored.
    proj_grad: ProjGrad, None, all(ProjGrad::Full), Projected;
    // LoRA / QLoRA (PEFT's LoraConfig defaults for LLaMA: r 8, alpha 8, dropout 0, q_proj and v_proj)
    /// Adapter rank r (≤ min(rows, cols) of every target matrix).
    lora_rank: usize, Some(COUNT), all(8), Adapter;
    /// Adapter scale alpha/r (alpha/√r with lora_rslora).
    lora_alpha: f32, Some(Bounds::above(0.0).max(F32_MAX)), all(8.0), Adapter;
    /// Dropout on the adapter's input during training (PEFT's lora_dropout).
    lora_dropout: f32, Some(Bounds::at_least(0.0).below(1.0)), all(0.0), Adapter;
    /// The adapted modules of every block.
    lora_targets: crate::model::lora::Targets, None, all(crate::model::lora::Targets::DEFAULT), Adapter;
    /// Rank-stabilized scale alpha/√r (PEFT's use_rslora).
    lora_rslora: bool, None, all(false), Adapter;
    /// lora's frozen base storage (qlora's is NF4).
    lora_base: LoraBase, None, all(LoraBase::Bf16), Lora;
    /// Freezes the token embedding and the lm_head (one table when tied): no gradient, no
    /// optimizer state, weights unchanged (`OptimConfig::frozen`). Always on for lora and
    /// qlora (their default; false is refused there).
    freeze_embeddings: bool, None, |o: Optimizer, _| o.adapter(), All;
    /// Data-parallel communication of projected matrices (`DpComm`): auto, full or lowrank.
    dp_comm: DpComm, None, all(DpComm::Auto), All;
}

impl OptimConfig {
    /// Keeps INT8 projected weights.
    pub fn int8_weights(&self) -> bool {
        self.name.int8_capable() && self.weight_bits == 8
    }
    /// Stores quantized projectors.
    pub fn quantized_projector(&self) -> bool {
        self.name.projected() && matches!(self.proj_bits, 4 | 8)
    }

    /// Whether `when` holds; on failure, the first condition that does not. `given` says
    /// whether the caller set the option (16-bit weights apply to every optimizer only when
    /// asked for; fused steps conflict with `grad_accum` > 1 only when asked for).
    pub fn applies(&self, when: When, given: bool, grad_accum: usize) -> std::result::Result<(), When> {
        let ok = |b: bool, w: When| if b { Ok(()) } else { Err(w) };
        let projected = ok(self.name.projected(), When::Projected);
        match when {
            When::All => Ok(()),
            When::Projected => projected,
            When::EightBit => ok(self.name.eight_bit(), when),
            When::Int8Capable => ok(self.name.int8_capable() || (given && self.weight_bits == 16), when),
            When::Int8Weights => ok(self.int8_weights(), when),
            When::QuantizedProjector => projected.and(ok(self.quantized_projector(), when)),
            When::Quantized => ok(self.int8_weights() || self.quantized_projector(), when),
            When::Lazy => projected.and(ok(self.lazy, when)),
            When::OneMicroBatch => ok(!(given && self.fused && grad_accum > 1), when),
            When::Adapter => ok(self.name.adapter(), when),
            When::Lora => ok(self.name == Optimizer::Lora, when),
        }
    }

    pub fn projected(&self) -> bool {
        self.name.projected()
    }

    /// Whether a parameter of `role` is frozen (no gradient, no optimizer state, never
    /// updated): the one owner of the rule. An adapter run trains only its adapters; with
    /// `freeze_embeddings` the token embedding and the lm_head are frozen.
    pub fn frozen(&self, role: crate::model::llama::Role) -> bool {
        use crate::model::llama::Role;
        if self.name.adapter() {
            !role.adapter()
        } else {
            self.freeze_embeddings && matches!(role, Role::Embed | Role::Head)
        }
    }

    /// lora and qlora always freeze the embedding and the head: `freeze_embeddings = false`
    /// is refused there rather than ignored.
    fn check_freeze(&self) -> Result<()> {
        ensure!(
            self.freeze_embeddings || !self.name.adapter(),
            "freeze_embeddings = false: {} always freezes the token embedding and lm_head (it cannot be turned off)",
            self.name.name()
        );
        Ok(())
    }
    pub fn eight_bit(&self) -> bool {
        self.name.eight_bit()
    }

    /// Clipping needs the whole gradient's norm, which `proj_grad = factored` never forms
    /// (docs/algorithm-spec.md §1.5b): the pair is refused rather than either ignored.
    fn check_proj_grad(&self) -> Result<()> {
        ensure!(
            !(self.projected() && self.proj_grad == ProjGrad::Factored && self.clip > 0.0),
            "proj_grad factored needs clip 0 (clipping needs the whole gradient's norm, which the factored product never forms): use proj_grad full, or clip 0"
        );
        Ok(())
    }
}

impl<'de> Deserialize<'de> for OptimConfig {
    /// Missing options take the optimizer's defaults (for one micro-batch per update);
    /// options that do not apply are ignored, except INT8 weights for an optimizer
    /// without them.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let obj = Map::deserialize(d)?;
        let (cfg, off) = OptimConfig::resolve(&obj, DEFAULT_GRAD_ACCUM).map_err(|e| serde::de::Error::custom(e.msg))?;
        cfg.name.refuse_int8(&off).map_err(|e| serde::de::Error::custom(e.msg))?;
        Ok(cfg)
    }
}

/// A run-level option (top level of `EngineConfig`) as the schema states it.
#[derive(Clone, Debug, Serialize)]
pub struct RunSpec {
    #[serde(flatten)]
    pub value: ValueSpec,
    /// The engine's default; absent when the field is required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
}

/// A count: an integer in [1, MAX_COUNT].
const COUNT: Bounds = Bounds::int(1.0).max(MAX_COUNT);
/// A thread count: 0 (one per core) up to MAX_COUNT; the CPU backend caps it at the cores.
const THREADS: Bounds = Bounds::int(0.0).max(MAX_COUNT);
const DEFAULT_DEVICE: Device = Device::Cpu;
const DEFAULT_PRECISION: Precision = Precision::Auto;
const DEFAULT_GRAD_ACCUM: usize = 1;
const DEFAULT_CHECKPOINTING: bool = false;
const DEFAULT_SEED: u64 = 0;
/// Worker threads; 0 means one per core.
const DEFAULT_THREADS: usize = 0;

fn run_spec<T: OptionValue>(name: &'static str, range: Option<Bounds>, default: Option<T>) -> RunSpec {
    RunSpec { value: ValueSpec::of::<T>(name, range), default: default.map(T::to_json) }
}

/// The run-level options: batch shape, accumulation, device, precision, checkpointing,
/// seed and threads.
pub fn run_specs() -> Vec<RunSpec> {
    vec![
        run_spec::<usize>("batch_size", Some(COUNT), None),
        run_spec::<usize>("seq_len", Some(COUNT), None),
        run_spec::<usize>("grad_accum", Some(COUNT), Some(DEFAULT_GRAD_ACCUM)),
        run_spec::<Device>("device", None, Some(DEFAULT_DEVICE)),
        run_spec::<Precision>("precision", None, Some(DEFAULT_PRECISION)),
        run_spec::<bool>("checkpointing", None, Some(DEFAULT_CHECKPOINTING)),
        run_spec::<u64>("seed", None, Some(DEFAULT_SEED)),
        run_spec::<usize>("threads", Some(THREADS), Some(DEFAULT_THREADS)),
    ]
}

/// The schema `qg_options` returns: optimizers (with their families), optimizer options,
/// run-level options, and the largest float the engine takes (`f32_max`).
pub fn schema_json() -> String {
    let optimizers: Vec<Value> = Optimizer::ALL
        .iter()
        .map(|&(o, name)| serde_json::json!({ "name": name, "family": o.family(), "projected": o.projected(), "eight_bit": o.eight_bit(), "int8": o.int8_capable(), "adapter": o.adapter() }))
        .collect();
    serde_json::json!({ "optimizers": optimizers, "options": OptimConfig::specs(), "run": run_specs(), "f32_max": F32_MAX, "max_count": MAX_COUNT }).to_string()
}

/// What `qg_resolve_optimizer` returns for a JSON
/// `{ "optimizer": {…}, "grad_accum": n, "device": …, "precision": … , "lenient": bool }` (all
/// but the optimizer name optional; `lenient`: see `OptimConfig::resolve_with`): `{ "config": {…the options that apply…}, "not_applicable": [{ field, when }] }`
/// or `{ "error": "…" }`.
pub fn resolve_json(text: &str) -> String {
    let r = (|| -> Result<Value> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::invalid(format!("resolve: {e}")))?;
        let device = choice("device", v.get("device").cloned())?.unwrap_or(DEFAULT_DEVICE);
        check_device(device, choice("precision", v.get("precision").cloned())?.unwrap_or(DEFAULT_PRECISION))?;
        let empty = Map::new();
        let obj = v.get("optimizer").and_then(Value::as_object).unwrap_or(&empty);
        let ga = v.get("grad_accum").and_then(Value::as_u64).map_or(DEFAULT_GRAD_ACCUM, |n| n as usize);
        let lenient = v.get("lenient").and_then(Value::as_bool).unwrap_or(false);
        let (cfg, off) = OptimConfig::resolve_with(obj, ga, lenient)?;
        Ok(serde_json::json!({ "config": cfg.applicable(obj), "not_applicable": off }))
    })();
    r.unwrap_or_else(|e| serde_json::json!({ "error": e.msg })).to_string()
}

/// Everything the engine needs to build a trainable model.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub model: ModelConfig,
    pub batch_size: usize,
    pub seq_len: usize,
    pub optimizer: OptimConfig,
    pub seed: u64,
    pub device: Device,
    /// Worker threads for this engine; 0 means all cores.
    pub threads: usize,
    /// Micro-batches per optimizer step (every `train_step` must pass this many).
    pub grad_accum: usize,
    /// Activation and GEMM precision.
    pub precision: Precision,
    /// Activation checkpointing: keep only each block's input and recompute the block's
    /// forward in the backward (one extra forward per step; the gradients are identical).
    pub checkpointing: bool,
}

/// The JSON form of `EngineConfig`: choices and the optimizer section are parsed after
/// serde so that errors name the field.
#[derive(Deserialize)]
struct RawConfig {
    model: Map<String, Value>,
    // counts arrive as JSON values and are checked by `option` so that errors name the field
    batch_size: Value,
    seq_len: Value,
    optimizer: Map<String, Value>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    device: Option<Value>,
    #[serde(default)]
    threads: Option<Value>,
    #[serde(default)]
    grad_accum: Option<Value>,
    #[serde(default)]
    precision: Option<Value>,
    #[serde(default)]
    checkpointing: Option<bool>,
}

fn choice<T: OptionValue>(field: &str, v: Option<Value>) -> Result<Option<T>> {
    v.map(|v| option(field, &v, None)).transpose()
}

impl EngineConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| Error::invalid(format!("engine config: {e}")))?;
        let count = |field: &str, v: Option<&Value>, bounds: &Bounds, default: usize| -> Result<usize> {
            v.map_or(Ok(default), |v| option::<usize>(field, v, Some(bounds)))
        };
        let grad_accum = count("grad_accum", raw.grad_accum.as_ref(), &COUNT, DEFAULT_GRAD_ACCUM)?;
        let batch_size = count("batch_size", Some(&raw.batch_size), &COUNT, 0)?;
        let seq_len = count("seq_len", Some(&raw.seq_len), &COUNT, 0)?;
        let threads = count("threads", raw.threads.as_ref(), &THREADS, DEFAULT_THREADS)?;
        let (optimizer, off) = OptimConfig::resolve(&raw.optimizer, grad_accum)?;
        optimizer.name.refuse_int8(&off)?;
        let cfg = EngineConfig {
            model: ModelConfig::from_map(&raw.model)?,
            batch_size,
            seq_len,
            optimizer,
            seed: raw.seed.unwrap_or(DEFAULT_SEED),
            device: choice("device", raw.device)?.unwrap_or(DEFAULT_DEVICE),
            threads,
            grad_accum,
            precision: choice("precision", raw.precision)?.unwrap_or(DEFAULT_PRECISION),
            checkpointing: raw.checkpointing.unwrap_or(DEFAULT_CHECKPOINTING),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what the types cannot (configs built in Rust skip `from_json`).
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        for (field, v) in [("batch_size", self.batch_size), ("seq_len", self.seq_len), ("grad_accum", self.grad_accum)] {
            option::<usize>(field, &Value::from(v), Some(&COUNT))?;
        }
        if let Some(p) = model::check_seq_len(self.seq_len as f64, self.model.max_position_embeddings as f64) {
            return Err(Error::invalid(p.text()));
        }
        // Re-check every option against the schema: a config built in Rust skips `resolve`,
        // and from JSON this catches values that pass as f64 but not as f32 (eps 1e-50 → 0).
        let o = &self.optimizer;
        let (_, off) = OptimConfig::resolve(&o.to_map(), self.grad_accum)?;
        o.name.refuse_int8(&off)?;
        check_device(self.device, self.precision)
    }
}

/// Precision rules a device imposes before any GPU is probed: bf16 on the CPU needs
/// AVX512-BF16 or AMX-BF16, asked of the processor at run time (`host::bf16::kernel`;
/// `QGALORE_CPU_BF16=emulate` lets tests run the exact bf16 path anywhere).
fn check_device(device: Device, precision: Precision) -> Result<()> {
    if device == Device::Cpu && precision == Precision::Bf16 {
        crate::host::bf16::kernel().map_err(Error::invalid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn unknown_choices_name_the_field_and_the_choices() {
        let e = OptimConfig::resolve(&obj(r#"{"name":"galore","proj_refresh":"qr"}"#), 1).unwrap_err();
        assert_eq!(e.msg, "proj_refresh = qr: must be one of svd, eigh, randomized");
        let e = OptimConfig::resolve(&obj(r#"{"name":"sgd"}"#), 1).unwrap_err();
        assert_eq!(e.msg, "optimizer = sgd: must be one of adamw, adam8bit, galore, galore8bit, qgalore, lora, qlora");
        let e = OptimConfig::resolve(&obj(r#"{"name":"qgalore","weight_group_size":3}"#), 1).unwrap_err();
        assert_eq!(e.msg, "weight_group_size = 3: must be an even integer in [2, 1024]");
        let e = OptimConfig::resolve(&obj(r#"{"name":"qgalore","lazy":"yes"}"#), 1).unwrap_err();
        assert_eq!(e.msg, "lazy = yes: must be true or false");
        let e = serde_json::from_str::<OptimConfig>(r#"{"name":"galore","weight_bits":8}"#).unwrap_err();
        assert_eq!(e.to_string(), "weight_bits = 8: only qgalore keeps INT8 weights (not galore)");
        assert_eq!(Optimizer::Galore8bit.no_int8(), "weight_bits = 8: only qgalore keeps INT8 weights (not galore8bit)");
    }

    #[test]
    fn defaults_follow_the_optimizer() {
        let q = OptimConfig::defaults(Optimizer::QGalore, 1);
        assert!(q.int8_weights() && q.quantized_projector() && q.lazy && q.fused);
        assert_eq!((q.beta2, q.proj_bits, q.weight_bits), (0.95, 4, 8));
        let g = OptimConfig::defaults(Optimizer::Galore, 2);
        assert!(!g.fused && !g.lazy && g.eps == 1e-6 && g.proj_refresh == Refresh::Eigh);
        assert!(!OptimConfig::defaults(Optimizer::AdamW, 1).fused);
    }

    #[test]
    fn options_that_do_not_apply_are_reported_with_the_failed_condition() {
        let (_, off) = OptimConfig::resolve(&obj(r#"{"name":"adamw","rank":8,"weight_bits":16,"cos_threshold":0.5}"#), 1).unwrap();
        let got: Vec<_> = off.iter().map(|n| (n.field, n.when)).collect();
        assert_eq!(got, [("rank", When::Projected), ("cos_threshold", When::Projected)]);
        let (c, off) = OptimConfig::resolve(&obj(r#"{"name":"galore","proj_group_size":64,"fused":true}"#), 2).unwrap();
        let got: Vec<_> = off.iter().map(|n| (n.field, n.when)).collect();
        assert_eq!(got, [("proj_group_size", When::QuantizedProjector), ("fused", When::OneMicroBatch)]);
        assert!(!c.applicable(&Map::new()).contains_key("proj_group_size"));
    }

    #[test]
    fn lenient_resolution_ignores_invalid_values_that_do_not_apply() {
        let adamw = obj(r#"{"name":"adamw","rank":0,"proj_bits":3}"#);
        assert_eq!(OptimConfig::resolve(&adamw, 1).unwrap_err().msg, "rank = 0: must be an integer ≥ 1 and ≤ 2147483648");
        let (_, off) = OptimConfig::resolve_with(&adamw, 1, true).unwrap();
        assert_eq!(off.iter().map(|n| n.field).collect::<Vec<_>>(), ["rank", "proj_bits"]);
        let e = OptimConfig::resolve_with(&obj(r#"{"name":"galore","rank":0}"#), 1, true).unwrap_err();
        assert_eq!(e.msg, "rank = 0: must be an integer ≥ 1 and ≤ 2147483648");
    }

    #[test]
    fn the_schema_states_ranges_and_defaults_per_optimizer() {
        let s: Value = serde_json::from_str(&schema_json()).unwrap();
        let beta2 = s["options"].as_array().unwrap().iter().find(|o| o["name"] == "beta2").unwrap();
        assert_eq!(beta2["default"]["qgalore"], serde_json::json!(0.95));
        assert_eq!(beta2["range"], serde_json::json!({ "min": 0.0, "max": 1.0, "maxOpen": true }));
        let block = s["options"].as_array().unwrap().iter().find(|o| o["name"] == "block_size").unwrap();
        assert_eq!(block["default"], serde_json::json!({ "adam8bit": 2048, "galore8bit": 2048, "qgalore": 2048 }));
        let find = |n: &str| s["options"].as_array().unwrap().iter().find(|o| o["name"] == n).unwrap().clone();
        assert_eq!(find("lora_rank")["default"], serde_json::json!({ "lora": 8, "qlora": 8 }));
        assert_eq!(find("lora_targets")["default"], serde_json::json!({ "lora": "q_proj,v_proj", "qlora": "q_proj,v_proj" }));
        assert_eq!(find("lora_targets")["type"], "string");
        assert_eq!(find("lora_base")["default"], serde_json::json!({ "lora": "bf16" }));
        assert_eq!(find("lora_dropout")["range"], serde_json::json!({ "min": 0.0, "max": 1.0, "maxOpen": true }));
        let lora = s["optimizers"].as_array().unwrap().iter().find(|o| o["name"] == "qlora").unwrap();
        assert_eq!((lora["family"].as_str(), lora["adapter"].as_bool()), (Some("adapter"), Some(true)));
        let device = s["run"].as_array().unwrap().iter().find(|o| o["name"] == "device").unwrap();
        assert_eq!(device["choices"], serde_json::json!(["cpu", "cuda", "auto"]));
    }
}
