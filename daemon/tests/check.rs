//! `enlightd --check` as operators run it: the real binary, real probes (root needed; CI runs as
//! root), a good and a bad configuration.

use std::process::Command;

/// The real probes need root; without it a test says so on stderr and passes.
fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {test}: needs root to load and attach eBPF probes");
        return true;
    }
    false
}

fn enlightd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_enlightd"))
}

#[test]
fn check_passes_on_a_good_config() {
    if skip_unless_root("check_passes_on_a_good_config") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("enlightd.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nruntime_dir = \"{}\"\ninterval_ms = 500\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = enlightd()
        .arg("--check")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("eBPF programs loaded and verified"),
        "{stdout}"
    );
}

#[test]
fn check_fails_on_an_unknown_key_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("enlightd.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nintervall_ms = 500\n").unwrap();
    let out = enlightd()
        .arg("--check")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("intervall_ms") && stderr.contains("enlightd.toml"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
}

#[test]
fn check_fails_on_a_bad_value() {
    let out = enlightd()
        .args(["--check", "--interval-ms", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("interval_ms = 5"));
}

#[test]
fn check_reports_a_device_it_cannot_attach_to() {
    if skip_unless_root("check_reports_a_device_it_cannot_attach_to") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A registered device whose process is alive but has no enlight USDT sites: `sleep`, not
    // this test (which links the driver and so carries its sites).
    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("starting sleep");
    let sleep_exe = std::fs::read_link(format!("/proc/{}/exe", sleeper.id())).unwrap();
    let record = enlight_driver::registry::DeviceRecord {
        name: "nosites".into(),
        device: "disk".into(),
        kind: "synthetic".into(),
        dev_id: 0,
        pid: sleeper.id(),
        pid_start_time: None,
        exe: sleep_exe,
        started_unix_ms: 0,
        settings: Default::default(),
        control: None,
    };
    let _reg = enlight_driver::registry::Registration::register(dir.path(), &record).unwrap();
    let out = enlightd()
        .args(["--check", "--listen", "127.0.0.1:0", "--runtime-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("FAIL nosites"), "{stdout}");
}

/// Without privileges: one line saying what is missing and how to fix it, non-zero exit.
/// (Runs the binary as `nobody` with every capability dropped, via util-linux's setpriv.)
#[test]
fn unprivileged_start_says_what_is_missing_in_one_line() {
    if skip_unless_root("unprivileged_start_says_what_is_missing_in_one_line") {
        return;
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_enlightd"))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("setpriv (util-linux) runs the daemon unprivileged");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("enlightd:"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("CAP_BPF") && lines[0].contains("root"),
        "{stderr}"
    );
}
