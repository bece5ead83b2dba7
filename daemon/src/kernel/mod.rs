//! The running kernel's own devices: discovery from sysfs, the collector that turns the kernel
//! probes' maps into device state, and the tuning backends (ethtool netlink for NICs, sysfs
//! queue settings for block devices) with a persisted journal of every original value.
//! See docs/kernel.md.

pub mod blockq;
pub mod discovery;
pub mod ethtool;
pub mod journal;
pub mod tune;
