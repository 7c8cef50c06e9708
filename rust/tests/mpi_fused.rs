//! The fused per-layer step in a data-parallel run (`dist::overlap`): `mpirun -np 2` runs this
//! binary's `child` test (over the loopback interface), in which each rank trains on its half
//! of every global batch with the fused step and with the unfused (global) step. This process
//! trains one engine on the whole global batches and compares: 2 ranks × batch B follow one
//! process × batch 2B (losses within 1e-5 relative), the fused DP step follows the unfused DP
//! step, both ranks end with the same bytes in their checkpoints (INT8 codes included), and
//! the bytes all-reduced per step are what the step's algorithm says. Skipped with a message
//! when `mpirun` is absent, unless `QGALORE_REQUIRE_MPI=1`, where that fails.

mod common;
use common::mpi::*;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::config::EngineConfig;
use qgalore::dist::{self, Mode};
use qgalore::plan::Plan;
use qgalore::train::Engine;
use std::time::Duration;

const CHILD: &str = "QGALORE_MPI_FUSED_CHILD";
/// Per-rank batch and sequence length.
const B: usize = 2;
const T: usize = 16;
const LR: f32 = 3e-3;

struct Case {
    label: &'static str,
    cfg: EngineConfig,
    steps: u64,
    /// Steps whose losses are compared with one process (stochastic rounding drifts after).
    compared: u64,
}

fn case(label: &'static str, vocab: usize, tied: bool, name: &str, clip: f32, steps: u64, compared: u64) -> Case {
    let mut m = tiny_model(vocab, 64, 128, 4, 2, 2);
    m.tie_word_embeddings = tied;
    let mut c = engine_cfg(m, B, T, 11);
    c.threads = 1;
    c.optimizer = optim(name, clip);
    c.optimizer.rank = 8;
    c.optimizer.update_gap = 2;
    c.optimizer.weight_group_size = 64;
    c.optimizer.proj_group_size = 64;
    if name == "qgalore" {
        (c.optimizer.weight_bits, c.optimizer.proj_bits, c.optimizer.lazy) = (8, 4, true);
    }
    Case { label, cfg: c, steps, compared }
}

/// Every case: each optimizer the fused step serves, its two clipping paths (two backwards for
/// adamw / adam8bit / lora, the clip stash for the projected ones), and the tables whole,
/// tied, and in row chunks (an 8-bit optimizer with a vocabulary larger than every other
/// tensor: vocab 512 × 64 > 64 × 128).
fn cases() -> Vec<Case> {
    vec![
        case("adamw clip (two backwards)", 96, false, "adamw", 0.5, 4, 4),
        case("adamw no clip", 96, false, "adamw", 0.0, 4, 4),
        case("galore clip (stash)", 96, false, "galore", 0.5, 4, 4),
        case("galore clip (stash) tied", 96, true, "galore", 0.5, 4, 4),
        case("galore8bit clip (stash) chunked tables", 512, false, "galore8bit", 0.5, 4, 4),
        case("adam8bit clip (two backwards) chunked tables", 512, false, "adam8bit", 0.5, 4, 4),
        case("lora clip (two backwards)", 96, false, "lora", 0.1, 4, 4),
        // INT8 weights by stochastic rounding: a sum in another order than one process's flips
        // the odd code at a rounding threshold, and the runs drift apart after a few updates
        // (tests/dp_test.ts); the two ranks' codes stay identical (checked in the child)
        case("qgalore clip (stash) chunked tables", 512, false, "qgalore", 0.5, 4, 3),
    ]
}

/// The global batch of step `s`: 2B windows; rank r takes windows r·B .. (r+1)·B.
fn global_batch(vocab: usize, s: u64) -> Vec<i32> {
    tokens(2 * B, T, vocab, 500 + s)
}

/// (loss, grad norm, clipped) per step.
type Run = Vec<(f64, f64, bool)>;

fn parse_run(text: &str, label: &str, mode: &str) -> Run {
    let tag = format!("RUN {mode} [{label}] ");
    text.lines()
        .filter_map(|l| l.find(&tag).map(|p| &l[p + tag.len()..]))
        .map(|rest| {
            let v: Vec<&str> = rest.split_whitespace().collect();
            (v[1].parse().unwrap(), v[2].parse().unwrap(), v[3] == "true")
        })
        .collect()
}

fn fnv(bytes: &[u8]) -> [u8; 8] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.to_le_bytes()
}

