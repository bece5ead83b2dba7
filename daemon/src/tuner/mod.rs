//! The auto-tuner: picks each device's ring size, interrupt moderation and polling budget from
//! the eBPF-fed latency histograms, and applies them through the device's control interface.
//!
//! The parts, from pure to effectful:
//! - [`window`]: one interval's deltas of the cumulative counters and latency buckets.
//! - [`measure`]: a settings point's windows together, and the statistics that decide whether
//!   one point is better than another with confidence (not from a single sample).
//! - [`judge`]: how a trial is judged: the incumbent measured before and after the candidate
//!   (A-B-A), each effect with the drift taken out and a confidence interval, and the verdict as
//!   a non-inferiority test (every constraint shown to hold and the objective shown improved).
//! - [`decide`]: [`decide::DeviceTuner`], the pure decision function: (policy, current settings,
//!   bounds, window, time) → a change, a revert, a recommendation or nothing, with a reason. No
//!   I/O, no clock: everything it knows comes in as arguments, so it is property-tested.
//! - [`dim`] and [`Static`]: the baselines the benchmark compares it with (a controller after
//!   Linux's `lib/dim`, and static defaults).
//! - [`backend`]: how settings are read and applied ([`backend::SettingsBackend`]); synthetic
//!   devices through their control socket, kernel devices later through ethtool/sysfs.
//! - [`audit`]: the JSON-lines audit log; [`shell`]: the async loop in enlightd that ticks with
//!   the collector, feeds windows to the tuners, applies and records every decision.
//! - [`config`]: the `[tuner]` section of enlightd's TOML.

pub mod audit;
pub mod backend;
pub mod config;
pub mod decide;
pub mod dim;
pub mod judge;
pub mod measure;
pub mod shell;
pub mod window;

use enlight_driver::settings::{DeviceSettings, SettingsLimits};
use serde::{Deserialize, Serialize};

pub use decide::{DeviceTuner, TunerParams};
pub use window::{Cumulative, Window};

/// What the tuner optimises for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Lowest p99 latency while throughput stays within 5% of the best seen.
    Latency,
    /// Highest throughput ([`Throughput`]: ops/s, a NIC's bytes/s) with p99 under the SLO.
    Throughput,
    /// Fewest interrupts per op ([`Signal`]: NAPI polls per op on a NIC without interrupts)
    /// with p99 under the SLO.
    #[default]
    Balanced,
}

/// What a device's throughput is counted in: what its user means by it. A disk's ops are its
/// requests; a NIC's ops are packets or frames, whose size the moderation knobs themselves
/// change (GRO merges more segments per packet when NAPI polls later; a synthetic NIC's frames
/// carry what the guest aggregated): more packets per second can carry fewer bytes (`bench
/// tune` kernel-tcp: +41% packets/s, -26% bytes/s), so a NIC's throughput is its bytes/s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Throughput {
    /// Completions per second (disks).
    #[default]
    Ops,
    /// Bytes per second (NICs, synthetic and kernel).
    Bytes,
}

impl Throughput {
    /// The unit of a device by its registry type (`nic`, `disk`).
    pub fn of_device(device: &str) -> Throughput {
        if device == "nic" {
            Throughput::Bytes
        } else {
            Throughput::Ops
        }
    }

    /// The unit's name in reasons (`ops/s`, `bytes/s`).
    pub fn name(self) -> &'static str {
        match self {
            Throughput::Ops => "ops/s",
            Throughput::Bytes => "bytes/s",
        }
    }
}

/// The signalling cost `balanced` minimises per op: interrupts, or, on a device whose windows
/// have no interrupt at all but NAPI polls (a veth, which has no IRQ: the sender schedules the
/// receiver's poll instead), the NAPI polls, the analogue (each poll is the softirq work an
/// interrupt would have started; deferral and GRO's timer batch more packets per poll).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    Interrupts,
    NapiPolls,
}

