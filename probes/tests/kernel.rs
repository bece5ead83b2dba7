//! Privileged: loads the real kernel-device programs, drives real kernel devices the test
//! creates (a loop device over a temporary file, veth pairs in namespaces of our own) and checks
//! the programs' figures against counts nobody here wrote: fio's own latency percentiles and
//! op counts, /proc/diskstats, /proc/interrupts and the interfaces' statistics. Needs root; CI
//! runs as root, so without it the tests fail loudly rather than pass silently.

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use enlight_probes::hist::{bucket_high_ns, bucket_low_ns};
use enlight_probes::kernel::tracefs::{Catalog, Tracefs};
use enlight_probes::kernel::{
    make_dev, BlockKey, Group, KernelProbes, NicKey, Selection, HYPERV_PROBE,
};
use enlight_probes::{preflight, IoStats};
use support::*;

/// One test at a time: attaching or detaching programs on a tracepoint while another test
/// counts on it loses that test events (measured: about 50 of 3,000 block requests with a
/// reload every 200 ms), so these tests never overlap.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn require_privileges() -> std::sync::MutexGuard<'static, ()> {
    if let Err(e) = preflight() {
        panic!("privileged eBPF test cannot run: {e}");
    }
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Buckets of `after` minus those of `before`.
fn bucket_delta(before: Option<&IoStats>, after: &IoStats) -> BTreeMap<u32, u64> {
    let mut d: BTreeMap<u32, u64> = after.buckets.iter().copied().collect();
    for (b, c) in before.map(|s| s.buckets.as_slice()).unwrap_or(&[]) {
        *d.entry(*b).or_default() -= c;
    }
    d.retain(|_, c| *c > 0);
    d
}

/// The `q` quantile of bucket counts as an interval `[low, high]` of the bucket it falls in.
fn quantile(buckets: &BTreeMap<u32, u64>, q: f64) -> (u64, u64) {
    let total: u64 = buckets.values().sum();
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (b, c) in buckets {
        seen += c;
        if seen >= rank {
            return (bucket_low_ns(*b), bucket_high_ns(*b));
        }
    }
    unreachable!("rank within total")
}

/// Runs fio with `args` and returns its JSON report.
fn fio(args: &[&str]) -> serde_json::Value {
    let out = Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .output()
        .expect("fio (apt-get install fio)");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("fio JSON")
}

/// One op's figures from fio's report: (ios, clat p50, clat p99) in ns.
fn fio_op(report: &serde_json::Value, op: &str) -> (u64, u64, u64) {
    let job = &report["jobs"][0][op];
    let pct = &job["clat_ns"]["percentile"];
    (
        job["total_ios"].as_u64().unwrap(),
        pct["50.000000"].as_u64().unwrap(),
        pct["99.000000"].as_u64().unwrap(),
    )
}

