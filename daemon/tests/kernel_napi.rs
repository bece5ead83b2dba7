//! Privileged: the knobs enlight shows for kernel NICs the test creates (a veth pair and a tap
//! in namespaces of our own) are what sysfs and the `ethtool` tool say, and the tuner's backend
//! moderates a veth's NAPI (`napi_defer_hard_irqs`, `gro_flush_timeout`) through sysfs, with
//! real traffic (iperf3 UDP): the change is seen in sysfs, journalled before it is made,
//! changes NAPI polls per packet as the napi probes count them, and the journal puts the
//! originals back after the tuner is gone without restoring (as after `kill -9`). Needs root;
//! CI runs as root, so the tests fail loudly without it.

#[path = "../../probes/tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use enlight_probes::kernel::{Group, KernelProbes, NicKey, Selection};
use enlightd::kernel::backend::{nic_knobs, KernelNicBackend};
use enlightd::kernel::changes::KernelChanges;
use enlightd::kernel::journal::{KnobValue, Target};
use enlightd::kernel::permission::Permission;
use enlightd::knobs::Source;
use enlightd::tuner::backend::SettingsBackend;
use support::*;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "privileged NAPI test: run as root (CI does)");
}

/// A field of `ethtool -g/-c` output, e.g. "rx-frames:" (the `nth` occurrence).
fn ethtool_field(text: &str, key: &str, nth: usize) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key))
        .nth(nth)
        .map(|v| v.trim().to_string())
}

/// A sysfs file of an interface as the namespace sees it (`ip netns exec` mounts its sysfs).
fn sysfs(ns: &NetNs, iface: &str, knob: &str) -> u64 {
    ns.exec(&["cat", &format!("/sys/class/net/{iface}/{knob}")])
        .trim()
        .parse()
        .unwrap()
}

/// Every knob enlight shows for `iface` against an independent reader: NAPI knobs against
/// sysfs, coalescing and rings against the `ethtool` tool. Returns the knob names.
fn check_knobs_against_sysfs_and_ethtool(ns: &NetNs, iface: &str) -> Vec<String> {
    let netns = PathBuf::from(format!("/run/netns/{}", ns.name));
    let knobs = nic_knobs(iface, Some(&netns), Default::default()).unwrap();
    let coalesce = ns.exec(&["sh", "-c", &format!("ethtool -c {iface} 2>&1 || true")]);
    let rings = ns.exec(&["sh", "-c", &format!("ethtool -g {iface} 2>&1 || true")]);
    for k in &knobs {
        let want: u64 = match (&k.source, k.name.as_str()) {
            (Source::Sysfs, name) => sysfs(ns, iface, name),
            // Each NAPI instance holds the interface-wide value written through sysfs (the
            // kernel copies it into every instance), and no irq-suspend timeout here.
            (Source::NetdevNetlink, name) => match name.split_once('/').unwrap().1 {
                "defer_hard_irqs" => sysfs(ns, iface, "napi_defer_hard_irqs"),
                "gro_flush_timeout" => sysfs(ns, iface, "gro_flush_timeout"),
                "irq_suspend_timeout" => 0,
                other => panic!("{other}"),
            },
            (Source::EthtoolNetlink, "rx_frames") => ethtool_field(&coalesce, "rx-frames:", 0)
                .unwrap()
                .parse()
                .unwrap(),
            (Source::EthtoolNetlink, "rx_usecs") => ethtool_field(&coalesce, "rx-usecs:", 0)
                .unwrap()
                .parse()
                .unwrap(),
            (Source::EthtoolNetlink, "tx_frames") => ethtool_field(&coalesce, "tx-frames:", 0)
                .unwrap()
                .parse()
                .unwrap(),
            (Source::EthtoolNetlink, "tx_usecs") => ethtool_field(&coalesce, "tx-usecs:", 0)
                .unwrap()
                .parse()
                .unwrap(),
            // `ethtool -g` prints the maximums first, then the current sizes.
            (Source::EthtoolNetlink, "rx_ring") => {
                ethtool_field(&rings, "RX:", 1).unwrap().parse().unwrap()
            }
            (Source::EthtoolNetlink, "tx_ring") => {
                ethtool_field(&rings, "TX:", 1).unwrap().parse().unwrap()
            }
            (Source::EthtoolNetlink, "adaptive_rx") => {
                let v = ethtool_field(&coalesce, "Adaptive RX:", 0).unwrap();
                u64::from(v.starts_with("on"))
            }
            other => panic!("{iface}: a knob this test has no independent reader for: {other:?}"),
        };
        assert_eq!(
            k.value, want,
            "{iface} {}: shown {}, read {want}",
            k.name, k.value
        );
    }
    // And nothing the driver lacks: a coalescing knob shown is one `ethtool -c` prints with a
    // value (tun prints n/a for rx-usecs).
    for k in knobs.iter().filter(|k| k.source == Source::EthtoolNetlink) {
        let key = format!("{}:", k.name.replace('_', "-"));
        if let Some(v) = ethtool_field(&coalesce, &key, 0) {
            assert_ne!(v, "n/a", "{iface} {} shown but the driver lacks it", k.name);
        }
    }
    knobs.into_iter().map(|k| k.name).collect()
}

