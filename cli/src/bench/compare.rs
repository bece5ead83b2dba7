//! `enlight bench compare`: emulated against enlightened I/O, side by side in one run.
//!
//! The disk matrix is kind (emulated IDE in PIO mode, synthetic VMBus-style) x transport
//! (thread; KVM when it works, for the emulated disk) x I/O size x queue depth; the NIC part is
//! ping latency and iperf3 throughput through the emulated NE2000 between two namespaces. Every
//! run is a real device process observed by an in-process enlightd with the eBPF probes
//! attached, so latency percentiles and traps per I/O come from the probes (the same figures
//! /metrics serves), and on KVM the exits per I/O come from the kernel's own `kvm:*`
//! tracepoints (eBPF, per VMM process). CPU time per I/O is the device process's user+system
//! time (`wait4`), guest time included.
//!
//! Writes `compare.json` (every figure), `compare.md` (the tables) and `compare.png` (throughput
//! and traps per I/O against I/O size) into `--out`.
mod bench;
mod report;
mod traffic;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use enlight_driver::registry::DeviceKind;
use serde::{Deserialize, Serialize};

use self::bench::Bench;
use self::report::{markdown, png};

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// A smaller matrix and 1-second runs: a few minutes in all.
    #[arg(long)]
    quick: bool,
    /// Directory for compare.json, compare.md and compare.png.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Seconds per disk run, 0.1..=3600 [default: 3, or 1 with --quick; with --guest 10, or
    /// 3 with --quick].
    #[arg(long, value_parser = crate::ranges::seconds(0.1..=3600.0))]
    seconds: Option<f64>,
    /// Compare inside a real guest kernel instead (`enlight lab`): IDE against virtio-blk,
    /// e1000 against virtio-net, measured by the guest's enlightd; writes compare-guest.json,
    /// compare-guest.md and compare-guest.png. The report names the accelerator (TCG or KVM).
    #[arg(long)]
    guest: bool,
    /// With --guest: the lab's image cache (as `enlight lab --cache`).
    #[arg(long, value_name = "DIR", requires = "guest")]
    cache: Option<PathBuf>,
    /// With --guest: the enlightd to run in the guest [default: the one beside this enlight].
    #[arg(long, value_name = "PATH", requires = "guest")]
    enlightd: Option<PathBuf>,
}

/// One disk run (or a skipped one, with the reason).
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct DiskRun {
    pub kind: DeviceKind,
    pub transport: String,
    pub block_size: u32,
    pub queue_depth: u32,
    /// Why this run did not happen, if it did not.
    pub skipped: Option<String>,
    /// Completed I/Os counted by eBPF (`io_reap`).
    pub ops: u64,
    /// Completed I/Os counted by the workload itself.
    pub workload_ops: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mb_per_s: f64,
    /// Latency percentiles from the eBPF histogram, µs.
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Device process CPU (user + system, guest included) per I/O, µs.
    pub cpu_us_per_io: f64,
    /// Register accesses trapped per I/O, from the `trap` probe (eBPF).
    pub traps_per_io: f64,
    /// Doorbells plus interrupts (eventfd signals) per I/O, as the device's `io_reap` hits
    /// carried them to eBPF: what a synthetic device pays instead of traps.
    #[serde(default)]
    pub signals_per_io: f64,
    /// VM exits per I/O from the kernel's tracepoints (eBPF on kvm:*), KVM runs only.
    pub exits_per_io: Option<f64>,
    /// Which tracepoints `exits_per_io` counts.
    pub exits_source: Option<String>,
    /// The VMM's own exit count per I/O (a cross-check of the above).
    pub vmm_exits_per_io: Option<f64>,
}

