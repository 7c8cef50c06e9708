//! The model config (Hugging Face `LlamaConfig` field names): every field's kind and default,
//! and every rule a buildable model obeys, written once in `model_fields!` and `check`.
//! Configs from JSON (the engine's own, or `qg_resolve_model` for a front end) and configs
//! built in Rust pass the same code. A problem is reported as data — field, value, why — so
//! a front end can word it with its own label ("--model x.json: num_attention_heads 3 must
//! divide hidden_size 128") while the engine's text names the config field.

use serde::Serialize;

pub use super::rope::RopeScaling;
use super::rope::{check_rope, fill_rope};
use serde_json::{Map, Value};

/// What a field holds: a count (an integer ≥ 1) or a positive real.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Count,
    Positive,
}

/// The largest `max_position_embeddings`: the largest integer a JSON number holds exactly.
const MAX_POSITIONS: f64 = 9007199254740992.0;

/// A field's default.
#[derive(Clone, Copy, Debug)]
enum Default {
    /// No default: the field must be given.
    Required,
    Value(f64),
    /// The number of query heads (multi-head attention, no grouping).
    HeadCount,
}

struct Field {
    name: &'static str,
    kind: Kind,
    default: Default,
}

/// How a typed field travels as a JSON number.
trait FieldValue: Sized {
    fn from_f64(v: f64) -> Self;
    fn to_json(&self) -> Option<Value>;
}

impl FieldValue for usize {
    fn from_f64(v: f64) -> Self {
        v as usize
    }
    fn to_json(&self) -> Option<Value> {
        Some(Value::from(*self as u64))
    }
}

impl FieldValue for Option<usize> {
    fn from_f64(v: f64) -> Self {
        Some(v as usize)
    }
    fn to_json(&self) -> Option<Value> {
        self.map(|v| Value::from(v as u64))
    }
}

impl FieldValue for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_json(&self) -> Option<Value> {
        Some(super::f32_json(*self))
    }
}

impl FieldValue for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_json(&self) -> Option<Value> {
        Some(Value::from(*self))
    }
}

