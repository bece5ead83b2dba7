//! `enlight bench`: benchmarks that need the whole system (device processes, the eBPF probes,
//! the control socket) and report ratios measured side by side in one run.
//!
//! - `enlight bench tune` ([`tune`]): every tuning controller (static defaults, a DIM-style
//!   controller after Linux's lib/dim, enlight's tuner) on every scenario, against an oracle
//!   that sweeps the settings grid per workload phase; the kernel scenarios run the real
//!   `enlightd --kernel` on a veth pair ([`tune`]'s `veth` rig).
//! - `enlight bench compare` ([`compare`]): emulated against enlightened devices, side by side,
//!   with traps and VM exits per I/O measured by the probes; `--guest` ([`guest`]) compares
//!   IDE with virtio-blk and e1000 with virtio-net inside a real guest kernel (`enlight lab`).
//! - `enlight bench demo` ([`demo`]): the demo's workload with the tuner off and on, side by
//!   side.

pub mod compare;
pub mod demo;
mod font;
pub mod guest;
mod machine;
pub mod tune;

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Compare the tuner with static defaults, a DIM-style controller and an oracle on the
    /// synthetic disk and NIC, and on a kernel veth pair whose NAPI moderation the real
    /// enlightd tunes (needs root: the real probes measure every run).
    Tune(tune::TuneBenchArgs),
    /// Emulated against enlightened I/O: disk (emulated IDE over threads and KVM, synthetic)
    /// by I/O size and queue depth, and the emulated NIC's ping and iperf3; observed by the eBPF
    /// probes (needs root). Writes compare.json, compare.md and compare.png. With --guest: IDE
    /// vs virtio-blk and e1000 vs virtio-net inside a real guest kernel (QEMU; the report names
    /// the accelerator, TCG or KVM).
    Compare(compare::CompareArgs),
    /// `enlight demo` with `--tune off` and `--tune auto`, side by side (off, auto, auto, off):
    /// IOPS, interrupts per I/O and p99 of each run and their ratios (needs root). Writes
    /// demo.md and demo.json.
    Demo(demo::DemoBenchArgs),
}

pub fn run(args: BenchArgs) -> Result<()> {
    // SIGINT, SIGTERM and SIGHUP stop a benchmark between steps (crate::signals::check_stop),
    // unwinding through the destructors that stop its device processes and remove its files.
    crate::signals::install_stop_handlers()?;
    match args.command {
        BenchCommand::Tune(a) => tune::run(a),
        BenchCommand::Compare(a) => compare::run(a),
        BenchCommand::Demo(a) => demo::run(a),
    }
}
