//! The HTTP side: `/metrics` (Prometheus), `/api/v1/devices` and `/api/v1/health` (JSON).

use crate::model::{op_name, DeviceState, OpFigures, State};

/// One op of a device, or all ops together (`op = "all"`): the one definition, shared with
/// `enlight top`.
pub use enlight_abi::api::OpView;

/// One device, as `/api/v1/devices` serves it: the one definition, shared with `enlight top`,
/// with the daemon's kernel-device details and its tuner's own types in it.
pub type DeviceView = enlight_abi::api::DeviceView<crate::kernel::KernelInfo, crate::tuner::Strict>;

const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

fn op_view(
    op: String,
    f: &OpFigures,
    quantiles: Option<[u64; 4]>,
    peaks: Option<&crate::peaks::PeakWindow>,
    window: std::time::Duration,
) -> OpView {
    let now = std::time::Instant::now();
    let q = |i: usize| quantiles.map(|v| v[i] as f64 / 1e9);
    OpView {
        op,
        ops_total: f.ops,
        bytes_total: f.bytes,
        errors_total: f.errors,
        ops_per_sec: f.ops_per_sec,
        bytes_per_sec: f.bytes_per_sec,
        p50_seconds: q(0),
        p90_seconds: q(1),
        p99_seconds: q(2),
        p999_seconds: q(3),
        peak_ops_per_sec: peaks.map_or(0.0, |p| p.peak_ops_per_sec(now, window)),
        peak_latency_seconds: peaks
            .and_then(|p| p.peak_bucket(now, window))
            .map(|b| enlight_probes::hist::bucket_high_ns(b) as f64 / 1e9),
    }
}

/// The view of one device.
pub fn device_view(d: &DeviceState) -> DeviceView {
    device_view_with_peaks(d, crate::config::DEFAULT_PEAK_WINDOW_SECS)
}

/// The view of one device, its peaks over the last `peak_window_secs`.
pub fn device_view_with_peaks(d: &DeviceState, peak_window_secs: u64) -> DeviceView {
    let window = std::time::Duration::from_secs(peak_window_secs);
    // Every op together: the counters summed, the buckets sorted together (rather than
    // merged into a map: the quantiles walk them in order, a repeated index is no matter).
    let mut all = OpFigures::default();
    let mut all_buckets: Vec<(u32, u64)> = Vec::new();
    for f in d.ops.values() {
        all.ops += f.ops;
        all.bytes += f.bytes;
        all.errors += f.errors;
        all.latency_sum_ns += f.latency_sum_ns;
        all.ops_per_sec += f.ops_per_sec;
        all.bytes_per_sec += f.bytes_per_sec;
        all_buckets.extend(f.buckets.iter().map(|(&b, &c)| (b, c)));
    }
    all_buckets.sort_by_key(|&(b, _)| b);
    DeviceView {
        name: d.record.name.clone(),
        device: d.record.device.clone(),
        kind: d.record.kind.clone(),
        pid: d.record.pid,
        present: d.present,
        attached: d.attached,
        attach_error: d.attach_error.clone(),
        settings: d
            .knobs
            .iter()
            .any(|k| k.source == crate::knobs::Source::ControlSocket)
            .then_some(d.record.settings),
        knobs: d.knobs.clone(),
        total: op_view(
            "all".into(),
            &all,
            crate::model::bucket_quantiles_ns(&all_buckets, QUANTILES),
            d.peaks.get(&crate::model::ALL_OPS),
            window,
        ),
        ops: d
            .ops
            .iter()
            .map(|(op, f)| {
                op_view(
                    op_name(*op),
                    f,
                    f.quantiles_ns(QUANTILES),
                    d.peaks.get(op),
                    window,
                )
            })
            .collect(),
        interrupts_total: d.events.interrupts,
        interrupts_per_sec: d.interrupts_per_sec,
        doorbells_total: d.events.doorbells,
        ring_full_out_total: d.events.ring_full_out,
        ring_full_in_total: d.events.ring_full_in,
        irq_masked_total: d.events.irq_masked,
        traps_total: d.traps,
        tuner: None,
        driver: d.kernel.as_ref().map(|k| k.driver.clone()),
        kernel: d.kernel.clone(),
    }
}

