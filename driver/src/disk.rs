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
//! re-checks for completions that raced in, and sleeps on the channel's eventfd. Both policies
//! are the transport's ([`enlight_vmbus::moderation`], [`enlight_vmbus::poll`]), shared with the
//! NIC.
//!
//! Every knob can change while I/O runs ([`live`]): both loops read moderation and the polling
//! budget from [`DiskLive`] on every pass, and a ring resize switches both ends to a new channel
//! between two I/Os (see [`live`] for how, and [`enlight_vmbus::switch`] for the handshake).
//!
//! Layout, as the NIC's: `proto` (the request and completion records), `vsc` (the guest
//! driver), `vsp` (the host service: one method per step of a pass), `backing` (the backing
//! file), `device` ([`SyntheticDisk`], both sides in one process), `live` (the live settings
//! and the resize hand-over); everything public is re-exported here.

mod backing;
mod device;
mod live;
mod proto;
#[cfg(test)]
mod tests;
mod vsc;
mod vsp;

pub use backing::Backing;
pub use device::SyntheticDisk;
pub use live::{DiskLive, ResizeReport, RESIZE_RUN_TIMEOUT, RESIZE_START_TIMEOUT};
pub use proto::{
    DiskCompletion, DiskRequest, MAX_PACKET_PAYLOAD, OP_SWITCH_CHANNEL, SECTOR, SWITCH_TAG,
};
pub use vsc::{Completion, DiskVsc, Submitted};
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use vsp::{classify, do_io, GuestPacket};
pub use vsp::{serve, VspControl, VspHandle, VspStats};

use crate::channel::ChannelError;
use crate::ring::RingError;

pub use crate::trace::TRACE_FLUSH;
/// Alignment of every data slot in the shared area (enough for `O_DIRECT`).
pub const SLOT_ALIGN: usize = 4096;

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
