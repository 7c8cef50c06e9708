//! nf4.cu: QLoRA's NF4 dequantization of a row range, bit for bit against
//! `Nf4Tensor::dequantize_rows` (and bitsandbytes' own dequantized fixture tensor).

use crate::harness::{emu, Arg, Emu, Report};
use crate::vals;
use qgalore::backend::cuda::launch;
use qgalore::quant::f32_to_bf16;
use qgalore::quant::nf4::{self, Nf4Tensor, DQ_BLOCK};
use qgalore::rng;
use safetensors::SafeTensors;
use std::ops::Range;

/// Launches nf4_dequant and nf4_dequant_bf16 on rows `rows` of `t` viewed as [.., cols],
/// with the arguments device/quant.rs `nf4_dequantize_rows` passes, and compares with the
/// CPU's `dequantize_rows` (and `want` where given: bitsandbytes' values of those rows).
fn rows_case(emu: &Emu, r: &mut Report, what: &str, t: &Nf4Tensor, cols: usize, rows: Range<usize>, want: Option<&[f32]>) {
    let (start, end) = (rows.start * cols, rows.end * cols);
    let n = end - start;
    let mut cpu = vec![0.0f32; n];
    t.dequantize_rows(cols, rows.clone(), &mut cpu);
    if let Some(w) = want {
        r.same_f32(&format!("{what} rows {rows:?}: CPU vs bitsandbytes"), &cpu, w);
    }
    for lib in emu.with("nf4_dequant") {
        // a buffer one value longer than the rows: the kernel writes exactly n values
        let mut a = vec![
            Arg::F32s(vec![-7.0; n + 1]),
            Arg::U8s(t.codes.clone()),
            Arg::U8s(t.qabsmax.clone()),
            Arg::F32s(t.absmax2.clone()),
            Arg::F32s(nf4::kernel_tables()),
            Arg::F32(t.offset),
            Arg::U64(start as u64),
            Arg::U64(n as u64),
        ];
        lib.launch("nf4_dequant", launch::elems(n), &mut a);
        r.same_f32(&format!("{}/nf4_dequant {what} rows {rows:?}", lib.module), &a[0].f32s()[..n], &cpu);
        r.same_f32(&format!("{}/nf4_dequant {what} rows {rows:?}: past the end", lib.module), &a[0].f32s()[n..], &[-7.0]);
        // the bf16 GEMM operand: the same values rounded once, as an upload rounds them
        a[0] = Arg::U16s(vec![0x1234; n + 1]);
        lib.launch("nf4_dequant_bf16", launch::elems(n), &mut a);
        let want16: Vec<u16> = cpu.iter().map(|&x| f32_to_bf16(x)).collect();
        r.same(&format!("{}/nf4_dequant_bf16 {what} rows {rows:?}", lib.module), &a[0].u16s()[..n], &want16);
        r.same(&format!("{}/nf4_dequant_bf16 {what} rows {rows:?}: past the end", lib.module), &a[0].u16s()[n..], &[0x1234]);
    }
}

/// The bitsandbytes fixture (tools/peft_fixtures.py): a [129, 131] tensor, 16899 elements (an
/// odd count, a partial last block, two groups of 256 block constants).
struct Fixture(Vec<u8>);

impl Fixture {
    fn load() -> Fixture {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/peft/nf4.safetensors");
        Fixture(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
    }
    fn bytes(&self, name: &str) -> Vec<u8> {
        SafeTensors::deserialize(&self.0).unwrap().tensor(name).unwrap().data().to_vec()
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        self.bytes(name).chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
}

#[test]
fn nf4_kernels_dequantize_the_bitsandbytes_fixture_bit_for_bit() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("nf4 (bitsandbytes fixture)");
    let f = Fixture::load();
    let (rows, cols) = (129, 131);
    // bitsandbytes' own quantized state, as bnb stored it
    let t = Nf4Tensor {
        numel: rows * cols,
        codes: f.bytes("codes"),
        qabsmax: f.bytes("qabsmax"),
        absmax2: f.f32s("absmax2"),
        offset: f.f32s("offset")[0],
    };
    assert_eq!(t.absmax2.len(), 2);
    // and ours of bnb's input, which is the same state (tests/nf4.rs)
    let ours = Nf4Tensor::quantize(&f.f32s("input")).unwrap();
    assert_eq!(ours, t, "our quantization of the fixture input is bnb's");
    let deq = f.f32s("dequantized");
    // rows of 131 straddle blocks of 64; the last row ends in the partial block
    let mut cases = 0;
    for range in [0..rows, 0..1, 3..7, 60..129, 128..129, 64..65, 5..5] {
        let want = &deq[range.start * cols..range.end * cols];
        rows_case(emu, &mut r, "fixture", &t, cols, range, Some(want));
        cases += 1;
    }
    r.note(format!("{cases} row ranges of the [129, 131] fixture, f32 and bf16"));
    r.finish();
}

/// A tensor whose 256 blocks use every code of the dynamic map once and every NF4 nibble, so
/// the tables the kernel reads (`nf4::kernel_tables`) are checked entry by entry.
fn every_code() -> Nf4Tensor {
    let nb = 256;
    let numel = nb * nf4::BLOCK;
    let key = rng::stream_key(11, 4, 0);
    Nf4Tensor {
        numel,
        codes: (0..numel / 2).map(|i| (rng::bits32(key, i as u64) & 0xff) as u8).collect(),
        // a permutation of 0..=255
        qabsmax: (0..nb).map(|j| ((j * 97 + 13) % 256) as u8).collect(),
        absmax2: vec![0.037_5],
        offset: 0.012_3,
    }
}

#[test]
fn nf4_kernels_match_dequantize_rows_on_random_tensors() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("nf4 (random tensors)");
    let mut cases = 0;
    let t = every_code();
    let mut seen = [false; 256];
    t.qabsmax.iter().for_each(|&q| seen[q as usize] = true);
    assert!(seen.iter().all(|&s| s), "every dynamic-map code");
    for range in [0..128, 1..2, 17..100, 127..128] {
        rows_case(emu, &mut r, "every code [128, 128]", &t, 128, range, None);
        cases += 1;
    }
    // quantized random weights: (rows, cols) with an odd count and a partial last block, more
    // than 256 blocks (three second-level groups), a zero block, rows narrower than a block
    for (seed, rows, cols) in [(1u64, 37usize, 97usize), (2, 257, 129), (3, 300, 40), (4, 9, 7)] {
        let n = rows * cols;
        let mut w = vals(n, 40 + seed, 0.05);
        // a block of zeros (code 7 everywhere, constant offset-only) and a wide one
        for x in w.iter_mut().skip(64).take(64) {
            *x = 0.0;
        }
        for x in w.iter_mut().skip(128).take(64.min(n.saturating_sub(128))) {
            *x *= 400.0;
        }
        let t = Nf4Tensor::quantize(&w).unwrap();
        assert_eq!(t.absmax2.len(), nf4::blocks(n).div_ceil(DQ_BLOCK));
        let mid = rows / 2;
        for range in [0..rows, 0..1, mid..mid + 1, 1..rows - 1, rows - 1..rows, mid..rows] {
            rows_case(emu, &mut r, &format!("random [{rows}, {cols}]"), &t, cols, range, None);
            cases += 1;
        }
    }
    r.note(format!("{cases} row ranges of random tensors and of one using every table entry, f32 and bf16"));
    r.finish();
}
