//! CUDA backend (feature `cuda`): run-time loading of the CUDA libraries through cudarc,
//! kernels compiled by NVRTC to machine code for the device and cached on disk.
//!
//! Status: the kernel set, its NVRTC compilation and the library probe are in place and
//! compiled in CI; the `Backend` implementation on device buffers is not yet written, so
//! `--device cuda` reports that and `--device auto` uses the CPU.

pub mod kernels;
pub mod probe;
