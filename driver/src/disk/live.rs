//! Live settings of a synthetic disk: what its guest driver, its host service and its control
//! socket share.
//!
//! Moderation (`frames`, `usecs`) and the polling budget are atomics the VSP and the VSC read on
//! every pass, so a change takes effect within one pass. A ring resize needs both ends to move to
//! a new channel at one instant with nothing in flight, which only the VSC's own thread can
//! arrange: the control thread posts a [`ResizeState::Requested`], the VSC notices it on its next
//! submit or reap, stops submitting (submits report `RingFull`, so a closed-loop caller reaps),
//! reaps until nothing is in flight, creates a channel with the new ring sizes, copies the data
//! slots across, hands the new host end to the VSP through [`DiskLive`]'s hand-over slot, and
//! writes a switch request into the old ring. The VSP, which reads the old ring in order, meets
//! that request after every earlier one, acknowledges it on the old inbound ring and continues on
//! the new channel; the VSC resumes on the new channel when it reads the acknowledgement. No
//! request is in flight during the switch, so none can be lost, duplicated or reordered.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::channel::{self, ChannelError, HostEnd};
use crate::control::{ControlError, Limits, Tunable};
use crate::settings::{DeviceSettings, Knob, LiveSettings};
use crate::trace::SignalCounts;

/// Longest a resize request waits for the driver to start it (it starts once the driver's next
/// submit or reap sees it: a disk with no I/O running never does).
pub const RESIZE_START_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a started resize may take before the requester gives up waiting.
pub const RESIZE_RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// What one ring resize did and how long I/O was held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeReport {
    /// Ring data areas (outbound, inbound) before.
    pub from: (u32, u32),
    /// Ring data areas (outbound, inbound) after.
    pub to: (u32, u32),
    /// From the first refused submit to the last in-flight completion reaped.
    pub drain_ns: u64,
    /// From then until the new channel was live (create, copy, hand over, acknowledge).
    pub switch_ns: u64,
}

impl ResizeReport {
    /// How long no new request could be submitted.
    pub fn stall_ns(&self) -> u64 {
        self.drain_ns + self.switch_ns
    }
}

#[derive(Debug)]
pub(crate) enum ResizeState {
    Idle,
    Requested { out: u32, inb: u32 },
    Running,
    Finished(Result<ResizeReport, String>),
}

/// The live state of one synthetic disk.
pub struct DiskLive {
    pub(crate) settings: LiveSettings,
    pub(crate) resize: Mutex<ResizeState>,
    pub(crate) resize_done: Condvar,
    pub(crate) resize_pending: AtomicBool,
    /// The new host end during a switch, from the VSC to the VSP (both in this process).
    pub(crate) handover: Mutex<Option<HostEnd>>,
    /// When the VSP runs in another process: the hand-off socket the new host end travels on
    /// (memfd and eventfds as `SCM_RIGHTS`), set on both sides.
    pub(crate) handover_socket: Mutex<Option<UnixStream>>,
    /// A host service in this process takes hand-overs (ring resizes are possible).
    pub(crate) host_attached: AtomicBool,
    /// An eventfd raised when a resize is requested, for a driver that sleeps between passes
    /// (the NIC's guest loop waits for frames, not for I/O the caller submits).
    pub(crate) request_wake: OnceLock<Arc<OwnedFd>>,
    /// Signalling events for `io_reap` to carry: both ends of a device in this process count
    /// here (see [`SignalCounts`]).
    pub(crate) signals: SignalCounts,
    last_resize: Mutex<Option<ResizeReport>>,
    resizes: AtomicU64,
    longest_stall_ns: AtomicU64,
}

impl std::fmt::Debug for DiskLive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskLive")
            .field("settings", &self.settings.load())
            .field("resizes", &self.resizes())
            .finish()
    }
}

impl DiskLive {
    /// Live state starting at `settings`, with no host service attached yet.
    pub fn new(settings: DeviceSettings) -> DiskLive {
        DiskLive {
            settings: LiveSettings::new(settings),
            resize: Mutex::new(ResizeState::Idle),
            resize_done: Condvar::new(),
            resize_pending: AtomicBool::new(false),
            handover: Mutex::new(None),
            handover_socket: Mutex::new(None),
            host_attached: AtomicBool::new(false),
            request_wake: OnceLock::new(),
            signals: SignalCounts::default(),
            last_resize: Mutex::new(None),
            resizes: AtomicU64::new(0),
            longest_stall_ns: AtomicU64::new(0),
        }
    }

