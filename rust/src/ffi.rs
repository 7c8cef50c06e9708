//! The C ABI: the only place with `extern "C"`, raw pointers and `catch_unwind`.
//!
//! Conventions: opaque handles from `Box::into_raw`; `i32` status codes
//! (0 = ok, negative = `error::Code`); error text stored per handle (nonblocking calls hop
//! threads, so no thread-locals) and read with `qg_last_error`; every entry point is
//! guarded so a Rust panic becomes status −2 instead of aborting the host process.

use crate::config::EngineConfig;
use crate::error::{Code, Error, Result};
use crate::train::{self, Session};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

/// Bumped whenever a signature or the meaning of an output slot changes.
pub const ABI_VERSION: u32 = 6;

pub struct Handle {
    session: Mutex<Box<dyn Session>>,
    error: Mutex<String>,
    broken: AtomicBool,
}

static QUIET: Once = Once::new();

/// Panics are reported through status codes; keep the default hook from printing
/// "thread panicked at …" into the user's terminal.
fn quiet_panics() {
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// Copies `text` (UTF-8, no NUL) into `buf` when it fits; returns the length needed.
unsafe fn write_text(text: &str, buf: *mut u8, cap: usize) -> usize {
    let bytes = text.as_bytes();
    if !buf.is_null() && cap >= bytes.len() {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len());
    }
    bytes.len()
}

unsafe fn handle<'a>(h: *const Handle) -> Option<&'a Handle> {
    h.as_ref()
}

/// Runs `f` on a handle's session with panic and error mapping.
unsafe fn with_session(h: *const Handle, f: impl FnOnce(&mut dyn Session) -> Result<()>) -> i32 {
    quiet_panics();
    let Some(h) = handle(h) else { return Code::Invalid as i32 };
    if h.broken.load(Ordering::Acquire) {
        *h.error.lock().unwrap_or_else(|e| e.into_inner()) =
            "engine is unusable after an earlier internal error; create a new one".into();
        return Code::Panic as i32;
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut s = h.session.lock().unwrap_or_else(|e| e.into_inner());
        f(s.as_mut())
    }));
    let (code, msg) = match r {
        Ok(Ok(())) => return 0,
        Ok(Err(e)) => (e.code as i32, e.msg),
        Err(p) => {
            h.broken.store(true, Ordering::Release);
            (Code::Panic as i32, format!("internal engine error (panic): {}", panic_text(p)))
        }
    };
    *h.error.lock().unwrap_or_else(|e| e.into_inner()) = msg;
    code
}

unsafe fn slice<'a, T>(p: *const T, n: usize) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::invalid("null buffer"));
    }
    Ok(std::slice::from_raw_parts(p, n))
}

#[no_mangle]
pub extern "C" fn qg_abi_version() -> u32 {
    quiet_panics();
    ABI_VERSION
}

/// Creates an engine from a JSON `EngineConfig` (plus an optional `init_from` path: the
/// weights of a Hugging Face checkpoint, loaded instead of a random initialisation). On
/// failure returns null and writes the message into `err` (up to `cap` bytes; `*err_len`
/// receives the full length).
#[no_mangle]
pub unsafe extern "C" fn qg_engine_new(cfg: *const u8, len: usize, err: *mut u8, cap: usize, err_len: *mut usize) -> *mut Handle {
    quiet_panics();
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<Box<dyn Session>> {
        let bytes = slice(cfg, len)?;
        let text = std::str::from_utf8(bytes).map_err(|_| Error::invalid("engine config is not UTF-8"))?;
        // `init_from`: a Hugging Face checkpoint whose weights replace the initialisation
        let init = match serde_json::from_str::<serde_json::Value>(text).ok().and_then(|v| v.get("init_from").cloned()) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(p)) => Some(p),
            Some(v) => return Err(Error::invalid(format!("init_from = {v}: must be a path"))),
        };
        train::open(EngineConfig::from_json(text)?, init.as_deref().map(std::path::Path::new))
    }));
    let msg = match r {
        Ok(Ok(session)) => {
            let h = Handle { session: Mutex::new(session), error: Mutex::new(String::new()), broken: AtomicBool::new(false) };
            return Box::into_raw(Box::new(h));
        }
        Ok(Err(e)) => e.msg,
        Err(p) => format!("internal engine error (panic): {}", panic_text(p)),
    };
    let n = write_text(&msg, err, cap);
    if !err_len.is_null() {
        *err_len = n;
    }
    std::ptr::null_mut()
}

