//! `enlight bench compare --guest`: emulated against paravirtual devices of a real guest
//! kernel, side by side in one boot of `enlight lab`: the IDE disk (PIIX, `ata_piix`) against
//! virtio-blk, the e1000 against virtio-net.
//!
//! The same fio job runs inside the guest on each disk, the same iperf3 and ping from the host
//! through each NIC's tap. Operation counts, latency percentiles and interrupts come from the
//! guest's enlightd (its kernel probes, read through the lab's port forward); fio, iperf3 and
//! ping give their own figures beside them. The accelerator is named on every report: under TCG
//! (QEMU's emulator, what this project's machines run) every timing is an emulator's, and the
//! ratios between devices say how the two device models cost under emulation, not what a KVM
//! guest would see. Exits per I/O (the host's `kvm:*` tracepoints for the QEMU process) exist
//! only under KVM and are not measured here (see docs/lab.md).
//!
//! Writes `compare-guest.json`, `compare-guest.md` and `compare-guest.png` into `--out`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use enlight_lab::{Accel, DiskKind, Guest, GuestSpec, NicKind};
use serde::{Deserialize, Serialize};

use crate::children::DieWithParent;

/// One disk's run.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct GuestDiskRun {
    pub device: String,
    pub driver: String,
    pub disk: String,
    pub seconds: f64,
    /// Reads the guest's probes counted during the run.
    pub ops: u64,
    /// `ops` per second of fio's run time.
    pub iops: f64,
    /// fio's own IOPS.
    pub fio_iops: f64,
    /// Latency percentiles from the guest's probes (request issue to completion), µs.
    pub p50_us: f64,
    pub p99_us: f64,
    /// The disk's interrupts (guest irq probe) per I/O; `None` when enlightd mapped no IRQ to
    /// the device (legacy IDE's IRQs 14/15 are named `ata_piix`, after the driver, not the
    /// disk or its PCI function).
    pub interrupts_per_io: Option<f64>,
}

/// One NIC's run.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct GuestNicRun {
    pub device: String,
    pub driver: String,
    pub ifname: String,
    /// iperf3 TCP host → guest, receiver side, Mbit/s.
    pub iperf3_mbit_s: f64,
    /// ping round trips host → guest, µs.
    pub ping_p50_us: f64,
    pub ping_p99_us: f64,
    pub pings: u32,
    /// Packets through the NIC (the guest's probes, tx + rx).
    pub frames: u64,
    /// The NIC's interrupts (guest irq probe) per packet; `None` when no IRQ is mapped to it.
    pub interrupts_per_frame: Option<f64>,
}

/// Everything one guest comparison measured.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct GuestReport {
    /// `TCG` or `KVM`.
    pub accelerator: String,
    pub accelerator_reason: String,
    pub host_kernel: String,
    pub host_cpu: String,
    pub guest_kernel: String,
    pub quick: bool,
    pub seconds_per_run: f64,
    pub disks: Vec<GuestDiskRun>,
    pub nics: Vec<GuestNicRun>,
    pub notes: Vec<String>,
}

/// The one part of a kernel device's details this bench reads: its IRQs (whether enlightd found
/// any). Whatever else a daemon, older or newer, sends there is skipped.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KernelIrqs {
    irqs: Vec<serde::de::IgnoredAny>,
}

/// A device as the guest's enlightd serves it, read with the shared ABI's lenient client view
/// (as `enlight top` reads it): a value this build does not know does not break the bench.
type DeviceView = enlight_abi::api::DeviceView<KernelIrqs>;

fn view(addr: &str, name: &str) -> Result<DeviceView> {
    let text = ureq::get(&format!("http://{addr}/api/v1/devices"))
        .timeout(Duration::from_secs(60))
        .call()
        .context("asking the guest's enlightd")?
        .into_string()?;
    let all: Vec<DeviceView> = serde_json::from_str(&text)?;
    all.into_iter()
        .find(|d| d.name == name)
        .with_context(|| format!("the guest's enlightd does not list {name}"))
}