    /// The settings in force.
    pub fn current(&self) -> DeviceSettings {
        self.settings.load()
    }

    /// One knob in force.
    #[inline]
    pub fn knob(&self, knob: Knob) -> u32 {
        self.settings.get(knob)
    }

    /// Hands new host ends over `sock` (the channel's hand-off socket to the host service's
    /// process) instead of within this process. Set it on the guest's side, where it also
    /// enables ring resizes, and on the host service's side.
    pub fn set_handover_socket(&self, sock: UnixStream) {
        *self.handover_socket.lock().expect("hand-over lock") = Some(sock);
        self.host_attached.store(true, Ordering::Release);
    }

    /// Guest side: offers `host` to the host service (in this process or over the socket).
    pub(crate) fn offer(&self, host: HostEnd) -> Result<(), ChannelError> {
        match &*self.handover_socket.lock().expect("hand-over lock") {
            Some(sock) => host.send_to(sock),
            None => {
                *self.handover.lock().expect("hand-over lock") = Some(host);
                Ok(())
            }
        }
    }

    /// Guest side: withdraws an offer the host refused (an in-process one; one sent over the
    /// socket was consumed by the host, which refused it).
    pub(crate) fn withdraw(&self) {
        self.handover.lock().expect("hand-over lock").take();
    }

    /// Host side: takes the offered host end. Over a socket, the offer is always read (so a
    /// refused one does not linger for the next switch), waiting at most a second for it.
    pub(crate) fn take_offer(&self) -> Option<HostEnd> {
        if let Some(sock) = &*self.handover_socket.lock().expect("hand-over lock") {
            let _ = sock.set_read_timeout(Some(Duration::from_secs(1)));
            let end = channel::receive_host_end(sock);
            let _ = sock.set_read_timeout(None);
            return match end {
                Ok(end) => Some(end),
                Err(e) => {
                    log::warn!("channel switch: no usable host end from the guest: {e}");
                    None
                }
            };
        }
        self.handover.lock().expect("hand-over lock").take()
    }

    /// The guest end sees the host's liveness on the hand-off socket, if there is one.
    pub(crate) fn watch_peer(
        &self,
        guest: &mut crate::channel::GuestEnd,
    ) -> Result<(), ChannelError> {
        match &*self.handover_socket.lock().expect("hand-over lock") {
            Some(sock) => guest.watch_peer(sock),
            None => Ok(()),
        }
    }

    /// Ring resizes completed.
    pub fn resizes(&self) -> u64 {
        self.resizes.load(Ordering::Relaxed)
    }

    /// The last resize's report.
    pub fn last_resize(&self) -> Option<ResizeReport> {
        *self.last_resize.lock().expect("resize report lock")
    }

    /// The longest I/O stall of any resize so far, ns.
    pub fn longest_stall_ns(&self) -> u64 {
        self.longest_stall_ns.load(Ordering::Relaxed)
    }

    /// Called by the VSC when a switch ended (either way).
    pub(crate) fn finish_resize(&self, result: Result<ResizeReport, String>) {
        if let Ok(r) = &result {
            self.settings.set(Knob::RingOutBytes, r.to.0);
            self.settings.set(Knob::RingInBytes, r.to.1);
            *self.last_resize.lock().expect("resize report lock") = Some(*r);
            self.resizes.fetch_add(1, Ordering::Relaxed);
            self.longest_stall_ns
                .fetch_max(r.stall_ns(), Ordering::Relaxed);
        }
        let mut st = self.resize.lock().expect("resize lock");
        *st = ResizeState::Finished(result);
        self.resize_pending.store(false, Ordering::Release);
        self.resize_done.notify_all();
    }