/// Plans the bytes an engine built from `cfg` (the JSON of `qg_engine_new`) would allocate,
/// without allocating or touching a device (see `plan.rs`). `label` (UTF-8, may be empty)
/// names the model in the plan's messages; the config may carry `memory_budget` (bytes) for
/// `clip_mode = auto` (`Plan::with_budget`). Writes the plan as JSON into `out` when it fits
/// and returns 0, or writes the error text and returns a negative status; either way
/// `*out_len` receives the full length, so a caller retries with a larger buffer.
#[no_mangle]
pub unsafe extern "C" fn qg_plan(cfg: *const u8, len: usize, label: *const u8, label_len: usize, out: *mut u8, cap: usize, out_len: *mut usize) -> i32 {
    quiet_panics();
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<String> {
        let text = std::str::from_utf8(slice(cfg, len)?).map_err(|_| Error::invalid("engine config is not UTF-8"))?;
        let label = std::str::from_utf8(slice(label, label_len)?).map_err(|_| Error::invalid("model label is not UTF-8"))?;
        let budget = crate::plan::budget_field(text)?;
        let plan = crate::plan::Plan::for_config(&EngineConfig::from_json(text)?, if label.is_empty() { "the model" } else { label }, budget);
        serde_json::to_string(&plan).map_err(|e| Error::invalid(format!("plan: {e}")))
    }));
    let (code, text) = match r {
        Ok(Ok(json)) => (0, json),
        Ok(Err(e)) => (e.code as i32, e.msg),
        Err(p) => (Code::Panic as i32, format!("internal engine error (panic): {}", panic_text(p))),
    };
    let n = write_text(&text, out, cap);
    if !out_len.is_null() {
        *out_len = n;
    }
    code
}

#[no_mangle]
pub unsafe extern "C" fn qg_engine_free(h: *mut Handle) {
    if !h.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(h))));
    }
}

/// The handle's last error message; returns its byte length (copies when it fits).
#[no_mangle]
pub unsafe extern "C" fn qg_last_error(h: *const Handle, buf: *mut u8, cap: usize) -> usize {
    match handle(h) {
        Some(h) => write_text(&h.error.lock().unwrap_or_else(|e| e.into_inner()), buf, cap),
        None => 0,
    }
}

/// `train::Info` as JSON (params, device, optimizer, steps, memory, …); returns its byte
/// length.
#[no_mangle]
pub unsafe extern "C" fn qg_info(h: *const Handle, buf: *mut u8, cap: usize) -> usize {
    let mut text = String::new();
    with_session(h, |s| {
        text = serde_json::to_string(&s.info()).map_err(|e| Error::backend(format!("info: {e}")))?;
        Ok(())
    });
    write_text(&text, buf, cap)
}

/// The option schema (`config::schema_json`): optimizers, each optimizer option's type,
/// range, per-optimizer default and applicability, and the run-level options; returns its
/// byte length.
#[no_mangle]
pub unsafe extern "C" fn qg_options(buf: *mut u8, cap: usize) -> usize {
    quiet_panics();
    let text = catch_unwind(crate::config::schema_json).unwrap_or_default();
    write_text(&text, buf, cap)
}

/// Resolves a JSON `{ "optimizer": {…}, "grad_accum": n, "device": …, "precision": … }`
/// against the schema (`config::resolve_json`): the options that apply with every default
/// filled and the given options that do not apply, or the error; returns the byte length of
/// the answer.
#[no_mangle]
pub unsafe extern "C" fn qg_resolve_optimizer(cfg: *const u8, len: usize, buf: *mut u8, cap: usize) -> usize {
    quiet_panics();
    let text = catch_unwind(AssertUnwindSafe(|| {
        let text = slice(cfg, len).ok().and_then(|b| std::str::from_utf8(b).ok()).unwrap_or("");
        crate::config::resolve_json(text)
    }))
    .unwrap_or_else(|p| serde_json::json!({ "error": format!("internal engine error (panic): {}", panic_text(p)) }).to_string());
    write_text(&text, buf, cap)
}

/// Resolves a JSON `{ "model": {…}, "vocab_size"?: n, "seq_len"?: n }` (`config::model::resolve_json`):
/// the model config with every default filled and its first problem as data (field, value,
/// why), or the error; returns the byte length of the answer.
#[no_mangle]
pub unsafe extern "C" fn qg_resolve_model(cfg: *const u8, len: usize, buf: *mut u8, cap: usize) -> usize {
    quiet_panics();
    let text = catch_unwind(AssertUnwindSafe(|| {
        let text = slice(cfg, len).ok().and_then(|b| std::str::from_utf8(b).ok()).unwrap_or("");
        crate::config::model::resolve_json(text)
    }))
    .unwrap_or_else(|p| serde_json::json!({ "error": format!("internal engine error (panic): {}", panic_text(p)) }).to_string());
    write_text(&text, buf, cap)
}

/// The optional loss mask beside `n` token ids: null = every target carries loss.
unsafe fn mask<'a>(m: *const u8, n: usize) -> Result<Option<&'a [u8]>> {
    if m.is_null() {
        Ok(None)
    } else {
        slice(m, n).map(Some)
    }
}

/// One optimizer step over `micro` micro-batches of batch_size rows of t + 1 ids (`n` =
/// micro × batch_size × (t + 1), t ≤ seq_len). `mask` (null, or `n` bytes): a target
/// whose entry is 0 carries no loss. `out` receives [loss, grad_norm, clipped (0/1),
/// count (targets that carried loss)].
#[no_mangle]
pub unsafe extern "C" fn qg_train_step(
    h: *const Handle,
    tokens: *const i32,
    mask_ptr: *const u8,
    n: usize,
    micro: u32,
    lr: f32,
    out: *mut f64,
) -> i32 {
    with_session(h, |s| {
        let st = s.train_step_masked(slice(tokens, n)?, mask(mask_ptr, n)?, micro as usize, lr)?;
        if !out.is_null() {
            let o = std::slice::from_raw_parts_mut(out, 4);
            o[0] = st.loss;
            o[1] = st.grad_norm;
            o[2] = st.clipped as u8 as f64;
            o[3] = st.count as f64;
        }
        Ok(())
    })
}

