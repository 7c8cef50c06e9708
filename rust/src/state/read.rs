//! Reading a checkpoint from any byte source (an open file, or memory in tests and the
//! fuzzer) without holding it whole: the header is bounded and parsed with checked
//! arithmetic; a streaming pass checks the checksum and every value; tensors are then read
//! one at a time at their offsets, hashed again on the way, so a file that changed between
//! the passes is noticed.

use super::tensors::{check_values, fill_f32, rule, shown, Dtype, Entry, MAX_RANK};
use super::{CHECKSUM_AT, CHECKSUM_HEX, FORMAT, FORMAT_VERSION, HEADER_PREFIX, MAX_CONFIG_BYTES, MAX_COUNTER, MAX_HEADER, MAX_STATE_BYTES, MAX_TENSORS};
use crate::error::{Error, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Random-access bytes: a file (read with `pread`, so the position is never shared) or a
/// slice.
pub trait Source {
    fn size(&self) -> Result<u64>;
    /// Fills `buf` from offset `at`; an error when fewer bytes exist.
    fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<()>;
}

/// A checkpoint held in memory.
pub struct Mem<'a>(pub &'a [u8]);

impl Source for Mem<'_> {
    fn size(&self) -> Result<u64> {
        Ok(self.0.len() as u64)
    }
    fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        let b = self.0;
        let s = usize::try_from(at).ok().filter(|&s| s <= b.len()).ok_or_else(|| corrupt("read past the end"))?;
        let e = s.checked_add(buf.len()).filter(|&e| e <= b.len()).ok_or_else(|| corrupt("read past the end"))?;
        buf.copy_from_slice(&b[s..e]);
        Ok(())
    }
}

impl Source for std::fs::File {
    fn size(&self) -> Result<u64> {
        self.metadata().map(|m| m.len()).map_err(|e| Error::invalid(format!("cannot read checkpoint: {e}")))
    }
    fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.read_exact_at(buf, at).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => corrupt("file shrank while reading"),
            _ => Error::invalid(format!("cannot read checkpoint: {e}")),
        })
    }
}

pub fn corrupt(what: &str) -> Error {
    Error::invalid(format!("checkpoint is corrupt or not a qgalore checkpoint ({what})"))
}

/// A checkpoint's header, checked: metadata and tensor index.
#[derive(Debug)]
pub struct Parsed {
    /// Bytes of the JSON header (after the 8-byte length).
    pub header_len: u64,
    /// The tensors in data order, each with its absolute file offset.
    pub tensors: Vec<(Entry, u64)>,
    /// The stored SHA-256.
    pub checksum: [u8; 32],
    pub engine_config: Value,
    /// The `state` metadata (JSON text, at most `MAX_STATE_BYTES`, parsed by the engine).
    pub state: String,
    /// The front end's run JSON, parsed, or Null.
    pub run: Value,
}

