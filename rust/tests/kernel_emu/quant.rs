//! quant.cu: quantization, its fused update and bf16 storage, bit for bit against
//! `QTensor`.

use crate::harness::{emu, Arg, Emu, Report};
use crate::vals;
use qgalore::backend::cuda::launch;
use qgalore::quant::{f32_to_bf16, QTensor, Range};
use qgalore::rng;

/// `groups` groups of `kinds` (≤ 9) characters in turn: random, single-signed (the
/// Reference range clips them), constant, all zero, wide, a NaN among finite values, an
/// infinity among finite values (its scale is then infinite, so the fused update sees a
/// group of NaN), all NaN.
fn quant_input(group: usize, groups: usize, kinds: usize, seed: u64) -> Vec<f32> {
    let mut w = Vec::with_capacity(group * groups);
    for gi in 0..groups {
        let r = vals(group, seed + gi as u64, 1.0);
        w.extend(r.iter().enumerate().map(|(j, &x)| match gi % kinds {
            0 => x,
            1 => 1.0 + 0.5 * x,
            2 => -1.0 + 0.5 * x,
            3 => 0.25,
            4 => 0.0,
            5 => 100.0 * x,
            6 if j == group / 2 => f32::NAN,
            7 if j == group / 2 => f32::INFINITY,
            8 => f32::NAN,
            _ => x,
        }));
    }
    w
}

fn q_state_args(
    q: &QTensor,
    src: &[f32],
    decay: f32,
    update: bool,
    range: Range,
    sr: Option<u64>,
) -> Vec<Arg> {
    // device/quant.rs `requant`: src is also passed as delta
    vec![
        Arg::U8s(q.codes.clone()),
        Arg::F32s(q.scale.clone()),
        Arg::F32s(q.zero.clone()),
        Arg::F32s(src.to_vec()),
        Arg::F32s(src.to_vec()),
        Arg::F32(decay),
        Arg::I32(update as i32),
        Arg::I32(q.bits as i32),
        Arg::I32((range == Range::WithZero) as i32),
        Arg::I32(sr.is_some() as i32),
        Arg::U64(sr.unwrap_or(0)),
        Arg::I32(q.group as i32),
    ]
}

/// The CPU's fused update for any bit width: `QTensor::update` is INT8-only, so for INT4
/// the same steps are composed from dequantize and requantize (checked equal to
/// `update` for INT8 below).
fn cpu_update(q: &mut QTensor, delta: &[f32], decay: f32, range: Range, sr: Option<u64>) {
    let mut w = vec![0.0f32; q.numel];
    q.dequantize(&mut w);
    for (x, d) in w.iter_mut().zip(delta) {
        let v = *x + d;
        *x = if decay != 1.0 { v * decay } else { v };
    }
    q.requantize(&w, range, sr);
}

fn check_q(r: &mut Report, what: &str, a: &[Arg], q: &QTensor) {
    r.same(&format!("{what} codes"), a[0].u8s(), &q.codes);
    r.same_f32(&format!("{what} scales"), a[1].f32s(), &q.scale);
    r.same_f32(&format!("{what} zeros"), a[2].f32s(), &q.zero);
}

/// q_requant (quantize and fused update) and q_dequant(_bf16) against the CPU for every
/// bit width, group size and range mode, on `quant_input(.., kinds)`; returns the count.
fn requant_cases(emu: &Emu, r: &mut Report, kinds: usize) -> usize {
    let key = rng::stream_key(7, 3, 1);
    let mut cases = 0;
    for lib in emu.with("q_requant") {
        // group sizes: whole warps, a partial last warp, the 1024 maximum, tiny
        for (bits, group) in [
            (8u8, 256usize),
            (8, 200),
            (8, 1024),
            (4, 256),
            (4, 50),
            (4, 2),
        ] {
            let groups = kinds + 1;
            let numel = group * groups;
            let src = quant_input(group, groups, kinds, 11 + group as u64);
            for range in [Range::WithZero, Range::Reference] {
                let tag = format!("{}/q_requant INT{bits} group {group} {range:?}", lib.module);
                // round-to-nearest and stochastic quantization (update = 0)
                for sr in [None, Some(key)] {
                    let mut q = QTensor::new(numel, bits, group).unwrap();
                    let mut a = q_state_args(&q, &src, 1.0, false, range, sr);
                    lib.launch("q_requant", launch::requant(q.numel, q.group), &mut a);
                    q.requantize(&src, range, sr);
                    check_q(r, &format!("{tag} quantize sr={}", sr.is_some()), &a, &q);
                    cases += 1;
                }
                // the fused update (update = 1) from a quantized state
                let mut q0 = QTensor::new(numel, bits, group).unwrap();
                q0.quantize(&src, range);
                let delta = vals(numel, 99, 0.05);
                for (decay, sr) in [
                    (1.0f32, None),
                    (0.999, None),
                    (1.0, Some(key)),
                    (0.98, Some(key ^ 1)),
                ] {
                    let mut q = q0.clone();
                    let mut a = q_state_args(&q, &delta, decay, true, range, sr);
                    lib.launch("q_requant", launch::requant(q.numel, q.group), &mut a);
                    cpu_update(&mut q, &delta, decay, range, sr);
                    if bits == 8 {
                        // the composed reference is QTensor::update where that exists
                        let mut u = q0.clone();
                        u.update(&delta, decay, range, sr);
                        let composed = [
                            Arg::U8s(q.codes.clone()),
                            Arg::F32s(q.scale.clone()),
                            Arg::F32s(q.zero.clone()),
                        ];
                        check_q(
                            r,
                            "reference: composed update vs QTensor::update",
                            &composed,
                            &u,
                        );
                    }
                    check_q(
                        r,
                        &format!("{tag} update decay={decay} sr={}", sr.is_some()),
                        &a,
                        &q,
                    );
                    cases += 1;
                    dequant_cases(emu, r, lib.module, &q);
                }
            }
        }
    }
    cases
}