#[test]
fn block_latency_and_counts_agree_with_fio_and_diskstats() {
    let _serial = require_privileges();
    let disk = LoopDevice::new(64);
    let mut probes = KernelProbes::load(&Selection(vec![Group::Block])).expect("load");
    assert!(probes.group_attached(Group::Block), "{:?}", probes.status());
    let dev = make_dev(disk.major, disk.minor);
    // Its counters exist before the first request (as enlightd creates them for every disk it
    // finds), so no program has to allocate one in interrupt context.
    probes
        .prepare_disk(dev)
        .expect("create the disk's counters");
    // Let whatever udev does with a new loop device finish before the baseline.
    settle_disk(&disk.name());
    let before = probes.snapshot().unwrap();
    let misses0 = probes.recursion_misses();
    let stats0 = diskstats(&disk.name());
    let ms0 = diskstats_ms(&disk.name());

    let report = fio(&[
        "--name=enlight-kernel-test",
        &format!("--filename={}", disk.path.display()),
        "--rw=randrw",
        "--rwmixread=50",
        "--bs=4k",
        "--direct=1",
        "--ioengine=psync",
        "--iodepth=1",
        "--size=64M",
        "--runtime=3",
        "--time_based",
    ]);
    let after = probes.snapshot().unwrap();
    let misses1 = probes.recursion_misses();
    let stats1 = diskstats(&disk.name());
    let ms1 = diskstats_ms(&disk.name());
    // The ways the program loses a request: the kernel skips it when an interrupt re-enters it
    // on the same CPU (counted per program), or the request carries no start time (counted by
    // the program; never on a loop device, whose queue stamps the issue time).
    let lost = |p: &str| misses1[p] - misses0[p];
    let lost_bound = lost("enlight_blk_complete")
        + (after.health.completions_without_issue - before.health.completions_without_issue)
        + (after.health.events_lost - before.health.events_lost);
    eprintln!("recursion misses in the window: {lost_bound}");

    for (op, code, field) in [("read", 0u32, 0usize), ("write", 1, 1)] {
        let key = BlockKey { dev, op: code };
        let a = &after.disks[&key];
        let b = before.disks.get(&key);
        let ops = a.ops - b.map_or(0, |s| s.ops);
        let proc_ops = [stats1.0 - stats0.0, stats1.1 - stats0.1][field];
        let (fio_ios, fio_p50, fio_p99) = fio_op(&report, op);
        // Every completed request of the device, as the kernel counts them itself, less those
        // the kernel did not let the programs see (counted: recursion misses, completions whose
        // issue was skipped, failed map updates), less a small uncounted shortfall this kernel
        // shows: 0-7 requests in 5,000-16,000 reach /proc/diskstats but neither tracepoint
        // program (neither issue nor completion ran for them: no start time is left behind, no
        // counter moved). Allowed: 2 + 0.1%.
        let uncounted = 2 + proc_ops / 1000;
        assert!(
            ops <= proc_ops && proc_ops - ops <= lost_bound + uncounted,
            "{op}: probe ops {ops} vs /proc/diskstats {proc_ops} (counted losses {lost_bound}, health {:?} -> {:?})",
            before.health,
            after.health
        );
        // fio's own count: every I/O it issued is one request (4 KiB, no merging at depth 1).
        assert_eq!(proc_ops, fio_ios, "{op}: /proc/diskstats vs fio");
        let bytes = a.bytes - b.map_or(0, |s| s.bytes);
        assert_eq!(bytes, ops * 4096, "{op}: bytes");

        let buckets = bucket_delta(b, a);
        assert_eq!(buckets.values().sum::<u64>(), ops);
        let (p50_lo, p50_hi) = quantile(&buckets, 0.50);
        let (p99_lo, _p99_hi) = quantile(&buckets, 0.99);
        eprintln!(
            "{op}: {ops} ops; p50 probe [{p50_lo}, {p50_hi}] ns vs fio clat {fio_p50} ns; p99 probe {p99_lo} ns vs fio {fio_p99} ns"
        );
        // fio's completion latency spans the whole pread/pwrite system call; the probes time
        // the request from its issue to the driver to its completion, which is inside it, so
        // the probe's percentiles are below fio's (which it rounds to its own buckets, within
        // 2% above 1 us). How far below depends on the system call's own path and on how soon
        // fio is woken (on this busy 2-core machine: 10-100 us), so fio gives no lower bound;
        // the kernel's own time accounting does, below.
        assert!(
            p50_lo as f64 <= fio_p50 as f64 * 1.03,
            "{op}: probe p50 {p50_lo} above fio's {fio_p50}"
        );
        assert!(
            p99_lo as f64 <= fio_p99 as f64 * 1.03,
            "{op}: probe p99 {p99_lo} above fio's {fio_p99}"
        );
        // /proc/diskstats adds up, per request, completion minus allocation time (reported in
        // ms, truncated); the probes' issue-to-completion time is inside that interval, and
        // allocation to issue takes a few microseconds at depth 1 (unless the submitting
        // thread is preempted in between, which a loaded machine does: hence half, not most).
        let sum_ms = (a.latency_sum_ns - b.map_or(0, |s| s.latency_sum_ns)) as f64 / 1e6;
        let kernel_ms = [ms1.0 - ms0.0, ms1.1 - ms0.1][field] as f64;
        eprintln!("{op}: latency sum {sum_ms:.1} ms, /proc/diskstats {kernel_ms} ms");
        assert!(
            sum_ms <= kernel_ms + 1.0,
            "{op}: probe latency sum {sum_ms} ms above the kernel's {kernel_ms} ms"
        );
        assert!(
            sum_ms >= kernel_ms * 0.5 - 1.0,
            "{op}: probe latency sum {sum_ms} ms far below the kernel's {kernel_ms} ms"
        );
    }
    assert_eq!(after.health.events_lost, 0);
    // A loop device's queue has the writeback throttle (blk-stat), so every request carries
    // its issue time: no latency here is timed from allocation.
    assert_eq!(
        after.health.timed_from_allocation, before.health.timed_from_allocation,
        "{:?}",
        after.health
    );
}

