//! The async shell around the decision function: it follows the collector's ticks, turns each
//! device's cumulative eBPF counters into windows, asks the device's [`DeviceTuner`], applies
//! through the device's [`SettingsBackend`], and records every decision (audit log, the
//! decisions list of the API, counters for `/metrics`).
//!
//! What it does not do: keep settings anywhere but in the device. Each tick it reads the
//! settings in force from the device itself, so a restarted enlightd resumes from what the
//! devices report (and a device whose enlightd died simply keeps its last settings).
//!
//! The blocking parts (control sockets) run on tokio's blocking pool; the decisions are the pure
//! function's. [`Shell::tick`] is synchronous, so tests drive it directly or through [`run`]
//! with tokio's paused clock.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use enlight_driver::registry::DeviceRecord;

use super::audit::AuditLog;
use super::backend::{BackendFactory, KnobNotice, SettingsBackend};
use super::config::TunerConfig;
use super::window::{Cumulative, Window};
use super::{Action, Decision, DeviceTuner, Throughput, TunerMode, TunerView};
use crate::model::State;

/// The tuner's state that the HTTP side reads (and pins write), and the collector's clock.
#[derive(Default)]
pub struct TunerShared {
    public: Mutex<Public>,
    tick: Mutex<Option<(u64, Instant)>>,
}

#[derive(Default)]
struct Public {
    enabled: bool,
    views: BTreeMap<String, TunerView>,
    kinds: BTreeMap<String, enlight_abi::DeviceKind>,
    decisions: VecDeque<Decision>,
    decisions_kept: usize,
    changes: BTreeMap<String, u64>,
    reverts: BTreeMap<String, u64>,
    objective: BTreeMap<String, f64>,
    /// Pin requests: pinned, and a sequence number (every request counts, repeats too).
    pins: BTreeMap<String, (bool, u64)>,
    pin_requests: u64,
    audit: AuditHealth,
}

/// The audit log's health, on `/api/v1/health` (`tuner_audit_log`): shared with `enlight top`.
pub use enlight_abi::api::AuditHealth;

impl TunerShared {
    /// The audit log's health (`None` when no tuner runs).
    pub fn audit_health(&self) -> Option<AuditHealth> {
        let p = self.public.lock().expect("tuner lock");
        p.enabled.then(|| p.audit.clone())
    }

    fn audit_failed(&self, path: &Path, e: &std::io::Error) {
        log::error!("tuner audit log {}: {e}", path.display());
        let mut p = self.public.lock().expect("tuner lock");
        p.audit.write_errors += 1;
        p.audit.last_error = Some(format!("{}: {e}", path.display()));
    }

    /// Called by the collector after each tick: the tick number and when its maps were read.
    pub fn note_tick(&self, ticks: u64) {
        self.note_tick_at(ticks, Instant::now());
    }

    /// [`note_tick`](Self::note_tick) with an explicit time (tests).
    pub fn note_tick_at(&self, ticks: u64, at: Instant) {
        *self.tick.lock().expect("tick lock") = Some((ticks, at));
    }

    fn last_tick(&self) -> Option<(u64, Instant)> {
        *self.tick.lock().expect("tick lock")
    }

    /// Whether a tuner runs at all.
    pub fn enabled(&self) -> bool {
        self.public.lock().expect("tuner lock").enabled
    }

    /// The tuner's view of a device (`None` when no tuner runs for it).
    pub fn view(&self, device: &str) -> Option<TunerView> {
        self.public
            .lock()
            .expect("tuner lock")
            .views
            .get(device)
            .cloned()
    }

    /// Recorded decisions, newest last, optionally of one device, at most `limit`.
    pub fn decisions(&self, device: Option<&str>, limit: usize) -> Vec<Decision> {
        let p = self.public.lock().expect("tuner lock");
        let mut v: Vec<Decision> = p
            .decisions
            .iter()
            .filter(|d| device.is_none_or(|n| d.device == n))
            .cloned()
            .collect();
        let skip = v.len().saturating_sub(limit);
        v.drain(..skip);
        v
    }

    /// Pins or unpins a device; effective from the tuner's next tick (and shown at once).
    pub fn set_pinned(&self, device: &str, pinned: bool) {
        let mut p = self.public.lock().expect("tuner lock");
        p.pin_requests += 1;
        let seq = p.pin_requests;
        p.pins.insert(device.to_string(), (pinned, seq));
        if let Some(v) = p.views.get_mut(device) {
            v.pinned = pinned;
        }
    }

    fn pins(&self) -> BTreeMap<String, (bool, u64)> {
        self.public.lock().expect("tuner lock").pins.clone()
    }

