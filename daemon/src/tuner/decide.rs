//! The decision function: one device's tuner as plain state and a `step` that takes the policy,
//! the settings in force, the device's bounds, the last window and the time, and returns what to
//! do. No I/O and no clock, so every guardrail is a property test.
//!
//! How it searches: hill climbing over one knob at a time on fixed ladders ([`super::Knob`]),
//! in an order that depends on the objective (the prior: for latency, less moderation first; for
//! throughput and balanced, more). A move is a *trial*: the candidate is applied, the first
//! window after the change is discarded (it straddles the change), then `trial_windows` windows
//! are measured and compared with the incumbent's windows ([`super::measure::compare`]). A
//! significantly better candidate becomes the incumbent and the same move is tried again; any
//! other outcome reverts to the incumbent and the next move is tried. When no move is left the
//! tuner is *converged*: it parks and watches. If the workload then changes (ops/s or bytes
//! per op far from what was measured at convergence, for `phase_windows` windows in a row) it
//! re-explores; if that happens soon after an accepted change on an unchanged workload, it
//! treats it as a regression and reverts that change.
//!
//! Guardrails: every proposed setting is within the device's [`Bounds`]; at most one change per
//! `min_change_interval_ms`; a pinned device is measured, never changed; in dry run the tuner
//! only recommends; after `max_apply_failures` failed applications in a row it freezes.

use std::collections::VecDeque;

use enlight_driver::settings::DeviceSettings;
use serde::{Deserialize, Serialize};

use super::measure::{compare, compare_p99, Cmp, Measurement, Metric};
use super::window::Window;
use super::{Action, Bounds, Controller, Direction, Knob, Objective, TunerMode, TunerState};

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
        if self.phase_windows == 0 || self.max_apply_failures == 0 {
            return Err("phase_windows and max_apply_failures must be at least 1".into());
        }
        Ok(())
    }
}

/// A decision of the tuner.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub action: Action,
    pub to: DeviceSettings,
    pub reason: String,
    /// The objective's value measured at the settings in force before the decision.
    pub objective_value: Option<f64>,
}

#[derive(Debug, Clone)]
enum Phase {
    /// Measuring the incumbent.
    Baseline,
    /// A candidate is in force.
    Trial {
        mv: Move,
        candidate: DeviceSettings,
        m: Measurement,
        skip: u32,
    },
    /// Parked; `recent` holds the last windows, compared with the incumbent's measurement.
    Converged { deviant: u32 },
}

/// One device's tuner.
#[derive(Debug, Clone)]
pub struct DeviceTuner {
    pub policy: Policy,
    pub params: TunerParams,
    phase: Phase,
    /// The best settings known, and their measurement.
    incumbent: Option<DeviceSettings>,
    incumbent_m: Measurement,
    skip: u32,
    queue: VecDeque<Move>,
    best_ops_seen: f64,
    last_change_ms: Option<u64>,
    /// What the tuner believes is in force.
    expected: Option<DeviceSettings>,
    /// Before the last accepted move: settings, measurement, time, the move.
    previous: Option<(DeviceSettings, Measurement, u64, Move)>,
    note: Option<String>,
    failures: u32,
    frozen: bool,
    recommendation: Option<DeviceSettings>,
}

/// One move: a knob, a direction and how many rungs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Move {
    knob: Knob,
    dir: Direction,
    stride: u32,
}

/// Largest stride: a move that made no measurable difference is retried once, four rungs away,
/// so flat stretches of a knob's ladder do not stop the search.
const MAX_STRIDE: u32 = 4;

/// The order in which moves are tried, per objective.
fn prior(objective: Objective) -> VecDeque<Move> {
    prior_pairs(objective)
        .into_iter()
        .map(|(knob, dir)| Move {
            knob,
            dir,
            stride: 1,
        })
        .collect()
}

