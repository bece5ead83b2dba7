//! `kernel-bench`: what the kernel-device probes cost on the kernel's own I/O path (not a test).
//!
//! fio drives a loop device the bench creates (4 KiB random reads), in rounds that alternate
//! without and with every kernel probe attached (block, net, NAPI, IRQ, KVM; loaded fresh each
//! "with" round and dropped after it), so drift hits both sides alike. Two backings:
//! - `tmpfs`: the loop device's file lives in /dev/shm, so a read is a memory copy and the path
//!   is CPU-bound: the worst case, where the probes' nanoseconds show most;
//! - `disk`: the file lives on the machine's disk with direct I/O, the usual case.
//!
//! Prints a Markdown report with the machine and kernel and each round's IOPS, and writes the
//! raw figures as JSON. Needs root (loop devices, eBPF).
//!
//! `--peers` measures instead what enlight's block programs cost per fio I/O against
//! libbpf-tools `biolatency -D` and a bpftrace one-liner (`kernel_peers.rs`).

mod kernel_peers;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;
use enlight_probes::kernel::{KernelProbes, Selection};
use serde::Serialize;

#[derive(Parser)]
#[command(
    about = "Cost of the kernel-device probes on the kernel's I/O path: fio IOPS with and without"
)]
struct Args {
    /// Seconds per round.
    #[arg(long, default_value_t = 2)]
    secs: u32,
    /// Rounds per side (without / with), alternated.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// fio queue depth (libaio); 1 uses psync.
    #[arg(long, default_value_t = 1)]
    iodepth: u32,
    /// Where to write the raw results (default: benches/results/kernel.json, or
    /// kernel-peers.json with --peers).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Compare enlight's block programs with `biolatency -D` and bpftrace (program time per fio
    /// I/O, rounds rotating the three) instead of measuring IOPS with and without.
    #[arg(long)]
    peers: bool,
}

#[derive(Serialize)]
struct Round {
    backing: &'static str,
    probes: bool,
    iops: f64,
    clat_p50_us: f64,
}

/// One program's measured cost, from a separate round with `kernel.bpf_stats_enabled` on (the
/// statistics themselves cost a little, so they stay off in the IOPS rounds).
#[derive(Serialize)]
struct ProgramCost {
    backing: &'static str,
    program: String,
    runs: u64,
    ns_per_run: f64,
    runs_per_io: f64,
}

