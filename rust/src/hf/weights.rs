//! Reading Hugging Face safetensors checkpoints: one `model.safetensors`, a sharded
//! `model.safetensors.index.json` with its shards, or a single `.safetensors` file.
//!
//! Every file is memory-mapped and its header validated by the `safetensors` crate itself
//! (header length within the crate's limit, JSON, offsets contiguous and covering the data
//! section exactly) before a caller sees any tensor, so a bad file is refused before
//! anything is allocated for the model. Tensors are then matched against the model layout
//! by name, shape and dtype (`Checkpoint::match_layout`), and read one at a time as f32
//! (`Checkpoint::read_f32`) straight from the mapping.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::llama::{layout, Role};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The largest header the `safetensors` crate reads (its `MAX_HEADER_SIZE`, 100 MB); a
/// longer one is refused as corrupt or hostile.
pub const MAX_HEADER_BYTES: usize = 100_000_000;

/// The single-file and the sharded checkpoint names `transformers` writes.
pub const SINGLE: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";

/// One memory-mapped safetensors file with a validated header.
pub struct Shard {
    /// The path as shown in messages.
    pub path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
}

/// Where a tensor lives, and what it is.
#[derive(Clone, Debug)]
pub struct Entry {
    pub shard: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the shard's data section.
    pub start: usize,
    pub end: usize,
}

/// A validated checkpoint: its files and every tensor by name.
pub struct Checkpoint {
    pub shards: Vec<Shard>,
    /// The index file of a sharded checkpoint (named in messages about the set as a whole).
    pub index: Option<PathBuf>,
    pub tensors: BTreeMap<String, Entry>,
}

/// One parameter of the layout, found in the checkpoint with its shape.
#[derive(Clone, Debug)]
pub struct Match {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub role: Role,
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// Every message is one bounded line: names from a hostile file may hold a newline or be
/// megabytes long (found by the checkpoint fuzzer, tests/fuzz.rs).
fn line(msg: String) -> Error {
    Error::invalid(crate::state::tensors::printable(&msg, 2000))
}

fn bad(path: &Path, what: impl std::fmt::Display) -> Error {
    line(format!("{}: {what}", show(path)))
}

/// The dtypes the engine converts (exactly) to f32.
fn readable(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::BF16 | Dtype::F16)
}

