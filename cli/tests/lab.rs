//! enlightd inside a real guest kernel (privileged; boots QEMU, TCG on this machine).
//!
//! One guest (Debian's 6.1 kernel, the image the lab builds around the enlightd and enlight this
//! test run built), with a virtio-blk disk, an emulated IDE disk, an emulated e1000 and a
//! virtio-net NIC, runs enlightd with its kernel probes and the tuner allowed to change both NICs
//! and the virtio-blk disk. The test checks,
//! from the host through the lab's port forward and command channel:
//! - every kernel probe attached on 6.1, or reported absent with its reason;
//! - per disk, under fio inside the guest, the probes' read count and latency-histogram count
//!   against the guest's own /proc/diskstats (allowing the documented 2 + 0.1% shortfall);
//! - a tuner change of the e1000's rx-usecs and NAPI moderation (`napi_defer_hard_irqs`), with
//!   ping traffic from the host through the tap, seen by `ethtool -c` and sysfs in the guest; on
//!   virtio-net (fixed coalescing without `VIRTIO_NET_F_NOTF_COAL` on QEMU 7.2) trials of its
//!   NAPI moderation (in the tuner's decisions) before its rx ring's (below); after `kill -9`
//!   of the guest's enlightd, with the changes in force, they stay and the journal holds the
//!   originals, which `enlight restore` puts back;
//! - rings: the e1000's are recommend only, shown with the reason (its resize resets the
//!   adapter) and never changed: `ethtool -g` and its link (no second "Link is Up") unchanged.
//!   virtio-net's rx ring (its resize only resets the queue, which this QEMU/kernel pair
//!   supports), shrunk to 128 by hand first, is explored under the ring pressure that small
//!   UDP datagrams from the host put on it (NAPI polls that use their whole budget): a trial of
//!   256 is seen by `ethtool -g` in the guest, caught and pinned there, named in the decisions
//!   and the audit log, kept after `kill -9`, and put back to 128 by `enlight restore`; its tx
//!   ring stays recommend only;
//! - likewise for the virtio-blk disk's queue knobs (nr_requests, scheduler, read_ahead_kb,
//!   max_sectors_kb) under fio inside the guest, read from the guest's sysfs;
//! - nothing left behind: no QEMU, network namespace, tap or run directory.
//!
//! Kept to one boot (a few minutes under TCG on two cores) so CI can run it every time.

#[path = "../src/children.rs"]
#[allow(dead_code)]
mod children;
mod support;

use std::time::{Duration, Instant};

use children::DieWithParent;
use enlight_lab::{DiskKind, Guest, GuestSpec, NicKind};

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn get(addr: &str, path: &str) -> Option<String> {
    ureq::get(&format!("http://{addr}{path}"))
        .timeout(SECS(20))
        .call()
        .ok()?
        .into_string()
        .ok()
}

/// The value of every sample of `family` whose labels include all of `labels`, summed.
fn metric(text: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with('{'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads completed (field 4) for `disk` from /proc/diskstats text.
fn diskstats_reads(text: &str, disk: &str) -> u64 {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&disk))
        .and_then(|f| f.get(3)?.parse().ok())
        .unwrap_or_else(|| panic!("{disk} not in /proc/diskstats: {text}"))
}

/// The current rx ring size from `ethtool -g` (the second "RX:" line: current settings).
fn current_rx_ring(ethtool_g: &str) -> Option<u64> {
    ethtool_g
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RX:"))
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
}

fn ring_rx(ethtool_g: &str) -> u64 {
    current_rx_ring(ethtool_g).unwrap_or_else(|| panic!("no current RX ring in {ethtool_g}"))
}

/// The most rx ring `ethtool -g` allows (the first "RX:" line: pre-set maximums).
fn ethtool_max_rx(ethtool_g: &str) -> u64 {
    ethtool_g
        .lines()
        .find_map(|l| l.trim().strip_prefix("RX:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no RX maximum in {ethtool_g}"))
}

/// The current tx ring size from `ethtool -g` (the second "TX:" line).
fn current_tx_ring(ethtool_g: &str) -> Option<u64> {
    ethtool_g
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TX:"))
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
}

fn rx_usecs(ethtool_c: &str) -> u64 {
    ethtool_c
        .lines()
        .find_map(|l| l.trim().strip_prefix("rx-usecs:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rx-usecs in {ethtool_c}"))
}

