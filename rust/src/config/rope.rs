//! RoPE in a model config: the two layouts a `config.json` may use (`rope_parameters`, or
//! `rope_theta` + `rope_scaling`), the scaling types the engine implements, and their rules.

use super::model::{number, ModelProblem, ProblemKind};
use serde_json::{Map, Value};

/// RoPE frequency scaling, as `transformers` computes it (`modeling_rope_utils`:
/// `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend
    /// between (wavelengths bounded by original_max_position_embeddings / the two factors).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// The RoPE types the engine implements, as `rope_type` names them.
const ROPE_TYPES: &str = r#""default", "linear", "llama3""#;

/// The scaling keys of each implemented RoPE type (after `rope_type`), required ones first;
/// llama3's original_max_position_embeddings defaults to max_position_embeddings, as
/// `transformers`' `standardize_rope_params` does.
fn rope_keys(rope_type: &str) -> &'static [&'static str] {
    match rope_type {
        "linear" => &["factor"],
        "llama3" => &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
        _ => &[],
    }
}

impl RopeScaling {
    /// The filled JSON form: `{ "rope_type", then the type's keys }`.
    pub fn to_json(&self) -> Value {
        match *self {
            RopeScaling::Linear { factor } => serde_json::json!({ "rope_type": "linear", "factor": factor }),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                serde_json::json!({ "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings })
            }
        }
    }

    /// From a filled `rope_scaling` (checked); None for null or the default type.
    pub(super) fn from_filled(v: &Value) -> Option<Self> {
        let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        match v.get("rope_type")?.as_str()? {
            "linear" => Some(RopeScaling::Linear { factor: f("factor") }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: f("factor"),
                low_freq_factor: f("low_freq_factor"),
                high_freq_factor: f("high_freq_factor"),
                original_max_position_embeddings: f("original_max_position_embeddings") as usize,
            }),
            _ => None,
        }
    }

    /// Scales one inverse frequency (radians per position) as `transformers` does.
    pub fn scale(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                if wavelen < high_wavelen {
                    inv_freq
                } else if wavelen > low_wavelen {
                    inv_freq / factor
                } else {
                    let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }
}

/// A RoPE layout's key and its object.
type RopeSource<'a> = (&'static str, &'a Map<String, Value>);

/// Where a config keeps its RoPE settings: the newer `rope_parameters` object (rope_theta
/// inside) or the older `rope_scaling` next to a top-level `rope_theta`. When both are
/// given, `rope_scaling` wins, as in transformers 5.24 (`convert_rope_params_to_dict`).
fn rope_source(obj: &Map<String, Value>) -> Result<Option<RopeSource<'_>>, ModelProblem> {
    for key in ["rope_scaling", "rope_parameters"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => return Ok(Some((key, m))),
            Some(v) => return Err(ModelProblem::new(ProblemKind::Type, key, v.clone(), "must be null or an object".into())),
        }
    }
    Ok(None)
}

/// Fills `rope_theta` and `rope_scaling` of `out` from either RoPE layout (both give the
/// same filled config). Missing or mistyped keys, and RoPE types other than `ROPE_TYPES`,
/// are problems; values are judged later by `check_rope`. Returns the layout's key.
pub(super) fn fill_rope(obj: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<&'static str, ModelProblem> {
    let Some((key, src)) = rope_source(obj)? else {
        out.insert("rope_scaling".into(), Value::Null);
        return Ok("rope_scaling");
    };
    let field = |k: &str| format!("{key}.{k}");
    if let Some(theta) = src.get("rope_theta") {
        if !theta.is_number() {
            return Err(ModelProblem::new(ProblemKind::Type, &field("rope_theta"), theta.clone(), "must be a number".into()));
        }
        out.insert("rope_theta".into(), theta.clone());
    }
    // `type` is the legacy name of `rope_type`
    let (type_key, rope_type) = match (src.get("rope_type"), src.get("type")) {
        (Some(t), _) => ("rope_type", t),
        (None, Some(t)) => ("type", t),
        (None, None) => ("rope_type", &Value::Null),
    };
    let rope_type = match rope_type {
        Value::Null => "default",
        Value::String(s) => s.as_str(),
        v => return Err(ModelProblem::new(ProblemKind::Type, &field(type_key), v.clone(), "must be a string".into())),
    };
    if !matches!(rope_type, "default" | "linear" | "llama3") {
        let why = format!("must be one of {ROPE_TYPES} (other RoPE types are not implemented)");
        return Err(ModelProblem::new(ProblemKind::Unsupported, &field(type_key), Value::from(rope_type), why));
    }
    if rope_type == "default" {
        out.insert("rope_scaling".into(), Value::Null);
        return Ok(key);
    }
    let mut scaling = Map::new();
    scaling.insert("rope_type".into(), Value::from(rope_type));
    for &k in rope_keys(rope_type) {
        let v = match src.get(k) {
            Some(v) if v.is_number() => v.clone(),
            Some(v) => return Err(ModelProblem::new(ProblemKind::Type, &field(k), v.clone(), "must be a number".into())),
            None if k == "original_max_position_embeddings" => out["max_position_embeddings"].clone(),
            None => return Err(ModelProblem::new(ProblemKind::Missing, &field(k), Value::Null, "missing".into())),
        };
        scaling.insert(k.into(), v);
    }
    out.insert("rope_scaling".into(), Value::Object(scaling));
    Ok(key)
}

/// The first rule a filled `rope_scaling` breaks (`key` names the layout it came from):
/// factors > 0, high_freq_factor > low_freq_factor, original_max_position_embeddings an
/// integer ≥ 1.
pub(super) fn check_rope(scaling: &Value, key: &str) -> Option<ModelProblem> {
    let Value::Object(s) = scaling else {
        return None;
    };
    let get = |k: &str| s.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let range = |k: &str, why: String| Some(ModelProblem::new(ProblemKind::Range, &format!("{key}.{k}"), number(get(k)), why));
    let rope_type = s.get("rope_type").and_then(Value::as_str).unwrap_or("");
    for &k in rope_keys(rope_type) {
        let v = get(k);
        if k == "original_max_position_embeddings" {
            if !(v.is_finite() && v.fract() == 0.0 && v >= 1.0) {
                return range(k, "must be an integer ≥ 1".into());
            }
        } else if !(v.is_finite() && v > 0.0) {
            return range(k, "must be > 0".into());
        }
    }
    if rope_type == "llama3" && get("high_freq_factor") <= get("low_freq_factor") {
        return range("high_freq_factor", format!("must be > low_freq_factor {}", number(get("low_freq_factor"))));
    }
    None
}