/// Buffers `transformers` itself ignores when loading (RoPE's inverse frequencies,
/// recomputed from the config).
fn ignored(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

impl Checkpoint {
    /// Opens a model folder (`model.safetensors`, or `model.safetensors.index.json` and its
    /// shards), an index file, or one `.safetensors` file, and validates every header.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
        if meta.is_dir() {
            let single = path.join(SINGLE);
            let index = path.join(INDEX);
            if single.is_file() {
                Self::single(&single)
            } else if index.is_file() {
                Self::sharded(&index)
            } else {
                Err(bad(path, format!("folder holds neither {SINGLE} nor {INDEX}")))
            }
        } else if path.to_string_lossy().ends_with(".index.json") {
            Self::sharded(path)
        } else {
            Self::single(path)
        }
    }

    fn single(path: &Path) -> Result<Self> {
        let (shard, infos) = Shard::open(path)?;
        let mut tensors = BTreeMap::new();
        for (name, info) in infos {
            tensors.insert(name, entry(0, info));
        }
        Ok(Checkpoint { shards: vec![shard], index: None, tensors })
    }

    fn sharded(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| bad(index, format!("cannot read: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(index, format!("not valid JSON: {e}")))?;
        let Some(map) = v.get("weight_map").and_then(Value::as_object) else {
            return Err(bad(index, "`weight_map` must be an object of tensor name → shard file"));
        };
        let dir = index.parent().unwrap_or(Path::new("."));
        // shards in first-mention order, each opened (and validated) once
        let mut names: Vec<&str> = Vec::new();
        let mut wanted: BTreeMap<&str, usize> = BTreeMap::new();
        for (tensor, file) in map {
            let Some(file) = file.as_str() else {
                return Err(bad(index, format!("weight_map entry {tensor} must name a shard file, got {file}")));
            };
            // a shard is a file next to the index, never a path elsewhere
            if file.is_empty() || file.contains(['/', '\\']) || file == "." || file == ".." {
                return Err(bad(index, format!("weight_map entry {tensor} names {file:?}, which is not a file name in the index's folder")));
            }
            let i = match names.iter().position(|n| *n == file) {
                Some(i) => i,
                None => {
                    names.push(file);
                    names.len() - 1
                }
            };
            wanted.insert(tensor.as_str(), i);
        }
        if names.is_empty() {
            return Err(bad(index, "weight_map is empty"));
        }
        for n in &names {
            let p = dir.join(n);
            if !p.is_file() {
                return Err(bad(index, format!("names shard {n}, which does not exist ({})", show(&p))));
            }
        }
        let mut shards = Vec::with_capacity(names.len());
        let mut tensors = BTreeMap::new();
        for (si, n) in names.iter().enumerate() {
            let (shard, infos) = Shard::open(&dir.join(n))?;
            for (name, info) in infos {
                match wanted.get(name.as_str()) {
                    Some(&want) if want == si => {
                        tensors.insert(name, entry(si, info));
                    }
                    Some(&want) => {
                        return Err(bad(&shard.path, format!("holds tensor {name}, which {} places in {}", show(index), names[want])));
                    }
                    None => return Err(bad(&shard.path, format!("holds tensor {name}, which {} does not list", show(index)))),
                }
            }
            shards.push(shard);
        }
        if let Some((t, &si)) = wanted.iter().find(|(t, _)| !tensors.contains_key(**t)) {
            return Err(bad(index, format!("places tensor {t} in {}, which does not hold it", names[si])));
        }
        Ok(Checkpoint { shards, index: Some(index.to_path_buf()), tensors })
    }

    /// The file named in messages about the checkpoint as a whole (the index, or the file).
    pub fn label(&self) -> String {
        show(self.index.as_deref().unwrap_or(&self.shards[0].path))
    }

    /// The file a tensor lives in, for messages.
    pub fn file_of(&self, name: &str) -> String {
        match self.tensors.get(name) {
            Some(e) => show(&self.shards[e.shard].path),
            None => self.label(),
        }
    }

    /// Total bytes of the files.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.map.len() as u64).sum()
    }

    /// Matches the tensors against the model of `cfg` by name, shape and dtype: every
    /// parameter present once with its shape (norms may be 1-D [hidden], as Hugging Face
    /// stores them), nothing unexpected (RoPE `inv_freq` buffers aside; an `lm_head.weight`
    /// aside when the model ties it to the embedding). Returns the layout in model order.
    pub fn match_layout(&self, cfg: &ModelConfig) -> Result<Vec<Match>> {
        let shapes = layout(cfg);
        let tied = !shapes.iter().any(|(n, ..)| n == "lm_head.weight");
        for (name, rows, cols, _) in &shapes {
            let Some(e) = self.tensors.get(name) else {
                return Err(line(format!("{}: tensor {name} is missing (the config needs [{rows}, {cols}])", self.label())));
            };
            let fits = e.shape == [*rows, *cols] || (*rows == 1 && e.shape == [*cols]);
            if !fits {
                let need = if *rows == 1 { format!("[{cols}]") } else { format!("[{rows}, {cols}]") };
                return Err(line(format!("{}: tensor {name} has shape {:?}, the config needs {need}", self.file_of(name), e.shape)));
            }
        }
        for name in self.tensors.keys() {
            let known = shapes.iter().any(|(n, ..)| n == name);
            if !(known || ignored(name) || (tied && name == "lm_head.weight")) {
                return Err(line(format!("{}: unexpected tensor {name} (not a parameter of this LLaMA config)", self.file_of(name))));
            }
        }
        Ok(shapes.into_iter().map(|(name, rows, cols, role)| Match { name, rows, cols, role }).collect())
    }

    /// The raw little-endian bytes of a tensor, straight from the mapping.
    pub fn raw(&self, name: &str) -> Option<(&Entry, &[u8])> {
        let e = self.tensors.get(name)?;
        let s = &self.shards[e.shard];
        Some((e, &s.map[s.data_start + e.start..s.data_start + e.end]))
    }

    /// Asks the kernel to start reading a tensor's pages (overlaps disk reads with the
    /// conversion of the tensor before it when the file is not cached).
    pub fn prefetch(&self, name: &str) {
        if let Some(e) = self.tensors.get(name) {
            let s = &self.shards[e.shard];
            let _ = s.map.advise_range(memmap2::Advice::WillNeed, s.data_start + e.start, e.end - e.start);
        }
    }

    /// Unmaps a tensor's pages once read, so the process's resident memory stays about one
    /// tensor of the file, not the whole checkpoint (the page cache keeps the data).
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(e) = self.tensors.get(name) {
            let s = &self.shards[e.shard];
            // Safety: a read-only shared file mapping; dropped pages fault back in from the
            // file if touched again (no data can be lost, unlike a private mapping).
            let _ = unsafe { s.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s.data_start + e.start, e.end - e.start) };
        }
    }

    /// Converts a tensor to f32 into `out` (exactly `numel` values; F32, BF16 and F16
    /// convert exactly). Parallel over the calling rayon pool.
    pub fn read_f32(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let (e, bytes) = self.raw(name).ok_or_else(|| line(format!("{}: tensor {name} is missing", self.label())))?;
        to_f32(e.dtype, bytes, out).map_err(|m| line(format!("{}: tensor {name}: {m}", self.file_of(name))))
    }

    /// What `qg_hf_inspect` reports: the files, their total bytes, every tensor.
    pub fn describe(&self) -> Value {
        let files: Vec<Value> = self.shards.iter().map(|s| Value::from(show(&s.path))).collect();
        let tensors: Vec<Value> = self
            .tensors
            .iter()
            .map(|(n, e)| serde_json::json!({ "name": n, "dtype": dtype_name(e.dtype), "shape": e.shape }))
            .collect();
        let mut m = Map::new();
        m.insert("files".into(), Value::from(files));
        m.insert("bytes".into(), Value::from(self.bytes()));
        m.insert("tensors".into(), Value::from(tensors));
        Value::Object(m)
    }
}

