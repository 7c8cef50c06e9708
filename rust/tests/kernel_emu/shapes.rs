//! The launch shapes of `backend/cuda/device.rs` (and `device/refresh.rs`), written once
//! for every test of the emulator: a kernel must be tested with the grid and block the
//! device code gives it, or the test proves nothing about the launch.

use qgalore::quant::QTensor;

/// (grid, block) as cuLaunchKernel takes them.
pub type Cfg = ([u32; 3], [u32; 3]);

/// device.rs's `THREADS`: the block of the elementwise and row kernels.
pub const THREADS: u32 = 256;

/// device.rs's `PARTS`: the partial sums of `sumsq_partial`.
pub const PARTS: usize = 256;

/// device.rs's `grid(n)`: 256 threads per block, enough blocks for n elements.
pub fn grid(n: usize) -> Cfg {
    ([(n as u32).div_ceil(THREADS).max(1), 1, 1], [THREADS, 1, 1])
}

/// device.rs's `rows_cfg(rows, threads)`: one block per row.
pub fn rows_cfg(rows: usize, threads: u32) -> Cfg {
    ([rows as u32, 1, 1], [threads, 1, 1])
}

/// `q_requant`: one block per group, the group rounded up to whole warps.
pub fn requant_cfg(q: &QTensor) -> Cfg {
    (
        [(q.numel / q.group) as u32, 1, 1],
        [(q.group as u32).div_ceil(32) * 32, 1, 1],
    )
}

/// `adam8(_w16)`: one block per quantization block of `block` elements, 8 per thread.
pub fn adam8_cfg(n: usize, block: usize) -> Cfg {
    ([n.div_ceil(block) as u32, 1, 1], [(block / 8) as u32, 1, 1])
}

/// `sumsq_partial`: `PARTS` blocks of 1024 threads striding over the input.
pub fn sumsq_cfg() -> Cfg {
    ([PARTS as u32, 1, 1], [1024, 1, 1])
}

/// `sum_partials`: one thread adds the partial sums in a fixed order.
pub fn sum_partials_cfg() -> Cfg {
    rows_cfg(1, 1)
}

/// `top_eigvecs_rows/cols` (refresh.rs): blocks over the n rows of the eigenvector
/// matrix, one grid row per kept vector.
pub fn eigvecs_cfg(n: usize, rank: usize) -> Cfg {
    (
        [(n as u32).div_ceil(THREADS), rank as u32, 1],
        [THREADS, 1, 1],
    )
}

/// `embedding(_w16)`: one grid row per token, blocks over the c channels.
pub fn embedding_cfg(rows: usize, c: usize) -> Cfg {
    (
        [rows as u32, (c as u32).div_ceil(THREADS), 1],
        [THREADS, 1, 1],
    )
}

/// `embedding_bwd`: one grid row per distinct token, blocks over the c channels.
pub fn embedding_bwd_cfg(uniq: usize, c: usize) -> Cfg {
    (
        [uniq as u32, (c as u32).div_ceil(THREADS), 1],
        [THREADS, 1, 1],
    )
}

/// `rmsnorm_bwd_dw_part`: blocks over the c channels, one grid row per chunk of rows.
pub fn dw_part_cfg(c: usize, chunks: usize) -> Cfg {
    (
        [(c as u32).div_ceil(THREADS), chunks as u32, 1],
        [THREADS, 1, 1],
    )
}

/// `rope`: one block per (position, head), one thread per rotated pair.
pub fn rope_cfg(bt: usize, heads: usize, hd: usize) -> Cfg {
    ([bt as u32, heads as u32, 1], [(hd / 2).max(1) as u32, 1, 1])
}