/// What must be the same on every rank in a checkpoint: a hash of every tensor's bytes (INT8
/// codes, projectors, moments, weights) and of the engine state's scalars less the refresh
/// time (a measurement); and each tensor's (name, byte range).
fn same_state(ck: &[u8]) -> ([u8; 16], Vec<(String, usize, usize)>) {
    let n = u64::from_le_bytes(ck[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&ck[8..8 + n]).unwrap();
    let mut tensors = Vec::new();
    for (name, t) in header.as_object().unwrap() {
        if let Some(o) = t.get("data_offsets") {
            tensors.push((name.clone(), 8 + n + o[0].as_u64().unwrap() as usize, 8 + n + o[1].as_u64().unwrap() as usize));
        }
    }
    assert!(!tensors.is_empty());
    let mut st: serde_json::Value = serde_json::from_str(header["__metadata__"]["state"].as_str().unwrap()).unwrap();
    if let Some(o) = st["optim"].as_object_mut() {
        o.remove("refresh_ns");
    }
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&fnv(&ck[8 + n..]));
    out[8..].copy_from_slice(&fnv(st.to_string().as_bytes()));
    (out, tensors)
}

/// Trains `c` (fused or not) on this rank's part of every global batch; prints each step
/// from rank 0 and checks the bytes all-reduced per step and the ranks' identical state.
fn rank_run(k: &Case, fused: bool) -> Result<(), String> {
    let r = dist::rank();
    let mut c = k.cfg.clone();
    c.optimizer.fused = fused;
    let v = c.model.vocab_size;
    let mut e = Engine::new(Cpu::new(1).unwrap(), c.clone()).map_err(|e| e.msg)?;
    if e.fused != fused {
        return Err(format!("{}: engine fused = {}, asked {fused}", k.label, e.fused));
    }
    let params = e.model.trainable_numel() as u64;
    let mode = if fused { "fused" } else { "unfused" };
    let rows = T + 1;
    for s in 0..k.steps {
        let g = global_batch(v, s);
        let mine = &g[r * B * rows..(r + 1) * B * rows];
        let (before, calls0) = (dist::info().allreduce_bytes, dist::info().allreduce_calls);
        let st = e.train_step(mine, 1, LR).map_err(|e| format!("{} {mode} step {s}: {}", k.label, e.msg))?;
        let sent = dist::info().allreduce_bytes - before;
        let calls = dist::info().allreduce_calls - calls0;
        // the loss and the target count (f64 each), and every trained element once per
        // backward (f32): twice when the norm is measured by a first backward; the clip
        // stash sends the tables a second time when it recomputes them for their update
        let m = &e.model;
        let clip = c.optimizer.clip > 0.0;
        let table = |i: usize| m.params[i].numel() as u64;
        let head = !m.tied() && m.trainable(m.head);
        let stash = fused && clip && e.opt.stashes();
        // the last table computed (the head, or a tied or lone embedding) stays whole in the
        // shared buffer unless chunked; the other tables are recomputed for their update
        let last = if head { m.head } else { m.embed };
        let whole = e.grads.chunk_rows(last).is_none().then_some(last);
        let again = if !stash {
            0
        } else {
            (if Some(m.embed) != whole { table(m.embed) } else { 0 }) + (if head && Some(m.head) != whole { table(m.head) } else { 0 })
        };
        let backwards = if fused && clip && !stash { 2 } else { 1 };
        let want = 16 + backwards * 4 * params + 4 * again;
        if sent != want {
            return Err(format!("{} {mode} step {s}: {sent} bytes all-reduced, want {want} (params {params}, tables again {again})", k.label));
        }
        // the fused step sums each gradient hand-over (a tensor, or a table's row chunk) by
        // itself, as the backward produces it: one all-reduce per hand-over
        if fused {
            let pieces = |i: usize| e.grads.chunk_rows(i).map_or(1, |rows| m.params[i].rows.div_ceil(rows)) as u64;
            let per_backward: u64 = (0..m.params.len()).filter(|&i| m.trainable(i)).map(pieces).sum();
            let tables_again = if !stash {
                0
            } else {
                (if Some(m.embed) != whole { pieces(m.embed) } else { 0 }) + (if head && Some(m.head) != whole { pieces(m.head) } else { 0 })
            };
            let want = 2 + backwards * per_backward + tables_again;
            if calls != want {
                return Err(format!("{} fused step {s}: {calls} all-reduces, want {want} (one per gradient hand-over, the loss and the count)", k.label));
            }
        }
        if r == 0 {
            println!("RUN {mode} [{}] {s} {:e} {:e} {} bytes {sent}", k.label, st.loss, st.grad_norm, st.clipped);
        }
    }
    if fused && r == 0 {
        let (w, early) = dist::overlap::waits();
        println!("WAITS [{}] {w} all-reduces waited for so far, {early} already complete", k.label);
    }
    let state = e.save_state().map_err(|e| e.msg)?;
    let (same, tensors) = same_state(&state);
    if let Err(e) = dist::check_same(&format!("{} {mode}: the engine state", k.label), &same) {
        // which tensors: rank 1's checkpoint, broadcast, against rank 0's
        let mut other = state.clone();
        dist::bcast(&mut other, 1).map_err(|e| e.msg)?;
        let differ: Vec<&String> = tensors.iter().filter(|(_, a, b)| state[*a..*b] != other[*a..*b]).map(|(n, _, _)| n).collect();
        return Err(format!("{}: tensors {differ:?}", e.msg));
    }
    if r == 0 {
        println!("SAME-STATE [{}] {mode} {} tensors", k.label, tensors.len());
        println!("GRADS-BYTES [{}] {mode} {}", k.label, e.memory()[2]);
    }
    Ok(())
}

