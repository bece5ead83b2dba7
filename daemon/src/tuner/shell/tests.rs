//! The shell against a fake device and backend, on tokio's paused clock.

use super::*;
use crate::tuner::backend::{BackendError, KnobNotice};
use crate::tuner::{Bounds, Objective, TunerState};
use enlight_driver::settings::DeviceSettings;
use enlight_probes::hist::bucket_index;

/// A device whose latency grows with moderation delay; it records every change applied.
#[derive(Default)]
struct FakeDevice {
    settings: Option<DeviceSettings>,
    applied: Vec<(u64, DeviceSettings)>,
    /// Refuse every change, as a busy device would.
    refuse: bool,
    /// Someone else changes a knob after this many applied changes (reported once).
    admin_after: Option<usize>,
    admin_reported: bool,
    /// The backend says the device may only get recommendations.
    recommend_only: bool,
    /// What the backend says of the next kernel notification (someone else's change).
    notice_says: Option<String>,
}

type Shared = Arc<Mutex<FakeDevice>>;

struct FakeBackend {
    dev: Shared,
    clock: tokio::time::Instant,
}

impl SettingsBackend for FakeBackend {
    fn get(&mut self) -> Result<(DeviceSettings, Bounds), BackendError> {
        let d = self.dev.lock().unwrap();
        Ok((d.settings.unwrap_or_default(), Bounds::default()))
    }
    fn apply(
        &mut self,
        _from: &DeviceSettings,
        to: &DeviceSettings,
    ) -> Result<DeviceSettings, BackendError> {
        let mut d = self.dev.lock().unwrap();
        if d.refuse {
            return Err(BackendError::Rejected {
                kind: "busy".into(),
                message: "another change is in progress".into(),
            });
        }
        d.settings = Some(*to);
        let t = self.clock.elapsed().as_millis() as u64;
        d.applied.push((t, *to));
        Ok(*to)
    }
    fn recommend_only(&self) -> Option<String> {
        self.dev
            .lock()
            .unwrap()
            .recommend_only
            .then(|| "disk0 is not named in [kernel] tune".to_string())
    }
    fn notified(&mut self, _notice: &KnobNotice) -> Option<String> {
        self.dev.lock().unwrap().notice_says.take()
    }
    fn changed_by_someone_else(&mut self) -> Option<String> {
        let mut d = self.dev.lock().unwrap();
        let due = d.admin_after.is_some_and(|n| d.applied.len() >= n);
        (due && !d.admin_reported).then(|| {
            d.admin_reported = true;
            "moderation_usecs on disk0 changed from 20 us (set by enlight) to 7 us by someone else"
                .to_string()
        })
    }
}

struct FakeFactory(Shared, tokio::time::Instant);

impl BackendFactory for FakeFactory {
    fn open(
        &self,
        _record: &DeviceRecord,
    ) -> Option<Result<Box<dyn SettingsBackend>, BackendError>> {
        Some(Ok(Box::new(FakeBackend {
            dev: Arc::clone(&self.0),
            clock: self.1,
        })))
    }
}

fn record() -> DeviceRecord {
    DeviceRecord {
        name: "disk0".into(),
        device: "disk".into(),
        kind: "synthetic".into(),
        dev_id: 0,
        pid: 4242,
        pid_start_time: None,
        exe: "/bin/true".into(),
        started_unix_ms: 0,
        settings: DeviceSettings::default(),
        control: None,
    }
}

/// 1000 completions per 0.5 s at 20 us plus the moderation delay a lone completion waits.
fn window_at(s: &DeviceSettings, c: &mut Cumulative, k: u64) {
    let delay_ns = if s.moderation_frames > 1 {
        s.moderation_usecs as u64 * 1000
    } else {
        0
    };
    let lat = 20_000 + delay_ns + (k % 7) * 300;
    c.ops += 1000;
    c.bytes += 1000 * 4096;
    c.interrupts += if delay_ns == 0 { 1000 } else { 500 };
    *c.buckets.entry(bucket_index(lat)).or_default() += 990;
    *c.buckets.entry(bucket_index(lat * 2)).or_default() += 10;
}

