//! One tokenizer type for the whole pipeline: the byte tokenizer (id = byte, 256 ids, no
//! BOS/EOS; the default) or a Hugging Face `tokenizer.json` run by the `tokenizers` crate,
//! which gives exactly the ids Python's `tokenizers`/`transformers` give.

use super::corpus::{CutRule, Pairs};
use super::special::{self, Declared};
use crate::error::{Error, Result};
use crate::hf::folder::Staging;
use std::io::Read;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer as HfTokenizer;

/// The largest `tokenizer.json` read (LLaMA 3's is 9 MB; parsing costs several times the
/// file's size in memory).
pub const TOKENIZER_JSON_MAX: u64 = 512 << 20;
/// The largest small JSON file read (`tokenizer_config.json`, `generation_config.json`, …).
pub const CONFIG_JSON_MAX: u64 = 16 << 20;

/// The whole of `path`, refused (one line) when longer than `max` bytes: checked before
/// reading and bounded while reading, so a file that grows meanwhile costs no more.
pub(crate) fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| Error::invalid(format!("{}: cannot read ({e})", path.display())))?;
    let too_big = || Error::invalid(format!("{}: larger than {} MiB", path.display(), max >> 20));
    let len = f.metadata().map_err(|e| Error::invalid(format!("{}: cannot read ({e})", path.display())))?.len();
    if len > max {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut bytes).map_err(|e| Error::invalid(format!("{}: cannot read ({e})", path.display())))?;
    if bytes.len() as u64 > max {
        return Err(too_big());
    }
    Ok(bytes)
}

pub enum Tokenizer {
    Bytes,
    Hf(Box<Hf>),
}

pub struct Hf {
    inner: HfTokenizer,
    /// tokenizer.json as read: part of the shard cache key.
    json: Vec<u8>,
    /// The model folder's tokenizer files, to copy on export.
    files: Vec<PathBuf>,
    declared: Declared,
    vocab: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    eos_ids: Vec<u32>,
    /// What `encode(…, add_special = true)` adds (found by encoding the empty text).
    adds_bos: bool,
    adds_eos: bool,
    /// Where a long document may be cut with ids unchanged.
    cut: CutRule,
    /// Encodes the pieces after a document's first; None when `inner` does.
    rest: Option<Rest>,
}

/// For a tokenizer whose normalizer prepends (`▁`) to each text segment: `tok` is the same
/// without `Prepend`, for the segment a later piece starts with (it continues the previous
/// piece's); segments after an added token are prepended to, as in the whole text, so
/// those come from `inner`. `added`: the added tokens' ids and texts.
struct Rest {
    tok: HfTokenizer,
    added: std::collections::HashMap<u32, String>,
}

/// The cut rule of a `tokenizer.json` and, for one that prepends to the text, the
/// tokenizer for later pieces (see the corpus module doc). Only a BPE without
/// pre-tokenizer whose normalizer is `Prepend`s and one-character `Replace`s gets `Pairs`.
fn cut_rule(json: &Value) -> Result<(CutRule, Option<Rest>)> {
    let newline = Ok((CutRule::Newline, None));
    let model = &json["model"];
    let plain_bpe = model["type"] == "BPE"
        && model["dropout"].is_null()
        && model["continuing_subword_prefix"].as_str().unwrap_or("").is_empty()
        && model["end_of_word_suffix"].as_str().unwrap_or("").is_empty()
        && model["ignore_merges"] != true
        && (model["fuse_unk"] != true || model["byte_fallback"] == true);
    // Added tokens matched as written, nothing stripped around them: a piece's segments
    // are then found from the tokens' offsets.
    let added = json["added_tokens"].as_array().cloned().unwrap_or_default();
    let plain_added = added.iter().all(|a| ["lstrip", "rstrip", "single_word", "normalized"].iter().all(|k| a[*k] != true));
    if !plain_bpe || !plain_added || !json["pre_tokenizer"].is_null() {
        return newline;
    }
    let norm = &json["normalizer"];
    let steps: Vec<&Value> = match norm["type"].as_str() {
        None if norm.is_null() => vec![],
        Some("Sequence") => norm["normalizers"].as_array().map(|a| a.iter().collect()).unwrap_or_default(),
        Some(_) => vec![norm],
        None => return newline,
    };
    let (mut replace, mut prepends) = (vec![], false);
    for st in &steps {
        match st["type"].as_str() {
            Some("Prepend") => prepends = true,
            Some("Replace") => {
                let from = st["pattern"]["String"].as_str().unwrap_or("");
                let mut chars = from.chars();
                match (chars.next(), chars.next(), st["content"].as_str()) {
                    (Some(c), None, Some(to)) => replace.push((c, to.to_string())),
                    _ => return newline,
                }
            }
            _ => return newline,
        }
    }
    let Some(vocab) = model["vocab"].as_object() else { return newline };
    let mut p = Pairs { replace, ..Default::default() };
    for t in vocab.keys() {
        let cs: Vec<char> = t.chars().collect();
        if let [c] = cs[..] {
            p.singles.insert(c);
        }
        p.joined.extend(cs.windows(2).map(|w| (w[0], w[1])));
    }
    for a in &added {
        let cs: Vec<char> = a["content"].as_str().unwrap_or("").chars().collect();
        p.joined.extend(cs.windows(2).map(|w| (w[0], w[1])));
        p.added_edges.extend(cs.first().into_iter().chain(cs.last()));
    }
    let rest = if prepends {
        let mut j = json.clone();
        let kept: Vec<Value> = steps.iter().filter(|st| st["type"] != "Prepend").map(|&st| st.clone()).collect();
        j["normalizer"] = json!({ "type": "Sequence", "normalizers": kept });
        let tok = HfTokenizer::from_bytes(j.to_string().as_bytes()).map_err(|e| Error::backend(format!("tokenizer without Prepend: {}", one_line(e))))?;
        let added = added.iter().filter_map(|a| Some((u32::try_from(a["id"].as_u64()?).ok()?, a["content"].as_str()?.to_string()))).collect();
        Some(Rest { tok, added })
    } else {
        None
    };
    Ok((CutRule::Pairs(std::sync::Arc::new(p)), rest))
}

