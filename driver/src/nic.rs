//! A netvsc-like synthetic NIC over the channel.
//!
//! The guest driver ([`NicVsc`]) and the host service ([`NicVsp`]) share one channel whose extra
//! area holds two buffers, cut into fixed-size sections as netvsc's are:
//! - the **send buffer** (`send_sections`): the guest copies an outgoing frame into a free section
//!   and sends a [`TxRequest`] (inband packet, completion requested, `trans_id` = the tag); the
//!   host reads the section, writes the frame to its backend and sends a completion packet
//!   ([`NicCompletion`]), which frees the section;
//! - the **receive buffer** (`recv_sections`): the guest *posts* sections to the host
//!   ([`RxPost`], once for all at start); the host copies a frame it received from its backend
//!   into a posted section and sends an [`RxPacket`] (a transfer-page packet asking for a
//!   completion); the guest hands the frame to its own backend and returns the section with a
//!   completion packet carrying the same `trans_id`, which posts it again. With no posted section
//!   left the host stops reading its backend (the frames wait in the tap's queue, which the
//!   kernel drops from when it is full): receive-buffer exhaustion is back-pressure, counted.
//!
//! Both sides validate every byte from the other: the guest accepts a completion only for a tag
//! in flight and an rx packet only for a section it posted, with a length inside the section; the
//! host completes a malformed request with an error status and ignores (and counts) a bad post or
//! return. A broken ring is a typed error that stops the side that saw it, never a panic.
//!
//! Interrupt moderation and NAPI-like reaping work as for the disk (`disk.rs`): a packet that
//! makes the inbound ring non-empty while the guest has not masked interrupts makes a signal
//! *owed*, fired after `moderation_frames` packets or `moderation_usecs`, whichever first; the
//! guest reaps up to `poll_budget` packets per pass and stays in polling mode (interrupts masked)
//! while passes fill the budget.
//!
//! Tracing (contract 1) happens on the guest side: `io_submit` (op tx) when a tx request is in
//! the ring, `io_complete` and one `io_reap` record per reaped tx completion and per reaped rx
//! packet (op rx), `signal`, `irq_mask` and `ring_full` as for the disk; the host fires `signal`
//! (direction 1) and `ring_full` (direction 1). Latency: **tx** is submit to reaped completion
//! (the frame is in the host's backend by then); **rx** is the host's receive time (it stamps
//! `host_rx_ns` when it reads the frame from its backend; one `CLOCK_MONOTONIC` on one machine,
//! as Hyper-V's reference time is shared) to the guest's reap.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::channel::{self, ChannelConfig, ChannelError, GuestEnd, HostEnd};
use crate::netns::{NetError, NetNamespaces, NetPair, Netns, Tap};
use crate::ring::{
    RingError, WriteOutcome, FLAG_COMPLETION_REQUESTED, PACKET_TYPE_COMPLETION, PACKET_TYPE_INBAND,
    PACKET_TYPE_TRANSFER_PAGES, PAGE_SIZE,
};
use crate::settings::{DeviceSettings, SettingsError};
use crate::trace::{self, CompletionRecord, DIR_GUEST_TO_HOST, DIR_HOST_TO_GUEST, OP_RX, OP_TX};

/// Message type of a [`TxRequest`].
pub const MSG_TX: u32 = 1;
/// Message type of an [`RxPost`].
pub const MSG_RX_POST: u32 = 2;
/// Message type of an [`RxPacket`].
pub const MSG_RX: u32 = 3;
/// Smallest frame either side accepts (an Ethernet header).
pub const ETH_HLEN: u32 = 14;
/// Largest packet payload either side's reader accepts (messages are at most 24 bytes).
pub const MAX_MESSAGE: u32 = 64;
/// Longest a reaped completion waits before it is traced (`io_reap`), as for the disk.
pub const TRACE_FLUSH: Duration = Duration::from_millis(1);
/// Most frames a side reads from its backend, or the host handles from the guest, per pass, so
/// that neither direction starves the other.
const HOST_PASS: usize = 128;

/// Guest → host: send the frame in send section `section` (`len` bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxRequest {
    /// Send section index.
    pub section: u32,
    /// Frame length.
    pub len: u32,
}

/// Guest → host: receive sections `first .. first + count` are the host's to fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxPost {
    /// First section.
    pub first: u32,
    /// Number of sections.
    pub count: u32,
}

/// Host → guest (transfer-page packet): a received frame of `len` bytes in receive section
/// `section`, read from the host's backend at `host_rx_ns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxPacket {
    /// Receive section index.
    pub section: u32,
    /// Frame length.
    pub len: u32,
    /// When the host received the frame (`CLOCK_MONOTONIC` ns).
    pub host_rx_ns: u64,
}

/// Payload of a completion packet, either way: host → guest completes a tx request (`len` bytes
/// sent), guest → host returns an rx section (`len` = 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NicCompletion {
    /// 0 or an errno.
    pub status: u32,
    /// Bytes.
    pub len: u32,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn words(w: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (i, x) in w.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&x.to_le_bytes());
    }
    b
}

impl TxRequest {
    /// `msg, section, len, 0`, little-endian `u32`s.
    pub fn encode(&self) -> [u8; 16] {
        words([MSG_TX, self.section, self.len, 0])
    }
}

impl RxPost {
    /// `msg, first, count, 0`, little-endian `u32`s.
    pub fn encode(&self) -> [u8; 16] {
        words([MSG_RX_POST, self.first, self.count, 0])
    }
}

impl RxPacket {
    /// `msg, section, len, 0` (`u32`s) then `host_rx_ns` (`u64`), little-endian.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..16].copy_from_slice(&words([MSG_RX, self.section, self.len, 0]));
        b[16..].copy_from_slice(&self.host_rx_ns.to_le_bytes());
        b
    }

    /// Decodes untrusted bytes; `None` if too short or not an rx message.
    pub fn decode(b: &[u8]) -> Option<RxPacket> {
        (u32_at(b, 0)? == MSG_RX).then_some(())?;
        Some(RxPacket {
            section: u32_at(b, 4)?,
            len: u32_at(b, 8)?,
            host_rx_ns: u64_at(b, 16)?,
        })
    }
}

impl NicCompletion {
    /// `status, len`, little-endian `u32`s.
    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.status.to_le_bytes());
        b[4..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes untrusted bytes; `None` if too short.
    pub fn decode(b: &[u8]) -> Option<NicCompletion> {
        Some(NicCompletion {
            status: u32_at(b, 0)?,
            len: u32_at(b, 4)?,
        })
    }
}

/// A guest → host inband message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMessage {
    /// Send a frame.
    Tx(TxRequest),
    /// Post receive sections.
    RxPost(RxPost),
}

