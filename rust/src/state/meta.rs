//! What a checkpoint says about the run that wrote it: the engine config (so a resumed
//! run can be checked against it), the precision the engine actually computed in, and the
//! front end's own run description (opaque JSON text, stored verbatim).

use crate::config::{EngineConfig, Named};
use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// Largest front-end run text a checkpoint stores (it is metadata, not data).
pub const MAX_RUN_BYTES: usize = 1 << 20;

/// The full engine config as JSON: every model field, every optimizer option (including
/// those that do not apply), and the run-level fields. The front end can rebuild the same
/// engine from it.
pub fn config_json(cfg: &EngineConfig) -> Value {
    let mut m = Map::new();
    m.insert("model".into(), Value::Object(cfg.model.to_map()));
    m.insert("batch_size".into(), cfg.batch_size.into());
    m.insert("seq_len".into(), cfg.seq_len.into());
    m.insert("optimizer".into(), Value::Object(cfg.optimizer.to_map()));
    m.insert("seed".into(), cfg.seed.into());
    m.insert("device".into(), cfg.device.name().into());
    m.insert("threads".into(), cfg.threads.into());
    m.insert("grad_accum".into(), cfg.grad_accum.into());
    m.insert("precision".into(), cfg.precision.name().into());
    m.insert("checkpointing".into(), cfg.checkpointing.into());
    Value::Object(m)
}

/// The fields that decide the training trajectory, in the order a mismatch is reported.
/// `device`, `threads` and `checkpointing` are left out: they change speed and memory, not
/// the numbers (a run may move between machines); the precision compared is the one the
/// engine computed in (`auto` resolves per device), passed separately.
const TRAJECTORY: &[&str] = &["model", "optimizer", "seed", "batch_size", "seq_len", "grad_accum"];

/// Optimizer options a resume does not compare: `fused` (the per-layer fused step is
/// bit-identical to the global one, tests/galore.rs i12, and its default follows
/// grad_accum) and `dp_comm` (what the ranks of a data-parallel run send; checkpoints
/// written before it existed lack it).
const NOT_TRAJECTORY: &[&str] = &["fused", "dp_comm"];

/// The optimizer options a weights-only load compares: those that decide the state's
/// layout (which tensors, their shapes and storage) — not the update's hyperparameters.
const LAYOUT_OPTIONS: &[&str] =
    &["name", "rank", "proj_bits", "weight_bits", "weight_group_size", "proj_group_size", "block_size", "lazy", "queue_size"];

/// Model fields a weights-only load does not compare: they do not change what the
/// weights compute (`initializer_range` only draws the initial weights).
const NOT_FUNCTION: &[&str] = &["initializer_range"];

