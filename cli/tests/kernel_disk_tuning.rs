//! Privileged: enlightd's auto-tuner tunes a kernel disk (issue 13 item 3). The test makes its
//! own loop device (a file in a temporary directory; detached on drop, also on panic), names it
//! in `[kernel] tune` with `dry_run = false`, drives it with fio, and waits until the tuner
//! has changed one of its knobs in sysfs. Then enlightd is killed with SIGKILL (nothing
//! restores) and `enlight restore` must put every original back from the journal; a second
//! run stops enlightd with SIGTERM, whose clean exit must restore by itself. Needs root and
//! eBPF; CI runs as root. Run it under `flock /work/.privtest.lock` on a shared machine.

#[path = "../../probes/tests/support/mod.rs"]
mod kernel_support;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kernel_support::LoopDevice;
use support::KillOnDrop;

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");
const ENLIGHTD: &str = env!("CARGO_BIN_EXE_enlightd");

/// The disk knobs enlight may tune, and two it only shows, as sysfs has them (the scheduler
/// by the name in brackets).
fn sysfs_knobs(disk: &str) -> BTreeMap<String, String> {
    let q = format!("/sys/block/{disk}/queue");
    let mut out = BTreeMap::new();
    for k in [
        "nr_requests",
        "read_ahead_kb",
        "max_sectors_kb",
        "rq_affinity",
        "nomerges",
    ] {
        let v = std::fs::read_to_string(format!("{q}/{k}")).unwrap();
        out.insert(k.to_string(), v.trim().to_string());
    }
    let sched = std::fs::read_to_string(format!("{q}/scheduler")).unwrap();
    let current = enlightd::kernel::blockq::parse_scheduler(&sched)
        .unwrap_or_else(|| panic!("scheduler list {sched:?}"));
    out.insert("scheduler".into(), current.name().to_string());
    out
}

/// Puts back whatever the journal under its directory holds, on drop: a panic must not leave
/// the loop device changed (loop devices keep their queue settings after they are detached).
struct RestoreOnDrop(std::path::PathBuf);

impl Drop for RestoreOnDrop {
    fn drop(&mut self) {
        if let Ok(mut changes) = enlightd::kernel::changes::KernelChanges::open(&self.0) {
            changes.restore();
        }
    }
}

/// fio reading the disk at random, direct, at a bounded rate (the machine is shared), for
/// at most `secs`. One process (`--thread`): fio's job processes would outlive a killed
/// parent and keep the loop device open.
fn fio(disk: &Path, secs: u32) -> KillOnDrop {
    KillOnDrop(
        Command::new("fio")
            .args([
                "--name=enlight-disk-tuning",
                &format!("--filename={}", disk.display()),
                "--rw=randread",
                "--bs=4k",
                "--direct=1",
                "--ioengine=libaio",
                "--iodepth=8",
                "--rate_iops=4000",
                "--size=16M",
                &format!("--runtime={secs}"),
                "--time_based",
                "--thread",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fio"),
    )
}

/// enlightd on `dir` (its configuration, runtime directory and log there), tuning `disk`
/// alone.
fn enlightd(dir: &Path, disk: &str) -> KillOnDrop {
    let config = dir.join("enlightd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n\
             runtime_dir = \"{run}\"\n\
             interval_ms = 200\n\
             [kernel]\n\
             enabled = true\n\
             tune = [\"{disk}\"]\n\
             dry_run = false\n\
             restore_on_exit = true\n\
             [tuner]\n\
             mode = \"off\"\n\
             objective = \"latency\"\n\
             min_change_interval_ms = 200\n\
             trial_windows = 3\n\
             settle_windows = 1\n\
             [tuner.devices.{disk}]\n\
             mode = \"auto\"\n",
            run = dir.join("run").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("enlightd.log")).unwrap();
    KillOnDrop(
        Command::new(ENLIGHTD)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn enlightd"),
    )
}

/// Waits (up to 90 s) until some knob of `disk` differs from `original`; returns them all.
fn wait_for_a_change(
    dir: &Path,
    disk: &str,
    original: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = sysfs_knobs(disk);
        if &now != original {
            return now;
        }
        if Instant::now() > deadline {
            panic!(
                "the tuner changed no knob of {disk} in 90 s; enlightd's log:\n{}",
                std::fs::read_to_string(dir.join("enlightd.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn changed(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k} {v} → {}", b[k]))
        .collect()
}

#[test]
fn the_tuner_changes_a_loop_disk_and_every_original_comes_back() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "privileged test: run as root (CI does)");
    if let Err(e) = enlight_probes::preflight() {
        panic!("privileged eBPF test cannot run: {e}");
    }
    let disk = LoopDevice::new(16);
    let name = disk.name();
    let original = sysfs_knobs(&name);
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let journal = enlightd::kernel::journal::journal_path(&run);
    // Dropped after the daemons (declared before them), before the loop device.
    let _restore = RestoreOnDrop(run.clone());

    // 1. Killed: the journal on disk is all that is left, and `enlight restore` uses it.
    let _load = fio(&disk.path, 120);
    let mut daemon = enlightd(dir.path(), &name);
    let tuned = wait_for_a_change(dir.path(), &name, &original);
    let what = changed(&original, &tuned);
    eprintln!("the tuner changed {name}: {what:?}");
    // The audit log says the change in the disk's own knobs (written just after the change).
    let knob = what[0].split(' ').next().unwrap().to_string();
    let said = |audit: &str| {
        audit.lines().any(|l| {
            let d: serde_json::Value = serde_json::from_str(l).unwrap();
            d["action"] == "change"
                && d["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(&format!("[{knob} ")))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let audit = loop {
        let audit = std::fs::read_to_string(run.join("tuner-audit.jsonl")).unwrap_or_default();
        if said(&audit) || Instant::now() > deadline {
            break audit;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        said(&audit),
        "no change of {knob} in the audit log:\n{audit}"
    );
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    // The journal was written before the change, with the originals.
    let entries = enlightd::kernel::journal::Journal::open(&run)
        .unwrap()
        .entries()
        .to_vec();
    assert!(!entries.is_empty(), "no journal at {}", journal.display());
    for e in &entries {
        assert_eq!(
            e.target,
            enlightd::kernel::journal::Target::Block { disk: name.clone() }
        );
        assert_eq!(
            e.original.to_string(),
            original[&e.knob],
            "journalled original of {}",
            e.knob
        );
    }
    // Nothing restored it: the change outlives the killed daemon (a trial lasts four 200 ms
    // windows; the kill came as soon as the audit log had the change).
    assert_ne!(
        sysfs_knobs(&name),
        original,
        "still changed after SIGKILL: {what:?}"
    );
    let out = Command::new(ENLIGHT)
        .args(["restore", "--runtime-dir"])
        .arg(&run)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for e in &entries {
        assert!(
            text.contains(&format!("restored disk {name} {} = ", e.knob)),
            "{text}"
        );
    }
    assert_eq!(sysfs_knobs(&name), original, "enlight restore: {text}");
    assert!(!journal.exists(), "the journal is empty after a restore");

    // 2. Stopped cleanly (SIGTERM): enlightd puts the originals back itself.
    let mut daemon = enlightd(dir.path(), &name);
    wait_for_a_change(dir.path(), &name, &original);
    let pid = daemon.0.id() as libc::pid_t;
    // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0, "SIGTERM to enlightd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "enlightd did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        sysfs_knobs(&name),
        original,
        "restore on clean exit; enlightd's log:\n{}",
        std::fs::read_to_string(dir.path().join("enlightd.log")).unwrap_or_default()
    );
    assert!(!journal.exists(), "the journal is empty after a clean exit");
}
