//! Tokenizers give Python's ids; corpora become the same tokens as encoding their documents
//! directly; shards split by document, deterministically, and are cached safely.

use qgalore::data::progress::Progress;
use qgalore::data::shards::{is_val, BuildSpec, Shards, Split};
use qgalore::data::tokenizer::Tokenizer;
use qgalore::data::train::{train, TrainSpec};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tok")
}

fn ids_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("ids.json")).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("qg-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic text with a few hundred distinct words (for training and corpora).
fn words(seed: u64, n: usize) -> String {
    const SYL: [&str; 16] = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fi", "gu", "ha", "je", "pe"];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut s = String::new();
    for i in 0..n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let k = 1 + (x >> 60) as usize % 3;
        for j in 0..k {
            s += SYL[((x >> (8 * j + 8)) & 15) as usize];
        }
        s += if i % 13 == 12 { ".\n" } else { " " };
    }
    s
}

#[test]
fn hf_tokenizers_give_python_ids() {
    let want = ids_json();
    let text = want["text"].as_str().unwrap();
    for name in ["llama2", "llama3"] {
        let w = &want[name];
        let t = Tokenizer::open(&fixtures().join(name)).unwrap();
        assert_eq!(t.vocab_size() as u64, w["vocab_size"].as_u64().unwrap(), "{name}");
        assert_eq!(t.bos().map(u64::from), w["bos_id"].as_u64(), "{name}");
        assert_eq!(t.eos().map(u64::from), w["eos_id"].as_u64(), "{name}");
        let plain = t.encode(text, false).unwrap();
        assert_eq!(plain, u32s(&w["ids"]), "{name} without special tokens");
        let special = t.encode(text, true).unwrap();
        assert_eq!(special, u32s(&w["ids_special"]), "{name} with special tokens");
        assert_eq!(t.decode(&plain, true).unwrap(), w["decoded"].as_str().unwrap(), "{name}");
        assert_eq!(t.decode(&special, false).unwrap(), w["decoded_special"].as_str().unwrap(), "{name}");
        assert_eq!(t.decode(&special, true).unwrap(), w["decoded_skip"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn special_tokens_follow_the_model_folder() {
    let t = Tokenizer::open(&fixtures().join("llama3")).unwrap();
    // tokenizer_config names <|eot_id|>; generation_config lists <|end_of_text|> too.
    let eot = t.encode("<|eot_id|>", false).unwrap()[0];
    let end = t.encode("<|end_of_text|>", false).unwrap()[0];
    assert_eq!(t.eos_ids(), &[eot, end]);
    assert!(!t.adds_eos());
    // An explicit add_eos_token replaces the post-processor, as transformers does.
    let d = TempDir::new("addeos");
    std::fs::copy(fixtures().join("llama2/tokenizer.json"), d.0.join("tokenizer.json")).unwrap();
    std::fs::write(d.0.join("tokenizer_config.json"), r#"{"add_bos_token": false, "add_eos_token": true, "eos_token": "</s>"}"#).unwrap();
    let t = Tokenizer::open(&d.0).unwrap();
    let ids = t.encode("hello", true).unwrap();
    assert_eq!(*ids.last().unwrap(), 2);
    assert_ne!(ids[0], 1);
    assert!(t.adds_eos());
    // A token the vocabulary lacks is named.
    std::fs::write(d.0.join("tokenizer_config.json"), r#"{"eos_token": "<nope>"}"#).unwrap();
    let e = Tokenizer::open(&d.0).err().unwrap().msg;
    assert!(e.contains("tokenizer_config.json") && e.contains("<nope>"), "{e}");
}

#[test]
fn missing_or_bad_tokenizer_is_one_line() {
    let e = Tokenizer::open(Path::new("/no/such/dir")).err().unwrap().msg;
    assert!(e.contains("/no/such/dir") && e.contains("not found"), "{e}");
    let d = TempDir::new("badtok");
    let e = Tokenizer::open(&d.0).err().unwrap().msg;
    assert!(e.contains("no tokenizer.json"), "{e}");
    std::fs::write(d.0.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = Tokenizer::open(&d.0).err().unwrap().msg;
    assert!(e.contains("not a Hugging Face tokenizer.json") && !e.contains('\n'), "{e}");
}

#[test]
fn trained_tokenizer_has_the_vocab_size_and_round_trips() {
    let d = TempDir::new("train");
    let corpus = d.0.join("c.txt");
    std::fs::write(&corpus, words(1, 40_000)).unwrap();
    let out = d.0.join("tok");
    let p = Progress::new();
    let spec = TrainSpec { inputs: vec![corpus.display().to_string()], vocab_size: 500, text_field: None, out: out.display().to_string() };
    let t = train(&spec, Some(&p)).unwrap();
    assert_eq!(t.vocab_size(), 500);
    assert_eq!(p.get().0, p.get().1);
    let (bos, eos) = (t.bos().unwrap(), t.eos().unwrap());
    assert_ne!(bos, eos);
    let text = "Zebu kalo 中文 ü\t\n  👋 anything at all";
    let ids = t.encode(text, true).unwrap();
    assert_eq!(ids[0], bos);
    assert_eq!(t.decode(&ids, true).unwrap(), text);
    // Merges learned: the training text takes far fewer tokens than bytes.
    let sample = words(2, 200);
    assert!(t.encode(&sample, false).unwrap().len() * 2 < sample.len());
    // Reopened from its folder, it is the same tokenizer.
    let again = Tokenizer::open(&out).unwrap();
    assert_eq!(again.encode(text, true).unwrap(), ids);
    assert!(out.join("tokenizer_config.json").is_file());
}

fn spec(data: &Path, cache: &Path, val: f64, threads: usize) -> BuildSpec {
    BuildSpec { data: data.display().to_string(), text_field: None, val_fraction: val, cache_dir: cache.display().to_string(), threads }
}

fn all(s: &Shards, split: Split) -> Vec<u32> {
    let n = s.tokens(split) as usize;
    let mut out = vec![0i32; n];
    s.read(split, &[0], n, &mut out).unwrap();
    out.into_iter().map(|x| x as u32).collect()
}

/// Tokens of the documents, each encoded directly with EOS after it, by split.
fn expected(t: &Tokenizer, docs: &[String], val: f64) -> (Vec<u32>, Vec<u32>) {
    let (mut tr, mut va) = (vec![], vec![]);
    for (i, d) in docs.iter().enumerate() {
        let mut ids = t.encode(d, true).unwrap();
        ids.extend(t.eos());
        if is_val(i as u64, val) { va.extend(ids) } else { tr.extend(ids) }
    }
    (tr, va)
}

fn gz(path: &Path, bytes: &[u8]) {
    let mut e = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap();
}

#[test]
fn corpus_formats_give_the_documents_tokens() {
    let d = TempDir::new("formats");
    let t = Tokenizer::open(&fixtures().join("llama3")).unwrap();
    let text = ids_json()["text"].as_str().unwrap().to_string();
    let docs: Vec<String> = (0..40).map(|i| format!("{} {}", words(i, 30 + i as usize), if i % 5 == 0 { &text } else { "" })).collect();
    let jsonl: String = docs.iter().map(|d| serde_json::json!({ "text": d, "id": 1 }).to_string() + "\n").collect();
    std::fs::write(d.0.join("c.jsonl"), &jsonl).unwrap();
    gz(&d.0.join("c.jsonl.gz"), jsonl.as_bytes());
    let folder = d.0.join("folder");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    for (i, doc) in docs.iter().enumerate() {
        // Sorted by path: a/ before sub/, names padded.
        let p = if i < 20 { folder.join(format!("a{i:02}.txt")) } else { folder.join(format!("sub/b{i:02}.txt")) };
        std::fs::write(p, doc).unwrap();
    }
    std::fs::write(folder.join("ignored.md"), "not a corpus file").unwrap();
    let cache = d.0.join("cache");
    let (tr, va) = expected(&t, &docs, 0.2);
    assert!(!tr.is_empty() && !va.is_empty());
    for data in [d.0.join("c.jsonl"), d.0.join("c.jsonl.gz"), folder.clone()] {
        let s = Shards::build(&t, &spec(&data, &cache, 0.2, 2), None).unwrap();
        assert_eq!(s.meta.split, "documents");
        assert_eq!(s.meta.docs.train + s.meta.docs.val, 40, "{}", data.display());
        assert_eq!(all(&s, Split::Train), tr, "{}", data.display());
        assert_eq!(all(&s, Split::Val), va, "{}", data.display());
        assert_eq!(s.meta.dtype, "uint16");
    }
    // A single text file is one document: the tail of its tokens is the validation split.
    let one = d.0.join("one.txt");
    std::fs::write(&one, &docs[3]).unwrap();
    let s = Shards::build(&t, &spec(&one, &cache, 0.25, 1), None).unwrap();
    let mut ids = t.encode(&docs[3], true).unwrap();
    ids.extend(t.eos());
    let n_val = (ids.len() as f64 * 0.25).floor() as usize;
    assert_eq!(s.meta.split, "tokens");
    assert_eq!(all(&s, Split::Train), ids[..ids.len() - n_val]);
    assert_eq!(all(&s, Split::Val), ids[ids.len() - n_val..]);
}

#[test]
fn a_long_document_is_cut_where_the_split_regex_cuts() {
    let d = TempDir::new("long");
    let t = Tokenizer::open(&fixtures().join("llama3")).unwrap();
    let doc = words(9, 600_000); // ~3 MB: several pieces
    assert!(doc.len() > 2 * qgalore::data::corpus::PIECE);
    let f = d.0.join("big.txt");
    std::fs::write(&f, &doc).unwrap();
    let s = Shards::build(&t, &spec(&f, &d.0.join("cache"), 0.1, 2), None).unwrap();
    let mut ids = t.encode(&doc, true).unwrap();
    ids.extend(t.eos());
    let mut got = all(&s, Split::Train);
    got.extend(all(&s, Split::Val));
    assert_eq!(got, ids);
}

#[test]
fn split_is_by_document_and_independent_of_threads() {
    let d = TempDir::new("threads");
    let t = Tokenizer::open(&fixtures().join("llama2")).unwrap();
    let jsonl: String = (0..3000).map(|i| serde_json::json!({ "body": words(i, 5 + i as usize % 40) }).to_string() + "\n").collect();
    let f = d.0.join("c.jsonl");
    std::fs::write(&f, jsonl).unwrap();
    let mut a = spec(&f, &d.0.join("c1"), 0.1, 1);
    a.text_field = Some("body".into());
    let mut b = spec(&f, &d.0.join("c4"), 0.1, 4);
    b.text_field = Some("body".into());
    let (s1, s4) = (Shards::build(&t, &a, None).unwrap(), Shards::build(&t, &b, None).unwrap());
    assert_eq!(all(&s1, Split::Train), all(&s4, Split::Train));
    assert_eq!(all(&s1, Split::Val), all(&s4, Split::Val));
    let v = s1.meta.docs.val as f64 / 3000.0;
    assert!((0.07..0.13).contains(&v), "val share {v}");
    // Each document starts with BOS and ends with EOS; no document is cut between splits.
    let train = all(&s1, Split::Train);
    assert_eq!((train[0], *train.last().unwrap()), (1, 2));
    assert_eq!(train.iter().filter(|&&x| x == 2).count() as u64, s1.meta.docs.train);
}

#[test]
fn cache_is_reused_and_invalidated_when_an_input_changes() {
    let d = TempDir::new("cache");
    let t = Tokenizer::bytes();
    let f = d.0.join("c.txt");
    std::fs::write(&f, words(3, 500)).unwrap();
    let cache = d.0.join("cache");
    let p = Progress::new();
    let s = Shards::build(&t, &spec(&f, &cache, 0.1, 2), Some(&p)).unwrap();
    assert!(!s.cached);
    assert_eq!(p.get(), (std::fs::metadata(&f).unwrap().len(), std::fs::metadata(&f).unwrap().len()));
    let mtime = std::fs::metadata(s.dir.join("train.bin")).unwrap().modified().unwrap();
    let again = Shards::build(&t, &spec(&f, &cache, 0.1, 2), None).unwrap();
    assert!(again.cached);
    assert_eq!(again.dir, s.dir);
    assert_eq!(std::fs::metadata(s.dir.join("train.bin")).unwrap().modified().unwrap(), mtime);
    // A different validation fraction or a changed input is a different cache entry.
    assert!(!Shards::build(&t, &spec(&f, &cache, 0.2, 2), None).unwrap().cached);
    std::fs::write(&f, words(4, 500)).unwrap();
    let changed = Shards::build(&t, &spec(&f, &cache, 0.1, 2), None).unwrap();
    assert!(!changed.cached);
    assert_ne!(changed.dir, s.dir);
    // A damaged cache entry is rebuilt, not used.
    std::fs::OpenOptions::new().write(true).open(changed.dir.join("train.bin")).unwrap().set_len(10).unwrap();
    let rebuilt = Shards::build(&t, &spec(&f, &cache, 0.1, 2), None).unwrap();
    assert!(!rebuilt.cached);
    assert_eq!(all(&rebuilt, Split::Train).len() as u64, rebuilt.meta.train_tokens);
}

#[test]
fn a_failed_build_leaves_no_cache() {
    let d = TempDir::new("failed");
    let t = Tokenizer::bytes();
    let folder = d.0.join("data");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("a.jsonl"), "{\"text\": \"fine\"}\n".repeat(100)).unwrap();
    std::fs::write(folder.join("b.jsonl"), "{\"text\": \"fine\"}\n{\"text\": 3}\n").unwrap();
    let cache = d.0.join("cache");
    let e = Shards::build(&t, &spec(&folder, &cache, 0.1, 2), None).err().unwrap().msg;
    assert!(e.contains("b.jsonl: line 2: field \"text\" is not a string"), "{e}");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0, "nothing left in the cache");
    // A temporary folder of a build whose process died is cleared by the next build.
    std::fs::write(folder.join("b.jsonl"), "{\"text\": \"fixed\"}\n").unwrap();
    let inputs = qgalore::data::corpus::list(&folder).unwrap();
    let key = qgalore::data::shards::cache_key(&t, &inputs, "text", 0.1);
    let stale = cache.join(format!(".{key}.partial-999999999-1"));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("train.bin"), [0u8; 10]).unwrap();
    let s = Shards::build(&t, &spec(&folder, &cache, 0.1, 2), None).unwrap();
    assert!(!s.cached && !stale.exists());
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let d = TempDir::new("bad");
    let t = Tokenizer::bytes();
    let cache = d.0.join("cache");
    let case = |name: &str, bytes: &[u8]| -> String {
        let p = d.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = Shards::build(&t, &spec(&p, &cache, 0.1, 2), None).err().unwrap().msg;
        assert!(e.contains(name) && !e.contains('\n'), "{e}");
        e
    };
    assert!(case("a.jsonl", b"{\"text\": \"ok\"}\n\n{\"text\": \"ok\"\n").contains("line 3: not JSON"));
    assert!(case("b.jsonl", b"{\"text\": \"ok\"}\n{\"content\": \"x\"}\n").contains("line 2: no \"text\" field"));
    assert!(case("c.jsonl", b"[1, 2]\n").contains("line 1: not a JSON object"));
    assert!(case("d.jsonl", b"{\"text\": \"ok\"}\n{\"text\": \"\xff\"}\n").contains("line 2: not UTF-8"));
    assert!(case("e.txt", b"abc\xfe\xffdef").contains("not UTF-8 (byte 3)"));
    assert!(case("f.txt", b"").contains("empty corpus"));
    let mut full = vec![];
    let mut e = flate2::write::GzEncoder::new(&mut full, flate2::Compression::fast());
    e.write_all("{\"text\": \"some words here\"}\n".repeat(2000).as_bytes()).unwrap();
    e.finish().unwrap();
    assert!(case("g.jsonl.gz", &full[..full.len() / 2]).contains("gzip stream ends early"));
    assert!(case("h.json.gz", b"not gzip at all").contains("corrupt gzip data"));
    let e = Shards::build(&t, &spec(&d.0.join("nope.txt"), &cache, 0.1, 2), None).err().unwrap().msg;
    assert!(e.contains("nope.txt: not found"), "{e}");
    let empty = d.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = Shards::build(&t, &spec(&empty, &cache, 0.1, 2), None).err().unwrap().msg;
    assert!(e.contains("no .txt, .jsonl"), "{e}");
    let e = Shards::build(&t, &spec(&d.0.join("a.jsonl"), &cache, 1.5, 2), None).err().unwrap().msg;
    assert!(e.contains("val_fraction 1.5"), "{e}");
}

#[test]
fn wide_vocabularies_use_uint32() {
    let d = TempDir::new("u32");
    // A word-level vocabulary of 70000 entries: too many for uint16.
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for i in 1..70_000 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tj = serde_json::json!({ "version": "1.0", "added_tokens": [], "normalizer": null,
        "pre_tokenizer": { "type": "WhitespaceSplit" }, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]" } });
    std::fs::write(d.0.join("tokenizer.json"), tj.to_string()).unwrap();
    let t = Tokenizer::open(&d.0).unwrap();
    let f = d.0.join("c.txt");
    std::fs::write(&f, "w1 w69999 w65536 w2 nope").unwrap();
    let s = Shards::build(&t, &spec(&f, &d.0.join("cache"), 0.2, 1), None).unwrap();
    assert_eq!(s.meta.dtype, "uint32");
    let mut got = all(&s, Split::Train);
    got.extend(all(&s, Split::Val));
    assert_eq!(got, vec![1, 69999, 65536, 2, 0]);
    let reopened = Shards::open(&s.dir).unwrap();
    let mut w = vec![0i32; 2];
    reopened.read(Split::Train, &[2], 2, &mut w).unwrap();
    assert_eq!(w, vec![65536, 2]);
    assert!(reopened.read(Split::Train, &[3], 2, &mut w).unwrap_err().msg.contains("exceeds the train split"));
}

fn word_level(dir: &Path, vocab: Value) {
    let tj = serde_json::json!({ "version": "1.0", "added_tokens": [], "normalizer": null,
        "pre_tokenizer": { "type": "WhitespaceSplit" }, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]" } });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
}

#[test]
fn a_vocabulary_with_gaps_spans_its_largest_id() {
    let d = TempDir::new("gaps");
    word_level(&d.0, serde_json::json!({ "[UNK]": 0, "a": 1, "b": 70000 }));
    let t = Tokenizer::open(&d.0).unwrap();
    assert_eq!(t.vocab_size(), 70001);
    assert_eq!(t.decode(&[70000], false).unwrap(), "b");
    let f = d.0.join("c.txt");
    std::fs::write(&f, "a b b a").unwrap();
    let s = Shards::build(&t, &spec(&f, &d.0.join("cache"), 0.25, 1), None).unwrap();
    assert_eq!((s.meta.dtype.as_str(), s.meta.vocab_size), ("uint32", 70001));
    let mut got = all(&s, Split::Train);
    got.extend(all(&s, Split::Val));
    assert_eq!(got, vec![1, 70000, 70000, 1]);
}

#[test]
fn a_hostile_shard_meta_is_an_error_not_a_panic() {
    let d = TempDir::new("meta");
    let f = d.0.join("c.txt");
    std::fs::write(&f, words(5, 300)).unwrap();
    let s = Shards::build(&Tokenizer::bytes(), &spec(&f, &d.0.join("cache"), 0.1, 1), None).unwrap();
    let mp = s.dir.join("meta.json");
    let meta: Value = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    let n = meta["train_tokens"].as_u64().unwrap();
    // 2^63 + n tokens of 2 bytes wraps around to the file's true size.
    for bad in [(1u64 << 63) + n, u64::MAX, n + 1, n - 1] {
        let mut m = meta.clone();
        m["train_tokens"] = bad.into();
        std::fs::write(&mp, m.to_string()).unwrap();
        let e = Shards::open(&s.dir).err().expect("a bad token count is refused").msg;
        assert!(e.contains("train.bin") && e.contains(&format!("says {bad} tokens")) && !e.contains('\n'), "{e}");
    }
    std::fs::write(&mp, "{").unwrap();
    let e = Shards::open(&s.dir).err().unwrap().msg;
    assert!(e.contains("meta.json: bad shard metadata"), "{e}");
}

#[test]
fn save_and_training_never_touch_a_folder_in_use() {
    let d = TempDir::new("inuse");
    let user = d.0.join("mine");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("tokenizer.json"), "my own file").unwrap();
    let llama2 = Tokenizer::open(&fixtures().join("llama2")).unwrap();
    for (t, what) in [(&Tokenizer::bytes(), "bytes"), (&llama2, "llama2")] {
        let e = t.save(&user).expect_err(what).msg;
        assert_eq!(e, format!("{}: folder is not empty; tokenizer save writes only into a new or empty folder", user.display()));
    }
    let corpus = d.0.join("c.txt");
    std::fs::write(&corpus, words(1, 2000)).unwrap();
    let spec = TrainSpec { inputs: vec![corpus.display().to_string()], vocab_size: 300, text_field: None, out: user.display().to_string() };
    let e = train(&spec, None).err().unwrap().msg;
    assert!(e.ends_with("folder is not empty; tokenizer training writes only into a new or empty folder"), "{e}");
    assert_eq!(std::fs::read_to_string(user.join("tokenizer.json")).unwrap(), "my own file");
    let names = |p: &Path| std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect::<Vec<_>>();
    assert_eq!(names(&user), ["tokenizer.json"]);
    assert_eq!(names(&d.0).len(), 2, "no staging folder left: {:?}", names(&d.0));
    // A new or empty folder is written whole, and opens as the same tokenizer.
    let empty = d.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    llama2.save(&empty).unwrap();
    let mut got = names(&empty);
    got.sort();
    assert_eq!(got, ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]);
    assert_eq!(std::fs::read(empty.join("tokenizer.json")).unwrap(), std::fs::read(fixtures().join("llama2/tokenizer.json")).unwrap());
    let trained = train(&TrainSpec { out: d.0.join("new/tok").display().to_string(), ..spec }, None).unwrap();
    assert_eq!(trained.vocab_size(), 300);
}

#[test]
fn oversized_tokenizer_files_are_refused_unread() {
    use qgalore::data::tokenizer::{CONFIG_JSON_MAX, TOKENIZER_JSON_MAX};
    let d = TempDir::new("huge");
    std::fs::copy(fixtures().join("llama2/tokenizer.json"), d.0.join("tokenizer.json")).unwrap();
    // sparse files: their size is what counts
    for name in ["tokenizer_config.json", "generation_config.json"] {
        let p = d.0.join(name);
        std::fs::File::create(&p).unwrap().set_len(CONFIG_JSON_MAX + 1).unwrap();
        let e = Tokenizer::open(&d.0).err().unwrap().msg;
        assert_eq!(e, format!("{}: larger than 16 MiB", p.display()));
        std::fs::remove_file(&p).unwrap();
    }
    let p = d.0.join("tokenizer.json");
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(TOKENIZER_JSON_MAX + 1).unwrap();
    let e = Tokenizer::open(&d.0).err().unwrap().msg;
    assert_eq!(e, format!("{}: larger than 512 MiB", p.display()));
}

#[test]
fn threads_are_capped() {
    use qgalore::data::shards::{max_threads, pool_threads};
    assert_eq!(pool_threads(1_000_000), max_threads());
    assert_eq!(pool_threads(3), 3.min(max_threads()));
    assert!(pool_threads(0) >= 1);
    let d = TempDir::new("manythreads");
    let f = d.0.join("c.txt");
    std::fs::write(&f, words(6, 200)).unwrap();
    let s = Shards::build(&Tokenizer::bytes(), &spec(&f, &d.0.join("cache"), 0.1, 1_000_000), None).unwrap();
    assert_eq!(s.meta.train_tokens + s.meta.val_tokens, std::fs::metadata(&f).unwrap().len());
}

#[test]
fn a_long_document_gives_the_whole_texts_ids_for_a_sentencepiece_bpe() {
    use qgalore::data::corpus::{CutRule, PIECE};
    let d = TempDir::new("llama2long");
    let t = Tokenizer::open(&fixtures().join("llama2")).unwrap();
    assert!(matches!(t.cut_rule(), CutRule::Pairs(_)));
    let text = ids_json()["text"].as_str().unwrap().to_string();
    let mut doc = String::new();
    let mut i = 0;
    while doc.len() < 3 * PIECE + PIECE / 2 {
        doc += &format!("{}\nThe {}. {text}\n\n", words(i, 40), words(i + 1, 7));
        i += 1;
    }
    let mut want = t.encode(&doc, true).unwrap();
    want.extend(t.eos());
    std::fs::write(d.0.join("big.txt"), &doc).unwrap();
    std::fs::write(d.0.join("big.jsonl"), serde_json::json!({ "text": doc }).to_string() + "\n").unwrap();
    for name in ["big.txt", "big.jsonl"] {
        let s = Shards::build(&t, &spec(&d.0.join(name), &d.0.join("cache"), 0.1, 2), None).unwrap();
        let mut got = all(&s, Split::Train);
        got.extend(all(&s, Split::Val));
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(got == want, "{name}: {} vs {} ids, first difference at {first:?}", got.len(), want.len());
    }
}
