//! The guest's disk driver (VSC): submits requests into the outbound ring, reaps completions
//! NAPI-style from the inbound ring, and moves to a new channel when a ring resize is posted.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::proto::{DiskCompletion, DiskRequest, MAX_PACKET_PAYLOAD, OP_SWITCH_CHANNEL, SECTOR};
use super::{DiskError, DiskLive};
use crate::channel::{GuestEnd, WaitResult};
use crate::ring::{
    PacketHeader, WriteOutcome, FLAG_COMPLETION_REQUESTED, PACKET_TYPE_COMPLETION,
    PACKET_TYPE_INBAND,
};
use crate::settings::{DeviceSettings, Knob};
use crate::trace::{self, CompletionRecord, ReapBatch, DIR_GUEST_TO_HOST, OP_FLUSH, OP_WRITE};
use enlight_vmbus::poll::{AfterPass, Napi};
use enlight_vmbus::switch::{self, SwitchFailure, SwitchGuest};

/// One reaped completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The tag `submit` returned.
    pub tag: u64,
    /// Op code.
    pub op: u16,
    /// Bytes transferred.
    pub bytes: u32,
    /// 0 or an errno.
    pub status: u32,
    /// Reap time minus submit time, `CLOCK_MONOTONIC` ns.
    pub latency_ns: u64,
}

/// What `submit` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// The request is in the ring.
    Queued(u64),
    /// The outbound ring is full (`pending_send_sz` is set): reap, then retry.
    RingFull,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    busy: bool,
    generation: u32,
    op: u16,
    bytes: u32,
    submit_ns: u64,
}

/// The guest's disk driver.
pub struct DiskVsc {
    end: GuestEnd,
    dev: u32,
    live: Arc<DiskLive>,
    /// Submissions are held for a ring resize since this instant.
    quiesce_since: Option<Instant>,
    max_io: u32,
    capacity_sectors: u64,
    slots: Vec<Slot>,
    free: Vec<u32>,
    napi: Napi,
    buf: Vec<u8>,
    /// Completions reaped and not yet traced (see [`DiskVsc::flush_trace`]).
    records: ReapBatch,
    /// The host's protocol violation that broke the channel: every later call fails with it.
    broken: Option<String>,
}

impl DiskVsc {
    /// A driver over `end`, for a disk of `capacity_sectors`, with its own live settings and no
    /// host service attached (no ring resizes).
    pub fn new(
        end: GuestEnd,
        dev: u32,
        settings: DeviceSettings,
        max_io: u32,
        capacity_sectors: u64,
    ) -> Self {
        DiskVsc::with_live(
            end,
            dev,
            Arc::new(DiskLive::new(settings)),
            max_io,
            capacity_sectors,
        )
    }

    /// A driver over `end` whose knobs are `live` (shared with its host service and control).
    pub fn with_live(
        end: GuestEnd,
        dev: u32,
        live: Arc<DiskLive>,
        max_io: u32,
        capacity_sectors: u64,
    ) -> Self {
        let n = (end.extra.len() / max_io as usize) as u32;
        DiskVsc {
            end,
            dev,
            live,
            quiesce_since: None,
            max_io,
            capacity_sectors,
            slots: vec![Slot::default(); n as usize],
            free: (0..n).rev().collect(),
            napi: Napi::new(),
            buf: Vec::with_capacity(64),
            records: ReapBatch::new(),
            broken: None,
        }
    }

