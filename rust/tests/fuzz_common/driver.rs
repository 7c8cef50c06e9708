//! The fuzz loop over real checkpoints of tiny models (every optimizer kind, INT8 weights,
//! INT4 / INT8 / bf16 / f32 projectors, 8-bit states) and over the Hugging Face fixtures
//! (`init_from` reader, `crate::hf::weights`). Counts panics (each attempt runs under
//! `catch_unwind`), silent loads and refusals; the callers assert on the tally.
//!
//! Oracle for engine checkpoints: every input differs from the good file. Raw damage must
//! be refused (the checksum covers every byte). Header edits are re-sealed with a valid
//! checksum and each one breaks a rule, so they must be refused too; an accepted file
//! must leave the engine exactly as the good file does (a save after it equals the good
//! file), else it is a silent load. A refused load must leave the engine unchanged.

use super::{json_edit, raw, set_f32, split, tensor_names, Rng};
use crate::common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::config::EngineConfig;
use qgalore::train::Engine;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[derive(Default, Debug)]
pub struct Tally {
    pub cases: u64,
    pub refused: u64,
    /// Accepted HF files (no checksum there: damage inside a weight is undetectable).
    pub accepted: u64,
    pub panics: u64,
    pub silent: u64,
    /// Inputs that went through real files rather than memory.
    pub files: u64,
    pub kinds: BTreeMap<&'static str, u64>,
    /// The first few failures, described.
    pub failures: Vec<String>,
    /// Longest single attempt, seconds (boundedness, reported; not asserted).
    pub slowest: f64,
}

impl Tally {
    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }
    pub fn add(&mut self, o: &Tally) {
        self.cases += o.cases;
        self.refused += o.refused;
        self.accepted += o.accepted;
        self.panics += o.panics;
        self.silent += o.silent;
        self.files += o.files;
        for (k, v) in &o.kinds {
            *self.kinds.entry(k).or_default() += v;
        }
        self.failures.extend(o.failures.iter().cloned());
        self.slowest = self.slowest.max(o.slowest);
    }
}

/// The engines whose checkpoints are fuzzed: (label, config). The model is large enough
/// that embedding, lm_head and (unprojected) MLP tensors take 8-bit states.
pub fn configs() -> Vec<(&'static str, EngineConfig)> {
    let base = |name: &str| {
        let mut c = engine_cfg(tiny_model(128, 32, 128, 4, 2, 2), 2, 16, 5);
        c.optimizer = optim(name, 1.0);
        (c.optimizer.rank, c.optimizer.update_gap, c.optimizer.lazy, c.optimizer.queue_size) = (8, 2, true, 3);
        (c.optimizer.weight_group_size, c.optimizer.proj_group_size) = (64, 64);
        c
    };
    let mut q = base("qgalore");
    (q.optimizer.weight_bits, q.optimizer.proj_bits) = (8, 4);
    let mut q8 = base("qgalore");
    (q8.optimizer.weight_bits, q8.optimizer.proj_bits, q8.optimizer.fused) = (8, 8, true);
    let mut g8 = base("galore8bit");
    g8.optimizer.proj_bits = 32;
    vec![("adamw", base("adamw")), ("adam8bit", base("adam8bit")), ("galore-bf16", base("galore")), ("galore8bit-f32", g8), ("qgalore-int4", q), ("qgalore-int8-fused", q8)]
}

/// A trained engine of `cfg` (5 steps: moments, projectors, queues, top-1 vectors).
pub fn trained(cfg: &EngineConfig) -> Engine<Cpu> {
    let mut e = Engine::new(Cpu::new(1).unwrap(), cfg.clone()).unwrap();
    for s in 0..5 {
        e.train_step(&tokens(2, 16, 128, s), 1, 3e-3).unwrap();
    }
    e
}

