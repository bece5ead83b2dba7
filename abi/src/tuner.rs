//! The tuner's part of enlightd's JSON API (contract 6): a device's tuner state ([`TunerView`],
//! `tuner` of `/api/v1/devices`) and its decisions ([`Decision`], `/api/v1/decisions` and one line
//! of the audit log each), defined once for the daemon that writes them and the clients that read
//! them (`enlight top`, `enlight tune`).
//!
//! **Whose types.** The daemon keeps its own strict types inside these views: its tuner's enums
//! are `Copy` and exhaustive (its decision code matches on them, its TOML config must keep
//! refusing a mode or objective it does not know) and its settings are the driver's
//! (`DeviceSettings`: `u32`s, unknown knobs refused). So the views are generic over a
//! [`TunerTypes`] naming the settings and the four enums: the daemon names its own (its JSON is
//! what it always wrote), a client leaves the default, [`Lenient`]: the wire enums below, which
//! keep a string this build does not know in their `Other`, and [`Settings`], every knob
//! optional.
//!
//! **Compatibility.** Every struct is `#[serde(default)]` and unknown fields are ignored, as in
//! [`crate::api`]: a client reads an older daemon (a field it lacks reads as its default) and a
//! newer one (a field, a mode, an objective, a state or an action this build does not know).

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

wire_enum! {
    /// Whether the tuner acts (`mode`; enlightd's `TunerMode`).
    pub enum Mode {
        /// No tuner for the device.
        Off = "off",
        /// Decide and apply.
        Auto = "auto",
        /// Decide and recommend; never apply.
        DryRun = "dry_run",
    }
}

wire_enum! {
    /// What the tuner optimises for a device (`objective`; enlightd's `Objective`).
    pub enum Objective {
        /// Lowest p99 latency while throughput stays within 5% of the best seen.
        Latency = "latency",
        /// Highest throughput with p99 under the SLO.
        Throughput = "throughput",
        /// Fewest interrupts (or NAPI polls) per op with p99 under the SLO.
        Balanced = "balanced",
    }
}

wire_enum! {
    /// Where a device's tuner is (`state`; enlightd's `TunerState`).
    pub enum State {
        /// Measuring the current settings, nothing under trial.
        Idle = "idle",
        /// Trying a candidate setting.
        Exploring = "exploring",
        /// No neighbour of the current settings is better: parked.
        Converged = "converged",
        /// Pinned (by the operator, or by the tuner when someone else changed a knob it set).
        Pinned = "pinned",
        /// Stopped by the tuner itself after repeated failures to apply a change.
        Frozen = "frozen",
    }
}

wire_enum! {
    /// What a decision does (`action`; enlightd's `Action`).
    pub enum Action {
        /// Apply new settings.
        Change = "change",
        /// Go back to settings that were better.
        Revert = "revert",
        /// Dry run: what would be applied.
        Recommend = "recommend",
    }
}

/// A synthetic device's settings (the knobs its control socket turns), as a client reads them:
/// every knob optional (`None`: the daemon did not send it), a knob this build does not know
/// ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub ring_out_bytes: Option<u64>,
    pub ring_in_bytes: Option<u64>,
    pub moderation_frames: Option<u64>,
    pub moderation_usecs: Option<u64>,
    pub poll_budget: Option<u64>,
}

/// The types a tuner view is written in: the daemon's own, or a client's [`Lenient`] ones.
/// Each must read and write as the same JSON string (or object, for the settings); its
/// [`Default`] is what a view that does not say reads as.
pub trait TunerTypes {
    /// A device's settings.
    type Settings: Wire;
    /// The tuner's mode.
    type Mode: Wire;
    /// Its objective.
    type Objective: Wire;
    /// Its state.
    type State: Wire;
    /// A decision's action.
    type Action: Wire;
}

/// What a [`TunerTypes`] type must do: read, write, compare, print, and have a default.
pub trait Wire: Debug + Clone + PartialEq + Default + Serialize + DeserializeOwned {}

impl<T: Debug + Clone + PartialEq + Default + Serialize + DeserializeOwned> Wire for T {}

/// A client's types: the wire enums, keeping what they do not know, and [`Settings`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lenient;

impl TunerTypes for Lenient {
    type Settings = Settings;
    type Mode = Mode;
    type Objective = Objective;
    type State = State;
    type Action = Action;
}

/// One recorded decision (contract 6; also one line of the audit log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, bound = "")]
pub struct Decision<T: TunerTypes = Lenient> {
    pub ts_unix_ms: u64,
    pub device: String,
    pub action: T::Action,
    pub from: T::Settings,
    pub to: T::Settings,
    pub reason: String,
    /// The objective's value measured at `from` (ops/s or a NIC's bytes/s, p99 seconds, or
    /// interrupts per op, NAPI polls per op on a NIC without interrupts).
    pub objective_value: Option<f64>,
}

