//! enlight's VMBus-style transport: what a synthetic device's two halves share, below any device.
//!
//! Layout, bottom up:
//! - [`shmem`]: every access to memory a peer may write (atomic word copies, each byte read once).
//! - [`ring`]: one VMBus-style ring buffer in shared memory (Hyper-V layout, signalling and
//!   flow-control rules). Everything the peer writes is untrusted and validated before use.
//! - [`channel`]: a channel is two rings plus two eventfds in one memfd-backed region, usable from
//!   two threads or handed to another process over a Unix socket.
//! - [`moderation`]: interrupt moderation on a ring's writer side (a signal owed, fired after
//!   `frames` packets or `usecs`).
//! - [`poll`]: NAPI-style polling on a ring's reader side (mask while passes fill their budget,
//!   unmask and re-check before sleeping).
//! - [`switch`]: the live channel switch (a ring resize) both ends of every device perform.
//! - `mock` (feature `test-utils`, and in tests): a scripted peer on either end of a real
//!   channel, for testing one side of a device without the other.
//! - `fuzzing` (feature `fuzzing`, and in tests): the ring and channel harnesses behind the
//!   cargo-fuzz targets in `vmbus/fuzz/`, and the scribbler (a peer writing shared memory while
//!   our side reads it) the device harnesses above use too.
//!
//! The devices (`enlight_driver::disk`, `enlight_driver::nic`) are built on this crate;
//! `enlight_driver` re-exports its modules under their old paths (`enlight_driver::ring`, ...).

pub mod channel;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod moderation;
pub mod poll;
pub mod ring;
pub mod shmem;
pub mod switch;