#[test]
fn enlightd_in_a_6_1_guest_probes_counts_and_tunes_real_devices() {
    let started = Instant::now();
    if std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("qemu-system-x86_64 is missing (apt-get install qemu-system-x86 busybox-static)");
    }
    let image = support::lab_image();
    eprintln!(
        "lab: image ready after {:?} ({})",
        started.elapsed(),
        image.initrd.display()
    );
    let (accel, why) = enlight_lab::accel::detect();
    eprintln!("lab: accelerator {accel} ({why})");
    let spec = GuestSpec {
        accel,
        disks: vec![DiskKind::VirtioBlk, DiskKind::Ide],
        nics: vec![NicKind::E1000, NicKind::VirtioNet],
        disk_mib: 128,
        boot_timeout: SECS(150),
        ..GuestSpec::default()
    };
    let guest = Guest::boot(
        &spec,
        &image,
        &|c| {
            c.die_with_parent(libc::SIGKILL);
        },
        &|| false,
    )
    .expect("guest boots");
    let netns = guest.netns_name().to_string();
    eprintln!(
        "lab: guest {} up after {:?}",
        guest.kernel_release,
        started.elapsed()
    );
    assert!(
        guest.kernel_release.starts_with("6.1."),
        "{}",
        guest.kernel_release
    );
    let t = SECS(60);
    let nic = &guest.nics[0];
    let iface_of = |mac: &str| {
        guest
            .check(
                &format!(
                    "for i in /sys/class/net/*; do [ \"$(cat $i/address)\" = {mac} ] && echo ${{i##*/}}; done; true"
                ),
                t,
            )
            .unwrap()
            .trim()
            .to_string()
    };
    let ifname = iface_of(&nic.mac);
    assert!(ifname.starts_with("eth"), "e1000 interface: {ifname:?}");
    let vnic = &guest.nics[1];
    let vif = iface_of(&vnic.mac);
    assert!(
        vif.starts_with("eth") && vif != ifname,
        "virtio-net interface: {vif:?}"
    );
    let original_usecs = rx_usecs(&guest.check(&format!("ethtool -c {ifname}"), t).unwrap());
    // NAPI moderation (sysfs) and rings (`ethtool -g`) of both NICs, as the guest has them.
    let napi = |i: &str| {
        guest
            .check(
                &format!("cd /sys/class/net/{i} && cat napi_defer_hard_irqs gro_flush_timeout"),
                t,
            )
            .unwrap()
    };
    let rings = |i: &str| guest.check(&format!("ethtool -g {i}"), t).unwrap();
    let (eth_napi0, vif_napi0) = (napi(&ifname), napi(&vif));
    let (eth_rings0, vif_rings0) = (rings(&ifname), rings(&vif));
    // This QEMU/kernel pair resizes virtio-net's rings (the queue reset of virtio 1.2, QEMU
    // 7.2 and Linux 6.0+). QEMU gives the rx ring its most, 256: an operator's smaller ring,
    // 128, set by hand before enlightd starts, leaves the tuner a rung to try.
    let rx_max = ethtool_max_rx(&vif_rings0);
    let resized = guest
        .run(&format!("ethtool -G {vif} rx 128 && ethtool -g {vif}"), t)
        .unwrap();
    assert_eq!(
        current_rx_ring(&resized.output),
        Some(128),
        "virtio-net's rx ring did not shrink to 128 by hand: {}",
        resized.output
    );
    assert!(
        rx_max > 128,
        "virtio-net's rx ring cannot grow: {vif_rings0}"
    );
    let (vif_rings0, vif_rx0) = (rings(&vif), 128);
    eprintln!("lab: virtio-net rx ring set to 128 by hand (most {rx_max})");
    // An e1000 ring resize takes the adapter down and up: the link comes up once per reset.
    let link_ups = || {
        guest
            .check(
                &format!("dmesg | grep -c '{ifname} NIC Link is Up'; true"),
                t,
            )
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap_or(0)
    };
    // The e1000 logs its first link-up from its watchdog, a while after the interface comes
    // up (a busy host's TCG guest once reached this line before it had): wait for it.
    let link_deadline = Instant::now() + SECS(60);
    let link_ups0 = loop {
        let n = link_ups();
        if n >= 1 {
            break n;
        }
        assert!(
            Instant::now() < link_deadline,
            "{ifname}'s link-up not in dmesg after 60 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // The virtio-blk disk's queue knobs the tuner may change, as the guest's sysfs has them.
    let vda_knobs = || guest.check(VDA_KNOBS, t).unwrap();
    let vda_original = vda_knobs();

    // enlightd with the kernel side on, allowed to tune both NICs and the virtio-blk disk. The
    // NICs' objective is throughput: its moves try more moderation (both ladders at once) right
    // after less, so an early trial moves the e1000's rx-usecs and napi_defer_hard_irqs together
    // and virtio-net's NAPI knobs (at 0, with nothing below) first, its rx ring last (the ring
    // ladder, tried only under ring pressure; `[kernel] ring_resets` is left at its default,
    // "explore"); latency's order reaches NAPI only after several trials. The audit log is
    // read in the guest.
    let config = format!(
        "[tuner]\\nmode = \\\"auto\\\"\\nobjective = \\\"latency\\\"\\naudit_log = \\\"/tmp/tuner-audit.jsonl\\\"\\ntrial_windows = 2\\nsettle_windows = 0\\nmin_change_interval_ms = 100\\n[tuner.devices.{ifname}]\\nobjective = \\\"throughput\\\"\\n[tuner.devices.{vif}]\\nobjective = \\\"throughput\\\"\\n[kernel]\\nenabled = true\\ntune = [\\\"{ifname}\\\", \\\"{vif}\\\", \\\"vda\\\"]\\ndry_run = false\\n"
    );
    guest
        .check(&format!("printf \"{config}\" > /tmp/enlightd.toml"), t)
        .unwrap();
    guest
        .check(
            "enlightd --config /tmp/enlightd.toml --listen 0.0.0.0:9464 --interval-ms 500 --runtime-dir /run/enlight > /tmp/enlightd.log 2>&1 &",
            t,
        )
        .unwrap();
    let fwd = guest
        .forward("127.0.0.1:0".parse().unwrap(), 9464)
        .unwrap()
        .to_string();
    let deadline = Instant::now() + SECS(150);
    let health: serde_json::Value = loop {
        if let Some(h) = get(&fwd, "/api/v1/health") {
            let v: serde_json::Value = serde_json::from_str(&h).unwrap();
            if v["kernel"]["probes"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
            {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "guest enlightd never served its kernel probes: {}",
            guest.check("cat /tmp/enlightd.log", t).unwrap()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("lab: enlightd up after {:?}", started.elapsed());

    // 1. Every kernel probe attached on 6.1, or absent with its reason.
    let must_attach = [
        "block:block_rq_complete",
        "irq:irq_handler_entry",
        "napi:napi_poll",
        "net:net_dev_xmit",
        "net:netif_receive_skb",
    ];
    let probes = health["kernel"]["probes"].as_array().unwrap();
    for p in probes {
        let name = p["probe"].as_str().unwrap();
        let attached = p["attached"].as_bool().unwrap();
        if must_attach.contains(&name) {
            assert!(attached, "{name} did not attach on 6.1: {p}");
        } else if !attached {
            let reason = p["reason"].as_str().unwrap_or("");
            assert!(
                reason.contains("does not exist") || reason.contains("no hyperv"),
                "{name} not attached for a reason other than absence: {p}"
            );
        }
    }
    for m in must_attach {
        assert!(
            probes.iter().any(|p| p["probe"] == m),
            "{m} missing from {probes:?}"
        );
    }

    // 2. Block latency counts against the guest's /proc/diskstats, under fio, per disk.
    for (kind, disk) in [(DiskKind::VirtioBlk, "vda"), (DiskKind::Ide, "sda")] {
        let before_stats = guest.check("cat /proc/diskstats", t).unwrap();
        let before = get(&fwd, "/metrics").unwrap();
        let fio = guest
            .check(
                &format!("fio --name=lab --filename=/dev/{disk} --rw=randread --bs=4k --direct=1 --ioengine=psync --size=96m --runtime=3 --time_based --output-format=terse --terse-version=3"),
                SECS(90),
            )
            .unwrap();
        // Two collector intervals for the last completions to reach /metrics.
        std::thread::sleep(Duration::from_millis(1500));
        let after_stats = guest.check("cat /proc/diskstats", t).unwrap();
        let after = get(&fwd, "/metrics").unwrap();
        let ds = diskstats_reads(&after_stats, disk) - diskstats_reads(&before_stats, disk);
        let labels = [("device", disk), ("op", "read")];
        let ops = metric(&after, "enlight_io_ops_total", &labels)
            - metric(&before, "enlight_io_ops_total", &labels);
        let hist = metric(&after, "enlight_io_latency_seconds_count", &labels)
            - metric(&before, "enlight_io_latency_seconds_count", &labels);
        // Terse v3 field 6: KiB read; 4 KiB per I/O.
        let fio_ios: u64 = fio
            .trim()
            .lines()
            .last()
            .and_then(|l| l.split(';').nth(5)?.parse::<u64>().ok())
            .map(|kib| kib / 4)
            .unwrap_or_else(|| panic!("fio's terse output: {fio}"));
        eprintln!(
            "lab: {} ({disk}): probes {ops} reads ({hist} in the latency histogram), /proc/diskstats {ds}, fio {fio_ios}",
            kind.name()
        );
        assert!(ds > 50, "fio barely ran on {disk}: {ds} reads");
        assert_eq!(fio_ios, ds, "{disk}: fio's reads and /proc/diskstats'");
        let slack = 2.0 + ds as f64 * 0.001;
        assert!(
            ops <= ds as f64 && ops >= ds as f64 - slack,
            "{disk}: probes counted {ops} reads, /proc/diskstats {ds}"
        );
        assert_eq!(hist, ops, "{disk}: histogram count {hist} != ops {ops}");
        assert!(
            metric(
                &after,
                "enlight_io_latency_seconds_count",
                &[("device", disk), ("driver", kind.driver())]
            ) > 0.0,
            "{disk} series carry driver={}",
            kind.driver()
        );
    }
    eprintln!("lab: disks checked after {:?}", started.elapsed());

    // 3. The tuner changes the e1000's rx-usecs under host->guest traffic; ethtool sees it.
    // 1000 echoes a second: the tuner judges a settings point only once it has seen 2000
    // operations (TunerParams::min_point_ops) within at most 8 windows, which 200 a second
    // never reach.
    let pings: Vec<KillOnDrop> = [nic, vnic]
        .iter()
        .map(|n| {
            let mut ping = guest.host_command("ping");
            ping.args([
                "-q",
                "-i",
                "0.001",
                "-w",
                &TUNING_SECS.to_string(),
                &n.guest_addr.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .die_with_parent(libc::SIGKILL);
            KillOnDrop(ping.spawn().unwrap())
        })
        .collect();
    // Ring pressure on virtio-net: small UDP datagrams from the host, more than the guest's
    // NAPI polls take one budget (64) at a time. (A TCP stream shows none: QEMU hands the guest
    // 64 KiB GSO frames, a couple a poll.)
    guest.check("iperf3 -s -D", t).unwrap();
    // The guest watches its rx ring with `ethtool -g` every 0.2 s and pins virtio-net the
    // moment a trial grows it: a trial lasts 2 windows (1 s), too short to catch reliably from
    // the host through the command channel.
    guest
        .check(
            &format!(
                "(pinned=; while :; do r=$(ethtool -g {vif} | awk '/^RX:/{{n++; if (n == 2) print $2}}'); echo \"rx $r\"; if [ -z \"$pinned\" ] && [ \"$r\" -gt {vif_rx0} ]; then wget -q -O /dev/null --post-data= http://127.0.0.1:9464/api/v1/devices/{vif}/pin && pinned=1 && echo pinned; fi; sleep 0.2; done) > /tmp/vif-rings 2>&1 & echo $! > /tmp/vif-watch.pid"
            ),
            t,
        )
        .unwrap();
    let udp = {
        let mut c = guest.host_command("iperf3");
        c.args([
            "-c",
            &vnic.guest_addr.to_string(),
            "-u",
            "-b",
            UDP_RATE,
            "-l",
            "100",
            "-t",
            &TUNING_SECS.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .die_with_parent(libc::SIGKILL);
        KillOnDrop(c.spawn().unwrap())
    };
    // And fio on the virtio-blk disk inside the guest, for the disk's tuner.
    guest
        .check(
            &format!("fio --name=tune --filename=/dev/vda --rw=randread --bs=4k --direct=1 --ioengine=psync --size=96m --runtime={TUNING_SECS} --time_based > /dev/null 2>&1 &"),
            t,
        )
        .unwrap();
    // Each device is caught changed in the device itself (ethtool -c, sysfs) and pinned there
    // at once, so that what the guest shows is what the API says. A trial lasts a few windows
    // and may be reverted before the pin takes effect: a device found back at its original after
    // the pin is unpinned and watched again.
    let eth_usecs = || rx_usecs(&guest.check(&format!("ethtool -c {ifname}"), t).unwrap());
    let pin = |device: &str, on: bool| {
        let verb = if on { "pin" } else { "unpin" };
        ureq::post(&format!("http://{fwd}/api/v1/devices/{device}/{verb}"))
            .timeout(SECS(20))
            .call()
            .unwrap_or_else(|e| panic!("{verb} {device}: {e}"));
    };
    // The e1000 counts as changed once both rx-usecs and NAPI moderation differ from the
    // originals (one trial of more moderation), virtio-net once its rx ring has grown (its NAPI
    // moderation is tried first: those trials are checked in the decisions below).
    let eth_state = || (eth_usecs(), napi(&ifname));
    let eth_changed = |(u, n): &(u64, String)| *u != original_usecs && *n != eth_napi0;
    let vif_state = || (rings(&vif), napi(&vif));
    let vif_changed = |(r, _): &(String, String)| current_rx_ring(r) > Some(vif_rx0);
    let deadline = Instant::now() + SECS(TUNING_SECS);
    let mut eth_tuned: Option<(u64, String)> = None;
    let mut vif_tuned: Option<(String, String)> = None;
    let mut vda_tuned: Option<String> = None;
    // Pins `device` once `changed(read())` holds, and keeps the pin only if it still holds
    // after the pin took (a trial may be reverted in between).
    fn catch<T: PartialEq>(
        slot: &mut Option<T>,
        read: impl Fn() -> T,
        changed: impl Fn(&T) -> bool,
        pin: impl Fn(bool),
    ) {
        if slot.is_none() && changed(&read()) {
            pin(true);
            std::thread::sleep(Duration::from_millis(1200));
            match read() {
                now if changed(&now) => *slot = Some(now),
                _ => pin(false),
            }
        }
    }
    while eth_tuned.is_none() || vif_tuned.is_none() || vda_tuned.is_none() {
        catch(&mut eth_tuned, eth_state, eth_changed, |on| {
            pin(&ifname, on)
        });
        catch(&mut vif_tuned, vif_state, vif_changed, |on| pin(&vif, on));
        catch(
            &mut vda_tuned,
            vda_knobs,
            |k| *k != vda_original,
            |on| pin("vda", on),
        );
        assert!(
            Instant::now() < deadline,
            "the tuner did not change {ifname} ({eth_tuned:?}), {vif}'s rx ring ({vif_tuned:?}) and vda ({vda_tuned:?}) within {TUNING_SECS} s; decisions: {}; log: {}; {vif}'s NAPI: {}; rx ring seen: {}",
            get(&fwd, "/api/v1/tuner/decisions?limit=30").unwrap_or_default(),
            guest.check("tail -20 /tmp/enlightd.log", t).unwrap(),
            guest.check(&format!("wget -q -O- http://127.0.0.1:9464/metrics | grep '^enlight_napi.*{vif}'; true"), t).unwrap(),
            guest.check("sort /tmp/vif-rings | uniq -c", t).unwrap()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!(
        "lab: all three devices changed and pinned after {:?}",
        started.elapsed()
    );
    // What the pressure was: budget-exhausted polls per second on virtio-net, read before the
    // traffic stops.
    let napi_rates = {
        let read = || {
            let m = get(&fwd, "/metrics").unwrap();
            let l = [("device", vif.as_str())];
            (
                Instant::now(),
                metric(&m, "enlight_napi_polls_total", &l),
                metric(&m, "enlight_napi_packets_total", &l),
                metric(&m, "enlight_napi_budget_exhausted_total", &l),
            )
        };
        let a = read();
        std::thread::sleep(SECS(3));
        let b = read();
        let dt = b.0.duration_since(a.0).as_secs_f64();
        format!(
            "{:.0} polls/s, {:.0} packets/s, {:.0} budget-exhausted polls/s",
            (b.1 - a.1) / dt,
            (b.2 - a.2) / dt,
            (b.3 - a.3) / dt
        )
    };
    eprintln!("lab: {vif} under UDP from the host: {napi_rates}");
    drop(pings);
    drop(udp);
    guest
        .check(
            "kill $(pidof fio) $(cat /tmp/vif-watch.pid) $(pidof iperf3) 2>/dev/null; true",
            t,
        )
        .unwrap();
    let vda_tuned = vda_tuned.unwrap();
    let (eth_usecs_tuned, eth_napi_tuned) = eth_tuned.unwrap();
    let (vif_rings_tuned, vif_tuned) = vif_tuned.unwrap();
    let eth_tuned = Some(eth_usecs_tuned);
    assert_eq!(vda_knobs(), vda_tuned, "vda changed after it was pinned");
    assert_eq!(
        napi(&ifname),
        eth_napi_tuned,
        "{ifname}'s NAPI changed after the pin"
    );
    assert_eq!(napi(&vif), vif_tuned, "{vif}'s NAPI changed after the pin");
    eprintln!(
        "lab: tuner changed NAPI (napi_defer_hard_irqs, gro_flush_timeout) of {ifname} {:?} -> {:?}, of {vif} {:?} -> {:?}",
        eth_napi0, eth_napi_tuned, vif_napi0, vif_tuned
    );
    // The API's knobs are what sysfs has.
    let devices: serde_json::Value =
        serde_json::from_str(&get(&fwd, "/api/v1/devices").unwrap()).unwrap();
    for (i, sysfs) in [(&ifname, &eth_napi_tuned), (&vif, &vif_tuned)] {
        let knobs = &devices
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == i.as_str())
            .unwrap_or_else(|| panic!("{i} not in the API: {devices}"))["knobs"];
        let api: Vec<String> = ["napi_defer_hard_irqs", "gro_flush_timeout"]
            .iter()
            .map(|n| {
                knobs
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|k| k["name"] == *n)
                    .map(|k| k["value"].to_string())
                    .unwrap_or_else(|| panic!("{i}: no knob {n} in {knobs}"))
            })
            .collect();
        assert_eq!(
            api,
            sysfs.split_whitespace().collect::<Vec<_>>(),
            "{i}: API knobs and sysfs disagree"
        );
    }
    // Rings: the e1000's recommend only, with the reason, and never changed; virtio-net's tx
    // ring recommend only, its rx ring not (it was just caught grown).
    let decisions_of = |i: &str| -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(
            &get(
                &fwd,
                &format!("/api/v1/tuner/decisions?device={i}&limit=1000"),
            )
            .unwrap(),
        )
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
    };
    for (i, shown, not_shown) in [
        (&ifname, "rx_ring detaches and re-creates the device", None),
        (
            &vif,
            "tx_ring resets the queue when changed: recommend only",
            Some("rx_ring"),
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_enlight"))
            .args(["tune", "--dry-run", "--addr", &fwd, "--device", i])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && text.contains(&format!("not explored: {shown}"))
                && not_shown.is_none_or(|n| !text.contains(&format!("not explored: {n}"))),
            "{i}: enlight tune --dry-run does not show its rings as it should ({shown}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for d in decisions_of(&ifname) {
        for f in ["ring_in_bytes", "ring_out_bytes"] {
            assert_eq!(
                d["from"][f], d["to"][f],
                "{ifname}: a decision moved {f}: {d}"
            );
        }
    }
    assert_eq!(rings(&ifname), eth_rings0, "{ifname}'s rings changed");
    // virtio-net: the trial of a larger rx ring, seen by ethtool -g in the guest, in the
    // tuner's decisions (in its own knobs) and in the audit log; its tx ring untouched.
    let vif_rx_tuned = ring_rx(&vif_rings_tuned);
    let grown = format!("rx_ring {vif_rx0} → {vif_rx_tuned}");
    let seen = guest.check("cat /tmp/vif-rings", t).unwrap();
    assert!(
        seen.lines().any(|l| l == format!("rx {vif_rx_tuned}")) && seen.contains("pinned"),
        "ethtool -g in the guest never saw rx {vif_rx_tuned}: {seen}"
    );
    assert_eq!(rings(&vif), vif_rings_tuned, "{vif}'s rings after the pin");
    assert_eq!(
        current_tx_ring(&vif_rings_tuned),
        current_tx_ring(&vif_rings0),
        "{vif}'s tx ring changed"
    );
    let vif_decisions = decisions_of(&vif);
    let ring_trial = vif_decisions
        .iter()
        .find(|d| {
            d["action"] == "change"
                && d["to"]["ring_in_bytes"].as_u64() > d["from"]["ring_in_bytes"].as_u64()
        })
        .unwrap_or_else(|| panic!("no decision grew {vif}'s rx ring: {vif_decisions:?}"));
    assert!(
        ring_trial["reason"].as_str().unwrap().contains(&grown),
        "the ring trial's reason does not name {grown}: {ring_trial}"
    );
    // No assertion on the order of moves: the ring goes first only once the incumbent's
    // windows show ring pressure, and whether they do at the tuner's first decision depends on
    // when the guest's polls first exhaust their budget (one run of this test saw a NAPI trial
    // first, another the ring). That the ring is tried at all under pressure is asserted above.
    let audit = guest
        .check(
            &format!("grep -c '{grown}' /tmp/tuner-audit.jsonl; true"),
            t,
        )
        .unwrap();
    assert!(
        audit.trim().parse::<u32>().unwrap_or(0) >= 1,
        "the audit log does not name {grown}: {audit}"
    );
    eprintln!(
        "lab: tuner tried {vif}'s {grown} under ring pressure ({}), seen by ethtool -g and pinned",
        ring_trial["reason"]
    );
    assert_eq!(
        link_ups(),
        link_ups0,
        "{ifname}'s adapter was reset (link came up again)"
    );
    eprintln!("lab: tuner changed vda's queue from\n{vda_original}to\n{vda_tuned}");
    // The tuner's own record of the change ethtool shows.
    let decisions: serde_json::Value = serde_json::from_str(
        &get(
            &fwd,
            &format!("/api/v1/tuner/decisions?device={ifname}&limit=200"),
        )
        .unwrap(),
    )
    .unwrap();
    let changed = decisions
        .as_array()
        .and_then(|a| {
            a.iter().rev().find(|d| {
                d["action"] == "change"
                    && d["to"]["moderation_usecs"].as_u64() == eth_tuned
                    && d["from"]["moderation_usecs"] != d["to"]["moderation_usecs"]
            })
        })
        .unwrap_or_else(|| panic!("no tuner decision set rx-usecs {eth_tuned:?}: {decisions}"))
        .clone();
    let now_usecs = rx_usecs(&guest.check(&format!("ethtool -c {ifname}"), t).unwrap());
    let devices: serde_json::Value =
        serde_json::from_str(&get(&fwd, "/api/v1/devices").unwrap()).unwrap();
    let api_usecs = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == ifname.as_str())
        .map(|d| d["kernel"]["nic"]["coalesce"]["rx_usecs"].clone())
        .unwrap_or(serde_json::Value::Null);
    eprintln!(
        "lab: tuner changed {ifname} rx-usecs {} -> {}; ethtool -c now {now_usecs}, API {api_usecs} (original {original_usecs})",
        changed["from"]["moderation_usecs"], changed["to"]["moderation_usecs"]
    );
    assert_ne!(
        now_usecs, original_usecs,
        "ethtool -c shows the original rx-usecs after a change: {changed}"
    );
    assert_eq!(
        api_usecs.as_u64(),
        Some(now_usecs),
        "the API's coalescing of {ifname} and ethtool -c disagree"
    );

    // 4. kill -9 the guest's enlightd: the change stays, the journal has the original, and
    // `enlight restore` puts it back.
    guest
        .check("kill -9 $(pidof enlightd); sleep 1; ! pidof enlightd", t)
        .unwrap();
    assert_eq!(
        rx_usecs(&guest.check(&format!("ethtool -c {ifname}"), t).unwrap()),
        now_usecs,
        "a killed enlightd cannot have restored anything"
    );
    assert_eq!(vda_knobs(), vda_tuned, "vda after kill -9");
    assert_eq!(
        napi(&ifname),
        eth_napi_tuned,
        "{ifname}'s NAPI after kill -9"
    );
    assert_eq!(napi(&vif), vif_tuned, "{vif}'s NAPI after kill -9");
    assert_eq!(rings(&vif), vif_rings_tuned, "{vif}'s rings after kill -9");
    let list = guest
        .check("enlight restore --list --runtime-dir /run/enlight", t)
        .unwrap();
    assert!(
        list.contains(&ifname)
            && list.contains(&format!("original {original_usecs}"))
            && list.contains("vda")
            && list.contains(&vif)
            && list.contains("napi_defer_hard_irqs")
            && list
                .lines()
                .any(|l| l.contains(&vif) && l.contains(&format!("rx_ring: original {vif_rx0}"))),
        "journal after kill -9: {list}"
    );
    let restored = guest
        .check("enlight restore --runtime-dir /run/enlight", t)
        .unwrap();
    assert_eq!(
        rx_usecs(&guest.check(&format!("ethtool -c {ifname}"), t).unwrap()),
        original_usecs,
        "restore: {restored}"
    );
    assert_eq!(vda_knobs(), vda_original, "vda after restore: {restored}");
    assert_eq!(
        napi(&ifname),
        eth_napi0,
        "{ifname}'s NAPI after restore: {restored}"
    );
    assert_eq!(
        napi(&vif),
        vif_napi0,
        "{vif}'s NAPI after restore: {restored}"
    );
    assert_eq!(
        rings(&vif),
        vif_rings0,
        "{vif}'s rings after restore: {restored}"
    );
    eprintln!(
        "lab: restore checked after {:?} ({vif} rx ring back to {})",
        started.elapsed(),
        ring_rx(&rings(&vif))
    );

    // 5. Nothing left behind.
    let console = guest.console_log().to_path_buf();
    let run_dir = console.parent().unwrap().to_path_buf();
    drop(guest);
    let netns_list = ip_netns(&["list"]);
    assert!(!netns_list.contains(&netns), "{netns} left behind");
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    let qemus = std::process::Command::new("pgrep")
        .args(["-f", &run_dir.display().to_string()])
        .output()
        .unwrap();
    assert!(
        qemus.stdout.is_empty(),
        "QEMU left running: {}",
        String::from_utf8_lossy(&qemus.stdout)
    );

    // 6. A boot that misses its deadline is an error naming the last console line, and leaves
    // nothing; the namespace of a lab killed with SIGKILL (its pid gone) goes when the next
    // lab starts.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let stale = format!("enlight-lab-{dead_pid}-0");
    ip_netns(&["add", &stale]);
    let short = GuestSpec {
        boot_timeout: Duration::from_millis(1500),
        ..spec.clone()
    };
    let err = match Guest::boot(&short, &image, &|_| {}, &|| false) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a guest booted within 1.5 s under {accel}"),
    };
    assert!(
        err.contains("did not reach its command loop") && err.contains("last console line"),
        "{err}"
    );
    let after = ip_netns(&["list"]);
    assert!(!after.contains(&stale), "stale namespace kept: {after}");
    assert!(
        !after.contains("enlight-lab-"),
        "a lab namespace left: {after}"
    );
    eprintln!("lab: whole test {:?}", started.elapsed());
}

/// How long the tuner has to change every device, and the traffic that drives it runs. The
/// virtio-net rx ring comes last in its search, after A-B-A trials of its NAPI knobs whose rounds
/// take longer the noisier the windows: on a machine busy with builds the ring trial came
/// after 150 s (the test passes as soon as every device is caught changed).
const TUNING_SECS: u64 = 360;

/// The rate of the host's 100-byte UDP datagrams into virtio-net: more than the TCG guest's
/// polls drain a budget at a time (ring pressure), yet leaving it the CPU for the rest.
const UDP_RATE: &str = "10M";

/// The virtio-blk disk's queue knobs the tuner may change (the scheduler with the current one
/// in brackets), one per line.
const VDA_KNOBS: &str =
    "cd /sys/block/vda/queue && cat nr_requests read_ahead_kb max_sectors_kb scheduler";

fn ip_netns(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .arg("netns")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip netns {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
