//! The kernel collector: each interval it lists the kernel's devices from sysfs, reads the
//! kernel probes' maps, and keeps one [`DeviceState`] per device (kind `kernel`) in the same
//! [`State`] the registry devices live in, so /metrics, the JSON API and the TUI show both the
//! same way. Devices that disappear keep their final figures for the grace period.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use enlight_driver::registry::DeviceRecord;
use enlight_probes::kernel::{KernelProbes, KernelSnapshot, ProbeStatus};

use super::blockq::BlockQueues;
use super::changes::KernelChanges;
use super::discovery::{self, KernelDevice};
use super::permission::{policy, Permission};
use super::{KernelInfo, ProbeView};
use crate::model::{DeviceState, OpFigures, State};

/// Where kernel figures come from: the real probes, or a fake in unit tests.
pub trait KernelSource: Send {
    /// Cumulative counters since load.
    fn snapshot(&self) -> Result<KernelSnapshot, String>;
    /// Every probe's status.
    fn status(&self) -> Vec<ProbeView>;
    /// Program runs the kernel skipped (a program re-entered on one CPU), summed over programs.
    fn recursion_misses(&self) -> u64 {
        0
    }
    /// Creates a disk's counters ahead of its first request (kernel `dev_t`).
    fn prepare_disk(&mut self, _dev: u32) {}
    /// Each loaded program's run statistics, by program name (enlightd's self-cost).
    fn program_stats(&self) -> BTreeMap<String, crate::selfcost::ProgramReading> {
        BTreeMap::new()
    }
}

impl KernelSource for KernelProbes {
    fn snapshot(&self) -> Result<KernelSnapshot, String> {
        KernelProbes::snapshot(self).map_err(|e| e.to_string())
    }
    fn status(&self) -> Vec<ProbeView> {
        KernelProbes::status(self)
            .iter()
            .map(|(probe, s): (&String, &ProbeStatus)| ProbeView {
                probe: probe.clone(),
                attached: s.attached,
                reason: s.reason.clone(),
                state: super::ProbeState::of(s.attached, s.absent, s.reason.as_deref()),
            })
            .collect()
    }
    fn recursion_misses(&self) -> u64 {
        KernelProbes::recursion_misses(self).values().sum()
    }
    fn prepare_disk(&mut self, dev: u32) {
        if let Err(e) = KernelProbes::prepare_disk(self, dev) {
            log::warn!("{e}");
        }
    }
    fn program_stats(&self) -> BTreeMap<String, crate::selfcost::ProgramReading> {
        KernelProbes::program_stats(self)
            .into_iter()
            .map(|(name, s)| {
                (
                    name,
                    crate::selfcost::ProgramReading {
                        id: s.id,
                        run_count: s.run_cnt,
                        run_time_ns: s.run_time_ns,
                    },
                )
            })
            .collect()
    }
}

/// What the kernel collector is told by the configuration.
#[derive(Debug, Clone, Default)]
pub struct KernelOptions {
    /// Devices enlight may change (everything else: recommend only).
    pub tune: Vec<String>,
    /// Recommend only, even for the devices in `tune`.
    pub dry_run: bool,
    /// Whether queue-resetting rx rings are explored on pressure (`[kernel] ring_resets`).
    pub ring_resets: super::RingResets,
    /// Put every journalled original back when the collector stops (`None`: never).
    pub restore_on_exit_from: Option<PathBuf>,
}

/// A NIC's receive overruns: `rx_missed_errors` + `rx_fifo_errors` of its sysfs statistics
/// (frames the NIC had no rx descriptor or FIFO room for; a counter it does not have is 0).
/// `rx_dropped` is left out: the core counts there frames dropped for reasons that are no ring
/// pressure (no protocol handler, a full backlog queue).
pub fn rx_overruns(sysfs: &std::path::Path, iface: &str) -> u64 {
    ["rx_missed_errors", "rx_fifo_errors"]
        .iter()
        .filter_map(|c| {
            std::fs::read_to_string(
                sysfs
                    .join("class/net")
                    .join(iface)
                    .join("statistics")
                    .join(c),
            )
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
        })
        .sum()
}