    /// The `enlight_tuner_*` families (none when no tuner runs). The tuner's series carry the
    /// device's `device` and `kind`, as the tuner knows them.
    pub fn families(&self) -> crate::exposition::Exposition {
        use crate::exposition::{labels, Exposition, Family};
        let mut out = Exposition::default();
        let p = self.public.lock().expect("tuner lock");
        if !p.enabled {
            return out;
        }
        let id = |d: &str| {
            labels(&[
                ("device", d),
                (
                    "kind",
                    p.kinds
                        .get(d)
                        .map(enlight_abi::DeviceKind::as_str)
                        .unwrap_or(""),
                ),
            ])
        };
        let mut f = Family::counter(
            "enlight_tuner_changes_total",
            "Settings changes the tuner applied (reverts included).",
        );
        for dev in p.views.keys() {
            let mut l = id(dev);
            l.push(crate::exposition::label("controller", "enlight"));
            f.sample(l, p.changes.get(dev).copied().unwrap_or(0) as f64);
        }
        out.add(f);
        let mut f = Family::counter(
            "enlight_tuner_reverts_total",
            "Changes the tuner undid: the incumbent put back after a candidate, to measure it again (every trial is A-B-A), or a regression reverted.",
        );
        for dev in p.views.keys() {
            f.sample(id(dev), p.reverts.get(dev).copied().unwrap_or(0) as f64);
        }
        out.add(f);
        let mut f = Family::gauge(
            "enlight_tuner_pinned",
            "1 when the device is pinned (the tuner measures but never changes it).",
        );
        for (dev, view) in &p.views {
            f.sample(id(dev), view.pinned as u8 as f64);
        }
        out.add(f);
        let mut f = Family::gauge(
            "enlight_tuner_objective",
            "The value the tuner optimises at the current settings: ops/s (throughput), p99 seconds (latency) or interrupts per op (balanced).",
        );
        for dev in p.views.keys() {
            if let Some(v) = p.objective.get(dev) {
                f.sample(id(dev), *v);
            }
        }
        out.add(f);
        out
    }
}

/// What the shell needs of one device each tick.
#[derive(Debug, Clone)]
pub struct DeviceSample {
    pub record: DeviceRecord,
    pub cumulative: Cumulative,
}

/// The samples of every present, attached registry device.
pub fn samples(state: &State) -> Vec<DeviceSample> {
    state
        .devices
        .values()
        .filter(|d| d.present && d.attached)
        .map(|d| {
            let mut cumulative = Cumulative::from_figures(d.ops.values(), &d.events);
            if let Some(k) = &d.kernel {
                // A kernel device has no ring-full events: its ring pressure stands for them.
                cumulative.ring_full += crate::kernel::collector::ring_pressure(k);
                // A kernel NIC's NAPI polls: `balanced`'s signal where no interrupt is seen.
                cumulative.napi_polls = k.napi_polls;
            }
            DeviceSample {
                record: d.record.clone(),
                cumulative,
            }
        })
        .collect()
}

struct Slot {
    tuner: DeviceTuner,
    backend: Option<Box<dyn SettingsBackend>>,
    pid: u32,
    prev: Option<(Cumulative, Instant)>,
    /// The last pin request applied (its sequence number).
    pin_seen: u64,
    /// Why the tuner pinned the device itself (an operator's change), while pinned.
    pinned_reason: Option<String>,
    /// The settings read at the last tick.
    last: Option<enlight_driver::settings::DeviceSettings>,
}

impl Slot {
    /// A device's slot, its backend not open yet.
    fn new(tuner: DeviceTuner, pid: u32) -> Slot {
        Slot {
            tuner,
            backend: None,
            pid,
            prev: None,
            pin_seen: 0,
            pinned_reason: None,
            last: None,
        }
    }
}

/// The tuner's loop state.
pub struct Shell {
    config: TunerConfig,
    factory: Box<dyn BackendFactory>,
    slots: BTreeMap<String, Slot>,
    audit: Option<AuditLog>,
    shared: Arc<TunerShared>,
    last_tick_seen: Option<u64>,
}

impl Shell {
    /// A shell with `config`, opening the audit log (a failure is logged and counted, and
    /// tuning goes on without it).
    pub fn new(
        config: TunerConfig,
        runtime_dir: &Path,
        factory: Box<dyn BackendFactory>,
        shared: Arc<TunerShared>,
    ) -> Shell {
        let path = config.audit_path(runtime_dir);
        let audit = match AuditLog::open(&path) {
            Ok(a) => Some(a),
            Err(e) => {
                shared.audit_failed(&path, &e);
                None
            }
        };
        {
            let mut p = shared.public.lock().expect("tuner lock");
            p.enabled = config.any_enabled();
            p.decisions_kept = config.decisions_kept;
            p.audit.path = Some(path);
        }
        Shell {
            config,
            factory,
            slots: BTreeMap::new(),
            audit,
            shared,
            last_tick_seen: None,
        }
    }

