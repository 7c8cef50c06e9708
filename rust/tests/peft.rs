//! PEFT LoRA adapter folders (rust/src/hf/peft.rs) against adapters `peft` 0.21.2 saved on the
//! tiny Hugging Face fixtures (tests/fixtures/peft/, made by tools/peft_fixtures.py): the
//! config and every tensor read as peft wrote them, the merged model gives the logits peft
//! computed, write → read is the identity and gives peft's names and fields, and every
//! refusal is one line naming what is wrong.
//!
//! `QG_PEFT_OUT=DIR cargo test --release --test peft round_trip` leaves the round-tripped
//! adapters in DIR/<name> for `tools/peft_check.py` (peft loads what we write).

use qgalore::backend::cpu::Cpu;
use qgalore::config::{EngineConfig, ModelConfig};
use qgalore::hf::peft::{self, Adapter, WriteOptions, MODULES, PREFIX};
use qgalore::hf::Dtype;
use qgalore::model::llama::block_linears;
use qgalore::train::Engine;
use safetensors::tensor::TensorView;
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

/// (adapter fixture, its base model fixture)
const FIXTURES: [(&str, &str); 2] = [("qv-r4", "mha-untied-theta1e4"), ("all-r8-rslora", "gqa-tied-theta5e5")];

fn base_dir(base: &str) -> PathBuf {
    root().join("tests/fixtures/hf").join(base)
}

fn config_map(base: &str) -> Map<String, Value> {
    serde_json::from_slice(&std::fs::read(base_dir(base).join("config.json")).unwrap()).unwrap()
}

fn model(base: &str) -> ModelConfig {
    ModelConfig::from_map(&config_map(base)).unwrap()
}

/// A fresh folder under the system temp dir.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qg-peft-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every tensor of a safetensors file as (dtype, shape, f32 values or raw bytes as f32 0).
fn tensors(path: &Path) -> HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            let v = match t.dtype() {
                safetensors::Dtype::F32 => t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                safetensors::Dtype::BF16 => t.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                safetensors::Dtype::I32 => t.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
                _ => Vec::new(),
            };
            (n, (t.dtype(), t.shape().to_vec(), v))
        })
        .collect()
}

/// Writes tensors (f32, or the given raw dtype bytes) as a safetensors file.
fn write_tensors(path: &Path, ts: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = ts.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn module_names_follow_the_model_layout() {
    let lin = block_linears(&model("mha-untied-theta1e4"));
    for k in 0..7 {
        assert_eq!(MODULES[k], format!("{}_proj", lin[k].0));
    }
    assert_eq!(peft::module_path(1, 0), "model.layers.1.self_attn.q_proj");
    assert_eq!(peft::module_path(0, 6), "model.layers.0.mlp.down_proj");
}

#[test]
fn reads_the_qv_r4_adapter_peft_saved() {
    let cfg = model("mha-untied-theta1e4");
    let a = peft::read(&fixture("qv-r4"), &cfg).unwrap();
    let c = &a.config;
    assert_eq!((c.r, c.lora_alpha, c.lora_dropout, c.use_rslora), (4, 8.0, 0.05, false));
    assert_eq!(c.target_modules, ["q_proj", "v_proj"]);
    assert_eq!(c.base_model_name_or_path.as_deref(), Some("tests/fixtures/hf/mha-untied-theta1e4"));
    assert_eq!(c.scale(), 2.0);
    // layer by layer, in block order
    let paths: Vec<&str> = a.tensors.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        paths,
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    );
    for (_, (sa, _), (sb, _)) in &a.tensors {
        assert_eq!((sa.as_slice(), sb.as_slice()), ([4, 32].as_slice(), [32, 4].as_slice()));
    }
    same_values_as_the_file(&a, &fixture("qv-r4"));
}

