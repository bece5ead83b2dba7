//! The collector: each interval it lists the device registry, attaches the probes to new device
//! processes, reads the maps, and turns the kernel's cumulative counters and latency buckets into
//! per-device state (HDR histograms, rates). Devices that vanish keep their final figures for a
//! grace period, then are dropped.
//!
//! Order within a tick matters: the maps are read *before* vanished processes are detached
//! (detaching deletes their entries), so a device's last completions are always counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use enlight_driver::registry;
use enlight_probes::{AttachReport, Snapshot};

use crate::model::{DeviceState, OpFigures, State, ALL_OPS};

/// Where the collector gets its data: the real probes, or a fake in unit tests.
pub trait ProbeSource: Send {
    /// Attaches to every site of process `pid`.
    fn attach(&mut self, pid: u32, exe: &Path) -> Result<AttachReport, String>;
    /// Detaches from `pid` and forgets its counters.
    fn detach(&mut self, pid: u32);
    /// Cumulative counters of every attached process.
    fn snapshot(&self) -> Result<Snapshot, String>;
    /// Each program's run statistics, by program name (enlightd's self-cost).
    fn program_stats(&self) -> BTreeMap<String, crate::selfcost::ProgramReading> {
        BTreeMap::new()
    }
}

impl ProbeSource for enlight_probes::Probes {
    fn attach(&mut self, pid: u32, exe: &Path) -> Result<AttachReport, String> {
        self.attach_process(pid, exe).map_err(|e| e.to_string())
    }
    fn detach(&mut self, pid: u32) {
        self.detach_process(pid)
    }
    fn snapshot(&self) -> Result<Snapshot, String> {
        enlight_probes::Probes::snapshot(self).map_err(|e| e.to_string())
    }
    fn program_stats(&self) -> BTreeMap<String, crate::selfcost::ProgramReading> {
        let Ok(stats) = self.program_run_stats() else {
            return BTreeMap::new();
        };
        enlight_probes::PROGRAMS
            .iter()
            .filter_map(|(probe, program)| {
                let s = stats.get(probe)?;
                Some((
                    program.to_string(),
                    crate::selfcost::ProgramReading {
                        id: s.id,
                        run_count: s.run_count,
                        run_time_ns: s.run_time_ns,
                    },
                ))
            })
            .collect()
    }
}

/// A registry device's knobs: those of its control socket (asked for its limits once per
/// process; the values are the ones the device writes into its record on every change), none
/// without a control socket (an emulated device) or while the socket does not answer.
fn registry_knobs(dev: &mut DeviceState) -> Vec<crate::knobs::Knob> {
    let Some(path) = dev.record.control.as_ref() else {
        return Vec::new();
    };
    if dev.control_limits.is_none() {
        match enlight_driver::control::ControlClient::connect(path).and_then(|mut c| c.get()) {
            Ok((_, limits, _)) => dev.control_limits = Some(limits),
            Err(e) => {
                log::debug!("{}: control socket: {e}", dev.record.name);
                return Vec::new();
            }
        }
    }
    dev.control_limits
        .as_ref()
        .map(|l| crate::knobs::synthetic(&dev.record.settings, l))
        .unwrap_or_default()
}

/// The collector: owns the probe source, updates a [`State`].
pub struct Collector<P: ProbeSource> {
    probes: P,
    runtime_dir: PathBuf,
    grace: Duration,
    attached_pids: BTreeSet<u32>,
    last_tick: Option<Instant>,
    peak_window: Duration,
}

impl<P: ProbeSource> Collector<P> {
    /// A collector reading `runtime_dir`, keeping vanished devices for `grace`.
    pub fn new(probes: P, runtime_dir: PathBuf, grace: Duration) -> Self {
        Collector {
            probes,
            runtime_dir,
            grace,
            attached_pids: BTreeSet::new(),
            last_tick: None,
            peak_window: Duration::from_secs(crate::config::DEFAULT_PEAK_WINDOW_SECS),
        }
    }

    /// Keeps each interval's rate and highest latency bucket for `window` (the peak gauges).
    pub fn with_peak_window(mut self, window: Duration) -> Self {
        self.peak_window = window;
        self
    }

