//! Reaching a NIC in another network namespace: a thread of its own enters the namespace (and,
//! for sysfs, mounts the namespace's sysfs in a private mount namespace), so the caller's
//! thread never moves. Used by every read and write of a kernel NIC's settings.

use std::path::{Path, PathBuf};

/// The network namespace could not be entered (or its sysfs mounted).
#[derive(Debug, thiserror::Error)]
#[error("entering network namespace {path}: {source}")]
pub struct NetnsError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl NetnsError {
    /// The error of the last failed system call on `path`.
    fn last_os_error(path: &Path) -> NetnsError {
        NetnsError {
            path: path.into(),
            source: std::io::Error::last_os_error(),
        }
    }
}

/// The namespace file at `path`, open.
fn open(path: &Path) -> Result<std::fs::File, NetnsError> {
    std::fs::File::open(path).map_err(|source| NetnsError {
        path: path.into(),
        source,
    })
}

/// Runs `f` on a thread inside the network namespace at `netns` (`None`: here). Network
/// namespaces are per thread, so the caller's own thread never moves.
pub fn in_netns<T: Send>(
    netns: Option<&Path>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    let Some(path) = netns else {
        return Ok(f());
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = open(path)?;
            use std::os::fd::AsRawFd;
            // SAFETY: setns on an open namespace file; it affects only this (scoped) thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::last_os_error(path));
            }
            Ok(f())
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// Runs `f` on a thread that sees the sysfs of the network namespace at `netns` at `/sys`
/// (`None`: here, the real `/sys`). sysfs shows the interfaces of the namespace it was mounted
/// in, so the thread gets a mount namespace of its own (every mount private, nothing
/// propagates back), enters the network namespace and mounts a fresh sysfs over `/sys` there,
/// as `ip netns exec` does. The mount namespace goes with the thread.
pub fn in_netns_sysfs<T: Send>(
    netns: Option<&Path>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    let Some(path) = netns else {
        return Ok(f());
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = open(path)?;
            use std::os::fd::AsRawFd;
            // SAFETY: unshare of this (scoped) thread's filesystem attributes and mount
            // namespace; no other thread shares them afterwards.
            if unsafe { libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS) } != 0 {
                return Err(NetnsError::last_os_error(path));
            }
            // SAFETY: valid NUL-terminated strings; makes every mount of this thread's new
            // mount namespace private, so the sysfs mounted below never shows outside it.
            if unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            } != 0
            {
                return Err(NetnsError::last_os_error(path));
            }
            // SAFETY: setns on an open namespace file; it affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::last_os_error(path));
            }
            // SAFETY: valid NUL-terminated strings; a sysfs of the network namespace just
            // entered, over /sys in this thread's private mount namespace only.
            if unsafe {
                libc::mount(
                    c"sysfs".as_ptr(),
                    c"/sys".as_ptr(),
                    c"sysfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            } != 0
            {
                return Err(NetnsError::last_os_error(path));
            }
            Ok(f())
        })
        .join()
        .expect("netns sysfs thread panicked")
    })
}
