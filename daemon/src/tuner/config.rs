//! The `[tuner]` section of enlightd's TOML. Every table rejects unknown keys by name.
//!
//! ```toml
//! [tuner]
//! mode = "auto"                 # off | auto | dry_run (default off)
//! objective = "balanced"        # latency | throughput | balanced
//! slo_p99_us = 5000             # p99 SLO for throughput and balanced
//! min_change_interval_ms = 1000 # at most one change per interval
//! max_fruitless_trials = 4      # trials within the noise before parking with moves untried
//! audit_log = "/var/log/enlight/tuner.jsonl"   # default: <runtime_dir>/tuner-audit.jsonl
//!
//! [tuner.devices.disk0]         # per device: any of mode, objective, slo_p99_us, pinned
//! objective = "latency"
//! pinned = false
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::decide::{Policy, TunerParams};
use super::{Objective, TunerMode};
use crate::config::{spec, KeyError, KeySpec};

/// What each `[tuner]` key accepts (docs/tuner.md), checked by [`TunerConfig::validate`] and
/// named in every error about the key.
pub const KEYS: &[KeySpec] = &[
    KeySpec::text("tuner.mode", "\"off\", \"auto\" or \"dry_run\""),
    KeySpec::text(
        "tuner.objective",
        "\"latency\", \"throughput\" or \"balanced\"",
    ),
    KeySpec::int("tuner.slo_p99_us", 1, 10_000_000, "microseconds"),
    KeySpec::int(
        "tuner.min_change_interval_ms",
        100,
        3_600_000,
        "milliseconds",
    ),
    KeySpec::int("tuner.trial_windows", 2, 100, "collector intervals"),
    KeySpec::int("tuner.settle_windows", 0, 100, "collector intervals"),
    KeySpec::int("tuner.min_improvement_pct", 0, 99, "percent"),
    KeySpec::int("tuner.phase_change_pct", 1, 99, "percent"),
    KeySpec::int("tuner.max_fruitless_trials", 1, 100, "trials"),
    KeySpec::text(
        "tuner.audit_log",
        "a file path enlightd can create and append to (default <runtime_dir>/tuner-audit.jsonl)",
    ),
    KeySpec::int("tuner.decisions_kept", 1, 1_000_000, "decisions"),
    KeySpec::text(
        "tuner.devices",
        "tables [tuner.devices.NAME] with mode, objective, slo_p99_us, pinned",
    ),
    KeySpec::text(
        "tuner.devices.*",
        "a table of mode, objective, slo_p99_us, pinned",
    ),
    KeySpec::text("tuner.devices.*.mode", "\"off\", \"auto\" or \"dry_run\""),
    KeySpec::text(
        "tuner.devices.*.objective",
        "\"latency\", \"throughput\" or \"balanced\"",
    ),
    KeySpec::int("tuner.devices.*.slo_p99_us", 1, 10_000_000, "microseconds"),
    KeySpec::text("tuner.devices.*.pinned", "true or false"),
];

/// The tuner's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunerConfig {
    /// Mode of every device without its own.
    pub mode: TunerMode,
    /// Objective of every device without its own.
    pub objective: Objective,
    /// p99 SLO in microseconds (throughput and balanced objectives).
    pub slo_p99_us: u64,
    /// At most one change per this many milliseconds (per device).
    pub min_change_interval_ms: u64,
    /// Windows measured per settings point.
    pub trial_windows: u32,
    /// Windows discarded after a change.
    pub settle_windows: u32,
    /// Smallest improvement acted on, percent.
    pub min_improvement_pct: u32,
    /// Relative change (percent) of ops/s or bytes per op that marks a new workload phase.
    pub phase_change_pct: u32,
    /// Trials since the last kept change that end within the noise before the tuner parks
    /// with moves untried.
    pub max_fruitless_trials: u32,
    /// JSON-lines audit log; default `<runtime_dir>/tuner-audit.jsonl`.
    pub audit_log: Option<PathBuf>,
    /// Decisions kept in memory for `/api/v1/tuner/decisions`.
    pub decisions_kept: usize,
    /// Per-device overrides, by device name.
    pub devices: BTreeMap<String, DeviceTunerConfig>,
}

/// One device's overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceTunerConfig {
    pub mode: Option<TunerMode>,
    pub objective: Option<Objective>,
    pub slo_p99_us: Option<u64>,
    /// Start pinned (the API can unpin).
    pub pinned: bool,
}

impl Default for TunerConfig {
    fn default() -> Self {
        let p = TunerParams::default();
        TunerConfig {
            mode: TunerMode::Off,
            objective: Objective::Balanced,
            slo_p99_us: 5_000,
            min_change_interval_ms: p.min_change_interval_ms,
            trial_windows: p.trial_windows,
            settle_windows: p.settle_windows,
            min_improvement_pct: (p.min_improvement * 100.0).round() as u32,
            phase_change_pct: (p.phase_change * 100.0).round() as u32,
            max_fruitless_trials: p.max_fruitless_trials,
            audit_log: None,
            decisions_kept: 1000,
            devices: BTreeMap::new(),
        }
    }
}