impl Signal {
    /// Which one counts for windows with these totals: interrupts, unless there were none at
    /// all and NAPI polls there were.
    pub fn of(interrupts: u64, napi_polls: u64) -> Signal {
        if interrupts == 0 && napi_polls > 0 {
            Signal::NapiPolls
        } else {
            Signal::Interrupts
        }
    }

    /// Its per-op name in reasons.
    pub fn per_op(self) -> &'static str {
        match self {
            Signal::Interrupts => "interrupts/op",
            Signal::NapiPolls => "napi polls/op",
        }
    }
}

impl Objective {
    /// The name used in config, API and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Objective::Latency => "latency",
            Objective::Throughput => "throughput",
            Objective::Balanced => "balanced",
        }
    }
}

/// Whether the tuner acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TunerMode {
    /// No tuner for the device.
    #[default]
    Off,
    /// Decide and apply.
    Auto,
    /// Decide and recommend; never apply.
    DryRun,
}

/// Where a device's tuner is (contract 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TunerState {
    /// Measuring the current settings, nothing under trial (the default, for a view that does
    /// not say).
    #[default]
    Idle,
    /// Trying a candidate setting.
    Exploring,
    /// No neighbour of the current settings is better: parked, watching for a phase change.
    Converged,
    /// Pinned by the operator: measured, never changed.
    Pinned,
    /// Stopped by the tuner itself after repeated failures to apply a change.
    Frozen,
}

/// What a decision does (contract 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Apply new settings.
    Change,
    /// Go back to settings that were better.
    Revert,
    /// Dry run: what would be applied (the default, for a decision that does not say: the
    /// action that changes nothing).
    #[default]
    Recommend,
}

/// The daemon's own types in the tuner's views: its strict enums (its decision code matches on
/// them, its config refuses a value it does not know) and the driver's settings, so the JSON it
/// writes is what it always wrote. Clients read the same views with
/// [`enlight_abi::tuner::Lenient`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Strict;

impl enlight_abi::tuner::TunerTypes for Strict {
    type Settings = DeviceSettings;
    type Mode = TunerMode;
    type Objective = Objective;
    type State = TunerState;
    type Action = Action;
}

/// One recorded decision (contract 6; also one line of the audit log): the one definition,
/// shared with `enlight top`, in the daemon's own types.
pub type Decision = enlight_abi::tuner::Decision<Strict>;

/// The tuner's part of a device in `/api/v1/devices` (contract 6): the one definition, shared
/// with `enlight top`, in the daemon's own types.
pub type TunerView = enlight_abi::tuner::TunerView<Strict>;

/// The wire value a client reads (the same string).
impl From<TunerMode> for enlight_abi::tuner::Mode {
    fn from(m: TunerMode) -> Self {
        use enlight_abi::tuner::Mode;
        match m {
            TunerMode::Off => Mode::Off,
            TunerMode::Auto => Mode::Auto,
            TunerMode::DryRun => Mode::DryRun,
        }
    }
}

/// The wire value a client reads (the same string).
impl From<Objective> for enlight_abi::tuner::Objective {
    fn from(o: Objective) -> Self {
        use enlight_abi::tuner::Objective as O;
        match o {
            Objective::Latency => O::Latency,
            Objective::Throughput => O::Throughput,
            Objective::Balanced => O::Balanced,
        }
    }
}

/// The wire value a client reads (the same string).
impl From<TunerState> for enlight_abi::tuner::State {
    fn from(s: TunerState) -> Self {
        use enlight_abi::tuner::State;
        match s {
            TunerState::Idle => State::Idle,
            TunerState::Exploring => State::Exploring,
            TunerState::Converged => State::Converged,
            TunerState::Pinned => State::Pinned,
            TunerState::Frozen => State::Frozen,
        }
    }
}

