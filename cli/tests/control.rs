//! The control socket end to end (contract 4): a real `enlight disk` process serving its socket,
//! tuned live by a client while its workload runs. The privileged test checks the eBPF count of
//! `settings_change` hits against the changes the client applied (counted by the client), and
//! that /metrics and the device API follow the device's settings. The other test kills a control
//! client process in the middle of a change and checks the device stays consistent.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enlight_driver::control::{ControlClient, SettingsPatch};
use enlight_driver::registry;
use enlight_driver::settings::{DeviceSettings, Knob};
use enlight_driver::workload::WorkloadSnapshot;

mod support;
use support::{final_line, one_daemon_at_a_time, settle, start_daemon};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

fn spawn_disk(dir: &Path, name: &str, workload: &str, wait_for_probes: bool) -> Child {
    let mut cmd = Command::new(ENLIGHT);
    cmd.args(["disk", "--name", name, "--workload", workload])
        .args(["--create-mib", "32"])
        .arg("--backing")
        .arg(dir.join(format!("{name}.img")))
        .arg("--runtime-dir")
        .arg(dir)
        .stdout(Stdio::piped());
    if wait_for_probes {
        cmd.args(["--wait-for-probes", "30"]);
    }
    cmd.spawn().expect("spawn enlight disk")
}

