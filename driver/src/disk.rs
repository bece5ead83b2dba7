//! A storvsc-like synthetic disk over the channel.
//!
//! The guest driver ([`DiskVsc`]) writes a [`DiskRequest`] per I/O into the outbound ring as an
//! inband packet asking for a completion, with `trans_id` = the request's tag. Data buffers live
//! in the channel's shared extra area, one slot per outstanding request (the analogue of the
//! guest pages a storvsc request names with GPA-direct ranges), so queue depth is bounded by the
//! slots and by ring space. The host service ([`serve`]) validates each request, runs it against
//! a real backing file (`O_DIRECT` where the file system allows) on a small thread pool that
//! reads and writes the shared slots directly, and sends a [`DiskCompletion`] back.
//!
//! Both sides validate every byte from the other. The host answers a request with bad arguments
//! (unknown op, out-of-range LBA or buffer) with an error status; a packet the guest cannot
//! legally send at all (not a request, or a request that does not decode) ends the service with
//! [`DiskError::GuestProtocol`]. The guest accepts a completion only for a tag in flight, with a
//! length that fits the request; anything else is [`DiskError::Protocol`] and breaks the channel,
//! so every later call fails with [`DiskError::Broken`] (as a ring violation breaks the ring).
//! The service stops reading requests while those it holds (in flight on its workers, or
//! completed and waiting for room in the inbound ring) reach `DiskOptions::queue_slots`, and
//! resumes when they drain: no guest, reading its completions or not, can grow its memory.
//!
//! Interrupt moderation on the completion path: a completion write that makes the inbound ring
//! non-empty while the guest has not masked interrupts makes a signal *owed*; the host fires it
//! after `moderation_frames` completions or `moderation_usecs` microseconds, whichever comes
//! first (re-checking the mask first). The guest reaps NAPI-style: while a pass fills its whole
//! `poll_budget` it stays in polling mode with `interrupt_mask` set; a short pass unmasks,
//! re-checks for completions that raced in, and sleeps on the channel's eventfd.
//!
//! Every knob can change while I/O runs ([`live`]): both loops read moderation and the polling
//! budget from [`DiskLive`] on every pass, and a ring resize switches both ends to a new channel
//! between two I/Os (see [`live`] for how).

mod live;

pub use live::{DiskLive, ResizeReport, RESIZE_RUN_TIMEOUT, RESIZE_START_TIMEOUT};

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::channel::{
    self, ChannelConfig, ChannelError, GuestEnd, HostEnd, SharedArea, WaitResult,
};
use crate::ring::{
    PacketHeader, RingError, WriteOutcome, FLAG_COMPLETION_REQUESTED, PACKET_TYPE_COMPLETION,
    PACKET_TYPE_INBAND,
};
use crate::settings::{DeviceSettings, Knob};
use crate::trace::{
    self, CompletionRecord, ReapBatch, DIR_GUEST_TO_HOST, DIR_HOST_TO_GUEST, OP_FLUSH, OP_READ,
    OP_WRITE,
};
use enlight_vmbus::moderation::{Moderation, ModerationKnobs};
use enlight_vmbus::poll::{AfterPass, Napi};
use enlight_vmbus::switch::{self, SwitchFailure, SwitchGuest, SWITCH_ACK_TIMEOUT};

pub use crate::trace::TRACE_FLUSH;
/// Sector size of the synthetic disk.
pub const SECTOR: u32 = 512;
/// Largest packet payload either side of a disk channel accepts (requests are 32 bytes).
pub const MAX_PACKET_PAYLOAD: u32 = 256;
/// Alignment of every data slot in the shared area (enough for `O_DIRECT`).
pub const SLOT_ALIGN: usize = 4096;
/// Op code of the in-band request that moves the host to a new channel (a ring resize); it is
/// sent with the tag [`SWITCH_TAG`], which no I/O request can have.
pub const OP_SWITCH_CHANNEL: u16 = 0x100;
pub use enlight_vmbus::switch::SWITCH_TAG;

/// A request, as the payload of an inband packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskRequest {
    /// `OP_READ`, `OP_WRITE` or `OP_FLUSH`.
    pub op: u16,
    /// Zero.
    pub reserved: u16,
    /// Length in 512-byte sectors.
    pub sectors: u32,
    /// First sector.
    pub lba: u64,
    /// Offset of the data buffer in the shared extra area.
    pub buf_offset: u64,
    /// Length of the data buffer; `sectors * 512`.
    pub buf_len: u32,
    /// Zero.
    pub reserved2: u32,
}

const _: () = assert!(std::mem::size_of::<DiskRequest>() == 32);

/// A completion, as the payload of a completion packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskCompletion {
    /// 0 or an errno.
    pub status: u32,
    /// Bytes transferred.
    pub bytes: u32,
}

const _: () = assert!(std::mem::size_of::<DiskCompletion>() == 8);