impl GuestMessage {
    /// Decodes untrusted bytes; `None` if too short or of an unknown type.
    pub fn decode(b: &[u8]) -> Option<GuestMessage> {
        match u32_at(b, 0)? {
            MSG_TX => Some(GuestMessage::Tx(TxRequest {
                section: u32_at(b, 4)?,
                len: u32_at(b, 8)?,
            })),
            MSG_RX_POST => Some(GuestMessage::RxPost(RxPost {
                first: u32_at(b, 4)?,
                count: u32_at(b, 8)?,
            })),
            _ => None,
        }
    }
}

/// NIC errors.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// Channel set-up or signalling failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The peer broke the ring protocol; the channel is unusable.
    #[error("channel broken: {0}")]
    Ring(#[from] RingError),
    /// The host sent a well-framed packet that makes no sense; the channel is unusable.
    #[error("protocol violation by the host: {0}")]
    Protocol(String),
    /// A backend (tap) failed.
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// Namespace or tap set-up failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Bad options from the caller.
    #[error("invalid NIC options: {0}")]
    Invalid(String),
    /// A settings value is out of range.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// A side's thread panicked.
    #[error("the NIC's {0} thread panicked")]
    Panicked(&'static str),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NicError {
    let what = what.into();
    move |source| NicError::Io { what, source }
}

/// Sizes of a NIC's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicOptions {
    /// Bytes per section (send and receive); a frame must fit in one.
    pub section_bytes: u32,
    /// Sections of the send buffer: the most tx frames in flight.
    pub send_sections: u32,
    /// Sections of the receive buffer: the most rx frames the guest has not returned.
    pub recv_sections: u32,
}

impl Default for NicOptions {
    /// 2 KiB sections (a 1500-byte MTU frame with room to spare), 256 send and 512 receive
    /// sections: 0.5 + 1 MiB, as netvsc's buffers are a few MiB cut into small sections.
    fn default() -> Self {
        NicOptions {
            section_bytes: 2048,
            send_sections: 256,
            recv_sections: 512,
        }
    }
}

impl NicOptions {
    /// Options whose sections hold a frame of `mtu` bytes of payload (plus Ethernet and VLAN
    /// headers), rounded up to 64 bytes.
    pub fn for_mtu(mtu: u32) -> NicOptions {
        NicOptions {
            section_bytes: (mtu + ETH_HLEN + 4).next_multiple_of(64).max(2048),
            ..NicOptions::default()
        }
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), NicError> {
        if !(64..=128 * 1024).contains(&self.section_bytes) || !self.section_bytes.is_multiple_of(8)
        {
            return Err(NicError::Invalid(format!(
                "section_bytes {} must be a multiple of 8 from 64 to 131072",
                self.section_bytes
            )));
        }
        for (what, n) in [
            ("send_sections", self.send_sections),
            ("recv_sections", self.recv_sections),
        ] {
            if !(1..=65_536).contains(&n) {
                return Err(NicError::Invalid(format!("{what} {n} must be 1..=65536")));
            }
        }
        if self.extra_bytes() > channel::MAX_EXTRA_BYTES {
            return Err(NicError::Invalid(format!(
                "buffers of {} bytes exceed {}",
                self.extra_bytes(),
                channel::MAX_EXTRA_BYTES
            )));
        }
        Ok(())
    }

    fn send_offset(&self, section: u32) -> usize {
        section as usize * self.section_bytes as usize
    }

    fn recv_offset(&self, section: u32) -> usize {
        (self.send_sections as usize + section as usize) * self.section_bytes as usize
    }

    /// The channel's extra area: send buffer, then receive buffer, rounded to a page.
    pub fn extra_bytes(&self) -> usize {
        ((self.send_sections as usize + self.recv_sections as usize) * self.section_bytes as usize)
            .next_multiple_of(PAGE_SIZE)
    }
}

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

    /// Waits up to a second for room (a test backend is lossless; a tap is not).
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(1);
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

/// The knobs a running NIC reads on every pass (ring sizes are fixed when its channel is made).
#[derive(Debug)]
pub struct NicKnobs {
    moderation_frames: AtomicU32,
    moderation_usecs: AtomicU32,
    poll_budget: AtomicU32,
    ring_out_bytes: u32,
    ring_in_bytes: u32,
}

impl NicKnobs {
    fn new(s: &DeviceSettings) -> NicKnobs {
        NicKnobs {
            moderation_frames: AtomicU32::new(s.moderation_frames),
            moderation_usecs: AtomicU32::new(s.moderation_usecs),
            poll_budget: AtomicU32::new(s.poll_budget),
            ring_out_bytes: s.ring_out_bytes,
            ring_in_bytes: s.ring_in_bytes,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> DeviceSettings {
        DeviceSettings {
            ring_out_bytes: self.ring_out_bytes,
            ring_in_bytes: self.ring_in_bytes,
            moderation_frames: self.moderation_frames.load(Ordering::Relaxed),
            moderation_usecs: self.moderation_usecs.load(Ordering::Relaxed),
            poll_budget: self.poll_budget.load(Ordering::Relaxed),
        }
    }

    /// Puts new moderation and budget values in force; the ring sizes cannot change while the
    /// channel is open (an error names them).
    pub fn apply(&self, s: &DeviceSettings) -> Result<(), NicError> {
        s.validate()?;
        if s.ring_out_bytes != self.ring_out_bytes || s.ring_in_bytes != self.ring_in_bytes {
            return Err(NicError::Invalid(
                "ring_out_bytes and ring_in_bytes are fixed while the NIC runs".into(),
            ));
        }
        self.moderation_frames
            .store(s.moderation_frames, Ordering::Relaxed);
        self.moderation_usecs
            .store(s.moderation_usecs, Ordering::Relaxed);
        self.poll_budget.store(s.poll_budget, Ordering::Relaxed);
        Ok(())
    }

    fn budget(&self) -> usize {
        self.poll_budget.load(Ordering::Relaxed).max(1) as usize
    }
}

/// The control socket (contract 4) tunes moderation and the polling budget live. The ring sizes
/// are fixed for the channel's life (choose them at start): a set naming them is `unsupported`.
impl crate::control::Tunable for NicKnobs {
    fn settings(&self) -> DeviceSettings {
        NicKnobs::settings(self)
    }

    fn limits(&self) -> crate::control::Limits {
        crate::control::Limits::synthetic()
    }

    fn supports(&self, knob: crate::settings::Knob) -> bool {
        use crate::settings::Knob;
        !matches!(knob, Knob::RingOutBytes | Knob::RingInBytes)
    }

    fn apply(&self, target: &DeviceSettings) -> Result<(), crate::control::ControlError> {
        NicKnobs::apply(self, target)
            .map_err(|e| crate::control::ControlError::Unsupported(e.to_string()))
    }
}

/// Latency percentiles of one direction, from the NIC's own HDR histogram (2 significant
/// digits), over exactly the completions traced with `io_reap`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyFigures {
    /// Completions recorded.
    pub count: u64,
    /// Median, ns.
    pub p50_ns: u64,
    /// 90th percentile, ns.
    pub p90_ns: u64,
    /// 99th percentile, ns.
    pub p99_ns: u64,
    /// 99.9th percentile, ns.
    pub p999_ns: u64,
    /// Largest, ns.
    pub max_ns: u64,
}

/// The guest's own latency histograms: tx (submit to reaped completion) and rx (host receive to
/// guest reap). Filled when a batch is traced, so they hold the same samples as eBPF's.
#[derive(Debug)]
pub struct NicLatency {
    hists: std::sync::Mutex<[hdrhistogram::Histogram<u64>; 2]>,
}

impl Default for NicLatency {
    fn default() -> Self {
        let h = || {
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000_000, 2)
                .expect("valid HDR bounds")
        };
        NicLatency {
            hists: std::sync::Mutex::new([h(), h()]),
        }
    }
}

