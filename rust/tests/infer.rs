//! Inference: the engine's logits give its eval loss; the cached host decoder gives the
//! engine's logits at every position (MHA and GQA, float and INT8 weights); generation
//! and sampling rules; request checks.

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::config::EngineConfig;
use qgalore::infer::{Cache, HostModel, Request, Stop};
use qgalore::train::Engine;

fn engine(c: EngineConfig) -> Engine<Cpu> {
    Engine::new(Cpu::new(2).unwrap(), c).unwrap()
}

fn config(heads: usize, kv: usize, optimizer: &str, b: usize, t: usize) -> EngineConfig {
    let mut m = tiny_model(64, 32, 48, heads, kv, 2);
    m.initializer_range = 0.1;
    let mut c = engine_cfg(m, b, t, 5);
    c.optimizer = optim(optimizer, 0.0);
    if optimizer == "qgalore" {
        (c.optimizer.weight_bits, c.optimizer.proj_bits, c.optimizer.rank) = (8, 4, 8);
        (c.optimizer.weight_group_size, c.optimizer.proj_group_size) = (64, 64);
    }
    c
}

/// An engine of `optimizer` (qgalore keeps INT8 weights), trained a few steps so the
/// weights are not the initialisation.
fn trained(heads: usize, kv: usize, optimizer: &str, b: usize, t: usize) -> Engine<Cpu> {
    let mut e = engine(config(heads, kv, optimizer, b, t));
    for s in 0..3 {
        e.train_step(&tokens(b, t, 64, 70 + s), 1, 1e-2).unwrap();
    }
    e
}

/// An engine with `e`'s weights for batch 1 × seq `t` (to score other lengths).
fn sibling(e: &Engine<Cpu>, heads: usize, kv: usize, optimizer: &str, t: usize) -> Engine<Cpu> {
    let mut s = engine(config(heads, kv, optimizer, 1, t));
    s.load_state_weights(&e.save_state().unwrap()).unwrap();
    s
}

fn inputs(windows: &[i32], t: usize) -> Vec<i32> {
    windows.chunks(t + 1).flat_map(|w| w[..t].to_vec()).collect()
}

#[test]
fn logits_reproduce_the_eval_loss() {
    for opt in ["adamw", "qgalore"] {
        let (b, t, v) = (2, 16, 64);
        let mut e = trained(4, 2, opt, b, t);
        let w = tokens(b, t, v, 11);
        let mut out = vec![0.0f32; b * t * v];
        e.logits(&inputs(&w, t), b, t, &mut out).unwrap();
        let mut ce = 0.0f64;
        for (r, row) in out.chunks(v).enumerate() {
            let target = w[(r / t) * (t + 1) + r % t + 1] as usize;
            let mx = row.iter().fold(f64::NEG_INFINITY, |a, &z| a.max(z as f64));
            let lse = mx + row.iter().map(|&z| (z as f64 - mx).exp()).sum::<f64>().ln();
            ce += lse - row[target] as f64;
        }
        ce /= (b * t) as f64;
        let eval = e.eval(&w, 1).unwrap();
        assert!((ce - eval).abs() < 1e-6, "{opt}: cross-entropy of the logits {ce}, eval loss {eval}");
    }
}

