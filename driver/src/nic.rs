//! A netvsc-like synthetic NIC over the channel.
//!
//! The guest driver ([`NicVsc`]) and the host service ([`NicVsp`]) share one channel whose extra
//! area holds two buffers, cut into fixed-size sections as netvsc's are:
//! - the **send buffer** (`send_sections`): the guest copies an outgoing frame into a free section
//!   and sends a [`TxRequest`] (inband packet, completion requested, `trans_id` = the tag); the
//!   host reads the section, writes the frame to its backend and sends a completion packet
//!   ([`NicCompletion`]), which frees the section;
//! - the **receive buffer** (`recv_sections`): the guest *posts* sections to the host
//!   ([`RxPost`], all at once at start and again after a ring resize); the host copies a frame it received from its backend
//!   into a posted section and sends an [`RxPacket`] (a transfer-page packet asking for a
//!   completion); the guest hands the frame to its own backend and returns the section with a
//!   completion packet carrying the same `trans_id`, which posts it again. With no posted section
//!   left the host stops reading its backend (the frames wait in the tap's queue, which the
//!   kernel drops from when it is full): receive-buffer exhaustion is back-pressure, counted.
//!
//! Both sides validate every byte from the other: the guest accepts a completion only for a tag
//! in flight and an rx packet only for a section it posted, with a length inside the section; the
//! host completes a tx request with bad arguments with an error status. A packet the peer cannot
//! legally send (a completion for a tag not in flight, a post of a section the host holds, an
//! unknown or undecodable message) breaks the channel like a ring violation does: a typed error
//! ([`NicError::Protocol`], [`NicError::GuestProtocol`]) on that turn and [`NicError::Broken`]
//! on every later one, never a panic. The host stops reading the guest's requests while the
//! packets it holds for a full inbound ring reach `send_sections + recv_sections` (more than a
//! well-behaved guest can cause), so no guest can grow its memory.
//!
//! Interrupt moderation and NAPI-like reaping are the disk's (one implementation of each, in
//! [`enlight_vmbus::moderation`] and [`enlight_vmbus::poll`]): a packet that
//! makes the inbound ring non-empty while the guest has not masked interrupts makes a signal
//! *owed*, fired after `moderation_frames` packets or `moderation_usecs`, whichever first; the
//! guest reaps up to `poll_budget` packets per pass and stays in polling mode (interrupts masked)
//! while passes fill the budget.
//!
//! Every knob is live ([`NicKnobs`]); a ring resize moves both sides to a new channel in band
//! (`NicVsc::switch_channel`): the host writes everything it owes on the old ring before its
//! acknowledgement and gives the whole receive buffer back, the guest posts it again on the new
//! ring, so no frame is lost, duplicated or reordered.
//!
//! Tracing (contract 1) happens on the guest side: `io_submit` (op tx) when a tx request is in
//! the ring, `io_complete` and one `io_reap` record per reaped tx completion and per reaped rx
//! packet (op rx), `signal`, `irq_mask` and `ring_full` as for the disk; the host fires `signal`
//! (direction 1) and `ring_full` (direction 1). Latency: **tx** is submit to reaped completion
//! (the frame is in the host's backend by then); **rx** is the host's receive time (it stamps
//! `host_rx_ns` when it reads the frame from its backend; one `CLOCK_MONOTONIC` on one machine,
//! as Hyper-V's reference time is shared) to the guest's reap.
//!
//! Layout: `proto` (the messages and their codecs), `backend` (where frames come from and go
//! to: [`FrameIo`], taps, socket pairs), `vsc` (the guest driver), `vsp` (the host service),
//! `device` (both on threads, and [`NicBridge`] between two namespaces); this file holds what
//! they share (options, knobs, counters, errors).

mod backend;
mod device;
mod proto;
mod vsc;
mod vsp;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use backend::{FrameIo, FramePipe};
pub use device::{NicBridge, NicHandle, SyntheticNic};
pub use proto::{
    GuestMessage, NicCompletion, RxPacket, RxPost, TxRequest, ETH_HLEN, MAX_MESSAGE, MSG_RX,
    MSG_RX_POST, MSG_TX,
};
pub use vsc::NicVsc;
pub use vsp::NicVsp;

use crate::channel::{self, ChannelError};
use crate::control::ControlError;
use crate::disk::{DiskLive, ResizeReport};
use crate::netns::NetError;
use crate::ring::{RingError, PAGE_SIZE};
use crate::settings::{DeviceSettings, Knob, SettingsError};
use crate::trace::{CompletionRecord, OP_RX};