impl NicLatency {
    fn record(&self, batch: &[CompletionRecord]) {
        let mut h = self.hists.lock().unwrap_or_else(|p| p.into_inner());
        for r in batch {
            let i = (r.op == OP_RX) as usize;
            h[i].saturating_record(r.latency_ns.max(1));
        }
    }

    /// (tx, rx) figures now.
    pub fn figures(&self) -> (LatencyFigures, LatencyFigures) {
        let h = self.hists.lock().unwrap_or_else(|p| p.into_inner());
        let f = |h: &hdrhistogram::Histogram<u64>| LatencyFigures {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.50),
            p90_ns: h.value_at_quantile(0.90),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
        };
        (f(&h[0]), f(&h[1]))
    }
}

/// Counters of the guest driver (updated as it goes; read them from any thread).
#[derive(Debug, Default)]
pub struct NicGuestStats {
    /// Tx completions reaped (op tx in the probes), with or without error.
    pub tx_completions: AtomicU64,
    /// Bytes of tx completions reaped with status 0.
    pub tx_bytes: AtomicU64,
    /// Tx completions with an error status.
    pub tx_errors: AtomicU64,
    /// Rx packets reaped (op rx in the probes).
    pub rx_packets: AtomicU64,
    /// Bytes of rx packets reaped.
    pub rx_bytes: AtomicU64,
    /// Rx frames the guest backend refused (counted as rx completions with an error status).
    pub rx_deliver_errors: AtomicU64,
    /// Frames read from the guest backend and not sent (longer than a section).
    pub tx_dropped: AtomicU64,
    /// Guest → host signals.
    pub doorbells: AtomicU64,
    /// Writes that found the outbound ring full.
    pub ring_full: AtomicU64,
    /// Latency histograms of the traced completions.
    pub latency: NicLatency,
}

/// Counters of the host service.
#[derive(Debug, Default)]
pub struct NicHostStats {
    /// Frames of tx requests written to the host backend.
    pub tx_frames: AtomicU64,
    /// Tx requests completed with an error status (malformed, or the backend refused).
    pub tx_errors: AtomicU64,
    /// Frames read from the host backend and put in a receive section.
    pub rx_frames: AtomicU64,
    /// Frames read from the host backend and dropped (shorter than a header, longer than a
    /// section).
    pub rx_dropped: AtomicU64,
    /// Times the last posted receive section was used up (the host then stops reading).
    pub rx_buffer_exhausted: AtomicU64,
    /// Host → guest signals.
    pub interrupts: AtomicU64,
    /// Times the inbound ring was full.
    pub ring_full: AtomicU64,
    /// Malformed messages from the guest (bad posts and returns, bad requests).
    pub guest_errors: AtomicU64,
}

/// A snapshot of both sides' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicCounters {
    /// Guest: tx completions reaped (= eBPF's op tx count).
    pub tx_completions: u64,
    /// Guest: bytes of successful tx completions.
    pub tx_bytes: u64,
    /// Guest: tx completions with an error.
    pub tx_errors: u64,
    /// Guest: rx packets reaped (= eBPF's op rx count).
    pub rx_packets: u64,
    /// Guest: bytes of rx packets.
    pub rx_bytes: u64,
    /// Guest: rx frames its backend refused.
    pub rx_deliver_errors: u64,
    /// Guest: frames dropped before the ring.
    pub tx_dropped: u64,
    /// Guest → host signals.
    pub doorbells: u64,
    /// Host → guest signals.
    pub interrupts: u64,
    /// Guest: outbound ring full.
    pub ring_full_out: u64,
    /// Host: inbound ring full.
    pub ring_full_in: u64,
    /// Host: frames written to its backend.
    pub host_tx_frames: u64,
    /// Host: frames read from its backend into the receive buffer.
    pub host_rx_frames: u64,
    /// Host: frames read from its backend and dropped.
    pub host_rx_dropped: u64,
    /// Host: receive buffer exhausted.
    pub rx_buffer_exhausted: u64,
    /// Host: malformed guest messages.
    pub guest_errors: u64,
}

