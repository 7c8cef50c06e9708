//! The device collective (`Collectives`): in a data-parallel job the gradients are summed
//! across ranks by NCCL, in place on the backend's stream (`crate::dist::nccl`). The route
//! is decided by every rank together at the first sum; host staging through MPI answers
//! `false`, and the caller sums through host memory.

use super::memory::{CudaBuf, Store};
use super::Cuda;
use crate::backend::Collectives;
use crate::dist::nccl::{self, Comm, Link};
use crate::error::Result;
use cudarc::driver::CudaStream;
use std::sync::Arc;

impl Cuda {
    /// The stream every operation of this backend is queued on (a communicator for it is
    /// created on this stream).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Sums this backend's buffers through `comm` from now on, whatever the MPI world
    /// (the GPU check runs a one-rank communicator this way).
    pub fn use_nccl(&self, comm: Comm) {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(Link::Nccl(comm));
    }

    /// Whether this backend's sums run on NCCL (false before the first sum).
    pub fn on_nccl(&self) -> bool {
        matches!(*self.link.lock().unwrap_or_else(|e| e.into_inner()), Some(Link::Nccl(_)))
    }
}

impl Collectives for Cuda {
    fn allreduce_sum(&self, buf: &mut CudaBuf, n: usize) -> Result<bool> {
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        if link.is_none() {
            if crate::dist::size() <= 1 {
                return Ok(false);
            }
            *link = Some(nccl::connect(&self.stream)?);
        }
        match (link.as_ref(), &mut buf.data) {
            (Some(Link::Nccl(c)), Store::F32(x)) => {
                self.pending_error()?;
                c.allreduce_sum(x, n)?;
                Ok(true)
            }
            // gradients are f32; anything else takes the host path
            _ => Ok(false),
        }
    }
}