/// Validation loss of `batches` batches of batch_size rows of t + 1 ids (`n` = batches ×
/// batch_size × (t + 1), t ≤ seq_len), `mask` as in `qg_train_step`. `out` receives [mean,
/// sum, count]; `rows` (null, or 2 × batches × batch_size values) the per-row NLL sums,
/// then the per-row counts.
#[no_mangle]
pub unsafe extern "C" fn qg_eval(
    h: *const Handle,
    tokens: *const i32,
    mask_ptr: *const u8,
    n: usize,
    batches: u32,
    out: *mut f64,
    rows: *mut f64,
) -> i32 {
    with_session(h, |s| {
        let e = s.eval_masked(slice(tokens, n)?, mask(mask_ptr, n)?, batches as usize)?;
        if !out.is_null() {
            let o = std::slice::from_raw_parts_mut(out, 3);
            o[0] = e.mean;
            o[1] = e.sum;
            o[2] = e.count as f64;
        }
        if !rows.is_null() {
            let r = e.row_sums.len();
            let o = std::slice::from_raw_parts_mut(rows, 2 * r);
            o[..r].copy_from_slice(&e.row_sums);
            o[r..].copy_from_slice(&e.row_counts);
        }
        Ok(())
    })
}

/// Engine-tracked bytes: [weights, adapters, grads, optimizer_state, projector, activations, total].
#[no_mangle]
pub unsafe extern "C" fn qg_memory(h: *const Handle, out: *mut f64) -> i32 {
    with_session(h, |s| {
        if out.is_null() {
            return Err(Error::invalid("null output buffer"));
        }
        let m = s.memory();
        let o = std::slice::from_raw_parts_mut(out, 7);
        for i in 0..7 {
            o[i] = m[i] as f64;
        }
        Ok(())
    })
}

/// Measured GFLOP/s of an (m×k)·(k×n) f32 GEMM on `threads` threads (0 = all cores);
/// negative on failure.
#[no_mangle]
pub extern "C" fn qg_gemm_gflops(m: u32, n: u32, k: u32, iters: u32, threads: u32) -> f64 {
    quiet_panics();
    catch_unwind(|| {
        match crate::backend::cpu::Cpu::new(threads as usize) {
            Ok(cpu) => cpu.gemm_gflops(m as usize, n as usize, k as usize, iters as usize),
            Err(_) => -1.0,
        }
    })
    .unwrap_or(-2.0)
}

fn path_arg<'a>(p: *const u8, n: usize) -> Result<&'a str> {
    let b = unsafe { slice(p, n)? };
    std::str::from_utf8(b).map_err(|_| Error::invalid("path is not UTF-8"))
}

/// Writes weights and optimizer state to `path` as a safetensors checkpoint (see
/// `state`), atomically and durably (`state::file::write_atomic`: an interrupted save never
/// destroys an older checkpoint nor leaves a temporary file behind, and a symlink, folder,
/// FIFO or device is never written through). `run` (UTF-8 JSON text, may be empty = none)
/// is the front end's description of the run, stored verbatim and returned by
/// `qg_checkpoint_info`.
#[no_mangle]
pub unsafe extern "C" fn qg_save(h: *const Handle, path: *const u8, len: usize, run: *const u8, run_len: usize) -> i32 {
    with_session(h, |s| {
        let path = path_arg(path, len)?;
        let run = std::str::from_utf8(slice(run, run_len)?).map_err(|_| Error::invalid("checkpoint run description is not UTF-8"))?;
        s.save_file(std::path::Path::new(path), (!run.is_empty()).then_some(run))
    })
}

/// Restores a checkpoint written by `qg_save` into a session whose trajectory-relevant
/// config matches (the message names the first differing field). The file is checked whole
/// (regular file, header, checksum, every value and field) before the engine is touched; a
/// refused load changes nothing.
#[no_mangle]
pub unsafe extern "C" fn qg_load(h: *const Handle, path: *const u8, len: usize) -> i32 {
    with_session(h, |s| {
        let path = path_arg(path, len)?;
        s.load_file(std::path::Path::new(path), crate::state::engine::Check::Resume)
    })
}

/// `qg_load` for an engine that will not continue the run (inference or evaluation at
/// another batch_size, seq_len, seed or precision): only the model and optimizer config
/// must match the checkpoint's. Every other check is the same.
#[no_mangle]
pub unsafe extern "C" fn qg_load_weights(h: *const Handle, path: *const u8, len: usize) -> i32 {
    with_session(h, |s| {
        let path = path_arg(path, len)?;
        s.load_file(std::path::Path::new(path), crate::state::engine::Check::Weights)
    })
}

