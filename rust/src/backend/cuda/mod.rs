//! CUDA backend (feature `cuda`): run-time loading of the CUDA libraries through cudarc,
//! kernels compiled by NVRTC to machine code for the device and cached on disk.
//!
//! Status: the kernels compile with NVRTC in CI and run under a CPU emulation of CUDA
//! (`rust/tests/kernel_emu/`); the GEMM plan handed to cuBLAS (`plan.rs`) runs under a
//! host emulation of cuBLAS (`rust/tests/cuda_plan.rs`); the device backend (`device.rs`,
//! `device/`) builds everywhere and passes host emulation; its GPU run (the parity tests
//! and `bench/gpu.ts`) is prepared by `tools/gpu-check.sh`.
//!
//! Launch shapes (`launch.rs`) and GEMM layouts (`plan.rs`) are plain data, free of device
//! types, so the emulations run the very shapes and layouts the device code uses.

pub use device::Cuda;

pub mod device;
pub mod kernels;
pub mod launch;
pub mod plan;
pub mod probe;
