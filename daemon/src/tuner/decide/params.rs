//! What the operator asks of one device's tuner ([`Policy`]) and how cautious the tuner is
//! ([`TunerParams`], the `[tuner]` section of the config).

use serde::{Deserialize, Serialize};

use super::super::{Objective, TunerMode};

/// What the operator asked for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub mode: TunerMode,
    pub objective: Objective,
    /// p99 latency SLO in ns (throughput and balanced keep p99 under it).
    pub slo_p99_ns: u64,
    pub pinned: bool,
}

/// How cautious the tuner is. The defaults suit a 1 s collector interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunerParams {
    /// At most one change (or revert) per this many ms.
    pub min_change_interval_ms: u64,
    /// Windows discarded after each change.
    pub settle_windows: u32,
    /// Windows measured per settings point before comparing.
    pub trial_windows: u32,
    /// A trial still without enough samples after this many windows is abandoned.
    pub max_trial_windows: u32,
    /// Completions a window needs for its p99 to count.
    pub min_window_ops: u64,
    /// Completions a settings point needs before it is compared (its p99 then rests on at least
    /// a hundredth of them).
    pub min_point_ops: u64,
    /// Completions counted as one in the p99 tail test (neighbours share a stall).
    pub tail_cluster: f64,
    /// Smallest relative improvement acted on (also the minimum relative difference).
    pub min_improvement: f64,
    /// Standard errors a difference must exceed.
    pub z: f64,
    /// Latency and balanced objectives keep throughput within this fraction of the best seen.
    pub throughput_tolerance: f64,
    /// Relative change of ops/s or bytes per op that signals a new phase.
    pub phase_change: f64,
    /// Consecutive deviant windows before a phase change is declared.
    pub phase_windows: u32,
    /// A deviation this soon after an accepted change, on an unchanged workload, is a regression.
    pub regression_guard_ms: u64,
    /// Failed applications in a row before the tuner freezes the device.
    pub max_apply_failures: u32,
    /// Trials since the last kept change whose effects stayed within the noise (flat or
    /// inconclusive) before the tuner parks with moves still untried: every trial costs the
    /// workload (a bad candidate runs for seconds, and each change and revert disturbs it), and
    /// moves come in the order most likely to pay, so a run of moves lost in the noise says the
    /// rest will not pay for their trials. Confidently worse trials do not count: they are cut
    /// short and show where not to go.
    pub max_fruitless_trials: u32,
}

impl Default for TunerParams {
    fn default() -> Self {
        TunerParams {
            min_change_interval_ms: 1000,
            settle_windows: 1,
            trial_windows: 3,
            max_trial_windows: 8,
            min_window_ops: 100,
            min_point_ops: 2000,
            tail_cluster: 4.0,
            min_improvement: 0.03,
            z: 2.0,
            throughput_tolerance: 0.05,
            phase_change: 0.3,
            phase_windows: 3,
            regression_guard_ms: 15_000,
            max_apply_failures: 3,
            max_fruitless_trials: 4,
        }
    }
}

impl TunerParams {
    /// Checks ranges (the config loader reports these).
    pub fn validate(&self) -> Result<(), String> {
        if self.min_change_interval_ms < 100 {
            return Err(format!(
                "min_change_interval_ms = {} is under 100",
                self.min_change_interval_ms
            ));
        }
        if self.trial_windows < 2 || self.max_trial_windows < self.trial_windows {
            return Err(format!(
                "trial_windows = {} must be at least 2 and at most max_trial_windows = {}",
                self.trial_windows, self.max_trial_windows
            ));
        }
        for (name, v) in [
            ("min_improvement", self.min_improvement),
            ("throughput_tolerance", self.throughput_tolerance),
            ("phase_change", self.phase_change),
        ] {
            if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                return Err(format!("{name} = {v} is outside [0, 1)"));
            }
        }
        if !(self.z.is_finite() && self.z >= 0.0) {
            return Err(format!("z = {} is not a non-negative number", self.z));
        }
        if self.phase_windows == 0 || self.max_apply_failures == 0 || self.max_fruitless_trials == 0
        {
            return Err(
                "phase_windows, max_apply_failures and max_fruitless_trials must be at least 1"
                    .into(),
            );
        }
        Ok(())
    }
}
