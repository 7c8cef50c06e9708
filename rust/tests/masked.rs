//! Completion-only (masked) loss, short windows and per-row eval sums (interface A of
//! issue 11): the masked loss is the mean of −log p over the counted targets, computed by
//! hand from the engine's logits; its gradient matches finite differences; N is counted
//! over every micro-batch of an update; a short window gives what the same rows give in a
//! full-length buffer whose extra targets are masked; an all-ones mask is no mask, bit
//! for bit; bad inputs are one-line errors.

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::config::EngineConfig;
use qgalore::train::Engine;

fn engine(c: EngineConfig) -> Engine<Cpu> {
    Engine::new(Cpu::new(2).unwrap(), c).unwrap()
}

fn config(b: usize, t: usize) -> EngineConfig {
    let mut m = tiny_model(64, 32, 48, 4, 2, 2);
    m.initializer_range = 0.1;
    engine_cfg(m, b, t, 5)
}

/// Deterministic mask: about two thirds of the entries 1, the rest 0.
fn mask(n: usize, seed: u64) -> Vec<u8> {
    (0..n).map(|i| (qgalore::rng::bits32(seed, i as u64) % 3 != 0) as u8).collect()
}

/// A completion-only mask: in window r (of t + 1 ids) the targets from position
/// `starts[r]` on carry loss (the prompt's do not).
fn completion_mask(t: usize, starts: &[usize]) -> Vec<u8> {
    starts.iter().flat_map(|&s| (0..=t).map(move |j| (j >= s) as u8)).collect()
}

/// Targets counted by `m` in windows of t + 1 (a window's first entry is never a target).
fn count(m: &[u8], t: usize) -> u64 {
    m.chunks(t + 1).map(|w| w[1..].iter().filter(|&&x| x != 0).count() as u64).sum()
}

fn inputs(windows: &[i32], t: usize) -> Vec<i32> {
    windows.chunks(t + 1).flat_map(|w| w[..t].to_vec()).collect()
}

/// −log softmax(row)[tgt] in f64.
fn nll(row: &[f32], tgt: usize) -> f64 {
    let mx = row.iter().fold(f64::NEG_INFINITY, |a, &z| a.max(z as f64));
    let s: f64 = row.iter().map(|&z| (z as f64 - mx).exp()).sum();
    mx + s.ln() - row[tgt] as f64
}

fn grads(e: &Engine<Cpu>) -> Vec<Vec<f32>> {
    (0..e.model.params.len()).map(|i| e.grads.get(i).data[..e.model.params[i].numel()].to_vec()).collect()
}

/// Largest |a − b| over every parameter's gradient, relative to the largest |b|.
fn grad_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut err, mut scale) = (0.0f64, 0.0f64);
    for (ga, gb) in a.iter().zip(b) {
        for (&x, &y) in ga.iter().zip(gb) {
            err = err.max((x as f64 - y as f64).abs());
            scale = scale.max((y as f64).abs());
        }
    }
    err / scale
}

fn trained(c: EngineConfig) -> Engine<Cpu> {
    let (b, t) = (c.batch_size, c.seq_len);
    let mut e = engine(c);
    for s in 0..3 {
        e.train_step(&tokens(b, t, 64, 70 + s), 1, 1e-2).unwrap();
    }
    e
}

#[test]
fn masked_loss_is_the_mean_nll_of_the_counted_targets() {
    let (b, t, v) = (3, 16, 64);
    let mut e = trained(config(b, t));
    let w = tokens(b, t, v, 11);
    // a completion-only mask (prompts of 5, 9 and 1 ids) and a scattered one
    for m in [completion_mask(t, &[5, 9, 1]), mask(b * (t + 1), 3)] {
        let mut logits = vec![0.0f32; b * t * v];
        e.logits(&inputs(&w, t), b, t, &mut logits).unwrap();
        let (mut want, mut rows, mut n) = (0.0f64, vec![0.0f64; b], 0u64);
        for (r, row) in logits.chunks(v).enumerate() {
            let (wi, p) = (r / t, r % t + 1);
            if m[wi * (t + 1) + p] == 0 {
                continue;
            }
            let l = nll(row, w[wi * (t + 1) + p] as usize);
            want += l;
            rows[wi] += l;
            n += 1;
        }
        assert_eq!(n, count(&m, t));
        let ev = e.eval_masked(&w, Some(&m), 1).unwrap();
        assert_eq!(ev.count, n);
        assert!((ev.sum - want).abs() <= 1e-5 * want, "sum {} vs hand {want}", ev.sum);
        assert!((ev.mean - want / n as f64).abs() <= 1e-5 * want / n as f64, "mean {} vs {}", ev.mean, want / n as f64);
        for r in 0..b {
            assert!((ev.row_sums[r] - rows[r]).abs() <= 1e-5 * rows[r].max(1.0), "row {r}: {} vs {}", ev.row_sums[r], rows[r]);
        }
        // the training loss of the same batch is the same forward: bit-equal to eval's mean
        let (loss, cnt) = e.loss_and_grads_masked(&w, Some(&m), 1).unwrap();
        assert_eq!(cnt, n);
        assert_eq!(loss.to_bits(), ev.mean.to_bits());
        // and differs from the unmasked loss
        assert!((loss - e.eval(&w, 1).unwrap()).abs() > 1e-4);
    }
}

