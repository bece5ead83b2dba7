//! The host service's backing file: opened with `O_DIRECT` where the file system allows,
//! created or grown (never shrunk unasked) to the disk's size.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::proto::SECTOR;
use super::DiskError;

/// A backing file for the host service.
pub struct Backing {
    pub(super) file: File,
    pub(super) capacity_sectors: u64,
    direct: bool,
}

impl Backing {
    /// Opens `path` read-write, with `O_DIRECT` when the file system allows it.
    pub fn open(path: &Path) -> Result<Backing, DiskError> {
        let err = |source| DiskError::Backing {
            path: path.display().to_string(),
            source,
        };
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let (file, direct) = match direct {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::info!(
                    "{}: O_DIRECT not supported by this file system, using buffered I/O",
                    path.display()
                );
                (
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(path)
                        .map_err(err)?,
                    false,
                )
            }
            Err(e) => return Err(err(e)),
        };
        let len = file.metadata().map_err(err)?.len();
        Ok(Backing {
            file,
            capacity_sectors: len / SECTOR as u64,
            direct,
        })
    }

    /// Creates a backing file of `bytes`, allocated on disk, or grows an existing one to that
    /// size; bytes already in the file are never touched. An existing file larger than `bytes`
    /// is refused ([`DiskError::WouldShrink`]): a file the user named is never cut down without
    /// [`Backing::resize`], which the caller asks for explicitly.
    pub fn create(path: &Path, bytes: u64) -> Result<(), DiskError> {
        Backing::size_to(path, bytes, false, Fill::Allocate)
    }

    /// As [`Backing::create`], but the part it adds is written out (zeros) and on disk. Slower
    /// to create, but the blocks are plain written extents: random writes into a file of
    /// unwritten (fallocated) extents split it into tens of thousands of extents, each
    /// converted on its first write and freed (and, on a file system mounted with `discard`,
    /// discarded) one by one when the file is deleted, which took `enlight demo` over a minute
    /// after a few minutes' run.
    pub fn create_written(path: &Path, bytes: u64) -> Result<(), DiskError> {
        Backing::size_to(path, bytes, false, Fill::Zeros)
    }

    /// As [`Backing::create_written`], but also cuts an existing larger file down to `bytes`
    /// (destroying what lies past that point): only at the user's explicit request
    /// (`enlight disk --shrink`).
    pub fn resize(path: &Path, bytes: u64) -> Result<(), DiskError> {
        Backing::size_to(path, bytes, true, Fill::Zeros)
    }

    fn size_to(path: &Path, bytes: u64, shrink: bool, fill: Fill) -> Result<(), DiskError> {
        let err = |source| DiskError::Backing {
            path: path.display().to_string(),
            source,
        };
        if bytes == 0 || bytes > i64::MAX as u64 {
            return Err(DiskError::Invalid(format!(
                "backing file {}: a size of {bytes} bytes is outside 1..={}",
                path.display(),
                i64::MAX
            )));
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(err)?;
        let meta = f.metadata().map_err(err)?;
        if !meta.is_file() {
            return Err(DiskError::Invalid(format!(
                "backing file {}: not a regular file, so it cannot be created or sized",
                path.display()
            )));
        }
        if meta.len() > bytes {
            if !shrink {
                return Err(DiskError::WouldShrink {
                    path: path.display().to_string(),
                    have: meta.len(),
                    want: bytes,
                });
            }
            f.set_len(bytes).map_err(err)?;
            return Ok(());
        }
        match fill {
            Fill::Allocate => {
                // posix_fallocate only ever grows a file (and allocates what it adds); where
                // the file system lacks it, set_len grows it sparse. Neither runs on a larger
                // file (above).
                // SAFETY: plain syscall on our file.
                if unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, bytes as libc::off_t) } != 0 {
                    f.set_len(bytes).map_err(err)?;
                }
                Ok(())
            }
            Fill::Zeros => {
                use std::io::{Seek, SeekFrom, Write};
                let mut f = f;
                let mut len = meta.len();
                f.seek(SeekFrom::Start(len)).map_err(err)?;
                let chunk = vec![0u8; 1 << 20];
                while len < bytes {
                    let n = (bytes - len).min(chunk.len() as u64) as usize;
                    f.write_all(&chunk[..n]).map_err(err)?;
                    len += n as u64;
                }
                f.sync_data().map_err(err)
            }
        }
    }

    /// Size in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether `O_DIRECT` is in use.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The open file (for device models that do their own positioned I/O; with `O_DIRECT`,
    /// buffers and offsets must be 512-byte aligned).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// How [`Backing`] fills the part of a file it adds.
#[derive(Clone, Copy)]
enum Fill {
    /// Allocated but unwritten extents (`posix_fallocate`): fast to create.
    Allocate,
    /// Zeros written out: plain extents, quick to delete after random writes.
    Zeros,
}
