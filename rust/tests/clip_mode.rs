//! The clip mode of the fused step (docs/algorithm-spec.md §1.5) chosen from the byte plan:
//! `clip_mode = auto` takes the one-backward clip stash when the plan with it fits the memory
//! budget and two backwards otherwise; `stash` and `two-backward` force a mode. Every mode
//! trains bit for bit the same; the two-backward plan allocates no stash.

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::config::{ClipMode, EngineConfig, ModelConfig};
use qgalore::plan::{self, Plan};
use qgalore::train::Engine;

const STEPS: u64 = 5;

/// A qgalore config with the engine's own qgalore defaults (INT8 weights, INT4 projectors,
/// lazy refresh) at `rank`, clip 1, fused.
fn qgalore(m: ModelConfig, b: usize, t: usize, rank: usize) -> EngineConfig {
    let mut c = engine_cfg(m, b, t, 5);
    c.optimizer = serde_json::from_str(&format!(r#"{{"name":"qgalore","clip":1,"rank":{rank}}}"#)).unwrap();
    assert!(c.optimizer.fused && c.optimizer.clip_mode == ClipMode::Auto);
    c
}

fn llama(hidden: usize, inter: usize, heads: usize, layers: usize) -> ModelConfig {
    let mut m = tiny_model(32000, hidden, inter, heads, heads, layers);
    m.max_position_embeddings = 2048;
    m
}

const GB16: u64 = 16_000_000_000;

/// llama-7b qgalore at rank 1024 (batch 1, seq 256, bf16 as on a GPU): the stash (6.5 GB)
/// takes the plan from about 13 GB beyond a 16 GB budget, so auto runs two backwards;
/// llama-60m (batch 8, seq 256) keeps its 25 MB stash.
#[test]
fn auto_picks_two_backward_for_7b_and_the_stash_for_60m_under_16_gb() {
    let c7 = qgalore(llama(4096, 11008, 32, 32), 1, 256, 1024);
    let p = Plan::with_budget(&c7, true, "llama-7b", Some(GB16));
    assert_eq!(p.clip.mode, "two-backward", "{}", p.clip.why);
    assert_eq!(p.clip_stash, 0, "no stash allocated");
    assert!((6.4e9..6.6e9).contains(&(p.clip.stash_bytes as f64)), "{}", p.clip.stash_bytes);
    assert!(p.stepped.total <= GB16, "two-backward plan {} fits", p.stepped.total);
    assert!(p.stepped.total + p.clip.stash_bytes > GB16);
    assert_eq!(p.clip.budget, Some(GB16));
    assert!(p.clip.why.contains("beyond the 16.00 GB budget"), "{}", p.clip.why);
    // the same plan on a budget that holds the stash keeps it, and counts it with the gradients
    let big = Plan::with_budget(&c7, true, "llama-7b", Some(40_000_000_000));
    assert_eq!(big.clip.mode, "stash", "{}", big.clip.why);
    assert_eq!(big.stepped.total, p.stepped.total + p.clip.stash_bytes);
    assert_eq!(big.stepped.grads, p.stepped.grads + p.clip.stash_bytes);
    // no budget known (a plan or an engine built directly): the stash, as before
    assert_eq!(Plan::new(&c7, true, "llama-7b").clip.mode, "stash");

    let c60 = qgalore(llama(512, 1376, 8, 8), 8, 256, 128);
    let p = Plan::with_budget(&c60, false, "llama-60m", Some(GB16));
    assert_eq!(p.clip.mode, "stash", "{}", p.clip.why);
    assert_eq!(p.clip.stash_bytes, 4 * p.clip_stash);
    assert_eq!(p.clip.stash_bytes, 4 * (8 * (4 * 512 * 128 + 3 * 1376 * 128 + 2 * 512) + 512));
    assert!(p.clip.why.contains("within the 16.00 GB budget"), "{}", p.clip.why);

    // forced modes ignore the budget
    let mut forced = c7.clone();
    forced.optimizer.clip_mode = ClipMode::Stash;
    assert_eq!(Plan::with_budget(&forced, true, "m", Some(GB16)).clip.mode, "stash");
    let mut forced = c60.clone();
    forced.optimizer.clip_mode = ClipMode::TwoBackward;
    let p = Plan::with_budget(&forced, false, "m", None);
    assert_eq!((p.clip.mode, p.clip_stash), ("two-backward", 0));
    assert!(p.clip.why.starts_with("clip_mode = two-backward"), "{}", p.clip.why);
}

/// Modes without a stash to choose: clipping off, the global step, an unprojected optimizer.
#[test]
fn modes_without_a_choice() {
    let m = tiny_model(64, 64, 128, 4, 2, 2);
    let mut c = qgalore(m.clone(), 2, 16, 8);
    (c.optimizer.weight_group_size, c.optimizer.proj_group_size) = (64, 64);
    let mut off = c.clone();
    off.optimizer.clip = 0.0;
    assert_eq!(Plan::with_budget(&off, false, "m", Some(1)).clip.mode, "off");
    let mut unfused = c.clone();
    unfused.optimizer.fused = false;
    assert_eq!(Plan::with_budget(&unfused, false, "m", Some(1)).clip.mode, "unfused");
    let mut adamw = engine_cfg(m, 2, 16, 5);
    adamw.optimizer = optim("adamw", 1.0);
    adamw.optimizer.fused = true;
    let p = Plan::with_budget(&adamw, false, "m", None);
    assert_eq!((p.clip.mode, p.clip.stash_bytes), ("two-backward", 0), "{}", p.clip.why);
    // the budget helper leaves headroom for what the plan does not count
    assert_eq!(plan::clip_budget(10_000), 9_000);
}

/// Per-step (loss bits, norm bits, clipped), final eval bits, backwards, memory after the steps.
type Run = (Vec<(u64, u64, bool)>, u64, u64, [u64; 7], &'static str);

fn run(c: &EngineConfig, budget: Option<u64>) -> Run {
    let v = c.model.vocab_size;
    let mut e = Engine::build_with_budget(Cpu::new(2).unwrap(), c.clone(), None, budget).unwrap();
    let steps = (0..STEPS)
        .map(|s| {
            let st = e.train_step(&tokens(2, 16, v, 70 + s), 1, 3e-3).unwrap();
            (st.loss.to_bits(), st.grad_norm.to_bits(), st.clipped)
        })
        .collect();
    let eval = e.eval(&tokens(2, 16, v, 999), 1).unwrap().to_bits();
    (steps, eval, e.backwards, e.memory(), e.info().clip_mode)
}

/// stash, two-backward and auto (on a budget too small for the stash, and on a large one)
/// give the same losses, clipping decisions and final weights bit for bit; the norm sums the
/// same per-tensor squares in another order (last bits only). Two-backward runs twice the
/// backwards and tracks exactly the stash's bytes less, as its plan says.
#[test]
fn every_mode_trains_bit_identically() {
    for name in ["galore", "qgalore"] {
        for clip in [0.05f32, 1e4] {
            let mut c = engine_cfg(tiny_model(512, 64, 128, 4, 2, 2), 2, 16, 11);
            c.optimizer = optim(name, clip);
            (c.optimizer.rank, c.optimizer.update_gap, c.optimizer.fused) = (8, 2, true);
            (c.optimizer.weight_group_size, c.optimizer.proj_group_size) = (64, 64);
            if name == "qgalore" {
                (c.optimizer.weight_bits, c.optimizer.proj_bits, c.optimizer.lazy) = (8, 4, true);
            }
            let mode = |m: ClipMode| {
                let mut c = c.clone();
                c.optimizer.clip_mode = m;
                c
            };
            let with = Plan::new(&mode(ClipMode::Stash), false, "m");
            let tight = with.stepped.total - 1; // one byte short of the plan with the stash
            let runs = [
                ("stash", run(&mode(ClipMode::Stash), None)),
                ("two-backward", run(&mode(ClipMode::TwoBackward), None)),
                ("auto, tight budget", run(&mode(ClipMode::Auto), Some(tight))),
                ("auto, ample budget", run(&mode(ClipMode::Auto), Some(with.stepped.total))),
            ];
            let label = format!("{name} clip {clip}");
            let s = &runs[0].1;
            assert!(s.0.iter().all(|x| x.2 == (clip < 1.0)), "{label}: clipping {:?}", s.0);
            for (what, r) in &runs[1..] {
                for (k, (a, b)) in s.0.iter().zip(&r.0).enumerate() {
                    assert_eq!((a.0, a.2), (b.0, b.2), "{label}: step {k} loss/clipped, stash vs {what}");
                    let (x, y) = (f64::from_bits(a.1), f64::from_bits(b.1));
                    assert!((x - y).abs() <= 1e-12 * y, "{label}: step {k} norm {x} vs {what} {y}");
                }
                assert_eq!(s.1, r.1, "{label}: final weights, stash vs {what}");
            }
            let stash_bytes = with.clip.stash_bytes;
            assert!(stash_bytes > 0);
            let want = [("stash", STEPS, "stash"), ("two-backward", 2 * STEPS, "two-backward"), ("auto, tight budget", 2 * STEPS, "two-backward"), ("auto, ample budget", STEPS, "stash")];
            for ((what, r), (w, backwards, reported)) in runs.iter().zip(want) {
                assert_eq!(*what, w);
                assert_eq!(r.2, backwards, "{label}: backwards of {what}");
                assert_eq!(r.4, reported, "{label}: info().clip_mode of {what}");
                let grads = if reported == "stash" { with.stepped.grads } else { with.stepped.grads - stash_bytes };
                assert_eq!(r.3[2], grads, "{label}: tracked gradient bytes of {what}");
                assert_eq!(r.3[6], with.stepped.total - (with.stepped.grads - grads), "{label}: tracked total of {what}");
            }
        }
    }
}

#[test]
fn bad_clip_mode_is_refused_in_one_line() {
    let json = |mode: &str| {
        format!(
            r#"{{"model":{{"vocab_size":64,"hidden_size":64,"intermediate_size":128,"num_attention_heads":4,"num_hidden_layers":2,"max_position_embeddings":64}},"batch_size":2,"seq_len":16,"optimizer":{{"name":"galore","clip":1,"clip_mode":{mode}}}}}"#
        )
    };
    let e = EngineConfig::from_json(&json("\"sometimes\"")).unwrap_err();
    assert_eq!(e.msg, "clip_mode = sometimes: must be one of auto, stash, two-backward");
    let e = EngineConfig::from_json(&json("1")).unwrap_err();
    assert_eq!(e.msg, "clip_mode = 1: must be one of auto, stash, two-backward");
    for (m, want) in [("auto", ClipMode::Auto), ("stash", ClipMode::Stash), ("two-backward", ClipMode::TwoBackward)] {
        assert_eq!(EngineConfig::from_json(&json(&format!("\"{m}\""))).unwrap().optimizer.clip_mode, want);
    }
    // the plan's budget travels with the config `qg_plan` reads
    assert_eq!(plan::budget_field(&json("\"auto\"")).unwrap(), None);
    let with_budget = json("\"auto\"").replacen('{', r#"{"memory_budget":16000000000,"#, 1);
    assert_eq!(plan::budget_field(&with_budget).unwrap(), Some(GB16));
    let bad = json("\"auto\"").replacen('{', r#"{"memory_budget":-3,"#, 1);
    assert_eq!(plan::budget_field(&bad).unwrap_err().msg, "memory_budget = -3: must be a whole number of bytes ≥ 1");
}

/// A run refused for memory suggests dropping a forced clip stash (`auto` drops it itself).
#[test]
fn memory_refusal_suggests_two_backward_for_a_forced_stash() {
    let mut c = qgalore(llama(512, 1376, 8, 8), 8, 256, 128);
    let need = Plan::new(&c, false, "m").stepped.total;
    let auto = qgalore::train::memory_refusal(&c, need, 1_000_000, "the GPU has");
    assert!(!auto.contains("clip_mode"), "{auto}");
    c.optimizer.clip_mode = ClipMode::Stash;
    let forced = qgalore::train::memory_refusal(&c, need, 1_000_000, "the GPU has");
    assert!(forced.ends_with("try checkpointing true, clip_mode two-backward, a smaller batch_size or seq_len"), "{forced}");
}

/// `open` plans against the host's available memory: a tiny model keeps the stash, and
/// `info` says so with the budget it compared.
#[test]
fn open_reports_the_chosen_mode() {
    let mut c = engine_cfg(tiny_model(64, 64, 128, 4, 2, 2), 2, 16, 11);
    c.optimizer = optim("galore", 1.0);
    (c.optimizer.rank, c.optimizer.fused) = (8, true);
    let stash_bytes = 4 * Plan::new(&c, false, "m").clip_stash;
    assert!(stash_bytes > 0);
    let info = qgalore::train::open(c.clone(), None).unwrap().info();
    assert_eq!(info.clip_mode, "stash", "{}", info.clip_why);
    if qgalore::train::host_available_bytes().is_some() {
        assert!(info.clip_why.contains("budget"), "{}", info.clip_why);
    }
    c.optimizer.clip_mode = ClipMode::TwoBackward;
    let two = qgalore::train::open(c, None).unwrap().info();
    assert_eq!(two.clip_mode, "two-backward");
    assert_eq!(two.memory.grads + stash_bytes, info.memory.grads, "two-backward allocates no stash");
}