/// The wire value a client reads (the same string).
impl From<Action> for enlight_abi::tuner::Action {
    fn from(a: Action) -> Self {
        use enlight_abi::tuner::Action as A;
        match a {
            Action::Change => A::Change,
            Action::Revert => A::Revert,
            Action::Recommend => A::Recommend,
        }
    }
}

/// The range of each knob a device accepts (from its control interface).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    pub ring_bytes: (u32, u32),
    pub ring_page: u32,
    pub moderation_frames: (u32, u32),
    pub moderation_usecs: (u32, u32),
    /// The smallest non-zero moderation delay the device takes as a delay (1 for most; e1000's
    /// rx-usecs 1-4 are modes and 5-9 refused): ladder rungs between 0 and it are skipped.
    pub moderation_usecs_floor: u32,
    pub poll_budget: (u32, u32),
    /// The ladders the two moderation knobs ride: NAPI's knobs (`napi_defer_hard_irqs`,
    /// `gro_flush_timeout`) take coarse ones, see [`Ladder`].
    #[serde(default)]
    pub frames_ladder: Ladder,
    #[serde(default)]
    pub usecs_ladder: Ladder,
}

/// Which rungs a moderation knob rides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Ladder {
    /// [`FRAMES_LADDER`], [`USECS_LADDER`]: a device's own coalescing.
    #[default]
    Fine,
    /// [`NAPI_DEFER_LADDER`], [`NAPI_TIMEOUT_LADDER`]: NAPI moderation, whose effect comes in
    /// orders of magnitude (a deferral count of 1 against 32, a GRO timer of 10 µs against
    /// 200 µs), so the fine ladders' small rungs (5, 10, 20 µs) took trial after trial, each
    /// judged flat, before reaching where the effect is (`bench tune` kernel-tcp: the oracle's
    /// points at 200 µs).
    Napi,
}

impl Default for Bounds {
    /// The synthetic devices' limits ([`SettingsLimits`]).
    fn default() -> Self {
        Bounds {
            ring_bytes: (SettingsLimits::RING_MIN, SettingsLimits::RING_MAX),
            ring_page: enlight_driver::ring::PAGE_SIZE as u32,
            moderation_frames: (
                *SettingsLimits::FRAMES.start(),
                *SettingsLimits::FRAMES.end(),
            ),
            moderation_usecs: (*SettingsLimits::USECS.start(), *SettingsLimits::USECS.end()),
            moderation_usecs_floor: 1,
            poll_budget: (
                *SettingsLimits::BUDGET.start(),
                *SettingsLimits::BUDGET.end(),
            ),
            frames_ladder: Ladder::Fine,
            usecs_ladder: Ladder::Fine,
        }
    }
}

impl Bounds {
    /// Whether every knob of `s` is within these bounds.
    pub fn contains(&self, s: &DeviceSettings) -> bool {
        let within = |v: u32, (lo, hi): (u32, u32)| (lo..=hi).contains(&v);
        within(s.ring_out_bytes, self.ring_bytes)
            && within(s.ring_in_bytes, self.ring_bytes)
            && s.ring_out_bytes.is_multiple_of(self.ring_page.max(1))
            && s.ring_in_bytes.is_multiple_of(self.ring_page.max(1))
            && within(s.moderation_frames, self.moderation_frames)
            && within(s.moderation_usecs, self.moderation_usecs)
            && within(s.poll_budget, self.poll_budget)
    }
}

/// A knob the tuner moves. The two ring directions move together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Knob {
    /// Frames and microseconds together (more or less coalescing): on a device where either
    /// alone is capped by the other, only moving both shows an effect.
    Moderation,
    ModerationUsecs,
    ModerationFrames,
    PollBudget,
    RingBytes,
}

/// Up or down a knob's ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Up,
    Down,
}

impl Direction {
    /// The other way.
    pub fn flip(self) -> Direction {
        match self {
            Direction::Up => Direction::Down,
            Direction::Down => Direction::Up,
        }
    }
}

