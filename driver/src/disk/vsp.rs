//! The host's disk service (VSP): validates each request, runs it against the backing file on a
//! small pool of worker threads that read and write the shared slots directly, and sends the
//! completions back under interrupt moderation.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::proto::{DiskCompletion, DiskRequest, OP_SWITCH_CHANNEL, SECTOR, SWITCH_TAG};
use super::{Backing, DiskError, DiskLive, DiskOptions, SLOT_ALIGN};
use crate::channel::{ChannelError, HostEnd, SharedArea, WaitResult};
use crate::ring::{PacketHeader, WriteOutcome, PACKET_TYPE_COMPLETION, PACKET_TYPE_INBAND};
use crate::settings::{DeviceSettings, Knob};
use crate::trace::{self, DIR_HOST_TO_GUEST, OP_FLUSH, OP_READ, OP_WRITE};
use enlight_vmbus::moderation::{Moderation, ModerationKnobs};
use enlight_vmbus::switch::{self, SWITCH_ACK_TIMEOUT};

/// Counters of a host service.
#[derive(Debug, Default)]
pub struct VspStats {
    /// Requests received.
    pub requests: AtomicU64,
    /// Requests completed with an error status (invalid or failed I/O).
    pub errors: AtomicU64,
    /// Host → guest signals sent.
    pub interrupts: AtomicU64,
    /// Times the completion ring was full.
    pub ring_full: AtomicU64,
    /// The most requests the service held at once: handed to its workers or completed and
    /// queued for the inbound ring. Never above the queue bound (`DiskOptions::queue_slots`).
    pub queue_peak: AtomicU64,
    /// Times the service stopped reading the guest's requests because that bound was reached
    /// (it resumes when the guest reads its completions and the workers finish).
    pub throttled: AtomicU64,
}

struct Job {
    tag: u64,
    req: DiskRequest,
    /// The shared area of the channel the request came on (a resize replaces it).
    area: SharedArea,
}

struct Done {
    tag: u64,
    completion: DiskCompletion,
}

/// Checks a request against the disk and the shared area; `Err(errno)` completes it with that
/// status.
fn validate(req: &DiskRequest, capacity: u64, area_len: usize, max_io: u32) -> Result<(), u32> {
    match req.op {
        OP_FLUSH => return Ok(()),
        OP_READ | OP_WRITE => {}
        _ => return Err(libc::EOPNOTSUPP as u32),
    }
    let bytes = req.sectors as u64 * SECTOR as u64;
    let in_area = req
        .buf_offset
        .checked_add(req.buf_len as u64)
        .is_some_and(|end| end <= area_len as u64);
    let on_disk = req
        .lba
        .checked_add(req.sectors as u64)
        .is_some_and(|end| end <= capacity);
    if req.sectors == 0 || bytes != req.buf_len as u64 || req.buf_len > max_io || !in_area {
        return Err(libc::EINVAL as u32);
    }
    if !req.buf_offset.is_multiple_of(SLOT_ALIGN as u64) {
        return Err(libc::EINVAL as u32);
    }
    if !on_disk {
        return Err(libc::ERANGE as u32);
    }
    Ok(())
}

/// What the service does with one packet from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuestPacket {
    /// Move to the channel the guest offered (a ring resize).
    Switch,
    /// A valid request: hand it to the workers.
    Io(DiskRequest),
    /// A request with bad arguments: complete it at once with this status.
    Reject(u32),
}

/// Decides what one packet from the guest is, from our own copy of it (`payload` was copied
/// out of the ring once). `Err` is a packet the guest cannot legally send at all (not a
/// request, or a request that does not decode), which ends the service.
pub(crate) fn classify(
    h: &PacketHeader,
    payload: &[u8],
    capacity: u64,
    area_len: usize,
    options: DiskOptions,
) -> Result<GuestPacket, String> {
    if h.ty != PACKET_TYPE_INBAND {
        return Err(format!(
            "packet type {} (tag {:#x}) where a request was expected",
            h.ty, h.trans_id
        ));
    }
    let Some(req) = DiskRequest::decode(payload) else {
        return Err(format!(
            "a request of {} bytes (tag {:#x}) does not decode",
            payload.len(),
            h.trans_id
        ));
    };
    if h.trans_id == SWITCH_TAG && req.op == OP_SWITCH_CHANNEL {
        return Ok(GuestPacket::Switch);
    }
    Ok(
        match validate(&req, capacity, area_len, options.max_io_bytes) {
            Ok(()) => GuestPacket::Io(req),
            Err(status) => GuestPacket::Reject(status),
        },
    )
}

