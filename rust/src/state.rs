//! Binary checkpoint of everything a run needs to resume bit-exactly: weights (float or
//! quantized codes), optimizer moments (fp32 or 8-bit with absmax), projectors, refresh
//! gaps, cosine queues, previous top-1 vectors, counters. The random-number position is
//! the step counter itself (every draw is keyed by seed, parameter and step).
//!
//! Layout: "QGCK", u32 version, then length-prefixed little-endian sections. On disk
//! (`write_file` / `read_file`) the payload after those 8 bytes is preceded by its length
//! (u64) and its SHA-256, so a corrupted or truncated file is refused before it is parsed.

pub mod meta;

use crate::backend::{Memory, Optimizers, Quantization};
use crate::error::{Error, Result};
use crate::quant::adam8::State8;
use crate::quant::QTensor;

pub const MAGIC: &[u8; 4] = b"QGCK";
/// 2: the file carries the payload's length and SHA-256 (version 1 files had neither and
/// are refused).
pub const VERSION: u32 = 2;
/// Largest step or gap a checkpoint may hold (see `Reader::counter`).
pub const MAX_COUNTER: u64 = 1 << 53;

#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        let mut w = Writer { buf: Vec::new() };
        w.buf.extend_from_slice(MAGIC);
        w.u32(VERSION);
        w
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.buf.extend_from_slice(b);
    }
    pub fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
    pub fn qtensor(&mut self, q: &QTensor) {
        self.u8(q.bits);
        self.u64(q.group as u64);
        self.u64(q.numel as u64);
        self.bytes(&q.codes);
        self.f32s(&q.scale);
        self.f32s(&q.zero);
    }
    pub fn state8(&mut self, s: &State8) {
        self.u64(s.block as u64);
        self.bytes(&s.m);
        self.bytes(&s.v);
        self.f32s(&s.absmax_m);
        self.f32s(&s.absmax_v);
    }
    /// The first `n` values of a backend buffer (as `f32s`).
    pub fn buf<B: Memory>(&mut self, be: &B, b: &B::Buf, n: usize) -> Result<()> {
        let h = be.to_host(b, n)?;
        self.f32s(&h);
        Ok(())
    }
    /// A backend's quantized tensor (as `qtensor`).
    pub fn q<B: Quantization>(&mut self, be: &B, q: &B::Q) -> Result<()> {
        let h = be.q_to_host(q)?;
        self.qtensor(&h);
        Ok(())
    }
    /// A backend's 8-bit Adam state (as `state8`).
    pub fn a8<B: Optimizers>(&mut self, be: &B, s: &B::A8) -> Result<()> {
        let h = be.a8_to_host(s)?;
        self.state8(&h);
        Ok(())
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn corrupt(what: &str) -> Error {
    Error::invalid(format!("checkpoint is truncated or corrupt ({what})"))
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self> {
        if buf.len() < 8 || &buf[..4] != MAGIC {
            return Err(Error::invalid("not a qgalore checkpoint (bad magic bytes)"));
        }
        let mut r = Reader { buf, pos: 4 };
        let v = r.u32()?;
        if v != VERSION {
            return Err(Error::invalid(format!("checkpoint version {v}: this engine reads version {VERSION}")));
        }
        Ok(r)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        // checked: a hostile length near 2^64 must be an error, never a wrapped index
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| corrupt("unexpected end"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A step or refresh counter: at most 2^53 (exact in f64; far beyond any run), so a
    /// hostile value near 2^64 cannot overflow the next step's arithmetic.
    pub fn counter(&mut self, what: &str) -> Result<u64> {
        let v = self.u64()?;
        if v > MAX_COUNTER {
            return Err(Error::invalid(format!("checkpoint field {what} is {v}, above the limit 2^53")));
        }
        Ok(v)
    }
    /// A refresh gap: a counter of at least 1 (a gap of 0 would divide by zero).
    pub fn gap(&mut self, what: &str) -> Result<u64> {
        let v = self.counter(what)?;
        if v == 0 {
            return Err(Error::invalid(format!("checkpoint field {what} is 0; a refresh gap is at least 1")));
        }
        Ok(v)
    }
    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }
    /// A stored length, refused if it cannot fit in memory on this machine.
    fn len(&mut self) -> Result<usize> {
        usize::try_from(self.u64()?).map_err(|_| corrupt("length"))
    }
    pub fn str(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| corrupt("string"))
    }
    pub fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.len()?;
        let b = self.take(n.checked_mul(4).ok_or_else(|| corrupt("length"))?)?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }
    /// Reads f32s into `dst`, which must have exactly the stored length.
    pub fn f32s_into(&mut self, dst: &mut [f32], what: &str) -> Result<()> {
        let v = self.f32s()?;
        if v.len() != dst.len() {
            return Err(Error::invalid(format!(
                "checkpoint does not match this model: {what} has {} values, expected {}",
                v.len(),
                dst.len()
            )));
        }
        dst.copy_from_slice(&v);
        Ok(())
    }
    pub fn qtensor_into(&mut self, q: &mut QTensor, what: &str) -> Result<()> {
        let (bits, group, numel) = (self.u8()?, self.u64()? as usize, self.u64()? as usize);
        if bits != q.bits || group != q.group || numel != q.numel {
            return Err(Error::invalid(format!(
                "checkpoint does not match this run: {what} is {bits}-bit/group {group}/{numel} elements, expected {}-bit/group {}/{}",
                q.bits, q.group, q.numel
            )));
        }
        let codes = self.bytes()?;
        if codes.len() != q.codes.len() {
            return Err(corrupt(what));
        }
        q.codes.copy_from_slice(codes);
        let (s, z) = (self.f32s()?, self.f32s()?);
        if s.len() != q.scale.len() || z.len() != q.zero.len() {
            return Err(corrupt(what));
        }
        q.scale = s;
        q.zero = z;
        Ok(())
    }
    pub fn state8_into(&mut self, st: &mut State8, what: &str) -> Result<()> {
        let block = self.u64()? as usize;
        let (m, v) = (self.bytes()?, self.bytes()?);
        if block != st.block || m.len() != st.m.len() || v.len() != st.v.len() {
            return Err(Error::invalid(format!("checkpoint does not match this run: 8-bit state of {what}")));
        }
        st.m.copy_from_slice(m);
        st.v.copy_from_slice(v);
        let (a, b) = (self.f32s()?, self.f32s()?);
        if a.len() != st.absmax_m.len() || b.len() != st.absmax_v.len() {
            return Err(corrupt(what));
        }
        st.absmax_m = a;
        st.absmax_v = b;
        Ok(())
    }
    /// `buf`'s output into the first `n` values of a backend buffer.
    pub fn buf_into<B: Memory>(&mut self, be: &B, b: &mut B::Buf, n: usize, what: &str) -> Result<()> {
        be.from_host(b, n, |h| self.f32s_into(h, what))
    }
    /// `q`'s output into a backend's quantized tensor of the same shape.
    pub fn q_into<B: Quantization>(&mut self, be: &B, q: &mut B::Q, what: &str) -> Result<()> {
        be.q_from_host(q, |h| self.qtensor_into(h, what))
    }
    /// `a8`'s output into a backend's 8-bit Adam state of the same shape.
    pub fn a8_into<B: Optimizers>(&mut self, be: &B, s: &mut B::A8, what: &str) -> Result<()> {
        be.a8_from_host(s, |h| self.state8_into(h, what))
    }
    pub fn done(&self) -> Result<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(corrupt("trailing bytes"))
        }
    }
}

