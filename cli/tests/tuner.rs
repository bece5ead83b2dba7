//! Privileged end-to-end test of the tuner: a real `enlight disk` with its control socket, a
//! real enlightd with the eBPF probes and the tuner on, the decisions checked against what the
//! device itself reports, the audit log, /metrics and the API; then enlightd is stopped and
//! started again and must resume from the device's settings. Needs root; fails loudly without.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enlight_driver::control::ControlClient;
use enlight_driver::settings::DeviceSettings;
use enlightd::tuner::config::TunerConfig;
use enlightd::tuner::{Action, Decision, Objective, TunerMode, TunerState};
use enlightd::{Config, Daemon, DeviceView};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), enlightd::DaemonError>>>,
}

fn start(rt: &tokio::runtime::Runtime, config: Config) -> Server {
    let daemon = Daemon::start(config).expect("start enlightd");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(daemon.serve(listener, async {
        let _ = rx.await;
    }));
    Server {
        addr,
        stop: Some(tx),
        task: Some(task),
    }
}

impl Server {
    fn get(&self, path: &str) -> String {
        ureq::get(&format!("http://{}{path}", self.addr))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_string()
            .unwrap()
    }

    fn decisions(&self) -> Vec<Decision> {
        serde_json::from_str(&self.get("/api/v1/tuner/decisions?device=tune0&limit=1000")).unwrap()
    }

    fn devices(&self) -> Vec<DeviceView> {
        serde_json::from_str(&self.get("/api/v1/devices")).unwrap()
    }

