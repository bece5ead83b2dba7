//! Reaching a NIC in another network namespace: a thread of its own enters the namespace (and,
//! for sysfs, mounts the namespace's sysfs in a private mount namespace), so the caller's
//! thread never moves. Used by every read and write of a kernel NIC's settings.

use std::os::fd::{AsRawFd, RawFd};
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

/// Runs `f` on a scoped thread of its own once `enter` has moved that thread into the network
/// namespace whose file is open as the argument (`None`: `f` runs here). `what` names the
/// thread in a panic.
fn on_thread<T: Send>(
    netns: Option<&Path>,
    what: &str,
    enter: impl FnOnce(&Path, RawFd) -> Result<(), NetnsError> + Send,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    let Some(path) = netns else {
        return Ok(f());
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(path).map_err(|source| NetnsError {
                path: path.into(),
                source,
            })?;
            enter(path, file.as_raw_fd())?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| panic!("{what} thread panicked"))
    })
}

/// Moves the calling thread into the network namespace open as `fd`.
fn setns(path: &Path, fd: RawFd) -> Result<(), NetnsError> {
    // SAFETY: setns on an open namespace file; it affects only the calling thread, which is
    // one [`on_thread`] spawned for it.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(NetnsError::last_os_error(path));
    }
    Ok(())
}

/// Runs `f` on a thread inside the network namespace at `netns` (`None`: here). Network
/// namespaces are per thread, so the caller's own thread never moves.
pub fn in_netns<T: Send>(
    netns: Option<&Path>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    on_thread(netns, "netns", setns, f)
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
    on_thread(netns, "netns sysfs", enter_with_sysfs, f)
}

/// Moves the calling thread into a private mount namespace and the network namespace open as
/// `fd`, and mounts that network namespace's sysfs over `/sys`.
fn enter_with_sysfs(path: &Path, fd: RawFd) -> Result<(), NetnsError> {
    // SAFETY: unshare of this thread's filesystem attributes and mount namespace (a thread
    // [`on_thread`] spawned for it); no other thread shares them afterwards.
    if unsafe { libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS) } != 0 {
        return Err(NetnsError::last_os_error(path));
    }
    // SAFETY: valid NUL-terminated strings; makes every mount of this thread's new mount
    // namespace private, so the sysfs mounted below never shows outside it.
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
    setns(path, fd)?;
    // SAFETY: valid NUL-terminated strings; a sysfs of the network namespace just entered,
    // over /sys in this thread's private mount namespace only.
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
    Ok(())
}
