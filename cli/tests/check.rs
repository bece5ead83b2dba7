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

/// Runs `enlightd --check` with `toml` as its configuration (in a directory of the test's own,
/// whose path replaces `DIR` in `toml`); returns (success, stdout, stderr).
fn check_with(toml: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("enlightd.toml");
    std::fs::write(&cfg, toml.replace("DIR", &dir.path().display().to_string())).unwrap();
    let out = enlightd()
        .arg("--check")
        .arg("--config")
        .arg(&cfg)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 12, item 12: every config error names the key, the line and the accepted range.
#[test]
fn config_errors_name_key_line_and_range() {
    for (toml, needles) in [
        (
            "listen = \"127.0.0.1:0\"\n[tuner]\nmin_improvement_pct = 500\n",
            &["line 3", "tuner.min_improvement_pct = 500", "0..=99"][..],
        ),
        (
            "[tuner]\nmode = \"auto\"\nslo_p99_us = \"fast\"\n",
            &["line 3", "tuner.slo_p99_us", "fast", "1..=10000000"][..],
        ),
        (
            "interval_ms = 20\n",
            &["line 1", "interval_ms = 20", "50..=60000"][..],
        ),
        (
            "\n\n[tuner.devices.disk0]\npinned = \"yes\"\n",
            &["line 4", "tuner.devices.disk0.pinned", "true or false"][..],
        ),
        (
            "[kernel]\nenabled = true\ntune = \"eth1\"\n",
            &["line 3", "kernel.tune", "a list of kernel device names"][..],
        ),
    ] {
        let (ok, _, stderr) = check_with(toml);
        assert!(!ok, "{toml}");
        for n in needles {
            assert!(stderr.contains(n), "{toml}: stderr lacks {n:?}:\n{stderr}");
        }
        assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    }
    let help = enlightd().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("50..=60000"));
}

/// Issue 12, item 12: `--check` fails on what the daemon would fail on or silently skip: an
/// audit log it cannot write, `[kernel] tune` naming devices that do not exist, or naming
/// devices while the kernel's devices are not observed.
#[test]
fn check_fails_on_what_the_daemon_would_skip() {
    // A regular file where the audit log's directory should be: no one can create the log.
    let (ok, stdout, _) = check_with(
        "listen = \"127.0.0.1:0\"\nruntime_dir = \"DIR/run\"\n[tuner]\nmode = \"auto\"\n\
         audit_log = \"DIR/enlightd.toml/audit.jsonl\"\n",
    );
    assert!(!ok && stdout.contains("FAIL tuner audit log"), "{stdout}");
    let (ok, stdout, _) = check_with(
        "listen = \"127.0.0.1:0\"\nruntime_dir = \"DIR/run\"\n[kernel]\nenabled = true\n\
         tune = [\"enl-nosuch0\"]\n",
    );
    assert!(
        !ok && stdout.contains("FAIL [kernel] tune names \"enl-nosuch0\""),
        "{stdout}"
    );
    let (ok, stdout, _) = check_with(
        "listen = \"127.0.0.1:0\"\nruntime_dir = \"DIR/run\"\n[kernel]\ntune = [\"lo\"]\n",
    );
    assert!(!ok && stdout.contains("FAIL [kernel] tune"), "{stdout}");
    // A writable audit log and no kernel section: none of these lines fail.
    let (_, stdout, _) = check_with(
        "listen = \"127.0.0.1:0\"\nruntime_dir = \"DIR/run\"\n[tuner]\nmode = \"dry_run\"\n",
    );
    assert!(stdout.contains("ok   tuner audit log"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

/// Issue 12, item 9: a second daemon on a runtime directory refuses to start, naming the pid of
/// the one that holds it (here this test, through the same lock), and `--check` says so.
#[test]
fn a_second_daemon_on_a_runtime_directory_refuses_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // The lock as the daemon takes it (docs: `<runtime dir>/enlightd.lock`, flock, the pid in
    // the file), taken here by hand.
    std::fs::create_dir_all(&run).unwrap();
    let me = std::process::id();
    let held = std::fs::File::create(run.join("enlightd.lock")).unwrap();
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&held),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(rc, 0);
    std::fs::write(run.join("enlightd.lock"), format!("{me}\n")).unwrap();
    let mut daemon = enlightd()
        .args(["--listen", "127.0.0.1:0", "--runtime-dir"])
        .arg(&run)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = daemon.kill();
            let _ = daemon.wait();
            panic!("a second enlightd kept running on a locked runtime directory");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut daemon.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(stderr.contains(&format!("pid {me}")), "{stderr}");
    }
    let out = enlightd()
        .args(["--check", "--listen", "127.0.0.1:0", "--runtime-dir"])
        .arg(&run)
        .output()
        .unwrap();
    drop(held);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("FAIL runtime directory") && stdout.contains(&format!("pid {me}")),
        "{stdout}"
    );
}
