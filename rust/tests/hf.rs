//! Hugging Face weights in and out: export → import round trips are exact, bf16 export
//! rounds to nearest even, sharded and single files load the same, F16/BF16 inputs
//! convert exactly, and every bad input is one line naming the file, changing nothing.

use qgalore::backend::cpu::Cpu;
use qgalore::backend::{Memory, Quantization};
use qgalore::config::EngineConfig;
use qgalore::hf::Dtype;
use qgalore::model::Weight;
use qgalore::train::Engine;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn cfg(opt: &str, seed: u64) -> EngineConfig {
    let mut o = json!({ "name": opt });
    if opt == "qgalore" {
        o = json!({ "name": opt, "rank": 8, "update_gap": 2, "weight_group_size": 64, "proj_group_size": 64 });
    }
    let c = json!({
        "model": { "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 64 },
        "batch_size": 2, "seq_len": 16, "optimizer": o, "seed": seed, "device": "cpu", "threads": 2
    });
    EngineConfig::from_json(&c.to_string()).unwrap()
}

fn engine(opt: &str, seed: u64) -> Engine<Cpu> {
    Engine::new(Cpu::new(2).unwrap(), cfg(opt, seed)).unwrap()
}

fn tokens(rows: usize, t: usize, vocab: usize, seed: u64) -> Vec<i32> {
    (0..rows * (t + 1)).map(|i| (qgalore::rng::bits32(seed, i as u64) % vocab as u32) as i32).collect()
}

/// An engine whose weights moved away from their initialisation.
fn trained(opt: &str) -> Engine<Cpu> {
    let mut e = engine(opt, 7);
    for s in 0..3 {
        e.train_step(&tokens(2, 16, 64, s), 1, 1e-2).unwrap();
    }
    e
}

/// A fresh folder under the system temp dir.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qg-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every parameter as f32 bits (quantized ones dequantized).
fn weights(e: &Engine<Cpu>) -> Vec<(String, Vec<u32>)> {
    let mut scratch = e.be.alloc(e.model.params.iter().map(|p| p.numel()).max().unwrap(), qgalore::backend::Category::Weights).unwrap();
    (0..e.model.params.len())
        .map(|i| {
            let p = &e.model.params[i];
            let n = p.numel();
            let b = e.model.wv(&e.be, i, &mut scratch);
            (p.name.clone(), e.be.to_host(b, n).unwrap().iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn eval_bits(e: &mut Engine<Cpu>) -> u64 {
    e.eval(&tokens(2, 16, 64, 999), 1).unwrap().to_bits()
}

fn export(e: &Engine<Cpu>, dir: &Path, dtype: Dtype) {
    let mut extra = Map::new();
    extra.insert("bos_token_id".into(), json!(1));
    extra.insert("eos_token_id".into(), json!(2));
    e.export_hf(dir, dtype, &extra).unwrap();
}

#[test]
fn f32_round_trip_is_bit_identical() {
    let base = scratch("rt");
    let mut a = trained("adamw");
    export(&a, &base.join("out"), Dtype::F32);
    let mut b = engine("adamw", 99);
    assert_ne!(weights(&a), weights(&b));
    b.import_hf(&base.join("out")).unwrap();
    assert_eq!(weights(&a), weights(&b));
    assert_eq!(eval_bits(&mut a), eval_bits(&mut b));
    // the folder is what transformers reads
    let cfg: Value = serde_json::from_slice(&std::fs::read(base.join("out/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], json!(["LlamaForCausalLM"]));
    assert_eq!((cfg["model_type"].as_str(), cfg["hidden_act"].as_str(), cfg["torch_dtype"].as_str()), (Some("llama"), Some("silu"), Some("float32")));
    assert_eq!((cfg["hidden_size"].as_u64(), cfg["num_key_value_heads"].as_u64(), cfg["head_dim"].as_u64()), (Some(32), Some(2), Some(8)));
    assert_eq!((cfg["tie_word_embeddings"].as_bool(), cfg["attention_bias"].as_bool(), cfg["bos_token_id"].as_u64()), (Some(false), Some(false), Some(1)));
    let gen: Value = serde_json::from_slice(&std::fs::read(base.join("out/generation_config.json")).unwrap()).unwrap();
    assert_eq!((gen["bos_token_id"].as_u64(), gen["eos_token_id"].as_u64()), (Some(1), Some(2)));
    // norms are 1-D, matrices [out, in], metadata says PyTorch
    let bytes = std::fs::read(base.join("out/model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.info("model.norm.weight").unwrap().shape, vec![32]);
    assert_eq!(meta.info("model.layers.1.self_attn.k_proj.weight").unwrap().shape, vec![16, 32]);
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    // nothing else was left next to the folder
    let names: Vec<_> = std::fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, ["out"]);
    std::fs::remove_dir_all(&base).unwrap();
}

/// INT8 weights (Q-GaLore) leave dequantized and come back requantized: the file holds
/// exactly the engine's dequantized weights, and import quantizes them with the model
/// builder's rounding and range. Codes are not always the original ones: a group whose
/// codes no longer span the full range (after stochastic-rounding updates) gets a new,
/// tighter scale, so each value moves by at most half a step, the quantization bound.
#[test]
fn qgalore_round_trip_requantizes_what_it_exported() {
    let base = scratch("q");
    let mut a = trained("qgalore");
    export(&a, &base.join("out"), Dtype::F32);
    let mut b = engine("qgalore", 99);
    b.import_hf(&base.join("out")).unwrap();
    let file = tensors_of(&base.join("out/model.safetensors"));
    let range = qgalore::plan::linear_quant(&b.cfg.optimizer).unwrap().range;
    let (wa, wb) = (weights(&a), weights(&b));
    let (mut quantized, mut moved) = (0, 0);
    for (i, (pa, pb)) in a.model.params.iter().zip(&b.model.params).enumerate() {
        let stored = &file.iter().find(|t| t.0 == pa.name).unwrap().3;
        let values: Vec<f32> = stored.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), wa[i].1, "{}: the export is the engine's weights", pa.name);
        match (&pa.data, &pb.data) {
            (Weight::Q(qa), Weight::Q(qb)) => {
                let (ha, hb) = (a.be.q_to_host(qa).unwrap(), b.be.q_to_host(qb).unwrap());
                let mut want = qgalore::quant::QTensor::new(ha.numel, 8, ha.group).unwrap();
                want.quantize(&values, range);
                assert_eq!(hb.codes, want.codes, "{}", pa.name);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!((bits(&hb.scale), bits(&hb.zero)), (bits(&want.scale), bits(&want.zero)), "{}", pa.name);
                for (j, (x, y)) in wa[i].1.iter().zip(&wb[i].1).enumerate() {
                    let d = (f32::from_bits(*x) - f32::from_bits(*y)).abs();
                    assert!(d <= 0.5 * ha.scale[j / ha.group] * 1.001, "{}[{j}] moved by {d}", pa.name);
                }
                moved += (ha.codes != hb.codes) as usize;
                quantized += 1;
            }
            (Weight::F(_), Weight::F(_)) => assert_eq!(wa[i], wb[i], "{}", pa.name),
            _ => panic!("{}: storage differs", pa.name),
        }
    }
    assert_eq!(quantized, 14);
    assert!(moved > 0, "the trained model should have groups that requantize differently");
    let (la, lb) = (f64::from_bits(eval_bits(&mut a)), f64::from_bits(eval_bits(&mut b)));
    assert!((la - lb).abs() < 1e-3, "{la} vs {lb}");
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn bf16_export_rounds_to_nearest_even() {
    let base = scratch("bf16");
    let a = trained("adamw");
    export(&a, &base.join("out"), Dtype::Bf16);
    let bytes = std::fs::read(base.join("out/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut ties = 0;
    for (name, bits) in weights(&a) {
        let t = st.tensor(&name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::BF16);
        let got: Vec<u16> = t.data().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        let want: Vec<u16> = bits.iter().map(|&b| half::bf16::from_f32(f32::from_bits(b)).to_bits()).collect();
        assert_eq!(got, want, "{name}");
        // truncation would differ wherever the dropped half is above one half
        ties += bits.iter().filter(|&&b| (b & 0xffff) > 0x8000).count();
    }
    assert!(ties > 100, "the test must exercise rounding up ({ties} values)");
    let cfg: Value = serde_json::from_slice(&std::fs::read(base.join("out/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    // and loads back as exactly those values
    let mut b = engine("adamw", 3);
    b.import_hf(&base.join("out")).unwrap();
    for ((n, wa), (_, wb)) in weights(&a).iter().zip(weights(&b)) {
        let want: Vec<u32> = wa.iter().map(|&x| half::bf16::from_f32(f32::from_bits(x)).to_f32().to_bits()).collect();
        assert_eq!(want, wb, "{n}");
    }
    std::fs::remove_dir_all(&base).unwrap();
}

/// The tensors of an exported f32 file as owned (name, dtype, shape, bytes).
fn tensors_of(file: &Path) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write_st(path: &Path, ts: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = ts.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn sharded_index_loads_like_the_single_file() {
    let base = scratch("shard");
    let a = trained("adamw");
    export(&a, &base.join("one"), Dtype::F32);
    let ts = tensors_of(&base.join("one/model.safetensors"));
    let dir = base.join("two");
    std::fs::create_dir(&dir).unwrap();
    let (first, second) = ts.split_at(ts.len() / 2);
    write_st(&dir.join("model-00001-of-00002.safetensors"), first);
    write_st(&dir.join("model-00002-of-00002.safetensors"), second);
    let mut map = Map::new();
    for (n, ..) in first {
        map.insert(n.clone(), json!("model-00001-of-00002.safetensors"));
    }
    for (n, ..) in second {
        map.insert(n.clone(), json!("model-00002-of-00002.safetensors"));
    }
    let index = json!({ "metadata": { "total_size": 0 }, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let mut one = engine("adamw", 1);
    one.import_hf(&base.join("one")).unwrap();
    let mut two = engine("adamw", 2);
    two.import_hf(&dir).unwrap();
    assert_eq!(weights(&one), weights(&two));
    assert_eq!(weights(&one), weights(&a));
    assert_eq!(eval_bits(&mut one), eval_bits(&mut two));
    // the index file itself is accepted too
    let mut three = engine("adamw", 3);
    three.import_hf(&dir.join("model.safetensors.index.json")).unwrap();
    assert_eq!(weights(&one), weights(&three));
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn f16_and_bf16_inputs_convert_exactly() {
    let base = scratch("half");
    let a = trained("adamw");
    for dtype in [safetensors::Dtype::F16, safetensors::Dtype::BF16] {
        // each weight in the file's dtype (rounded once here), plus an ignored RoPE buffer
        let mut ts: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut want = Vec::new();
        for (p, (name, bits)) in a.model.params.iter().zip(weights(&a)) {
            let vals = bits.iter().map(|&b| f32::from_bits(b));
            let (bytes, back): (Vec<u8>, Vec<u32>) = match dtype {
                safetensors::Dtype::F16 => {
                    let h: Vec<half::f16> = vals.map(half::f16::from_f32).collect();
                    (h.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(), h.iter().map(|x| x.to_f32().to_bits()).collect())
                }
                _ => {
                    let h: Vec<half::bf16> = vals.map(half::bf16::from_f32).collect();
                    (h.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(), h.iter().map(|x| x.to_f32().to_bits()).collect())
                }
            };
            let shape = if p.rows == 1 { vec![p.cols] } else { vec![p.rows, p.cols] };
            ts.push((name.clone(), dtype, shape, bytes));
            want.push((name, back));
        }
        ts.push(("model.layers.0.self_attn.rotary_emb.inv_freq".into(), safetensors::Dtype::F32, vec![4], vec![0; 16]));
        let file = base.join(format!("{dtype:?}.safetensors"));
        write_st(&file, &ts);
        let mut b = engine("adamw", 5);
        b.import_hf(&file).unwrap();
        assert_eq!(weights(&b), want, "{dtype:?}");
        // f16 keeps 3 more mantissa bits than bf16 here: the two really differ
        assert_ne!(want, weights(&a));
    }
    std::fs::remove_dir_all(&base).unwrap();
}

/// A file from a raw header and a data section.
fn raw_file(path: &Path, header: &str, data_len: usize) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data_len, 0);
    std::fs::write(path, b).unwrap();
}

/// Imports `path` into a fresh engine: the one-line error, and the engine unchanged.
fn refused(path: &Path) -> String {
    let mut e = engine("adamw", 11);
    let before = e.save_state().unwrap();
    let msg = e.import_hf(path).unwrap_err().msg;
    assert!(!msg.contains('\n'), "{msg}");
    assert!(e.save_state().unwrap() == before, "{msg}: the engine changed");
    msg
}

#[test]
fn bad_files_are_one_line_errors_naming_the_file_and_change_nothing() {
    let base = scratch("bad");
    let a = trained("adamw");
    export(&a, &base.join("good"), Dtype::F32);
    let good = base.join("good/model.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    let ts = tensors_of(&good);
    let p = |n: &str| base.join(n);
    let show = |n: &str| p(n).display().to_string();

    std::fs::write(p("trunc.safetensors"), &bytes[..bytes.len() - 10]).unwrap();
    let m = refused(&p("trunc.safetensors"));
    assert!(m.starts_with(&show("trunc.safetensors")) && m.contains("truncated"), "{m}");

    std::fs::write(p("tiny.safetensors"), [1u8, 2, 3]).unwrap();
    let m = refused(&p("tiny.safetensors"));
    assert!(m.starts_with(&show("tiny.safetensors")) && m.contains("shorter than the 8-byte header length"), "{m}");

    let mut huge = 200_000_000u64.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    std::fs::write(p("huge.safetensors"), &huge).unwrap();
    let m = refused(&p("huge.safetensors"));
    assert_eq!(m, format!("{}: header length 200000000 bytes is over the safetensors limit of 100000000 bytes (100 MB): corrupt or not a safetensors file", show("huge.safetensors")));

    let mut long = 5000u64.to_le_bytes().to_vec();
    long.extend_from_slice(b"{}");
    std::fs::write(p("long.safetensors"), &long).unwrap();
    let m = refused(&p("long.safetensors"));
    assert_eq!(m, format!("{}: header length 5000 bytes runs past the end of the file (10 bytes): truncated or not a safetensors file", show("long.safetensors")));

    raw_file(&p("json.safetensors"), r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]"#, 8);
    let m = refused(&p("json.safetensors"));
    assert!(m.starts_with(&format!("{}: header is not valid safetensors JSON", show("json.safetensors"))), "{m}");

    raw_file(&p("overlap.safetensors"), r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#, 24);
    let m = refused(&p("overlap.safetensors"));
    assert_eq!(m, format!("{}: tensor b has data_offsets that overlap another tensor or leave a gap (each tensor must start where the previous one ends)", show("overlap.safetensors")));

    raw_file(&p("range.safetensors"), r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}"#, 20);
    let m = refused(&p("range.safetensors"));
    assert_eq!(m, format!("{}: tensor b ends at byte 32 of the data section, which holds 20 bytes: truncated file or out-of-range offsets", show("range.safetensors")));

    raw_file(&p("size.safetensors"), r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#, 12);
    let m = refused(&p("size.safetensors"));
    assert_eq!(m, format!("{}: tensor a has data_offsets [0, 12] (12 bytes) but its F32 shape [4] needs 16 bytes", show("size.safetensors")));

    let mut bad = ts.clone();
    bad.push(("model.extra_counter".into(), safetensors::Dtype::I64, vec![1], vec![0; 8]));
    write_st(&p("i64.safetensors"), &bad);
    let m = refused(&p("i64.safetensors"));
    assert_eq!(m, format!("{}: tensor model.extra_counter has dtype I64; qgalore reads F32, BF16 and F16", show("i64.safetensors")));

    let mut bad = ts.clone();
    let up = bad.iter_mut().find(|t| t.0 == "model.layers.0.mlp.up_proj.weight").unwrap();
    up.2 = vec![32, 48];
    write_st(&p("shape.safetensors"), &bad);
    let m = refused(&p("shape.safetensors"));
    assert_eq!(m, format!("{}: tensor model.layers.0.mlp.up_proj.weight has shape [32, 48], the config needs [48, 32]", show("shape.safetensors")));

    let mut bad = ts.clone();
    let norm = bad.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
    norm.2 = vec![2, 16];
    write_st(&p("norm.safetensors"), &bad);
    let m = refused(&p("norm.safetensors"));
    assert_eq!(m, format!("{}: tensor model.norm.weight has shape [2, 16], the config needs [32]", show("norm.safetensors")));

    let bad: Vec<_> = ts.iter().filter(|t| t.0 != "model.layers.1.self_attn.v_proj.weight").cloned().collect();
    write_st(&p("missing.safetensors"), &bad);
    let m = refused(&p("missing.safetensors"));
    assert_eq!(m, format!("{}: tensor model.layers.1.self_attn.v_proj.weight is missing (the config needs [16, 32])", show("missing.safetensors")));

    let mut bad = ts.clone();
    bad.push(("model.layers.2.input_layernorm.weight".into(), safetensors::Dtype::F32, vec![32], vec![0; 128]));
    write_st(&p("unexpected.safetensors"), &bad);
    let m = refused(&p("unexpected.safetensors"));
    assert_eq!(m, format!("{}: unexpected tensor model.layers.2.input_layernorm.weight (not a parameter of this LLaMA config)", show("unexpected.safetensors")));

    let shard = p("shard");
    std::fs::create_dir(&shard).unwrap();
    write_st(&shard.join("model-00001-of-00002.safetensors"), &ts[..3]);
    let mut map = Map::new();
    for (i, t) in ts.iter().enumerate() {
        map.insert(t.0.clone(), json!(if i < 3 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" }));
    }
    std::fs::write(shard.join("model.safetensors.index.json"), json!({ "weight_map": map }).to_string()).unwrap();
    let m = refused(&shard);
    let index = shard.join("model.safetensors.index.json").display().to_string();
    assert_eq!(m, format!("{index}: names shard model-00002-of-00002.safetensors, which does not exist ({})", shard.join("model-00002-of-00002.safetensors").display()));

    std::fs::write(shard.join("model.safetensors.index.json"), "{\"weight_map\": 3}").unwrap();
    let m = refused(&shard);
    assert_eq!(m, format!("{index}: `weight_map` must be an object of tensor name → shard file"));

    let m = refused(&p("nothing"));
    assert!(m.starts_with(&format!("{}: cannot read", show("nothing"))), "{m}");
    let m = refused(&base);
    assert_eq!(m, format!("{}: folder holds neither model.safetensors nor model.safetensors.index.json", base.display()));

    // another model's checkpoint (a wider vocabulary) is refused by shape
    let mut c = cfg("adamw", 1);
    c.model.vocab_size = 96;
    let mut wide = Engine::new(Cpu::new(2).unwrap(), c).unwrap();
    let m = wide.import_hf(&p("good")).unwrap_err().msg;
    assert_eq!(m, format!("{}: tensor model.embed_tokens.weight has shape [64, 32], the config needs [96, 32]", good.display()));
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn import_wants_a_new_engine() {
    let base = scratch("steps");
    let a = trained("adamw");
    export(&a, &base.join("out"), Dtype::F32);
    let mut b = trained("adamw");
    let m = b.import_hf(&base.join("out")).unwrap_err().msg;
    assert!(m.contains("has already run 3 optimizer steps"), "{m}");
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn export_never_touches_a_users_files_and_cleans_up_after_failure() {
    let base = scratch("safe");
    let a = trained("adamw");
    let user = base.join("mine");
    std::fs::create_dir(&user).unwrap();
    std::fs::write(user.join("notes.txt"), "keep me").unwrap();
    let m = a.export_hf(&user, Dtype::F32, &Map::new()).unwrap_err().msg;
    assert_eq!(m, format!("{}: folder is not empty; export writes only into a new or empty folder", user.display()));
    assert_eq!(std::fs::read_to_string(user.join("notes.txt")).unwrap(), "keep me");
    assert_eq!(std::fs::read_dir(&user).unwrap().count(), 1);
    std::fs::write(base.join("file"), "x").unwrap();
    let m = a.export_hf(&base.join("file"), Dtype::F32, &Map::new()).unwrap_err().msg;
    assert!(m.ends_with("exists and is not a folder; export writes only into a new or empty folder"), "{m}");

    // an empty folder is filled
    std::fs::create_dir(base.join("empty")).unwrap();
    a.export_hf(&base.join("empty"), Dtype::F32, &Map::new()).unwrap();
    assert!(base.join("empty/model.safetensors").is_file());

    // a failure after the weights were written (a file to copy is missing) leaves nothing
    let opts = qgalore::hf::ExportOptions {
        dir: base.join("failed"),
        dtype: Dtype::Bf16,
        extra: Map::new(),
        copy: vec![base.join("no-such-tokenizer.json")],
    };
    let m = a.export_hf_with(&opts).unwrap_err().msg;
    assert!(m.starts_with(&format!("{}: cannot copy into the export", base.join("no-such-tokenizer.json").display())), "{m}");
    let mut names: Vec<_> = std::fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["empty", "file", "mine"]);

    // copied files land in the folder
    let tok = base.join("tokenizer.json");
    std::fs::write(&tok, "{\"model\": {}}").unwrap();
    let opts = qgalore::hf::ExportOptions { dir: base.join("with-tok"), copy: vec![tok.clone()], ..opts };
    a.export_hf_with(&opts).unwrap();
    assert_eq!(std::fs::read_to_string(base.join("with-tok/tokenizer.json")).unwrap(), "{\"model\": {}}");
    let opts = qgalore::hf::ExportOptions { dir: base.join("clash"), copy: vec![base.join("empty/config.json")], ..opts };
    let m = a.export_hf_with(&opts).unwrap_err().msg;
    assert!(m.ends_with("the export already has a file named config.json"), "{m}");
    assert!(!base.join("clash").exists());
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn export_options_from_json_name_the_field() {
    let e = |t: &str| qgalore::hf::ExportOptions::from_json(t).unwrap_err().msg;
    assert_eq!(e(r#"{"dir":"x","dtype":"f16"}"#), "export options: dtype = f16: must be one of bf16, f32");
    assert_eq!(e(r#"{"dtype":"f32"}"#), "export options: `dir` must be a folder path");
    assert_eq!(e(r#"{"dir":"x","dtype":"f32","shards":2}"#), "export options: unknown key shards (dir, dtype, extra, copy)");
    let o = qgalore::hf::ExportOptions::from_json(r#"{"dir":"x","dtype":"bf16","extra":{"eos_token_id":2},"copy":["a/tokenizer.json"]}"#).unwrap();
    assert_eq!((o.dtype, o.extra["eos_token_id"].as_u64(), o.copy.len()), (Dtype::Bf16, Some(2), 1));
}

#[test]
fn inspect_lists_validated_tensors() {
    let base = scratch("inspect");
    let a = trained("adamw");
    export(&a, &base.join("out"), Dtype::Bf16);
    let v: Value = serde_json::from_str(&qgalore::hf::inspect_json(base.join("out").to_str().unwrap())).unwrap();
    assert!(v.get("error").is_none(), "{v}");
    assert_eq!(v["files"], json!([base.join("out/model.safetensors").display().to_string()]));
    assert_eq!(v["bytes"].as_u64(), Some(std::fs::metadata(base.join("out/model.safetensors")).unwrap().len()));
    let ts = v["tensors"].as_array().unwrap();
    assert_eq!(ts.len(), a.model.params.len());
    let by: HashMap<&str, &Value> = ts.iter().map(|t| (t["name"].as_str().unwrap(), t)).collect();
    assert_eq!(*by["model.embed_tokens.weight"], json!({ "name": "model.embed_tokens.weight", "dtype": "BF16", "shape": [64, 32] }));
    let v: Value = serde_json::from_str(&qgalore::hf::inspect_json(base.join("none").to_str().unwrap())).unwrap();
    assert!(v["error"].as_str().unwrap().contains("cannot read"), "{v}");
    assert_eq!(v["tensors"], json!([]));
    std::fs::remove_dir_all(&base).unwrap();
}

/// On a GPU: f32 weights travel exactly (import → export gives the same bytes), INT8
/// weights are quantized on the device from the same values, and bf16 tables (8-bit
/// optimizers under bf16 precision) hold the file's values rounded to bf16. Without a GPU
/// the test prints `skipped: no GPU` and passes.
#[cfg(feature = "cuda")]
#[test]
fn gpu_import_and_export_match_the_cpu() {
    use qgalore::backend::cuda::{probe, Cuda};
    if probe::device_count() == 0 {
        println!("skipped: no GPU");
        return;
    }
    let base = scratch("gpu");
    let a = trained("adamw");
    export(&a, &base.join("src"), Dtype::F32);
    let source = tensors_of(&base.join("src/model.safetensors"));
    let values = |ts: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)], name: &str| -> Vec<f32> {
        ts.iter().find(|t| t.0 == name).unwrap().3.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    for (opt, bf16) in [("adamw", false), ("qgalore", false), ("qgalore", true), ("adam8bit", true)] {
        let mut g = Engine::new(Cuda::new(0, bf16).unwrap(), cfg(opt, 5)).unwrap();
        g.import_hf(&base.join("src")).unwrap();
        let out = base.join(format!("gpu-{opt}-{bf16}"));
        g.export_hf(&out, Dtype::F32, &Map::new()).unwrap();
        let mut c = engine(opt, 5);
        c.import_hf(&base.join("src")).unwrap();
        c.export_hf(&base.join(format!("cpu-{opt}-{bf16}")), Dtype::F32, &Map::new()).unwrap();
        let (got, cpu) = (tensors_of(&out.join("model.safetensors")), tensors_of(&base.join(format!("cpu-{opt}-{bf16}/model.safetensors"))));
        for (name, ..) in &source {
            let (s, gv, cv) = (values(&source, name), values(&got, name), values(&cpu, name));
            let half = bf16 && (name.contains("embed_tokens") || name.contains("lm_head"));
            // one quantization step of the widest group (a GPU may round a tie the other way)
            let step = 2.0 * s.iter().fold(0f32, |m, x| m.max(x.abs())) / 255.0 * 1.01;
            for j in 0..s.len() {
                let ok = if half {
                    gv[j] == half::bf16::from_f32(s[j]).to_f32()
                } else if opt == "qgalore" && name.contains("_proj") {
                    (gv[j] - cv[j]).abs() <= step
                } else {
                    gv[j].to_bits() == s[j].to_bits()
                };
                assert!(ok, "{opt} {name}[{j}]: gpu {} cpu {} file {}", gv[j], cv[j], s[j]);
            }
        }
    }
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn the_exported_config_reads_back_as_the_same_model() {
    let c = cfg("adamw", 1).model;
    let m = c.hf_config();
    let back = qgalore::config::ModelConfig::from_map(&m).unwrap();
    assert_eq!(back.to_map(), c.to_map());
    assert_eq!((m["head_dim"].as_u64(), m["tie_word_embeddings"].as_bool(), m["mlp_bias"].as_bool()), (Some(8), Some(false), Some(false)));
    assert_eq!(m["rms_norm_eps"], json!(1e-6));
}
