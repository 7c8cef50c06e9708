//! optim.cu: the optimizer steps, bit for bit against the CPU's, and the gradient
//! sanitizer and sum of squares.

use crate::harness::{emu, Arg, Report};
use crate::{cbuf, cpu, vals};
use qgalore::backend::cpu::ops;
use qgalore::backend::cuda::launch::{self, PARTS};
use qgalore::backend::{AdamHp, Memory, Optimizers};
use qgalore::quant::adam8::{self, State8};
use qgalore::quant::{bf16_to_f32, f32_to_bf16};

fn hp(step: u64, wd: f32) -> AdamHp {
    AdamHp {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: wd,
        step,
    }
}

/// Gradients with non-finite elements at fixed places, a few whose square overflows to
/// infinity (and, with `dead_block`, a whole block of non-finite ones).
fn grads(n: usize, seed: u64, dead_block: Option<(usize, usize)>) -> Vec<f32> {
    let mut g = vals(n, seed, 0.5);
    for (k, i) in (3..n).step_by(397).enumerate() {
        g[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][k % 3];
    }
    for i in (200..n).step_by(1999) {
        g[i] = 3e19;
    }
    if let Some((start, len)) = dead_block {
        g[start..(start + len).min(n)]
            .iter_mut()
            .for_each(|x| *x = f32::NAN);
    }
    g
}