#[test]
fn all_ones_mask_is_bit_identical_to_no_mask() {
    for fused in [false, true] {
        let (b, t) = (2, 16);
        let mut c = config(b, t);
        c.optimizer.fused = fused;
        c.optimizer.clip = 1.0;
        let (mut a, mut o) = (engine(c.clone()), engine(c));
        let ones = vec![1u8; b * (t + 1)];
        for s in 0..4 {
            let w = tokens(b, t, 64, 30 + s);
            let x = a.train_step(&w, 1, 1e-2).unwrap();
            let y = o.train_step_masked(&w, Some(&ones), 1, 1e-2).unwrap();
            assert_eq!((x.loss.to_bits(), x.grad_norm.to_bits(), x.clipped), (y.loss.to_bits(), y.grad_norm.to_bits(), y.clipped));
            assert_eq!((x.count, y.count), ((b * t) as u64, (b * t) as u64));
        }
        let w = tokens(2 * b, t, 64, 99);
        let ones = vec![1u8; w.len()];
        let (x, y) = (a.eval_masked(&w, None, 2).unwrap(), o.eval_masked(&w, Some(&ones), 2).unwrap());
        assert_eq!((x.mean.to_bits(), x.sum.to_bits(), x.count), (y.mean.to_bits(), y.sum.to_bits(), y.count));
        assert_eq!(x.row_sums, y.row_sums);
        assert_eq!(x.mean.to_bits(), a.eval(&w, 2).unwrap().to_bits());
    }
}

#[test]
fn masked_gradient_matches_finite_differences() {
    let mut m = tiny_model(32, 16, 24, 4, 2, 2);
    m.initializer_range = 0.3;
    let (b, t) = (2, 6);
    let mut e = engine(engine_cfg(m, b, t, 3));
    let toks = tokens(b, t, 32, 9);
    let mk = completion_mask(t, &[3, 5]);
    let (_, n) = e.loss_and_grads_masked(&toks, Some(&mk), 1).unwrap();
    assert_eq!(n, 4 + 2);
    for idx in 0..e.model.params.len() {
        let name = e.model.params[idx].name.clone();
        let analytic = e.grads.get(idx).data.clone();
        let mut x = e.model.params[idx].f().data.clone();
        grad_check(&name, &analytic, &mut x, 1e-2, 40, |xx| {
            e.model.params[idx].f_mut().data.copy_from_slice(xx);
            e.eval_masked(&toks, Some(&mk), 1).unwrap().mean
        });
        e.model.params[idx].f_mut().data.copy_from_slice(&x);
    }
}

#[test]
fn n_is_counted_over_every_micro_batch() {
    let (b, t) = (2, 8);
    let mut c = config(b, t);
    c.grad_accum = 2;
    let mut e = engine(c);
    let (wa, wb) = (tokens(b, t, 64, 1), tokens(b, t, 64, 2));
    // 3 + 1 counted targets in the first micro-batch, 8 + 6 in the second
    let (ma, mb) = (completion_mask(t, &[6, 8]), completion_mask(t, &[1, 3]));
    let (na, nb) = (count(&ma, t), count(&mb, t));
    assert_eq!((na, nb), (4, 14));
    let (sa, sb) = (e.eval_masked(&wa, Some(&ma), 1).unwrap().sum, e.eval_masked(&wb, Some(&mb), 1).unwrap().sum);
    e.loss_and_grads_masked(&wa, Some(&ma), 1).unwrap();
    let ga = grads(&e);
    e.loss_and_grads_masked(&wb, Some(&mb), 1).unwrap();
    let gb = grads(&e);
    let both: Vec<i32> = wa.iter().chain(&wb).copied().collect();
    let mboth: Vec<u8> = ma.iter().chain(&mb).copied().collect();
    let (loss, n) = e.loss_and_grads_masked(&both, Some(&mboth), 2).unwrap();
    assert_eq!(n, na + nb);
    // the same forwards: the token-weighted mean, bit for bit
    assert_eq!(loss.to_bits(), ((0.0 + sa + sb) / n as f64).to_bits(), "{loss}");
    // and not the mean of the two micro-batch means
    assert!((loss - (sa / na as f64 + sb / nb as f64) / 2.0).abs() > 1e-3);
    let (wa_, wb_) = (na as f64 / n as f64, nb as f64 / n as f64);
    let want: Vec<Vec<f32>> =
        ga.iter().zip(&gb).map(|(x, y)| x.iter().zip(y).map(|(&p, &q)| (wa_ * p as f64 + wb_ * q as f64) as f32).collect()).collect();
    let d = grad_diff(&grads(&e), &want);
    assert!(d < 1e-5, "token-weighted gradient: relative difference {d}");
    // a step reports the same count
    let st = e.train_step_masked(&both, Some(&mboth), 2, 1e-3).unwrap();
    assert_eq!(st.count, n);
    assert_eq!(st.loss.to_bits(), loss.to_bits());
}

