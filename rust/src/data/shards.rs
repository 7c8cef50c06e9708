//! Token shards: a corpus tokenized once, in parallel and streaming, into one memory-mapped
//! file per split (`train.bin`, `val.bin`: little-endian uint16 when the vocabulary fits,
//! else uint32) plus `meta.json`, in a cache folder keyed by a SHA-256 of everything that
//! decides the tokens. A build writes into a temporary folder renamed into place when
//! complete (its files and folder fsync'd first, so after a crash the cache holds a whole
//! build or none), so a killed or failed build never leaves a cache that is reused.
//!
//! Each document is followed by EOS when the tokenizer has one (BOS as its post-processor
//! says). Validation is split by documents: a hash of the document's index against the
//! validation fraction, so the split does not depend on threads or timing. When that leaves
//! a split empty (a single document, say), the last `val_fraction` of the tokens is used.

use super::corpus::{self, Doc, Docs, Input};
use super::progress::Progress;
use super::tokenizer::{read_limited, Tokenizer, CONFIG_JSON_MAX};
use crate::hf::folder::Staging;
use crate::error::{Error, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bumped whenever the bytes of a shard set change meaning; part of the cache key.
pub const FORMAT: u32 = 1;
/// Documents (or pieces) tokenized together; with the reader's two queued batches this
/// bounds memory whatever the corpus size.
const BATCH_DOCS: usize = 512;
const BATCH_BYTES: usize = 16 << 20;

/// What to build: JSON from the host.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    pub data: String,
    #[serde(default)]
    pub text_field: Option<String>,
    pub val_fraction: f64,
    pub cache_dir: String,
    /// Tokenizing threads; 0 = one per core; more than [`max_threads`] are that many.
    #[serde(default)]
    pub threads: usize,
}

