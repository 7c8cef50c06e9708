//! Exact clipping in the fused step with one backward (docs/algorithm-spec.md §1.5): the
//! projected optimizers keep each matrix's rank-r gradient in a clip stash until the global
//! norm is known, and recompute the tables' gradients. The fused step must equal the global
//! (unfused) step and the old two-backward fused step bit for bit, run one backward, and
//! track the bytes its plan says.

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::backend::Refresh;
use qgalore::config::{EngineConfig, ModelConfig};
use qgalore::plan::{Plan, ProjGeom};
use qgalore::train::Engine;

const STEPS: u64 = 6;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// The global step (gradients of every tensor, then the updates).
    Unfused,
    /// The fused step with the clip stash: one backward.
    Stash,
    /// The fused step measuring the norm in a first backward.
    TwoBackward,
}

/// Per-step (loss bits, grad norm, clipped), the final eval's bits, backwards run and the
/// refresh count.
type Run = (Vec<(u64, f64, bool)>, u64, u64, u64);

fn run(c: &EngineConfig, mode: Mode) -> Run {
    let mut c = c.clone();
    c.optimizer.fused = mode != Mode::Unfused;
    let v = c.model.vocab_size;
    let mut e = Engine::new(Cpu::new(2).unwrap(), c).unwrap();
    e.two_backward_clip = mode == Mode::TwoBackward;
    assert_eq!(e.fused, mode != Mode::Unfused);
    let steps = (0..STEPS)
        .map(|s| {
            let st = e.train_step(&tokens(2, 16, v, 300 + s), 1, 3e-3).unwrap();
            (st.loss.to_bits(), st.grad_norm, st.clipped)
        })
        .collect();
    let eval = e.eval(&tokens(2, 16, v, 999), 1).unwrap().to_bits();
    let svd = e.info().refresh.map_or(0, |r| r.svd_count);
    (steps, eval, e.backwards, svd)
}

fn model(vocab: usize, tied: bool) -> ModelConfig {
    let mut m = tiny_model(vocab, 64, 128, 4, 2, 2);
    m.tie_word_embeddings = tied;
    m
}

fn cfg(m: ModelConfig, name: &str, clip: f32, f: impl Fn(&mut EngineConfig)) -> EngineConfig {
    let mut c = engine_cfg(m, 2, 16, 11);
    c.optimizer = optim(name, clip);
    c.optimizer.rank = 8;
    c.optimizer.update_gap = 2;
    c.optimizer.weight_group_size = 64;
    c.optimizer.proj_group_size = 64;
    if name == "qgalore" {
        // the front end's qgalore defaults: INT8 weights, INT4 projectors, lazy refresh
        (c.optimizer.weight_bits, c.optimizer.proj_bits, c.optimizer.lazy) = (8, 4, true);
    }
    f(&mut c);
    c
}

/// Fused with the stash == unfused == fused with two backwards, bit for bit; one backward
/// per stash step; clipping active (a small clip) and inactive (a large one).
fn check(label: &str, c: &EngineConfig) {
    let (s, u, t) = (run(c, Mode::Stash), run(c, Mode::Unfused), run(c, Mode::TwoBackward));
    for (other, what) in [(&u, "unfused"), (&t, "two-backward fused")] {
        for (k, (a, b)) in s.0.iter().zip(&other.0).enumerate() {
            assert_eq!(a.0, b.0, "{label}: step {k} loss differs from the {what} step");
            assert_eq!(a.2, b.2, "{label}: step {k} clipped differs from the {what} step");
            // the norm adds the same per-tensor sums in another order: last f64 bits only
            assert!((a.1 - b.1).abs() <= 1e-12 * b.1, "{label}: step {k} norm {} vs {what} {}", a.1, b.1);
        }
        assert_eq!(s.1, other.1, "{label}: final weights differ from the {what} step's");
        assert_eq!(s.3, other.3, "{label}: refresh count differs from the {what} step's");
    }
    assert_eq!(s.2, STEPS, "{label}: backwards of the stash step");
    assert_eq!(t.2, 2 * STEPS, "{label}: backwards of the two-backward step");
    assert_eq!(u.2, STEPS, "{label}: backwards of the global step");
    assert!(s.3 >= 2, "{label}: refreshes {}", s.3);
}

#[test]
fn fused_clip_equals_global_step_for_the_projected_optimizers() {
    for name in ["galore", "galore8bit", "qgalore"] {
        for tied in [false, true] {
            // vocab 512: tables larger than any linear (row-chunked for the 8-bit ones)
            for vocab in [64, 512] {
                for clip in [0.05f32, 1e4] {
                    let c = cfg(model(vocab, tied), name, clip, |_| {});
                    let label = format!("{name} tied {tied} vocab {vocab} clip {clip}");
                    let s = run(&c, Mode::Stash);
                    let clipped = s.0.iter().filter(|x| x.2).count();
                    if clip < 1.0 {
                        assert_eq!(clipped, STEPS as usize, "{label}: every step is clipped");
                    } else {
                        assert_eq!(clipped, 0, "{label}: no step is clipped");
                    }
                    check(&label, &c);
                }
            }
        }
    }
}

