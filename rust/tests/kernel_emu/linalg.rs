//! linalg.cu: the projector's eigenvector extraction and the transpose, bit for bit
//! against `linalg::top_subspace`.

use crate::harness::{emu, Arg, Report};
use crate::vals;
use qgalore::host::{linalg, matmul};
use qgalore::backend::cuda::launch;
use qgalore::backend::Refresh;

/// The eigenvector matrix of `c` (n×n, symmetric) as cuSOLVER's syevd leaves it:
/// column-major, eigenvalues ascending; the same faer decomposition the CPU uses.
fn syevd_like(c: &[f32], n: usize) -> Vec<f32> {
    let evd = faer::MatRef::from_row_major_slice(c, n, n)
        .self_adjoint_eigen(faer::Side::Lower)
        .unwrap();
    let u = evd.U();
    let mut a = vec![0.0f32; n * n];
    for col in 0..n {
        for row in 0..n {
            a[col * n + row] = u[(row, col)];
        }
    }
    a
}

#[test]
fn eigenvector_kernels_extract_the_cpu_projector() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("linalg");
    // right: n = cols = 300 (two blocks, the second partial); left: n = rows = 260
    for (rows, cols, rank, right) in [
        (40usize, 300usize, 5usize, true),
        (260, 30, 4, false),
        (20, 33, 1, true),
    ] {
        let g = vals(rows * cols, 70 + rows as u64, 1.0);
        let mut want = vec![0.0f32; rows * cols];
        linalg::top_subspace(
            &g,
            rows,
            cols,
            rank,
            right,
            Refresh::Eigh,
            None,
            0,
            &mut want,
            1,
        )
        .unwrap();
        let pn = if right { rank * cols } else { rows * rank };
        // the Gram matrix exactly as the CPU forms it (the left case works on Gᵀ)
        let n = if right { cols } else { rows };
        let mut gm = g.clone();
        let m = if right { rows } else { cols };
        if !right {
            for i in 0..rows {
                for j in 0..cols {
                    gm[j * rows + i] = g[i * cols + j];
                }
            }
        }
        let mut c = vec![0.0f32; n * n];
        matmul::matmul_dw(&mut c, &gm, &gm, m, n, n, false, matmul::par(1));
        let a = syevd_like(&c, n);
        let name = if right {
            "top_eigvecs_rows"
        } else {
            "top_eigvecs_cols"
        };
        for lib in emu.with(name) {
            let mut args = vec![
                Arg::F32s(vec![0.0; pn]),
                Arg::F32s(a.clone()),
                Arg::I32(n as i32),
                Arg::I32(rank as i32),
            ];
            lib.launch(name, launch::eigvecs(n, rank), &mut args);
            r.same_f32(
                &format!("{}/{name} {rows}×{cols} rank {rank}", lib.module),
                args[0].f32s(),
                &want[..pn],
            );
        }
    }
    // transpose (the left projector into Y's rows on the randomized refresh path)
    for lib in emu.libs.iter().filter(|l| l.kernels.contains(&"transpose")) {
        for (rows, cols) in [(37usize, 53usize), (300, 4), (1, 7)] {
            let x = vals(rows * cols, 80 + rows as u64, 1.0);
            let mut want = vec![0.0f32; rows * cols];
            for i in 0..rows {
                for j in 0..cols {
                    want[j * rows + i] = x[i * cols + j];
                }
            }
            let mut args = vec![
                Arg::F32s(vec![0.0; rows * cols]),
                Arg::F32s(x),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
            ];
            lib.launch("transpose", launch::elems(rows * cols), &mut args);
            r.same_f32(
                &format!("{}/transpose {rows}×{cols}", lib.module),
                args[0].f32s(),
                &want,
            );
        }
    }
    r.note("top_eigvecs_rows/cols: bit-identical to linalg::top_subspace(Eigh) given the same decomposition".into());
    r.note("transpose: exact".into());
    r.finish();
}