/// The loss mask of step `s`'s global batch: rank 1's half carries no loss at all (every
/// entry 0) and rank 0's only some targets, so only the global count is not 0.
fn global_mask(s: u64) -> Vec<u8> {
    let rows = T + 1;
    (0..2 * B * rows).map(|i| u8::from(i < B * rows && (i + s as usize) % 3 != 0)).collect()
}

/// A masked update whose rank-1 slice carries no loss: that rank trains on (it must not
/// refuse alone — the target count is checked after the sum over the ranks) and both ranks
/// follow one process with the whole masked batch.
fn masked_run(fused: bool) -> Result<(), String> {
    let r = dist::rank();
    let mut c = masked_case().cfg;
    c.optimizer.fused = fused;
    let v = c.model.vocab_size;
    let mut e = Engine::new(Cpu::new(1).unwrap(), c).map_err(|e| e.msg)?;
    let rows = T + 1;
    let mode = if fused { "fused" } else { "unfused" };
    for s in 0..3 {
        let (g, m) = (global_batch(v, s), global_mask(s));
        let range = r * B * rows..(r + 1) * B * rows;
        let st = e.train_step_masked(&g[range.clone()], Some(&m[range]), 1, LR).map_err(|e| format!("masked {mode} step {s}: {}", e.msg))?;
        if r == 0 {
            println!("RUN {mode} [masked, rank 1 empty] {s} {:e} {:e} {} count {}", st.loss, st.grad_norm, st.clipped, st.count);
        }
    }
    Ok(())
}

fn masked_case() -> Case {
    case("masked, rank 1 empty", 96, false, "galore", 0.5, 3, 3)
}

fn rank_body() -> Result<usize, String> {
    let info = dist::init(Mode::Auto).map_err(|e| e.msg)?;
    if info.backend != "mpi" || info.size != 2 {
        return Err(format!("expected an MPI world of 2, got {info:?}"));
    }
    for k in cases() {
        rank_run(&k, true)?;
        rank_run(&k, false)?;
    }
    for fused in [true, false] {
        masked_run(fused)?;
    }
    dist::barrier().map_err(|e| e.msg)?;
    dist::finalize().map_err(|e| e.msg)?;
    Ok(info.rank)
}

#[test]
fn child() {
    if std::env::var(CHILD).is_err() {
        return; // only under mpirun (see `fused_two_ranks`)
    }
    match rank_body() {
        Ok(r) => println!("MPI-FUSED-OK {r}"),
        Err(e) => {
            println!("MPI-FUSED-FAIL {e}");
            panic!("{e}");
        }
    }
}



/// One process, batch 2B, the fused step: the reference trajectory, and the gradient bytes
/// tracked after it.
fn one_process(k: &Case) -> (Run, u64) {
    let mut c = k.cfg.clone();
    c.batch_size = 2 * B;
    c.optimizer.fused = true;
    let v = c.model.vocab_size;
    let mut e = Engine::new(Cpu::new(1).unwrap(), c).unwrap();
    assert!(e.fused);
    let run = (0..k.steps)
        .map(|s| {
            let st = e.train_step(&global_batch(v, s), 1, LR).unwrap();
            (st.loss, st.grad_norm, st.clipped)
        })
        .collect();
    (run, e.memory()[2])
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-30)
}

