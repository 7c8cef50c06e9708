//! Error type shared by every module; mapped to integer status codes at the C ABI.

use std::fmt;

/// Status codes returned through the C ABI (see `ffi.rs`). Kept small and stable:
/// the TypeScript side maps them to `EngineError.code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// A configuration or argument the caller can fix.
    Invalid = -1,
    /// A Rust panic caught at the boundary (an engine bug, never a user error).
    Panic = -2,
    /// The loss or the gradient became NaN/Inf; the step was not applied.
    NonFinite = -3,
    /// The backend (device, library) failed.
    Backend = -4,
}

/// An engine error: a code plus one line of user-readable text.
#[derive(Clone, Debug)]
pub struct Error {
    pub code: Code,
    pub msg: String,
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error { code: Code::Invalid, msg: msg.into() }
    }
    pub fn non_finite(msg: impl Into<String>) -> Self {
        Error { code: Code::NonFinite, msg: msg.into() }
    }
    pub fn backend(msg: impl Into<String>) -> Self {
        Error { code: Code::Backend, msg: msg.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Early-return an `Error::invalid` when a condition does not hold.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err($crate::error::Error::invalid(format!($($arg)*)));
        }
    };
}