/// The device's registry record, once it is there.
fn wait_for_record(dir: &Path, name: &str) -> registry::DeviceRecord {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = registry::list(dir).0.into_iter().find(|r| r.name == name) {
            return r;
        }
        assert!(Instant::now() < deadline, "device {name} never registered");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop_and_report(child: Child) -> WorkloadSnapshot {
    // SAFETY: kill(2) on our own child's pid, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let report: WorkloadSnapshot = serde_json::from_str(&final_line(child)).unwrap();
    assert!(report.done);
    report
}

fn metric(text: &str, series: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn ebpf_counts_every_applied_change_and_metrics_follow_the_device() {
    let _serial = one_daemon_at_a_time();
    if let Err(e) = enlight_probes::preflight() {
        panic!("privileged control-socket test cannot run: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path());
    let handle = daemon.handle();
    let child = spawn_disk(dir.path(), "ctl0", "qd=32,bs=4k,rw=70,duration=60s", true);
    let record = wait_for_record(dir.path(), "ctl0");
    let sock: PathBuf = record
        .control
        .clone()
        .expect("record names its control socket");
    assert_eq!(sock, dir.path().join("control/ctl0.sock"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while handle
        .devices()
        .iter()
        .all(|d| d.name != "ctl0" || d.total.ops_total == 0)
    {
        assert!(Instant::now() < deadline, "no I/O seen by eBPF");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut client = ControlClient::connect(&sock).unwrap();
    let steps = [
        DeviceSettings {
            ring_out_bytes: 16384,
            ring_in_bytes: 8192,
            ..DeviceSettings::default()
        },
        DeviceSettings {
            ring_out_bytes: 1 << 20,
            ring_in_bytes: 512 << 10,
            moderation_frames: 32,
            moderation_usecs: 200,
            poll_budget: 16,
        },
        DeviceSettings {
            ring_out_bytes: 1 << 20,
            ring_in_bytes: 512 << 10,
            moderation_frames: 1,
            moderation_usecs: 0,
            poll_budget: 16,
        },
        DeviceSettings {
            ring_out_bytes: 128 << 10,
            ring_in_bytes: 128 << 10,
            moderation_frames: 4,
            moderation_usecs: 20,
            poll_budget: 128,
        },
    ];
    // The client's own count of what changed, per knob.
    let mut applied = [0u64; 5];
    for want in steps {
        let (before, _, _) = client.get().unwrap();
        let now = client.set(SettingsPatch::between(&before, &want)).unwrap();
        assert_eq!(now, want);
        for (knob, _, _) in before.diff(&want) {
            applied[knob as usize] += 1;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let (last, _, generation) = client.get().unwrap();
    assert_eq!(generation, steps.len() as u64);
    settle(&handle, 3);
    let text = handle.render_metrics();
    for knob in Knob::ALL {
        let series = format!(
            "enlight_settings_changes_total{{device=\"ctl0\",kind=\"synthetic\",knob=\"{}\"}}",
            knob.name()
        );
        assert_eq!(
            metric(&text, &series),
            applied[knob as usize],
            "{}: eBPF count vs changes applied",
            knob.name()
        );
    }
    // The settings gauges and the API follow the device (through its rewritten record).
    let gauge = |name: &str, extra: &str| {
        metric(
            &text,
            &format!("{name}{{device=\"ctl0\",kind=\"synthetic\"{extra}}}"),
        )
    };
    assert_eq!(
        gauge("enlight_ring_size_bytes", ",direction=\"out\""),
        last.ring_out_bytes as u64
    );
    assert_eq!(
        gauge("enlight_ring_size_bytes", ",direction=\"in\""),
        last.ring_in_bytes as u64
    );
    assert_eq!(
        gauge("enlight_moderation_frames", ""),
        last.moderation_frames as u64
    );
    assert_eq!(
        gauge("enlight_moderation_usecs", ""),
        last.moderation_usecs as u64
    );
    assert_eq!(gauge("enlight_poll_budget", ""), last.poll_budget as u64);
    let view = handle
        .devices()
        .into_iter()
        .find(|d| d.name == "ctl0")
        .unwrap();
    assert_eq!(view.settings, Some(last));
    enlightd::testing::promtool_check(&text);

    // Every request through all those resizes is still counted exactly once by both sides.
    drop(client);
    let report = stop_and_report(child);
    settle(&handle, 3);
    let view = handle
        .devices()
        .into_iter()
        .find(|d| d.name == "ctl0")
        .unwrap();
    assert_eq!(view.total.ops_total, report.ops_total);
    assert_eq!(report.errors, 0);
    assert!(
        !sock.exists(),
        "the control socket is removed when the device exits"
    );
}

/// The child half of the kill test: connects, sends one set, says so on stdout, then waits to
/// be killed. Runs when the test binary is re-executed with ENLIGHT_CONTROL_CHILD set.
#[test]
fn control_client_child_role() {
    let Ok(sock) = std::env::var("ENLIGHT_CONTROL_CHILD") else {
        return;
    };
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(
        b"{\"op\":\"set\",\"settings\":{\"ring_out_bytes\":16384,\"ring_in_bytes\":16384,\"poll_budget\":8}}\n",
    )
    .unwrap();
    println!("sent");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_control_client_killed_mid_change_leaves_the_device_consistent() {
    if std::env::var("ENLIGHT_CONTROL_CHILD").is_ok() {
        return;
    }
    let _serial = one_daemon_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let device = spawn_disk(dir.path(), "kill0", "qd=32,bs=4k,duration=60s", false);
    let record = wait_for_record(dir.path(), "kill0");
    let sock = record.control.clone().unwrap();
    let mut client = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match ControlClient::connect(&sock) {
                Ok(c) => break c,
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (before, _, _) = client.get().unwrap();
    let mut killer = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "control_client_child_role",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ENLIGHT_CONTROL_CHILD", &sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(killer.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("sent") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child died early");
    }
    // The resize is under way (or about to start): kill the client now.
    killer.kill().unwrap();
    killer.wait().unwrap();
    // The change is applied in full or not at all, never half; the record agrees with the
    // device; the device keeps doing I/O.
    let target = DeviceSettings {
        ring_out_bytes: 16384,
        ring_in_bytes: 16384,
        poll_budget: 8,
        ..before
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (now, generation) = loop {
        let (now, _, generation) = client.get().unwrap();
        if generation == 1 || Instant::now() > deadline {
            break (now, generation);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        (now == before && generation == 0) || (now == target && generation == 1),
        "half-applied: {now:?} (generation {generation})"
    );
    assert_eq!(now, target, "a set whose client died is still applied");
    let deadline = Instant::now() + Duration::from_secs(30);
    while wait_for_record(dir.path(), "kill0").settings != now {
        assert!(Instant::now() < deadline, "registry record not rewritten");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still tunable and still doing I/O after the kill.
    client
        .set(SettingsPatch {
            ring_in_bytes: Some(64 << 10),
            ..Default::default()
        })
        .unwrap();
    drop(client);
    let report = stop_and_report(device);
    assert!(report.ops_total > 0 && report.errors == 0, "{report:?}");
}
