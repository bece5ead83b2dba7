//! enlight's userspace synthetic drivers.
//!
//! Layout, bottom up:
//! - [`shmem`], [`ring`], [`channel`]: the transport, from the `enlight-vmbus` crate (re-exported
//!   here under their old paths): shared-memory access, the VMBus-style ring buffer, and the
//!   channel (two rings, two eventfds, one memfd-backed region, a hand-off over a Unix socket).
//! - [`disk`]: a storvsc-like synthetic disk: the guest driver (VSC) and the host service (VSP).
//! - [`workload`]: a closed-loop workload generator with its own counts and percentiles.
//! - [`emulated`]: register-level device models (an IDE disk in PIO mode) whose every register
//!   access traps to the model, the baseline the synthetic devices are compared against.
//! - [`trace`]: USDT tracepoints (provider `enlight`), the contract with `probes/`.
//! - [`registry`]: the runtime directory where running devices announce themselves to enlightd.
//! - [`settings`]: every tunable knob of a device, in one place, and the live copy the data path
//!   reads.
//! - [`control`]: the per-device control socket that changes those knobs while I/O runs.
//! - [`nic`]: a netvsc-like synthetic NIC (send/receive buffers over the channel) and
//!   [`nic::NicBridge`], which runs it between two network namespaces.
//! - [`netns`]: network namespaces and tap devices enlight creates and removes.
//! - `fuzzing` (feature `fuzzing`, and in tests): the disk, NIC and control harnesses behind the
//!   cargo-fuzz targets in `driver/fuzz/`; `cargo test` replays their seed corpora and every crash
//!   found. The ring and channel targets are the transport's, in `vmbus/fuzz/`.
//!
//! The cross-crate contracts are written down in `docs/architecture.md`.

pub mod control;
pub mod disk;
pub mod emulated;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod netns;
pub mod nic;
pub mod registry;
pub mod settings;
pub mod trace;
pub mod usdt;
pub mod workload;

pub use enlight_vmbus::{channel, ring, shmem};
