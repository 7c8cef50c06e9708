//! Open MPI's C ABI, loaded at run time.
//!
//! Nothing here is linked: `libmpi.so` is opened with `dlopen` only when a run is launched by
//! `mpirun`/`srun` (or asked to), so a one-process run and a fresh build need no MPI at all.
//! Open MPI's handles are pointers to global objects (`MPI_COMM_WORLD` is
//! `&ompi_mpi_comm_world`, `MPI_FLOAT` is `&ompi_mpi_float`, …), so they are resolved with
//! `dlsym` like the functions. MPICH and its ABI family (Intel MPI, MVAPICH, Cray MPICH) use
//! integer handles and another `MPI_IN_PLACE`; they are recognised and refused with one line.

use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, c_void};

/// `MPI_THREAD_SERIALIZED`: any thread may call MPI, never two at once (a global lock
/// serialises the calls; the engine's rayon workers never call MPI).
pub const THREAD_SERIALIZED: c_int = 2;
/// Open MPI's `MPI_IN_PLACE` (`(void *) 1`).
const IN_PLACE: *const c_void = 1 as *const c_void;
/// Open MPI's `MPI_STATUS_IGNORE` (`(MPI_Status *) 0`).
const STATUS_IGNORE: *mut c_void = std::ptr::null_mut();
/// The largest count one call carries (MPI counts are `int`); longer buffers go in pieces.
pub const MAX_COUNT: usize = 1 << 30;

type Handle = *mut c_void;

/// The element types the collectives carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    U8,
}

/// A loaded Open MPI: function pointers and the predefined handles.
pub struct Mpi {
    _lib: libloading::Library,
    pub path: String,
    pub version: String,
    initialized: unsafe extern "C" fn(*mut c_int) -> c_int,
    finalized: unsafe extern "C" fn(*mut c_int) -> c_int,
    init_thread: unsafe extern "C" fn(*mut c_int, *mut *mut *mut c_char, c_int, *mut c_int) -> c_int,
    finalize: unsafe extern "C" fn() -> c_int,
    comm_rank: unsafe extern "C" fn(Handle, *mut c_int) -> c_int,
    comm_size: unsafe extern "C" fn(Handle, *mut c_int) -> c_int,
    comm_set_errhandler: unsafe extern "C" fn(Handle, Handle) -> c_int,
    error_string: unsafe extern "C" fn(c_int, *mut c_char, *mut c_int) -> c_int,
    barrier: unsafe extern "C" fn(Handle) -> c_int,
    allreduce: unsafe extern "C" fn(*const c_void, *mut c_void, c_int, Handle, Handle, Handle) -> c_int,
    iallreduce: unsafe extern "C" fn(*const c_void, *mut c_void, c_int, Handle, Handle, Handle, *mut Handle) -> c_int,
    bcast: unsafe extern "C" fn(*mut c_void, c_int, Handle, c_int, Handle) -> c_int,
    ibcast: unsafe extern "C" fn(*mut c_void, c_int, Handle, c_int, Handle, *mut Handle) -> c_int,
    ibarrier: unsafe extern "C" fn(Handle, *mut Handle) -> c_int,
    wait: unsafe extern "C" fn(*mut Handle, *mut c_void) -> c_int,
    test: unsafe extern "C" fn(*mut Handle, *mut c_int, *mut c_void) -> c_int,
    abort: unsafe extern "C" fn(Handle, c_int) -> c_int,
    comm_world: Handle,
    errors_return: Handle,
    op_sum: Handle,
    dt_float: Handle,
    dt_double: Handle,
    dt_byte: Handle,
}

// The handles are addresses of Open MPI's global objects, valid for the library's lifetime;
// every call goes through the one lock in `dist`, so sharing the table between threads is safe.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

/// A started non-blocking operation (`MPI_Request`).
pub struct Request(Handle);
unsafe impl Send for Request {}