#[test]
fn irq_counts_agree_with_proc_interrupts() {
    let _serial = require_privileges();
    let probes = KernelProbes::load(&Selection(vec![Group::Irq])).expect("load");
    assert!(probes.group_attached(Group::Irq), "{:?}", probes.status());
    // Disk traffic the test makes: direct I/O to a loop device lands on the disk holding its
    // backing file, whose interrupts are the ones compared. Other IRQs (the machine's own
    // network traffic, timers of other devices) carry nothing this test drives, and on a busy
    // machine they differ for reasons of their own (issue 12, item 13: a virtio-net IRQ).
    let disk = LoopDevice::new(16);
    let irqs: Vec<u32> = irqs_of_disk_under(&disk.backing)
        .into_iter()
        .filter(|irq| handlers(*irq) == 1) // a shared IRQ runs several handlers per interrupt
        .collect();
    assert!(
        !irqs.is_empty(),
        "no single-handler IRQ found for the disk under {}",
        disk.backing.display()
    );
    // Snapshots of the probes sit between two reads of /proc/interrupts each, so every IRQ's
    // probe delta is bounded by the inner and the outer /proc deltas.
    let p0 = read_all(&irqs);
    let m0 = probes.recursion_misses()["enlight_irq_entry"];
    let s0 = probes.snapshot().unwrap();
    let p0b = read_all(&irqs);
    let _ = fio(&[
        "--name=enlight-irq-test",
        &format!("--filename={}", disk.path.display()),
        "--rw=randread",
        "--bs=4k",
        "--direct=1",
        "--ioengine=psync",
        "--size=16M",
        "--runtime=1",
        "--time_based",
    ]);
    let p1 = read_all(&irqs);
    let s1 = probes.snapshot().unwrap();
    let p1b = read_all(&irqs);
    // Handlers the kernel ran while the program was already running on that CPU are skipped,
    // and counted (recursion misses). Beyond those, this kernel counts a handful of interrupts
    // in /proc/interrupts that the tracepoint never reports (measured: 0-3 of 1,500-8,500 with
    // no misses), so the lower bound allows 2 + 0.5%.
    let missed = probes.recursion_misses()["enlight_irq_entry"] - m0;
    let mut busiest = (0u32, 0u64);
    for (i, irq) in irqs.iter().enumerate() {
        let probe = s1.irqs.get(irq).copied().unwrap_or(0) - s0.irqs.get(irq).copied().unwrap_or(0);
        let (inner, outer) = (p1[i] - p0b[i], p1b[i] - p0[i]);
        assert!(
            inner <= probe + missed + 2 + inner / 200 && probe <= outer,
            "irq {irq}: probe delta {probe} outside /proc/interrupts deltas [{inner}, {outer}] (misses {missed})"
        );
        if probe > busiest.1 {
            busiest = (*irq, probe);
        }
    }
    eprintln!(
        "disk IRQs {irqs:?} checked; busiest irq {} with {} interrupts; {missed} misses",
        busiest.0, busiest.1
    );
    assert!(
        busiest.1 > 100,
        "the disk workload raised no interrupts on {irqs:?}: {busiest:?}"
    );
}

