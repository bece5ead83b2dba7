//! A VMBus-style channel: two rings and two eventfds in one memfd-backed shared region.
//!
//! Region layout: `[outbound ring: control page + data][inbound ring: control page + data][extra]`.
//! The outbound ring carries guest → host packets (the guest writes, the host reads), the inbound
//! ring host → guest. The extra area is a shared buffer area (the analogue of the guest pages a
//! storvsc request points at with GPA-direct ranges) where the disk keeps its data buffers.
//!
//! Signals are eventfds, one per direction. As with a VMBus channel interrupt, one signal covers
//! both "a packet arrived in your inbound ring" and "space was freed in your outbound ring", so a
//! woken side re-checks both rings.
//!
//! Both ends can live in one process (threads) or the host end can be handed to another process
//! over a Unix socket ([`create_for_peer`], [`receive_host_end`]): the memfd and both eventfds
//! travel as `SCM_RIGHTS`, the sizes in a small header the receiver validates against the memfd's
//! real size. The memfd is sealed against shrinking and growing (`F_SEAL_SHRINK | F_SEAL_GROW |
//! F_SEAL_SEAL`) before anyone maps it, and the receiver refuses one without those seals
//! ([`ChannelError::Unsealed`]): a peer that could truncate the region under our mapping could
//! kill us with SIGBUS on our next access. The socket then stays open as a liveness check: [`Waiter::wait`] reports
//! [`WaitResult::PeerGone`] when the other process has exited.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use crate::ring::{self, RingError, RingReader, RingWriter, PAGE_SIZE};
use crate::shmem::SharedMem;

/// Largest ring data area we accept from a peer or a config (64 MiB).
pub const MAX_RING_BYTES: usize = 64 << 20;
/// Largest extra area we accept (1 GiB).
pub const MAX_EXTRA_BYTES: usize = 1 << 30;
const HANDOFF_MAGIC: u32 = 0x454e_4c54; // "ENLT"
const HANDOFF_VERSION: u32 = 1;
pub(crate) const HANDOFF_HEADER_LEN: usize = 40;

/// Sizes of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Data area of the outbound (guest → host) ring, a page multiple.
    pub out_ring_bytes: usize,
    /// Data area of the inbound (host → guest) ring, a page multiple.
    pub in_ring_bytes: usize,
    /// Shared buffer area after the rings, a page multiple (may be 0).
    pub extra_bytes: usize,
}

impl ChannelConfig {
    fn validate(&self) -> Result<(), ChannelError> {
        let ring_ok =
            |n: usize| n >= PAGE_SIZE && n.is_multiple_of(PAGE_SIZE) && n <= MAX_RING_BYTES;
        if !ring_ok(self.out_ring_bytes) || !ring_ok(self.in_ring_bytes) {
            return Err(ChannelError::BadConfig(format!(
                "ring sizes must be page multiples between 4 KiB and 64 MiB (got {} and {})",
                self.out_ring_bytes, self.in_ring_bytes
            )));
        }
        if !self.extra_bytes.is_multiple_of(PAGE_SIZE) || self.extra_bytes > MAX_EXTRA_BYTES {
            return Err(ChannelError::BadConfig(format!(
                "extra area must be a page multiple of at most 1 GiB (got {})",
                self.extra_bytes
            )));
        }
        Ok(())
    }

    fn out_len(&self) -> usize {
        PAGE_SIZE + self.out_ring_bytes
    }

    fn in_len(&self) -> usize {
        PAGE_SIZE + self.in_ring_bytes
    }

    /// Bytes of the whole shared region.
    pub fn region_len(&self) -> usize {
        self.out_len() + self.in_len() + self.extra_bytes
    }
}

/// Channel set-up and signalling errors.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Sizes out of range.
    #[error("bad channel configuration: {0}")]
    BadConfig(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: io::Error,
    },
    /// The hand-off message from the peer is malformed.
    #[error("bad channel hand-off from peer: {0}")]
    BadHandoff(String),
    /// A ring could not be set up.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The peer's memfd is not sealed against resizing: it could truncate the region under our
    /// mapping and kill us with SIGBUS on the next access.
    #[error(
        "the peer's memfd is not sealed against resizing (seals {seals:#x}; need F_SEAL_SHRINK, \
         F_SEAL_GROW and F_SEAL_SEAL, and no write seal)"
    )]
    Unsealed { seals: u32 },
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> ChannelError {
    move |source| ChannelError::Os { what, source }
}

fn last_os(what: &'static str) -> ChannelError {
    ChannelError::Os {
        what,
        source: io::Error::last_os_error(),
    }
}

/// The shared mapping; unmapped when the last piece holding it is dropped.
struct SharedRegion {
    ptr: *mut u8,
    len: usize,
    memfd: OwnedFd,
}

// SAFETY: the mapping is shared memory accessed only through atomics (the rings' control pages
// and `SharedMem` word copies) or by system calls on raw pointers handed out by `extra_area`.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; SharedRegion itself has no interior state besides the immutable pointer.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    fn map(memfd: OwnedFd, len: usize) -> Result<SharedRegion, ChannelError> {
        // SAFETY: mapping a memfd we own, MAP_SHARED, at an address the kernel chooses.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last_os("mmap of the channel region"));
        }
        Ok(SharedRegion {
            ptr: ptr.cast(),
            len,
            memfd,
        })
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; every ring end and area user holds an
        // Arc to this region, so nothing uses the mapping any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub(crate) fn eventfd() -> Result<OwnedFd, ChannelError> {
    // SAFETY: plain syscall; the returned fd is owned by us on success.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(last_os("eventfd"));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Raises the peer's eventfd. Cheap to clone and usable from any thread.