pub use crate::trace::TRACE_FLUSH;
/// Most frames a side reads from its backend, or the host handles from the guest, per pass, so
/// that neither direction starves the other.
const HOST_PASS: usize = 128;
// Longest either side waits for its peer during a channel switch (room in a ring, the
// acknowledgement); a peer slower than that has broken the protocol. The transport's, as for
// the disk.
use enlight_vmbus::switch::SWITCH_ACK_TIMEOUT;
/// Longest either side's thread sleeps with nothing to do before it looks again. Everything that
/// gives it work wakes it sooner (its peer's signal, a frame in its backend, a resize request,
/// stop); tests lengthen it to show that they do.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// NIC errors.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// Channel set-up or signalling failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The peer broke the ring protocol; the channel is unusable.
    #[error("channel broken: {0}")]
    Ring(#[from] RingError),
    /// The host sent a well-framed packet it cannot legally send; the channel is unusable from
    /// then on.
    #[error("protocol violation by the host: {0}")]
    Protocol(String),
    /// The guest sent a packet it cannot legally send (a return of a section not in flight, a
    /// post of a section it does not own, a message that does not decode); the host stops.
    #[error("protocol violation by the guest: {0}")]
    GuestProtocol(String),
    /// An earlier protocol violation broke the channel; every later call fails with this.
    #[error("the channel is broken by an earlier protocol violation: {0}")]
    Broken(String),
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
    /// A change through the knobs was refused or failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The guest broke the channel switch protocol (never made room for the acknowledgement).
    #[error("channel switch failed: {0}")]
    Switch(String),
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

    pub(crate) fn send_offset(&self, section: u32) -> usize {
        section as usize * self.section_bytes as usize
    }

    pub(crate) fn recv_offset(&self, section: u32) -> usize {
        (self.send_sections as usize + section as usize) * self.section_bytes as usize
    }

    /// The channel's extra area: send buffer, then receive buffer, rounded to a page.
    pub fn extra_bytes(&self) -> usize {
        ((self.send_sections as usize + self.recv_sections as usize) * self.section_bytes as usize)
            .next_multiple_of(PAGE_SIZE)
    }
}

/// The live settings of a running NIC, shared by its guest driver, its host service and its
/// control socket. Moderation and the polling budget are read on every pass; a ring resize moves
/// both sides to a new channel (see [`NicVsc`]), with the disk's request/hand-over machinery
/// ([`DiskLive`]: the control thread posts the request and waits, the guest driver performs it,
/// the new host end passes through its hand-over slot).
#[derive(Debug)]
pub struct NicKnobs {
    live: DiskLive,
    /// Raised when a resize is requested, so that a guest driver asleep waiting for frames
    /// starts it at once.
    wake: Arc<OwnedFd>,
}

impl NicKnobs {
    /// Knobs starting at `s`.
    pub fn new(s: &DeviceSettings) -> Result<NicKnobs, NicError> {
        s.validate()?;
        // SAFETY: plain syscall; we own the fd on success.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io_err("eventfd")(io::Error::last_os_error()));
        }
        // SAFETY: fresh fd owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let live = DiskLive::new(*s);
        let _ = live.request_wake.set(Arc::clone(&wake));
        Ok(NicKnobs { live, wake })
    }

    /// The settings in force.
    pub fn settings(&self) -> DeviceSettings {
        self.live.current()
    }

    /// Puts `s` in force: moderation and budget at once, a ring resize (first, all-or-nothing)
    /// by switching channels between two frames. Blocks until done; a resize needs the host
    /// service running in this process ([`SyntheticNic`]).
    pub fn apply(&self, s: &DeviceSettings) -> Result<(), NicError> {
        s.validate()?;
        crate::control::Tunable::apply(&self.live, s).map_err(NicError::Control)
    }

    /// Ring resizes completed.
    pub fn resizes(&self) -> u64 {
        self.live.resizes()
    }

    /// The last resize's report.
    pub fn last_resize(&self) -> Option<ResizeReport> {
        self.live.last_resize()
    }

    /// The longest stall of any resize so far (no frame taken from either tap), ns.
    pub fn longest_stall_ns(&self) -> u64 {
        self.live.longest_stall_ns()
    }

    fn knob(&self, k: Knob) -> u32 {
        self.live.knob(k)
    }

    fn budget(&self) -> usize {
        self.knob(Knob::PollBudget).max(1) as usize
    }

    fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    fn clear_wake(&self) {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a local from our non-blocking eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// The control socket (contract 4) tunes every knob live, ring sizes included.
impl crate::control::Tunable for NicKnobs {
    fn settings(&self) -> DeviceSettings {
        NicKnobs::settings(self)
    }

    fn limits(&self) -> crate::control::Limits {
        crate::control::Limits::synthetic()
    }

    fn apply(&self, target: &DeviceSettings) -> Result<(), crate::control::ControlError> {
        crate::control::Tunable::apply(&self.live, target)
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
    /// Malformed messages from the guest (bad requests, and the violation that broke the
    /// channel, if any).
    pub guest_errors: AtomicU64,
    /// The most packets the host held at once for the inbound ring (tx completions and rx
    /// packets it could not write yet). Never above `send_sections + recv_sections`.
    pub queue_peak: AtomicU64,
    /// Times the host stopped reading the guest's requests because that bound was reached (it
    /// resumes when the guest makes room in the inbound ring).
    pub throttled: AtomicU64,
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

/// Sleeps on `fds` (entries with fd -1 are ignored) for at most `timeout`, with microsecond
/// precision (ppoll: moderation deadlines are tens of microseconds). Returns the revents.
fn sleep_on(fds: &mut [libc::pollfd], timeout: Duration) -> Result<(), NicError> {
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

#[cfg(test)]
mod tests;