impl NicCounters {
    fn read(g: &NicGuestStats, h: &NicHostStats) -> NicCounters {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NicCounters {
            tx_completions: r(&g.tx_completions),
            tx_bytes: r(&g.tx_bytes),
            tx_errors: r(&g.tx_errors),
            rx_packets: r(&g.rx_packets),
            rx_bytes: r(&g.rx_bytes),
            rx_deliver_errors: r(&g.rx_deliver_errors),
            tx_dropped: r(&g.tx_dropped),
            doorbells: r(&g.doorbells),
            interrupts: r(&h.interrupts),
            ring_full_out: r(&g.ring_full),
            ring_full_in: r(&h.ring_full),
            host_tx_frames: r(&h.tx_frames),
            host_rx_frames: r(&h.rx_frames),
            host_rx_dropped: r(&h.rx_dropped),
            rx_buffer_exhausted: r(&h.rx_buffer_exhausted),
            guest_errors: r(&h.guest_errors),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct TxSlot {
    busy: bool,
    generation: u32,
    len: u32,
    submit_ns: u64,
}

/// Sleeps on `fds` (entries with fd -1 are ignored) for at most `timeout`, with microsecond
/// precision (ppoll: moderation deadlines are tens of microseconds). Returns the revents.
fn sleep_on(fds: &mut [libc::pollfd], timeout: Duration) -> Result<(), NicError> {
    let timeout = timeout.min(Duration::from_millis(100));
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: fds is a valid slice of pollfds, ts a valid timespec, no signal mask.
    let rc = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io_err("ppoll")(e));
        }
    }
    Ok(())
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// The guest's NIC driver: frames from its backend go out through the send buffer, frames the
/// host puts in the receive buffer go to its backend.
pub struct NicVsc<F: FrameIo> {
    end: GuestEnd,
    io: F,
    dev: u32,
    opts: NicOptions,
    knobs: Arc<NicKnobs>,
    stats: Arc<NicGuestStats>,
    tx_slots: Vec<TxSlot>,
    tx_free: Vec<u32>,
    /// A frame read from the backend whose tx request found the ring full: (section, len).
    pending_tx: Option<(u32, u32)>,
    /// Receive sections the host owns.
    rx_posted: Vec<bool>,
    /// Sections to return (trans_id, section): the completions not yet in the ring.
    returns: VecDeque<(u64, u32)>,
    /// The initial post of every receive section, until it is in the ring.
    post_pending: bool,
    out_full: bool,
    masked: bool,
    msg: Vec<u8>,
    frame: Vec<u8>,
    records: Vec<CompletionRecord>,
    records_since: Option<Instant>,
}

impl<F: FrameIo> NicVsc<F> {
    /// A driver over `end` (whose extra area is laid out by `opts`) with frames from and to `io`.
    pub fn new(
        end: GuestEnd,
        io: F,
        dev: u32,
        opts: NicOptions,
        knobs: Arc<NicKnobs>,
        stats: Arc<NicGuestStats>,
    ) -> Result<Self, NicError> {
        opts.validate()?;
        if end.extra.len() < opts.extra_bytes() {
            return Err(NicError::Invalid(format!(
                "shared area of {} bytes is smaller than the {} the buffers need",
                end.extra.len(),
                opts.extra_bytes()
            )));
        }
        let mut end = end;
        end.rx.set_max_payload(MAX_MESSAGE);
        Ok(NicVsc {
            end,
            io,
            dev,
            opts,
            knobs,
            stats,
            tx_slots: vec![TxSlot::default(); opts.send_sections as usize],
            tx_free: (0..opts.send_sections).rev().collect(),
            pending_tx: None,
            rx_posted: vec![false; opts.recv_sections as usize],
            returns: VecDeque::new(),
            post_pending: true,
            out_full: false,
            masked: false,
            msg: Vec::with_capacity(MAX_MESSAGE as usize),
            frame: vec![0; opts.section_bytes as usize + 1],
            records: Vec::with_capacity(trace::MAX_BATCH),
            records_since: None,
        })
    }

    /// Tx frames in flight.
    pub fn tx_outstanding(&self) -> usize {
        self.tx_slots.len() - self.tx_free.len() + self.pending_tx.is_some() as usize
    }

    /// Fires `io_reap` with the completions gathered since the last hit, if any (see
    /// `DiskVsc::flush_trace`: every completion is traced exactly once).
    pub fn flush_trace(&mut self) {
        if !self.records.is_empty() {
            trace::io_reap(self.dev, &self.records);
            self.stats.latency.record(&self.records);
            self.records.clear();
        }
        self.records_since = None;
    }

    fn record(&mut self, rec: CompletionRecord) {
        if self.records.len() == trace::MAX_BATCH {
            self.flush_trace();
        }
        self.records_since.get_or_insert_with(Instant::now);
        self.records.push(rec);
    }

    fn doorbell(&mut self, bytes_used: u32) -> Result<(), NicError> {
        self.stats.doorbells.fetch_add(1, Ordering::Relaxed);
        self.end.to_host.signal()?;
        trace::signal(self.dev, DIR_GUEST_TO_HOST, bytes_used);
        Ok(())
    }

    /// Writes one packet into the outbound ring; `Ok(Some(signal_bytes))` when written (with the
    /// ring's fill if the host must be signalled), `Ok(None)` when the ring is full.
    fn write_out(
        &mut self,
        ty: u16,
        flags: u16,
        trans_id: u64,
        payload: &[u8],
    ) -> Result<Option<Option<u32>>, NicError> {
        match self.end.tx.try_write(ty, flags, trans_id, &[payload])? {
            WriteOutcome::Written { signal, bytes_used } => {
                self.out_full = false;
                Ok(Some(signal.then_some(bytes_used)))
            }
            WriteOutcome::Full { needed } => {
                if !self.out_full {
                    self.out_full = true;
                    self.stats.ring_full.fetch_add(1, Ordering::Relaxed);
                    trace::ring_full(self.dev, DIR_GUEST_TO_HOST, needed);
                }
                Ok(None)
            }
        }
    }

    /// Posts receive sections and returns reaped ones; returns how many packets it wrote.
    fn flush_returns(&mut self) -> Result<usize, NicError> {
        let mut written = 0;
        let mut ring_signal = None;
        if self.post_pending {
            let post = RxPost {
                first: 0,
                count: self.opts.recv_sections,
            };
            match self.write_out(PACKET_TYPE_INBAND, 0, 0, &post.encode())? {
                Some(sig) => {
                    self.post_pending = false;
                    self.rx_posted.iter_mut().for_each(|p| *p = true);
                    ring_signal = ring_signal.or(sig);
                    written += 1;
                }
                None => return Ok(0),
            }
        }
        while let Some(&(trans_id, section)) = self.returns.front() {
            let done = NicCompletion::default().encode();
            match self.write_out(PACKET_TYPE_COMPLETION, 0, trans_id, &done)? {
                Some(sig) => {
                    self.returns.pop_front();
                    self.rx_posted[section as usize] = true;
                    ring_signal = ring_signal.or(sig);
                    written += 1;
                }
                None => break,
            }
        }
        if let Some(used) = ring_signal {
            self.doorbell(used)?;
        }
        Ok(written)
    }

    /// Moves frames from the backend into the send buffer and the ring; returns how many.
    fn pump_tx(&mut self) -> Result<usize, NicError> {
        let mut sent = 0;
        let mut dropped = 0;
        let mut ring_signal = None;
        // Bounded, so that a backend that keeps yielding bad frames cannot starve the rest.
        while sent + dropped < HOST_PASS {
            let (section, len) = match self.pending_tx {
                Some(p) => p,
                None => {
                    let Some(&section) = self.tx_free.last() else {
                        break;
                    };
                    if self.out_full {
                        break;
                    }
                    let Some(n) = self
                        .io
                        .recv_frame(&mut self.frame)
                        .map_err(io_err("reading the guest backend"))?
                    else {
                        break;
                    };
                    if n > self.opts.section_bytes as usize || n < ETH_HLEN as usize {
                        self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                        dropped += 1;
                        continue;
                    }
                    self.tx_free.pop();
                    self.end
                        .extra
                        .write_at(self.opts.send_offset(section), &self.frame[..n])
                        .ok_or_else(|| NicError::Invalid("send section outside the area".into()))?;
                    (section, n as u32)
                }
            };
            let slot = &self.tx_slots[section as usize];
            let generation = slot.generation.wrapping_add(1);
            let tag = (generation as u64) << 32 | section as u64;
            let req = TxRequest { section, len };
            let submit_ns = trace::monotonic_ns();
            match self.write_out(
                PACKET_TYPE_INBAND,
                FLAG_COMPLETION_REQUESTED,
                tag,
                &req.encode(),
            )? {
                Some(sig) => {
                    self.pending_tx = None;
                    self.tx_slots[section as usize] = TxSlot {
                        busy: true,
                        generation,
                        len,
                        submit_ns,
                    };
                    trace::io_submit(self.dev, OP_TX, tag, len, submit_ns);
                    ring_signal = ring_signal.or(sig);
                    sent += 1;
                }
                None => {
                    self.pending_tx = Some((section, len));
                    break;
                }
            }
        }
        if let Some(used) = ring_signal {
            self.doorbell(used)?;
        }
        Ok(sent)
    }