    /// One interval's work.
    pub fn tick(&mut self, state: &mut State) {
        let started = Instant::now();
        let dt = self
            .last_tick
            .map(|t| started.duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        self.last_tick = Some(started);
        state.peak_window = self.peak_window;
        state.interval = Duration::from_secs_f64(dt);

        self.scan_registry(state, started);
        self.attach_new(state);
        // Before any detach, so vanished processes' last counts are kept.
        self.read_maps(state, dt, started);
        self.detach_unused(state, started);
        state.ticks += 1;
        state.last_tick = started.elapsed();
        state.end_interval();
    }

    /// The registry: new devices, new instances of known ones, vanished ones. Records whose
    /// process is gone (killed devices leave theirs, and a pid may since belong to another
    /// process) are removed with their control sockets: they are no device.
    fn scan_registry(&self, state: &mut State, started: Instant) {
        let registry::Scan {
            live: records,
            stale,
            errors,
        } = registry::scan(&self.runtime_dir);
        for e in errors {
            state.error("registry", e.to_string());
        }
        for r in stale {
            match registry::remove_stale(&self.runtime_dir, &r) {
                Ok(true) => log::info!(
                    "removed the registry record of device {} (pid {}): its process is gone",
                    r.name,
                    r.pid
                ),
                Ok(false) => {}
                Err(e) => state.error("registry", format!("removing a stale record: {e}")),
            }
        }
        let live: BTreeSet<String> = records.iter().map(|r| r.name.clone()).collect();
        for record in records {
            if !state.devices.contains_key(&record.name) {
                log::info!(
                    "device {} found: {} {}, pid {}",
                    record.name,
                    record.kind,
                    record.device,
                    record.pid
                );
            }
            let entry = state.devices.entry(record.name.clone());
            let dev = entry.or_insert_with(|| DeviceState::new(record.clone()));
            if (dev.record.pid, dev.record.pid_start_time) != (record.pid, record.pid_start_time) {
                log::info!(
                    "device {} found again in a new process: pid {} (was {}); its counters carry on",
                    record.name,
                    record.pid,
                    dev.record.pid
                );
                // A new process serves this device: carry the old totals forward.
                for (op, f) in &dev.ops {
                    let mut f = f.clone();
                    f.ops_per_sec = 0.0;
                    f.bytes_per_sec = 0.0;
                    dev.base_ops.insert(*op, f);
                }
                dev.base_events = dev.events;
                dev.base_traps = dev.traps;
                dev.base_settings_changes = dev.settings_changes.clone();
                dev.attached = false;
                dev.attach_error = None;
                dev.control_limits = None;
            }
            // Re-read every tick: a device rewrites its record when its settings change, so the
            // settings gauges and the API follow it live.
            dev.record = record;
            dev.knobs = registry_knobs(dev);
            dev.present = true;
            dev.gone_since = None;
        }
        for (name, dev) in state.devices.iter_mut() {
            if !live.contains(name) && dev.present && dev.kernel.is_none() {
                dev.present = false;
                dev.gone_since = Some(started);
                log::info!(
                    "device {name} gone (pid {}): {} ops counted; its figures stay for {} s",
                    dev.record.pid,
                    dev.ops.values().map(|f| f.ops).sum::<u64>(),
                    self.grace.as_secs()
                );
            }
        }
    }

    /// Attaches the probes to processes not attached to yet.
    fn attach_new(&mut self, state: &mut State) {
        let mut to_attach: BTreeMap<u32, PathBuf> = BTreeMap::new();
        for dev in state.devices.values() {
            if dev.present && dev.kernel.is_none() && !self.attached_pids.contains(&dev.record.pid)
            {
                to_attach.insert(dev.record.pid, dev.record.exe.clone());
            }
        }
        for (pid, exe) in to_attach {
            let result = self.probes.attach(pid, &exe);
            if result.is_ok() {
                self.attached_pids.insert(pid);
            }
            let mut failed = None;
            for dev in state
                .devices
                .values_mut()
                .filter(|d| d.present && d.record.pid == pid)
            {
                match &result {
                    Ok(report) => {
                        dev.attached = true;
                        dev.sites_by_probe = report.sites_by_probe.clone();
                        dev.attach_error = None;
                        let probes: Vec<String> = report
                            .sites_by_probe
                            .iter()
                            .map(|(p, n)| format!("{p} ({n})"))
                            .collect();
                        let missing = if report.missing.is_empty() {
                            String::new()
                        } else {
                            format!("; no site for {}", report.missing.join(", "))
                        };
                        log::info!(
                            "probes attached to {} (pid {pid}): {}{missing}",
                            dev.record.name,
                            probes.join(", ")
                        );
                    }
                    Err(e) => {
                        dev.attached = false;
                        dev.attach_error = Some(e.clone());
                        failed = Some(format!("{} (pid {pid}): {e}", dev.record.name));
                    }
                }
            }
            if let Some(message) = failed {
                state.error("attach", message);
            }
        }
    }

    /// Reads the maps, and what the programs and this process cost.
    fn read_maps(&mut self, state: &mut State, dt: f64, started: Instant) {
        if !self.attached_pids.is_empty() {
            state.read_at = Some(Instant::now());
            match self.probes.snapshot() {
                Ok(snap) => apply_snapshot(state, &snap, dt, started, self.peak_window),
                Err(e) => state.error("snapshot", e),
            }
        }
        // What the programs and this process cost.
        crate::selfcost::update_programs(&mut state.self_cost, &self.probes.program_stats(), dt);
        if let Some((cpu, rss)) = crate::selfcost::read_process() {
            crate::selfcost::update_process(&mut state.self_cost, cpu, rss, dt);
        }
    }

    /// Detaches processes no present device uses; drops devices past their grace period.
    fn detach_unused(&mut self, state: &mut State, started: Instant) {
        let in_use: BTreeSet<u32> = state
            .devices
            .values()
            .filter(|d| d.present)
            .map(|d| d.record.pid)
            .collect();
        let gone: Vec<u32> = self.attached_pids.difference(&in_use).copied().collect();
        for pid in gone {
            self.probes.detach(pid);
            self.attached_pids.remove(&pid);
            for dev in state
                .devices
                .values_mut()
                .filter(|d| d.record.pid == pid && !d.present)
            {
                dev.attached = false;
                dev.interrupts_per_sec = 0.0;
                for f in dev.ops.values_mut() {
                    f.ops_per_sec = 0.0;
                    f.bytes_per_sec = 0.0;
                }
            }
        }
        let grace = self.grace;
        state.devices.retain(|_, d| {
            d.gone_since
                .is_none_or(|t| started.duration_since(t) < grace)
        });
    }
}

fn apply_snapshot(state: &mut State, snap: &Snapshot, dt: f64, at: Instant, window: Duration) {
    state.health = snap.health;
    for dev in state.devices.values_mut() {
        if !dev.attached || dev.kernel.is_some() {
            continue;
        }
        let (pid, id) = (dev.record.pid, dev.record.dev_id);
        let mut fresh: BTreeMap<u32, OpFigures> = BTreeMap::new();
        for (key, stats) in snap.io.range(
            enlight_probes::IoKey {
                pid,
                dev: id,
                op: 0,
            }..=enlight_probes::IoKey {
                pid,
                dev: id,
                op: u32::MAX,
            },
        ) {
            let f = fresh.entry(key.op).or_default();
            f.ops = stats.ops;
            f.bytes = stats.bytes;
            f.errors = stats.errors;
            f.latency_sum_ns = stats.latency_sum_ns;
            f.buckets = stats.buckets.iter().copied().collect();
        }
        let ops: BTreeSet<u32> = fresh.keys().chain(dev.base_ops.keys()).copied().collect();
        let (mut all_rate, mut all_bucket) = (0.0, None);
        for op in ops {
            let mut total = dev.base_ops.get(&op).cloned().unwrap_or_default();
            if let Some(f) = fresh.get(&op) {
                total.add(f);
            }
            // An op seen for the first time counted from zero since the last read: its first
            // interval has a rate too (it used to read 0 while the workload did 50k IOPS).
            let (prev_ops, prev_bytes) = dev.ops.get(&op).map_or((0, 0), |p| (p.ops, p.bytes));
            if dt > 0.0 {
                total.ops_per_sec = total.ops.saturating_sub(prev_ops) as f64 / dt;
                total.bytes_per_sec = total.bytes.saturating_sub(prev_bytes) as f64 / dt;
                let grown = crate::peaks::highest_grown_bucket(
                    dev.ops.get(&op).map(|p| &p.buckets),
                    &total.buckets,
                );
                dev.peaks
                    .entry(op)
                    .or_default()
                    .push(at, total.ops_per_sec, grown, window);
                all_rate += total.ops_per_sec;
                all_bucket = all_bucket.max(grown);
            }
            dev.ops.insert(op, total);
        }
        if dt > 0.0 && !dev.ops.is_empty() {
            dev.peaks
                .entry(ALL_OPS)
                .or_default()
                .push(at, all_rate, all_bucket, window);
        }
        let mut events = dev.base_events;
        if let Some(e) = snap.events.get(&enlight_probes::DevKey { pid, dev: id }) {
            events += e;
        }
        if dt > 0.0 {
            dev.interrupts_per_sec =
                events.interrupts.saturating_sub(dev.events.interrupts) as f64 / dt;
        }
        dev.events = events;
        dev.traps = dev.base_traps
            + snap
                .traps
                .get(&enlight_probes::DevKey { pid, dev: id })
                .copied()
                .unwrap_or(0);
        let mut changes = dev.base_settings_changes.clone();
        for (key, n) in snap.settings_changes.range(
            enlight_probes::KnobKey {
                pid,
                dev: id,
                knob: 0,
            }..=enlight_probes::KnobKey {
                pid,
                dev: id,
                knob: u32::MAX,
            },
        ) {
            *changes.entry(key.knob).or_default() += n;
        }
        dev.settings_changes = changes;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::bucket_quantiles_ns;
    use enlight_driver::registry::{DeviceRecord, Registration};
    use enlight_driver::settings::DeviceSettings;
    use enlight_probes::{IoKey, IoStats};
    use std::sync::{Arc, Mutex};

    /// A fake probe source: the test sets what snapshots return and sees attach/detach calls.
    #[derive(Clone, Default)]
    pub(crate) struct FakeProbes {
        pub snapshot: Arc<Mutex<Snapshot>>,
        pub calls: Arc<Mutex<Vec<String>>>,
        pub fail_attach: bool,
    }

    impl ProbeSource for FakeProbes {
        fn attach(&mut self, pid: u32, _exe: &Path) -> Result<AttachReport, String> {
            self.calls.lock().unwrap().push(format!("attach {pid}"));
            if self.fail_attach {
                return Err("permission denied".into());
            }
            let mut r = AttachReport::default();
            for (p, _) in enlight_probes::PROGRAMS {
                r.sites_by_probe.insert(p.to_string(), 1);
            }
            Ok(r)
        }
        fn detach(&mut self, pid: u32) {
            self.calls.lock().unwrap().push(format!("detach {pid}"));
        }
        fn snapshot(&self) -> Result<Snapshot, String> {
            Ok(self.snapshot.lock().unwrap().clone())
        }
    }

    pub(crate) fn record(name: &str, pid: u32) -> DeviceRecord {
        DeviceRecord {
            name: name.into(),
            device: "disk".into(),
            kind: "synthetic".into(),
            dev_id: 0,
            pid,
            pid_start_time: None,
            exe: "/proc/self/exe".into(),
            started_unix_ms: 0,
            settings: DeviceSettings::default(),
            control: None,
        }
    }

    pub(crate) fn io(ops: u64, latencies_ns: &[(u64, u64)]) -> IoStats {
        let mut buckets: BTreeMap<u32, u64> = BTreeMap::new();
        for (lat, n) in latencies_ns {
            *buckets
                .entry(enlight_probes::hist::bucket_index(*lat))
                .or_default() += n;
        }
        IoStats {
            ops,
            bytes: ops * 4096,
            errors: 0,
            latency_sum_ns: latencies_ns.iter().map(|(l, n)| l * n).sum(),
            buckets: buckets.into_iter().collect(),
        }
    }

    #[test]
    fn attaches_reads_and_keeps_final_figures_of_vanished_devices() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let fake = FakeProbes::default();
        let mut c = Collector::new(fake.clone(), dir.path().into(), Duration::from_secs(60));
        let mut state = State::default();
        let reg = Registration::register(dir.path(), &record("disk0", me)).unwrap();
        fake.snapshot.lock().unwrap().io.insert(
            IoKey {
                pid: me,
                dev: 0,
                op: 0,
            },
            io(100, &[(10_000, 100)]),
        );
        c.tick(&mut state);
        let d = &state.devices["disk0"];
        assert!(d.attached && d.present);
        assert_eq!(d.ops[&0].ops, 100);
        let p50 = d.ops[&0].histogram().value_at_quantile(0.5);
        assert!((p50 as f64 - 10_000.0).abs() / 10_000.0 < 0.01, "{p50}");

        // The device goes away after 50 more ops: those are counted, then the pid is detached.
        fake.snapshot.lock().unwrap().io.insert(
            IoKey {
                pid: me,
                dev: 0,
                op: 0,
            },
            io(150, &[(10_000, 150)]),
        );
        drop(reg);
        c.tick(&mut state);
        let d = &state.devices["disk0"];
        assert!(!d.present && !d.attached);
        assert_eq!(d.ops[&0].ops, 150);
        assert_eq!(
            *fake.calls.lock().unwrap(),
            vec![format!("attach {me}"), format!("detach {me}")]
        );
    }

    /// The quantiles without a histogram are the histogram's, for any buckets: empty, zero
    /// counts, one bucket, many, counts large enough to saturate, an I/O of over an hour.
    #[test]
    fn quantiles_without_a_histogram_are_the_histograms() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
        let qs = [0.0, 0.5, 0.9, 0.99, 0.999, 1.0];
        let check = |f: &OpFigures| {
            let h = f.histogram();
            let want = (!h.is_empty()).then(|| qs.map(|q| h.value_at_quantile(q)));
            assert_eq!(f.quantiles_ns(qs), want, "{:?}", f.buckets);
        };
        check(&OpFigures::default());
        let mut f = OpFigures::default();
        f.buckets.insert(300, 0);
        check(&f);
        for _ in 0..2000 {
            let mut f = OpFigures::default();
            let n = rng.gen_range(1..300);
            let top = [300u32, 2_000, enlight_probes::hist::MAX_BUCKET][rng.gen_range(0..3)];
            for _ in 0..n {
                let c = match rng.gen_range(0..10) {
                    0 => 0,
                    1 => 1 << 40,
                    _ => rng.gen_range(1..1000),
                };
                f.buckets.insert(rng.gen_range(0..=top), c);
            }
            check(&f);
            // Two ops' buckets sorted together give the quantiles of their sum.
            let mut g = f.clone();
            g.buckets = f.buckets.iter().map(|(b, c)| (b / 2, c / 2 + 1)).collect();
            let mut sum = f.clone();
            sum.add(&g);
            let mut merged: Vec<(u32, u64)> = f
                .buckets
                .iter()
                .chain(&g.buckets)
                .map(|(&b, &c)| (b, c))
                .collect();
            merged.sort_by_key(|&(b, _)| b);
            let h = sum.histogram();
            assert_eq!(
                bucket_quantiles_ns(&merged, qs),
                (!h.is_empty()).then(|| qs.map(|q| h.value_at_quantile(q)))
            );
        }
    }

