//! The CUDA kernels, run on the host and checked against the CPU reference.
//!
//! No GPU is needed: every module of `kernels::MODULES` (PRELUDE + source, with the
//! preprocessor defines its NVRTC options carry) is compiled by the host C++ compiler
//! with `tests/emu/emu.h` force-included, a header that emulates the CUDA execution model
//! (fibers for the threads of a block, real barriers and warp shuffles, guard pages after
//! every buffer). Each kernel is launched with the grid, block and argument types that
//! `backend/cuda/device.rs` uses, and its results must equal the CPU backend's: bit for
//! bit for the quantization, optimizer and linear-algebra kernels (NVRTC compiles them
//! with --fmad=false; here -ffp-contract=off), within a tolerance for the layer kernels
//! (NVRTC may contract their multiply-adds, and their reductions run in another order).
//!
//! Every launch also runs twice, with the threads between two barriers taken in
//! ascending and in descending order: different results mean a missing barrier. The
//! argument list of every launch is checked against the kernel's parameter types.
//! Without a C++ compiler each test prints `skipped: no C++ compiler` and passes.
#![cfg(feature = "cuda")]

use qgalore::backend::cpu::{attention, ops, Cpu};
use qgalore::host::{linalg, matmul, rope};
use qgalore::backend::cuda::kernels::{self, Module, MODULES, PRELUDE};
use qgalore::backend::{AdamHp, AttnDims, Category, Memory, Optimizers, Refresh};
use qgalore::quant::adam8::{self, State8};
use qgalore::quant::{bf16_to_f32, f32_to_bf16, QTensor, Range};
use qgalore::rng;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

// ---------------------------------------------------------------------------------------
// Building and loading the emulated modules

type LaunchFn =
    unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, u32, u32, *mut *mut c_void) -> i32;

/// One module compiled for the host.
struct Lib {
    module: &'static str,
    kernels: &'static [&'static str],
    launch: LaunchFn,
    error: unsafe extern "C" fn() -> *const c_char,
    fault_addr: unsafe extern "C" fn() -> usize,
    set_schedule: unsafe extern "C" fn(i32),
    signature: unsafe extern "C" fn(*const c_char) -> *const c_char,
    registered: unsafe extern "C" fn() -> *const c_char,
    alloc: unsafe extern "C" fn(usize) -> *mut c_void,
    check: unsafe extern "C" fn(*mut c_void) -> i32,
    free: unsafe extern "C" fn(*mut c_void),
    // keeps the function pointers above valid
    _lib: libloading::Library,
}

struct Emu {
    /// One per entry of `kernels::MODULES`, in order.
    libs: Vec<Lib>,
    /// SELFTEST's kernels.
    selftest: Lib,
}

impl Emu {
    /// The modules exporting `kernel` (a bf16 variant of a module exports the same names).
    fn with(&self, kernel: &str) -> Vec<&Lib> {
        let libs: Vec<&Lib> = self
            .libs
            .iter()
            .filter(|l| l.kernels.contains(&kernel))
            .collect();
        assert!(
            !libs.is_empty(),
            "no module of kernels::MODULES exports {kernel}"
        );
        libs
    }
}

static EMU: OnceLock<Result<Option<Emu>, String>> = OnceLock::new();
/// One launch at a time in the whole process: a launch installs a SIGSEGV handler.
static LAUNCH: Mutex<()> = Mutex::new(());

