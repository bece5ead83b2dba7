//! Privileged: two lab guests (Debian's 6.1 kernel under QEMU, TCG on this machine), one
//! Prometheus on the host scraping both through the lab's port forwards, and every query of
//! dashboards/enlight.json answered per instance.
//!
//! Each guest runs enlightd with its kernel probes (a virtio-blk disk under fio, an e1000 under
//! ping from the host) and the tuner in dry run, plus a synthetic disk (`enlight disk`) and an
//! emulated IDE disk (`enlight emulated-disk`, thread transport: the guest has no KVM) inside the
//! guest, so the panels about our own devices (ring, moderation, traps, USDT probes) have data
//! too. Then each dashboard query, with `$instance` set to each guest, must return series, and
//! exactly that guest's share of the query over both (nothing merged across guests). The one
//! exception is the settings-changes annotation: its series exist only once a device's settings
//! changed, which a dry-run tuner never does (fleet.rs makes the same exception).
//!
//! Costs two TCG guests at once on this machine; the time is printed (docs/lab.md has it).

#[path = "../src/children.rs"]
#[allow(dead_code)]
mod children;
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use children::DieWithParent;
use enlight_lab::{DiskKind, Guest, GuestSpec, NicKind};
use serde_json::Value;
use support::dashboard::{dashboard_queries, same_series, series_of, substitute, Prom};
use support::{repo, KillOnDrop};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// What each guest runs: enlightd (kernel side on, tuner in dry run), a synthetic and an
/// emulated disk of ours, fio on the virtio-blk disk; all rate-limited, so two 1-vCPU TCG
/// guests keep up.
const GUEST_SETUP: &[&str] = &[
    "mkdir -p /run/enlight",
    "printf '[tuner]\\nmode = \"dry_run\"\\n[kernel]\\nenabled = true\\n' > /tmp/enlightd.toml",
    "enlightd --config /tmp/enlightd.toml --listen 0.0.0.0:9464 --interval-ms 500 --runtime-dir /run/enlight > /tmp/enlightd.log 2>&1 &",
    "enlight disk --name disk0 --create-mib 16 --workload qd=1,bs=4k,rw=70,pattern=random,rate=100 --duration 900 --wait-for-probes 600 --backing /tmp/disk0.img --runtime-dir /run/enlight > /tmp/disk0.log 2>&1 &",
    "enlight emulated-disk --name emu0 --transport thread --create-mib 8 --workload qd=1,bs=4k,rw=70,pattern=random,rate=50 --duration 900 --wait-for-probes 600 --backing /tmp/emu0.img --runtime-dir /run/enlight > /tmp/emu0.log 2>&1 &",
    "fio --name=f --filename=/dev/vda --rw=randread --bs=4k --direct=1 --ioengine=psync --size=32m --rate_iops=50 --runtime=900 --time_based > /dev/null 2>&1 &",
];