/// The NIC part.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct NicRun {
    pub kind: DeviceKind,
    pub transport: String,
    pub skipped: Option<String>,
    /// iperf3 TCP throughput guest → host, Mbit/s (receiver side).
    pub iperf3_mbit_s: f64,
    /// ping round trips host → guest, µs.
    pub ping_p50_us: f64,
    pub ping_p99_us: f64,
    pub ping_max_us: f64,
    pub pings: u32,
    /// Frames through the NIC (eBPF tx + rx).
    pub frames: u64,
    /// Register accesses trapped per frame (eBPF).
    pub traps_per_frame: f64,
    /// Doorbells plus interrupts per frame (eBPF `signal`).
    #[serde(default)]
    pub signals_per_frame: f64,
    /// Device process CPU per frame, µs.
    pub cpu_us_per_frame: f64,
    /// VM exits per frame from the kernel's tracepoints (eBPF on kvm:*), KVM runs only.
    #[serde(default)]
    pub exits_per_frame: Option<f64>,
    /// The VMM's own exit count per frame (a cross-check of the above).
    #[serde(default)]
    pub vmm_exits_per_frame: Option<f64>,
}

/// Everything one run of the bench measured.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Report {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub quick: bool,
    pub seconds_per_run: f64,
    pub kvm: String,
    pub disk: Vec<DiskRun>,
    pub nic: Vec<NicRun>,
    pub notes: Vec<String>,
}

/// Seconds one batch of `qd` requests of `bs` bytes is expected to take on `transport`, from
/// the trap count of a request and a conservative cost per trap on this kind of host.
fn estimated_batch_s(transport: &str, bs: u32, qd: u32) -> f64 {
    let traps = 8.0 + (bs / 512) as f64 * 257.0;
    let per_trap = if transport == "kvm" { 100e-6 } else { 5e-6 };
    qd as f64 * traps * per_trap
}

pub fn run(args: CompareArgs) -> Result<()> {
    if args.guest {
        return super::guest::run(
            args.quick,
            args.seconds,
            &args.out,
            args.cache,
            args.enlightd,
        );
    }
    enlight_probes::preflight().context("the comparison is measured by the eBPF probes")?;
    let seconds = args.seconds.unwrap_or(if args.quick { 1.0 } else { 3.0 });
    let kvm = enlight_vmm::detect();
    let mut report = new_report(args.quick, seconds, &kvm);
    let bench = Bench::start(seconds, &kvm, &mut report)?;
    disk_matrix(&bench, &mut report, args.quick, &kvm)?;
    nic_runs(&bench, &mut report, args.quick, &kvm)?;
    write(&report, &args.out)
}

/// The report before any run: the machine, the run's parameters, whether KVM works.
fn new_report(quick: bool, seconds: f64, kvm: &Result<(), String>) -> Report {
    let host = super::machine::Machine::read();
    Report {
        kernel: host.kernel.unwrap_or_default(),
        cpu: host.cpu_model.unwrap_or_default(),
        cores: host.cpus.unwrap_or(1),
        quick,
        seconds_per_run: seconds,
        kvm: match kvm {
            Ok(()) => "available".into(),
            Err(r) => format!("unavailable: {r}"),
        },
        ..Default::default()
    }
}

