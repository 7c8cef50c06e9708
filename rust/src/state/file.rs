//! Checkpoint files: the trust boundary. Saves are atomic and durable; loads refuse
//! anything but a regular file without blocking on it.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::invalid(one_line(&format!("cannot {what} checkpoint {}: {e}", path.display())))
}

/// A message as one bounded line: a path may hold a newline.
fn one_line(msg: &str) -> String {
    super::tensors::printable(msg, 2000)
}

/// `e` prefixed with the checkpoint's path, the whole message one line.
pub fn at_path(path: &Path, e: Error) -> Error {
    Error { code: e.code, msg: one_line(&format!("{}: {}", path.display(), e.msg)) }
}

/// Longest file name (bytes) of most Linux file systems (NAME_MAX).
const NAME_MAX: usize = 255;

/// The temporary name for a save of `name`: `.<name>.tmp-<pid>-<ns>` (the front end
/// recognizes and removes stale ones), or `.qg-<pid>-<ns>.tmp` when that would exceed
/// NAME_MAX (a valid target name of up to 255 bytes must still be saveable).
fn temp_name(name: &std::ffi::OsStr, pid: u32, nanos: u128) -> std::ffi::OsString {
    let long = format!(".{}.tmp-{pid}-{nanos}", name.to_string_lossy());
    if long.len() <= NAME_MAX && name.to_str().is_some() {
        long.into()
    } else {
        format!(".qg-{pid}-{nanos}.tmp").into()
    }
}

/// Removes the temporary file when dropped unless disarmed: on an error and on a panic
/// unwinding through `fill` alike.
struct RemoveOnDrop<'a>(Option<&'a Path>);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes a checkpoint to `path` with `fill` atomically and durably: a uniquely named
/// temporary file in the same folder (created new, never reused or followed), fsync,
/// rename over the target, fsync of the folder. The target must be absent or a regular
/// file (a symlink, folder, FIFO or device is refused, never written through); on any
/// failure the temporary file is removed and an older checkpoint at `path` is untouched.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    write_atomic_inner(path, fill).map_err(|e| Error { code: e.code, msg: one_line(&e.msg) })
}

fn write_atomic_inner(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
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
    let tmp = dir.join(temp_name(name, std::process::id(), nanos));
    // messages name the checkpoint, not the hidden temporary file
    // create_new: never reuse (or follow a symlink at) an existing name
    let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| io_err("create", path, e))?;
    let mut guard = RemoveOnDrop(Some(&tmp));
    fill(&mut f).map_err(|e| at_path(path, e))?;
    f.sync_all().map_err(|e| io_err("write", path, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io_err("move into place", path, e))?;
    guard.0 = None;
    // the rename is durable only once the folder's entry is on disk
    File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io_err("sync the folder of", path, e))
}

/// Opens a checkpoint for reading: refuses anything but a regular file before opening it
/// (a FIFO must not block), and again on the open descriptor (the path may have been
/// swapped meanwhile; O_NONBLOCK keeps that open from blocking).
pub fn open_read(path: &Path) -> Result<File> {
    open_read_inner(path).map_err(|e| Error { code: e.code, msg: one_line(&e.msg) })
}

fn open_read_inner(path: &Path) -> Result<File> {
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
