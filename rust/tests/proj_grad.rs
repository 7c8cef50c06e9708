//! `proj_grad = factored` (docs/algorithm-spec.md §1.5b): a projected matrix's rank-r
//! gradient R formed straight from the product's factors, dYᵀ·(X·Qᵀ) or (dY·P)ᵀ·X, on every
//! update that does not refresh its projector. The same R as projecting the whole gradient
//! up to rounding, so the trajectory follows `full` closely (not bit for bit); refresh steps
//! take the whole gradient; the fused and the global step agree bit for bit; checkpoints
//! resume exactly; clipping and data parallelism are refused in one line.

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::config::{EngineConfig, ProjGrad};
use qgalore::train::Engine;

const STEPS: u64 = 8;
const GAP: u64 = 3;

/// galore (float weights, bf16 projectors) or qgalore (its defaults: INT8 weights with
/// stochastic rounding, INT4 projectors, lazy refresh), clip 0, refresh gap `GAP`.
fn cfg(name: &str, fused: bool, accum: usize, pg: ProjGrad) -> EngineConfig {
    let mut c = engine_cfg(tiny_model(96, 64, 160, 4, 2, 2), 2, 16, 21);
    c.optimizer = optim(name, 0.0);
    (c.optimizer.rank, c.optimizer.update_gap, c.optimizer.fused) = (8, GAP, fused);
    (c.optimizer.weight_group_size, c.optimizer.proj_group_size) = (64, 64);
    if name == "qgalore" {
        (c.optimizer.weight_bits, c.optimizer.proj_bits, c.optimizer.lazy) = (8, 4, true);
    }
    c.optimizer.proj_grad = pg;
    c.grad_accum = accum;
    c
}

struct Run {
    losses: Vec<f64>,
    norms: Vec<f64>,
    eval: f64,
    svd: u64,
    factored: u64,
    projected: u64,
}

fn run(c: &EngineConfig) -> Run {
    let mut e = Engine::new(Cpu::new(2).unwrap(), c.clone()).unwrap();
    let v = c.model.vocab_size;
    let (mut losses, mut norms) = (vec![], vec![]);
    for s in 0..STEPS {
        let st = e.train_step(&tokens(2 * c.grad_accum, c.seq_len, v, 300 + s), c.grad_accum, 3e-3).unwrap();
        losses.push(st.loss);
        norms.push(st.grad_norm);
    }
    let eval = e.eval(&tokens(2, c.seq_len, v, 999), 1).unwrap();
    let info = e.info();
    let r = info.refresh.expect("a projected optimizer reports its counters");
    Run { losses, norms, eval, svd: r.svd_count, factored: r.factored_grads, projected: r.gaps.0.len() as u64 }
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-30)
}

/// Each projected matrix takes R from the factors on every update but its refreshes (the
/// counters add up), the first update (a refresh everywhere) is the same bit for bit, and
/// the trajectory stays within rounding of `full`'s; `full` never factors.
#[test]
fn factored_follows_full() {
    for (name, tol) in [("galore", 1e-5), ("qgalore", 1e-4)] {
        for fused in [false, true] {
            let label = format!("{name} fused {fused}");
            let full = run(&cfg(name, fused, 1, ProjGrad::Full));
            let fac = run(&cfg(name, fused, 1, ProjGrad::Factored));
            assert_eq!(full.factored, 0, "{label}: full mode factored");
            assert!(full.projected >= 14, "{label}: {} projected matrices", full.projected);
            assert_eq!(fac.svd, full.svd, "{label}: refreshes");
            assert_eq!(fac.factored + fac.svd, fac.projected * STEPS, "{label}: factored {} + refreshed {} updates", fac.factored, fac.svd);
            assert!(fac.factored >= fac.projected * (STEPS - 3), "{label}: only {} factored", fac.factored);
            // loss 1 follows update 0, a refresh of every projector: the same path
            assert_eq!(fac.losses[..2].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), full.losses[..2].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{label}");
            assert_ne!(fac.losses, full.losses, "{label}: factored changed nothing");
            for (k, (a, b)) in fac.losses.iter().zip(&full.losses).enumerate() {
                assert!(close(*a, *b, tol), "{label}: step {k} loss {a} vs full {b}");
            }
            assert!(close(fac.eval, full.eval, tol), "{label}: eval {} vs full {}", fac.eval, full.eval);
            // the reported norm covers what the optimizer consumed: R for a factored matrix
            // (‖R‖ ≤ ‖G‖ for an orthonormal projector), the whole gradient on refresh steps
            assert_eq!(fac.norms[0].to_bits(), full.norms[0].to_bits(), "{label}: norm of a refresh step");
            for k in 1..STEPS as usize {
                assert!(fac.norms[k] <= full.norms[k] * 1.01, "{label}: step {k} norm {} vs full {}", fac.norms[k], full.norms[k]);
            }
        }
    }
}

