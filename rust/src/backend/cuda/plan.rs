//! The CUDA backend's GEMMs as plain data. The layout arithmetic (row-major operands
//! issued to column-major cuBLAS, strided batches over attention heads) lives here, free
//! of any device type, so `rust/tests/cuda_plan.rs` runs the very same calls through a
//! host emulation of `cublasGemmStridedBatchedEx` and checks them against the CPU engine.

use crate::backend::AttnDims;

/// A strided batch of `count` products; strides in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    pub count: usize,
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

pub const ONE: Batch = Batch { count: 1, a: 0, b: 0, c: 0 };

/// Row-major C[m×n] (row stride ldc, from element c_off) = alpha·op(A)·op(B) + beta·C,
/// A from a_off with row stride lda, B likewise; op transposes when ta / tb.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a_off: usize,
    pub lda: usize,
    pub b_off: usize,
    pub ldb: usize,
    pub beta: f32,
    pub c_off: usize,
    pub ldc: usize,
    pub batch: Batch,
}

/// One operand as cuBLAS sees it: which row-major operand it is, where it starts, its
/// leading dimension and batch stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColOperand {
    /// true: the row-major A; false: the row-major B.
    pub is_a: bool,
    pub off: usize,
    pub ld: usize,
    pub stride: usize,
}

/// The arguments of `cublasGemmStridedBatchedEx` for one `Gemm` (column-major):
/// C′ (m′×n′, ldc) = alpha·op′(first)·op′(second) + beta·C′ per batch entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cublas {
    pub trans_first: bool,
    pub trans_second: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub first: ColOperand,
    pub second: ColOperand,
    pub ldc: usize,
    pub stride_c: usize,
    pub count: usize,
}

