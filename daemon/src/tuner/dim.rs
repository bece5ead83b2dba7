//! The DIM-style baseline: a port of the decision logic of Linux's `lib/dim` (`net_dim.c`,
//! `dim.c`), for comparison only.
//!
//! Like net_dim it keeps a table of moderation profiles and an index into it. Each measurement
//! (here: each window) is compared with the previous one: bytes/ms first, then packets (ops)/ms,
//! then events (interrupts)/ms, a difference counting when it exceeds 10%. While *going right*
//! or *left* it steps through the table as long as the comparison says "better" and turns
//! otherwise; when it turns back onto where it came from (`dim_on_top`) or reaches an edge it
//! *parks on top*; a parked DIM leaves when the figures change; after 2 × profiles steps it
//! *parks tired* for that many measurements. It never looks at latency.
//!
//! The profile table is net_dim's RX CQE-based table, `(usec, pkts)` mapped onto
//! `moderation_usecs` and `moderation_frames`; the other knobs stay as they are. It starts at
//! net_dim's default CQE profile (index 1).

use enlight_driver::settings::DeviceSettings;

use super::decide::Outcome;
use super::window::Window;
use super::{Action, Bounds, Controller};

/// net_dim's `NET_DIM_RX_CQE_PROFILES`: `(usec, pkts)`.
pub const PROFILES: [(u32, u32); 5] = [(2, 256), (8, 128), (16, 64), (32, 64), (64, 64)];
/// net_dim's `NET_DIM_DEF_PROFILE_CQE`.
pub const DEFAULT_PROFILE: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TuneState {
    ParkingOnTop,
    ParkingTired,
    GoingRight,
    GoingLeft,
}

/// `struct dim_stats`, per millisecond.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Stats {
    ppms: f64,
    bpms: f64,
    epms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatsCmp {
    Better,
    Worse,
    Same,
}

/// The DIM-style controller.
#[derive(Debug, Clone)]
pub struct Dim {
    profile_ix: usize,
    tune_state: TuneState,
    steps_left: u32,
    steps_right: u32,
    tired: u32,
    prev: Stats,
    started: bool,
}

impl Default for Dim {
    fn default() -> Self {
        Dim {
            profile_ix: DEFAULT_PROFILE,
            tune_state: TuneState::GoingRight,
            steps_left: 0,
            steps_right: 0,
            tired: 0,
            prev: Stats::default(),
            started: false,
        }
    }
}

/// `IS_SIGNIFICANT_DIFF`: more than 10% of the reference.
fn significant(val: f64, reference: f64) -> bool {
    reference != 0.0 && 100.0 * (val - reference).abs() / reference > 10.0
}

/// `net_dim_stats_compare`.
fn stats_compare(curr: &Stats, prev: &Stats) -> StatsCmp {
    use StatsCmp::*;
    if prev.bpms == 0.0 {
        return if curr.bpms != 0.0 { Better } else { Same };
    }
    if significant(curr.bpms, prev.bpms) {
        return if curr.bpms > prev.bpms { Better } else { Worse };
    }
    if prev.ppms == 0.0 {
        return if curr.ppms != 0.0 { Better } else { Same };
    }
    if significant(curr.ppms, prev.ppms) {
        return if curr.ppms > prev.ppms { Better } else { Worse };
    }
    if prev.epms == 0.0 {
        return Same;
    }
    if significant(curr.epms, prev.epms) {
        return if curr.epms < prev.epms { Better } else { Worse };
    }
    Same
}

const NUM_PROFILES: u32 = PROFILES.len() as u32;

enum StepResult {
    Stepped,
    TooTired,
    OnEdge,
}

impl Dim {
    /// The settings of profile `ix` applied onto `base`, clamped into `bounds`.
    pub fn profile_settings(ix: usize, base: &DeviceSettings, bounds: &Bounds) -> DeviceSettings {
        let (usecs, pkts) = PROFILES[ix];
        DeviceSettings {
            moderation_usecs: usecs.clamp(bounds.moderation_usecs.0, bounds.moderation_usecs.1),
            moderation_frames: pkts.clamp(bounds.moderation_frames.0, bounds.moderation_frames.1),
            ..*base
        }
    }

    fn on_top(&self) -> bool {
        match self.tune_state {
            TuneState::ParkingOnTop | TuneState::ParkingTired => true,
            TuneState::GoingRight => self.steps_left > 1 && self.steps_right == 1,
            TuneState::GoingLeft => self.steps_right > 1 && self.steps_left == 1,
        }
    }

    fn turn(&mut self) {
        match self.tune_state {
            TuneState::GoingRight => {
                self.tune_state = TuneState::GoingLeft;
                self.steps_left = 0;
            }
            TuneState::GoingLeft => {
                self.tune_state = TuneState::GoingRight;
                self.steps_right = 0;
            }
            _ => {}
        }
    }

    fn park_on_top(&mut self) {
        self.steps_right = 0;
        self.steps_left = 0;
        self.tired = 0;
        self.tune_state = TuneState::ParkingOnTop;
    }

    fn park_tired(&mut self) {
        self.steps_right = 0;
        self.steps_left = 0;
        self.tune_state = TuneState::ParkingTired;
    }

    fn step_profile(&mut self) -> StepResult {
        if self.tired == NUM_PROFILES * 2 {
            return StepResult::TooTired;
        }
        match self.tune_state {
            TuneState::GoingRight => {
                if self.profile_ix == PROFILES.len() - 1 {
                    return StepResult::OnEdge;
                }
                self.profile_ix += 1;
                self.steps_right += 1;
            }
            TuneState::GoingLeft => {
                if self.profile_ix == 0 {
                    return StepResult::OnEdge;
                }
                self.profile_ix -= 1;
                self.steps_left += 1;
            }
            _ => {}
        }
        self.tired += 1;
        StepResult::Stepped
    }

