//! `enlight demo`: the main job on an embedded default.
//!
//! Starts a device process (`enlight disk`) on a temporary backing file with a random 4 KiB
//! read/write workload at queue depth 32, runs enlightd in this process with a private runtime
//! directory so it finds exactly that device, and prints one line per second: IOPS and
//! p50/p99/p999 as the eBPF-fed histograms see them next to the workload's own figures. Stops on
//! Ctrl-C, SIGTERM, SIGHUP, a closed stdout (`enlight demo | head -1`) or after `--duration`,
//! all the same way, and removes everything it created; its device process dies with it even
//! when the demo itself is killed with SIGKILL (the next demo then removes its directory).
//!
//! The tuner runs too (`--tune auto` by default): each decision it takes on the disk is printed
//! under the summary line as it happens, with the settings it changed and its reason.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use enlight_driver::workload::WorkloadSnapshot;

use crate::children::DieWithParent;
use crate::signals;

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
    /// The last few seconds of reports, with when each arrived.
    recent: std::collections::VecDeque<(Instant, WorkloadSnapshot)>,
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

/// The demo's temporary directory is `<TMPDIR>/enlight-demo-<pid>-XXXXXX`: the pid says whose
/// it is, so a directory whose demo no longer runs (a SIGKILLed one: no handler runs then) is
/// removed by the next demo.
const SCRATCH_PREFIX: &str = "enlight-demo-";

/// A device as enlightd's JSON API serves it, read the way a client reads it: enlight-abi's
/// lenient view (a kind, state or action this build does not know is kept as written).
type ApiDevice = enlight_abi::api::DeviceView;

async fn run_async(args: DemoArgs) -> Result<()> {
    // Before anything exists that would need cleaning up: SIGINT, SIGTERM and SIGHUP all end
    // the demo the way Ctrl-C does (a closed stdout too, through `signals::line`).
    let wake = watch_stop_signals().context("installing signal handlers")?;
    remove_leftovers(&std::env::temp_dir());
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{SCRATCH_PREFIX}{}-", std::process::id()))
        .tempdir()
        .context("creating a temporary directory")?;
    let runtime_dir = scratch.path().join("run");
    let backing = scratch.path().join("disk0.img");

    let daemon = InProcessDaemon::start(&args, runtime_dir.clone()).await?;
    if signals::stop_requested() {
        // Stopped while enlightd was starting: nothing else was started.
        return daemon.stop().await;
    }

    let mut device = DeviceProcess::spawn(&backing, &runtime_dir, &args)?;
    let feed = Arc::new(Mutex::new(DeviceFeed::default()));
    let reader = read_device_feed(&mut device.child, Arc::clone(&feed))?;
    print_banner(&backing, &args.workload, daemon.metrics_addr);

    let started = Instant::now();
    let deadline = args.duration.map(|s| started + Duration::from_secs(s));
    watch(&daemon.handle, &feed, wake, started, deadline).await;

    // Stop the device first so its final figures reach the maps, then wait for two more
    // collector intervals (the first reads them, the second is a margin), and print the final
    // comparison.
    if signals::stop_requested() {
        eprintln!("enlight demo: stopping the device and reading its last figures...");
    }
    device.stop()?;
    let _ = reader.join();
    wait_for_ticks(&daemon.handle, 2, Duration::from_secs(10)).await;
    print_final(&daemon.handle, &feed);
    clean_up(daemon, scratch, args.size_mib).await
}

/// enlightd, run inside the demo's process on the demo's private runtime directory (so it
/// finds exactly the demo's device), serving /metrics and the JSON API on `--listen`.
struct InProcessDaemon {
    handle: enlightd::DaemonHandle,
    metrics_addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), enlightd::DaemonError>>,
}

impl InProcessDaemon {
    async fn start(args: &DemoArgs, runtime_dir: PathBuf) -> Result<InProcessDaemon> {
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
            runtime_dir,
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
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(daemon.serve(listener, async {
            let _ = stopped.await;
        }));
        Ok(InProcessDaemon {
            handle,
            metrics_addr,
            stop,
            server,
        })
    }