/// The fused step (R formed inside the backward, the update right after) and the global
/// step (every R first, then the updates) compute the same numbers bit for bit.
#[test]
fn fused_equals_global_step() {
    for name in ["galore", "qgalore"] {
        let a = run(&cfg(name, true, 1, ProjGrad::Factored));
        let b = run(&cfg(name, false, 1, ProjGrad::Factored));
        assert_eq!(a.losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{name}");
        assert_eq!(a.eval.to_bits(), b.eval.to_bits(), "{name}: eval");
        assert_eq!((a.svd, a.factored), (b.svd, b.factored), "{name}");
        assert!(a.factored > 0);
    }
}

/// With gradient accumulation each micro-batch adds its R (projection is linear): close to
/// `full` with the same accumulation, one factored R per matrix and update.
#[test]
fn accumulation_adds_factored_r() {
    let full = run(&cfg("galore", false, 2, ProjGrad::Full));
    let fac = run(&cfg("galore", false, 2, ProjGrad::Factored));
    assert_eq!(fac.factored + fac.svd, fac.projected * STEPS);
    assert!(fac.factored > 0);
    for (k, (a, b)) in fac.losses.iter().zip(&full.losses).enumerate() {
        assert!(close(*a, *b, 1e-5), "step {k}: loss {a} vs full {b}");
    }
}

/// A checkpoint taken between factored updates resumes bit for bit, its counter included.
#[test]
fn resume_is_exact() {
    for name in ["galore", "qgalore"] {
        let c = cfg(name, true, 1, ProjGrad::Factored);
        let v = c.model.vocab_size;
        let batch = |s: u64| tokens(2, 16, v, 300 + s);
        let mut a = Engine::new(Cpu::new(2).unwrap(), c.clone()).unwrap();
        let mut saved = None;
        let mut tail = vec![];
        for s in 0..STEPS {
            if s == 4 {
                saved = Some(a.save_state().unwrap());
            }
            let l = a.train_step(&batch(s), 1, 3e-3).unwrap().loss;
            if s >= 4 {
                tail.push(l.to_bits());
            }
        }
        let mut b = Engine::new(Cpu::new(2).unwrap(), c.clone()).unwrap();
        b.load_state(&saved.unwrap()).unwrap();
        let resumed: Vec<u64> = (4..STEPS).map(|s| b.train_step(&batch(s), 1, 3e-3).unwrap().loss.to_bits()).collect();
        assert_eq!(resumed, tail, "{name}");
        let (ra, rb) = (a.info().refresh.unwrap(), b.info().refresh.unwrap());
        assert_eq!(ra.factored_grads, rb.factored_grads, "{name}: counter");
        assert!(ra.factored_grads > 0);
    }
}

/// Clipping needs the whole gradient's norm: factored with clip > 0 is refused in one line,
/// as is an unknown value; `full` is the default.
#[test]
fn refusals() {
    let json = |opt: &str| {
        format!(
            r#"{{"model":{{"vocab_size":64,"hidden_size":64,"intermediate_size":128,"num_attention_heads":4,"num_hidden_layers":2,"max_position_embeddings":64}},"batch_size":2,"seq_len":16,"optimizer":{{"name":"galore",{opt}}}}}"#
        )
    };
    let e = EngineConfig::from_json(&json(r#""clip":1,"proj_grad":"factored""#)).unwrap_err();
    assert_eq!(
        e.msg,
        "proj_grad factored needs clip 0 (clipping needs the whole gradient's norm, which the factored product never forms): use proj_grad full, or clip 0"
    );
    let e = EngineConfig::from_json(&json(r#""proj_grad":"lazy""#)).unwrap_err();
    assert_eq!(e.msg, "proj_grad = lazy: must be one of full, factored");
    let ok = EngineConfig::from_json(&json(r#""clip":0,"proj_grad":"factored""#)).unwrap();
    assert_eq!(ok.optimizer.proj_grad, ProjGrad::Factored);
    assert_eq!(EngineConfig::from_json(&json(r#""clip":1"#)).unwrap().optimizer.proj_grad, ProjGrad::Full);
}

/// Factoring is taken only where it saves multiply-adds: not for a rank clamped to the
/// matrix's size at a realistic token count, where R comes from the whole gradient as under
/// `full`, bit for bit.
#[test]
fn only_where_it_saves_work() {
    use qgalore::optim::galore::factoring_saves;
    assert!(factoring_saves(384, 384, 128, 2048));
    assert!(factoring_saves(11008, 4096, 1024, 4096));
    assert!(!factoring_saves(64, 64, 64, 512));
    assert!(!factoring_saves(160, 64, 64, 512));
    // few tokens: the projection G·Qᵀ itself outweighs the saving, factoring pays
    assert!(factoring_saves(64, 64, 64, 32));
    let mut full = cfg("galore", true, 1, ProjGrad::Full);
    (full.optimizer.rank, full.seq_len) = (64, 256); // every matrix has a side of 64; n = 512
    let mut fac = full.clone();
    fac.optimizer.proj_grad = ProjGrad::Factored;
    let (a, b) = (run(&full), run(&fac));
    assert_eq!(b.factored, 0);
    assert_eq!(a.losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
}

/// Under bf16 precision (the CPU's exact bf16 path, any processor) and with activation
/// checkpointing, the factored R uses a backward scratch that holds bf16 and a block
/// recomputed in the backward: it still follows `full` (within bf16 rounding) and factors.
#[test]
fn bf16_and_checkpointing() {
    use qgalore::backend::cpu::bf16::CpuBf16;
    use qgalore::host::bf16::Kernel;
    for ckpt in [false, true] {
        let run_on = |pg: ProjGrad| {
            let mut c = cfg("qgalore", true, 1, pg);
            c.checkpointing = ckpt;
            let mut e = Engine::new(CpuBf16::with_kernel(2, Kernel::Exact).unwrap(), c.clone()).unwrap();
            let v = c.model.vocab_size;
            let losses: Vec<f64> = (0..STEPS).map(|s| e.train_step(&tokens(2, c.seq_len, v, 300 + s), 1, 3e-3).unwrap().loss).collect();
            (losses, e.info().refresh.unwrap().factored_grads)
        };
        let (full, f0) = run_on(ProjGrad::Full);
        let (fac, f1) = run_on(ProjGrad::Factored);
        assert_eq!(f0, 0);
        assert!(f1 >= 14 * (STEPS - 3), "checkpointing {ckpt}: {f1} factored");
        for (k, (a, b)) in fac.iter().zip(&full).enumerate() {
            assert!(close(*a, *b, 2e-3), "checkpointing {ckpt}: step {k} loss {a} vs full {b}");
        }
    }
}
