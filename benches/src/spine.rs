//! `spine-bench`: the spine's benchmark (not a test). Measures, side by side in one run:
//!
//! 1. channel throughput: messages/s through one ring between two threads at 64 B, 1 KiB and
//!    4 KiB payloads, with the real signalling rules (eventfd only on empty-to-non-empty);
//! 2. synthetic disk IOPS at queue depth 1 and 32 with 4 KiB random reads;
//! 3. probe overhead at QD32, three ways: (a) separate runs with every enlight probe attached,
//!    only an idle control probe, and none, rotated per round; (b) one continuous run whose
//!    1-second slices rotate through the same three configurations, compared triple by triple
//!    (geometric mean and 95% confidence interval); (c) an accounting of the cost: the probe
//!    hits per I/O and the programs' run time per I/O as the kernel counts them
//!    (`BPF_ENABLE_STATS`), with the cost of one trap measured on a real site in a tight loop,
//!    as a share of the CPU time per I/O without probes.
//!
//! Prints a Markdown report with the machine and kernel, and writes the raw figures as JSON.
//! Needs root for part 3 (it loads and attaches the real eBPF programs).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use enlight_driver::channel::{self, ChannelConfig};
use enlight_driver::disk::{Backing, DiskOptions, DiskVsc, SyntheticDisk, VspHandle};
use enlight_driver::ring::WriteOutcome;
use enlight_driver::settings::DeviceSettings;
use enlight_driver::workload::{self, Limit, Pattern, WorkloadSpec};
use serde::Serialize;

mod interleaved;
mod machine;
mod toggled;

use interleaved::*;
use machine::first_line;

#[derive(Parser)]
#[command(about = "Benchmarks of the spine: channel throughput, disk IOPS, probe overhead")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// A/B rounds for the probe-overhead comparison.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of the interleaved probe-overhead run per backing file (one continuous QD32
    /// workload whose 1-second slices rotate through detached, control and all probes).
    #[arg(long, default_value_t = 60)]
    interleaved_secs: u64,
    /// Seconds of the toggled probe-overhead run per backing file (one continuous QD32 workload
    /// with the probes attached throughout, switched on and off through their semaphores in
    /// A-B-B-A quartets of 200 ms slices; 0 skips it).
    #[arg(long, default_value_t = 60)]
    toggled_secs: u64,
    /// The probes of the "all probes" configuration (default: every probe enlightd attaches);
    /// a subset shows what each one costs.
    #[arg(long, value_delimiter = ',')]
    overhead_probes: Vec<String>,
    /// Directory for the backing file (not tmpfs, so O_DIRECT applies).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Where to write the raw results.
    #[arg(long, default_value = "benches/results/spine.json")]
    json: PathBuf,
    /// Measure only the channel throughput, print its table and stop (no root needed, no JSON
    /// written): a quick check of the ring's data path.
    #[arg(long)]
    channel_only: bool,
    /// Write and read 320,000 packets of this many payload bytes in one thread, untimed, and stop:
    /// for `valgrind --tool=callgrind`, which counts the ring's instructions exactly.
    #[arg(long)]
    ring_cost_only: Option<usize>,
    /// Run this many QD32 random 4 KiB reads on the allocated (CPU-bound) backing file in
    /// `--dir`, untimed, and stop: for `valgrind --tool=callgrind`, counting the driver's
    /// instructions per I/O with `--semaphores on` against `off` (no tracer attached either way).
    #[arg(long)]
    disk_cost_only: Option<u64>,
    /// With `--disk-cost-only`: set every enlight USDT semaphore in this process as a tracer
    /// would, without attaching anything, so the driver runs its traced paths.
    #[arg(long, value_enum, default_value_t = Semaphores::Off)]
    semaphores: Semaphores,
}

/// Whether `--disk-cost-only` runs with the USDT semaphores set.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Semaphores {
    On,
    Off,
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
    /// Signalling events (signals, ring-full writers, interrupt-mask changes) per I/O, as the
    /// `io_reap` hits carried them. (Before 2026-12-06 each was a trap of its own probe.)
    signal_events_per_io: f64,
}

