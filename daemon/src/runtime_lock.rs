//! One enlightd per runtime directory: a `flock` on `<runtime dir>/enlightd.lock`, which holds
//! the pid of the daemon that has it. Two daemons on one directory would tune the same devices
//! against each other and share one audit log and one journal of kernel settings, so the second
//! refuses to start and names the first.
//!
//! The lock is the kernel's: it goes with the process however the process ends (SIGKILL
//! included), so a stale pid in the file never blocks anyone. The file itself stays (removing
//! it would let a third daemon lock a new file while a second still waits on the old one).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock file's name in the runtime directory.
pub const LOCK_FILE: &str = "enlightd.lock";

/// Why the runtime directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds it.
    #[error(
        "another enlightd ({}) already serves runtime directory {dir}; stop it, or give this one \
         another --runtime-dir",
        match pid { Some(p) => format!("pid {p}"), None => "pid unknown".to_string() }
    )]
    Held {
        /// The directory.
        dir: PathBuf,
        /// The holder's pid, as it wrote it.
        pid: Option<u32>,
    },
    /// The directory or the file could not be used.
    #[error("runtime directory {path}: {source}")]
    Io {
        /// What failed.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends, however it ends).
#[derive(Debug)]
pub struct RuntimeLock {
    file: File,
    path: PathBuf,
}

impl RuntimeLock {
    /// Creates `dir` if needed and takes its lock, writing this process's pid into it.
    pub fn acquire(dir: &Path) -> Result<RuntimeLock, LockError> {
        let (mut file, path) = open(dir)?;
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        if !try_lock(&file).map_err(io)? {
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                pid: read_pid(&mut file),
            });
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(RuntimeLock { file, path })
    }

    /// The pid of the process holding `dir`'s lock, if one does (`--check`: the lock is taken
    /// and released at once when free).
    pub fn holder(dir: &Path) -> Result<Option<u32>, LockError> {
        if !dir.join(LOCK_FILE).exists() {
            return Ok(None);
        }
        let (mut file, path) = open(dir)?;
        match try_lock(&file) {
            Ok(true) => Ok(None),
            Ok(false) => Ok(Some(read_pid(&mut file).unwrap_or(0))),
            Err(source) => Err(LockError::Io { path, source }),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeLock {
    fn drop(&mut self) {
        // The pid goes with the lock; the file stays (see the module's documentation).
        let _ = self.file.set_len(0);
    }
}

fn open(dir: &Path) -> Result<(File, PathBuf), LockError> {
    std::fs::create_dir_all(dir).map_err(|source| LockError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| LockError::Io {
            path: path.clone(),
            source,
        })?;
    Ok((file, path))
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another open file description holds it (in
/// this process too: locks of separate `open`s conflict).
fn try_lock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_the_first_pid() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        assert_eq!(RuntimeLock::holder(&run).unwrap(), None);
        let first = RuntimeLock::acquire(&run).unwrap();
        let me = std::process::id();
        let e = RuntimeLock::acquire(&run).unwrap_err();
        assert!(
            matches!(e, LockError::Held { pid: Some(p), .. } if p == me),
            "{e}"
        );
        assert!(e.to_string().contains(&format!("pid {me}")), "{e}");
        assert_eq!(RuntimeLock::holder(&run).unwrap(), Some(me));
        drop(first);
        assert_eq!(RuntimeLock::holder(&run).unwrap(), None);
        let again = RuntimeLock::acquire(&run).unwrap();
        assert!(again.path().ends_with(LOCK_FILE));
    }
}