/// Checks the checkpoint at `path` (regular file, header, checksum) without an engine and
/// writes `{"format_version", "optimizer", "step", "engine_config", "run", "error"}` into
/// `out` when it fits (`error`: null, or the one-line problem); returns its byte length.
#[no_mangle]
pub unsafe extern "C" fn qg_checkpoint_info(path: *const u8, len: usize, out: *mut u8, cap: usize) -> usize {
    quiet_panics();
    let fail = |msg: String| {
        serde_json::json!({ "format_version": null, "optimizer": null, "step": null, "engine_config": null, "run": null, "error": msg }).to_string()
    };
    let text = catch_unwind(AssertUnwindSafe(|| match path_arg(path, len) {
        Ok(p) => crate::state::info_json(std::path::Path::new(p)),
        Err(e) => fail(e.msg),
    }))
    .unwrap_or_else(|p| fail(format!("internal engine error (panic): {}", panic_text(p))));
    write_text(&text, out, cap)
}

/// Deliberately panics inside the guard: lets tests prove a panic becomes an error.
#[no_mangle]
pub unsafe extern "C" fn qg_debug_panic(h: *const Handle) -> i32 {
    with_session(h, |_| panic!("deliberate panic for testing"))
}

// inference

/// Logits of the engine's own forward pass (the training numerics) on `batch × seq` input
/// ids (`n` of them; batch and seq must be the engine's batch_size and seq_len), written
/// into `out` (room for `cap` f32 values, at least batch × seq × vocab) row-major.
#[no_mangle]
pub unsafe extern "C" fn qg_logits(h: *const Handle, tokens: *const i32, n: usize, batch: u32, seq: u32, out: *mut f32, cap: usize) -> i32 {
    with_session(h, |s| {
        let toks = slice(tokens, n)?;
        if out.is_null() {
            return Err(Error::invalid("logits: null output buffer"));
        }
        s.logits(toks, batch as usize, seq as usize, std::slice::from_raw_parts_mut(out, cap))
    })
}

/// Generates after a prompt: `json` is `{ "prompt": [ids], "max_new_tokens": n,
/// "temperature"?, "top_k"?, "top_p"?, "seed"?, "eos"?: [ids], "cache"?: true }`
/// (`infer::Request`). Writes `{ "ids", "stop", "seconds", "prefill_seconds",
/// "load_seconds" }` into `out` when it fits; `*out_len` receives its full length.
#[no_mangle]
pub unsafe extern "C" fn qg_generate(h: *const Handle, json: *const u8, len: usize, out: *mut u8, cap: usize, out_len: *mut usize) -> i32 {
    with_session(h, |s| {
        let text = std::str::from_utf8(slice(json, len)?).map_err(|_| Error::invalid("generate: request is not UTF-8"))?;
        let g = s.generate(&crate::infer::Request::from_json(text)?)?;
        let answer = serde_json::to_string(&g).map_err(|e| Error::backend(format!("generate: {e}")))?;
        let n = write_text(&answer, out, cap);
        if !out_len.is_null() {
            *out_len = n;
        }
        Ok(())
    })
}

// data: tokenizers and token shards

use crate::data::progress::Progress;
use crate::data::shards::{BuildSpec, Shards, Split};
use crate::data::tokenizer::Tokenizer;
use crate::data::train::TrainSpec;

/// A tokenizer (bytes or Hugging Face); read-only after creation, so calls share it.
pub struct TokHandle {
    tok: Tokenizer,
    error: Mutex<String>,
}

/// An opened token shard set (memory-mapped).
pub struct ShardHandle {
    shards: Shards,
    error: Mutex<String>,
}

/// Runs `f` with panic mapping; the error text goes to `error`.
fn data_call(error: &Mutex<String>, f: impl FnOnce() -> Result<()>) -> i32 {
    quiet_panics();
    let (code, msg) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return 0,
        Ok(Err(e)) => (e.code as i32, e.msg),
        Err(p) => (Code::Panic as i32, format!("internal engine error (panic): {}", panic_text(p))),
    };
    *error.lock().unwrap_or_else(|e| e.into_inner()) = msg;
    code
}

/// A new handle from `f`, or null with the one-line error in `err` (as `qg_engine_new`).
unsafe fn data_new<T>(f: impl FnOnce() -> Result<T>, err: *mut u8, cap: usize, err_len: *mut usize) -> *mut T {
    quiet_panics();
    let msg = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => return Box::into_raw(Box::new(v)),
        Ok(Err(e)) => e.msg,
        Err(p) => format!("internal engine error (panic): {}", panic_text(p)),
    };
    let n = write_text(&msg, err, cap);
    if !err_len.is_null() {
        *err_len = n;
    }
    std::ptr::null_mut()
}

fn json_arg<T: serde::de::DeserializeOwned>(p: *const u8, n: usize, what: &str) -> Result<T> {
    let text = std::str::from_utf8(unsafe { slice(p, n)? }).map_err(|_| Error::invalid(format!("{what} is not UTF-8")))?;
    serde_json::from_str(text).map_err(|e| Error::invalid(format!("{what}: {e}")))
}

/// A progress counter for `qg_shards_build` / `qg_tok_train`; free with `qg_progress_free`
/// after the call it was given to has returned.
#[no_mangle]
pub extern "C" fn qg_progress_new() -> *mut Progress {
    Box::into_raw(Box::new(Progress::new()))
}