/// One continuous QD32 run whose 1-second slices rotate through the three configurations
/// (detached, control, all probes), each triple in a rotated order. Neighbouring slices share
/// whatever state the run settled into (thread placement, cache, host load), which is what makes
/// separate runs of this workload spread by a factor of two on a 2-vCPU guest.
#[derive(Serialize)]
struct InterleavedResult {
    backing: &'static str,
    /// Complete triples measured.
    triples: usize,
    /// Every slice in order (the first triple starts after a detached warm-up second).
    slices: Vec<Slice>,
    /// Per triple: IOPS with all probes / IOPS detached.
    iops_ratio_with: Vec<f64>,
    /// Per triple: IOPS with the control probe / IOPS detached.
    iops_ratio_control: Vec<f64>,
    /// Per triple: process CPU per I/O with all probes / detached.
    cpu_ratio_with: Vec<f64>,
    /// Geometric mean of `iops_ratio_with` and its 95% confidence interval.
    with_mean: f64,
    with_ci95: (f64, f64),
    /// The same for the control.
    control_mean: f64,
    control_ci95: (f64, f64),
    /// Geometric mean of `cpu_ratio_with` and its 95% confidence interval.
    cpu_with_mean: f64,
    cpu_with_ci95: (f64, f64),
    /// Median IOPS of the detached slices.
    median_iops_without: f64,
    /// Probe hits per I/O in the slices with every probe attached (the kernel's run counts).
    hits_per_io: f64,
    /// The same per probe.
    hits_per_io_by_probe: BTreeMap<&'static str, f64>,
    /// Time in the probes' programs per I/O in those slices, ns (the kernel's run times).
    program_ns_per_io: f64,
    /// The probes' cost per I/O by accounting: hits x the trap's cost measured by [`HitCost`]
    /// + the programs' run time, ns.
    accounted_ns_per_io: f64,
    /// Median process CPU per I/O of the detached slices, ns.
    cpu_ns_per_io_detached: f64,
    /// `accounted_ns_per_io` as a share of `cpu_ns_per_io_detached`, %.
    accounted_cost_percent: f64,
    /// The longest switch between configurations, ms (not part of any slice).
    longest_switch_ms: f64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    kernel: String,
    cpus: usize,
    /// CPUs this process may run on (fewer than `cpus` under `taskset`).
    cpus_allowed: usize,
    direct_io: bool,
    channel: Vec<ChannelResult>,
    disk: Vec<DiskResult>,
    overhead: Vec<OverheadResult>,
    interleaved: Vec<InterleavedResult>,
    toggled: Vec<toggled::ToggledResult>,
    hit_cost: Option<HitCost>,
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

/// The ring's own cost per packet, without a second thread or signals: one thread writes 16
/// packets into a 256 KiB ring and reads them back, 20,000 times; the best of 5 runs (the copies
/// in and out of shared memory, the descriptor's validation, the index updates).
fn ring_cost_ns(payload: usize) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let rounds = 20_000u64;
        let start = Instant::now();
        ring_cost_rounds(payload, rounds)?;
        best = best.min(start.elapsed().as_nanos() as f64 / (rounds * 16) as f64);
    }
    Ok(best)
}

/// `rounds` times: 16 packets of `payload` bytes written, then read back and committed.
fn ring_cost_rounds(payload: usize, rounds: u64) -> Result<()> {
    let cfg = ChannelConfig {
        out_ring_bytes: 256 * 1024,
        in_ring_bytes: 4096,
        extra_bytes: 0,
    };
    let (mut guest, mut host) = channel::create(&cfg)?;
    let data = vec![0x5au8; payload];
    let mut buf = Vec::with_capacity(payload + 16);
    for i in 0..rounds {
        for j in 0..16 {
            let out = guest.tx.try_write(6, 0, i * 16 + j, &[&data])?;
            anyhow::ensure!(matches!(out, WriteOutcome::Written { .. }), "ring full");
        }
        while host.rx.read_into(&mut buf)?.is_some() {}
        host.rx.commit();
    }
    Ok(())
}

