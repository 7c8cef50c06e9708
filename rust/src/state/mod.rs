//! Checkpoints: everything a run needs to resume bit-exactly — weights (f32, or INT8 codes
//! with group scales and zeros), optimizer moments (f32, or 8-bit codes with block
//! absmax), projectors (f32, bf16, or INT8/INT4 codes), lazy-refresh queues and previous
//! top-1 vectors, refresh gaps and counters — as a standard safetensors file that any
//! safetensors reader opens. The random-number position is the step counter itself (every
//! draw is keyed by seed, parameter and step).
//!
//! Layout (format version 3):
//! - 8 bytes: header length N, little-endian;
//! - N bytes: JSON header. It starts with the metadata, whose first key is the checksum:
//!   `{"__metadata__":{"checksum":"sha256:<64 lowercase hex digits>","format":
//!   "qgalore-checkpoint","format_version":"3","engine_config":"<JSON>","state":"<JSON>",
//!   "run":"<JSON>"},` followed by one entry per tensor (`{"dtype","shape","data_offsets"}`)
//!   in data order, then spaces up to a multiple of 8 bytes. Metadata values are strings
//!   (safetensors' rule); `engine_config` is the full `EngineConfig` (`meta::config_json`),
//!   `state` the step counters, statistics, gaps and storage kinds (`meta::EngineState`),
//!   `run` the front end's own JSON (absent when none was given);
//! - the tensors' bytes, contiguous, in header order, little-endian.
//!
//! Checksum: SHA-256 of the whole file in which the 64 hex digits of the checksum are
//! replaced by ASCII '0' (they sit at the fixed byte offset `CHECKSUM_AT`). It covers the
//! length, the metadata, the tensor index and every data byte: the writer hashes as it
//! streams and patches the digits in last; a reader zeroes them and hashes the same bytes.
//!
//! Loading checks everything before the engine is touched (`engine.rs`): header bounds and
//! offsets (`read::parse`), the engine config (`meta::check_config`), the state scalars
//! and the tensor list the engine expects from them (`read::match_layout`) — so the
//! payload read next is bounded by the engine's own state size — then the checksum, every
//! value and every quantized tensor's dequantized range (`read::verify`). Only then are tensors read, one at a time, straight
//! into the engine; they are hashed again on the way, so a file rewritten in place between
//! the passes leaves the engine marked unusable until a good load (no whole-state snapshot
//! needs to be kept in memory).

pub mod engine;
pub mod file;
pub mod meta;
pub mod read;
pub mod tensors;
pub mod write;

pub use read::{Mem, Source};

/// The metadata `format` value.
pub const FORMAT: &str = "qgalore-checkpoint";
/// The metadata `format_version` value: 3 (1 and 2 were the old binary "QGCK" layout).
pub const FORMAT_VERSION: &str = "3";
/// The header's fixed start; the checksum digits follow it.
pub const HEADER_PREFIX: &str = r#"{"__metadata__":{"checksum":"sha256:"#;
/// Hex digits of the checksum.
pub const CHECKSUM_HEX: usize = 64;
/// File offset of the checksum digits.
pub const CHECKSUM_AT: usize = 8 + HEADER_PREFIX.len();
/// Largest header accepted: 16 MiB. The header grows with the tensor count (~110 bytes a
/// tensor); a Q-GaLore llama-7b checkpoint lists ~3,000 tensors (~0.4 MB of header), a
/// 70B-shaped one (80 layers) ~7,500 (~1 MB), so this leaves ~16× headroom while bounding
/// what a hostile header costs to parse (the safetensors library allows 100 MB).
pub const MAX_HEADER: usize = 16 << 20;
/// Largest `engine_config` metadata (a real one is ~2 KB).
pub const MAX_CONFIG_BYTES: usize = 64 << 10;
/// Largest `state` metadata: ~100 bytes per projected matrix (a 70B-shaped model projects
/// 560: ~60 KB).
pub const MAX_STATE_BYTES: usize = 1 << 20;
/// Most tensors a checkpoint may list.
pub const MAX_TENSORS: usize = 1_000_000;
/// Largest step, gap or dimension a checkpoint may hold: 2^53 (exact in f64; far beyond any
/// run), so a hostile value near 2^64 cannot overflow the next step's arithmetic.
pub const MAX_COUNTER: u64 = 1 << 53;

/// What `qg_checkpoint_info` returns for the file at `path`, checked (regular file, header,
/// checksum, values) without an engine: `{"format_version", "optimizer", "step",
/// "engine_config", "run", "error"}`; on any problem the other fields are null and `error`
/// is the one-line message.
pub fn info_json(path: &std::path::Path) -> String {
    let r = (|| -> crate::error::Result<serde_json::Value> {
        let f = file::open_read(path)?;
        let at = |e: crate::error::Error| file::at_path(path, e);
        let p = read::parse(&f).map_err(at)?;
        read::verify(&f, &p).map_err(at)?;
        let st = meta::EngineState::parse(&p.state).map_err(at)?;
        Ok(serde_json::json!({
            "format_version": 3,
            "optimizer": st.optimizer,
            "step": st.step,
            "engine_config": p.engine_config,
            "run": p.run,
            "error": null,
        }))
    })();
    r.unwrap_or_else(|e| {
        let msg = tensors::printable(&e.msg, 2000);
        serde_json::json!({ "format_version": null, "optimizer": null, "step": null, "engine_config": null, "run": null, "error": msg })
    })
    .to_string()
}
