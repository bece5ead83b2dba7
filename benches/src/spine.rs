//! `spine-bench`: the spine's benchmark (not a test). Measures, side by side in one run:
//!
//! 1. channel throughput: messages/s through one ring between two threads at 64 B, 1 KiB and
//!    4 KiB payloads, with the real signalling rules (eventfd only on empty-to-non-empty);
//! 2. synthetic disk IOPS at queue depth 1 and 32 with 4 KiB random reads;
//! 3. probe overhead: the same QD32 workload with every enlight probe attached to this process
//!    and without, interleaved A/B/A/B so drift hits both sides alike.
//!
//! Prints a Markdown report with the machine and kernel, and writes the raw figures as JSON.
//! Needs root for part 3 (it loads and attaches the real eBPF programs).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use enlight_driver::channel::{self, ChannelConfig};
use enlight_driver::disk::{Backing, DiskOptions, SyntheticDisk};
use enlight_driver::ring::WriteOutcome;
use enlight_driver::settings::DeviceSettings;
use enlight_driver::workload::{self, Limit, Pattern, WorkloadSpec};
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Benchmarks of the spine: channel throughput, disk IOPS, probe overhead")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// A/B rounds for the probe-overhead comparison.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Directory for the backing file (not tmpfs, so O_DIRECT applies).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Where to write the raw results.
    #[arg(long, default_value = "benches/results/spine.json")]
    json: PathBuf,
}

#[derive(Serialize)]
struct ChannelResult {
    payload_bytes: usize,
    messages_per_sec: f64,
    signals_per_message: f64,
}

#[derive(Serialize)]
struct DiskResult {
    backing: &'static str,
    queue_depth: u32,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Serialize)]
struct OverheadResult {
    backing: &'static str,
    iops_without: Vec<f64>,
    iops_with: Vec<f64>,
    /// Control: only `workload_start` attached (fires once per run): what attaching alone and
    /// the measurement's noise look like.
    iops_idle_control: Vec<f64>,
    median_idle_control: f64,
    median_without: f64,
    median_with: f64,
    cost_percent: f64,
    /// Median over rounds of (IOPS with probes / IOPS without) of the same round.
    paired_iops_ratio: f64,
    /// CPU time of the whole process per completed I/O, ns, per run.
    cpu_ns_per_io_without: Vec<f64>,
    cpu_ns_per_io_with: Vec<f64>,
    cpu_ns_per_io_idle_control: Vec<f64>,
    /// Median over rounds of (CPU per I/O with probes / without) of the same round.
    paired_cpu_ratio: f64,
    sites_attached: usize,
    /// Hits of the signal, ring_full and irq_mask probes per I/O (io_reap hits come on top).
    signal_traps_per_io: f64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    kernel: String,
    cpus: usize,
    direct_io: bool,
    channel: Vec<ChannelResult>,
    disk: Vec<DiskResult>,
    overhead: Vec<OverheadResult>,
}

/// The two backing files: one written with data (reads go to the device, O_DIRECT), one only
/// allocated (ext4 serves reads of unwritten extents as zeros without device I/O, so the run is
/// bound by the driver's own CPU cost: the worst case for probe overhead).
const BACKINGS: [(&str, bool); 2] = [
    ("written (device-bound)", true),
    ("allocated (CPU-bound)", false),
];

fn make_backing(dir: &std::path::Path, written: bool) -> Result<tempfile::NamedTempFile> {
    let f = tempfile::Builder::new()
        .prefix("enlight-bench-")
        .tempfile_in(dir)?;
    if written {
        use std::io::Write;
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
        let mut w =
            std::io::BufWriter::new(std::fs::OpenOptions::new().write(true).open(f.path())?);
        for _ in 0..256 {
            w.write_all(&chunk)?;
        }
        w.flush()?;
        w.get_ref().sync_all()?;
        // Drop the page cache copy so O_DIRECT reads really go to the device.
        std::process::Command::new("sh")
            .args(["-c", "echo 1 > /proc/sys/vm/drop_caches"])
            .status()
            .ok();
    } else {
        Backing::create(f.path(), 1 << 30)?;
    }
    Ok(f)
}