/// `ios` QD32 reads through the synthetic disk (guest driver and host service in this process),
/// with the USDT semaphores set or not: the subject of `--disk-cost-only`.
fn disk_cost_rounds(dir: &std::path::Path, ios: u64, semaphores_on: bool) -> Result<()> {
    let backing = make_backing(dir, false)?;
    let (mut vsc, _vsp, mut spec) = continuous_qd32(backing.path(), Duration::from_secs(3600))?;
    spec.limit = Limit::Ios(ios);
    let _semaphores = semaphores_on
        .then(toggled::Semaphores::force_on_without_tracer)
        .transpose()?;
    let report = workload::run(&mut vsc, &spec, &AtomicBool::new(false), |_| {})?;
    anyhow::ensure!(
        report.ops_total == ios,
        "the workload completed {} of {ios} I/Os",
        report.ops_total
    );
    Ok(())
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

fn main() -> Result<()> {
    let args = Args::parse();
    let all = overhead_probes(&args.overhead_probes)?;
    let machine = first_line("/proc/cpuinfo", "model name");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    if let Some(payload) = args.ring_cost_only {
        ring_cost_rounds(payload, 20_000)?;
        return Ok(());
    }
    if let Some(ios) = args.disk_cost_only {
        return disk_cost_rounds(&args.dir, ios, args.semaphores == Semaphores::On);
    }
    let mut channel = Vec::new();
    for payload in [64, 1024, 4096] {
        channel.push(channel_throughput(payload, args.secs)?);
    }
    if args.channel_only {
        println!("Machine: {machine} ({cpus} CPUs), kernel {kernel}\n");
        print_channel(&channel);
        return print_ring_cost();
    }

    std::fs::create_dir_all(&args.dir)?;
    let mut direct = true;
    let mut disk = Vec::new();
    let mut overhead = Vec::new();
    let mut interleaved = Vec::new();
    let mut toggled = Vec::new();
    let mut probes = match enlight_probes::preflight() {
        Err(e) => {
            eprintln!("probe overhead not measured: {e}");
            None
        }
        Ok(()) => Some(enlight_probes::Probes::load().context("loading the probes")?),
    };
    // The kernel's run counts and times of the programs, for the cost accounting (on while the
    // probe measurements run; they add two clock reads to every program run, which only makes
    // the attached figures slightly pessimistic).
    let _run_stats = match probes {
        Some(_) => Some(enlight_probes::enable_run_stats()?),
        None => None,
    };
    let hit = match probes.as_mut() {
        Some(p) => Some(hit_cost(p).context("measuring the cost of one probe hit")?),
        None => None,
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
        overhead.push(separate_runs(
            probes,
            backing.path(),
            label,
            args.rounds,
            args.secs,
            &all,
        )?);
        if args.interleaved_secs > 0 {
            interleaved.push(interleaved_overhead(
                probes,
                backing.path(),
                label,
                args.interleaved_secs,
                hit.as_ref().expect("measured with the probes"),
                &all,
            )?);
        }
        if args.toggled_secs > 0 {
            toggled.push(toggled::toggled_overhead(
                probes,
                backing.path(),
                label,
                args.toggled_secs,
                &all,
            )?);
        }
    }

    let report = Report {
        cpus_allowed: cpus_allowed(),
        interleaved,
        toggled,
        hit_cost: hit,
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

/// The probes of the "all probes" configuration (`--overhead-probes`, or every probe with a
/// program), checked before anything runs.
fn overhead_probes(asked: &[String]) -> Result<Vec<&str>> {
    let known: Vec<&str> = enlight_probes::PROGRAMS.iter().map(|(p, _)| *p).collect();
    let all: Vec<&str> = if asked.is_empty() {
        known.clone()
    } else {
        asked.iter().map(String::as_str).collect()
    };
    if let Some(unknown) = all.iter().find(|p| !known.contains(p)) {
        anyhow::bail!(
            "--overhead-probes: no program attaches to {unknown:?} (probes with programs: {})",
            known.join(", ")
        );
    }
    Ok(all)
}

/// The ring's cost per packet on one thread (`--channel-only`).
fn print_ring_cost() -> Result<()> {
    println!("\n| one thread, 16 packets written then read | ns per packet (best of 5) |");
    println!("|---|---|");
    for payload in [64, 1024, 4096] {
        println!("| {payload} B | {:.0} |", ring_cost_ns(payload)?);
    }
    Ok(())
}

/// The separate runs of one backing file at QD 32, rotated per round: probes detached, the idle
/// control (only `workload_start`, which fires once per run) and every probe of `all`.
fn separate_runs(
    probes: &mut enlight_probes::Probes,
    backing: &std::path::Path,
    label: &'static str,
    rounds: usize,
    secs: f64,
    all: &[&str],
) -> Result<OverheadResult> {
    let pid = std::process::id();
    let exe = PathBuf::from("/proc/self/exe");
    let (mut with, mut without, mut idle) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sites, mut events, mut ios) = (0, 0u64, 0u64);
    for round in 0..rounds {
        // Rotate the order of the three configurations so drift and warm-up hit each alike.
        for k in 0..3 {
            match (round + k) % 3 {
                0 => without.push(disk_run(backing, 32, secs)?),
                1 => {
                    // Control: attached, but only the probe that fires once per run.
                    probes.attach_process_only(pid, &exe, &["workload_start"])?;
                    idle.push(disk_run(backing, 32, secs)?);
                    probes.detach_process(pid);
                }
                _ => {
                    let report = probes.attach_process_only(pid, &exe, all)?;
                    sites = report.sites_attached;
                    with.push(disk_run(backing, 32, secs)?);
                    let snap = probes.snapshot()?;
                    ios += snap
                        .io
                        .iter()
                        .filter(|(k, _)| k.pid == pid)
                        .map(|(_, s)| s.ops)
                        .sum::<u64>();
                    events += snap
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
    Ok(OverheadResult {
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
        signal_events_per_io: if ios > 0 {
            events as f64 / ios as f64
        } else {
            0.0
        },
    })
}

/// How many CPUs this process may run on.
fn cpus_allowed() -> usize {
    // SAFETY: sched_getaffinity writes into the zeroed set we pass, of the size we pass.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; pid 0 is this thread.
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } == 0;
    if ok {
        // SAFETY: CPU_COUNT reads the set it is given.
        unsafe { libc::CPU_COUNT(&set) as usize }
    } else {
        0
    }
}

fn print_channel(channel: &[ChannelResult]) {
    println!("| channel payload | messages/s | vs 64 B | signals per message |");
    println!("|---|---|---|---|");
    let base = channel[0].messages_per_sec;
    for c in channel {
        println!(
            "| {} B | {:.0} | {:.2} | {:.4} |",
            c.payload_bytes,
            c.messages_per_sec,
            c.messages_per_sec / base,
            c.signals_per_message
        );
    }
}

fn print_markdown(r: &Report) {
    println!(
        "Machine: {} ({} CPUs, this process on {}), kernel {}, backing file O_DIRECT: {}\n",
        r.machine, r.cpus, r.cpus_allowed, r.kernel, r.direct_io
    );
    print_channel(&r.channel);
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
    if let Some(h) = &r.hit_cost {
        println!(
            "\nOne probe hit (the `trap` site and program, tight loop, thread CPU time): {:.0} ns attached, {:.1} ns detached, of which {:.0} ns in the program: the trap itself costs {:.0} ns.",
            h.attached_ns, h.detached_ns, h.program_ns, h.trap_ns
        );
    }
    if !r.interleaved.is_empty() {
        println!("\n| cost accounting, all probes attached | backing file | hits per I/O | program ns per I/O | accounted ns per I/O | CPU ns per I/O, detached | accounted cost |");
        println!("|---|---|---|---|---|---|---|");
    }
    for i in &r.interleaved {
        println!(
            "| QD32 | {} | {:.4} | {:.1} | {:.1} | {:.0} | {:.2}% |",
            i.backing,
            i.hits_per_io,
            i.program_ns_per_io,
            i.accounted_ns_per_io,
            i.cpu_ns_per_io_detached,
            i.accounted_cost_percent
        );
    }
    if !r.interleaved.is_empty() {
        println!("\n| QD32, 4 KiB random read, one continuous run | backing file | triples of 1 s slices | median IOPS, detached slices | IOPS, all probes / detached (geo. mean, 95% CI) | cost | control / detached | CPU per I/O, all probes / detached |");
        println!("|---|---|---|---|---|---|---|---|");
    }
    for i in &r.interleaved {
        println!(
            "| QD32 | {} | {} | {:.0} | {:.4} [{:.4}, {:.4}] | {:.2}% | {:.4} [{:.4}, {:.4}] | {:.4} [{:.4}, {:.4}] |",
            i.backing,
            i.triples,
            i.median_iops_without,
            i.with_mean,
            i.with_ci95.0,
            i.with_ci95.1,
            (1.0 - i.with_mean) * 100.0,
            i.control_mean,
            i.control_ci95.0,
            i.control_ci95.1,
            i.cpu_with_mean,
            i.cpu_with_ci95.0,
            i.cpu_with_ci95.1,
        );
    }
    toggled::print(&r.toggled);
    if !r.overhead.is_empty() {
        println!("\n| QD32, 4 KiB random read | backing file | median IOPS, probes detached | control: idle probe attached | all probes attached | with/without (medians) | with/without (paired by round) | CPU per I/O with/without (paired) | signalling events per I/O (carried by io_reap) |");
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
            o.signal_events_per_io
        );
    }
}