    fn tx_completion(&mut self, trans_id: u64, now: u64) -> Result<(), NicError> {
        let c = NicCompletion::decode(&self.msg).ok_or_else(|| {
            NicError::Protocol(format!("tx completion payload of {} bytes", self.msg.len()))
        })?;
        let section = (trans_id & 0xffff_ffff) as usize;
        let slot = self
            .tx_slots
            .get(section)
            .copied()
            .filter(|s| s.busy && s.generation == (trans_id >> 32) as u32)
            .ok_or_else(|| {
                NicError::Protocol(format!(
                    "completion for unknown or finished tag {trans_id:#x}"
                ))
            })?;
        if c.len > slot.len || (c.status == 0 && c.len != slot.len) {
            return Err(NicError::Protocol(format!(
                "completion reports {} bytes for a {}-byte frame",
                c.len, slot.len
            )));
        }
        self.tx_slots[section].busy = false;
        self.tx_free.push(section as u32);
        let latency_ns = now.saturating_sub(slot.submit_ns);
        let status = c.status.min(u16::MAX as u32) as u16;
        self.stats.tx_completions.fetch_add(1, Ordering::Relaxed);
        if c.status == 0 {
            self.stats
                .tx_bytes
                .fetch_add(c.len as u64, Ordering::Relaxed);
        } else {
            self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
        }
        trace::io_complete(self.dev, OP_TX, trans_id, c.len, latency_ns, status);
        self.record(CompletionRecord {
            latency_ns,
            bytes: c.len,
            op: OP_TX,
            status,
        });
        Ok(())
    }

    fn rx_packet(&mut self, trans_id: u64, now: u64) -> Result<(), NicError> {
        let p = RxPacket::decode(&self.msg).ok_or_else(|| {
            NicError::Protocol(format!("malformed rx packet of {} bytes", self.msg.len()))
        })?;
        if !self
            .rx_posted
            .get(p.section as usize)
            .copied()
            .unwrap_or(false)
        {
            return Err(NicError::Protocol(format!(
                "rx packet in section {} which the host does not own",
                p.section
            )));
        }
        if p.len < ETH_HLEN || p.len > self.opts.section_bytes {
            return Err(NicError::Protocol(format!(
                "rx frame of {} bytes (sections hold {})",
                p.len, self.opts.section_bytes
            )));
        }
        self.rx_posted[p.section as usize] = false;
        let frame = &mut self.frame[..p.len as usize];
        self.end
            .extra
            .read_at(self.opts.recv_offset(p.section), frame)
            .ok_or_else(|| NicError::Invalid("receive section outside the area".into()))?;
        let status = match self.io.send_frame(frame) {
            Ok(()) => 0,
            Err(e) => {
                self.stats.rx_deliver_errors.fetch_add(1, Ordering::Relaxed);
                e.raw_os_error().unwrap_or(libc::EIO).min(u16::MAX as i32) as u16
            }
        };
        self.returns.push_back((trans_id, p.section));
        let latency_ns = now.saturating_sub(p.host_rx_ns);
        self.stats.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.stats
            .rx_bytes
            .fetch_add(p.len as u64, Ordering::Relaxed);
        trace::io_complete(self.dev, OP_RX, trans_id, p.len, latency_ns, status);
        self.record(CompletionRecord {
            latency_ns,
            bytes: p.len,
            op: OP_RX,
            status,
        });
        Ok(())
    }

    /// One polling pass: handles up to `poll_budget` packets from the host.
    fn reap_pass(&mut self) -> Result<usize, NicError> {
        let budget = self.knobs.budget();
        let mut reaped = 0;
        while reaped < budget {
            let Some(h) = self.end.rx.read_into(&mut self.msg)? else {
                break;
            };
            let now = trace::monotonic_ns();
            match h.ty {
                PACKET_TYPE_COMPLETION => self.tx_completion(h.trans_id, now)?,
                PACKET_TYPE_TRANSFER_PAGES => self.rx_packet(h.trans_id, now)?,
                ty => {
                    return Err(NicError::Protocol(format!(
                        "packet type {ty} from the host"
                    )))
                }
            }
            reaped += 1;
        }
        if self.end.rx.commit().signal_writer {
            self.doorbell(0)?;
        }
        if self
            .records_since
            .is_some_and(|t| t.elapsed() >= TRACE_FLUSH)
        {
            self.flush_trace();
        }
        Ok(reaped)
    }

    fn set_masked(&mut self, masked: bool) {
        if self.masked != masked {
            self.end.rx.set_interrupt_mask(masked);
            self.masked = masked;
            trace::irq_mask(self.dev, masked);
        }
    }

    /// One turn of the driver: reap (NAPI-like), return and post receive sections, send frames;
    /// when there was nothing to do, sleep until the host signals, a frame waits in the backend,
    /// `wake_fd` is readable, or `timeout`. Returns whether it did any work.
    pub fn poll_once(&mut self, wake_fd: RawFd, timeout: Duration) -> Result<bool, NicError> {
        let n = self.reap_pass()?;
        let returned = self.flush_returns()?;
        let sent = self.pump_tx()?;
        if n == self.knobs.budget() {
            self.set_masked(true);
            return Ok(true);
        }
        if self.masked {
            self.set_masked(false);
            // Lost-wake-up guard: a packet written while we were masked raised no signal.
            if self.end.rx.has_data()? {
                return Ok(true);
            }
        }
        if n + returned + sent > 0 {
            return Ok(true);
        }
        let flush_in = match self.records_since {
            Some(t) => {
                let age = t.elapsed();
                if age >= TRACE_FLUSH {
                    self.flush_trace();
                    timeout
                } else {
                    timeout.min(TRACE_FLUSH - age)
                }
            }
            None => timeout,
        };
        let can_tx = self.pending_tx.is_none() && !self.tx_free.is_empty() && !self.out_full;
        let mut fds = [
            pollfd(self.end.from_host.raw_fd()),
            pollfd(if can_tx { self.io.raw_fd() } else { -1 }),
            pollfd(wake_fd),
        ];
        sleep_on(&mut fds, flush_in)?;
        if fds[0].revents & libc::POLLIN != 0 {
            self.end.from_host.drain()?;
        }
        Ok(false)
    }