    #[test]
    fn counters_stay_monotonic_when_a_device_comes_back_in_a_new_process() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeProbes::default();
        let mut c = Collector::new(fake.clone(), dir.path().into(), Duration::from_secs(60));
        let mut state = State::default();
        let me = std::process::id();
        let reg = Registration::register(dir.path(), &record("disk0", me)).unwrap();
        fake.snapshot.lock().unwrap().io.insert(
            IoKey {
                pid: me,
                dev: 0,
                op: 1,
            },
            io(40, &[(5_000, 40)]),
        );
        c.tick(&mut state);
        drop(reg);
        // Same name, another live process (our parent stands in for it).
        // SAFETY: getppid has no preconditions.
        let other = unsafe { libc::getppid() } as u32;
        let _reg = Registration::register(dir.path(), &record("disk0", other)).unwrap();
        fake.snapshot.lock().unwrap().io.insert(
            IoKey {
                pid: other,
                dev: 0,
                op: 1,
            },
            io(5, &[(5_000, 5)]),
        );
        c.tick(&mut state);
        let d = &state.devices["disk0"];
        assert_eq!(d.record.pid, other);
        assert_eq!(d.ops[&1].ops, 45, "old instance's 40 plus the new one's 5");
        assert_eq!(d.ops[&1].buckets.values().sum::<u64>(), 45);
    }

    #[test]
    fn settings_and_their_change_counts_follow_the_device_live() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let fake = FakeProbes::default();
        let mut r = record("live0", me);
        let reg = Registration::register(dir.path(), &r).unwrap();
        let mut c = Collector::new(fake.clone(), dir.path().into(), Duration::from_secs(60));
        let mut state = State::default();
        c.tick(&mut state);
        assert_eq!(
            state.devices["live0"].record.settings,
            DeviceSettings::default()
        );
        // The device applies a change: it rewrites its record and fires settings_change.
        r.settings.poll_budget = 8;
        reg.update(&r).unwrap();
        fake.snapshot.lock().unwrap().settings_changes.insert(
            enlight_probes::KnobKey {
                pid: me,
                dev: 0,
                knob: 4,
            },
            1,
        );
        c.tick(&mut state);
        let d = &state.devices["live0"];
        assert_eq!(d.record.settings.poll_budget, 8);
        assert_eq!(d.settings_changes.get(&4), Some(&1));
    }

    /// Issue 12, item 10: a record whose pid now belongs to another process, an old-format
    /// record (no start time) whose pid runs another executable, and the record of a device
    /// killed with SIGKILL (its control socket left too) are no devices: not attached, not on
    /// /metrics, and their files are removed on discovery.
    #[test]
    fn stale_records_are_no_devices_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = other.id();
        // Field 22 of /proc/<pid>/stat, read here rather than through the registry's reader.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let start: u64 = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .nth(19)
            .unwrap()
            .parse()
            .unwrap();
        let devices = dir.path().join("devices");
        std::fs::create_dir_all(&devices).unwrap();
        let json = |name: &str, pid: u32, extra: serde_json::Value| {
            let mut v = serde_json::json!({
                "name": name, "device": "disk", "kind": "synthetic", "dev_id": 0, "pid": pid,
                "exe": "/bin/true", "started_unix_ms": 0,
                "settings": DeviceSettings::default(),
            });
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            std::fs::write(devices.join(format!("{name}.json")), v.to_string()).unwrap();
        };
        json(
            "reused",
            pid,
            serde_json::json!({"pid_start_time": start + 7}),
        );
        json("oldformat", pid, serde_json::json!({}));
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let socket = dir.path().join("control/killed.sock");
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        json(
            "killed",
            dead_pid,
            serde_json::json!({"control": socket.to_str().unwrap()}),
        );
        let fake = FakeProbes::default();
        let mut c = Collector::new(fake.clone(), dir.path().into(), Duration::from_secs(60));
        let mut st = State::default();
        c.tick(&mut st);
        c.tick(&mut st);
        let _ = other.kill();
        let _ = other.wait();
        let views = crate::api::devices(&st);
        assert!(
            views.iter().all(|d| !d.attached),
            "shown as attached: {views:?}"
        );
        assert_eq!(crate::api::health(&st).devices_attached, 0);
        let text = crate::metrics::render(&st);
        assert!(
            !text.contains("enlight_probe_attached{device=\"reused\"")
                && !text.contains("enlight_probe_attached{device=\"oldformat\""),
            "{text}"
        );
        assert!(fake.calls.lock().unwrap().is_empty(), "attached to {pid}");
        for name in ["reused", "oldformat", "killed"] {
            assert!(
                !devices.join(format!("{name}.json")).exists(),
                "{name}'s record is still there"
            );
        }
        assert!(
            !socket.exists(),
            "the killed device's socket is still there"
        );
        assert_eq!(st.errors.get("registry"), None, "{:?}", st.recent_errors);
    }

    #[test]
    fn attach_failures_are_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeProbes {
            fail_attach: true,
            ..Default::default()
        };
        let mut c = Collector::new(fake, dir.path().into(), Duration::from_secs(60));
        let mut state = State::default();
        let _reg =
            Registration::register(dir.path(), &record("disk0", std::process::id())).unwrap();
        c.tick(&mut state);
        c.tick(&mut state);
        assert_eq!(state.errors["attach"], 2);
        let d = &state.devices["disk0"];
        assert!(!d.attached);
        assert!(d
            .attach_error
            .as_deref()
            .unwrap()
            .contains("permission denied"));
    }

    #[test]
    fn a_malformed_registry_file_is_reported_once_and_counted_every_tick() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("devices")).unwrap();
        std::fs::write(dir.path().join("devices/bad.json"), "{not json").unwrap();
        let mut c = Collector::new(FakeProbes::default(), dir.path().into(), Duration::ZERO);
        let mut state = State::default();
        for _ in 0..5 {
            c.tick(&mut state);
        }
        assert_eq!(state.errors["registry"], 5, "counted every tick");
        assert_eq!(state.recent_errors.len(), 1, "{:?}", state.recent_errors);
        assert!(
            state.recent_errors[0].ends_with("(seen 5 times)"),
            "{:?}",
            state.recent_errors
        );
        // Fixed: the next tick says so (the line leaves the set of recurring problems).
        std::fs::remove_file(dir.path().join("devices/bad.json")).unwrap();
        c.tick(&mut state);
        assert_eq!(state.repeats.count(&state.recent_errors[0]), 0);
    }

    #[test]
    fn vanished_devices_are_dropped_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Collector::new(FakeProbes::default(), dir.path().into(), Duration::ZERO);
        let mut state = State::default();
        let reg = Registration::register(dir.path(), &record("disk0", std::process::id())).unwrap();
        c.tick(&mut state);
        drop(reg);
        c.tick(&mut state);
        assert!(state.devices.is_empty());
    }
}
