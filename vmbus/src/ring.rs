//! One VMBus ring buffer in shared memory, as Linux's `drivers/hv/ring_buffer.c` implements it.
//!
//! A ring is one 4 KiB control page ([`RingControl`]) followed by a data area whose size is a page
//! multiple. Packets are a 16-byte [`PacketDescriptor`], the payload padded to 8 bytes, and a
//! `u64` trailer holding the writer's previous write index in its upper 32 bits. Packets wrap at
//! the end of the data area; both sides copy in two pieces.
//!
//! Rules followed exactly (see `shared/docs/vmbus.md`):
//! - the writer never fills the ring completely: a write needs strictly more free bytes than the
//!   packet plus its trailer, so `write_index == read_index` always means empty;
//! - the writer signals only on the empty-to-non-empty transition and only when the reader has not
//!   set `interrupt_mask` ([`WriteOutcome::Written::signal`]);
//! - flow control: a writer that finds too little room sets `pending_send_sz`; the reader signals
//!   it back only when a read pass moves the free space from "not enough" to "strictly more than
//!   `pending_send_sz`" ([`ReadCommit::signal_writer`]).
//!
//! The peer is untrusted. The writer keeps its own copy of the write index and the reader its own
//! copy of the read index; the only values read from the peer are the peer's index and the bytes
//! of the packets, which are copied once into local memory and validated there. Any violation is a
//! [`RingError`] and breaks the ring for good ([`RingError::Broken`] from then on): no panic, no
//! out-of-bounds access, no hang.
//!
//! Memory model: indices and flags are accessed as atomics with full fences where Linux has
//! `virt_mb()`. Packet bytes are copied in and out as whole aligned words with relaxed atomic
//! loads and stores ([`crate::shmem`]), never through Rust references or `memcpy`, because the
//! peer may write them concurrently: a hostile peer can make us copy garbage, which validation of
//! our own copy then rejects, but never make us read a byte twice, read outside the region, or
//! race in the sense of Rust's memory model.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crate::shmem::SharedMem;

/// Size of a page, the control page and the granularity of ring sizes.
pub const PAGE_SIZE: usize = 4096;
/// Inband data: the payload follows the descriptor.
pub const PACKET_TYPE_INBAND: u16 = 6;
/// Data using transfer pages.
pub const PACKET_TYPE_TRANSFER_PAGES: u16 = 7;
/// Data using a GPADL.
pub const PACKET_TYPE_GPADL: u16 = 8;
/// Data using guest physical addresses directly.
pub const PACKET_TYPE_GPA_DIRECT: u16 = 9;
/// A completion for an earlier packet (matched by `trans_id`).
pub const PACKET_TYPE_COMPLETION: u16 = 11;
/// The sender asks for a completion packet.
pub const FLAG_COMPLETION_REQUESTED: u16 = 1;
/// `feature_bits` bit 0: both sides implement `pending_send_sz` flow control.
pub const FEAT_PENDING_SEND_SZ: u32 = 1;
/// Length of a packet descriptor.
pub const DESCRIPTOR_LEN: usize = 16;
/// Length of the trailer after every packet.
pub const TRAILER_LEN: usize = 8;

/// The control page at the start of every ring (Linux's `struct hv_ring_buffer`).
#[repr(C)]
pub struct RingControl {
    /// Byte offset into the data area where the writer will write next.
    pub write_index: AtomicU32,
    /// Byte offset into the data area where the reader will read next.
    pub read_index: AtomicU32,
    /// Non-zero: the reader is polling and asks the writer not to signal.
    pub interrupt_mask: AtomicU32,
    /// Bytes the blocked writer needs; zero when no writer waits.
    pub pending_send_sz: AtomicU32,
    // The reserved words and padding are atomics too, although we never touch them: every byte
    // of the page is then inside an `UnsafeCell`, so a `&RingControl` stays sound while the peer
    // scribbles anywhere on the page.
    reserved1: [AtomicU32; 12],
    /// Bit 0: `feat_pending_send_sz`.
    pub feature_bits: AtomicU32,
    reserved2: [AtomicU8; PAGE_SIZE - 68],
}

const _: () = assert!(std::mem::size_of::<RingControl>() == PAGE_SIZE);
const _: () = assert!(std::mem::offset_of!(RingControl, write_index) == 0);
const _: () = assert!(std::mem::offset_of!(RingControl, read_index) == 4);
const _: () = assert!(std::mem::offset_of!(RingControl, interrupt_mask) == 8);
const _: () = assert!(std::mem::offset_of!(RingControl, pending_send_sz) == 12);
const _: () = assert!(std::mem::offset_of!(RingControl, feature_bits) == 64);

/// The 16-byte descriptor at the start of every packet (Linux's `struct vmpacket_descriptor`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketDescriptor {
    /// Packet type (`PACKET_TYPE_*`).
    pub ty: u16,
    /// Header length in 8-byte units (2 for a plain inband packet).
    pub offset8: u16,
    /// Whole packet length (descriptor, payload, padding) in 8-byte units.
    pub len8: u16,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Transaction id, echoed by the completion.
    pub trans_id: u64,
}

const _: () = assert!(std::mem::size_of::<PacketDescriptor>() == DESCRIPTOR_LEN);
const _: () = assert!(std::mem::offset_of!(PacketDescriptor, trans_id) == 8);

// Both ends move to the thread (or process) that uses them.
const _: () = {
    const fn send<T: Send>() {}
    send::<RingWriter>();
    send::<RingReader>();
};

