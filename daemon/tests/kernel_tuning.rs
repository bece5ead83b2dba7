//! Privileged: tunes real kernel devices the test creates (a tap and a veth pair in namespaces
//! of our own, a loop device over a temporary file) through the ethtool netlink API and sysfs,
//! checks every change with an independent reader (the `ethtool` tool, sysfs), and puts the
//! originals back from the journal. The machine's own NIC is only read. Needs root; CI runs as
//! root, so the tests fail loudly without it.

#[path = "../../probes/tests/support/mod.rs"]
mod support;

use std::path::PathBuf;

use enlightd::kernel::blockq::BlockQueueError;
use enlightd::kernel::changes::{ChangeError, KernelChanges};
use enlightd::kernel::ethtool::{Ethtool, EthtoolError, NicPatch};
use enlightd::kernel::journal::{Journal, KnobValue, Target};
use support::*;

/// Writes a value into a sysfs file on drop (a test's own change undone, also on a panic).
struct WriteOnDrop(String, String);

impl Drop for WriteOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, format!("{}\n", self.1));
    }
}

/// Puts back whatever the journal under its directory holds, on drop (also on a panic).
struct RestoreOnDrop(PathBuf);

impl Drop for RestoreOnDrop {
    fn drop(&mut self) {
        if let Ok(mut changes) = KernelChanges::open(&self.0) {
            changes.restore();
        }
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "privileged tuning test: run as root (CI does)");
}

/// A field of `ethtool -g/-c` output, e.g. ("RX:", second occurrence) or "rx-frames:".
fn ethtool_field(text: &str, key: &str, nth: usize) -> String {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key))
        .nth(nth)
        .unwrap_or_else(|| panic!("{key} in {text}"))
        .trim()
        .to_string()
}

#[test]
fn eth0_reads_through_netlink_as_the_ethtool_tool_reports_it() {
    require_root();
    let Some(iface) = ["eth0"]
        .into_iter()
        .find(|i| std::path::Path::new(&format!("/sys/class/net/{i}")).exists())
    else {
        panic!("this test reads eth0's settings (never writes them); no eth0 here");
    };
    let mut ethtool = Ethtool::open().expect("ethtool netlink");
    let rings = ethtool.rings(iface).expect("rings");
    let g = run("ethtool", &["-g", iface]);
    // Pre-set maximums first, then current settings.
    assert_eq!(rings.rx_max.to_string(), ethtool_field(&g, "RX:", 0));
    assert_eq!(rings.tx_max.to_string(), ethtool_field(&g, "TX:", 0));
    assert_eq!(rings.rx.to_string(), ethtool_field(&g, "RX:", 1));
    assert_eq!(rings.tx.to_string(), ethtool_field(&g, "TX:", 1));
    let c = ethtool.coalesce(iface).expect("coalescing");
    let text = run("ethtool", &["-c", iface]);
    for (key, ours) in [
        ("rx-frames:", c.rx_frames),
        ("rx-usecs:", c.rx_usecs),
        ("tx-frames:", c.tx_frames),
        ("tx-usecs:", c.tx_usecs),
    ] {
        let theirs = ethtool_field(&text, key, 0);
        match ours {
            Some(v) => assert_eq!(v.to_string(), theirs, "{key}"),
            None => assert_eq!(theirs, "n/a", "{key}"),
        }
    }
    // The driver as `ethtool -i` names it.
    let info = run("ethtool", &["-i", iface]);
    assert_eq!(
        enlightd::kernel::ethtool::driver_name(iface),
        ethtool_field(&info, "driver:", 0)
    );
}