/// Reads and checks the header: size bounds, the format and version, the metadata keys, and
/// every tensor's dtype, shape and offsets (contiguous from 0 in index order, ending at
/// the end of the file: no overlap, gap or trailing byte).
pub fn parse(src: &dyn Source) -> Result<Parsed> {
    let size = src.size()?;
    if size < 8 {
        return Err(corrupt(&format!("{size} bytes")));
    }
    let mut head8 = [0u8; 8];
    src.read_at(0, &mut head8)?;
    if &head8[..4] == b"QGCK" {
        let v = u32::from_le_bytes(head8[4..8].try_into().unwrap());
        return Err(Error::invalid(format!(
            "checkpoint format version {v} (the old binary layout): this engine reads version {FORMAT_VERSION} (safetensors) only; resave it with the engine that wrote it or start over"
        )));
    }
    let n = u64::from_le_bytes(head8);
    let room = size - 8;
    if n > room || n > MAX_HEADER as u64 || (n as usize) < HEADER_PREFIX.len() + CHECKSUM_HEX + 1 {
        return Err(corrupt(&format!("header length {n}; the file has {room} bytes after it and a header is at most {MAX_HEADER}")));
    }
    let mut head = vec![0u8; n as usize];
    src.read_at(8, &mut head)?;
    // the checksum's place is fixed: right after this prefix (see `super` for why)
    if !head.starts_with(HEADER_PREFIX.as_bytes()) {
        return Err(corrupt("header does not start with the qgalore metadata"));
    }
    let at = CHECKSUM_AT - 8;
    let hex = &head[at..at + CHECKSUM_HEX];
    let mut checksum = [0u8; 32];
    for (i, c) in checksum.iter_mut().enumerate() {
        let d = |x: u8| (x as char).to_digit(16).filter(|_| x.is_ascii_digit() || x.is_ascii_lowercase());
        match (d(hex[2 * i]), d(hex[2 * i + 1])) {
            (Some(h), Some(l)) => *c = (h * 16 + l) as u8,
            _ => return Err(corrupt("checksum is not 64 lowercase hex digits")),
        }
    }
    // typed and bounded while it is parsed: no JSON tree of the header is ever built (a
    // `Value` costs ~16 bytes per input byte on an array of small numbers)
    let hdr: Header = serde_json::from_slice(&head).map_err(|e| corrupt(&format!("header JSON: {}", shown(&e.to_string()))))?;
    drop(head);
    let meta = hdr.meta.ok_or_else(|| corrupt("no __metadata__"))?;
    let text = |k: &str| meta.get(k).map(|v| match v {
        MetaVal::Str(s) => Ok(s.as_str()),
        MetaVal::Other => Err(corrupt(&format!("metadata {k} is not a string"))),
    }).transpose();
    for k in meta.keys() {
        if !["checksum", "format", "format_version", "engine_config", "state", "run"].contains(&k.as_str()) {
            return Err(corrupt(&format!("unknown metadata key {}", shown(k))));
        }
    }
    if text("format")? != Some(FORMAT) {
        return Err(corrupt("metadata format is not qgalore-checkpoint"));
    }
    match text("format_version")? {
        Some(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(Error::invalid(format!("checkpoint format version {}: this engine reads version {FORMAT_VERSION} only", shown(v))))
        }
        None => return Err(corrupt("metadata format_version missing")),
    }
    let bounded = |k: &str, max: usize| -> Result<&str> {
        let t = text(k)?.ok_or_else(|| corrupt(&format!("metadata {k} missing")))?;
        if t.len() > max {
            return Err(corrupt(&format!("metadata {k} is {} bytes; at most {max}", t.len())));
        }
        Ok(t)
    };
    let json_of = |k: &str, max: usize| -> Result<Value> {
        serde_json::from_str(bounded(k, max)?).map_err(|e| corrupt(&format!("metadata {k}: {e}")))
    };
    let engine_config = json_of("engine_config", MAX_CONFIG_BYTES)?;
    if !engine_config.is_object() {
        return Err(corrupt("metadata engine_config is not a JSON object"));
    }
    let state = bounded("state", MAX_STATE_BYTES)?.to_string();
    let run = if meta.contains_key("run") { json_of("run", super::meta::MAX_RUN_BYTES)? } else { Value::Null };
    let data_start = 8 + n;
    let mut tensors = Vec::with_capacity(hdr.tensors.len());
    for (name, raw) in &hdr.tensors {
        let (e, begin, end) = tensor_entry(name, raw)?;
        let bytes = e.bytes().ok_or_else(|| corrupt(&format!("tensor {} is too large", shown(name))))?;
        if end.checked_sub(begin) != Some(bytes as u64) {
            return Err(corrupt(&format!("tensor {}: offsets [{begin}, {end}] do not hold {}", shown(name), e.describe())));
        }
        tensors.push((e, begin, end));
    }
    tensors.sort_by_key(|&(_, b, e)| (b, e));
    let mut pos = 0u64;
    for (e, b, end) in &tensors {
        if *b != pos {
            return Err(corrupt(&format!("tensor {} starts at {b}, expected {pos} (overlap or gap)", shown(&e.name))));
        }
        pos = *end;
    }
    if Some(size) != data_start.checked_add(pos) {
        return Err(corrupt(&format!("tensors end at {pos}, the data holds {} bytes", size - data_start)));
    }
    let tensors = tensors.into_iter().map(|(e, b, _)| (e, data_start + b)).collect();
    Ok(Parsed { header_len: n, tensors, checksum, engine_config, state, run })
}