/// `cases` mutated checkpoints of `cfg`'s engine; every `file_every`-th goes through a
/// real file in `dir` (and the engine-free info check).
pub fn fuzz_checkpoint(label: &str, cfg: &EngineConfig, cases: u64, seed: u64, dir: &Path, file_every: u64) -> Tally {
    let mut t = Tally::default();
    let mut e = trained(cfg);
    let good = e.save_state().unwrap();
    let names = tensor_names(&split(&good).0);
    let f32_names: Vec<String> = names.iter().filter(|n| split(&good).0[n.as_str()]["dtype"] == "F32").cloned().collect();
    let mut rng = Rng(seed | 1);
    let path = dir.join(format!("{label}.ckpt"));
    for i in 0..cases {
        let (b, kind, sealed) = match rng.below(20) {
            0..=8 => {
                let (b, k) = raw(&mut rng, &good);
                (b, k, false)
            }
            9..=18 => loop {
                if let Some((b, k)) = json_edit(&mut rng, &good) {
                    break (b, k, true);
                }
            },
            _ => {
                // a value no checkpoint may hold, at a random element of a random tensor
                let n = rng.pick(&f32_names).clone();
                let len = split(&good).0[n.as_str()]["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product::<u64>() as usize;
                let v = if n.ends_with(".v") || n.ends_with(".absmax") { *rng.pick(&[f32::NAN, f32::INFINITY, -1.0]) } else { *rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]) };
                (set_f32(&good, &n, rng.below(len), v), "non-finite value", true)
            }
        };
        t.cases += 1;
        *t.kinds.entry(kind).or_default() += 1;
        let via_file = file_every > 0 && i % file_every == 0;
        let t0 = std::time::Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| {
            if via_file {
                std::fs::write(&path, &b).unwrap();
                e.load_file(&path)
            } else {
                e.load_state(&b)
            }
        }));
        t.slowest = t.slowest.max(t0.elapsed().as_secs_f64());
        if via_file {
            t.files += 1;
            let info = catch_unwind(|| qgalore::state::info_json(&path));
            match info {
                Err(_) => {
                    t.panics += 1;
                    t.fail(format!("{label} case {i} ({kind}): info panicked"));
                }
                Ok(text) if !sealed && text.contains("\"error\":null") => {
                    t.silent += 1;
                    t.fail(format!("{label} case {i} ({kind}): info accepted a damaged file"));
                }
                Ok(_) => {}
            }
        }
        match r {
            Err(_) => {
                t.panics += 1;
                t.fail(format!("{label} case {i} ({kind}): panic"));
                e = trained(cfg);
            }
            Ok(Err(err)) => {
                t.refused += 1;
                if err.msg.contains('\n') || err.msg.chars().count() > 2100 {
                    t.fail(format!("{label} case {i} ({kind}): message spans lines or runs long: {}", err.msg));
                }
                // refusals change nothing (checked on a sample: a save costs a few ms)
                if i % 97 == 0 && (e.save_state().ok().as_deref() != Some(&good[..]) || e.usable().is_err()) {
                    t.silent += 1;
                    t.fail(format!("{label} case {i} ({kind}): a refused load changed the engine ({})", err.msg));
                    e = trained(cfg);
                }
            }
            Ok(Ok(())) => {
                let same = sealed && e.save_state().ok().as_deref() == Some(&good[..]);
                if !same {
                    t.silent += 1;
                    t.fail(format!("{label} case {i} ({kind}): loaded silently"));
                }
                e.load_state(&good).unwrap();
            }
        }
    }
    t
}

/// The HF fixtures fuzzed: single files and a sharded set.
pub fn hf_fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf");
    ["gqa-f16", "gqa-llama3-scaling", "gqa-tied-theta5e5", "mha-untied-theta1e4", "mha-bf16-sharded"].iter().map(|d| root.join(d)).collect()
}