/// `out` receives [bytes read, bytes in all]; returns 0, or −1 for a null argument.
#[no_mangle]
pub unsafe extern "C" fn qg_progress_get(p: *const Progress, out: *mut f64) -> i32 {
    let (Some(p), false) = (p.as_ref(), out.is_null()) else { return Code::Invalid as i32 };
    let (read, total) = p.get();
    *out = read as f64;
    *out.add(1) = total as f64;
    0
}

/// Asks the call using `p` to stop at its next document (it then fails with "cancelled").
#[no_mangle]
pub unsafe extern "C" fn qg_progress_cancel(p: *const Progress) {
    if let Some(p) = p.as_ref() {
        p.cancel();
    }
}

#[no_mangle]
pub unsafe extern "C" fn qg_progress_free(p: *mut Progress) {
    if !p.is_null() {
        drop(Box::from_raw(p));
    }
}

/// Opens a tokenizer: `tokenizer.json` or a model folder holding it (BOS/EOS from its
/// `tokenizer_config.json` and `generation_config.json`); an empty path gives the byte
/// tokenizer. On failure returns null with the one-line error in `err`.
#[no_mangle]
pub unsafe extern "C" fn qg_tok_open(path: *const u8, len: usize, err: *mut u8, cap: usize, err_len: *mut usize) -> *mut TokHandle {
    data_new(
        || {
            let p = path_arg(path, len)?;
            let tok = if p.is_empty() { Tokenizer::bytes() } else { Tokenizer::open(std::path::Path::new(p))? };
            Ok(TokHandle { tok, error: Mutex::new(String::new()) })
        },
        err,
        cap,
        err_len,
    )
}

/// Trains a byte-level BPE from a JSON `{ "inputs": [paths], "vocab_size": n,
/// "text_field"?: s, "out": dir }`, saves it into `out` and opens it; `progress` (may be
/// null) counts input bytes. On failure returns null with the one-line error in `err`.
#[no_mangle]
pub unsafe extern "C" fn qg_tok_train(cfg: *const u8, len: usize, progress: *const Progress, err: *mut u8, cap: usize, err_len: *mut usize) -> *mut TokHandle {
    data_new(
        || {
            let spec: TrainSpec = json_arg(cfg, len, "tokenizer training config")?;
            let tok = crate::data::train::train(&spec, progress.as_ref())?;
            Ok(TokHandle { tok, error: Mutex::new(String::new()) })
        },
        err,
        cap,
        err_len,
    )
}

#[no_mangle]
pub unsafe extern "C" fn qg_tok_free(h: *mut TokHandle) {
    if !h.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(h))));
    }
}

/// The tokenizer handle's last error message; returns its byte length.
#[no_mangle]
pub unsafe extern "C" fn qg_tok_last_error(h: *const TokHandle, buf: *mut u8, cap: usize) -> usize {
    match h.as_ref() {
        Some(h) => write_text(&h.error.lock().unwrap_or_else(|e| e.into_inner()), buf, cap),
        None => 0,
    }
}

/// `{ kind, vocab_size, bos_id, eos_id, eos_ids, adds_bos, adds_eos, files }` as JSON;
/// returns its byte length.
#[no_mangle]
pub unsafe extern "C" fn qg_tok_info(h: *const TokHandle, buf: *mut u8, cap: usize) -> usize {
    let Some(h) = h.as_ref() else { return 0 };
    let text = catch_unwind(AssertUnwindSafe(|| h.tok.info().to_string())).unwrap_or_default();
    write_text(&text, buf, cap)
}

/// Token ids of the UTF-8 `text` (`add_special` ≠ 0 applies BOS/EOS as the model says).
/// Copies them into `out` when they fit in `cap`; `*out_len` receives the count either
/// way, so a caller retries with a larger buffer.
#[no_mangle]
pub unsafe extern "C" fn qg_tok_encode(h: *const TokHandle, text: *const u8, len: usize, add_special: u32, out: *mut i32, cap: usize, out_len: *mut usize) -> i32 {
    let Some(h) = h.as_ref() else { return Code::Invalid as i32 };
    data_call(&h.error, || {
        let text = std::str::from_utf8(slice(text, len)?).map_err(|_| Error::invalid("text is not UTF-8"))?;
        let ids = h.tok.encode(text, add_special != 0)?;
        if !out.is_null() && cap >= ids.len() {
            let o = std::slice::from_raw_parts_mut(out, ids.len());
            for (o, &i) in o.iter_mut().zip(&ids) {
                *o = i as i32;
            }
        }
        if !out_len.is_null() {
            *out_len = ids.len();
        }
        Ok(())
    })
}

/// Text of `ids` (`skip_special` ≠ 0 drops special tokens) into `buf` when it fits;
/// `*out_len` receives its byte length either way.
#[no_mangle]
pub unsafe extern "C" fn qg_tok_decode(h: *const TokHandle, ids: *const i32, n: usize, skip_special: u32, buf: *mut u8, cap: usize, out_len: *mut usize) -> i32 {
    let Some(h) = h.as_ref() else { return Code::Invalid as i32 };
    data_call(&h.error, || {
        let ids = slice(ids, n)?;
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id < 0) {
            return Err(Error::invalid(format!("token id {id} at {i}: ids are ≥ 0")));
        }
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let text = h.tok.decode(&ids, skip_special != 0)?;
        let need = write_text(&text, buf, cap);
        if !out_len.is_null() {
            *out_len = need;
        }
        Ok(())
    })
}

