//! Privileged: the kernel-device KVM programs count a real VMM's exits. enlightd runs with
//! `[kernel] enabled` while `enlight emulated-disk --transport kvm` (a KVM guest whose every
//! register access is a port I/O exit, and every request ends with an MMIO write) runs a fixed
//! workload; the kernel probes' `kvm:kvm_pio` and `kvm:kvm_mmio` counts for the VMM's process
//! must equal the VMM's own counts. Skips, loudly, where KVM is unavailable.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enlightd::{Config, Daemon};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

fn spawn_kvm_disk(dir: &Path) -> Child {
    Command::new(ENLIGHT)
        .args([
            "emulated-disk",
            "--name",
            "kvmk",
            "--transport",
            "kvm",
            "--workload",
            "qd=2,bs=1k,rw=50,ios=60,seed=3",
            "--wait-for-probes",
            "30",
            "--create-mib",
            "8",
        ])
        .arg("--backing")
        .arg(dir.join("kvmk.img"))
        .arg("--runtime-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn enlight emulated-disk")
}

#[test]
fn kvm_pio_and_mmio_counts_equal_the_vmms_own() {
    if !enlight_vmm::kvm_or_skip("kvm_pio_and_mmio_counts_equal_the_vmms_own") {
        return;
    }
    if let Err(e) = enlight_probes::preflight() {
        panic!("privileged test cannot run: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        runtime_dir: dir.path().into(),
        interval_ms: 100,
        device_grace_secs: 600,
        ..Config::default()
    };
    config.kernel.enabled = true;
    // The kernel probes load with the daemon, before the device process starts.
    let daemon = Daemon::start(config).expect("start enlightd");
    let handle = daemon.handle();
    let mut child = spawn_kvm_disk(dir.path());
    let pid = child.id();
    let last = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .last()
        .expect("device printed a report");
    assert!(child.wait().unwrap().success(), "device process failed");
    let report: serde_json::Value = serde_json::from_str(&last).unwrap();
    let traps = report["traps"].as_u64().unwrap();
    let vm_exits = report["vm_exits"].as_u64().unwrap();
    let target = handle.ticks() + 3;
    let deadline = Instant::now() + Duration::from_secs(20);
    while handle.ticks() < target {
        assert!(Instant::now() < deadline, "collector stalled");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kernel = handle.health().kernel;
    let pio = kernel.kvm_pio.get(&pid).copied().unwrap_or(0);
    let mmio = kernel.kvm_mmio.get(&pid).copied().unwrap_or(0);
    eprintln!("VMM: {traps} PIO exits, {vm_exits} exits; probes: kvm_pio {pio}, kvm_mmio {mmio}, kvm_exit {:?}", kernel.kvm_exits.get(&pid));
    // Every register access of the model is one port I/O exit the VMM handled.
    assert_eq!(pio, traps, "kvm:kvm_pio vs the VMM's PIO exits");
    // One MMIO exit per request (the done-write), plus the probe guest's one that
    // enlight_vmm::detect() runs in the device process at start.
    assert!(
        mmio == 60 || mmio == 61,
        "kvm:kvm_mmio {mmio} vs 60 done-writes"
    );
    assert_eq!(vm_exits, traps + 60);
    // kvm_exit fires from VMX/SVM exit handlers only: this image's nested PVM has none. Where
    // it fires, it counts at least every exit the VMM saw.
    let exits: u64 = kernel.kvm_exits.get(&pid).map_or(0, |r| r.values().sum());
    if exits == 0 {
        eprintln!("note: kvm:kvm_exit never fired (a KVM backend without VMX/SVM exit tracing)");
    } else {
        assert!(exits >= vm_exits, "kvm_exit {exits} < VMM exits {vm_exits}");
    }
    let text = handle.render_metrics();
    let line = format!("enlight_kvm_pio_total{{device=\"kvmk\",kind=\"emulated\"}} {pio}");
    assert!(text.contains(&line), "missing {line}");
}