/// Where `libmpi` is looked for: `QGALORE_MPI_LIB` alone when set, else the loader's search
/// path (`LD_LIBRARY_PATH`, the system folders), then the `lib/` folders of `OPAL_PREFIX`,
/// `MPI_HOME` and `I_MPI_ROOT`.
pub fn candidates() -> Vec<String> {
    if let Ok(p) = std::env::var("QGALORE_MPI_LIB") {
        if !p.is_empty() {
            return vec![p];
        }
    }
    let mut out: Vec<String> = vec!["libmpi.so.40".into(), "libmpi.so".into()];
    for var in ["OPAL_PREFIX", "MPI_HOME", "I_MPI_ROOT"] {
        if let Ok(root) = std::env::var(var) {
            if !root.is_empty() {
                out.push(format!("{root}/lib/libmpi.so.40"));
                out.push(format!("{root}/lib/libmpi.so"));
                out.push(format!("{root}/lib/libmpi.so.12"));
            }
        }
    }
    // MPICH's soname: found only to say that it is not supported.
    out.push("libmpi.so.12".into());
    out
}

fn open_global(path: &str) -> std::result::Result<libloading::Library, String> {
    // RTLD_GLOBAL: Open MPI's plugins (mca_*.so) resolve libmpi's symbols from the global
    // namespace; a local open leaves them unresolved and MPI_Init fails.
    #[cfg(unix)]
    {
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map(Into::into).map_err(|e| e.to_string())
    }
    #[cfg(not(unix))]
    {
        unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())
    }
}

unsafe fn sym<T: Copy>(lib: &libloading::Library, path: &str, name: &str) -> Result<T> {
    lib.get::<T>(name)
        .map(|s| *s)
        .map_err(|_| Error::backend(format!("{path} has no symbol {name}: not a complete MPI library (set QGALORE_MPI_LIB to Open MPI's libmpi.so)")))
}

/// The address of a data symbol (an Open MPI handle is the address of a global object).
unsafe fn address(lib: &libloading::Library, path: &str, name: &str) -> Result<Handle> {
    let p: Handle = sym(lib, path, name)?;
    if p.is_null() {
        return Err(Error::backend(format!("{path}: symbol {name} has no address")));
    }
    Ok(p)
}

/// The library's version text (`MPI_Get_library_version`, callable before `MPI_Init`), first
/// line only; empty when the library lacks it.
unsafe fn library_version(lib: &libloading::Library) -> String {
    let Ok(f) = lib.get::<unsafe extern "C" fn(*mut c_char, *mut c_int) -> c_int>(b"MPI_Get_library_version\0") else {
        return String::new();
    };
    // MPI_MAX_LIBRARY_VERSION_STRING is 256 in Open MPI, 8192 in MPICH
    let mut buf = vec![0u8; 8192];
    let mut len: c_int = 0;
    if f(buf.as_mut_ptr() as *mut c_char, &mut len) != 0 {
        return String::new();
    }
    let n = (len.max(0) as usize).min(buf.len());
    let text = String::from_utf8_lossy(&buf[..n]);
    text.trim_end_matches('\0').lines().next().unwrap_or("").trim().to_string()
}

impl Mpi {
    /// Opens the first MPI library found (see `candidates`) and checks it is Open MPI.
    pub fn load() -> Result<Mpi> {
        let mut tried = Vec::new();
        for path in candidates() {
            match open_global(&path) {
                Ok(lib) => return unsafe { Self::from_library(lib, path) },
                Err(e) => tried.push(if std::env::var("QGALORE_MPI_LIB").is_ok() { format!("{path} ({e})") } else { path }),
            }
        }
        Err(Error::backend(format!(
            "no MPI library found (tried {}): install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev) or set QGALORE_MPI_LIB to its libmpi.so",
            tried.join(", ")
        )))
    }

