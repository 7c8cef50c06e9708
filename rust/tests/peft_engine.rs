//! PEFT adapters through the engine (rust/src/hf/adapter.rs): the adapters `peft` 0.21.2
//! saved on the tiny Hugging Face fixtures (tests/fixtures/peft/) loaded into a lora engine
//! give the logits peft computed; a qlora engine with the same adapter equals a lora engine
//! on the dequantized NF4 base; the merged export re-imported as a plain model gives the
//! adapted logits (and peft's merged ones); save → load is bit-exact; every refusal is one
//! line and changes nothing.
//!
//! `QG_PEFT_OUT=DIR cargo test --release --test peft_engine saved` leaves the adapters the
//! engine saved in DIR/<fixture> for `tools/peft_check.py` (tests/fixtures/peft/README.md).

use qgalore::backend::cpu::Cpu;
use qgalore::config::EngineConfig;
use qgalore::hf::adapter::SaveAdapterOptions;
use qgalore::hf::{peft, Dtype};
use qgalore::train::Engine;
use safetensors::SafeTensors;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/peft").join(name)
}

fn base_dir(base: &str) -> PathBuf {
    root().join("tests/fixtures/hf").join(base)
}

/// (adapter fixture, its base model fixture, its lora options)
fn fixtures() -> [(&'static str, &'static str, Value); 2] {
    [
        ("qv-r4", "mha-untied-theta1e4", json!({ "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.05, "lora_targets": "q_proj,v_proj" })),
        ("all-r8-rslora", "gqa-tied-theta5e5", json!({ "lora_rank": 8, "lora_alpha": 16, "lora_targets": "all-linear", "lora_rslora": true })),
    ]
}

fn config_map(dir: &Path) -> Map<String, Value> {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

/// A fresh folder under the system temp dir (not created).
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qg-peft-engine-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// An engine of `rows × seq` for the model in `dir` with optimizer `opt` (JSON), its
/// weights imported from `dir`.
fn engine(dir: &Path, opt: Value, rows: usize, seq: usize) -> Result<Engine<Cpu>, String> {
    let cfg = json!({ "model": config_map(dir), "batch_size": rows, "seq_len": seq, "optimizer": opt,
                      "seed": 1, "device": "cpu", "threads": 2 });
    Engine::build(Cpu::new(2).unwrap(), EngineConfig::from_json(&cfg.to_string()).map_err(|e| e.msg)?, Some(dir)).map_err(|e| e.msg)
}

fn with_name(name: &str, opts: &Value, extra: Value) -> Value {
    let mut o = opts.as_object().unwrap().clone();
    o.insert("name".into(), name.into());
    for (k, v) in extra.as_object().unwrap() {
        o.insert(k.clone(), v.clone());
    }
    Value::Object(o)
}

/// The fixture's `logits.safetensors`: ids [rows, seq] and the f32 logits by name.
struct Logits {
    ids: Vec<i32>,
    rows: usize,
    seq: usize,
    by: HashMap<String, Vec<f32>>,
}

fn fixture_logits(name: &str) -> Logits {
    let bytes = std::fs::read(fixture(name).join("logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids_t = st.tensor("ids").unwrap();
    let ids: Vec<i32> = ids_t.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let (rows, seq) = (ids_t.shape()[0], ids_t.shape()[1]);
    let mut by = HashMap::new();
    for k in ["base", "adapted", "merged"] {
        let t = st.tensor(k).unwrap();
        by.insert(k.to_string(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
    }
    Logits { ids, rows, seq, by }
}

fn logits(e: &mut Engine<Cpu>, l: &Logits) -> Vec<f32> {
    let mut out = vec![0.0f32; l.rows * l.seq * e.cfg.model.vocab_size];
    e.logits(&l.ids, l.rows, l.seq, &mut out).unwrap();
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn a_lora_engine_with_a_peft_adapter_gives_peft_logits() {
    for (name, base, opts) in fixtures() {
        let l = fixture_logits(name);
        let mut e = engine(&base_dir(base), with_name("lora", &opts, json!({ "lora_base": "f32" })), l.rows, l.seq).unwrap();
        // B = 0 at init: the base model
        let d0 = max_diff(&logits(&mut e, &l), &l.by["base"]);
        e.load_adapter(&fixture(name)).unwrap();
        let got = logits(&mut e, &l);
        let (da, db) = (max_diff(&got, &l.by["adapted"]), max_diff(&l.by["adapted"], &l.by["base"]));
        eprintln!("{name}: lora engine + adapter vs peft adapted: max |Δ| {da:.2e} (base before loading {d0:.2e}; the adapter moves logits by {db:.3})");
        assert!(d0 < 1e-4 && da < 1e-4, "{name}: base {d0}, adapted {da}");
        assert!(db > 1.0);
    }
}

#[test]
fn qlora_with_an_adapter_equals_lora_on_the_dequantized_nf4_base() {
    for (name, base, opts) in fixtures() {
        let l = fixture_logits(name);
        let mut q = engine(&base_dir(base), with_name("qlora", &opts, json!({})), l.rows, l.seq).unwrap();
        // the fresh qlora engine's merged export (B = 0) is its dequantized NF4 base
        let deq = scratch(&format!("deq-{name}"));
        q.export_hf(&deq, Dtype::F32, &Map::new()).unwrap();
        let mut f = engine(&deq, with_name("lora", &opts, json!({ "lora_base": "f32" })), l.rows, l.seq).unwrap();
        q.load_adapter(&fixture(name)).unwrap();
        f.load_adapter(&fixture(name)).unwrap();
        let (lq, lf) = (logits(&mut q, &l), logits(&mut f, &l));
        let d = max_diff(&lq, &lf);
        let dp = max_diff(&lq, &l.by["adapted"]);
        eprintln!("{name}: qlora + adapter vs lora on the dequantized base: max |Δ| {d:.2e}; vs peft's f32 adapted (NF4 error) {dp:.3}");
        assert!(d < 1e-5, "{name}: {d}");
        // NF4 changes the base (4 bits per weight of a 32-wide toy model move logits by units)
        assert!(dp > 1e-3, "{name}: {dp}");
        std::fs::remove_dir_all(&deq).unwrap();
    }
}

#[test]
fn the_merged_export_is_a_plain_model_with_the_adapted_logits() {
    for (name, base, opts) in fixtures() {
        let l = fixture_logits(name);
        let mut e = engine(&base_dir(base), with_name("lora", &opts, json!({ "lora_base": "f32" })), l.rows, l.seq).unwrap();
        e.load_adapter(&fixture(name)).unwrap();
        let adapted = logits(&mut e, &l);
        let out = scratch(&format!("merged-{name}"));
        e.export_hf(&out, Dtype::F32, &Map::new()).unwrap();
        let mut plain = engine(&out, json!({ "name": "adamw" }), l.rows, l.seq).unwrap();
        let merged = logits(&mut plain, &l);
        let (dm, dp) = (max_diff(&merged, &adapted), max_diff(&merged, &l.by["merged"]));
        eprintln!("{name}: merged export re-imported vs the adapted engine: max |Δ| {dm:.2e}; vs peft merge_and_unload: {dp:.2e}");
        assert!(dm < 1e-4 && dp < 1e-4, "{name}: {dm} {dp}");
        // a plain model: no adapter tensors in the file
        let st = std::fs::read(out.join("model.safetensors")).unwrap();
        let names = SafeTensors::deserialize(&st).unwrap().names().into_iter().map(String::from).collect::<Vec<_>>();
        assert!(names.iter().all(|n| !n.contains("lora_")), "{names:?}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn saved_adapters_load_back_bit_exactly_and_peft_shaped() {
    let keep = std::env::var_os("QG_PEFT_OUT").map(PathBuf::from);
    for (name, base, opts) in fixtures() {
        let l = fixture_logits(name);
        let lora = with_name("lora", &opts, json!({ "lora_base": "f32" }));
        let mut e = engine(&base_dir(base), lora.clone(), l.rows, l.seq).unwrap();
        e.load_adapter(&fixture(name)).unwrap();
        let dir = scratch(&format!("saved-{name}"));
        let base_path = base_dir(base).display().to_string();
        let save = |dtype| SaveAdapterOptions { dir: dir.clone(), dtype, base_model: Some(base_path.clone()), overwrite: false };
        e.save_adapter(&save(Dtype::F32)).unwrap();
        // the fixture's tensors, names and settings again
        let a = peft::read(&dir, &e.cfg.model).unwrap();
        let f = peft::read(&fixture(name), &e.cfg.model).unwrap();
        assert_eq!(a.tensors, f.tensors, "{name}: tensors as loaded");
        let (c, fc) = (&a.config, &f.config);
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout, c.use_rslora, &c.target_modules), (fc.r, fc.lora_alpha, fc.lora_dropout, fc.use_rslora, &fc.target_modules));
        assert_eq!(c.base_model_name_or_path.as_deref(), Some(base_path.as_str()));
        // into a fresh engine: bit for bit
        let mut g = engine(&base_dir(base), lora.clone(), l.rows, l.seq).unwrap();
        g.load_adapter(&dir).unwrap();
        let (x, y) = (e.adapter_tensors().unwrap(), g.adapter_tensors().unwrap());
        assert_eq!(x.len(), y.len());
        for ((n, s, v), (m, t, w)) in x.iter().zip(&y) {
            assert_eq!((n, s), (m, t));
            assert!(v.iter().zip(w).all(|(p, q)| p.to_bits() == q.to_bits()), "{n}");
        }
        let (le, lg) = (logits(&mut e, &l), logits(&mut g, &l));
        assert!(le.iter().zip(&lg).all(|(p, q)| p.to_bits() == q.to_bits()));
        // a second save into the same folder is refused; with overwrite it is allowed
        let err = e.save_adapter(&save(Dtype::F32)).unwrap_err().msg;
        assert!(err.contains("already holds an adapter") && !err.contains('\n'), "{err}");
        e.save_adapter(&SaveAdapterOptions { overwrite: true, ..save(Dtype::Bf16) }).unwrap();
        let b = peft::read(&dir, &e.cfg.model).unwrap();
        for ((_, (_, va), (_, vb)), (_, (_, wa), (_, wb))) in b.tensors.iter().zip(&a.tensors) {
            for (p, q) in va.iter().chain(vb).zip(wa.iter().chain(wb)) {
                assert_eq!(*p, half::bf16::from_f32(*q).to_f32());
            }
        }
        if let Some(k) = &keep {
            let to = k.join(name);
            let _ = std::fs::remove_dir_all(&to);
            std::fs::create_dir_all(k).unwrap();
            e.save_adapter(&SaveAdapterOptions { dir: to, dtype: Dtype::F32, base_model: Some(base_path.clone()), overwrite: false }).unwrap();
            // an adapter the engine trained (every value its own), with the engine's logits
            let mut t = engine(&base_dir(base), lora.clone(), l.rows, l.seq).unwrap();
            let toks: Vec<i32> = (0..l.rows * (l.seq + 1)).map(|i| (i * 37 % 97) as i32).collect();
            for _ in 0..5 {
                t.train_step(&toks, 1, 2e-2).unwrap();
            }
            let to = k.join(format!("trained-{name}"));
            let _ = std::fs::remove_dir_all(&to);
            t.save_adapter(&SaveAdapterOptions { dir: to.clone(), dtype: Dtype::F32, base_model: Some(base_path.clone()), overwrite: false }).unwrap();
            let ours = logits(&mut t, &l);
            let ids: Vec<u8> = l.ids.iter().flat_map(|x| x.to_le_bytes()).collect();
            let lb: Vec<u8> = ours.iter().flat_map(|x| x.to_le_bytes()).collect();
            let v = t.cfg.model.vocab_size;
            let views = vec![
                ("ids", safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![l.rows, l.seq], &ids).unwrap()),
                ("adapted", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![l.rows, l.seq, v], &lb).unwrap()),
            ];
            std::fs::write(k.join(format!("trained-{name}.logits.safetensors")), safetensors::serialize(views, None).unwrap()).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn engine_options_from_the_adapter_config() {
    // what a front end builds an engine from (qg_adapter_config)
    let v: Value = serde_json::from_str(&qgalore::hf::adapter::config_json(&fixture("all-r8-rslora"))).unwrap();
    assert_eq!(v["r"], 8);
    assert_eq!(v["lora_alpha"], 16.0);
    assert_eq!(v["use_rslora"], true);
    assert_eq!(v["target_modules"].as_array().unwrap().len(), 7);
    assert!(v["error"].is_null());
    let v: Value = serde_json::from_str(&qgalore::hf::adapter::config_json(&fixture("nope"))).unwrap();
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("nope") && err.contains("cannot read the adapter folder") && !err.contains('\n'), "{err}");
}

/// A load error: one line containing every `want`, and the engine's adapters unchanged.
fn refused(e: &mut Engine<Cpu>, dir: &Path, want: &[&str]) {
    let before = e.adapter_tensors().ok();
    let msg = e.load_adapter(dir).unwrap_err().msg;
    assert!(!msg.contains('\n'), "{msg}");
    for w in want {
        assert!(msg.contains(w), "{msg:?} lacks {w:?}");
    }
    assert_eq!(e.adapter_tensors().ok(), before, "a refused load changed the adapters");
}

#[test]
fn refusals_are_one_line_and_change_nothing() {
    let (_, _, qv) = &fixtures()[0];
    let mha = base_dir("mha-untied-theta1e4");
    let gqa = base_dir("gqa-tied-theta5e5");
    // not an adapter engine
    let mut full = engine(&mha, json!({ "name": "adamw" }), 1, 4).unwrap();
    refused(&mut full, &fixture("qv-r4"), &["optimizer lora or qlora", "adamw"]);
    let save = SaveAdapterOptions { dir: scratch("none"), dtype: Dtype::F32, base_model: None, overwrite: false };
    let msg = full.save_adapter(&save).unwrap_err().msg;
    assert!(msg.contains("optimizer lora or qlora") && !save.dir.exists(), "{msg}");
    // an adapter for another model: q_proj/v_proj rank 4 of the MHA model on the GQA one
    let mut g = engine(&gqa, with_name("lora", qv, json!({})), 1, 4).unwrap();
    refused(&mut g, &fixture("qv-r4"), &["adapter for another model", "v_proj"]);
    // settings that differ from the adapter's
    let mut e = engine(&mha, with_name("lora", qv, json!({ "lora_rank": 8 })), 1, 4).unwrap();
    refused(&mut e, &fixture("qv-r4"), &["r = 4 but this engine's lora_rank is 8", "lora_rank 4, lora_alpha 8, lora_targets q_proj,v_proj"]);
    let mut e = engine(&mha, with_name("lora", qv, json!({ "lora_alpha": 16 })), 1, 4).unwrap();
    refused(&mut e, &fixture("qv-r4"), &["lora_alpha = 8 but this engine's lora_alpha is 16"]);
    let mut e = engine(&mha, with_name("lora", qv, json!({ "lora_targets": "q_proj,k_proj" })), 1, 4).unwrap();
    refused(&mut e, &fixture("qv-r4"), &["target_modules = q_proj,v_proj but this engine's lora_targets is q_proj,k_proj"]);
    let mut e = engine(&mha, with_name("lora", qv, json!({ "lora_rslora": true })), 1, 4).unwrap();
    refused(&mut e, &fixture("qv-r4"), &["use_rslora = false"]);
    // missing files and folders
    let mut e = engine(&mha, with_name("lora", qv, json!({ "lora_dropout": 0.0 })), 1, 4).unwrap();
    refused(&mut e, &fixture("missing"), &["missing", "cannot read the adapter folder"]);
    let half = scratch("half");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::copy(fixture("qv-r4").join(peft::CONFIG_FILE), half.join(peft::CONFIG_FILE)).unwrap();
    refused(&mut e, &half, &["no adapter_model.safetensors"]);
    std::fs::remove_file(half.join(peft::CONFIG_FILE)).unwrap();
    refused(&mut e, &half, &["no adapter_config.json"]);
    std::fs::remove_dir_all(&half).unwrap();
    // the dropout is a training setting: 0 here, 0.05 in the adapter, loads
    e.load_adapter(&fixture("qv-r4")).unwrap();
    // after training steps: a new engine's job
    let toks: Vec<i32> = (0..5).map(|i| i % 7).collect();
    e.train_step(&toks, 1, 1e-3).unwrap();
    refused(&mut e, &fixture("qv-r4"), &["already run 1 optimizer steps"]);
}