#[test]
fn reads_the_all_linear_rslora_adapter_peft_saved() {
    let cfg = model("gqa-tied-theta5e5");
    let a = peft::read(&fixture("all-r8-rslora"), &cfg).unwrap();
    let c = &a.config;
    assert_eq!((c.r, c.lora_alpha, c.lora_dropout, c.use_rslora), (8, 16.0, 0.0, true));
    // peft wrote full module paths in set order; they name all seven linears
    assert_eq!(c.target_modules, MODULES);
    assert!((c.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-15);
    assert_eq!(a.tensors.len(), 2 * 7);
    let kv = cfg.kv_dim();
    assert_eq!(kv, 16);
    let want: [(usize, usize); 7] = [(32, 32), (kv, 32), (kv, 32), (32, 32), (96, 32), (96, 32), (32, 96)];
    for (i, (path, (sa, _), (sb, _))) in a.tensors.iter().enumerate() {
        let (out, inp) = want[i % 7];
        assert_eq!(path, &peft::module_path(i / 7, i % 7));
        assert_eq!((sa.as_slice(), sb.as_slice()), ([8, inp].as_slice(), [out, 8].as_slice()), "{path}");
    }
    same_values_as_the_file(&a, &fixture("all-r8-rslora"));
}

/// Every value equals the file's f32 bits, and lora_B is the fixture's non-zero values.
fn same_values_as_the_file(a: &Adapter, dir: &Path) {
    let file = tensors(&dir.join(peft::WEIGHTS_FILE));
    assert_eq!(file.len(), 2 * a.tensors.len());
    for (path, (_, va), (_, vb)) in &a.tensors {
        for (suffix, v) in [("lora_A", va), ("lora_B", vb)] {
            let (dt, _, want) = &file[&format!("{PREFIX}{path}.{suffix}.weight")];
            assert_eq!(*dt, safetensors::Dtype::F32);
            assert!(v.iter().zip(want).all(|(x, y)| x.to_bits() == y.to_bits()), "{path}.{suffix}");
        }
        assert!(vb.iter().filter(|x| **x != 0.0).count() == vb.len(), "{path}: lora_B is all non-zero in the fixture");
    }
    // spot values: the first element of the first A, and the last of the last B
    let (p0, (_, a0), _) = &a.tensors[0];
    let (pl, _, (_, bl)) = a.tensors.last().unwrap();
    assert_eq!(a0[0], file[&format!("{PREFIX}{p0}.lora_A.weight")].2[0]);
    assert_eq!(*bl.last().unwrap(), *file[&format!("{PREFIX}{pl}.lora_B.weight")].2.last().unwrap());
}

/// Logits of the base model with every adapted weight replaced by W + s·B·A (f32 sums of f64
/// products), through the engine's own HF import and forward.
fn merged_logits(base: &str, a: &Adapter, ids: &[i32], rows: usize, seq: usize, tag: &str) -> Vec<f32> {
    let dir = scratch(tag);
    std::fs::copy(base_dir(base).join("config.json"), dir.join("config.json")).unwrap();
    let mut ts = tensors(&base_dir(base).join("model.safetensors"));
    let s = a.config.scale();
    let r = a.config.r;
    for (path, (sa, va), (sb, vb)) in &a.tensors {
        let (out, inp) = (sb[0], sa[1]);
        let w = &mut ts.get_mut(&format!("{path}.weight")).unwrap().2;
        for i in 0..out {
            for j in 0..inp {
                let d: f64 = (0..r).map(|k| vb[i * r + k] as f64 * va[k * inp + j] as f64).sum();
                w[i * inp + j] = (w[i * inp + j] as f64 + s * d) as f32;
            }
        }
    }
    let list: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        ts.into_iter().map(|(n, (_, shape, v))| (n, safetensors::Dtype::F32, shape, f32_bytes(&v))).collect();
    write_tensors(&dir.join("model.safetensors"), &list);
    let cfg = json!({ "model": config_map(base), "batch_size": rows, "seq_len": seq, "optimizer": { "name": "adamw" },
                      "seed": 1, "device": "cpu", "threads": 2 });
    let mut e = Engine::new(Cpu::new(2).unwrap(), EngineConfig::from_json(&cfg.to_string()).unwrap()).unwrap();
    e.import_hf(&dir).unwrap();
    let mut out = vec![0.0f32; rows * seq * e.cfg.model.vocab_size];
    e.logits(ids, rows, seq, &mut out).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn the_merged_adapter_gives_the_logits_peft_computed() {
    for (name, base) in FIXTURES {
        let a = peft::read(&fixture(name), &model(base)).unwrap();
        let l = tensors(&fixture(name).join("logits.safetensors"));
        let (_, ids_shape, ids) = &l["ids"];
        let (rows, seq) = (ids_shape[0], ids_shape[1]);
        let ids: Vec<i32> = ids.iter().map(|x| *x as i32).collect();
        let got = merged_logits(base, &a, &ids, rows, seq, name);
        let (adapted, merged, base_l) = (&l["adapted"].2, &l["merged"].2, &l["base"].2);
        let (da, dm, db) = (max_diff(&got, adapted), max_diff(&got, merged), max_diff(adapted, base_l));
        eprintln!("{name}: |ours − peft adapted| {da:.2e}, |ours − peft merged| {dm:.2e}, |peft adapted − base| {db:.3}");
        // the tolerance of the Hugging Face fixtures' logits (tests/hf_test.ts), far below what
        // the adapter changes
        assert!(da < 1e-4 && dm < 1e-4, "{name}: max |Δlogit| adapted {da}, merged {dm}");
        assert!(db > 1.0, "{name}: the adapter must change the logits ({db})");
        // the engine on the base alone gives peft's base logits (the comparison above is of the adapter)
        let none = Adapter { config: a.config.clone(), tensors: Vec::new() };
        assert!(max_diff(&merged_logits(base, &none, &ids, rows, seq, &format!("{name}-base")), base_l) < 1e-4);
    }
}

#[test]
fn round_trip_is_identical_and_peft_shaped() {
    let keep = std::env::var_os("QG_PEFT_OUT").map(PathBuf::from);
    let dir = scratch("rt");
    for (name, base) in FIXTURES {
        let cfg = model(base);
        let a = peft::read(&fixture(name), &cfg).unwrap();
        let out = keep.as_ref().map_or_else(|| dir.join(name), |k| k.join(name));
        let _ = std::fs::remove_dir_all(&out);
        peft::write(&out, &a).unwrap();
        let back = peft::read(&out, &cfg).unwrap();
        assert_eq!(back, a, "{name}: write → read");
        // the same tensor names, shapes and bits as the file peft saved
        let (mine, theirs) = (tensors(&out.join(peft::WEIGHTS_FILE)), tensors(&fixture(name).join(peft::WEIGHTS_FILE)));
        let mut names: Vec<&String> = mine.keys().collect();
        names.sort();
        let mut want: Vec<&String> = theirs.keys().collect();
        want.sort();
        assert_eq!(names, want);
        for n in names {
            assert_eq!(mine[n].1, theirs[n].1);
            assert!(mine[n].2.iter().zip(&theirs[n].2).all(|(x, y)| x.to_bits() == y.to_bits()), "{n}");
        }
        // metadata as peft writes it
        let bytes = std::fs::read(out.join(peft::WEIGHTS_FILE)).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
        // every field we write has peft's value for this adapter (peft writes more: its newer
        // fields at their defaults)
        let ours: Map<String, Value> = serde_json::from_slice(&std::fs::read(out.join(peft::CONFIG_FILE)).unwrap()).unwrap();
        let peft_cfg: Map<String, Value> = serde_json::from_slice(&std::fs::read(fixture(name).join(peft::CONFIG_FILE)).unwrap()).unwrap();
        for (k, v) in &ours {
            if k == "target_modules" {
                // ours names the modules, peft's may list their paths (all-linear); same set
                let set = |v: &Value| {
                    let mut s: Vec<String> = v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().rsplit('.').next().unwrap().to_string()).collect();
                    s.sort();
                    s.dedup();
                    s
                };
                assert_eq!(set(v), set(&peft_cfg[k]), "{name}: target_modules");
            } else {
                assert_eq!(Some(v), peft_cfg.get(k), "{name}: {k}");
            }
        }
        assert_eq!(ours.len(), 24);
        // bf16: the values come back rounded to nearest even
        let b16 = dir.join(format!("{name}-bf16"));
        peft::write_with(&b16, &a, &WriteOptions { dtype: Dtype::Bf16, overwrite: false }).unwrap();
        let back = peft::read(&b16, &cfg).unwrap();
        assert_eq!(tensors(&b16.join(peft::WEIGHTS_FILE)).values().next().unwrap().0, safetensors::Dtype::BF16);
        for ((_, (_, va), (_, vb)), (_, (_, wa), (_, wb))) in a.tensors.iter().zip(&back.tensors) {
            for (x, y) in va.iter().chain(vb).zip(wa.iter().chain(wb)) {
                assert_eq!(half::bf16::from_f32(*x).to_f32().to_bits(), y.to_bits());
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn write_never_replaces_an_adapter_unless_asked_and_keeps_other_files() {
    let cfg = model("mha-untied-theta1e4");
    let a = peft::read(&fixture("qv-r4"), &cfg).unwrap();
    let dir = scratch("ow");
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    peft::write(&dir, &a).unwrap();
    let before = std::fs::read(dir.join(peft::WEIGHTS_FILE)).unwrap();
    let mut changed = a.clone();
    changed.tensors[0].2 .1[0] += 1.0;
    let e = peft::write(&dir, &changed).unwrap_err().msg;
    assert!(e.contains("already holds an adapter") && !e.contains('\n'), "{e}");
    assert_eq!(std::fs::read(dir.join(peft::WEIGHTS_FILE)).unwrap(), before, "refused write changed nothing");
    peft::write_with(&dir, &changed, &WriteOptions { dtype: Dtype::F32, overwrite: true }).unwrap();
    assert_eq!(peft::read(&dir, &cfg).unwrap(), changed);
    assert_eq!(std::fs::read_to_string(dir.join("notes.txt")).unwrap(), "mine");
    // no temporary file is left behind
    let mut names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    assert_eq!(names, [peft::CONFIG_FILE, peft::WEIGHTS_FILE, "notes.txt"]);
    // a file where the folder should be
    let e = peft::write(&dir.join("notes.txt"), &a).unwrap_err().msg;
    assert!(e.contains("not a folder"), "{e}");
    // an adapter that is not one: B with the wrong rank, a module twice, a missing layer
    let mut bad = a.clone();
    bad.tensors[1].2 .0 = vec![32, 3];
    assert!(peft::write(&scratch("bad1"), &bad).unwrap_err().msg.contains("[out, r]"));
    let mut bad = a.clone();
    bad.tensors[1] = bad.tensors[0].clone();
    assert!(peft::write(&scratch("bad2"), &bad).unwrap_err().msg.contains("appears twice"));
    let mut bad = a.clone();
    bad.tensors.remove(1);
    assert!(peft::write(&scratch("bad3"), &bad).unwrap_err().msg.contains("lacks model.layers.0.self_attn.v_proj"));
    let mut bad = a.clone();
    bad.tensors.clear();
    assert!(peft::write(&scratch("bad4"), &bad).unwrap_err().msg.contains("adapter has no tensors"));
    let mut bad = a.clone();
    bad.config.target_modules.push("lm_head".into());
    assert!(peft::write(&scratch("bad5"), &bad).unwrap_err().msg.contains("target module lm_head: must be one of q_proj"));
    for t in ["bad1", "bad2", "bad3", "bad4", "bad5", "ow"] {
        let _ = std::fs::remove_dir_all(scratch(t));
    }
}

/// A copy of a fixture adapter with its config edited by `edit` and its tensors by `tensors`.
fn variant(tag: &str, name: &str, edit: impl FnOnce(&mut Map<String, Value>), retensor: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)) -> PathBuf {
    let dir = scratch(tag);
    let mut c: Map<String, Value> = serde_json::from_slice(&std::fs::read(fixture(name).join(peft::CONFIG_FILE)).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(dir.join(peft::CONFIG_FILE), serde_json::to_string_pretty(&c).unwrap()).unwrap();
    let mut ts: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors(&fixture(name).join(peft::WEIGHTS_FILE))
        .into_iter()
        .map(|(n, (_, s, v))| (n, safetensors::Dtype::F32, s, f32_bytes(&v)))
        .collect();
    ts.sort_by(|a, b| a.0.cmp(&b.0));
    retensor(&mut ts);
    write_tensors(&dir.join(peft::WEIGHTS_FILE), &ts);
    dir
}

/// Reads a variant of qv-r4 against the MHA fixture model and returns the one-line error.
fn refusal(tag: &str, edit: impl FnOnce(&mut Map<String, Value>), retensor: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)) -> String {
    let dir = variant(tag, "qv-r4", edit, retensor);
    let e = peft::read(&dir, &model("mha-untied-theta1e4")).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(e.code, qgalore::error::Code::Invalid);
    assert!(!e.msg.contains('\n') && e.msg.len() < 600, "not one line: {}", e.msg);
    e.msg
}

fn set(key: &str, v: Value) -> impl FnOnce(&mut Map<String, Value>) {
    let key = key.to_string();
    move |c| {
        c.insert(key, v);
    }
}

fn same(_: &mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>) {}

#[test]
fn every_config_refusal_is_one_line_naming_the_field() {
    // (field, value, words the message must hold)
    let cases: Vec<(&str, Value, &[&str])> = vec![
        ("peft_type", json!("LOHA"), &["peft_type = \"LOHA\"", "LoRA adapters only"]),
        ("peft_type", json!("PREFIX_TUNING"), &["peft_type"]),
        ("task_type", json!("SEQ_CLS"), &["task_type", "CAUSAL_LM"]),
        ("bias", json!("all"), &["bias = \"all\"", "none"]),
        ("bias", json!("lora_only"), &["bias"]),
        ("use_dora", json!(true), &["use_dora = true", "DoRA"]),
        ("modules_to_save", json!(["lm_head"]), &["modules_to_save", "lm_head"]),
        ("layers_to_transform", json!([0]), &["layers_to_transform = [0]", "every layer"]),
        ("layers_pattern", json!("layers"), &["layers_pattern"]),
        ("rank_pattern", json!({ "q_proj": 8 }), &["rank_pattern", "rank r"]),
        ("alpha_pattern", json!({ "v_proj": 32 }), &["alpha_pattern"]),
        ("fan_in_fan_out", json!(true), &["fan_in_fan_out = true"]),
        ("exclude_modules", json!(["model.layers.1.self_attn.q_proj"]), &["exclude_modules"]),
        ("lora_bias", json!(true), &["lora_bias"]),
        ("use_qalora", json!(true), &["use_qalora"]),
        ("trainable_token_indices", json!([3, 4]), &["trainable_token_indices"]),
        ("init_lora_weights", json!("pissa_niter_4"), &["init_lora_weights", "pissa", "path_initial_model_for_weight_conversion"]),
        ("init_lora_weights", json!("olora"), &["olora"]),
        ("target_modules", json!(["q_proj", "lm_head"]), &["target module lm_head", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"]),
        ("target_modules", json!(["embed_tokens"]), &["target module embed_tokens"]),
        ("target_modules", json!([]), &["target_modules = []"]),
        ("r", json!(0), &["r = 0"]),
        ("r", json!(4.5), &["r = 4.5"]),
        ("lora_alpha", json!("8"), &["lora_alpha = \"8\""]),
        ("lora_dropout", json!(1.0), &["lora_dropout = 1.0", "[0, 1)"]),
        ("use_rslora", json!("yes"), &["use_rslora"]),
        ("base_model_name_or_path", json!(3), &["base_model_name_or_path"]),
    ];
    for (i, (key, v, words)) in cases.into_iter().enumerate() {
        let msg = refusal(&format!("cfg{i}"), set(key, v.clone()), same);
        assert!(msg.contains(peft::CONFIG_FILE), "{key}: {msg}");
        for w in words {
            assert!(msg.contains(w), "{key} = {v}: {msg:?} lacks {w:?}");
        }
    }
    // missing fields
    for (key, word) in [("peft_type", "peft_type is missing"), ("r", "r is missing"), ("target_modules", "target_modules is missing")] {
        let msg = refusal(&format!("miss-{key}"), |c| drop(c.remove(key)), same);
        assert!(msg.contains(word), "{msg}");
    }
    // unset values of the refused features are fine (null, false, {}, [])
    let dir = variant("unset", "qv-r4", |c| {
        for (k, v) in [("modules_to_save", json!([])), ("rank_pattern", json!({})), ("layers_to_transform", Value::Null), ("use_dora", json!(false)), ("task_type", Value::Null)] {
            c.insert(k.into(), v);
        }
    }, same);
    assert!(peft::read(&dir, &model("mha-untied-theta1e4")).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
    // not JSON, not an object
    let dir = variant("notjson", "qv-r4", |_| {}, same);
    std::fs::write(dir.join(peft::CONFIG_FILE), "{ nope").unwrap();
    let e = peft::read(&dir, &model("mha-untied-theta1e4")).unwrap_err().msg;
    assert!(e.contains("not valid JSON") && !e.contains('\n'), "{e}");
    std::fs::write(dir.join(peft::CONFIG_FILE), "[1]").unwrap();
    assert!(peft::read(&dir, &model("mha-untied-theta1e4")).unwrap_err().msg.contains("must be a JSON object"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_files_are_one_line() {
    let cfg = model("mha-untied-theta1e4");
    let nowhere = std::env::temp_dir().join(format!("qg-peft-nowhere-{}", std::process::id()));
    let e = peft::read(&nowhere, &cfg).unwrap_err().msg;
    assert!(e.contains("cannot read the adapter folder") && !e.contains('\n'), "{e}");
    let e = peft::read(&fixture("qv-r4").join(peft::CONFIG_FILE), &cfg).unwrap_err().msg;
    assert!(e.contains("not a folder"), "{e}");
    let dir = variant("nocfg", "qv-r4", |_| {}, same);
    std::fs::remove_file(dir.join(peft::CONFIG_FILE)).unwrap();
    let e = peft::read(&dir, &cfg).unwrap_err().msg;
    assert!(e.contains("no adapter_config.json"), "{e}");
    let dir = variant("nost", "qv-r4", |_| {}, same);
    std::fs::remove_file(dir.join(peft::WEIGHTS_FILE)).unwrap();
    let e = peft::read(&dir, &cfg).unwrap_err().msg;
    assert!(e.contains("no adapter_model.safetensors"), "{e}");
    std::fs::write(dir.join("adapter_model.bin"), b"pickle").unwrap();
    let e = peft::read(&dir, &cfg).unwrap_err().msg;
    assert!(e.contains("adapter_model.bin") && e.contains("safe_serialization=True"), "{e}");
    // a truncated weights file is the safetensors reader's one-line message
    std::fs::write(dir.join(peft::WEIGHTS_FILE), [1u8, 2, 3]).unwrap();
    let e = peft::read(&dir, &cfg).unwrap_err().msg;
    assert!(e.contains("adapter_model.safetensors") && e.contains("truncated") && !e.contains('\n'), "{e}");
    for d in [&dir, &scratch("nocfg")] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn every_tensor_refusal_is_one_line() {
    let q0a = format!("{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight");
    let q0b = format!("{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight");
    let find = |ts: &Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>, n: &str| ts.iter().position(|t| t.0 == n).unwrap();

    // a module qgalore does not adapt (a pattern target lets the config through)
    let msg = refusal("lmhead", set("target_modules", json!(".*proj|lm_head")), |ts| {
        ts.push((format!("{PREFIX}lm_head.lora_A.weight"), safetensors::Dtype::F32, vec![4, 32], f32_bytes(&[0.0; 128])));
    });
    assert!(msg.contains("adapts lm_head, a module qgalore does not adapt"), "{msg}");
    // a name that is no LoRA weight
    let msg = refusal("odd", |_| {}, |ts| ts.push(("base_model.model.model.norm.weight".into(), safetensors::Dtype::F32, vec![32], f32_bytes(&[1.0; 32]))));
    assert!(msg.contains("unexpected tensor base_model.model.model.norm.weight"), "{msg}");
    // a module the config does not target
    let msg = refusal("untargeted", |_| {}, |ts| ts.push((format!("{PREFIX}model.layers.0.self_attn.k_proj.lora_A.weight"), safetensors::Dtype::F32, vec![4, 32], f32_bytes(&[0.0; 128]))));
    assert!(msg.contains("adapts k_proj, which adapter_config.json target_modules (q_proj, v_proj) does not name"), "{msg}");
    // a missing matrix
    let msg = refusal("missing", |_| {}, |ts| drop(ts.remove(find(ts, &q0b))));
    assert!(msg.contains(&format!("tensor {q0b} is missing")), "{msg}");
    // rank that disagrees with r
    let msg = refusal("rank", set("r", json!(8)), same);
    assert!(msg.contains("rank 4, but adapter_config.json has r = 8"), "{msg}");
    // not 2-D
    let msg = refusal("3d", |_| {}, |ts| {
        let i = find(ts, &q0a);
        ts[i].2 = vec![4, 32, 1];
    });
    assert!(msg.contains("a LoRA matrix is 2-D"), "{msg}");
    // dtype the engine does not read
    let msg = refusal("i32", |_| {}, |ts| {
        let i = find(ts, &q0a);
        ts[i].1 = safetensors::Dtype::I32;
    });
    assert!(msg.contains("dtype I32") && msg.contains("F32, BF16 and F16"), "{msg}");
    // non-finite values
    let msg = refusal("nan", |_| {}, |ts| {
        let i = find(ts, &q0b);
        ts[i].3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert!(msg.contains(&format!("tensor {q0b} element 2 is NaN")), "{msg}");
    // f16 and bf16 files load (exactly converted)
    for (tag, dt) in [("f16", safetensors::Dtype::F16), ("bf16", safetensors::Dtype::BF16)] {
        let dir = variant(tag, "qv-r4", |_| {}, |ts| {
            for t in ts.iter_mut() {
                let v: Vec<f32> = t.3.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                t.1 = dt;
                t.3 = v
                    .iter()
                    .flat_map(|x| if dt == safetensors::Dtype::F16 { half::f16::from_f32(*x).to_le_bytes() } else { half::bf16::from_f32(*x).to_le_bytes() })
                    .collect();
            }
        });
        let a = peft::read(&dir, &model("mha-untied-theta1e4")).unwrap();
        let orig = peft::read(&fixture("qv-r4"), &model("mha-untied-theta1e4")).unwrap();
        let x = orig.tensors[0].1 .1[5];
        let want = if dt == safetensors::Dtype::F16 { half::f16::from_f32(x).to_f32() } else { half::bf16::from_f32(x).to_f32() };
        assert_eq!(a.tensors[0].1 .1[5], want, "{tag}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn an_adapter_for_another_model_is_refused_in_one_line() {
    // the GQA adapter on the MHA model: same hidden size, but k/v are 16 rows there, 32 here
    let e = peft::read(&fixture("all-r8-rslora"), &model("mha-untied-theta1e4")).unwrap_err().msg;
    assert_eq!(
        e,
        format!(
            "{}: adapter for another model: {PREFIX}model.layers.0.self_attn.k_proj.lora_B.weight has shape [16, 8] but this model's model.layers.0.self_attn.k_proj (32×32, out × in) needs [32, 8]",
            fixture("all-r8-rslora").join(peft::WEIGHTS_FILE).display()
        )
    );
    // fewer layers
    let mut m = config_map("mha-untied-theta1e4");
    m.insert("num_hidden_layers".into(), json!(1));
    let e = peft::read(&fixture("qv-r4"), &ModelConfig::from_map(&m).unwrap()).unwrap_err().msg;
    assert!(e.contains("adapter for another model") && e.contains("is for layer 1 but this model has 1 layers"), "{e}");
    // another width
    let mut m = config_map("mha-untied-theta1e4");
    m.insert("hidden_size".into(), json!(64));
    m.insert("head_dim".into(), json!(16));
    let e = peft::read(&fixture("qv-r4"), &ModelConfig::from_map(&m).unwrap()).unwrap_err().msg;
    assert!(e.contains("adapter for another model") && e.contains("has shape [4, 32]") && e.contains("needs [4, 64]"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn a_pattern_string_target_is_taken_from_the_tensors() {
    // peft accepts a regular expression for target_modules; the file then says which modules it hit
    let dir = variant("regex", "qv-r4", set("target_modules", json!(".*\\.(q|v)_proj")), same);
    let a = peft::read(&dir, &model("mha-untied-theta1e4")).unwrap();
    assert_eq!(a.config.target_modules, ["q_proj", "v_proj"]);
    assert_eq!(a.tensors.len(), 4);
    std::fs::remove_dir_all(&dir).unwrap();
    // and "all-linear" must then find every linear in the file
    let dir = variant("alllin", "qv-r4", set("target_modules", json!("all-linear")), same);
    let e = peft::read(&dir, &model("mha-untied-theta1e4")).unwrap_err().msg;
    assert!(e.contains("k_proj.lora_A.weight is missing"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