/// `qg_hf_inspect`'s answer for a path: the validated checkpoint, or `{ "error": … }` with
/// empty lists.
pub fn inspect_json(path: &str) -> String {
    match Checkpoint::open(Path::new(path)) {
        Ok(c) => c.describe().to_string(),
        Err(e) => serde_json::json!({ "files": [], "bytes": 0, "tensors": [], "error": e.msg }).to_string(),
    }
}

/// The dtype as safetensors headers spell it.
pub fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

fn entry(shard: usize, info: TensorInfo) -> Entry {
    Entry { shard, dtype: info.dtype, shape: info.shape, start: info.data_offsets.0, end: info.data_offsets.1 }
}

impl Shard {
    /// Maps a file and validates its header with the `safetensors` crate; every tensor's
    /// dtype must be one the engine reads.
    fn open(path: &Path) -> Result<(Shard, Vec<(String, TensorInfo)>)> {
        let file = std::fs::File::open(path).map_err(|e| bad(path, format!("cannot open: {e}")))?;
        let len = file.metadata().map_err(|e| bad(path, format!("cannot read: {e}")))?.len();
        if len < 8 {
            return Err(bad(path, format!("file is {len} bytes, shorter than the 8-byte header length: truncated or not a safetensors file")));
        }
        // Safety: the mapping is read-only; a file truncated by another process while we
        // read it is outside what any reader can defend against (the crate maps the same way).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| bad(path, format!("cannot map: {e}")))?;
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(path, header_problem(&map, e)))?;
        let mut infos: Vec<(String, TensorInfo)> = meta.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
        infos.sort_by_key(|(_, i)| i.data_offsets);
        if let Some((name, info)) = infos.iter().find(|(_, i)| !readable(i.dtype)) {
            return Err(bad(path, format!("tensor {name} has dtype {}; qgalore reads F32, BF16 and F16", dtype_name(info.dtype))));
        }
        Ok((Shard { path: path.to_path_buf(), map, data_start: 8 + n }, infos))
    }
}