/// The most tokenizing threads a build starts: four per core (more only cost memory; a
/// mistyped `threads` must not start a million).
pub fn max_threads() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The threads a build uses for `requested` (0 = one per core).
pub fn pool_threads(requested: usize) -> usize {
    if requested == 0 {
        max_threads() / 4
    } else {
        requested.min(max_threads())
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DocCounts {
    pub train: u64,
    pub val: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    pub dtype: String,
    pub vocab_size: usize,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub docs: DocCounts,
    /// `documents`, or `tokens` when the tail of the tokens had to serve as validation.
    pub split: String,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub val_fraction: f64,
    pub text_field: String,
    pub bytes: u64,
    pub inputs: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
    fn file(self) -> &'static str {
        match self {
            Split::Train => "train.bin",
            Split::Val => "val.bin",
        }
    }
}

/// An opened shard set.
pub struct Shards {
    pub dir: PathBuf,
    pub meta: Meta,
    /// Whether `build` found it in the cache.
    pub cached: bool,
    width: usize,
    maps: [Option<Mmap>; 2],
}

/// The validation choice of document `index`: a hash of the index against the fraction.
pub fn is_val(index: u64, val_fraction: f64) -> bool {
    let mut z = index.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < val_fraction
}

/// SHA-256 (hex, first 128 bits) of the format, the tokenizer, each input's path, size and
/// modification time, the text field and the validation fraction.
pub fn cache_key(tok: &Tokenizer, inputs: &[Input], field: &str, val_fraction: f64) -> String {
    let mut h = Sha256::new();
    h.update(format!("qgalore token shards {FORMAT}\n").as_bytes());
    let id = tok.identity();
    h.update((id.len() as u64).to_le_bytes());
    h.update(&id);
    for i in inputs {
        let p = i.path.canonicalize().unwrap_or_else(|_| i.path.clone());
        h.update(format!("\n{}\0{}\0{}", p.display(), i.size, i.mtime_ns).as_bytes());
    }
    h.update(format!("\nfield {field:?}\nval {:?}", val_fraction.to_bits()).as_bytes());
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Token ids of one document piece: BOS (if the post-processor adds it) only on a
/// document's first piece, EOS after its last.
fn encode_piece(tok: &Tokenizer, d: &Doc) -> Result<Vec<u32>> {
    let mut ids = if d.first { tok.encode(&d.text, true)? } else { tok.encode_rest(&d.text)? };
    let post_eos = d.first && tok.adds_eos();
    if post_eos && !d.last {
        ids.pop();
    }
    if d.last && !post_eos {
        if let Some(e) = tok.eos() {
            ids.push(e);
        }
    }
    Ok(ids)
}

struct Out {
    w: BufWriter<File>,
    tokens: u64,
    docs: u64,
    buf: Vec<u8>,
}

impl Out {
    fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).map_err(|e| Error::invalid(format!("{}: cannot create ({e})", path.display())))?;
        Ok(Out { w: BufWriter::with_capacity(1 << 20, f), tokens: 0, docs: 0, buf: vec![] })
    }
    fn put(&mut self, ids: &[u32], width: usize, path: &Path) -> Result<()> {
        self.buf.clear();
        if width == 2 {
            // the width comes from the vocabulary size; an id past it is refused, never cut
            if let Some(&id) = ids.iter().find(|&&i| i > u16::MAX as u32) {
                return Err(Error::invalid(format!("{}: token id {id} does not fit uint16 (tokenizer ids beyond its vocabulary)", path.display())));
            }
            self.buf.extend(ids.iter().map(|&i| i as u16).flat_map(u16::to_le_bytes));
        } else {
            self.buf.extend(ids.iter().flat_map(|&i| i.to_le_bytes()));
        }
        self.w.write_all(&self.buf).map_err(|e| Error::invalid(format!("{}: cannot write ({e})", path.display())))?;
        self.tokens += ids.len() as u64;
        Ok(())
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::invalid(format!("{}: cannot write ({e})", path.display()))
}

/// Tokenizes `inputs` into `dir` (train.bin, val.bin, meta.json).
fn write(tok: &Tokenizer, inputs: &[Input], spec: &BuildSpec, field: &str, stage: &Staging, progress: Option<&Progress>) -> Result<Meta> {
    let dir = stage.tmp.as_path();
    let bytes: u64 = inputs.iter().map(|i| i.size).sum();
    if let Some(p) = progress {
        p.set_total(bytes);
    }
    let width = if tok.vocab_size() <= 1 << 16 { 2 } else { 4 };
    let paths = [dir.join(Split::Train.file()), dir.join(Split::Val.file())];
    let mut outs = [Out::create(&paths[0])?, Out::create(&paths[1])?];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(pool_threads(spec.threads))
        .build()
        .map_err(|e| Error::backend(format!("cannot start tokenizing threads ({e})")))?;
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<Doc>>>(2);
        let docs = Docs::new(inputs.to_vec(), field, progress).with_cut(tok.cut_rule());
        s.spawn(move || {
            let (mut batch, mut size) = (Vec::new(), 0);
            for d in docs {
                match d {
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    Ok(d) => {
                        size += d.text.len();
                        batch.push(d);
                        if batch.len() >= BATCH_DOCS || size >= BATCH_BYTES {
                            if tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                                return;
                            }
                            size = 0;
                        }
                    }
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(Ok(batch));
            }
        });
        for batch in rx {
            let batch = batch?;
            let ids: Vec<Result<Vec<u32>>> = pool.install(|| batch.par_iter().map(|d| encode_piece(tok, d)).collect());
            for (d, ids) in batch.iter().zip(ids) {
                let k = is_val(d.index, spec.val_fraction) as usize;
                outs[k].put(&ids?, width, &paths[k])?;
                outs[k].docs += d.last as u64;
            }
        }
        Ok(())
    })?;
    for (o, p) in outs.iter_mut().zip(&paths) {
        o.w.flush().map_err(io_err(p))?;
    }
    let docs = DocCounts { train: outs[0].docs, val: outs[1].docs };
    let (mut train_tokens, mut val_tokens) = (outs[0].tokens, outs[1].tokens);
    drop(outs);
    let data = &spec.data;
    if docs.train + docs.val == 0 {
        return Err(Error::invalid(format!("{data}: empty corpus (no documents)")));
    }
    let mut split = "documents";
    if docs.train == 0 || docs.val == 0 {
        // Too few documents to split by document: the token tail is the validation split.
        split = "tokens";
        let n = train_tokens + val_tokens;
        let n_val = (n as f64 * spec.val_fraction).floor() as u64;
        if docs.train == 0 {
            std::fs::rename(&paths[1], &paths[0]).map_err(io_err(&paths[0]))?;
        }
        let mut src = std::fs::OpenOptions::new().read(true).write(true).open(&paths[0]).map_err(io_err(&paths[0]))?;
        let head = (n - n_val) * width as u64;
        src.seek(SeekFrom::Start(head)).map_err(io_err(&paths[0]))?;
        let mut dst = BufWriter::new(File::create(&paths[1]).map_err(io_err(&paths[1]))?);
        std::io::copy(&mut (&mut src).take(n_val * width as u64), &mut dst).map_err(io_err(&paths[1]))?;
        dst.flush().map_err(io_err(&paths[1]))?;
        src.set_len(head).map_err(io_err(&paths[0]))?;
        (train_tokens, val_tokens) = (n - n_val, n_val);
    }
    let meta = Meta {
        format: FORMAT,
        dtype: if width == 2 { "uint16" } else { "uint32" }.into(),
        vocab_size: tok.vocab_size(),
        train_tokens,
        val_tokens,
        docs,
        split: split.into(),
        bos_id: tok.bos(),
        eos_id: tok.eos(),
        val_fraction: spec.val_fraction,
        text_field: field.into(),
        bytes,
        inputs: inputs.iter().map(|i| i.path.display().to_string()).collect(),
    };
    for split in [Split::Train, Split::Val] {
        stage.sync(split.file())?;
    }
    stage.write("meta.json", serde_json::to_string_pretty(&meta).unwrap().as_bytes())?;
    Ok(meta)
}