impl DiskRequest {
    /// The wire form: little-endian fields in declaration order.
    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..2].copy_from_slice(&self.op.to_le_bytes());
        b[2..4].copy_from_slice(&self.reserved.to_le_bytes());
        b[4..8].copy_from_slice(&self.sectors.to_le_bytes());
        b[8..16].copy_from_slice(&self.lba.to_le_bytes());
        b[16..24].copy_from_slice(&self.buf_offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.buf_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.reserved2.to_le_bytes());
        b
    }

    /// Decodes untrusted bytes; `None` if too short.
    pub fn decode(b: &[u8]) -> Option<DiskRequest> {
        let b: &[u8; 32] = b.get(..32)?.try_into().ok()?;
        Some(DiskRequest {
            op: u16::from_le_bytes([b[0], b[1]]),
            reserved: u16::from_le_bytes([b[2], b[3]]),
            sectors: u32::from_le_bytes(b[4..8].try_into().ok()?),
            lba: u64::from_le_bytes(b[8..16].try_into().ok()?),
            buf_offset: u64::from_le_bytes(b[16..24].try_into().ok()?),
            buf_len: u32::from_le_bytes(b[24..28].try_into().ok()?),
            reserved2: u32::from_le_bytes(b[28..32].try_into().ok()?),
        })
    }
}

impl DiskCompletion {
    /// The wire form: `status`, `bytes`, little-endian.
    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&self.status.to_le_bytes());
        b[4..8].copy_from_slice(&self.bytes.to_le_bytes());
        b
    }

    /// Decodes untrusted bytes; `None` if too short.
    pub fn decode(b: &[u8]) -> Option<DiskCompletion> {
        Some(DiskCompletion {
            status: u32::from_le_bytes(b.get(0..4)?.try_into().ok()?),
            bytes: u32::from_le_bytes(b.get(4..8)?.try_into().ok()?),
        })
    }
}

/// Disk errors.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Channel set-up or signalling failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The peer broke the ring protocol; the channel is unusable.
    #[error("channel broken: {0}")]
    Ring(#[from] RingError),
    /// The host sent a well-framed packet it cannot legally send (a completion for a tag not in
    /// flight, a packet of the wrong type or length); the channel is unusable from then on.
    #[error("protocol violation by the host: {0}")]
    Protocol(String),
    /// The guest sent a packet it cannot legally send (one that is not a request, a request that
    /// does not decode); the host stops serving the channel.
    #[error("protocol violation by the guest: {0}")]
    GuestProtocol(String),
    /// An earlier protocol violation broke the channel; every later call fails with this.
    #[error("the channel is broken by an earlier protocol violation: {0}")]
    Broken(String),
    /// The backing file could not be used.
    #[error("backing file {path}: {source}")]
    Backing {
        path: String,
        source: std::io::Error,
    },
    /// Bad arguments from the caller.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Every slot is in use.
    #[error("no free request slot (queue depth {0} reached)")]
    QueueFull(usize),
    /// The peer process is gone.
    #[error("the host side of the channel is gone")]
    PeerGone,
    /// A settings value is out of range.
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// Sizing an existing backing file down was refused (it would destroy data).
    #[error("backing file {path} is {have} bytes, larger than the {want} asked for: refusing to shrink it (that would destroy the data past {want} bytes)")]
    WouldShrink {
        /// The file.
        path: String,
        /// Its size.
        have: u64,
        /// The size asked for.
        want: u64,
    },
}

/// Sizes of a disk's data path.
#[derive(Debug, Clone, Copy)]
pub struct DiskOptions {
    /// Largest single I/O (a multiple of 4096).
    pub max_io_bytes: u32,
    /// Request slots in the shared area: the queue depth limit.
    pub queue_slots: u32,
    /// Host worker threads doing the file I/O.
    pub workers: u32,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            max_io_bytes: 128 * 1024,
            queue_slots: 64,
            workers: 4,
        }
    }
}

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
    /// is [`TRACE_FLUSH`] old, when the workload ends, and when the driver is dropped: every
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

/// A backing file for the host service.
pub struct Backing {
    file: File,
    capacity_sectors: u64,
    direct: bool,
}