/// The IRQs of the hardware under the block device that holds `file`: from the file's device
/// number to its sysfs device, then up to the first ancestor that lists interrupts (a PCI
/// function's `msi_irqs/`, or its legacy `irq`).
fn irqs_of_disk_under(file: &std::path::Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(file).unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let mut dir =
        std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).unwrap_or_else(|e| {
            panic!(
                "{} is on device {major}:{minor}, which is no block device ({e}): the test needs \
                 its temporary files on a disk",
                file.display()
            )
        });
    while dir.starts_with("/sys/devices") {
        let msi: Vec<u32> = std::fs::read_dir(dir.join("msi_irqs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        if !msi.is_empty() {
            return msi;
        }
        if let Some(irq) = std::fs::read_to_string(dir.join("irq"))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .filter(|irq| *irq > 0)
        {
            return vec![irq];
        }
        dir.pop();
    }
    Vec::new()
}

fn read_all(irqs: &[u32]) -> Vec<u64> {
    irqs.iter().map(|i| proc_interrupts(*i)).collect()
}

fn handlers(irq: u32) -> usize {
    std::fs::read_to_string(format!("/sys/kernel/irq/{irq}/actions"))
        .map(|a| a.trim().split(',').filter(|s| !s.is_empty()).count())
        .unwrap_or(0)
}

#[test]
fn nic_packets_and_napi_polls_agree_with_interface_statistics() {
    let _serial = require_privileges();
    let pair = VethPair::new("enl-kprobe-");
    // veth polls its receive queue with NAPI (rather than the per-CPU backlog) once GRO is on,
    // for packets its peer did not mark for TSO.
    pair.ns_b
        .exec(&["ethtool", "-K", "b", "gro", "on", "tso", "off"]);
    pair.ns_a
        .exec(&["ethtool", "-K", "a", "gro", "on", "tso", "off"]);
    let probes = KernelProbes::load(&Selection(vec![Group::Net, Group::Napi])).expect("load");
    assert!(probes.group_attached(Group::Net), "{:?}", probes.status());
    assert!(probes.group_attached(Group::Napi), "{:?}", probes.status());
    let a = NicKey {
        netns: pair.ns_a.inode(),
        ifindex: pair.ns_a.ifindex("a"),
    };
    let b = NicKey {
        netns: pair.ns_b.inode(),
        ifindex: pair.ns_b.ifindex("b"),
    };
    // Resolve the neighbour first so the counted window holds the pings and little else.
    pair.ns_a.exec(&["ping", "-c", "1", "-W", "2", "10.77.0.2"]);
    let stats = || {
        [
            pair.ns_a.stat("a", "tx_packets"),
            pair.ns_b.stat("b", "rx_packets"),
            pair.ns_b.stat("b", "tx_packets"),
            pair.ns_a.stat("a", "rx_packets"),
        ]
    };
    // Each snapshot sits between two reads of the interface statistics, so each probe delta is
    // bounded by the inner and outer statistics deltas (a stray ARP packet may fall between).
    let outer0 = stats();
    let s0 = probes.snapshot().unwrap();
    let inner0 = stats();
    pair.ns_a
        .exec(&["ping", "-f", "-c", "2000", "-w", "60", "-q", "10.77.0.2"]);
    let inner1 = stats();
    let s1 = probes.snapshot().unwrap();
    let outer1 = stats();
    let delta = |k: &NicKey, f: fn(&enlight_probes::kernel::NicStats) -> u64| {
        f(&s1.nics[k]) - s0.nics.get(k).map_or(0, f)
    };
    let probe = [
        delta(&a, |s| s.tx_packets),
        delta(&b, |s| s.rx_packets),
        delta(&b, |s| s.tx_packets),
        delta(&a, |s| s.rx_packets),
    ];
    for (i, what) in ["a tx", "b rx", "b tx", "a rx"].iter().enumerate() {
        let (inner, outer) = (inner1[i] - inner0[i], outer1[i] - outer0[i]);
        eprintln!(
            "{what}: probe {} in statistics [{inner}, {outer}]",
            probe[i]
        );
        assert!(inner >= 2000, "{what}: {inner}");
        assert!(
            inner <= probe[i] && probe[i] <= outer,
            "{what}: probe {} outside the statistics' [{inner}, {outer}]",
            probe[i]
        );
    }
    let b_rx = probe[1];
    // Every received packet came through b's NAPI poll, and the polls' histogram sums up.
    let polls = delta(&b, |s| s.napi_polls);
    assert!(polls > 0);
    assert_eq!(delta(&b, |s| s.napi_work), b_rx);
    eprintln!("b: {polls} NAPI polls handled {b_rx} packets");
    let hist_polls: u64 = (0..enlight_probes::kernel::types::NAPI_SLOTS)
        .map(|i| s1.nics[&b].napi_work_hist[i] - s0.nics.get(&b).map_or(0, |s| s.napi_work_hist[i]))
        .sum();
    assert_eq!(hist_polls, polls);
}

