//! Privileged: `enlight restore` puts a kernel device's original settings back after the
//! process that changed them died without restoring (here: a loop device the test creates, its
//! read-ahead and rq_affinity changed through enlightd's journalled kernel changes, which are
//! then dropped as a killed daemon would leave them). Needs root; CI runs as root.

#[path = "../../probes/tests/support/mod.rs"]
mod support;

use std::process::Command;

use enlightd::kernel::changes::KernelChanges;
use support::LoopDevice;

#[test]
fn enlight_restore_puts_back_what_a_dead_daemon_changed() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "privileged test: run as root (CI does)");
    let disk = LoopDevice::new(8);
    let name = disk.name();
    let knob = |k: &str| -> u32 {
        std::fs::read_to_string(format!("/sys/block/{name}/queue/{k}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (ra0, aff0) = (knob("read_ahead_kb"), knob("rq_affinity"));
    let runtime = tempfile::tempdir().unwrap();
    {
        let mut changes = KernelChanges::open(runtime.path()).unwrap();
        changes
            .set_block(&name, "read_ahead_kb", if ra0 == 1024 { 512 } else { 1024 })
            .unwrap();
        changes
            .set_block(&name, "rq_affinity", if aff0 == 2 { 0 } else { 2 })
            .unwrap();
        // Dropped without restore: what a killed daemon leaves behind.
    }
    assert_ne!((knob("read_ahead_kb"), knob("rq_affinity")), (ra0, aff0));
    let enlight = env!("CARGO_BIN_EXE_enlight");
    let list = Command::new(enlight)
        .args(["restore", "--list", "--runtime-dir"])
        .arg(runtime.path())
        .output()
        .unwrap();
    assert!(list.status.success());
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains(&format!("disk {name} read_ahead_kb: original {ra0}")),
        "{text}"
    );
    let out = Command::new(enlight)
        .args(["restore", "--runtime-dir"])
        .arg(runtime.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("restored disk {name} read_ahead_kb = {ra0}")),
        "{text}"
    );
    assert_eq!((knob("read_ahead_kb"), knob("rq_affinity")), (ra0, aff0));
    // Nothing left: a second restore has nothing to do.
    let again = Command::new(enlight)
        .args(["restore", "--runtime-dir"])
        .arg(runtime.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).starts_with("nothing to restore"));
}
