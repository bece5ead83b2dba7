//! `NicBridge` as a library (privileged: creates namespaces and taps): ping between the two
//! namespaces goes through the synthetic NIC's rings, the NIC's counters match the kernel's tap
//! counters, and dropping the bridge removes everything. Needs root, iproute2 and iputils-ping;
//! without them it fails with the reason rather than skip.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use enlight_driver::netns::{self, NetPair, HOST_IP, NETNS_RUN_DIR};
use enlight_driver::nic::{NicBridge, NicOptions};
use enlight_driver::settings::DeviceSettings;

fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the NIC bridge test needs root (it creates network namespaces and taps)"
    );
    for tool in ["ip", "ping"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "{tool} is needed (apt-get install iproute2 iputils-ping)"
        );
    }
}

#[test]
fn ping_crosses_the_rings_and_the_bridge_cleans_up() {
    require_root_and_tools();
    let bridge = NicBridge::start(
        "libtest",
        0,
        DeviceSettings::default(),
        NicOptions::default(),
        1500,
    )
    .unwrap();
    let names = [
        bridge.guest_ns().name().to_string(),
        bridge.host_ns().name().to_string(),
    ];
    assert!(names
        .iter()
        .all(|n| Path::new(NETNS_RUN_DIR).join(n).exists()));
    assert!(netns::list_ours().contains(&names[0]));
    // `-w 30`: with a count, ping waits until that many replies are in (sending more if some
    // are slow) or the deadline passes; without it, it waits only about two round trips after
    // its last request, and counts a reply slower than that lost.
    let out = bridge
        .guest_ns()
        .command("ping")
        .args([
            "-c",
            "5",
            "-i",
            "0.01",
            "-W",
            "2",
            "-w",
            "30",
            "-q",
            &HOST_IP.to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed:\n{text}");
    let received: u64 = text
        .split_once(" received")
        .and_then(|(before, _)| before.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no reply count in ping's summary:\n{text}"));
    assert!(received >= 5, "{text}");
    // 5 echo requests and an ARP request out; 5 replies and an ARP reply back (more of each if
    // ping sent more; the last may still be crossing when ping exits, and the guest's tx
    // completions are counted once reaped): wait until the NIC and the taps agree.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (guest_tap, c) = loop {
        let (guest_tap, host_tap) = bridge.tap_stats().unwrap();
        let c = bridge.nic().counters();
        let agree = c.rx_packets == guest_tap.rx_packets
            && c.host_tx_frames == host_tap.rx_packets
            && guest_tap.tx_packets == host_tap.rx_packets
            && c.tx_completions == guest_tap.tx_packets;
        if agree {
            break (guest_tap, c);
        }
        assert!(
            Instant::now() < deadline,
            "the NIC's counters and the taps' disagree after 30 s: {c:?} {guest_tap:?} {host_tap:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(c.rx_packets >= 6, "{c:?}");
    let final_counters = bridge.stop().unwrap();
    assert_eq!(final_counters.tx_completions, guest_tap.tx_packets);
    for n in &names {
        assert!(
            !Path::new(NETNS_RUN_DIR).join(n).exists(),
            "{n} left behind"
        );
    }
    assert_eq!(NetPair::GUEST_IF, "enl-g");
}