#[derive(Clone)]
pub struct Signaller {
    fd: Arc<OwnedFd>,
}

impl Signaller {
    /// Signals the peer (adds 1 to its eventfd).
    pub fn signal(&self) -> Result<(), ChannelError> {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a local u64 to an eventfd we hold open.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if n == 8 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // EAGAIN: the counter is saturated, so the peer is certainly woken already.
        if err.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(());
        }
        Err(ChannelError::Os {
            what: "eventfd write",
            source: err,
        })
    }
}

/// Result of [`Waiter::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitResult {
    /// The peer signalled (possibly several times).
    Signalled,
    /// The timeout passed without a signal.
    TimedOut,
    /// The peer process closed its end of the hand-off socket (it exited).
    PeerGone,
}

/// Waits on our own eventfd (and, across processes, on the peer's liveness).
pub struct Waiter {
    fd: Arc<OwnedFd>,
    peer: Option<Arc<UnixStream>>,
}

impl Waiter {
    /// Sleeps until the peer signals, the timeout passes, or the peer is gone. Drains the
    /// eventfd, so several signals count as one wake-up.
    pub fn wait(&self, timeout: Duration) -> Result<WaitResult, ChannelError> {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            // Only hang-up counts: the socket may also carry data (a ring resize hands a new
            // host end over it), which must not read as the peer leaving.
            libc::pollfd {
                fd: -1,
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        if let Some(peer) = &self.peer {
            fds[1].fd = peer.as_raw_fd();
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of 2 pollfd; a negative fd is ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(WaitResult::TimedOut);
            }
            return Err(ChannelError::Os {
                what: "poll",
                source: err,
            });
        }
        if fds[0].revents & libc::POLLIN != 0 {
            self.drain()?;
            return Ok(WaitResult::Signalled);
        }
        if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Ok(WaitResult::PeerGone);
        }
        Ok(WaitResult::TimedOut)
    }

    /// Clears pending signals without sleeping; true if there were any.
    pub fn drain(&self) -> Result<bool, ChannelError> {
        let mut value: u64 = 0;
        // SAFETY: reading 8 bytes into a local u64 from a non-blocking eventfd.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
        if n == 8 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(false);
        }
        Err(ChannelError::Os {
            what: "eventfd read",
            source: err,
        })
    }

    /// The eventfd, for callers that integrate with their own poll loop.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The shared extra area, kept alive with the mapping. The peer may read and write it at any
/// moment: every copy in or out is an atomic word copy ([`SharedMem`]).
#[derive(Clone)]
pub struct SharedArea {
    region: Arc<SharedRegion>,
    mem: SharedMem,
}

impl SharedArea {
    /// Start of the area, for system calls that read or write it themselves (`pread`,
    /// `pwrite`). The peer may read and write it concurrently: never make a Rust reference
    /// into it; copy with [`read_at`](Self::read_at)/[`write_at`](Self::write_at).
    pub fn as_ptr(&self) -> *mut u8 {
        self.mem.as_ptr()
    }

    /// The area as shared memory (valid while this `SharedArea` or a clone of it lives).
    pub fn mem(&self) -> SharedMem {
        self.mem
    }

    /// Length of the area.
    pub fn len(&self) -> usize {
        self.mem.len()
    }

    /// Whether the area is empty.
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// Copies out of the area (each byte read once); `None` if the range is outside it.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Option<()> {
        self.mem.read(offset, dst).ok()
    }

    /// Copies into the area; `None` if the range is outside it.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Option<()> {
        self.mem.write(offset, src).ok()
    }

    /// The memfd of the whole channel region (for the fuzzing harness's hostile peer).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn memfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.region.memfd.as_fd()
    }

    /// Copies the first `len` bytes of this area into `dst` (a multiple of 8 bytes that fits in
    /// both areas); `None` otherwise.
    pub fn copy_to(&self, dst: &SharedArea, len: usize) -> Option<()> {
        self.mem.copy_to(0, &dst.mem, 0, len).ok()
    }
}

/// The guest's end: writes requests into the outbound ring, reads completions from the inbound.
pub struct GuestEnd {
    /// Outbound ring (guest → host).
    pub tx: RingWriter,
    /// Inbound ring (host → guest).
    pub rx: RingReader,
    /// Signals the host.
    pub to_host: Signaller,
    /// Woken by the host.
    pub from_host: Waiter,
    /// The shared buffer area.
    pub extra: SharedArea,
    /// Sizes.
    pub config: ChannelConfig,
}

/// The host's end: reads requests from the outbound ring, writes completions into the inbound.
pub struct HostEnd {
    /// Outbound ring (guest → host), read by the host.
    pub rx: RingReader,
    /// Inbound ring (host → guest), written by the host.
    pub tx: RingWriter,
    /// Signals the guest.
    pub to_guest: Signaller,
    /// Woken by the guest.
    pub from_guest: Waiter,
    /// The shared buffer area.
    pub extra: SharedArea,
    /// Sizes.
    pub config: ChannelConfig,
}