pub(crate) fn do_io(file: &File, area: &SharedArea, req: &DiskRequest) -> DiskCompletion {
    if req.op == OP_FLUSH {
        // SAFETY: plain syscall on an open file.
        let rc = unsafe { libc::fdatasync(file.as_raw_fd()) };
        let status = if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO) as u32
        };
        return DiskCompletion { status, bytes: 0 };
    }
    let mut done = 0usize;
    let len = req.buf_len as usize;
    while done < len {
        // SAFETY: validate() checked buf_offset + buf_len lies inside the shared area, which stays
        // mapped while `area` is held; the guest must not touch a slot while its request is in
        // flight, and if a hostile guest does, it only corrupts its own data.
        let ptr = unsafe { area.as_ptr().add(req.buf_offset as usize + done) };
        let off = (req.lba * SECTOR as u64 + done as u64) as libc::off_t;
        // SAFETY: ptr..ptr+len-done is inside the mapping (see above).
        let n = unsafe {
            if req.op == OP_READ {
                libc::pread(file.as_raw_fd(), ptr.cast(), len - done, off)
            } else {
                libc::pwrite(file.as_raw_fd(), ptr.cast(), len - done, off)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return DiskCompletion {
                status: e.raw_os_error().unwrap_or(libc::EIO) as u32,
                bytes: done as u32,
            };
        }
        if n == 0 {
            return DiskCompletion {
                status: libc::EIO as u32,
                bytes: done as u32,
            };
        }
        done += n as usize;
    }
    DiskCompletion {
        status: 0,
        bytes: done as u32,
    }
}

fn wake_fd() -> Result<Arc<OwnedFd>, DiskError> {
    // SAFETY: plain syscall; the fd is owned by us on success.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(ChannelError::Os {
            what: "eventfd",
            source: std::io::Error::last_os_error(),
        }
        .into());
    }
    // SAFETY: fresh fd owned by nobody else.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn poke(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a local to an eventfd we hold open; a full counter (EAGAIN)
    // already means "woken".
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Serves the host end of a disk channel from `backing` until `stop` is set or the guest's
/// process is gone. Returns an error when the guest breaks the ring protocol.
///
/// Moderation is read from `control`'s live settings on every pass. A channel switch request
/// (a ring resize, see [`live`](super::live)) moves the service to the host end the guest put
/// in the hand-over slot of the same [`DiskLive`].
pub fn serve(
    host: HostEnd,
    backing: Backing,
    dev: u32,
    options: DiskOptions,
    control: VspControl,
) -> Result<(), DiskError> {
    Vsp::start(host, backing, dev, options, control)?.run()
}

/// The host service while it runs: its channel, its worker pool, what it holds for the guest,
/// and one method per step of a pass ([`Vsp::pass`]).
struct Vsp {
    host: HostEnd,
    dev: u32,
    options: DiskOptions,
    capacity: u64,
    control: VspControl,
    /// Jobs for the workers; `None` once they were told to stop.
    job_tx: Option<mpsc::Sender<Job>>,
    done_rx: mpsc::Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    moderation: Moderation,
    /// Requests handed to the workers and not yet back.
    in_flight: usize,
    /// Completions waiting for room in the inbound ring, in the order they finished.
    outq: VecDeque<Done>,
    buf: Vec<u8>,
    /// The last write found the inbound ring full (counted once per episode).
    blocked_on_full: bool,
    /// Requests held at once (in flight plus completions queued for the inbound ring) before
    /// the service stops reading the outbound ring: a guest driver never has more than its
    /// slots in flight, so this never holds back a well-behaved guest, and no guest can make
    /// the service queue more, whether or not it reads its completions.
    queue_bound: usize,
    /// The bound was reached: the service is not reading the guest's requests.
    throttled: bool,
}