impl Gemm {
    /// A row-major matrix is its transpose in column-major order, so Cᵀ = op(B)ᵀ·op(A)ᵀ:
    /// cuBLAS gets B first, A second, with m and n swapped and the same transpose flags.
    pub fn cublas(&self) -> Cublas {
        Cublas {
            trans_first: self.tb,
            trans_second: self.ta,
            m: self.n,
            n: self.m,
            k: self.k,
            first: ColOperand { is_a: false, off: self.b_off, ld: self.ldb, stride: self.batch.b },
            second: ColOperand { is_a: true, off: self.a_off, ld: self.lda, stride: self.batch.a },
            ldc: self.ldc,
            stride_c: self.batch.c,
            count: self.batch.count,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn one(ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32, a: (usize, usize), b: (usize, usize), beta: f32, c: (usize, usize), batch: Batch) -> Gemm {
    Gemm { ta, tb, m, n, k, alpha, a_off: a.0, lda: a.1, b_off: b.0, ldb: b.1, beta, c_off: c.0, ldc: c.1, batch }
}

fn acc(a: bool) -> f32 {
    if a {
        1.0
    } else {
        0.0
    }
}

/// out[n, oc] (+)= inp[n, ic] · w[oc, ic]ᵀ  (A = inp, B = w, C = out)
pub fn matmul(n: usize, ic: usize, oc: usize, accumulate: bool) -> Gemm {
    one(false, true, n, oc, ic, 1.0, (0, ic), (0, ic), acc(accumulate), (0, oc), ONE)
}

/// dinp[n, ic] (+)= dout[n, oc] · w[oc, ic]  (A = dout, B = w, C = dinp)
pub fn matmul_dinp(n: usize, ic: usize, oc: usize, accumulate: bool) -> Gemm {
    one(false, false, n, ic, oc, 1.0, (0, oc), (0, ic), acc(accumulate), (0, ic), ONE)
}

/// dw[oc, ic] (+)= dout[n, oc]ᵀ · inp[n, ic]  (A = dout, B = inp, C = dw)
pub fn matmul_dw(n: usize, ic: usize, oc: usize, accumulate: bool) -> Gemm {
    one(true, false, oc, ic, n, 1.0, (0, oc), (0, ic), acc(accumulate), (0, ic), ONE)
}

/// Rows r0 .. r0 + rows of `matmul_dw` (A = dout from column r0, B = inp, C = the chunk).
pub fn matmul_dw_rows(n: usize, ic: usize, oc: usize, r0: usize, rows: usize) -> Gemm {
    one(true, false, rows, ic, n, 1.0, (r0, oc), (0, ic), 0.0, (0, ic), ONE)
}

/// Gram matrix of g (rows × cols): GᵀG (cols²) when `right`, else GGᵀ (rows²); A = B = g.
pub fn gram(rows: usize, cols: usize, right: bool) -> Gemm {
    if right {
        one(true, false, cols, cols, rows, 1.0, (0, cols), (0, cols), 0.0, (0, cols), ONE)
    } else {
        one(false, true, rows, rows, cols, 1.0, (0, cols), (0, cols), 0.0, (0, rows), ONE)
    }
}

/// Attention's products batch over the kv heads: query head hi = kh·group + g reads kv
/// head kh, so for each sequence bi and each g one strided batch runs over kh. Yields
/// (g, offset of query head g in q/out/dq, of kv head 0 in k/v/dk/dv, of head g's
/// probabilities), sequences outer and g inner: the order in which the query heads of
/// a group accumulate into dk and dv, as on the CPU.
fn head_batches(d: AttnDims) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let (t, c, kvd, group) = (d.t, d.h * d.hd, d.kvh * d.hd, d.h / d.kvh);
    (0..d.b).flat_map(move |bi| (0..group).map(move |g| (g, bi * t * c + g * d.hd, bi * t * kvd, (bi * d.h + g) * t * t)))
}

/// Element strides from kv head kh to kh + 1 in the query-side tensors (q, out, dq), the
/// kv tensors (k, v, dk, dv) and the probabilities.
struct Strides {
    count: usize,
    q: usize,
    kv: usize,
    att: usize,
}

impl Strides {
    fn of(d: AttnDims) -> Strides {
        let group = d.h / d.kvh;
        Strides { count: d.kvh, q: group * d.hd, kv: d.hd, att: group * d.t * d.t }
    }
    fn batch(&self, a: usize, b: usize, c: usize) -> Batch {
        Batch { count: self.count, a, b, c }
    }
}

fn heads(d: AttnDims, f: impl Fn(usize, usize, usize, usize, &Strides) -> Gemm) -> Vec<Gemm> {
    let s = Strides::of(d);
    head_batches(d).map(|(g, qo, ko, ao)| f(g, qo, ko, ao, &s)).collect()
}

/// att = scale · q·kᵀ per head (A = q, B = k, C = att).
pub fn attn_scores(d: AttnDims) -> Vec<Gemm> {
    let (t, hd, c, kvd) = (d.t, d.hd, d.h * d.hd, d.kvh * d.hd);
    let scale = 1.0 / (hd as f32).sqrt();
    heads(d, |_, qo, ko, ao, s| one(false, true, t, t, hd, scale, (qo, c), (ko, kvd), 0.0, (ao, t), s.batch(s.q, s.kv, s.att)))
}

/// out = att·v per head (A = att, B = v, C = out).
pub fn attn_values(d: AttnDims) -> Vec<Gemm> {
    let (t, hd, c, kvd) = (d.t, d.hd, d.h * d.hd, d.kvh * d.hd);
    heads(d, |_, qo, vo, ao, s| one(false, false, t, hd, t, 1.0, (ao, t), (vo, kvd), 0.0, (qo, c), s.batch(s.att, s.kv, s.q)))
}

/// datt = dout·vᵀ per head (A = dout, B = v, C = datt).
pub fn attn_dscores(d: AttnDims) -> Vec<Gemm> {
    let (t, hd, c, kvd) = (d.t, d.hd, d.h * d.hd, d.kvh * d.hd);
    heads(d, |_, qo, vo, ao, s| one(false, true, t, t, hd, 1.0, (qo, c), (vo, kvd), 0.0, (ao, t), s.batch(s.q, s.kv, s.att)))
}

/// dv (+)= attᵀ·dout, the heads of a group accumulating (A = att, B = dout, C = dv).
pub fn attn_dv(d: AttnDims) -> Vec<Gemm> {
    let (t, hd, c, kvd) = (d.t, d.hd, d.h * d.hd, d.kvh * d.hd);
    heads(d, |g, qo, vo, ao, s| one(true, false, t, hd, t, 1.0, (ao, t), (qo, c), acc(g > 0), (vo, kvd), s.batch(s.att, s.q, s.kv)))
}

/// dq = ds·k per head, ds the softmax-backward scores (A = ds, B = k, C = dq).
pub fn attn_dq(d: AttnDims) -> Vec<Gemm> {
    let (t, hd, c, kvd) = (d.t, d.hd, d.h * d.hd, d.kvh * d.hd);
    heads(d, |_, qo, ko, ao, s| one(false, false, t, hd, t, 1.0, (ao, t), (ko, kvd), 0.0, (qo, c), s.batch(s.att, s.kv, s.q)))
}

/// dk (+)= dsᵀ·q, the heads of a group accumulating (A = ds, B = q, C = dk).
pub fn attn_dk(d: AttnDims) -> Vec<Gemm> {
    let (t, hd, c, kvd) = (d.t, d.hd, d.h * d.hd, d.kvh * d.hd);
    heads(d, |g, qo, ko, ao, s| one(true, false, t, hd, t, 1.0, (ao, t), (qo, c), acc(g > 0), (ko, kvd), s.batch(s.att, s.q, s.kv)))
}

// Randomized refresh on A = G (right) or Gᵀ (left), A m′×n′ and G stored rows×cols with
// row stride `ldg` (= cols); Y is k×n′, Z is m′×k, E is k×k (the same steps as the CPU's randomized refresh).

/// Z = A·Yᵀ (A = g, B = y, C = z).
pub fn sketch_z(m: usize, n: usize, k: usize, right: bool, ldg: usize) -> Gemm {
    one(!right, true, m, k, n, 1.0, (0, ldg), (0, n), 0.0, (0, k), ONE)
}

/// Y = Zᵀ·A (A = z, B = g, C = y).
pub fn sketch_y(m: usize, n: usize, k: usize, right: bool, ldg: usize) -> Gemm {
    one(true, !right, k, n, m, 1.0, (0, k), (0, ldg), 0.0, (0, n), ONE)
}

/// S = ZᵀZ, the Rayleigh quotient (A = B = z, C = s).
pub fn ritz(m: usize, k: usize) -> Gemm {
    one(true, false, k, k, m, 1.0, (0, k), (0, k), 0.0, (0, k), ONE)
}

/// The sorted basis: E·Y (k×n′; A = e, B = y) for a right projector, or its transpose
/// Yᵀ·Eᵀ (n′×k; A = y, B = e) for a left one.
pub fn rotate(n: usize, k: usize, right: bool) -> Gemm {
    if right {
        one(false, false, k, n, k, 1.0, (0, k), (0, n), 0.0, (0, n), ONE)
    } else {
        one(true, true, n, k, k, 1.0, (0, n), (0, k), 0.0, (0, k), ONE)
    }
}

/// The rows of each distinct token, for a deterministic parallel embedding backward:
/// (distinct tokens in first-seen order, start of each one's rows in `order` plus the
/// end, the row indices grouped by token and ascending within a token).
pub fn token_groups(tokens: &[i32]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    token_groups_in(tokens, 0, usize::MAX)
}

/// `token_groups` of the tokens in [r0, r0 + rows) only, each distinct token given
/// relative to r0 (its row in a chunk of the table).
pub fn token_groups_in(tokens: &[i32], r0: usize, rows: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let inside = |t: i32| (t as usize) >= r0 && (t as usize - r0) < rows;
    let mut slot = std::collections::HashMap::new();
    let mut uniq = Vec::new();
    let mut count = Vec::new();
    for &t in tokens.iter().filter(|&&t| inside(t)) {
        let u = *slot.entry(t).or_insert_with(|| {
            uniq.push(t);
            count.push(0i32);
            uniq.len() - 1
        });
        count[u] += 1;
    }
    let mut starts = Vec::with_capacity(uniq.len() + 1);
    starts.push(0i32);
    for c in &count {
        starts.push(starts.last().unwrap() + c);
    }
    let mut next: Vec<i32> = starts[..uniq.len()].to_vec();
    let mut order = vec![0i32; *starts.last().unwrap() as usize];
    for (r, t) in tokens.iter().enumerate().filter(|(_, &t)| inside(t)) {
        let u = slot[t];
        order[next[u] as usize] = r as i32;
        next[u] += 1;
    }
    let uniq = uniq.into_iter().map(|t| t - r0 as i32).collect();
    (uniq, starts, order)
}
