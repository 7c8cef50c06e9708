//! QLoRA NF4 storage (rust/src/quant/nf4.rs) against its published definition and against
//! bitsandbytes itself: the 16 levels, the dynamic map and double-quantization layout, and the
//! codes / block constants / dequantized values of the fixture tensor that
//! `tools/peft_fixtures.py` quantized with bitsandbytes 0.50.2 (tests/fixtures/peft/).

use qgalore::quant::nf4::{self, Nf4Plain, Nf4Tensor, BLOCK, DQ_BLOCK, NF4, NF4_MID};
use safetensors::SafeTensors;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/peft")
}

/// The fixture file's tensors: name → (shape, raw little-endian bytes).
struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load() -> Self {
        Fixture { bytes: std::fs::read(fixture_dir().join("nf4.safetensors")).unwrap() }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
    fn u8s(&self, name: &str) -> Vec<u8> {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::U8, "{name}");
        t.data().to_vec()
    }
    fn shape(&self, name: &str) -> Vec<usize> {
        self.st().tensor(name).unwrap().shape().to_vec()
    }
}

fn json() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture_dir().join("nf4.json")).unwrap()).unwrap()
}

/// Indices where two f32 slices differ bitwise.
fn bit_diffs(a: &[f32], b: &[f32]) -> Vec<usize> {
    assert_eq!(a.len(), b.len());
    (0..a.len()).filter(|&i| a[i].to_bits() != b[i].to_bits()).collect()
}

/// The NF4 levels as the QLoRA paper (Dettmers et al. 2023, Appendix E) and bitsandbytes
/// `get_4bit_type("nf4")` publish them (Python floats; the table is float32).
const PUBLISHED: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

#[test]
fn the_16_levels_are_the_published_nf4_values() {
    for (i, &p) in PUBLISHED.iter().enumerate() {
        assert_eq!(NF4[i].to_bits(), (p as f32).to_bits(), "level {i}: {} vs published {p}", NF4[i]);
    }
    // and bitsandbytes' quant_state.code of the fixture, bit for bit
    let code = Fixture::load().f32s("nf4_code");
    assert_eq!(bit_diffs(&code, &NF4), Vec::<usize>::new());
    // ascending, code 7 is exactly zero, ±1 at the ends (the codes are an ordered table)
    assert!(NF4.windows(2).all(|w| w[0] < w[1]));
    assert_eq!((NF4[0], NF4[7].to_bits(), NF4[15]), (-1.0, 0, 1.0));
    // the decision bounds are the f32 midpoints
    for i in 0..15 {
        assert_eq!(NF4_MID[i], (NF4[i] + NF4[i + 1]) / 2.0);
    }
}

#[test]
fn the_levels_are_normal_quantiles_as_qlora_builds_them() {
    // QLoRA `create_normal_map(offset=0.9677083, use_extra_value=True)`: 8 positive levels at
    // Φ⁻¹(linspace(offset, 0.5, 9)[:-1]), 7 negative at −Φ⁻¹(linspace(offset, 0.5, 8)[:-1]),
    // and 0, all divided by the largest. Φ⁻¹ here is a bisection on erfc in f64, so the levels
    // agree to far below an f32 ulp of the table (a check of the construction, not of bits).
    fn phi_inv(p: f64) -> f64 {
        let (mut lo, mut hi) = (-10.0f64, 10.0f64);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if 0.5 * erfc(-mid / std::f64::consts::SQRT_2) < p {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    }
    // erfc with a continued fraction / series good to ~1e-15 for |x| < 6
    fn erfc(x: f64) -> f64 {
        if x < 0.0 {
            return 2.0 - erfc(-x);
        }
        if x < 2.0 {
            // erf series
            let mut sum = x;
            let mut term = x;
            let x2 = x * x;
            for n in 1..200 {
                term *= -x2 / n as f64;
                let add = term / (2 * n + 1) as f64;
                sum += add;
                if add.abs() < 1e-18 {
                    break;
                }
            }
            1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            // Lentz continued fraction
            let mut f = 0.0;
            for k in (1..200).rev() {
                f = (k as f64 / 2.0) / (x + f);
            }
            (-x * x).exp() / std::f64::consts::PI.sqrt() / (x + f)
        }
    }
    let offset = 0.9677083f64;
    let lin = |n: usize| (0..n).map(move |i| offset + (0.5 - offset) * i as f64 / (n - 1) as f64);
    let mut v: Vec<f64> = lin(9).take(8).map(phi_inv).collect();
    v.extend(lin(8).take(7).map(|p| -phi_inv(p)));
    v.push(0.0);
    v.sort_by(f64::total_cmp);
    let max = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, x) in v.iter().enumerate() {
        let want = x / max;
        assert!((NF4[i] as f64 - want).abs() < 2e-7, "level {i}: table {} vs construction {want}", NF4[i]);
    }
}