    /// Waits until the tuner reports tune0 `Pinned`: it publishes that state at the end of its
    /// first tick that saw the pin, after recording that tick's decisions (audit log, API) and
    /// applying them, and a pinned device gets no further decision.
    fn wait_for_pinned(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let devices = self.devices();
            let state = devices
                .iter()
                .find(|d| d.name == "tune0")
                .and_then(|d| d.tuner.as_ref())
                .map(|t| t.state);
            if state == Some(TunerState::Pinned) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tune0 not pinned within 30 s: {devices:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for_decision(&self, what: &str) -> Vec<Decision> {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let d = self.decisions();
            if d.iter().any(|d| d.action != Action::Recommend) {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "no tuner change within 40 s ({what})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(mut self, rt: &tokio::runtime::Runtime) {
        let _ = self.stop.take().unwrap().send(());
        rt.block_on(self.task.take().unwrap()).unwrap().unwrap();
    }
}

fn spawn_disk(dir: &Path) -> Child {
    Command::new(ENLIGHT)
        .args([
            "disk",
            "--name",
            "tune0",
            "--workload",
            "qd=4,bs=4k,rw=70,rate=2000",
            "--duration",
            "120",
            "--wait-for-probes",
            "30",
            "--create-mib",
            "32",
        ])
        .arg("--backing")
        .arg(dir.join("tune0.img"))
        .arg("--runtime-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn enlight disk")
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(path: &Path) -> ControlClient {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(c) = ControlClient::connect(path) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no control socket at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn enlightd_tunes_a_live_disk_through_its_socket_records_it_and_resumes_after_a_restart() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let config = Config {
        runtime_dir: dir.path().into(),
        interval_ms: 250,
        device_grace_secs: 60,
        tuner: TunerConfig {
            mode: TunerMode::Auto,
            objective: Objective::Latency,
            min_change_interval_ms: 500,
            audit_log: Some(audit.clone()),
            ..TunerConfig::default()
        },
        ..Config::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let device = KillOnDrop(spawn_disk(dir.path()));
    let mut client = wait_for_socket(&dir.path().join("control/tune0.sock"));
    let (before, _, generation0) = client.get().unwrap();
    assert_eq!(before, DeviceSettings::default());

    let first = start(&rt, config.clone());
    let decisions = first.wait_for_decision("first enlightd");
    let change = decisions
        .iter()
        .find(|d| d.action == Action::Change)
        .unwrap();
    assert_eq!(change.from, DeviceSettings::default());
    assert!(
        change.reason.contains("latency objective"),
        "{}",
        change.reason
    );

    // Pin it, so that what we read next stays put; unknown devices are 404.
    let pin: serde_json::Value = serde_json::from_str(
        &ureq::post(&format!("http://{}/api/v1/devices/tune0/pin", first.addr))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(pin, serde_json::json!({"device": "tune0", "pinned": true}));
    assert!(matches!(
        ureq::post(&format!("http://{}/api/v1/devices/nope/pin", first.addr)).call(),
        Err(ureq::Error::Status(404, _))
    ));
    first.wait_for_pinned();

    // What the tuner says it applied is what the device reports, and what its record says.
    let decisions = first.decisions();
    let applied: Vec<&Decision> = decisions
        .iter()
        .filter(|d| d.action != Action::Recommend)
        .collect();
    let (now, _, generation) = client.get().unwrap();
    assert_eq!(now, applied.last().unwrap().to, "{decisions:#?}");
    assert_eq!(
        generation - generation0,
        applied.len() as u64,
        "one device generation per applied decision"
    );
    let (records, _) = enlight_driver::registry::list(dir.path());
    assert_eq!(records[0].settings, now);

    // Recorded: audit log (one line per decision), API, metrics.
    let logged = enlightd::tuner::audit::read(&audit).unwrap();
    assert_eq!(logged, decisions);
    // The API's settings come from the device's record as the collector last read it (every
    // tick): a change applied just before the pin shows from the next tick on.
    let deadline = Instant::now() + Duration::from_secs(30);
    let devices = loop {
        let devices = first.devices();
        if devices[0].settings == Some(now) || Instant::now() > deadline {
            break devices;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(devices[0].settings, Some(now));
    let view = devices[0].tuner.clone().expect("a tuner view");
    assert_eq!(
        (view.mode, view.pinned, view.state),
        (TunerMode::Auto, true, TunerState::Pinned)
    );
    let metrics = first.get("/metrics");
    let expect = format!(
        "enlight_tuner_changes_total{{device=\"tune0\",kind=\"synthetic\",controller=\"enlight\"}} {}",
        applied.len()
    );
    assert!(metrics.contains(&expect), "{expect} not in:\n{metrics}");
    assert!(metrics.contains("enlight_tuner_pinned{device=\"tune0\",kind=\"synthetic\"} 1"));
    assert!(metrics.contains("enlight_settings_changes_total{device=\"tune0\""));
    enlightd::testing::promtool_check(&metrics);
    // Pinned: no decision since the ones read above.
    assert_eq!(first.decisions(), decisions, "a decision after the pin");

    // `enlight tune --dry-run` prints what the daemon recommends.
    let out = Command::new(ENLIGHT)
        .args(["tune", "--dry-run", "--addr", &first.addr.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tune0 (synthetic disk): tuner auto (applies changes), objective latency, pinned by the operator\n"),
        "{text}"
    );

    // enlightd goes away: the device keeps working with its last settings.
    first.stop(&rt);
    std::thread::sleep(Duration::from_millis(500));
    let (kept, _, _) = client.get().unwrap();
    assert_eq!(kept, now);

    // A new enlightd resumes from what the device reports, not from defaults.
    let second = start(&rt, config);
    let decisions = second.wait_for_decision("second enlightd");
    let first_decision = decisions
        .iter()
        .find(|d| d.action != Action::Recommend)
        .unwrap();
    assert_eq!(first_decision.from, kept, "{first_decision:#?}");
    assert!(
        first_decision
            .reason
            .contains("started from the settings the device reports"),
        "{}",
        first_decision.reason
    );
    second.stop(&rt);
    drop(device);
}

/// The smoke runs below each start their own device processes and probes: one at a time, and
/// not next to the test above.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    if let Err(e) = enlight_probes::preflight() {
        panic!("privileged end-to-end test cannot run: {e}");
    }
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `enlight bench tune --smoke` runs every part (oracle sweep, static, DIM, the tuner) on the
/// drift scenario and on a two-phase one, and scores each phase on the windows wholly inside it.
#[test]
fn bench_tune_smoke_runs_the_drift_and_a_two_phase_scenario() {
    let _serial = one_at_a_time();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(ENLIGHT)
        .args(["bench", "tune", "--smoke", "--scenario", "phase-change"])
        .args(["--scenario", "drift", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let report = json(&out.path().join("tune-smoke.json"));
    assert_eq!(report["smoke"], true);
    let scenarios = report["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 2);
    for s in scenarios {
        let name = s["scenario"]["name"].as_str().unwrap();
        let phase_s = s["phase_s"].as_f64().unwrap();
        let phases = s["scenario"]["phases"].as_array().unwrap().len();
        let runs = s["runs"].as_array().unwrap();
        let names: Vec<&str> = runs
            .iter()
            .map(|r| r["controller"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["static", "dim", "enlight"], "{name}");
        for r in runs {
            let points = r["points"].as_array().unwrap();
            assert!(!points.is_empty(), "{name}: no windows");
            assert_eq!(r["phases"].as_array().unwrap().len(), phases, "{name}");
            for p in points {
                let (t0, t1) = (p["t_start"].as_f64().unwrap(), p["t"].as_f64().unwrap());
                let phase = p["phase"].as_u64().unwrap() as f64;
                // A window belongs to the phase it starts in, and one that ends in the next
                // phase says so (it is scored in neither).
                assert!(
                    t0 >= phase * phase_s - 1e-9 && t0 < (phase + 1.0) * phase_s,
                    "{p}"
                );
                let crosses = t1 > (phase + 1.0) * phase_s;
                assert_eq!(p["straddles"].as_bool().unwrap(), crosses, "{name}: {p}");
            }
        }
        if name == "drift" {
            // The oracle sweeps the ramp's mean rate: its points are measured one after another.
            assert_eq!(
                s["oracle"][0]["spec"].as_str().unwrap(),
                "qd=32,bs=4k,rw=70,rate=11000"
            );
        }
    }
    assert!(out.path().join("tune-smoke.md").exists());
}

/// `enlight bench demo` runs the demo with the tuner off and on, side by side, and reads each
/// run's totals; nothing is left in the temporary directory.
#[test]
fn bench_demo_runs_the_demo_with_the_tuner_off_and_on() {
    let _serial = one_at_a_time();
    let out = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let run = Command::new(ENLIGHT)
        .args([
            "bench",
            "demo",
            "--seconds",
            "3",
            "--pairs",
            "1",
            "--size-mib",
            "32",
        ])
        .arg("--out")
        .arg(out.path())
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let report = json(&out.path().join("demo.json"));
    let runs = report["runs"].as_array().unwrap();
    let tunes: Vec<&str> = runs.iter().map(|r| r["tune"].as_str().unwrap()).collect();
    assert_eq!(tunes, ["off", "auto", "auto", "off"]);
    for r in runs {
        assert!(r["ios"].as_u64().unwrap() > 0, "{r}");
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
    }
    let md = std::fs::read_to_string(out.path().join("demo.md")).unwrap();
    assert!(md.contains("| interrupts per I/O |"), "{md}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `enlight bench tune --smoke` on the kernel scenarios: a veth pair in namespaces the bench
/// makes, the oracle's sweep of the receiver's NAPI moderation, static, DIM and the real
/// enlightd (whose audit log the report carries), each scored; the namespaces are gone after.
#[test]
fn bench_tune_smoke_runs_the_kernel_scenarios_and_removes_its_namespaces() {
    let _serial = one_at_a_time();
    let out = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let child = Command::new(ENLIGHT)
        .args(["bench", "tune", "--smoke", "--scenario", "kernel-tcp"])
        .args(["--scenario", "kernel-ping", "--out"])
        .arg(out.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let run = child.wait_with_output().unwrap();
    let took = started.elapsed();
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    // How long it took is printed, never asserted: a busy machine may take any time.
    eprintln!("bench tune --smoke on the kernel scenarios took {took:?}");
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("enl-bt-{pid}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let report = json(&out.path().join("tune-smoke.json"));
    let scenarios = report["scenarios"].as_array().unwrap();
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["scenario"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["kernel-tcp", "kernel-ping"]);
    for s in scenarios {
        let name = s["scenario"]["name"].as_str().unwrap();
        assert_eq!(s["scenario"]["device"], "veth", "{name}");
        // The sweep measured both grid points, the default first.
        let grid = s["oracle"][0]["grid"].as_array().unwrap();
        assert_eq!(grid.len(), 2, "{name}");
        assert_eq!(grid[0][0]["moderation_frames"], 0, "{name}");
        for (point, figures) in grid.iter().map(|p| (&p[0], &p[1])) {
            assert!(
                figures["ops_per_sec"].as_f64().unwrap_or(0.0) > 0.0,
                "{name}: {point} measured nothing"
            );
        }
        let runs = s["runs"].as_array().unwrap();
        let controllers: Vec<&str> = runs
            .iter()
            .map(|r| r["controller"].as_str().unwrap())
            .collect();
        assert_eq!(controllers, ["static", "dim", "enlight"], "{name}");
        for r in runs {
            assert!(
                r["phases"][0]["fraction"].as_f64().is_some(),
                "{name} {}: not scored",
                r["controller"]
            );
        }
        // enlight's run was the real enlightd's (the bench fails if enlightd does not list b):
        // its audit log is read (a 4 s phase may be too short for its first decision).
        assert!(
            runs[2]["enlightd_decisions"].is_array(),
            "{name}: enlightd's audit log not read: {}",
            runs[2]
        );
        if name == "kernel-ping" {
            // Latency comes from ping's round trips.
            let p99 = s["oracle"][0]["best"]["p99_us"].as_f64().unwrap();
            assert!(p99 > 0.0 && p99 < 100_000.0, "{p99}");
        } else {
            assert!(s["oracle"][0]["best"]["p99_us"].is_null(), "{s}");
        }
    }
}