/// Writes the tokenizer's files (`tokenizer.json`, and `tokenizer_config.json` /
/// `generation_config.json` when it has them) into the folder `dir`.
#[no_mangle]
pub unsafe extern "C" fn qg_tok_save(h: *const TokHandle, dir: *const u8, len: usize) -> i32 {
    let Some(h) = h.as_ref() else { return Code::Invalid as i32 };
    data_call(&h.error, || h.tok.save(std::path::Path::new(path_arg(dir, len)?)))
}

/// The token shards of a corpus under tokenizer `tok`, from a JSON `{ "data": path,
/// "text_field"?: s, "val_fraction": f, "cache_dir": dir, "threads"?: n }`: reused from
/// the cache when a finished build exists, else built (in parallel, streaming) and cached.
/// `progress` (may be null) counts input bytes. On failure returns null with the one-line
/// error in `err`.
#[no_mangle]
pub unsafe extern "C" fn qg_shards_build(tok: *const TokHandle, cfg: *const u8, len: usize, progress: *const Progress, err: *mut u8, cap: usize, err_len: *mut usize) -> *mut ShardHandle {
    data_new(
        || {
            let tok = tok.as_ref().ok_or_else(|| Error::invalid("null tokenizer"))?;
            let spec: BuildSpec = json_arg(cfg, len, "corpus config")?;
            let shards = Shards::build(&tok.tok, &spec, progress.as_ref())?;
            Ok(ShardHandle { shards, error: Mutex::new(String::new()) })
        },
        err,
        cap,
        err_len,
    )
}

/// Opens a finished shard folder (the `dir` a build reports).
#[no_mangle]
pub unsafe extern "C" fn qg_shards_open(dir: *const u8, len: usize, err: *mut u8, cap: usize, err_len: *mut usize) -> *mut ShardHandle {
    data_new(
        || {
            let shards = Shards::open(std::path::Path::new(path_arg(dir, len)?))?;
            Ok(ShardHandle { shards, error: Mutex::new(String::new()) })
        },
        err,
        cap,
        err_len,
    )
}

#[no_mangle]
pub unsafe extern "C" fn qg_shards_free(h: *mut ShardHandle) {
    if !h.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(h))));
    }
}

/// The shard handle's last error message; returns its byte length.
#[no_mangle]
pub unsafe extern "C" fn qg_shards_last_error(h: *const ShardHandle, buf: *mut u8, cap: usize) -> usize {
    match h.as_ref() {
        Some(h) => write_text(&h.error.lock().unwrap_or_else(|e| e.into_inner()), buf, cap),
        None => 0,
    }
}

/// `{ train_tokens, val_tokens, dtype, vocab_size, docs: {train, val}, split, bos_id,
/// eos_id, cached, dir, … }` as JSON; returns its byte length.
#[no_mangle]
pub unsafe extern "C" fn qg_shards_info(h: *const ShardHandle, buf: *mut u8, cap: usize) -> usize {
    let Some(h) = h.as_ref() else { return 0 };
    let text = catch_unwind(AssertUnwindSafe(|| h.shards.info().to_string())).unwrap_or_default();
    write_text(&text, buf, cap)
}

/// Copies `n` windows of `window` tokens, starting at `starts[i]` of split `split`
/// (0 = train, 1 = val), into `out` (n × window ids, row-major).
#[no_mangle]
pub unsafe extern "C" fn qg_shards_read(h: *const ShardHandle, split: u32, starts: *const u64, n: usize, window: usize, out: *mut i32) -> i32 {
    let Some(h) = h.as_ref() else { return Code::Invalid as i32 };
    data_call(&h.error, || {
        let split = match split {
            0 => Split::Train,
            1 => Split::Val,
            s => return Err(Error::invalid(format!("split {s}: 0 (train) or 1 (val)"))),
        };
        let starts = slice(starts, n)?;
        let total = n.checked_mul(window).ok_or_else(|| Error::invalid("window count overflows"))?;
        if total > 0 && out.is_null() {
            return Err(Error::invalid("null output buffer"));
        }
        let out = if total == 0 { &mut [][..] } else { std::slice::from_raw_parts_mut(out, total) };
        h.shards.read(split, starts, window, out)
    })
}

// ---- H2 safetensors: Hugging Face weights in and out (`crate::hf`) ----

/// Loads Hugging Face LLaMA weights (a folder with `model.safetensors` or
/// `model.safetensors.index.json`, an index file, or one `.safetensors` file; F32, BF16 or
/// F16) into a new engine; a checkpoint that does not match the config changes nothing.
#[no_mangle]
pub unsafe extern "C" fn qg_import_hf(h: *const Handle, path: *const u8, len: usize) -> i32 {
    with_session(h, |s| {
        let path = path_arg(path, len)?;
        s.hf().import_hf(std::path::Path::new(path))
    })
}

