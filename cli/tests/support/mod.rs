//! What the privileged tests share: the one-daemon-at-a-time lock, enlightd in this process
//! (plain, or serving HTTP on a fixed port, stoppable and restartable), waiting for collector
//! ticks, a device process's final report line, child processes killed on drop, free ports,
//! reading ping's replies.
#![allow(dead_code)]

pub mod dashboard;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Child;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use enlightd::{Config, Daemon, DaemonHandle};

/// Serialises the tests of one binary that run a daemon: probes attach per executable,
/// system-wide, so one test's daemon would enable the probe semaphores of another test's devices
/// (same binary) and let them start before their own daemon is attached.
static ONE_DAEMON_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Takes the one-daemon-at-a-time lock (a test that panicked while holding it does not poison
/// the others).
pub fn one_daemon_at_a_time() -> MutexGuard<'static, ()> {
    ONE_DAEMON_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fails the test unless every one of `tools` runs (`--version`), naming the Debian packages
/// that bring them (`install`).
pub fn require_tools(tools: &[&str], install: &str) {
    for tool in tools {
        assert!(
            std::process::Command::new(tool)
                .arg("--version")
                .output()
                .is_ok(),
            "{tool} is needed (apt-get install {install})"
        );
    }
}

/// The repository's root.
pub fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The lab guests' image, built once and cached under the tests' target directory: the
/// busybox initramfs with ethtool, fio, iperf3 and the enlightd and enlight this test run built.
pub fn lab_image() -> enlight_lab::Image {
    enlight_lab::Image::prepare(&enlight_lab::ImageSpec {
        cache_dir: std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lab-cache"),
        executables: vec![
            "ethtool".into(),
            "fio".into(),
            "iperf3".into(),
            env!("CARGO_BIN_EXE_enlightd").into(),
            env!("CARGO_BIN_EXE_enlight").into(),
        ],
    })
    .expect("guest image")
}

/// Fails the test, with the reason, unless the probes can run here; then takes the lock.
pub fn require_privileges() -> MutexGuard<'static, ()> {
    if let Err(e) = enlight_probes::preflight() {
        panic!("privileged end-to-end test cannot run: {e}");
    }
    one_daemon_at_a_time()
}

/// enlightd in this process on `runtime_dir`, ticking every 100 ms, keeping vanished devices.
pub fn start_daemon(runtime_dir: &Path) -> Daemon {
    Daemon::start(daemon_config(runtime_dir)).expect("start enlightd")
}

/// The configuration [`start_daemon`] uses, for tests that change one more key.
pub fn daemon_config(runtime_dir: &Path) -> Config {
    Config {
        runtime_dir: runtime_dir.into(),
        interval_ms: 100,
        device_grace_secs: 600,
        ..Config::default()
    }
}

/// Waits until the collector has ticked `n` more times.
pub fn settle(handle: &DaemonHandle, n: u64) {
    let target = handle.ticks() + n;
    let deadline = Instant::now() + Duration::from_secs(20);
    while handle.ticks() < target {
        assert!(Instant::now() < deadline, "collector stalled");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a device process's stdout to its end, checks that it exited successfully, and returns
/// its last line (its final report).
pub fn final_line(mut child: Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let last = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .last()
        .expect("device printed a report");
    assert!(child.wait().unwrap().success(), "device process failed");
    last
}

/// The daemon serving HTTP on a fixed port, in this process, stoppable and restartable.
pub struct LiveDaemon {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), enlightd::DaemonError>>>,
    pub handle: DaemonHandle,
}

impl LiveDaemon {
    pub fn start(runtime_dir: &Path, port: u16) -> LiveDaemon {
        LiveDaemon::start_tuned(runtime_dir, port, enlightd::tuner::TunerMode::Off)
    }

    /// As [`LiveDaemon::start`], with the tuner in `mode` for every device.
    pub fn start_tuned(
        runtime_dir: &Path,
        port: u16,
        mode: enlightd::tuner::TunerMode,
    ) -> LiveDaemon {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut config = Config {
            runtime_dir: runtime_dir.into(),
            interval_ms: 200,
            device_grace_secs: 600,
            ..Config::default()
        };
        config.tuner.mode = mode;
        let daemon = Daemon::start(config).expect("start enlightd");
        let handle = daemon.handle();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .expect("bind the daemon's port");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(daemon.serve(listener, async {
            let _ = rx.await;
        }));
        LiveDaemon {
            rt,
            stop: Some(tx),
            server: Some(server),
            handle,
        }
    }

    pub fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let server = self.server.take().unwrap();
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), server).await })
            .expect("daemon stops within 10 s")
            .unwrap()
            .unwrap();
    }
}

pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `enlight disk` (the binary under test) with `workload`, waiting up to 30 s for probes.
pub fn spawn_disk(enlight: &str, runtime_dir: &Path, name: &str, workload: &str) -> KillOnDrop {
    KillOnDrop(
        std::process::Command::new(enlight)
            .args(["disk", "--name", name, "--workload", workload])
            .args(["--wait-for-probes", "30", "--create-mib", "32"])
            .arg("--backing")
            .arg(runtime_dir.join(format!("{name}.img")))
            .arg("--runtime-dir")
            .arg(runtime_dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn enlight disk"),
    )
}

/// Waits until the daemon has seen I/O from `name`.
pub fn wait_for_io(handle: &DaemonHandle, name: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !handle
        .devices()
        .iter()
        .any(|d| d.name == name && d.total.ops_total > 0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no I/O of {name} seen by eBPF"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ping -w` for tests that need every reply: iputils ping with `-c N` alone waits only about
/// two round trips after its last echo, so a reply that is merely late counts as lost. With a
/// deadline as well (`-c N -w 30`) it stops at the N-th reply or at the deadline; it also keeps
/// sending past N while replies are missing, so "N received" alone would not catch a lost echo:
/// check [`missing_replies`] instead.
pub const PING_DEADLINE: [&str; 2] = ["-w", "30"];

/// The `icmp_seq` of every echo reply in iputils ping's per-reply lines (`64 bytes from
/// 10.77.0.2: icmp_seq=7 ttl=64 time=0.101 ms`); a duplicate counts once, an error line
/// (`From ... icmp_seq=7 Destination Host Unreachable`) or a corrupted reply not at all.
pub fn ping_replies(text: &str) -> BTreeSet<u64> {
    text.lines()
        .filter(|l| l.contains(" bytes from ") && !l.contains("BAD CHECKSUM"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// The echoes among the first `count` (`icmp_seq` 1..=count) that got no reply.
pub fn missing_replies(text: &str, count: u64) -> Vec<u64> {
    let replied = ping_replies(text);
    (1..=count).filter(|seq| !replied.contains(seq)).collect()
}