#[derive(Serialize)]
struct Summary {
    backing: &'static str,
    iops_without: f64,
    iops_with: f64,
    /// Median over rounds of with/without, each "with" round paired with the "without" round
    /// before it.
    paired_ratio_median: f64,
    paired_ratio_min: f64,
    paired_ratio_max: f64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    kernel: String,
    secs: u32,
    iodepth: u32,
    rounds: Vec<Round>,
    summaries: Vec<Summary>,
    program_costs: Vec<ProgramCost>,
    /// Nanoseconds of probe programs per I/O, per backing.
    probe_ns_per_io: Vec<(&'static str, f64)>,
}

/// `kernel.bpf_stats_enabled` on while it lives, then back to what it was.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let old = std::fs::read_to_string(path)?.trim().to_string();
        std::fs::write(path, "1")?;
        Ok(BpfStats(old))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

/// A loop device over a file in `dir`; detached (and the file removed) on drop.
struct Loop {
    dev: String,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new(dir: &Path, direct: bool) -> Result<Loop> {
        let tmp = tempfile::tempdir_in(dir)?;
        let file = tmp.path().join("bench.img");
        let status = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "count=256", "status=none"])
            .arg(format!("of={}", file.display()))
            .status()?;
        if !status.success() {
            bail!("dd failed");
        }
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(format!("--direct-io={}", if direct { "on" } else { "off" }))
            .arg(&file)
            .output()
            .context("losetup")?;
        if !out.status.success() {
            bail!("losetup: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            _dir: tmp,
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn fio(dev: &str, secs: u32, iodepth: u32) -> Result<(f64, f64)> {
    let engine = if iodepth > 1 { "libaio" } else { "psync" };
    let out = Command::new("fio")
        .args([
            "--name=kernel-bench",
            &format!("--filename={dev}"),
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            &format!("--ioengine={engine}"),
            &format!("--iodepth={iodepth}"),
            "--size=256M",
            &format!("--runtime={secs}"),
            "--time_based",
            "--output-format=json",
        ])
        .output()
        .context("fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let read = &v["jobs"][0]["read"];
    Ok((
        read["iops"].as_f64().unwrap_or(0.0),
        read["clat_ns"]["percentile"]["50.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e3,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let args = Args::parse();
    enlight_probes::preflight()?;
    if args.peers {
        return kernel_peers::run(&kernel_peers::PeersArgs {
            secs: args.secs,
            rounds: args.rounds,
            iodepth: args.iodepth,
            json: args
                .json
                .unwrap_or_else(|| "benches/results/kernel-peers.json".into()),
        });
    }
    let json = args
        .json
        .clone()
        .unwrap_or_else(|| "benches/results/kernel.json".into());
    let mut report = Report {
        machine: machine(),
        kernel: first_line("uname", &["-r"]),
        secs: args.secs,
        iodepth: args.iodepth,
        rounds: Vec::new(),
        summaries: Vec::new(),
        program_costs: Vec::new(),
        probe_ns_per_io: Vec::new(),
    };
    for (backing, dir, direct) in [
        ("tmpfs", Path::new("/dev/shm"), false),
        ("disk", Path::new("/var/tmp"), true),
    ] {
        let lo = Loop::new(dir, direct)?;
        // Warm-up (page cache of the backing file, CPU frequency).
        fio(&lo.dev, 1, args.iodepth)?;
        let summary = paired_rounds(&args, &lo, backing, &mut report.rounds)?;
        let (costs, ns_per_io) = program_costs(&args, &lo, backing)?;
        report.program_costs.extend(costs);
        report.probe_ns_per_io.push((backing, ns_per_io));
        report.summaries.push(summary);
    }
    print_report(&report, args.rounds);
    if let Some(parent) = json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
    eprintln!("raw results: {}", json.display());
    Ok(())
}

/// The CPU model and count, as the report states them.
fn machine() -> String {
    format!(
        "{}, {} CPUs",
        first_line(
            "sh",
            &["-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]
        ),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )
}

/// `--rounds` rounds on one backing, each without then with the probes (loaded fresh for the
/// "with" half); appends them to `rounds` and returns their summary.
fn paired_rounds(
    args: &Args,
    lo: &Loop,
    backing: &'static str,
    rounds: &mut Vec<Round>,
) -> Result<Summary> {
    let mut ratios = Vec::new();
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        let (off, off_p50) = fio(&lo.dev, args.secs, args.iodepth)?;
        let probes = KernelProbes::load(&Selection::default())?;
        let (on, on_p50) = fio(&lo.dev, args.secs, args.iodepth)?;
        let snap = probes.snapshot()?;
        drop(probes);
        let counted: u64 = snap.disks.values().map(|s| s.ops).sum();
        eprintln!(
            "{backing}: without {off:.0} IOPS, with {on:.0} IOPS ({:.3}); the probes counted {counted} requests",
            on / off
        );
        ratios.push(on / off);
        without.push(off);
        with.push(on);
        rounds.push(Round {
            backing,
            probes: false,
            iops: off,
            clat_p50_us: off_p50,
        });
        rounds.push(Round {
            backing,
            probes: true,
            iops: on,
            clat_p50_us: on_p50,
        });
    }
    Ok(Summary {
        backing,
        iops_without: median(without),
        iops_with: median(with),
        paired_ratio_median: median(ratios.clone()),
        paired_ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        paired_ratio_max: ratios.iter().copied().fold(0.0, f64::max),
    })
}

/// The programs' own cost, measured by the kernel (run time per run), in one more round on a
/// backing: each program that ran, and the nanoseconds of all of them per fio I/O.
fn program_costs(args: &Args, lo: &Loop, backing: &'static str) -> Result<(Vec<ProgramCost>, f64)> {
    let probes = KernelProbes::load(&Selection::default())?;
    let _stats = BpfStats::enable()?;
    let (iops, _) = fio(&lo.dev, args.secs, args.iodepth)?;
    let ios = iops * args.secs as f64;
    let mut total_ns = 0u64;
    let mut costs = Vec::new();
    for (program, st) in probes.program_stats() {
        if st.run_cnt == 0 {
            continue;
        }
        total_ns += st.run_time_ns;
        costs.push(ProgramCost {
            backing,
            program,
            runs: st.run_cnt,
            ns_per_run: st.run_time_ns as f64 / st.run_cnt as f64,
            runs_per_io: st.run_cnt as f64 / ios,
        });
    }
    Ok((costs, total_ns as f64 / ios))
}

/// The Markdown report (`rounds`: rounds per side).
fn print_report(report: &Report, rounds: usize) {
    println!("## Kernel-device probes: fio IOPS with and without\n");
    println!("Machine: {}; kernel {}. fio 4 KiB random reads on a loop device, queue depth {}, {} s rounds, {} rounds per side alternated (without, with, ...).\n", report.machine, report.kernel, report.iodepth, report.secs, rounds);
    println!("| backing | IOPS without (median) | IOPS with (median) | paired with/without: median | min | max |");
    println!("|---|---|---|---|---|---|");
    for s in &report.summaries {
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} |",
            s.backing,
            s.iops_without,
            s.iops_with,
            s.paired_ratio_median,
            s.paired_ratio_min,
            s.paired_ratio_max
        );
    }
    println!("\nThe programs' own run time (kernel.bpf_stats_enabled, one extra round per backing; every hit on the machine counts, other processes' too):\n");
    println!("| backing | program | runs | ns per run | runs per fio I/O |");
    println!("|---|---|---|---|---|");
    for c in &report.program_costs {
        println!(
            "| {} | {} | {} | {:.0} | {:.2} |",
            c.backing, c.program, c.runs, c.ns_per_run, c.runs_per_io
        );
    }
    for (backing, ns) in &report.probe_ns_per_io {
        println!("\n{backing}: {ns:.0} ns of probe programs per fio I/O");
    }
}
