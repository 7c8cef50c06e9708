//! BOS and EOS as a Hugging Face model folder states them: `tokenizer_config.json`
//! (`bos_token`, `eos_token` as a string or an AddedToken object, `add_bos_token`,
//! `add_eos_token`) and `generation_config.json` (`bos_token_id`, `eos_token_id` as an
//! integer or a list).

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// What the folder's config files say, before it is resolved against the vocabulary.
#[derive(Clone, Debug, Default)]
pub struct Declared {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub bos_ids: Vec<u32>,
    pub eos_ids: Vec<u32>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if matches!(std::fs::metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
        return Ok(None);
    }
    let bytes = super::tokenizer::read_limited(path, super::tokenizer::CONFIG_JSON_MAX)?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(format!("{}: not valid JSON ({e})", path.display())))?;
    if !v.is_object() {
        return Err(Error::invalid(format!("{}: expected a JSON object", path.display())));
    }
    Ok(Some(v))
}

/// A token given as `"<s>"` or as `{"content": "<s>", …}` (an AddedToken); null is absent.
fn token_text(v: Option<&Value>, path: &Path, field: &str) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::invalid(format!("{}: {field} is an object without a string \"content\"", path.display()))),
        },
        Some(_) => Err(Error::invalid(format!("{}: {field} must be a string or an AddedToken object", path.display()))),
    }
}

fn flag(v: Option<&Value>, path: &Path, field: &str) -> Result<Option<bool>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(Error::invalid(format!("{}: {field} must be true or false", path.display()))),
    }
}

fn ids(v: Option<&Value>, path: &Path, field: &str) -> Result<Vec<u32>> {
    let one = |x: &Value| -> Result<u32> {
        x.as_u64()
            .filter(|&n| n <= u32::MAX as u64)
            .map(|n| n as u32)
            .ok_or_else(|| Error::invalid(format!("{}: {field} must be a token id or a list of them", path.display())))
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

/// Reads the two config files of `dir` (either may be absent).
pub fn read(dir: &Path) -> Result<Declared> {
    let mut d = Declared::default();
    let tc = dir.join("tokenizer_config.json");
    if let Some(v) = read_json(&tc)? {
        d.bos_token = token_text(v.get("bos_token"), &tc, "bos_token")?;
        d.eos_token = token_text(v.get("eos_token"), &tc, "eos_token")?;
        d.add_bos = flag(v.get("add_bos_token"), &tc, "add_bos_token")?;
        d.add_eos = flag(v.get("add_eos_token"), &tc, "add_eos_token")?;
    }
    let gc = dir.join("generation_config.json");
    if let Some(v) = read_json(&gc)? {
        d.bos_ids = ids(v.get("bos_token_id"), &gc, "bos_token_id")?;
        d.eos_ids = ids(v.get("eos_token_id"), &gc, "eos_token_id")?;
    }
    Ok(d)
}
