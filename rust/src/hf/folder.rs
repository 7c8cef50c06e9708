//! Writing a new folder safely: never into a user's non-empty folder, everything built in a
//! sibling temporary folder (files fsync'd) that is renamed into place at the end, and only
//! that temporary folder removed on failure, so the folder appears complete or not at all.

use crate::error::{Error, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// A temporary folder next to the target, removed on drop unless `commit` moved it.
pub struct Staging {
    pub tmp: PathBuf,
    target: PathBuf,
    what: String,
    done: bool,
}

impl Staging {
    /// Checks that `target` does not exist or is an empty folder and creates the staging
    /// folder next to it (creating missing parent folders).
    pub fn new(target: &Path) -> Result<Self> {
        Self::named(target, "export")
    }

    /// As `new`; `what` names the writer in the error ("export", "tokenizer save", …).
    pub fn named(target: &Path, what: &str) -> Result<Self> {
        match fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => {
                if !is_empty_dir(target)? {
                    return Err(Error::invalid(format!("{}: folder is not empty; {what} writes only into a new or empty folder", show(target))));
                }
            }
            Ok(_) => return Err(Error::invalid(format!("{}: exists and is not a folder; {what} writes only into a new or empty folder", show(target)))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::invalid(format!("{}: cannot check the folder: {e}", show(target)))),
        }
        let name = target.file_name().ok_or_else(|| Error::invalid(format!("{}: not a folder name", show(target))))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| Error::invalid(format!("{}: cannot create folder: {e}", show(&parent))))?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tmp = parent.join(format!(".{}.partial-{}-{nanos}", name.to_string_lossy(), std::process::id()));
        // create_dir fails if the name exists: we never take over a folder we did not make
        fs::create_dir(&tmp).map_err(|e| Error::invalid(format!("{}: cannot create folder: {e}", show(&tmp))))?;
        Ok(Staging { tmp, target: target.to_path_buf(), what: what.to_string(), done: false })
    }

    /// A path inside the staging folder.
    pub fn path(&self, file: &str) -> PathBuf {
        self.tmp.join(file)
    }

    /// Writes a whole file into the staging folder and fsyncs it.
    pub fn write(&self, file: &str, bytes: &[u8]) -> Result<()> {
        let p = self.path(file);
        let mut f = File::create(&p).map_err(|e| io_err(&p, e))?;
        f.write_all(bytes).map_err(|e| io_err(&p, e))?;
        f.sync_all().map_err(|e| io_err(&p, e))
    }

    /// Fsyncs a file written into the staging folder by someone else.
    pub fn sync(&self, file: &str) -> Result<()> {
        let p = self.path(file);
        File::open(&p).and_then(|f| f.sync_all()).map_err(|e| io_err(&p, e))
    }

    /// Moves the staging folder into place (replacing an empty target folder).
    pub fn commit(mut self) -> Result<()> {
        sync_dir(&self.tmp);
        let r = fs::rename(&self.tmp, &self.target).or_else(|e| {
            // Platforms that refuse to rename over an empty folder: remove it and retry. Only
            // a real folder (not a link) that is still empty is removed (remove_dir fails on
            // any other), and it is put back if the retry fails, so a user's folder is never
            // lost.
            let empty_dir = fs::symlink_metadata(&self.target).is_ok_and(|m| m.is_dir()) && is_empty_dir(&self.target).unwrap_or(false);
            if empty_dir && fs::remove_dir(&self.target).is_ok() {
                fs::rename(&self.tmp, &self.target).inspect_err(|_| {
                    let _ = fs::create_dir(&self.target);
                })
            } else {
                Err(e)
            }
        });
        r.map_err(|e| Error::invalid(format!("{}: cannot move the {} into place: {e}", show(&self.target), self.what)))?;
        self.done = true;
        if let Some(p) = self.target.parent() {
            sync_dir(if p.as_os_str().is_empty() { Path::new(".") } else { p });
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn is_empty_dir(p: &Path) -> Result<bool> {
    let mut it = fs::read_dir(p).map_err(|e| Error::invalid(format!("{}: cannot read folder: {e}", show(p))))?;
    Ok(it.next().is_none())
}

pub fn io_err(p: &Path, e: std::io::Error) -> Error {
    Error::invalid(format!("{}: {e}", show(p)))
}

/// Makes a folder's entries durable (a no-op where folders cannot be opened).
fn sync_dir(p: &Path) {
    if let Ok(f) = File::open(p) {
        let _ = f.sync_all();
    }
}