#[test]
fn optimizer_kernels_are_bit_identical_to_the_cpu_steps() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("optim");
    let n = 5000; // 19.5 blocks of 256

    for lib in emu.with("adamw") {
        let (mut p, mut m, mut v) = (vals(n, 1, 1.0), vec![0.0f32; n], vec![0.0f32; n]);
        let mut a = vec![
            Arg::F32s(p.clone()),
            Arg::F32s(vec![]),
            Arg::F32s(m.clone()),
            Arg::F32s(v.clone()),
        ];
        for step in 1..=3 {
            let h = hp(step, 0.1);
            let g = grads(n, 10 + step, None);
            let (s, rbc2, decay) = h.torch_factors();
            a[1] = Arg::F32s(g.clone());
            let mut args = a.clone();
            args.extend([s, rbc2, decay, h.beta1, h.beta2, h.eps].map(Arg::F32));
            args.push(Arg::U64(n as u64));
            lib.launch("adamw", launch::elems(n), &mut args);
            ops::adamw(&mut p, &g, &mut m, &mut v, h);
            let tag = format!("{}/adamw step {step}", lib.module);
            r.same_f32(&format!("{tag} p"), args[0].f32s(), &p);
            r.same_f32(&format!("{tag} m"), args[2].f32s(), &m);
            r.same_f32(&format!("{tag} v"), args[3].f32s(), &v);
            a = args[..4].to_vec();
        }
    }

    for lib in emu.with("galore_adam") {
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        let (mut km, mut kv) = (m.clone(), v.clone());
        for step in 1..=3 {
            let h = hp(step, 0.0);
            let mut buf = grads(n, 20 + step, None);
            let mut args = vec![
                Arg::F32s(buf.clone()),
                Arg::F32s(km),
                Arg::F32s(kv),
                Arg::F32(h.galore_step()),
                Arg::F32(h.beta1),
                Arg::F32(h.beta2),
                Arg::F32(h.eps),
                Arg::U64(n as u64),
            ];
            lib.launch("galore_adam", launch::elems(n), &mut args);
            ops::galore_adam(&mut buf, &mut m, &mut v, h);
            let tag = format!("{}/galore_adam step {step}", lib.module);
            r.same_f32(&format!("{tag} update"), args[0].f32s(), &buf);
            r.same_f32(&format!("{tag} m"), args[1].f32s(), &m);
            r.same_f32(&format!("{tag} v"), args[2].f32s(), &v);
            km = args[1].f32s().to_vec();
            kv = args[2].f32s().to_vec();
        }
    }

    // f32 weights, and bf16 weights (`_w16`): the CPU's f32 step, then RNE to bf16
    for (kname, w16) in [("bnb32", false), ("bnb32_w16", true)] {
        for lib in emu.with(kname) {
            for wd in [0.0f32, 0.01] {
                let p0 = vals(n, 2, 1.0);
                let p0 = if w16 {
                    p0.iter().map(|&x| bf16_to_f32(f32_to_bf16(x))).collect()
                } else {
                    p0
                };
                let (mut p, mut m, mut v) = (p0, vec![0.0f32; n], vec![0.0f32; n]);
                let (mut kp, mut km, mut kv) = (p.clone(), m.clone(), v.clone());
                for step in 1..=3 {
                    let h = hp(step, wd);
                    let g = grads(n, 30 + step, None);
                    let (ss, eps2) = h.bnb_factors();
                    let decay = 1.0 - h.lr * h.weight_decay;
                    let mut args = vec![
                        weights(&kp, w16),
                        Arg::F32s(g.clone()),
                        Arg::F32s(km),
                        Arg::F32s(kv),
                        Arg::F32(ss),
                        Arg::F32(eps2),
                        Arg::F32(h.beta1),
                        Arg::F32(h.beta2),
                        Arg::F32(h.weight_decay),
                        Arg::F32(decay),
                        Arg::U64s(vec![7]), // running count, not reset by the step
                        Arg::U64(n as u64),
                    ];
                    lib.launch(kname, launch::elems(n), &mut args);
                    let skipped = adam8::step32(&mut p, &g, &mut m, &mut v, h);
                    round_weights(&mut p, w16);
                    let tag = format!("{}/{kname} wd={wd} step {step}", lib.module);
                    r.same_f32(&format!("{tag} p"), &weights_f32(&args[0]), &p);
                    r.same_f32(&format!("{tag} m"), args[2].f32s(), &m);
                    r.same_f32(&format!("{tag} v"), args[3].f32s(), &v);
                    r.same(&format!("{tag} skipped"), args[10].u64s(), &[7 + skipped]);
                    assert!(skipped > 0);
                    kp = weights_f32(&args[0]);
                    km = args[2].f32s().to_vec();
                    kv = args[3].f32s().to_vec();
                }
            }
        }
    }

    let (smap, umap) = (adam8::dynamic_map(true), adam8::dynamic_map(false));
    let maps = adam8::Maps::new();
    for (kname, w16) in [("adam8", false), ("adam8_w16", true)] {
        for lib in emu.with(kname) {
            // partial last blocks; one block whose gradients are all non-finite
            for (block, n, wd) in [
                (256usize, 256 * 5 + 77, 0.0f32),
                (2048, 2048 * 2 + 1000, 0.01),
            ] {
                let mut p = vals(n, 3, 1.0);
                round_weights(&mut p, w16);
                let mut st = State8::new(n, block);
                let mut kp = p.clone();
                let mut ks = st.clone();
                for step in 1..=3 {
                    let h = hp(step, wd);
                    let g = grads(n, 40 + step, Some((block, block)));
                    let (ss, eps2) = h.bnb_factors();
                    let decay = 1.0 - h.lr * h.weight_decay;
                    let mut args = vec![
                        weights(&kp, w16),
                        Arg::F32s(g.clone()),
                        Arg::U8s(ks.m.clone()),
                        Arg::U8s(ks.v.clone()),
                        Arg::F32s(ks.absmax_m.clone()),
                        Arg::F32s(ks.absmax_v.clone()),
                        Arg::F32s(smap.to_vec()),
                        Arg::F32s(umap.to_vec()),
                        Arg::F32(ss),
                        Arg::F32(eps2),
                        Arg::F32(h.beta1),
                        Arg::F32(h.beta2),
                        Arg::F32(h.weight_decay),
                        Arg::F32(decay),
                        Arg::I32(block as i32),
                        Arg::U64s(vec![7]), // running count, not reset by the step
                        Arg::U64(n as u64),
                    ];
                    lib.launch(kname, launch::adam8(n, block), &mut args);
                    let skipped = adam8::step8(&mut p, &g, &mut st, &maps, h);
                    round_weights(&mut p, w16);
                    let tag = format!("{}/{kname} block {block} step {step}", lib.module);
                    r.same_f32(&format!("{tag} p"), &weights_f32(&args[0]), &p);
                    r.same(&format!("{tag} m codes"), args[2].u8s(), &st.m);
                    r.same(&format!("{tag} v codes"), args[3].u8s(), &st.v);
                    r.same_f32(&format!("{tag} absmax m"), args[4].f32s(), &st.absmax_m);
                    r.same_f32(&format!("{tag} absmax v"), args[5].f32s(), &st.absmax_v);
                    r.same(&format!("{tag} skipped"), args[15].u64s(), &[7 + skipped]);
                    assert!(skipped >= block as u64);
                    kp = weights_f32(&args[0]);
                    ks.m = args[2].u8s().to_vec();
                    ks.v = args[3].u8s().to_vec();
                    ks.absmax_m = args[4].f32s().to_vec();
                    ks.absmax_v = args[5].f32s().to_vec();
                }
            }
        }
    }

    let be = cpu();
    for lib in emu.with("sanitize") {
        let x = grads(n, 50, Some((1000, 300)));
        // the counter is a running total (read and reset by take_nonfinite)
        let mut args = vec![Arg::F32s(x.clone()), Arg::U64s(vec![5]), Arg::U64(n as u64)];
        lib.launch("sanitize", launch::elems(n), &mut args);
        let mut b = cbuf(&be, &x);
        be.sanitize(&mut b, n);
        let count = be.take_nonfinite();
        assert!(count >= 300);
        r.same_f32(
            &format!("{}/sanitize values", lib.module),
            args[0].f32s(),
            &b.data,
        );
        r.same(
            &format!("{}/sanitize count", lib.module),
            args[1].u64s(),
            &[5 + count],
        );
    }

    for lib in emu.with("sumsq_partial") {
        let sum = emu
            .with("sum_partials")
            .into_iter()
            .find(|l| l.module == lib.module)
            .expect("sum_partials beside sumsq_partial");
        // fewer elements than threads, and more (the grid-stride loop)
        for n in [1000usize, 256 * 1024 + 4321] {
            let x = vals(n, 60 + n as u64, 2.0);
            let mut a = vec![
                Arg::F32s(x.clone()),
                Arg::F64s(vec![0.0; PARTS]),
                Arg::U64(n as u64),
            ];
            lib.launch("sumsq_partial", launch::sumsq_partial(), &mut a);
            let exact: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let cpu_sum = be.sumsq(&cbuf(&be, &x), n);
            // sum_partials(part, out, parts[, acc]): with `acc` it adds to a running total
            let accumulates = sum.signature("sum_partials").len() == 4;
            for acc in if accumulates { vec![0, 1] } else { vec![0] } {
                let start = if acc == 1 { 1234.5 } else { -1.0 };
                let mut b = vec![
                    Arg::F64s(a[1].f64s().to_vec()),
                    Arg::F64s(vec![start]),
                    Arg::I32(PARTS as i32),
                ];
                if accumulates {
                    b.push(Arg::I32(acc));
                }
                sum.launch("sum_partials", launch::sum_partials(), &mut b);
                let got = b[1].f64s()[0] - if acc == 1 { start } else { 0.0 };
                for (what, want) in [("f64 sum", exact), ("CPU sumsq", cpu_sum)] {
                    let e = (got - want).abs() / want;
                    r.note(format!(
                        "{}/sumsq n={n} acc={acc}: relative difference to the {what} {e:.1e}",
                        lib.module
                    ));
                    if e > 1e-12 {
                        r.failures.push(format!(
                            "{}/sumsq n={n} acc={acc}: {got} vs {what} {want}",
                            lib.module
                        ));
                    }
                }
            }
        }
    }
    r.note("adamw, galore_adam, bnb32, adam8 (blocks 256 and 2048), sanitize: compared bit for bit over 3 steps".into());
    r.finish();
}

/// A weight argument: f32, or bf16 bits (`w16` kernels).
fn weights(p: &[f32], w16: bool) -> Arg {
    if w16 {
        Arg::U16s(p.iter().map(|&x| f32_to_bf16(x)).collect())
    } else {
        Arg::F32s(p.to_vec())
    }
}

fn weights_f32(a: &Arg) -> Vec<f32> {
    match a {
        Arg::U16s(v) => v.iter().map(|&h| bf16_to_f32(h)).collect(),
        other => other.f32s().to_vec(),
    }
}

/// What bf16 storage does to the CPU's f32 result: one round to nearest even.
fn round_weights(p: &mut [f32], w16: bool) {
    if w16 {
        p.iter_mut().for_each(|x| *x = bf16_to_f32(f32_to_bf16(*x)));
    }
}