// Checkpoint files: the trust boundary, so every check happens here before any parsing.

use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Magic, version, payload length, SHA-256 of the payload.
const FILE_HEADER: usize = 8 + 8 + 32;

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::invalid(format!("cannot {what} checkpoint {}: {e}", path.display()))
}

/// Writes `save_state` bytes to `path` atomically and durably: a uniquely named temporary
/// file in the same folder, fsync, rename over the target, fsync of the folder. The target
/// must be absent or a regular file (a symlink, folder, FIFO or device is refused, never
/// written through); on any failure the temporary file is removed.
pub fn write_file(path: &Path, state: &[u8]) -> Result<()> {
    if state.len() < 8 || &state[..4] != MAGIC {
        return Err(Error::invalid("checkpoint bytes do not start with the checkpoint header"));
    }
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("checkpoint path {} names no file", path.display())))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(Error::invalid(format!("checkpoint path {} is a symlink; give the real file", path.display())))
        }
        Ok(m) if !m.is_file() => {
            return Err(Error::invalid(format!("checkpoint path {} exists and is not a regular file", path.display())))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("check", path, e)),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(".{}.tmp-{}-{nanos}", name.to_string_lossy(), std::process::id()));
    let r = write_tmp(&tmp, state).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| io_err("move into place", path, e)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return r;
    }
    // the rename is durable only once the folder's entry is on disk
    File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io_err("sync the folder of", path, e))
}

fn write_tmp(tmp: &Path, state: &[u8]) -> Result<()> {
    // create_new: never reuse (or follow a symlink at) an existing name
    let mut f = OpenOptions::new().write(true).create_new(true).open(tmp).map_err(|e| io_err("create", tmp, e))?;
    let payload = &state[8..];
    let mut head = Vec::with_capacity(FILE_HEADER);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    head.extend_from_slice(&Sha256::digest(payload));
    f.write_all(&head).and_then(|()| f.write_all(payload)).and_then(|()| f.sync_all()).map_err(|e| io_err("write", tmp, e))
}