    /// Runs until `stop` is set (then traces what is left) or an error.
    pub fn run(&mut self, stop: &AtomicBool, wake_fd: RawFd) -> Result<(), NicError> {
        let result = loop {
            if stop.load(Ordering::Acquire) {
                break Ok(());
            }
            if let Err(e) = self.poll_once(wake_fd, Duration::from_millis(100)) {
                break Err(e);
            }
        };
        self.flush_trace();
        result
    }
}

impl<F: FrameIo> Drop for NicVsc<F> {
    fn drop(&mut self) {
        self.flush_trace();
    }
}

/// Moderation state of the host → guest path (as the disk's).
struct Moderation {
    owed_since: Option<Instant>,
    since_owed: u32,
}

/// State of one receive section, as the host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxSection {
    /// Not posted by the guest.
    Guest,
    /// Posted: the host may fill it.
    Posted,
    /// Filled and sent in the rx packet with this generation; the guest has not returned it.
    InFlight(u32),
}

/// The host's NIC service: tx frames from the guest go to its backend, frames from its backend go
/// into the guest's receive buffer.
pub struct NicVsp<F: FrameIo> {
    end: HostEnd,
    io: F,
    dev: u32,
    opts: NicOptions,
    knobs: Arc<NicKnobs>,
    stats: Arc<NicHostStats>,
    rx: Vec<RxSection>,
    generation: Vec<u32>,
    posted: VecDeque<u32>,
    /// Packets for the inbound ring that found it full: (type, flags, trans_id, payload, len).
    outq: VecDeque<(u16, u16, u64, [u8; 24], usize)>,
    blocked_on_full: bool,
    moderation: Moderation,
    msg: Vec<u8>,
    frame: Vec<u8>,
}

impl<F: FrameIo> NicVsp<F> {
    /// A service over `end` (extra area laid out by `opts`) with frames from and to `io`.
    pub fn new(
        end: HostEnd,
        io: F,
        dev: u32,
        opts: NicOptions,
        knobs: Arc<NicKnobs>,
        stats: Arc<NicHostStats>,
    ) -> Result<Self, NicError> {
        opts.validate()?;
        if end.extra.len() < opts.extra_bytes() {
            return Err(NicError::Invalid(format!(
                "shared area of {} bytes is smaller than the {} the buffers need",
                end.extra.len(),
                opts.extra_bytes()
            )));
        }
        let mut end = end;
        end.rx.set_max_payload(MAX_MESSAGE);
        Ok(NicVsp {
            end,
            io,
            dev,
            opts,
            knobs,
            stats,
            rx: vec![RxSection::Guest; opts.recv_sections as usize],
            generation: vec![0; opts.recv_sections as usize],
            posted: VecDeque::with_capacity(opts.recv_sections as usize),
            outq: VecDeque::new(),
            blocked_on_full: false,
            moderation: Moderation {
                owed_since: None,
                since_owed: 0,
            },
            msg: Vec::with_capacity(MAX_MESSAGE as usize),
            frame: vec![0; opts.section_bytes as usize + 1],
        })
    }

    /// Receive sections the host may fill now.
    pub fn posted_sections(&self) -> usize {
        self.posted.len()
    }

    fn guest_error(&self, what: std::fmt::Arguments) {
        self.stats.guest_errors.fetch_add(1, Ordering::Relaxed);
        log::debug!("nic{}: malformed message from the guest: {what}", self.dev);
    }

    fn complete_tx(&mut self, trans_id: u64, flags: u16, c: NicCompletion) {
        if c.status != 0 {
            self.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
        }
        if flags & FLAG_COMPLETION_REQUESTED != 0 {
            let mut p = [0u8; 24];
            p[..8].copy_from_slice(&c.encode());
            self.outq
                .push_back((PACKET_TYPE_COMPLETION, 0, trans_id, p, 8));
        }
    }

    fn handle_tx(&mut self, trans_id: u64, flags: u16, req: TxRequest) {
        if req.section >= self.opts.send_sections
            || req.len < ETH_HLEN
            || req.len > self.opts.section_bytes
        {
            self.guest_error(format_args!("{req:?}"));
            let c = NicCompletion {
                status: libc::EINVAL as u32,
                len: 0,
            };
            return self.complete_tx(trans_id, flags, c);
        }
        let frame = &mut self.frame[..req.len as usize];
        if self
            .end
            .extra
            .read_at(self.opts.send_offset(req.section), frame)
            .is_none()
        {
            let c = NicCompletion {
                status: libc::EINVAL as u32,
                len: 0,
            };
            return self.complete_tx(trans_id, flags, c);
        }
        let c = match self.io.send_frame(frame) {
            Ok(()) => {
                self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                NicCompletion {
                    status: 0,
                    len: req.len,
                }
            }
            Err(e) => NicCompletion {
                status: e.raw_os_error().unwrap_or(libc::EIO) as u32,
                len: 0,
            },
        };
        self.complete_tx(trans_id, flags, c);
    }

    fn handle_post(&mut self, post: RxPost) {
        let end = post.first.checked_add(post.count);
        if end.is_none_or(|e| e > self.opts.recv_sections) {
            return self.guest_error(format_args!("{post:?} outside the receive buffer"));
        }
        for s in post.first..post.first + post.count {
            if self.rx[s as usize] == RxSection::Guest {
                self.rx[s as usize] = RxSection::Posted;
                self.posted.push_back(s);
            } else {
                self.guest_error(format_args!("section {s} posted twice"));
            }
        }
    }

    fn handle_return(&mut self, trans_id: u64) {
        let section = (trans_id & 0xffff_ffff) as usize;
        let generation = (trans_id >> 32) as u32;
        match self.rx.get(section) {
            Some(RxSection::InFlight(g)) if *g == generation => {
                self.rx[section] = RxSection::Posted;
                self.posted.push_back(section as u32);
            }
            _ => self.guest_error(format_args!("return of unknown rx {trans_id:#x}")),
        }
    }

    /// Handles up to one pass of the guest's packets; returns how many.
    fn guest_pass(&mut self) -> Result<usize, NicError> {
        let mut n = 0;
        while n < HOST_PASS {
            let Some(h) = self.end.rx.read_into(&mut self.msg)? else {
                break;
            };
            n += 1;
            match (h.ty, GuestMessage::decode(&self.msg)) {
                (PACKET_TYPE_INBAND, Some(GuestMessage::Tx(req))) => {
                    self.handle_tx(h.trans_id, h.flags, req)
                }
                (PACKET_TYPE_INBAND, Some(GuestMessage::RxPost(post))) => self.handle_post(post),
                (PACKET_TYPE_COMPLETION, _) => self.handle_return(h.trans_id),
                (ty, _) => {
                    self.guest_error(format_args!("packet type {ty}, {} bytes", self.msg.len()));
                    let c = NicCompletion {
                        status: libc::EPROTO as u32,
                        len: 0,
                    };
                    self.complete_tx(h.trans_id, h.flags, c);
                }
            }
        }
        if self.end.rx.commit().signal_writer {
            self.interrupt(0)?;
        }
        Ok(n)
    }