fn prior_pairs(objective: Objective) -> Vec<(Knob, Direction)> {
    use Direction::{Down, Up};
    use Knob::*;
    match objective {
        Objective::Latency => vec![
            (Moderation, Down),
            (ModerationUsecs, Down),
            (ModerationFrames, Down),
            (PollBudget, Up),
            (PollBudget, Down),
            (ModerationFrames, Up),
            (ModerationUsecs, Up),
            (RingBytes, Up),
        ],
        // Closed-loop I/O completes `depth / latency` ops per second, and moderation adds
        // latency: less of it first. More moderation pays only where interrupts are what limits
        // the CPU, which the moves up find next. (In every throughput scenario of `enlight bench
        // tune` the oracle's point had a shorter moderation delay than the defaults.)
        Objective::Throughput => vec![
            (Moderation, Down),
            (ModerationUsecs, Down),
            (ModerationFrames, Down),
            (Moderation, Up),
            (ModerationFrames, Up),
            (ModerationUsecs, Up),
            (PollBudget, Up),
            (PollBudget, Down),
            (RingBytes, Up),
        ],
        Objective::Balanced => vec![
            (Moderation, Up),
            (ModerationFrames, Up),
            (ModerationUsecs, Up),
            (PollBudget, Up),
            (RingBytes, Up),
            (PollBudget, Down),
            (ModerationFrames, Down),
            (ModerationUsecs, Down),
        ],
    }
}

/// Whether a point has enough windows (and enough of them with a p99) to be compared.
fn ready(p: &TunerParams, m: &Measurement) -> bool {
    m.len() >= p.trial_windows as usize && m.ops >= p.min_point_ops
}

fn fmt_settings_delta(a: &DeviceSettings, b: &DeviceSettings) -> String {
    let mut parts = Vec::new();
    for k in [
        Knob::ModerationUsecs,
        Knob::ModerationFrames,
        Knob::PollBudget,
        Knob::RingBytes,
    ] {
        if k.get(a) != k.get(b) {
            parts.push(format!("{} {}→{}", k.name(), k.get(a), k.get(b)));
        }
    }
    if parts.is_empty() {
        "no knob".into()
    } else {
        parts.join(", ")
    }
}

fn us(ns: Option<u64>) -> String {
    ns.map(|v| format!("{:.1}us", v as f64 / 1e3))
        .unwrap_or_else(|| "n/a".into())
}

impl DeviceTuner {
    /// A tuner that knows nothing yet: its first window tells it what is in force.
    pub fn new(policy: Policy, params: TunerParams) -> DeviceTuner {
        DeviceTuner {
            policy,
            params,
            phase: Phase::Baseline,
            incumbent: None,
            incumbent_m: Measurement::default(),
            skip: 0,
            queue: prior(policy.objective),
            best_ops_seen: 0.0,
            last_change_ms: None,
            expected: None,
            previous: None,
            note: None,
            failures: 0,
            frozen: false,
            recommendation: None,
        }
    }

    /// Where the tuner is.
    pub fn state(&self) -> TunerState {
        if self.frozen {
            TunerState::Frozen
        } else if self.policy.pinned {
            TunerState::Pinned
        } else {
            match self.phase {
                Phase::Trial { .. } => TunerState::Exploring,
                Phase::Converged { .. } => TunerState::Converged,
                Phase::Baseline if self.last_change_ms.is_some() => TunerState::Exploring,
                Phase::Baseline => TunerState::Idle,
            }
        }
    }

    /// The settings the tuner would have in force: in dry run its pending recommendation,
    /// otherwise the best settings it knows.
    pub fn recommendation(&self) -> Option<DeviceSettings> {
        match self.policy.mode {
            TunerMode::DryRun => self.recommendation,
            _ => self.incumbent,
        }
    }

    /// The objective's value at the incumbent.
    pub fn objective_value(&self) -> Option<f64> {
        self.incumbent_m.objective_value(self.policy.objective)
    }

    /// Pins or unpins (pinning also abandons a trial: the settings in force stay).
    pub fn set_pinned(&mut self, pinned: bool) {
        if pinned != self.policy.pinned {
            self.policy.pinned = pinned;
            self.reset(None, "pinned state changed");
        }
    }