/// One line from a library error (some span several).
fn one_line(e: impl std::fmt::Display) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Tokenizer {
    pub fn bytes() -> Self {
        Tokenizer::Bytes
    }

    /// Opens `tokenizer.json`, given as the file or as the model folder holding it; BOS/EOS
    /// from the folder's `tokenizer_config.json` and `generation_config.json`.
    pub fn open(path: &Path) -> Result<Self> {
        let (file, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_path_buf())
        } else {
            (path.to_path_buf(), path.parent().map(Path::to_path_buf).unwrap_or_default())
        };
        if !path.exists() {
            return Err(Error::invalid(format!("tokenizer {}: not found", path.display())));
        }
        if !file.is_file() {
            return Err(Error::invalid(format!("tokenizer {}: no tokenizer.json in this folder", path.display())));
        }
        let json = read_limited(&file, TOKENIZER_JSON_MAX)?;
        let inner = HfTokenizer::from_bytes(&json)
            .map_err(|e| Error::invalid(format!("{}: not a Hugging Face tokenizer.json ({})", file.display(), one_line(e))))?;
        let declared = special::read(&dir)?;
        let mut files = vec![file.clone()];
        for name in ["tokenizer_config.json", "generation_config.json", "special_tokens_map.json"] {
            let p = dir.join(name);
            if p.is_file() {
                files.push(p);
            }
        }
        Self::resolve(inner, json, files, declared, &file, &dir)
    }

    fn resolve(mut inner: HfTokenizer, json: Vec<u8>, files: Vec<PathBuf>, declared: Declared, file: &Path, dir: &Path) -> Result<Self> {
        // Ids may have gaps: the vocabulary spans 0..=the largest id (added tokens included),
        // which is what an embedding table and a shard's integer width must hold.
        let vocab = inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1);
        let tc = dir.join("tokenizer_config.json");
        let lookup = |tok: &Option<String>, field: &str| -> Result<Option<u32>> {
            match tok {
                None => Ok(None),
                Some(t) => inner.token_to_id(t).map(Some).ok_or_else(|| {
                    Error::invalid(format!("{}: {field} {t:?} is not in the vocabulary of {}", tc.display(), file.display()))
                }),
            }
        };
        let bos = lookup(&declared.bos_token, "bos_token")?.or(declared.bos_ids.first().copied());
        let eos = lookup(&declared.eos_token, "eos_token")?.or(declared.eos_ids.first().copied());
        let mut eos_ids: Vec<u32> = eos.into_iter().collect();
        for &id in &declared.eos_ids {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        for (name, id) in bos.iter().map(|&i| ("bos", i)).chain(eos_ids.iter().map(|&i| ("eos", i))) {
            if id as usize >= vocab {
                return Err(Error::invalid(format!(
                    "{}: {name} token id {id} is outside the vocabulary of {} ({vocab} tokens)",
                    dir.join("generation_config.json").display(),
                    file.display()
                )));
            }
        }
        // As transformers does: an explicit add_bos_token/add_eos_token (or a tokenizer.json
        // without a post-processor) replaces the post-processor with a template.
        if declared.add_bos.is_some() || declared.add_eos.is_some() || inner.get_post_processor().is_none() {
            let text = |id: Option<u32>, given: &Option<String>| given.clone().or_else(|| id.and_then(|i| inner.id_to_token(i)));
            let add_bos = declared.add_bos.unwrap_or(false) && bos.is_some();
            let add_eos = declared.add_eos.unwrap_or(false) && eos.is_some();
            let (bt, et) = (text(bos, &declared.bos_token), text(eos, &declared.eos_token));
            let mut single = String::new();
            let mut specials: Vec<(String, u32)> = vec![];
            if add_bos {
                let t = bt.clone().unwrap_or_default();
                single += &format!("{t}:0 ");
                specials.push((t, bos.unwrap()));
            }
            single += "$A:0";
            if add_eos {
                let t = et.clone().unwrap_or_default();
                single += &format!(" {t}:0");
                if !specials.iter().any(|(s, _)| *s == t) {
                    specials.push((t, eos.unwrap()));
                }
            }
            let pair = format!("{single} {}", single.replace("$A:0", "$B:1").replace(":0", ":1"));
            let tp = TemplateProcessing::builder()
                .try_single(single.as_str())
                .and_then(|b| b.try_pair(pair.as_str()))
                .map_err(|e| Error::invalid(format!("{}: special tokens: {}", tc.display(), one_line(e))))?
                .special_tokens(specials)
                .build()
                .map_err(|e| Error::invalid(format!("{}: special tokens: {}", tc.display(), one_line(e))))?;
            inner.with_post_processor(Some(tp));
        }
        let probe = inner.encode_fast("", true).map_err(|e| Error::invalid(format!("{}: {}", file.display(), one_line(e))))?;
        let ids = probe.get_ids();
        let adds_bos = !ids.is_empty() && Some(ids[0]) == bos;
        let adds_eos = ids.len() > adds_bos as usize && eos_ids.contains(&ids[ids.len() - 1]);
        let parsed: Value = serde_json::from_slice(&json).map_err(|e| Error::invalid(format!("{}: not valid JSON ({e})", file.display())))?;
        let (cut, rest) = cut_rule(&parsed)?;
        Ok(Tokenizer::Hf(Box::new(Hf { inner, json, files, declared, vocab, bos, eos, eos_ids, adds_bos, adds_eos, cut, rest })))
    }

    pub fn is_bytes(&self) -> bool {
        matches!(self, Tokenizer::Bytes)
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf(h) => h.vocab,
        }
    }

    pub fn bos(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(h) => h.bos,
        }
    }

    pub fn eos(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(h) => h.eos,
        }
    }

    pub fn eos_ids(&self) -> &[u32] {
        match self {
            Tokenizer::Bytes => &[],
            Tokenizer::Hf(h) => &h.eos_ids,
        }
    }

    /// Whether `encode(…, true)` ends with EOS itself (then a corpus adds none after it).
    pub fn adds_eos(&self) -> bool {
        match self {
            Tokenizer::Bytes => false,
            Tokenizer::Hf(h) => h.adds_eos,
        }
    }

    /// Token ids of `text`; `add_special` applies the post-processor (BOS/EOS as the model
    /// folder says).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf(h) => h
                .inner
                .encode_fast(text, add_special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::invalid(format!("tokenizer: cannot encode ({})", one_line(e)))),
        }
    }

    /// Ids of a piece of a document after its first piece: no special tokens, and nothing
    /// the normalizer prepends to a whole text.
    pub fn encode_rest(&self, text: &str) -> Result<Vec<u32>> {
        let fail = |e: tokenizers::Error| Error::invalid(format!("tokenizer: cannot encode ({})", one_line(e)));
        let (h, r) = match self {
            Tokenizer::Hf(h) => match &h.rest {
                Some(r) => (h, r),
                None => return self.encode(text, false),
            },
            Tokenizer::Bytes => return self.encode(text, false),
        };
        let plain = |t: &str| r.tok.encode_fast(t, false).map(|e| e.get_ids().to_vec()).map_err(fail);
        if !r.added.values().any(|c| text.contains(c.as_str())) {
            return plain(text);
        }
        // Up to the first added token without `Prepend`, from it on as the whole text has it.
        let full = h.inner.encode(text, false).map_err(fail)?;
        let (ids, offs) = (full.get_ids(), full.get_offsets());
        let k = ids.iter().zip(offs).position(|(id, &(s, e))| r.added.get(id).is_some_and(|c| text.get(s..e) == Some(c.as_str())));
        let Some(k) = k else { return plain(text) };
        let mut out = plain(&text[..offs[k].0])?;
        out.extend_from_slice(&ids[k..]);
        Ok(out)
    }

    /// Where a long document may be cut with ids unchanged (see the corpus module doc).
    pub fn cut_rule(&self) -> CutRule {
        match self {
            Tokenizer::Bytes => CutRule::Newline,
            Tokenizer::Hf(h) => h.cut.clone(),
        }
    }

    /// Text of `ids`; `skip_special` drops special tokens (BOS, EOS, …). Bytes that are not
    /// UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(Error::invalid(format!("token id {id} at {i}: the vocabulary has {vocab} ids")));
        }
        match self {
            Tokenizer::Bytes => Ok(String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<u8>>()).into_owned()),
            Tokenizer::Hf(h) => h.inner.decode(ids, skip_special).map_err(|e| Error::invalid(format!("tokenizer: cannot decode ({})", one_line(e)))),
        }
    }

    /// The model folder's tokenizer files (empty for bytes).
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            Tokenizer::Bytes => vec![],
            Tokenizer::Hf(h) => h.files.clone(),
        }
    }

    /// What decides the ids a corpus gets: part of the shard cache key.
    pub fn identity(&self) -> Vec<u8> {
        match self {
            Tokenizer::Bytes => b"bytes".to_vec(),
            Tokenizer::Hf(h) => {
                let mut v = h.json.clone();
                v.extend(format!("\n{:?} {:?} {:?} {} {} {:?}", h.bos, h.eos, h.eos_ids, h.adds_bos, h.adds_eos, h.declared).bytes());
                v
            }
        }
    }

    pub fn info(&self) -> Value {
        let files: Vec<String> = self.files().iter().map(|p| p.display().to_string()).collect();
        match self {
            Tokenizer::Bytes => json!({ "kind": "bytes", "vocab_size": 256, "bos_id": null, "eos_id": null,
                "eos_ids": [], "adds_bos": false, "adds_eos": false, "files": files }),
            Tokenizer::Hf(h) => json!({ "kind": "hf", "vocab_size": h.vocab, "bos_id": h.bos, "eos_id": h.eos,
                "eos_ids": h.eos_ids, "adds_bos": h.adds_bos, "adds_eos": h.adds_eos, "files": files }),
        }
    }

    /// Writes `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json` when
    /// the source folder has them) into `dir`, which must be new or empty: the files are
    /// built in a sibling folder renamed into place, so a user's files are never replaced
    /// and the folder appears complete or not at all. The byte tokenizer is written as a
    /// BPE of 256 `<0xNN>` tokens with byte fallback and no merges, which Hugging Face loads
    /// giving the same ids.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let stage = Staging::named(dir, "tokenizer save")?;
        match self {
            Tokenizer::Bytes => {
                stage.write("tokenizer.json", byte_tokenizer_json().to_string().as_bytes())?;
                let cfg = json!({ "add_bos_token": false, "add_eos_token": false, "tokenizer_class": "PreTrainedTokenizerFast" });
                stage.write("tokenizer_config.json", serde_json::to_string_pretty(&cfg).unwrap().as_bytes())?;
            }
            Tokenizer::Hf(h) => {
                stage.write("tokenizer.json", &h.json)?;
                for src in &h.files[1..] {
                    let name = src.file_name().unwrap_or_default().to_string_lossy();
                    stage.write(&name, &read_limited(src, CONFIG_JSON_MAX)?)?;
                }
            }
        }
        stage.commit()
    }
}

fn byte_tokenizer_json() -> Value {
    let vocab: serde_json::Map<String, Value> = (0..256).map(|b| (format!("<0x{b:02X}>"), json!(b))).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": { "type": "Sequence", "decoders": [{ "type": "ByteFallback" }, { "type": "Fuse" }] },
        "model": { "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": [] }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let t = Tokenizer::bytes();
        let ids = t.encode("héllo", true).unwrap();
        assert_eq!(ids, vec![104, 195, 169, 108, 108, 111]);
        assert_eq!(t.decode(&ids, true).unwrap(), "héllo");
        assert!(t.decode(&[256], false).unwrap_err().msg.contains("256"));
    }

    #[test]
    fn saved_byte_tokenizer_gives_byte_ids() {
        let dir = std::env::temp_dir().join(format!("qg-bytes-{}", std::process::id()));
        Tokenizer::bytes().save(&dir).unwrap();
        let t = Tokenizer::open(&dir).unwrap();
        let text = "a b\n\tç中👋";
        let want: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(t.encode(text, true).unwrap(), want);
        assert_eq!(t.decode(&want, false).unwrap(), text);
        assert_eq!((t.vocab_size(), t.bos(), t.eos()), (256, None, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