    /// One tick: the samples read at `at` (the collector's clock), `now_ms` on the tuner's
    /// clock. Returns the decisions made.
    pub fn tick(&mut self, at: Instant, now_ms: u64, samples: Vec<DeviceSample>) -> Vec<Decision> {
        let pins = self.shared.pins();
        let params = self.config.params();
        let mut decisions = Vec::new();
        let mut views = BTreeMap::new();
        let mut seen = Vec::new();
        for sample in samples {
            let name = sample.record.name.clone();
            let mut policy = self.config.policy(&name);
            if policy.mode == TunerMode::Off {
                continue;
            }
            seen.push(name.clone());
            let api_pin = pins.get(&name).copied();
            policy.pinned = api_pin.map(|(p, _)| p).unwrap_or(policy.pinned);
            let unit = Throughput::of_device(&sample.record.device);
            let pid = sample.record.pid;
            let slot = self
                .slots
                .entry(name.clone())
                .or_insert_with(|| Slot::new(DeviceTuner::new(policy, params).counting(unit), pid));
            if slot.pid != pid {
                // A new process serves the device: start over from what it reports.
                *slot = Slot::new(DeviceTuner::new(policy, params).counting(unit), pid);
            }
            // Every unpin request (even a repeated one) also clears a freeze.
            if let Some((pinned, seq)) = api_pin {
                if !pinned && seq != slot.pin_seen {
                    slot.tuner.unfreeze();
                    // A fresh backend: one that saw an operator's change refuses to write.
                    slot.backend = None;
                }
                slot.pin_seen = seq;
            }
            slot.tuner.set_pinned(policy.pinned);
            if slot.backend.is_none()
                && !open_backend(&*self.factory, slot, &sample.record, policy, params)
            {
                continue;
            }
            let backend = slot.backend.as_mut().expect("opened above");
            if policy.mode == TunerMode::Auto && backend.recommend_only().is_some() {
                policy.mode = TunerMode::DryRun;
            }
            let (current, bounds) = match backend.get() {
                Ok(v) => v,
                Err(e) => {
                    // A device that exited since the collector last read the registry is not a
                    // fault: it leaves the registry at the next tick.
                    if std::path::Path::new(&format!("/proc/{}", sample.record.pid)).exists() {
                        log::warn!("tuner: {name}: reading settings: {e}");
                    } else {
                        log::debug!("tuner: {name}: the device process has exited: {e}");
                    }
                    slot.backend = None;
                    continue;
                }
            };
            slot.last = Some(current);
            // An operator changed a knob the tuner had set: pin the device (within this tick),
            // never write over it, and say why (log, audit log, API, `enlight tune`).
            if let Some(why) = backend.changed_by_someone_else() {
                policy.pinned = true;
                decisions.push(pin_for_someone_else(
                    &self.shared,
                    &name,
                    (&mut slot.tuner, &mut slot.pin_seen, &mut slot.pinned_reason),
                    current,
                    &why,
                    "the re-read of this tick",
                ));
            }
            if !policy.pinned {
                slot.pinned_reason = None;
            }
            let window = match &slot.prev {
                Some((prev, prev_at)) if at > *prev_at => Some(Window::between(
                    prev,
                    &sample.cumulative,
                    at.duration_since(*prev_at).as_secs_f64(),
                )),
                _ => None,
            };
            slot.prev = Some((sample.cumulative.clone(), at));
            if let Some(window) = window {
                decisions.extend(step_and_apply(
                    &self.shared,
                    slot,
                    &name,
                    now_ms,
                    (current, bounds),
                    &window,
                ));
                if let Some(said) = slot.tuner.take_announcement() {
                    log::info!("tuner: {name}: {said}");
                }
            }
            views.insert(
                name.clone(),
                (
                    TunerView {
                        mode: policy.mode,
                        objective: policy.objective,
                        state: slot.tuner.state(),
                        pinned: policy.pinned,
                        last_decision: None,
                        recommendation: slot.tuner.recommendation(),
                        pinned_reason: slot.pinned_reason.clone(),
                    },
                    sample.record.kind.clone(),
                    slot.tuner.objective_value(),
                ),
            );
        }
        self.slots.retain(|name, _| seen.contains(name));
        self.record(&decisions);
        self.publish(views);
        decisions
    }