impl PacketDescriptor {
    fn to_bytes(self) -> [u8; DESCRIPTOR_LEN] {
        let mut b = [0u8; DESCRIPTOR_LEN];
        b[0..2].copy_from_slice(&self.ty.to_le_bytes());
        b[2..4].copy_from_slice(&self.offset8.to_le_bytes());
        b[4..6].copy_from_slice(&self.len8.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.trans_id.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; DESCRIPTOR_LEN]) -> Self {
        PacketDescriptor {
            ty: u16::from_le_bytes([b[0], b[1]]),
            offset8: u16::from_le_bytes([b[2], b[3]]),
            len8: u16::from_le_bytes([b[4], b[5]]),
            flags: u16::from_le_bytes([b[6], b[7]]),
            trans_id: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        }
    }
}

/// What is wrong with a ring. Every variant except `PacketTooLarge` and `BadLayout` breaks the
/// ring: later calls return [`RingError::Broken`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RingError {
    /// The region handed to a ring is not a control page plus a page-multiple data area.
    #[error(
        "bad ring layout: {len} bytes is not 4096 + a non-zero multiple of 4096 (at most 2^31)"
    )]
    BadLayout { len: usize },
    /// The peer's index is outside the data area.
    #[error("peer's {which} index {value} is outside the {data_len}-byte data area")]
    IndexOutOfRange {
        which: &'static str,
        value: u32,
        data_len: u32,
    },
    /// The peer's index is not 8-byte aligned.
    #[error("peer's {which} index {value} is not 8-byte aligned")]
    IndexMisaligned { which: &'static str, value: u32 },
    /// The peer published fewer bytes than a packet needs.
    #[error("peer published {available} bytes, fewer than a descriptor and trailer ({needed})")]
    Truncated { available: u32, needed: u32 },
    /// A descriptor that cannot describe a packet in the bytes available.
    #[error("bad descriptor (type {ty}, offset8 {offset8}, len8 {len8}) with {available} bytes available: {reason}")]
    BadDescriptor {
        ty: u16,
        offset8: u16,
        len8: u16,
        available: u32,
        reason: &'static str,
    },
    /// The payload is larger than this reader accepts.
    #[error("payload of {len} bytes exceeds the {max}-byte limit")]
    PayloadTooLarge { len: u32, max: u32 },
    /// A packet that could never fit in this ring (not a violation; the ring stays usable).
    #[error("packet needs {needed} bytes but the ring can never hold more than {capacity}")]
    PacketTooLarge { needed: usize, capacity: usize },
    /// An earlier violation broke the ring.
    #[error("ring is broken by an earlier protocol violation")]
    Broken,
}

/// Outcome of [`RingWriter::try_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The packet is published.
    Written {
        /// The ring went from empty to non-empty and the reader has not masked interrupts:
        /// the caller must signal the reader.
        signal: bool,
        /// Bytes in use after this write (for tracing).
        bytes_used: u32,
    },
    /// Too little room: `pending_send_sz` is now `needed` (if the feature is on); wait for the
    /// reader's signal (or poll) and retry.
    Full {
        /// Bytes the packet and its trailer need; the write succeeds once strictly more are free.
        needed: u32,
    },
}

/// Outcome of [`RingReader::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadCommit {
    /// A blocked writer now has the room it asked for: the caller must signal the writer.
    pub signal_writer: bool,
    /// Bytes this commit freed.
    pub bytes_freed: u32,
}

/// Header of a packet read by [`RingReader::read_into`]; the payload is in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    /// Packet type.
    pub ty: u16,
    /// Flags.
    pub flags: u16,
    /// Transaction id.
    pub trans_id: u64,
    /// Payload length including padding to 8 bytes (`(len8 - offset8) * 8`).
    pub payload_len: u32,
}

/// Flow-control counters, read alike Linux's per-channel sysfs files.
#[derive(Debug, Default)]
pub struct RingStats {
    /// Writer: a `try_write` returned `Full` and the previous one had succeeded
    /// (Linux `out_full_first`).
    pub out_full_first: AtomicU64,
    /// Writer: every `try_write` that returned `Full` (Linux `out_full_total`).
    pub out_full_total: AtomicU64,
    /// Writer: writes after which the writer owed the reader a signal because the ring went from
    /// empty to non-empty while the reader had not masked interrupts (Linux `intr_out_empty`).
    pub intr_out_empty: AtomicU64,
    /// Reader: signals owed to a blocked writer because `pending_send_sz` was crossed
    /// (Linux `intr_in_full`): a commit moved the free space from at most `pending_send_sz` to
    /// strictly more than it, with the feature bit set.
    pub intr_in_full: AtomicU64,
    /// Packets written / read.
    pub packets: AtomicU64,
}

/// The shared part common to both ends: the control page and the data area.
struct RingMem {
    control: *const RingControl,
    /// The data area; every access to it is an atomic word copy (see [`crate::shmem`]).
    data: SharedMem,
    data_len: u32,
}

// SAFETY: RingMem only holds pointers into a shared mapping that outlives it (the caller of
// `RingWriter::new`/`RingReader::new` guarantees that); all accesses go through atomics, which are
// valid from any thread.
unsafe impl Send for RingMem {}

impl RingMem {
    /// # Safety
    /// `base` must point to `len` bytes of readable and writable memory that stay mapped for the
    /// lifetime of the returned value, aligned to 8 bytes, and accessed in this process only
    /// through ring ends (see [`SharedMem::new`]).
    unsafe fn new(base: *mut u8, len: usize) -> Result<Self, RingError> {
        if len <= PAGE_SIZE
            || !len.is_multiple_of(PAGE_SIZE)
            || len - PAGE_SIZE > (1 << 31)
            || base.is_null()
        {
            return Err(RingError::BadLayout { len });
        }
        // SAFETY: the data area is the region after the control page, inside it; the caller's
        // guarantees carry over.
        let data = unsafe { SharedMem::new(base.add(PAGE_SIZE), len - PAGE_SIZE) }
            .ok_or(RingError::BadLayout { len })?;
        Ok(RingMem {
            control: base as *const RingControl,
            data,
            data_len: (len - PAGE_SIZE) as u32,
        })
    }