#[test]
fn logits_refuse_other_shapes_and_ids() {
    let mut e = trained(4, 4, "adamw", 2, 8);
    let mut out = vec![0.0f32; 2 * 8 * 64];
    let msg = e.logits(&[0; 16], 1, 16, &mut out).unwrap_err().msg;
    assert_eq!(msg, "logits: batch 1 × seq 16 differs from this engine's batch_size 2 × seq_len 8");
    let msg = e.logits(&[64; 16], 2, 8, &mut out).unwrap_err().msg;
    assert_eq!(msg, "logits: token id 64 is outside the vocabulary [0, 64)");
    let msg = e.logits(&[0; 16], 2, 8, &mut out[..10]).unwrap_err().msg;
    assert!(msg.contains("the output holds 10 values"), "{msg}");
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn cached_logits_equal_the_full_forward_at_every_position() {
    let (t, v) = (24, 64);
    for (heads, kv) in [(4, 4), (4, 2), (4, 1)] {
        for opt in ["adamw", "qgalore"] {
            let mut e = trained(heads, kv, opt, 1, t);
            let int8 = e.model.params.iter().any(|p| matches!(p.data, qgalore::model::Weight::Q(_)));
            assert_eq!(int8, opt == "qgalore");
            let ids = inputs(&tokens(1, t, v, 21), t);
            let mut full = vec![0.0f32; t * v];
            e.logits(&ids, 1, t, &mut full).unwrap();
            let scale = full.iter().fold(0.0f32, |a, &z| a.max(z.abs()));
            assert!(scale > 0.05, "logits too small to test: {scale}");
            let hm = HostModel::read(&e.be, &e.model, &mut e.acts.wq).unwrap();
            // prefill: all positions in one pass
            let mut cache = Cache::new(&hm.cfg);
            let pre = hm.forward(&mut cache, &ids, true).unwrap();
            let d = max_diff(&pre, &full);
            assert!(d < 1e-5, "{opt} heads {heads}/{kv}: prefill differs by {d}");
            // one position at a time after a 5-token prefill: the cache grows 16 → 32
            // positions on the way (and its RoPE table with it)
            let mut cache = Cache::new(&hm.cfg);
            let mut got = hm.forward(&mut cache, &ids[..5], true).unwrap();
            assert_eq!(cache.capacity(), 16);
            for p in 5..t {
                got.extend(hm.forward(&mut cache, &ids[p..p + 1], false).unwrap());
            }
            assert_eq!((cache.len(), cache.capacity()), (t, 32));
            let d = max_diff(&got, &full);
            assert!(d < 1e-5, "{opt} heads {heads}/{kv}: cached decoding differs by {d}");
            eprintln!("{opt} heads {heads}/{kv}: logits up to {scale}, cached decoding within {d}");
        }
    }
}

fn request(json: &str) -> Request {
    Request::from_json(json).unwrap()
}

#[test]
fn greedy_with_the_cache_equals_greedy_without() {
    for (heads, kv) in [(4, 4), (4, 2)] {
        for opt in ["adamw", "qgalore"] {
            let mut e = trained(heads, kv, opt, 1, 16);
            let with = e.generate(&request(r#"{"prompt":[1,2,3,4,5],"max_new_tokens":40}"#)).unwrap();
            let without = e.generate(&request(r#"{"prompt":[1,2,3,4,5],"max_new_tokens":40,"cache":false}"#)).unwrap();
            assert_eq!(with.ids.len(), 40);
            assert_eq!(with.stop, Stop::Length);
            assert_eq!(with.ids, without.ids, "{opt} heads {heads}/{kv}");
            // the first token is the argmax of the engine's own logits at the prompt's end
            let mut e1 = sibling(&e, heads, kv, opt, 5);
            let mut l = vec![0.0f32; 5 * 64];
            e1.logits(&[1, 2, 3, 4, 5], 1, 5, &mut l).unwrap();
            assert_eq!(with.ids[0], qgalore::infer::argmax(&l[4 * 64..]));
        }
    }
}

#[test]
fn sampling_is_reproducible_and_its_limits_give_greedy() {
    let mut e = trained(4, 2, "adamw", 1, 16);
    let gen = |e: &mut Engine<Cpu>, extra: &str| {
        e.generate(&request(&format!(r#"{{"prompt":[7,8,9],"max_new_tokens":30{extra}}}"#))).unwrap().ids
    };
    let greedy = gen(&mut e, "");
    let a = gen(&mut e, r#","temperature":1.0,"seed":1"#);
    assert_eq!(a, gen(&mut e, r#","temperature":1.0,"seed":1"#));
    assert_ne!(a, gen(&mut e, r#","temperature":1.0,"seed":2"#));
    assert_ne!(a, greedy);
    assert_eq!(gen(&mut e, r#","temperature":1.0,"seed":3,"top_k":1"#), greedy);
    assert_eq!(gen(&mut e, r#","temperature":1.0,"seed":3,"top_p":1e-9"#), greedy);
    // without the cache the same seed draws the same tokens
    assert_eq!(a, gen(&mut e, r#","temperature":1.0,"seed":1,"cache":false"#));
    // top-k 5 draws only among each step's five most likely tokens
    let k5 = gen(&mut e, r#","temperature":5.0,"seed":4,"top_k":5"#);
    let mut seq = vec![7, 8, 9];
    let mut l = vec![0.0f32; 16 * 64];
    for &id in &k5 {
        let mut e1 = sibling(&e, 4, 2, "adamw", seq.len());
        e1.logits(&seq, 1, seq.len(), &mut l[..seq.len() * 64]).unwrap();
        let row = &l[(seq.len() - 1) * 64..seq.len() * 64];
        let above = row.iter().filter(|&&z| z > row[id as usize]).count();
        assert!(above < 5, "token {id} has {above} more likely tokens");
        seq.push(id);
        if seq.len() == 16 {
            break;
        }
    }
}

#[test]
fn generation_stops_at_eos_and_at_the_last_position() {
    let mut m = tiny_model(64, 32, 48, 4, 2, 2);
    m.max_position_embeddings = 40;
    let mut e = engine(engine_cfg(m, 1, 16, 9));
    let free = e.generate(&request(r#"{"prompt":[3,1,4,1,5],"max_new_tokens":20}"#)).unwrap().ids;
    let eos = free[6];
    let first = free.iter().position(|&x| x == eos).unwrap();
    let g = e.generate(&request(&format!(r#"{{"prompt":[3,1,4,1,5],"max_new_tokens":20,"eos":[63,{eos}]}}"#))).unwrap();
    assert_eq!(g.stop, Stop::Eos);
    assert_eq!(g.ids, free[..=first].to_vec());
    let prompt: Vec<String> = (0..30).map(|i| (i % 64).to_string()).collect();
    let g = e.generate(&request(&format!(r#"{{"prompt":[{}],"max_new_tokens":20}}"#, prompt.join(",")))).unwrap();
    assert_eq!((g.ids.len(), g.stop), (10, Stop::MaxPositions));
    let g = e.generate(&request(r#"{"prompt":[1],"max_new_tokens":0}"#)).unwrap();
    assert_eq!((g.ids.len(), g.stop), (0, Stop::Length));
}

#[test]
fn bad_requests_are_one_line_errors_naming_the_field() {
    let parse = |s: &str| Request::from_json(s).unwrap_err().msg;
    assert_eq!(parse(r#"{"prompt":[1],"max_new_tokens":4,"temperature":-1}"#), "generate: temperature = -1: must be a finite number ≥ 0 (0 = greedy)");
    assert_eq!(parse(r#"{"prompt":[1],"max_new_tokens":4,"top_p":0}"#), "generate: top_p = 0: must be in (0, 1] (1 = off)");
    assert_eq!(parse(r#"{"prompt":[1],"max_new_tokens":4,"top_p":1.5}"#), "generate: top_p = 1.5: must be in (0, 1] (1 = off)");
    assert_eq!(parse(r#"{"prompt":[1],"max_new_tokens":4,"top_k":-2}"#), "generate: top_k = -2: must be an integer ≥ 0 (0 = off)");
    assert_eq!(parse(r#"{"prompt":[1,-5],"max_new_tokens":4}"#), "generate: prompt[1] = -5: must be a token id (an integer ≥ 0)");
    assert_eq!(parse(r#"{"prompt":[1]}"#), "generate: max_new_tokens is missing (an integer ≥ 0)");
    assert_eq!(parse(r#"{"max_new_tokens":3}"#), "generate: prompt is missing (an array of token ids)");
    assert!(parse(r#"{"prompt":[1],"max_new_tokens":4,"topk":2}"#).starts_with("generate: unknown field topk"));
    assert!(parse("{").starts_with("generate: request is not JSON"));
    let mut e = trained(4, 4, "adamw", 1, 8);
    let run = |e: &mut Engine<Cpu>, s: &str| e.generate(&request(s)).unwrap_err().msg;
    assert_eq!(run(&mut e, r#"{"prompt":[],"max_new_tokens":4}"#), "generate: prompt is empty (give at least one token id)");
    assert_eq!(run(&mut e, r#"{"prompt":[1,64],"max_new_tokens":4}"#), "generate: prompt[1] = 64: outside the vocabulary [0, 64)");
    assert_eq!(run(&mut e, r#"{"prompt":[1],"max_new_tokens":4,"eos":[99]}"#), "generate: eos[0] = 99: outside the vocabulary [0, 64)");
    let long: Vec<String> = (0..513).map(|_| "1".to_string()).collect();
    assert_eq!(
        run(&mut e, &format!(r#"{{"prompt":[{}],"max_new_tokens":4}}"#, long.join(","))),
        "generate: prompt has 513 tokens, more than max_position_embeddings 512"
    );
}

/// A model of `max_position_embeddings` positions, tiny otherwise.
fn long_engine(max_positions: usize) -> Engine<Cpu> {
    let mut m = tiny_model(64, 32, 48, 4, 2, 2);
    m.max_position_embeddings = max_positions;
    engine(engine_cfg(m, 1, 16, 9))
}

#[test]
fn huge_max_new_tokens_stop_at_the_last_position_and_the_engine_stays_usable() {
    let mut e = long_engine(40);
    let before = e.generate(&request(r#"{"prompt":[3,1,4],"max_new_tokens":12}"#)).unwrap().ids;
    // u64::MAX once overflowed prompt + max_new_tokens (to 2 positions, then a panic)
    for max_new in [u64::MAX, 1 << 40] {
        for cache in [true, false] {
            let g = e.generate(&request(&format!(r#"{{"prompt":[3,1,4],"max_new_tokens":{max_new},"cache":{cache}}}"#))).unwrap();
            assert_eq!((g.ids.len(), g.stop), (37, Stop::MaxPositions), "max_new_tokens {max_new}, cache {cache}");
            assert_eq!(g.ids[..12], before[..], "max_new_tokens {max_new}, cache {cache}");
        }
    }
    assert_eq!(e.generate(&request(r#"{"prompt":[3,1,4],"max_new_tokens":12}"#)).unwrap().ids, before);
}

#[test]
fn memory_follows_the_tokens_produced_not_max_new_tokens() {
    // 2^40 positions of K/V cache would be 2 layers × 2 × 2^40 × 16 floats = 280 TB: it must
    // not be reserved up front (it used to abort the process)
    let mut e = long_engine(1 << 40);
    let free = e.generate(&request(r#"{"prompt":[3,1,4,1,5],"max_new_tokens":20}"#)).unwrap().ids;
    let eos = free[9];
    let first = free.iter().position(|&x| x == eos).unwrap();
    for max_new in [u64::MAX, 1 << 40] {
        let g = e.generate(&request(&format!(r#"{{"prompt":[3,1,4,1,5],"max_new_tokens":{max_new},"eos":[{eos}]}}"#))).unwrap();
        assert_eq!((g.ids.clone(), g.stop), (free[..=first].to_vec(), Stop::Eos));
    }
    // the cache holds what was decoded, doubling: 16 positions, then 32, then 64
    let hm = HostModel::read(&e.be, &e.model, &mut e.acts.wq).unwrap();
    let mut cache = Cache::new(&hm.cfg);
    assert_eq!(cache.capacity(), 0);
    hm.forward(&mut cache, &[1, 2, 3], false).unwrap();
    assert_eq!(cache.capacity(), 16);
    for p in 3..40 {
        hm.forward(&mut cache, &[(p % 64) as i32], false).unwrap();
        assert_eq!(cache.capacity(), if p < 16 { 16 } else if p < 32 { 32 } else { 64 }, "position {p}");
    }
    // a prompt longer than the doubled capacity reserves exactly its length
    let mut cache = Cache::new(&hm.cfg);
    hm.forward(&mut cache, &[7; 100], false).unwrap();
    assert_eq!(cache.capacity(), 100);
}

#[test]
fn the_decoder_refuses_bad_input_instead_of_panicking() {
    let mut e = long_engine(20);
    let hm = HostModel::read(&e.be, &e.model, &mut e.acts.wq).unwrap();
    let mut cache = Cache::new(&hm.cfg);
    assert_eq!(hm.forward(&mut cache, &[], false).unwrap_err().msg, "generate: no token ids to run");
    assert_eq!(hm.forward(&mut cache, &[1, 64], false).unwrap_err().msg, "generate: token id 64 is outside the vocabulary [0, 64)");
    assert_eq!(hm.forward(&mut cache, &[-1], false).unwrap_err().msg, "generate: token id -1 is outside the vocabulary [0, 64)");
    assert!(cache.is_empty());
    hm.forward(&mut cache, &[1; 18], false).unwrap();
    // the last position fills max_position_embeddings (and the capacity stops there)
    let msg = hm.forward(&mut cache, &[1, 2, 3], false).unwrap_err().msg;
    assert_eq!(msg, "generate: positions 18 + 3 exceed max_position_embeddings 20");
    assert_eq!(cache.len(), 18);
    hm.forward(&mut cache, &[1, 2], false).unwrap();
    assert_eq!((cache.len(), cache.capacity()), (20, 20));
    let msg = hm.forward(&mut cache, &[1], false).unwrap_err().msg;
    assert_eq!(msg, "generate: positions 20 + 1 exceed max_position_embeddings 20");
}
