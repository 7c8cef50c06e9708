//! The model config (Hugging Face `LlamaConfig` field names): every field's kind and default,
//! and every rule a buildable model obeys, written once in `model_fields!` and `check`.
//! Configs from JSON (the engine's own, or `qg_resolve_model` for a front end) and configs
//! built in Rust pass the same code. A problem is reported as data — field, value, why — so
//! a front end can word it with its own label ("--model x.json: num_attention_heads 3 must
//! divide hidden_size 128") while the engine's text names the config field.

use serde::Serialize;
use serde_json::{Map, Value};

/// What a field holds: a count (an integer ≥ 1) or a positive real.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Count,
    Positive,
}

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
/// looked for.
macro_rules! model_fields {
    ($( $(#[$doc:meta])* $field:ident : $t:ty, $kind:ident, $default:expr; )*) => {
        /// LLaMA architecture (docs/algorithm-spec.md §3). Field names follow
        /// `transformers.LlamaConfig`.
        #[derive(Clone, Debug)]
        pub struct ModelConfig {
            $( $(#[$doc])* pub $field: $t, )*
        }

        const FIELDS: &[Field] = &[ $( Field { name: stringify!($field), kind: Kind::$kind, default: $default }, )* ];

        impl ModelConfig {
            /// A config from a map that `resolve` filled (every field a number).
            fn from_filled(m: &Map<String, Value>) -> Self {
                let get = |name: &str| m.get(name).and_then(Value::as_f64).unwrap_or(f64::NAN);
                ModelConfig { $( $field: FieldValue::from_f64(get(stringify!($field))), )* }
            }

            /// The fields as JSON (a key per field that has a value).
            pub fn to_map(&self) -> Map<String, Value> {
                let mut out = Map::new();
                $( if let Some(v) = FieldValue::to_json(&self.$field) { out.insert(stringify!($field).into(), v); } )*
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
    /// A field is not a JSON number.
    Type,
    /// A value breaks a rule (`why` says which).
    Range,
}

/// One problem of a model config: `field value why` ("num_attention_heads 3 must divide
/// hidden_size 128"). `field` is a config field, or `head dim` (hidden_size /
/// num_attention_heads, which `why` names).
#[derive(Clone, Debug, Serialize)]
pub struct ModelProblem {
    pub kind: ProblemKind,
    pub field: String,
    pub value: Value,
    pub why: String,
}

impl ModelProblem {
    fn new(kind: ProblemKind, field: &str, value: Value, why: String) -> Self {
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
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

/// Checks a JSON model config and fills in the defaults. `vocab`, when given, replaces the
/// config's `vocab_size` (a front end's tokenizer decides the vocabulary); keys that are not
/// model fields are ignored, as Hugging Face does. Returns the filled config (model fields
/// only) with the first rule it breaks, or — when no config can be built — the missing or
/// non-numeric field. The fields named in `non_finite` hold NaN or an infinity, which JSON
/// cannot carry (they arrive as null): numbers that break the rules, not wrong types.
pub fn resolve(obj: &Map<String, Value>, vocab: Option<&Value>, non_finite: &[&str]) -> Result<(Map<String, Value>, Option<ModelProblem>), ModelProblem> {
    // vocab_size last: a caller usually supplies it
    let required = FIELDS.iter().filter(|f| matches!(f.default, Default::Required));
    for f in required.clone().filter(|f| f.name != "vocab_size").chain(required.filter(|f| f.name == "vocab_size")) {
        if !obj.contains_key(f.name) && !(f.name == "vocab_size" && vocab.is_some()) {
            return Err(ModelProblem::new(ProblemKind::Missing, f.name, Value::Null, "missing".into()));
        }
    }
    for f in FIELDS {
        if let Some(v) = obj.get(f.name).filter(|v| !v.is_number() && !non_finite.contains(&f.name)) {
            return Err(ModelProblem::new(ProblemKind::Type, f.name, v.clone(), "must be a number".into()));
        }
    }
    if let Some(v) = vocab.filter(|v| !v.is_number()) {
        return Err(ModelProblem::new(ProblemKind::Type, "vocab_size", v.clone(), "must be a number".into()));
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
    let problem = check(&out);
    Ok((out, problem))
}

/// The first rule a complete config breaks, defaults not applied: a field that is absent or
/// not a number breaks its field's rule (for callers whose configs always carry every field).
pub fn check_complete(obj: &Map<String, Value>) -> (Map<String, Value>, Option<ModelProblem>) {
    let out: Map<String, Value> = FIELDS.iter().map(|f| (f.name.to_string(), obj.get(f.name).filter(|v| v.is_number()).cloned().unwrap_or(Value::Null))).collect();
    let problem = check(&out);
    (out, problem)
}

/// The first rule a filled config breaks: counts are integers ≥ 1, reals are > 0, the
/// heads divide the width, the key/value heads divide the heads, and the head dimension is
/// even (RoPE rotates pairs).
fn check(m: &Map<String, Value>) -> Option<ModelProblem> {
    let get = |name: &str| m.get(name).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let range = |field: &str, value: f64, why: String| Some(ModelProblem::new(ProblemKind::Range, field, number(value), why));
    for kind in [Kind::Count, Kind::Positive] {
        for f in FIELDS.iter().filter(|f| f.kind == kind) {
            let v = get(f.name);
            let ok = v.is_finite() && if kind == Kind::Count { v.fract() == 0.0 && v >= 1.0 } else { v > 0.0 };
            if !ok {
                let why = if kind == Kind::Count { "must be an integer ≥ 1" } else { "must be > 0" };
                return range(f.name, v, why.into());
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
    if (h / heads) % 2.0 != 0.0 {
        return range("head dim", h / heads, format!("(hidden_size {h} / num_attention_heads {heads}) must be even for RoPE"));
    }
    None
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

    /// Parses a JSON model config: defaults filled, every rule checked.
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
/// (a field missing or not a number), or `{ "error": "…" }` (not such a request). `seq_len`
/// is checked against the config's `max_position_embeddings` when the config has no problem.
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

/// A filled config written in the fields' declared order (`LlamaConfig`'s), not sorted.
struct InFieldOrder(Map<String, Value>);

impl Serialize for InFieldOrder {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(FIELDS.len()))?;
        for f in FIELDS {
            m.serialize_entry(f.name, &self.0[f.name])?;
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
                "rms_norm_eps": 1e-6, "initializer_range": 0.02 })
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
        assert_eq!(line(p(r#""hidden_size":1.5,"num_attention_heads":4"#)), "hidden_size 1.5 must be an integer ≥ 1");
        assert_eq!(line(p(r#""hidden_size":128,"num_attention_heads":4,"rms_norm_eps":0"#)), "rms_norm_eps 0 must be > 0");
        assert_eq!(line(p(r#""hidden_size":128,"num_attention_heads":4"#)), "seq_len 4096 must be ≤ max_position_embeddings 2048");
        assert_eq!(p(r#""hidden_size":"128","num_attention_heads":4"#)["kind"], "type");
        let strict = resolve_text(r#"{"model":{"vocab_size":8,"hidden_size":"128"},"defaults":false}"#);
        assert_eq!((strict["problem"]["field"].as_str(), strict["problem"]["why"].as_str()), (Some("hidden_size"), Some("must be an integer ≥ 1")));
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
}
