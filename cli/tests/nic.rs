//! The synthetic NIC with real traffic (privileged): `enlight nic` between two network namespaces,
//! `ping` and `iperf3` through its rings, enlightd's eBPF counts against the NIC's own counters
//! and the kernel's counters of both taps, and nothing left behind (also after SIGKILL).
//! Needs root, iproute2, iputils-ping and iperf3 (scripts/test-all.sh installs them); without
//! them these tests fail with the reason rather than skip.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use enlight_driver::netns::{LinkStats, NETNS_RUN_DIR};
use enlight_driver::nic::{LatencyFigures, NicCounters};
use serde_json::Value;

mod support;
use support::{missing_replies, one_daemon_at_a_time, settle, start_daemon, PING_DEADLINE};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

fn require_privileges() -> std::sync::MutexGuard<'static, ()> {
    if let Err(e) = enlight_probes::preflight() {
        panic!("privileged NIC test cannot run: {e}");
    }
    for tool in ["ip", "ping", "iperf3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is needed (scripts/test-all.sh installs iproute2 iputils-ping iperf3)"
        );
    }
    one_daemon_at_a_time()
}

/// A running `enlight nic` with its stdout lines arriving on a channel; killed if dropped.
struct NicProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    ready: Value,
}

impl NicProcess {
    fn spawn(runtime_dir: &Path, name: &str, extra: &[&str]) -> NicProcess {
        let mut child = Command::new(ENLIGHT)
            .args(["nic", "--name", name])
            .arg("--runtime-dir")
            .arg(runtime_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn enlight nic");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(40))
            .expect("enlight nic printed its ready line");
        let ready: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(ready["event"], "ready", "{first}");
        NicProcess {
            child,
            lines,
            ready,
        }
    }

    fn netns(&self, side: &str) -> String {
        self.ready[format!("{side}_netns")]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// SIGTERM, then the last line's counters.
    fn stop(self) -> NicCounters {
        self.stop_with_report().0
    }

    /// SIGTERM, then the last line's counters and the whole line.
    fn stop_with_report(mut self) -> (NicCounters, Value) {
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = wait_or_kill(&mut self.child, Duration::from_secs(20))
            .expect("enlight nic stops within 20 s of SIGTERM");
        assert!(status.success(), "enlight nic exited with {status}");
        let last = self.lines.iter().last().expect("a final line");
        let v: Value = serde_json::from_str(&last).unwrap();
        assert_eq!(v["done"], true, "{last}");
        (serde_json::from_value(v["counters"].clone()).unwrap(), v)
    }
}

impl Drop for NicProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_RUN_DIR).join(name).exists()
}

fn in_netns(ns: &str, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]).args(args);
    c
}

fn tap_stats(ns: &str, dev: &str) -> LinkStats {
    let out = Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", dev])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    LinkStats::parse_ip_json(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

/// Both taps' kernel counters (guest, host) once traffic has stopped: read until two reads
/// 500 ms apart agree (30 s at most). The tail of a run (iperf3's last ACKs and FINs, a TCP
/// retransmission, a late echo reply) crosses the NIC after its tools exit, and the counters the
/// NIC reports when it stops must match these exactly.
fn quiet_tap_stats(ns: [&str; 2], ifs: [&str; 2]) -> (LinkStats, LinkStats) {
    let read = || (tap_stats(ns[0], ifs[0]), tap_stats(ns[1], ifs[1]));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = read();
        if now == last {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the taps were still busy after 30 s: {last:?} then {now:?}"
        );
        last = now;
    }
}

/// Pings the host side from the guest namespace (`count` echoes 10 ms apart, each of which
/// must be answered, however late within the deadline); returns the average RTT in ms.
fn ping(guest_ns: &str, host_ip: &str, count: u32) -> f64 {
    let count_arg = count.to_string();
    let out = Command::new("timeout")
        .args([
            "60", "ip", "netns", "exec", guest_ns, "ping", "-c", &count_arg,
        ])
        .args(PING_DEADLINE)
        .args(["-i", "0.01", host_ip])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed:\n{text}");
    let missing = missing_replies(&text, count.into());
    assert!(
        missing.is_empty(),
        "ping lost packets (no reply to icmp_seq {missing:?}):\n{text}"
    );
    // "rtt min/avg/max/mdev = 0.101/0.150/0.300/0.020 ms"
    let rtt = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no rtt in ping output:\n{text}"));
    rtt
}