#[test]
fn the_dynamic_map_equals_bitsandbytes() {
    let f = Fixture::load();
    let code = f.f32s("dynamic_code");
    assert_eq!(code.len(), 256);
    assert_eq!(bit_diffs(&code, nf4::dyn_map()), Vec::<usize>::new(), "create_dynamic_map(signed=True)");
    // 127 negatives, 0, 128 positives, range [−0.99296874, 1]
    let d = nf4::dyn_map();
    assert_eq!((d.iter().filter(|x| **x < 0.0).count(), d.iter().filter(|x| **x == 0.0).count()), (127, 1));
    assert_eq!((d[0], d[255]), (-0.99296875, 1.0));
    assert!(d.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn dynamic_map_vs_adam8() {
    // adam8's map computes the linspace and the scale in f64 (its own reference): it differs
    // from bitsandbytes' torch-built f32 map in a few entries by an ulp or two, which is why
    // NF4 double quantization has its own construction.
    let torch_built = nf4::dyn_map();
    let f64_built = qgalore::quant::adam8::dynamic_map(true);
    let diffs = bit_diffs(torch_built, &f64_built);
    for &i in &diffs {
        let ulps = (torch_built[i].to_bits() as i64 - f64_built[i].to_bits() as i64).abs();
        assert!(ulps <= 2, "entry {i}: {} vs {} ({ulps} ulps)", torch_built[i], f64_built[i]);
    }
    eprintln!("dynamic map: torch-built and f64-built differ at {} entries: {diffs:?}", diffs.len());
}

#[test]
fn fixture_shape_and_layout_are_the_double_quantization_layout() {
    let f = Fixture::load();
    let j = json();
    let qs = &j["quant_state"];
    let n = qs["numel"].as_u64().unwrap() as usize;
    assert_eq!((n, qs["blocksize"].as_u64(), qs["nested_blocksize"].as_u64()), (16899, Some(BLOCK as u64), Some(DQ_BLOCK as u64)));
    assert_eq!(qs["quant_type"], "nf4");
    assert_eq!(f.shape("input"), [129, 131]);
    let nb = n.div_ceil(BLOCK);
    assert_eq!(nb, 265);
    // ⌈n/2⌉ packed bytes, one u8 constant per block of 64, one f32 per group of 256 constants
    assert_eq!(f.u8s("codes").len(), n.div_ceil(2));
    assert_eq!(f.u8s("qabsmax").len(), nb);
    assert_eq!(f.f32s("absmax2").len(), nb.div_ceil(DQ_BLOCK));
    assert_eq!(f.f32s("offset").len(), 1);
    // the storage formula the memory plan uses counts exactly these arrays
    assert_eq!(Nf4Tensor::storage_bytes(n), n.div_ceil(2) + nb + 4 * nb.div_ceil(DQ_BLOCK) + 4);
    // offset = mean of the first-level absmax (torch's f32 mean); the fixture's json agrees
    let absmax = f.f32s("absmax");
    let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / nb as f64;
    let off = f.f32s("offset")[0];
    assert!((off as f64 - mean).abs() <= 1e-7 * mean, "offset {off} vs mean {mean}");
    assert_eq!(qs["offset"].as_f64().unwrap() as f32, off);
    // dequantizing bnb's own state by the documented formula gives bnb's dequantized tensor:
    // absmax_j = dyn[q_j]·absmax2[j/256] + offset, w_k = NF4[code_k]·absmax_{k/64}
    let (codes, q, a2) = (f.u8s("codes"), f.u8s("qabsmax"), f.f32s("absmax2"));
    let d = nf4::dyn_map();
    let am: Vec<f32> = (0..nb).map(|j| d[q[j] as usize] * a2[j / DQ_BLOCK] + off).collect();
    let deq: Vec<f32> = (0..n).map(|k| NF4[((codes[k / 2] >> if k % 2 == 0 { 4 } else { 0 }) & 15) as usize] * am[k / BLOCK]).collect();
    assert_eq!(bit_diffs(&deq, &f.f32s("dequantized")), Vec::<usize>::new());
    // the pad nibble of the odd count is code 7 (= 0.0)
    assert_eq!(codes[n / 2] & 0x0f, 7);
}

#[test]
fn our_codes_of_the_fixture_tensor_equal_bitsandbytes() {
    let f = Fixture::load();
    let x = f.f32s("input");
    let n = x.len();

    // first level: codes and raw absmax (compress_statistics=False)
    let p = Nf4Plain::quantize(&x).unwrap();
    assert_eq!(p.codes, f.u8s("codes"), "packed NF4 codes");
    assert_eq!(bit_diffs(&p.absmax, &f.f32s("absmax")), Vec::<usize>::new(), "block absmax");
    let mut back = vec![0.0f32; n];
    p.dequantize(&mut back);
    assert_eq!(bit_diffs(&back, &f.f32s("dequantized_plain")), Vec::<usize>::new(), "plain dequantization");

    // double quantization
    let t = Nf4Tensor::quantize(&x).unwrap();
    assert_eq!(t.codes, p.codes);
    let off = f.f32s("offset")[0];
    assert_eq!(t.offset.to_bits(), off.to_bits(), "offset: ours {} bnb {off}", t.offset);
    assert_eq!(t.qabsmax, f.u8s("qabsmax_ref"), "qabsmax vs bnb reference kernel");
    assert_eq!(bit_diffs(&t.absmax2, &f.f32s("absmax2_ref")), Vec::<usize>::new(), "absmax2 vs bnb reference kernel");
    // this tensor's constants are ones where bnb's native CPU kernel (a lookup table that
    // approximates the nearest code) and its reference kernel agree (nf4.json records where
    // they differ: nowhere), so ours equal what quantize_4bit returned on the CPU too
    let native_diff = json()["quant_state"]["qabsmax_diff_native_vs_ref"].as_array().unwrap().len();
    assert_eq!(native_diff, 0);
    assert_eq!(t.qabsmax, f.u8s("qabsmax"), "qabsmax vs quantize_4bit on the CPU");
    assert_eq!(bit_diffs(&t.absmax2, &f.f32s("absmax2")), Vec::<usize>::new());
    assert_eq!(t.bytes(), Nf4Tensor::storage_bytes(n));

    let mut back = vec![0.0f32; n];
    t.dequantize(&mut back);
    assert_eq!(bit_diffs(&back, &f.f32s("dequantized")), Vec::<usize>::new(), "dequantize_4bit");
    assert_eq!(bit_diffs(&back, &f.f32s("dequantized_ref")), Vec::<usize>::new());
    // the block constants as bnb dequantizes them (dyn·absmax2 + offset)
    let d = nf4::dyn_map();
    let (q, a2) = (f.u8s("qabsmax"), f.f32s("absmax2"));
    let want: Vec<f32> = (0..q.len()).map(|j| d[q[j] as usize] * a2[j / DQ_BLOCK] + off).collect();
    assert_eq!(bit_diffs(&t.absmax(), &want), Vec::<usize>::new());

    // row slices dequantize to the same values (rows of 131 straddle blocks of 64)
    let cols = 131;
    for rows in [0..1, 3..7, 60..129, 128..129] {
        let mut o = vec![0.0f32; rows.len() * cols];
        t.dequantize_rows(cols, rows.clone(), &mut o);
        assert_eq!(bit_diffs(&o, &back[rows.start * cols..rows.end * cols]), Vec::<usize>::new(), "rows {rows:?}");
    }
}

#[test]
fn zero_block_and_midpoint_ties_as_bitsandbytes() {
    let f = Fixture::load();
    let x = f.f32s("input");
    let codes = f.u8s("codes");
    let code = |k: usize| (codes[k / 2] >> if k % 2 == 0 { 4 } else { 0 }) & 15;
    // block 3 is all zeros: absmax 0 (bnb floors only the reciprocal), every code 7
    assert!(x[3 * 64..4 * 64].iter().all(|v| *v == 0.0));
    assert_eq!(f.f32s("absmax")[3], 0.0);
    assert!((3 * 64..4 * 64).all(|k| code(k) == 7));
    // block 10 holds NF4_MID[i]·0.5 at element 1 + i with absmax 0.5: a value exactly on a
    // midpoint takes the LOWER code (bucketize, right=False)
    assert_eq!(f.f32s("absmax")[10], 0.5);
    for (i, mid) in NF4_MID.iter().enumerate() {
        let k = 10 * 64 + 1 + i;
        assert_eq!(x[k], mid * 0.5);
        assert_eq!(code(k) as usize, i, "midpoint {i}");
    }
    // and ours agree on both (covered bitwise above; named here for the rule)
    let t = Nf4Plain::quantize(&x).unwrap();
    assert_eq!(t.codes[10 * 32..11 * 32], codes[10 * 32..11 * 32]);
    assert_eq!(t.codes[3 * 32..4 * 32], codes[3 * 32..4 * 32]);
}

#[test]
fn a_bf16_checkpoint_quantizes_as_bitsandbytes_quantizes_it() {
    // bnb quantizes a bf16 weight's f32 conversion; the engine imports bf16 exactly into f32
    // and quantizes that: the same codes and constants
    let f = Fixture::load();
    let st = f.st();
    let t = st.tensor("input_bf16").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::BF16);
    let x: Vec<f32> = t.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    assert_eq!(x.len(), 16899);
    let q = Nf4Tensor::quantize(&x).unwrap();
    assert_eq!(json()["quant_state"]["qabsmax_bf16_diff_native_vs_ref"].as_array().unwrap().len(), 0);
    assert_eq!(q.codes, f.u8s("codes_bf16"));
    assert_eq!(q.qabsmax, f.u8s("qabsmax_bf16"));
    assert_eq!(bit_diffs(&q.absmax2, &f.f32s("absmax2_bf16")), Vec::<usize>::new());
    assert_eq!(q.offset.to_bits(), f.f32s("offset_bf16")[0].to_bits());
    // and rounding to bf16 moved some codes, so this is a second, different check
    assert_ne!(q.codes, f.u8s("codes"));
}
