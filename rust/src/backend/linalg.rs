//! Linear algebra of the projector refresh: the top singular subspace of a gradient
//! (host reference: `crate::host::linalg`).

use super::memory::Memory;
use crate::error::Result;
use crate::host::linalg::Refresh;

/// Decompositions on backend buffers.
pub trait Linalg: Memory {
    /// Top-`rank` singular vectors of g (rows × cols): the first rank rows of Vᵀ into
    /// `out` (rank × cols) when `right`, else the first rank columns of U (rows × rank).
    /// `prev` is the previous projector (warm start for `Refresh::Randomized`).
    #[allow(clippy::too_many_arguments)]
    fn top_subspace(
        &self,
        g: &Self::Buf,
        rows: usize,
        cols: usize,
        rank: usize,
        right: bool,
        method: Refresh,
        prev: Option<&Self::Buf>,
        seed: u64,
        out: &mut Self::Buf,
    ) -> Result<()>;
}
