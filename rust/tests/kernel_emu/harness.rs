//! The emulator: every kernel module compiled by the host C++ compiler with
//! `tests/emu/emu.h`, loaded, and launched on copies of Rust values; and `Report`, which
//! compares what the kernels computed with the CPU's results.

use qgalore::backend::cuda::kernels::{self, Module, MODULES, PRELUDE};
use qgalore::backend::cuda::launch::Launch;
use qgalore::quant::{bf16_to_f32, f32_to_bf16};
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

// ---------------------------------------------------------------------------------------
// Building and loading the emulated modules

pub type LaunchFn =
    unsafe extern "C" fn(*const c_char, u32, u32, u32, u32, u32, u32, *mut *mut c_void) -> i32;

/// One module compiled for the host.
pub struct Lib {
    pub module: &'static str,
    /// The kernels of its source (`kernel_names`), in source order.
    pub kernels: Vec<&'static str>,
    pub launch: LaunchFn,
    error: unsafe extern "C" fn() -> *const c_char,
    fault_addr: unsafe extern "C" fn() -> usize,
    set_schedule: unsafe extern "C" fn(i32),
    signature: unsafe extern "C" fn(*const c_char) -> *const c_char,
    pub registered: unsafe extern "C" fn() -> *const c_char,
    alloc: unsafe extern "C" fn(usize) -> *mut c_void,
    check: unsafe extern "C" fn(*mut c_void) -> i32,
    free: unsafe extern "C" fn(*mut c_void),
    // keeps the function pointers above valid
    _lib: libloading::Library,
}

pub struct Emu {
    /// One per entry of `kernels::MODULES`, in order.
    pub libs: Vec<Lib>,
    /// The kernels of `tests/emu/selftest.cu`.
    pub selftest: Lib,
}

impl Emu {
    /// The modules exporting `kernel` (a bf16 variant of a module exports the same names).
    pub fn with(&self, kernel: &str) -> Vec<&Lib> {
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
pub fn emu() -> Option<&'static Emu> {
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

/// The kernel entry points of a CUDA source, in order: the names of its
/// `extern "C" __global__ void NAME(` definitions (each starts a line, as in
/// `rust/kernels/*.cu`). The emulator registers exactly these, so the list of kernels is
/// written once, in the source.
pub fn kernel_names(src: &'static str) -> Vec<&'static str> {
    src.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix("extern \"C\"")?;
            let rest = rest.trim_start().strip_prefix("__global__")?;
            let rest = rest.trim_start().strip_prefix("void")?;
            let rest = rest.trim_start();
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            (end > 0 && rest[end..].trim_start().starts_with('(')).then(|| &rest[..end])
        })
        .collect()
}

/// Kernels with known defects (and some without), compiled like a module.
pub const SELFTEST: &str = include_str!("../emu/selftest.cu");

/// One translation unit for the host compiler.
struct Unit {
    name: &'static str,
    /// What NVRTC compiles (PRELUDE + source), with #line markers for messages.
    src: String,
    /// Preprocessor flags (`define_flags`).
    flags: Vec<String>,
    kernels: Vec<&'static str>,
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
            kernels: kernel_names(m.src),
        }
    }
}

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
            kernels: u.kernels.clone(),
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
        kernels: kernel_names(SELFTEST),
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
pub enum Arg {
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
    pub fn f32s(&self) -> &[f32] {
        match self {
            Arg::F32s(v) => v,
            a => panic!("not an f32 buffer: {a:?}"),
        }
    }
    pub fn u8s(&self) -> &[u8] {
        match self {
            Arg::U8s(v) => v,
            a => panic!("not a u8 buffer: {a:?}"),
        }
    }
    pub fn u16s(&self) -> &[u16] {
        match self {
            Arg::U16s(v) => v,
            a => panic!("not a u16 buffer: {a:?}"),
        }
    }
    pub fn u64s(&self) -> &[u64] {
        match self {
            Arg::U64s(v) => v,
            a => panic!("not a u64 buffer: {a:?}"),
        }
    }
    pub fn f64s(&self) -> &[f64] {
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

/// What a launch saw: the arguments as the kernel read them (bf16-rounded where the
/// kernel takes bf16), for computing the reference from the same inputs.
pub struct Launched {
    pub before: Vec<Arg>,
    /// Per argument: whether it went to the kernel as bf16.
    pub bf16: Vec<bool>,
}

impl Launched {
    /// Whether any argument went to the kernel as bf16.
    pub fn any_bf16(&self) -> bool {
        self.bf16.contains(&true)
    }

    /// The tolerance for output argument `i`: the reference is computed from the inputs
    /// as the kernel read them, so only a result stored as bf16 gets the bf16 tolerance.
    pub fn tol(&self, i: usize) -> Tol {
        let bf16 = self.bf16[i];
        Tol {
            rel: if bf16 { 1e-2 } else { 1e-5 },
            bf16,
        }
    }
}

/// A relative tolerance, and whether the kernel stored its result as bf16.
#[derive(Clone, Copy)]
pub struct Tol {
    rel: f64,
    bf16: bool,
}

impl Lib {
    pub fn signature(&self, kernel: &str) -> Vec<String> {
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
    pub fn launch(&self, kernel: &str, cfg: Launch, args: &mut [Arg]) -> Launched {
        self.try_launch(kernel, cfg, args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `launch`, with the kernel's own failures (undefined behaviour, faults) as `Err`.
    pub fn try_launch(
        &self,
        kernel: &str,
        cfg: Launch,
        args: &mut [Arg],
    ) -> Result<Launched, String> {
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
        cfg: Launch,
        args: &[Arg],
        conv: &[bool],
        schedule: i32,
    ) -> Result<Vec<Option<Vec<u8>>>, String> {
        let Launch {
            grid: g,
            block: b,
            shared,
        } = cfg;
        assert_eq!(
            shared, 0,
            "{}/{kernel}: dynamic shared memory is not emulated",
            self.module
        );
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
pub struct Report {
    name: &'static str,
    t0: Instant,
    lines: Vec<String>,
    pub failures: Vec<String>,
    /// Per kernel: largest relative error, its tolerance, values equal to the (rounded)
    /// CPU value, values compared.
    stats: Vec<(String, f64, f64, usize, usize)>,
}

impl Report {
    pub fn new(name: &'static str) -> Self {
        Report {
            name,
            t0: Instant::now(),
            lines: Vec::new(),
            failures: Vec::new(),
            stats: Vec::new(),
        }
    }

    /// Bit-identical f32 (NaN payloads and signed zeros included).
    pub fn same_f32(&mut self, what: &str, got: &[f32], want: &[f32]) {
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

    pub fn same<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: &[T], want: &[T]) {
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
    pub fn close(
        &mut self,
        key: &str,
        what: &str,
        got: &[f32],
        want: &[f32],
        row: usize,
        tol: Tol,
    ) {
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

    pub fn note(&mut self, line: String) {
        self.lines.push(line);
    }

    pub fn finish(self) {
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
