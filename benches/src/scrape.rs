//! Scrapes against the fleet's size (issue 17, item 3): for each N, a release `enlightd` watches N
//! real synthetic disks (`enlight disk` processes, each at a low open-loop rate), and this
//! process times `/metrics` and `/api/v1/devices` over HTTP (median and p90 of `--scrapes`
//! requests each, spread over the collector's tick), counts their bytes and series, and reads
//! the daemon's CPU time and resident memory from `/proc`: while nobody scrapes (the cost of
//! watching N devices) and per scrape. A benchmark, not a test: it prints its verdict against
//! the target (`/metrics` under 10 ms median at 64 devices) and asserts nothing.
//!
//! Run as root (enlightd loads and attaches the eBPF programs), from release builds:
//!
//! ```sh
//! cargo build --release -p enlight --bins && cargo build --release -p enlight-benches --bin scrape-bench
//! target/release/scrape-bench --devices 1,16,64,256 --json benches/results/scrape-run1.json
//! ```
//!
//! Every process it starts is killed when it ends (also on failure), and its runtime directory
//! (registry, sockets, 1 MiB backing files) is removed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

mod machine;
use machine::first_line;

#[derive(Parser)]
#[command(about = "Scrape time, size and daemon cost against the number of devices")]
struct Args {
    /// Fleet sizes, in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    devices: Vec<usize>,
    /// Requests of each endpoint per fleet size.
    #[arg(long, default_value_t = 50)]
    scrapes: usize,
    /// Milliseconds between requests (not a divisor of the tick, so they land all over it).
    #[arg(long, default_value_t = 137)]
    gap_ms: u64,
    /// Seconds of watching without scrapes, for the daemon's own CPU per device.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Each device's workload (low rate: the daemon's cost, not the disks', is measured).
    #[arg(long, default_value = "qd=1,bs=4k,rw=70,rate=20,pattern=random")]
    workload: String,
    /// The collector's interval.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// The `enlight` binary [default: next to this one].
    #[arg(long)]
    enlight: Option<PathBuf>,
    /// The `enlightd` binary [default: next to this one].
    #[arg(long)]
    enlightd: Option<PathBuf>,
    /// Where the runtime directory (and the disks' backing files) go.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Port the first enlightd listens on (127.0.0.1); the next fleet's the one after.
    #[arg(long, default_value_t = 19464)]
    port: u16,
    /// Where to write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `Accept` header of the `/metrics` requests, e.g. Prometheus's
    /// `application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5` to time the
    /// OpenMetrics exposition [default: none, the text format].
    #[arg(long)]
    accept: Option<String>,
}

/// Request times of one endpoint, milliseconds.
#[derive(Serialize, Debug)]
struct Timing {
    median_ms: f64,
    p90_ms: f64,
    min_ms: f64,
    max_ms: f64,
    bytes: usize,
}

#[derive(Serialize, Debug)]
struct Point {
    devices: usize,
    metrics: Timing,
    /// Sample lines of the exposition (neither comments nor blank).
    series: usize,
    devices_api: Timing,
    /// The collector's last tick's work (`enlight_collector_tick_seconds`), ms.
    tick_ms: f64,
    /// enlightd's CPU while nobody scrapes, percent of one core, and per device.
    idle_cpu_percent: f64,
    idle_cpu_percent_per_device: f64,
    /// enlightd's CPU time per request while scraping (both endpoints, beyond its idle rate), ms.
    cpu_ms_per_request: f64,
    /// enlightd's resident memory after the scrapes, and per device.
    rss_bytes: u64,
    rss_bytes_per_device: f64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    kernel: String,
    cpus: usize,
    enlightd: String,
    workload: String,
    interval_ms: u64,
    scrapes: usize,
    /// The `Accept` header of the `/metrics` requests (none: the text format).
    accept: Option<String>,
    points: Vec<Point>,
}