#[test]
fn fused_two_ranks() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let Some(mpirun) = mpirun_or_skip("the two-rank test") else {
        return;
    };
    let cmd = launch_two_ranks(&mpirun, &[(CHILD, "1")]);
    let (ok, text) = run_bounded(cmd, Duration::from_secs(300));
    assert!(ok, "mpirun -np 2 failed:\n{text}");
    for r in 0..2 {
        assert!(text.contains(&format!("MPI-FUSED-OK {r}")), "rank {r} did not pass:\n{text}");
    }
    for k in cases() {
        let (fused, unfused, (one, one_grads)) = (parse_run(&text, k.label, "fused"), parse_run(&text, k.label, "unfused"), one_process(&k));
        // gradient memory per rank: the shared buffer and its spare half, 2 × the largest
        // tensor (or table chunk), where one process holds the shared buffer alone
        let mut fused_cfg = k.cfg.clone();
        fused_cfg.optimizer.fused = true;
        let shared = Plan::new(&fused_cfg, false, "m").shared_grad;
        let grads: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("GRADS-BYTES [{}] fused ", k.label)))
            .unwrap_or_else(|| panic!("{}: no gradient bytes in\n{text}", k.label))
            .trim()
            .parse()
            .unwrap();
        assert!(shared > 0);
        assert_eq!(grads, one_grads + 4 * shared, "{}: gradient bytes on a rank vs one process + the spare ({shared} values)", k.label);
        println!("{}: gradient bytes per rank {grads} (one process {one_grads}; spare buffer {} B)", k.label, 4 * shared);
        assert_eq!(fused.len() as u64, k.steps, "{}: fused steps in\n{text}", k.label);
        assert_eq!(unfused.len() as u64, k.steps, "{}: unfused steps", k.label);
        let bytes = |mode: &str| {
            let tag = format!("RUN {mode} [{}] 0 ", k.label);
            text.lines().find_map(|l| l.find(&tag).map(|p| l[p..].rsplit(' ').next().unwrap_or("?").to_string())).unwrap_or_default()
        };
        println!("{}: all-reduced per step: fused {} bytes, unfused {} bytes", k.label, bytes("fused"), bytes("unfused"));
        assert!(text.contains(&format!("SAME-STATE [{}] fused", k.label)), "{}: state not compared", k.label);
        if let Some(l) = text.lines().find(|l| l.contains(&format!("WAITS [{}]", k.label))) {
            println!("{}", &l[l.find("WAITS").unwrap()..]);
        }
        let clipped = one.iter().filter(|s| s.2).count();
        if k.cfg.optimizer.clip > 0.0 {
            assert!(clipped > 0, "{}: clipping never acted in {one:?}", k.label);
        }
        for s in 0..k.compared as usize {
            for (other, what) in [(&one[s], "one process × batch 4"), (&unfused[s], "the unfused 2-rank step")] {
                let a = fused[s];
                assert!(close(a.0, other.0, 1e-5), "{}: step {s} loss {} (fused, 2 ranks) vs {} ({what})", k.label, a.0, other.0);
                assert!(close(a.1, other.1, 1e-4), "{}: step {s} norm {} (fused, 2 ranks) vs {} ({what})", k.label, a.1, other.1);
                assert_eq!(a.2, other.2, "{}: step {s} clipped differs from {what}", k.label);
            }
        }
    }
    // the masked case: 2 ranks (rank 1's slice empty) = one process with the whole mask
    let k = masked_case();
    let mut c = k.cfg.clone();
    c.batch_size = 2 * B;
    c.optimizer.fused = true;
    let v = c.model.vocab_size;
    let mut e = Engine::new(Cpu::new(1).unwrap(), c).unwrap();
    for mode in ["fused", "unfused"] {
        assert_eq!(parse_run(&text, k.label, mode).len(), 3, "masked {mode}: steps in\n{text}");
    }
    for s in 0..3u64 {
        let st = e.train_step_masked(&global_batch(v, s), Some(&global_mask(s)), 1, LR).unwrap();
        for mode in ["fused", "unfused"] {
            let a = parse_run(&text, k.label, mode)[s as usize];
            assert!(close(a.0, st.loss, 1e-5), "masked {mode} step {s}: loss {} (2 ranks) vs {} (one process)", a.0, st.loss);
            assert!(close(a.1, st.grad_norm, 1e-4), "masked {mode} step {s}: norm {} vs {}", a.1, st.grad_norm);
            println!("masked, rank 1 empty, {mode} step {s}: loss {} (2 ranks) vs {} (one process, {} targets)", a.0, st.loss, st.count);
        }
    }
}