impl Backing {
    /// Opens `path` read-write, with `O_DIRECT` when the file system allows it.
    pub fn open(path: &Path) -> Result<Backing, DiskError> {
        let err = |source| DiskError::Backing {
            path: path.display().to_string(),
            source,
        };
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let (file, direct) = match direct {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::info!(
                    "{}: O_DIRECT not supported by this file system, using buffered I/O",
                    path.display()
                );
                (
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(path)
                        .map_err(err)?,
                    false,
                )
            }
            Err(e) => return Err(err(e)),
        };
        let len = file.metadata().map_err(err)?.len();
        Ok(Backing {
            file,
            capacity_sectors: len / SECTOR as u64,
            direct,
        })
    }

    /// Creates a backing file of `bytes`, allocated on disk, or grows an existing one to that
    /// size; bytes already in the file are never touched. An existing file larger than `bytes`
    /// is refused ([`DiskError::WouldShrink`]): a file the user named is never cut down without
    /// [`Backing::resize`], which the caller asks for explicitly.
    pub fn create(path: &Path, bytes: u64) -> Result<(), DiskError> {
        Backing::size_to(path, bytes, false, Fill::Allocate)
    }

    /// As [`Backing::create`], but the part it adds is written out (zeros) and on disk. Slower
    /// to create, but the blocks are plain written extents: random writes into a file of
    /// unwritten (fallocated) extents split it into tens of thousands of extents, each
    /// converted on its first write and freed (and, on a file system mounted with `discard`,
    /// discarded) one by one when the file is deleted, which took `enlight demo` over a minute
    /// after a few minutes' run.
    pub fn create_written(path: &Path, bytes: u64) -> Result<(), DiskError> {
        Backing::size_to(path, bytes, false, Fill::Zeros)
    }

    /// As [`Backing::create_written`], but also cuts an existing larger file down to `bytes`
    /// (destroying what lies past that point): only at the user's explicit request
    /// (`enlight disk --shrink`).
    pub fn resize(path: &Path, bytes: u64) -> Result<(), DiskError> {
        Backing::size_to(path, bytes, true, Fill::Zeros)
    }

    fn size_to(path: &Path, bytes: u64, shrink: bool, fill: Fill) -> Result<(), DiskError> {
        let err = |source| DiskError::Backing {
            path: path.display().to_string(),
            source,
        };
        if bytes == 0 || bytes > i64::MAX as u64 {
            return Err(DiskError::Invalid(format!(
                "backing file {}: a size of {bytes} bytes is outside 1..={}",
                path.display(),
                i64::MAX
            )));
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(err)?;
        let meta = f.metadata().map_err(err)?;
        if !meta.is_file() {
            return Err(DiskError::Invalid(format!(
                "backing file {}: not a regular file, so it cannot be created or sized",
                path.display()
            )));
        }
        if meta.len() > bytes {
            if !shrink {
                return Err(DiskError::WouldShrink {
                    path: path.display().to_string(),
                    have: meta.len(),
                    want: bytes,
                });
            }
            f.set_len(bytes).map_err(err)?;
            return Ok(());
        }
        match fill {
            Fill::Allocate => {
                // posix_fallocate only ever grows a file (and allocates what it adds); where
                // the file system lacks it, set_len grows it sparse. Neither runs on a larger
                // file (above).
                // SAFETY: plain syscall on our file.
                if unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, bytes as libc::off_t) } != 0 {
                    f.set_len(bytes).map_err(err)?;
                }
                Ok(())
            }
            Fill::Zeros => {
                use std::io::{Seek, SeekFrom, Write};
                let mut f = f;
                let mut len = meta.len();
                f.seek(SeekFrom::Start(len)).map_err(err)?;
                let chunk = vec![0u8; 1 << 20];
                while len < bytes {
                    let n = (bytes - len).min(chunk.len() as u64) as usize;
                    f.write_all(&chunk[..n]).map_err(err)?;
                    len += n as u64;
                }
                f.sync_data().map_err(err)
            }
        }
    }

    /// Size in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether `O_DIRECT` is in use.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The open file (for device models that do their own positioned I/O; with `O_DIRECT`,
    /// buffers and offsets must be 512-byte aligned).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// How [`Backing`] fills the part of a file it adds.