/// Kills and reaps its processes when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// A process's user plus system CPU time, seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and
    // 13th.
    let rest = &stat[stat.rfind(')').context("no ')' in stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The q-quantile (nearest rank) of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn timing(mut ms: Vec<f64>, bytes: usize) -> Timing {
    ms.sort_by(f64::total_cmp);
    Timing {
        median_ms: quantile(&ms, 0.5),
        p90_ms: quantile(&ms, 0.9),
        min_ms: ms.first().copied().unwrap_or(f64::NAN),
        max_ms: ms.last().copied().unwrap_or(f64::NAN),
        bytes,
    }
}

/// One GET (with `accept` as its `Accept` header), timed from the request to the body's last
/// byte.
fn get(agent: &ureq::Agent, url: &str, accept: Option<&str>) -> Result<(f64, Vec<u8>)> {
    let t = Instant::now();
    let mut req = agent.get(url);
    if let Some(a) = accept {
        req = req.set("Accept", a);
    }
    let resp = req.call().with_context(|| format!("GET {url}"))?;
    let mut body = Vec::new();
    resp.into_reader().read_to_end(&mut body)?;
    Ok((t.elapsed().as_secs_f64() * 1e3, body))
}

/// The value of an unlabelled series.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn run_point(args: &Args, enlight: &Path, enlightd: &Path, n: usize, port: u16) -> Result<Point> {
    let dir = tempfile::Builder::new()
        .prefix("scrape-bench")
        .tempdir_in(&args.dir)?;
    let base = format!("http://127.0.0.1:{port}");
    let mut procs = Procs(Vec::new());
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let daemon_pid = start_daemon(args, enlightd, dir.path(), port, &agent, &mut procs)?;
    start_disks(args, enlight, dir.path(), n, &mut procs)?;
    wait_until_busy(&agent, &base, n, &mut procs)?;
    // Then two more ticks so each device has rates and peaks.
    std::thread::sleep(Duration::from_millis(2 * args.interval_ms + 100));

    let (c0, t0) = (cpu_secs(daemon_pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(args.idle_secs));
    let idle_rate = (cpu_secs(daemon_pid)? - c0) / t0.elapsed().as_secs_f64();

    let s = scrape(args, &agent, &base, daemon_pid, idle_rate)?;
    let rss = rss_bytes(daemon_pid);

    let text = String::from_utf8(s.metrics_body)?;
    let series = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    let views: Vec<serde_json::Value> = serde_json::from_slice(&s.devices_body)?;
    if views.len() != n {
        bail!("/api/v1/devices lists {} devices, not {n}", views.len());
    }
    Ok(Point {
        devices: n,
        series,
        tick_ms: sample(&text, "enlight_collector_tick_seconds").unwrap_or(f64::NAN) * 1e3,
        metrics: timing(s.metrics_ms, text.len()),
        devices_api: timing(s.devices_ms, s.devices_body.len()),
        idle_cpu_percent: idle_rate * 100.0,
        idle_cpu_percent_per_device: idle_rate * 100.0 / n as f64,
        cpu_ms_per_request: s.cpu_per_request * 1e3,
        rss_bytes: rss,
        rss_bytes_per_device: rss as f64 / n as f64,
    })
}

/// Starts enlightd on `dir` and `port` (into `procs`) and waits until it answers; returns its
/// pid.
fn start_daemon(
    args: &Args,
    enlightd: &Path,
    dir: &Path,
    port: u16,
    agent: &ureq::Agent,
    procs: &mut Procs,
) -> Result<u32> {
    procs.0.push(
        Command::new(enlightd)
            .arg("--runtime-dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--interval-ms", &args.interval_ms.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting enlightd")?,
    );
    let daemon = procs.0.last_mut().expect("just pushed");
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent
        .get(&format!("http://127.0.0.1:{port}/api/v1/health"))
        .call()
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("enlightd did not answer within 30 s");
        }
        if let Some(s) = daemon.try_wait()? {
            bail!("enlightd exited: {s}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(daemon.id())
}

/// Starts `n` disk device processes (`scr0`, `scr1`, ...) on `dir`, into `procs`.
fn start_disks(args: &Args, enlight: &Path, dir: &Path, n: usize, procs: &mut Procs) -> Result<()> {
    for i in 0..n {
        let name = format!("scr{i}");
        procs.0.push(
            Command::new(enlight)
                .args([
                    "disk",
                    "--name",
                    &name,
                    "--create-mib",
                    "1",
                    "--workers",
                    "1",
                ])
                .args(["--workload", &args.workload])
                .arg("--backing")
                .arg(dir.join(format!("{name}.img")))
                .arg("--runtime-dir")
                .arg(dir)
                .stdout(Stdio::null())
                .spawn()
                .context("starting enlight disk")?,
        );
    }
    Ok(())
}

/// Waits until every one of the `n` devices is attached and doing I/O as enlightd sees it (a
/// process that exits meanwhile is an error).
fn wait_until_busy(agent: &ureq::Agent, base: &str, n: usize, procs: &mut Procs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60 + n as u64);
    loop {
        let (_, body) = get(agent, &format!("{base}/api/v1/devices"), None)?;
        let views: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
        let busy = views
            .iter()
            .filter(|d| d["attached"] == true && d["total"]["ops_total"].as_u64() > Some(0))
            .count();
        if busy == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{busy} of {n} devices attached and doing I/O");
        }
        for c in &mut procs.0 {
            if let Some(s) = c.try_wait()? {
                bail!("a process exited: {s}");
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `--scrapes` requests of each endpoint: their times, the last bodies, and the daemon's CPU
/// seconds per request beyond its idle rate.
struct Scrapes {
    metrics_ms: Vec<f64>,
    devices_ms: Vec<f64>,
    metrics_body: Vec<u8>,
    devices_body: Vec<u8>,
    cpu_per_request: f64,
}

/// Requests `/metrics` and `/api/v1/devices` in turn, `--gap-ms` apart, timing each.
fn scrape(
    args: &Args,
    agent: &ureq::Agent,
    base: &str,
    daemon_pid: u32,
    idle_rate: f64,
) -> Result<Scrapes> {
    let (c1, t1) = (cpu_secs(daemon_pid)?, Instant::now());
    let (mut metrics_ms, mut devices_ms) = (Vec::new(), Vec::new());
    let (mut metrics_body, mut devices_body) = (Vec::new(), Vec::new());
    for _ in 0..args.scrapes {
        let (ms, body) = get(agent, &format!("{base}/metrics"), args.accept.as_deref())?;
        metrics_ms.push(ms);
        metrics_body = body;
        std::thread::sleep(Duration::from_millis(args.gap_ms / 2));
        let (ms, body) = get(agent, &format!("{base}/api/v1/devices"), None)?;
        devices_ms.push(ms);
        devices_body = body;
        std::thread::sleep(Duration::from_millis(args.gap_ms - args.gap_ms / 2));
    }
    let scraping_cpu = cpu_secs(daemon_pid)? - c1;
    let cpu_per_request =
        (scraping_cpu - idle_rate * t1.elapsed().as_secs_f64()) / (2 * args.scrapes) as f64;
    Ok(Scrapes {
        metrics_ms,
        devices_ms,
        metrics_body,
        devices_body,
        cpu_per_request,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.scrapes == 0 || args.devices.is_empty() || args.devices.contains(&0) {
        bail!("--scrapes and every --devices must be at least 1");
    }
    let here = std::env::current_exe()?;
    let sibling = |name: &str| here.with_file_name(name);
    let enlight = args.enlight.clone().unwrap_or_else(|| sibling("enlight"));
    let enlightd = args.enlightd.clone().unwrap_or_else(|| sibling("enlightd"));
    let machine = first_line("/proc/cpuinfo", "model name");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{machine}, {cpus} CPUs, kernel {kernel}; {} ; workload {} per device, tick {} ms, {} requests of each endpoint; /metrics Accept: {}",
        enlightd.display(),
        args.workload,
        args.interval_ms,
        args.scrapes,
        args.accept.as_deref().unwrap_or("(none)")
    );
    println!(
        "{:>7} | {:>27} | {:>7} {:>7} | {:>27} | {:>7} | {:>6} {:>9} {:>8} | {:>8} {:>9}",
        "devices",
        "/metrics med / p90 (ms)",
        "KiB",
        "series",
        "/api/v1/devices med / p90",
        "KiB",
        "CPU %",
        "%/device",
        "ms/req",
        "RSS MiB",
        "KiB/dev"
    );
    let mut points = Vec::new();
    for (i, &n) in args.devices.iter().enumerate() {
        // A port of its own per daemon: the last one's may linger.
        let port = args.port + i as u16;
        let p = run_point(&args, &enlight, &enlightd, n, port)
            .with_context(|| format!("{n} devices"))?;
        println!(
            "{:>7} | {:>12.2} / {:>12.2} | {:>7.0} {:>7} | {:>12.2} / {:>12.2} | {:>7.0} | {:>6.2} {:>9.4} {:>8.2} | {:>8.1} {:>9.0}",
            p.devices,
            p.metrics.median_ms,
            p.metrics.p90_ms,
            p.metrics.bytes as f64 / 1024.0,
            p.series,
            p.devices_api.median_ms,
            p.devices_api.p90_ms,
            p.devices_api.bytes as f64 / 1024.0,
            p.idle_cpu_percent,
            p.idle_cpu_percent_per_device,
            p.cpu_ms_per_request,
            p.rss_bytes as f64 / (1 << 20) as f64,
            p.rss_bytes_per_device / 1024.0,
        );
        points.push(p);
    }
    if let Some(p) = points.iter().find(|p| p.devices == 64) {
        let met = p.metrics.median_ms < 10.0 && p.devices_api.median_ms < 10.0;
        println!(
            "verdict: at 64 devices /metrics median {:.2} ms (p90 {:.2}), /api/v1/devices median {:.2} ms (p90 {:.2}): target < 10 ms {}",
            p.metrics.median_ms,
            p.metrics.p90_ms,
            p.devices_api.median_ms,
            p.devices_api.p90_ms,
            if met { "MET" } else { "NOT MET" }
        );
    }
    if let Some(path) = &args.json {
        let report = Report {
            machine,
            kernel,
            cpus,
            enlightd: enlightd.display().to_string(),
            workload: args.workload.clone(),
            interval_ms: args.interval_ms,
            scrapes: args.scrapes,
            accept: args.accept.clone(),
            points,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 25.0);
        assert_eq!(quantile(&v, 0.9), 45.0);
        assert_eq!(quantile(&[3.0], 0.9), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn unlabelled_samples_are_read_by_exact_name() {
        let text = "# HELP x y\nenlight_collector_tick_seconds_x 9\nenlight_collector_tick_seconds 0.0125\n";
        assert_eq!(sample(text, "enlight_collector_tick_seconds"), Some(0.0125));
    }
}