/// Moderation delays tried, microseconds.
pub const USECS_LADDER: [u32; 8] = [0, 5, 10, 20, 50, 100, 200, 500];
/// Moderation frame counts tried.
pub const FRAMES_LADDER: [u32; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];
/// Polling budgets tried.
pub const BUDGET_LADDER: [u32; 8] = [4, 8, 16, 32, 64, 128, 256, 512];
/// `napi_defer_hard_irqs` values tried (0, no deferral, is the kernel's default): each rung
/// four times the last.
pub const NAPI_DEFER_LADDER: [u32; 5] = [1, 4, 16, 64, 256];
/// `gro_flush_timeout` values tried, microseconds: about four to five times apart, 0 to 1 ms.
pub const NAPI_TIMEOUT_LADDER: [u32; 5] = [0, 10, 50, 200, 1000];
/// Ring sizes tried, in 4 KiB pages.
pub const RING_LADDER_PAGES: [u32; 8] = [4, 8, 16, 32, 64, 128, 256, 512];

impl Knob {
    /// The knob's name (as in `DeviceSettings`; the ring as `ring_bytes`).
    pub fn name(self) -> &'static str {
        match self {
            Knob::Moderation => "moderation",
            Knob::ModerationUsecs => "moderation_usecs",
            Knob::ModerationFrames => "moderation_frames",
            Knob::PollBudget => "poll_budget",
            Knob::RingBytes => "ring_bytes",
        }
    }

    /// The knob's value in `s` (the ring: the larger direction).
    pub fn get(self, s: &DeviceSettings) -> u32 {
        match self {
            Knob::ModerationUsecs => s.moderation_usecs,
            Knob::ModerationFrames | Knob::Moderation => s.moderation_frames,
            Knob::PollBudget => s.poll_budget,
            Knob::RingBytes => s.ring_out_bytes.max(s.ring_in_bytes),
        }
    }

    fn set(self, s: &mut DeviceSettings, v: u32) {
        match self {
            Knob::ModerationUsecs => s.moderation_usecs = v,
            Knob::ModerationFrames | Knob::Moderation => s.moderation_frames = v,
            Knob::PollBudget => s.poll_budget = v,
            Knob::RingBytes => {
                s.ring_out_bytes = v;
                s.ring_in_bytes = v;
            }
        }
    }

    fn ladder(self, b: &Bounds) -> (Vec<u32>, (u32, u32)) {
        match self {
            Knob::ModerationUsecs => (
                match b.usecs_ladder {
                    Ladder::Fine => &USECS_LADDER[..],
                    Ladder::Napi => &NAPI_TIMEOUT_LADDER[..],
                }
                .iter()
                .copied()
                .filter(|&v| v == 0 || v >= b.moderation_usecs_floor)
                .collect(),
                b.moderation_usecs,
            ),
            Knob::ModerationFrames | Knob::Moderation => (
                match b.frames_ladder {
                    Ladder::Fine => FRAMES_LADDER.to_vec(),
                    Ladder::Napi => NAPI_DEFER_LADDER.to_vec(),
                },
                b.moderation_frames,
            ),
            Knob::PollBudget => (BUDGET_LADDER.to_vec(), b.poll_budget),
            Knob::RingBytes => (
                RING_LADDER_PAGES
                    .iter()
                    .map(|p| p * 4096)
                    .filter(|v| v.is_multiple_of(b.ring_page.max(1)))
                    .collect(),
                b.ring_bytes,
            ),
        }
    }

    /// `s` with this knob up to `n` rungs up or down (as far as the ladder and `b` allow), or
    /// `None` when not even one rung lies that way.
    pub fn step_n(
        self,
        s: &DeviceSettings,
        dir: Direction,
        n: u32,
        b: &Bounds,
    ) -> Option<DeviceSettings> {
        let mut out = self.step(s, dir, b)?;
        for _ in 1..n {
            match self.step(&out, dir, b) {
                Some(next) => out = next,
                None => break,
            }
        }
        Some(out)
    }

    /// `s` with this knob one rung up or down its ladder, or `None` when no rung within `b` lies
    /// that way. Values between rungs step to the nearest rung in the direction.
    pub fn step(self, s: &DeviceSettings, dir: Direction, b: &Bounds) -> Option<DeviceSettings> {
        if self == Knob::Moderation {
            let frames = Knob::ModerationFrames.step(s, dir, b);
            let both = Knob::ModerationUsecs.step(frames.as_ref().unwrap_or(s), dir, b);
            return both.or(frames);
        }
        let (ladder, (lo, hi)) = self.ladder(b);
        let cur = self.get(s);
        let next = match dir {
            Direction::Up => ladder.iter().copied().find(|&v| v > cur),
            Direction::Down => ladder.iter().rev().copied().find(|&v| v < cur),
        }?;
        if !(lo..=hi).contains(&next) {
            return None;
        }
        let mut out = *s;
        self.set(&mut out, next);
        b.contains(&out).then_some(out)
    }
}

