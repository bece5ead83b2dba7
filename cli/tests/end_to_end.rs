//! The privileged end-to-end suite: real device processes (`enlight disk`), real eBPF programs
//! attached by a real enlightd, checked against independent counts (the workload's own counters
//! and percentiles, Debian's promtool, bpftrace). Needs root; CI runs it as root, and without
//! privileges these tests fail with the reason rather than skip.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enlight_driver::workload::WorkloadSnapshot;
use enlightd::{DaemonHandle, DeviceView};

mod support;
use support::{final_line, require_privileges, settle, start_daemon};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

fn spawn_disk(dir: &Path, name: &str, workload: &str) -> Child {
    Command::new(ENLIGHT)
        .args([
            "disk",
            "--name",
            name,
            "--workload",
            workload,
            "--wait-for-probes",
            "30",
            "--create-mib",
            "32",
        ])
        .arg("--backing")
        .arg(dir.join(format!("{name}.img")))
        .arg("--runtime-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn enlight disk")
}

/// Waits for the device process to finish and returns its last (final) report.
fn final_report(child: Child) -> WorkloadSnapshot {
    let report: WorkloadSnapshot = serde_json::from_str(&final_line(child)).unwrap();
    assert!(report.done);
    report
}

fn device(handle: &DaemonHandle, name: &str) -> DeviceView {
    handle
        .devices()
        .into_iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no device {name}"))
}

fn assert_close(what: &str, ebpf: f64, own: f64) {
    // Both sides are HDR histograms with 2 significant digits (<1% each), and the eBPF side
    // records each kernel bucket (<0.8% wide) at its midpoint: 2% covers all of it.
    let rel = (ebpf - own).abs() / own;
    assert!(
        rel <= 0.02,
        "{what}: eBPF {ebpf:.0} ns vs workload {own:.0} ns ({:.2}% apart)",
        rel * 100.0
    );
}

#[test]
fn ebpf_counts_equal_the_workloads_own_and_percentiles_agree() {
    let _serial = require_privileges();
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path());
    let handle = daemon.handle();
    let child = spawn_disk(
        dir.path(),
        "disk0",
        "qd=32,bs=4k,rw=70,pattern=random,ios=40000,seed=3",
    );
    let report = final_report(child);
    settle(&handle, 3);
    let d = device(&handle, "disk0");
    assert!(!d.present, "the device process has exited");
    assert_eq!(
        d.total.ops_total, report.ops_total,
        "every completion counted exactly once"
    );
    assert_eq!(d.total.ops_total, 40_000);
    let op = |name: &str| d.ops.iter().find(|o| o.op == name).unwrap().clone();
    assert_eq!(op("read").ops_total, report.reads);
    assert_eq!(op("write").ops_total, report.writes);
    assert_eq!(op("read").bytes_total, report.read_bytes);
    assert_eq!(op("write").bytes_total, report.write_bytes);
    assert_eq!(d.total.errors_total, report.errors);
    let ns = |s: Option<f64>| s.unwrap() * 1e9;
    assert_close("p50", ns(d.total.p50_seconds), report.p50_ns as f64);
    assert_close("p90", ns(d.total.p90_seconds), report.p90_ns as f64);
    assert_close("p99", ns(d.total.p99_seconds), report.p99_ns as f64);
    assert_close("p999", ns(d.total.p999_seconds), report.p999_ns as f64);
    assert!(d.interrupts_total > 0 && d.doorbells_total > 0, "{d:?}");
    assert_eq!(handle.health().events_lost, 0);
}

