//! Types of enlightd's JSON API (`/api/v1/*`, docs/api.md) that the daemon serialises and its
//! clients (`enlight top`, `enlight tune`) deserialise: one definition for both sides.
//!
//! **Compatibility.** Every struct is `#[serde(default)]`: a field an older daemon did not send
//! reads as its default, and a field a newer daemon sends that this build does not know is
//! ignored (no `deny_unknown_fields`), so a client reads any daemon of the same API version. A
//! field is only ever added, with a default that means "not known"; its name and meaning never
//! change. Serialising writes every field in declaration order (but an absent optional one the
//! daemon has always left out): the daemon's JSON.
//!
//! **Daemon-only parts.** A view with a part only the daemon knows the type of (the health view's
//! kernel-probe state) is generic over that part's type: the daemon names its own, a client
//! leaves the default, [`Unread`], which reads any JSON value and keeps nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::knob::Knob;
use crate::tuner::{Lenient, TunerTypes, TunerView};
use crate::DeviceKind;

/// One op of a device, or all its ops together (`op = "all"`): an element of a device's `ops`,
/// and its `total` (`/api/v1/devices`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct OpView {
    /// The op's name ([`crate::op::Op::name`], or `op<code>`), or `all`.
    pub op: String,
    pub ops_total: u64,
    pub bytes_total: u64,
    pub errors_total: u64,
    pub ops_per_sec: f64,
    pub bytes_per_sec: f64,
    /// Latency percentiles in seconds, from the eBPF-fed HDR histogram (absent before any I/O).
    pub p50_seconds: Option<f64>,
    pub p90_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    pub p999_seconds: Option<f64>,
    /// Highest ops/s of one collector interval within the peak window (microbursts).
    pub peak_ops_per_sec: f64,
    /// Upper bound of the highest latency bucket reached within the peak window, seconds.
    pub peak_latency_seconds: Option<f64>,
}

/// One op's cumulative latency histogram (`/api/v1/histograms`), as the kernel buckets it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct OpHistogram {
    /// `read`, `write`, `flush`, `tx`, `rx` ([`crate::op::Op::name`]).
    pub op: String,
    /// Completed ops (the sum of the bucket counts).
    pub count: u64,
    /// `[low_ns, high_ns, count]` per non-empty bucket, ascending; a bucket holds latencies in
    /// `[low_ns, high_ns)`.
    pub buckets: Vec<[u64; 3]>,
}

/// One device's histograms (`/api/v1/histograms`, `/api/v1/devices/{name}/histogram`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DeviceHistogram {
    /// The device's name.
    pub device: String,
    pub kind: DeviceKind,
    pub ops: Vec<OpHistogram>,
}

/// One of enlightd's eBPF programs, as the kernel counts it (`/api/v1/health` `self_cost`): its
/// cost, cumulative and over the last collector interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ProgramCost {
    /// The program's name in the object (`enlight_io_reap`, `enlight_blk_complete`, ...).
    pub program: String,
    /// The kernel's program id (`bpftool prog show id N`).
    pub id: u32,
    /// Runs, cumulative.
    pub runs_total: u64,
    /// Time spent in the program, cumulative, seconds.
    pub run_seconds_total: f64,
    /// Runs per second over the last interval.
    pub runs_per_sec: f64,
    /// Mean time per run over the last interval, ns (0 without runs).
    pub ns_per_run: f64,
    /// Share of one CPU the program took over the last interval, percent.
    pub cpu_percent: f64,
}

/// The daemon process's own cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ProcessCost {
    /// User plus system CPU time, cumulative, seconds.
    pub cpu_seconds_total: f64,
    /// Share of one CPU over the last interval, percent.
    pub cpu_percent: f64,
    /// Resident memory, bytes.
    pub resident_bytes: u64,
}

/// enlightd's cost, as `/api/v1/health` serves it (`self_cost`) and /metrics exports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SelfCost {
    /// Whether the kernel's run-time statistics are on for enlightd (without them the programs'
    /// run counts and times stand still).
    pub bpf_stats_enabled: bool,
    /// Why they are off, when they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bpf_stats_error: Option<String>,
    /// Every loaded program, by name.
    pub programs: BTreeMap<String, ProgramCost>,
    /// The daemon process.
    pub process: ProcessCost,
}