/// The pieces of an end, for using the writer and the reader from different threads.
pub struct EndParts {
    /// The ring this end writes.
    pub tx: RingWriter,
    /// The ring this end reads.
    pub rx: RingReader,
    /// Signals the peer (clone it for every writing thread).
    pub signaller: Signaller,
    /// Waits for the peer's signals.
    pub waiter: Waiter,
    /// The shared buffer area.
    pub extra: SharedArea,
}

macro_rules! end_methods {
    ($end:ident, $sig:ident, $wait:ident) => {
        impl $end {
            /// Signals the peer (eventfd write of 1). One signal means "data in your inbound
            /// ring" or "space in your outbound ring": the peer re-checks both.
            pub fn signal_peer(&self) -> Result<(), ChannelError> {
                self.$sig.signal()
            }

            /// Sleeps until the peer signals, `timeout` passes, or (across processes) the peer
            /// is gone; drains the eventfd. After a wake-up re-check both rings.
            pub fn wait(&self, timeout: Duration) -> Result<WaitResult, ChannelError> {
                self.$wait.wait(timeout)
            }

            /// Raw pointer and length of the shared buffer area, valid while any piece of this
            /// channel lives. The peer may read and write it concurrently: copy through
            /// [`SharedArea`] (or pass it to I/O syscalls), never hold Rust references into it.
            pub fn extra_area(&self) -> (*mut u8, usize) {
                (self.extra.as_ptr(), self.extra.len())
            }

            /// The channel's sizes.
            pub fn config(&self) -> ChannelConfig {
                self.config
            }

            /// Splits the end so the writer and the reader can be used from different threads.
            pub fn into_parts(self) -> EndParts {
                EndParts {
                    tx: self.tx,
                    rx: self.rx,
                    signaller: self.$sig,
                    waiter: self.$wait,
                    extra: self.extra,
                }
            }

            /// Watches `sock` for the peer's exit: from now on [`wait`](Self::wait) reports
            /// [`WaitResult::PeerGone`] once the peer's end of the socket is closed.
            pub fn watch_peer(&mut self, sock: &UnixStream) -> Result<(), ChannelError> {
                let keep = sock.try_clone().map_err(os("dup of the peer socket"))?;
                self.$wait.peer = Some(Arc::new(keep));
                Ok(())
            }
        }
    };
}

end_methods!(GuestEnd, to_host, from_host);
end_methods!(HostEnd, to_guest, from_guest);

impl HostEnd {
    /// Sends this host end to the process at the other end of `sock` (memfd and both eventfds as
    /// `SCM_RIGHTS`, sizes in a header), where [`receive_host_end`] validates and maps it. The
    /// rings are not re-initialised on the other side.
    pub fn send_to(self, sock: &UnixStream) -> Result<(), ChannelError> {
        let fds = [
            self.extra.region.memfd.as_raw_fd(),
            self.from_guest.fd.as_raw_fd(),
            self.to_guest.fd.as_raw_fd(),
        ];
        send_with_fds(sock, &handoff_header(&self.config), &fds)
    }
}

struct Parts {
    region: Arc<SharedRegion>,
    guest_to_host: Arc<OwnedFd>,
    host_to_guest: Arc<OwnedFd>,
}

fn ends(
    cfg: ChannelConfig,
    parts: &Parts,
    peer: Option<Arc<UnixStream>>,
) -> Result<(GuestEnd, HostEnd), ChannelError> {
    let base = parts.region.ptr;
    let out_len = cfg.out_len();
    let in_len = cfg.in_len();
    // SAFETY: the region is cfg.region_len() bytes (created or verified by fstat), page aligned,
    // and stays mapped while the ends hold `region`. Each ring has one writer and one reader;
    // the unused ends are dropped by the caller without touching the rings.
    let (g_tx, g_rx, h_rx, h_tx) = unsafe {
        let in_base = base.add(out_len);
        (
            RingWriter::new(base, out_len)?,
            RingReader::new(in_base, in_len)?,
            RingReader::new(base, out_len)?,
            RingWriter::new(in_base, in_len)?,
        )
    };
    // SAFETY: the extra area is the page-aligned tail of the region after both rings, mapped
    // while `region` lives (SharedArea holds it); this process touches it only through SharedMem
    // or system calls.
    let mem = unsafe { SharedMem::new(base.add(out_len + in_len), cfg.extra_bytes) }
        .ok_or_else(|| ChannelError::BadConfig("extra area is not word-aligned".into()))?;
    let extra = SharedArea {
        region: Arc::clone(&parts.region),
        mem,
    };
    let guest = GuestEnd {
        tx: g_tx,
        rx: g_rx,
        to_host: Signaller {
            fd: Arc::clone(&parts.guest_to_host),
        },
        from_host: Waiter {
            fd: Arc::clone(&parts.host_to_guest),
            peer: peer.clone(),
        },
        extra: extra.clone(),
        config: cfg,
    };
    let host = HostEnd {
        rx: h_rx,
        tx: h_tx,
        to_guest: Signaller {
            fd: Arc::clone(&parts.host_to_guest),
        },
        from_guest: Waiter {
            fd: Arc::clone(&parts.guest_to_host),
            peer,
        },
        extra,
        config: cfg,
    };
    Ok((guest, host))
}