#[test]
fn metrics_during_a_live_workload_pass_promtool_and_add_up() {
    let _serial = require_privileges();
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path());
    let handle = daemon.handle();
    let mut child = spawn_disk(
        dir.path(),
        "live0",
        "qd=8,bs=8k,rw=50,pattern=sequential,duration=30s",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while handle.devices().iter().all(|d| d.total.ops_total == 0) {
        assert!(Instant::now() < deadline, "no I/O seen by eBPF");
        std::thread::sleep(Duration::from_millis(50));
    }
    settle(&handle, 2);
    let text = handle.render_metrics();
    enlightd::testing::promtool_check(&text);
    for needle in [
        "enlight_io_latency_seconds_bucket{device=\"live0\",kind=\"synthetic\",op=\"read\",le=\"+Inf\"}",
        "enlight_interrupts_total{device=\"live0\",kind=\"synthetic\"}",
        "enlight_probe_attached{device=\"live0\",kind=\"synthetic\",probe=\"io_reap\",state=\"attached\"} 1",
        "enlight_ring_size_bytes{device=\"live0\",kind=\"synthetic\",direction=\"out\"} 262144",
        "enlight_devices 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    // SAFETY: kill(2) on our own child's pid, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(
        child.wait().unwrap().success(),
        "device stops cleanly on SIGTERM"
    );
    assert!(
        std::fs::read_dir(dir.path().join("devices"))
            .unwrap()
            .next()
            .is_none(),
        "registry record removed"
    );
}

#[test]
fn the_daemon_follows_devices_that_come_and_go() {
    let _serial = require_privileges();
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path());
    let handle = daemon.handle();
    let first = final_report(spawn_disk(dir.path(), "a", "qd=4,ios=3000"));
    settle(&handle, 3);
    let second = final_report(spawn_disk(dir.path(), "b", "qd=16,ios=5000,rw=100"));
    settle(&handle, 3);
    let (a, b) = (device(&handle, "a"), device(&handle, "b"));
    assert_eq!(
        (a.total.ops_total, b.total.ops_total),
        (first.ops_total, second.ops_total)
    );
    assert!(!a.present && !b.present && !a.attached);
    // The same name again in a new process: counters continue, never go backwards.
    let third = final_report(spawn_disk(dir.path(), "a", "qd=4,ios=1000"));
    settle(&handle, 3);
    assert_eq!(
        device(&handle, "a").total.ops_total,
        first.ops_total + third.ops_total
    );
}

#[test]
fn bpftrace_lists_every_enlight_probe_of_the_binary() {
    let out = Command::new("bpftrace")
        .arg("-l")
        .arg(format!("usdt:{ENLIGHT}:enlight:*"))
        .output()
        .unwrap_or_else(|e| panic!("bpftrace is needed (apt-get install bpftrace): {e}"));
    let listed = String::from_utf8_lossy(&out.stdout);
    for name in enlight_driver::trace::PROBE_NAMES {
        assert!(
            listed.contains(&format!("enlight:{name}")),
            "bpftrace does not list enlight:{name}:\n{listed}"
        );
    }
}

#[test]
fn demo_runs_and_leaves_nothing_behind() {
    let _serial = require_privileges();
    // A temporary directory of the test's own: another `enlight demo` on the machine (another
    // test binary, a user) makes and removes its own in the shared /tmp meanwhile.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(ENLIGHT)
        .args([
            "demo",
            "--duration",
            "3",
            "--listen",
            "127.0.0.1:0",
            "--size-mib",
            "32",
        ])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("/metrics"), "{stdout}");
    assert!(
        stdout.contains(&tmp.path().display().to_string()),
        "the demo worked in the TMPDIR it was given: {stdout}"
    );
    let last = stdout.lines().last().unwrap();
    // "final: I/Os counted by eBPF N / by the workload N; ..."
    let counts: Vec<&str> = last
        .split_whitespace()
        .filter(|w| w.trim_end_matches(';').parse::<u64>().is_ok())
        .collect();
    assert_eq!(counts.len(), 2, "{last}");
    assert_eq!(
        counts[0].trim_end_matches(';'),
        counts[1].trim_end_matches(';'),
        "{last}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        left.is_empty(),
        "demo left temporary files behind: {left:?}"
    );
}
