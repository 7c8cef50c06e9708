//! Finding the CUDA libraries without ever panicking (cudarc panics when a library is
//! missing): optional preloading from a folder named by
//! `QGALORE_CUDA_LIB_DIR` (pip's `nvidia/cu13/lib` layout), then guarded presence checks.

use std::panic::catch_unwind;
use std::path::Path;
use std::sync::OnceLock;

/// Library files preloaded by absolute path, so that cudarc's later by-name `dlopen`
/// finds the already-loaded object by its SONAME.
const PRELOAD: &[&str] = &[
    "libnvJitLink.so.13",
    "libnvrtc-builtins.so.13.0",
    "libnvrtc.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcusparse.so.12",
    "libcusolver.so.12",
];

static PRELOADED: OnceLock<Vec<libloading::Library>> = OnceLock::new();

/// Preloads the libraries found in `$QGALORE_CUDA_LIB_DIR` (once per process).
pub fn preload() {
    PRELOADED.get_or_init(|| {
        let Some(dir) = std::env::var_os("QGALORE_CUDA_LIB_DIR") else { return Vec::new() };
        let dir = Path::new(&dir);
        PRELOAD
            .iter()
            .filter_map(|name| {
                let p = dir.join(name);
                // SAFETY: loading a CUDA library runs only its initialisers.
                p.exists().then(|| unsafe { libloading::Library::new(&p) }.ok()).flatten()
            })
            .collect()
    });
}

/// Whether NVRTC can be loaded (compiling kernels needs nothing else).
pub fn nvrtc_present() -> bool {
    preload();
    catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// Number of usable CUDA devices, 0 when the driver or a needed library is missing.
pub fn device_count() -> usize {
    preload();
    catch_unwind(|| unsafe {
        let libs = cudarc::driver::sys::is_culib_present()
            && cudarc::nvrtc::sys::is_culib_present()
            && cudarc::cublas::sys::is_culib_present()
            && cudarc::cusolver::sys::is_culib_present();
        if !libs {
            return 0;
        }
        cudarc::driver::result::init().ok().and_then(|_| cudarc::driver::result::device::get_count().ok()).unwrap_or(0) as usize
    })
    .unwrap_or(0)
}