fn create_parts(cfg: &ChannelConfig) -> Result<Parts, ChannelError> {
    cfg.validate()?;
    let name = c"enlight-channel";
    // SAFETY: name is a valid C string; the returned fd is owned by us on success.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(last_os("memfd_create"));
    }
    // SAFETY: fd is fresh and owned by nobody else.
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on our fd.
    if unsafe { libc::ftruncate(memfd.as_raw_fd(), cfg.region_len() as libc::off_t) } != 0 {
        return Err(last_os("ftruncate of the channel memfd"));
    }
    // Fix the size for good before anyone maps it: a process holding the memfd could otherwise
    // truncate it and turn the other side's next access into SIGBUS. The receiving side refuses
    // a memfd without these seals (`check_seals`).
    // SAFETY: plain syscall on our fd.
    if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, REQUIRED_SEALS) } != 0 {
        return Err(last_os("sealing the channel memfd"));
    }
    let region = SharedRegion::map(memfd, cfg.region_len())?;
    // SAFETY: the region is freshly mapped, zeroed by the kernel, and unused; each ring lies
    // inside it.
    unsafe {
        ring::ring_init(region.ptr, cfg.out_len())?;
        ring::ring_init(region.ptr.add(cfg.out_len()), cfg.in_len())?;
    }
    Ok(Parts {
        region: Arc::new(region),
        guest_to_host: Arc::new(eventfd()?),
        host_to_guest: Arc::new(eventfd()?),
    })
}

/// Creates a channel whose two ends live in this process (for threads).
pub fn create(cfg: &ChannelConfig) -> Result<(GuestEnd, HostEnd), ChannelError> {
    let parts = create_parts(cfg)?;
    ends(*cfg, &parts, None)
}

/// Creates a channel, sends its host end to the process at the other end of `sock`, and returns
/// the guest end. The socket stays open as a liveness check. Equivalent to [`create`], then
/// [`HostEnd::send_to`] and [`GuestEnd::watch_peer`].
pub fn create_for_peer(cfg: &ChannelConfig, sock: UnixStream) -> Result<GuestEnd, ChannelError> {
    let (mut guest, host) = create(cfg)?;
    host.send_to(&sock)?;
    guest.from_host.peer = Some(Arc::new(sock));
    Ok(guest)
}

pub(crate) fn handoff_header(cfg: &ChannelConfig) -> [u8; HANDOFF_HEADER_LEN] {
    let mut header = [0u8; HANDOFF_HEADER_LEN];
    header[0..4].copy_from_slice(&HANDOFF_MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&HANDOFF_VERSION.to_le_bytes());
    header[8..16].copy_from_slice(&(cfg.out_ring_bytes as u64).to_le_bytes());
    header[16..24].copy_from_slice(&(cfg.in_ring_bytes as u64).to_le_bytes());
    header[24..32].copy_from_slice(&(cfg.extra_bytes as u64).to_le_bytes());
    header
}

/// Receives a host end sent by [`create_for_peer`] or [`HostEnd::send_to`], validating everything the peer sent.
pub fn receive_host_end(sock: &UnixStream) -> Result<HostEnd, ChannelError> {
    let mut header = [0u8; HANDOFF_HEADER_LEN];
    let fds = recv_with_fds(sock, &mut header)?;
    let [memfd, g2h, h2g]: [OwnedFd; 3] = fds.try_into().map_err(|v: Vec<OwnedFd>| {
        ChannelError::BadHandoff(format!("expected 3 descriptors, got {}", v.len()))
    })?;
    let u32_at = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
    if u32_at(0) != HANDOFF_MAGIC || u32_at(4) != HANDOFF_VERSION {
        return Err(ChannelError::BadHandoff(format!(
            "magic/version {:#x}/{}",
            u32_at(0),
            u32_at(4)
        )));
    }
    let size =
        |v: u64| usize::try_from(v).map_err(|_| ChannelError::BadHandoff(format!("size {v}")));
    let cfg = ChannelConfig {
        out_ring_bytes: size(u64_at(8))?,
        in_ring_bytes: size(u64_at(16))?,
        extra_bytes: size(u64_at(24))?,
    };
    cfg.validate()
        .map_err(|e| ChannelError::BadHandoff(e.to_string()))?;
    // Seals first: once they are in place the size cannot change between the check below and
    // the mapping (or ever after).
    check_seals(memfd.as_fd())?;
    // SAFETY: zeroed stat is a valid out-parameter; fstat on an fd we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(memfd.as_raw_fd(), &mut st) } != 0 {
        return Err(last_os("fstat of the received memfd"));
    }
    if st.st_size as u64 != cfg.region_len() as u64 {
        return Err(ChannelError::BadHandoff(format!(
            "memfd is {} bytes but the sizes imply {}",
            st.st_size,
            cfg.region_len()
        )));
    }
    for fd in [&g2h, &h2g] {
        check_is_eventfd(fd.as_fd())?;
    }
    let region = SharedRegion::map(memfd, cfg.region_len())?;
    let parts = Parts {
        region: Arc::new(region),
        guest_to_host: Arc::new(g2h),
        host_to_guest: Arc::new(h2g),
    };
    let keep = sock.try_clone().map_err(os("dup of the hand-off socket"))?;
    let (_guest, host) = ends(cfg, &parts, Some(Arc::new(keep)))?;
    Ok(host)
}

