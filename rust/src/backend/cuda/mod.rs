//! CUDA backend (feature `cuda`): run-time loading of the CUDA libraries through cudarc,
//! kernels compiled by NVRTC to machine code for the device and cached on disk.
//!
//! Status: the kernel set and its NVRTC compilation are checked in CI (no GPU needed);
//! the device `Backend` (`device.rs`) builds everywhere but has not yet run on a GPU.

pub use device::Cuda;

pub mod device;
pub mod kernels;
pub mod probe;