fn channel_throughput(payload: usize, secs: f64) -> Result<ChannelResult> {
    let cfg = ChannelConfig {
        out_ring_bytes: 256 * 1024,
        in_ring_bytes: 4096,
        extra_bytes: 0,
    };
    let (guest, host) = channel::create(&cfg)?;
    let mut tx = guest.tx;
    let to_host = guest.to_host;
    let from_host = guest.from_host;
    let mut rx = host.rx;
    let to_guest = host.to_guest;
    let from_guest = host.from_guest;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let consumer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u64> {
            let mut buf = Vec::with_capacity(payload + 16);
            let mut n = 0u64;
            loop {
                while rx.read_into(&mut buf)?.is_some() {
                    n += 1;
                }
                if rx.commit().signal_writer {
                    to_guest.signal()?;
                }
                if stop.load(std::sync::atomic::Ordering::Acquire) && !rx.has_data()? {
                    return Ok(n);
                }
                if !rx.has_data()? {
                    from_guest.wait(Duration::from_millis(10))?;
                }
            }
        })
    };
    let data = vec![0x5au8; payload];
    let (mut sent, mut signals) = (0u64, 0u64);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    while Instant::now() < deadline {
        for _ in 0..64 {
            match tx.try_write(6, 0, sent, &[&data])? {
                WriteOutcome::Written { signal, .. } => {
                    sent += 1;
                    if signal {
                        signals += 1;
                        to_host.signal()?;
                    }
                }
                WriteOutcome::Full { .. } => {
                    from_host.wait(Duration::from_millis(10))?;
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    to_host.signal()?;
    let received = consumer.join().expect("consumer thread")?;
    let elapsed = start.elapsed().as_secs_f64();
    anyhow::ensure!(received == sent, "sent {sent}, received {received}");
    Ok(ChannelResult {
        payload_bytes: payload,
        messages_per_sec: sent as f64 / elapsed,
        signals_per_message: signals as f64 / sent as f64,
    })
}

/// CPU time (user + system) this process has used so far, in ns: every thread of the disk (VSC,
/// VSP, host workers) runs in this process, and the kernel charges a uprobe's trap and its BPF
/// program to the thread that hit it, so the difference over a run is the whole cost of an I/O.
fn process_cpu_ns() -> u64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage struct.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One QD-`qd` run: the workload's report and the process's CPU time per completed I/O (ns).
struct DiskRun {
    report: workload::WorkloadSnapshot,
    cpu_ns_per_io: f64,
}

fn disk_run(backing: &std::path::Path, qd: u32, secs: f64) -> Result<DiskRun> {
    let cpu0 = process_cpu_ns();
    let (mut vsc, vsp) = SyntheticDisk::start(
        backing,
        DeviceSettings::default(),
        0,
        DiskOptions {
            queue_slots: qd.max(1),
            ..DiskOptions::default()
        },
    )?;
    let spec = WorkloadSpec {
        queue_depth: qd,
        pattern: Pattern::Random,
        block_size: 4096,
        read_percent: 100,
        limit: Limit::Duration(Duration::from_secs_f64(secs)),
        seed: 42,
        ..WorkloadSpec::default()
    };
    let report = workload::run(&mut vsc, &spec, &AtomicBool::new(false), |_| {})?;
    vsp.stop()?;
    let cpu_ns_per_io = (process_cpu_ns() - cpu0) as f64 / report.ops_total.max(1) as f64;
    Ok(DiskRun {
        report,
        cpu_ns_per_io,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn first_line(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(key))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let machine = first_line("/proc/cpuinfo", "model name");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    let mut channel = Vec::new();
    for payload in [64, 1024, 4096] {
        channel.push(channel_throughput(payload, args.secs)?);
    }

    std::fs::create_dir_all(&args.dir)?;
    let mut direct = true;
    let mut disk = Vec::new();
    let mut overhead = Vec::new();
    let mut probes = match enlight_probes::preflight() {
        Err(e) => {
            eprintln!("probe overhead not measured: {e}");
            None
        }
        Ok(()) => Some(enlight_probes::Probes::load().context("loading the probes")?),
    };
    for (label, written) in BACKINGS {
        let backing = make_backing(&args.dir, written)?;
        direct &= Backing::open(backing.path())?.direct();
        for qd in [1, 32] {
            let r = disk_run(backing.path(), qd, args.secs)?.report;
            disk.push(DiskResult {
                backing: label,
                queue_depth: qd,
                iops: r.iops_avg,
                p50_us: r.p50_ns as f64 / 1e3,
                p99_us: r.p99_ns as f64 / 1e3,
            });
        }
        let Some(probes) = probes.as_mut() else {
            continue;
        };
        let pid = std::process::id();
        let exe = PathBuf::from("/proc/self/exe");
        let all: Vec<&str> = enlight_probes::PROGRAMS.iter().map(|(p, _)| *p).collect();
        let (mut with, mut without, mut idle) = (Vec::new(), Vec::new(), Vec::new());
        let (mut sites, mut traps, mut ios) = (0, 0u64, 0u64);
        for round in 0..args.rounds {
            // Rotate the order of the three configurations so drift and warm-up hit each alike.
            for k in 0..3 {
                match (round + k) % 3 {
                    0 => without.push(disk_run(backing.path(), 32, args.secs)?),
                    1 => {
                        // Control: attached, but only the probe that fires once per run.
                        probes.attach_process_only(pid, &exe, &["workload_start"])?;
                        idle.push(disk_run(backing.path(), 32, args.secs)?);
                        probes.detach_process(pid);
                    }
                    _ => {
                        let report = probes.attach_process_only(pid, &exe, &all)?;
                        sites = report.sites_attached;
                        with.push(disk_run(backing.path(), 32, args.secs)?);
                        let snap = probes.snapshot()?;
                        ios += snap
                            .io
                            .iter()
                            .filter(|(k, _)| k.pid == pid)
                            .map(|(_, s)| s.ops)
                            .sum::<u64>();
                        traps += snap
                            .events
                            .iter()
                            .filter(|(k, _)| k.pid == pid)
                            .map(|(_, e)| {
                                e.doorbells
                                    + e.interrupts
                                    + e.ring_full_in
                                    + e.ring_full_out
                                    + e.irq_masked
                                    + e.irq_unmasked
                            })
                            .sum::<u64>();
                        probes.detach_process(pid);
                    }
                }
            }
        }
        let iops = |v: &[DiskRun]| v.iter().map(|r| r.report.iops_avg).collect::<Vec<_>>();
        let cpu = |v: &[DiskRun]| v.iter().map(|r| r.cpu_ns_per_io).collect::<Vec<_>>();
        // Paired by round: the with/without runs of one round ran back to back, so their ratio
        // cancels most of the drift that moves whole rounds.
        let paired = |f: &dyn Fn(&DiskRun) -> f64| {
            median(
                &with
                    .iter()
                    .zip(&without)
                    .map(|(w, o)| f(w) / f(o))
                    .collect::<Vec<_>>(),
            )
        };
        let (mw, mo) = (median(&iops(&with)), median(&iops(&without)));
        overhead.push(OverheadResult {
            backing: label,
            iops_without: iops(&without),
            iops_with: iops(&with),
            median_idle_control: median(&iops(&idle)),
            iops_idle_control: iops(&idle),
            median_without: mo,
            median_with: mw,
            cost_percent: (1.0 - mw / mo) * 100.0,
            paired_iops_ratio: paired(&|r| r.report.iops_avg),
            cpu_ns_per_io_without: cpu(&without),
            cpu_ns_per_io_with: cpu(&with),
            cpu_ns_per_io_idle_control: cpu(&idle),
            paired_cpu_ratio: paired(&|r| r.cpu_ns_per_io),
            sites_attached: sites,
            signal_traps_per_io: if ios > 0 {
                traps as f64 / ios as f64
            } else {
                0.0
            },
        });
    }

    let report = Report {
        machine,
        kernel,
        cpus,
        direct_io: direct,
        channel,
        disk,
        overhead,
    };
    print_markdown(&report);
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    eprintln!("raw results: {}", args.json.display());
    Ok(())
}

fn print_markdown(r: &Report) {
    println!(
        "Machine: {} ({} CPUs), kernel {}, backing file O_DIRECT: {}\n",
        r.machine, r.cpus, r.kernel, r.direct_io
    );
    println!("| channel payload | messages/s | vs 64 B | signals per message |");
    println!("|---|---|---|---|");
    let base = r.channel[0].messages_per_sec;
    for c in &r.channel {
        println!(
            "| {} B | {:.0} | {:.2} | {:.4} |",
            c.payload_bytes,
            c.messages_per_sec,
            c.messages_per_sec / base,
            c.signals_per_message
        );
    }
    println!("\n| disk, 4 KiB random read | backing file | IOPS | vs QD1 | p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    for pair in r.disk.chunks(2) {
        let base = pair[0].iops;
        for d in pair {
            println!(
                "| QD{} | {} | {:.0} | {:.2} | {:.1} us | {:.1} us |",
                d.queue_depth,
                d.backing,
                d.iops,
                d.iops / base,
                d.p50_us,
                d.p99_us
            );
        }
    }
    if !r.overhead.is_empty() {
        println!("\n| QD32, 4 KiB random read | backing file | median IOPS, probes detached | control: idle probe attached | all probes attached | with/without (medians) | with/without (paired by round) | CPU per I/O with/without (paired) | signal-probe hits per I/O |");
        println!("|---|---|---|---|---|---|---|---|---|");
    }
    for o in &r.overhead {
        println!(
            "| {} sites | {} | {:.0} {:?} | {:.0} {:?} | {:.0} {:?} | {:.4} ({:.2}% cost) | {:.4} | {:.4} ({:.0} vs {:.0} ns) | {:.3} |",
            o.sites_attached,
            o.backing,
            o.median_without,
            o.iops_without.iter().map(|v| v.round()).collect::<Vec<_>>(),
            o.median_idle_control,
            o.iops_idle_control
                .iter()
                .map(|v| v.round())
                .collect::<Vec<_>>(),
            o.median_with,
            o.iops_with.iter().map(|v| v.round()).collect::<Vec<_>>(),
            o.median_with / o.median_without,
            o.cost_percent,
            o.paired_iops_ratio,
            o.paired_cpu_ratio,
            median(&o.cpu_ns_per_io_with),
            median(&o.cpu_ns_per_io_without),
            o.signal_traps_per_io
        );
    }
}