/// Short windows (t < seq_len) against the same rows at full length with the extra
/// targets masked: causal attention makes position p depend only on positions ≤ p, so the
/// values are the same in exact arithmetic. The GEMMs see other shapes (t vs seq_len rows
/// per sequence, and n = b·t rows in the weight gradients, whose sums run over rows in
/// another order and with zero rows between the sequences), so bit equality is not
/// promised: losses must agree to 1e-6 and gradients to 1e-5 relative.
#[test]
fn short_windows_equal_full_windows_with_the_rest_masked() {
    for ckpt in [false, true] {
        let (b, cap, t) = (2, 16, 7);
        let mut c = config(b, cap);
        c.checkpointing = ckpt;
        let mut short = trained(c.clone());
        let mut full = trained(c);
        let ws = tokens(b, t, 64, 5);
        let ms = completion_mask(t, &[2, 4]);
        let filler = tokens(b, cap - t - 1, 64, 6);
        let mut wf = Vec::new();
        let mut mf = Vec::new();
        for r in 0..b {
            wf.extend_from_slice(&ws[r * (t + 1)..(r + 1) * (t + 1)]);
            wf.extend_from_slice(&filler[r * (cap - t)..(r + 1) * (cap - t)]);
            mf.extend_from_slice(&ms[r * (t + 1)..(r + 1) * (t + 1)]);
            mf.extend(std::iter::repeat_n(0u8, cap - t));
        }
        assert_eq!((wf.len(), mf.len()), (b * (cap + 1), b * (cap + 1)));
        let (es, ef) = (short.eval_masked(&ws, Some(&ms), 1).unwrap(), full.eval_masked(&wf, Some(&mf), 1).unwrap());
        assert_eq!(short.acts.t, t);
        assert_eq!((es.count, es.row_counts.clone()), (ef.count, ef.row_counts.clone()));
        assert!((es.mean - ef.mean).abs() <= 1e-6 * ef.mean, "ckpt {ckpt}: {} vs {}", es.mean, ef.mean);
        for r in 0..b {
            assert!((es.row_sums[r] - ef.row_sums[r]).abs() <= 1e-6 * ef.row_sums[r], "row {r}");
        }
        let (ls, _) = short.loss_and_grads_masked(&ws, Some(&ms), 1).unwrap();
        let (lf, _) = full.loss_and_grads_masked(&wf, Some(&mf), 1).unwrap();
        assert!((ls - lf).abs() <= 1e-6 * lf);
        let d = grad_diff(&grads(&short), &grads(&full));
        eprintln!("ckpt {ckpt}: loss {ls} vs {lf} (bit-equal: {}), gradient relative difference {d:e}", ls == lf);
        assert!(d < 1e-5, "ckpt {ckpt}: gradient relative difference {d}");
        // unmasked short windows: every target of the short rows
        let e = short.eval_masked(&ws, None, 1).unwrap();
        assert_eq!(e.count, (b * t) as u64);
        // back at full length (RoPE table and buffers restored) both engines agree bit for bit
        let w = tokens(b, cap, 64, 8);
        assert_eq!(short.eval(&w, 1).unwrap().to_bits(), full.eval(&w, 1).unwrap().to_bits());
        // and so does a step at a short length on both
        let (x, y) = (short.train_step_masked(&ws, Some(&ms), 1, 1e-2).unwrap(), full.train_step_masked(&ws, Some(&ms), 1, 1e-2).unwrap());
        assert_eq!((x.loss.to_bits(), x.grad_norm.to_bits()), (y.loss.to_bits(), y.grad_norm.to_bits()));
        let mut lg = vec![0.0f32; b * cap * 64];
        short.logits(&inputs(&w, cap), b, cap, &mut lg).unwrap();
        assert_eq!(short.acts.t, cap);
    }
}