    fn interrupt(&mut self, used: u32) -> Result<(), NicError> {
        // Count before signalling: a woken guest may read the counter at once.
        self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
        self.end.to_guest.signal()?;
        trace::signal(self.dev, DIR_HOST_TO_GUEST, used);
        Ok(())
    }

    /// Reads frames from the backend into posted sections; returns how many.
    fn backend_pass(&mut self) -> Result<usize, NicError> {
        let mut n = 0;
        while n < HOST_PASS && self.outq.is_empty() && !self.posted.is_empty() {
            let Some(len) = self
                .io
                .recv_frame(&mut self.frame)
                .map_err(io_err("reading the host backend"))?
            else {
                break;
            };
            let host_rx_ns = trace::monotonic_ns();
            if len < ETH_HLEN as usize || len > self.opts.section_bytes as usize {
                self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                n += 1;
                continue;
            }
            let section = self.posted.pop_front().expect("checked non-empty");
            self.end
                .extra
                .write_at(self.opts.recv_offset(section), &self.frame[..len])
                .ok_or_else(|| NicError::Invalid("receive section outside the area".into()))?;
            let generation = self.generation[section as usize].wrapping_add(1);
            self.generation[section as usize] = generation;
            self.rx[section as usize] = RxSection::InFlight(generation);
            let p = RxPacket {
                section,
                len: len as u32,
                host_rx_ns,
            };
            self.outq.push_back((
                PACKET_TYPE_TRANSFER_PAGES,
                FLAG_COMPLETION_REQUESTED,
                (generation as u64) << 32 | section as u64,
                p.encode(),
                24,
            ));
            self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
            if self.posted.is_empty() {
                self.stats
                    .rx_buffer_exhausted
                    .fetch_add(1, Ordering::Relaxed);
            }
            n += 1;
            self.write_inbound()?;
        }
        Ok(n)
    }

    /// Writes queued packets into the inbound ring; returns how many.
    fn write_inbound(&mut self) -> Result<usize, NicError> {
        let mut n = 0;
        while let Some((ty, flags, trans_id, payload, len)) = self.outq.front().copied() {
            match self
                .end
                .tx
                .try_write(ty, flags, trans_id, &[&payload[..len]])?
            {
                WriteOutcome::Written { signal, .. } => {
                    self.outq.pop_front();
                    self.blocked_on_full = false;
                    if signal && self.moderation.owed_since.is_none() {
                        self.moderation.owed_since = Some(Instant::now());
                        self.moderation.since_owed = 0;
                    }
                    if self.moderation.owed_since.is_some() {
                        self.moderation.since_owed += 1;
                    }
                    n += 1;
                }
                WriteOutcome::Full { needed } => {
                    if !self.blocked_on_full {
                        self.stats.ring_full.fetch_add(1, Ordering::Relaxed);
                        trace::ring_full(self.dev, DIR_HOST_TO_GUEST, needed);
                        self.blocked_on_full = true;
                    }
                    break;
                }
            }
        }
        Ok(n)
    }

    fn moderation_deadline(&self) -> Option<Instant> {
        let usecs = self.knobs.moderation_usecs.load(Ordering::Relaxed);
        self.moderation
            .owed_since
            .map(|t| t + Duration::from_micros(usecs as u64))
    }

    fn moderate(&mut self) -> Result<(), NicError> {
        let frames = self.knobs.moderation_frames.load(Ordering::Relaxed).max(1);
        let due = self.moderation.owed_since.is_some()
            && (self.moderation.since_owed >= frames
                || self
                    .moderation_deadline()
                    .is_some_and(|d| Instant::now() >= d));
        if due {
            self.moderation.owed_since = None;
            if !self.end.tx.reader_masked() {
                let used = self.end.tx.bytes_used()?;
                self.interrupt(used)?;
            }
        }
        Ok(())
    }

    /// One turn of the service; sleeps when there was nothing to do (until the guest signals, a
    /// frame waits in the backend while a section is posted, `wake_fd` is readable, the
    /// moderation timer, or `timeout`). Returns whether it did any work.
    pub fn poll_once(&mut self, wake_fd: RawFd, timeout: Duration) -> Result<bool, NicError> {
        let from_guest = self.guest_pass()?;
        let written = self.write_inbound()?;
        let received = self.backend_pass()?;
        self.moderate()?;
        if from_guest + written + received > 0 || self.end.rx.has_data()? {
            return Ok(true);
        }
        let timeout = match self.moderation_deadline() {
            Some(d) => timeout.min(d.saturating_duration_since(Instant::now())),
            None => timeout,
        };
        let can_rx = self.outq.is_empty() && !self.posted.is_empty();
        let mut fds = [
            pollfd(self.end.from_guest.raw_fd()),
            pollfd(if can_rx { self.io.raw_fd() } else { -1 }),
            pollfd(wake_fd),
        ];
        sleep_on(&mut fds, timeout)?;
        if fds[0].revents & libc::POLLIN != 0 {
            self.end.from_guest.drain()?;
        }
        Ok(false)
    }

    /// Runs until `stop` is set or the guest breaks the ring.
    pub fn run(&mut self, stop: &AtomicBool, wake_fd: RawFd) -> Result<(), NicError> {
        while !stop.load(Ordering::Acquire) {
            self.poll_once(wake_fd, Duration::from_millis(100))?;
        }
        Ok(())
    }
}

/// Both sides of a synthetic NIC on threads of this process.
pub struct NicHandle {
    stop: Arc<AtomicBool>,
    /// Written once to stop; never drained, so both threads see it.
    wake: Arc<OwnedFd>,
    guest: Option<JoinHandle<Result<(), NicError>>>,
    host: Option<JoinHandle<Result<(), NicError>>>,
    guest_stats: Arc<NicGuestStats>,
    host_stats: Arc<NicHostStats>,
    knobs: Arc<NicKnobs>,
    options: NicOptions,
    dev: u32,
}

/// Starting a synthetic NIC between two frame backends.
pub struct SyntheticNic;

