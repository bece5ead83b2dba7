//! The guest's NIC driver (VSC).

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::proto::{self, NicCompletion, RxPacket, RxPost, TxRequest, ETH_HLEN, MAX_MESSAGE};
use super::{
    io_err, pollfd, sleep_on, FrameIo, NicError, NicGuestStats, NicKnobs, NicOptions, HOST_PASS,
    TRACE_FLUSH,
};
use crate::channel::GuestEnd;
use crate::ring::{
    PacketHeader, WriteOutcome, FLAG_COMPLETION_REQUESTED, PACKET_TYPE_COMPLETION,
    PACKET_TYPE_INBAND, PACKET_TYPE_TRANSFER_PAGES,
};
use crate::trace::{self, CompletionRecord, ReapBatch, DIR_GUEST_TO_HOST, OP_RX, OP_TX};
use enlight_vmbus::poll::{AfterPass, Napi};
use enlight_vmbus::switch::{self, SwitchFailure, SwitchGuest};

#[derive(Clone, Copy, Default)]
struct TxSlot {
    busy: bool,
    generation: u32,
    len: u32,
    submit_ns: u64,
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
    napi: Napi,
    msg: Vec<u8>,
    frame: Vec<u8>,
    records: ReapBatch,
    /// The host's protocol violation that broke the channel: every later turn fails with it.
    broken: Option<String>,
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
            napi: Napi::new(),
            msg: Vec::with_capacity(MAX_MESSAGE as usize),
            frame: vec![0; opts.section_bytes as usize + 1],
            records: ReapBatch::new(),
            broken: None,
        })
    }

    /// Tx frames in flight.
    pub fn tx_outstanding(&self) -> usize {
        self.tx_slots.len() - self.tx_free.len() + self.pending_tx.is_some() as usize
    }

    /// Fires `io_reap` with the completions gathered since the last hit, if any (see
    /// `DiskVsc::flush_trace`: every completion is traced exactly once).
    pub fn flush_trace(&mut self) {
        // Also with no completions: the signalling events counted since the last hit go too.
        trace::io_reap(
            self.dev,
            self.records.records(),
            Some(&self.knobs.live.signals),
        );
        if !self.records.records().is_empty() {
            self.stats.latency.record(self.records.records());
        }
        self.records.clear();
    }

    fn record(&mut self, rec: CompletionRecord) {
        if self.records.is_full() {
            self.flush_trace();
        }
        self.records.push(rec);
    }

    fn doorbell(&mut self, bytes_used: u32) -> Result<(), NicError> {
        self.stats.doorbells.fetch_add(1, Ordering::Relaxed);
        self.end.to_host.signal()?;
        trace::signal(
            self.dev,
            DIR_GUEST_TO_HOST,
            bytes_used,
            &self.knobs.live.signals,
        );
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
                    trace::ring_full(
                        self.dev,
                        DIR_GUEST_TO_HOST,
                        needed,
                        &self.knobs.live.signals,
                    );
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
        if self.records.stale() {
            self.flush_trace();
        }
        Ok(reaped)
    }

    fn set_masked(&mut self, masked: bool) {
        if self.napi.set_masked(&self.end.rx, masked) {
            trace::irq_mask(self.dev, masked, &self.knobs.live.signals);
        }
    }

    /// Performs a posted ring resize, if any. Called between passes, when no frame is half
    /// handled. A failure before the host took the new channel leaves the old one in use and is
    /// reported to the requester; a broken protocol during the switch breaks the device.
    fn resize_if_requested(&mut self) -> Result<(), NicError> {
        if !self.knobs.live.resize_pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let from = (
            self.end.config.out_ring_bytes as u32,
            self.end.config.in_ring_bytes as u32,
        );
        let knobs = Arc::clone(&self.knobs);
        knobs
            .live
            .run_resize("nic", self.dev, from, Instant::now(), |out, inb| {
                self.switch_channel(out, inb)
            })
    }

    /// Moves both sides to a new channel with rings of `out`/`inb` bytes, and returns when the
    /// host acknowledged. The guest stops taking frames from its backend (they wait in its
    /// queue), offers the new host end, and writes the switch request into the old outbound ring
    /// after every tx request; it then reaps the old inbound ring as usual (tx completions and
    /// rx packets, all of which the host writes before its acknowledgement) until the
    /// acknowledgement. The host then has no tx request in flight and has given back every
    /// receive section: the guest forgets the returns it had not yet sent, posts the whole
    /// receive buffer again on the new channel, and resumes. A frame read from the backend but
    /// not yet requested (`pending_tx`) is copied into the same section of the new area and goes
    /// first. Outer error: fatal; inner: the switch did not happen and the old channel stays.
    fn switch_channel(&mut self, out: u32, inb: u32) -> Result<Result<Instant, String>, NicError> {
        let (guest, host) = match switch::new_channel(&self.end.config, out, inb, MAX_MESSAGE) {
            Ok(ends) => ends,
            Err(e) => return Ok(Err(format!("creating the new channel: {e}"))),
        };
        if let Some((section, len)) = self.pending_tx {
            let at = self.opts.send_offset(section);
            let frame = &mut self.frame[..len as usize];
            self.end
                .extra
                .read_at(at, frame)
                .and_then(|_| guest.extra.write_at(at, frame))
                .ok_or_else(|| NicError::Invalid("send section outside the area".into()))?;
        }
        // Leave polling on the old ring; the new one starts unmasked.
        self.set_masked(false);
        self.knobs.live.offer(host).map_err(NicError::Channel)?;
        let status = switch::request_switch(self, &proto::switch_request())?;
        if status != 0 {
            // The host refused and stays on the old channel, owning what it owned: so do we.
            self.knobs.live.withdraw();
            return Ok(Err(format!(
                "the host refused the channel switch (status {status})"
            )));
        }
        if self.tx_slots.iter().any(|s| s.busy) {
            return Err(NicError::Protocol(
                "the host acknowledged the channel switch with tx requests outstanding".into(),
            ));
        }
        let acked = Instant::now();
        self.end = guest;
        self.rx_posted.iter_mut().for_each(|p| *p = false);
        self.returns.clear();
        self.post_pending = true;
        self.out_full = false;
        self.napi.reset();
        self.flush_returns()?;
        Ok(Ok(acked))
    }

    /// One turn of the driver: reap (NAPI-like), return and post receive sections, send frames;
    /// when there was nothing to do, sleep until the host signals, a frame waits in the backend,
    /// `wake_fd` is readable, or `timeout`. Returns whether it did any work.
    ///
    /// A packet the host cannot legally send is [`NicError::Protocol`] (a broken ring
    /// [`NicError::Ring`]), and every later turn [`NicError::Broken`].
    pub fn poll_once(&mut self, wake_fd: RawFd, timeout: Duration) -> Result<bool, NicError> {
        if let Some(why) = &self.broken {
            return Err(NicError::Broken(why.clone()));
        }
        self.poll_once_inner(wake_fd, timeout)
            .inspect_err(|e| match e {
                NicError::Protocol(why) => self.broken = Some(why.clone()),
                NicError::Ring(ring) => self.broken = Some(ring.to_string()),
                _ => {}
            })
    }

    fn poll_once_inner(&mut self, wake_fd: RawFd, timeout: Duration) -> Result<bool, NicError> {
        self.resize_if_requested()?;
        let n = self.reap_pass()?;
        let returned = self.flush_returns()?;
        let sent = self.pump_tx()?;
        let (dev, signals) = (self.dev, &self.knobs.live.signals);
        match self
            .napi
            .after_pass(&mut self.end.rx, n, self.knobs.budget(), |masked| {
                trace::irq_mask(dev, masked, signals)
            })? {
            // Busy (interrupts now masked), or a packet raced in while they were: it raised no
            // signal, so look again without sleeping.
            AfterPass::Busy | AfterPass::Raced => return Ok(true),
            AfterPass::Settled => {}
        }
        if n + returned + sent > 0 {
            return Ok(true);
        }
        let flush_in = match self.records.age() {
            Some(age) => {
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
            pollfd(self.knobs.wake_fd()),
        ];
        sleep_on(&mut fds, flush_in)?;
        if fds[0].revents & libc::POLLIN != 0 {
            self.end.from_host.drain()?;
        }
        if fds[3].revents & libc::POLLIN != 0 {
            // The request itself is read at the start of the next turn.
            self.knobs.clear_wake();
        }
        Ok(false)
    }

    /// Runs until `stop` is set (then traces what is left) or an error, sleeping at most `idle`
    /// at a time when there is nothing to do (the device passes `IDLE_POLL`, 100 ms; everything
    /// that gives this side work wakes it sooner).
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        wake_fd: RawFd,
        idle: Duration,
    ) -> Result<(), NicError> {
        let result = loop {
            if stop.load(Ordering::Acquire) {
                break Ok(());
            }
            if let Err(e) = self.poll_once(wake_fd, idle) {
                break Err(e);
            }
        };
        self.flush_trace();
        result
    }
}