impl Vsp {
    /// Starts `options.workers` I/O threads on `backing`.
    fn start(
        host: HostEnd,
        backing: Backing,
        dev: u32,
        options: DiskOptions,
        control: VspControl,
    ) -> Result<Vsp, DiskError> {
        let file = Arc::new(backing.file);
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let mut workers = Vec::new();
        for i in 0..options.workers.max(1) {
            let (job_rx, done_tx, file, wake) = (
                Arc::clone(&job_rx),
                done_tx.clone(),
                Arc::clone(&file),
                Arc::clone(&control.wake),
            );
            workers.push(
                std::thread::Builder::new()
                    .name(format!("vsp-io-{i}"))
                    .spawn(move || loop {
                        let job = match job_rx.lock().expect("job queue lock").recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        };
                        let completion = do_io(&file, &job.area, &job.req);
                        if done_tx
                            .send(Done {
                                tag: job.tag,
                                completion,
                            })
                            .is_err()
                        {
                            return;
                        }
                        poke(&wake);
                    })
                    .map_err(|e| DiskError::Backing {
                        path: "worker thread".into(),
                        source: e,
                    })?,
            );
        }
        Ok(Vsp {
            host,
            dev,
            options,
            capacity: backing.capacity_sectors,
            control,
            job_tx: Some(job_tx),
            done_rx,
            workers,
            moderation: Moderation::new(),
            in_flight: 0,
            outq: VecDeque::new(),
            buf: Vec::with_capacity(64),
            blocked_on_full: false,
            queue_bound: options.queue_slots.max(1) as usize,
            throttled: false,
        })
    }

    /// Passes and sleeps until stopped, the guest's process is gone, or an error; then stops
    /// the workers and traces the last signalling events.
    fn run(mut self) -> Result<(), DiskError> {
        let result = loop {
            if self.control.stop.load(Ordering::Acquire) {
                break Ok(());
            }
            // Read once per pass: the control socket may change them at any time.
            let knobs = ModerationKnobs {
                frames: self.control.live.knob(Knob::ModerationFrames),
                usecs: self.control.live.knob(Knob::ModerationUsecs),
            };
            if let Err(e) = self.pass(knobs) {
                break Err(e);
            }
            match self.sleep(knobs) {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        drop(self.job_tx.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        // The last interrupts may follow the guest's last io_reap hit: trace what is left.
        trace::io_reap(self.dev, &[], Some(&self.control.live.signals));
        result
    }

    /// One pass: every step once, in order.
    fn pass(&mut self, knobs: ModerationKnobs) -> Result<(), DiskError> {
        self.read_requests()?;
        self.collect_completions();
        self.write_completions()?;
        self.moderate(knobs)
    }

    /// Step 1: requests from the guest, until the ring is empty or the queue bound is reached:
    /// valid ones go to the workers, invalid ones get an error completion, a switch request
    /// moves the service to the offered channel. A packet the guest cannot legally send ends
    /// the service.
    fn read_requests(&mut self) -> Result<(), DiskError> {
        // A handle of our own: the switch step below borrows the whole service.
        let stats = Arc::clone(&self.control.stats);
        loop {
            if self.in_flight + self.outq.len() >= self.queue_bound {
                // Resumed once the workers finish and the guest reads its completions.
                if !self.throttled {
                    self.throttled = true;
                    stats.throttled.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
            self.throttled = false;
            let Some(h) = self.host.rx.read_into(&mut self.buf)? else {
                break;
            };
            let packet = classify(
                &h,
                &self.buf,
                self.capacity,
                self.host.extra.len(),
                self.options,
            )
            .map_err(|why| {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                DiskError::GuestProtocol(why)
            })?;
            match packet {
                GuestPacket::Switch => self.switch_channel()?,
                GuestPacket::Io(req) => {
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    self.in_flight += 1;
                    self.job_tx
                        .as_ref()
                        .expect("workers run while serving")
                        .send(Job {
                            tag: h.trans_id,
                            req,
                            area: self.host.extra.clone(),
                        })
                        .expect("workers outlive the loop")
                }
                GuestPacket::Reject(status) => {
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    self.outq.push_back(Done {
                        tag: h.trans_id,
                        completion: DiskCompletion { status, bytes: 0 },
                    });
                }
            }
        }
        if self.host.rx.commit().signal_writer {
            self.interrupt(0)?;
        }
        self.control
            .stats
            .queue_peak
            .fetch_max((self.in_flight + self.outq.len()) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// A switch request (every earlier request is read): acknowledges it on the old channel,
    /// and moves to the offered one if nothing is held for the guest.
    fn switch_channel(&mut self) -> Result<(), DiskError> {
        // Everything earlier is read; it must all be completed too.
        let idle = self.in_flight == 0 && self.outq.is_empty();
        // Always taken (an offer over a socket must not linger), used only if idle.
        let offered = self.control.live.take_offer();
        let status = switch::ack_status(offered.is_some(), idle);
        let next = offered.filter(|_| idle);
        write_switch_ack(&mut self.host, status)?;
        self.interrupt(0)?;
        match next {
            Some(next) => {
                self.host.rx.commit();
                self.host = next;
                self.moderation.clear();
                self.blocked_on_full = false;
            }
            None => {
                self.control.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Step 2: completions from the workers, in the order they finished.
    fn collect_completions(&mut self) {
        while let Ok(done) = self.done_rx.try_recv() {
            self.in_flight -= 1;
            if done.completion.status != 0 {
                self.control.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            self.outq.push_back(done);
        }
    }

    /// Step 3: completion packets into the inbound ring, until it is full.
    fn write_completions(&mut self) -> Result<(), DiskError> {
        while let Some(done) = self.outq.front() {
            match self.host.tx.try_write(
                PACKET_TYPE_COMPLETION,
                0,
                done.tag,
                &[&done.completion.encode()],
            )? {
                WriteOutcome::Written { signal, .. } => {
                    self.outq.pop_front();
                    self.blocked_on_full = false;
                    self.moderation.wrote(signal);
                }
                WriteOutcome::Full { needed } => {
                    if !self.blocked_on_full {
                        self.control.stats.ring_full.fetch_add(1, Ordering::Relaxed);
                        trace::ring_full(
                            self.dev,
                            DIR_HOST_TO_GUEST,
                            needed,
                            &self.control.live.signals,
                        );
                        self.blocked_on_full = true;
                    }
                    break;
                }
            }
        }
        Ok(())
    }

    /// Step 4: interrupt moderation (see [`Moderation::fire`]).
    fn moderate(&mut self, knobs: ModerationKnobs) -> Result<(), DiskError> {
        if let Some(used) = self
            .moderation
            .fire(&mut self.host.tx, knobs, Instant::now())?
        {
            self.interrupt(used)?;
        }
        Ok(())
    }

    /// Signals the guest, `used` bytes being in the inbound ring (0 where not measured).
    fn interrupt(&mut self, used: u32) -> Result<(), DiskError> {
        // Count before signalling: a woken guest may read the counter at once.
        self.control
            .stats
            .interrupts
            .fetch_add(1, Ordering::Relaxed);
        self.host.to_guest.signal()?;
        trace::signal(
            self.dev,
            DIR_HOST_TO_GUEST,
            used,
            &self.control.live.signals,
        );
        Ok(())
    }

    /// Step 5: unless there is more to do at once, sleeps until the guest signals, a worker
    /// finishes, the moderation timer fires, or 100 ms. Returns false once the guest's process
    /// is gone.
    fn sleep(&mut self, knobs: ModerationKnobs) -> Result<bool, DiskError> {
        let timeout = match self.moderation.deadline(knobs.usecs) {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_millis(100),
        };
        let wake = &self.control.wake;
        let mut fds = [
            libc::pollfd {
                fd: self.host.from_guest.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Throttled, it sleeps until a worker finishes or the guest makes room (the guest's
        // commit signals because a full write set pending_send_sz), whatever waits in the ring.
        let more_requests = !self.throttled && self.host.rx.has_data().unwrap_or(true);
        let busy = more_requests || (!self.outq.is_empty() && !self.blocked_on_full);
        if busy {
            return Ok(true);
        }
        // ppoll, not poll: the moderation timer is in microseconds and poll's milliseconds
        // would stretch a 50 us deadline to 1 ms.
        let timeout = timeout.min(Duration::from_millis(100));
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: fds is a valid array of two pollfds, ts a valid timespec, no signal mask.
        unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if fds[0].revents & libc::POLLIN != 0 {
            self.host.from_guest.drain()?;
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into a local from our non-blocking eventfd.
            unsafe { libc::read(wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
        // Only when idle: a busy loop need not pay a poll per pass to learn the peer died.
        Ok(self.host.from_guest.wait(Duration::ZERO)? != WaitResult::PeerGone)
    }
}

/// Writes the acknowledgement of a channel switch request into the (old) inbound ring. The
/// guest is reading that ring while it waits, so room appears soon if there is none.
fn write_switch_ack(host: &mut HostEnd, status: u32) -> Result<(), DiskError> {
    let deadline = Instant::now() + SWITCH_ACK_TIMEOUT;
    let ack = DiskCompletion { status, bytes: 0 };
    loop {
        match host
            .tx
            .try_write(PACKET_TYPE_COMPLETION, 0, SWITCH_TAG, &[&ack.encode()])?
        {
            WriteOutcome::Written { .. } => return Ok(()),
            WriteOutcome::Full { .. } if Instant::now() < deadline => {
                host.to_guest.signal()?;
                host.from_guest.wait(Duration::from_millis(1))?;
            }
            WriteOutcome::Full { .. } => {
                return Err(DiskError::GuestProtocol(
                    "the guest never made room for the channel switch acknowledgement".into(),
                ))
            }
        }
    }
}

/// How a host service is stopped, observed and tuned from outside its thread.
#[derive(Clone)]
pub struct VspControl {
    stop: Arc<AtomicBool>,
    stats: Arc<VspStats>,
    wake: Arc<OwnedFd>,
    pub(super) live: Arc<DiskLive>,
}

impl VspControl {
    /// A fresh control block (stop flag clear, counters zero, default settings).
    pub fn new() -> Result<VspControl, DiskError> {
        VspControl::with_settings(DeviceSettings::default())
    }

    /// A fresh control block whose live settings start at `settings`.
    pub fn with_settings(settings: DeviceSettings) -> Result<VspControl, DiskError> {
        Ok(VspControl {
            stop: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(VspStats::default()),
            wake: wake_fd()?,
            live: Arc::new(DiskLive::new(settings)),
        })
    }

    /// The live settings the service reads (shared with the guest driver and the control socket).
    pub fn live(&self) -> &Arc<DiskLive> {
        &self.live
    }

    /// Asks the service to stop and wakes it.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        poke(&self.wake);
    }

    /// The service's counters.
    pub fn stats(&self) -> &VspStats {
        &self.stats
    }
}

/// The host service running on threads of this process.
pub struct VspHandle {
    pub(super) control: VspControl,
    pub(super) thread: Option<JoinHandle<Result<(), DiskError>>>,
}

impl VspHandle {
    /// The service's counters.
    pub fn stats(&self) -> &VspStats {
        self.control.stats()
    }

    /// Stops the service and returns how it ended.
    pub fn stop(mut self) -> Result<(), DiskError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), DiskError> {
        self.control.request_stop();
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(DiskError::Protocol("host service panicked".into()))),
            None => Ok(()),
        }
    }
}

impl Drop for VspHandle {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}