/// The real tracefs, except that it claims `hyperv:vmbus_on_msg_dpc` exists.
struct ClaimsHyperv(Tracefs);

impl Catalog for ClaimsHyperv {
    fn exists(&self, category: &str, name: &str) -> bool {
        (category, name) == ("hyperv", "vmbus_on_msg_dpc") || self.0.exists(category, name)
    }
    fn events(&self, category: &str) -> Vec<String> {
        if category == "hyperv" {
            return vec!["vmbus_on_msg_dpc".into()];
        }
        self.0.events(category)
    }
    fn format(&self, category: &str, name: &str) -> Option<String> {
        self.0.format(category, name)
    }
    fn id(&self, category: &str, name: &str) -> Option<u32> {
        self.0.id(category, name)
    }
}

#[test]
fn absent_tracepoints_are_reported_and_never_fatal() {
    let _serial = require_privileges();
    let tracefs = Tracefs::default();
    let probes = KernelProbes::load(&Selection::default()).expect("load");
    let status = probes.status();
    // This machine is no Hyper-V guest: reported, with the reason.
    if tracefs.events("hyperv").is_empty() {
        let h = &status[HYPERV_PROBE];
        assert!(!h.attached);
        assert!(h.absent, "a tracepoint the kernel lacks is absent: {h:?}");
        assert!(h.reason.as_deref().unwrap().contains("hyperv"), "{h:?}");
    }
    // Every fixed probe whose tracepoint exists is attached; one that does not, says so.
    for (name, s) in status.iter().filter(|(n, _)| !n.starts_with("hyperv")) {
        let (cat, ev) = name.split_once(':').unwrap();
        assert_eq!(s.attached, tracefs.exists(cat, ev), "{name}: {s:?}");
        assert_eq!(s.absent, !tracefs.exists(cat, ev), "{name}: {s:?}");
        if !s.attached {
            assert!(s.reason.as_deref().unwrap().contains("does not exist"));
        }
    }
    drop(probes);

    // Claimed present but not really there: the attach is tried for real, fails, is reported,
    // and everything else still attaches.
    let probes = KernelProbes::load_with(&Selection::default(), &ClaimsHyperv(Tracefs::default()))
        .expect("a missing tracepoint is not fatal");
    let s = &probes.status()["hyperv:vmbus_on_msg_dpc"];
    assert!(!s.attached);
    assert!(
        !s.absent,
        "claimed present, failed to attach: detached, not absent"
    );
    assert!(
        s.reason.as_deref().unwrap().contains("vmbus_on_msg_dpc"),
        "{s:?}"
    );
    assert!(probes.group_attached(Group::Block));
    assert!(probes.group_attached(Group::Irq));
    probes
        .snapshot()
        .expect("snapshot works with a probe missing");
}

#[test]
fn the_generic_event_counter_counts_exactly() {
    let _serial = require_privileges();
    let mut probes = KernelProbes::load(&Selection(vec![])).expect("load");
    probes
        .attach_event_counter("task", "task_prctl_unknown")
        .expect("attach to a classic tracepoint");
    let before = probes.snapshot().unwrap();
    // task:task_prctl_unknown fires once per prctl(2) with an option the kernel does not know:
    // nothing else on the machine makes such calls (task:task_rename, say, also fires on every
    // exec of every process, and tests running alongside exec plenty).
    for _ in 0..1000 {
        // SAFETY: an unknown prctl option only returns EINVAL.
        let rc = unsafe { libc::prctl(0x656e_6c74, 0, 0, 0, 0) };
        assert_eq!(rc, -1);
    }
    let after = probes.snapshot().unwrap();
    let n = |s: &enlight_probes::kernel::KernelSnapshot| {
        s.events
            .get("task:task_prctl_unknown")
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(n(&after) - n(&before), 1000);
}