/// Removes temporary folders of earlier builds of `key` whose process is gone.
fn clean_stale(root: &Path, key: &str) {
    let Ok(rd) = std::fs::read_dir(root) else { return };
    // Staging's temporary name: `.{key}.partial-{pid}-{nanos}`.
    let prefix = format!(".{key}.partial-");
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(&prefix) else { continue };
        let pid = rest.split('-').next().unwrap_or("");
        if cfg!(target_os = "linux") && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Shards {
    /// The shard set of `spec.data` under `tok`: from the cache when a finished one exists,
    /// else built (and cached).
    pub fn build(tok: &Tokenizer, spec: &BuildSpec, progress: Option<&Progress>) -> Result<Shards> {
        let f = spec.val_fraction;
        if !(f > 0.0 && f < 1.0) {
            return Err(Error::invalid(format!("val_fraction {f}: must be in (0, 1)")));
        }
        let inputs = corpus::list(Path::new(&spec.data))?;
        let field = spec.text_field.clone().unwrap_or_else(|| corpus::TEXT_FIELD.into());
        let key = cache_key(tok, &inputs, &field, f);
        let root = PathBuf::from(&spec.cache_dir);
        let dir = root.join(&key);
        if dir.exists() {
            match Shards::open(&dir) {
                Ok(mut s) => {
                    s.cached = true;
                    if let Some(p) = progress {
                        p.set_total(s.meta.bytes);
                        p.finish();
                    }
                    return Ok(s);
                }
                Err(_) => {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        std::fs::create_dir_all(&root).map_err(|e| Error::invalid(format!("{}: cannot create cache folder ({e})", root.display())))?;
        clean_stale(&root, &key);
        // Files fsync'd, then the folder renamed into place (a failure removes it).
        let stage = Staging::named(&dir, "shard build")?;
        write(tok, &inputs, spec, &field, &stage, progress)?;
        if let Err(e) = stage.commit() {
            // Another process may have finished the same build first.
            if !dir.join("meta.json").is_file() {
                return Err(e);
            }
        }
        if let Some(p) = progress {
            p.finish();
        }
        Shards::open(&dir)
    }

    /// Opens a finished shard folder (memory-mapped).
    pub fn open(dir: &Path) -> Result<Shards> {
        let mp = dir.join("meta.json");
        if !mp.is_file() {
            return Err(Error::invalid(format!("{}: not a token shard folder (no meta.json)", dir.display())));
        }
        let text = read_limited(&mp, CONFIG_JSON_MAX)?;
        let meta: Meta = serde_json::from_slice(&text).map_err(|e| Error::invalid(format!("{}: bad shard metadata ({e})", mp.display())))?;
        if meta.format != FORMAT {
            return Err(Error::invalid(format!("{}: shard format {} (this build reads {FORMAT})", mp.display(), meta.format)));
        }
        let width = match meta.dtype.as_str() {
            "uint16" => 2,
            "uint32" => 4,
            d => return Err(Error::invalid(format!("{}: dtype {d:?} (expected uint16 or uint32)", mp.display()))),
        };
        let mut maps = [None, None];
        for (k, (split, n)) in [(Split::Train, meta.train_tokens), (Split::Val, meta.val_tokens)].into_iter().enumerate() {
            let p = dir.join(split.file());
            let f = File::open(&p).map_err(|e| Error::invalid(format!("{}: cannot open ({e})", p.display())))?;
            let len = f.metadata().map_err(|e| Error::invalid(format!("{}: cannot read ({e})", p.display())))?.len();
            // checked: a hostile meta.json must not wrap around to the file's size
            if n.checked_mul(width as u64) != Some(len) || usize::try_from(len).is_err() {
                return Err(Error::invalid(format!("{}: {len} bytes, but meta.json says {n} tokens of {width} bytes", p.display())));
            }
            if len > 0 {
                // SAFETY: cache files are written once and renamed into place, never modified.
                let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::invalid(format!("{}: cannot map ({e})", p.display())))?;
                // Windows are read at random starts: read-ahead would fetch (and keep
                // resident) far more of the file than the windows need.
                #[cfg(unix)]
                let _ = map.advise(memmap2::Advice::Random);
                maps[k] = Some(map);
            }
        }
        Ok(Shards { dir: dir.to_path_buf(), meta, cached: false, width, maps })
    }

    pub fn tokens(&self, split: Split) -> u64 {
        match split {
            Split::Train => self.meta.train_tokens,
            Split::Val => self.meta.val_tokens,
        }
    }

    /// Copies `window` tokens from each start of `starts` into `out` (row-major). Windows may
    /// span documents (EOS separates them).
    pub fn read(&self, split: Split, starts: &[u64], window: usize, out: &mut [i32]) -> Result<()> {
        if out.len() != starts.len() * window {
            return Err(Error::invalid(format!("output holds {} ids, {} windows of {window} need {}", out.len(), starts.len(), starts.len() * window)));
        }
        let n = self.tokens(split);
        let map = self.maps[(split == Split::Val) as usize].as_deref().unwrap_or(&[]);
        for (row, &s) in out.chunks_exact_mut(window.max(1)).zip(starts) {
            if s.checked_add(window as u64).is_none_or(|e| e > n) {
                return Err(Error::invalid(format!("window at {s} of {window} tokens exceeds the {} split ({n} tokens)", split.name())));
            }
            let b = &map[s as usize * self.width..(s as usize + window) * self.width];
            if self.width == 2 {
                for (o, c) in row.iter_mut().zip(b.chunks_exact(2)) {
                    *o = u16::from_le_bytes([c[0], c[1]]) as i32;
                }
            } else {
                for (o, c) in row.iter_mut().zip(b.chunks_exact(4)) {
                    *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i32;
                }
            }
        }
        Ok(())
    }

    pub fn info(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.meta).unwrap();
        v["cached"] = self.cached.into();
        v["dir"] = self.dir.display().to_string().into();
        v
    }
}