/// Seals every channel memfd carries: its size can never change again, and no seal can be added
/// (so no one can later forbid the writes both sides make).
const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Refuses a memfd the peer could still resize (or that forbids writing to it).
fn check_seals(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), ChannelError> {
    // SAFETY: plain syscall on a descriptor we own.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        let err = io::Error::last_os_error();
        return Err(ChannelError::BadHandoff(format!(
            "the region descriptor is not a memfd that can carry seals: {err}"
        )));
    }
    let forbidden = libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE;
    if seals & REQUIRED_SEALS != REQUIRED_SEALS || seals & forbidden != 0 {
        return Err(ChannelError::Unsealed {
            seals: seals as u32,
        });
    }
    Ok(())
}

fn check_is_eventfd(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), ChannelError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(os("readlink of a received fd"))?;
    if link.to_string_lossy() != "anon_inode:[eventfd]" {
        return Err(ChannelError::BadHandoff(format!(
            "descriptor is {} rather than an eventfd",
            link.display()
        )));
    }
    Ok(())
}

pub(crate) fn send_with_fds(
    sock: &UnixStream,
    data: &[u8],
    fds: &[RawFd],
) -> Result<(), ChannelError> {
    let iov = [IoSlice::new(data)];
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: zeroed msghdr is valid; we fill the pointers to live local buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points to `space` bytes, enough for one cmsg carrying `fds`
    // (CMSG_SPACE above); CMSG_FIRSTHDR/CMSG_DATA stay inside that buffer.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr(),
            libc::CMSG_DATA(cmsg).cast::<RawFd>(),
            fds.len(),
        );
    }
    // SAFETY: msg describes valid buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(last_os("sendmsg of the channel hand-off"));
    }
    if n as usize != data.len() {
        return Err(ChannelError::BadHandoff(format!(
            "short send: {n} of {} bytes",
            data.len()
        )));
    }
    Ok(())
}

