//! Privileged: what `enlightd` (the real binary, `--log-format json`) says during one device's
//! life, read back from its stderr. At the default level each lifecycle event is one line, once:
//! the device found, its probes attached, each tuner change (as many lines as the audit log has
//! changes), the device gone, and at shutdown each kernel knob restored (a loop device's
//! read-ahead, changed and journalled through `KernelChanges` before the daemon starts). A
//! malformed registry file, read every 100 ms tick, is logged once; the eBPF loader says
//! nothing.

#[path = "../../probes/tests/support/mod.rs"]
mod kernel_support;
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enlightd::kernel::changes::KernelChanges;
use support::KillOnDrop;

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");
const ENLIGHTD: &str = env!("CARGO_BIN_EXE_enlightd");

/// The log's records (every line must be a JSON object with the four fields).
fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            for k in ["ts", "level", "target", "message"] {
                assert!(v[k].is_string(), "{k} missing: {l}");
            }
            v
        })
        .collect()
}

fn count(records: &[serde_json::Value], pred: impl Fn(&str) -> bool) -> usize {
    records
        .iter()
        .filter(|r| pred(r["message"].as_str().unwrap()))
        .count()
}

fn wait_for(log: &std::path::Path, what: &str, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&records(log), &pred) == 0 {
        assert!(
            Instant::now() < deadline,
            "no log line {what} in 60 s:\n{}",
            std::fs::read_to_string(log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn each_lifecycle_event_is_one_line_and_a_repeated_problem_is_logged_once() {
    let _lock = support::require_privileges();
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir_all(runtime.join("devices")).unwrap();
    std::fs::write(runtime.join("devices/broken.json"), "{\"name\": ").unwrap();

    // A kernel knob changed before the daemon starts, journalled as enlightd's changes are: the
    // daemon restores it when it stops.
    let disk = kernel_support::LoopDevice::new(8);
    let loop_name = disk.name();
    let ra_path = format!("/sys/block/{loop_name}/queue/read_ahead_kb");
    let ra0: u32 = std::fs::read_to_string(&ra_path)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    KernelChanges::open(&runtime)
        .unwrap()
        .set_block(
            &loop_name,
            "read_ahead_kb",
            if ra0 == 256 { 512 } else { 256 },
        )
        .unwrap();

    let config = dir.path().join("enlightd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nruntime_dir = \"{}\"\ninterval_ms = 100\n\
             [tuner]\nmode = \"auto\"\nobjective = \"balanced\"\n\
             [kernel]\nenabled = true\nrestore_on_exit = true\n",
            runtime.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("enlightd.log");
    let mut daemon = KillOnDrop(
        Command::new(ENLIGHTD)
            .arg("--config")
            .arg(&config)
            .args(["--log-format", "json"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start enlightd"),
    );
    wait_for(&log, "serving", |m| m.starts_with("serving on "));

    let device = Command::new(ENLIGHT)
        .args(["disk", "--name", "log0", "--create-mib", "16", "--json"])
        .args(["--workload", "qd=8,bs=4k,rw=70,pattern=random"])
        .args(["--duration", "8", "--wait-for-probes", "30"])
        .arg("--backing")
        .arg(dir.path().join("log0.img"))
        .arg("--runtime-dir")
        .arg(&runtime)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start enlight disk");
    let device = support::final_line(device);
    assert!(device.contains("\"done\":true"), "{device}");
    wait_for(&log, "device gone", |m| m.starts_with("device log0 gone"));

    // SIGTERM: a clean stop, which restores the journalled knob.
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(daemon.0.id() as libc::pid_t, libc::SIGTERM) };
    assert!(daemon.0.wait().unwrap().success(), "enlightd failed");
    let restored = std::fs::read_to_string(&ra_path).unwrap();
    assert_eq!(restored.trim(), ra0.to_string(), "read-ahead restored");

    let recs = records(&log);
    let text = std::fs::read_to_string(&log).unwrap();
    let once = |what: &str, pred: &dyn Fn(&str) -> bool| {
        assert_eq!(count(&recs, pred), 1, "{what} once:\n{text}");
    };
    once("device found", &|m| {
        m.starts_with("device log0 found: synthetic disk")
    });
    once("probes attached", &|m| {
        m.starts_with("probes attached to log0 (pid ") && m.contains("io_reap (")
    });
    once("device gone", &|m| m.starts_with("device log0 gone"));
    once("knob restored", &|m| {
        m == format!(
            "restored disk {loop_name} read_ahead_kb = {ra0} (its value before enlight changed it)"
        )
    });
    once("the malformed registry file", &|m| {
        m.starts_with("registry: ") && m.contains("broken.json")
    });
    // The file was read every tick of the device's life: counted, not logged again.
    assert!(
        recs.iter().all(|r| r["level"] != "WARN"
            || !r["message"].as_str().unwrap().contains("broken.json")
            || r["message"].as_str().unwrap().starts_with("registry: ")),
        "{text}"
    );
    // One line per change the tuner made, as its audit log has them.
    let changes = enlightd::tuner::audit::read(&runtime.join("tuner-audit.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|d| d.device == "log0" && d.action == enlightd::tuner::Action::Change)
        .count();
    assert!(changes >= 1, "the tuner changed nothing in 8 s:\n{text}");
    assert_eq!(
        count(&recs, |m| m.starts_with("tuner: log0 changed: ")),
        changes,
        "{text}"
    );
    // The loader is silent at the default level.
    assert!(
        recs.iter()
            .all(|r| !r["target"].as_str().unwrap().starts_with("aya")),
        "{text}"
    );
}