impl<T: TunerTypes> Default for Decision<T> {
    fn default() -> Self {
        Decision {
            ts_unix_ms: 0,
            device: String::new(),
            action: T::Action::default(),
            from: T::Settings::default(),
            to: T::Settings::default(),
            reason: String::new(),
            objective_value: None,
        }
    }
}

/// The tuner's part of a device in `/api/v1/devices` (contract 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, bound = "")]
pub struct TunerView<T: TunerTypes = Lenient> {
    pub mode: T::Mode,
    pub objective: T::Objective,
    pub state: T::State,
    pub pinned: bool,
    pub last_decision: Option<Decision<T>>,
    /// A dry run's advice: the settings it would apply.
    pub recommendation: Option<T::Settings>,
    /// Why the tuner pinned the device itself: someone else changed a knob it had set (the
    /// tuner never writes over an operator's change; unpin to let it tune again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned_reason: Option<String>,
}

impl<T: TunerTypes> Default for TunerView<T> {
    fn default() -> Self {
        TunerView {
            mode: T::Mode::default(),
            objective: T::Objective::default(),
            state: T::State::default(),
            pinned: false,
            last_decision: None,
            recommendation: None,
            pinned_reason: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_as_the_daemon_writes_them() {
        let names = |v: Vec<&str>| v.join(",");
        assert_eq!(
            names(Mode::KNOWN.iter().map(Mode::as_str).collect()),
            "off,auto,dry_run"
        );
        assert_eq!(
            names(Objective::KNOWN.iter().map(Objective::as_str).collect()),
            "latency,throughput,balanced"
        );
        assert_eq!(
            names(State::KNOWN.iter().map(State::as_str).collect()),
            "idle,exploring,converged,pinned,frozen"
        );
        assert_eq!(
            names(Action::KNOWN.iter().map(Action::as_str).collect()),
            "change,revert,recommend"
        );
    }

    /// An older daemon's decision (without the objective's value) and a newer one's (an action,
    /// a knob and a field this build does not know) both read.
    #[test]
    fn old_and_new_decisions_read() {
        let old = r#"{"ts_unix_ms":5,"device":"disk0","action":"revert",
            "from":{"moderation_frames":16},"to":{"moderation_frames":8},"reason":"p99 rose"}"#;
        let d: Decision = serde_json::from_str(old).unwrap();
        assert_eq!((d.action, d.objective_value), (Action::Revert, None));
        assert_eq!(
            (
                d.from.moderation_frames,
                d.to.moderation_frames,
                d.to.poll_budget
            ),
            (Some(16), Some(8), None)
        );
        let new = r#"{"ts_unix_ms":6,"device":"eth0","action":"rollback",
            "from":{"rss_queues":4,"poll_budget":64},"to":{"poll_budget":128},
            "reason":"x","objective_value":0.5,"confidence":0.99}"#;
        let d: Decision = serde_json::from_str(new).unwrap();
        assert_eq!(d.action, Action::Other("rollback".into()));
        assert_eq!(
            (d.from.poll_budget, d.to.poll_budget),
            (Some(64), Some(128))
        );
        assert_eq!(d.objective_value, Some(0.5));
        // The unknown action is written back as it came.
        assert!(serde_json::to_string(&d)
            .unwrap()
            .contains(r#""action":"rollback""#));
        // Not a string: an error, as before.
        assert!(serde_json::from_str::<Decision>(r#"{"action":3}"#).is_err());
    }

    /// An older daemon's tuner view (before `pinned_reason`) and a newer one's (a mode, an
    /// objective and a state this build does not know, and a field) both read.
    #[test]
    fn old_and_new_tuner_views_read() {
        let old = r#"{"mode":"auto","objective":"latency","state":"converged","pinned":false,
            "last_decision":null,"recommendation":null}"#;
        let t: TunerView = serde_json::from_str(old).unwrap();
        assert_eq!(
            (t.mode, t.objective, t.state, t.pinned_reason),
            (Mode::Auto, Objective::Latency, State::Converged, None)
        );
        let new = r#"{"mode":"shadow","objective":"energy","state":"cooling","pinned":true,
            "recommendation":{"moderation_usecs":20},"pinned_reason":"operator","budget":3}"#;
        let t: TunerView = serde_json::from_str(new).unwrap();
        assert_eq!(
            (t.mode, t.objective, t.state),
            (
                Mode::Other("shadow".into()),
                Objective::Other("energy".into()),
                State::Other("cooling".into())
            )
        );
        assert_eq!(t.recommendation.unwrap().moderation_usecs, Some(20));
        assert_eq!(t.pinned_reason.as_deref(), Some("operator"));
        // A view that says nothing reads as one that does not say (empty strings).
        let t: TunerView = serde_json::from_str("{}").unwrap();
        assert_eq!((t.state.as_str(), t.last_decision), ("", None));
    }
}