    /// The shell reports that applying the last outcome failed: resynchronise from the device
    /// next time, and freeze after too many failures in a row.
    pub fn apply_failed(&mut self, error: &str) {
        self.failures += 1;
        self.expected = None;
        self.phase = Phase::Baseline;
        self.incumbent_m = Measurement::default();
        self.note = Some(format!("applying failed ({error})"));
        if self.failures >= self.params.max_apply_failures {
            self.frozen = true;
        }
    }

    /// The shell reports the settings the device put in force after an outcome.
    pub fn applied(&mut self, in_force: DeviceSettings) {
        self.failures = 0;
        self.expected = Some(in_force);
        if let Phase::Trial { candidate, .. } = &mut self.phase {
            *candidate = in_force;
        } else {
            self.incumbent = Some(in_force);
        }
    }

    /// Unfreezes (operator action: unpin).
    pub fn unfreeze(&mut self) {
        self.frozen = false;
        self.failures = 0;
    }

    fn reset(&mut self, current: Option<DeviceSettings>, why: &str) {
        self.phase = Phase::Baseline;
        if let Some(c) = current {
            self.incumbent = Some(c);
            self.expected = Some(c);
        }
        self.incumbent_m = Measurement::default();
        self.skip = self.params.settle_windows;
        self.queue = prior(self.policy.objective);
        self.note = Some(why.to_string());
    }

    fn cap(&self) -> usize {
        self.params.max_trial_windows as usize
    }