    /// Guest side, at a point where the driver can move: performs a posted resize, if any,
    /// through `switch` (the device's move to rings of `out`/`inb` bytes), and reports the
    /// outcome to the requester. `switch` returns the instant the drain ended and the switch
    /// proper began (the report splits the stall there, counted from `since`), or `Ok(Err(why))`
    /// when the switch did not happen and the old channel stays in use; an outer error is fatal
    /// (the channel broke during the switch) and is returned after the requester was told.
    /// `device` and `dev` name the device in the log.
    pub(crate) fn run_resize<E: std::fmt::Display>(
        &self,
        device: &str,
        dev: u32,
        from: (u32, u32),
        since: Instant,
        switch: impl FnOnce(u32, u32) -> Result<Result<Instant, String>, E>,
    ) -> Result<(), E> {
        let Some((out, inb)) = self.take_request() else {
            return Ok(());
        };
        match switch(out, inb) {
            Err(fatal) => {
                // The channel is broken: tell the requester rather than leave it waiting.
                self.finish_resize(Err(format!("the channel broke during the switch: {fatal}")));
                Err(fatal)
            }
            Ok(Err(why)) => {
                self.finish_resize(Err(why));
                Ok(())
            }
            Ok(Ok(split)) => {
                let report = ResizeReport {
                    from,
                    to: (out, inb),
                    drain_ns: split.duration_since(since).as_nanos() as u64,
                    switch_ns: split.elapsed().as_nanos() as u64,
                };
                log::info!("{device} {dev}: rings resized: {report:?}");
                self.finish_resize(Ok(report));
                Ok(())
            }
        }
    }

    /// Takes a posted request, marking it running (VSC side).
    pub(crate) fn take_request(&self) -> Option<(u32, u32)> {
        let mut st = self.resize.lock().expect("resize lock");
        match *st {
            ResizeState::Requested { out, inb } => {
                *st = ResizeState::Running;
                Some((out, inb))
            }
            _ => None,
        }
    }

    /// Asks the driver to move to rings of `out`/`inb` bytes and waits until it has.
    fn resize(&self, out: u32, inb: u32) -> Result<ResizeReport, ControlError> {
        if !self.host_attached.load(Ordering::Acquire) {
            return Err(ControlError::Unsupported(
                "ring resize needs the host service in the device's process".into(),
            ));
        }
        let mut st = self.resize.lock().expect("resize lock");
        if !matches!(*st, ResizeState::Idle) {
            return Err(ControlError::Busy("a ring resize is in progress".into()));
        }
        *st = ResizeState::Requested { out, inb };
        self.resize_pending.store(true, Ordering::Release);
        if let Some(fd) = self.request_wake.get() {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a local to an eventfd we hold open.
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        let asked = Instant::now();
        loop {
            match &*st {
                ResizeState::Finished(_) => {
                    let ResizeState::Finished(r) = std::mem::replace(&mut *st, ResizeState::Idle)
                    else {
                        unreachable!("matched above")
                    };
                    return r.map_err(|e| {
                        ControlError::Internal(format!(
                            "ring resize failed: {e}; the rings are unchanged"
                        ))
                    });
                }
                ResizeState::Requested { .. } if asked.elapsed() >= RESIZE_START_TIMEOUT => {
                    *st = ResizeState::Idle;
                    self.resize_pending.store(false, Ordering::Release);
                    return Err(ControlError::Busy(format!(
                        "the driver reached no point to switch rings within {:?} (a resize \
                         happens between I/Os: is a workload running?); nothing changed",
                        RESIZE_START_TIMEOUT
                    )));
                }
                ResizeState::Running if asked.elapsed() >= RESIZE_RUN_TIMEOUT => {
                    return Err(ControlError::Internal(format!(
                        "the driver started the ring resize but did not finish it within {:?}",
                        RESIZE_RUN_TIMEOUT
                    )));
                }
                _ => {}
            }
            st = self
                .resize_done
                .wait_timeout(st, Duration::from_millis(50))
                .expect("resize lock")
                .0;
        }
    }
}

impl Tunable for DiskLive {
    fn settings(&self) -> DeviceSettings {
        self.current()
    }

    fn limits(&self) -> Limits {
        Limits::synthetic()
    }

    fn apply(&self, target: &DeviceSettings) -> Result<(), ControlError> {
        let cur = self.current();
        if (cur.ring_out_bytes, cur.ring_in_bytes) != (target.ring_out_bytes, target.ring_in_bytes)
        {
            // First: it is the part that can fail, and then nothing else may change.
            self.resize(target.ring_out_bytes, target.ring_in_bytes)?;
        }
        for k in [
            Knob::ModerationFrames,
            Knob::ModerationUsecs,
            Knob::PollBudget,
        ] {
            self.settings.set(k, k.get(target));
        }
        Ok(())
    }
}