/// Writes the model as a Hugging Face folder from a JSON `{"dir": "...", "dtype": "bf16" |
/// "f32", "extra": {...}, "copy": ["file", ...]}` (`hf::ExportOptions`): the folder must not
/// exist or be empty, and appears complete or not at all.
#[no_mangle]
pub unsafe extern "C" fn qg_export_hf(h: *const Handle, json: *const u8, len: usize) -> i32 {
    with_session(h, |s| {
        let text = std::str::from_utf8(slice(json, len)?).map_err(|_| Error::invalid("export options are not UTF-8"))?;
        s.hf().export_hf(&crate::hf::ExportOptions::from_json(text)?)
    })
}

/// Validates the safetensors headers at a path (as `qg_import_hf` finds them; no config
/// check) and writes `{"files": [...], "bytes": n, "tensors": [{"name", "dtype", "shape"}],
/// "error"?: "..."}` into `out` when it fits; returns its byte length.
#[no_mangle]
pub unsafe extern "C" fn qg_hf_inspect(path: *const u8, len: usize, out: *mut u8, cap: usize) -> usize {
    quiet_panics();
    let text = catch_unwind(AssertUnwindSafe(|| match path_arg(path, len) {
        Ok(p) => crate::hf::inspect_json(p),
        Err(e) => serde_json::json!({ "files": [], "bytes": 0, "tensors": [], "error": e.msg }).to_string(),
    }))
    .unwrap_or_else(|p| serde_json::json!({ "files": [], "bytes": 0, "tensors": [], "error": format!("internal engine error (panic): {}", panic_text(p)) }).to_string());
    write_text(&text, out, cap)
}

// ---- PEFT adapters in and out of a lora / qlora engine (`crate::hf::adapter`) ----

/// Loads a PEFT LoRA adapter folder (`adapter_config.json`, `adapter_model.safetensors`)
/// into a new lora/qlora engine built with the adapter's settings (r, lora_alpha,
/// target_modules, use_rslora; see `qg_adapter_config`). Checked whole first; a refused
/// load changes nothing.
#[no_mangle]
pub unsafe extern "C" fn qg_load_adapter(h: *const Handle, dir: *const u8, len: usize) -> i32 {
    with_session(h, |s| {
        let dir = path_arg(dir, len)?;
        s.adapter().load_adapter(std::path::Path::new(dir))
    })
}

/// Writes the engine's adapters as a PEFT adapter folder from a JSON `{"dir": "...",
/// "dtype"?: "f32" | "bf16", "base_model"?: "path", "overwrite"?: false}`
/// (`hf::adapter::SaveAdapterOptions`); adapter files already in the folder are kept unless
/// `overwrite`.
#[no_mangle]
pub unsafe extern "C" fn qg_save_adapter(h: *const Handle, json: *const u8, len: usize) -> i32 {
    with_session(h, |s| {
        let text = std::str::from_utf8(slice(json, len)?).map_err(|_| Error::invalid("adapter save options are not UTF-8"))?;
        s.adapter().save_adapter(&crate::hf::adapter::SaveAdapterOptions::from_json(text)?)
    })
}

/// The settings of the PEFT adapter folder at `path` without an engine (`peft::read_config`):
/// writes `{"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
/// "base_model_name_or_path", "error"}` (`error`: null or the one-line problem) into `out`
/// when it fits; returns its byte length.
#[no_mangle]
pub unsafe extern "C" fn qg_adapter_config(path: *const u8, len: usize, out: *mut u8, cap: usize) -> usize {
    quiet_panics();
    let text = catch_unwind(AssertUnwindSafe(|| match path_arg(path, len) {
        Ok(p) => crate::hf::adapter::config_json(std::path::Path::new(p)),
        Err(e) => serde_json::json!({ "error": e.msg }).to_string(),
    }))
    .unwrap_or_else(|p| serde_json::json!({ "error": format!("internal engine error (panic): {}", panic_text(p)) }).to_string());
    write_text(&text, out, cap)
}

// ---- data-parallel communication (`crate::dist`): one world per process, no handle ----

/// The last error of a `qg_dist_*` call (process-wide: the calls are serialised anyway).
static DIST_ERROR: Mutex<String> = Mutex::new(String::new());

/// Runs a `dist` call with panic and error mapping; the error text goes to `qg_dist_last_error`.
fn dist_call(f: impl FnOnce() -> Result<()>) -> i32 {
    quiet_panics();
    let (code, msg) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return 0,
        Ok(Err(e)) => (e.code as i32, e.msg),
        Err(p) => (Code::Panic as i32, format!("internal engine error (panic): {}", panic_text(p))),
    };
    *DIST_ERROR.lock().unwrap_or_else(|e| e.into_inner()) = msg;
    code
}

/// The message of the last failed `qg_dist_*` call; returns its byte length.
#[no_mangle]
pub unsafe extern "C" fn qg_dist_last_error(buf: *mut u8, cap: usize) -> usize {
    write_text(&DIST_ERROR.lock().unwrap_or_else(|e| e.into_inner()), buf, cap)
}

