//! Launch shapes of the CUDA kernels as plain data: grid, block and shared memory of
//! every launch the device backend makes, free of any device type, so the host emulation
//! of the kernels (`rust/tests/kernel_emu/`) launches with the very same shapes, as
//! `plan.rs` does for the GEMMs.

/// Threads per block of the element-wise and per-row kernels.
pub const THREADS: u32 = 256;
/// Blocks of a Σx² reduction's first stage, each writing one f64 partial (`sumsq_partial`).
pub const PARTS: usize = 256;
/// Rows per partial sum of an RMSNorm weight gradient (2048 rows → 64 chunks).
pub const DW_CHUNK: usize = 32;
/// Threads per block of `sumsq_partial` (its shared reduction array; `QG_SUMSQ_THREADS`).
pub const SUMSQ_THREADS: u32 = 1024;
/// State elements per thread of `adam8` (`QG_ADAM8_ITEMS`).
pub const ADAM8_ITEMS: usize = 8;

/// One launch: `grid` blocks of `block` threads with `shared` bytes of dynamic shared
/// memory, as `cuLaunchKernel` takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared: u32,
}

impl Launch {
    pub const fn new(grid: [u32; 3], block: [u32; 3]) -> Launch {
        Launch { grid, block, shared: 0 }
    }
}

/// One thread per element: `THREADS` per block, enough blocks for `n` elements (at least
/// one). Counted in usize: a u32 element count would wrap at 2^32 (large logits).
pub fn elems(n: usize) -> Launch {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, i32::MAX as usize);
    Launch::new([blocks as u32, 1, 1], [THREADS, 1, 1])
}

/// One block of `threads` per row.
pub fn rows(rows: usize, threads: u32) -> Launch {
    Launch::new([rows as u32, 1, 1], [threads, 1, 1])
}

/// A (rows, ⌈c / THREADS⌉) grid of `THREADS`-thread blocks: one block row per token of
/// an embedding lookup (or per distinct token of its grouped backward), blocks across
/// the `c` channels.
pub fn token_rows(rows: usize, c: usize) -> Launch {
    Launch::new([rows as u32, (c as u32).div_ceil(THREADS), 1], [THREADS, 1, 1])
}

/// `rmsnorm_bwd_dw_part`: blocks across the `c` columns, one grid row per chunk of
/// `DW_CHUNK` rows.
pub fn rmsnorm_dw_part(c: usize, chunks: usize) -> Launch {
    Launch::new([(c as u32).div_ceil(THREADS), chunks as u32, 1], [THREADS, 1, 1])
}

/// `rope` on (b, t, heads, hd): one block per (position, head), one thread per pair.
pub fn rope(b: usize, t: usize, heads: usize, hd: usize) -> Launch {
    Launch::new([(b * t) as u32, heads as u32, 1], [(hd / 2).max(1) as u32, 1, 1])
}

/// `adam8` on `len` elements: one block per quantization block of `block` elements,
/// eight elements per thread.
pub fn adam8(len: usize, block: usize) -> Launch {
    Launch::new([len.div_ceil(block) as u32, 1, 1], [(block / ADAM8_ITEMS) as u32, 1, 1])
}

/// `q_requant`: one block per group, the group's threads rounded up to whole warps.
pub fn requant(numel: usize, group: usize) -> Launch {
    Launch::new([(numel / group) as u32, 1, 1], [(group as u32).div_ceil(32) * 32, 1, 1])
}

/// `sumsq_partial`: `PARTS` blocks of `SUMSQ_THREADS` threads.
pub fn sumsq_partial() -> Launch {
    Launch::new([PARTS as u32, 1, 1], [SUMSQ_THREADS, 1, 1])
}

/// `sum_partials`: one thread adds the partials in order.
pub fn sum_partials() -> Launch {
    rows(1, 1)
}

/// `top_eigvecs_rows` / `top_eigvecs_cols`: blocks across the `n` entries of a vector,
/// one grid row per vector of the `k` kept.
pub fn eigvecs(n: usize, k: usize) -> Launch {
    Launch::new([(n as u32).div_ceil(THREADS), k as u32, 1], [THREADS, 1, 1])
}