/// The NIC's side of the channel switch: while it waits for the acknowledgement, tx completions
/// and rx packets the host wrote before it are handled as in any pass.
impl<F: FrameIo> SwitchGuest for NicVsc<F> {
    type Error = NicError;

    fn end(&mut self) -> &mut GuestEnd {
        &mut self.end
    }

    fn doorbell(&mut self) -> Result<(), NicError> {
        self.doorbell(0)
    }

    fn packet(&mut self, h: &PacketHeader, payload: &[u8]) -> Result<(), NicError> {
        // The handlers decode the message buffer, as in `reap_pass`.
        self.msg.clear();
        self.msg.extend_from_slice(payload);
        let now = trace::monotonic_ns();
        match h.ty {
            PACKET_TYPE_COMPLETION => self.tx_completion(h.trans_id, now),
            PACKET_TYPE_TRANSFER_PAGES => self.rx_packet(h.trans_id, now),
            ty => Err(NicError::Protocol(format!(
                "packet type {ty} from the host"
            ))),
        }
    }

    fn ack_status(payload: &[u8]) -> Option<u32> {
        NicCompletion::decode(payload).map(|c| c.status)
    }

    fn failed(&mut self, why: SwitchFailure) -> NicError {
        if why == (SwitchFailure::TimedOut { requested: false }) {
            // The request never went out: the host knows nothing; take the offer back.
            self.knobs.live.withdraw();
        }
        NicError::Protocol(why.to_string())
    }
}

impl<F: FrameIo> Drop for NicVsc<F> {
    fn drop(&mut self) {
        self.flush_trace();
    }
}