    fn rate_ok(&self, now_ms: u64) -> bool {
        self.last_change_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= self.params.min_change_interval_ms)
    }

    /// Whether `b` is better than `a` for the objective, with the reason either way.
    fn better(&self, a: &Measurement, b: &Measurement) -> (Cmp, String) {
        let p = &self.params;
        let slo = self.policy.slo_p99_ns;
        let (p99a, p99b) = (a.p99_ns(), b.p99_ns());
        let cmp_p99 = compare_p99(a, b, p.min_improvement, p.z, p.tail_cluster);
        let cmp_ops = compare(
            &a.values(Metric::OpsPerSec),
            &b.values(Metric::OpsPerSec),
            p.min_improvement,
            p.z,
        );
        let cmp_irq = compare(
            &a.values(Metric::InterruptsPerOp),
            &b.values(Metric::InterruptsPerOp),
            p.min_improvement,
            p.z,
        );
        let ops_a = a.mean(Metric::OpsPerSec).unwrap_or(0.0);
        let ops_b = b.mean(Metric::OpsPerSec).unwrap_or(0.0);
        let irq_a = a.mean(Metric::InterruptsPerOp).unwrap_or(0.0);
        let irq_b = b.mean(Metric::InterruptsPerOp).unwrap_or(0.0);
        let figures = format!(
            "p99 {}→{}, {:.0}→{:.0} ops/s, {:.3}→{:.3} interrupts/op",
            us(p99a),
            us(p99b),
            ops_a,
            ops_b,
            irq_a,
            irq_b
        );
        let floor = (1.0 - p.throughput_tolerance) * self.best_ops_seen;
        let feasible = |v: Option<u64>| v.is_some_and(|v| v <= slo);
        let verdict = match self.policy.objective {
            Objective::Latency => {
                if ops_b < floor && cmp_ops == Cmp::Lower {
                    (
                        Cmp::Lower,
                        format!("throughput fell below 95% of the best seen ({floor:.0} ops/s)"),
                    )
                } else {
                    (cmp_p99.flip(), "compared p99".to_string())
                }
            }
            Objective::Throughput | Objective::Balanced => {
                let (fa, fb) = (feasible(p99a), feasible(p99b));
                if fa && !fb {
                    (Cmp::Lower, format!("p99 over the SLO of {}", us(Some(slo))))
                } else if !fa && fb {
                    (
                        if cmp_p99 == Cmp::Lower {
                            Cmp::Higher
                        } else {
                            Cmp::Same
                        },
                        "p99 back under the SLO".to_string(),
                    )
                } else if !fa && !fb {
                    (
                        cmp_p99.flip(),
                        format!("both over the SLO of {}: compared p99", us(Some(slo))),
                    )
                } else if self.policy.objective == Objective::Throughput {
                    (cmp_ops, "compared ops/s under the SLO".to_string())
                } else if ops_b < floor && cmp_ops == Cmp::Lower {
                    (
                        Cmp::Lower,
                        format!("throughput fell below 95% of the best seen ({floor:.0} ops/s)"),
                    )
                } else {
                    (
                        cmp_irq.flip(),
                        "compared interrupts/op under the SLO".to_string(),
                    )
                }
            }
        };
        (verdict.0, format!("{}: {figures}", verdict.1))
    }

    fn take_note(&mut self) -> String {
        self.note
            .take()
            .map(|n| format!("{n}; "))
            .unwrap_or_default()
    }

    /// Whether the incumbent keeps p99 under the SLO and throughput within the tolerance of the
    /// best seen (the constraints of `balanced` and `throughput`).
    fn incumbent_meets_constraints(&self) -> bool {
        let m = &self.incumbent_m;
        let floor = (1.0 - self.params.throughput_tolerance) * self.best_ops_seen;
        m.p99_ns().is_some_and(|p| p <= self.policy.slo_p99_ns)
            && m.mean(Metric::OpsPerSec).unwrap_or(0.0) >= floor
    }

    /// Picks the next move from the incumbent, if any is left (and applies the rate limit).
    fn next_move(&mut self, now_ms: u64, bounds: &Bounds) -> Option<Outcome> {
        let incumbent = self.incumbent?;
        if !self.rate_ok(now_ms) {
            return None;
        }
        while let Some(mv) = self.queue.pop_front() {
            // The ring only matters when writers found it full; it is never shrunk for speed.
            if mv.knob == Knob::RingBytes && self.incumbent_m.ring_full == 0 {
                continue;
            }
            // For `balanced`, less moderation can only add interrupts per op: it is worth a
            // trial only to bring p99 back under the SLO or throughput back to the floor.
            let less_moderation = mv.dir == Direction::Down
                && matches!(
                    mv.knob,
                    Knob::Moderation | Knob::ModerationFrames | Knob::ModerationUsecs
                );
            if self.policy.objective == Objective::Balanced
                && less_moderation
                && self.incumbent_meets_constraints()
            {
                continue;
            }
            let Some(candidate) = mv.knob.step_n(&incumbent, mv.dir, mv.stride, bounds) else {
                continue;
            };
            let value = self.objective_value();
            let reason = format!(
                "{}{} objective: trying {} ({} windows measured at the current settings, p99 {})",
                self.take_note(),
                self.policy.objective.name(),
                fmt_settings_delta(&incumbent, &candidate),
                self.incumbent_m.len(),
                us(self.incumbent_m.p99_ns()),
            );
            if self.policy.mode == TunerMode::DryRun {
                // Nothing is applied, so nothing can be measured at the candidate: recommend the
                // first move and keep it until the measurements change the picture.
                self.queue.push_front(mv);
                if self.recommendation == Some(candidate) {
                    return None;
                }
                self.recommendation = Some(candidate);
                return Some(Outcome {
                    action: Action::Recommend,
                    to: candidate,
                    reason: format!("{reason}; dry run: not applied"),
                    objective_value: value,
                });
            }
            self.phase = Phase::Trial {
                mv,
                candidate,
                m: Measurement::default(),
                skip: self.params.settle_windows,
            };
            self.last_change_ms = Some(now_ms);
            self.expected = Some(candidate);
            return Some(Outcome {
                action: Action::Change,
                to: candidate,
                reason,
                objective_value: value,
            });
        }
        self.phase = Phase::Converged { deviant: 0 };
        self.recommendation = None;
        None
    }

    /// One interval: the window just measured at `current`, within `bounds`, at `now_ms`.
    pub fn step(
        &mut self,
        now_ms: u64,
        current: &DeviceSettings,
        bounds: &Bounds,
        window: &Window,
    ) -> Option<Outcome> {
        if self.policy.mode == TunerMode::Off {
            return None;
        }
        match self.expected {
            None => {
                let why = if self.incumbent.is_none() {
                    "started from the settings the device reports"
                } else {
                    "resynchronised with the device"
                };
                self.reset(Some(*current), why);
                // The first window may straddle anything: it is discarded like after a change.
            }
            Some(e) if e != *current => {
                let why = format!(
                    "settings changed outside the tuner ({})",
                    fmt_settings_delta(&e, current)
                );
                self.reset(Some(*current), &why);
                self.previous = None;
            }
            Some(_) => {}
        }
        if self.frozen {
            return None;
        }
        if self.policy.pinned {
            if self.skip > 0 {
                self.skip -= 1;
            } else {
                self.incumbent_m
                    .push(window, self.params.min_window_ops, self.cap());
            }
            return None;
        }
        let cap = self.cap();
        let min_ops = self.params.min_window_ops;
        match &mut self.phase {
            Phase::Baseline => {
                if self.skip > 0 {
                    self.skip -= 1;
                    return None;
                }
                self.incumbent_m.push(window, min_ops, cap);
                if !ready(&self.params, &self.incumbent_m) {
                    return None;
                }
                self.best_ops_seen = self
                    .best_ops_seen
                    .max(self.incumbent_m.mean(Metric::OpsPerSec).unwrap_or(0.0));
                self.next_move(now_ms, bounds)
            }
            Phase::Trial { skip, m, .. } => {
                if *skip > 0 {
                    *skip -= 1;
                    return None;
                }
                m.push(window, min_ops, cap);
                let (done, abandoned) = (ready(&self.params, m), m.len() >= cap);
                // A candidate already significantly worse after two windows is not measured
                // further: most moves are bad, and each bad window costs the workload.
                let early = (!done && !abandoned && m.len() >= 2).then(|| m.clone());
                let early_worse =
                    early.is_some_and(|m| self.better(&self.incumbent_m, &m).0 == Cmp::Lower);
                if !done && !abandoned && !early_worse {
                    return None;
                }
                if !self.rate_ok(now_ms) {
                    return None;
                }
                let Phase::Trial {
                    mv, candidate, m, ..
                } = std::mem::replace(&mut self.phase, Phase::Baseline)
                else {
                    unreachable!("matched above")
                };
                let incumbent = self.incumbent.expect("a trial starts from an incumbent");
                let bpo_a = self.incumbent_m.mean(Metric::BytesPerOp).unwrap_or(0.0);
                let bpo_b = m.mean(Metric::BytesPerOp).unwrap_or(0.0);
                let shifted =
                    bpo_a > 0.0 && ((bpo_b - bpo_a) / bpo_a).abs() > self.params.phase_change;
                let (verdict, why) = if early_worse {
                    let (c, why) = self.better(&self.incumbent_m, &m);
                    (Some(c), format!("{why}, after {} windows", m.len()))
                } else if !done {
                    (
                        None,
                        "not enough samples for a p99 in the trial".to_string(),
                    )
                } else if shifted {
                    (
                        None,
                        format!("the workload changed during the trial (bytes/op {bpo_a:.0}→{bpo_b:.0})"),
                    )
                } else {
                    let (c, why) = self.better(&self.incumbent_m, &m);
                    (Some(c), why)
                };
                if verdict == Some(Cmp::Higher) {
                    self.best_ops_seen = self
                        .best_ops_seen
                        .max(m.mean(Metric::OpsPerSec).unwrap_or(0.0));
                    self.note = Some(format!(
                        "kept {} ({why})",
                        fmt_settings_delta(&incumbent, &candidate)
                    ));
                    self.previous = Some((incumbent, self.incumbent_m.clone(), now_ms, mv));
                    self.incumbent = Some(candidate);
                    self.incumbent_m = m;
                    // Same move again first; never straight back.
                    let mut q: VecDeque<Move> = prior(self.policy.objective)
                        .into_iter()
                        .filter(|o| o.knob != mv.knob)
                        .collect();
                    q.push_front(mv);
                    if mv.stride > 1 {
                        q.push_back(Move { stride: 1, ..mv });
                    }
                    self.queue = q;
                    return self.next_move(now_ms, bounds);
                }
                if verdict == Some(Cmp::Same) && mv.stride < MAX_STRIDE {
                    self.queue.push_front(Move {
                        stride: MAX_STRIDE,
                        ..mv
                    });
                }
                if shifted {
                    self.incumbent_m = Measurement::default();
                }
                self.skip = self.params.settle_windows;
                self.last_change_ms = Some(now_ms);
                self.expected = Some(incumbent);
                let value = m.objective_value(self.policy.objective);
                Some(Outcome {
                    action: Action::Revert,
                    to: incumbent,
                    reason: format!(
                        "{}reverting {}: {why}",
                        self.take_note(),
                        fmt_settings_delta(&incumbent, &candidate)
                    ),
                    objective_value: value,
                })
            }
            Phase::Converged { deviant } => {
                let reference = &self.incumbent_m;
                let pc = self.params.phase_change;
                let rel = |a: f64, b: f64| if a > 0.0 { ((b - a) / a).abs() } else { 0.0 };
                let ops_ref = reference.mean(Metric::OpsPerSec).unwrap_or(0.0);
                let bpo_ref = reference.mean(Metric::BytesPerOp).unwrap_or(0.0);
                let p99_ref = reference.p99_ns().unwrap_or(0) as f64;
                let w_p99 = (window.ops >= min_ops)
                    .then(|| window.quantile_ns(0.99))
                    .flatten()
                    .map(|v| v as f64);
                let d_ops = rel(ops_ref, window.ops_per_sec());
                let d_bpo = rel(bpo_ref, window.bytes_per_op());
                let d_p99 = w_p99.map(|v| rel(p99_ref, v)).unwrap_or(0.0);
                // The workload's signature: rate and size. Not p99: on a busy machine one
                // window's p99 swings by multiples without anything changing.
                let _ = d_p99;
                let deviates = d_ops > pc || d_bpo > pc;
                *deviant = if deviates { *deviant + 1 } else { 0 };
                if *deviant < self.params.phase_windows {
                    return None;
                }
                let what = format!(
                    "ops/s {:.0}→{:.0}, bytes/op {:.0}→{:.0}, p99 {}→{}",
                    ops_ref,
                    window.ops_per_sec(),
                    bpo_ref,
                    window.bytes_per_op(),
                    us(Some(p99_ref as u64)),
                    us(w_p99.map(|v| v as u64))
                );
                let recent_change = self.previous.as_ref().is_some_and(|(_, _, at, _)| {
                    now_ms.saturating_sub(*at) <= self.params.regression_guard_ms
                });
                if recent_change && d_bpo <= pc / 3.0 && self.rate_ok(now_ms) {
                    let (prev, prev_m, _, mv) = self.previous.take().expect("checked");
                    let from = self.incumbent.expect("converged from an incumbent");
                    let value = self.objective_value();
                    self.incumbent = Some(prev);
                    self.incumbent_m = prev_m;
                    self.phase = Phase::Baseline;
                    self.skip = self.params.settle_windows;
                    self.queue = prior(self.policy.objective)
                        .into_iter()
                        .filter(|m| (m.knob, m.dir) != (mv.knob, mv.dir))
                        .collect();
                    self.last_change_ms = Some(now_ms);
                    self.expected = Some(prev);
                    return Some(Outcome {
                        action: Action::Revert,
                        to: prev,
                        reason: format!(
                            "regression after the last change ({what}): reverting {}",
                            fmt_settings_delta(&from, &prev)
                        ),
                        objective_value: value,
                    });
                }
                // A new phase: re-explore from the settings in force.
                self.previous = None;
                self.best_ops_seen = 0.0;
                self.reset(Some(*current), &format!("phase change ({what})"));
                self.skip = 0;
                None
            }
        }
    }
}

impl Controller for DeviceTuner {
    fn name(&self) -> &'static str {
        "enlight"
    }
    fn step(
        &mut self,
        now_ms: u64,
        current: &DeviceSettings,
        bounds: &Bounds,
        window: &Window,
    ) -> Option<Outcome> {
        DeviceTuner::step(self, now_ms, current, bounds, window)
    }
}

#[cfg(test)]
mod tests;