    /// Fails with [`DiskError::Broken`] once a protocol violation broke the channel.
    fn check_broken(&self) -> Result<(), DiskError> {
        match &self.broken {
            Some(why) => Err(DiskError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    /// Passes `e` on, remembering a protocol violation (or a broken ring) so that every later
    /// call fails too: a driver whose completions it can no longer trust submits nothing more.
    fn note(&mut self, e: DiskError) -> DiskError {
        match &e {
            DiskError::Protocol(why) => {
                self.broken.get_or_insert_with(|| why.clone());
            }
            DiskError::Ring(ring) => {
                self.broken.get_or_insert_with(|| ring.to_string());
            }
            _ => {}
        }
        e
    }

    /// Disk size in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Largest I/O in bytes.
    pub fn max_io_bytes(&self) -> u32 {
        self.max_io
    }

    /// Request slots: the queue depth limit.
    pub fn queue_slots(&self) -> usize {
        self.slots.len()
    }

    /// Requests in flight.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The device id used in tracepoints.
    pub fn dev_id(&self) -> u32 {
        self.dev
    }

    /// The settings in force.
    pub fn settings(&self) -> DeviceSettings {
        self.live.current()
    }

    /// The live state shared with the host service: serve it with
    /// [`ControlServer`](crate::control::ControlServer) to tune the disk while it runs.
    pub fn live(&self) -> Arc<DiskLive> {
        Arc::clone(&self.live)
    }

    /// The ring sizes of the channel in use (outbound, inbound).
    pub fn ring_sizes(&self) -> (usize, usize) {
        (
            self.end.config.out_ring_bytes,
            self.end.config.in_ring_bytes,
        )
    }

    fn resize_requested(&self) -> bool {
        self.quiesce_since.is_some() || self.live.resize_pending.load(Ordering::Acquire)
    }

    /// At a point with nothing in flight: performs a posted ring resize, if any. A failure
    /// before the host was told leaves the old channel in use and is reported to the requester;
    /// one after (the host broke the switch protocol or died) breaks the device like any other
    /// channel error.
    fn resize_if_requested(&mut self) -> Result<(), DiskError> {
        let since = self.quiesce_since.take().unwrap_or_else(Instant::now);
        let from = (
            self.end.config.out_ring_bytes as u32,
            self.end.config.in_ring_bytes as u32,
        );
        let live = Arc::clone(&self.live);
        live.run_resize("disk", self.dev, from, since, |out, inb| {
            let drained = Instant::now();
            Ok(self.switch_channel(out, inb)?.map(|()| drained))
        })
    }

    /// Moves both ends to a new channel with rings of `out`/`inb` bytes. Outer error: fatal;
    /// inner: the switch did not happen and the old channel stays in use.
    fn switch_channel(&mut self, out: u32, inb: u32) -> Result<Result<(), String>, DiskError> {
        debug_assert_eq!(self.outstanding(), 0);
        let (mut guest, host) =
            match switch::new_channel(&self.end.config, out, inb, MAX_PACKET_PAYLOAD) {
                Ok(ends) => ends,
                Err(e) => return Ok(Err(format!("creating the new channel: {e}"))),
            };
        // Slots keep their data: a completed read's buffer stays readable until the slot is
        // reused (`read_completed`).
        let len = self.end.extra.len().min(guest.extra.len());
        // Word by word, atomically: the old area is shared with the host (a hostile one may write
        // it even with nothing in flight), the new one not yet with anyone.
        if self.end.extra.copy_to(&guest.extra, len).is_none() {
            return Ok(Err(format!(
                "copying {len} bytes of slots to the new channel"
            )));
        }
        if let Err(e) = self.live.watch_peer(&mut guest) {
            return Ok(Err(format!("watching the host on the new channel: {e}")));
        }
        // Leave polling on the old ring; the new one starts unmasked.
        self.set_masked(false);
        if let Err(e) = self.live.offer(host) {
            return Ok(Err(format!("handing the new channel to the host: {e}")));
        }
        let req = DiskRequest {
            op: OP_SWITCH_CHANNEL,
            ..Default::default()
        };
        // Nothing is in flight, so the acknowledgement is the only packet the host may send.
        let status = switch::request_switch(self, &req.encode())?;
        if status != 0 {
            // The host refused and stays on the old channel: so do we.
            self.live.withdraw();
            return Ok(Err(format!(
                "the host refused the channel switch (status {status})"
            )));
        }
        self.end = guest;
        self.napi.reset();
        Ok(Ok(()))
    }

    fn slot_offset(&self, slot: u32) -> usize {
        slot as usize * self.max_io as usize
    }

    fn slot_of(&self, tag: u64) -> Option<usize> {
        let slot = (tag & 0xffff_ffff) as usize;
        let s = self.slots.get(slot)?;
        (s.busy && s.generation == (tag >> 32) as u32).then_some(slot)
    }

    /// Copies `data` into the buffer of the in-flight request `tag` (before the host reads it,
    /// i.e. use [`submit_write`](Self::submit_write) for writes with data).
    fn fill_slot(&self, slot: u32, data: &[u8]) -> Result<(), DiskError> {
        self.end
            .extra
            .write_at(self.slot_offset(slot), data)
            .ok_or_else(|| DiskError::Invalid("data larger than the slot".into()))
    }

    /// Copies the data of a completed read (valid until the slot is reused by the next submit).
    pub fn read_completed(&self, tag: u64, dst: &mut [u8]) -> Result<(), DiskError> {
        let slot = (tag & 0xffff_ffff) as usize;
        if slot >= self.slots.len() || dst.len() > self.max_io as usize {
            return Err(DiskError::Invalid(format!(
                "tag {tag:#x} or length {} out of range",
                dst.len()
            )));
        }
        self.end
            .extra
            .read_at(self.slot_offset(slot as u32), dst)
            .ok_or_else(|| DiskError::Invalid("slot outside the shared area".into()))
    }

    /// Submits a read or a flush (or a write of whatever the slot holds).
    pub fn submit(&mut self, op: u16, lba: u64, sectors: u32) -> Result<Submitted, DiskError> {
        self.check_broken()?;
        self.submit_inner(op, lba, sectors, None)
            .map_err(|e| self.note(e))
    }

    /// Submits a write of `data` (a multiple of 512 bytes).
    pub fn submit_write(&mut self, lba: u64, data: &[u8]) -> Result<Submitted, DiskError> {
        if !data.len().is_multiple_of(SECTOR as usize) {
            return Err(DiskError::Invalid(format!(
                "write of {} bytes is not whole sectors",
                data.len()
            )));
        }
        self.check_broken()?;
        self.submit_inner(
            OP_WRITE,
            lba,
            (data.len() / SECTOR as usize) as u32,
            Some(data),
        )
        .map_err(|e| self.note(e))
    }

    fn submit_inner(
        &mut self,
        op: u16,
        lba: u64,
        sectors: u32,
        data: Option<&[u8]>,
    ) -> Result<Submitted, DiskError> {
        let bytes = sectors as u64 * SECTOR as u64;
        if op != OP_FLUSH && (sectors == 0 || bytes > self.max_io as u64) {
            return Err(DiskError::Invalid(format!(
                "{sectors} sectors (max {} bytes)",
                self.max_io
            )));
        }
        if self.resize_requested() {
            if self.outstanding() > 0 {
                // Hold new requests until the in-flight ones are back; the caller reaps
                // meanwhile.
                self.quiesce_since.get_or_insert_with(Instant::now);
                return Ok(Submitted::RingFull);
            }
            // Nothing in flight: switch rings now, then submit on the new ones. (Callers that
            // do not reap with nothing outstanding still get their resize.)
            self.resize_if_requested()?;
        }
        let Some(&slot) = self.free.last() else {
            return Err(DiskError::QueueFull(self.slots.len()));
        };
        if let Some(data) = data {
            self.fill_slot(slot, data)?;
        }
        let generation = self.slots[slot as usize].generation.wrapping_add(1);
        let tag = (generation as u64) << 32 | slot as u64;
        let req = DiskRequest {
            op,
            sectors,
            lba,
            buf_offset: self.slot_offset(slot) as u64,
            buf_len: if op == OP_FLUSH { 0 } else { bytes as u32 },
            ..Default::default()
        };
        let submit_ns = trace::monotonic_ns();
        match self.end.tx.try_write(
            PACKET_TYPE_INBAND,
            FLAG_COMPLETION_REQUESTED,
            tag,
            &[&req.encode()],
        )? {
            WriteOutcome::Written { signal, bytes_used } => {
                self.free.pop();
                self.slots[slot as usize] = Slot {
                    busy: true,
                    generation,
                    op,
                    bytes: req.buf_len,
                    submit_ns,
                };
                trace::io_submit(self.dev, op, tag, req.buf_len, submit_ns);
                if signal {
                    self.end.to_host.signal()?;
                    trace::signal(self.dev, DIR_GUEST_TO_HOST, bytes_used, &self.live.signals);
                }
                Ok(Submitted::Queued(tag))
            }
            WriteOutcome::Full { needed } => {
                trace::ring_full(self.dev, DIR_GUEST_TO_HOST, needed, &self.live.signals);
                Ok(Submitted::RingFull)
            }
        }
    }

    /// Fires `io_reap` with the completions accumulated since the last hit, if any.
    ///
    /// Completions are traced in batches rather than one hit per polling pass: a uprobe trap
    /// costs about a microsecond, and at high rates a pass often reaps only a few completions.
    /// A batch goes out when it reaches [`trace::MAX_BATCH`], at the first pass or sleep after it
    /// is [`TRACE_FLUSH`](crate::trace::TRACE_FLUSH) old, when the workload ends, and when the driver is dropped: every
    /// completion is traced exactly once, at most one `reap` timeout after it was reaped.
    pub fn flush_trace(&mut self) {
        // Also with no completions: the signalling events counted since the last hit go too.
        trace::io_reap(self.dev, self.records.records(), Some(&self.live.signals));
        self.records.clear();
    }

    /// One polling pass: reads up to `budget` completions into `out`.
    fn pass(&mut self, out: &mut Vec<Completion>, budget: usize) -> Result<usize, DiskError> {
        let mut reaped = 0;
        while reaped < budget {
            let Some(h) = self.end.rx.read_into(&mut self.buf)? else {
                break;
            };
            let now = trace::monotonic_ns();
            if h.ty != PACKET_TYPE_COMPLETION {
                return Err(DiskError::Protocol(format!(
                    "packet type {} where a completion was expected",
                    h.ty
                )));
            }
            let c = DiskCompletion::decode(&self.buf).ok_or_else(|| {
                DiskError::Protocol(format!("completion payload of {} bytes", self.buf.len()))
            })?;
            let slot = self.slot_of(h.trans_id).ok_or_else(|| {
                DiskError::Protocol(format!(
                    "completion for unknown or finished tag {:#x}",
                    h.trans_id
                ))
            })?;
            let s = self.slots[slot];
            if c.bytes > s.bytes || (c.status == 0 && c.bytes != s.bytes) {
                return Err(DiskError::Protocol(format!(
                    "completion reports {} bytes for a {}-byte request",
                    c.bytes, s.bytes
                )));
            }
            self.slots[slot].busy = false;
            self.free.push(slot as u32);
            let latency_ns = now.saturating_sub(s.submit_ns);
            let status = c.status.min(u16::MAX as u32) as u16;
            trace::io_complete(self.dev, s.op, h.trans_id, c.bytes, latency_ns, status);
            if self.records.is_full() {
                self.flush_trace();
            }
            self.records.push(CompletionRecord {
                latency_ns,
                bytes: c.bytes,
                op: s.op,
                status,
            });
            reaped += 1;
            out.push(Completion {
                tag: h.trans_id,
                op: s.op,
                bytes: c.bytes,
                status: c.status,
                latency_ns,
            });
        }
        if self.end.rx.commit().signal_writer {
            self.end.to_host.signal()?;
            trace::signal(self.dev, DIR_GUEST_TO_HOST, 0, &self.live.signals);
        }
        if self.records.stale() {
            self.flush_trace();
        }
        Ok(reaped)
    }

    fn set_masked(&mut self, masked: bool) {
        if self.napi.set_masked(&self.end.rx, masked) {
            trace::irq_mask(self.dev, masked, &self.live.signals);
        }
    }

    /// Reaps completions into `out`, NAPI-style, waiting up to `timeout` for the first one.
    /// Returns how many were reaped (0 on timeout). A protocol violation by the host is
    /// [`DiskError::Protocol`], and every later call is [`DiskError::Broken`].
    pub fn reap(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Duration,
    ) -> Result<usize, DiskError> {
        self.check_broken()?;
        self.reap_inner(out, timeout).map_err(|e| self.note(e))
    }

    fn reap_inner(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Duration,
    ) -> Result<usize, DiskError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.resize_requested() {
                self.quiesce_since.get_or_insert_with(Instant::now);
                if self.outstanding() == 0 {
                    self.resize_if_requested()?;
                    // Back to the caller at once: it has requests to submit on the new rings.
                    return Ok(0);
                }
            }
            // Read once per pass: the control socket may change it at any time.
            let budget = self.live.knob(Knob::PollBudget).max(1) as usize;
            let n = self.pass(out, budget)?;
            let (dev, signals) = (self.dev, &self.live.signals);
            match self
                .napi
                .after_pass(&mut self.end.rx, n, budget, |masked| {
                    trace::irq_mask(dev, masked, signals)
                })? {
                // Busy: keep polling with interrupts masked.
                AfterPass::Busy => return Ok(n),
                // A completion written while we were masked raised no signal: pass again.
                AfterPass::Raced => continue,
                AfterPass::Settled => {}
            }
            if n > 0 {
                return Ok(n);
            }
            // Going idle with completions untraced for TRACE_FLUSH already: trace them now rather
            // than after the sleep. Younger ones wait for the next pass, so a guest that sleeps
            // every few completions does not pay a trap per sleep.
            if self.records.stale() {
                self.flush_trace();
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(0);
            }
            if self.end.from_host.wait(deadline - now)? == WaitResult::PeerGone {
                return Err(DiskError::PeerGone);
            }
        }
    }
}

/// The disk's side of the channel switch: nothing is in flight, so any packet but the
/// acknowledgement breaks the protocol.
impl SwitchGuest for DiskVsc {
    type Error = DiskError;

    fn end(&mut self) -> &mut GuestEnd {
        &mut self.end
    }

    fn doorbell(&mut self) -> Result<(), DiskError> {
        self.end.to_host.signal()?;
        trace::signal(self.dev, DIR_GUEST_TO_HOST, 0, &self.live.signals);
        Ok(())
    }

    fn packet(&mut self, h: &PacketHeader, _: &[u8]) -> Result<(), DiskError> {
        Err(DiskError::Protocol(format!(
            "packet type {} tag {:#x} while waiting for the channel switch",
            h.ty, h.trans_id
        )))
    }

    fn ack_status(payload: &[u8]) -> Option<u32> {
        DiskCompletion::decode(payload).map(|c| c.status)
    }

    fn failed(&mut self, why: SwitchFailure) -> DiskError {
        match why {
            SwitchFailure::PeerGone => DiskError::PeerGone,
            SwitchFailure::TimedOut { requested: false } => {
                // The request never went out: the host knows nothing; take the offer back.
                self.live.withdraw();
                DiskError::Protocol(why.to_string())
            }
            _ => DiskError::Protocol(why.to_string()),
        }
    }
}

impl Drop for DiskVsc {
    fn drop(&mut self) {
        self.flush_trace();
    }
}