    /// Stops serving and the collector (detaching the probes), and waits until it has.
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.server.await.context("joining enlightd")??;
        Ok(())
    }
}

/// The demo's disk (`disk0`) as `/api/v1/devices` serves it now, read as a client reads it.
fn disk0(handle: &enlightd::DaemonHandle) -> Option<ApiDevice> {
    match serde_json::from_slice::<Vec<ApiDevice>>(&handle.devices_json()) {
        Ok(devices) => devices.into_iter().find(|d| d.name == "disk0"),
        Err(e) => {
            log::warn!("reading enlightd's device views: {e}");
            None
        }
    }
}

fn print_banner(backing: &Path, workload: &str, metrics_addr: SocketAddr) {
    signals::line(format_args!(
        "enlight demo: synthetic disk 'disk0' ({}), workload {}",
        backing.display(),
        workload
    ));
    signals::line(format_args!(
        "metrics: http://{metrics_addr}/metrics   devices: http://{metrics_addr}/api/v1/devices"
    ));
    signals::line(summary_header());
}

/// The live part: a summary row per collector interval (and the tuner's decisions as they
/// come) until a stop signal, the deadline, or the device process ends.
async fn watch(
    handle: &enlightd::DaemonHandle,
    feed: &Mutex<DeviceFeed>,
    mut wake: tokio::sync::watch::Receiver<()>,
    started: Instant,
    deadline: Option<Instant>,
) {
    // A row per collector interval, both halves over the same span: the eBPF counts as the
    // collector read them at two consecutive ticks, the workload's as it reported them (every
    // 100 ms) closest to those two reads.
    let mut last_tick = handle.ticks();
    let mut printed = Printed::default();
    loop {
        if signals::stop_requested() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = wake.changed() => continue,
        }
        let finished = feed.lock().expect("feed lock").finished;
        let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        if timed_out || finished {
            break;
        }
        let (ticks, read_at) = handle.ticks_and_read_at();
        if ticks == last_tick {
            continue;
        }
        last_tick = ticks;
        let device = disk0(handle);
        // The eBPF figures are as of the collector's read of the maps; the workload's report
        // closest to that moment goes with them.
        let at = read_at.unwrap_or_else(Instant::now);
        let now = Moment {
            at,
            device,
            workload: closest_report(feed, at),
        };
        printed.show(started, now);
    }
}

/// The workload's report closest to `at` among the last few seconds' (or its latest).
fn closest_report(feed: &Mutex<DeviceFeed>, at: Instant) -> Option<WorkloadSnapshot> {
    let f = feed.lock().expect("feed lock");
    f.recent
        .iter()
        .min_by_key(|(t, _)| {
            if *t > at {
                t.duration_since(at)
            } else {
                at.duration_since(*t)
            }
        })
        .map(|(_, w)| w.clone())
        .or_else(|| f.latest.clone())
}

/// What the live summary has shown so far: the previous moment (a row spans two), the last
/// decision printed and the tuner's last state.
#[derive(Default)]
struct Printed {
    previous: Option<Moment>,
    last_decision_ms: u64,
    last_state: Option<enlight_abi::tuner::State>,
}

impl Printed {
    /// Prints the row ending at `now`, then the tuner's new decision and its parking, if any.
    fn show(&mut self, started: Instant, now: Moment) {
        if let Some(before) = &self.previous {
            signals::line(summary_line(started.elapsed(), before, &now));
        }
        let tuner = now.device.as_ref().and_then(|d| d.tuner.as_ref());
        let decision = tuner.and_then(|t| t.last_decision.as_ref());
        if let Some(d) = decision.filter(|d| d.ts_unix_ms != self.last_decision_ms) {
            self.last_decision_ms = d.ts_unix_ms;
            signals::line(decision_line(d));
        }
        // Parking is no decision: say it when the tuner's state turns to converged.
        let state = tuner.map(|t| t.state.clone());
        if state != self.last_state {
            if state == Some(enlight_abi::tuner::State::Converged) {
                signals::line(
                    "       tuner parked: no move left, or the last trials' effects all \
                     within the noise (enlightd's log says which, with the tally); exploring \
                     again on a phase change",
                );
            }
            self.last_state = state;
        }
        self.previous = Some(now);
    }
}