/// Runs iperf3 TCP from the guest namespace to a server in the host namespace for `secs`;
/// returns the receiver's bits per second. Every step is bounded: a stuck run fails the test
/// instead of hanging it.
fn iperf3(guest_ns: &str, host_ns: &str, host_ip: &str, secs: u32) -> f64 {
    let mut server = in_netns(
        host_ns,
        "iperf3",
        &["-s", "-1", "-B", host_ip, "-p", "5201"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let limit = (secs + 30).to_string();
    let out = loop {
        let out = Command::new("timeout")
            .args([&limit, "ip", "netns", "exec", guest_ns, "iperf3"])
            .args(["-c", host_ip, "-p", "5201", "--connect-timeout", "2000"])
            .args(["-t", &secs.to_string(), "-J"])
            .output()
            .unwrap();
        // iperf3 3.12 with -J exits 0 even when it could not connect, saying so only in the
        // JSON's "error": that is a failed attempt too.
        let connected = out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| v.get("error").is_none());
        if connected || Instant::now() > deadline {
            break out;
        }
        // The server may not be listening yet.
        std::thread::sleep(Duration::from_millis(200));
    };
    wait_or_kill(&mut server, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "iperf3 failed ({}):\n{text}",
        out.status
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no sum_received in\n{text}"))
}

/// Waits up to `limit` for `child`, then kills it.
fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_close(op: &str, what: &str, ebpf: f64, own: f64) {
    // Both sides are HDR histograms with 2 significant digits (<1% each), and the eBPF side
    // records each kernel bucket (<0.8% wide) at its midpoint: 2% covers all of it.
    let rel = (ebpf - own).abs() / own;
    assert!(
        rel <= 0.02,
        "{op} {what}: eBPF {ebpf:.0} ns vs the NIC's {own:.0} ns ({:.2}% apart)",
        rel * 100.0
    );
}

#[test]
fn ping_and_iperf3_cross_the_rings_and_every_count_agrees() {
    let _serial = require_privileges();
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path());
    let handle = daemon.handle();
    let nic = NicProcess::spawn(
        dir.path(),
        "nic0",
        &["--wait-for-probes", "30", "--duration", "120"],
    );
    // `--wait-for-probes` watches a semaphore that any tracer of this executable enables (say,
    // another enlightd on the machine): wait for our own daemon to report the device attached.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !handle
        .devices()
        .iter()
        .any(|d| d.name == "nic0" && d.attached)
    {
        assert!(Instant::now() < deadline, "enlightd did not attach to nic0");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (guest_ns, host_ns) = (nic.netns("guest"), nic.netns("host"));
    let host_ip = nic.ready["host_ip"].as_str().unwrap().to_string();
    let guest_if = nic.ready["guest_if"].as_str().unwrap().to_string();
    let host_if = nic.ready["host_if"].as_str().unwrap().to_string();
    assert!(netns_exists(&guest_ns) && netns_exists(&host_ns));

    eprintln!("nic0 attached; ping");
    let rtt_ms = ping(&guest_ns, &host_ip, 50);
    eprintln!("iperf3");
    let bps = iperf3(&guest_ns, &host_ns, &host_ip, 3);
    println!(
        "synthetic NIC: ping avg RTT {rtt_ms:.3} ms, iperf3 TCP {:.3} Gbit/s",
        bps / 1e9
    );
    assert!(bps > 1e6, "iperf3 moved {bps} bit/s");

    // Quiet once the tail of the traffic has crossed (IPv6 is off in both namespaces, nothing
    // else talks): the taps' counters stand.
    let (guest_tap, host_tap) = quiet_tap_stats([&guest_ns, &host_ns], [&guest_if, &host_if]);
    let (c, last) = nic.stop_with_report();
    let own: [LatencyFigures; 2] = [
        serde_json::from_value(last["tx_latency"].clone()).unwrap(),
        serde_json::from_value(last["rx_latency"].clone()).unwrap(),
    ];
    println!("NIC counters: {c:?}\nguest tap: {guest_tap:?}\nhost tap: {host_tap:?}");
    println!("NIC latency tx {:?}\nNIC latency rx {:?}", own[0], own[1]);
    assert!(
        !netns_exists(&guest_ns) && !netns_exists(&host_ns),
        "namespaces removed on exit"
    );
    assert_eq!(
        (c.tx_errors, c.guest_errors, c.rx_deliver_errors),
        (0, 0, 0)
    );

    // The kernel's view of both taps: every frame the guest stack sent was read by the guest
    // driver and completed, every frame the host service wrote was received by the host stack,
    // and the other way round.
    assert_eq!(guest_tap.tx_packets, c.tx_completions + c.tx_dropped);
    assert_eq!(host_tap.rx_packets, c.host_tx_frames);
    assert_eq!(c.host_tx_frames, c.tx_completions);
    assert_eq!(host_tap.tx_packets, c.host_rx_frames + c.host_rx_dropped);
    assert_eq!(guest_tap.rx_packets, c.rx_packets);
    assert_eq!(c.host_rx_frames, c.rx_packets);
    assert_eq!(guest_tap.rx_bytes, c.rx_bytes);
    assert_eq!(host_tap.rx_bytes, c.tx_bytes);

    // enlightd's eBPF counts: exactly the NIC's own, per op.
    settle(&handle, 3);
    let d = handle
        .devices()
        .into_iter()
        .find(|d| d.name == "nic0")
        .expect("enlightd knows nic0");
    assert_eq!((d.device.as_str(), d.kind.as_str()), ("nic", "synthetic"));
    let op = |name: &str| {
        d.ops
            .iter()
            .find(|o| o.op == name)
            .unwrap_or_else(|| panic!("no op {name} in {:?}", d.ops))
            .clone()
    };
    let (tx, rx) = (op("tx"), op("rx"));
    assert_eq!(
        (tx.ops_total, tx.bytes_total, tx.errors_total),
        (c.tx_completions, c.tx_bytes, 0)
    );
    assert_eq!(
        (rx.ops_total, rx.bytes_total, rx.errors_total),
        (c.rx_packets, c.rx_bytes, 0)
    );
    assert!(
        c.tx_completions > 1000 && c.rx_packets > 1000,
        "iperf3 made traffic: {c:?}"
    );
    // Percentiles: eBPF's kernel buckets against the NIC's own HDR histograms, over the same
    // completions.
    for (view, own) in [(&tx, &own[0]), (&rx, &own[1])] {
        assert_eq!(own.count, view.ops_total, "{}", view.op);
        let ns = |s: Option<f64>| s.unwrap() * 1e9;
        assert_close(&view.op, "p50", ns(view.p50_seconds), own.p50_ns as f64);
        assert_close(&view.op, "p90", ns(view.p90_seconds), own.p90_ns as f64);
        assert_close(&view.op, "p99", ns(view.p99_seconds), own.p99_ns as f64);
    }
    assert_eq!(d.interrupts_total, c.interrupts);
    // The guest's first doorbell announces its receive buffer when the NIC starts: its driver
    // thread rings it on its first turn while the main thread registers the device and waits
    // for the probes (the device waits for them only before traffic may flow), so enlightd
    // counts it only when that thread ran after the probes were attached. Every later doorbell
    // comes with traffic, after the wait, and is counted.
    assert!(
        (c.doorbells - 1..=c.doorbells).contains(&d.doorbells_total),
        "eBPF doorbells {} vs the NIC's {}",
        d.doorbells_total,
        c.doorbells
    );
    assert_eq!(handle.health().events_lost, 0);
    // The same figures on /metrics, which promtool accepts.
    let text = handle.render_metrics();
    enlightd::testing::promtool_check(&text);
    for needle in [
        format!(
            "enlight_io_ops_total{{device=\"nic0\",kind=\"synthetic\",op=\"tx\"}} {}",
            c.tx_completions
        ),
        format!(
            "enlight_io_ops_total{{device=\"nic0\",kind=\"synthetic\",op=\"rx\"}} {}",
            c.rx_packets
        ),
        "enlight_io_latency_seconds_bucket{device=\"nic0\",kind=\"synthetic\",op=\"rx\",le=\"+Inf\"}".to_string(),
    ] {
        assert!(text.contains(&needle), "missing {needle} in\n{text}");
    }
}

#[test]
fn a_killed_nic_leaves_namespaces_that_the_next_run_removes() {
    let _serial = require_privileges();
    let dir = tempfile::tempdir().unwrap();
    let mut first = NicProcess::spawn(dir.path(), "killed", &[]);
    let names = [first.netns("guest"), first.netns("host")];
    assert!(names.iter().all(|n| netns_exists(n)));
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(
        names.iter().all(|n| netns_exists(n)),
        "SIGKILL leaves the namespaces behind"
    );
    // The next run removes them before it makes its own, and removes its own on exit.
    let second = NicProcess::spawn(dir.path(), "killed", &["--duration", "1"]);
    let removed: Vec<String> =
        serde_json::from_value(second.ready["removed_leftovers"].clone()).unwrap();
    for n in &names {
        assert!(!netns_exists(n), "{n} still exists");
        if !removed.contains(n) {
            // Any enlight NIC starting on the machine removes dead processes' namespaces: one
            // of another run (not this test's) may have been first.
            eprintln!("note: {n} was removed by another process, not in {removed:?}");
        }
    }
    let mine = [second.netns("guest"), second.netns("host")];
    let c = second.stop_after_duration();
    assert_eq!(c.tx_completions + c.rx_packets, 0, "no traffic was made");
    assert!(
        mine.iter().all(|n| !netns_exists(n)),
        "{mine:?} left behind"
    );
}

impl NicProcess {
    /// Waits for a `--duration` run to end; returns the last line's counters.
    fn stop_after_duration(mut self) -> NicCounters {
        let status = wait_or_kill(&mut self.child, Duration::from_secs(30))
            .expect("enlight nic stops after --duration");
        assert!(status.success(), "enlight nic exited with {status}");
        let last = self.lines.iter().last().expect("a final line");
        let v: Value = serde_json::from_str(&last).unwrap();
        assert_eq!(v["done"], true, "{last}");
        serde_json::from_value(v["counters"].clone()).unwrap()
    }
}

/// Pings from the guest namespace (`count` at 20 ms intervals, each reply awaited however late
/// within the deadline); returns how many of those `count` echoes got no reply.
fn ping_lost(guest_ns: &str, host_ip: &str, count: u32) -> u64 {
    let out = Command::new("timeout")
        .args(["60", "ip", "netns", "exec", guest_ns, "ping", "-c"])
        .arg(count.to_string())
        .args(PING_DEADLINE)
        .args(["-i", "0.02", host_ip])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // "203 packets transmitted, 200 received, 1.47783% packet loss, time 4060ms": with a
    // deadline ping sends past `count` while replies are missing.
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no summary in ping output:\n{text}"));
    let transmitted: u64 = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"));
    assert!(
        transmitted >= count.into(),
        "ping stopped after {transmitted} of {count} echoes:\n{text}"
    );
    missing_replies(&text, count.into()).len() as u64
}

#[test]
fn the_control_socket_resizes_the_rings_live_under_ping_and_iperf3() {
    use enlight_driver::control::{ControlClient, SettingsPatch};
    let _serial = require_privileges();
    let dir = tempfile::tempdir().unwrap();
    let nic = NicProcess::spawn(dir.path(), "tuned", &["--duration", "90"]);
    let socket = enlight_driver::control::socket_path(dir.path(), "tuned");
    let mut client = ControlClient::connect(&socket).unwrap();
    let (before, _, generation) = client.get().unwrap();
    let after = client
        .set(SettingsPatch {
            moderation_frames: Some(1),
            moderation_usecs: Some(0),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        (after.moderation_frames, after.moderation_usecs),
        (1, 0),
        "{before:?} -> {after:?}"
    );
    let (guest_ns, host_ns) = (nic.netns("guest"), nic.netns("host"));
    let (guest_if, host_if) = (
        nic.ready["guest_if"].as_str().unwrap().to_string(),
        nic.ready["host_if"].as_str().unwrap().to_string(),
    );
    let iperf = {
        let (g, h) = (guest_ns.clone(), host_ns.clone());
        std::thread::spawn(move || iperf3(&g, &h, "10.77.0.2", 4))
    };
    let pinger = {
        let g = guest_ns.clone();
        std::thread::spawn(move || ping_lost(&g, "10.77.0.2", 200))
    };
    std::thread::sleep(Duration::from_millis(700));
    // Up and down, one ring or both, while TCP and ICMP cross the NIC.
    let sizes = [
        (1 << 20, 1 << 20),
        (8192, 8192),
        (4 << 20, 65536),
        (65536, 4 << 20),
        (262144, 262144),
    ];
    let record_path = dir.path().join("devices").join("tuned.json");
    let mut resizes = 0;
    for (out, inb) in sizes {
        let was = client.get().unwrap().0;
        let now = client
            .set(SettingsPatch {
                ring_out_bytes: Some(out),
                ring_in_bytes: Some(inb),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("resize to {out}/{inb} under traffic: {e}"));
        assert_eq!((now.ring_out_bytes, now.ring_in_bytes), (out, inb));
        assert_eq!(now.moderation_frames, 1, "other knobs untouched");
        resizes += 1;
        // The registry record follows each change.
        let record: Value = serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
        assert_eq!(record["settings"]["ring_out_bytes"], out, "{record}");
        assert_eq!(record["settings"]["ring_in_bytes"], inb, "{record}");
        assert_ne!((was.ring_out_bytes, was.ring_in_bytes), (out, inb));
        std::thread::sleep(Duration::from_millis(400));
    }
    let bps = iperf.join().unwrap();
    let pings_lost = pinger.join().unwrap();
    let (now, _, generation_now) = client.get().unwrap();
    assert_eq!(generation_now, generation + 1 + resizes);
    assert_eq!((now.ring_out_bytes, now.ring_in_bytes), (262144, 262144));
    assert!(bps > 1e6, "iperf3 moved {bps} bit/s across the resizes");

    let (guest_tap, host_tap) = quiet_tap_stats([&guest_ns, &host_ns], [&guest_if, &host_if]);
    let c = nic.stop();
    println!(
        "iperf3 {:.3} Gbit/s, {pings_lost} of 200 pings lost across {resizes} resizes\nNIC \
         counters: {c:?}\nguest tap: {guest_tap:?}\nhost tap: {host_tap:?}",
        bps / 1e9
    );
    assert_eq!(
        (c.tx_errors, c.guest_errors, c.rx_deliver_errors),
        (0, 0, 0)
    );
    // Nothing lost or duplicated inside the NIC across the switches: every frame the guest
    // driver took from its tap reached the host tap, and every frame the host service took from
    // its tap reached the guest tap, by the kernel's own counters.
    assert_eq!(guest_tap.tx_packets, c.tx_completions + c.tx_dropped);
    assert_eq!(c.host_tx_frames, c.tx_completions);
    assert_eq!(host_tap.rx_packets, c.host_tx_frames);
    assert_eq!(host_tap.tx_packets, c.host_rx_frames + c.host_rx_dropped);
    assert_eq!(c.host_rx_frames, c.rx_packets);
    assert_eq!(guest_tap.rx_packets, c.rx_packets);
    assert!(c.tx_completions > 1000 && c.rx_packets > 1000, "{c:?}");
    // A ping can be lost only where the kernel dropped a frame from a full tap queue (the
    // NIC's stall lets the queue grow), never inside the NIC.
    let kernel_drops = guest_tap.tx_dropped + host_tap.tx_dropped;
    assert!(
        pings_lost <= kernel_drops,
        "{pings_lost} pings lost, {kernel_drops} frames dropped by the taps' queues"
    );
}

#[test]
fn ping_replies_are_read_from_reply_lines_only_and_missing_ones_named() {
    let text = "PING 10.77.0.2 (10.77.0.2) 56(84) bytes of data.\n\
                64 bytes from 10.77.0.2: icmp_seq=1 ttl=64 time=0.101 ms\n\
                From 10.77.0.1 icmp_seq=2 Destination Host Unreachable\n\
                64 bytes from 10.77.0.2: icmp_seq=3 ttl=64 time=12.5 ms\n\
                64 bytes from 10.77.0.2: icmp_seq=3 ttl=64 time=12.6 ms (DUP!)\n\
                64 bytes from 10.77.0.2: icmp_seq=4 ttl=64 time=0.1 ms (BAD CHECKSUM!)\n\
                1008 bytes from 10.77.0.2: icmp_seq=5 ttl=64 time=0.2 ms\n\
                \n--- 10.77.0.2 ping statistics ---\n\
                6 packets transmitted, 3 received, +1 duplicates, +1 errors, 50% packet loss\n";
    assert_eq!(
        support::ping_replies(text),
        std::collections::BTreeSet::from([1, 3, 5])
    );
    assert_eq!(missing_replies(text, 5), vec![2, 4]);
    assert_eq!(missing_replies(text, 1), Vec::<u64>::new());
}