#[test]
fn every_knob_shown_for_a_veth_and_a_tap_is_what_sysfs_and_ethtool_say() {
    require_root();
    let pair = VethPair::new("enl-knobs-");
    // Values that are not the defaults, so a hard-coded answer cannot pass.
    pair.ns_b
        .exec(&["sh", "-c", "echo 3 > /sys/class/net/b/napi_defer_hard_irqs"]);
    pair.ns_b.exec(&[
        "sh",
        "-c",
        "echo 40000 > /sys/class/net/b/gro_flush_timeout",
    ]);
    // GRO on: veth gets NAPI instances, which netdev netlink lists.
    pair.ns_b.exec(&["ethtool", "-K", "b", "gro", "on"]);
    let veth = check_knobs_against_sysfs_and_ethtool(&pair.ns_b, "b");
    assert!(
        veth.iter().any(|k| k.ends_with("/gro_flush_timeout")),
        "per-NAPI knobs through netdev netlink (kernel 6.13+): {veth:?}"
    );
    assert!(
        veth.iter().any(|k| k == "napi_defer_hard_irqs")
            && veth.iter().any(|k| k == "gro_flush_timeout"),
        "{veth:?}"
    );
    assert!(
        !veth
            .iter()
            .any(|k| k.contains("frames") || k.contains("usecs")),
        "veth has no coalescing: {veth:?}"
    );
    let ns = NetNs::new("enl-knobs-tap");
    ns.exec(&["ip", "tuntap", "add", "dev", "tap1", "mode", "tap"]);
    ns.exec(&["ip", "link", "set", "dev", "tap1", "up"]);
    ns.exec(&["ethtool", "-C", "tap1", "rx-frames", "7"]);
    let tap = check_knobs_against_sysfs_and_ethtool(&ns, "tap1");
    assert!(tap.iter().any(|k| k == "rx_frames"), "{tap:?}");
    assert!(
        !tap.iter().any(|k| k == "rx_usecs"),
        "tun lacks rx-usecs: {tap:?}"
    );
}

/// An iperf3 server in a namespace, killed on drop.
struct Iperf3Server(Child);

impl Iperf3Server {
    fn start(ns: &NetNs, port: u16) -> Iperf3Server {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "iperf3",
                "-s",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 (Debian package iperf3)");
        Iperf3Server(child)
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// NAPI polls per packet on `key` while `ns_a` sends 2 s of UDP at 200 Mbit/s (1000-byte
/// datagrams, 25,000 a second) to the server in the other namespace.
fn polls_per_packet(probes: &KernelProbes, ns_a: &NetNs, key: &NicKey, port: u16) -> (f64, u64) {
    let s0 = probes.snapshot().unwrap();
    let mut client = None;
    for _ in 0..50 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns_a.name,
                "iperf3",
                "-c",
                "10.77.0.2",
                "-p",
                &port.to_string(),
                "-u",
                "-b",
                "200M",
                "-l",
                "1000",
                "-t",
                "2",
            ])
            .output()
            .unwrap();
        if out.status.success() {
            client = Some(out);
            break;
        }
        // The server may not listen yet.
        std::thread::sleep(Duration::from_millis(100));
    }
    client.expect("iperf3 client never reached the server");
    let s1 = probes.snapshot().unwrap();
    let d = |f: fn(&enlight_probes::kernel::NicStats) -> u64| {
        f(&s1.nics[key]) - s0.nics.get(key).map_or(0, f)
    };
    let (polls, packets) = (d(|s| s.napi_polls), d(|s| s.napi_work));
    assert!(packets > 5_000, "too little traffic reached b: {packets}");
    (polls as f64 / packets as f64, packets)
}

