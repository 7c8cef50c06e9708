//! The CUDA kernel sources (`rust/kernels/*.cu`, header-free) and their compilation by
//! NVRTC to a CUBIN for one architecture, cached on disk under a key made of the source,
//! the options, the NVRTC version and the architecture.

use crate::error::{Error, Result};
use cudarc::nvrtc::{result, sys};
use std::ffi::CString;
use std::path::PathBuf;

/// Definitions prepended to every module (bf16 conversion, counter-based RNG, reductions).
pub const PRELUDE: &str = include_str!("../../../kernels/prelude.cu");

/// One compilation unit.
pub struct Module {
    pub name: &'static str,
    pub src: &'static str,
    /// Whether multiply-adds may be contracted into FMAs. Off for the modules that must
    /// match the CPU reference bit for bit (quantization, optimizers).
    pub fmad: bool,
    /// Preprocessor symbols defined for this compilation (`-D` options).
    pub defines: &'static [&'static str],
    /// Kernel entry points the module must export.
    pub kernels: &'static [&'static str],
}

/// The layer kernels, compiled once per activation type (see nn.cu's `act_t`).
const NN_KERNELS: &[&str] = &[
    "fill",
    "fill_act",
    "axpy",
    "scale",
    "embedding",
    "embedding_w16",
    "embedding_bwd",
    "rmsnorm",
    "rmsnorm_bwd_dx",
    "rmsnorm_bwd_dw_part",
    "rmsnorm_bwd_dw_sum",
    "rope",
    "swiglu",
    "swiglu_bwd",
    "causal_softmax",
    "causal_softmax_bwd",
    "cross_entropy",
];

pub const MODULES: &[Module] = &[
    Module {
        name: "quant",
        src: include_str!("../../../kernels/quant.cu"),
        fmad: false,
        defines: &[],
        kernels: &["q_dequant", "q_dequant_bf16", "bf16_dequant", "bf16_quant", "q_requant"],
    },
    Module {
        name: "nf4",
        src: include_str!("../../../kernels/nf4.cu"),
        fmad: false,
        defines: &[],
        kernels: &["nf4_dequant", "nf4_dequant_bf16"],
    },
    Module {
        name: "optim",
        src: include_str!("../../../kernels/optim.cu"),
        fmad: false,
        defines: &[],
        kernels: &["adamw", "galore_adam", "bnb32", "bnb32_w16", "adam8", "adam8_w16", "sanitize", "sumsq_partial", "sum_partials"],
    },
    Module {
        name: "nn",
        src: include_str!("../../../kernels/nn.cu"),
        fmad: true,
        defines: &[],
        kernels: NN_KERNELS,
    },
    Module {
        name: "nn_bf16",
        src: include_str!("../../../kernels/nn.cu"),
        fmad: true,
        defines: &["QG_BF16"],
        kernels: NN_KERNELS,
    },
    Module {
        name: "linalg",
        src: include_str!("../../../kernels/linalg.cu"),
        fmad: true,
        defines: &[],
        kernels: &["top_eigvecs_rows", "top_eigvecs_cols", "transpose"],
    },
];

/// NVRTC options for a module and an architecture such as `sm_90`.
pub fn options(m: &Module, arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        format!("--fmad={}", m.fmad),
        "--device-as-default-execution-space".into(),
    ];
    o.extend(m.defines.iter().map(|d| format!("-D{d}")));
    o.extend(size_defines().iter().map(|d| format!("-D{d}")));
    o
}

/// Sizes the kernel sources share with the Rust side, defined for every module so that each
/// has one owner: the largest quantization group (`quant::MAX_GROUP`, `q_requant`'s shared
/// codes), the threads of `sumsq_partial` (`launch::SUMSQ_THREADS`, its shared reduction) and
/// the state elements per thread of `adam8` (`launch::ADAM8_ITEMS`).
pub fn size_defines() -> [String; 3] {
    [
        format!("QG_MAX_GROUP={}", crate::quant::MAX_GROUP),
        format!("QG_SUMSQ_THREADS={}", super::launch::SUMSQ_THREADS),
        format!("QG_ADAM8_ITEMS={}", super::launch::ADAM8_ITEMS),
    ]
}

/// NVRTC's (major, minor) version; the library must be loadable.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut a, mut b) = (0, 0);
    unsafe { sys::nvrtcVersion(&mut a, &mut b) }
        .result()
        .map_err(|e| Error::backend(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((a, b))
}

/// Compiles `m` to a CUBIN for `arch` (no GPU needed).
pub fn compile(m: &Module, arch: &str) -> Result<Vec<u8>> {
    let src = CString::new(format!("{PRELUDE}\n{}", m.src)).map_err(|_| Error::backend("NUL in kernel source"))?;
    let name = CString::new(format!("{}.cu", m.name)).unwrap();
    let prog = result::create_program(&src, Some(&name)).map_err(|e| Error::backend(format!("nvrtc: {e:?}")))?;
    let opts = options(m, arch);
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let out = match compiled {
        Ok(()) => unsafe {
            let mut n = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut n).result().map_err(|e| Error::backend(format!("nvrtc: {e:?}")))?;
            let mut bin = vec![0u8; n];
            sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut _).result().map_err(|e| Error::backend(format!("nvrtc: {e:?}")))?;
            Ok(bin)
        },
        Err(_) => {
            let log = unsafe { result::get_program_log(prog) }.unwrap_or_default();
            let log: Vec<u8> = log.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
            Err(Error::backend(format!(
                "kernel module {} failed to compile for {arch}:\n{}",
                m.name,
                String::from_utf8_lossy(&log)
            )))
        }
    };
    unsafe { result::destroy_program(prog) }.ok();
    out
}

/// 64-bit FNV-1a: a cache key that is stable across Rust versions.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `$QGALORE_CACHE`, else `$XDG_CACHE_HOME/qgalore`, else `~/.cache/qgalore`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("QGALORE_CACHE") {
        return Some(PathBuf::from(d).join("kernels"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("qgalore").join("kernels"))
}

/// The CUBIN of `m` for `arch`, from the disk cache or compiled (and then cached).
pub fn cubin(m: &Module, arch: &str) -> Result<Vec<u8>> {
    let (maj, min) = nvrtc_version()?;
    let opts = options(m, arch).join(" ");
    let key = fnv1a(&[PRELUDE.as_bytes(), m.src.as_bytes(), opts.as_bytes(), format!("{maj}.{min}").as_bytes(), arch.as_bytes()]);
    let path = cache_dir().map(|d| d.join(format!("{}-{arch}-{key:016x}.cubin", m.name)));
    if let Some(p) = &path {
        if let Ok(bin) = std::fs::read(p) {
            if !bin.is_empty() {
                return Ok(bin);
            }
        }
    }
    let bin = compile(m, arch)?;
    if let Some(p) = path {
        // best effort: a read-only cache only costs a recompile next time
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &bin).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
    Ok(bin)
}