    unsafe fn from_library(lib: libloading::Library, path: String) -> Result<Mpi> {
        let version = library_version(&lib);
        if lib.get::<*mut c_void>(b"MPI_Init_thread\0").is_err() {
            return Err(Error::backend(format!("{path} is not an MPI library (no MPI_Init_thread): set QGALORE_MPI_LIB to Open MPI's libmpi.so")));
        }
        if lib.get::<*mut c_void>(b"ompi_mpi_comm_world\0").is_err() {
            let what = if version.is_empty() { "an MPI with integer handles (MPICH ABI)".to_string() } else { version.clone() };
            return Err(Error::backend(format!(
                "{path} is {what}: qgalore supports Open MPI only (run with Open MPI's mpirun, or set QGALORE_MPI_LIB to Open MPI's libmpi.so)"
            )));
        }
        Ok(Mpi {
            initialized: sym(&lib, &path, "MPI_Initialized")?,
            finalized: sym(&lib, &path, "MPI_Finalized")?,
            init_thread: sym(&lib, &path, "MPI_Init_thread")?,
            finalize: sym(&lib, &path, "MPI_Finalize")?,
            comm_rank: sym(&lib, &path, "MPI_Comm_rank")?,
            comm_size: sym(&lib, &path, "MPI_Comm_size")?,
            comm_set_errhandler: sym(&lib, &path, "MPI_Comm_set_errhandler")?,
            error_string: sym(&lib, &path, "MPI_Error_string")?,
            barrier: sym(&lib, &path, "MPI_Barrier")?,
            allreduce: sym(&lib, &path, "MPI_Allreduce")?,
            iallreduce: sym(&lib, &path, "MPI_Iallreduce")?,
            bcast: sym(&lib, &path, "MPI_Bcast")?,
            ibcast: sym(&lib, &path, "MPI_Ibcast")?,
            ibarrier: sym(&lib, &path, "MPI_Ibarrier")?,
            wait: sym(&lib, &path, "MPI_Wait")?,
            test: sym(&lib, &path, "MPI_Test")?,
            abort: sym(&lib, &path, "MPI_Abort")?,
            comm_world: address(&lib, &path, "ompi_mpi_comm_world")?,
            errors_return: address(&lib, &path, "ompi_mpi_errors_return")?,
            op_sum: address(&lib, &path, "ompi_mpi_op_sum")?,
            dt_float: address(&lib, &path, "ompi_mpi_float")?,
            dt_double: address(&lib, &path, "ompi_mpi_double")?,
            dt_byte: address(&lib, &path, "ompi_mpi_byte")?,
            _lib: lib,
            path,
            version,
        })
    }

    fn dtype(&self, d: Dtype) -> Handle {
        match d {
            Dtype::F32 => self.dt_float,
            Dtype::F64 => self.dt_double,
            Dtype::U8 => self.dt_byte,
        }
    }