/// One device, as `/api/v1/devices` serves it. `K` is a kernel device's details (driver class,
/// queues, IRQs, NAPI figures, ring, coalescing or block-queue settings): the daemon's own type
/// there, left [`Unread`] by a client. `T` is whose tuner types its settings and tuner view are
/// written in ([`crate::tuner::TunerTypes`]): the daemon's own, or a client's
/// [`crate::tuner::Lenient`] ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    default,
    bound(serialize = "K: Serialize", deserialize = "K: Deserialize<'de>")
)]
pub struct DeviceView<K = Unread, T: TunerTypes = Lenient> {
    pub name: String,
    /// `disk` or `nic`.
    pub device: String,
    /// What the device is (`synthetic`, `emulated`, `kernel`; another, a newer daemon's, is kept
    /// as written).
    pub kind: DeviceKind,
    pub pid: u32,
    pub present: bool,
    pub attached: bool,
    pub attach_error: Option<String>,
    /// The control-socket settings of a device that has them (synthetic devices); absent for
    /// emulated and kernel devices, whose knobs (if any) are in `knobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings: Option<T::Settings>,
    /// The knobs the device really has, each with its value read from its source, limits, unit,
    /// source and disruption (empty: none, e.g. an emulated device).
    pub knobs: Vec<Knob>,
    /// Every op together.
    pub total: OpView,
    /// Per op.
    pub ops: Vec<OpView>,
    pub interrupts_total: u64,
    pub interrupts_per_sec: f64,
    pub doorbells_total: u64,
    pub ring_full_out_total: u64,
    pub ring_full_in_total: u64,
    pub irq_masked_total: u64,
    /// Register accesses an emulated device trapped (`trap` probe); 0 for synthetic devices.
    pub traps_total: u64,
    /// The tuner's state for this device (contract 6); `null` when no tuner runs for it (or the
    /// daemon has none).
    pub tuner: Option<TunerView<T>>,
    /// A kernel device's driver (`virtio_blk`, `hv_netvsc`, `e1000`, `loop`, ...); absent for
    /// registry devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// A kernel device's details; absent for registry devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<K>,
}

/// Empty: no settings, no tuner, no kernel details (whatever `K` and `T` are).
impl<K, T: TunerTypes> Default for DeviceView<K, T> {
    fn default() -> Self {
        DeviceView {
            name: String::new(),
            device: String::new(),
            kind: DeviceKind::default(),
            pid: 0,
            present: false,
            attached: false,
            attach_error: None,
            settings: None,
            knobs: Vec::new(),
            total: OpView::default(),
            ops: Vec::new(),
            interrupts_total: 0,
            interrupts_per_sec: 0.0,
            doorbells_total: 0,
            ring_full_out_total: 0,
            ring_full_in_total: 0,
            irq_masked_total: 0,
            traps_total: 0,
            tuner: None,
            driver: None,
            kernel: None,
        }
    }
}

/// A part of a view this reader does not look into (the daemon's kernel-probe state, for a
/// client): reads any JSON value (or none: the default) and keeps nothing. It is never written
/// (no `Serialize`), so a view holding it is read-only: what it skipped cannot be written back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unread;

impl<'de> Deserialize<'de> for Unread {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer)?;
        Ok(Unread)
    }
}

/// The tuner's audit log, as `/api/v1/health` serves it (`tuner_audit_log`): a tuner that cannot
/// write its audit trail says so there, not only in the daemon's log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditHealth {
    /// The audit log's path.
    pub path: Option<std::path::PathBuf>,
    /// Decisions that could not be written (and failed opens).
    pub write_errors: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// The daemon's own health (`/api/v1/health`). `K` is the kernel probes' state (which are
/// attached and why not, KVM exits per VMM, Hyper-V events): the daemon's own type there, left
/// [`Unread`] by a client.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthView<K = Unread> {
    /// Devices present.
    pub devices: usize,
    /// Devices whose probes are attached.
    pub devices_attached: usize,
    /// Events the probes lost (ring overruns, truncated batches, failed reads, missing specs).
    pub events_lost: u64,
    /// Errors by kind (`attach`, `snapshot`, `registry`, `http`).
    pub errors: BTreeMap<String, u64>,
    /// The last errors, in words (oldest first).
    pub recent_errors: Vec<String>,
    /// Collector ticks done.
    pub ticks: u64,
    /// The kernel probes: which are attached (and why not), KVM exits per VMM, Hyper-V events.
    pub kernel: K,
    /// What enlightd itself costs: each eBPF program's runs and run time, the daemon's CPU and
    /// memory (absent from daemons before it was served).
    pub self_cost: SelfCost,
    /// The tuner's audit log (`null` when no tuner runs): its path and its write failures.
    pub tuner_audit_log: Option<AuditHealth>,
}