/// Every device.
pub fn devices(state: &State) -> Vec<DeviceView> {
    state
        .devices
        .values()
        .map(|d| device_view_with_peaks(d, state.peak_window.as_secs().max(1)))
        .collect()
}

/// The daemon's own health, as `/api/v1/health` serves it: the one definition, shared with
/// `enlight top`, with the daemon's kernel-probe state in it.
pub type HealthView = enlight_abi::api::HealthView<crate::kernel::KernelState>;

/// The health view.
pub fn health(state: &State) -> HealthView {
    let h = &state.health;
    HealthView {
        devices: state.devices.values().filter(|d| d.present).count(),
        devices_attached: state.devices.values().filter(|d| d.attached).count(),
        events_lost: h.events_lost + h.batch_truncated + h.read_failures + h.no_spec,
        errors: state
            .errors
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        recent_errors: state.recent_errors.clone(),
        ticks: state.ticks,
        kernel: state.kernel.clone(),
        self_cost: state.self_cost.clone(),
        tuner_audit_log: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The views' quantiles are those of an HDR histogram of each op's buckets, and of all ops'
    /// buckets summed, as they were when each view built its histograms.
    #[test]
    fn quantiles_are_the_histograms() {
        let state = crate::metrics::tests::fleet(16, 200);
        for d in state.devices.values() {
            let v = device_view(d);
            let mut all = OpFigures::default();
            for ((_, f), ov) in d.ops.iter().zip(&v.ops) {
                all.add(f);
                let h = f.histogram();
                assert_eq!(ov.p99_seconds, Some(h.value_at_quantile(0.99) as f64 / 1e9));
                assert_eq!(ov.p50_seconds, Some(h.value_at_quantile(0.5) as f64 / 1e9));
            }
            let h = all.histogram();
            let t = &v.total;
            assert_eq!(
                [t.p50_seconds, t.p90_seconds, t.p99_seconds, t.p999_seconds],
                QUANTILES.map(|q| Some(h.value_at_quantile(q) as f64 / 1e9)),
                "{}",
                d.record.name
            );
            assert_eq!(t.ops_total, all.ops);
            assert_eq!(t.bytes_total, all.bytes);
        }
    }
}

/// The JSON bytes of the views, pinned: the types moved into `enlight-abi` (shared with `enlight
/// top`) must serialise exactly as the daemon's own did.
#[cfg(test)]
mod golden {
    use super::*;
    use crate::knobs::{Disruption, Knob, Source, TunerKind, Unit};
    use crate::tuner::{Action, Decision, Objective, TunerMode, TunerState, TunerView};
    use enlight_driver::settings::DeviceSettings;

    pub(crate) fn a_device() -> DeviceView {
        let s = DeviceSettings::default();
        let mut knobs = crate::knobs::synthetic(&s, &enlight_driver::control::Limits::synthetic());
        let mut sched = Knob::new(
            "scheduler",
            1,
            (None, None),
            Unit::Choice,
            Source::Sysfs,
            Disruption::ResetsQueue,
        )
        .tuned_as(TunerKind::Scheduler);
        sched.choices = vec!["none".into(), "mq-deadline".into()];
        sched.delays_from = Some(10);
        sched.explored_on_pressure = true;
        knobs.push(sched);
        let decision = Decision {
            ts_unix_ms: 5,
            device: "disk0".into(),
            action: Action::Revert,
            from: s,
            to: DeviceSettings {
                moderation_frames: 16,
                ..s
            },
            reason: "p99 rose 30%".into(),
            objective_value: Some(0.5),
        };
        DeviceView {
            name: "disk0".into(),
            device: "disk".into(),
            kind: enlight_abi::DeviceKind::Synthetic,
            pid: 7,
            present: true,
            attached: true,
            attach_error: Some("x".into()),
            settings: Some(s),
            knobs,
            total: OpView {
                op: "all".into(),
                ops_total: 3,
                p50_seconds: Some(1e-5),
                ..OpView::default()
            },
            ops: vec![],
            interrupts_total: 1,
            interrupts_per_sec: 0.5,
            doorbells_total: 2,
            ring_full_out_total: 3,
            ring_full_in_total: 4,
            irq_masked_total: 5,
            traps_total: 6,
            tuner: Some(TunerView {
                mode: TunerMode::DryRun,
                objective: Objective::Latency,
                state: TunerState::Converged,
                pinned: true,
                last_decision: Some(decision),
                recommendation: Some(s),
                pinned_reason: Some("operator".into()),
            }),
            driver: Some("virtio_blk".into()),
            kernel: None,
        }
    }

    #[test]
    fn views_serialise_as_pinned() {
        let d = serde_json::to_string(&a_device()).unwrap();
        let mut health = health(&crate::model::State::default());
        health.errors.insert("read".into(), 2);
        health.recent_errors.push("boom".into());
        health.tuner_audit_log = Some(crate::tuner::shell::AuditHealth {
            path: Some("/var/log/a.jsonl".into()),
            write_errors: 1,
            last_error: Some("EIO".into()),
        });
        let h = serde_json::to_string(&health).unwrap();
        assert_eq!(
            d,
            r#"{"name":"disk0","device":"disk","kind":"synthetic","pid":7,"present":true,"attached":true,"attach_error":"x","settings":{"ring_out_bytes":262144,"ring_in_bytes":262144,"moderation_frames":8,"moderation_usecs":50,"poll_budget":64},"knobs":[{"name":"ring_out_bytes","value":262144,"min":8192,"max":67108864,"unit":"bytes","source":"control-socket","disruption":"live","tuner_kind":"ring"},{"name":"ring_in_bytes","value":262144,"min":8192,"max":67108864,"unit":"bytes","source":"control-socket","disruption":"live","tuner_kind":"ring"},{"name":"moderation_frames","value":8,"min":1,"max":1024,"unit":"frames","source":"control-socket","disruption":"live","tuner_kind":"moderation_count"},{"name":"moderation_usecs","value":50,"min":0,"max":100000,"unit":"microseconds","source":"control-socket","disruption":"live","tuner_kind":"moderation_delay"},{"name":"poll_budget","value":64,"min":1,"max":4096,"unit":"count","source":"control-socket","disruption":"live","tuner_kind":"poll_budget"},{"name":"scheduler","value":1,"min":null,"max":null,"unit":"choice","source":"sysfs","disruption":"resets-queue","tuner_kind":"scheduler","choices":["none","mq-deadline"],"delays_from":10,"explored_on_pressure":true}],"total":{"op":"all","ops_total":3,"bytes_total":0,"errors_total":0,"ops_per_sec":0.0,"bytes_per_sec":0.0,"p50_seconds":0.00001,"p90_seconds":null,"p99_seconds":null,"p999_seconds":null,"peak_ops_per_sec":0.0,"peak_latency_seconds":null},"ops":[],"interrupts_total":1,"interrupts_per_sec":0.5,"doorbells_total":2,"ring_full_out_total":3,"ring_full_in_total":4,"irq_masked_total":5,"traps_total":6,"tuner":{"mode":"dry_run","objective":"latency","state":"converged","pinned":true,"last_decision":{"ts_unix_ms":5,"device":"disk0","action":"revert","from":{"ring_out_bytes":262144,"ring_in_bytes":262144,"moderation_frames":8,"moderation_usecs":50,"poll_budget":64},"to":{"ring_out_bytes":262144,"ring_in_bytes":262144,"moderation_frames":16,"moderation_usecs":50,"poll_budget":64},"reason":"p99 rose 30%","objective_value":0.5},"recommendation":{"ring_out_bytes":262144,"ring_in_bytes":262144,"moderation_frames":8,"moderation_usecs":50,"poll_budget":64},"pinned_reason":"operator"},"driver":"virtio_blk"}"#
        );
        assert_eq!(
            h,
            r#"{"devices":0,"devices_attached":0,"events_lost":0,"errors":{"read":2},"recent_errors":["boom"],"ticks":0,"kernel":{"probes_loaded":null,"load_error":null,"probes":[],"kvm_exits":{},"kvm_pio":{},"kvm_mmio":{},"events":{},"events_lost":0,"completions_without_issue":0,"recursion_misses":0},"self_cost":{"bpf_stats_enabled":false,"programs":{},"process":{"cpu_seconds_total":0.0,"cpu_percent":0.0,"resident_bytes":0}},"tuner_audit_log":{"path":"/var/log/a.jsonl","write_errors":1,"last_error":"EIO"}}"#
        );
    }
}