fn recv_with_fds(sock: &UnixStream, data: &mut [u8]) -> Result<Vec<OwnedFd>, ChannelError> {
    const MAX_FDS: usize = 8;
    let expected = data.len();
    let mut iov = [IoSliceMut::new(data)];
    // SAFETY: pure computation.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: zeroed msghdr is valid; pointers set to live local buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg describes valid buffers; MSG_CMSG_CLOEXEC marks received fds close-on-exec.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(last_os("recvmsg of the channel hand-off"));
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the libc CMSG macros, which
    // stay within msg_controllen; each SCM_RIGHTS fd is new and owned by us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data_len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                let count = data_len / std::mem::size_of::<RawFd>();
                let p = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(ChannelError::BadHandoff("too many descriptors".into()));
    }
    if n as usize != expected {
        return Err(ChannelError::BadHandoff(format!(
            "short hand-off message: {n} of {expected} bytes"
        )));
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::WriteOutcome;
    use std::sync::atomic::Ordering;

    fn cfg() -> ChannelConfig {
        ChannelConfig {
            out_ring_bytes: 8192,
            in_ring_bytes: 8192,
            extra_bytes: 4096,
        }
    }

    /// Re-executes this test binary to run only the test `role`, which does its work when the
    /// environment variable `env` names the socket it inherits (`theirs`).
    fn spawn_role(role: &str, env: &str, theirs: UnixStream) -> std::process::Child {
        // Let the child inherit its end: clear CLOEXEC on it.
        // SAFETY: fcntl on a socket we own.
        unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", role, "--nocapture", "--test-threads=1"])
            .env(env, theirs.as_raw_fd().to_string())
            // The child's own harness summary would read as one more test result in the log.
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// In a child started by `spawn_role`: the socket the parent handed over (None in a normal
    /// test run).
    fn role_socket(env: &str) -> Option<UnixStream> {
        let fd: RawFd = std::env::var(env).ok()?.parse().unwrap();
        // SAFETY: the parent passed this inherited, open socket fd to us and nobody else uses it.
        Some(unsafe { UnixStream::from_raw_fd(fd) })
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in [
            ChannelConfig {
                out_ring_bytes: 1000,
                ..cfg()
            },
            ChannelConfig {
                in_ring_bytes: 0,
                ..cfg()
            },
            ChannelConfig {
                extra_bytes: 100,
                ..cfg()
            },
            ChannelConfig {
                out_ring_bytes: 128 << 20,
                ..cfg()
            },
        ] {
            assert!(
                matches!(create(&bad), Err(ChannelError::BadConfig(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn threads_exchange_packets_both_ways_with_signals() {
        let (mut guest, mut host) = create(&cfg()).unwrap();
        const N: u64 = 20_000;
        let server = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut served = 0;
            while served < N {
                while let Some(h) = host.rx.read_into(&mut buf).unwrap() {
                    loop {
                        match host.tx.try_write(11, 0, h.trans_id, &[&buf]).unwrap() {
                            WriteOutcome::Written { signal, .. } => {
                                if signal {
                                    host.to_guest.signal().unwrap();
                                }
                                break;
                            }
                            WriteOutcome::Full { .. } => {
                                host.from_guest.wait(Duration::from_millis(10)).unwrap();
                            }
                        }
                    }
                    served += 1;
                }
                if host.rx.commit().signal_writer {
                    host.to_guest.signal().unwrap();
                }
                if served < N && !host.rx.has_data().unwrap() {
                    host.from_guest.wait(Duration::from_millis(10)).unwrap();
                }
            }
        });
        let (mut sent, mut got) = (0u64, 0u64);
        let mut buf = Vec::new();
        while got < N {
            while sent < N {
                match guest
                    .tx
                    .try_write(6, 1, sent, &[&sent.to_le_bytes()])
                    .unwrap()
                {
                    WriteOutcome::Written { signal, .. } => {
                        if signal {
                            guest.to_host.signal().unwrap();
                        }
                        sent += 1;
                    }
                    WriteOutcome::Full { .. } => break,
                }
            }
            while let Some(h) = guest.rx.read_into(&mut buf).unwrap() {
                assert_eq!(h.trans_id, got);
                assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), got);
                got += 1;
            }
            if guest.rx.commit().signal_writer {
                guest.to_host.signal().unwrap();
            }
            if got < N {
                guest.from_host.wait(Duration::from_millis(10)).unwrap();
            }
        }
        server.join().unwrap();
    }

    /// 100k packets through a one-page ring, writer and reader on separate threads via
    /// `into_parts`, sleeping only on the eventfds. Every wait must end in a signal, never in
    /// the (generous) timeout: a lost wake-up on either path (data or `pending_send_sz` space)
    /// fails the test instead of being papered over by polling.
    #[test]
    fn split_threads_100k_packets_without_lost_wakeups() {
        let small = ChannelConfig {
            out_ring_bytes: 4096,
            in_ring_bytes: 4096,
            extra_bytes: 0,
        };
        let (guest, host) = create(&small).unwrap();
        assert_eq!(guest.config(), small);
        assert_eq!(guest.extra_area().1, 0);
        let g = guest.into_parts();
        let h = host.into_parts();
        const N: u64 = 100_000;
        const PATIENCE: Duration = Duration::from_secs(10);
        let (mut tx, to_host, from_host) = (g.tx, g.signaller, g.waiter);
        let producer = std::thread::spawn(move || {
            let mut fulls = 0u64;
            for i in 0..N {
                let len = (i % 97) as usize;
                let body = vec![(i % 251) as u8; len];
                loop {
                    match tx.try_write(6, 0, i, &[&i.to_le_bytes(), &body]).unwrap() {
                        WriteOutcome::Written { signal, .. } => {
                            if signal {
                                to_host.signal().unwrap();
                            }
                            break;
                        }
                        WriteOutcome::Full { .. } => {
                            fulls += 1;
                            assert_eq!(from_host.wait(PATIENCE).unwrap(), WaitResult::Signalled);
                        }
                    }
                }
            }
            (fulls, tx.stats())
        });
        let (mut rx, to_guest, from_guest) = (h.rx, h.signaller.clone(), h.waiter);
        let mut buf = Vec::new();
        let mut next = 0u64;
        while next < N {
            while let Some(hdr) = rx.read_into(&mut buf).unwrap() {
                assert_eq!(hdr.trans_id, next);
                assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), next);
                let len = (next % 97) as usize;
                assert!(buf[8..8 + len].iter().all(|&b| b == (next % 251) as u8));
                next += 1;
                if next.is_multiple_of(4) && rx.commit().signal_writer {
                    to_guest.signal().unwrap();
                }
            }
            if rx.commit().signal_writer {
                to_guest.signal().unwrap();
            }
            // Everything read is published: a packet written from now on finds the ring empty
            // and signals, so re-checking once before sleeping cannot lose a wake-up.
            if next < N && !rx.has_data().unwrap() {
                assert_eq!(from_guest.wait(PATIENCE).unwrap(), WaitResult::Signalled);
            }
        }
        let (fulls, wstats) = producer.join().unwrap();
        assert!(
            fulls > 0,
            "the ring never filled; the test did not exercise flow control"
        );
        let rstats = rx.stats();
        assert!(rstats.intr_in_full.load(Ordering::Relaxed) > 0);
        assert_eq!(wstats.out_full_total.load(Ordering::Relaxed), fulls);
        assert!(wstats.out_full_first.load(Ordering::Relaxed) <= fulls);
        assert!(wstats.intr_out_empty.load(Ordering::Relaxed) > 0);
    }

    /// `HostEnd::send_to` / `receive_host_end` / `watch_peer` within one process: the received
    /// end shares the rings (not re-initialised) and a closed socket reads as `PeerGone`.
    #[test]
    fn send_to_hands_over_a_working_host_end() {
        let (mut guest, host) = create(&cfg()).unwrap();
        // A packet written before the hand-off must survive it (no re-init on receipt).
        assert!(matches!(
            guest.tx.try_write(6, 0, 7, &[b"before"]).unwrap(),
            WriteOutcome::Written { signal: true, .. }
        ));
        let (a, b) = UnixStream::pair().unwrap();
        guest.watch_peer(&a).unwrap();
        host.send_to(&a).unwrap();
        let mut host = receive_host_end(&b).unwrap();
        assert_eq!(host.config(), cfg());
        let (h, buf) = host.rx.read().unwrap().unwrap();
        assert_eq!((h.trans_id, &buf[..6]), (7, &b"before"[..]));
        host.rx.commit();
        guest.signal_peer().unwrap();
        assert_eq!(
            host.wait(Duration::from_secs(5)).unwrap(),
            WaitResult::Signalled
        );
        host.tx.try_write(11, 0, 7, &[b"done"]).unwrap();
        host.signal_peer().unwrap();
        assert_eq!(
            guest.wait(Duration::from_secs(5)).unwrap(),
            WaitResult::Signalled
        );
        assert_eq!(guest.rx.read().unwrap().unwrap().0.ty, 11);
        // The extra area is the same memory on both sides.
        let (gp, glen) = guest.extra_area();
        let (hp, hlen) = host.extra_area();
        assert_eq!(glen, hlen);
        // SAFETY: both pointers are valid for glen >= 4 bytes while the ends live; no
        // concurrent access in this test.
        unsafe {
            (gp as *mut u32).write_volatile(0xfeed_f00d);
            assert_eq!((hp as *const u32).read_volatile(), 0xfeed_f00d);
        }
        // The host process "exits": its end and socket close.
        drop(host);
        drop(b);
        assert_eq!(
            guest.wait(Duration::from_secs(5)).unwrap(),
            WaitResult::PeerGone
        );
    }

    #[test]
    fn extra_area_is_shared_and_bounds_checked() {
        let (guest, host) = create(&cfg()).unwrap();
        guest.extra.write_at(100, b"hello").unwrap();
        let mut b = [0u8; 5];
        host.extra.read_at(100, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(host.extra.read_at(4094, &mut b).is_none());
        assert!(host.extra.write_at(usize::MAX, b"x").is_none());
    }

    /// The child half of `separate_processes_exchange_packets`: runs when the test binary is
    /// re-executed with ENLIGHT_CHANNEL_CHILD set to a socket fd number.
    #[test]
    fn channel_child_role() {
        let Some(sock) = role_socket("ENLIGHT_CHANNEL_CHILD") else {
            return;
        };
        let mut host = receive_host_end(&sock).unwrap();
        let mut buf = Vec::new();
        let mut echoed = 0;
        while echoed < 1000 {
            match host.rx.read_into(&mut buf).unwrap() {
                Some(h) => {
                    let mut reply = buf.clone();
                    reply.reverse();
                    while let WriteOutcome::Full { .. } =
                        host.tx.try_write(11, 0, h.trans_id, &[&reply]).unwrap()
                    {
                        host.from_guest.wait(Duration::from_millis(5)).unwrap();
                    }
                    host.to_guest.signal().unwrap();
                    echoed += 1;
                }
                None => {
                    if host.rx.commit().signal_writer {
                        host.to_guest.signal().unwrap();
                    }
                    assert_ne!(
                        host.from_guest.wait(Duration::from_secs(5)).unwrap(),
                        WaitResult::PeerGone
                    );
                }
            }
        }
        host.rx.commit();
    }

    #[test]
    fn separate_processes_exchange_packets() {
        if std::env::var("ENLIGHT_CHANNEL_CHILD").is_ok() {
            return;
        }
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut child = spawn_role(
            "channel::tests::channel_child_role",
            "ENLIGHT_CHANNEL_CHILD",
            theirs,
        );
        let (mut guest, host) = create(&cfg()).unwrap();
        guest.watch_peer(&ours).unwrap();
        host.send_to(&ours).unwrap();
        drop(ours);
        let mut buf = Vec::new();
        for i in 0..1000u64 {
            let msg = format!("message {i:05}");
            while let WriteOutcome::Full { .. } =
                guest.tx.try_write(6, 1, i, &[msg.as_bytes()]).unwrap()
            {
                guest.from_host.wait(Duration::from_millis(5)).unwrap();
            }
            guest.to_host.signal().unwrap();
            let h = loop {
                if let Some(h) = guest.rx.read_into(&mut buf).unwrap() {
                    break h;
                }
                assert_ne!(
                    guest.from_host.wait(Duration::from_secs(5)).unwrap(),
                    WaitResult::PeerGone
                );
            };
            guest.rx.commit();
            assert_eq!(h.trans_id, i);
            let mut expect = msg.into_bytes();
            expect.resize(buf.len(), 0);
            expect.reverse();
            assert_eq!(buf, expect);
        }
        assert!(child.wait().unwrap().success());
        // The child has exited: once its last signals are drained, waiting reports it instead of
        // hanging.
        let mut result = WaitResult::Signalled;
        for _ in 0..3 {
            result = guest.from_host.wait(Duration::from_secs(5)).unwrap();
            if result != WaitResult::Signalled {
                break;
            }
        }
        assert_eq!(result, WaitResult::PeerGone);
    }

    #[test]
    fn bad_handoff_is_rejected() {
        let (a, b) = UnixStream::pair().unwrap();
        // Wrong magic, and an eventfd where the memfd should be.
        let efd = eventfd().unwrap();
        let fds = [efd.as_raw_fd(), efd.as_raw_fd(), efd.as_raw_fd()];
        send_with_fds(&a, &[0u8; HANDOFF_HEADER_LEN], &fds).unwrap();
        assert!(matches!(
            receive_host_end(&b),
            Err(ChannelError::BadHandoff(_))
        ));
        // Right header, but a memfd smaller than the sizes claim.
        let (a, b) = UnixStream::pair().unwrap();
        let parts = create_parts(&cfg()).unwrap();
        let mut header = [0u8; HANDOFF_HEADER_LEN];
        header[0..4].copy_from_slice(&HANDOFF_MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&HANDOFF_VERSION.to_le_bytes());
        header[8..16].copy_from_slice(&(1u64 << 24).to_le_bytes());
        header[16..24].copy_from_slice(&8192u64.to_le_bytes());
        let fds = [
            parts.region.memfd.as_raw_fd(),
            parts.guest_to_host.as_raw_fd(),
            parts.host_to_guest.as_raw_fd(),
        ];
        send_with_fds(&a, &header, &fds).unwrap();
        let err = receive_host_end(&b).err().unwrap();
        assert!(err.to_string().contains("memfd is"), "{err}");
    }
    /// The host half of `a_peer_truncating_the_memfd_cannot_crash_the_host`: receives the host
    /// end, waits for the guest's signal (sent after its truncation attempt) and uses both rings.
    #[test]
    fn truncation_child_role() {
        use std::io::Write;
        let Some(sock) = role_socket("ENLIGHT_TRUNCATE_CHILD") else {
            return;
        };
        let mut host = receive_host_end(&sock).unwrap();
        // Mapped: now the guest may try its worst.
        (&sock).write_all(b"R").unwrap();
        assert_eq!(
            host.from_guest.wait(Duration::from_secs(30)).unwrap(),
            WaitResult::Signalled
        );
        // With the region truncated under the mapping, either access is SIGBUS.
        let (h, buf) = host.rx.read().unwrap().unwrap();
        assert_eq!((h.trans_id, &buf[..5]), (1, &b"hello"[..]));
        host.rx.commit();
        host.tx.try_write(11, 0, 1, &[b"done"]).unwrap();
    }

    /// A guest process that truncates the memfd after handing the host end over cannot crash
    /// the host: the memfd is sealed against resizing, so the truncation fails (it used to
    /// succeed, and the host died of SIGBUS on its next ring access; the host runs in a child
    /// process here so that the test sees that instead of dying of it).
    #[test]
    fn a_peer_truncating_the_memfd_cannot_crash_the_host() {
        use std::io::Read;
        if std::env::var("ENLIGHT_TRUNCATE_CHILD").is_ok() {
            return;
        }
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut child = spawn_role(
            "channel::tests::truncation_child_role",
            "ENLIGHT_TRUNCATE_CHILD",
            theirs,
        );
        let (mut guest, host) = create(&cfg()).unwrap();
        let memfd = host.extra.region.memfd.try_clone().unwrap();
        guest.tx.try_write(6, 1, 1, &[b"hello"]).unwrap();
        host.send_to(&ours).unwrap();
        let mut mapped = [0u8; 1];
        (&ours).read_exact(&mut mapped).unwrap();
        // The hostile part: shrink the region to nothing under the host's mapping.
        // SAFETY: plain syscall on a descriptor we own.
        let rc = unsafe { libc::ftruncate(memfd.as_raw_fd(), 0) };
        let err = std::io::Error::last_os_error();
        guest.to_host.signal().unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.success(),
            "the host process ended with {status:?} (signal {:?}) after the guest truncated the \
             memfd (ftruncate returned {rc})",
            status.signal()
        );
        assert_eq!(rc, -1, "a sealed memfd cannot shrink");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        // The host wrote its reply into the region, which is still whole.
        let (h, buf) = guest.rx.read().unwrap().unwrap();
        assert_eq!((h.trans_id, &buf[..4]), (1, &b"done"[..]));
    }

    /// A hand-off whose memfd could be resized is refused with a typed error before anything is
    /// mapped: one without seals at all, one that may still grow, one whose seals can still be
    /// added to (no F_SEAL_SEAL), and one that is not a memfd.
    #[test]
    fn an_unsealed_memfd_is_refused() {
        let c = cfg();
        let make = |flags: libc::c_uint, seals: libc::c_int| {
            // SAFETY: a valid C string; we own the returned fd.
            let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC | flags) };
            assert!(fd >= 0);
            // SAFETY: fresh fd owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: plain syscalls on our fd.
            unsafe {
                assert_eq!(
                    libc::ftruncate(fd.as_raw_fd(), c.region_len() as libc::off_t),
                    0
                );
                if seals != 0 {
                    assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals), 0);
                }
            }
            fd
        };
        let file = tempfile::tempfile().unwrap();
        file.set_len(c.region_len() as u64).unwrap();
        let cases: [(OwnedFd, &str); 4] = [
            (make(0, 0), "no seals"),
            (
                make(
                    libc::MFD_ALLOW_SEALING,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
                ),
                "may grow",
            ),
            (
                make(
                    libc::MFD_ALLOW_SEALING,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
                ),
                "seals not sealed",
            ),
            (OwnedFd::from(file), "a plain file"),
        ];
        for (memfd, what) in cases {
            let (a, b) = UnixStream::pair().unwrap();
            let (g2h, h2g) = (eventfd().unwrap(), eventfd().unwrap());
            let fds = [memfd.as_raw_fd(), g2h.as_raw_fd(), h2g.as_raw_fd()];
            send_with_fds(&a, &handoff_header(&c), &fds).unwrap();
            let r = receive_host_end(&b);
            assert!(
                matches!(
                    r,
                    Err(ChannelError::Unsealed { .. }) | Err(ChannelError::BadHandoff(_))
                ),
                "{what}: {:?}",
                r.as_ref().err()
            );
            if what != "a plain file" {
                assert!(matches!(r, Err(ChannelError::Unsealed { .. })), "{what}");
            }
        }
        // Our own channels are sealed.
        let (_g, host) = create(&c).unwrap();
        // SAFETY: fcntl on a descriptor the host end owns.
        let seals = unsafe { libc::fcntl(host.extra.region.memfd.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want);
    }
}