impl SelfCost {
    /// All programs' share of one CPU over the last interval, percent.
    pub fn programs_cpu_percent(&self) -> f64 {
        self.programs.values().map(|p| p.cpu_percent).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An older daemon's op (before the peaks) and a newer one's (with a field this build does
    /// not know) both read; what is absent is its default.
    #[test]
    fn old_and_new_ops_read() {
        let old = r#"{"op":"read","ops_total":5,"bytes_total":20480,"errors_total":0,
            "ops_per_sec":1.0,"bytes_per_sec":4096.0,"p50_seconds":1e-5,"p90_seconds":null,
            "p99_seconds":null,"p999_seconds":null}"#;
        let v: OpView = serde_json::from_str(old).unwrap();
        assert_eq!(
            (v.op.as_str(), v.ops_total, v.p50_seconds),
            ("read", 5, Some(1e-5))
        );
        assert_eq!((v.peak_ops_per_sec, v.peak_latency_seconds), (0.0, None));
        let new = r#"{"op":"tx","ops_total":7,"peak_ops_per_sec":9.5,
            "peak_latency_seconds":0.002,"p9999_seconds":0.5,"by_queue":[1,2]}"#;
        let v: OpView = serde_json::from_str(new).unwrap();
        assert_eq!(
            (
                v.op.as_str(),
                v.ops_total,
                v.peak_ops_per_sec,
                v.peak_latency_seconds
            ),
            ("tx", 7, 9.5, Some(0.002))
        );
        assert_eq!(v.p99_seconds, None);
    }