#[derive(Clone, Copy)]
enum Fill {
    /// Allocated but unwritten extents (`posix_fallocate`): fast to create.
    Allocate,
    /// Zeros written out: plain extents, quick to delete after random writes.
    Zeros,
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
/// (a ring resize, see [`live`]) moves the service to the host end the guest put in the
/// hand-over slot of the same [`DiskLive`].
pub fn serve(
    mut host: HostEnd,
    backing: Backing,
    dev: u32,
    options: DiskOptions,
    control: VspControl,
) -> Result<(), DiskError> {
    let VspControl {
        stop,
        stats,
        wake,
        live,
    } = control;
    let file = Arc::new(backing.file);
    let capacity = backing.capacity_sectors;
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let mut workers = Vec::new();
    for i in 0..options.workers.max(1) {
        let (job_rx, done_tx, file, wake) = (
            Arc::clone(&job_rx),
            done_tx.clone(),
            Arc::clone(&file),
            Arc::clone(&wake),
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
    drop(done_tx);

    let mut moderation = Moderation::new();
    // Requests handed to the workers and not yet back.
    let mut in_flight = 0usize;
    let mut outq: VecDeque<Done> = VecDeque::new();
    let mut buf = Vec::with_capacity(64);
    let mut blocked_on_full = false;
    // Requests held at once (in flight plus completions queued for the inbound ring) before the
    // service stops reading the outbound ring: a guest driver never has more than its slots in
    // flight, so this never holds back a well-behaved guest, and no guest can make the service
    // queue more, whether or not it reads its completions.
    let queue_bound = options.queue_slots.max(1) as usize;
    let mut throttled = false;
    let result = loop {
        if stop.load(Ordering::Acquire) {
            break Ok(());
        }
        // Read once per pass: the control socket may change them at any time.
        let knobs = ModerationKnobs {
            frames: live.knob(Knob::ModerationFrames),
            usecs: live.knob(Knob::ModerationUsecs),
        };
        // 1. Requests from the guest.
        let step: Result<(), DiskError> = (|| {
            loop {
                if in_flight + outq.len() >= queue_bound {
                    // Resumed once the workers finish and the guest reads its completions.
                    if !throttled {
                        throttled = true;
                        stats.throttled.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                throttled = false;
                let Some(h) = host.rx.read_into(&mut buf)? else {
                    break;
                };
                let packet = match classify(&h, &buf, capacity, host.extra.len(), options) {
                    Ok(p) => p,
                    Err(why) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        return Err(DiskError::GuestProtocol(why));
                    }
                };
                match packet {
                    GuestPacket::Switch => {
                        // Everything earlier is read; it must all be completed too.
                        let idle = in_flight == 0 && outq.is_empty();
                        // Always taken (an offer over a socket must not linger), used only if idle.
                        let offered = live.take_offer();
                        let status = switch::ack_status(offered.is_some(), idle);
                        let next = offered.filter(|_| idle);
                        write_switch_ack(&mut host, status)?;
                        stats.interrupts.fetch_add(1, Ordering::Relaxed);
                        host.to_guest.signal()?;
                        trace::signal(dev, DIR_HOST_TO_GUEST, 0, &live.signals);
                        if let Some(next) = next {
                            host.rx.commit();
                            host = next;
                            moderation.clear();
                            blocked_on_full = false;
                        } else {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    GuestPacket::Io(req) => {
                        stats.requests.fetch_add(1, Ordering::Relaxed);
                        in_flight += 1;
                        job_tx
                            .send(Job {
                                tag: h.trans_id,
                                req,
                                area: host.extra.clone(),
                            })
                            .expect("workers outlive the loop")
                    }
                    GuestPacket::Reject(status) => {
                        stats.requests.fetch_add(1, Ordering::Relaxed);
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        outq.push_back(Done {
                            tag: h.trans_id,
                            completion: DiskCompletion { status, bytes: 0 },
                        });
                    }
                }
            }
            if host.rx.commit().signal_writer {
                // Count before signalling: a woken guest may read the counter at once.
                stats.interrupts.fetch_add(1, Ordering::Relaxed);
                host.to_guest.signal()?;
                trace::signal(dev, DIR_HOST_TO_GUEST, 0, &live.signals);
            }
            stats
                .queue_peak
                .fetch_max((in_flight + outq.len()) as u64, Ordering::Relaxed);
            // 2. Completions from the workers, in the order they finished.
            while let Ok(done) = done_rx.try_recv() {
                in_flight -= 1;
                if done.completion.status != 0 {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
                outq.push_back(done);
            }
            // 3. Completion packets into the inbound ring.
            while let Some(done) = outq.front() {
                match host.tx.try_write(
                    PACKET_TYPE_COMPLETION,
                    0,
                    done.tag,
                    &[&done.completion.encode()],
                )? {
                    WriteOutcome::Written { signal, .. } => {
                        outq.pop_front();
                        blocked_on_full = false;
                        moderation.wrote(signal);
                    }
                    WriteOutcome::Full { needed } => {
                        if !blocked_on_full {
                            stats.ring_full.fetch_add(1, Ordering::Relaxed);
                            trace::ring_full(dev, DIR_HOST_TO_GUEST, needed, &live.signals);
                            blocked_on_full = true;
                        }
                        break;
                    }
                }
            }
            // 4. Interrupt moderation.
            if let Some(used) = moderation.fire(&mut host.tx, knobs, Instant::now())? {
                stats.interrupts.fetch_add(1, Ordering::Relaxed);
                host.to_guest.signal()?;
                trace::signal(dev, DIR_HOST_TO_GUEST, used, &live.signals);
            }
            Ok(())
        })();
        if let Err(e) = step {
            break Err(e);
        }
        // 5. Sleep until the guest signals, a worker finishes, or the moderation timer fires.
        let timeout = match moderation.deadline(knobs.usecs) {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_millis(100),
        };
        let mut fds = [
            libc::pollfd {
                fd: host.from_guest.raw_fd(),
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
        let more_requests = !throttled && host.rx.has_data().unwrap_or(true);
        let busy = more_requests || (!outq.is_empty() && !blocked_on_full);
        if !busy {
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
                host.from_guest.drain()?;
            }
            if fds[1].revents & libc::POLLIN != 0 {
                let mut v = 0u64;
                // SAFETY: reading 8 bytes into a local from our non-blocking eventfd.
                unsafe { libc::read(wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            }
            // Only when idle: a busy loop need not pay a poll per pass to learn the peer died.
            if host.from_guest.wait(Duration::ZERO)? == WaitResult::PeerGone {
                break Ok(());
            }
        }
    };
    drop(job_tx);
    for w in workers {
        let _ = w.join();
    }
    // The last interrupts may follow the guest's last io_reap hit: trace what is left.
    trace::io_reap(dev, &[], Some(&live.signals));
    result
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
    live: Arc<DiskLive>,
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
    control: VspControl,
    thread: Option<JoinHandle<Result<(), DiskError>>>,
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

/// A synthetic disk with both sides in this process.
pub struct SyntheticDisk;

impl SyntheticDisk {
    /// Opens `backing`, creates the channel sized by `settings` and `options`, starts the host
    /// service on its own threads and returns the guest driver and the service's handle.
    pub fn start(
        backing: &Path,
        settings: DeviceSettings,
        dev: u32,
        options: DiskOptions,
    ) -> Result<(DiskVsc, VspHandle), DiskError> {
        settings.validate()?;
        if options.max_io_bytes == 0
            || !(options.max_io_bytes as usize).is_multiple_of(SLOT_ALIGN)
            || options.queue_slots == 0
        {
            return Err(DiskError::Invalid(format!(
                "max_io_bytes {} must be a non-zero multiple of {SLOT_ALIGN} and queue_slots non-zero",
                options.max_io_bytes
            )));
        }
        let backing = Backing::open(backing)?;
        let capacity = backing.capacity_sectors();
        let cfg = ChannelConfig {
            out_ring_bytes: settings.ring_out_bytes as usize,
            in_ring_bytes: settings.ring_in_bytes as usize,
            extra_bytes: options.max_io_bytes as usize * options.queue_slots as usize,
        };
        let (mut guest, mut host) = channel::create(&cfg)?;
        guest.rx.set_max_payload(MAX_PACKET_PAYLOAD);
        host.rx.set_max_payload(MAX_PACKET_PAYLOAD);
        let control = VspControl::with_settings(settings)?;
        // The service runs in this process, so it takes channel hand-overs (ring resizes).
        control.live.host_attached.store(true, Ordering::Release);
        let live = Arc::clone(&control.live);
        let thread = {
            let control = control.clone();
            std::thread::Builder::new()
                .name(format!("vsp-disk{dev}"))
                .spawn(move || serve(host, backing, dev, options, control))
                .map_err(|e| DiskError::Backing {
                    path: "host service thread".into(),
                    source: e,
                })?
        };
        let vsc = DiskVsc::with_live(guest, dev, live, options.max_io_bytes, capacity);
        Ok((
            vsc,
            VspHandle {
                control,
                thread: Some(thread),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_files_grow_but_are_never_shrunk_unasked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("user.img");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        for bytes in [0, 4096] {
            assert!(Backing::create(&p, bytes).is_err(), "{bytes}");
            assert_eq!(
                std::fs::read(&p).unwrap(),
                vec![7u8; 8192],
                "{bytes}: file changed"
            );
        }
        assert!(matches!(
            Backing::create(&p, 4096),
            Err(DiskError::WouldShrink {
                have: 8192,
                want: 4096,
                ..
            })
        ));
        Backing::create(&p, 8192).unwrap();
        Backing::create(&p, 16384).unwrap();
        let grown = std::fs::read(&p).unwrap();
        assert_eq!((grown.len(), &grown[..8192]), (16384, &[7u8; 8192][..]));
        Backing::resize(&p, 4096).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 4096]);
        assert!(Backing::resize(&p, 0).is_err());
        assert!(
            Backing::create(Path::new("/dev/null"), 4096).is_err(),
            "not a regular file"
        );
    }

    fn backing_with_pattern(sectors: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i % 251) as u8).collect();
        std::fs::write(f.path(), &data).unwrap();
        f
    }

    fn reap_one(vsc: &mut DiskVsc) -> Completion {
        let mut out = Vec::new();
        while out.is_empty() {
            vsc.reap(&mut out, Duration::from_secs(5)).unwrap();
        }
        out[0]
    }

    /// A host service on a bare 8 KiB channel, for tests that play the guest by hand: the
    /// guest end, the host's control and its thread.
    fn host_on_raw_channel(
        backing: &Path,
    ) -> (
        channel::GuestEnd,
        VspControl,
        std::thread::JoinHandle<Result<(), DiskError>>,
    ) {
        let (guest, host) = channel::create(&ChannelConfig {
            out_ring_bytes: 8192,
            in_ring_bytes: 8192,
            extra_bytes: 8192,
        })
        .unwrap();
        let control = VspControl::new().unwrap();
        let backing = Backing::open(backing).unwrap();
        let t = {
            let control = control.clone();
            std::thread::spawn(move || serve(host, backing, 0, small(), control))
        };
        (guest, control, t)
    }

    fn small() -> DiskOptions {
        DiskOptions {
            max_io_bytes: 8192,
            queue_slots: 8,
            workers: 2,
        }
    }

    #[test]
    fn read_returns_the_files_bytes_and_writes_stick() {
        let f = backing_with_pattern(64);
        let (mut vsc, vsp) =
            SyntheticDisk::start(f.path(), DeviceSettings::default(), 0, small()).unwrap();
        let Submitted::Queued(tag) = vsc.submit(OP_READ, 3, 8).unwrap() else {
            panic!("ring full")
        };
        let c = reap_one(&mut vsc);
        assert_eq!((c.tag, c.status, c.bytes, c.op), (tag, 0, 4096, OP_READ));
        let mut got = vec![0u8; 4096];
        vsc.read_completed(tag, &mut got).unwrap();
        let want: Vec<u8> = (3 * 512..3 * 512 + 4096u64)
            .map(|i| (i % 251) as u8)
            .collect();
        assert_eq!(got, want);

        let data = vec![0xabu8; 1024];
        vsc.submit_write(10, &data).unwrap();
        assert_eq!(reap_one(&mut vsc).status, 0);
        vsc.submit(OP_FLUSH, 0, 0).unwrap();
        assert_eq!(reap_one(&mut vsc).status, 0);
        let Submitted::Queued(tag) = vsc.submit(OP_READ, 10, 2).unwrap() else {
            panic!()
        };
        reap_one(&mut vsc);
        let mut got = vec![0u8; 1024];
        vsc.read_completed(tag, &mut got).unwrap();
        assert_eq!(got, data);
        vsp.stop().unwrap();
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[10 * 512..11 * 512], &[0xab; 512]);
    }

    #[test]
    fn out_of_range_lba_completes_with_an_error() {
        let f = backing_with_pattern(16);
        let (mut vsc, vsp) =
            SyntheticDisk::start(f.path(), DeviceSettings::default(), 0, small()).unwrap();
        vsc.submit(OP_READ, 15, 2).unwrap();
        assert_eq!(reap_one(&mut vsc).status, libc::ERANGE as u32);
        assert_eq!(vsp.stats().errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn hostile_guest_requests_get_error_completions() {
        let f = backing_with_pattern(16);
        let (mut guest, control, t) = host_on_raw_channel(f.path());
        let bad = [
            DiskRequest {
                op: 99,
                sectors: 1,
                buf_len: 512,
                ..Default::default()
            },
            DiskRequest {
                op: OP_READ,
                sectors: 1,
                buf_len: 512,
                buf_offset: u64::MAX - 10,
                ..Default::default()
            },
            DiskRequest {
                op: OP_READ,
                sectors: 1,
                buf_len: 512,
                buf_offset: 8192,
                ..Default::default()
            },
            DiskRequest {
                op: OP_READ,
                sectors: 2,
                buf_len: 512,
                ..Default::default()
            },
            DiskRequest {
                op: OP_WRITE,
                sectors: 1,
                buf_len: 512,
                buf_offset: 100,
                ..Default::default()
            },
            DiskRequest {
                op: OP_READ,
                sectors: 1,
                buf_len: 512,
                lba: u64::MAX,
                ..Default::default()
            },
        ];
        for (i, req) in bad.iter().enumerate() {
            guest
                .tx
                .try_write(PACKET_TYPE_INBAND, 1, i as u64, &[&req.encode()])
                .unwrap();
        }
        guest.to_host.signal().unwrap();
        let mut buf = Vec::new();
        let mut statuses = Vec::new();
        while statuses.len() < 6 {
            match guest.rx.read_into(&mut buf).unwrap() {
                Some(h) => {
                    statuses.push((h.trans_id, DiskCompletion::decode(&buf).unwrap().status))
                }
                None => {
                    guest.from_host.wait(Duration::from_millis(50)).unwrap();
                }
            }
        }
        assert!(statuses.iter().all(|(_, s)| *s != 0), "{statuses:?}");
        assert_eq!(control.stats().errors.load(Ordering::Relaxed), 6);
        // Then a corrupt ring index: the service stops with a typed error instead of crashing.
        // SAFETY: test pokes the outbound ring's write_index (first word of the region).
        unsafe {
            (guest.extra.as_ptr().sub(2 * 4096 + 8192 + 8192) as *mut u32).write_volatile(12345)
        };
        guest.to_host.signal().unwrap();
        let r = t.join().unwrap();
        assert!(matches!(r, Err(DiskError::Ring(_))), "{r:?}");
        control.request_stop();
    }

    /// Packets a guest cannot legally send (not a request, or a request that does not decode)
    /// break the channel: the service stops with a typed error instead of answering and going on.
    #[test]
    fn illegal_guest_packets_stop_the_service() {
        let f = backing_with_pattern(16);
        let cases: [(u16, &[u8], &str); 3] = [
            (PACKET_TYPE_INBAND, b"short", "does not decode"),
            (PACKET_TYPE_COMPLETION, &[0u8; 8], "packet type 11"),
            (crate::ring::PACKET_TYPE_GPADL, &[0u8; 32], "packet type 8"),
        ];
        for (ty, payload, needle) in cases {
            let (mut guest, control, t) = host_on_raw_channel(f.path());
            guest.tx.try_write(ty, 1, 100, &[payload]).unwrap();
            guest.to_host.signal().unwrap();
            // A generous sanity bound, not a timing target: a service that carries on never ends.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !t.is_finished() {
                if Instant::now() > deadline {
                    control.request_stop();
                    let _ = t.join();
                    panic!("{needle}: the service kept serving after the violation");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let r = t.join().unwrap();
            assert!(
                matches!(r, Err(DiskError::GuestProtocol(ref m)) if m.contains(needle)),
                "{needle}: {r:?}"
            );
            control.request_stop();
        }
    }

    /// A guest that floods requests (answered with an error status, so no I/O slows the host)
    /// and never reads its inbound ring cannot grow the host: the service stops reading once
    /// the completions it holds reach its queue bound, and resumes, losing nothing, when the
    /// guest reads. (It used to read every request and queue every completion: 135-775 MB in
    /// 10 s.) The assertions are on the service's own queue counters, not on time.
    #[test]
    fn a_flooding_guest_that_never_reads_cannot_grow_the_host() {
        let f = backing_with_pattern(16);
        let (mut guest, control, t) = host_on_raw_channel(f.path());
        let bound = small().queue_slots as u64;
        let bad = DiskRequest {
            op: 99,
            ..Default::default()
        }
        .encode();
        let stats = control.stats();
        let write = |guest: &mut channel::GuestEnd, tag: u64| {
            guest
                .tx
                .try_write(PACKET_TYPE_INBAND, FLAG_COMPLETION_REQUESTED, tag, &[&bad])
                .unwrap()
        };
        const FLOOD: u64 = 20_000;
        let mut written = 0u64;
        // Write until the host stops taking requests (its throttle counter moved and a wait
        // brought no progress), or until the whole flood went in, which a bounded host never
        // allows: 8 KiB rings hold a few hundred packets.
        let mut last_seen = u64::MAX;
        while written < FLOOD {
            match write(&mut guest, written) {
                WriteOutcome::Written { .. } => {
                    written += 1;
                    guest.to_host.signal().unwrap();
                }
                WriteOutcome::Full { .. } => {
                    let seen = stats.requests.load(Ordering::Relaxed);
                    if stats.throttled.load(Ordering::Relaxed) > 0 && seen == last_seen {
                        break;
                    }
                    last_seen = seen;
                    guest.from_host.wait(Duration::from_millis(200)).unwrap();
                }
            }
        }
        let peak = stats.queue_peak.load(Ordering::Relaxed);
        assert!(
            written < FLOOD && peak <= bound,
            "the host took {written} requests and held {peak} completions (bound {bound})"
        );
        // The guest starts reading: every request gets its completion, in order, and the host
        // takes the rest of the flood.
        let mut buf = Vec::new();
        let mut next = 0u64;
        while next < FLOOD {
            while written < FLOOD {
                match write(&mut guest, written) {
                    WriteOutcome::Written { .. } => written += 1,
                    WriteOutcome::Full { .. } => break,
                }
            }
            guest.to_host.signal().unwrap();
            while let Some(h) = guest.rx.read_into(&mut buf).unwrap() {
                assert_eq!(h.trans_id, next);
                let c = DiskCompletion::decode(&buf).unwrap();
                assert_eq!(c.status, libc::EOPNOTSUPP as u32);
                next += 1;
            }
            if guest.rx.commit().signal_writer {
                guest.to_host.signal().unwrap();
            }
            if next < FLOOD {
                guest.from_host.wait(Duration::from_millis(50)).unwrap();
            }
        }
        assert!(stats.queue_peak.load(Ordering::Relaxed) <= bound);
        assert_eq!(stats.requests.load(Ordering::Relaxed), FLOOD);
        control.request_stop();
        t.join().unwrap().unwrap();
    }

    /// A switch request the host cannot honour (nothing offered in the hand-over slot) is
    /// refused with EPROTO and the host keeps serving the old channel.
    #[test]
    fn an_unoffered_channel_switch_is_refused_and_serving_goes_on() {
        let f = backing_with_pattern(16);
        let (mut guest, control, t) = host_on_raw_channel(f.path());
        let switch = DiskRequest {
            op: OP_SWITCH_CHANNEL,
            ..Default::default()
        };
        let read = DiskRequest {
            op: OP_READ,
            sectors: 1,
            buf_len: 512,
            ..Default::default()
        };
        guest
            .tx
            .try_write(PACKET_TYPE_INBAND, 1, SWITCH_TAG, &[&switch.encode()])
            .unwrap();
        guest
            .tx
            .try_write(PACKET_TYPE_INBAND, 1, 5, &[&read.encode()])
            .unwrap();
        guest.to_host.signal().unwrap();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        while got.len() < 2 {
            match guest.rx.read_into(&mut buf).unwrap() {
                Some(h) => got.push((h.trans_id, DiskCompletion::decode(&buf).unwrap().status)),
                None => {
                    guest.from_host.wait(Duration::from_millis(50)).unwrap();
                }
            }
        }
        assert_eq!(got, vec![(SWITCH_TAG, libc::EPROTO as u32), (5, 0)]);
        control.request_stop();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn hostile_host_completion_breaks_the_guest() {
        let f = backing_with_pattern(16);
        let (guest, mut host) = channel::create(&ChannelConfig {
            out_ring_bytes: 8192,
            in_ring_bytes: 8192,
            extra_bytes: 8192,
        })
        .unwrap();
        let _ = f;
        let mut vsc = DiskVsc::new(guest, 0, DeviceSettings::default(), 4096, 16);
        vsc.submit(OP_READ, 0, 8).unwrap();
        host.tx
            .try_write(
                PACKET_TYPE_COMPLETION,
                0,
                0xdead_0000_0007,
                &[&DiskCompletion::default().encode()],
            )
            .unwrap();
        let err = vsc
            .reap(&mut Vec::new(), Duration::from_millis(100))
            .unwrap_err();
        assert!(
            matches!(err, DiskError::Protocol(ref m) if m.contains("unknown")),
            "{err}"
        );
        // The channel stays broken: every later call fails with the typed error, although the
        // ring itself is intact and the host now behaves.
        let broken = |r: Result<(), DiskError>| {
            assert!(
                matches!(r, Err(DiskError::Broken(ref m)) if m.contains("unknown")),
                "{r:?}"
            )
        };
        broken(vsc.reap(&mut Vec::new(), Duration::ZERO).map(|_| ()));
        broken(vsc.submit(OP_READ, 0, 8).map(|_| ()));
        broken(vsc.submit_write(0, &[0u8; 512]).map(|_| ()));
        broken(
            vsc.reap(&mut Vec::new(), Duration::from_millis(10))
                .map(|_| ()),
        );
    }

    #[test]
    fn moderation_bounds_interrupts_by_frames() {
        let f = backing_with_pattern(2048);
        let settings = DeviceSettings {
            moderation_frames: 8,
            moderation_usecs: 100_000,
            poll_budget: 64,
            ..Default::default()
        };
        let (mut vsc, vsp) = SyntheticDisk::start(
            f.path(),
            settings,
            0,
            DiskOptions {
                max_io_bytes: 4096,
                queue_slots: 32,
                workers: 4,
            },
        )
        .unwrap();
        let total = 4000u64;
        let (mut submitted, mut done) = (0u64, 0u64);
        let mut out = Vec::new();
        let t0 = Instant::now();
        while done < total {
            while submitted < total && vsc.outstanding() < 32 {
                match vsc.submit(OP_READ, (submitted * 8) % 2040, 8).unwrap() {
                    Submitted::Queued(_) => submitted += 1,
                    Submitted::RingFull => break,
                }
            }
            out.clear();
            done += vsc.reap(&mut out, Duration::from_secs(5)).unwrap() as u64;
        }
        let interrupts = vsp.stats().interrupts.load(Ordering::Relaxed);
        // At most one interrupt per 8 completions, plus the ones the 100 ms timer may fire.
        let timer_allowance = t0.elapsed().as_millis() as u64 / 100 + 2;
        assert!(
            interrupts <= total / 8 + timer_allowance,
            "{interrupts} interrupts for {total} completions"
        );
        vsp.stop().unwrap();
    }

    #[test]
    fn moderation_timer_signals_a_lone_completion() {
        let f = backing_with_pattern(16);
        let settings = DeviceSettings {
            moderation_frames: 64,
            moderation_usecs: 200,
            ..Default::default()
        };
        let (mut vsc, vsp) = SyntheticDisk::start(f.path(), settings, 0, small()).unwrap();
        vsc.submit(OP_READ, 0, 1).unwrap();
        let mut out = Vec::new();
        // The completion arrives: signalled or, if the host is slow, found by a pass after a
        // reap's timeout; either way it is reaped exactly once.
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.is_empty() {
            assert!(Instant::now() < deadline, "no completion within 30 s");
            vsc.reap(&mut out, Duration::from_secs(1)).unwrap();
        }
        assert_eq!(out.len(), 1);
        // Only the timer can signal it: 64 frames will never accumulate. (The host counts the
        // interrupt before signalling, but a completion found without it may be reaped first.)
        let interrupts = || vsp.stats().interrupts.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while interrupts() == 0 {
            assert!(
                Instant::now() < deadline,
                "the moderation timer never signalled the lone completion"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn queue_depth_is_bounded_by_slots() {
        let f = backing_with_pattern(64);
        let (mut vsc, _vsp) =
            SyntheticDisk::start(f.path(), DeviceSettings::default(), 0, small()).unwrap();
        for _ in 0..8 {
            vsc.submit(OP_READ, 0, 1).unwrap();
        }
        assert!(matches!(
            vsc.submit(OP_READ, 0, 1),
            Err(DiskError::QueueFull(8))
        ));
    }
}