/// `v` (a model or optimizer section) with only the keys a check compares.
fn compared(field: &str, v: &Value, trajectory: bool) -> Value {
    let Some(m) = v.as_object() else { return v.clone() };
    let keep = |k: &str| match (field, trajectory) {
        ("optimizer", true) => !NOT_TRAJECTORY.contains(&k),
        ("optimizer", false) => LAYOUT_OPTIONS.contains(&k),
        ("model", false) => !NOT_FUNCTION.contains(&k),
        _ => true,
    };
    Value::Object(m.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Refuses a checkpoint whose engine config (`saved`, as stored) differs from the live
/// engine's in a trajectory-relevant field: the message names the first differing field
/// and both values. `saved_precision` / `live_precision`: `fp32` or `bf16` as computed.
/// `trajectory` false (`Check::Weights`): only what decides the state's layout and the
/// model's function is compared — the model (but `initializer_range`) and the optimizer's
/// storage options (`LAYOUT_OPTIONS`) — for an engine that will not continue the run
/// (inference or evaluation at another batch shape, seq_len, precision or hyperparameters).
pub fn check_config(saved: &Value, live: &EngineConfig, saved_precision: &str, live_precision: &str, trajectory: bool) -> Result<()> {
    // The live config goes through the same text round trip as the stored one, so float
    // fields compare equal exactly when they were equal when written (serde_json's parser
    // is not guaranteed to round-trip every f64 bit-exactly, but it is deterministic).
    let live = serde_json::to_string(&config_json(live)).map_err(|e| Error::invalid(format!("engine config: {e}")))?;
    let live: Value = serde_json::from_str(&live).map_err(|e| Error::invalid(format!("engine config: {e}")))?;
    let saved = saved.as_object().ok_or_else(|| Error::invalid("checkpoint engine_config is not a JSON object"))?;
    let fields = if trajectory { TRAJECTORY } else { &TRAJECTORY[..2] };
    for &field in fields {
        let (a, b) = (saved.get(field).unwrap_or(&Value::Null), live.get(field).unwrap_or(&Value::Null));
        let (a, b) = (compared(field, a, trajectory), compared(field, b, trajectory));
        if let Some((path, x, y)) = first_difference(field, &a, &b) {
            return Err(mismatch(&path, &x, &y));
        }
    }
    if trajectory && saved_precision != live_precision {
        return Err(mismatch("precision", &Value::from(saved_precision), &Value::from(live_precision)));
    }
    Ok(())
}

fn mismatch(path: &str, saved: &Value, live: &Value) -> Error {
    Error::invalid(format!(
        "checkpoint was written by another configuration: {path} is {saved} in the checkpoint and {live} in this engine; resume with the checkpoint's settings"
    ))
}

/// The first place two JSON values differ: (dotted path, value in `a`, value in `b`).
/// Object keys are compared in `b`'s order, then keys only `a` has.
fn first_difference(path: &str, a: &Value, b: &Value) -> Option<(String, Value, Value)> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, vb) in y {
                let va = x.get(k).unwrap_or(&Value::Null);
                if let Some(d) = first_difference(&format!("{path}.{k}"), va, vb) {
                    return Some(d);
                }
            }
            x.iter().find(|(k, _)| !y.contains_key(*k)).map(|(k, v)| (format!("{path}.{k}"), v.clone(), Value::Null))
        }
        _ if a == b => None,
        _ => Some((path.to_string(), a.clone(), b.clone())),
    }
}

/// Checks a front end's run text before it is stored: valid JSON, at most `MAX_RUN_BYTES`.
pub fn check_run(run: &str) -> Result<()> {
    if run.len() > MAX_RUN_BYTES {
        return Err(Error::invalid(format!("checkpoint run description is {} bytes; at most {MAX_RUN_BYTES} allowed", run.len())));
    }
    serde_json::from_str::<Value>(run).map_err(|e| Error::invalid(format!("checkpoint run description is not JSON: {e}")))?;
    Ok(())
}

/// The `state` metadata: the optimizer, its step counter (also inside `optim`), the
/// precision the engine computed in, and the optimizer's own scalars (`Optimizer::scalars`:
/// counters, statistics, refresh gaps, queue lengths, storage kinds).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineState {
    pub optimizer: String,
    pub step: u64,
    pub precision: String,
    pub optim: Value,
    /// lora / qlora: the frozen base's fingerprint (`Engine::base_fingerprint`); the base
    /// itself is not in the checkpoint, only the adapters and their optimizer state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

impl EngineState {
    /// Parses and range-checks the engine-level fields (the optimizer checks `optim`).
    pub fn parse(text: &str) -> Result<EngineState> {
        let st: EngineState = serde_json::from_str(text).map_err(|e| Error::invalid(format!("checkpoint state: {e}")))?;
        if st.step > super::MAX_COUNTER {
            return Err(Error::invalid(format!("checkpoint field step is {}, above the limit 2^53", st.step)));
        }
        if st.optim.get("step").and_then(Value::as_u64) != Some(st.step) {
            return Err(Error::invalid("checkpoint state: step differs from the optimizer's step"));
        }
        if !["fp32", "bf16"].contains(&st.precision.as_str()) {
            return Err(Error::invalid(format!("checkpoint state: precision {}; must be fp32 or bf16", super::tensors::shown(&st.precision))));
        }
        Ok(st)
    }
}

/// A counter from a checkpoint's scalars: at most 2^53 (`super::MAX_COUNTER`).
pub fn counter(what: &str, v: u64) -> Result<u64> {
    if v > super::MAX_COUNTER {
        return Err(Error::invalid(format!("checkpoint field {what} is {v}, above the limit 2^53")));
    }
    Ok(v)
}
