//! The decision function: one device's tuner as plain state and a `step` that takes the policy,
//! the settings in force, the device's bounds, the last window and the time, and returns what to
//! do. No I/O and no clock, so every guardrail is a property test.
//!
//! How it searches: hill climbing over one knob at a time on fixed ladders ([`super::Knob`]),
//! in an order that depends on the objective (the prior: for latency, less moderation first; for
//! throughput and balanced, more). A move is a *trial*, A-B-A: the incumbent's recent windows
//! (A), the candidate applied and, after a discarded settle window, measured for
//! `trial_windows` windows (B), then the incumbent put back and measured again (A). The judge
//! ([`super::judge`]) estimates the candidate's effect on each metric with the drift of the
//! workload taken out, with confidence intervals, and keeps the candidate only when every
//! constraint of the objective is shown to hold and the objective shown to improve (then the
//! candidate is applied again and the same move is tried next); inconclusive is a revert. When no
//! move is left the tuner is *converged*: it parks, says why, and watches. If the workload then
//! changes (ops/s or bytes per op far from the recent windows', in the same direction for
//! `phase_windows` windows in a row: a step, not a slow drift or a noisy window) it re-explores;
//! if that happens soon after an accepted change on an unchanged workload, it treats it as a
//! regression and reverts that change.
//!
//! Guardrails: every proposed setting is within the device's [`Bounds`]; at most one change per
//! `min_change_interval_ms`; a pinned device is measured, never changed; in dry run the tuner
//! only recommends; after `max_apply_failures` failed applications in a row it freezes.
//!
//! Here: the state, the search (moves, the prior, parking) and the baseline; in `trial`, a
//! trial's later phases (candidate, re-measure, verdict) and the parked tuner's watch; in
//! `params`, the operator's [`Policy`] and the [`TunerParams`].

use std::collections::VecDeque;

use enlight_driver::settings::DeviceSettings;

use super::judge::{self, Judgement, Rules, Segment, Verdict};
use super::measure::{Measurement, Metric};
use super::window::Window;
use super::{
    Action, Bounds, Controller, Direction, Knob, Ladder, Objective, Throughput, TunerMode,
    TunerState,
};

mod params;
mod rounds;
mod trial;

use rounds::{could_be_shown, pool_rounds, EarlierRounds, MAX_ROUNDS};

pub use params::{Policy, TunerParams};

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
    /// A trial: the candidate in force (`Candidate`), then the incumbent again (`Remeasure`).
    Trial {
        mv: Move,
        candidate: DeviceSettings,
        /// The candidate's windows, for the judge and as a measurement.
        b: Segment,
        bm: Measurement,
        skip: u32,
        stage: Stage,
        /// The earlier rounds' windows, while a promising candidate is measured again.
        first: Option<Box<EarlierRounds>>,
    },
    /// Parked: each window is compared with the recent ones (`history`, ops/s and bytes/op) to
    /// tell a phase change; `deviant` counts windows in a row off in the direction `sign`.
    Converged {
        deviant: u32,
        sign: (i8, i8),
        history: VecDeque<(f64, f64)>,
    },
}

#[derive(Debug, Clone)]
enum Stage {
    /// The candidate is in force.
    Candidate,
    /// The incumbent is back in force and measured again.
    Remeasure { a2: Segment },
}

/// Recent windows a parked tuner compares each window with.
const PHASE_HISTORY: usize = 16;

/// One device's tuner.
#[derive(Debug, Clone)]
pub struct DeviceTuner {
    pub policy: Policy,
    pub params: TunerParams,
    /// What the device's throughput is counted in (ops/s; a NIC's bytes/s).
    throughput: Throughput,
    phase: Phase,
    /// The best settings known, and their measurement.
    incumbent: Option<DeviceSettings>,
    incumbent_m: Measurement,
    /// The incumbent's latest windows with their times (the A before a candidate's B).
    a_seg: Segment,
    /// Throughput given up in this phase by kept changes (their estimated effects multiplied).
    ops_budget: f64,
    /// Verdicts since the last kept change: flat, inconclusive, worse.
    tally: [u32; 3],
    /// Something to say that is no decision (parking), for the shell's log.
    announcement: Option<String>,
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
    /// Candidates judged (and not kept) from the current incumbent: not tried again from it.
    judged: Vec<DeviceSettings>,
    /// Changes the device refused to apply, each as the knob values it set
    /// ([`changed_values`]): a candidate setting all of one of them is not proposed again
    /// (until the operator unpins). Without it a refused value (e1000's rx-usecs 5: EINVAL) is
    /// proposed again at once from the resynchronised settings, and three refusals in a row
    /// freeze the whole device.
    refused: Vec<Vec<(Knob, u32)>>,
}