fn tensor_entry(name: &str, raw: &RawTensor) -> Result<(Entry, u64, u64)> {
    let bad = |what: &str| corrupt(&format!("tensor {}: {what}", shown(name)));
    let dtype = Dtype::parse(&raw.dtype).ok_or_else(|| bad(&format!("dtype {}; this format uses F32, BF16 and U8", shown(&raw.dtype))))?;
    let shape = raw
        .shape
        .0
        .iter()
        .map(|&d| Some(d).filter(|&d| d <= MAX_COUNTER).and_then(|d| usize::try_from(d).ok()).ok_or_else(|| bad("dimension is not an integer in [0, 2^53]")))
        .collect::<Result<Vec<usize>>>()?;
    let (b, e) = match raw.data_offsets.0[..] {
        [b, e] if b <= e => (b, e),
        _ => return Err(bad("data_offsets are not [begin, end] with begin ≤ end")),
    };
    Ok((Entry::new(name, dtype, shape), b, e))
}

/// The header as parsed: the metadata's values and the tensor entries in file order.
struct Header {
    meta: Option<std::collections::HashMap<String, MetaVal>>,
    tensors: Vec<(String, RawTensor)>,
}

/// A metadata value: safetensors allows strings only; anything else is skipped unbuilt
/// and refused by name.
enum MetaVal {
    Str(String),
    Other,
}

/// One tensor entry as written: `{"dtype", "shape", "data_offsets"}`, nothing else.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Ints<MAX_RANK>,
    data_offsets: Ints<2>,
}

/// A JSON array of at most `N` unsigned integers, refused at element `N + 1` (a
/// megabyte-long shape costs nothing).
struct Ints<const N: usize>(Vec<u64>);

impl<'de, const N: usize> serde::Deserialize<'de> for Ints<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<'de, const N: usize> serde::de::Visitor<'de> for V<N> {
            type Value = Ints<N>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "an array of at most {N} unsigned integers")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> std::result::Result<Ints<N>, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element::<u64>()? {
                    if v.len() == N {
                        return Err(serde::de::Error::custom(format!("more than {N} elements")));
                    }
                    v.push(x);
                }
                Ok(Ints(v))
            }
        }
        d.deserialize_seq(V::<N>)
    }
}

