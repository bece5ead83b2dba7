//! `enlight`: the command line.
//!
//! - `enlight demo` runs the main job end to end: a synthetic disk on a temporary backing file, a
//!   workload, and enlightd (in this process) with the eBPF probes attached to the device process
//!   and the tuner changing the disk's settings live.
//! - `enlight disk` is a device process: a synthetic disk (VSC and VSP threads over a VMBus-style
//!   channel) driven by the workload generator, announced in the device registry so that enlightd
//!   finds it. It prints a line per second with the workload's own figures (JSON with `--json`
//!   or when stdout is not a terminal).
//! - `enlight emulated-disk` is the same for an emulated IDE disk (kind `emulated`): every
//!   register access traps to the device model, through a thread hand-off or a real KVM exit.
//! - `enlight nic` is a device process for the synthetic NIC: guest and host sides on taps in two
//!   network namespaces it creates, so real traffic (ping, iperf3) crosses the rings.
//! - `enlight emulated-nic` runs an emulated NE2000 between two namespaces it creates.
//! - `enlight lab` boots a real Linux guest under QEMU with enlightd inside (crate `enlight-lab`).
//! - `enlight top` watches a running enlightd in the terminal (crate `enlight-tui`).
//! - `enlight tune --dry-run` prints the tuner's recommendations; `enlight restore` puts back the
//!   kernel device settings enlight changed; `enlight bench tune|compare` are the benchmarks.

/// `eprintln!` for the whole of `enlight`: a closed stderr (`enlight bench compare 2>&1 | head
/// -1`) loses the line instead of panicking as std's does (it shadows std's macro in every
/// module below). stdout goes through `signals::line`, which also stops the command.
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod bench;
mod children;
mod demo;
mod disk;
mod docs;
mod emulated;
mod lab;
mod nic;
mod output;
mod ranges;
mod restore;
mod signals;
mod top;
mod tune;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "enlight",
    version,
    about = "eBPF-observable analyzer for paravirtual (enlightened) I/O"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a synthetic disk, a workload and enlightd with probes attached; print a live summary.
    Demo(demo::DemoArgs),
    /// Run one synthetic disk device process with a workload (what `demo` starts).
    Disk(disk::DiskArgs),
    /// Run one emulated IDE disk device process (register-level model, a trap per register
    /// access, over the thread or the KVM transport) with a workload.
    EmulatedDisk(emulated::EmulatedDiskArgs),
    /// Run one emulated NE2000 NIC between two network namespaces it creates (and removes),
    /// every register access trapping to the model (over the thread or the KVM transport);
    /// ping/iperf3 between them go through it.
    EmulatedNic(emulated::EmulatedNicArgs),
    /// Run one synthetic (netvsc-like) NIC between two network namespaces it creates (and
    /// removes); ping/iperf3 between them go through its rings.
    Nic(nic::NicArgs),
    /// Boot a real Linux guest (Debian's kernel under QEMU) with emulated or paravirtual disks
    /// and NICs, and run enlightd inside it; its /metrics and API are forwarded to the host.
    Lab(lab::LabArgs),
    /// Watch a running enlightd live in the terminal: devices, latency histograms, the tuner.
    Top(top::TopArgs),
    /// Benchmarks of the whole system (`enlight bench tune`, `enlight bench compare`).
    Bench(bench::BenchArgs),
    /// Print the tuner's recommendations for the running devices (asks enlightd).
    Tune(tune::TuneArgs),
    /// Put back every kernel device setting enlight changed (from the journal enlightd keeps
    /// in the runtime directory).
    Restore(restore::RestoreArgs),
    /// Write enlight's man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Directory to write man/ and completions/ into.
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Disk(args) => disk::run(args),
        Command::EmulatedDisk(args) => emulated::run(args),
        Command::EmulatedNic(args) => emulated::run_nic(args),
        Command::Nic(args) => nic::run(args),
        Command::Lab(args) => lab::run(args),
        Command::Top(args) => top::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Tune(args) => tune::run(args),
        Command::Restore(args) => restore::run(args),
        Command::GenerateDocs { out } => {
            use clap::CommandFactory;
            docs::write(Cli::command(), &out, "1")?;
            Ok(())
        }
    }
}