/// Declares the model fields once: name, type, kind and default, in the order problems are
/// looked for. The numeric fields come from the macro; `rope_scaling` and
/// `tie_word_embeddings` (not numbers) follow them.
macro_rules! model_fields {
    ($( $(#[$doc:meta])* $field:ident : $t:ty, $kind:ident, $default:expr; )*) => {
        /// LLaMA architecture (docs/algorithm-spec.md §3). Field names follow
        /// `transformers.LlamaConfig`.
        #[derive(Clone, Debug)]
        pub struct ModelConfig {
            $( $(#[$doc])* pub $field: $t, )*
            /// RoPE frequency scaling (`rope_scaling`, or the scaling keys of
            /// `rope_parameters`); None: plain RoPE (`rope_type` "default").
            pub rope_scaling: Option<RopeScaling>,
            /// One table serves the token embedding and lm_head.
            pub tie_word_embeddings: bool,
        }

        const FIELDS: &[Field] = &[ $( Field { name: stringify!($field), kind: Kind::$kind, default: $default }, )* ];

        impl ModelConfig {
            /// A config from a map that `resolve` filled (every numeric field a number).
            fn from_filled(m: &Map<String, Value>) -> Self {
                let get = |name: &str| m.get(name).and_then(Value::as_f64).unwrap_or(f64::NAN);
                ModelConfig {
                    $( $field: FieldValue::from_f64(get(stringify!($field))), )*
                    rope_scaling: m.get("rope_scaling").and_then(RopeScaling::from_filled),
                    tie_word_embeddings: m.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
                }
            }

            /// The fields as JSON (a key per field that has a value; `head_dim` is derived,
            /// so left out).
            pub fn to_map(&self) -> Map<String, Value> {
                let mut out = Map::new();
                $( if let Some(v) = FieldValue::to_json(&self.$field) { out.insert(stringify!($field).into(), v); } )*
                out.insert("rope_scaling".into(), self.rope_scaling.as_ref().map_or(Value::Null, RopeScaling::to_json));
                out.insert("tie_word_embeddings".into(), Value::Bool(self.tie_word_embeddings));
                out
            }
        }
    };
}

// Defaults: Hugging Face `LlamaConfig`'s (the reference JSON files leave these out; their
// `max_sequence_length` is not a LlamaConfig field, so HF's 2048 positions apply).
model_fields! {
    /// Vocabulary size (rows of the embedding and of lm_head).
    vocab_size: usize, Count, Default::Required;
    /// Model width.
    hidden_size: usize, Count, Default::Required;
    /// SwiGLU MLP width.
    intermediate_size: usize, Count, Default::Required;
    /// Query heads.
    num_attention_heads: usize, Count, Default::Required;
    /// Key/value heads (grouped-query attention when fewer than the query heads); `None`
    /// means one per query head.
    num_key_value_heads: Option<usize>, Count, Default::HeadCount;
    /// Decoder blocks.
    num_hidden_layers: usize, Count, Default::Required;
    /// Longest sequence the model accepts.
    max_position_embeddings: usize, Count, Default::Value(2048.0);
    /// RoPE base.
    rope_theta: f64, Positive, Default::Value(10000.0);
    /// RMSNorm epsilon.
    rms_norm_eps: f32, Positive, Default::Value(1e-6);
    /// Standard deviation of the normal initialisation.
    initializer_range: f32, Positive, Default::Value(0.02);
}

/// What kind of problem a config has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A required field is absent.
    Missing,
    /// A field has the wrong JSON type (`why` says which).
    Type,
    /// A value breaks a rule (`why` says which).
    Range,
    /// A value asks for what the engine does not implement (biases, another activation,
    /// another RoPE type; `why` names what is allowed).
    Unsupported,
}

/// One problem of a model config: `field value why` ("num_attention_heads 3 must divide
/// hidden_size 128"). `field` is a config field, a key inside `rope_scaling` or
/// `rope_parameters` (`rope_scaling.factor`), or `head dim` (hidden_size /
/// num_attention_heads, which `why` names).
#[derive(Clone, Debug, Serialize)]
pub struct ModelProblem {
    pub kind: ProblemKind,
    pub field: String,
    pub value: Value,
    pub why: String,
}

impl ModelProblem {
    pub(super) fn new(kind: ProblemKind, field: &str, value: Value, why: String) -> Self {
        ModelProblem { kind, field: field.into(), value, why }
    }

    /// The engine's one-line message, naming the config field.
    pub fn text(&self) -> String {
        match self.kind {
            ProblemKind::Missing => format!("model {}: missing", self.field),
            _ if self.field == "seq_len" => format!("seq_len = {}: {}", self.value, self.why),
            _ => format!("model {} = {}: {}", self.field, self.value, self.why),
        }
    }
}

/// A whole number as a JSON integer (33, not 33.0), anything else as it is.
pub(super) fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

/// Keys of a `config.json` whose values the engine does not implement: each must have the
/// type and value given (absent is fine).
const FIXED: &[(&str, &str)] = &[
    ("model_type", "llama"),
    ("hidden_act", "silu"),
    ("attention_bias", "false"),
    ("mlp_bias", "false"),
];

/// The first fixed key (`FIXED`) with another type or value.
fn check_fixed(obj: &Map<String, Value>) -> Option<ModelProblem> {
    for &(key, want) in FIXED {
        let Some(v) = obj.get(key) else { continue };
        let problem = |kind, why: &str| Some(ModelProblem::new(kind, key, v.clone(), why.into()));
        match (want, v) {
            ("false", Value::Bool(false)) => {}
            ("false", Value::Bool(true)) => return problem(ProblemKind::Unsupported, "must be false (biases are not implemented)"),
            ("false", _) => return problem(ProblemKind::Type, "must be true or false"),
            (w, Value::String(s)) if s == w => {}
            ("llama", Value::String(_)) => return problem(ProblemKind::Unsupported, r#"must be "llama" (other architectures are not implemented)"#),
            (_, Value::String(_)) => return problem(ProblemKind::Unsupported, r#"must be "silu" (other activations are not implemented)"#),
            _ => return problem(ProblemKind::Type, "must be a string"),
        }
    }
    None
}

/// Checks a JSON model config and fills in the defaults. The config is a `config.json` as
/// `transformers` writes it (either RoPE layout) or the engine's own filled form; `vocab`,
/// when given, replaces the config's `vocab_size` (a front end's tokenizer decides the
/// vocabulary); keys that are not model fields are ignored, as Hugging Face does, and keys
/// whose values the engine does not implement (`FIXED`, RoPE types) are refused. Returns
/// the filled config (model fields only, `head_dim` derived when absent) with the first
/// rule it breaks, or — when no config can be built — the missing, mistyped or unsupported
/// field. The fields named in `non_finite` hold NaN or an infinity, which JSON cannot carry
/// (they arrive as null): numbers that break the rules, not wrong types.
pub fn resolve(obj: &Map<String, Value>, vocab: Option<&Value>, non_finite: &[&str]) -> Result<(Map<String, Value>, Option<ModelProblem>), ModelProblem> {
    // vocab_size last: a caller usually supplies it
    let required = FIELDS.iter().filter(|f| matches!(f.default, Default::Required));
    for f in required.clone().filter(|f| f.name != "vocab_size").chain(required.filter(|f| f.name == "vocab_size")) {
        if !obj.contains_key(f.name) && !(f.name == "vocab_size" && vocab.is_some()) {
            return Err(ModelProblem::new(ProblemKind::Missing, f.name, Value::Null, "missing".into()));
        }
    }
    for f in FIELDS.iter().map(|f| f.name).chain(["head_dim"]) {
        // head_dim may be null (derived), as in LlamaConfig
        let ok = |v: &Value| v.is_number() || non_finite.contains(&f) || (f == "head_dim" && v.is_null());
        if let Some(v) = obj.get(f).filter(|v| !ok(v)) {
            return Err(ModelProblem::new(ProblemKind::Type, f, v.clone(), "must be a number".into()));
        }
    }
    if let Some(v) = vocab.filter(|v| !v.is_number()) {
        return Err(ModelProblem::new(ProblemKind::Type, "vocab_size", v.clone(), "must be a number".into()));
    }
    if let Some(v) = obj.get("tie_word_embeddings").filter(|v| !v.is_boolean()) {
        return Err(ModelProblem::new(ProblemKind::Type, "tie_word_embeddings", v.clone(), "must be true or false".into()));
    }
    if let Some(p) = check_fixed(obj) {
        return Err(p);
    }
    let mut out = Map::new();
    for f in FIELDS {
        let v = match (obj.get(f.name), f.default) {
            (Some(v), _) => v.clone(),
            (None, Default::Value(d)) => number(d),
            (None, Default::HeadCount) => out["num_attention_heads"].clone(),
            (None, Default::Required) => Value::Null,
        };
        out.insert(f.name.into(), v);
    }
    if let Some(v) = vocab {
        out.insert("vocab_size".into(), v.clone());
    }
    let rope_key = fill_rope(obj, &mut out)?;
    let get = |name: &str| out.get(name).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let head_dim = match obj.get("head_dim") {
        Some(v) if !v.is_null() => v.clone(),
        _ => number(get("hidden_size") / get("num_attention_heads")),
    };
    out.insert("head_dim".into(), head_dim);
    out.insert("tie_word_embeddings".into(), obj.get("tie_word_embeddings").cloned().unwrap_or(Value::Bool(false)));
    let problem = check(&out, rope_key);
    Ok((out, problem))
}

/// The first rule a complete config breaks, defaults not applied: a numeric field that is
/// absent or not a number breaks its field's rule (for callers whose configs always carry
/// every field); `head_dim`, `rope_scaling` and `tie_word_embeddings` may be absent
/// (derived, none, false).
pub fn check_complete(obj: &Map<String, Value>) -> (Map<String, Value>, Option<ModelProblem>) {
    let mut out: Map<String, Value> =
        FIELDS.iter().map(|f| (f.name.to_string(), obj.get(f.name).filter(|v| v.is_number()).cloned().unwrap_or(Value::Null))).collect();
    if let Some(p) = check_fixed(obj) {
        return (out, Some(p));
    }
    let rope_key = match fill_rope(obj, &mut out) {
        Ok(k) => k,
        Err(p) => return (out, Some(p)),
    };
    let get = |name: &str| out.get(name).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let head_dim = obj.get("head_dim").filter(|v| v.is_number()).cloned().unwrap_or_else(|| number(get("hidden_size") / get("num_attention_heads")));
    out.insert("head_dim".into(), head_dim);
    let tie = obj.get("tie_word_embeddings").cloned().unwrap_or(Value::Bool(false));
    if !tie.is_boolean() {
        return (out, Some(ModelProblem::new(ProblemKind::Type, "tie_word_embeddings", tie, "must be true or false".into())));
    }
    out.insert("tie_word_embeddings".into(), tie);
    let problem = check(&out, rope_key);
    (out, problem)
}

/// The first rule a filled config breaks: counts are integers ≥ 1, reals are > 0, the
/// heads divide the width, the key/value heads divide the heads, `head_dim` is the width
/// per head (other head sizes are not implemented), the head dimension is even (RoPE
/// rotates pairs), and the RoPE scaling's values are sound (`rope_key` names its layout).
fn check(m: &Map<String, Value>, rope_key: &str) -> Option<ModelProblem> {
    let get = |name: &str| m.get(name).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let range = |field: &str, value: f64, why: String| Some(ModelProblem::new(ProblemKind::Range, field, number(value), why));
    for kind in [Kind::Count, Kind::Positive] {
        for f in FIELDS.iter().filter(|f| f.kind == kind) {
            let v = get(f.name);
            // positions only bound seq_len (nothing is sized by them), so any exact integer
            // (≤ 2^53) is allowed there; every other count sizes buffers (MAX_COUNT)
            let max = if f.name == "max_position_embeddings" { MAX_POSITIONS } else { super::MAX_COUNT };
            let ok = v.is_finite() && if kind == Kind::Count { v.fract() == 0.0 && (1.0..=max).contains(&v) } else { v > 0.0 };
            if !ok {
                let why = if kind == Kind::Count { format!("must be an integer ≥ 1 and ≤ {max}") } else { "must be > 0".into() };
                return range(f.name, v, why);
            }
        }
    }
    let (h, heads, kv) = (get("hidden_size"), get("num_attention_heads"), get("num_key_value_heads"));
    if h % heads != 0.0 {
        return range("num_attention_heads", heads, format!("must divide hidden_size {h}"));
    }
    if heads % kv != 0.0 {
        return range("num_key_value_heads", kv, format!("must divide num_attention_heads {heads}"));
    }
    if let Some(hd) = m.get("head_dim").and_then(Value::as_f64).filter(|&hd| hd != h / heads) {
        let why = format!("must equal hidden_size / num_attention_heads = {} (other head sizes are not implemented)", h / heads);
        return range("head_dim", hd, why);
    }
    if (h / heads) % 2.0 != 0.0 {
        return range("head dim", h / heads, format!("(hidden_size {h} / num_attention_heads {heads}) must be even for RoPE"));
    }
    m.get("rope_scaling").and_then(|s| check_rope(s, rope_key))
}

/// A sequence longer than the model's positions.
pub fn check_seq_len(seq_len: f64, max_position_embeddings: f64) -> Option<ModelProblem> {
    (seq_len > max_position_embeddings).then(|| {
        ModelProblem::new(ProblemKind::Range, "seq_len", number(seq_len), format!("must be ≤ max_position_embeddings {max_position_embeddings}"))
    })
}

impl ModelConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads() * self.head_dim()
    }

    /// Parses a JSON model config (a `config.json` as `transformers` writes it, or the
    /// engine's filled form): defaults filled, every rule checked.
    pub fn from_map(obj: &Map<String, Value>) -> crate::error::Result<Self> {
        match resolve(obj, None, &[]) {
            Ok((m, None)) => Ok(ModelConfig::from_filled(&m)),
            Ok((_, Some(p))) | Err(p) => Err(crate::error::Error::invalid(p.text())),
        }
    }

    /// The first problem of a config built in Rust (the rules of `resolve`).
    pub fn problem(&self) -> Option<ModelProblem> {
        let map = self.to_map();
        let non_finite: Vec<&str> = FIELDS.iter().map(|f| f.name).filter(|n| map.get(*n).is_some_and(Value::is_null)).collect();
        match resolve(&map, None, &non_finite) {
            Ok((_, p)) => p,
            Err(p) => Some(p),
        }
    }

    pub fn validate(&self) -> crate::error::Result<()> {
        self.problem().map_or(Ok(()), |p| Err(crate::error::Error::invalid(p.text())))
    }

    /// A complete Hugging Face `config.json` for this model: `transformers`'
    /// `LlamaForCausalLM.from_pretrained` builds the same architecture from it. RoPE is
    /// written in the `rope_theta` + `rope_scaling` layout, which transformers 4.x reads and
    /// 5.x converts to its `rope_parameters`. The exporter adds dtype and token ids.
    pub fn hf_config(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
        m.insert("model_type".into(), Value::from("llama"));
        m.insert("hidden_act".into(), Value::from("silu"));
        m.insert("attention_bias".into(), Value::Bool(false));
        m.insert("attention_dropout".into(), Value::from(0.0));
        m.insert("mlp_bias".into(), Value::Bool(false));
        m.insert("pretraining_tp".into(), Value::from(1));
        for (k, v) in self.to_map() {
            m.insert(k, v);
        }
        m.insert("num_key_value_heads".into(), Value::from(self.kv_heads()));
        m.insert("head_dim".into(), Value::from(self.head_dim()));
        m.insert("rope_theta".into(), Value::from(self.rope_theta));
        m
    }
}

impl<'de> serde::Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let obj = Map::deserialize(d)?;
        ModelConfig::from_map(&obj).map_err(|e| serde::de::Error::custom(e.msg))
    }
}

/// What `qg_resolve_model` returns for `{ "model": {…}, "vocab_size"?: n, "seq_len"?: n,
/// "non_finite"?: [field…], "defaults"?: bool }` (`defaults: false`: `check_complete`):
/// `{ "config": {…every field filled…}, "problem"?: {…} }` (a rule broken), `{ "problem": {…} }`
/// (a field missing, mistyped or unsupported), or `{ "error": "…" }` (not such a request).
/// `seq_len` is checked against the config's `max_position_embeddings` when the config has
/// no problem. The filled config has the numeric fields, then `head_dim`, `rope_scaling`
/// (null or `{ "rope_type", its keys }`) and `tie_word_embeddings`.
pub fn resolve_json(text: &str) -> String {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return serde_json::json!({ "error": format!("resolve model: {e}") }).to_string(),
    };
    let Some(obj) = v.get("model").and_then(Value::as_object) else {
        return serde_json::json!({ "error": "resolve model: `model` must be a JSON object" }).to_string();
    };
    let non_finite: Vec<&str> = v.get("non_finite").and_then(Value::as_array).map_or(Vec::new(), |a| a.iter().filter_map(Value::as_str).collect());
    let defaults = v.get("defaults").and_then(Value::as_bool).unwrap_or(true);
    let resolved = if defaults { resolve(obj, v.get("vocab_size"), &non_finite) } else { Ok(check_complete(obj)) };
    let answer = match resolved {
        Err(p) => Answer { config: None, problem: Some(p) },
        Ok((m, mut problem)) => {
            if let (None, Some(t)) = (&problem, v.get("seq_len").and_then(Value::as_f64)) {
                problem = check_seq_len(t, m["max_position_embeddings"].as_f64().unwrap_or(f64::NAN));
            }
            Answer { config: Some(InFieldOrder(m)), problem }
        }
    };
    serde_json::to_string(&answer).unwrap_or_default()
}

