//! Exact data parallelism for the global (unfused) step: the gradients every rank computed
//! on its slice of the global batch are summed over the ranks before clipping and the
//! optimizer. Each rank scales its loss gradient by 1 / (targets of the whole global batch),
//! so the sum is the single-process mean over the global batch (exactly, in real
//! arithmetic); the norm, the clipping and the update that follow are then the same on every
//! rank, and so are the INT8 weights (counter-based stochastic rounding needs no broadcast).
//! The sums themselves, whole (`lowrank::full_reduce`) or of the projected matrices' rank-r
//! projections (`lowrank::step`), are in `lowrank`, which counts what they send.

use super::{allreduce_sum, size};
use crate::error::Result;

/// The targets carrying loss over every rank's part of the update (`count` in one process).
pub fn global_count(count: u64) -> Result<u64> {
    if size() <= 1 {
        return Ok(count);
    }
    // f64 holds every count below 2^53 exactly
    let mut v = [count as f64];
    allreduce_sum(&mut v)?;
    super::lowrank::count(super::lowrank::Cat::Scalars, 8);
    Ok(v[0] as u64)
}