/// A controller the benchmark can run: given the settings in force, the device's bounds and the
/// last window, maybe new settings with a reason. The tuner, DIM and static all implement it.
pub trait Controller {
    /// Short name for reports and the `controller` label.
    fn name(&self) -> &'static str;
    /// One interval's decision; `now_ms` is a monotonic clock in milliseconds.
    fn step(
        &mut self,
        now_ms: u64,
        current: &DeviceSettings,
        bounds: &Bounds,
        window: &Window,
    ) -> Option<decide::Outcome>;
}

/// The static-defaults baseline: never changes anything.
#[derive(Debug, Default)]
pub struct Static;

impl Controller for Static {
    fn name(&self) -> &'static str {
        "static"
    }
    fn step(
        &mut self,
        _: u64,
        _: &DeviceSettings,
        _: &Bounds,
        _: &Window,
    ) -> Option<decide::Outcome> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every strict value is written as the string of its lenient twin, which a client reads
    /// back as that (known) value: the daemon's and the clients' enums say the same thing.
    #[test]
    fn strict_enums_are_written_as_their_wire_twins() {
        fn same<S: Serialize + Copy, W: From<S> + Serialize + std::fmt::Debug>(
            strict: &[S],
            known: &[W],
        ) {
            for (i, &s) in strict.iter().enumerate() {
                let w = W::from(s);
                assert_eq!(
                    serde_json::to_string(&s).unwrap(),
                    serde_json::to_string(&w).unwrap()
                );
                assert_eq!(
                    serde_json::to_string(&known[i]).unwrap(),
                    serde_json::to_string(&w).unwrap(),
                    "{w:?}"
                );
            }
            assert_eq!(strict.len(), known.len());
        }
        use enlight_abi::tuner as wire;
        same(
            &[TunerMode::Off, TunerMode::Auto, TunerMode::DryRun],
            wire::Mode::KNOWN,
        );
        same(
            &[
                Objective::Latency,
                Objective::Throughput,
                Objective::Balanced,
            ],
            wire::Objective::KNOWN,
        );
        same(
            &[
                TunerState::Idle,
                TunerState::Exploring,
                TunerState::Converged,
                TunerState::Pinned,
                TunerState::Frozen,
            ],
            wire::State::KNOWN,
        );
        same(
            &[Action::Change, Action::Revert, Action::Recommend],
            wire::Action::KNOWN,
        );
    }

    #[test]
    fn steps_walk_the_ladder_within_bounds() {
        let b = Bounds::default();
        let s = DeviceSettings::default();
        let up = Knob::ModerationFrames.step(&s, Direction::Up, &b).unwrap();
        assert_eq!(up.moderation_frames, 16);
        let down = Knob::ModerationUsecs.step(&s, Direction::Down, &b).unwrap();
        assert_eq!(down.moderation_usecs, 20);
        let odd = DeviceSettings {
            moderation_usecs: 33,
            ..s
        };
        assert_eq!(
            Knob::ModerationUsecs
                .step(&odd, Direction::Up, &b)
                .unwrap()
                .moderation_usecs,
            50
        );
        let zero = DeviceSettings {
            moderation_usecs: 0,
            ..s
        };
        assert!(Knob::ModerationUsecs
            .step(&zero, Direction::Down, &b)
            .is_none());
        let tight = Bounds {
            moderation_frames: (1, 8),
            ..b
        };
        assert!(Knob::ModerationFrames
            .step(&s, Direction::Up, &tight)
            .is_none());
        let ring = Knob::RingBytes.step(&s, Direction::Up, &b).unwrap();
        assert_eq!(
            (ring.ring_out_bytes, ring.ring_in_bytes),
            (128 * 4096, 128 * 4096)
        );
    }

    #[test]
    fn napi_ladders_reach_hundreds_of_us_in_few_rungs_and_keep_the_floor() {
        let b = Bounds {
            moderation_frames: (0, 256),
            moderation_usecs: (0, 1000),
            frames_ladder: Ladder::Napi,
            usecs_ladder: Ladder::Napi,
            ..Bounds::default()
        };
        let defaults = DeviceSettings {
            moderation_frames: 0,
            moderation_usecs: 0,
            ..DeviceSettings::default()
        };
        let at = |s: DeviceSettings| (s.moderation_frames, s.moderation_usecs);
        // Both knobs up one rung from the kernel's (0, 0), then two rungs at once (the stride
        // after a kept move): deferral with a 200 us timer in two moves.
        let one = Knob::Moderation.step(&defaults, Direction::Up, &b).unwrap();
        assert_eq!(at(one), (1, 10));
        let two = Knob::Moderation.step_n(&one, Direction::Up, 2, &b).unwrap();
        assert_eq!(at(two), (16, 200));
        // The whole timeout ladder is four moves from 0 to 1 ms; the fine ladder takes seven.
        let mut s = defaults;
        let mut rungs = Vec::new();
        while let Some(n) = Knob::ModerationUsecs.step(&s, Direction::Up, &b) {
            s = n;
            rungs.push(s.moderation_usecs);
        }
        assert_eq!(rungs, [10, 50, 200, 1000]);
        // A value between rungs (an operator's 30 us) steps to the nearest rung that way.
        let odd = DeviceSettings {
            moderation_usecs: 30,
            ..defaults
        };
        assert_eq!(
            Knob::ModerationUsecs
                .step(&odd, Direction::Down, &b)
                .map(|s| s.moderation_usecs),
            Some(10)
        );
        // A delay floor still skips the rungs under it, on either ladder.
        let floored = Bounds {
            moderation_usecs_floor: 20,
            ..b
        };
        assert_eq!(
            Knob::ModerationUsecs
                .step(&defaults, Direction::Up, &floored)
                .map(|s| s.moderation_usecs),
            Some(50)
        );
        // The default (a device's own coalescing) keeps the fine ladders.
        let fine = Bounds {
            frames_ladder: Ladder::Fine,
            usecs_ladder: Ladder::Fine,
            ..b
        };
        assert_eq!(
            at(Knob::Moderation
                .step(&defaults, Direction::Up, &fine)
                .unwrap()),
            (1, 5)
        );
    }

    #[test]
    fn a_nic_counts_bytes_and_a_window_without_interrupts_counts_napi_polls() {
        assert_eq!(Throughput::of_device("nic"), Throughput::Bytes);
        assert_eq!(Throughput::of_device("disk"), Throughput::Ops);
        assert_eq!(Signal::of(0, 10), Signal::NapiPolls);
        assert_eq!(Signal::of(5, 10), Signal::Interrupts);
        assert_eq!(Signal::of(0, 0), Signal::Interrupts);
    }
}