    /// An older daemon's health `self_cost` (the fields the first `enlight top` read) and a newer
    /// one's (with fields this build does not know) both read.
    #[test]
    fn old_and_new_self_costs_read() {
        let old = r#"{"bpf_stats_enabled":true,"programs":{"enlight_io_reap":
            {"program":"enlight_io_reap","runs_per_sec":10.0,"ns_per_run":500.0,
            "cpu_percent":0.5}},"process":{"cpu_percent":1.5,"resident_bytes":4096}}"#;
        let c: SelfCost = serde_json::from_str(old).unwrap();
        let p = &c.programs["enlight_io_reap"];
        assert_eq!((p.runs_per_sec, p.id, p.runs_total), (10.0, 0, 0));
        assert_eq!(
            (c.process.resident_bytes, c.bpf_stats_error.as_deref()),
            (4096, None)
        );
        assert_eq!(c.programs_cpu_percent(), 0.5);
        let new = r#"{"bpf_stats_enabled":false,"bpf_stats_error":"EPERM","programs":{},
            "process":{"cpu_seconds_total":3.0,"threads":9},"cgroup":{"memory_max":1}}"#;
        let c: SelfCost = serde_json::from_str(new).unwrap();
        assert_eq!(c.bpf_stats_error.as_deref(), Some("EPERM"));
        assert_eq!(c.process.cpu_seconds_total, 3.0);
        // Absent reasons are not written (the daemon's JSON as it was).
        assert_eq!(
            serde_json::to_string(&SelfCost::default()).unwrap(),
            r#"{"bpf_stats_enabled":false,"programs":{},"process":{"cpu_seconds_total":0.0,"cpu_percent":0.0,"resident_bytes":0}}"#
        );
    }

    /// An older daemon's health (before the self-cost and the audit log) and a newer one's (a
    /// kernel state and fields this build does not know) both read.
    #[test]
    fn old_and_new_healths_read() {
        let old = r#"{"devices":2,"devices_attached":1,"events_lost":3,"errors":{"attach":1},
            "recent_errors":["x"],"ticks":9}"#;
        let h: HealthView = serde_json::from_str(old).unwrap();
        assert_eq!((h.devices, h.devices_attached, h.ticks), (2, 1, 9));
        assert_eq!(
            (h.self_cost, h.tuner_audit_log),
            (SelfCost::default(), None)
        );
        let new = r#"{"devices":1,"kernel":{"probes":[{"name":"blk","attached":true}],
            "kvm_exits":{}},"self_cost":{"bpf_stats_enabled":true},"tuner_audit_log":
            {"path":"/var/log/enlight.jsonl","write_errors":2,"rotations":1},"uptime_s":5}"#;
        let h: HealthView = serde_json::from_str(new).unwrap();
        assert_eq!(h.kernel, Unread);
        assert!(h.self_cost.bpf_stats_enabled);
        let audit = h.tuner_audit_log.unwrap();
        assert_eq!(
            (
                audit.path.unwrap().to_str(),
                audit.write_errors,
                audit.last_error
            ),
            (Some("/var/log/enlight.jsonl"), 2, None)
        );
        // The daemon's own kernel type is kept and written back in its place.
        let h: HealthView<BTreeMap<String, u64>> =
            serde_json::from_str(r#"{"kernel":{"a":1},"ticks":2}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"devices":0,"devices_attached":0,"events_lost":0,"errors":{},"recent_errors":[],"ticks":2,"kernel":{"a":1},"self_cost":{"bpf_stats_enabled":false,"programs":{},"process":{"cpu_seconds_total":0.0,"cpu_percent":0.0,"resident_bytes":0}},"tuner_audit_log":null}"#
        );
    }

    /// An older daemon's device (before the knobs, the traps and the kernel devices) and a newer
    /// one's (a kind, a tuner state, an action and fields this build does not know, kernel
    /// details) both read; a device without a tuner reads as `None`.
    #[test]
    fn old_and_new_devices_read() {
        use crate::tuner::{Action, Mode, State};
        let old = r#"{"name":"disk0","device":"disk","kind":"synthetic","pid":1,"present":true,
            "attached":true,"attach_error":null,"settings":{"ring_out_bytes":262144,
            "ring_in_bytes":262144,"moderation_frames":8,"moderation_usecs":50,"poll_budget":64},
            "total":{"op":"all","ops_total":5},"ops":[],"interrupts_total":3,
            "interrupts_per_sec":0.5,"doorbells_total":4,"ring_full_out_total":0,
            "ring_full_in_total":0,"irq_masked_total":0}"#;
        let d: DeviceView = serde_json::from_str(old).unwrap();
        assert_eq!(
            (d.kind, d.pid, d.total.ops_total),
            (DeviceKind::Synthetic, 1, 5)
        );
        assert_eq!(d.settings.unwrap().moderation_usecs, Some(50));
        assert_eq!(
            (d.knobs.len(), d.traps_total, d.tuner, d.kernel),
            (0, 0, None, None)
        );
        let new = r#"{"name":"vda","device":"disk","kind":"vhost-user","traps_total":2,
            "knobs":[{"name":"nr_requests","value":64,"unit":"requests","source":"sysfs"}],
            "tuner":{"mode":"auto","objective":"latency","state":"warming","pinned":false,
              "last_decision":{"ts_unix_ms":5,"device":"vda","action":"escalate",
                "from":{},"to":{},"reason":"r","objective_value":null},"recommendation":null},
            "driver":"virtio_blk","kernel":{"class":"blk","queues":[{"irq":30}]},
            "numa_node":1}"#;
        let d: DeviceView = serde_json::from_str(new).unwrap();
        assert_eq!(
            (d.kind.as_str(), d.traps_total, d.driver.as_deref()),
            ("vhost-user", 2, Some("virtio_blk"))
        );
        assert_eq!(
            (d.knobs[0].value, d.kernel, d.settings),
            (64, Some(Unread), None)
        );
        let t = d.tuner.unwrap();
        assert_eq!(
            (t.mode, t.state),
            (Mode::Auto, State::Other("warming".into()))
        );
        assert_eq!(
            t.last_decision.unwrap().action,
            Action::Other("escalate".into())
        );
        // The daemon's own kernel type is kept and written back in its place; absent settings,
        // driver and kernel details are left out, as the daemon always did.
        let d: DeviceView<BTreeMap<String, u64>> =
            serde_json::from_str(r#"{"name":"sda","kernel":{"queues":4}}"#).unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert!(
            json.ends_with(r#""traps_total":0,"tuner":null,"kernel":{"queues":4}}"#),
            "{json}"
        );
        assert!(
            !json.contains("settings") && !json.contains("driver"),
            "{json}"
        );
    }

    /// Serialising writes every field in declaration order (the daemon's JSON, byte for byte).
    #[test]
    fn histograms_serialise_as_the_daemon_served_them() {
        let h = DeviceHistogram {
            device: "disk0".into(),
            kind: DeviceKind::Synthetic,
            ops: vec![OpHistogram {
                op: "read".into(),
                count: 3,
                buckets: vec![[1000, 1008, 3]],
            }],
        };
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(
            json,
            r#"{"device":"disk0","kind":"synthetic","ops":[{"op":"read","count":3,"buckets":[[1000,1008,3]]}]}"#
        );
        assert_eq!(serde_json::from_str::<DeviceHistogram>(&json).unwrap(), h);
        let future: DeviceHistogram =
            serde_json::from_str(r#"{"device":"x","kind":"vhost","ops":[],"unit":"ns"}"#).unwrap();
        assert_eq!(future.kind, DeviceKind::Other("vhost".into()));
        let op = OpView {
            op: "all".into(),
            ..OpView::default()
        };
        assert_eq!(
            serde_json::to_string(&op).unwrap(),
            r#"{"op":"all","ops_total":0,"bytes_total":0,"errors_total":0,"ops_per_sec":0.0,"bytes_per_sec":0.0,"p50_seconds":null,"p90_seconds":null,"p99_seconds":null,"p999_seconds":null,"peak_ops_per_sec":0.0,"peak_latency_seconds":null}"#
        );
    }
}
