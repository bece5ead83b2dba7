//! The NIC's messages: the payloads of the ring packets either side writes, and their codecs.
//! Decoders take untrusted bytes and return `None` rather than fail on short or unknown input.

/// Message type of a [`TxRequest`].
pub const MSG_TX: u32 = 1;
/// Message type of an [`RxPost`].
pub const MSG_RX_POST: u32 = 2;
/// Message type of an [`RxPacket`].
pub const MSG_RX: u32 = 3;
/// Message type of the channel switch request (a ring resize), sent with the tag
/// [`SWITCH_TAG`](crate::disk::SWITCH_TAG), which no frame can carry.
pub const MSG_SWITCH: u32 = 4;
/// Smallest frame either side accepts (an Ethernet header).
pub const ETH_HLEN: u32 = 14;
/// Largest packet payload either side's reader accepts (messages are at most 24 bytes).
pub const MAX_MESSAGE: u32 = 64;

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

/// The channel switch request: `msg, 0, 0, 0`, little-endian `u32`s.
pub fn switch_request() -> [u8; 16] {
    words([MSG_SWITCH, 0, 0, 0])
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
    /// Move to the new channel offered (a ring resize).
    Switch,
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
            MSG_SWITCH => Some(GuestMessage::Switch),
            _ => None,
        }
    }
}
