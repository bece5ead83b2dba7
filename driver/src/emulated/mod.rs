//! Emulated devices: register-level device models where every register access traps to the
//! model synchronously, the way a VMM emulates legacy hardware (QEMU's `hw/ide/core.c`). They
//! are the baseline the enlightened (synthetic, ring-based) devices are compared against.
//!
//! Each device is a model (the device, as the VMM emulates it) and the guest's driver for it:
//!
//! - [`ide`]: the model of an IDE/ATA disk in PIO mode over the same backing file as the
//!   synthetic disk; [`ide_driver`]: the guest's polling ATA PIO driver for it.
//! - [`ne2000`]: the model of an NE2000 NIC; [`ne2000_driver`]: the guest's driver for it
//!   (Linux's `ne.c`/`8390.c`); [`nic`]: both end to end between two namespaces.
//! - [`pio`]: the port-I/O interface between a guest driver and a model, and the thread
//!   transport (a synchronous hand-off to the model's thread per access).
//! - [`workload`]: the closed-loop workload on any [`BlockTransport`], traced like the synthetic
//!   disk (`io_submit`, `io_complete`, `io_reap`, `workload_start`) plus `trap`.
//!
//! Two transports carry the traps, behind [`BlockTransport`]: [`ThreadIdeDisk`] here, and the
//! KVM one in the `enlight-vmm` crate (a guest driver loop in a real VM whose `in`/`out`
//! instructions exit to the same model).

pub mod ide;
pub mod ide_driver;
pub mod ne2000;
pub mod ne2000_driver;
pub mod nic;
pub mod pio;
pub mod workload;

use std::path::Path;

use crate::disk::{Backing, DiskError};

/// How register accesses reach the device model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// A hand-off to the device-model thread per access.
    Thread,
    /// A VM exit per access (KVM).
    Kvm,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Thread => "thread",
            TransportKind::Kvm => "kvm",
        })
    }
}

impl std::str::FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "thread" => Ok(TransportKind::Thread),
            "kvm" => Ok(TransportKind::Kvm),
            _ => Err(format!("unknown transport {s:?} (thread or kvm)")),
        }
    }
}

/// Emulated device errors.
#[derive(Debug, thiserror::Error)]
pub enum EmulatedError {
    /// The device finished a command with ERR set.
    #[error("device error: status {status:#04x}, error register {error:#04x}")]
    Device { status: u8, error: u8 },
    /// The device never reached the state the protocol expects.
    #[error("device hung: {0}")]
    Hung(String),
    /// Bad arguments from the caller.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The backing file could not be opened.
    #[error(transparent)]
    Backing(#[from] DiskError),
    /// The transport failed (thread spawn, KVM).
    #[error("transport: {0}")]
    Transport(String),
}

/// One request of a batch handed to [`BlockTransport::io_batch`].
pub struct BatchIo<'a> {
    /// Op code.
    pub op: u16,
    /// First sector.
    pub lba: u64,
    /// Data: filled by a read, sent by a write.
    pub buf: &'a mut [u8],
    /// Set by the transport: 0 or an errno (the device reported an error).
    pub status: u16,
    /// Set by the transport: when the request completed (`CLOCK_MONOTONIC` ns).
    pub done_ns: u64,
}

/// A disk reached through trapped register accesses (or, for the paravirtual ring on KVM, a
/// doorbell), whatever carries them.
pub trait BlockTransport {
    /// Which transport this is.
    fn transport(&self) -> TransportKind;
    /// Capacity in sectors (as IDENTIFY reported it).
    fn capacity_sectors(&self) -> u64;
    /// Largest request in bytes.
    fn max_io_bytes(&self) -> u32;
    /// Runs one request to completion through the device's registers: a read fills `buf`, a
    /// write sends it, a flush ignores it.
    fn io(&mut self, op: u16, lba: u64, buf: &mut [u8]) -> Result<(), EmulatedError>;
    /// Register accesses trapped so far, as counted by the transport.
    fn traps(&self) -> u64;
    /// VM exits the VMM handled so far (0 for transports without a VM).
    fn vm_exits(&self) -> u64 {
        0
    }
    /// The signalling events a ring-based device counts for `io_reap` to carry (None for a
    /// register-level device, which traps instead of signalling).
    fn signals(&self) -> Option<&crate::trace::SignalCounts> {
        None
    }
    /// Runs a batch of requests. A register-level device serves them one after another (the
    /// default); a ring-based one submits them together. A device error is the request's
    /// status; a transport failure is the error.
    fn io_batch(&mut self, batch: &mut [BatchIo<'_>]) -> Result<(), EmulatedError> {
        for b in batch.iter_mut() {
            b.status = match self.io(b.op, b.lba, b.buf) {
                Ok(()) => 0,
                Err(EmulatedError::Device { .. }) => libc::EIO as u16,
                Err(e) => return Err(e),
            };
            b.done_ns = crate::trace::monotonic_ns();
        }
        Ok(())
    }
}

/// Largest request either transport accepts (one 64 KiB I/O is 128 sectors: LBA28 suffices).
pub const MAX_IO_BYTES: u32 = 128 * 1024;

/// The emulated IDE disk on the thread transport.
pub struct ThreadIdeDisk {
    driver: ide_driver::AtaPio<pio::ThreadBus<ide::IdeDisk>>,
}

impl ThreadIdeDisk {
    /// Opens `backing` (`O_DIRECT` where possible, as the synthetic disk does), starts the model
    /// thread and identifies the disk.
    pub fn open(backing: &Path, serial: &str) -> Result<Self, EmulatedError> {
        let disk = ide::IdeDisk::new(Backing::open(backing)?, serial);
        let bus = pio::ThreadBus::spawn(disk, "ide-model")
            .map_err(|e| EmulatedError::Transport(format!("spawning the model thread: {e}")))?;
        Ok(ThreadIdeDisk {
            driver: ide_driver::AtaPio::new(bus)?,
        })
    }

    /// Stops the model thread; returns the model's own counters.
    pub fn stop(self) -> Option<ide::IdeCounters> {
        self.driver.into_bus().stop().map(|d| d.counters())
    }
}

impl BlockTransport for ThreadIdeDisk {
    fn transport(&self) -> TransportKind {
        TransportKind::Thread
    }
    fn capacity_sectors(&self) -> u64 {
        self.driver.info().sectors
    }
    fn max_io_bytes(&self) -> u32 {
        MAX_IO_BYTES
    }
    fn io(&mut self, op: u16, lba: u64, buf: &mut [u8]) -> Result<(), EmulatedError> {
        self.driver.io(op, lba, buf)
    }
    fn traps(&self) -> u64 {
        use pio::PioBus;
        self.driver.bus().traps()
    }
}