/// Reads a checkpoint file written by `write_file` into `save_state` bytes. Refuses
/// anything but a regular file without opening it (a FIFO must not block), checks the
/// magic bytes, version and stored length against the file size before reading the
/// payload, and the SHA-256 after.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| io_err("read", path, e))?;
    if !meta.is_file() {
        return Err(Error::invalid(format!("checkpoint {} is not a regular file", path.display())));
    }
    let mut opts = OpenOptions::new();
    opts.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: if the path was swapped for a FIFO after the check, open returns
        const O_NONBLOCK: i32 = 0o4000;
        opts.custom_flags(O_NONBLOCK);
    }
    let mut f = opts.open(path).map_err(|e| io_err("read", path, e))?;
    let meta = f.metadata().map_err(|e| io_err("read", path, e))?;
    if !meta.is_file() {
        return Err(Error::invalid(format!("checkpoint {} is not a regular file", path.display())));
    }
    let bad = |what: String| Error::invalid(format!("{}: {what}", path.display()));
    let mut head = [0u8; FILE_HEADER];
    let size = meta.len();
    if size < 8 {
        return Err(bad("not a qgalore checkpoint (too short)".into()));
    }
    f.read_exact(&mut head[..8]).map_err(|e| io_err("read", path, e))?;
    if &head[..4] != MAGIC {
        return Err(bad("not a qgalore checkpoint (bad magic bytes)".into()));
    }
    let v = u32::from_le_bytes(head[4..8].try_into().unwrap());
    if v != VERSION {
        return Err(bad(format!(
            "checkpoint format version {v}: this engine reads version {VERSION} only (version 1 files carry no checksum and are refused)"
        )));
    }
    if size < FILE_HEADER as u64 {
        return Err(bad("checkpoint is truncated (header)".into()));
    }
    f.read_exact(&mut head[8..]).map_err(|e| io_err("read", path, e))?;
    let len = u64::from_le_bytes(head[8..16].try_into().unwrap());
    if Some(size) != len.checked_add(FILE_HEADER as u64) {
        return Err(bad(format!("checkpoint is truncated or corrupt (header says {len} payload bytes, file has {})", size - FILE_HEADER as u64)));
    }
    let len = usize::try_from(len).map_err(|_| bad("checkpoint is too large for this machine".into()))?;
    let mut out = Vec::new();
    out.try_reserve_exact(8 + len).map_err(|_| bad(format!("no memory for a {len}-byte checkpoint")))?;
    out.extend_from_slice(&head[..8]);
    // read exactly the stated length (the file may grow meanwhile; never more)
    (&mut f).take(len as u64).read_to_end(&mut out).map_err(|e| io_err("read", path, e))?;
    if out.len() != 8 + len {
        return Err(bad("checkpoint is truncated (file shrank while reading)".into()));
    }
    if Sha256::digest(&out[8..])[..] != head[16..] {
        return Err(bad("checkpoint is corrupt (SHA-256 of the payload does not match)".into()));
    }
    Ok(out)
}

/// What `qg_checkpoint_info` returns for the file at `path`, checked (header, length,
/// SHA-256) without an engine: `{"format_version", "optimizer", "step", "engine_config",
/// "run", "error"}`; on any problem the fields are null and `error` is the one-line message.
pub fn info_json(path: &Path) -> String {
    let r = (|| -> Result<serde_json::Value> {
        let bytes = read_file(path)?;
        let mut r = Reader::new(&bytes)?;
        let m = Meta::parse(&r.str()?)?;
        Ok(serde_json::json!({
            "format_version": VERSION,
            "optimizer": m.optimizer,
            "step": m.step,
            "engine_config": m.engine_config,
            "run": m.run,
            "error": null,
        }))
    })();
    r.unwrap_or_else(|e| {
        serde_json::json!({ "format_version": null, "optimizer": null, "step": null, "engine_config": null, "run": null, "error": e.msg })
    })
    .to_string()
}

/// The checkpoint's first section (JSON text): optimizer name, step counter, engine config,
/// the precision the engine computed in, and the front end's run JSON (or null).
pub struct Meta {
    pub optimizer: String,
    pub step: u64,
    pub engine_config: serde_json::Value,
    pub precision: String,
    pub run: serde_json::Value,
}

impl Meta {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "optimizer": self.optimizer,
            "step": self.step,
            "engine_config": self.engine_config,
            "precision": self.precision,
            "run": self.run,
        })
        .to_string()
    }

    pub fn parse(text: &str) -> Result<Meta> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| corrupt(&format!("metadata: {e}")))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from).ok_or_else(|| corrupt(&format!("metadata {k}")));
        let step = v.get("step").and_then(|x| x.as_u64()).filter(|&n| n <= MAX_COUNTER).ok_or_else(|| corrupt("metadata step"))?;
        let engine_config = v.get("engine_config").filter(|x| x.is_object()).cloned().ok_or_else(|| corrupt("metadata engine_config"))?;
        Ok(Meta { optimizer: s("optimizer")?, step, engine_config, precision: s("precision")?, run: v.get("run").cloned().unwrap_or(serde_json::Value::Null) })
    }
}