    fn exit_parking(&mut self) {
        self.tune_state = if self.profile_ix > 0 {
            TuneState::GoingLeft
        } else {
            TuneState::GoingRight
        };
        self.step_profile();
    }

    /// `net_dim_decision`: whether the profile changed.
    fn decision(&mut self, curr: Stats) -> bool {
        let prev_state = self.tune_state;
        let prev_ix = self.profile_ix;
        match self.tune_state {
            TuneState::ParkingOnTop => {
                if stats_compare(&curr, &self.prev) != StatsCmp::Same {
                    self.exit_parking();
                }
            }
            TuneState::ParkingTired => {
                self.tired = self.tired.saturating_sub(1);
                if self.tired == 0 {
                    self.exit_parking();
                }
            }
            TuneState::GoingRight | TuneState::GoingLeft => {
                if stats_compare(&curr, &self.prev) != StatsCmp::Better {
                    self.turn();
                }
                if self.on_top() {
                    self.park_on_top();
                } else {
                    match self.step_profile() {
                        StepResult::OnEdge => self.park_on_top(),
                        StepResult::TooTired => self.park_tired(),
                        StepResult::Stepped => {}
                    }
                }
            }
        }
        if prev_state != TuneState::ParkingOnTop || self.tune_state != TuneState::ParkingOnTop {
            self.prev = curr;
        }
        self.profile_ix != prev_ix
    }
}

impl Controller for Dim {
    fn name(&self) -> &'static str {
        "dim"
    }

    fn step(
        &mut self,
        _now_ms: u64,
        current: &DeviceSettings,
        bounds: &Bounds,
        window: &Window,
    ) -> Option<Outcome> {
        let target = Dim::profile_settings(self.profile_ix, current, bounds);
        if !self.started || *current != target {
            // First sample, or the device is not on our profile yet: put it there (net_dim
            // starts from its default profile).
            self.started = true;
            if *current != target {
                return Some(Outcome {
                    action: Action::Change,
                    to: target,
                    reason: format!("dim: start at profile {}", self.profile_ix),
                    objective_value: None,
                });
            }
            return None;
        }
        let ms = window.duration_s * 1e3;
        if ms <= 0.0 || window.ops == 0 {
            return None;
        }
        let curr = Stats {
            ppms: window.ops as f64 / ms,
            bpms: window.bytes as f64 / ms,
            epms: window.interrupts as f64 / ms,
        };
        let from = self.profile_ix;
        if self.decision(curr) {
            Some(Outcome {
                action: Action::Change,
                to: Dim::profile_settings(self.profile_ix, current, bounds),
                reason: format!(
                    "dim: profile {from}→{} ({:?})",
                    self.profile_ix, self.tune_state
                ),
                objective_value: None,
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(ops: u64, interrupts: u64) -> Window {
        Window::uniform(1.0, ops, 50_000, interrupts)
    }

    #[test]
    fn climbs_while_better_then_parks_on_top() {
        let mut d = Dim::default();
        let b = Bounds::default();
        let mut s = DeviceSettings::default();
        // Moves the device onto the default profile first.
        let o = d.step(0, &s, &b, &w(1000, 100)).unwrap();
        assert_eq!(o.to.moderation_usecs, PROFILES[DEFAULT_PROFILE].0);
        s = o.to;
        // Throughput rising by more than 10% per window: keeps going right.
        let mut ix = vec![];
        for (i, ops) in [1000u64, 1200, 1500, 1500, 1500, 1500]
            .into_iter()
            .enumerate()
        {
            if let Some(o) = d.step(i as u64, &s, &b, &w(ops, 100)) {
                s = o.to;
            }
            ix.push(d.profile_ix);
        }
        // 1 → 2 (the first sample beats the empty previous one), 3, 4 while better; then the
        // figures stay the same and DIM, as in the kernel, turns at every sample (4 → 3 → 4 ...)
        // until it has made 2 × 5 steps and parks tired.
        assert_eq!(ix, vec![2, 3, 4, 3, 4, 3], "{:?}", d.tune_state);
        for i in 0..10 {
            if let Some(o) = d.step(20 + i, &s, &b, &w(1500, 100)) {
                s = o.to;
            }
        }
        assert_eq!(d.tune_state, TuneState::ParkingTired);
        // Parked tired: it stays for `tired` samples, then leaves and steps again.
        let changes = (0..20)
            .filter(|i| {
                d.step(40 + i, &s, &b, &w(1500, 100))
                    .map(|o| s = o.to)
                    .is_some()
            })
            .count();
        assert!(changes >= 1, "leaves the parking after its tired count");
    }

    #[test]
    fn comparison_order_is_bytes_then_packets_then_events() {
        let a = Stats {
            ppms: 10.0,
            bpms: 100.0,
            epms: 5.0,
        };
        assert_eq!(
            stats_compare(&Stats { bpms: 120.0, ..a }, &a),
            StatsCmp::Better
        );
        assert_eq!(
            stats_compare(
                &Stats {
                    bpms: 105.0,
                    ppms: 5.0,
                    ..a
                },
                &a
            ),
            StatsCmp::Worse
        );
        assert_eq!(
            stats_compare(&Stats { epms: 2.0, ..a }, &a),
            StatsCmp::Better
        );
        assert_eq!(stats_compare(&Stats { epms: 5.4, ..a }, &a), StatsCmp::Same);
    }
}
