//! The disk's wire format: what a request and a completion look like in a packet's payload.
//!
//! A request is the payload of an inband packet asking for a completion, with `trans_id` = the
//! request's tag; the completion comes back as a completion packet with the same tag. Both are
//! `#[repr(C)]` little-endian records of fixed size, decoded only from our own copy of the
//! payload (copied out of the ring once).

/// Sector size of the synthetic disk.
pub const SECTOR: u32 = 512;
/// Largest packet payload either side of a disk channel accepts (requests are 32 bytes).
pub const MAX_PACKET_PAYLOAD: u32 = 256;
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