impl TunerConfig {
    /// The decision function's parameters.
    pub fn params(&self) -> TunerParams {
        TunerParams {
            min_change_interval_ms: self.min_change_interval_ms,
            trial_windows: self.trial_windows,
            max_trial_windows: self
                .trial_windows
                .max(TunerParams::default().max_trial_windows),
            settle_windows: self.settle_windows,
            min_improvement: self.min_improvement_pct as f64 / 100.0,
            phase_change: self.phase_change_pct as f64 / 100.0,
            max_fruitless_trials: self.max_fruitless_trials,
            ..TunerParams::default()
        }
    }

    /// The policy of device `name`.
    pub fn policy(&self, name: &str) -> Policy {
        let d = self.devices.get(name).cloned().unwrap_or_default();
        Policy {
            mode: d.mode.unwrap_or(self.mode),
            objective: d.objective.unwrap_or(self.objective),
            slo_p99_ns: d.slo_p99_us.unwrap_or(self.slo_p99_us).saturating_mul(1000),
            pinned: d.pinned,
        }
    }

    /// Whether any device may be tuned (or recommended for).
    pub fn any_enabled(&self) -> bool {
        self.mode != TunerMode::Off
            || self
                .devices
                .values()
                .any(|d| d.mode.is_some_and(|m| m != TunerMode::Off))
    }

    /// The audit log's path.
    pub fn audit_path(&self, runtime_dir: &Path) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| runtime_dir.join("tuner-audit.jsonl"))
    }

    /// Checks ranges: every key by its own name (the TOML's, never the decision function's) and
    /// the range of its [`KEYS`] entry.
    pub fn validate(&self) -> Result<(), KeyError> {
        for (key, value) in [
            ("tuner.slo_p99_us", self.slo_p99_us),
            ("tuner.min_change_interval_ms", self.min_change_interval_ms),
            ("tuner.trial_windows", self.trial_windows.into()),
            ("tuner.settle_windows", self.settle_windows.into()),
            ("tuner.min_improvement_pct", self.min_improvement_pct.into()),
            ("tuner.phase_change_pct", self.phase_change_pct.into()),
            (
                "tuner.max_fruitless_trials",
                self.max_fruitless_trials.into(),
            ),
            ("tuner.decisions_kept", self.decisions_kept as u64),
        ] {
            spec(key).check(key, value)?;
        }
        for (name, d) in &self.devices {
            if let Some(slo) = d.slo_p99_us {
                spec("tuner.devices.*.slo_p99_us")
                    .check(&format!("tuner.devices.{name}.slo_p99_us"), slo)?;
            }
        }
        if let Some(path) = &self.audit_log {
            if path.as_os_str().is_empty() || path.is_dir() {
                return Err(KeyError::new(
                    "tuner.audit_log",
                    format!("tuner.audit_log = {path:?} is not a file path"),
                ));
            }
        }
        // Every key is in range, so the decision function's own check passes; it stays as the
        // decision function's guard (its message would name its internal parameters).
        self.params()
            .validate()
            .map_err(|e| KeyError::new("tuner", format!("[tuner] {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_and_devices_are_read_and_unknown_keys_named() {
        let c: TunerConfig = toml::from_str(
            "mode = \"dry_run\"\nslo_p99_us = 800\n[devices.disk0]\nobjective = \"latency\"\npinned = true\n",
        )
        .unwrap();
        c.validate().unwrap();
        let p = c.policy("disk0");
        assert_eq!(
            (p.mode, p.objective, p.slo_p99_ns, p.pinned),
            (TunerMode::DryRun, Objective::Latency, 800_000, true)
        );
        assert_eq!(c.policy("other").objective, Objective::Balanced);
        let e = toml::from_str::<TunerConfig>("objectiv = \"latency\"").unwrap_err();
        assert!(e.to_string().contains("objectiv"), "{e}");
        let e = toml::from_str::<TunerConfig>("[devices.d]\npin = true").unwrap_err();
        assert!(e.to_string().contains("pin"), "{e}");
        let e = toml::from_str::<TunerConfig>("objective = \"fast\"").unwrap_err();
        assert!(e.to_string().contains("fast"), "{e}");
        // Inside enlightd's config: the section is read and its unknown keys named too.
        let c = crate::Config::parse(
            "[tuner]\nmode = \"auto\"\n[tuner.devices.nic0]\nmode = \"off\"\n",
        )
        .unwrap();
        assert_eq!(c.tuner.policy("disk0").mode, TunerMode::Auto);
        assert_eq!(c.tuner.policy("nic0").mode, TunerMode::Off);
        let e = crate::Config::parse("[tuner]\nslo_p99 = 5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("slo_p99"), "{e}");
        let e = crate::Config::parse("[tuner]\nmin_change_interval_ms = 5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_change_interval_ms"), "{e}");
        let bad = TunerConfig {
            min_change_interval_ms: 10,
            ..TunerConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .message
            .contains("min_change_interval_ms"));
        let c = crate::Config::parse("[tuner]\nmax_fruitless_trials = 7").unwrap();
        assert_eq!(c.tuner.params().max_fruitless_trials, 7);
        let e = crate::Config::parse("[tuner]\nmax_fruitless_trials = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_fruitless_trials"), "{e}");
    }
}
