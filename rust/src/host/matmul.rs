//! Row-major GEMMs through the `gemm` crate (the engine behind faer and candle).
//! Each function states the product it computes with the shapes used by `nn.Linear`.

use gemm::{gemm, Parallelism};

/// Raw strided GEMM: dst[m×n] = (acc ? dst : 0) + alpha · lhs[m×k] · rhs[k×n], with
/// explicit row/column strides so transposes cost nothing.
///
/// # Safety
/// Pointers must address the full strided extents.
#[allow(clippy::too_many_arguments)]
#[inline]
pub unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    acc: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    alpha: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm(
        m, n, k, dst, dst_cs, dst_rs, acc, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, 1.0, alpha,
        false, false, false, par,
    );
}

pub fn par(threads: usize) -> Parallelism {
    if threads <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    }
}

/// out[n, oc] (+)= inp[n, ic] · w[oc, ic]ᵀ
#[allow(clippy::too_many_arguments)]
pub fn matmul(out: &mut [f32], inp: &[f32], w: &[f32], n: usize, ic: usize, oc: usize, acc: bool, p: Parallelism) {
    assert!(out.len() >= n * oc && inp.len() >= n * ic && w.len() >= oc * ic);
    unsafe {
        gemm_raw(
            n, oc, ic, out.as_mut_ptr(), oc as isize, 1, acc, inp.as_ptr(), ic as isize, 1, w.as_ptr(), 1,
            ic as isize, 1.0, p,
        )
    }
}

/// dinp[n, ic] (+)= dout[n, oc] · w[oc, ic]
#[allow(clippy::too_many_arguments)]
pub fn matmul_dinp(dinp: &mut [f32], dout: &[f32], w: &[f32], n: usize, ic: usize, oc: usize, acc: bool, p: Parallelism) {
    assert!(dinp.len() >= n * ic && dout.len() >= n * oc && w.len() >= oc * ic);
    unsafe {
        gemm_raw(
            n, ic, oc, dinp.as_mut_ptr(), ic as isize, 1, acc, dout.as_ptr(), oc as isize, 1, w.as_ptr(),
            ic as isize, 1, 1.0, p,
        )
    }
}

/// dw[oc, ic] (+)= dout[n, oc]ᵀ · inp[n, ic]
#[allow(clippy::too_many_arguments)]
pub fn matmul_dw(dw: &mut [f32], dout: &[f32], inp: &[f32], n: usize, ic: usize, oc: usize, acc: bool, p: Parallelism) {
    assert!(dw.len() >= oc * ic && dout.len() >= n * oc && inp.len() >= n * ic);
    unsafe {
        gemm_raw(
            oc, ic, n, dw.as_mut_ptr(), ic as isize, 1, acc, dout.as_ptr(), 1, oc as isize, inp.as_ptr(),
            ic as isize, 1, 1.0, p,
        )
    }
}

/// Rows r0 .. r0 + rows of `matmul_dw` (no accumulation): dw[r, ic] = dout[n, r0 + r]ᵀ · inp
/// — the same product on a column window of dout.
#[allow(clippy::too_many_arguments)]
pub fn matmul_dw_rows(dw: &mut [f32], dout: &[f32], inp: &[f32], n: usize, ic: usize, oc: usize, r0: usize, rows: usize, p: Parallelism) {
    assert!(r0 + rows <= oc && dw.len() >= rows * ic && dout.len() >= n * oc && inp.len() >= n * ic);
    unsafe {
        gemm_raw(
            rows, ic, n, dw.as_mut_ptr(), ic as isize, 1, false, dout.as_ptr().add(r0), 1, oc as isize, inp.as_ptr(),
            ic as isize, 1, 1.0, p,
        )
    }
}

/// Plain row-major c[m×n] = a[m×k] · b[k×n] (tests, projector maths).
pub fn matmul_nn(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, p: Parallelism) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    unsafe {
        gemm_raw(m, n, k, c.as_mut_ptr(), n as isize, 1, false, a.as_ptr(), k as isize, 1, b.as_ptr(), n as isize, 1, 1.0, p)
    }
}