/// The run's totals, as `enlight bench demo` compares them with and without the tuner, and
/// the final comparison of the eBPF figures with the workload's own.
fn print_final(handle: &enlightd::DaemonHandle, feed: &Mutex<DeviceFeed>) {
    let workload = feed.lock().expect("feed lock").latest.clone();
    let ebpf = disk0(handle);
    let ebpf = ebpf.as_ref();
    if let (Some(d), Some(w)) = (ebpf, workload.as_ref()) {
        let ops = d.total.ops_total;
        signals::line(format_args!(
            "totals: {ops} I/Os in {:.1} s ({:.0} IOPS), {} interrupts ({:.4} per I/O), p99 {}",
            w.elapsed_s,
            ops as f64 / w.elapsed_s.max(1e-3),
            d.interrupts_total,
            d.interrupts_total as f64 / ops.max(1) as f64,
            us(d.total.p99_seconds),
        ));
    }
    signals::line(format_args!(
        "final: I/Os counted by eBPF {} / by the workload {}; p50/p99/p999 eBPF {}/{}/{}, workload {}/{}/{}",
        ebpf.map(|d| d.total.ops_total.to_string()).unwrap_or_else(|| "-".into()),
        workload.as_ref().map(|w| w.ops_total.to_string()).unwrap_or_else(|| "-".into()),
        us(ebpf.and_then(|d| d.total.p50_seconds)),
        us(ebpf.and_then(|d| d.total.p99_seconds)),
        us(ebpf.and_then(|d| d.total.p999_seconds)),
        us(workload.as_ref().map(|w| w.p50_ns as f64 / 1e9)),
        us(workload.as_ref().map(|w| w.p99_ns as f64 / 1e9)),
        us(workload.as_ref().map(|w| w.p999_ns as f64 / 1e9)),
    ));
}

/// Stops enlightd and removes the temporary directory, saying so: it takes a moment
/// (detaching the uprobes, removing the backing file).
async fn clean_up(
    daemon: InProcessDaemon,
    scratch: tempfile::TempDir,
    size_mib: u64,
) -> Result<()> {
    let cleanup = Instant::now();
    eprintln!(
        "enlight demo: cleaning up: stopping enlightd, removing {} ({} MiB backing file)...",
        scratch.path().display(),
        size_mib
    );
    daemon.stop().await?;
    let path = scratch.path().to_path_buf();
    scratch
        .close()
        .with_context(|| format!("removing {}", path.display()))?;
    eprintln!(
        "enlight demo: cleaned up in {:.1} s",
        cleanup.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the demo knows at one collector read: the eBPF view of the disk then, and the workload's
/// own report closest to that moment (reports come every 100 ms).
struct Moment {
    at: Instant,
    device: Option<ApiDevice>,
    workload: Option<WorkloadSnapshot>,
}

/// Turns SIGINT, SIGTERM and SIGHUP into the stop flag of [`signals`] (what a closed stdout
/// sets too) and a wake-up of the returned receiver. The handlers are in place when this
/// returns. A second signal ends the demo at once (its device process dies with it, and the
/// next demo removes its directory).
fn watch_stop_signals() -> std::io::Result<tokio::sync::watch::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = tokio::sync::watch::channel(());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            if signals::stop_requested() && !signals::stdout_closed() {
                eprintln!("enlight demo: a second signal: exiting without cleaning up");
                std::process::exit(1);
            }
            signals::stop_flag().store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = tx.send(());
        }
    });
    Ok(rx)
}

/// Removes the directories of demos that no longer run from `tmp` (named
/// `enlight-demo-<pid>-*`, with `<pid>` gone); anything else is left alone.
fn remove_leftovers(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let is_dir = entry
            .path()
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_dir());
        if !is_dir || enlight_driver::registry::pid_alive(pid) {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => log::info!(
                "removed {}, left by a demo (pid {pid}) that was killed",
                entry.path().display()
            ),
            Err(e) => log::warn!("removing {}: {e}", entry.path().display()),
        }
    }
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

/// The demo's device process (`enlight disk`): it dies with the demo whatever kills the demo
/// (SIGTERM through `PR_SET_PDEATHSIG`), and is stopped when this is dropped on an error path.
struct DeviceProcess {
    child: Child,
}