    /// What the API and /metrics show of each tuned device: its view (with its last decision),
    /// kind and objective value.
    fn publish(&self, views: BTreeMap<String, (TunerView, enlight_abi::DeviceKind, Option<f64>)>) {
        let mut p = self.shared.public.lock().expect("tuner lock");
        let last: BTreeMap<String, Decision> = p
            .decisions
            .iter()
            .map(|d| (d.device.clone(), d.clone()))
            .collect();
        p.views.clear();
        p.objective.clear();
        for (name, (mut view, kind, value)) in views {
            view.last_decision = last.get(&name).cloned();
            p.kinds.insert(name.clone(), kind);
            if let Some(v) = value {
                p.objective.insert(name.clone(), v);
            }
            p.views.insert(name, view);
        }
    }

    /// Logs `decisions`, writes them to the audit log and keeps them for the API.
    fn record(&mut self, decisions: &[Decision]) {
        for d in decisions {
            let action = match d.action {
                super::Action::Change => "changed",
                super::Action::Revert => "reverted",
                super::Action::Recommend => "recommends",
            };
            log::info!("tuner: {} {action}: {}", d.device, d.reason);
            if let Some(a) = &mut self.audit {
                if let Err(e) = a.record(d) {
                    self.shared.audit_failed(a.path(), &e);
                }
            }
        }
        let mut p = self.shared.public.lock().expect("tuner lock");
        for d in decisions {
            p.decisions.push_back(d.clone());
        }
        while p.decisions.len() > p.decisions_kept.max(1) {
            p.decisions.pop_front();
        }
    }

    /// A kernel notification of a device's knob values ([`KnobNotice`], the ethtool monitor),
    /// between ticks: when the device's backend says someone else changed a knob it set, the
    /// device is pinned at once, through the same path as a change the tick's re-read finds.
    /// Returns the decision recorded (none when the values were enlight's own).
    pub fn notified(&mut self, notice: &KnobNotice) -> Option<Decision> {
        let slot = self.slots.get_mut(&notice.device)?;
        let backend = slot.backend.as_mut()?;
        let why = backend.notified(notice)?;
        let current = match backend.get() {
            Ok((s, _)) => s,
            Err(_) => slot.last.unwrap_or_default(),
        };
        let d = pin_for_someone_else(
            &self.shared,
            &notice.device,
            (&mut slot.tuner, &mut slot.pin_seen, &mut slot.pinned_reason),
            current,
            &why,
            "the ethtool monitor",
        );
        self.record(std::slice::from_ref(&d));
        let mut p = self.shared.public.lock().expect("tuner lock");
        if let Some(v) = p.views.get_mut(&notice.device) {
            v.pinned = true;
            v.pinned_reason = Some(why);
            v.last_decision = Some(d.clone());
        }
        Some(d)
    }
}

/// Opens `slot`'s settings backend for `record` (false: none, or it failed: logged); a device
/// whose backend can only recommend gets a tuner in dry-run mode.
fn open_backend(
    factory: &dyn BackendFactory,
    slot: &mut Slot,
    record: &DeviceRecord,
    policy: super::decide::Policy,
    params: super::decide::TunerParams,
) -> bool {
    let name = &record.name;
    match factory.open(record) {
        None => return false,
        Some(Err(e)) => {
            log::warn!("tuner: {name}: {e}");
            return false;
        }
        Some(Ok(b)) => {
            if let (TunerMode::Auto, Some(why)) = (policy.mode, b.recommend_only()) {
                // Changes could only fail: the tuner recommends instead.
                log::info!("tuner: {name}: recommend only ({why})");
                slot.tuner = DeviceTuner::new(
                    super::decide::Policy {
                        mode: TunerMode::DryRun,
                        ..policy
                    },
                    params,
                )
                .counting(slot.tuner.throughput());
                slot.tuner.set_pinned(policy.pinned);
            }
            slot.backend = Some(b);
        }
    }
    true
}