    fn control(&self) -> &RingControl {
        // SAFETY: `new` checked the region holds at least a control page; RingControl is made of
        // atomics only, valid for any bit pattern, so concurrent writes by the peer are not a
        // data race.
        unsafe { &*self.control }
    }

    /// Copies `dst.len()` bytes (a multiple of 8) out of the data area starting at `offset` (a
    /// validated, 8-aligned index), wrapping at the end: each word is read once, atomically.
    fn copy_out(&self, offset: u32, dst: &mut [u8]) {
        debug_assert!(offset < self.data_len && dst.len() <= self.data_len as usize);
        self.data
            .read_wrapping(offset as usize, dst)
            .expect("callers pass validated, aligned offsets and lengths within the ring");
    }

    fn check_index(&self, which: &'static str, value: u32) -> Result<u32, RingError> {
        if value >= self.data_len {
            return Err(RingError::IndexOutOfRange {
                which,
                value,
                data_len: self.data_len,
            });
        }
        if !value.is_multiple_of(8) {
            return Err(RingError::IndexMisaligned { which, value });
        }
        Ok(value)
    }

    /// Free bytes for the writer (Linux `hv_get_bytes_to_write`).
    fn free_bytes(&self, write: u32, read: u32) -> u32 {
        if write >= read {
            self.data_len - (write - read)
        } else {
            read - write
        }
    }
}

/// Initialises a ring's control page: indices zero, no mask, no pending send, and
/// `feature_bits = FEAT_PENDING_SEND_SZ` as Linux creates its rings. Done once, by whoever
/// creates the shared region, before either side uses it.
///
/// # Safety
/// `base` must point to `len` writable bytes, 8-byte aligned, not used by anyone else yet.
pub unsafe fn ring_init(base: *mut u8, len: usize) -> Result<(), RingError> {
    // SAFETY: forwarded from the caller.
    let mem = unsafe { RingMem::new(base, len)? };
    // SAFETY: the control page is inside the region (checked by RingMem::new) and nobody else
    // uses it yet.
    unsafe { std::ptr::write_bytes(base, 0, PAGE_SIZE) };
    mem.control()
        .feature_bits
        .store(FEAT_PENDING_SEND_SZ, Ordering::SeqCst);
    Ok(())
}