#[derive(Serialize)]
struct Answer {
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<InFieldOrder>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<ModelProblem>,
}

/// The keys of a filled config after the numeric fields.
const FILLED_EXTRA: [&str; 3] = ["head_dim", "rope_scaling", "tie_word_embeddings"];

/// A filled config written in the fields' declared order (`LlamaConfig`'s), not sorted.
struct InFieldOrder(Map<String, Value>);

impl Serialize for InFieldOrder {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(FIELDS.len() + FILLED_EXTRA.len()))?;
        for name in FIELDS.iter().map(|f| f.name).chain(FILLED_EXTRA) {
            m.serialize_entry(name, self.0.get(name).unwrap_or(&Value::Null))?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_text(text: &str) -> Value {
        serde_json::from_str(&resolve_json(text)).unwrap()
    }

    #[test]
    fn defaults_fill_and_vocab_replaces() {
        let r = resolve_text(r#"{"model":{"hidden_size":128,"intermediate_size":352,"num_attention_heads":4,"num_hidden_layers":4,"vocab_size":"x","hidden_act":"silu"},"vocab_size":256}"#);
        assert_eq!(r["problem"]["kind"], "type", "a wrong type is reported even when the vocabulary is replaced");
        let r = resolve_text(r#"{"model":{"hidden_size":128,"intermediate_size":352,"num_attention_heads":4,"num_hidden_layers":4},"vocab_size":256}"#);
        assert_eq!(
            r["config"],
            serde_json::json!({ "vocab_size": 256, "hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 4,
                "num_key_value_heads": 4, "num_hidden_layers": 4, "max_position_embeddings": 2048, "rope_theta": 10000,
                "rms_norm_eps": 1e-6, "initializer_range": 0.02, "head_dim": 32, "rope_scaling": null, "tie_word_embeddings": false })
        );
        assert!(r.get("problem").is_none());
        let text = resolve_json(r#"{"model":{"vocab_size":8,"hidden_size":128,"intermediate_size":352,"num_attention_heads":4,"num_hidden_layers":4}}"#);
        assert!(text.starts_with(r#"{"config":{"vocab_size":8,"hidden_size":128,"#), "{text}");
    }

    #[test]
    fn problems_name_field_value_and_rule() {
        let base = r#""vocab_size":256,"intermediate_size":352,"num_hidden_layers":4"#;
        let p = |extra: &str| resolve_text(&format!(r#"{{"model":{{{base},{extra}}},"seq_len":4096}}"#))["problem"].clone();
        let line = |p: Value| format!("{} {} {}", p["field"].as_str().unwrap(), p["value"], p["why"].as_str().unwrap());
        assert_eq!(line(p(r#""hidden_size":128,"num_attention_heads":3"#)), "num_attention_heads 3 must divide hidden_size 128");
        assert_eq!(line(p(r#""hidden_size":132,"num_attention_heads":4"#)), "head dim 33 (hidden_size 132 / num_attention_heads 4) must be even for RoPE");
        assert_eq!(line(p(r#""hidden_size":128,"num_attention_heads":4,"num_key_value_heads":3"#)), "num_key_value_heads 3 must divide num_attention_heads 4");
        assert_eq!(line(p(r#""hidden_size":1.5,"num_attention_heads":4"#)), "hidden_size 1.5 must be an integer ≥ 1 and ≤ 2147483648");
        assert_eq!(line(p(r#""hidden_size":128,"num_attention_heads":4,"rms_norm_eps":0"#)), "rms_norm_eps 0 must be > 0");
        assert_eq!(line(p(r#""hidden_size":128,"num_attention_heads":4"#)), "seq_len 4096 must be ≤ max_position_embeddings 2048");
        assert_eq!(p(r#""hidden_size":"128","num_attention_heads":4"#)["kind"], "type");
        let strict = resolve_text(r#"{"model":{"vocab_size":8,"hidden_size":"128"},"defaults":false}"#);
        assert_eq!((strict["problem"]["field"].as_str(), strict["problem"]["why"].as_str()), (Some("hidden_size"), Some("must be an integer ≥ 1 and ≤ 2147483648")));
        let missing = resolve_text(r#"{"model":{"hidden_size":128}}"#);
        assert_eq!((missing["problem"]["kind"].as_str(), missing["problem"]["field"].as_str()), (Some("missing"), Some("intermediate_size")));
    }

    #[test]
    fn rust_configs_pass_the_same_rules() {
        let m = ModelConfig::from_map(serde_json::from_str::<Value>(r#"{"vocab_size":256,"hidden_size":128,"intermediate_size":352,"num_attention_heads":4,"num_hidden_layers":4}"#).unwrap().as_object().unwrap()).unwrap();
        assert_eq!((m.kv_heads(), m.max_position_embeddings, m.rms_norm_eps, m.initializer_range), (4, 2048, 1e-6, 0.02));
        let mut bad = m.clone();
        bad.num_attention_heads = 3;
        assert_eq!(bad.validate().unwrap_err().msg, "model num_attention_heads = 3: must divide hidden_size 128");
        bad = m.clone();
        bad.initializer_range = 0.0;
        assert_eq!(bad.validate().unwrap_err().msg, "model initializer_range = 0: must be > 0");
    }

    /// A Llama-3.1-style config (small), in the older layout transformers 4.x writes.
    const LLAMA31_OLD: &str = r#"{"architectures":["LlamaForCausalLM"],"attention_bias":false,"attention_dropout":0.0,
        "bos_token_id":128000,"eos_token_id":[128001,128008,128009],"head_dim":16,"hidden_act":"silu","hidden_size":64,
        "initializer_range":0.02,"intermediate_size":128,"max_position_embeddings":131072,"mlp_bias":false,
        "model_type":"llama","num_attention_heads":4,"num_hidden_layers":2,"num_key_value_heads":2,"pretraining_tp":1,
        "rms_norm_eps":1e-05,"rope_scaling":{"factor":8.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
        "original_max_position_embeddings":8192,"rope_type":"llama3"},"rope_theta":500000.0,"tie_word_embeddings":true,
        "torch_dtype":"bfloat16","transformers_version":"4.43.0.dev0","use_cache":true,"vocab_size":1000}"#;

    /// The same model as transformers 5.24 writes it (`rope_parameters`, `dtype`).
    const LLAMA31_NEW: &str = r#"{"architectures":["LlamaForCausalLM"],"attention_bias":false,"attention_dropout":0.0,
        "bos_token_id":128000,"dtype":"bfloat16","eos_token_id":[128001,128008,128009],"head_dim":16,"hidden_act":"silu",
        "hidden_size":64,"initializer_range":0.02,"intermediate_size":128,"max_position_embeddings":131072,"mlp_bias":false,
        "model_type":"llama","num_attention_heads":4,"num_hidden_layers":2,"num_key_value_heads":2,"pad_token_id":null,
        "pretraining_tp":1,"rms_norm_eps":1e-05,"rope_parameters":{"factor":8.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
        "original_max_position_embeddings":8192,"rope_theta":500000.0,"rope_type":"llama3"},"tie_word_embeddings":true,
        "transformers_version":"5.24.0","use_cache":true,"vocab_size":1000}"#;

    fn map(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn hf_configs_in_both_rope_layouts_parse_alike() {
        let old = resolve_text(&format!(r#"{{"model":{LLAMA31_OLD}}}"#));
        let new = resolve_text(&format!(r#"{{"model":{LLAMA31_NEW}}}"#));
        assert!(old.get("problem").is_none(), "{old}");
        assert_eq!(old, new);
        assert_eq!(
            old["config"],
            serde_json::json!({ "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                "rms_norm_eps": 1e-5, "initializer_range": 0.02, "head_dim": 16,
                "rope_scaling": { "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192 },
                "tie_word_embeddings": true })
        );
        let m = ModelConfig::from_map(&map(LLAMA31_NEW)).unwrap();
        assert!(m.tie_word_embeddings);
        assert_eq!(m.rope_theta, 500000.0);
        assert_eq!(
            m.rope_scaling,
            Some(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 })
        );
        // the legacy `type`, and llama3 without original_max_position_embeddings (max positions)
        let legacy = ModelConfig::from_map(&map(&LLAMA31_OLD.replace(r#""rope_type":"llama3""#, r#""type":"linear""#))).unwrap();
        assert_eq!(legacy.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        let no_orig = LLAMA31_NEW.replace(r#""original_max_position_embeddings":8192,"#, "");
        let m = ModelConfig::from_map(&map(&no_orig)).unwrap();
        assert!(matches!(m.rope_scaling, Some(RopeScaling::Llama3 { original_max_position_embeddings: 131072, .. })));
        // default rope in either layout is no scaling, with the given θ
        let plain = LLAMA31_NEW.replace(r#""rope_type":"llama3""#, r#""rope_type":"default""#);
        let m = ModelConfig::from_map(&map(&plain)).unwrap();
        assert_eq!((m.rope_scaling, m.rope_theta), (None, 500000.0));
        // both layouts at once: rope_scaling wins, θ from it or the top level (as transformers does)
        let both = map(r#"{"vocab_size":8,"hidden_size":64,"intermediate_size":128,"num_attention_heads":4,"num_hidden_layers":1,
            "rope_scaling":{"rope_type":"linear","factor":2.0},"rope_parameters":{"rope_type":"default","rope_theta":5.0},"rope_theta":7.0}"#);
        let m = ModelConfig::from_map(&both).unwrap();
        assert_eq!((m.rope_scaling, m.rope_theta), (Some(RopeScaling::Linear { factor: 2.0 }), 7.0));
        // the filled config reads back as itself
        let again = resolve_text(&format!(r#"{{"model":{}}}"#, old["config"]));
        assert_eq!(again, old);
    }

    #[test]
    fn unimplemented_settings_are_refused_by_name() {
        let msg = |text: &str| ModelConfig::from_map(&map(text)).unwrap_err().msg;
        let swap = |from: &str, to: &str| {
            assert!(LLAMA31_NEW.contains(from), "{from}");
            msg(&LLAMA31_NEW.replace(from, to))
        };
        assert_eq!(swap(r#""head_dim":16"#, r#""head_dim":64"#), "model head_dim = 64: must equal hidden_size / num_attention_heads = 16 (other head sizes are not implemented)");
        assert_eq!(swap(r#""attention_bias":false"#, r#""attention_bias":true"#), "model attention_bias = true: must be false (biases are not implemented)");
        assert_eq!(swap(r#""mlp_bias":false"#, r#""mlp_bias":true"#), "model mlp_bias = true: must be false (biases are not implemented)");
        assert_eq!(swap(r#""hidden_act":"silu""#, r#""hidden_act":"gelu""#), r#"model hidden_act = "gelu": must be "silu" (other activations are not implemented)"#);
        assert_eq!(swap(r#""model_type":"llama""#, r#""model_type":"mistral""#), r#"model model_type = "mistral": must be "llama" (other architectures are not implemented)"#);
        assert_eq!(
            swap(r#""rope_type":"llama3""#, r#""rope_type":"yarn""#),
            r#"model rope_parameters.rope_type = "yarn": must be one of "default", "linear", "llama3" (other RoPE types are not implemented)"#
        );
        assert_eq!(swap(r#""factor":8.0"#, r#""factor":0"#), "model rope_parameters.factor = 0: must be > 0");
        assert_eq!(swap(r#""factor":8.0,"#, ""), "model rope_parameters.factor: missing");
        assert_eq!(swap(r#""high_freq_factor":4.0"#, r#""high_freq_factor":1"#), "model rope_parameters.high_freq_factor = 1: must be > low_freq_factor 1");
        assert_eq!(swap(r#""tie_word_embeddings":true"#, r#""tie_word_embeddings":1"#), "model tie_word_embeddings = 1: must be true or false");
        assert_eq!(swap(r#""head_dim":16"#, r#""head_dim":"16""#), r#"model head_dim = "16": must be a number"#);
        let old_yarn = LLAMA31_OLD.replace(r#""rope_type":"llama3""#, r#""rope_type":"dynamic""#);
        assert!(msg(&old_yarn).starts_with(r#"model rope_scaling.rope_type = "dynamic": must be one of"#));
        assert_eq!(msg(&LLAMA31_OLD.replace(r#""rope_scaling":{"#, r#""rope_scaling":7,"x":{"#)), "model rope_scaling = 7: must be null or an object");
        // the kinds a front end words
        let r = resolve_text(&format!(r#"{{"model":{}}}"#, LLAMA31_NEW.replace(r#""mlp_bias":false"#, r#""mlp_bias":true"#)));
        assert_eq!((r["problem"]["kind"].as_str(), r.get("config")), (Some("unsupported"), None));
        // head_dim null is derived, as in LlamaConfig
        let m = ModelConfig::from_map(&map(&LLAMA31_NEW.replace(r#""head_dim":16"#, r#""head_dim":null"#))).unwrap();
        assert_eq!(m.head_dim(), 16);
    }

    #[test]
    fn rust_configs_with_scaling_and_ties_pass_the_same_rules() {
        let mut m = ModelConfig::from_map(&map(LLAMA31_OLD)).unwrap();
        assert_eq!(m.validate().map_err(|e| e.msg), Ok(()));
        m.rope_scaling = Some(RopeScaling::Linear { factor: -1.0 });
        assert_eq!(m.validate().unwrap_err().msg, "model rope_scaling.factor = -1: must be > 0");
    }

    /// Writes `hf_config()` of a few configs to $QG_HF_CONFIG_OUT (a JSON array), for the
    /// hand check against transformers (`LlamaConfig(**c)`); skipped without it.
    #[test]
    fn hf_config_is_complete() {
        let cfgs: Vec<ModelConfig> = [LLAMA31_OLD.to_string(), LLAMA31_OLD.replace(r#""rope_type":"llama3""#, r#""rope_type":"linear""#),
            r#"{"vocab_size":256,"hidden_size":128,"intermediate_size":352,"num_attention_heads":4,"num_hidden_layers":4}"#.to_string()]
            .iter()
            .map(|t| ModelConfig::from_map(&map(t)).unwrap())
            .collect();
        for c in &cfgs {
            let hf = c.hf_config();
            for k in ["architectures", "model_type", "hidden_act", "attention_bias", "mlp_bias", "head_dim", "tie_word_embeddings", "rope_theta", "rope_scaling", "num_key_value_heads"] {
                assert!(hf.contains_key(k), "{k}");
            }
            // it reads back as the same model
            let back = ModelConfig::from_map(&hf).unwrap();
            assert_eq!(format!("{back:?}"), format!("{c:?}"));
        }
        if let Ok(path) = std::env::var("QG_HF_CONFIG_OUT") {
            let all: Vec<Value> = cfgs.iter().map(|c| Value::Object(c.hf_config())).collect();
            std::fs::write(path, serde_json::to_string_pretty(&all).unwrap()).unwrap();
        }
    }
}