#[test]
fn the_tuner_moderates_a_veths_napi_through_sysfs_and_the_journal_puts_it_back() {
    require_root();
    let pair = VethPair::new("enl-napi-");
    // veth polls its receive queue with NAPI once GRO is on (see probes/tests/kernel.rs).
    pair.ns_b
        .exec(&["ethtool", "-K", "b", "gro", "on", "tso", "off"]);
    pair.ns_a
        .exec(&["ethtool", "-K", "a", "gro", "on", "tso", "off"]);
    let netns = PathBuf::from(format!("/run/netns/{}", pair.ns_b.name));
    let original = (
        sysfs(&pair.ns_b, "b", "napi_defer_hard_irqs"),
        sysfs(&pair.ns_b, "b", "gro_flush_timeout"),
    );
    let runtime = tempfile::tempdir().unwrap();
    let mut backend =
        KernelNicBackend::open("b", Some(&netns), Permission::Apply, runtime.path()).unwrap();
    let (from, bounds) = backend.get().unwrap();
    assert_eq!(
        (
            from.moderation_frames as u64,
            from.moderation_usecs as u64 * 1000
        ),
        (original.0, original.1 / 1000 * 1000)
    );
    assert_eq!(
        bounds.moderation_frames,
        (0, 256),
        "napi_defer_hard_irqs is explored"
    );
    assert_eq!(
        bounds.moderation_usecs,
        (0, 1000),
        "gro_flush_timeout is explored"
    );

    let probes = KernelProbes::load(&Selection(vec![Group::Net, Group::Napi])).expect("load");
    assert!(probes.group_attached(Group::Napi), "{:?}", probes.status());
    let key = NicKey {
        netns: pair.ns_b.inode(),
        ifindex: pair.ns_b.ifindex("b"),
    };
    let _server = Iperf3Server::start(&pair.ns_b, 5301);
    let (before, n0) = polls_per_packet(&probes, &pair.ns_a, &key, 5301);

    // The tuner's change: defer 10 empty polls, re-poll every 200 us.
    let to = enlight_driver::settings::DeviceSettings {
        moderation_frames: 10,
        moderation_usecs: 200,
        ..from
    };
    let now = backend.apply(&from, &to).unwrap();
    assert_eq!((now.moderation_frames, now.moderation_usecs), (10, 200));
    assert_eq!(sysfs(&pair.ns_b, "b", "napi_defer_hard_irqs"), 10);
    assert_eq!(sysfs(&pair.ns_b, "b", "gro_flush_timeout"), 200_000);
    // Every NAPI instance has it too, as the netdev netlink dump reports it.
    let instances = enlightd::kernel::backend::napi_instances("b", Some(&netns));
    assert!(!instances.is_empty(), "veth with GRO has NAPI instances");
    for n in &instances {
        assert_eq!(
            (n.defer_hard_irqs, n.gro_flush_timeout),
            (Some(10), Some(200_000)),
            "{n:?}"
        );
    }
    // Per instance through napi-set, journalled like every knob: one instance's timer and
    // deferral, the interface-wide value untouched. Checked with the netdev netlink dump (the
    // daemon's own reader, a separate napi-get: no `ynl` here, and neither sysfs nor `ip`
    // shows per-instance values).
    let first = instances[0].id;
    let mut changes = KernelChanges::open(runtime.path()).unwrap();
    assert_eq!(
        changes
            .set_napi_instance("b", Some(&netns), first, "gro_flush_timeout", 150_000)
            .unwrap(),
        150_000
    );
    assert_eq!(
        changes
            .set_napi_instance("b", Some(&netns), first, "defer_hard_irqs", 3)
            .unwrap(),
        3
    );
    let e = changes
        .set_napi_instance("b", Some(&netns), first, "gro_flush_timeout", 50_000_000)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("napi{first}/gro_flush_timeout")) && e.contains("veth"),
        "{e}"
    );
    let e = changes
        .set_napi_instance("b", Some(&netns), 999_999, "gro_flush_timeout", 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such instance"), "{e}");
    let again = enlightd::kernel::backend::napi_instances("b", Some(&netns));
    let one = again.iter().find(|n| n.id == first).unwrap();
    assert_eq!(
        (one.gro_flush_timeout, one.defer_hard_irqs),
        (Some(150_000), Some(3))
    );
    assert_eq!(sysfs(&pair.ns_b, "b", "gro_flush_timeout"), 200_000);
    // Journalled before the change: the instance's originals are the interface-wide
    // originals (enlight's sysfs write had set the instance).
    let target = Target::Nic {
        iface: "b".into(),
        netns: Some(netns.clone()),
    };
    assert_eq!(
        changes
            .journal()
            .original(&target, &format!("napi{first}/defer_hard_irqs")),
        Some(KnobValue::U32(original.0 as u32))
    );
    // Back to the interface-wide timer before measuring, through the journal (the first
    // original is kept).
    changes
        .set_napi_instance("b", Some(&netns), first, "gro_flush_timeout", 200_000)
        .unwrap();
    changes
        .set_napi_instance("b", Some(&netns), first, "defer_hard_irqs", 10)
        .unwrap();
    drop(changes);
    // Journalled before the change, with the originals.
    let journal = KernelChanges::open(runtime.path()).unwrap();
    assert_eq!(
        journal.journal().original(&target, "napi_defer_hard_irqs"),
        Some(KnobValue::U32(original.0 as u32))
    );
    assert_eq!(
        journal.journal().original(&target, "gro_flush_timeout"),
        Some(KnobValue::U32(original.1 as u32))
    );
    drop(journal);

    let (after, n1) = polls_per_packet(&probes, &pair.ns_a, &key, 5301);
    eprintln!(
        "b: {before:.3} NAPI polls per packet ({n0} packets) before, {after:.3} ({n1}) with \
         napi_defer_hard_irqs 10, gro_flush_timeout 200 us"
    );
    // Interrupts deferred for a 200 us timer: each poll takes what gathered meanwhile.
    assert!(
        after < 0.7 * before,
        "NAPI moderation should batch packets: {before:.3} → {after:.3} polls per packet"
    );

    // A bad value: typed, names device, knob and driver, and nothing changes.
    let too_long = enlight_driver::settings::DeviceSettings {
        moderation_frames: 20,
        moderation_usecs: 50_000,
        ..to
    };
    let e = backend.apply(&now, &too_long).unwrap_err().to_string();
    assert!(
        e.contains("gro_flush_timeout") && e.contains("b") && e.contains("veth"),
        "{e}"
    );
    assert_eq!(
        sysfs(&pair.ns_b, "b", "napi_defer_hard_irqs"),
        10,
        "nothing half-applied"
    );

    // An operator changes a knob enlight set: the next read (every tick) sees it, names what
    // changed from what to what, and enlight never writes over it.
    pair.ns_b.exec(&[
        "sh",
        "-c",
        "echo 50000 > /sys/class/net/b/gro_flush_timeout",
    ]);
    let (seen, _) = backend.get().unwrap();
    assert_eq!(seen.moderation_usecs, 50);
    let why = backend
        .changed_by_someone_else()
        .expect("the operator's change is seen");
    assert!(
        why.contains("gro_flush_timeout on b changed from 200000 ns (set by enlight) to 50000 ns"),
        "{why}"
    );
    let e = backend.apply(&seen, &to).unwrap_err().to_string();
    assert!(e.contains("someone else"), "{e}");
    assert_eq!(sysfs(&pair.ns_b, "b", "gro_flush_timeout"), 50_000);

    // The tuner goes away without restoring (as enlightd killed with SIGKILL): the journal
    // on disk puts back the originals of what enlight still owns, and leaves the operator's.
    std::mem::forget(backend);
    // The per-instance timer goes with the operator's interface-wide one (their write set
    // every instance); the per-instance deferral enlight set is put back, after the
    // interface-wide knob.
    let report = KernelChanges::open(runtime.path()).unwrap().restore();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let restored: Vec<_> = report.restored.iter().map(|r| r.1.clone()).collect();
    assert_eq!(
        restored,
        [
            "napi_defer_hard_irqs".to_string(),
            format!("napi{first}/defer_hard_irqs")
        ]
    );
    assert_eq!(report.left.len(), 2, "{:?}", report.left);
    assert_eq!(sysfs(&pair.ns_b, "b", "napi_defer_hard_irqs"), original.0);
    assert_eq!(sysfs(&pair.ns_b, "b", "gro_flush_timeout"), 50_000);
    for n in enlightd::kernel::backend::napi_instances("b", Some(&netns)) {
        assert_eq!(
            (n.defer_hard_irqs, n.gro_flush_timeout),
            (Some(original.0 as u32), Some(50_000)),
            "{n:?}"
        );
    }
    assert!(KernelChanges::open(runtime.path())
        .unwrap()
        .journal()
        .entries()
        .is_empty());
}