/// Every disk run: kind x transport x I/O size x queue depth, an emulated run skipped when one
/// batch of it would take longer than the budget.
fn disk_matrix(
    bench: &Bench,
    report: &mut Report,
    quick: bool,
    kvm: &Result<(), String>,
) -> Result<()> {
    let (sizes, depths): (&[u32], &[u32]) = if quick {
        (&[512, 4096, 65536], &[1, 8])
    } else {
        (&[512, 4096, 16384, 65536], &[1, 8, 32])
    };
    let mut cases = vec![(DeviceKind::Emulated, "thread")];
    if kvm.is_ok() {
        cases.push((DeviceKind::Emulated, "kvm"));
    } else if let Err(r) = kvm {
        report.notes.push(format!("no KVM transport: {r}"));
    }
    cases.push((DeviceKind::Synthetic, "thread"));
    if kvm.is_ok() {
        cases.push((DeviceKind::Synthetic, "kvm"));
    }
    report.notes.push(
        "synthetic/thread is the VMBus-style disk (`enlight disk`: rings in shared memory, \
         eventfd signals between threads); synthetic/kvm is the descriptor ring in guest memory \
         with one ioeventfd doorbell per batch (`enlight emulated-disk --device ring`)"
            .into(),
    );
    let budget = if quick { 3.0 } else { 12.0 };
    for (kind, transport) in &cases {
        let (kind, transport) = (kind, *transport);
        for &bs in sizes {
            for &qd in depths {
                let est = estimated_batch_s(transport, bs, qd);
                let run = if *kind == DeviceKind::Emulated && est > budget {
                    DiskRun {
                        kind: kind.clone(),
                        transport: transport.into(),
                        block_size: bs,
                        queue_depth: qd,
                        skipped: Some(format!(
                            "one batch of {qd} x {bs} B is about {est:.0} s of traps here"
                        )),
                        ..Default::default()
                    }
                } else {
                    disk_run(bench, report, kind, transport, bs, qd)?
                };
                report.disk.push(run);
            }
        }
    }
    Ok(())
}

/// One disk run, run again (up to three times in all) while eBPF saw fewer I/Os than the
/// workload did.
fn disk_run(
    bench: &Bench,
    report: &mut Report,
    kind: &DeviceKind,
    transport: &str,
    bs: u32,
    qd: u32,
) -> Result<DiskRun> {
    crate::signals::check_stop()?;
    eprintln!("compare: disk {kind}/{transport} bs={bs} qd={qd}");
    let mut run = bench.disk_run(kind, transport, bs, qd)?;
    // eBPF must have seen every I/O the workload did; an attach that failed
    // (and was retried too late) shows as a shortfall: run it again.
    for attempt in 2..=3 {
        if run.ops == run.workload_ops {
            break;
        }
        report.notes.push(format!(
            "{kind}/{transport} {bs} B QD {qd}: eBPF saw {} of {} I/Os; run again (attempt {attempt})",
            run.ops, run.workload_ops
        ));
        run = bench.disk_run(kind, transport, bs, qd)?;
    }
    Ok(run)
}

/// The NIC runs: ping and iperf3 through the emulated NIC (threads, then KVM when it works)
/// and the synthetic one.
fn nic_runs(
    bench: &Bench,
    report: &mut Report,
    quick: bool,
    kvm: &Result<(), String>,
) -> Result<()> {
    let mut nic_cases = vec![(DeviceKind::Emulated, "thread")];
    if kvm.is_ok() {
        // The NE2000 on KVM: ~770 PIO exits per full frame. The ping count is kept small so the
        // run stays within seconds on hosts whose exits cost tens of microseconds (nested KVM).
        nic_cases.push((DeviceKind::Emulated, "kvm"));
    }
    nic_cases.push((DeviceKind::Synthetic, "thread"));
    for (kind, transport) in nic_cases {
        crate::signals::check_stop()?;
        eprintln!("compare: NIC {kind}/{transport} (ping, iperf3)");
        let pings = match (transport, quick) {
            ("kvm", _) => 50,
            (_, true) => 50,
            _ => 200,
        };
        let run = bench.nic_run(&kind, transport, pings)?;
        report.nic.push(run);
    }
    Ok(())
}

/// compare.json, compare.md and compare.png into `out`, and the Markdown on stdout.
fn write(report: &Report, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let json = out.join("compare.json");
    std::fs::write(&json, serde_json::to_vec_pretty(report)?)?;
    let md = markdown(report);
    std::fs::write(out.join("compare.md"), &md)?;
    png(report, &out.join("compare.png"))?;
    crate::signals::line(md);
    eprintln!(
        "compare: wrote {}, compare.md and compare.png",
        json.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_runs_are_estimated_far_slower_than_thread_runs() {
        assert!(estimated_batch_s("kvm", 65536, 8) > 12.0);
        assert!(estimated_batch_s("thread", 4096, 8) < 1.0);
    }
}