struct Rig {
    dev: Shared,
    shared: Arc<TunerShared>,
    audit: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Runs the shell for `secs` of paused time with a fake collector ticking every 500 ms.
async fn run_rig(config: TunerConfig, start: Option<DeviceSettings>, pin: bool, secs: u64) -> Rig {
    run_rig_with(config, start, pin, secs, FakeDevice::default()).await
}

async fn run_rig_with(
    config: TunerConfig,
    start: Option<DeviceSettings>,
    pin: bool,
    secs: u64,
    fake: FakeDevice,
) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let audit = config.audit_log.clone().unwrap_or(audit);
    let config = TunerConfig {
        audit_log: Some(audit.clone()),
        ..config
    };
    let dev: Shared = Arc::new(Mutex::new(FakeDevice {
        settings: start,
        ..fake
    }));
    let clock = tokio::time::Instant::now();
    let shared = Arc::new(TunerShared::default());
    if pin {
        shared.set_pinned("disk0", true);
    }
    let shell = Shell::new(
        config,
        dir.path(),
        Box::new(FakeFactory(Arc::clone(&dev), clock)),
        Arc::clone(&shared),
    );
    let cumulative = Arc::new(Mutex::new(Cumulative::default()));
    let source = {
        let cumulative = Arc::clone(&cumulative);
        move || {
            vec![DeviceSample {
                record: record(),
                cumulative: cumulative.lock().unwrap().clone(),
            }]
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(shell, source, Duration::from_millis(100), async {
        let _ = rx.await;
    }));
    // The fake collector: a window every 500 ms at the settings in force.
    let base = Instant::now();
    for k in 1..=(secs * 2) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = dev.lock().unwrap().settings.unwrap_or_default();
        window_at(&s, &mut cumulative.lock().unwrap(), k);
        shared.note_tick_at(k, base + Duration::from_millis(500 * k));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.send(()).unwrap();
    task.await.unwrap();
    Rig {
        dev,
        shared,
        audit,
        _dir: dir,
    }
}

fn latency_config(mode: TunerMode) -> TunerConfig {
    TunerConfig {
        mode,
        objective: Objective::Latency,
        ..TunerConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn changes_go_through_the_backend_at_most_one_per_interval_and_are_recorded() {
    let rig = run_rig(latency_config(TunerMode::Auto), None, false, 90).await;
    let applied = rig.dev.lock().unwrap().applied.clone();
    assert!(!applied.is_empty(), "the tuner changed something");
    for pair in applied.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= 1000, "{applied:?}");
    }
    for (_, s) in &applied {
        assert!(Bounds::default().contains(s));
    }
    // It found the latency optimum: no moderation delay for a lone completion.
    let last = applied.last().unwrap().1;
    assert!(
        last.moderation_frames == 1 || last.moderation_usecs == 0,
        "{last:?}"
    );
    let decisions = rig.shared.decisions(Some("disk0"), 1000);
    assert_eq!(
        decisions.len(),
        applied.len(),
        "every applied change is a decision"
    );
    assert_eq!(crate::tuner::audit::read(&rig.audit).unwrap(), decisions);
    assert_eq!(rig.shared.decisions(None, 2).len(), 2);
    let view = rig.shared.view("disk0").unwrap();
    assert_eq!(view.state, TunerState::Converged);
    assert_eq!(view.last_decision.as_ref(), decisions.last());
    let text = rig.shared.families().text();
    assert!(
        text.contains(&format!(
            "enlight_tuner_changes_total{{device=\"disk0\",kind=\"synthetic\",controller=\"enlight\"}} {}",
            applied.len()
        )),
        "{text}"
    );
    assert!(text.contains("enlight_tuner_pinned{device=\"disk0\",kind=\"synthetic\"} 0"));
    crate::testing::promtool_check(&text);
}

/// A device the backend may only recommend for (a kernel device not named in `[kernel] tune`)
/// runs in dry-run mode under `mode = "auto"`: recommendations, never a change that could
/// only fail (and freeze the tuner).
#[tokio::test(start_paused = true)]
async fn a_recommend_only_backend_gets_recommendations_not_failed_changes() {
    let rig = run_rig_with(
        latency_config(TunerMode::Auto),
        None,
        false,
        30,
        FakeDevice {
            recommend_only: true,
            ..FakeDevice::default()
        },
    )
    .await;
    assert!(rig.dev.lock().unwrap().applied.is_empty());
    let decisions = rig.shared.decisions(Some("disk0"), 1000);
    assert!(!decisions.is_empty(), "it recommends");
    assert!(
        decisions
            .iter()
            .all(|d| d.action == Action::Recommend && !d.reason.contains("applying failed")),
        "{decisions:?}"
    );
    let view = rig.shared.view("disk0").unwrap();
    assert_eq!(view.mode, TunerMode::DryRun);
    assert_ne!(view.state, TunerState::Frozen);
    assert!(view.recommendation.is_some());
}

/// Issue 12, item 12: an audit log that cannot be written is on /api/v1/health (the tuner goes
/// on, but not silently). /dev/full opens for appending and fails every write.
#[tokio::test(start_paused = true)]
async fn audit_write_failures_show_in_the_health() {
    let config = TunerConfig {
        audit_log: Some("/dev/full".into()),
        ..latency_config(TunerMode::Auto)
    };
    let rig = run_rig(config, None, false, 30).await;
    assert!(
        !rig.dev.lock().unwrap().applied.is_empty(),
        "decisions were made"
    );
    let h = rig.shared.audit_health().expect("a tuner runs");
    assert_eq!(h.path.as_deref(), Some(std::path::Path::new("/dev/full")));
    assert!(h.write_errors > 0, "{h:?}");
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("/dev/full")),
        "{h:?}"
    );
    assert_eq!(
        TunerShared::default().audit_health(),
        None,
        "no tuner, no entry"
    );
}