/// The compiled modules, or None (and a `skipped` line) without a C++ compiler.
fn emu() -> Option<&'static Emu> {
    match EMU.get_or_init(build) {
        Ok(Some(e)) => Some(e),
        Ok(None) => {
            println!("skipped: no C++ compiler");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn compiler() -> Option<String> {
    let mut candidates: Vec<String> = std::env::var("CXX").into_iter().collect();
    candidates.extend(["g++", "c++", "clang++"].map(String::from));
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// g++ flags for the preprocessor state NVRTC gets from the module's options:
/// `-D`/`--define-macro`, `-U`/`--undefine-macro`, and `__CUDA_ARCH__` from the
/// architecture (sm_90 here; the kernels do not depend on it).
fn define_flags(m: &Module) -> Vec<String> {
    let opts = kernels::options(m, "sm_90");
    let mut out = Vec::new();
    let mut it = opts.iter().map(|s| s.trim());
    while let Some(o) = it.next() {
        let arg = |rest: &str, it: &mut dyn Iterator<Item = &str>| {
            if rest.is_empty() {
                it.next().unwrap_or("").to_string()
            } else {
                rest.to_string()
            }
        };
        if let Some(a) = o
            .strip_prefix("--gpu-architecture=sm_")
            .or_else(|| o.strip_prefix("-arch=sm_"))
        {
            let digits: String = a.chars().take_while(|c| c.is_ascii_digit()).collect();
            out.push(format!("-D__CUDA_ARCH__={digits}0"));
        } else if let Some(rest) = o
            .strip_prefix("--define-macro=")
            .or_else(|| o.strip_prefix("-D"))
        {
            out.push(format!("-D{}", arg(rest, &mut it)));
        } else if let Some(rest) = o
            .strip_prefix("--undefine-macro=")
            .or_else(|| o.strip_prefix("-U"))
        {
            out.push(format!("-U{}", arg(rest, &mut it)));
        }
    }
    out
}

/// One translation unit for the host compiler.
struct Unit {
    name: &'static str,
    /// What NVRTC compiles (PRELUDE + source), with #line markers for messages.
    src: String,
    /// Preprocessor flags (`define_flags`).
    flags: Vec<String>,
    kernels: &'static [&'static str],
}

impl Unit {
    fn of(m: &Module) -> Unit {
        Unit {
            name: m.name,
            src: format!(
                "#line 1 \"prelude.cu\"\n{PRELUDE}\n#line 1 \"{}.cu\"\n{}\n",
                m.name, m.src
            ),
            flags: define_flags(m),
            kernels: m.kernels,
        }
    }
}

/// Kernels with known defects (and one without), compiled like a module, to show that
/// the emulator catches what it promises to catch.
const SELFTEST: &str = r#"
extern "C" __global__ void shift_missing_barrier(float* x) {
    __shared__ float s[256];
    s[threadIdx.x] = x[threadIdx.x];
    // no __syncthreads(): a thread may read its neighbour's slot before it is written
    x[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
extern "C" __global__ void shift(float* x) {
    __shared__ float s[256];
    s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    x[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
// block b reads what block b - 1 wrote: the result depends on the order of the blocks
extern "C" __global__ void block_chain(float* x) {
    if (threadIdx.x == 0 && blockIdx.x > 0) x[blockIdx.x] += x[blockIdx.x - 1];
}
// half of warp 0 waits at the block barrier, the other half in a shuffle
extern "C" __global__ void divergent_sync(float* x) {
    if (threadIdx.x < 16) __syncthreads();
    else x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
}
// threads that return early drop out of later barriers
extern "C" __global__ void early_exit(float* x) {
    __shared__ float s[64];
    if (threadIdx.x >= 40) return;
    s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    x[threadIdx.x] = s[39 - threadIdx.x];
}
extern "C" __global__ void write_before(float* x) {
    if (threadIdx.x == 0) x[-1] = 1.0f;
}
extern "C" __global__ void warp_reduce(float* x) {
    __shared__ float red[32];
    x[threadIdx.x] = block_sum(x[threadIdx.x], red);
}
// lane 5 returns, the rest of its warp shuffles with a full mask
extern "C" __global__ void shuffle_after_return(float* x) {
    if (threadIdx.x == 5) return;
    x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
}
"#;

const SELFTEST_KERNELS: &[&str] = &[
    "shift_missing_barrier",
    "shift",
    "block_chain",
    "divergent_sync",
    "early_exit",
    "write_before",
    "warp_reduce",
    "shuffle_after_return",
];

fn compile(cxx: &str, dir: &Path, u: &Unit) -> Result<PathBuf, String> {
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emu/emu.h");
    let src = dir.join(format!("{}.cpp", u.name));
    let lib = dir.join(format!("lib{}.so", u.name));
    // the kernel registry goes after the source
    let entries: Vec<String> = u
        .kernels
        .iter()
        .map(|k| format!("EMU_KERNEL({k})"))
        .collect();
    let text = format!(
        "{}#line 1 \"registry\"\nEMU_REGISTER({})\n",
        u.src,
        entries.join(", ")
    );
    std::fs::write(&src, text).map_err(|e| e.to_string())?;
    // IEEE float arithmetic: no -ffast-math, no FMA contraction (NVRTC's --fmad=false).
    let out = Command::new(cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-ffp-contract=off",
            "-fPIC",
            "-shared",
            "-fvisibility=hidden",
            "-include",
        ])
        .arg(&header)
        .args(&u.flags)
        .arg("-o")
        .arg(&lib)
        .arg(&src)
        .output()
        .map_err(|e| format!("{cxx}: {e}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "module {} does not compile for the emulator:\n{log}",
            u.name
        ));
    }
    if !log.trim().is_empty() {
        println!("module {}: compiler output:\n{log}", u.name);
    }
    Ok(lib)
}

fn load(u: &Unit, path: &Path) -> Result<Lib, String> {
    let err = |e: libloading::Error| format!("{}: {e}", path.display());
    unsafe {
        let lib = libloading::Library::new(path.to_str().unwrap()).map_err(err)?;
        let l = Lib {
            module: u.name,
            kernels: u.kernels,
            launch: *lib.get::<LaunchFn>("emu_launch").map_err(err)?,
            error: *lib.get("emu_error").map_err(err)?,
            fault_addr: *lib.get("emu_fault_addr").map_err(err)?,
            set_schedule: *lib.get("emu_set_schedule").map_err(err)?,
            signature: *lib.get("emu_signature").map_err(err)?,
            registered: *lib.get("emu_kernels").map_err(err)?,
            alloc: *lib.get("emu_alloc").map_err(err)?,
            check: *lib.get("emu_check").map_err(err)?,
            free: *lib.get("emu_free").map_err(err)?,
            _lib: lib,
        };
        Ok(l)
    }
}

fn build() -> Result<Option<Emu>, String> {
    let Some(cxx) = compiler() else {
        return Ok(None);
    };
    let t0 = Instant::now();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kernel-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut units: Vec<Unit> = MODULES.iter().map(Unit::of).collect();
    units.push(Unit {
        name: "emu_selftest",
        src: format!("{PRELUDE}\n#line 1 \"selftest.cu\"\n{SELFTEST}"),
        flags: Vec::new(),
        kernels: SELFTEST_KERNELS,
    });
    // one compiler process per module, all at once
    let built: Vec<Result<PathBuf, String>> = std::thread::scope(|s| {
        let jobs: Vec<_> = units
            .iter()
            .map(|u| s.spawn(|| compile(&cxx, &dir, u)))
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    let mut libs = Vec::new();
    for (u, b) in units.iter().zip(built) {
        libs.push(load(u, &b?)?);
    }
    // the loaded libraries stay mapped; the files are no longer needed
    std::fs::remove_dir_all(&dir).ok();
    let selftest = libs.pop().unwrap();
    println!(
        "{} modules (and the self-test) compiled with {cxx} in {:.1} s",
        libs.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(Some(Emu { libs, selftest }))
}

// ---------------------------------------------------------------------------------------
// Launching

/// A kernel argument. Buffers are copied to emulated device memory and back; `F32s`
/// also fits a bf16 (`u16*`) parameter, converted with round-to-nearest-even.
#[derive(Clone, Debug)]
enum Arg {
    F32s(Vec<f32>),
    U8s(Vec<u8>),
    U16s(Vec<u16>),
    I32s(Vec<i32>),
    U64s(Vec<u64>),
    F64s(Vec<f64>),
    F32(f32),
    I32(i32),
    U64(u64),
}

impl Arg {
    fn f32s(&self) -> &[f32] {
        match self {
            Arg::F32s(v) => v,
            a => panic!("not an f32 buffer: {a:?}"),
        }
    }
    fn u8s(&self) -> &[u8] {
        match self {
            Arg::U8s(v) => v,
            a => panic!("not a u8 buffer: {a:?}"),
        }
    }
    fn u16s(&self) -> &[u16] {
        match self {
            Arg::U16s(v) => v,
            a => panic!("not a u16 buffer: {a:?}"),
        }
    }
    fn u64s(&self) -> &[u64] {
        match self {
            Arg::U64s(v) => v,
            a => panic!("not a u64 buffer: {a:?}"),
        }
    }
    fn f64s(&self) -> &[f64] {
        match self {
            Arg::F64s(v) => v,
            a => panic!("not an f64 buffer: {a:?}"),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Arg::F32s(_) => "f32*",
            Arg::U8s(_) => "u8*",
            Arg::U16s(_) => "u16*",
            Arg::I32s(_) => "i32*",
            Arg::U64s(_) => "u64*",
            Arg::F64s(_) => "f64*",
            Arg::F32(_) => "f32",
            Arg::I32(_) => "i32",
            Arg::U64(_) => "u64",
        }
    }

    /// Whether this argument may be passed for a parameter of type `param` (as
    /// `emu_signature` spells it); `Some(true)` when it goes through bf16.
    fn fits(&self, param: &str) -> Option<bool> {
        let p = param.strip_prefix("const ").unwrap_or(param);
        match (self, p) {
            (Arg::F32s(_), "u16*") => Some(true),
            _ if self.kind() == p => Some(false),
            _ => None,
        }
    }

    /// Device bytes (bf16 when `bf16`).
    fn to_device(&self, bf16: bool) -> Option<Vec<u8>> {
        Some(match self {
            Arg::F32s(v) if bf16 => v
                .iter()
                .flat_map(|&x| f32_to_bf16(x).to_le_bytes())
                .collect(),
            Arg::F32s(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Arg::U8s(v) => v.clone(),
            Arg::U16s(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Arg::I32s(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Arg::U64s(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Arg::F64s(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            _ => return None,
        })
    }

    fn read_back(&mut self, b: &[u8], bf16: bool) {
        fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
            b.chunks_exact(N).map(|c| c.try_into().unwrap())
        }
        match self {
            Arg::F32s(v) if bf16 => {
                *v = chunks(b)
                    .map(|c| bf16_to_f32(u16::from_le_bytes(c)))
                    .collect()
            }
            Arg::F32s(v) => *v = chunks(b).map(f32::from_le_bytes).collect(),
            Arg::U8s(v) => *v = b.to_vec(),
            Arg::U16s(v) => *v = chunks(b).map(u16::from_le_bytes).collect(),
            Arg::I32s(v) => *v = chunks(b).map(i32::from_le_bytes).collect(),
            Arg::U64s(v) => *v = chunks(b).map(u64::from_le_bytes).collect(),
            Arg::F64s(v) => *v = chunks(b).map(f64::from_le_bytes).collect(),
            _ => {}
        }
    }

    /// The value of a scalar in an 8-byte slot (little-endian, as a kernel reads it).
    fn scalar(&self) -> u64 {
        match self {
            Arg::F32(x) => x.to_bits() as u64,
            Arg::I32(x) => *x as u32 as u64,
            Arg::U64(x) => *x,
            _ => unreachable!(),
        }
    }
}

/// (grid, block) as cuLaunchKernel takes them.
type Cfg = ([u32; 3], [u32; 3]);

/// device.rs's `grid(n)`: 256 threads per block, enough blocks for n elements.
fn grid(n: usize) -> Cfg {
    ([(n as u32).div_ceil(256).max(1), 1, 1], [256, 1, 1])
}

/// device.rs's `rows_cfg(rows, threads)`: one block per row.
fn rows_cfg(rows: usize, threads: u32) -> Cfg {
    ([rows as u32, 1, 1], [threads, 1, 1])
}

/// What a launch saw: the arguments as the kernel read them (bf16-rounded where the
/// kernel takes bf16), for computing the reference from the same inputs.
struct Launched {
    before: Vec<Arg>,
    /// Per argument: whether it went to the kernel as bf16.
    bf16: Vec<bool>,
}

impl Launched {
    /// Whether any argument went to the kernel as bf16.
    fn any_bf16(&self) -> bool {
        self.bf16.contains(&true)
    }

    /// The tolerance for output argument `i`: the reference is computed from the inputs
    /// as the kernel read them, so only a result stored as bf16 gets the bf16 tolerance.
    fn tol(&self, i: usize) -> Tol {
        let bf16 = self.bf16[i];
        Tol {
            rel: if bf16 { 1e-2 } else { 1e-5 },
            bf16,
        }
    }
}

/// A relative tolerance, and whether the kernel stored its result as bf16.
#[derive(Clone, Copy)]
struct Tol {
    rel: f64,
    bf16: bool,
}

impl Lib {
    fn signature(&self, kernel: &str) -> Vec<String> {
        let name = CString::new(kernel).unwrap();
        let s = unsafe { (self.signature)(name.as_ptr()) };
        assert!(
            !s.is_null(),
            "{}: kernel {kernel} is not registered",
            self.module
        );
        let s = unsafe { CStr::from_ptr(s) }.to_str().unwrap().to_string();
        if s.is_empty() {
            Vec::new()
        } else {
            s.split(',').map(String::from).collect()
        }
    }

    /// Launches `kernel` twice (both thread orders) on copies of `args`, checks that the
    /// results agree, and leaves them in `args`. Panics on any problem.
    fn launch(&self, kernel: &str, cfg: Cfg, args: &mut [Arg]) -> Launched {
        self.try_launch(kernel, cfg, args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `launch`, with the kernel's own failures (undefined behaviour, faults) as `Err`.
    fn try_launch(&self, kernel: &str, cfg: Cfg, args: &mut [Arg]) -> Result<Launched, String> {
        assert!(
            self.kernels.contains(&kernel),
            "{}: {kernel} is not in the module's kernel list",
            self.module
        );
        let params = self.signature(kernel);
        assert_eq!(
            args.len(),
            params.len(),
            "{}/{kernel}: {} arguments for ({})",
            self.module,
            args.len(),
            params.join(", ")
        );
        let mut conv = Vec::new();
        for (i, (a, p)) in args.iter().zip(&params).enumerate() {
            match a.fits(p) {
                Some(b) => conv.push(b),
                None => panic!(
                    "{}/{kernel}: argument {i} is {} but the kernel takes {p}",
                    self.module,
                    a.kind()
                ),
            }
        }
        // bf16 parameters see rounded values; the caller's reference must see the same
        for (a, &b) in args.iter_mut().zip(&conv) {
            if let (Arg::F32s(v), true) = (a, b) {
                v.iter_mut().for_each(|x| *x = bf16_to_f32(f32_to_bf16(*x)));
            }
        }
        let before = args.to_vec();
        let first = self.run(kernel, cfg, args, &conv, 0)?;
        let second = self.run(kernel, cfg, args, &conv, 1)?;
        for (i, (a, b)) in first.iter().zip(&second).enumerate() {
            if a != b {
                return Err(format!(
                    "{}/{kernel}: argument {i} differs between ascending and descending thread order: a race (missing barrier)",
                    self.module
                ));
            }
        }
        for ((a, bytes), &b) in args.iter_mut().zip(&first).zip(&conv) {
            if let Some(bytes) = bytes {
                a.read_back(bytes, b);
            }
        }
        Ok(Launched { before, bf16: conv })
    }

    /// One launch on fresh device copies of `args`; the buffers' bytes afterwards.
    fn run(
        &self,
        kernel: &str,
        (g, b): Cfg,
        args: &[Arg],
        conv: &[bool],
        schedule: i32,
    ) -> Result<Vec<Option<Vec<u8>>>, String> {
        let _one = LAUNCH.lock().unwrap_or_else(PoisonError::into_inner);
        let n = args.len();
        let mut ptrs: Vec<*mut c_void> = vec![std::ptr::null_mut(); n];
        let mut lens = vec![0usize; n];
        let mut scalars = vec![0u64; n];
        for i in 0..n {
            match args[i].to_device(conv[i]) {
                Some(bytes) => unsafe {
                    let p = (self.alloc)(bytes.len());
                    assert!(!p.is_null(), "emu_alloc failed");
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), p as *mut u8, bytes.len());
                    ptrs[i] = p;
                    lens[i] = bytes.len();
                },
                None => scalars[i] = args[i].scalar(),
            }
        }
        // kernelParams: params[i] points at argument i's value
        let mut params: Vec<*mut c_void> = (0..n)
            .map(|i| {
                if ptrs[i].is_null() {
                    &mut scalars[i] as *mut u64 as *mut c_void
                } else {
                    &mut ptrs[i] as *mut *mut c_void as *mut c_void
                }
            })
            .collect();
        let name = CString::new(kernel).unwrap();
        unsafe { (self.set_schedule)(schedule) };
        let rc = unsafe {
            (self.launch)(
                name.as_ptr(),
                g[0],
                g[1],
                g[2],
                b[0],
                b[1],
                b[2],
                params.as_mut_ptr(),
            )
        };
        let mut problem = None;
        if rc != 0 {
            let msg = unsafe { CStr::from_ptr((self.error)()) }
                .to_string_lossy()
                .into_owned();
            let mut m = format!("{}/{kernel} (grid {g:?}, block {b:?}): {msg}", self.module);
            if rc == 2 {
                let addr = unsafe { (self.fault_addr)() };
                for i in 0..n {
                    let (p, len) = (ptrs[i] as usize, lens[i]);
                    if !ptrs[i].is_null() && addr >= p + len && addr < p + len + 4096 {
                        m += &format!(
                            " = {} bytes past the end of argument {i} ({len} bytes)",
                            addr - p - len
                        );
                    } else if !ptrs[i].is_null() && addr < p && addr + 8192 > p {
                        m += &format!(" = {} bytes before argument {i}", p - addr);
                    }
                }
            }
            problem = Some(m);
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            if ptrs[i].is_null() {
                out.push(None);
                continue;
            }
            unsafe {
                if problem.is_none() && (self.check)(ptrs[i]) != 0 {
                    problem = Some(format!(
                        "{}/{kernel}: wrote before the start of argument {i}",
                        self.module
                    ));
                }
                out.push(Some(
                    std::slice::from_raw_parts(ptrs[i] as *const u8, lens[i]).to_vec(),
                ));
                (self.free)(ptrs[i]);
            }
        }
        match problem {
            Some(m) => Err(m),
            None => Ok(out),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Comparisons

/// Collects the per-kernel outcome of one test; fails at the end if anything differed.
struct Report {
    name: &'static str,
    t0: Instant,
    lines: Vec<String>,
    failures: Vec<String>,
    /// Per kernel: largest relative error, its tolerance, values equal to the (rounded)
    /// CPU value, values compared.
    stats: Vec<(String, f64, f64, usize, usize)>,
}

impl Report {
    fn new(name: &'static str) -> Self {
        Report {
            name,
            t0: Instant::now(),
            lines: Vec::new(),
            failures: Vec::new(),
            stats: Vec::new(),
        }
    }

    /// Bit-identical f32 (NaN payloads and signed zeros included).
    fn same_f32(&mut self, what: &str, got: &[f32], want: &[f32]) {
        let g: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
        let w: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
        if let Some(i) = first_diff(&g, &w) {
            self.failures.push(format!(
                "{what}: not bit-identical: {} of {} differ, first at {i}: kernel {:e} ({:#010x}), cpu {:e} ({:#010x})",
                g.iter().zip(&w).filter(|(a, b)| a != b).count(),
                w.len(),
                got[i],
                g[i],
                want[i],
                w[i]
            ));
        }
    }

    fn same<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: &[T], want: &[T]) {
        if let Some(i) = first_diff(got, want) {
            self.failures.push(format!(
                "{what}: not identical: {} of {} differ, first at {i}: kernel {:?}, cpu {:?}",
                got.iter().zip(want).filter(|(a, b)| a != b).count(),
                want.len(),
                got.get(i),
                want.get(i)
            ));
        }
    }

    /// Toleranced comparison for kernel `key`. The error of an element is
    /// |got − want| / max(|want|, 1e-2·max|want| over its row of `row` values): relative
    /// where values are large, without blowing up where a row's values cancel to nearly
    /// zero. Non-finite values must match exactly.
    #[allow(clippy::too_many_arguments)]
    fn close(&mut self, key: &str, what: &str, got: &[f32], want: &[f32], row: usize, tol: Tol) {
        if got.len() != want.len() {
            self.failures.push(format!(
                "{what}: {} values, expected {}",
                got.len(),
                want.len()
            ));
            return;
        }
        let row = row.max(1);
        let (mut worst, mut at, mut exact) = (0.0f64, 0usize, 0usize);
        for (r, (gr, wr)) in got.chunks(row).zip(want.chunks(row)).enumerate() {
            let scale = wr
                .iter()
                .filter(|x| x.is_finite())
                .fold(0.0f64, |m, &x| m.max((x as f64).abs()));
            let floor = (1e-2 * scale).max(f64::MIN_POSITIVE);
            for (j, (&g, &w)) in gr.iter().zip(wr).enumerate() {
                let rounded = if tol.bf16 {
                    bf16_to_f32(f32_to_bf16(w))
                } else {
                    w
                };
                exact += (g.to_bits() == rounded.to_bits()) as usize;
                let e = if g.is_finite() && w.is_finite() {
                    (g as f64 - w as f64).abs() / (w as f64).abs().max(floor)
                } else if g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()) {
                    0.0
                } else {
                    f64::INFINITY
                };
                if e > worst {
                    (worst, at) = (e, r * row + j);
                }
            }
        }
        if worst > tol.rel {
            self.failures.push(format!(
                "{what}: relative error {worst:.3e} > {:e} at {at}: kernel {:e}, cpu {:e}",
                tol.rel, got[at], want[at]
            ));
        }
        match self.stats.iter_mut().find(|s| s.0 == key) {
            Some(s) => {
                s.1 = s.1.max(worst);
                s.3 += exact;
                s.4 += got.len();
            }
            None => self
                .stats
                .push((key.to_string(), worst, tol.rel, exact, got.len())),
        }
    }

    fn note(&mut self, line: String) {
        self.lines.push(line);
    }

    fn finish(self) {
        println!("{}: {:.2} s", self.name, self.t0.elapsed().as_secs_f64());
        for l in &self.lines {
            println!("  {l}");
        }
        for (key, e, tol, exact, n) in &self.stats {
            println!(
                "  {key}: max relative error {e:.2e} (tolerance {tol:e}); {:.1}% of {n} values identical to the CPU's{}",
                100.0 * *exact as f64 / *n as f64,
                if *tol > 1e-3 { " rounded to bf16" } else { "" }
            );
        }
        assert!(
            self.failures.is_empty(),
            "{}: kernels disagree with the CPU:\n  {}",
            self.name,
            self.failures.join("\n  ")
        );
    }
}

fn first_diff<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Deterministic values in [-scale, scale).
fn vals(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (2.0 * rng::uniform(seed, i as u64) - 1.0) * scale)
        .collect()
}

/// Token ids below `vocab`.
fn ids(n: usize, seed: u64, vocab: usize) -> Vec<i32> {
    (0..n)
        .map(|i| (rng::bits32(seed, i as u64) % vocab as u32) as i32)
        .collect()
}

fn cpu() -> Cpu {
    Cpu::new(2).unwrap()
}

fn cbuf(be: &Cpu, v: &[f32]) -> <Cpu as Memory>::Buf {
    let mut b = be.alloc(v.len(), Category::Activations).unwrap();
    be.upload(&mut b, v).unwrap();
    b
}

// ---------------------------------------------------------------------------------------
// quant.cu

/// `groups` groups of `kinds` (≤ 9) characters in turn: random, single-signed (the
/// Reference range clips them), constant, all zero, wide, a NaN among finite values, an
/// infinity among finite values (its scale is then infinite, so the fused update sees a
/// group of NaN), all NaN.
fn quant_input(group: usize, groups: usize, kinds: usize, seed: u64) -> Vec<f32> {
    let mut w = Vec::with_capacity(group * groups);
    for gi in 0..groups {
        let r = vals(group, seed + gi as u64, 1.0);
        w.extend(r.iter().enumerate().map(|(j, &x)| match gi % kinds {
            0 => x,
            1 => 1.0 + 0.5 * x,
            2 => -1.0 + 0.5 * x,
            3 => 0.25,
            4 => 0.0,
            5 => 100.0 * x,
            6 if j == group / 2 => f32::NAN,
            7 if j == group / 2 => f32::INFINITY,
            8 => f32::NAN,
            _ => x,
        }));
    }
    w
}

fn q_state_args(
    q: &QTensor,
    src: &[f32],
    decay: f32,
    update: bool,
    range: Range,
    sr: Option<u64>,
) -> Vec<Arg> {
    // device.rs `requant`: src is also passed as delta
    vec![
        Arg::U8s(q.codes.clone()),
        Arg::F32s(q.scale.clone()),
        Arg::F32s(q.zero.clone()),
        Arg::F32s(src.to_vec()),
        Arg::F32s(src.to_vec()),
        Arg::F32(decay),
        Arg::I32(update as i32),
        Arg::I32(q.bits as i32),
        Arg::I32((range == Range::WithZero) as i32),
        Arg::I32(sr.is_some() as i32),
        Arg::U64(sr.unwrap_or(0)),
        Arg::I32(q.group as i32),
    ]
}

fn requant_cfg(q: &QTensor) -> Cfg {
    (
        [(q.numel / q.group) as u32, 1, 1],
        [(q.group as u32).div_ceil(32) * 32, 1, 1],
    )
}

/// The CPU's fused update for any bit width: `QTensor::update` is INT8-only, so for INT4
/// the same steps are composed from dequantize and requantize (checked equal to
/// `update` for INT8 below).
fn cpu_update(q: &mut QTensor, delta: &[f32], decay: f32, range: Range, sr: Option<u64>) {
    let mut w = vec![0.0f32; q.numel];
    q.dequantize(&mut w);
    for (x, d) in w.iter_mut().zip(delta) {
        let v = *x + d;
        *x = if decay != 1.0 { v * decay } else { v };
    }
    q.requantize(&w, range, sr);
}

fn check_q(r: &mut Report, what: &str, a: &[Arg], q: &QTensor) {
    r.same(&format!("{what} codes"), a[0].u8s(), &q.codes);
    r.same_f32(&format!("{what} scales"), a[1].f32s(), &q.scale);
    r.same_f32(&format!("{what} zeros"), a[2].f32s(), &q.zero);
}

/// q_requant (quantize and fused update) and q_dequant(_bf16) against the CPU for every
/// bit width, group size and range mode, on `quant_input(.., kinds)`; returns the count.
fn requant_cases(emu: &Emu, r: &mut Report, kinds: usize) -> usize {
    let key = rng::stream_key(7, 3, 1);
    let mut cases = 0;
    for lib in emu.with("q_requant") {
        // group sizes: whole warps, a partial last warp, the 1024 maximum, tiny
        for (bits, group) in [
            (8u8, 256usize),
            (8, 200),
            (8, 1024),
            (4, 256),
            (4, 50),
            (4, 2),
        ] {
            let groups = kinds + 1;
            let numel = group * groups;
            let src = quant_input(group, groups, kinds, 11 + group as u64);
            for range in [Range::WithZero, Range::Reference] {
                let tag = format!("{}/q_requant INT{bits} group {group} {range:?}", lib.module);
                // round-to-nearest and stochastic quantization (update = 0)
                for sr in [None, Some(key)] {
                    let mut q = QTensor::new(numel, bits, group).unwrap();
                    let mut a = q_state_args(&q, &src, 1.0, false, range, sr);
                    lib.launch("q_requant", requant_cfg(&q), &mut a);
                    q.requantize(&src, range, sr);
                    check_q(r, &format!("{tag} quantize sr={}", sr.is_some()), &a, &q);
                    cases += 1;
                }
                // the fused update (update = 1) from a quantized state
                let mut q0 = QTensor::new(numel, bits, group).unwrap();
                q0.quantize(&src, range);
                let delta = vals(numel, 99, 0.05);
                for (decay, sr) in [
                    (1.0f32, None),
                    (0.999, None),
                    (1.0, Some(key)),
                    (0.98, Some(key ^ 1)),
                ] {
                    let mut q = q0.clone();
                    let mut a = q_state_args(&q, &delta, decay, true, range, sr);
                    lib.launch("q_requant", requant_cfg(&q), &mut a);
                    cpu_update(&mut q, &delta, decay, range, sr);
                    if bits == 8 {
                        // the composed reference is QTensor::update where that exists
                        let mut u = q0.clone();
                        u.update(&delta, decay, range, sr);
                        let composed = [
                            Arg::U8s(q.codes.clone()),
                            Arg::F32s(q.scale.clone()),
                            Arg::F32s(q.zero.clone()),
                        ];
                        check_q(
                            r,
                            "reference: composed update vs QTensor::update",
                            &composed,
                            &u,
                        );
                    }
                    check_q(
                        r,
                        &format!("{tag} update decay={decay} sr={}", sr.is_some()),
                        &a,
                        &q,
                    );
                    cases += 1;
                    dequant_cases(emu, r, lib.module, &q);
                }
            }
        }
    }
    cases
}

/// q_dequant and q_dequant_bf16 of `q` against the CPU's dequantize.
fn dequant_cases(emu: &Emu, r: &mut Report, module: &str, q: &QTensor) {
    let Some(lib) = emu
        .with("q_dequant")
        .into_iter()
        .find(|l| l.module == module)
    else {
        return;
    };
    let (n, bits, group) = (q.numel, q.bits, q.group);
    let mut d = vec![
        Arg::F32s(vec![0.0; n]),
        Arg::U8s(q.codes.clone()),
        Arg::F32s(q.scale.clone()),
        Arg::F32s(q.zero.clone()),
        Arg::I32(bits as i32),
        Arg::I32(group as i32),
        Arg::U64(n as u64),
    ];
    lib.launch("q_dequant", grid(n), &mut d);
    let mut want = vec![0.0f32; n];
    q.dequantize(&mut want);
    r.same_f32(
        &format!("{module}/q_dequant INT{bits} group {group}"),
        d[0].f32s(),
        &want,
    );
    if lib.kernels.contains(&"q_dequant_bf16") {
        // the bf16 GEMM operand: the same values, rounded once
        d[0] = Arg::U16s(vec![0; n]);
        lib.launch("q_dequant_bf16", grid(n), &mut d);
        let want: Vec<u16> = want.iter().map(|&x| f32_to_bf16(x)).collect();
        r.same(
            &format!("{module}/q_dequant_bf16 INT{bits} group {group}"),
            d[0].u16s(),
            &want,
        );
    }
}

#[test]
fn quant_kernels_are_bit_identical_to_the_cpu_quantizer() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("quant");
    let cases = requant_cases(emu, &mut r, 7);
    r.note(format!(
        "q_requant: {cases} cases (INT8/INT4, groups 256/200/1024/50/2, both ranges, RTN and SR, update with and without decay)"
    ));

    // bf16 storage: specials, ties, subnormals, overflow to infinity
    let mut src = vals(1000, 5, 3.0);
    src.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7f80_0001), // signalling NaN, payload in the low bits
        f32::from_bits(0xffc1_2345),
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),           // smallest subnormal
        f32::from_bits(0x3f80_8000), // tie, rounds to even (down)
        f32::from_bits(0x3f81_8000), // tie, rounds to even (up)
        f32::from_bits(0x3f80_8001),
        f32::from_bits(0x7f7f_8000), // rounds up to infinity
    ]);
    let n = src.len();
    let mut q = QTensor::new(n, 16, 0).unwrap();
    q.quantize(&src, Range::WithZero);
    let want: Vec<u16> = q
        .codes
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    for lib in emu.with("bf16_quant") {
        // device.rs passes the tensor's byte buffer; the kernel reads it as bf16_t
        let mut a = vec![
            Arg::U16s(vec![0; n]),
            Arg::F32s(src.clone()),
            Arg::U64(n as u64),
        ];
        lib.launch("bf16_quant", grid(n), &mut a);
        r.same(&format!("{}/bf16_quant", lib.module), a[0].u16s(), &want);
    }
    for lib in emu.with("bf16_dequant") {
        let mut a = vec![
            Arg::F32s(vec![0.0; n]),
            Arg::U16s(want.clone()),
            Arg::U64(n as u64),
        ];
        lib.launch("bf16_dequant", grid(n), &mut a);
        let mut back = vec![0.0f32; n];
        q.dequantize(&mut back);
        r.same_f32(&format!("{}/bf16_dequant", lib.module), a[0].f32s(), &back);
    }
    r.note("q_dequant, q_dequant_bf16, bf16_quant, bf16_dequant: compared bit for bit".into());
    r.finish();
}

/// Groups that are, or become, entirely NaN. This found a kernel bug: for a group of more
/// than 992 elements (32 warps) in the Reference range, `block_max` over all-NaN values was
/// NaN in the kernel (every lane of its last warp stage NaN) where the CPU's fold from ±∞
/// ignores NaN, so the kernel stored a NaN zero point (the CPU stores 0 and the group
/// dequantizes to zeros). Fixed in prelude.cu: block_reduce's max maps NaN to −∞ first.
#[test]
fn quant_kernels_match_the_cpu_on_nan_groups() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("quant (non-finite groups)");
    let cases = requant_cases(emu, &mut r, 9);
    r.note(format!(
        "q_requant: {cases} cases with infinite and all-NaN groups"
    ));
    r.finish();
}

// ---------------------------------------------------------------------------------------
// optim.cu

fn hp(step: u64, wd: f32) -> AdamHp {
    AdamHp {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: wd,
        step,
    }
}

/// Gradients with non-finite elements at fixed places, a few whose square overflows to
/// infinity (and, with `dead_block`, a whole block of non-finite ones).
fn grads(n: usize, seed: u64, dead_block: Option<(usize, usize)>) -> Vec<f32> {
    let mut g = vals(n, seed, 0.5);
    for (k, i) in (3..n).step_by(397).enumerate() {
        g[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][k % 3];
    }
    for i in (200..n).step_by(1999) {
        g[i] = 3e19;
    }
    if let Some((start, len)) = dead_block {
        g[start..(start + len).min(n)]
            .iter_mut()
            .for_each(|x| *x = f32::NAN);
    }
    g
}

#[test]
fn optimizer_kernels_are_bit_identical_to_the_cpu_steps() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("optim");
    let n = 5000; // 19.5 blocks of 256

    for lib in emu.with("adamw") {
        let (mut p, mut m, mut v) = (vals(n, 1, 1.0), vec![0.0f32; n], vec![0.0f32; n]);
        let mut a = vec![
            Arg::F32s(p.clone()),
            Arg::F32s(vec![]),
            Arg::F32s(m.clone()),
            Arg::F32s(v.clone()),
        ];
        for step in 1..=3 {
            let h = hp(step, 0.1);
            let g = grads(n, 10 + step, None);
            let (s, rbc2, decay) = h.torch_factors();
            a[1] = Arg::F32s(g.clone());
            let mut args = a.clone();
            args.extend([s, rbc2, decay, h.beta1, h.beta2, h.eps].map(Arg::F32));
            args.push(Arg::U64(n as u64));
            lib.launch("adamw", grid(n), &mut args);
            ops::adamw(&mut p, &g, &mut m, &mut v, h);
            let tag = format!("{}/adamw step {step}", lib.module);
            r.same_f32(&format!("{tag} p"), args[0].f32s(), &p);
            r.same_f32(&format!("{tag} m"), args[2].f32s(), &m);
            r.same_f32(&format!("{tag} v"), args[3].f32s(), &v);
            a = args[..4].to_vec();
        }
    }

    for lib in emu.with("galore_adam") {
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        let (mut km, mut kv) = (m.clone(), v.clone());
        for step in 1..=3 {
            let h = hp(step, 0.0);
            let mut buf = grads(n, 20 + step, None);
            let mut args = vec![
                Arg::F32s(buf.clone()),
                Arg::F32s(km),
                Arg::F32s(kv),
                Arg::F32(h.galore_step()),
                Arg::F32(h.beta1),
                Arg::F32(h.beta2),
                Arg::F32(h.eps),
                Arg::U64(n as u64),
            ];
            lib.launch("galore_adam", grid(n), &mut args);
            ops::galore_adam(&mut buf, &mut m, &mut v, h);
            let tag = format!("{}/galore_adam step {step}", lib.module);
            r.same_f32(&format!("{tag} update"), args[0].f32s(), &buf);
            r.same_f32(&format!("{tag} m"), args[1].f32s(), &m);
            r.same_f32(&format!("{tag} v"), args[2].f32s(), &v);
            km = args[1].f32s().to_vec();
            kv = args[2].f32s().to_vec();
        }
    }

    // f32 weights, and bf16 weights (`_w16`): the CPU's f32 step, then RNE to bf16
    for (kname, w16) in [("bnb32", false), ("bnb32_w16", true)] {
    for lib in emu.with(kname) {
        for wd in [0.0f32, 0.01] {
            let p0 = vals(n, 2, 1.0);
            let p0 = if w16 { p0.iter().map(|&x| bf16_to_f32(f32_to_bf16(x))).collect() } else { p0 };
            let (mut p, mut m, mut v) = (p0, vec![0.0f32; n], vec![0.0f32; n]);
            let (mut kp, mut km, mut kv) = (p.clone(), m.clone(), v.clone());
            for step in 1..=3 {
                let h = hp(step, wd);
                let g = grads(n, 30 + step, None);
                let (ss, eps2) = h.bnb_factors();
                let decay = 1.0 - h.lr * h.weight_decay;
                let mut args = vec![
                    weights(&kp, w16),
                    Arg::F32s(g.clone()),
                    Arg::F32s(km),
                    Arg::F32s(kv),
                    Arg::F32(ss),
                    Arg::F32(eps2),
                    Arg::F32(h.beta1),
                    Arg::F32(h.beta2),
                    Arg::F32(h.weight_decay),
                    Arg::F32(decay),
                    Arg::U64s(vec![7]), // running count, not reset by the step
                    Arg::U64(n as u64),
                ];
                lib.launch(kname, grid(n), &mut args);
                let skipped = adam8::step32(&mut p, &g, &mut m, &mut v, h);
                round_weights(&mut p, w16);
                let tag = format!("{}/{kname} wd={wd} step {step}", lib.module);
                r.same_f32(&format!("{tag} p"), &weights_f32(&args[0]), &p);
                r.same_f32(&format!("{tag} m"), args[2].f32s(), &m);
                r.same_f32(&format!("{tag} v"), args[3].f32s(), &v);
                r.same(&format!("{tag} skipped"), args[10].u64s(), &[7 + skipped]);
                assert!(skipped > 0);
                kp = weights_f32(&args[0]);
                km = args[2].f32s().to_vec();
                kv = args[3].f32s().to_vec();
            }
        }
    }
    }

    let (smap, umap) = (adam8::dynamic_map(true), adam8::dynamic_map(false));
    let maps = adam8::Maps::new();
    for (kname, w16) in [("adam8", false), ("adam8_w16", true)] {
    for lib in emu.with(kname) {
        // partial last blocks; one block whose gradients are all non-finite
        for (block, n, wd) in [
            (256usize, 256 * 5 + 77, 0.0f32),
            (2048, 2048 * 2 + 1000, 0.01),
        ] {
            let mut p = vals(n, 3, 1.0);
            round_weights(&mut p, w16);
            let mut st = State8::new(n, block);
            let mut kp = p.clone();
            let mut ks = st.clone();
            for step in 1..=3 {
                let h = hp(step, wd);
                let g = grads(n, 40 + step, Some((block, block)));
                let (ss, eps2) = h.bnb_factors();
                let decay = 1.0 - h.lr * h.weight_decay;
                let mut args = vec![
                    weights(&kp, w16),
                    Arg::F32s(g.clone()),
                    Arg::U8s(ks.m.clone()),
                    Arg::U8s(ks.v.clone()),
                    Arg::F32s(ks.absmax_m.clone()),
                    Arg::F32s(ks.absmax_v.clone()),
                    Arg::F32s(smap.to_vec()),
                    Arg::F32s(umap.to_vec()),
                    Arg::F32(ss),
                    Arg::F32(eps2),
                    Arg::F32(h.beta1),
                    Arg::F32(h.beta2),
                    Arg::F32(h.weight_decay),
                    Arg::F32(decay),
                    Arg::I32(block as i32),
                    Arg::U64s(vec![7]), // running count, not reset by the step
                    Arg::U64(n as u64),
                ];
                let cfg = ([n.div_ceil(block) as u32, 1, 1], [(block / 8) as u32, 1, 1]);
                lib.launch(kname, cfg, &mut args);
                let skipped = adam8::step8(&mut p, &g, &mut st, &maps, h);
                round_weights(&mut p, w16);
                let tag = format!("{}/{kname} block {block} step {step}", lib.module);
                r.same_f32(&format!("{tag} p"), &weights_f32(&args[0]), &p);
                r.same(&format!("{tag} m codes"), args[2].u8s(), &st.m);
                r.same(&format!("{tag} v codes"), args[3].u8s(), &st.v);
                r.same_f32(&format!("{tag} absmax m"), args[4].f32s(), &st.absmax_m);
                r.same_f32(&format!("{tag} absmax v"), args[5].f32s(), &st.absmax_v);
                r.same(&format!("{tag} skipped"), args[15].u64s(), &[7 + skipped]);
                assert!(skipped >= block as u64);
                kp = weights_f32(&args[0]);
                ks.m = args[2].u8s().to_vec();
                ks.v = args[3].u8s().to_vec();
                ks.absmax_m = args[4].f32s().to_vec();
                ks.absmax_v = args[5].f32s().to_vec();
            }
        }
    }
    }

    let be = cpu();
    for lib in emu.with("sanitize") {
        let x = grads(n, 50, Some((1000, 300)));
        // the counter is a running total (read and reset by take_nonfinite)
        let mut args = vec![Arg::F32s(x.clone()), Arg::U64s(vec![5]), Arg::U64(n as u64)];
        lib.launch("sanitize", grid(n), &mut args);
        let mut b = cbuf(&be, &x);
        be.sanitize(&mut b, n);
        let count = be.take_nonfinite();
        assert!(count >= 300);
        r.same_f32(
            &format!("{}/sanitize values", lib.module),
            args[0].f32s(),
            &b.data,
        );
        r.same(
            &format!("{}/sanitize count", lib.module),
            args[1].u64s(),
            &[5 + count],
        );
    }

    for lib in emu.with("sumsq_partial") {
        let sum = emu
            .with("sum_partials")
            .into_iter()
            .find(|l| l.module == lib.module)
            .expect("sum_partials beside sumsq_partial");
        // fewer elements than threads, and more (the grid-stride loop)
        for n in [1000usize, 256 * 1024 + 4321] {
            let x = vals(n, 60 + n as u64, 2.0);
            let mut a = vec![
                Arg::F32s(x.clone()),
                Arg::F64s(vec![0.0; 256]),
                Arg::U64(n as u64),
            ];
            lib.launch("sumsq_partial", ([256, 1, 1], [1024, 1, 1]), &mut a);
            let exact: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let cpu_sum = be.sumsq(&cbuf(&be, &x), n);
            // sum_partials(part, out, parts[, acc]): with `acc` it adds to a running total
            let accumulates = sum.signature("sum_partials").len() == 4;
            for acc in if accumulates { vec![0, 1] } else { vec![0] } {
                let start = if acc == 1 { 1234.5 } else { -1.0 };
                let mut b = vec![
                    Arg::F64s(a[1].f64s().to_vec()),
                    Arg::F64s(vec![start]),
                    Arg::I32(256),
                ];
                if accumulates {
                    b.push(Arg::I32(acc));
                }
                sum.launch("sum_partials", rows_cfg(1, 1), &mut b);
                let got = b[1].f64s()[0] - if acc == 1 { start } else { 0.0 };
                for (what, want) in [("f64 sum", exact), ("CPU sumsq", cpu_sum)] {
                    let e = (got - want).abs() / want;
                    r.note(format!(
                        "{}/sumsq n={n} acc={acc}: relative difference to the {what} {e:.1e}",
                        lib.module
                    ));
                    if e > 1e-12 {
                        r.failures.push(format!(
                            "{}/sumsq n={n} acc={acc}: {got} vs {what} {want}",
                            lib.module
                        ));
                    }
                }
            }
        }
    }
    r.note("adamw, galore_adam, bnb32, adam8 (blocks 256 and 2048), sanitize: compared bit for bit over 3 steps".into());
    r.finish();
}

// ---------------------------------------------------------------------------------------
// linalg.cu

/// The eigenvector matrix of `c` (n×n, symmetric) as cuSOLVER's syevd leaves it:
/// column-major, eigenvalues ascending; the same faer decomposition the CPU uses.
fn syevd_like(c: &[f32], n: usize) -> Vec<f32> {
    let evd = faer::MatRef::from_row_major_slice(c, n, n)
        .self_adjoint_eigen(faer::Side::Lower)
        .unwrap();
    let u = evd.U();
    let mut a = vec![0.0f32; n * n];
    for col in 0..n {
        for row in 0..n {
            a[col * n + row] = u[(row, col)];
        }
    }
    a
}

#[test]
fn eigenvector_kernels_extract_the_cpu_projector() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("linalg");
    // right: n = cols = 300 (two blocks, the second partial); left: n = rows = 260
    for (rows, cols, rank, right) in [
        (40usize, 300usize, 5usize, true),
        (260, 30, 4, false),
        (20, 33, 1, true),
    ] {
        let g = vals(rows * cols, 70 + rows as u64, 1.0);
        let mut want = vec![0.0f32; rows * cols];
        linalg::top_subspace(
            &g,
            rows,
            cols,
            rank,
            right,
            Refresh::Eigh,
            None,
            0,
            &mut want,
            1,
        )
        .unwrap();
        let pn = if right { rank * cols } else { rows * rank };
        // the Gram matrix exactly as the CPU forms it (the left case works on Gᵀ)
        let n = if right { cols } else { rows };
        let mut gm = g.clone();
        let m = if right { rows } else { cols };
        if !right {
            for i in 0..rows {
                for j in 0..cols {
                    gm[j * rows + i] = g[i * cols + j];
                }
            }
        }
        let mut c = vec![0.0f32; n * n];
        matmul::matmul_dw(&mut c, &gm, &gm, m, n, n, false, matmul::par(1));
        let a = syevd_like(&c, n);
        let name = if right {
            "top_eigvecs_rows"
        } else {
            "top_eigvecs_cols"
        };
        for lib in emu.with(name) {
            let mut args = vec![
                Arg::F32s(vec![0.0; pn]),
                Arg::F32s(a.clone()),
                Arg::I32(n as i32),
                Arg::I32(rank as i32),
            ];
            let cfg = ([(n as u32).div_ceil(256), rank as u32, 1], [256, 1, 1]);
            lib.launch(name, cfg, &mut args);
            r.same_f32(
                &format!("{}/{name} {rows}×{cols} rank {rank}", lib.module),
                args[0].f32s(),
                &want[..pn],
            );
        }
    }
    // transpose (the left projector into Y's rows on the randomized refresh path)
    for lib in emu.libs.iter().filter(|l| l.kernels.contains(&"transpose")) {
        for (rows, cols) in [(37usize, 53usize), (300, 4), (1, 7)] {
            let x = vals(rows * cols, 80 + rows as u64, 1.0);
            let mut want = vec![0.0f32; rows * cols];
            for i in 0..rows {
                for j in 0..cols {
                    want[j * rows + i] = x[i * cols + j];
                }
            }
            let mut args = vec![
                Arg::F32s(vec![0.0; rows * cols]),
                Arg::F32s(x),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
            ];
            lib.launch("transpose", grid(rows * cols), &mut args);
            r.same_f32(
                &format!("{}/transpose {rows}×{cols}", lib.module),
                args[0].f32s(),
                &want,
            );
        }
    }
    r.note("top_eigvecs_rows/cols: bit-identical to linalg::top_subspace(Eigh) given the same decomposition".into());
    r.note("transpose: exact".into());
    r.finish();
}

// ---------------------------------------------------------------------------------------
// nn.cu (and any variant module exporting the same kernels, e.g. bf16 activations)

const NN: &[&str] = &[
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

fn nn_module(lib: &Lib, r: &mut Report) {
    let be = cpu();
    let m = lib.module;
    let has = |k: &str| lib.kernels.contains(&k);

    // elementwise: n = 1000 (4 blocks, the last partial)
    let n = 1000;
    let x = vals(n, 1, 2.0);
    let y = vals(n, 2, 2.0);
    if has("fill") {
        let mut a = vec![Arg::F32s(x.clone()), Arg::F32(0.37), Arg::U64(n as u64)];
        let l = lib.launch("fill", grid(n), &mut a);
        let mut b = cbuf(&be, &x);
        be.fill(&mut b, 0.37);
        r.close(
            &format!("{m}/fill"),
            &format!("{m}/fill"),
            a[0].f32s(),
            &b.data,
            n,
            l.tol(0),
        );
    }
    if has("fill_act") {
        // the activation fill stores v once rounded (exact, either type)
        let mut a = vec![Arg::F32s(x.clone()), Arg::F32(0.37), Arg::U64(n as u64)];
        let l = lib.launch("fill_act", grid(n), &mut a);
        let v = if l.bf16[0] {
            bf16_to_f32(f32_to_bf16(0.37))
        } else {
            0.37
        };
        r.same_f32(&format!("{m}/fill_act"), a[0].f32s(), &vec![v; n]);
        r.note(format!("{m}/fill_act: exact"));
    }
    if has("axpy") {
        let mut a = vec![
            Arg::F32s(x.clone()),
            Arg::F32(-0.7),
            Arg::F32s(y.clone()),
            Arg::U64(n as u64),
        ];
        let l = lib.launch("axpy", grid(n), &mut a);
        let mut d = cbuf(&be, l.before[0].f32s());
        be.axpy(&mut d, -0.7, &cbuf(&be, l.before[2].f32s()));
        r.close(
            &format!("{m}/axpy"),
            &format!("{m}/axpy"),
            a[0].f32s(),
            &d.data,
            1,
            l.tol(0),
        );
    }
    if has("scale") {
        let mut a = vec![Arg::F32s(x.clone()), Arg::F32(1.3), Arg::U64(n as u64)];
        let l = lib.launch("scale", grid(n), &mut a);
        let mut d = cbuf(&be, l.before[0].f32s());
        be.scale(&mut d, 1.3);
        r.close(
            &format!("{m}/scale"),
            &format!("{m}/scale"),
            a[0].f32s(),
            &d.data,
            1,
            l.tol(0),
        );
    }
    if has("swiglu") {
        let mut a = vec![
            Arg::F32s(vec![0.0; n]),
            Arg::F32s(x.clone()),
            Arg::F32s(y.clone()),
            Arg::U64(n as u64),
        ];
        let l = lib.launch("swiglu", grid(n), &mut a);
        let mut want = vec![0.0f32; n];
        ops::swiglu(&mut want, l.before[1].f32s(), l.before[2].f32s());
        r.close(
            &format!("{m}/swiglu"),
            &format!("{m}/swiglu"),
            a[0].f32s(),
            &want,
            1,
            l.tol(0),
        );
    }
    if has("swiglu_bwd") {
        let d = vals(n, 3, 1.0);
        let mut a = vec![
            Arg::F32s(vec![0.0; n]),
            Arg::F32s(vec![0.0; n]),
            Arg::F32s(d),
            Arg::F32s(x.clone()),
            Arg::F32s(y.clone()),
            Arg::U64(n as u64),
        ];
        let l = lib.launch("swiglu_bwd", grid(n), &mut a);
        let (mut dg, mut du) = (vec![0.0f32; n], vec![0.0f32; n]);
        ops::swiglu_bwd(
            &mut dg,
            &mut du,
            l.before[2].f32s(),
            l.before[3].f32s(),
            l.before[4].f32s(),
        );
        r.close(
            &format!("{m}/swiglu_bwd"),
            &format!("{m}/swiglu_bwd dgate"),
            a[0].f32s(),
            &dg,
            1,
            l.tol(0),
        );
        r.close(
            &format!("{m}/swiglu_bwd"),
            &format!("{m}/swiglu_bwd dup"),
            a[1].f32s(),
            &du,
            1,
            l.tol(1),
        );
    }

    // embedding: 7 rows of c = 300 channels (two column blocks), repeated tokens
    let (rows, c, vocab) = (7usize, 300usize, 11usize);
    let tokens = {
        let mut t = ids(rows, 4, vocab);
        t[5] = t[1];
        t
    };
    // f32 table, and a bf16 table (`embedding_w16`; the harness rounds the bf16 argument)
    for kname in ["embedding", "embedding_w16"].into_iter().filter(|k| has(k)) {
        let table = vals(vocab * c, 5, 1.0);
        let mut a = vec![
            Arg::F32s(vec![0.0; rows * c]),
            Arg::I32s(tokens.clone()),
            Arg::F32s(table),
            Arg::I32(c as i32),
        ];
        let cfg = ([rows as u32, (c as u32).div_ceil(256), 1], [256, 1, 1]);
        let l = lib.launch(kname, cfg, &mut a);
        let mut want = vec![0.0f32; rows * c];
        ops::embedding(&mut want, &tokens, l.before[2].f32s(), c);
        r.close(
            &format!("{m}/{kname}"),
            &format!("{m}/{kname}"),
            a[0].f32s(),
            &want,
            c,
            l.tol(0),
        );
    }
    if has("embedding_bwd") {
        // rows grouped by token on the host as device.rs does
        let (uniq, starts, order) = qgalore::backend::cuda::plan::token_groups(&tokens);
        let mut a = vec![
            Arg::F32s(vals(vocab * c, 6, 1.0)),
            Arg::F32s(vals(rows * c, 7, 1.0)),
            Arg::I32s(uniq.clone()),
            Arg::I32s(starts),
            Arg::I32s(order),
            Arg::I32(c as i32),
        ];
        let cfg = ([uniq.len() as u32, (c as u32).div_ceil(256), 1], [256, 1, 1]);
        let l = lib.launch("embedding_bwd", cfg, &mut a);
        let mut want = l.before[0].f32s().to_vec();
        ops::embedding_bwd(&mut want, l.before[1].f32s(), &tokens, c);
        // the CPU's summation order: bit-identical, not only close
        assert!(
            a[0].f32s().iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{m}/embedding_bwd: not bit-identical to the CPU"
        );
        r.close(
            &format!("{m}/embedding_bwd"),
            &format!("{m}/embedding_bwd"),
            a[0].f32s(),
            &want,
            c,
            l.tol(0),
        );
    }

    // RMSNorm: rows wider and narrower than the block
    for c in [300usize, 100] {
        let rows = 5;
        let x = vals(rows * c, 8 + c as u64, 2.0);
        let w = vals(c, 9, 1.5);
        let eps = 1e-5f32;
        let mut rstd_cpu = vec![0.0f32; rows];
        if has("rmsnorm") {
            let mut a = vec![
                Arg::F32s(vec![0.0; rows * c]),
                Arg::F32s(vec![0.0; rows]),
                Arg::F32s(x.clone()),
                Arg::F32s(w.clone()),
                Arg::I32(c as i32),
                Arg::F32(eps),
            ];
            let l = lib.launch("rmsnorm", rows_cfg(rows, 256), &mut a);
            let mut out = vec![0.0f32; rows * c];
            ops::rmsnorm(
                &mut out,
                &mut rstd_cpu,
                l.before[2].f32s(),
                l.before[3].f32s(),
                rows,
                c,
                eps,
            );
            r.close(
                &format!("{m}/rmsnorm"),
                &format!("{m}/rmsnorm out c={c}"),
                a[0].f32s(),
                &out,
                c,
                l.tol(0),
            );
            r.close(
                &format!("{m}/rmsnorm (rstd)"),
                &format!("{m}/rmsnorm rstd c={c}"),
                a[1].f32s(),
                &rstd_cpu,
                1,
                l.tol(1),
            );
        } else {
            let mut out = vec![0.0f32; rows * c];
            ops::rmsnorm(&mut out, &mut rstd_cpu, &x, &w, rows, c, eps);
        }
        if has("rmsnorm_bwd_dx") && has("rmsnorm_bwd_dw_part") && has("rmsnorm_bwd_dw_sum") {
            let dout = vals(rows * c, 10, 1.0);
            let (dx0, dw0) = (vals(rows * c, 11, 0.5), vals(c, 12, 0.5));
            let mut a = vec![
                Arg::F32s(dx0),
                Arg::F32s(dout.clone()),
                Arg::F32s(x.clone()),
                Arg::F32s(w.clone()),
                Arg::F32s(rstd_cpu.clone()),
                Arg::I32(c as i32),
            ];
            let l = lib.launch("rmsnorm_bwd_dx", rows_cfg(rows, 256), &mut a);
            // device.rs's two stages, with small chunks so that several partial sums exist
            let chunk = 3usize;
            let chunks = rows.div_ceil(chunk);
            let mut p = vec![
                Arg::F32s(vec![f32::NAN; chunks * c]),
                Arg::F32s(dout),
                Arg::F32s(x.clone()),
                Arg::F32s(rstd_cpu.clone()),
                Arg::I32(rows as i32),
                Arg::I32(c as i32),
                Arg::I32(chunk as i32),
            ];
            lib.launch("rmsnorm_bwd_dw_part", ([(c as u32).div_ceil(256), chunks as u32, 1], [256, 1, 1]), &mut p);
            let mut b = vec![Arg::F32s(dw0), Arg::F32s(p[0].f32s().to_vec()), Arg::I32(chunks as i32), Arg::I32(c as i32)];
            let l2 = lib.launch("rmsnorm_bwd_dw_sum", grid(c), &mut b);
            let (mut dx, mut dw) = (l.before[0].f32s().to_vec(), l2.before[0].f32s().to_vec());
            assert!(p[0].f32s().iter().all(|v| v.is_finite()), "{m}: a partial sum was not written");
            let (dout, x, w, rstd) = (
                l.before[1].f32s(),
                l.before[2].f32s(),
                l.before[3].f32s(),
                l.before[4].f32s(),
            );
            ops::rmsnorm_bwd(&mut dx, &mut dw, dout, x, w, rstd, rows, c);
            r.close(
                &format!("{m}/rmsnorm_bwd_dx"),
                &format!("{m}/rmsnorm_bwd_dx c={c}"),
                a[0].f32s(),
                &dx,
                c,
                l.tol(0),
            );
            r.close(
                &format!("{m}/rmsnorm_bwd_dw"),
                &format!("{m}/rmsnorm_bwd_dw c={c}"),
                b[0].f32s(),
                &dw,
                c,
                l2.tol(0),
            );
        }
    }

    // RoPE: head widths 80 (40 threads, not a whole warp) and 16, both directions
    if has("rope") {
        for hd in [80usize, 16] {
            let (b, t, heads) = (2usize, 5usize, 3usize);
            let table = rope::rope_table(t, hd, 10000.0);
            for inverse in [false, true] {
                let x = vals(b * t * heads * hd, 13 + hd as u64, 1.0);
                let mut a = vec![
                    Arg::F32s(x),
                    Arg::F32s(table.clone()),
                    Arg::I32(t as i32),
                    Arg::I32(heads as i32),
                    Arg::I32(hd as i32),
                    Arg::I32(inverse as i32),
                ];
                let cfg = (
                    [(b * t) as u32, heads as u32, 1],
                    [(hd / 2).max(1) as u32, 1, 1],
                );
                let l = lib.launch("rope", cfg, &mut a);
                let mut want = l.before[0].f32s().to_vec();
                ops::rope(&mut want, l.before[1].f32s(), b, t, heads, hd, inverse);
                let what = format!("{m}/rope hd={hd} inverse={inverse}");
                r.close(
                    &format!("{m}/rope"),
                    &what,
                    a[0].f32s(),
                    &want,
                    hd,
                    l.tol(0),
                );
            }
        }
    }

    // attention softmax: scores and their gradient formed exactly as the CPU forms them,
    // the CPU's probabilities (attention::forward) and dscores (attention::backward's
    // scratch) as references; t = 300 rows are wider than a block, t = 37 narrower
    for (b, t, h, kvh, hd) in [(2usize, 37usize, 4usize, 2usize, 8usize), (1, 300, 2, 1, 8)] {
        let d = AttnDims { b, t, h, kvh, hd };
        let (c, kvd) = (h * hd, kvh * hd);
        let q = vals(b * t * c, 20 + t as u64, 1.5);
        let k = vals(b * t * kvd, 21 + t as u64, 1.5);
        let v = vals(b * t * kvd, 22 + t as u64, 1.0);
        let dout = vals(b * t * c, 23 + t as u64, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let (mut out, mut att) = (vec![0.0f32; b * t * c], vec![0.0f32; b * h * t * t]);
        attention::forward(&mut out, &mut att, &q, &k, &v, d);
        let (mut scores, mut datt) = (vec![0.0f32; b * h * t * t], vec![0.0f32; b * h * t * t]);
        for bi in 0..b {
            for hi in 0..h {
                let g = hi / (h / kvh);
                let (qo, ko, ao) = (
                    bi * t * c + hi * hd,
                    bi * t * kvd + g * hd,
                    (bi * h + hi) * t * t,
                );
                unsafe {
                    matmul::gemm_raw(
                        t,
                        t,
                        hd,
                        scores.as_mut_ptr().add(ao),
                        t as isize,
                        1,
                        false,
                        q.as_ptr().add(qo),
                        c as isize,
                        1,
                        k.as_ptr().add(ko),
                        1,
                        kvd as isize,
                        scale,
                        matmul::par(1),
                    );
                    matmul::gemm_raw(
                        t,
                        t,
                        hd,
                        datt.as_mut_ptr().add(ao),
                        t as isize,
                        1,
                        false,
                        dout.as_ptr().add(qo),
                        c as isize,
                        1,
                        v.as_ptr().add(ko),
                        1,
                        kvd as isize,
                        1.0,
                        matmul::par(1),
                    );
                }
            }
        }
        let rows = b * h * t;
        if has("causal_softmax") {
            let mut a = vec![Arg::F32s(scores.clone()), Arg::I32(t as i32)];
            let l = lib.launch("causal_softmax", rows_cfg(rows, 256), &mut a);
            let want = if l.any_bf16() {
                // bf16 scores in: recompute the CPU's softmax from what the kernel read
                cpu_causal_softmax(l.before[0].f32s(), t)
            } else {
                att.clone()
            };
            r.close(
                &format!("{m}/causal_softmax"),
                &format!("{m}/causal_softmax t={t}"),
                a[0].f32s(),
                &want,
                t,
                l.tol(0),
            );
        }
        if has("causal_softmax_bwd") {
            let (mut dq, mut dk, mut dv, mut ds) = (
                vec![0.0f32; b * t * c],
                vec![0.0f32; b * t * kvd],
                vec![0.0f32; b * t * kvd],
                vec![0.0f32; b * h * t * t],
            );
            attention::backward(
                &mut dq, &mut dk, &mut dv, &mut ds, &dout, &q, &k, &v, &att, d,
            );
            let mut a = vec![
                Arg::F32s(datt.clone()),
                Arg::F32s(att.clone()),
                Arg::I32(t as i32),
                Arg::F32(scale),
            ];
            let l = lib.launch("causal_softmax_bwd", rows_cfg(rows, 256), &mut a);
            let want = if l.any_bf16() {
                cpu_causal_softmax_bwd(l.before[0].f32s(), l.before[1].f32s(), t, scale)
            } else {
                ds
            };
            r.close(
                &format!("{m}/causal_softmax_bwd"),
                &format!("{m}/causal_softmax_bwd t={t}"),
                a[0].f32s(),
                &want,
                t,
                l.tol(0),
            );
        }
    }

    // cross-entropy: vocabularies wider (1000) and narrower (50) than the block
    if has("cross_entropy") {
        for v in [1000usize, 50] {
            let n = 6;
            let targets = ids(n, 30 + v as u64, v);
            let logits = vals(n * v, 31 + v as u64, 4.0);
            for grad in [None, Some(1.0f32 / n as f32)] {
                let mut a = vec![
                    Arg::F32s(logits.clone()),
                    Arg::I32s(targets.clone()),
                    Arg::F32s(vec![0.0; n]),
                    Arg::I32(v as i32),
                    Arg::I32(grad.is_some() as i32),
                    Arg::F32(grad.unwrap_or(0.0)),
                ];
                let l = lib.launch("cross_entropy", rows_cfg(n, 256), &mut a);
                let mut z = l.before[0].f32s().to_vec();
                let mut losses = vec![0.0f32; n];
                ops::cross_entropy(&mut z, &targets, &mut losses, n, v, grad);
                let tag = format!("{m}/cross_entropy v={v} grad={}", grad.is_some());
                r.close(
                    &format!("{m}/cross_entropy"),
                    &format!("{tag} losses"),
                    a[2].f32s(),
                    &losses,
                    1,
                    l.tol(2),
                );
                r.close(
                    &format!("{m}/cross_entropy"),
                    &format!("{tag} logits"),
                    a[0].f32s(),
                    &z,
                    v,
                    l.tol(0),
                );
            }
        }
    }
}

/// The CPU's causal softmax of attention::forward, for inputs the kernel read as bf16.
fn cpu_causal_softmax(scores: &[f32], t: usize) -> Vec<f32> {
    let mut a = scores.to_vec();
    for (i, row) in a.chunks_mut(t).enumerate() {
        let ti = i % t;
        let mx = row[..=ti].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0.0f32;
        for s in &mut row[..=ti] {
            *s = (*s - mx).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row[..=ti].iter_mut().for_each(|s| *s *= inv);
        row[ti + 1..].iter_mut().for_each(|s| *s = 0.0);
    }
    a
}

/// attention::backward's dscores step, for inputs the kernel read as bf16.
fn cpu_causal_softmax_bwd(datt: &[f32], att: &[f32], t: usize, scale: f32) -> Vec<f32> {
    let mut d = datt.to_vec();
    for (i, (dr, ar)) in d.chunks_mut(t).zip(att.chunks(t)).enumerate() {
        let ti = i % t;
        let dot: f32 = (0..=ti).fold(0.0, |s, j| s + ar[j] * dr[j]);
        for j in 0..t {
            dr[j] = if j <= ti {
                ar[j] * (dr[j] - dot) * scale
            } else {
                0.0
            };
        }
    }
    d
}

#[test]
fn layer_kernels_match_the_cpu_ops() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("nn");
    let libs: Vec<&Lib> = emu
        .libs
        .iter()
        .filter(|l| l.kernels.iter().any(|k| NN.contains(k)))
        .collect();
    assert!(!libs.is_empty(), "no module exports the layer kernels");
    for lib in libs {
        nn_module(lib, &mut r);
    }
    r.finish();
}

// ---------------------------------------------------------------------------------------
// Coverage

/// A weight argument: f32, or bf16 bits (`w16` kernels).
fn weights(p: &[f32], w16: bool) -> Arg {
    if w16 {
        Arg::U16s(p.iter().map(|&x| f32_to_bf16(x)).collect())
    } else {
        Arg::F32s(p.to_vec())
    }
}

fn weights_f32(a: &Arg) -> Vec<f32> {
    match a {
        Arg::U16s(v) => v.iter().map(|&h| bf16_to_f32(h)).collect(),
        other => other.f32s().to_vec(),
    }
}

/// What bf16 storage does to the CPU's f32 result: one round to nearest even.
fn round_weights(p: &mut [f32], w16: bool) {
    if w16 {
        p.iter_mut().for_each(|x| *x = bf16_to_f32(f32_to_bf16(*x)));
    }
}

/// Kernels the tests above launch.
const COVERED: &[&str] = &[
    "q_dequant",
    "bf16_dequant",
    "bf16_quant",
    "q_requant",
    "adamw",
    "galore_adam",
    "bnb32",
    "bnb32_w16",
    "adam8",
    "adam8_w16",
    "sanitize",
    "sumsq_partial",
    "sum_partials",
    "top_eigvecs_rows",
    "top_eigvecs_cols",
    "transpose",
    "q_dequant_bf16",
];

#[test]
fn every_module_compiles_and_registers_its_kernels() {
    let Some(emu) = emu() else { return };
    for lib in &emu.libs {
        let reg = unsafe { CStr::from_ptr((lib.registered)()) }
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(
            reg,
            lib.kernels.join(","),
            "{}: registered kernels",
            lib.module
        );
        for k in lib.kernels {
            let sig = lib.signature(k);
            assert!(
                sig.iter().all(|p| !p.contains('?')),
                "{}/{k}: parameter of an unsupported type: {sig:?}",
                lib.module
            );
        }
        let (done, todo): (Vec<&str>, Vec<&str>) = lib
            .kernels
            .iter()
            .partition(|k| COVERED.contains(k) || NN.contains(k));
        println!("{}: exercised {}", lib.module, done.join(" "));
        if !todo.is_empty() {
            println!(
                "{}: compiled but NOT exercised by kernel_emu.rs: {}",
                lib.module,
                todo.join(" ")
            );
        }
    }
    // an unknown name is refused
    let lib = &emu.libs[0];
    let name = CString::new("no_such_kernel").unwrap();
    assert_eq!(
        unsafe { (lib.launch)(name.as_ptr(), 1, 1, 1, 1, 1, 1, std::ptr::null_mut()) },
        -1
    );
}

/// The emulator itself catches what it promises to: races between threads and between
/// blocks, deadlocks, full-mask shuffles in partial warps, accesses outside a buffer,
/// impossible launch shapes; and it runs correct code that relies on barriers, early
/// returns and warp shuffles.
#[test]
fn the_emulator_catches_defects() {
    let Some(emu) = emu() else { return };
    let t = &emu.selftest;
    let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let fails = |k: &str, cfg: Cfg, n: usize, what: &str| {
        let mut a = vec![Arg::F32s(x[..n].to_vec())];
        let e = t
            .try_launch(k, cfg, &mut a)
            .err()
            .unwrap_or_else(|| panic!("{k} must fail"));
        assert!(e.contains(what), "{k}: {e}");
    };
    fails("shift_missing_barrier", rows_cfg(1, 64), 64, "a race");
    fails("block_chain", rows_cfg(8, 32), 8, "a race");
    fails("divergent_sync", rows_cfg(1, 32), 32, "deadlock");
    fails(
        "write_before",
        rows_cfg(1, 32),
        8,
        "wrote before the start of argument 0",
    );
    // a full-mask shuffle in a partial warp (48 threads), and after a lane returned
    fails("warp_reduce", rows_cfg(1, 48), 48, "not a multiple of 32");
    fails(
        "shuffle_after_return",
        rows_cfg(1, 32),
        32,
        "undefined behaviour",
    );
    fails(
        "shift",
        rows_cfg(1, 2048),
        64,
        "invalid launch configuration",
    );

    let mut a = vec![Arg::F32s(x.clone())];
    t.launch("shift", rows_cfg(1, 64), &mut a);
    assert!(a[0]
        .f32s()
        .iter()
        .enumerate()
        .all(|(i, &v)| v == ((i + 1) % 64) as f32));
    let mut a = vec![Arg::F32s(x.clone())];
    t.launch("early_exit", rows_cfg(1, 64), &mut a);
    assert!(a[0]
        .f32s()
        .iter()
        .enumerate()
        .all(|(i, &v)| v == if i < 40 { (39 - i) as f32 } else { i as f32 }));
    let mut a = vec![Arg::F32s(x.clone())];
    t.launch("warp_reduce", rows_cfg(1, 64), &mut a);
    assert!(a[0]
        .f32s()
        .iter()
        .all(|&v| v == (0..64).sum::<i32>() as f32));

    // a read past the end of a real kernel's buffer
    let sanitize = emu.with("sanitize")[0];
    let n = 300;
    let mut a = vec![
        Arg::F32s(vec![0.0; n]),
        Arg::U64s(vec![0]),
        Arg::U64(n as u64 + 1),
    ];
    let e = sanitize
        .try_launch("sanitize", grid(n + 1), &mut a)
        .err()
        .expect("an out-of-bounds read must fail");
    assert!(e.contains("0 bytes past the end of argument 0"), "{e}");
}