/// Joins the job (`dist::init`): `mode` (UTF-8: `auto`, `mpi` or `off`; empty = `auto`)
/// decides whether MPI is loaded. Call it from the thread that will call `qg_dist_finalize`.
#[no_mangle]
pub unsafe extern "C" fn qg_dist_init(mode: *const u8, len: usize) -> i32 {
    dist_call(|| {
        let mode = std::str::from_utf8(slice(mode, len)?).map_err(|_| Error::invalid("dist mode is not UTF-8"))?;
        crate::dist::init(crate::dist::Mode::parse(mode)?).map(|_| ())
    })
}

/// `dist::Info` as JSON (backend, rank, size, launcher, library, version, finalized);
/// returns its byte length.
#[no_mangle]
pub unsafe extern "C" fn qg_dist_info(buf: *mut u8, cap: usize) -> usize {
    quiet_panics();
    let text = catch_unwind(|| serde_json::to_string(&crate::dist::info()).unwrap_or_default()).unwrap_or_default();
    write_text(&text, buf, cap)
}

/// Ends MPI (call from the thread that called `qg_dist_init`); a no-op without MPI.
#[no_mangle]
pub extern "C" fn qg_dist_finalize() -> i32 {
    dist_call(crate::dist::finalize)
}

/// Ends every rank of the job with `code` (`MPI_Abort`); returns without MPI.
#[no_mangle]
pub extern "C" fn qg_dist_abort(code: i32) {
    quiet_panics();
    let _ = catch_unwind(|| crate::dist::abort(code));
}

#[no_mangle]
pub extern "C" fn qg_dist_barrier() -> i32 {
    dist_call(crate::dist::barrier)
}

/// In-place sum of `n` f32 over every rank.
#[no_mangle]
pub unsafe extern "C" fn qg_dist_allreduce_f32(buf: *mut f32, n: usize) -> i32 {
    dist_call(|| {
        if n > 0 && buf.is_null() {
            return Err(Error::invalid("null buffer"));
        }
        crate::dist::allreduce_sum(if n == 0 { &mut [] } else { std::slice::from_raw_parts_mut(buf, n) })
    })
}

/// In-place sum of `n` f64 over every rank.
#[no_mangle]
pub unsafe extern "C" fn qg_dist_allreduce_f64(buf: *mut f64, n: usize) -> i32 {
    dist_call(|| {
        if n > 0 && buf.is_null() {
            return Err(Error::invalid("null buffer"));
        }
        crate::dist::allreduce_sum(if n == 0 { &mut [] } else { std::slice::from_raw_parts_mut(buf, n) })
    })
}

/// Copies `root`'s `n` bytes into every rank's buffer.
#[no_mangle]
pub unsafe extern "C" fn qg_dist_bcast(buf: *mut u8, n: usize, root: u32) -> i32 {
    dist_call(|| {
        if n > 0 && buf.is_null() {
            return Err(Error::invalid("null buffer"));
        }
        crate::dist::bcast(if n == 0 { &mut [] } else { std::slice::from_raw_parts_mut(buf, n) }, root as usize)
    })
}

/// Refuses, on every rank with the same line, when the `n` bytes (a hash of the resolved
/// options) differ from rank 0's; `what` (UTF-8) names them in the message.
#[no_mangle]
pub unsafe extern "C" fn qg_dist_check_same(what: *const u8, what_len: usize, bytes: *const u8, n: usize) -> i32 {
    dist_call(|| {
        let what = std::str::from_utf8(slice(what, what_len)?).map_err(|_| Error::invalid("label is not UTF-8"))?;
        crate::dist::check_same(if what.is_empty() { "the configuration" } else { what }, slice(bytes, n)?)
    })
}

/// Non-blocking sums started by `qg_dist_iallreduce_f32`, by id.
static DIST_PENDING: Mutex<Vec<(u64, crate::dist::Pending<'static>)>> = Mutex::new(Vec::new());
static DIST_NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Starts an in-place sum of `n` f32 over every rank and writes its id into `*id`; the
/// buffer must stay alive and untouched until `qg_dist_wait(id)` returns.
#[no_mangle]
pub unsafe extern "C" fn qg_dist_iallreduce_f32(buf: *mut f32, n: usize, id: *mut u64) -> i32 {
    dist_call(|| {
        if (n > 0 && buf.is_null()) || id.is_null() {
            return Err(Error::invalid("null buffer"));
        }
        let data: &'static mut [f32] = if n == 0 { &mut [] } else { std::slice::from_raw_parts_mut(buf, n) };
        let p = crate::dist::iallreduce_sum(data)?;
        let k = DIST_NEXT_ID.fetch_add(1, Ordering::Relaxed);
        DIST_PENDING.lock().unwrap_or_else(|e| e.into_inner()).push((k, p));
        *id = k;
        Ok(())
    })
}

/// Waits for the sum started under `id`; afterwards its buffer holds the sum on every rank.
#[no_mangle]
pub extern "C" fn qg_dist_wait(id: u64) -> i32 {
    dist_call(|| {
        let p = {
            let mut all = DIST_PENDING.lock().unwrap_or_else(|e| e.into_inner());
            let Some(i) = all.iter().position(|(k, _)| *k == id) else {
                return Err(Error::invalid(format!("no pending all-reduce with id {id} (already waited for, or never started)")));
            };
            all.swap_remove(i).1
        };
        p.wait()
    })
}
