//! What the privileged tests that run a live daemon over HTTP share: enlightd in this process
//! on a fixed port (stoppable and restartable), child processes killed on drop, free ports.
#![allow(dead_code)]

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use enlightd::{Config, Daemon, DaemonHandle};

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
