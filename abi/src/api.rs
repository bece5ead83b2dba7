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
//! Here are the leaf types both sides read alike. The device and health views that embed the
//! daemon's own types (its knobs, tuner and kernel-device state, the driver's settings) are still
//! written twice: the daemon's in `enlightd::api`, the lenient copy `enlight top` reads in
//! `enlight_tui::model`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