/// One step of `slot`'s tuner on `window`, and the outcome applied through its backend (the
/// decision records what was put in force, or why applying failed).
fn step_and_apply(
    shared: &TunerShared,
    slot: &mut Slot,
    name: &str,
    now_ms: u64,
    (current, bounds): (enlight_driver::settings::DeviceSettings, super::Bounds),
    window: &Window,
) -> Option<Decision> {
    let o = slot.tuner.step(now_ms, &current, &bounds, window)?;
    let backend = slot.backend.as_mut().expect("opened before a step");
    let mut d = Decision {
        ts_unix_ms: enlight_driver::registry::now_unix_ms(),
        device: name.to_string(),
        action: o.action,
        from: current,
        to: o.to,
        reason: o.reason,
        objective_value: o.objective_value,
    };
    if let Some(said) = backend.in_own_knobs(&o.to) {
        let _ = write!(d.reason, " [{said}]");
    }
    if o.action != Action::Recommend {
        match backend.apply(&current, &o.to) {
            Ok(in_force) => {
                slot.tuner.applied(in_force);
                d.to = in_force;
                let mut p = shared.public.lock().expect("tuner lock");
                *p.changes.entry(name.to_string()).or_default() += 1;
                if o.action == Action::Revert {
                    *p.reverts.entry(name.to_string()).or_default() += 1;
                }
            }
            Err(e) => {
                slot.tuner.apply_failed(&e.to_string());
                d.reason.push_str(&format!("; applying failed: {e}"));
                d.to = current;
            }
        }
    }
    Some(d)
}

/// Pins device `name` because someone else changed a knob the tuner had set (`why` says what
/// from what to what; `seen_by` how enlight saw it): the tuner never writes it again until
/// unpinned. The one path for both ways a change is seen (a tick's re-read, a kernel
/// notification). Returns the decision to record.
fn pin_for_someone_else(
    shared: &TunerShared,
    name: &str,
    (tuner, pin_seen, pinned_reason): (&mut DeviceTuner, &mut u64, &mut Option<String>),
    current: enlight_driver::settings::DeviceSettings,
    why: &str,
    seen_by: &str,
) -> Decision {
    log::warn!(
        "tuner: {name}: {why} (seen by {seen_by}); pinned (unpin to let the tuner act again)"
    );
    shared.set_pinned(name, true);
    tuner.set_pinned(true);
    *pin_seen = shared.pins().get(name).map_or(0, |p| p.1);
    *pinned_reason = Some(why.to_string());
    Decision {
        ts_unix_ms: enlight_driver::registry::now_unix_ms(),
        device: name.to_string(),
        action: Action::Recommend,
        from: current,
        to: current,
        reason: format!("pinned: {why}; enlight will not write it until unpinned"),
        objective_value: None,
    }
}

/// Runs the shell until `shutdown` resolves: looks for a new collector tick every `poll`, and
/// on one, takes the samples (`source`, e.g. [`samples`] of the collector's state) and ticks the
/// shell on the blocking pool.
pub async fn run(
    shell: Shell,
    source: impl FnMut() -> Vec<DeviceSample>,
    poll: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let (_none, notices) = tokio::sync::mpsc::unbounded_channel();
    run_notified(shell, source, poll, notices, shutdown).await
}

/// [`run`], also handling kernel notifications (`notices`, from
/// [`crate::kernel::monitor::listen`]) as they come, between ticks ([`Shell::notified`]).
pub async fn run_notified(
    mut shell: Shell,
    mut source: impl FnMut() -> Vec<DeviceSample>,
    poll: Duration,
    mut notices: tokio::sync::mpsc::UnboundedReceiver<KnobNotice>,
    shutdown: impl Future<Output = ()>,
) {
    let start = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(shutdown);
    let mut listening = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => {}
            notice = notices.recv(), if listening => {
                let Some(notice) = notice else {
                    listening = false;
                    continue;
                };
                let Some(s) = on_a_blocking_thread(shell, move |s| {
                    s.notified(&notice);
                })
                .await
                else {
                    return;
                };
                shell = s;
                continue;
            }
        }
        let Some((ticks, at)) = shell.shared.last_tick() else {
            continue;
        };
        if shell.last_tick_seen == Some(ticks) {
            continue;
        }
        shell.last_tick_seen = Some(ticks);
        let samples = source();
        let now_ms = start.elapsed().as_millis() as u64;
        let Some(s) = on_a_blocking_thread(shell, move |s| {
            s.tick(at, now_ms, samples);
        })
        .await
        else {
            return;
        };
        shell = s;
    }
}

/// Runs `work` on `shell` on a blocking thread (it reads devices and writes knobs) and hands
/// the shell back; `None` when that thread panicked: the tuner stops (logged).
async fn on_a_blocking_thread(
    mut shell: Shell,
    work: impl FnOnce(&mut Shell) + Send + 'static,
) -> Option<Shell> {
    match tokio::task::spawn_blocking(move || {
        work(&mut shell);
        shell
    })
    .await
    {
        Ok(s) => Some(s),
        Err(e) => {
            log::error!("the tuner stopped: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests;