/// The ring pressure of a kernel device, cumulative: what the tuner counts as `ring_full`
/// (writers that found a ring full, on enlight's own devices), the gate of its ring ladder.
/// A kernel NIC reports no "ring full" event, but two things show its rx ring filling:
/// - NAPI polls that used their whole budget (`napi_budget_exhausted`): more frames were
///   waiting in the ring than one poll takes, so the ring held a backlog between polls (on
///   virtio_net the host then holds back, or drops, what does not fit);
/// - receive overruns ([`rx_overruns`]): the NIC found no free descriptor and dropped.
///
/// Both are receive-side: there is no tx counterpart (a full tx ring stops the queue, which
/// no counter records), so only rx rings are explored on pressure.
pub fn ring_pressure(info: &KernelInfo) -> u64 {
    info.napi_budget_exhausted + info.rx_overruns
}

/// The collector over the real kernel probes.
pub type RealKernelCollector = KernelCollector<KernelProbes>;

/// The kernel collector `config` asks for (`None` when `[kernel] enabled` is off). Probes that
/// fail to load leave a collector that lists devices and reports why it has no figures: the
/// daemon never fails for the kernel side.
pub fn start(config: &crate::Config) -> Option<RealKernelCollector> {
    let k = &config.kernel;
    if !k.enabled {
        return None;
    }
    let probes = KernelProbes::load(&enlight_probes::kernel::Selection::default())
        .map_err(|e| e.to_string());
    if let Err(e) = &probes {
        log::warn!("kernel probes not loaded: {e}");
    }
    Some(KernelCollector::new(
        probes,
        k.sysfs.clone(),
        Duration::from_secs(config.device_grace_secs),
        KernelOptions {
            tune: k.tune.clone(),
            dry_run: k.dry_run,
            ring_resets: k.ring_resets,
            restore_on_exit_from: k.restore_on_exit.then(|| config.runtime_dir.clone()),
        },
    ))
}

impl<S: KernelSource> Drop for KernelCollector<S> {
    /// A clean stop puts every original setting back, if configured to.
    fn drop(&mut self) {
        let Some(dir) = &self.options.restore_on_exit_from else {
            return;
        };
        match KernelChanges::open(dir) {
            Ok(mut changes) if !changes.journal().entries().is_empty() => {
                let report = changes.restore();
                for (target, knob, v) in &report.restored {
                    log::info!(
                        "restored {target} {knob} = {v} (its value before enlight changed it)"
                    );
                }
                for (target, knob, why) in &report.left {
                    log::warn!("not restoring {target} {knob}: {why}");
                }
                for (target, knob, why) in &report.failed {
                    log::warn!("could not restore {target} {knob}: {why} (run `enlight restore`)");
                }
            }
            Ok(_) => {}
            Err(e) => log::warn!("kernel settings journal: {e}"),
        }
    }
}

/// IRQ number → the names of its handlers (`/sys/kernel/irq/<n>/actions`).
fn irq_actions(sysfs: &Path) -> BTreeMap<u32, Vec<String>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(sysfs.join("kernel/irq"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(irq) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let actions = std::fs::read_to_string(e.path().join("actions")).unwrap_or_default();
        let names: Vec<String> = actions
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if !names.is_empty() {
            out.insert(irq, names);
        }
    }
    out
}

/// The IRQs serving a device: handlers named after the device (`eth0`, `eth0-rx-0`) or after
/// the bus device it sits on (`virtio2-input.0` for the NIC on `virtio2`), config-change
/// interrupts excluded.
pub fn irqs_of(device_names: &[String], actions: &BTreeMap<u32, Vec<String>>) -> Vec<u32> {
    actions
        .iter()
        .filter(|(_, names)| {
            names.iter().any(|a| {
                !a.ends_with("-config")
                    && device_names.iter().any(|d| {
                        a == d || a.starts_with(&format!("{d}-")) || a.starts_with(&format!("{d}:"))
                    })
            })
        })
        .map(|(irq, _)| *irq)
        .collect()
}

/// Names a device's interrupts may carry: its own, and its bus device's (`virtio2`).
fn device_names(sysfs: &Path, d: &KernelDevice) -> Vec<String> {
    let link = if d.device == "disk" {
        sysfs.join("block").join(&d.name).join("device")
    } else {
        sysfs.join("class/net").join(&d.name).join("device")
    };
    let mut names = vec![d.name.clone()];
    if let Ok(target) = std::fs::canonicalize(link) {
        if let Some(base) = target.file_name().and_then(|n| n.to_str()) {
            names.push(base.to_string());
        }
    }
    names
}