fn wait_for_devices(addr: &str, names: &[&str], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        crate::signals::check_stop()?;
        if names
            .iter()
            .all(|n| view(addr, n).is_ok_and(|v| v.attached || v.kernel.is_some()))
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the guest's enlightd did not list {names:?} within {} s",
            timeout.as_secs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The round-trip times in ping's output, µs, sorted (pure).
pub fn ping_rtts_us(text: &str) -> Vec<f64> {
    let mut v: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            l.split("time=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .map(|ms: f64| ms * 1000.0)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Whether enlightd found the device's IRQs (else its interrupt count means nothing).
fn irqs_known(v: &DeviceView) -> bool {
    v.kernel.as_ref().is_some_and(|k| !k.irqs.is_empty())
}

fn per(n: u64, d: u64) -> f64 {
    if d > 0 {
        n as f64 / d as f64
    } else {
        0.0
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(0.0)
}

fn disk_run(
    guest: &Guest,
    addr: &str,
    kind: DiskKind,
    disk: &str,
    seconds: f64,
) -> Result<GuestDiskRun> {
    crate::signals::check_stop()?;
    eprintln!("compare --guest: fio on {} ({disk})", kind.name());
    let before = view(addr, disk)?;
    let fio = guest.check(
        &format!(
            "fio --name=cmp --filename=/dev/{disk} --rw=randread --bs=4k --direct=1 --ioengine=psync --size=96m --runtime={seconds} --time_based --output-format=json"
        ),
        Duration::from_secs(seconds as u64 + 120),
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    let after = view(addr, disk)?;
    let j: serde_json::Value = serde_json::from_str(fio.trim_start_matches(|c| c != '{'))
        .with_context(|| format!("fio's JSON: {fio}"))?;
    let read = &j["jobs"][0]["read"];
    let runtime_s = read["runtime"].as_f64().unwrap_or(0.0) / 1000.0;
    let ops = after.total.ops_total - before.total.ops_total;
    let irqs = after.interrupts_total - before.interrupts_total;
    Ok(GuestDiskRun {
        device: kind.name().into(),
        driver: kind.driver().into(),
        disk: disk.into(),
        seconds: runtime_s,
        ops,
        iops: if runtime_s > 0.0 {
            ops as f64 / runtime_s
        } else {
            0.0
        },
        fio_iops: read["iops"].as_f64().unwrap_or(0.0),
        // The disk saw no other I/O since enlightd started: its cumulative percentiles are
        // this run's.
        p50_us: after.total.p50_seconds.unwrap_or(0.0) * 1e6,
        p99_us: after.total.p99_seconds.unwrap_or(0.0) * 1e6,
        interrupts_per_io: irqs_known(&after).then(|| per(irqs, ops)),
    })
}

fn nic_run(
    guest: &Guest,
    addr: &str,
    nic: &enlight_lab::guest::GuestNic,
    ifname: &str,
    seconds: f64,
    pings: u32,
) -> Result<GuestNicRun> {
    crate::signals::check_stop()?;
    eprintln!(
        "compare --guest: ping and iperf3 through {} ({ifname})",
        nic.kind.name()
    );
    let before = view(addr, ifname)?;
    let guest_ip = nic.guest_addr.to_string();
    let ping = guest
        .host_command("ping")
        .args(["-i", "0.02", "-c", &pings.to_string(), "-W", "2", &guest_ip])
        .die_with_parent(libc::SIGKILL)
        .output()
        .context("running ping")?;
    let rtts = ping_rtts_us(&String::from_utf8_lossy(&ping.stdout));
    guest.check(
        &format!("iperf3 -s -1 -D -B {guest_ip} --logfile /tmp/iperf3-{ifname}.log"),
        Duration::from_secs(30),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let bps = loop {
        let client = guest
            .host_command("iperf3")
            .args(["-J", "-c", &guest_ip, "-t"])
            .arg(format!("{}", seconds.max(2.0)))
            .die_with_parent(libc::SIGKILL)
            .output()
            .context("running iperf3")?;
        let j: serde_json::Value = serde_json::from_slice(&client.stdout).unwrap_or_default();
        if let Some(bps) = j["end"]["sum_received"]["bits_per_second"].as_f64() {
            break bps;
        }
        let why = j["error"].as_str().unwrap_or("no result").to_string();
        anyhow::ensure!(
            why.contains("unable to connect") && Instant::now() < deadline,
            "iperf3 through {ifname}: {why}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    std::thread::sleep(Duration::from_millis(1500));
    let after = view(addr, ifname)?;
    let frames = after.total.ops_total - before.total.ops_total;
    let irqs = after.interrupts_total - before.interrupts_total;
    Ok(GuestNicRun {
        device: nic.kind.name().into(),
        driver: nic.kind.driver().into(),
        ifname: ifname.into(),
        iperf3_mbit_s: bps / 1e6,
        ping_p50_us: quantile(&rtts, 0.5),
        ping_p99_us: quantile(&rtts, 0.99),
        pings: rtts.len() as u32,
        frames,
        interrupts_per_frame: irqs_known(&after).then(|| per(irqs, frames)),
    })
}

/// The comparison: one guest with both disks and both NICs.
pub fn run(
    quick: bool,
    seconds: Option<f64>,
    out: &Path,
    cache: Option<std::path::PathBuf>,
    enlightd: Option<std::path::PathBuf>,
) -> Result<()> {
    let seconds = seconds.unwrap_or(if quick { 3.0 } else { 10.0 });
    let (accel, why) = enlight_lab::accel::detect();
    eprintln!("compare --guest: accelerator {accel} ({why})");
    let host = super::machine::Machine::read();
    let (host_kernel, host_cpu) = (
        host.kernel.unwrap_or_default(),
        host.cpu_model.unwrap_or_default(),
    );
    let enlightd = match enlightd {
        Some(p) => p,
        None => crate::lab::sibling_enlightd()?,
    };
    let spec = GuestSpec {
        accel,
        disks: vec![DiskKind::Ide, DiskKind::VirtioBlk],
        nics: vec![NicKind::E1000, NicKind::VirtioNet],
        disk_mib: 128,
        boot_timeout: Duration::from_secs(180),
        ..GuestSpec::default()
    };
    let guest = crate::lab::boot(
        cache.unwrap_or_else(crate::lab::default_cache),
        enlightd,
        &spec,
        "",
        &[],
    )?;
    let addr = guest.forward("127.0.0.1:0".parse()?, 9464)?.to_string();
    let mut ifnames = Vec::new();
    for n in &guest.nics {
        let name = guest
            .check(
                &format!(
                    "for i in /sys/class/net/*; do [ \"$(cat $i/address)\" = {} ] && echo ${{i##*/}}; done; true",
                    n.mac
                ),
                Duration::from_secs(30),
            )?
            .trim()
            .to_string();
        anyhow::ensure!(
            !name.is_empty(),
            "no interface with MAC {} in the guest",
            n.mac
        );
        ifnames.push(name);
    }
    let disks = [(DiskKind::Ide, "sda"), (DiskKind::VirtioBlk, "vda")];
    let mut names: Vec<&str> = disks.iter().map(|(_, d)| *d).collect();
    names.extend(ifnames.iter().map(String::as_str));
    wait_for_devices(&addr, &names, Duration::from_secs(300))?;
    let mut report = GuestReport {
        accelerator: accel.label().into(),
        accelerator_reason: why,
        host_kernel,
        host_cpu,
        guest_kernel: guest.kernel_release.clone(),
        quick,
        seconds_per_run: seconds,
        ..Default::default()
    };
    if accel == Accel::Tcg {
        report.notes.push(
            "TCG: QEMU's binary translator runs the guest; every timing is an emulator's. Ratios \
             compare the two device models under emulation, not what a KVM guest would see."
                .into(),
        );
        report.notes.push(
            "exits per I/O: only under KVM (the host's kvm:* tracepoints for the QEMU process); \
             not measured under TCG"
                .into(),
        );
    }
    for (kind, disk) in disks {
        report
            .disks
            .push(disk_run(&guest, &addr, kind, disk, seconds)?);
    }
    let pings = if quick { 50 } else { 200 };
    for (nic, ifname) in guest.nics.clone().iter().zip(&ifnames) {
        report
            .nics
            .push(nic_run(&guest, &addr, nic, ifname, seconds, pings)?);
    }
    drop(guest);
    std::fs::create_dir_all(out)?;
    let json = out.join("compare-guest.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
    let md = markdown(&report);
    std::fs::write(out.join("compare-guest.md"), &md)?;
    png(&report, &out.join("compare-guest.png"))?;
    crate::signals::line(md);
    eprintln!(
        "compare --guest: wrote {}, compare-guest.md and compare-guest.png",
        json.display()
    );
    Ok(())
}

fn per_or_na(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a (no IRQ mapped)".into(), |v| format!("{v:.2}"))
}

/// The Markdown tables of a guest report (the accelerator first, always).
pub fn markdown(r: &GuestReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Accelerator **{}** ({}). Guest kernel {}; host {} on {}; {} s per run{}.\n",
        r.accelerator,
        r.accelerator_reason,
        r.guest_kernel,
        r.host_kernel,
        r.host_cpu,
        r.seconds_per_run,
        if r.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(
        o,
        "| disk ({}) | driver | IOPS (probes) | IOPS (fio) | p50 µs | p99 µs | interrupts/I/O |",
        r.accelerator
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|");
    for d in &r.disks {
        let _ = writeln!(
            o,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
            d.device,
            d.driver,
            d.iops,
            d.fio_iops,
            d.p50_us,
            d.p99_us,
            per_or_na(d.interrupts_per_io)
        );
    }
    let _ = writeln!(
        o,
        "\n| NIC ({}) | driver | iperf3 Mbit/s | ping p50 µs | ping p99 µs | packets | interrupts/packet |",
        r.accelerator
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|");
    for n in &r.nics {
        let _ = writeln!(
            o,
            "| {} | {} | {:.1} | {:.0} | {:.0} | {} | {} |",
            n.device,
            n.driver,
            n.iperf3_mbit_s,
            n.ping_p50_us,
            n.ping_p99_us,
            n.frames,
            per_or_na(n.interrupts_per_frame)
        );
    }
    if !r.notes.is_empty() {
        let _ = writeln!(o);
        for n in &r.notes {
            let _ = writeln!(o, "- {n}");
        }
    }
    o
}

/// Three bar panels: disk IOPS, disk interrupts per I/O, NIC Mbit/s; the accelerator in every
/// title.
pub fn png(r: &GuestReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    super::font::register_font()?;
    let root = BitMapBackend::new(path, (1500, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let disk_names: Vec<String> = r.disks.iter().map(|d| d.device.clone()).collect();
    let nic_names: Vec<String> = r.nics.iter().map(|n| n.device.clone()).collect();
    let specs: [(String, &[String], Vec<f64>); 3] = [
        (
            format!("Disk IOPS, 4 KiB QD1 ({})", r.accelerator),
            &disk_names,
            r.disks.iter().map(|d| d.iops).collect(),
        ),
        (
            format!(
                "Disk interrupts per I/O ({}; none = not mapped)",
                r.accelerator
            ),
            &disk_names,
            r.disks
                .iter()
                .map(|d| d.interrupts_per_io.unwrap_or(0.0))
                .collect(),
        ),
        (
            format!("NIC iperf3 Mbit/s ({})", r.accelerator),
            &nic_names,
            r.nics.iter().map(|n| n.iperf3_mbit_s).collect(),
        ),
    ];
    let colors = [RED, BLUE];
    for (area, (title, names, values)) in panels.iter().zip(specs) {
        let ymax = values.iter().copied().fold(0.0, f64::max).max(1e-9) * 1.2;
        let n = names.len().max(1);
        let labels = names.to_vec();
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, 0f64..ymax)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 {
                    labels.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()?;
        chart.draw_series(values.iter().enumerate().map(|(i, v)| {
            Rectangle::new(
                [(i as f64 + 0.2, 0.0), (i as f64 + 0.8, *v)],
                colors[i % colors.len()].filled(),
            )
        }))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newer daemon's device (a kind, a tuner mode and fields this build does not know) is
    /// read, and what the bench reads of it (totals, interrupts, whether IRQs are known) is
    /// there; a registry device without kernel details has no IRQs known.
    #[test]
    fn a_newer_daemons_device_is_read_leniently() {
        let newer = r#"{"name":"vda","device":"disk","kind":"future-kind","attached":false,
            "settings":{"moderation_frames":8,"new_knob":3},
            "tuner":{"mode":"future-mode","objective":"latency","state":"new-state"},
            "total":{"op":"all","ops_total":12,"bytes_total":49152,"p50_seconds":2e-5,
              "p99_seconds":4e-5,"new_figure":1},
            "interrupts_total":7,"traps_total":0,"new_total":9,"driver":"virtio_blk",
            "kernel":{"class":"future-class","irqs":[24,25],"queues":{"new":true}}}"#;
        let v: DeviceView = serde_json::from_str(newer).unwrap();
        assert_eq!(
            (v.name.as_str(), v.total.ops_total, v.interrupts_total),
            ("vda", 12, 7)
        );
        assert_eq!(v.total.p99_seconds, Some(4e-5));
        assert!(irqs_known(&v));
        let registry: DeviceView =
            serde_json::from_str(r#"{"name":"disk0","attached":true}"#).unwrap();
        assert!(registry.attached && !irqs_known(&registry));
        let no_irqs: DeviceView =
            serde_json::from_str(r#"{"name":"eth0","kernel":{"irqs":[]}}"#).unwrap();
        assert!(no_irqs.kernel.is_some() && !irqs_known(&no_irqs));
    }

    fn sample() -> GuestReport {
        GuestReport {
            accelerator: "TCG".into(),
            accelerator_reason: "test".into(),
            guest_kernel: "6.1.0-57-amd64".into(),
            disks: vec![
                GuestDiskRun {
                    device: "ide".into(),
                    driver: "ata_piix".into(),
                    iops: 500.0,
                    interrupts_per_io: None,
                    ..Default::default()
                },
                GuestDiskRun {
                    device: "virtio-blk".into(),
                    driver: "virtio_blk".into(),
                    iops: 900.0,
                    interrupts_per_io: Some(1.0),
                    ..Default::default()
                },
            ],
            nics: vec![GuestNicRun {
                device: "e1000".into(),
                driver: "e1000".into(),
                iperf3_mbit_s: 100.0,
                ..Default::default()
            }],
            notes: vec!["TCG: an emulator".into()],
            ..Default::default()
        }
    }

    #[test]
    fn the_report_names_the_accelerator_on_every_table() {
        let md = markdown(&sample());
        assert!(md.starts_with("Accelerator **TCG**"), "{md}");
        assert!(
            md.contains("| disk (TCG) |") && md.contains("| NIC (TCG) |"),
            "{md}"
        );
        assert!(md.contains("| ide | ata_piix | 500 |"), "{md}");
        assert!(
            md.contains("n/a (no IRQ mapped)") && md.contains("| 1.00 |"),
            "{md}"
        );
    }

    #[test]
    fn ping_times_are_read_in_microseconds() {
        let text = "64 bytes from 10.78.0.2: icmp_seq=1 ttl=64 time=1.50 ms\n64 bytes from 10.78.0.2: icmp_seq=2 ttl=64 time=0.250 ms\n--- stats ---\n";
        assert_eq!(ping_rtts_us(text), [250.0, 1500.0]);
    }

    #[test]
    fn the_chart_renders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.png");
        png(&sample(), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