#[test]
fn row_sums_and_counts_add_up() {
    let (b, t) = (3, 12);
    let mut e = trained(config(b, t));
    let batches = 3;
    let w = tokens(batches * b, t, 64, 21);
    let m = mask(w.len(), 4);
    let ev = e.eval_masked(&w, Some(&m), batches).unwrap();
    assert_eq!((ev.row_sums.len(), ev.row_counts.len()), (batches * b, batches * b));
    for (r, win) in m.chunks(t + 1).enumerate() {
        assert_eq!(ev.row_counts[r], count(win, t) as f64, "row {r}");
    }
    assert_eq!(ev.row_counts.iter().sum::<f64>(), ev.count as f64);
    assert_eq!(ev.count, count(&m, t));
    let s: f64 = ev.row_sums.iter().sum();
    assert!((s - ev.sum).abs() <= 1e-12 * ev.sum, "{s} vs {}", ev.sum);
    assert_eq!(ev.mean.to_bits(), (ev.sum / ev.count as f64).to_bits());
    // a row without counted targets sums to 0
    let mut m0 = m.clone();
    m0[..t + 1].fill(0);
    let ev0 = e.eval_masked(&w, Some(&m0), batches).unwrap();
    assert_eq!((ev0.row_sums[0], ev0.row_counts[0]), (0.0, 0.0));
    assert_eq!(ev0.row_sums[1..], ev.row_sums[1..]);
}

#[test]
fn bad_masks_and_lengths_are_one_line_errors() {
    let (b, t) = (2, 8);
    let mut e = engine(config(b, t));
    let before = e.model.params[1].f().data.clone();
    let w = tokens(b, t, 64, 1);
    let one_line = |m: &str| assert!(!m.contains('\n') && !m.is_empty(), "{m}");
    // N = 0
    let zeros = vec![0u8; w.len()];
    let msg = e.train_step_masked(&w, Some(&zeros), 1, 1e-3).unwrap_err().msg;
    assert_eq!(msg, "no target in this update carries loss (every mask entry is 0)");
    // only first entries set: still no target
    let firsts: Vec<u8> = (0..w.len()).map(|i| (i % (t + 1) == 0) as u8).collect();
    assert!(e.train_step_masked(&w, Some(&firsts), 1, 1e-3).unwrap_err().msg.contains("no target"));
    let msg = e.eval_masked(&w, Some(&zeros), 1).unwrap_err().msg;
    one_line(&msg);
    assert!(msg.contains("no target"), "{msg}");
    // lengths: not a multiple of batch, t = 0, t > seq_len
    for n in [b * (t + 1) + 1, b, b * (t + 2), 0] {
        let ids: Vec<i32> = (0..n).map(|i| (i % 64) as i32).collect();
        let msg = e.train_step(&ids, 1, 1e-3).unwrap_err().msg;
        one_line(&msg);
        for part in [format!("got {n} token ids"), "batch 2".into(), "seq_len 8".into(), "micro-batches 1".into()] {
            assert!(msg.contains(&part), "{msg} lacks {part}");
        }
        let msg = e.eval_masked(&ids, None, 1).unwrap_err().msg;
        assert!(msg.contains("batches 1") && msg.contains(&format!("got {n} token ids")), "{msg}");
    }
    // mask of another length
    let msg = e.train_step_masked(&w, Some(&zeros[1..]), 1, 1e-3).unwrap_err().msg;
    one_line(&msg);
    assert!(msg.contains("mask has 17 entries"), "{msg}");
    assert_eq!(before, e.model.params[1].f().data);
    // ids are checked at masked positions too
    let mut bad = w.clone();
    bad[5] = 64;
    let mut m = vec![1u8; w.len()];
    m[5] = 0;
    assert!(e.train_step_masked(&bad, Some(&m), 1, 1e-3).unwrap_err().msg.contains("token id 64"));
    assert_eq!(before, e.model.params[1].f().data);
}

#[test]
fn masked_fused_step_equals_the_global_one() {
    let (b, t) = (2, 12);
    let mk = |fused| {
        let mut c = config(b, t);
        c.optimizer.fused = fused;
        engine(c)
    };
    let (mut g, mut f) = (mk(false), mk(true));
    assert!(f.fused && !g.fused);
    for s in 0..3 {
        let w = tokens(b, 9, 64, 40 + s);
        let m = completion_mask(9, &[3 + s as usize, 6]);
        let (x, y) = (g.train_step_masked(&w, Some(&m), 1, 1e-2).unwrap(), f.train_step_masked(&w, Some(&m), 1, 1e-2).unwrap());
        assert_eq!((x.loss.to_bits(), x.count), (y.loss.to_bits(), y.count));
        assert!((x.grad_norm - y.grad_norm).abs() <= 1e-9 * x.grad_norm);
    }
    let w = tokens(b, t, 64, 50);
    let (lg, lf) = (g.eval(&w, 1).unwrap(), f.eval(&w, 1).unwrap());
    assert!((lg - lf).abs() <= 1e-6 * lg, "{lg} vs {lf}");
}
