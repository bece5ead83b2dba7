//! The host's NIC service (VSP).

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::proto::{
    GuestMessage, NicCompletion, RxPacket, RxPost, TxRequest, ETH_HLEN, MAX_MESSAGE,
};
use super::{
    io_err, pollfd, sleep_on, FrameIo, NicError, NicHostStats, NicKnobs, NicOptions, HOST_PASS,
    SWITCH_ACK_TIMEOUT,
};
use crate::channel::HostEnd;
use crate::disk::SWITCH_TAG;
use crate::ring::{
    WriteOutcome, FLAG_COMPLETION_REQUESTED, PACKET_TYPE_COMPLETION, PACKET_TYPE_INBAND,
    PACKET_TYPE_TRANSFER_PAGES,
};
use crate::settings::Knob;
use crate::trace::{self, DIR_HOST_TO_GUEST};
use enlight_vmbus::moderation::{Moderation, ModerationKnobs};
use enlight_vmbus::switch;

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
    /// Of the host → guest path, as the disk's.
    moderation: Moderation,
    msg: Vec<u8>,
    frame: Vec<u8>,
    /// The guest's protocol violation that broke the channel: every later turn fails with it.
    broken: Option<String>,
    /// Packets held for the inbound ring at which the host stops reading the guest's requests.
    queue_bound: usize,
    /// The bound was reached: the host is not reading the guest's requests.
    throttled: bool,
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
        // A service in the guest driver's process takes new channels from the hand-over slot.
        knobs.live.host_attached.store(true, Ordering::Release);
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
            moderation: Moderation::new(),
            msg: Vec::with_capacity(MAX_MESSAGE as usize),
            frame: vec![0; opts.section_bytes as usize + 1],
            broken: None,
            // A well-behaved guest has at most every send section in flight and every receive
            // section filled, so it is never held back; no guest can make the host hold more.
            queue_bound: (opts.send_sections + opts.recv_sections) as usize,
            throttled: false,
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

    /// A packet the guest cannot legally send: counted, and the channel is broken for good.
    fn violation(&mut self, why: String) -> NicError {
        self.stats.guest_errors.fetch_add(1, Ordering::Relaxed);
        log::warn!("nic{}: protocol violation by the guest: {why}", self.dev);
        self.broken = Some(why.clone());
        NicError::GuestProtocol(why)
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
            self.stats
                .queue_peak
                .fetch_max(self.outq.len() as u64, Ordering::Relaxed);
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

    fn handle_post(&mut self, post: RxPost) -> Result<(), NicError> {
        let end = post.first.checked_add(post.count);
        if end.is_none_or(|e| e > self.opts.recv_sections) {
            return Err(self.violation(format!("{post:?} outside the receive buffer")));
        }
        let sections = post.first..post.first + post.count;
        if let Some(s) = sections
            .clone()
            .find(|&s| self.rx[s as usize] != RxSection::Guest)
        {
            return Err(self.violation(format!("section {s} posted twice")));
        }
        for s in sections {
            self.rx[s as usize] = RxSection::Posted;
            self.posted.push_back(s);
        }
        Ok(())
    }

    fn handle_return(&mut self, trans_id: u64) -> Result<(), NicError> {
        let section = (trans_id & 0xffff_ffff) as usize;
        let generation = (trans_id >> 32) as u32;
        match self.rx.get(section) {
            Some(RxSection::InFlight(g)) if *g == generation => {
                self.rx[section] = RxSection::Posted;
                self.posted.push_back(section as u32);
                Ok(())
            }
            _ => Err(self.violation(format!(
                "return of unknown rx {trans_id:#x} (a completion for a tag not in flight)"
            ))),
        }
    }

    /// Handles up to one pass of the guest's packets; returns how many. Stops early, without
    /// reading, while the packets held for the inbound ring are at the bound: they are the
    /// guest's to read first.
    fn guest_pass(&mut self) -> Result<usize, NicError> {
        let mut n = 0;
        while n < HOST_PASS {
            if self.outq.len() >= self.queue_bound {
                if !self.throttled {
                    self.throttled = true;
                    self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
            self.throttled = false;
            let Some(h) = self.end.rx.read_into(&mut self.msg)? else {
                break;
            };
            n += 1;
            // A request with bad arguments is answered with an error status; a packet the
            // guest cannot legally send at all breaks the channel.
            match (h.ty, GuestMessage::decode(&self.msg)) {
                (PACKET_TYPE_INBAND, Some(GuestMessage::Tx(req))) => {
                    self.handle_tx(h.trans_id, h.flags, req)
                }
                (PACKET_TYPE_INBAND, Some(GuestMessage::RxPost(post))) => self.handle_post(post)?,
                (PACKET_TYPE_INBAND, Some(GuestMessage::Switch)) if h.trans_id == SWITCH_TAG => {
                    // Every earlier request is handled; what follows is on the new channel.
                    self.end.rx.commit();
                    self.switch_channel()?;
                }
                (PACKET_TYPE_INBAND, Some(GuestMessage::Switch)) => {
                    return Err(self.violation(format!(
                        "a switch request with tag {:#x} instead of the switch tag",
                        h.trans_id
                    )))
                }
                (PACKET_TYPE_INBAND, None) => {
                    return Err(self.violation(format!(
                        "a message of {} bytes (tag {:#x}) does not decode",
                        self.msg.len(),
                        h.trans_id
                    )))
                }
                (PACKET_TYPE_COMPLETION, _) => self.handle_return(h.trans_id)?,
                (ty, _) => {
                    return Err(self.violation(format!(
                        "packet type {ty} (tag {:#x}) from the guest",
                        h.trans_id
                    )))
                }
            }
        }
        if self.end.rx.commit().signal_writer {
            self.interrupt(0)?;
        }
        Ok(n)
    }

    /// The guest asked to move to the channel it offered (a ring resize). Everything owed on the
    /// old inbound ring (tx completions, rx packets) is written there first, then the
    /// acknowledgement, so the guest meets them all before it. On success the host gives every
    /// receive section back (the guest posts them again on the new channel) and continues there;
    /// frames that reach the backend meanwhile wait in its queue. With nothing offered it refuses
    /// (`EPROTO`) and stays where it is.
    fn switch_channel(&mut self) -> Result<(), NicError> {
        let next = self.knobs.live.take_offer();
        // Idle by construction: whatever the host owes goes out before the acknowledgement.
        let status = switch::ack_status(next.is_some(), true);
        let mut ack = [0u8; 24];
        ack[..8].copy_from_slice(&NicCompletion { status, len: 0 }.encode());
        self.outq
            .push_back((PACKET_TYPE_COMPLETION, 0, SWITCH_TAG, ack, 8));
        let deadline = Instant::now() + SWITCH_ACK_TIMEOUT;
        loop {
            self.write_inbound()?;
            if self.outq.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(NicError::Switch(format!(
                    "the guest made no room in the inbound ring for {SWITCH_ACK_TIMEOUT:?}"
                )));
            }
            // The guest is reading while it waits: wake it and wait a little for room.
            self.interrupt(0)?;
            self.end.from_guest.wait(Duration::from_millis(1))?;
        }
        // Always signal: the guest waits for the acknowledgement whatever the ring's state.
        self.moderation.clear();
        self.interrupt(0)?;
        let Some(mut next) = next else {
            self.guest_error(format_args!("channel switch with no channel offered"));
            return Ok(());
        };
        next.rx.set_max_payload(MAX_MESSAGE);
        self.end = next;
        self.rx.iter_mut().for_each(|s| *s = RxSection::Guest);
        self.posted.clear();
        self.blocked_on_full = false;
        Ok(())
    }

    fn interrupt(&mut self, used: u32) -> Result<(), NicError> {
        // Count before signalling: a woken guest may read the counter at once.
        self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
        self.end.to_guest.signal()?;
        trace::signal(self.dev, DIR_HOST_TO_GUEST, used, &self.knobs.live.signals);
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
                    self.moderation.wrote(signal);
                    n += 1;
                }
                WriteOutcome::Full { needed } => {
                    if !self.blocked_on_full {
                        self.stats.ring_full.fetch_add(1, Ordering::Relaxed);
                        trace::ring_full(
                            self.dev,
                            DIR_HOST_TO_GUEST,
                            needed,
                            &self.knobs.live.signals,
                        );
                        self.blocked_on_full = true;
                    }
                    break;
                }
            }
        }
        Ok(n)
    }

    fn moderation_deadline(&self) -> Option<Instant> {
        self.moderation
            .deadline(self.knobs.knob(Knob::ModerationUsecs))
    }

    fn moderate(&mut self) -> Result<(), NicError> {
        let knobs = ModerationKnobs {
            frames: self.knobs.knob(Knob::ModerationFrames),
            usecs: self.knobs.knob(Knob::ModerationUsecs),
        };
        if let Some(used) = self
            .moderation
            .fire(&mut self.end.tx, knobs, Instant::now())?
        {
            self.interrupt(used)?;
        }
        Ok(())
    }

    /// One turn of the service; sleeps when there was nothing to do (until the guest signals, a
    /// frame waits in the backend while a section is posted, `wake_fd` is readable, the
    /// moderation timer, or `timeout`). Returns whether it did any work.
    ///
    /// A packet the guest cannot legally send is [`NicError::GuestProtocol`] (a broken ring
    /// [`NicError::Ring`]), and every later turn [`NicError::Broken`]: once either ring broke,
    /// the other is not used either.
    pub fn poll_once(&mut self, wake_fd: RawFd, timeout: Duration) -> Result<bool, NicError> {
        if let Some(why) = &self.broken {
            return Err(NicError::Broken(why.clone()));
        }
        self.poll_once_inner(wake_fd, timeout).inspect_err(|e| {
            if let NicError::Ring(ring) = e {
                self.broken = Some(ring.to_string());
            }
        })
    }

    fn poll_once_inner(&mut self, wake_fd: RawFd, timeout: Duration) -> Result<bool, NicError> {
        let from_guest = self.guest_pass()?;
        let written = self.write_inbound()?;
        let received = self.backend_pass()?;
        self.moderate()?;
        // Throttled, requests waiting in the ring are no work: sleep until the guest makes room
        // (its commit signals, since the full write set pending_send_sz).
        let more_requests = !self.throttled && self.end.rx.has_data()?;
        if from_guest + written + received > 0 || more_requests {
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

    /// Runs until `stop` is set or the guest breaks the ring, sleeping at most `idle` at a time
    /// when there is nothing to do (the device passes `IDLE_POLL`, 100 ms; everything that gives
    /// this side work wakes it sooner).
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        wake_fd: RawFd,
        idle: Duration,
    ) -> Result<(), NicError> {
        let mut result = Ok(());
        while !stop.load(Ordering::Acquire) {
            if let Err(e) = self.poll_once(wake_fd, idle) {
                result = Err(e);
                break;
            }
        }
        // The last interrupts may follow the guest's last io_reap hit: trace what is left.
        trace::io_reap(self.dev, &[], Some(&self.knobs.live.signals));
        result
    }
}
