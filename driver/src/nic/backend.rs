//! Frame backends: a tap, or in tests a `SOCK_SEQPACKET` socket pair.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::netns::Tap;

/// Where a NIC side gets and puts frames: a tap, or in tests a socket pair.
pub trait FrameIo: Send {
    /// Reads one frame into `buf` if one is waiting (non-blocking): `Ok(Some(len))`, or `Ok(None)`
    /// when none waits. A frame longer than `buf` is truncated to it.
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Sends one frame. A full queue is an error the caller counts (the frame is dropped).
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// A descriptor that polls readable when a frame waits.
    fn raw_fd(&self) -> RawFd;
}

impl FrameIo for Tap {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.read_frame(buf)
    }

    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.write_frame(frame)
    }

    fn raw_fd(&self) -> RawFd {
        Tap::raw_fd(self)
    }
}

/// One end of a `SOCK_SEQPACKET` socket pair: a frame backend without a kernel network stack
/// (unit tests, benchmarks of the rings alone).
pub struct FramePipe {
    fd: OwnedFd,
}

impl FramePipe {
    /// Two connected ends; a frame sent on one is received on the other.
    pub fn pair() -> io::Result<(FramePipe, FramePipe)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into the array on success; we own them.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fds owned by nobody else.
        Ok(unsafe {
            (
                FramePipe {
                    fd: OwnedFd::from_raw_fd(fds[0]),
                },
                FramePipe {
                    fd: OwnedFd::from_raw_fd(fds[1]),
                },
            )
        })
    }
}

impl FramePipe {
    /// Another handle on the same end (one thread sends on it while another receives).
    pub fn try_clone(&self) -> io::Result<FramePipe> {
        Ok(FramePipe {
            fd: self.fd.try_clone()?,
        })
    }
}

impl FrameIo for FramePipe {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: recv into a buffer we own, of its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        // 0: the other end is closed (we never send empty frames); nothing will come.
        if n > 0 {
            return Ok(Some(n as usize));
        }
        if n == 0 {
            return Ok(None);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        }
    }

    /// Waits up to 30 s for room (a test backend is lossless, a tap is not: a reader on a loaded
    /// machine may be descheduled for a while).
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // SAFETY: send from a slice we hold, of its length.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock || Instant::now() >= deadline {
                return Err(e);
            }
            let mut fds = [libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            }];
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 10) };
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