#[test]
fn tap_coalescing_is_set_journalled_and_restored_after_a_crash() {
    require_root();
    let ns = NetNs::new("enl-ktune-tap");
    ns.exec(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ns.exec(&["ip", "link", "set", "dev", "tap0", "up"]);
    let netns = PathBuf::from(format!("/run/netns/{}", ns.name));
    let runtime = tempfile::tempdir().unwrap();
    let before = ns.exec(&["ethtool", "-c", "tap0"]);
    let original: u32 = ethtool_field(&before, "rx-frames:", 0).parse().unwrap();

    let mut changes = KernelChanges::open(runtime.path()).unwrap();
    let want = if original == 16 { 8 } else { 16 };
    let after = changes
        .set_nic(
            "tap0",
            Some(&netns),
            &NicPatch {
                rx_frames: Some(want),
                ..Default::default()
            },
        )
        .expect("tun supports rx-frames");
    assert_eq!(after.coalesce.unwrap().rx_frames, Some(want));
    // The ethtool tool sees the change.
    let text = ns.exec(&["ethtool", "-c", "tap0"]);
    assert_eq!(ethtool_field(&text, "rx-frames:", 0), want.to_string());

    // A knob tun lacks: a typed error naming the driver, and nothing is journalled for it.
    let e = changes
        .set_nic(
            "tap0",
            Some(&netns),
            &NicPatch {
                rx_usecs: Some(50),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(&e, ChangeError::Ethtool(EthtoolError::Unsupported { driver, .. }) if driver == "tun"),
        "{e:?}"
    );
    assert!(e.to_string().contains("not supported by driver tun"), "{e}");
    // Rings: tun has none.
    let e = changes
        .set_nic(
            "tap0",
            Some(&netns),
            &NicPatch {
                rx_ring: Some(64),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("not supported by driver tun"), "{e}");

    // The daemon "dies" here: nothing restores; the journal on disk has the original.
    drop(changes);
    let journal = Journal::open(runtime.path()).unwrap();
    let target = Target::Nic {
        iface: "tap0".into(),
        netns: Some(netns.clone()),
    };
    assert_eq!(
        journal.original(&target, "rx_frames"),
        Some(KnobValue::U32(original))
    );
    assert_eq!(journal.entries().len(), 1, "{:?}", journal.entries());

    // `enlight restore` (the same call) in a fresh process puts it back and empties the journal.
    let report = KernelChanges::open(runtime.path()).unwrap().restore();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.restored.len(), 1);
    let text = ns.exec(&["ethtool", "-c", "tap0"]);
    assert_eq!(ethtool_field(&text, "rx-frames:", 0), original.to_string());
    assert!(Journal::open(runtime.path()).unwrap().entries().is_empty());
}

#[test]
fn veth_lacks_rings_and_coalescing_and_says_so() {
    require_root();
    let pair = VethPair::new("enl-ktune-");
    let netns = PathBuf::from(format!("/run/netns/{}", pair.ns_a.name));
    let runtime = tempfile::tempdir().unwrap();
    let mut changes = KernelChanges::open(runtime.path()).unwrap();
    let settings = enlightd::kernel::changes::nic_settings("a", Some(&netns)).unwrap();
    assert_eq!(settings.rings, None, "veth has no rings");
    for patch in [
        NicPatch {
            rx_ring: Some(256),
            ..Default::default()
        },
        NicPatch {
            rx_usecs: Some(10),
            ..Default::default()
        },
    ] {
        let e = changes.set_nic("a", Some(&netns), &patch).unwrap_err();
        assert!(
            e.to_string().contains("not supported by driver veth"),
            "{e}"
        );
    }
    assert!(changes.journal().entries().is_empty());
    // An interface that does not exist.
    let e = changes
        .set_nic(
            "nosuch0",
            Some(&netns),
            &NicPatch {
                rx_frames: Some(1),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, ChangeError::Ethtool(EthtoolError::NoSuchDevice(_))),
        "{e:?}"
    );
}

#[test]
fn loop_queue_settings_are_set_checked_and_restored() {
    require_root();
    let disk = LoopDevice::new(8);
    let name = disk.name();
    let sysfs = |knob: &str| -> u32 {
        std::fs::read_to_string(format!("/sys/block/{name}/queue/{knob}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let runtime = tempfile::tempdir().unwrap();
    let mut changes = KernelChanges::open(runtime.path()).unwrap();
    let (ra0, aff0, nm0) = (
        sysfs("read_ahead_kb"),
        sysfs("rq_affinity"),
        sysfs("nomerges"),
    );
    let ra = if ra0 == 512 { 256 } else { 512 };
    assert_eq!(changes.set_block(&name, "read_ahead_kb", ra).unwrap(), ra);
    assert_eq!(sysfs("read_ahead_kb"), ra);
    let aff = if aff0 == 2 { 1 } else { 2 };
    changes.set_block(&name, "rq_affinity", aff).unwrap();
    assert_eq!(sysfs("rq_affinity"), aff);
    // Changed twice: the journal keeps the first original.
    changes.set_block(&name, "read_ahead_kb", 64).unwrap();
    changes
        .set_block(&name, "nomerges", if nm0 == 0 { 1 } else { 0 })
        .unwrap();
    // Out of range: refused before anything is written or journalled.
    let e = changes.set_block(&name, "rq_affinity", 7).unwrap_err();
    assert!(
        matches!(
            e,
            ChangeError::BlockQueue(BlockQueueError::OutOfRange { .. })
        ),
        "{e:?}"
    );
    let max_hw = sysfs("max_hw_sectors_kb");
    let e = changes
        .set_block(&name, "max_sectors_kb", max_hw + 1)
        .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    assert_eq!(changes.journal().entries().len(), 3);
    let report = changes.restore();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.restored.len(), 3);
    assert_eq!(
        (
            sysfs("read_ahead_kb"),
            sysfs("rq_affinity"),
            sysfs("nomerges")
        ),
        (ra0, aff0, nm0)
    );
}

#[test]
fn the_tuners_backend_changes_a_kernel_nics_coalescing_through_the_journal() {
    use enlightd::kernel::backend::KernelNicBackend;
    use enlightd::kernel::permission::Permission;
    use enlightd::tuner::backend::SettingsBackend;
    require_root();
    let ns = NetNs::new("enl-ktune-backend");
    ns.exec(&["ip", "tuntap", "add", "dev", "tap1", "mode", "tap"]);
    ns.exec(&["ip", "link", "set", "dev", "tap1", "up"]);
    let netns = PathBuf::from(format!("/run/netns/{}", ns.name));
    let runtime = tempfile::tempdir().unwrap();
    let mut backend =
        KernelNicBackend::open("tap1", Some(&netns), Permission::Apply, runtime.path()).unwrap();
    let (from, bounds) = backend.get().unwrap();
    let original: u32 = ethtool_field(&ns.exec(&["ethtool", "-c", "tap1"]), "rx-frames:", 0)
        .parse()
        .unwrap();
    assert_eq!(from.moderation_frames, original);
    assert_eq!(
        bounds.moderation_usecs,
        (0, 1000),
        "tun has no rx-usecs: NAPI's gro_flush_timeout rides the delay ladder"
    );
    let to = enlight_driver::settings::DeviceSettings {
        moderation_frames: if original == 32 { 16 } else { 32 },
        ..from
    };
    let now = backend.apply(&from, &to).unwrap();
    assert_eq!(now.moderation_frames, to.moderation_frames);
    assert_eq!(
        ethtool_field(&ns.exec(&["ethtool", "-c", "tap1"]), "rx-frames:", 0),
        to.moderation_frames.to_string()
    );
    let report = KernelChanges::open(runtime.path()).unwrap().restore();
    assert_eq!(report.restored.len(), 1, "{:?}", report.failed);
    assert_eq!(
        ethtool_field(&ns.exec(&["ethtool", "-c", "tap1"]), "rx-frames:", 0),
        original.to_string()
    );
}

/// The tuner's disk backend on a loop device: its search space from the device's own knobs
/// and ranges, a change of scheduler and nr_requests written in that order (the switch resets
/// nr_requests), journalled before the change, an operator's change seen at the next read,
/// typed errors for what the device does not take, and a restore that puts back enlight's
/// changes and leaves the operator's in force.
#[test]
fn the_tuners_disk_backend_switches_scheduler_and_depth_and_restore_puts_them_back() {
    use enlightd::kernel::backend::KernelDiskBackend;
    use enlightd::kernel::blockq::parse_scheduler;
    use enlightd::kernel::permission::Permission;
    use enlightd::tuner::backend::SettingsBackend;
    require_root();
    let disk = LoopDevice::new(8);
    let name = disk.name();
    let read = |path: &str| -> String {
        std::fs::read_to_string(format!("/sys/block/{name}/{path}"))
            .unwrap()
            .trim()
            .to_string()
    };
    let sched = || parse_scheduler(&read("queue/scheduler")).unwrap();
    let original = (
        sched(),
        read("queue/nr_requests"),
        read("queue/read_ahead_kb"),
    );
    let runtime = tempfile::tempdir().unwrap();
    // A panic below must not leave the device changed (loop devices keep their queue
    // settings after they are detached): the journal puts it back first.
    let _restore = RestoreOnDrop(runtime.path().to_path_buf());
    assert!(original.0.choices.len() > 1, "{:?}", original.0);
    let mut backend = KernelDiskBackend::open(&name, Permission::Apply, runtime.path()).unwrap();
    let (from, bounds) = backend.get().unwrap();
    assert_eq!(from.moderation_frames.to_string(), original.1);
    // From BLKDEV_MIN_RQ up to the tag depth without an elevator (or MAX_SCHED_RQ), within
    // the count ladder.
    let cap = if original.0.name() == "none" {
        read("mq/0/nr_tags").parse().unwrap()
    } else {
        enlightd::kernel::blockq::MAX_SCHED_RQ
    };
    assert_eq!(
        bounds.moderation_frames,
        (4, cap.min(256).max(from.moderation_frames))
    );
    assert_eq!(from.poll_budget.to_string(), original.2);

    // Another scheduler the device lists, and a shallower queue.
    let other = (original.0.current + 1) % original.0.choices.len();
    let other_name = original.0.choices[other].clone();
    let depth: u32 = if original.1 == "32" { 16 } else { 32 };
    let to = enlight_driver::settings::DeviceSettings {
        moderation_usecs: enlightd::tuner::USECS_LADDER[other],
        moderation_frames: depth,
        ..from
    };
    assert_eq!(
        backend.in_own_knobs(&to).unwrap(),
        format!(
            "scheduler {} → {other_name}, nr_requests {} → {depth}",
            original.0.name(),
            original.1
        )
    );
    let now = backend.apply(&from, &to).unwrap();
    assert_eq!(sched().name(), other_name);
    assert_eq!(
        read("queue/nr_requests"),
        depth.to_string(),
        "written after the switch"
    );
    assert_eq!(now.moderation_frames, depth);
    let journal = Journal::open(runtime.path()).unwrap();
    let target = Target::Block { disk: name.clone() };
    assert_eq!(
        journal.original(&target, "scheduler"),
        Some(KnobValue::Text(original.0.name().into()))
    );
    assert_eq!(
        journal
            .original(&target, "nr_requests")
            .map(|v| v.to_string()),
        Some(original.1.clone())
    );

    // What the device does not take: typed, naming disk, knob (and driver), nothing written.
    let mut changes = KernelChanges::open(runtime.path()).unwrap();
    let e = changes
        .set_scheduler(&name, "no-such-elevator")
        .unwrap_err();
    assert!(
        matches!(&e, ChangeError::BlockQueue(BlockQueueError::NoSuchChoice { disk, .. }) if disk == &name),
        "{e:?}"
    );
    let e = changes.set_block(&name, "queue_depth", 8).unwrap_err();
    assert!(
        matches!(&e, ChangeError::BlockQueue(BlockQueueError::Unsupported { driver, knob, .. }) if driver == "loop" && knob == "queue_depth"),
        "{e:?}"
    );
    let e = changes
        .set_block(
            &name,
            "nr_requests",
            enlightd::kernel::blockq::MAX_SCHED_RQ + 1,
        )
        .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    assert_eq!(
        changes.journal().entries().len(),
        2,
        "nothing new journalled"
    );
    drop(changes);

    // An operator's change: seen at the next read, never written over.
    let operator = WriteOnDrop(
        format!("/sys/block/{name}/queue/nr_requests"),
        original.1.clone(),
    );
    std::fs::write(&operator.0, "8\n").unwrap();
    backend.get().unwrap();
    let why = backend.changed_by_someone_else().expect("seen");
    assert!(
        why.contains(&format!("nr_requests on {name} changed from {depth}")),
        "{why}"
    );
    assert!(backend.apply(&now, &to).is_err());
    assert_eq!(read("queue/nr_requests"), "8");

    // Killed without a restore; the journal puts the scheduler back and leaves the operator's
    // depth in force, although putting the scheduler back made the kernel reset it.
    std::mem::forget(backend);
    let report = KernelChanges::open(runtime.path()).unwrap().restore();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.restored.len(), 1, "{:?}", report.restored);
    assert_eq!(report.left.len(), 1, "{:?}", report.left);
    assert_eq!(
        (sched(), read("queue/read_ahead_kb")),
        (original.0.clone(), original.2.clone())
    );
    assert_eq!(read("queue/nr_requests"), "8", "the operator's value");
    assert!(KernelChanges::open(runtime.path())
        .unwrap()
        .journal()
        .entries()
        .is_empty());
    // The test, as the operator, puts its own change back (also on a panic: the guard).
    drop(operator);
    assert_eq!(
        (
            sched(),
            read("queue/nr_requests"),
            read("queue/read_ahead_kb")
        ),
        original
    );
}

/// The tuner's backend on a tap, with the tuner's earlier change of `rx-frames` made when the
/// shell opens it (as a tuner that has been tuning has one).
struct TapFactory {
    iface: &'static str,
    netns: PathBuf,
    runtime: PathBuf,
    set_to: u32,
}

impl enlightd::tuner::backend::BackendFactory for TapFactory {
    fn open(
        &self,
        _record: &enlight_driver::registry::DeviceRecord,
    ) -> Option<
        Result<
            Box<dyn enlightd::tuner::backend::SettingsBackend>,
            enlightd::tuner::backend::BackendError,
        >,
    > {
        use enlightd::kernel::backend::KernelNicBackend;
        use enlightd::kernel::permission::Permission;
        use enlightd::tuner::backend::SettingsBackend;
        let mut b = KernelNicBackend::open(
            self.iface,
            Some(&self.netns),
            Permission::Apply,
            &self.runtime,
        )
        .unwrap();
        let (from, _) = b.get().unwrap();
        let to = enlight_driver::settings::DeviceSettings {
            moderation_frames: self.set_to,
            ..from
        };
        b.apply(&from, &to).unwrap();
        Some(Ok(Box::new(b)))
    }
}

/// Issue 13 item 5 through the notification path: a tap (`tun` is the device type here that
/// has ethtool coalescing, `rx-frames`, so `ethtool -C` on it sends ETHTOOL_MSG_COALESCE_NTF;
/// veth has neither coalescing nor rings) under the tuner's shell, with the ethtool monitor
/// listening in its namespace and the collector ticking every 30 s. enlight's own write is
/// notified too and pins nothing; an admin's `ethtool -C` pins the device in far less than a
/// tick (only the monitor can explain it: no tick comes), with the audit log, API view and
/// /metrics saying what changed from what to what; the ticks after it never write the tap,
/// and a restore leaves the admin's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admins_ethtool_change_pins_the_device_before_the_next_tick() {
    use enlightd::tuner::config::TunerConfig;
    use enlightd::tuner::shell::{run_notified, DeviceSample, Shell, TunerShared};
    use enlightd::tuner::TunerMode;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    require_root();
    let ns = NetNs::new("enl-kmon");
    ns.exec(&["ip", "tuntap", "add", "dev", "tapm", "mode", "tap"]);
    ns.exec(&["ip", "link", "set", "dev", "tapm", "up"]);
    let netns = PathBuf::from(format!("/run/netns/{}", ns.name));
    let runtime = tempfile::tempdir().unwrap();
    let _restore = RestoreOnDrop(runtime.path().into());
    let rx_frames = || -> u32 {
        ethtool_field(&ns.exec(&["ethtool", "-c", "tapm"]), "rx-frames:", 0)
            .parse()
            .unwrap()
    };
    let original = rx_frames();
    let ours = if original == 32 { 16 } else { 32 };
    let admins = ours / 2 + 1;

    let shared = Arc::new(TunerShared::default());
    let config = TunerConfig {
        mode: TunerMode::Auto,
        audit_log: Some(runtime.path().join("audit.jsonl")),
        ..TunerConfig::default()
    };
    let shell = Shell::new(
        config,
        runtime.path(),
        Box::new(TapFactory {
            iface: "tapm",
            netns: netns.clone(),
            runtime: runtime.path().into(),
            set_to: ours,
        }),
        Arc::clone(&shared),
    );
    let (tx, notices) = tokio::sync::mpsc::unbounded_channel();
    let listener = enlightd::kernel::monitor::Monitor::open(Some(&netns))
        .unwrap()
        .spawn(tx)
        .unwrap();
    let record = enlight_driver::registry::DeviceRecord {
        name: "tapm".into(),
        device: "nic".into(),
        kind: "kernel".into(),
        dev_id: 0,
        pid: std::process::id(),
        pid_start_time: None,
        exe: "/bin/true".into(),
        started_unix_ms: 0,
        settings: Default::default(),
        control: None,
    };
    let cumulative = Arc::new(std::sync::Mutex::new(
        enlightd::tuner::window::Cumulative::default(),
    ));
    let source = {
        let c = Arc::clone(&cumulative);
        move || {
            vec![DeviceSample {
                record: record.clone(),
                cumulative: c.lock().unwrap().clone(),
            }]
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run_notified(
        shell,
        source,
        Duration::from_millis(50),
        notices,
        async {
            let _ = stopped.await;
        },
    ));
    // The first tick: the shell opens the backend, which makes the tuner's change (notified).
    let base = Instant::now();
    shared.note_tick_at(1, base);
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.view("tapm").is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(shared.view("tapm").is_some(), "the shell ticked");
    assert_eq!(rx_frames(), ours);
    // Our own write's notification has had time to arrive: no pin for it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !shared.view("tapm").unwrap().pinned,
        "enlight's own write pinned the device"
    );

    // The admin, mid-tick-interval (the next tick is 30 s away).
    let t0 = Instant::now();
    ns.exec(&["ethtool", "-C", "tapm", "rx-frames", &admins.to_string()]);
    while !shared.view("tapm").unwrap().pinned && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = t0.elapsed();
    let view = shared.view("tapm").unwrap();
    assert!(view.pinned, "not pinned within 10 s");
    eprintln!(
        "tapm: pinned {:.1} ms after `ethtool -C` returned (ticks every 30 s)",
        took.as_secs_f64() * 1000.0
    );
    assert!(
        took < Duration::from_secs(1),
        "{took:?}: not the notification path"
    );
    let why = view.pinned_reason.unwrap();
    assert_eq!(
        why,
        format!(
            "rx_frames on tapm changed from {ours} (set by enlight) to {admins} by someone else"
        )
    );
    let audit = std::fs::read_to_string(runtime.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains(&why), "{audit}");
    let metrics = shared.families().text();
    assert!(
        metrics.contains("enlight_tuner_pinned{device=\"tapm\",kind=\"kernel\"} 1"),
        "{metrics}"
    );

    // Ticks go on every 500 ms with traffic figures; the tuner never writes the tap again.
    for k in 2..=12u64 {
        {
            let mut c = cumulative.lock().unwrap();
            c.ops += 1000;
            c.bytes += 1000 * 1500;
            c.interrupts += 1000;
        }
        shared.note_tick_at(k, base + Duration::from_millis(500 * k));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            rx_frames(),
            admins,
            "tick {k}: enlight wrote over the admin"
        );
    }
    assert!(shared.view("tapm").unwrap().pinned);
    let _ = stop.send(());
    task.await.unwrap();
    drop(listener);

    // A restore (clean exit, `enlight restore`) leaves the admin's value too.
    let report = KernelChanges::open(runtime.path()).unwrap().restore();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.left.len(), 1, "{:?}", report);
    assert_eq!(rx_frames(), admins);
    assert!(Journal::open(runtime.path()).unwrap().entries().is_empty());
}