/// Validates an index read from the peer, returning early with `Broken` if an earlier violation
/// broke the ring and marking it broken on a new one. A macro rather than a method so that it
/// borrows only the `mem` and `broken` fields.
macro_rules! peer_index {
    ($end:expr, $which:literal, $value:expr) => {{
        if $end.broken {
            return Err(RingError::Broken);
        }
        match $end.mem.check_index($which, $value) {
            Ok(v) => v,
            Err(e) => {
                $end.broken = true;
                return Err(e);
            }
        }
    }};
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// The writing end of a ring.
pub struct RingWriter {
    mem: RingMem,
    /// Our own copy of the write index: the peer cannot move it under us.
    write: u32,
    pending_set: bool,
    last_was_full: bool,
    broken: bool,
    stats: Arc<RingStats>,
}

impl RingWriter {
    /// A writer over an initialised ring (see [`ring_init`]).
    ///
    /// # Safety
    /// `base` must point to `len` readable and writable bytes, 8-byte aligned, that stay mapped
    /// while the writer lives and that this process accesses only through ring ends (see
    /// [`SharedMem::new`]), and only one writer may exist per ring.
    pub unsafe fn new(base: *mut u8, len: usize) -> Result<Self, RingError> {
        // SAFETY: forwarded from the caller.
        let mem = unsafe { RingMem::new(base, len)? };
        let mut writer = RingWriter {
            write: 0,
            mem,
            pending_set: false,
            last_was_full: false,
            broken: false,
            stats: Arc::new(RingStats::default()),
        };
        // A writer taking over an existing ring (another process created it) resumes at the
        // published index, which must itself be valid.
        let published = writer.mem.control().write_index.load(Ordering::Acquire);
        writer.write = peer_index!(writer, "write", published);
        Ok(writer)
    }

    /// Size of the data area.
    pub fn data_len(&self) -> u32 {
        self.mem.data_len
    }

    /// Counters of this writer.
    pub fn stats(&self) -> Arc<RingStats> {
        Arc::clone(&self.stats)
    }

    /// Free bytes now (a packet of `n` bytes plus trailer fits when this is strictly larger).
    pub fn free_bytes(&mut self) -> Result<u32, RingError> {
        let read = self.mem.control().read_index.load(Ordering::Acquire);
        let read = peer_index!(self, "read", read);
        Ok(self.mem.free_bytes(self.write, read))
    }

    /// Bytes written and not yet consumed by the reader.
    pub fn bytes_used(&mut self) -> Result<u32, RingError> {
        Ok(self.mem.data_len - self.free_bytes()?)
    }

    /// Bytes the ring needs free (strictly more than this) for a packet with `payload_len`.
    pub fn packet_space(payload_len: usize) -> usize {
        DESCRIPTOR_LEN + align8(payload_len) + TRAILER_LEN
    }

    /// Writes one packet made of the concatenated `payload` pieces.
    pub fn try_write(
        &mut self,
        ty: u16,
        flags: u16,
        trans_id: u64,
        payload: &[&[u8]],
    ) -> Result<WriteOutcome, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        let payload_len: usize = payload.iter().map(|p| p.len()).sum();
        let packet_len = DESCRIPTOR_LEN + align8(payload_len);
        let total = packet_len + TRAILER_LEN;
        let capacity = self.mem.data_len as usize - 1;
        if packet_len / 8 > u16::MAX as usize || total > capacity {
            return Err(RingError::PacketTooLarge {
                needed: total,
                capacity,
            });
        }
        let ctl = self.mem.control();
        let read = peer_index!(self, "read", ctl.read_index.load(Ordering::Acquire));
        let free = self.mem.free_bytes(self.write, read);
        if free as usize <= total {
            if ctl.feature_bits.load(Ordering::Relaxed) & FEAT_PENDING_SEND_SZ != 0 {
                ctl.pending_send_sz.store(total as u32, Ordering::SeqCst);
                self.pending_set = true;
            }
            // The reader may have freed space between our read of its index and the store of
            // pending_send_sz, and then seen pending_send_sz == 0 and not signalled: re-check so
            // a caller that now sleeps is not lost.
            fence(Ordering::SeqCst);
            let read_again = peer_index!(self, "read", ctl.read_index.load(Ordering::Acquire));
            if self.mem.free_bytes(self.write, read_again) as usize <= total {
                // Counted like Linux: only writes that really fail (out_full_total), and the
                // first failure after a success (out_full_first).
                self.stats.out_full_total.fetch_add(1, Ordering::Relaxed);
                if !self.last_was_full {
                    self.stats.out_full_first.fetch_add(1, Ordering::Relaxed);
                }
                self.last_was_full = true;
                return Ok(WriteOutcome::Full {
                    needed: total as u32,
                });
            }
        }
        self.last_was_full = false;
        if self.pending_set {
            ctl.pending_send_sz.store(0, Ordering::SeqCst);
            self.pending_set = false;
        }

        let old_write = self.write;
        let desc = PacketDescriptor {
            ty,
            offset8: (DESCRIPTOR_LEN / 8) as u16,
            len8: (packet_len / 8) as u16,
            flags,
            trans_id,
        };
        // Whole words, each stored once, atomically: the reader may be reading (and a hostile
        // one writing) this memory at any moment.
        let mut words = self.mem.data.word_writer(old_write as usize);
        words.push(&desc.to_bytes());
        for piece in payload {
            words.push(piece);
        }
        words.pad_to_word();
        words.push(&((old_write as u64) << 32).to_le_bytes());
        let at = words.finish() as u32;
        self.write = at;

        // Publish: the packet bytes must be visible before the index (Linux: virt_mb()).
        fence(Ordering::SeqCst);
        ctl.write_index.store(self.write, Ordering::SeqCst);
        self.stats.packets.fetch_add(1, Ordering::Relaxed);

        // hv_signal_on_write: signal only if the reader has not masked interrupts and the ring
        // was empty before this write (the reader had consumed everything up to old_write).
        fence(Ordering::SeqCst);
        let signal = if ctl.interrupt_mask.load(Ordering::SeqCst) != 0 {
            false
        } else {
            ctl.read_index.load(Ordering::SeqCst) == old_write
        };
        if signal {
            self.stats.intr_out_empty.fetch_add(1, Ordering::Relaxed);
        }
        let read_now = ctl.read_index.load(Ordering::Acquire);
        let used = match self.mem.check_index("read", read_now) {
            Ok(r) => self.mem.data_len - self.mem.free_bytes(self.write, r),
            Err(_) => 0, // reported by the next call
        };
        Ok(WriteOutcome::Written {
            signal,
            bytes_used: used,
        })
    }

    /// Whether the reader has masked interrupts (is polling).
    pub fn reader_masked(&self) -> bool {
        self.mem.control().interrupt_mask.load(Ordering::SeqCst) != 0
    }

    /// Whether the reader has consumed everything written (the ring is empty).
    pub fn is_empty(&mut self) -> Result<bool, RingError> {
        let read = self.mem.control().read_index.load(Ordering::Acquire);
        let read = peer_index!(self, "read", read);
        Ok(read == self.write)
    }

    /// Withdraws a pending-send request (the writer gave up waiting).
    pub fn clear_pending_send(&mut self) {
        if self.pending_set {
            self.mem
                .control()
                .pending_send_sz
                .store(0, Ordering::SeqCst);
            self.pending_set = false;
        }
    }
}

/// The reading end of a ring.
pub struct RingReader {
    mem: RingMem,
    /// Our own copy of the read index, advanced by reads and published by `commit`.
    read: u32,
    /// The read index as last published.
    published: u32,
    max_payload: u32,
    broken: bool,
    scratch: [u8; DESCRIPTOR_LEN],
    stats: Arc<RingStats>,
}

impl RingReader {
    /// A reader over an initialised ring. It accepts any payload that fits in the ring; lower
    /// the cap with [`set_max_payload`](Self::set_max_payload).
    ///
    /// # Safety
    /// As for [`RingWriter::new`]; only one reader may exist per ring.
    pub unsafe fn new(base: *mut u8, len: usize) -> Result<Self, RingError> {
        // SAFETY: forwarded from the caller.
        unsafe { Self::with_max_payload(base, len, u32::MAX) }
    }

    /// A reader over an initialised ring that accepts payloads of at most `max_payload` bytes.
    ///
    /// # Safety
    /// As for [`RingWriter::new`]; only one reader may exist per ring.
    pub unsafe fn with_max_payload(
        base: *mut u8,
        len: usize,
        max_payload: u32,
    ) -> Result<Self, RingError> {
        // SAFETY: forwarded from the caller.
        let mem = unsafe { RingMem::new(base, len)? };
        let mut reader = RingReader {
            mem,
            read: 0,
            published: 0,
            max_payload,
            broken: false,
            scratch: [0; DESCRIPTOR_LEN],
            stats: Arc::new(RingStats::default()),
        };
        let published = reader.mem.control().read_index.load(Ordering::Acquire);
        let published = peer_index!(reader, "read", published);
        reader.read = published;
        reader.published = published;
        Ok(reader)
    }

    /// Size of the data area.
    pub fn data_len(&self) -> u32 {
        self.mem.data_len
    }

    /// Caps the payload length this reader accepts; a longer packet is
    /// [`RingError::PayloadTooLarge`] and breaks the ring.
    pub fn set_max_payload(&mut self, max_payload: u32) {
        self.max_payload = max_payload;
    }

