//! Exact data parallelism for the global (unfused) step: the gradients every rank computed
//! on its slice of the global batch are summed over the ranks before clipping and the
//! optimizer. Each rank scales its loss gradient by 1 / (targets of the whole global batch),
//! so the sum is the single-process mean over the global batch (exactly, in real
//! arithmetic); the norm, the clipping and the update that follow are then the same on every
//! rank, and so are the INT8 weights (counter-based stochastic rounding needs no broadcast).

use super::{allreduce_sum, size};
use crate::backend::Backend;
use crate::error::Result;
use crate::model::Grads;

/// The targets carrying loss over every rank's part of the update (`count` in one process).
pub fn global_count(count: u64) -> Result<u64> {
    if size() <= 1 {
        return Ok(count);
    }
    // f64 holds every count below 2^53 exactly
    let mut v = [count as f64];
    allreduce_sum(&mut v)?;
    Ok(v[0] as u64)
}

/// Sums the loss (a rank's NLL over the global count) and the gradients of the `train`
/// tensors (`numel(i)` values each) over the ranks, in place; a no-op in a one-rank world.
/// Returns the global mean loss.
pub fn reduce_step<B: Backend>(be: &B, grads: &mut Grads<B>, train: &[usize], numel: impl Fn(usize) -> usize, loss: f64) -> Result<f64> {
    if size() <= 1 {
        return Ok(loss);
    }
    let mut l = [loss];
    allreduce_sum(&mut l)?;
    be.sync()?;
    for &i in train {
        let n = numel(i);
        let g = grads.get_mut(i);
        if be.allreduce_sum(g, n)? {
            continue; // summed on the device (NCCL)
        }
        let mut h = be.to_host(g, n)?.into_owned();
        allreduce_sum(&mut h)?;
        be.upload(g, &h)?;
    }
    Ok(l[0])
}