impl<'de> serde::Deserialize<'de> for MetaVal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MetaVal;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a metadata value")
            }
            fn visit_str<E>(self, s: &str) -> std::result::Result<MetaVal, E> {
                Ok(MetaVal::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> std::result::Result<MetaVal, E> {
                Ok(MetaVal::Str(s))
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<MetaVal, E> {
                Ok(MetaVal::Other)
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<MetaVal, E> {
                Ok(MetaVal::Other)
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<MetaVal, E> {
                Ok(MetaVal::Other)
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<MetaVal, E> {
                Ok(MetaVal::Other)
            }
            fn visit_unit<E>(self) -> std::result::Result<MetaVal, E> {
                Ok(MetaVal::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> std::result::Result<MetaVal, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(MetaVal::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> std::result::Result<MetaVal, A::Error> {
                while a.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(MetaVal::Other)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::Deserialize<'de> for Header {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Header;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> std::result::Result<Header, A::Error> {
                use serde::de::Error as _;
                let mut h = Header { meta: None, tensors: Vec::new() };
                let mut seen = std::collections::HashSet::new();
                while let Some(k) = a.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(A::Error::custom(format!("key {} appears twice", shown(&k))));
                    }
                    if k == "__metadata__" {
                        h.meta = Some(a.next_value()?);
                        continue;
                    }
                    if h.tensors.len() == MAX_TENSORS {
                        return Err(A::Error::custom(format!("more than {MAX_TENSORS} tensors")));
                    }
                    let t = a.next_value::<RawTensor>().map_err(|e| A::Error::custom(format!("tensor {}: {e}", shown(&k))))?;
                    h.tensors.push((k, t));
                }
                Ok(h)
            }
        }
        d.deserialize_map(V)
    }
}

/// Chunk of the streaming passes.
const CHUNK: usize = 1 << 20;

/// SHA-256 of the first `8 + header_len` bytes with the checksum digits read as '0'.
fn hash_header(src: &dyn Source, p: &Parsed, h: &mut Sha256) -> Result<()> {
    let mut head = vec![0u8; 8 + p.header_len as usize];
    src.read_at(0, &mut head)?;
    head[CHECKSUM_AT..CHECKSUM_AT + CHECKSUM_HEX].fill(b'0');
    h.update(&head);
    Ok(())
}

/// The streaming pass: the checksum over the whole file, and every tensor's values against
/// its rule (`tensors::rule`). A checksum mismatch is reported first (a damaged file),
/// then the first bad value.
pub fn verify(src: &dyn Source, p: &Parsed) -> Result<()> {
    let mut h = Sha256::new();
    hash_header(src, p, &mut h)?;
    let mut first_bad: Option<Error> = None;
    let largest = p.tensors.iter().map(|(e, _)| e.bytes().unwrap_or(0)).max().unwrap_or(0);
    let mut buf = vec![0u8; largest.min(CHUNK)];
    for (e, at) in &p.tensors {
        let (size, r) = (e.dtype.size(), rule(&e.name, e.dtype));
        let total = e.bytes().unwrap_or(0) as u64;
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(buf.len() as u64) as usize;
            src.read_at(at + done, &mut buf[..n])?;
            h.update(&buf[..n]);
            if first_bad.is_none() {
                if let Err(err) = check_values(&shown(&e.name), e.dtype, r, &buf[..n], (done / size as u64) as usize) {
                    first_bad = Some(err);
                }
            }
            done += n as u64;
        }
    }
    if h.finalize()[..] != p.checksum {
        return Err(corrupt("the SHA-256 checksum does not match: the file is damaged"));
    }
    first_bad.map_or(Ok(()), Err)?;
    check_dequantized(src, p)
}

/// Largest code of a quantized tensor. INT4 codes (≤ 15) are bounded by the INT8 range
/// too, so one bound serves both without knowing the group size.
const MAX_CODE: f32 = 255.0;

/// Every quantized tensor (`X.codes`, `X.scale`, `X.zero`: weights and projectors)
/// dequantizes to finite values: ŵ = (q − z)·s (`QTensor::dequantize`, in f32) is
/// monotonic in q, so its values for q = 0 and q = 255 bound every code's. Finite scales
/// and zeros alone are not enough (s = 3e38 gives ±inf).
fn check_dequantized(src: &dyn Source, p: &Parsed) -> Result<()> {
    let by_name: std::collections::HashMap<&str, &(Entry, u64)> = p.tensors.iter().map(|t| (t.0.name.as_str(), t)).collect();
    for (e, at) in &p.tensors {
        let Some(base) = e.name.strip_suffix(".scale") else { continue };
        let (Some(_), Some((z, zat))) = (by_name.get(format!("{base}.codes").as_str()), by_name.get(format!("{base}.zero").as_str())) else { continue };
        if e.dtype != Dtype::F32 || z.dtype != Dtype::F32 || z.shape != e.shape {
            continue; // not the engine's layout: `match_layout` refuses it
        }
        let n = e.numel().unwrap_or(0);
        let (mut s, mut zs) = (vec![0f32; n], vec![0f32; n]);
        fill_f32(&mut s, |b| src.read_at(*at, b))?;
        fill_f32(&mut zs, |b| src.read_at(*zat, b))?;
        for (g, (&s, &z)) in s.iter().zip(&zs).enumerate() {
            let (lo, hi) = ((0.0 - z) * s, (MAX_CODE - z) * s);
            if !lo.is_finite() || !hi.is_finite() {
                return Err(Error::invalid(format!(
                    "checkpoint tensor {}: group {g} (scale {s:e}, zero {z:e}) dequantizes to non-finite weights; (code − zero)·scale must be finite for codes 0..255",
                    shown(base)
                )));
            }
        }
    }
    Ok(())
}

/// Checks the file's tensors against the engine's expected list: same names in the same
/// (data) order, each with the expected dtype and shape.
pub fn match_layout(p: &Parsed, want: &[Entry]) -> Result<()> {
    let have: std::collections::HashMap<&str, &Entry> = p.tensors.iter().map(|(e, _)| (e.name.as_str(), e)).collect();
    let wanted: std::collections::HashSet<&str> = want.iter().map(|e| e.name.as_str()).collect();
    for w in want {
        match have.get(w.name.as_str()) {
            None => return Err(Error::invalid(format!("checkpoint does not match this engine: tensor {} is missing", w.name))),
            Some(h) if h.dtype != w.dtype || h.shape != w.shape => {
                return Err(Error::invalid(format!(
                    "checkpoint does not match this engine: tensor {} is {}, expected {}",
                    w.name,
                    h.describe(),
                    w.describe()
                )))
            }
            Some(_) => {}
        }
    }
    if let Some((e, _)) = p.tensors.iter().find(|(e, _)| !wanted.contains(e.name.as_str())) {
        return Err(Error::invalid(format!("checkpoint does not match this engine: unexpected tensor {}", shown(&e.name))));
    }
    for (i, ((e, _), w)) in p.tensors.iter().zip(want).enumerate() {
        if e.name != w.name {
            return Err(corrupt(&format!("tensor {} stored at position {i}, where the engine writes {}", shown(&e.name), w.name)));
        }
    }
    Ok(())
}

/// The load pass: tensors read in data order, straight into the engine's host views,
/// hashed again; `finish` compares the hash with the verified one.
pub struct In<'a> {
    src: &'a dyn Source,
    p: &'a Parsed,
    at: usize,
    hash: Sha256,
}

impl<'a> In<'a> {
    pub fn new(src: &'a dyn Source, p: &'a Parsed) -> Result<Self> {
        let mut hash = Sha256::new();
        hash_header(src, p, &mut hash)?;
        Ok(In { src, p, at: 0, hash })
    }

    /// The next tensor, which must be `name` with `bytes` bytes (the engine asks in the
    /// order it writes; `match_layout` made the file agree).
    fn next(&mut self, name: &str, bytes: usize) -> Result<u64> {
        let (e, off) = self.p.tensors.get(self.at).ok_or_else(|| corrupt(&format!("tensor {name} missing")))?;
        if e.name != name || e.bytes() != Some(bytes) {
            return Err(Error::backend(format!("internal: checkpoint load asked for {name} ({bytes} bytes) where the file has {}", e.name)));
        }
        self.at += 1;
        Ok(*off)
    }

    pub fn bytes_into(&mut self, name: &str, dst: &mut [u8]) -> Result<()> {
        let off = self.next(name, dst.len())?;
        for (i, c) in dst.chunks_mut(CHUNK).enumerate() {
            self.src.read_at(off + (i * CHUNK) as u64, c)?;
            self.hash.update(&*c);
        }
        Ok(())
    }

    pub fn f32s_into(&mut self, name: &str, dst: &mut [f32]) -> Result<()> {
        fill_f32(dst, |b| self.bytes_into(name, b))
    }

    pub fn f32s(&mut self, name: &str, n: usize) -> Result<Vec<f32>> {
        let mut v = vec![0.0f32; n];
        self.f32s_into(name, &mut v)?;
        Ok(v)
    }

    /// The first `n` values of a backend buffer.
    pub fn buf<B: crate::backend::Memory>(&mut self, be: &B, name: &str, b: &mut B::Buf, n: usize) -> Result<()> {
        be.from_host(b, n, |h| self.f32s_into(name, h))
    }

    /// A quantized tensor written by `Out::q` (same layout: the engine's own tensor).
    pub fn q<B: crate::backend::Quantization>(&mut self, be: &B, name: &str, q: &mut B::Q) -> Result<()> {
        be.q_from_host(q, |t| {
            if t.bits == 16 {
                return self.bytes_into(name, &mut t.codes);
            }
            self.bytes_into(&format!("{name}.codes"), &mut t.codes)?;
            self.f32s_into(&format!("{name}.scale"), &mut t.scale)?;
            self.f32s_into(&format!("{name}.zero"), &mut t.zero)
        })
    }

    /// An 8-bit Adam state written by `Out::a8`.
    pub fn a8<B: crate::backend::Optimizers>(&mut self, be: &B, name: &str, st: &mut B::A8) -> Result<()> {
        be.a8_from_host(st, |s| {
            self.bytes_into(&format!("{name}.m.codes"), &mut s.m)?;
            self.bytes_into(&format!("{name}.v.codes"), &mut s.v)?;
            self.f32s_into(&format!("{name}.m.absmax"), &mut s.absmax_m)?;
            self.f32s_into(&format!("{name}.v.absmax"), &mut s.absmax_v)
        })
    }

    /// Every tensor read, and the bytes were the verified ones.
    pub fn finish(self) -> Result<()> {
        if self.at != self.p.tensors.len() {
            return Err(Error::backend(format!("internal: checkpoint load read {} of {} tensors", self.at, self.p.tensors.len())));
        }
        if self.hash.finalize()[..] != self.p.checksum {
            return Err(Error::invalid("checkpoint changed while it was being loaded (its checksum no longer matches)"));
        }
        Ok(())
    }
}