impl DeviceProcess {
    fn spawn(backing: &Path, runtime_dir: &Path, args: &DemoArgs) -> Result<DeviceProcess> {
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
            .args(["--json", "--report-ms", "100"])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .die_with_parent(libc::SIGTERM)
            .spawn()
            .context("starting the device process (enlight disk)")?;
        Ok(DeviceProcess { child })
    }

    /// SIGTERM (in-flight I/O completes, the record goes), then waits for it to exit.
    fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let status = self
            .child
            .wait()
            .context("waiting for the device process")?;
        // A stop signal that reached the device before its handlers were installed (it had
        // only just started, or Ctrl-C reached the whole process group) ends it by default
        // action: a stop all the same, and what it leaves is inside our temporary directory.
        let stopped_early = std::os::unix::process::ExitStatusExt::signal(&status)
            .is_some_and(|s| signals::STOP_SIGNALS.contains(&s));
        if !status.success() && !stopped_early {
            bail!("device process exited with {status}");
        }
        Ok(())
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.wait();
        }
    }
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
                Ok(snapshot) => {
                    let mut f = feed.lock().expect("feed lock");
                    let now = Instant::now();
                    f.recent.push_back((now, snapshot.clone()));
                    while f
                        .recent
                        .front()
                        .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(3))
                    {
                        f.recent.pop_front();
                    }
                    f.latest = Some(snapshot);
                }
                Err(e) => log::warn!("unreadable line from the device process: {e}: {line}"),
            }
        }
        feed.lock().expect("feed lock").finished = true;
    }))
}

/// One tuner decision, as the tuner states it (the knobs it moved and why).
/// The action is its wire name (`change`, `revert`, `recommend`, or a newer daemon's own).
fn decision_line(d: &enlight_abi::tuner::Decision) -> String {
    format!("       tuner {}: {}", d.action, d.reason)
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

/// One row: IOPS over the span between two moments on both sides, percentiles so far.
fn summary_line(elapsed: Duration, before: &Moment, now: &Moment) -> String {
    let dt = now.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let ebpf_ops = |m: &Moment| m.device.as_ref().map_or(0, |d| d.total.ops_total);
    let ebpf = match &now.device {
        Some(d) if d.attached || !d.present => format!(
            "{:>10.0} {:>9} {:>9} {:>9} {:>8.0}",
            ebpf_ops(now).saturating_sub(ebpf_ops(before)) as f64 / dt,
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
    let own = match &now.workload {
        Some(w) => format!(
            "{:>10.0} {:>9} {:>9} {:>9}",
            w.ops_total
                .saturating_sub(before.workload.as_ref().map_or(0, |b| b.ops_total))
                as f64
                / dt,
            us(Some(w.p50_ns as f64 / 1e9)),
            us(Some(w.p99_ns as f64 / 1e9)),
            us(Some(w.p999_ns as f64 / 1e9))
        ),
        None => format!("{:>40}", "-"),
    };
    format!("{:>4}s  {ebpf}  | {own}", elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each of the daemon's actions, as its API writes it, reads as it did when the demo matched
    /// on the daemon's own enum; a newer daemon's action reads by its own name.
    #[test]
    fn decisions_read_as_the_tuner_states_them() {
        use enlightd::tuner::Action;
        for (action, word) in [
            (Action::Change, "change"),
            (Action::Revert, "revert"),
            (Action::Recommend, "recommend"),
        ] {
            let strict = enlightd::tuner::Decision {
                action,
                reason: "p99 fell".into(),
                ..Default::default()
            };
            let read: enlight_abi::tuner::Decision =
                serde_json::from_value(serde_json::to_value(&strict).unwrap()).unwrap();
            assert_eq!(
                decision_line(&read),
                format!("       tuner {word}: p99 fell")
            );
        }
        let newer: enlight_abi::tuner::Decision =
            serde_json::from_str(r#"{"action":"escalate","reason":"queue full","cost":3}"#)
                .unwrap();
        assert_eq!(decision_line(&newer), "       tuner escalate: queue full");
    }
}
