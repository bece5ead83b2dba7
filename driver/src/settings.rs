//! Every tunable knob of a synthetic device, in one place.
//!
//! The ring sizes, the host's interrupt moderation and the guest's polling budget. They are plain
//! configuration for now; live tuning will change them through this type, so every consumer reads
//! them from here rather than keeping its own copy.

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
}