#[test]
fn fused_clip_is_exact_with_randomized_and_lazy_refreshes_frozen_tables_and_checkpointing() {
    let cases: Vec<(&str, EngineConfig)> = vec![
        ("galore randomized", cfg(model(64, false), "galore", 0.05, |c| c.optimizer.proj_refresh = Refresh::Randomized)),
        ("galore svd", cfg(model(64, false), "galore", 0.05, |c| c.optimizer.proj_refresh = Refresh::Svd)),
        // the gap doubles at every refresh from 1: refreshes at steps 1, 2, 4
        (
            "qgalore lazy growing gap",
            cfg(model(512, false), "qgalore", 0.05, |c| {
                (c.optimizer.update_gap, c.optimizer.cos_threshold, c.optimizer.queue_size, c.optimizer.gamma) = (1, -1.0, 1, 2);
            }),
        ),
        ("qgalore randomized tied", cfg(model(512, true), "qgalore", 0.05, |c| c.optimizer.proj_refresh = Refresh::Randomized)),
        ("galore8bit frozen tables", cfg(model(512, false), "galore8bit", 0.05, |c| c.optimizer.freeze_embeddings = true)),
        ("galore checkpointing", cfg(model(64, false), "galore", 0.05, |c| c.checkpointing = true)),
        ("qgalore weight decay", cfg(model(64, true), "qgalore", 0.05, |c| c.optimizer.weight_decay = 0.1)),
    ];
    for (label, c) in &cases {
        check(label, c);
    }
}

/// The optimizers without a stash (no projection) keep the two-backward fused step.
#[test]
fn unprojected_optimizers_keep_two_backwards() {
    for name in ["adamw", "adam8bit"] {
        let c = cfg(model(512, false), name, 0.05, |_| {});
        let (f, u) = (run(&c, Mode::Stash), run(&c, Mode::Unfused));
        assert_eq!(f.2, 2 * STEPS, "{name}: backwards");
        assert_eq!(Plan::new(&c, false, "m").clip_stash, 0, "{name}: no stash");
        assert_eq!(f.1, u.1, "{name}: final weights");
    }
}

/// The stash is counted with the gradients: plan == tracked bytes before and after updates,
/// and its size is each projected matrix's R plus the norms' whole gradients.
#[test]
fn clip_stash_is_in_the_plan() {
    for name in ["galore", "galore8bit", "qgalore"] {
        for (vocab, tied) in [(64, false), (512, false), (512, true)] {
            let c = cfg(model(vocab, tied), name, 0.05, |c| c.optimizer.fused = true);
            let plan = Plan::new(&c, false, "the model");
            let m = &c.model;
            let (h, i, kv) = (m.hidden_size, m.intermediate_size, m.kv_dim());
            let low = |r: usize, c: usize| ProjGeom::new(r, c, 8).low as u64;
            let per_layer = low(h, h) * 2 + low(kv, h) * 2 + low(i, h) * 2 + low(h, i) + 2 * h as u64;
            let want = per_layer * m.num_hidden_layers as u64 + h as u64;
            assert_eq!(plan.clip_stash, want, "{name} vocab {vocab} tied {tied}: stash elements");
            let mut no_clip = c.clone();
            no_clip.optimizer.clip = 0.0;
            let p0 = Plan::new(&no_clip, false, "the model");
            assert_eq!(p0.clip_stash, 0);
            assert_eq!(plan.initial.grads, p0.initial.grads + 4 * want, "{name}: the stash is counted with the gradients");
            let mut e = Engine::new(Cpu::new(2).unwrap(), c.clone()).unwrap();
            assert_eq!(e.memory(), plan.initial.to_array(), "{name} vocab {vocab} tied {tied}: before the first update");
            for s in 0..2 {
                e.train_step(&tokens(2, 16, vocab, 40 + s), 1, 1e-3).unwrap();
            }
            assert_eq!(e.memory(), plan.stepped.to_array(), "{name} vocab {vocab} tied {tied}: after two updates");
        }
    }
}

/// Stash sizes of the paper's shapes (reported in docs/algorithm-spec.md §1.5).
#[test]
fn clip_stash_sizes_of_llama_60m_and_7b() {
    let stash = |hidden: usize, inter: usize, heads: usize, layers: usize, rank: usize| {
        let mut m = tiny_model(32000, hidden, inter, heads, heads, layers);
        m.max_position_embeddings = 2048;
        let mut c = cfg(m, "galore", 1.0, |c| c.optimizer.fused = true);
        c.optimizer.rank = rank;
        Plan::new(&c, false, "m").clip_stash * 4
    };
    // llama-60m, rank 128: 8 × (4·512·128 + 3·1376·128 + 2·512) + 512 floats
    assert_eq!(stash(512, 1376, 8, 8, 128), 4 * (8 * (4 * 512 * 128 + 3 * 1376 * 128 + 2 * 512) + 512));
    // llama-7b, rank 1024: about 6.5 GB
    let b7 = stash(4096, 11008, 32, 32, 1024);
    assert_eq!(b7, 4 * (32 * (4 * 4096 * 1024 + 3 * 11008 * 1024 + 2 * 4096) + 4096));
    assert!((6.4e9..6.6e9).contains(&(b7 as f64)), "{b7}");
}
