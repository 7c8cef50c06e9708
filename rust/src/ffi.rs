//! The C ABI: the only place with `extern "C"`, raw pointers and `catch_unwind`.
//!
//! Conventions (deno-notes §0): opaque handles from `Box::into_raw`; `i32` status codes
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
pub const ABI_VERSION: u32 = 2;

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

/// Creates an engine from a JSON `EngineConfig`. On failure returns null and writes the
/// message into `err` (up to `cap` bytes; `*err_len` receives the full length).
#[no_mangle]
pub unsafe extern "C" fn qg_engine_new(cfg: *const u8, len: usize, err: *mut u8, cap: usize, err_len: *mut usize) -> *mut Handle {
    quiet_panics();
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<Box<dyn Session>> {
        let bytes = slice(cfg, len)?;
        let text = std::str::from_utf8(bytes).map_err(|_| Error::invalid("engine config is not UTF-8"))?;
        train::open(EngineConfig::from_json(text)?)
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

/// JSON with params, device, optimizer, steps and memory; returns its byte length.
#[no_mangle]
pub unsafe extern "C" fn qg_info(h: *const Handle, buf: *mut u8, cap: usize) -> usize {
    let mut text = String::new();
    with_session(h, |s| {
        text = s.info_json();
        Ok(())
    });
    write_text(&text, buf, cap)
}

/// One optimizer step over `micro` micro-batches. `out` receives
/// [loss, grad_norm, clipped (0/1)].
#[no_mangle]
pub unsafe extern "C" fn qg_train_step(h: *const Handle, tokens: *const i32, n: usize, micro: u32, lr: f32, out: *mut f64) -> i32 {
    with_session(h, |s| {
        let st = s.train_step(slice(tokens, n)?, micro as usize, lr)?;
        if !out.is_null() {
            let o = std::slice::from_raw_parts_mut(out, 3);
            o[0] = st.loss;
            o[1] = st.grad_norm;
            o[2] = st.clipped as u8 as f64;
        }
        Ok(())
    })
}

/// Mean validation loss over `batches` batches into `out[0]`.
#[no_mangle]
pub unsafe extern "C" fn qg_eval(h: *const Handle, tokens: *const i32, n: usize, batches: u32, out: *mut f64) -> i32 {
    with_session(h, |s| {
        let l = s.eval(slice(tokens, n)?, batches as usize)?;
        if !out.is_null() {
            *out = l;
        }
        Ok(())
    })
}

/// Engine-tracked bytes: [weights, grads, optimizer_state, projector, activations, total].
#[no_mangle]
pub unsafe extern "C" fn qg_memory(h: *const Handle, out: *mut f64) -> i32 {
    with_session(h, |s| {
        if out.is_null() {
            return Err(Error::invalid("null output buffer"));
        }
        let m = s.memory();
        let o = std::slice::from_raw_parts_mut(out, 6);
        for i in 0..6 {
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

/// Writes weights and optimizer state to `path` (atomically: a temporary file renamed
/// into place, so an interrupted save never destroys an older checkpoint).
#[no_mangle]
pub unsafe extern "C" fn qg_save(h: *const Handle, path: *const u8, len: usize) -> i32 {
    with_session(h, |s| {
        let path = path_arg(path, len)?;
        let bytes = s.save_state()?;
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, &bytes).map_err(|e| Error::invalid(format!("cannot write checkpoint {tmp}: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::invalid(format!("cannot move checkpoint into {path}: {e}")))
    })
}

/// Restores a checkpoint written by `qg_save` into a session built with the same config.
#[no_mangle]
pub unsafe extern "C" fn qg_load(h: *const Handle, path: *const u8, len: usize) -> i32 {
    with_session(h, |s| {
        let path = path_arg(path, len)?;
        let bytes = std::fs::read(path).map_err(|e| Error::invalid(format!("cannot read checkpoint {path}: {e}")))?;
        s.load_state(&bytes).map_err(|e| Error { code: e.code, msg: format!("{path}: {}", e.msg) })
    })
}

/// Deliberately panics inside the guard: lets tests prove a panic becomes an error.
#[no_mangle]
pub unsafe extern "C" fn qg_debug_panic(h: *const Handle) -> i32 {
    with_session(h, |_| panic!("deliberate panic for testing"))
}
