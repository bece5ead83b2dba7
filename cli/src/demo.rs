//! `enlight demo`: the main job on an embedded default.
//!
//! Starts a device process (`enlight disk`) on a temporary backing file with a random 4 KiB
//! read/write workload at queue depth 32, runs enlightd in this process with a private runtime
//! directory so it finds exactly that device, and prints one line per second: IOPS and
//! p50/p99/p999 as the eBPF-fed histograms see them next to the workload's own figures. Stops on
//! Ctrl-C or after `--duration`, and removes everything it created.
//!
//! The tuner runs too (`--tune auto` by default): each decision it takes on the disk is printed
//! under the summary line as it happens, with the settings it changed and its reason.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use enlight_driver::workload::WorkloadSnapshot;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Stop after this many seconds, 1..=31536000 (default: run until Ctrl-C, SIGTERM or
    /// SIGHUP, or until its output is closed).
    #[arg(long, value_name = "SECS", value_parser = crate::ranges::int(1..=31_536_000u64))]
    duration: Option<u64>,
    /// Address for enlightd's /metrics and JSON API.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// Workload for the demo disk (keys and their ranges: `enlight disk --help`).
    #[arg(long, default_value = "qd=32,bs=4k,rw=70,pattern=random", value_parser = crate::ranges::plan_text)]
    workload: String,
    /// Size of the temporary backing file in MiB, 1..=1048576.
    #[arg(long, default_value_t = 256, value_parser = crate::ranges::mib)]
    size_mib: u64,
    /// The tuner: `auto` changes the disk's settings live through its control socket,
    /// `dry-run` only recommends, `off` runs none.
    #[arg(long, value_enum, default_value_t = DemoTuner::Auto)]
    tune: DemoTuner,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DemoTuner {
    Off,
    DryRun,
    Auto,
}

/// Latest figures reported by the device process (its workload's own counts).
#[derive(Default)]
struct DeviceFeed {
    latest: Option<WorkloadSnapshot>,
    finished: bool,
}

pub fn run(args: DemoArgs) -> Result<()> {
    enlight_probes::preflight().map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: DemoArgs) -> Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("enlight-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let runtime_dir = scratch.path().join("run");
    let backing = scratch.path().join("disk0.img");

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "binding {} for /metrics (try --listen 127.0.0.1:0)",
                args.listen
            )
        })?;
    let metrics_addr = listener.local_addr()?;

    let mut config = enlightd::Config {
        runtime_dir: runtime_dir.clone(),
        interval_ms: 1000,
        ..enlightd::Config::default()
    };
    config.tuner.mode = match args.tune {
        DemoTuner::Off => enlightd::tuner::TunerMode::Off,
        DemoTuner::DryRun => enlightd::tuner::TunerMode::DryRun,
        DemoTuner::Auto => enlightd::tuner::TunerMode::Auto,
    };
    let daemon = enlightd::Daemon::start(config).context("starting enlightd")?;
    let handle = daemon.handle();
    let (stop_daemon, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(daemon.serve(listener, async {
        let _ = stopped.await;
    }));

    let mut child = spawn_device(&backing, &runtime_dir, &args)?;
    let feed = Arc::new(Mutex::new(DeviceFeed::default()));
    let reader = read_device_feed(&mut child, Arc::clone(&feed))?;

    println!(
        "enlight demo: synthetic disk 'disk0' ({}), workload {}",
        backing.display(),
        args.workload
    );
    println!(
        "metrics: http://{metrics_addr}/metrics   devices: http://{metrics_addr}/api/v1/devices"
    );
    println!("{}", summary_header());

    let started = Instant::now();
    let deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut interrupted = false;
    let mut last_decision_ms = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => { interrupted = true; }
        }
        let finished = feed.lock().expect("feed lock").finished;
        let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        if interrupted || timed_out || finished {
            break;
        }
        let workload = feed.lock().expect("feed lock").latest.clone();
        let devices = handle.devices();
        println!(
            "{}",
            summary_line(started.elapsed(), &devices, workload.as_ref())
        );
        let decision = devices
            .iter()
            .find(|d| d.name == "disk0")
            .and_then(|d| d.tuner.as_ref())
            .and_then(|t| t.last_decision.as_ref());
        if let Some(d) = decision.filter(|d| d.ts_unix_ms != last_decision_ms) {
            last_decision_ms = d.ts_unix_ms;
            println!("{}", decision_line(d));
        }
    }

    // Stop the device first so its final figures reach the maps, then wait for two more
    // collector intervals (the first reads them, the second is a margin), and print the final
    // comparison.
    stop_device(&mut child)?;
    let _ = reader.join();
    wait_for_ticks(&handle, 2, Duration::from_secs(10)).await;
    let workload = feed.lock().expect("feed lock").latest.clone();
    let devices = handle.devices();
    let ebpf = devices.iter().find(|d| d.name == "disk0");
    println!(
        "final: I/Os counted by eBPF {} / by the workload {}; p50/p99/p999 eBPF {}/{}/{}, workload {}/{}/{}",
        ebpf.map(|d| d.total.ops_total.to_string()).unwrap_or_else(|| "-".into()),
        workload.as_ref().map(|w| w.ops_total.to_string()).unwrap_or_else(|| "-".into()),
        us(ebpf.and_then(|d| d.total.p50_seconds)),
        us(ebpf.and_then(|d| d.total.p99_seconds)),
        us(ebpf.and_then(|d| d.total.p999_seconds)),
        us(workload.as_ref().map(|w| w.p50_ns as f64 / 1e9)),
        us(workload.as_ref().map(|w| w.p99_ns as f64 / 1e9)),
        us(workload.as_ref().map(|w| w.p999_ns as f64 / 1e9)),
    );

    let _ = stop_daemon.send(());
    server.await.context("joining enlightd")??;
    drop(scratch);
    Ok(())
}