#[test]
fn two_lab_guests_one_prometheus_every_dashboard_query_per_instance() {
    let started = Instant::now();
    support::require_tools(
        &["qemu-system-x86_64", "prometheus"],
        "qemu-system-x86 busybox-static prometheus",
    );
    let image = support::lab_image();
    let (accel, why) = enlight_lab::accel::detect();
    eprintln!("lab fleet: accelerator {accel} ({why})");
    let spec = GuestSpec {
        accel,
        disks: vec![DiskKind::VirtioBlk],
        nics: vec![NicKind::E1000],
        disk_mib: 64,
        boot_timeout: SECS(150),
        ..GuestSpec::default()
    };
    // One after the other from this thread: QEMU dies with the thread that spawned it
    // (PR_SET_PDEATHSIG), so a boot thread that ended would take its guest along. The first
    // guest's enlightd starts (a minute or more under TCG) while the second boots.
    let t = SECS(60);
    let mut guests = Vec::new();
    let mut instances = Vec::new();
    let mut pings = Vec::new();
    for _ in 0..2 {
        let g = Guest::boot(
            &spec,
            &image,
            &|c| {
                c.die_with_parent(libc::SIGKILL);
            },
            &|| false,
        )
        .expect("guest boots");
        for cmd in GUEST_SETUP {
            g.check(cmd, t).unwrap();
        }
        instances.push(
            g.forward("127.0.0.1:0".parse().unwrap(), 9464)
                .unwrap()
                .to_string(),
        );
        let mut ping = g.host_command("ping");
        ping.args([
            "-q",
            "-i",
            "0.05",
            "-w",
            "600",
            &g.nics[0].guest_addr.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .die_with_parent(libc::SIGKILL);
        pings.push(KillOnDrop(ping.spawn().unwrap()));
        guests.push(g);
        eprintln!(
            "lab fleet: guest {} up after {:?}",
            guests.len(),
            started.elapsed()
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 5s\n  scrape_timeout: 5s\n  evaluation_interval: 5s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: enlightd\n    static_configs:\n      - targets: [\"{}\", \"{}\"]\n",
            repo().join("dashboards/prometheus/enlight.rules.yml").display(),
            instances[0],
            instances[1]
        ),
    )
    .unwrap();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .die_with_parent(libc::SIGKILL)
            .spawn()
            .expect("start prometheus"),
    );
    let mut prom = Prom::new(format!("http://127.0.0.1:{port}"));
    // Both guests scraped, each counting I/O on its kernel disk and both of our devices (under
    // TCG a guest's enlightd takes a minute or more before it serves).
    let deadline = Instant::now() + SECS(300);
    loop {
        prom.at_now_less(0.0);
        let ready = prom.ready() && {
            let busy = prom.query(
                "count by (instance) (enlight_io_ops_total{device=~\"vda|disk0|emu0\"} > 0)",
            );
            busy.len() == 2 && busy.iter().all(|(_, n)| *n >= 3.0)
        };
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guests were not both scraped with I/O on vda, disk0 and emu0 within 300 s; targets: {}; logs: {}",
            prom.get("/api/v1/targets", &[]),
            guests
                .iter()
                .map(|g| g
                    .check("tail -5 /tmp/enlightd.log /tmp/disk0.log /tmp/emu0.log", t)
                    .unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        std::thread::sleep(Duration::from_millis(1000));
    }
    eprintln!(
        "lab fleet: both instances scraped with I/O after {:?}",
        started.elapsed()
    );
    // The dashboard's 30 s rate windows need samples past the first; and an instant at which
    // neither guest's last scrapes failed (a TCG guest can be slow to answer, and a failed
    // scrape makes its series stale at once).
    std::thread::sleep(SECS(20));
    let deadline = Instant::now() + SECS(60);
    loop {
        prom.at_now_less(1.0);
        let up = prom.query("min_over_time(up[16s])");
        if up.len() == 2 && up.iter().all(|(_, v)| *v == 1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "scrapes keep failing: {up:?}");
        std::thread::sleep(SECS(2));
    }

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("dashboards/enlight.json")).unwrap(),
    )
    .unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (what, expr) in dashboard_queries(&dashboard) {
        checked += 1;
        // Scrapes every 5 s (a TCG guest's /metrics can take seconds): rates over 30 s.
        let expr = expr.replace("$__rate_interval", "30s");
        let all = prom.query(&substitute(&expr, ".+"));
        for inst in &instances {
            let alone: BTreeMap<_, _> = prom.query(&substitute(&expr, inst)).into_iter().collect();
            if alone.is_empty() {
                if !what.contains("Settings changes") {
                    failures.push(format!("{what}: no data for instance {inst}: {expr}"));
                }
                continue;
            }
            if all.iter().all(|(l, _)| l.contains_key("instance")) {
                // Exactly this guest's series of the query over both.
                let mine = series_of(&all, inst);
                if !same_series(&mine, &alone) {
                    failures.push(format!(
                        "{what}: instance {inst} alone gives {alone:?}, within both {mine:?}"
                    ));
                }
            }
        }
    }
    assert!(checked >= 40, "only {checked} dashboard queries");
    // Kernel devices of each guest, by driver, from the same Prometheus.
    let drivers =
        prom.query("count by (instance, device, driver) (enlight_io_ops_total{kind=\"kernel\"})");
    for inst in &instances {
        let mine: Vec<String> = drivers
            .iter()
            .filter(|(l, _)| l.get("instance") == Some(inst))
            .map(|(l, _)| {
                format!(
                    "{}/{}",
                    l["device"],
                    l.get("driver").cloned().unwrap_or_default()
                )
            })
            .collect();
        if !mine.iter().any(|d| d == "vda/virtio_blk") {
            failures.push(format!(
                "{inst}: kernel devices {mine:?}, want vda/virtio_blk"
            ));
        }
    }
    eprintln!(
        "lab fleet: {checked} dashboard queries checked per instance after {:?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Nothing left: no QEMU, namespace or run directory.
    let left: Vec<(String, PathBuf)> = guests
        .iter()
        .map(|g| {
            (
                g.netns_name().to_string(),
                g.console_log().parent().unwrap().to_path_buf(),
            )
        })
        .collect();
    drop(pings);
    drop(guests);
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    for (ns, run_dir) in left {
        assert!(!netns.contains(&ns), "{ns} left behind");
        assert!(!run_dir.exists(), "{} left behind", run_dir.display());
        let qemu = Command::new("pgrep")
            .args(["-f", &run_dir.display().to_string()])
            .output()
            .unwrap();
        assert!(
            qemu.stdout.is_empty(),
            "QEMU left running for {}",
            run_dir.display()
        );
    }
    eprintln!("lab fleet: whole test {:?}", started.elapsed());
}
