//! Every tunable knob of a synthetic device, in one place.
//!
//! The ring sizes, the host's interrupt moderation and the guest's polling budget. A device keeps
//! the values in force in a [`LiveSettings`] (one atomic per knob), which its data path reads on
//! every pass and its control socket (`crate::control`) changes while I/O runs.

use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::ring::PAGE_SIZE;

/// Settings of one device.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceSettings {
    /// Data area of the guest → host ring, bytes (a page multiple).
    pub ring_out_bytes: u32,
    /// Data area of the host → guest ring, bytes (a page multiple).
    pub ring_in_bytes: u32,
    /// The host signals the guest after this many completions...
    pub moderation_frames: u32,
    /// ...or this many microseconds after the first unsignalled completion, whichever comes
    /// first. 0 signals at once.
    pub moderation_usecs: u32,
    /// Completions the guest reaps per polling pass before it re-checks (NAPI-like budget).
    pub poll_budget: u32,
}

impl Default for DeviceSettings {
    /// 64 pages per direction (Linux's netvsc uses 128, storvsc is smaller); moderation of 8
    /// frames or 50 us, DPDK netvsc's default host latency; a NAPI-style budget of 64.
    fn default() -> Self {
        DeviceSettings {
            ring_out_bytes: 64 * PAGE_SIZE as u32,
            ring_in_bytes: 64 * PAGE_SIZE as u32,
            moderation_frames: 8,
            moderation_usecs: 50,
            poll_budget: 64,
        }
    }
}

/// Limits of each knob.
pub struct SettingsLimits;

impl SettingsLimits {
    /// Smallest ring data area.
    pub const RING_MIN: u32 = 2 * PAGE_SIZE as u32;
    /// Largest ring data area.
    pub const RING_MAX: u32 = 64 << 20;
    /// Moderation frames range.
    pub const FRAMES: std::ops::RangeInclusive<u32> = 1..=1024;
    /// Moderation microseconds range.
    pub const USECS: std::ops::RangeInclusive<u32> = 0..=100_000;
    /// Poll budget range.
    pub const BUDGET: std::ops::RangeInclusive<u32> = 1..=4096;
}

/// A setting out of its limits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{knob} = {value} is out of range ({limits})")]
pub struct SettingsError {
    /// The knob's name.
    pub knob: &'static str,
    /// The value given.
    pub value: u32,
    /// The limits in words.
    pub limits: String,
}

impl DeviceSettings {
    /// Checks every knob against [`SettingsLimits`].
    pub fn validate(&self) -> Result<(), SettingsError> {
        for (knob, value) in [
            ("ring_out_bytes", self.ring_out_bytes),
            ("ring_in_bytes", self.ring_in_bytes),
        ] {
            if !(SettingsLimits::RING_MIN..=SettingsLimits::RING_MAX).contains(&value)
                || value % PAGE_SIZE as u32 != 0
            {
                return Err(SettingsError {
                    knob,
                    value,
                    limits: format!(
                        "a multiple of {PAGE_SIZE} from {} to {}",
                        SettingsLimits::RING_MIN,
                        SettingsLimits::RING_MAX
                    ),
                });
            }
        }
        for (knob, value, range) in [
            (
                "moderation_frames",
                self.moderation_frames,
                SettingsLimits::FRAMES,
            ),
            (
                "moderation_usecs",
                self.moderation_usecs,
                SettingsLimits::USECS,
            ),
            ("poll_budget", self.poll_budget, SettingsLimits::BUDGET),
        ] {
            if !range.contains(&value) {
                return Err(SettingsError {
                    knob,
                    value,
                    limits: format!("{}..={}", range.start(), range.end()),
                });
            }
        }
        Ok(())
    }
}

/// One knob, with its code in the `settings_change` USDT probe (contract 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Knob {
    /// `ring_out_bytes`, code 0.
    RingOutBytes = 0,
    /// `ring_in_bytes`, code 1.
    RingInBytes = 1,
    /// `moderation_frames`, code 2.
    ModerationFrames = 2,
    /// `moderation_usecs`, code 3.
    ModerationUsecs = 3,
    /// `poll_budget`, code 4.
    PollBudget = 4,
}

impl Knob {
    /// Every knob, in code order.
    pub const ALL: [Knob; 5] = [
        Knob::RingOutBytes,
        Knob::RingInBytes,
        Knob::ModerationFrames,
        Knob::ModerationUsecs,
        Knob::PollBudget,
    ];