impl SyntheticNic {
    /// Creates the channel sized by `settings` and `options`, and runs the guest driver on
    /// `guest_io` and the host service on `host_io`, each on its own thread.
    pub fn start<G: FrameIo + 'static, H: FrameIo + 'static>(
        guest_io: G,
        host_io: H,
        dev: u32,
        settings: DeviceSettings,
        options: NicOptions,
    ) -> Result<NicHandle, NicError> {
        settings.validate()?;
        options.validate()?;
        let cfg = ChannelConfig {
            out_ring_bytes: settings.ring_out_bytes as usize,
            in_ring_bytes: settings.ring_in_bytes as usize,
            extra_bytes: options.extra_bytes(),
        };
        let (guest, host) = channel::create(&cfg)?;
        let knobs = Arc::new(NicKnobs::new(&settings));
        let guest_stats = Arc::new(NicGuestStats::default());
        let host_stats = Arc::new(NicHostStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        // SAFETY: plain syscall; we own the fd on success.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io_err("eventfd")(io::Error::last_os_error()));
        }
        // SAFETY: fresh fd owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut vsp = NicVsp::new(
            host,
            host_io,
            dev,
            options,
            Arc::clone(&knobs),
            Arc::clone(&host_stats),
        )?;
        let mut vsc = NicVsc::new(
            guest,
            guest_io,
            dev,
            options,
            Arc::clone(&knobs),
            Arc::clone(&guest_stats),
        )?;
        let spawn = |name: String, f: Box<dyn FnOnce() -> Result<(), NicError> + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(io_err("spawning a NIC thread"))
        };
        let host_thread = {
            let (stop, wake) = (Arc::clone(&stop), Arc::clone(&wake));
            spawn(
                format!("vsp-nic{dev}"),
                Box::new(move || vsp.run(&stop, wake.as_raw_fd())),
            )?
        };
        let mut handle = NicHandle {
            stop: Arc::clone(&stop),
            wake: Arc::clone(&wake),
            guest: None,
            host: Some(host_thread),
            guest_stats,
            host_stats,
            knobs,
            options,
            dev,
        };
        handle.guest = Some(spawn(
            format!("vsc-nic{dev}"),
            Box::new(move || vsc.run(&stop, wake.as_raw_fd())),
        )?);
        Ok(handle)
    }
}

impl NicHandle {
    /// Both sides' counters now.
    pub fn counters(&self) -> NicCounters {
        NicCounters::read(&self.guest_stats, &self.host_stats)
    }

    /// The guest's own (tx, rx) latency figures over the completions traced so far (all of them
    /// once the NIC has stopped).
    pub fn latency(&self) -> (LatencyFigures, LatencyFigures) {
        self.guest_stats.latency.figures()
    }

    /// The live knobs (moderation and budget can change while the NIC runs).
    pub fn knobs(&self) -> &Arc<NicKnobs> {
        &self.knobs
    }

    /// The settings in force.
    pub fn settings(&self) -> DeviceSettings {
        self.knobs.settings()
    }

    /// The buffer sizes.
    pub fn options(&self) -> NicOptions {
        self.options
    }

    /// The device id in the probes.
    pub fn dev_id(&self) -> u32 {
        self.dev
    }

    /// Whether a side has stopped on its own (an error); [`stop`](Self::stop) reports which.
    pub fn failed(&self) -> bool {
        self.guest.as_ref().is_some_and(|t| t.is_finished())
            || self.host.as_ref().is_some_and(|t| t.is_finished())
    }

    /// Stops both sides (the guest traces what it reaped) and returns the final counters, or
    /// the first error either side stopped with.
    pub fn stop(self) -> Result<NicCounters, NicError> {
        Ok(self.stop_with_latency()?.0)
    }

    /// Like [`stop`](Self::stop), with the final (tx, rx) latency figures.
    pub fn stop_with_latency(
        mut self,
    ) -> Result<(NicCounters, (LatencyFigures, LatencyFigures)), NicError> {
        self.stop_inner()?;
        Ok((self.counters(), self.latency()))
    }

    fn stop_inner(&mut self) -> Result<(), NicError> {
        self.stop.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a local to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let mut result = Ok(());
        for (side, t) in [("guest", self.guest.take()), ("host", self.host.take())] {
            if let Some(t) = t {
                let r = t.join().unwrap_or(Err(NicError::Panicked(side)));
                if result.is_ok() {
                    result = r;
                }
            }
        }
        result
    }
}

impl Drop for NicHandle {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// A synthetic NIC between two network namespaces: the guest side on a tap in one, the host side
/// on a tap in the other, so that traffic between [`GUEST_IP`](crate::netns::GUEST_IP) and
/// [`HOST_IP`](crate::netns::HOST_IP) crosses our rings. Dropping it (or [`stop`](Self::stop))
/// stops the NIC, closes the taps and deletes the namespaces.
pub struct NicBridge {
    // Field order is drop order: the NIC threads own the taps and go first.
    nic: NicHandle,
    namespaces: NetNamespaces,
    mtu: u32,
}

impl NicBridge {
    /// Creates the namespaces and taps (removing dead runs' leftovers first) and starts the NIC.
    /// `label` names the namespaces (`enl-<pid>-<seq>-<label>_g` / `_h`). Sections are sized
    /// for `mtu` when `options` are too small for it.
    pub fn start(
        label: &str,
        dev: u32,
        settings: DeviceSettings,
        options: NicOptions,
        mtu: u32,
    ) -> Result<NicBridge, NicError> {
        let need = NicOptions::for_mtu(mtu).section_bytes;
        let options = NicOptions {
            section_bytes: options.section_bytes.max(need),
            ..options
        };
        options.validate()?;
        settings.validate()?;
        let pair = NetPair::create(label, mtu)?;
        let (guest_tap, host_tap, namespaces) = pair.split();
        let nic = SyntheticNic::start(guest_tap, host_tap, dev, settings, options)?;
        Ok(NicBridge {
            nic,
            namespaces,
            mtu,
        })
    }

    /// The namespace of the guest side (address [`GUEST_IP`](crate::netns::GUEST_IP)).
    pub fn guest_ns(&self) -> &Netns {
        &self.namespaces.guest
    }

    /// The namespace of the host side (address [`HOST_IP`](crate::netns::HOST_IP)).
    pub fn host_ns(&self) -> &Netns {
        &self.namespaces.host
    }

    /// The NIC.
    pub fn nic(&self) -> &NicHandle {
        &self.nic
    }

    /// MTU of both taps.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Kernel counters of the guest tap (in the guest namespace) and the host tap.
    pub fn tap_stats(
        &self,
    ) -> Result<(crate::netns::LinkStats, crate::netns::LinkStats), NicError> {
        Ok((
            self.namespaces.guest.link_stats(NetPair::GUEST_IF)?,
            self.namespaces.host.link_stats(NetPair::HOST_IF)?,
        ))
    }

    /// Stops the NIC and removes the taps and namespaces; returns the final counters.
    pub fn stop(self) -> Result<NicCounters, NicError> {
        Ok(self.stop_with_latency()?.0)
    }

    /// Like [`stop`](Self::stop), with the guest's final (tx, rx) latency figures.
    pub fn stop_with_latency(
        self,
    ) -> Result<(NicCounters, (LatencyFigures, LatencyFigures)), NicError> {
        let NicBridge {
            nic, namespaces, ..
        } = self;
        let result = nic.stop_with_latency();
        drop(namespaces);
        result
    }
}

#[cfg(test)]
mod tests;