/// The kernel collector.
pub struct KernelCollector<S: KernelSource> {
    source: Option<S>,
    load_error: Option<String>,
    sysfs: PathBuf,
    netns: u32,
    grace: Duration,
    options: KernelOptions,
    gone: BTreeMap<String, Instant>,
    last_tick: Option<Instant>,
    last_napi: BTreeMap<String, (u64, u64)>,
    /// Disks whose counters exist (`KernelSource::prepare_disk`).
    prepared: BTreeSet<u32>,
}

/// Our own network namespace's inode, what the NIC probes key interfaces by.
pub fn own_netns() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino() as u32)
        .unwrap_or(0)
}

impl<S: KernelSource> KernelCollector<S> {
    /// A collector over `source` (`Err`: the probes did not load; devices are still listed,
    /// with no figures, and the reason is reported).
    pub fn new(
        source: Result<S, String>,
        sysfs: PathBuf,
        grace: Duration,
        options: KernelOptions,
    ) -> Self {
        let (source, load_error) = match source {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e)),
        };
        KernelCollector {
            source,
            load_error,
            sysfs,
            netns: own_netns(),
            grace,
            options,
            gone: BTreeMap::new(),
            last_tick: None,
            last_napi: BTreeMap::new(),
            prepared: BTreeSet::new(),
        }
    }

    /// One interval's work.
    pub fn tick(&mut self, state: &mut State) {
        let started = Instant::now();
        let dt = self
            .last_tick
            .map(|t| started.duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        self.last_tick = Some(started);
        let peak_window = state.peak_window;
        let Some((snap, block_ok, net_ok)) = self.read_probes(state, dt) else {
            return;
        };

        let devices = discovery::discover(&self.sysfs);
        if let Some(source) = self.source.as_mut() {
            for dev in devices.iter().filter_map(|d| d.dev) {
                if self.prepared.insert(dev) {
                    source.prepare_disk(dev);
                }
            }
        }
        let actions = irq_actions(&self.sysfs);
        let queues = BlockQueues::at(&self.sysfs);
        let mut seen = BTreeSet::new();
        for d in &devices {
            // A registry device of the same name keeps it.
            if state
                .devices
                .get(&d.name)
                .is_some_and(|s| s.kernel.is_none())
            {
                continue;
            }
            seen.insert(d.name.clone());
            self.gone.remove(&d.name);
            let dev = state
                .devices
                .entry(d.name.clone())
                .or_insert_with(|| new_kernel_device(d));
            dev.present = true;
            dev.attached = if d.device == "disk" { block_ok } else { net_ok };
            let irqs = irqs_of(&device_names(&self.sysfs, d), &actions);
            let interrupts: u64 = irqs
                .iter()
                .map(|i| snap.irqs.get(i).copied().unwrap_or(0))
                .sum();
            if dt > 0.0 {
                dev.interrupts_per_sec =
                    interrupts.saturating_sub(dev.events.interrupts) as f64 / dt;
            }
            dev.events.interrupts = interrupts;
            let (fresh, napi) = fresh_figures(&snap, d, self.netns);
            let (mut all_rate, mut all_bucket) = (0.0, None);
            for (op, mut f) in fresh {
                if let (Some(prev), true) = (dev.ops.get(&op), dt > 0.0) {
                    f.ops_per_sec = f.ops.saturating_sub(prev.ops) as f64 / dt;
                    f.bytes_per_sec = f.bytes.saturating_sub(prev.bytes) as f64 / dt;
                }
                if dt > 0.0 {
                    // Microbursts, as for registry devices (crate::peaks).
                    let grown = crate::peaks::highest_grown_bucket(
                        dev.ops.get(&op).map(|p| &p.buckets),
                        &f.buckets,
                    );
                    dev.peaks.entry(op).or_default().push(
                        started,
                        f.ops_per_sec,
                        grown,
                        peak_window,
                    );
                    all_rate += f.ops_per_sec;
                    all_bucket = all_bucket.max(grown);
                }
                dev.ops.insert(op, f);
            }
            if dt > 0.0 && !dev.ops.is_empty() {
                dev.peaks.entry(crate::model::ALL_OPS).or_default().push(
                    started,
                    all_rate,
                    all_bucket,
                    peak_window,
                );
            }
            let (prev_polls, prev_work) = self
                .last_napi
                .insert(d.name.clone(), (napi.0, napi.1))
                .unwrap_or((0, 0));
            let info = dev.kernel.as_mut().expect("kernel device");
            info.driver = d.driver.clone();
            info.class = d.class;
            info.queues = d.queues;
            info.irqs = irqs;
            info.napi_polls = napi.0;
            info.napi_packets = napi.1;
            info.napi_budget_exhausted = napi.2;
            let polls = napi.0.saturating_sub(prev_polls);
            info.napi_batch_mean = if polls > 0 {
                napi.1.saturating_sub(prev_work) as f64 / polls as f64
            } else {
                0.0
            };
            self.read_knobs(d, dev, &queues);
            let info = dev.kernel.as_mut().expect("kernel device");
            info.tuning = match policy(&self.options.tune, self.options.dry_run, &d.name) {
                Permission::Apply => "apply".into(),
                Permission::RecommendOnly(why) => format!("recommend: {why}"),
            };
        }
        self.forget_vanished(state, &seen, started);
    }

    /// The probes' status and counters into `state.kernel`, and the snapshot the devices' figures
    /// come from, with whether the block and net probes are attached. `None`: the maps could not
    /// be read (the last figures stay, and the error is recorded).
    fn read_probes(&mut self, state: &mut State, dt: f64) -> Option<(KernelSnapshot, bool, bool)> {
        state.kernel.probes_loaded = Some(self.source.is_some());
        state.kernel.load_error = self.load_error.clone();
        let snap = match &self.source {
            Some(s) => {
                state.kernel.probes = s.status();
                crate::selfcost::update_programs(&mut state.self_cost, &s.program_stats(), dt);
                match s.snapshot() {
                    Ok(snap) => snap,
                    Err(e) => {
                        // Keep the last figures: a snapshot of zeros would make every kernel
                        // counter on /metrics go backwards until the next good read.
                        let message = format!("reading the kernel maps: {e}");
                        state.kernel.load_error = Some(message.clone());
                        state.error("snapshot", message);
                        return None;
                    }
                }
            }
            None => Default::default(),
        };
        state.kernel.kvm_exits = snap.kvm_exits();
        state.kernel.kvm_pio = snap.kvm_event_counts(enlight_probes::kernel::types::KVM_PIO);
        state.kernel.kvm_mmio = snap.kvm_event_counts(enlight_probes::kernel::types::KVM_MMIO);
        state.kernel.events = snap.events.clone();
        state.kernel.events_lost = snap.health.events_lost;
        state.kernel.completions_without_issue = snap.health.completions_without_issue;
        state.kernel.recursion_misses = self.source.as_ref().map_or(0, |s| s.recursion_misses());
        let attached = |prefix: &str| {
            state
                .kernel
                .probes
                .iter()
                .filter(|p| p.probe.starts_with(prefix))
                .all(|p| p.attached)
                && self.source.is_some()
        };
        let (block_ok, net_ok) = (attached("block:"), attached("net:"));
        Some((snap, block_ok, net_ok))
    }

    /// Device `d`'s knobs as read now (a disk's block queue, a NIC's ethtool and NAPI
    /// settings), into `dev` and its kernel info.
    fn read_knobs(&self, d: &KernelDevice, dev: &mut DeviceState, queues: &BlockQueues) {
        let info = dev.kernel.as_mut().expect("kernel device");
        if d.device == "disk" {
            let settings = queues.settings(&d.name);
            info.block_queue = settings
                .iter()
                .map(|q| (q.name.to_string(), q.value))
                .collect();
            dev.knobs = super::knobs::disk(
                &settings,
                queues
                    .scheduler(&d.name)
                    .ok()
                    .filter(|_| queues.scheduler_writable(&d.name))
                    .as_ref(),
            );
        } else {
            info.nic = super::changes::nic_settings(&d.name, None).ok();
            let fixed = super::ethtool::coalescing_fixed(
                &d.driver,
                super::ethtool::virtio_features(&self.sysfs, &d.name).as_deref(),
            );
            dev.knobs = super::knobs::nic(
                &d.driver,
                info.nic
                    .as_ref()
                    .map(|n| super::knobs::changeable(n, fixed))
                    .as_ref(),
                &super::napi::NapiSysfs::at(&self.sysfs).all(&d.name),
            );
            super::knobs::explore_ring_resets(&d.driver, &mut dev.knobs, self.options.ring_resets);
            info.rx_overruns = rx_overruns(&self.sysfs, &d.name);
            dev.knobs.extend(super::knobs::napi_instances(
                &super::backend::napi_instances(&d.name, None),
            ));
        }
    }

    /// Kernel devices no longer discovered: kept (not present) for the grace period, then
    /// dropped.
    fn forget_vanished(&mut self, state: &mut State, seen: &BTreeSet<String>, started: Instant) {
        for (name, dev) in state.devices.iter_mut() {
            if dev.kernel.is_some() && !seen.contains(name) && dev.present {
                log::info!("kernel device {name} gone");
                dev.present = false;
                dev.attached = false;
                dev.interrupts_per_sec = 0.0;
                for f in dev.ops.values_mut() {
                    f.ops_per_sec = 0.0;
                    f.bytes_per_sec = 0.0;
                }
                self.gone.insert(name.clone(), started);
            }
        }
        let grace = self.grace;
        let expired: Vec<String> = self
            .gone
            .iter()
            .filter(|(_, t)| started.duration_since(**t) >= grace)
            .map(|(n, _)| n.clone())
            .collect();
        for name in expired {
            self.gone.remove(&name);
            self.last_napi.remove(&name);
            if state.devices.get(&name).is_some_and(|d| d.kernel.is_some()) {
                state.devices.remove(&name);
            }
        }
    }
}