/// The single knobs whose values differ between `from` and `to`, with their values in `to`.
fn changed_values(from: &DeviceSettings, to: &DeviceSettings) -> Vec<(Knob, u32)> {
    [
        Knob::ModerationUsecs,
        Knob::ModerationFrames,
        Knob::PollBudget,
        Knob::RingBytes,
    ]
    .into_iter()
    .filter(|k| k.get(from) != k.get(to))
    .map(|k| (k, k.get(to)))
    .collect()
}

/// One move: a knob, a direction and how many rungs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Move {
    knob: Knob,
    dir: Direction,
    stride: u32,
}

impl Move {
    /// Whether the move lowers a moderation knob (fewer completions per interrupt, shorter
    /// delays: more interrupts per op, lower latency).
    fn less_moderation(&self) -> bool {
        self.dir == Direction::Down
            && matches!(
                self.knob,
                Knob::Moderation | Knob::ModerationFrames | Knob::ModerationUsecs
            )
    }
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

/// Whether the workload changed during a trial: its bytes per op moved by more than
/// `threshold` (relative), as `(from, to)`. On a device counted in ops the candidate's windows
/// are compared with the incumbent's after it (a disk's request sizes are the workload's). On a
/// NIC, counted in bytes, the moderation knobs themselves change bytes per packet (GRO merges
/// more segments when NAPI polls later), so the candidate's windows say nothing about the
/// workload: the incumbent's before and after the candidate are compared instead.
fn workload_shift(
    unit: Throughput,
    a_before: &Segment,
    b: &Segment,
    a_after: &Segment,
    threshold: f64,
) -> Option<(f64, f64)> {
    let bpo = |s: &Segment| s.mean(|w| w.bytes_per_op).unwrap_or(0.0);
    let (from, to) = match unit {
        Throughput::Ops => (bpo(a_after), bpo(b)),
        Throughput::Bytes => (bpo(a_before), bpo(a_after)),
    };
    (from > 0.0 && ((to - from) / from).abs() > threshold).then_some((from, to))
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

fn pct(v: f64) -> String {
    format!("{:+.1}%", v * 100.0)
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
            throughput: Throughput::Ops,
            phase: Phase::Baseline,
            incumbent: None,
            incumbent_m: Measurement::default(),
            a_seg: Segment::default(),
            ops_budget: 1.0,
            tally: [0; 3],
            announcement: None,
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
            judged: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// The same tuner counting throughput in `unit` ([`Throughput::of_device`]: a NIC's
    /// bytes/s).
    pub fn counting(mut self, unit: Throughput) -> DeviceTuner {
        self.throughput = unit;
        self
    }

    /// What throughput is counted in.
    pub fn throughput(&self) -> Throughput {
        self.throughput
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
        self.incumbent_m
            .objective_value(self.policy.objective, self.throughput)
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
        let mut never_again = String::new();
        if let (
            Phase::Trial {
                candidate,
                stage: Stage::Candidate,
                ..
            },
            Some(incumbent),
        ) = (&self.phase, &self.incumbent)
        {
            let change = changed_values(incumbent, candidate);
            if !change.is_empty() && !self.refused.contains(&change) {
                never_again = format!(
                    "; not proposed again: {}",
                    change
                        .iter()
                        .map(|(k, v)| format!("{} {v}", k.name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.refused.push(change);
            }
        }
        self.phase = Phase::Baseline;
        self.incumbent_m = Measurement::default();
        self.a_seg = Segment::default();
        self.note = Some(format!("applying failed ({error}){never_again}"));
        if self.failures >= self.params.max_apply_failures {
            self.frozen = true;
        }
    }

    /// The shell reports the settings the device put in force after an outcome.
    pub fn applied(&mut self, in_force: DeviceSettings) {
        self.failures = 0;
        self.expected = Some(in_force);
        match &mut self.phase {
            Phase::Trial {
                candidate,
                stage: Stage::Candidate,
                ..
            } => *candidate = in_force,
            _ => self.incumbent = Some(in_force),
        }
    }

    /// Unfreezes (operator action: unpin).
    pub fn unfreeze(&mut self) {
        self.frozen = false;
        self.failures = 0;
        self.refused.clear();
    }

    fn reset(&mut self, current: Option<DeviceSettings>, why: &str) {
        self.phase = Phase::Baseline;
        if let Some(c) = current {
            self.incumbent = Some(c);
            self.expected = Some(c);
        }
        self.incumbent_m = Measurement::default();
        self.a_seg = Segment::default();
        self.ops_budget = 1.0;
        self.tally = [0; 3];
        self.judged.clear();
        self.skip = self.params.settle_windows;
        self.queue = prior(self.policy.objective);
        self.note = Some(why.to_string());
    }

    /// What the tuner has to say that is no decision (that it parked, and why), once.
    pub fn take_announcement(&mut self) -> Option<String> {
        self.announcement.take()
    }

    /// The judge's rules for this device now.
    fn rules(&self) -> Rules {
        let p = &self.params;
        Rules {
            objective: self.policy.objective,
            throughput: self.throughput,
            slo_p99_ns: self.policy.slo_p99_ns,
            z: p.z,
            margin: p.min_improvement,
            tolerance: p.throughput_tolerance,
            cluster: p.tail_cluster,
            ops_budget: self.ops_budget,
        }
    }

    fn cap(&self) -> usize {
        self.params.max_trial_windows as usize
    }

    fn rate_ok(&self, now_ms: u64) -> bool {
        self.last_change_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= self.params.min_change_interval_ms)
    }

    fn take_note(&mut self) -> String {
        self.note
            .take()
            .map(|n| format!("{n}; "))
            .unwrap_or_default()
    }

    /// Whether less moderation is worth a trial for `balanced`, where it can only add
    /// interrupts per op: to bring throughput back to its floor (within the tolerance of the
    /// best seen), or p99 back under the SLO where the moderation in force could account for
    /// the excess ([`Self::moderation_can_repair`]); or where p99 is not measured at all.
    fn less_moderation_can_help(&self, incumbent: &DeviceSettings) -> bool {
        let m = &self.incumbent_m;
        let floor = (1.0 - self.params.throughput_tolerance) * self.best_ops_seen;
        let under_floor = m.mean(Metric::throughput(self.throughput)).unwrap_or(0.0) < floor;
        match m.p99_ns() {
            None => true,
            Some(p99) if p99 > self.policy.slo_p99_ns => {
                under_floor || self.moderation_can_repair(p99, incumbent)
            }
            Some(_) => under_floor,
        }
    }

    /// Whether less moderation could bring a p99 of `p99_ns` under the SLO: moderation holds a
    /// completion back by at most `moderation_usecs`, so cutting it lowers p99 by at most that
    /// much. A deep queue's p99 of 20 ms against an SLO of 5 ms (`enlight demo` on a busy
    /// machine) is queueing, which 50 µs of moderation neither caused nor can repair; trying
    /// less moderation there only adds interrupts.
    fn moderation_can_repair(&self, p99_ns: u64, incumbent: &DeviceSettings) -> bool {
        let excess = p99_ns.saturating_sub(self.policy.slo_p99_ns);
        excess <= u64::from(incumbent.moderation_usecs) * 1000
    }

    /// Puts the queued moves that `first` picks ahead of the others, each group in its order.
    fn moves_first(&mut self, first: impl Fn(&Move) -> bool) {
        let (picked, rest): (Vec<Move>, Vec<Move>) = self.queue.drain(..).partition(first);
        self.queue = picked.into_iter().chain(rest).collect();
    }

    /// Picks the next move from the incumbent, if any is left (and applies the rate limit).
    fn next_move(&mut self, now_ms: u64, bounds: &Bounds) -> Option<Outcome> {
        let incumbent = self.incumbent?;
        if !self.rate_ok(now_ms) {
            return None;
        }
        // An incumbent over the SLO (a constraint of `throughput` and `balanced`) by what
        // moderation could account for is repaired first: the moves that can bring p99 down go
        // to the front, before a run of trials within the noise parks the tuner
        // (`max_fruitless_trials`) with them untried.
        let repairable = self.incumbent_m.p99_ns().is_some_and(|p| {
            p > self.policy.slo_p99_ns && self.moderation_can_repair(p, &incumbent)
        });
        if self.policy.objective != Objective::Latency && repairable {
            self.moves_first(Move::less_moderation);
        }
        // Writers found the ring full: the windows point at the ring, so its move goes first,
        // before a run of trials within the noise parks the tuner with it untried.
        if self.incumbent_m.ring_full > 0 {
            self.moves_first(|m| m.knob == Knob::RingBytes);
        }
        while let Some(mv) = self.queue.pop_front() {
            // The ring only matters when writers found it full; it is never shrunk for speed.
            if mv.knob == Knob::RingBytes && self.incumbent_m.ring_full == 0 {
                continue;
            }
            // NAPI defers interrupts only under a timer (napi_complete_done keeps the IRQ off
            // only while gro_flush_timeout is set), so moving napi_defer_hard_irqs alone while
            // the timeout is 0 is a trial of a no-op (bench tune kernel-tcp: 6-14 s of each
            // run spent on it).
            if mv.knob == Knob::ModerationFrames
                && bounds.frames_ladder == Ladder::Napi
                && bounds.usecs_ladder == Ladder::Napi
                && incumbent.moderation_usecs == 0
            {
                continue;
            }
            // For `balanced`, less moderation can only add interrupts per op.
            if self.policy.objective == Objective::Balanced
                && mv.less_moderation()
                && !self.less_moderation_can_help(&incumbent)
            {
                continue;
            }
            let Some(candidate) = mv.knob.step_n(&incumbent, mv.dir, mv.stride, bounds) else {
                continue;
            };
            // A longer stride that lands where a shorter one already did (a ladder's end).
            if self.judged.contains(&candidate) {
                continue;
            }
            let change = changed_values(&incumbent, &candidate);
            if self
                .refused
                .iter()
                .any(|r| r.iter().all(|v| change.contains(v)))
            {
                continue;
            }
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
                b: Segment::default(),
                bm: Measurement::default(),
                skip: self.params.settle_windows,
                stage: Stage::Candidate,
                first: None,
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
        self.converge();
        None
    }

    /// No move left: park, and say why.
    fn converge(&mut self) {
        let history = self
            .a_seg
            .samples
            .iter()
            .map(|w| (w.ops_per_sec, w.bytes_per_op))
            .collect();
        self.phase = Phase::Converged {
            deviant: 0,
            sign: (0, 0),
            history,
        };
        self.recommendation = None;
        if self.policy.mode == TunerMode::DryRun {
            return;
        }
        let [flat, inconclusive, worse] = self.tally;
        let settings = self
            .incumbent
            .map(|s| {
                format!(
                    "moderation_usecs {}, moderation_frames {}, poll_budget {}, ring_bytes {}",
                    s.moderation_usecs,
                    s.moderation_frames,
                    s.poll_budget,
                    Knob::RingBytes.get(&s)
                )
            })
            .unwrap_or_default();
        let note = self.take_note();
        let why = if flat + inconclusive >= self.params.max_fruitless_trials {
            "the moves left would not pay for their trials: none of the last stood out of the \
             noise on the"
        } else {
            "no move left whose effect stands out of the noise on the"
        };
        self.announcement = Some(format!(
            "{note}parked at {settings}: {why} {} objective ({} trials since the last kept \
             change: {flat} flat within ±{:.0}%, {inconclusive} inconclusive, {worse} worse); \
             exploring again on a phase change",
            self.policy.objective.name(),
            flat + inconclusive + worse,
            self.params.min_improvement * 100.0,
        ));
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
                // What led here (an application that failed, and why) stays in the reason.
                let why = format!("{}{why}", self.take_note());
                self.reset(Some(*current), &why);
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
        match self.phase {
            Phase::Baseline => self.step_baseline(now_ms, bounds, window),
            Phase::Trial {
                stage: Stage::Candidate,
                ..
            } => self.step_candidate(now_ms, window),
            Phase::Trial {
                stage: Stage::Remeasure { .. },
                ..
            } => self.step_remeasure(now_ms, bounds, window),
            Phase::Converged { .. } => self.step_converged(now_ms, current, window),
        }
    }

    /// Measuring the incumbent: once it has enough windows, the next move (if any).
    fn step_baseline(&mut self, now_ms: u64, bounds: &Bounds, window: &Window) -> Option<Outcome> {
        let cap = self.cap();
        let min_ops = self.params.min_window_ops;
        let t_s = now_ms as f64 / 1e3;
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        self.incumbent_m.push(window, min_ops, cap);
        self.a_seg.push(t_s, window, min_ops);
        self.a_seg.keep_last(cap);
        let a_ready = self.a_seg.len() >= self.params.trial_windows as usize
            && self.a_seg.ops() >= self.params.min_point_ops;
        if !ready(&self.params, &self.incumbent_m) || !a_ready {
            return None;
        }
        self.best_ops_seen = self.best_ops_seen.max(
            self.incumbent_m
                .mean(Metric::throughput(self.throughput))
                .unwrap_or(0.0),
        );
        self.next_move(now_ms, bounds)
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
