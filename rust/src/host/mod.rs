//! Host numerics that both backends use: row-major GEMMs (`matmul`), the projector
//! refresh's decompositions (`linalg`, also the CUDA backend's exact-SVD route) and the
//! RoPE table (`rope`). Nothing here knows about a backend.

pub mod bf16;
pub mod linalg;
pub mod matmul;
pub mod rope;
pub mod simd;