    /// Counters of this reader.
    pub fn stats(&self) -> Arc<RingStats> {
        Arc::clone(&self.stats)
    }

    fn write_index(&mut self) -> Result<u32, RingError> {
        let write = self.mem.control().write_index.load(Ordering::Acquire);
        Ok(peer_index!(self, "write", write))
    }

    /// Bytes published by the writer and not yet read by us.
    pub fn bytes_available(&mut self) -> Result<u32, RingError> {
        let write = self.write_index()?;
        Ok(self.mem.data_len - self.mem.free_bytes(write, self.read))
    }

    /// Whether a packet is waiting.
    pub fn has_data(&mut self) -> Result<bool, RingError> {
        Ok(self.bytes_available()? > 0)
    }

    /// Reads and validates one packet into `buf` (replacing its contents). The read index is not
    /// published until [`commit`](Self::commit). `Ok(None)` when the ring is empty.
    pub fn read_into(&mut self, buf: &mut Vec<u8>) -> Result<Option<PacketHeader>, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        let available = self.bytes_available()?;
        if available == 0 {
            return Ok(None);
        }
        let min = (DESCRIPTOR_LEN + TRAILER_LEN) as u32;
        if available < min {
            self.broken = true;
            return Err(RingError::Truncated {
                available,
                needed: min,
            });
        }
        let mut scratch = self.scratch;
        self.mem.copy_out(self.read, &mut scratch);
        let desc = PacketDescriptor::from_bytes(&scratch);
        let bad = |reason| RingError::BadDescriptor {
            ty: desc.ty,
            offset8: desc.offset8,
            len8: desc.len8,
            available,
            reason,
        };
        let check = if desc.offset8 < 2 {
            Err(bad("offset8 is smaller than the descriptor"))
        } else if desc.len8 < desc.offset8 {
            Err(bad("offset8 points past the end of the packet"))
        } else if desc.len8 as u32 * 8 + TRAILER_LEN as u32 > available {
            Err(bad("packet is longer than the bytes published"))
        } else {
            Ok(())
        };
        if let Err(e) = check {
            self.broken = true;
            return Err(e);
        }
        let payload_len = (desc.len8 - desc.offset8) as u32 * 8;
        if payload_len > self.max_payload {
            self.broken = true;
            return Err(RingError::PayloadTooLarge {
                len: payload_len,
                max: self.max_payload,
            });
        }
        let payload_at = (self.read + desc.offset8 as u32 * 8) % self.mem.data_len;
        self.mem
            .data
            .read_wrapping_to_vec(payload_at as usize, payload_len as usize, buf)
            .expect("a validated payload lies within the ring");
        self.read = (self.read + desc.len8 as u32 * 8 + TRAILER_LEN as u32) % self.mem.data_len;
        self.stats.packets.fetch_add(1, Ordering::Relaxed);
        Ok(Some(PacketHeader {
            ty: desc.ty,
            flags: desc.flags,
            trans_id: desc.trans_id,
            payload_len,
        }))
    }

    /// Reads one packet into a new buffer.
    pub fn read(&mut self) -> Result<Option<(PacketHeader, Vec<u8>)>, RingError> {
        let mut buf = Vec::new();
        Ok(self.read_into(&mut buf)?.map(|h| (h, buf)))
    }

    /// Publishes the read index, freeing the space of every packet read since the last commit,
    /// and applies the `pending_send_sz` rule (Linux `hv_pkt_iter_close`). Infallible: on a broken ring
    /// it publishes nothing and returns the default (no signal); the next read reports the error.
    pub fn commit(&mut self) -> ReadCommit {
        if self.broken || self.read == self.published {
            return ReadCommit::default();
        }
        let bytes_read = (self.read + self.mem.data_len - self.published) % self.mem.data_len;
        let ctl = self.mem.control();
        // The reads of the packet bytes must complete before the writer may reuse the space.
        fence(Ordering::SeqCst);
        ctl.read_index.store(self.read, Ordering::SeqCst);
        self.published = self.read;
        fence(Ordering::SeqCst);
        let mut commit = ReadCommit {
            signal_writer: false,
            bytes_freed: bytes_read,
        };
        if ctl.feature_bits.load(Ordering::SeqCst) & FEAT_PENDING_SEND_SZ == 0 {
            return commit;
        }
        let pending = ctl.pending_send_sz.load(Ordering::SeqCst);
        if pending == 0 {
            return commit;
        }
        // A bad write index breaks the ring; the next read reports it.
        let Ok(write) = self.write_index() else {
            return commit;
        };
        let free_now = self.mem.free_bytes(write, self.read);
        let free_before = free_now.saturating_sub(bytes_read);
        // Signal only if the space was not already enough before this pass and is now strictly
        // more than what the writer asked for.
        if free_before <= pending && free_now > pending {
            commit.signal_writer = true;
            self.stats.intr_in_full.fetch_add(1, Ordering::Relaxed);
        }
        commit
    }

    /// Sets or clears `interrupt_mask` on this ring. After clearing it the caller must check
    /// [`has_data`](Self::has_data) once more before sleeping: a packet written while the mask
    /// was set raised no signal (the lost-wake-up guard). The full fence orders the store before
    /// that re-check.
    pub fn set_interrupt_mask(&self, masked: bool) {
        self.mem
            .control()
            .interrupt_mask
            .store(masked as u32, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Whether this reader has masked interrupts.
    pub fn interrupt_masked(&self) -> bool {
        self.mem.control().interrupt_mask.load(Ordering::SeqCst) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::ptr;

    /// A heap region standing in for shared memory, 4 KiB aligned.
    pub(crate) struct Region {
        ptr: *mut u8,
        len: usize,
    }

    impl Region {
        pub(crate) fn new(data_pages: usize) -> Region {
            let len = PAGE_SIZE * (1 + data_pages);
            let layout = std::alloc::Layout::from_size_align(len, PAGE_SIZE).unwrap();
            // SAFETY: layout has non-zero size.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            // SAFETY: ptr points to len fresh bytes.
            unsafe { ring_init(ptr, len).unwrap() };
            Region { ptr, len }
        }
        pub(crate) fn pair(&self, max_payload: u32) -> (RingWriter, RingReader) {
            // SAFETY: the region outlives the ends in every test (dropped last).
            unsafe {
                (
                    RingWriter::new(self.ptr, self.len).unwrap(),
                    RingReader::with_max_payload(self.ptr, self.len, max_payload).unwrap(),
                )
            }
        }
        fn control(&self) -> &RingControl {
            // SAFETY: the region starts with a control page.
            unsafe { &*(self.ptr as *const RingControl) }
        }
        /// Copies `n` bytes out of the data area at `at` (raw copy, no reference into it).
        fn peek(&self, at: usize, n: usize) -> Vec<u8> {
            assert!(at + n <= self.len - PAGE_SIZE);
            let mut out = vec![0u8; n];
            // SAFETY: bounds checked above; the destination is a local buffer.
            unsafe { ptr::copy_nonoverlapping(self.ptr.add(PAGE_SIZE + at), out.as_mut_ptr(), n) };
            out
        }
        /// Writes `bytes` into the data area at `at`, as a (hostile) peer would.
        fn poke(&self, at: usize, bytes: &[u8]) {
            assert!(at + bytes.len() <= self.len - PAGE_SIZE);
            // SAFETY: bounds checked above; the source is a local buffer.
            unsafe {
                ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(PAGE_SIZE + at), bytes.len())
            };
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            let layout = std::alloc::Layout::from_size_align(self.len, PAGE_SIZE).unwrap();
            // SAFETY: allocated with this layout in new().
            unsafe { std::alloc::dealloc(self.ptr, layout) };
        }
    }

    fn payload(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn round_trip_and_layout() {
        let region = Region::new(1);
        let (mut w, mut r) = region.pair(4096);
        assert_eq!(
            region.control().feature_bits.load(Ordering::SeqCst),
            FEAT_PENDING_SEND_SZ
        );
        let p = payload(13, 1);
        let out = w
            .try_write(PACKET_TYPE_INBAND, FLAG_COMPLETION_REQUESTED, 77, &[&p])
            .unwrap();
        assert_eq!(
            out,
            WriteOutcome::Written {
                signal: true,
                bytes_used: 16 + 16 + 8
            }
        );
        assert_eq!(region.control().write_index.load(Ordering::SeqCst), 40);
        // descriptor as Linux lays it out
        let d = region.peek(0, 16);
        assert_eq!(u16::from_le_bytes([d[0], d[1]]), PACKET_TYPE_INBAND);
        assert_eq!(u16::from_le_bytes([d[2], d[3]]), 2);
        assert_eq!(u16::from_le_bytes([d[4], d[5]]), 4);
        // trailer holds the previous write index (0) in its upper half
        assert_eq!(region.peek(32, 8), [0u8; 8]);
        let (h, buf) = r.read().unwrap().unwrap();
        assert_eq!(
            h,
            PacketHeader {
                ty: 6,
                flags: 1,
                trans_id: 77,
                payload_len: 16
            }
        );
        assert_eq!(&buf[..13], &p[..]);
        assert_eq!(&buf[13..], &[0, 0, 0]);
        assert!(r.read().unwrap().is_none());
        assert_eq!(r.commit().bytes_freed, 40);
        assert_eq!(region.control().read_index.load(Ordering::SeqCst), 40);
        // second write: the trailer now carries 40 << 32
        w.try_write(PACKET_TYPE_INBAND, 0, 1, &[&[1u8; 8]]).unwrap();
        let t = region.peek(40 + 24, 8);
        assert_eq!(u64::from_le_bytes(t.try_into().unwrap()), 40u64 << 32);
    }

    #[test]
    fn wrap_around_straddles_the_end() {
        let region = Region::new(1);
        let (mut w, mut r) = region.pair(4096);
        // Advance both indices close to the end, then write packets that straddle it.
        for round in 0..50u64 {
            let p = payload(200 + round as usize * 7, round as u8);
            assert!(matches!(
                w.try_write(6, 0, round, &[&p[..50], &p[50..]]).unwrap(),
                WriteOutcome::Written { .. }
            ));
            let (h, buf) = r.read().unwrap().unwrap();
            assert_eq!(h.trans_id, round);
            assert_eq!(&buf[..p.len()], &p[..]);
            r.commit();
        }
        assert!(r.data_len() == 4096);
    }

    #[test]
    fn never_completely_full() {
        let region = Region::new(1); // 4096-byte data area
        let (mut w, mut r) = region.pair(8192);
        // One packet of total (packet + trailer) 4088 leaves 8 free bytes: needs free > 4088: ok.
        let big = payload(4088 - 16 - 8, 3);
        assert!(matches!(
            w.try_write(6, 0, 1, &[&big]).unwrap(),
            WriteOutcome::Written { .. }
        ));
        assert_eq!(w.free_bytes().unwrap(), 8);
        r.read().unwrap().unwrap();
        r.commit();
        // Exactly the whole data area (4096 with trailer) can never be written.
        let whole = payload(4096 - 16 - 8, 4);
        assert!(matches!(
            w.try_write(6, 0, 2, &[&whole]),
            Err(RingError::PacketTooLarge { .. })
        ));
        // Exactly the free space: refused (free must be strictly larger).
        let a = payload(2048 - 24, 5);
        assert!(matches!(
            w.try_write(6, 0, 3, &[&a]).unwrap(),
            WriteOutcome::Written { .. }
        ));
        assert_eq!(w.free_bytes().unwrap(), 2048);
        let exactly = payload(2048 - 24, 6);
        assert_eq!(
            w.try_write(6, 0, 4, &[&exactly]).unwrap(),
            WriteOutcome::Full { needed: 2048 }
        );
        let less = payload(2048 - 24 - 8, 6);
        assert!(matches!(
            w.try_write(6, 0, 5, &[&less]).unwrap(),
            WriteOutcome::Written { .. }
        ));
        assert_eq!(w.free_bytes().unwrap(), 8);
        let write = region.control().write_index.load(Ordering::SeqCst);
        assert_ne!(write, region.control().read_index.load(Ordering::SeqCst));
    }

    #[test]
    fn signal_only_on_empty_to_non_empty_and_not_when_masked() {
        let region = Region::new(2);
        let (mut w, mut r) = region.pair(4096);
        let sig = |o: WriteOutcome| matches!(o, WriteOutcome::Written { signal: true, .. });
        assert!(sig(w.try_write(6, 0, 1, &[&[0u8; 16]]).unwrap()));
        assert!(!sig(w.try_write(6, 0, 2, &[&[0u8; 16]]).unwrap()));
        // Reading without committing leaves the ring non-empty from the writer's view.
        r.read().unwrap().unwrap();
        assert!(!sig(w.try_write(6, 0, 3, &[&[0u8; 16]]).unwrap()));
        while r.read().unwrap().is_some() {}
        r.commit();
        assert!(sig(w.try_write(6, 0, 4, &[&[0u8; 16]]).unwrap()));
        while r.read().unwrap().is_some() {}
        r.commit();
        // Polling reader: masked, so no signal even on the empty-to-non-empty transition.
        r.set_interrupt_mask(true);
        assert!(!sig(w.try_write(6, 0, 5, &[&[0u8; 16]]).unwrap()));
        // Lost-wake-up guard: after unmasking the reader re-checks and finds the packet.
        r.set_interrupt_mask(false);
        assert!(r.has_data().unwrap());
        assert_eq!(w.stats().intr_out_empty.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn pending_send_sz_signals_exactly_once_when_crossed() {
        let region = Region::new(1);
        let (mut w, mut r) = region.pair(4096);
        let p = payload(1000, 1); // 16 + 1000 + 8 = 1024 bytes per packet
        let mut written = 0;
        let needed = loop {
            match w.try_write(6, 0, written, &[&p]).unwrap() {
                WriteOutcome::Written { .. } => written += 1,
                WriteOutcome::Full { needed } => break needed,
            }
        };
        assert_eq!(written, 3);
        assert_eq!(needed, 1024);
        assert_eq!(
            region.control().pending_send_sz.load(Ordering::SeqCst),
            1024
        );
        assert_eq!(w.stats().out_full_first.load(Ordering::Relaxed), 1);
        // Free space now 4096 - 3072 = 1024, not more than 1024. Reading one packet frees 1024:
        // 2048 > 1024, so the reader signals.
        r.read().unwrap().unwrap();
        let c = r.commit();
        assert!(c.signal_writer);
        // Already enough before the next pass: no second signal.
        r.read().unwrap().unwrap();
        assert!(!r.commit().signal_writer);
        // The writer succeeds and clears pending_send_sz.
        assert!(matches!(
            w.try_write(6, 0, 9, &[&p]).unwrap(),
            WriteOutcome::Written { .. }
        ));
        assert_eq!(region.control().pending_send_sz.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn no_flow_control_signal_without_the_feature_bit() {
        let region = Region::new(1);
        region.control().feature_bits.store(0, Ordering::SeqCst);
        let (mut w, mut r) = region.pair(4096);
        let p = payload(1000, 1);
        while let WriteOutcome::Written { .. } = w.try_write(6, 0, 0, &[&p]).unwrap() {}
        assert_eq!(region.control().pending_send_sz.load(Ordering::SeqCst), 0);
        r.read().unwrap().unwrap();
        assert!(!r.commit().signal_writer);
    }

    #[test]
    fn hostile_write_index_breaks_the_ring() {
        for bad in [4096u32, 1_000_000, 12] {
            let region = Region::new(1);
            let (_w, mut r) = region.pair(4096);
            region.control().write_index.store(bad, Ordering::SeqCst);
            let e = r.read().unwrap_err();
            assert!(
                matches!(
                    e,
                    RingError::IndexOutOfRange { .. } | RingError::IndexMisaligned { .. }
                ),
                "{e}"
            );
            assert_eq!(r.read().unwrap_err(), RingError::Broken);
        }
    }

    #[test]
    fn hostile_read_index_breaks_the_writer() {
        for bad in [4100u32, 4096, u32::MAX, 12] {
            let region = Region::new(1);
            let (mut w, _r) = region.pair(4096);
            region.control().read_index.store(bad, Ordering::SeqCst);
            let e = w.try_write(6, 0, 0, &[&[1u8; 8]]).unwrap_err();
            let expect = if bad == 12 {
                RingError::IndexMisaligned {
                    which: "read",
                    value: 12,
                }
            } else {
                RingError::IndexOutOfRange {
                    which: "read",
                    value: bad,
                    data_len: 4096,
                }
            };
            assert_eq!(e, expect);
            assert_eq!(w.try_write(6, 0, 0, &[&[1u8; 8]]), Err(RingError::Broken));
            assert_eq!(w.free_bytes(), Err(RingError::Broken));
        }
    }

    #[test]
    fn hostile_descriptors_are_rejected() {
        let cases: [(u16, u16, &str); 4] = [
            (1, 4, "offset8 < 2"),
            (5, 4, "offset8 > len8"),
            (2, 400, "len8 beyond what is published"),
            (2, 2000, "len8 beyond the ring"),
        ];
        for (offset8, len8, what) in cases {
            let region = Region::new(1);
            let (mut w, mut r) = region.pair(4096);
            w.try_write(6, 0, 1, &[&[0u8; 16]]).unwrap();
            region.poke(2, &offset8.to_le_bytes());
            region.poke(4, &len8.to_le_bytes());
            let e = r.read().unwrap_err();
            assert!(matches!(e, RingError::BadDescriptor { .. }), "{what}: {e}");
            assert_eq!(r.read().unwrap_err(), RingError::Broken, "{what}");
        }
    }

    #[test]
    fn oversized_payload_is_rejected() {
        let region = Region::new(2);
        let (mut w, mut r) = region.pair(64);
        w.try_write(6, 0, 1, &[&[0u8; 100]]).unwrap();
        assert!(matches!(
            r.read(),
            Err(RingError::PayloadTooLarge { len: 104, max: 64 })
        ));
    }

    #[test]
    fn threads_pass_many_packets_in_order() {
        let region = Region::new(2);
        let (mut w, mut r) = region.pair(4096);
        const N: u64 = 100_000;
        let producer = std::thread::spawn(move || {
            let mut i = 0;
            while i < N {
                let p = (i as u32).to_le_bytes();
                match w
                    .try_write(6, 0, i, &[&p, &[0u8; 20][..(i % 20) as usize]])
                    .unwrap()
                {
                    WriteOutcome::Written { .. } => i += 1,
                    WriteOutcome::Full { .. } => std::thread::yield_now(),
                }
            }
        });
        let mut next = 0;
        let mut buf = Vec::new();
        while next < N {
            match r.read_into(&mut buf).unwrap() {
                Some(h) => {
                    assert_eq!(h.trans_id, next);
                    assert_eq!(
                        u32::from_le_bytes(buf[..4].try_into().unwrap()),
                        next as u32
                    );
                    next += 1;
                    if next % 8 == 0 {
                        r.commit();
                    }
                }
                None => {
                    r.commit();
                    std::thread::yield_now();
                }
            }
        }
        producer.join().unwrap();
        drop(region);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(usize),
        Read,
        Commit,
        Mask(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..900).prop_map(Op::Write),
            3 => Just(Op::Read),
            2 => Just(Op::Commit),
            1 => any::<bool>().prop_map(Op::Mask),
        ]
    }

    proptest! {
        /// Model-based: the ring behaves like a bounded byte-accounted queue, and its signal
        /// decisions match the rules computed on the model.
        #[test]
        fn ring_matches_model(ops in proptest::collection::vec(op(), 1..300)) {
            let region = Region::new(1);
            let (mut w, mut r) = region.pair(4096);
            let data_len = 4096usize;
            // model: packets written and not committed-away, split into read and unread
            let mut unread: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
            let mut read_uncommitted = 0usize; // bytes read but not committed
            let mut committed_used = 0usize; // bytes in use from the writer's point of view
            let mut masked = false;
            let mut pending = 0usize;
            let mut seq = 0u64;
            let mut buf = Vec::new();
            for op in ops {
                match op {
                    Op::Write(n) => {
                        let p = payload(n, seq as u8);
                        let total = RingWriter::packet_space(n);
                        let free = data_len - committed_used;
                        let out = w.try_write(6, 0, seq, &[&p]).unwrap();
                        if free > total {
                            let was_empty = committed_used == 0;
                            prop_assert_eq!(out, WriteOutcome::Written { signal: was_empty && !masked, bytes_used: (committed_used + total) as u32 });
                            committed_used += total;
                            unread.push_back((seq, p));
                            pending = 0;
                        } else {
                            prop_assert_eq!(out, WriteOutcome::Full { needed: total as u32 });
                            pending = total;
                        }
                        seq += 1;
                    }
                    Op::Read => {
                        let got = r.read_into(&mut buf).unwrap();
                        match unread.pop_front() {
                            Some((id, p)) => {
                                let h = got.unwrap();
                                prop_assert_eq!(h.trans_id, id);
                                prop_assert_eq!(&buf[..p.len()], &p[..]);
                                read_uncommitted += RingWriter::packet_space(p.len());
                            }
                            None => prop_assert!(got.is_none()),
                        }
                    }
                    Op::Commit => {
                        let c = r.commit();
                        let before = data_len - committed_used;
                        committed_used -= read_uncommitted;
                        let now = data_len - committed_used;
                        let expect = read_uncommitted > 0 && pending != 0 && before <= pending && now > pending;
                        prop_assert_eq!(c.signal_writer, expect);
                        read_uncommitted = 0;
                    }
                    Op::Mask(m) => {
                        r.set_interrupt_mask(m);
                        masked = m;
                    }
                }
            }
        }

        /// A hostile peer writing arbitrary bytes anywhere never makes the reader panic, loop
        /// forever or return a payload larger than its limit.
        #[test]
        fn garbage_never_panics(
            pokes in proptest::collection::vec((0usize..(PAGE_SIZE + 4096), any::<u8>()), 0..64),
            writes in proptest::collection::vec(0usize..600, 0..10),
        ) {
            let region = Region::new(1);
            let (mut w, mut r) = region.pair(1024);
            for (i, n) in writes.iter().enumerate() {
                let _ = w.try_write(6, 0, i as u64, &[&payload(*n, 1)]);
            }
            for (at, byte) in pokes {
                // SAFETY: at < region length; no end is copying concurrently.
                unsafe { *region.ptr.add(at) = byte };
            }
            let mut buf = Vec::new();
            for _ in 0..64 {
                match r.read_into(&mut buf) {
                    Ok(Some(h)) => prop_assert!(h.payload_len <= 1024 && buf.len() as u32 == h.payload_len),
                    Ok(None) => break,
                    Err(_) => { prop_assert_eq!(r.read_into(&mut buf), Err(RingError::Broken)); break; }
                }
                let _ = r.commit();
            }
            for i in 0..8 {
                let _ = w.try_write(6, 0, i, &[&[0u8; 32]]);
            }
        }
    }
}