/// q_dequant and q_dequant_bf16 of `q` against the CPU's dequantize.
fn dequant_cases(emu: &Emu, r: &mut Report, module: &str, q: &QTensor) {
    let Some(lib) = emu
        .with("q_dequant")
        .into_iter()
        .find(|l| l.module == module)
    else {
        return;
    };
    let (n, bits, group) = (q.numel, q.bits, q.group);
    let mut d = vec![
        Arg::F32s(vec![0.0; n]),
        Arg::U8s(q.codes.clone()),
        Arg::F32s(q.scale.clone()),
        Arg::F32s(q.zero.clone()),
        Arg::I32(bits as i32),
        Arg::I32(group as i32),
        Arg::U64(n as u64),
    ];
    lib.launch("q_dequant", launch::elems(n), &mut d);
    let mut want = vec![0.0f32; n];
    q.dequantize(&mut want);
    r.same_f32(
        &format!("{module}/q_dequant INT{bits} group {group}"),
        d[0].f32s(),
        &want,
    );
    if lib.kernels.contains(&"q_dequant_bf16") {
        // the bf16 GEMM operand: the same values, rounded once
        d[0] = Arg::U16s(vec![0; n]);
        lib.launch("q_dequant_bf16", launch::elems(n), &mut d);
        let want: Vec<u16> = want.iter().map(|&x| f32_to_bf16(x)).collect();
        r.same(
            &format!("{module}/q_dequant_bf16 INT{bits} group {group}"),
            d[0].u16s(),
            &want,
        );
    }
}

#[test]
fn quant_kernels_are_bit_identical_to_the_cpu_quantizer() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("quant");
    let cases = requant_cases(emu, &mut r, 7);
    r.note(format!(
        "q_requant: {cases} cases (INT8/INT4, groups 256/200/1024/50/2, both ranges, RTN and SR, update with and without decay)"
    ));

    // bf16 storage: specials, ties, subnormals, overflow to infinity
    let mut src = vals(1000, 5, 3.0);
    src.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7f80_0001), // signalling NaN, payload in the low bits
        f32::from_bits(0xffc1_2345),
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),           // smallest subnormal
        f32::from_bits(0x3f80_8000), // tie, rounds to even (down)
        f32::from_bits(0x3f81_8000), // tie, rounds to even (up)
        f32::from_bits(0x3f80_8001),
        f32::from_bits(0x7f7f_8000), // rounds up to infinity
    ]);
    let n = src.len();
    let mut q = QTensor::new(n, 16, 0).unwrap();
    q.quantize(&src, Range::WithZero);
    let want: Vec<u16> = q
        .codes
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    for lib in emu.with("bf16_quant") {
        // device/quant.rs passes the tensor's byte buffer; the kernel reads it as bf16_t
        let mut a = vec![
            Arg::U16s(vec![0; n]),
            Arg::F32s(src.clone()),
            Arg::U64(n as u64),
        ];
        lib.launch("bf16_quant", launch::elems(n), &mut a);
        r.same(&format!("{}/bf16_quant", lib.module), a[0].u16s(), &want);
    }
    for lib in emu.with("bf16_dequant") {
        let mut a = vec![
            Arg::F32s(vec![0.0; n]),
            Arg::U16s(want.clone()),
            Arg::U64(n as u64),
        ];
        lib.launch("bf16_dequant", launch::elems(n), &mut a);
        let mut back = vec![0.0f32; n];
        q.dequantize(&mut back);
        r.same_f32(&format!("{}/bf16_dequant", lib.module), a[0].f32s(), &back);
    }
    r.note("q_dequant, q_dequant_bf16, bf16_quant, bf16_dequant: compared bit for bit".into());
    r.finish();
}

/// Groups that are, or become, entirely NaN. This found a kernel bug: for a group of more
/// than 992 elements (32 warps) in the Reference range, `block_max` over all-NaN values was
/// NaN in the kernel (every lane of its last warp stage NaN) where the CPU's fold from ±∞
/// ignores NaN, so the kernel stored a NaN zero point (the CPU stores 0 and the group
/// dequantizes to zeros). Fixed in prelude.cu: block_reduce's max maps NaN to −∞ first.
#[test]
fn quant_kernels_match_the_cpu_on_nan_groups() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("quant (non-finite groups)");
    let cases = requant_cases(emu, &mut r, 9);
    r.note(format!(
        "q_requant: {cases} cases with infinite and all-NaN groups"
    ));
    r.finish();
}