/// Words the crate's header error for a user, naming the tensor where the crate does not.
fn header_problem(buf: &[u8], e: SafeTensorError) -> String {
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let file = buf.len() as u64;
    use SafeTensorError::*;
    match e {
        HeaderTooLarge => format!("header length {n} bytes is over the safetensors limit of {MAX_HEADER_BYTES} bytes (100 MB): corrupt or not a safetensors file"),
        InvalidHeaderLength | HeaderTooSmall => format!("header length {n} bytes runs past the end of the file ({file} bytes): truncated or not a safetensors file"),
        InvalidHeader(u) => format!("header is not UTF-8 ({u})"),
        InvalidHeaderStart | InvalidHeaderDeserialization(_) | JsonError(_) => {
            let why = match e {
                InvalidHeaderDeserialization(j) | JsonError(j) => j.to_string(),
                _ => "does not start with `{`".into(),
            };
            format!("header is not valid safetensors JSON: {why}")
        }
        InvalidOffset(name) => format!("tensor {name} has data_offsets that overlap another tensor or leave a gap (each tensor must start where the previous one ends)"),
        TensorInvalidInfo | ValidationOverflow | MisalignedSlice => match size_mismatch(buf) {
            Some(m) => m,
            None => format!("a tensor's data_offsets do not match its shape and dtype ({e})"),
        },
        MetadataIncompleteBuffer => {
            let data = file - 8 - n;
            match data_end(buf) {
                Some((name, end)) if end > data => format!("tensor {name} ends at byte {end} of the data section, which holds {data} bytes: truncated file or out-of-range offsets"),
                Some((_, end)) => format!("the tensors cover {end} bytes but the data section holds {data}: {} trailing bytes", data - end),
                None => format!("the tensors do not cover the data section ({data} bytes) exactly"),
            }
        }
        other => other.to_string(),
    }
}

/// The raw header as JSON (only called on the error path, after the crate refused it).
fn raw_header(buf: &[u8]) -> Option<Map<String, Value>> {
    let n = u64::from_le_bytes(buf[..8].try_into().ok()?) as usize;
    serde_json::from_slice(buf.get(8..8usize.checked_add(n)?)?).ok()
}

/// The tensor whose data ends last, and where.
fn data_end(buf: &[u8]) -> Option<(String, u64)> {
    let h = raw_header(buf)?;
    h.iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(k, v)| Some((k.clone(), v.get("data_offsets")?.get(1)?.as_u64()?)))
        .max_by_key(|(_, e)| *e)
}

/// The first tensor whose byte range disagrees with its shape and dtype.
fn size_mismatch(buf: &[u8]) -> Option<String> {
    let h = raw_header(buf)?;
    for (name, v) in h.iter().filter(|(k, _)| *k != "__metadata__") {
        let info: TensorInfo = serde_json::from_value(v.clone()).ok()?;
        let (s, e) = info.data_offsets;
        let bytes = info.shape.iter().try_fold(info.dtype.bitsize() as u128, |a, &d| a.checked_mul(d as u128)).map(|b| b / 8);
        if bytes != Some(e.wrapping_sub(s) as u128) || e < s {
            return Some(format!(
                "tensor {name} has data_offsets [{s}, {e}] ({} bytes) but its {} shape {:?} needs {} bytes",
                e as i128 - s as i128,
                dtype_name(info.dtype),
                info.shape,
                bytes.map_or("more than 2^128".into(), |b| b.to_string())
            ));
        }
    }
    None
}

/// Little-endian F32/BF16/F16 bytes to f32 (exact for all three).
pub fn to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        d => return Err(format!("dtype {} is not F32, BF16 or F16", dtype_name(d))),
    };
    if bytes.len() != out.len() * width {
        return Err(format!("holds {} bytes, expected {} values of {width} bytes", bytes.len(), out.len()));
    }
    const CHUNK: usize = 1 << 16;
    let work = out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * width));
    match dtype {
        Dtype::F32 => work.for_each(|(o, b)| {
            for (v, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }),
        Dtype::BF16 => work.for_each(|(o, b)| {
            for (v, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *v = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }),
        _ => work.for_each(|(o, b)| {
            for (v, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *v = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }),
    }
    Ok(())
}