#[tokio::test(start_paused = true)]
async fn pinned_devices_and_dry_runs_are_never_changed() {
    let rig = run_rig(latency_config(TunerMode::Auto), None, true, 30).await;
    assert!(rig.dev.lock().unwrap().applied.is_empty());
    assert_eq!(rig.shared.view("disk0").unwrap().state, TunerState::Pinned);
    assert!(rig.shared.decisions(None, 100).is_empty());

    let rig = run_rig(latency_config(TunerMode::DryRun), None, false, 30).await;
    assert!(rig.dev.lock().unwrap().applied.is_empty());
    let decisions = rig.shared.decisions(None, 100);
    assert!(!decisions.is_empty());
    assert!(decisions.iter().all(|d| d.action == Action::Recommend));
    let view = rig.shared.view("disk0").unwrap();
    assert_eq!(view.mode, TunerMode::DryRun);
    assert_eq!(view.recommendation, Some(decisions.last().unwrap().to));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_shell_resumes_from_what_the_device_reports() {
    // As if an earlier enlightd had changed the device and died: it kept its settings.
    let left = DeviceSettings {
        moderation_frames: 4,
        moderation_usecs: 20,
        poll_budget: 32,
        ..DeviceSettings::default()
    };
    let rig = run_rig(latency_config(TunerMode::Auto), Some(left), false, 10).await;
    let first = rig
        .shared
        .decisions(None, 100)
        .into_iter()
        .next()
        .expect("a decision");
    assert_eq!(
        first.from, left,
        "the first decision starts from the device's settings"
    );
    assert!(
        first
            .reason
            .contains("started from the settings the device reports"),
        "{}",
        first.reason
    );
    assert_eq!(
        first.to.poll_budget, 32,
        "knobs it did not move stay as the device had them"
    );
}

#[tokio::test(start_paused = true)]
async fn refused_changes_are_recorded_and_freeze_the_device() {
    let rig = run_rig_with(
        latency_config(TunerMode::Auto),
        None,
        false,
        60,
        FakeDevice {
            refuse: true,
            ..FakeDevice::default()
        },
    )
    .await;
    let decisions = rig.shared.decisions(None, 100);
    assert_eq!(
        decisions.len(),
        3,
        "three failures, then frozen: {decisions:#?}"
    );
    for d in &decisions {
        assert!(d.reason.contains("applying failed: busy"), "{}", d.reason);
        assert_eq!(d.to, d.from, "nothing changed");
    }
    assert_eq!(rig.shared.view("disk0").unwrap().state, TunerState::Frozen);
    let text = rig.shared.families().text();
    assert!(text.contains(
        "enlight_tuner_changes_total{device=\"disk0\",kind=\"synthetic\",controller=\"enlight\"} 0"
    ));
}

/// Someone else changes a knob the tuner set: the device is pinned within that tick, the tuner
/// never writes again, and the reason is in the view, the decisions and the audit log.
#[tokio::test(start_paused = true)]
async fn a_change_by_someone_else_pins_the_device_and_the_tuner_never_writes_again() {
    let rig = run_rig_with(
        latency_config(TunerMode::Auto),
        None,
        false,
        90,
        FakeDevice {
            admin_after: Some(1),
            ..FakeDevice::default()
        },
    )
    .await;
    let applied = rig.dev.lock().unwrap().applied.clone();
    assert_eq!(
        applied.len(),
        1,
        "no write after the operator's: {applied:?}"
    );
    let view = rig.shared.view("disk0").unwrap();
    assert!(view.pinned, "{view:?}");
    assert!(
        view.pinned_reason
            .as_deref()
            .is_some_and(|r| r.contains("by someone else")),
        "{view:?}"
    );
    let decisions = rig.shared.decisions(Some("disk0"), 1000);
    assert!(
        decisions.iter().any(|d| d
            .reason
            .starts_with("pinned: moderation_usecs on disk0 changed")),
        "{decisions:?}"
    );
    assert_eq!(crate::tuner::audit::read(&rig.audit).unwrap(), decisions);
}

/// A kernel notification between ticks pins the device at once, through the pin path of the
/// tick's re-read: decision, audit log, API view; later ticks never write. A notification of
/// enlight's own write pins nothing.
#[test]
fn a_notification_of_someone_elses_change_pins_between_ticks() {
    let dir = tempfile::tempdir().unwrap();
    let config = TunerConfig {
        audit_log: Some(dir.path().join("audit.jsonl")),
        ..latency_config(TunerMode::Auto)
    };
    let dev: Shared = Arc::new(Mutex::new(FakeDevice::default()));
    let shared = Arc::new(TunerShared::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut shell = Shell::new(
        config,
        dir.path(),
        Box::new(FakeFactory(Arc::clone(&dev), tokio::time::Instant::now())),
        Arc::clone(&shared),
    );
    let mut c = Cumulative::default();
    let base = Instant::now();
    let sample = |c: &Cumulative| DeviceSample {
        record: record(),
        cumulative: c.clone(),
    };
    shell.tick(base, 0, vec![sample(&c)]);
    let notice = KnobNotice {
        device: "disk0".into(),
        ifindex: 3,
        what: "coalescing".into(),
        knobs: vec![("rx_frames".into(), 8)],
    };
    // enlight's own value: nothing.
    assert!(shell.notified(&notice).is_none());
    assert!(!shared.view("disk0").unwrap().pinned);
    dev.lock().unwrap().notice_says = Some(
        "rx_frames on disk0 changed from 8 frames (set by enlight) to 2 frames by someone else"
            .into(),
    );
    let d = shell.notified(&notice).expect("pinned");
    assert!(
        d.reason
            .starts_with("pinned: rx_frames on disk0 changed from 8"),
        "{}",
        d.reason
    );
    let view = shared.view("disk0").unwrap();
    assert!(view.pinned);
    assert!(view.pinned_reason.unwrap().contains("by someone else"));
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("someone else"), "{audit}");
    // Ticks go on; the device stays pinned and is never written.
    for k in 1..=40 {
        let s = dev.lock().unwrap().settings.unwrap_or_default();
        window_at(&s, &mut c, k);
        shell.tick(
            base + Duration::from_millis(500 * k),
            500 * k,
            vec![sample(&c)],
        );
    }
    assert!(dev.lock().unwrap().applied.is_empty());
    assert!(shared.view("disk0").unwrap().pinned);
    let metrics = shared.families().text();
    assert!(
        metrics.contains("enlight_tuner_pinned{device=\"disk0\",kind=\"synthetic\"} 1"),
        "{metrics}"
    );
}