    /// `MPI_Error_string` of a failed call, as one line naming the call.
    fn check(&self, what: &str, rc: c_int) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        let mut buf = vec![0u8; 1024];
        let mut len: c_int = 0;
        let text = if unsafe { (self.error_string)(rc, buf.as_mut_ptr() as *mut c_char, &mut len) } == 0 {
            String::from_utf8_lossy(&buf[..(len.max(0) as usize).min(buf.len())]).trim().to_string()
        } else {
            String::new()
        };
        Err(Error::backend(format!("MPI {what} failed (error {rc}{}{})", if text.is_empty() { "" } else { ": " }, text.replace('\n', " "))))
    }

    /// `MPI_Init_thread(SERIALIZED)` unless MPI is already up; errors then return instead
    /// of aborting the job. Returns (rank, size).
    pub fn init(&self) -> Result<(usize, usize)> {
        unsafe {
            let mut flag: c_int = 0;
            self.check("MPI_Finalized", (self.finalized)(&mut flag))?;
            if flag != 0 {
                return Err(Error::invalid("MPI was finalized in this process and cannot start again"));
            }
            self.check("MPI_Initialized", (self.initialized)(&mut flag))?;
            if flag == 0 {
                let mut provided: c_int = 0;
                let rc = (self.init_thread)(std::ptr::null_mut(), std::ptr::null_mut(), THREAD_SERIALIZED, &mut provided);
                self.check("MPI_Init_thread", rc)?;
                if provided < THREAD_SERIALIZED {
                    return Err(Error::backend(format!(
                        "{} provides thread level {provided}, qgalore needs MPI_THREAD_SERIALIZED (2)",
                        self.path
                    )));
                }
            }
            self.check("MPI_Comm_set_errhandler", (self.comm_set_errhandler)(self.comm_world, self.errors_return))?;
            let (mut rank, mut size): (c_int, c_int) = (0, 0);
            self.check("MPI_Comm_rank", (self.comm_rank)(self.comm_world, &mut rank))?;
            self.check("MPI_Comm_size", (self.comm_size)(self.comm_world, &mut size))?;
            Ok((rank as usize, size as usize))
        }
    }

    pub fn finalize(&self) -> Result<()> {
        unsafe {
            let mut flag: c_int = 0;
            self.check("MPI_Finalized", (self.finalized)(&mut flag))?;
            if flag != 0 {
                return Ok(());
            }
            self.check("MPI_Finalize", (self.finalize)())
        }
    }

    pub fn barrier(&self) -> Result<()> {
        unsafe { self.check("MPI_Barrier", (self.barrier)(self.comm_world)) }
    }

    /// In-place sum over every rank of `count` elements at `buf` (count ≤ MAX_COUNT).
    ///
    /// # Safety
    /// `buf` holds `count` elements of `dt`.
    pub unsafe fn allreduce_sum(&self, buf: *mut c_void, count: usize, dt: Dtype) -> Result<()> {
        debug_assert!(count <= MAX_COUNT);
        self.check("MPI_Allreduce", (self.allreduce)(IN_PLACE, buf, count as c_int, self.dtype(dt), self.op_sum, self.comm_world))
    }

    /// Starts an in-place sum (`MPI_Iallreduce`); `buf` must stay put until `wait`.
    ///
    /// # Safety
    /// `buf` holds `count` elements of `dt` and outlives the request.
    pub unsafe fn iallreduce_sum(&self, buf: *mut c_void, count: usize, dt: Dtype) -> Result<Request> {
        debug_assert!(count <= MAX_COUNT);
        let mut req: Handle = std::ptr::null_mut();
        self.check(
            "MPI_Iallreduce",
            (self.iallreduce)(IN_PLACE, buf, count as c_int, self.dtype(dt), self.op_sum, self.comm_world, &mut req),
        )?;
        Ok(Request(req))
    }

    /// Starts a barrier (`MPI_Ibarrier`).
    pub fn ibarrier(&self) -> Result<Request> {
        let mut req: Handle = std::ptr::null_mut();
        unsafe { self.check("MPI_Ibarrier", (self.ibarrier)(self.comm_world, &mut req))? };
        Ok(Request(req))
    }

    pub fn wait(&self, req: &mut Request) -> Result<()> {
        unsafe { self.check("MPI_Wait", (self.wait)(&mut req.0, STATUS_IGNORE)) }
    }

    /// Whether the request has completed (drives progress of non-blocking collectives).
    pub fn test(&self, req: &mut Request) -> Result<bool> {
        let mut flag: c_int = 0;
        unsafe { self.check("MPI_Test", (self.test)(&mut req.0, &mut flag, STATUS_IGNORE))? };
        Ok(flag != 0)
    }

    /// Broadcast of `count` bytes from `root` (count ≤ MAX_COUNT).
    ///
    /// # Safety
    /// `buf` holds `count` bytes.
    pub unsafe fn bcast(&self, buf: *mut c_void, count: usize, root: usize) -> Result<()> {
        debug_assert!(count <= MAX_COUNT);
        self.check("MPI_Bcast", (self.bcast)(buf, count as c_int, self.dt_byte, root as c_int, self.comm_world))
    }

    /// Starts a broadcast of `count` bytes from `root` (`MPI_Ibcast`); `buf` must stay put
    /// until the request completes.
    ///
    /// # Safety
    /// `buf` holds `count` bytes and outlives the request.
    pub unsafe fn ibcast(&self, buf: *mut c_void, count: usize, root: usize) -> Result<Request> {
        debug_assert!(count <= MAX_COUNT);
        let mut req: Handle = std::ptr::null_mut();
        self.check("MPI_Ibcast", (self.ibcast)(buf, count as c_int, self.dt_byte, root as c_int, self.comm_world, &mut req))?;
        Ok(Request(req))
    }

    /// Ends every rank of the job (`MPI_Abort`): for a rank that cannot go on while the
    /// others would wait for it forever.
    pub fn abort(&self, code: i32) {
        unsafe {
            (self.abort)(self.comm_world, code as c_int);
        }
    }
}