/// The state of a kernel device seen for the first time (logged).
fn new_kernel_device(d: &KernelDevice) -> DeviceState {
    log::info!(
        "kernel device {} found: {} driver {} ({}, {} queue(s))",
        d.name,
        d.device,
        d.driver,
        d.class.name(),
        d.queues
    );
    let mut s = DeviceState::new(DeviceRecord {
        name: d.name.clone(),
        device: d.device.clone(),
        kind: enlight_abi::DeviceKind::Kernel,
        dev_id: d.dev.or(d.ifindex).unwrap_or(0),
        pid: 0,
        pid_start_time: None,
        exe: PathBuf::new(),
        started_unix_ms: 0,
        settings: Default::default(),
        control: None,
    });
    s.kernel = Some(KernelInfo {
        driver: d.driver.clone(),
        class: d.class,
        queues: d.queues,
        irqs: Vec::new(),
        napi_polls: 0,
        napi_packets: 0,
        napi_budget_exhausted: 0,
        napi_batch_mean: 0.0,
        rx_overruns: 0,
        nic: None,
        block_queue: BTreeMap::new(),
        tuning: String::new(),
    });
    s
}

/// Device `d`'s cumulative figures in `snap`, by op (a disk's block ops; a NIC's tx and rx),
/// and its NAPI counters (polls, packets, polls that used their whole budget).
fn fresh_figures(
    snap: &KernelSnapshot,
    d: &KernelDevice,
    netns: u32,
) -> (BTreeMap<u32, OpFigures>, (u64, u64, u64)) {
    let mut fresh: BTreeMap<u32, OpFigures> = BTreeMap::new();
    let mut napi = (0u64, 0u64, 0u64);
    if let Some(devt) = d.dev {
        for (k, s) in snap.disks.range(
            enlight_probes::kernel::BlockKey { dev: devt, op: 0 }
                ..=enlight_probes::kernel::BlockKey {
                    dev: devt,
                    op: u32::MAX,
                },
        ) {
            fresh.insert(
                k.op,
                OpFigures {
                    ops: s.ops,
                    bytes: s.bytes,
                    errors: s.errors,
                    latency_sum_ns: s.latency_sum_ns,
                    buckets: s.buckets.iter().copied().collect(),
                    ..Default::default()
                },
            );
        }
    }
    if let Some(ifindex) = d.ifindex {
        if let Some(n) = snap
            .nics
            .get(&enlight_probes::kernel::NicKey { netns, ifindex })
        {
            fresh.insert(
                enlight_abi::op::OP_TX as u32,
                OpFigures {
                    ops: n.tx_packets,
                    bytes: n.tx_bytes,
                    errors: n.tx_errors,
                    ..Default::default()
                },
            );
            fresh.insert(
                enlight_abi::op::OP_RX as u32,
                OpFigures {
                    ops: n.rx_packets,
                    bytes: n.rx_bytes,
                    ..Default::default()
                },
            );
            napi = (n.napi_polls, n.napi_work, n.napi_budget_exhausted);
        }
    }
    (fresh, napi)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use enlight_probes::kernel::{make_dev, BlockKey};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub(crate) struct FakeKernel {
        pub snap: Arc<Mutex<KernelSnapshot>>,
        /// When set, reading the maps fails with this message.
        pub fail: Arc<Mutex<Option<String>>>,
    }

    impl KernelSource for FakeKernel {
        fn snapshot(&self) -> Result<KernelSnapshot, String> {
            match self.fail.lock().unwrap().clone() {
                Some(e) => Err(e),
                None => Ok(self.snap.lock().unwrap().clone()),
            }
        }
        fn status(&self) -> Vec<ProbeView> {
            vec![
                ProbeView {
                    probe: "block:block_rq_complete".into(),
                    attached: true,
                    reason: None,
                    state: crate::kernel::ProbeState::Attached,
                },
                ProbeView {
                    probe: "hyperv:vmbus_*".into(),
                    attached: false,
                    reason: Some("no hyperv tracepoints".into()),
                    state: crate::kernel::ProbeState::Absent,
                },
            ]
        }
    }

    /// A fake sysfs with one loop disk (7:3) and its IRQ-less queue.
    pub(crate) fn fake_sysfs(root: &Path, disk: &str) {
        let q = root.join("block").join(disk).join("queue");
        std::fs::create_dir_all(&q).unwrap();
        std::fs::write(root.join("block").join(disk).join("size"), "2048\n").unwrap();
        std::fs::write(root.join("block").join(disk).join("dev"), "7:3\n").unwrap();
        std::fs::write(q.join("read_ahead_kb"), "128\n").unwrap();
    }

    /// A NIC's ring pressure: budget-exhausted polls plus receive overruns from its sysfs
    /// statistics (`rx_dropped` not counted; a counter the driver lacks is 0).
    #[test]
    fn ring_pressure_is_budget_exhausted_polls_plus_receive_overruns() {
        let dir = tempfile::tempdir().unwrap();
        let stats = dir.path().join("class/net/eth1/statistics");
        std::fs::create_dir_all(&stats).unwrap();
        for (c, v) in [
            ("rx_missed_errors", "7\n"),
            ("rx_fifo_errors", "3\n"),
            ("rx_dropped", "1000\n"),
        ] {
            std::fs::write(stats.join(c), v).unwrap();
        }
        assert_eq!(rx_overruns(dir.path(), "eth1"), 10);
        assert_eq!(rx_overruns(dir.path(), "eth9"), 0, "no such NIC");
        std::fs::remove_file(stats.join("rx_fifo_errors")).unwrap();
        assert_eq!(rx_overruns(dir.path(), "eth1"), 7);
        let info = KernelInfo {
            driver: "virtio_net".into(),
            class: crate::kernel::DriverClass::Paravirtual,
            queues: 1,
            irqs: Vec::new(),
            napi_polls: 500,
            napi_packets: 20_000,
            napi_budget_exhausted: 40,
            napi_batch_mean: 0.0,
            rx_overruns: 7,
            nic: None,
            block_queue: BTreeMap::new(),
            tuning: String::new(),
        };
        assert_eq!(ring_pressure(&info), 47);
    }

    #[test]
    fn kernel_devices_appear_with_figures_and_vanish_after_grace() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(dir.path(), "loop3");
        let fake = FakeKernel::default();
        let dev = make_dev(7, 3);
        fake.snap.lock().unwrap().disks.insert(
            BlockKey { dev, op: 0 },
            crate::collector::tests::io(100, &[(50_000, 100)]),
        );
        let mut c = KernelCollector::new(
            Ok(fake.clone()),
            dir.path().into(),
            Duration::ZERO,
            KernelOptions {
                tune: vec!["loop3".into()],
                dry_run: false,
                ring_resets: Default::default(),
                restore_on_exit_from: None,
            },
        );
        let mut state = State::default();
        c.tick(&mut state);
        let d = &state.devices["loop3"];
        assert_eq!(d.record.kind, "kernel");
        assert_eq!(d.record.device, "disk");
        assert!(d.present && d.attached);
        assert_eq!(d.ops[&0].ops, 100);
        let info = d.kernel.as_ref().unwrap();
        assert_eq!(info.driver, "loop");
        assert_eq!(info.block_queue["read_ahead_kb"], 128);
        assert_eq!(info.tuning, "apply");
        // The tuner's objective for the disk comes from these same block-probe figures (ops
        // and latency buckets), as for a NIC from its packet figures; its knobs from sysfs.
        let sample = crate::tuner::shell::samples(&state)
            .into_iter()
            .find(|s| s.record.name == "loop3")
            .expect("a kernel disk is a tuner sample");
        assert_eq!(sample.cumulative.ops, 100);
        assert_eq!(sample.cumulative.buckets.values().sum::<u64>(), 100);
        let ra = d.knobs.iter().find(|k| k.name == "read_ahead_kb").unwrap();
        assert_eq!(
            (ra.value, ra.tuner_kind.clone()),
            (128, Some(crate::knobs::TunerKind::ReadAhead))
        );
        assert_eq!(state.kernel.probes.len(), 2);
        assert_eq!(state.kernel.probes_loaded, Some(true));

        // The disk goes away: not present at once, dropped after the (zero) grace.
        std::fs::remove_dir_all(dir.path().join("block/loop3")).unwrap();
        c.tick(&mut state);
        assert!(!state.devices.contains_key("loop3"));
    }

    #[test]
    fn a_failed_map_read_keeps_the_last_figures_and_counts_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(dir.path(), "loop3");
        let fake = FakeKernel::default();
        fake.snap.lock().unwrap().disks.insert(
            BlockKey {
                dev: make_dev(7, 3),
                op: 0,
            },
            crate::collector::tests::io(100, &[(50_000, 100)]),
        );
        let pio = enlight_probes::kernel::KvmKey {
            pid: 42,
            tid: 42,
            event: enlight_probes::kernel::types::KVM_PIO,
            isa: 0,
            reason: 1,
        };
        fake.snap.lock().unwrap().kvm.insert(pio, 7);
        fake.snap.lock().unwrap().health.events_lost = 3;
        let mut c = KernelCollector::new(
            Ok(fake.clone()),
            dir.path().into(),
            Duration::from_secs(30),
            KernelOptions::default(),
        );
        let mut state = State::default();
        c.tick(&mut state);
        assert_eq!(state.devices["loop3"].ops[&0].ops, 100);
        assert_eq!(state.kernel.kvm_pio[&42], 7);
        *fake.fail.lock().unwrap() = Some("EIO".into());
        c.tick(&mut state);
        // No counter goes back to 0 for an interval; the failure is counted and said.
        assert_eq!(state.devices["loop3"].ops[&0].ops, 100);
        assert_eq!(state.kernel.kvm_pio.get(&42), Some(&7));
        assert_eq!(state.kernel.events_lost, 3);
        assert_eq!(state.errors.get("snapshot"), Some(&1));
        assert!(state.kernel.load_error.as_deref().unwrap().contains("EIO"));
        *fake.fail.lock().unwrap() = None;
        c.tick(&mut state);
        assert_eq!(state.devices["loop3"].ops[&0].ops, 100);
        assert_eq!(state.kernel.kvm_pio[&42], 7);
    }

    #[test]
    fn probes_that_did_not_load_leave_devices_listed_without_figures() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(dir.path(), "loop3");
        let mut c = KernelCollector::<FakeKernel>::new(
            Err("no BTF".into()),
            dir.path().into(),
            Duration::from_secs(30),
            KernelOptions::default(),
        );
        let mut state = State::default();
        c.tick(&mut state);
        let d = &state.devices["loop3"];
        assert!(d.present && !d.attached);
        assert!(d.kernel.as_ref().unwrap().tuning.starts_with("recommend"));
        assert_eq!(state.kernel.load_error.as_deref(), Some("no BTF"));
    }

    #[test]
    fn irqs_map_to_devices_by_handler_name() {
        let mut actions = BTreeMap::new();
        actions.insert(36, vec!["virtio1-req.0".to_string()]);
        actions.insert(35, vec!["virtio1-config".to_string()]);
        actions.insert(38, vec!["virtio2-input.0".to_string()]);
        actions.insert(39, vec!["virtio2-output.0".to_string()]);
        actions.insert(50, vec!["eth1-rx-0".to_string()]);
        actions.insert(51, vec!["eth10".to_string()]);
        assert_eq!(irqs_of(&["vda".into(), "virtio1".into()], &actions), [36]);
        assert_eq!(
            irqs_of(&["eth0".into(), "virtio2".into()], &actions),
            [38, 39]
        );
        assert_eq!(irqs_of(&["eth1".into()], &actions), [50]);
    }
}