    /// The field name in [`DeviceSettings`] (and on the control socket, and the `knob` label).
    pub fn name(self) -> &'static str {
        match self {
            Knob::RingOutBytes => "ring_out_bytes",
            Knob::RingInBytes => "ring_in_bytes",
            Knob::ModerationFrames => "moderation_frames",
            Knob::ModerationUsecs => "moderation_usecs",
            Knob::PollBudget => "poll_budget",
        }
    }

    /// The knob with this probe code.
    pub fn from_code(code: u32) -> Option<Knob> {
        Knob::ALL.get(code as usize).copied()
    }

    /// The knob with this field name.
    pub fn from_name(name: &str) -> Option<Knob> {
        Knob::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The knob's value in `s`.
    pub fn get(self, s: &DeviceSettings) -> u32 {
        match self {
            Knob::RingOutBytes => s.ring_out_bytes,
            Knob::RingInBytes => s.ring_in_bytes,
            Knob::ModerationFrames => s.moderation_frames,
            Knob::ModerationUsecs => s.moderation_usecs,
            Knob::PollBudget => s.poll_budget,
        }
    }

    /// Sets the knob's value in `s`.
    pub fn set(self, s: &mut DeviceSettings, value: u32) {
        match self {
            Knob::RingOutBytes => s.ring_out_bytes = value,
            Knob::RingInBytes => s.ring_in_bytes = value,
            Knob::ModerationFrames => s.moderation_frames = value,
            Knob::ModerationUsecs => s.moderation_usecs = value,
            Knob::PollBudget => s.poll_budget = value,
        }
    }
}

impl DeviceSettings {
    /// The knobs whose values differ between `self` and `other`, with (self's, other's) value.
    pub fn diff(&self, other: &DeviceSettings) -> Vec<(Knob, u32, u32)> {
        Knob::ALL
            .into_iter()
            .filter(|k| k.get(self) != k.get(other))
            .map(|k| (k, k.get(self), k.get(other)))
            .collect()
    }
}

/// The settings in force on a running device: one atomic per knob, read by the data path on
/// every pass (a relaxed load each) and written by the control path. A reader may see a change
/// of two knobs half applied for one pass; each knob on its own is always a valid value.
#[derive(Debug)]
pub struct LiveSettings {
    knobs: [AtomicU32; 5],
}

impl LiveSettings {
    /// Live settings starting at `s`.
    pub fn new(s: DeviceSettings) -> LiveSettings {
        LiveSettings {
            knobs: Knob::ALL.map(|k| AtomicU32::new(k.get(&s))),
        }
    }

    /// One knob's value in force.
    #[inline]
    pub fn get(&self, knob: Knob) -> u32 {
        self.knobs[knob as usize].load(Ordering::Relaxed)
    }

    /// Puts one knob's value in force.
    pub fn set(&self, knob: Knob, value: u32) {
        self.knobs[knob as usize].store(value, Ordering::Relaxed);
    }

    /// Every knob's value in force.
    pub fn load(&self) -> DeviceSettings {
        let mut s = DeviceSettings::default();
        for k in Knob::ALL {
            k.set(&mut s, self.get(k));
        }
        s
    }

    /// Puts every knob of `s` in force.
    pub fn store(&self, s: &DeviceSettings) {
        for k in Knob::ALL {
            self.set(k, k.get(s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        DeviceSettings::default().validate().unwrap();
    }

    #[test]
    fn out_of_range_knobs_are_named() {
        let bad = DeviceSettings {
            ring_in_bytes: 5000,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().knob, "ring_in_bytes");
        let bad = DeviceSettings {
            moderation_frames: 0,
            ..Default::default()
        };
        let e = bad.validate().unwrap_err();
        assert_eq!(e.knob, "moderation_frames");
        assert!(e.to_string().contains("1..=1024"), "{e}");
        let bad = DeviceSettings {
            poll_budget: 5000,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().knob, "poll_budget");
    }

    #[test]
    fn knobs_have_contract_codes_and_names() {
        for (i, k) in Knob::ALL.into_iter().enumerate() {
            assert_eq!(k as usize, i);
            assert_eq!(Knob::from_code(i as u32), Some(k));
            assert_eq!(Knob::from_name(k.name()), Some(k));
        }
        assert_eq!(Knob::from_code(5), None);
        let a = DeviceSettings::default();
        let b = DeviceSettings {
            poll_budget: 7,
            moderation_usecs: 9,
            ..a
        };
        assert_eq!(
            a.diff(&b),
            vec![(Knob::ModerationUsecs, 50, 9), (Knob::PollBudget, 64, 7)]
        );
        let live = LiveSettings::new(a);
        live.store(&b);
        assert_eq!(live.load(), b);
        live.set(Knob::RingInBytes, 8192);
        assert_eq!(live.get(Knob::RingInBytes), 8192);
    }
}