/// Waits until the collector has completed `n` more intervals (at most `limit`; a stalled
/// collector is reported, and the caller prints what it has). A whole tick holds the state lock
/// that [`enlightd::DaemonHandle::ticks`] takes, so the next tick starts after this call: with
/// the device already exited, it reads everything the device left in the maps.
async fn wait_for_ticks(handle: &enlightd::DaemonHandle, n: u64, limit: Duration) {
    let target = handle.ticks() + n;
    let deadline = Instant::now() + limit;
    while handle.ticks() < target {
        if Instant::now() >= deadline {
            eprintln!(
                "enlight demo: enlightd's collector did not complete {n} intervals in {}s; the \
                 eBPF figures below may miss the last ones",
                limit.as_secs()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_device(backing: &Path, runtime_dir: &Path, args: &DemoArgs) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the enlight executable")?;
    let child = Command::new(exe)
        .arg("disk")
        .arg("--name")
        .arg("disk0")
        .arg("--backing")
        .arg(backing)
        .arg("--create-mib")
        .arg(args.size_mib.to_string())
        .arg("--runtime-dir")
        .arg(runtime_dir)
        .arg("--workload")
        .arg(&args.workload)
        .arg("--wait-for-probes")
        .arg("20")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .context("starting the device process (enlight disk)")?;
    Ok(child)
}

fn read_device_feed(
    child: &mut Child,
    feed: Arc<Mutex<DeviceFeed>>,
) -> Result<std::thread::JoinHandle<()>> {
    let stdout = child
        .stdout
        .take()
        .context("device process has no stdout")?;
    Ok(std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<WorkloadSnapshot>(&line) {
                Ok(snapshot) => feed.lock().expect("feed lock").latest = Some(snapshot),
                Err(e) => log::warn!("unreadable line from the device process: {e}: {line}"),
            }
        }
        feed.lock().expect("feed lock").finished = true;
    }))
}

fn stop_device(child: &mut Child) -> Result<()> {
    if child.try_wait()?.is_none() {
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    }
    let status = child.wait().context("waiting for the device process")?;
    if !status.success() {
        bail!("device process exited with {status}");
    }
    Ok(())
}

/// One tuner decision, as the tuner states it (the knobs it moved and why).
fn decision_line(d: &enlightd::tuner::Decision) -> String {
    let action = match d.action {
        enlightd::tuner::Action::Change => "change",
        enlightd::tuner::Action::Revert => "revert",
        enlightd::tuner::Action::Recommend => "recommend",
    };
    format!("       tuner {action}: {}", d.reason)
}

fn summary_header() -> String {
    format!(
        "{:>5}  {:>10} {:>9} {:>9} {:>9} {:>8}  | {:>10} {:>9} {:>9} {:>9}",
        "time", "eBPF IOPS", "p50", "p99", "p999", "irq/s", "workload", "p50", "p99", "p999"
    )
}

fn us(seconds: Option<f64>) -> String {
    match seconds {
        Some(s) => format!("{:.1}us", s * 1e6),
        None => "-".into(),
    }
}

fn summary_line(
    elapsed: Duration,
    devices: &[enlightd::DeviceView],
    workload: Option<&WorkloadSnapshot>,
) -> String {
    let ebpf = match devices.iter().find(|d| d.name == "disk0") {
        Some(d) if d.attached || !d.present => format!(
            "{:>10.0} {:>9} {:>9} {:>9} {:>8.0}",
            d.total.ops_per_sec,
            us(d.total.p50_seconds),
            us(d.total.p99_seconds),
            us(d.total.p999_seconds),
            d.interrupts_per_sec
        ),
        Some(d) => format!(
            "{:>48}",
            d.attach_error.as_deref().unwrap_or("attaching...")
        ),
        None => format!("{:>48}", "waiting for the device"),
    };
    let own = match workload {
        Some(w) => format!(
            "{:>10.0} {:>9} {:>9} {:>9}",
            w.iops_interval,
            us(Some(w.p50_ns as f64 / 1e9)),
            us(Some(w.p99_ns as f64 / 1e9)),
            us(Some(w.p999_ns as f64 / 1e9))
        ),
        None => format!("{:>40}", "-"),
    };
    format!("{:>4}s  {ebpf}  | {own}", elapsed.as_secs())
}