/// An edit of a safetensors header (no checksum to re-seal): offsets, dtype, shape,
/// names, extra keys.
fn hf_edit(rng: &mut Rng, good: &[u8]) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&good[8..8 + n]).ok()?;
    let names: Vec<String> = h.as_object()?.keys().filter(|k| *k != "__metadata__").cloned().collect();
    let t = rng.pick(&names).clone();
    match rng.below(6) {
        0 => h[&t]["data_offsets"][rng.below(2)] = (*rng.pick(&[0u64, 1, 7, u64::MAX, 1 << 62, (n as u64) << 4])).into(),
        1 => h[&t]["dtype"] = (*rng.pick(&["F32", "BF16", "F16", "I8", "U8", "F64", "X"])).into(),
        2 => h[&t]["shape"] = serde_json::json!([rng.below(1 << 20), *rng.pick(&[0u64, 1, u64::MAX, 1 << 40])]),
        3 => {
            let e = h.as_object_mut()?.remove(&t)?;
            h[format!("{t}.x")] = e;
        }
        4 => {
            h.as_object_mut()?.remove(&t);
        }
        _ => h[&t]["shape"] = serde_json::json!([]),
    }
    let mut head = serde_json::to_vec(&h).ok()?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.extend_from_slice(&good[8 + n..]);
    Some(out)
}

/// `cases` mutated copies of the HF fixture `src` (a folder), each written to `dir` and
/// read as `init_from` reads it: open and validate, match the config's layout, convert
/// every tensor to f32; plus `qg_hf_inspect`'s check.
pub fn fuzz_hf(src: &Path, cases: u64, seed: u64, dir: &Path) -> Tally {
    let mut t = Tally::default();
    let cfg_map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let model = qgalore::config::ModelConfig::from_map(&cfg_map).unwrap();
    let work = dir.join(src.file_name().unwrap());
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") || name.ends_with(".index.json") {
            let b = std::fs::read(e.path()).unwrap();
            std::fs::write(work.join(&name), &b).unwrap();
            files.push((name, b));
        }
    }
    files.sort();
    let open_at = if files.iter().any(|(n, _)| n.ends_with(".index.json")) { work.join("model.safetensors.index.json") } else { work.clone() };
    let read = |p: &Path| -> qgalore::error::Result<f64> {
        let ck = qgalore::hf::Checkpoint::open(p)?;
        let mut sum = 0.0f64;
        for m in ck.match_layout(&model)? {
            let mut v = vec![0f32; m.rows * m.cols];
            ck.read_f32(&m.name, &mut v)?;
            sum += v.iter().map(|&x| x as f64).sum::<f64>();
        }
        Ok(sum)
    };
    assert!(read(&open_at).is_ok(), "{}: the fixture itself must load", src.display());
    let mut rng = Rng(seed | 1);
    for i in 0..cases {
        let (fname, good) = rng.pick(&files).clone();
        let (b, kind) = if fname.ends_with(".safetensors") && rng.below(3) == 0 {
            match hf_edit(&mut rng, &good) {
                Some(b) => (b, "hf header edit"),
                None => continue,
            }
        } else {
            let (b, k) = raw(&mut rng, &good);
            (b, if fname.ends_with(".json") { "hf index damage" } else { k })
        };
        t.cases += 1;
        t.files += 1;
        *t.kinds.entry(kind).or_default() += 1;
        std::fs::write(work.join(&fname), &b).unwrap();
        let t0 = std::time::Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| read(&open_at)));
        let info = catch_unwind(AssertUnwindSafe(|| qgalore::hf::inspect_json(open_at.to_str().unwrap())));
        t.slowest = t.slowest.max(t0.elapsed().as_secs_f64());
        match (r, info) {
            (Err(_), _) | (_, Err(_)) => {
                t.panics += 1;
                t.fail(format!("{} case {i} ({kind} of {fname}): panic", src.display()));
            }
            (Ok(Err(e)), _) => {
                t.refused += 1;
                if e.msg.contains('\n') || e.msg.chars().count() > 2100 {
                    t.fail(format!("{} case {i}: message spans lines or runs long: {}", src.display(), e.msg));
                }
            }
            (Ok(Ok(_)), _) => t.accepted += 1,
        }
        std::fs::write(work.join(&fname), &good).unwrap();
    }
    let _ = std::fs::remove_dir_all(&work);
    t
}
