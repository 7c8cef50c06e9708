//! Checkpoint files: the trust boundary. Saves are atomic and durable; loads refuse
//! anything but a regular file without blocking on it.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::invalid(format!("cannot {what} checkpoint {}: {e}", path.display()))
}

/// Writes a checkpoint to `path` with `fill` atomically and durably: a uniquely named
/// temporary file in the same folder (created new, never reused or followed), fsync,
/// rename over the target, fsync of the folder. The target must be absent or a regular
/// file (a symlink, folder, FIFO or device is refused, never written through); on any
/// failure the temporary file is removed and an older checkpoint at `path` is untouched.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("checkpoint path {} names no file", path.display())))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(Error::invalid(format!("checkpoint path {} is a symlink; give the real file", path.display())))
        }
        Ok(m) if !m.is_file() => {
            return Err(Error::invalid(format!("checkpoint path {} exists and is not a regular file", path.display())))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("check", path, e)),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(".{}.tmp-{}-{nanos}", name.to_string_lossy(), std::process::id()));
    let r = (|| {
        // create_new: never reuse (or follow a symlink at) an existing name
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| io_err("create", &tmp, e))?;
        fill(&mut f).map_err(|e| Error { code: e.code, msg: format!("{}: {}", path.display(), e.msg) })?;
        f.sync_all().map_err(|e| io_err("write", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err("move into place", path, e))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return r;
    }
    // the rename is durable only once the folder's entry is on disk
    File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io_err("sync the folder of", path, e))
}

/// Opens a checkpoint for reading: refuses anything but a regular file before opening it
/// (a FIFO must not block), and again on the open descriptor (the path may have been
/// swapped meanwhile; O_NONBLOCK keeps that open from blocking).
pub fn open_read(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| io_err("read", path, e))?;
    if !meta.is_file() {
        return Err(Error::invalid(format!("checkpoint {} is not a regular file", path.display())));
    }
    let mut opts = OpenOptions::new();
    opts.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        const O_NONBLOCK: i32 = 0o4000;
        opts.custom_flags(O_NONBLOCK);
    }
    let f = opts.open(path).map_err(|e| io_err("read", path, e))?;
    let meta = f.metadata().map_err(|e| io_err("read", path, e))?;
    if !meta.is_file() {
        return Err(Error::invalid(format!("checkpoint {} is not a regular file", path.display())));
    }
    Ok(f)
}
