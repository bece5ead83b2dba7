//! The knobs a device really has: each with its current value read from where it lives, its
//! limits, its unit, its source and how disruptive a change is.
//!
//! Every device shows these and nothing else (API, `/metrics`, `enlight top`, `enlight tune`):
//! - a synthetic device, the five of its control socket (contract 4), with the limits that
//!   socket reports and the values the device writes into its registry record on every change;
//! - an emulated device, none (a register-level model has no tunable moderation or ring);
//! - a kernel NIC, what ethtool netlink reports for its driver (rings, coalescing the driver
//!   has) and NAPI moderation from sysfs (`napi_defer_hard_irqs`, `gro_flush_timeout`, which
//!   every netdev has);
//! - a kernel disk, its writable block queue settings in sysfs (a SCSI disk's
//!   `device/queue_depth` too) and its I/O scheduler, a choice among those it lists.
//!
//! The tuner's search space comes from the same list ([`TunerKind`]): a knob rides the ladder of
//! its kind, and a knob that is not [`Disruption::Live`] is never explored (recommend only, with
//! the reason from [`Knob::not_explored_because`]), but for one kind: the rx ring of a driver
//! whose ring change only resets the queue, which the operator may let the tuner explore when the
//! ring shows pressure ([`Knob::explored_on_pressure`], `[kernel] ring_resets`).

use std::fmt::Write as _;

use enlight_driver::control::Limits;
use enlight_driver::settings::DeviceSettings;

/// A knob and its unit, source, disruption and tuner ladder: the one definition, shared with
/// `enlight top` and `enlight tune` (`enlight_abi::knob`). What the tuner makes of them is here,
/// in [`KnobExt`] and the functions below.
pub use enlight_abi::knob::{Disruption, Knob, Source, TunerKind, Unit};

/// The tuner slot (field of [`DeviceSettings`]) a knob kind rides.
fn slot(kind: &TunerKind) -> TunerKind {
    match kind {
        TunerKind::QueueDepth => TunerKind::ModerationCount,
        TunerKind::Scheduler => TunerKind::ModerationDelay,
        TunerKind::ReadAhead => TunerKind::PollBudget,
        TunerKind::MaxIo => TunerKind::Ring,
        k => k.clone(),
    }
}

/// What the daemon makes of a knob: whether and how its tuner moves it, and how `enlight tune`
/// prints it (an extension trait: [`Knob`] is `enlight-abi`'s).
pub trait KnobExt {
    /// Whether the tuner may change this knob: a live knob, or one explored on pressure.
    fn explorable(&self) -> bool;
    /// Why the tuner never explores this knob live (`None`: it may).
    fn not_explored_because(&self) -> Option<String>;
    /// The value as `enlight tune` and `enlight top` print it.
    fn display_value(&self) -> String;
    /// This knob's value in the tuner's units (the field of [`DeviceSettings`] its ladder
    /// moves): `None` for a knob the tuner does not move (or whose ladder it does not know).
    fn to_tuner(&self, value: u64) -> Option<u32>;
    /// The value of this knob that the tuner's settings `s` stand for (`None`: it does not
    /// move this knob).
    fn value_for_tuner(&self, s: &DeviceSettings) -> Option<u64>;
}

impl KnobExt for Knob {
    /// Whether the tuner may change this knob: a live knob, or one explored on pressure.
    fn explorable(&self) -> bool {
        self.disruption == Disruption::Live || self.explored_on_pressure
    }

    /// Why the tuner never explores this knob live (`None`: it may).
    fn not_explored_because(&self) -> Option<String> {
        match &self.disruption {
            // Explored, but only when the ring shows pressure (the ring ladder's gate).
            Disruption::ResetsQueue if self.explored_on_pressure => None,
            // The ring ladder is tried only when writers found a ring full; no disk reports
            // that, so a disk's largest request stays where it is.
            Disruption::Live if self.tuner_kind == Some(TunerKind::MaxIo) => Some(format!(
                "{} rides the ring ladder, which the tuner tries only when a ring fills (no \
                 kernel disk reports that): recommend only",
                self.name
            )),
            Disruption::Live => None,
            Disruption::ResetsQueue => Some(format!(
                "{} resets the queue when changed: recommend only",
                self.name
            )),
            Disruption::Detaches => Some(format!(
                "{} detaches and re-creates the device (a link flap) when changed: recommend only",
                self.name
            )),
            Disruption::Other(d) => Some(format!(
                "{} changes with a disruption this daemon does not know ({d:?}): recommend only",
                self.name
            )),
        }
    }

    /// The value as `enlight tune` and `enlight top` print it.
    fn display_value(&self) -> String {
        match &self.unit {
            Unit::Choice => self
                .choices
                .get(self.value as usize)
                .cloned()
                .unwrap_or_else(|| self.value.to_string()),
            Unit::Boolean => (if self.value != 0 { "on" } else { "off" }).into(),
            Unit::Count | Unit::Descriptors | Unit::Frames => self.value.to_string(),
            Unit::Other(u) if u.is_empty() => self.value.to_string(),
            u => format!("{} {}", self.value, u.name()),
        }
    }

    /// This knob's value in the tuner's units (the field of [`DeviceSettings`] its ladder
    /// moves): `None` for a knob the tuner does not move (or whose ladder it does not know).
    fn to_tuner(&self, value: u64) -> Option<u32> {
        let kind = self.tuner_kind.as_ref()?;
        if let TunerKind::Other(_) = kind {
            return None;
        }
        let v = match (kind, &self.unit) {
            (TunerKind::ModerationDelay, Unit::Nanoseconds) => value / 1000,
            (TunerKind::Ring, Unit::Descriptors) => value * RING_UNIT,
            (TunerKind::MaxIo, _) => value * 1024,
            (TunerKind::Scheduler, _) => {
                let ladder = crate::tuner::USECS_LADDER;
                ladder[(value as usize).min(ladder.len() - 1)] as u64
            }
            _ => value,
        };
        Some(v.min(u32::MAX as u64) as u32)
    }

    /// The value of this knob that the tuner's settings `s` stand for (`None`: it does not
    /// move this knob).
    fn value_for_tuner(&self, s: &DeviceSettings) -> Option<u64> {
        let kind = self.tuner_kind.as_ref()?;
        if let TunerKind::Other(_) = kind {
            return None;
        }
        let v = match self.name.as_str() {
            "ring_out_bytes" | "tx_ring" => s.ring_out_bytes,
            "ring_in_bytes" | "rx_ring" => s.ring_in_bytes,
            _ => match slot(kind) {
                TunerKind::ModerationCount => s.moderation_frames,
                TunerKind::ModerationDelay => s.moderation_usecs,
                TunerKind::PollBudget => s.poll_budget,
                _ => s.ring_in_bytes,
            },
        } as u64;
        Some(match (kind, &self.unit) {
            (TunerKind::ModerationDelay, Unit::Nanoseconds) => v * 1000,
            (TunerKind::Ring, Unit::Descriptors) => v / RING_UNIT,
            (TunerKind::MaxIo, _) => v / 1024,
            // The highest rung at or below `v`: its index is the choice.
            (TunerKind::Scheduler, _) => crate::tuner::USECS_LADDER
                .iter()
                .rposition(|&r| r as u64 <= v)
                .unwrap_or(0) as u64,
            _ => v,
        })
    }
}

/// The knobs of a synthetic device: its control socket's five, with the limits the socket
/// reported and the values in force (from the record the device rewrites on every change).
pub fn synthetic(settings: &DeviceSettings, limits: &Limits) -> Vec<Knob> {
    use enlight_driver::settings::Knob as K;
    K::ALL
        .iter()
        .map(|&k| {
            let [min, max] = limits.range(k);
            let (unit, kind) = match k {
                K::RingOutBytes | K::RingInBytes => (Unit::Bytes, TunerKind::Ring),
                K::ModerationFrames => (Unit::Frames, TunerKind::ModerationCount),
                K::ModerationUsecs => (Unit::Microseconds, TunerKind::ModerationDelay),
                K::PollBudget => (Unit::Count, TunerKind::PollBudget),
            };
            let value = match k {
                K::RingOutBytes => settings.ring_out_bytes,
                K::RingInBytes => settings.ring_in_bytes,
                K::ModerationFrames => settings.moderation_frames,
                K::ModerationUsecs => settings.moderation_usecs,
                K::PollBudget => settings.poll_budget,
            };
            Knob::new(
                k.name(),
                value as u64,
                (Some(min as u64), Some(max as u64)),
                unit,
                Source::ControlSocket,
                // The synthetic ring resize is an in-band switch while I/O runs (docs/control.md).
                Disruption::Live,
            )
            .tuned_as(kind)
        })
        .collect()
}

/// Bytes one ring descriptor stands for in the tuner's ring sizes (a page, so the tuner's
/// page-multiple rule holds).
pub const RING_UNIT: u64 = 4096;

/// The range the tuner explores for a knob of `kind`, in the tuner's units (the ladders in
/// [`crate::tuner`] pick values inside it).
pub fn explored_range(kind: &TunerKind) -> (u32, u32) {
    match kind {
        // 0 is "no deferral" for NAPI and "no frame limit" for some drivers.
        TunerKind::ModerationCount => (0, 256),
        TunerKind::ModerationDelay => (0, 1000),
        TunerKind::Ring => (4 * RING_UNIT as u32, 4096 * RING_UNIT as u32),
        TunerKind::PollBudget => (1, 512),
        // BLKDEV_MIN_RQ up to the count ladder's top (the device's own cap narrows it).
        TunerKind::QueueDepth => (1, 256),
        TunerKind::Scheduler => (0, *crate::tuner::USECS_LADDER.last().expect("rungs")),
        // 0 turns read-ahead off: never explored, only kept if it is what the device has.
        TunerKind::ReadAhead => (4, 512),
        TunerKind::MaxIo => explored_range(&TunerKind::Ring),
        // A ladder this daemon does not know: pinned ([`KnobExt::to_tuner`] is `None` for it,
        // so [`tuner_space`] never asks).
        TunerKind::Other(_) => (0, 0),
    }
}

/// The tuner's view of a device that is no control-socket device: the settings point its knobs
/// stand for and the bounds to explore. Each tuner field takes the value of the knob riding
/// its ladder; an explorable knob ([`Knob::explorable`]: live, or a ring explored on pressure)
/// is explored within [`explored_range`] (and its own limits, widened to take its current value
/// in), anything else is pinned where it is: a knob that is not live (recommend only) and a
/// field the device has no knob for. `pinned_budget` is the fixed
/// polling budget reported for devices without one (the kernel's NAPI weight).
pub fn tuner_space(knobs: &[Knob], pinned_budget: u32) -> (DeviceSettings, crate::tuner::Bounds) {
    let mut s = DeviceSettings {
        ring_out_bytes: RING_UNIT as u32,
        ring_in_bytes: RING_UNIT as u32,
        moderation_frames: 0,
        moderation_usecs: 0,
        poll_budget: pinned_budget,
    };
    let mut b = crate::tuner::Bounds {
        ring_bytes: (RING_UNIT as u32, RING_UNIT as u32),
        ring_page: RING_UNIT as u32,
        moderation_frames: (0, 0),
        moderation_usecs: (0, 0),
        moderation_usecs_floor: 1,
        poll_budget: (pinned_budget, pinned_budget),
        frames_ladder: crate::tuner::Ladder::Fine,
        usecs_ladder: crate::tuner::Ladder::Fine,
    };
    let mut rings = Vec::new();
    // The explored rings when only some are (a queue-resetting driver's rx ring, its tx ring
    // recommend only): value and range.
    let mut explored_rings = Vec::new();
    for k in knobs {
        let (Some(kind), Some(v)) = (k.tuner_kind.as_ref(), k.to_tuner(k.value)) else {
            continue;
        };
        let range = if k.explorable() {
            let (lo, hi) = explored_range(kind);
            let own_lo = k.min.and_then(|m| k.to_tuner(m)).unwrap_or(lo);
            let own_hi = k.max.and_then(|m| k.to_tuner(m)).unwrap_or(hi);
            (lo.max(own_lo).min(v), hi.min(own_hi).max(v))
        } else {
            (v, v)
        };
        // NAPI's knobs ride the coarse ladders (crate::tuner::Ladder::Napi).
        let ladder = match k.name.as_str() {
            "napi_defer_hard_irqs" | "gro_flush_timeout" => crate::tuner::Ladder::Napi,
            _ => crate::tuner::Ladder::Fine,
        };
        match slot(kind) {
            TunerKind::ModerationCount => {
                (s.moderation_frames, b.moderation_frames) = (v, range);
                b.frames_ladder = ladder;
            }
            TunerKind::ModerationDelay => {
                (s.moderation_usecs, b.moderation_usecs) = (v, range);
                b.usecs_ladder = ladder;
                if let Some(floor) = k.delays_from.and_then(|d| k.to_tuner(d)) {
                    b.moderation_usecs_floor = floor;
                }
            }
            TunerKind::PollBudget => (s.poll_budget, b.poll_budget) = (v, range),
            _ => {
                if k.name.starts_with("tx") || k.name.contains("out") {
                    s.ring_out_bytes = v;
                } else {
                    s.ring_in_bytes = v;
                }
                rings.push(range);
                if k.explorable() {
                    explored_rings.push((v, range));
                }
            }
        }
    }
    if rings.len() == 1 {
        // One ring-like knob (a disk's max_sectors_kb): both directions stand for it.
        s.ring_out_bytes = s.ring_in_bytes;
    }
    if knobs.iter().any(|k| k.tuner_kind == Some(TunerKind::MaxIo)) {
        // max_sectors_kb in bytes: any KiB is a valid value.
        b.ring_page = 1024;
    }
    if let ([(v, range)], true) = (&explored_rings[..], rings.len() > 1) {
        // One ring explored, the other recommend only (a queue-resetting driver's rx ring; its
        // tx ring has no pressure signal): the tuner's ring slot, both directions, stands for
        // the explored ring alone, and [`changes_to`] never writes the other.
        s.ring_out_bytes = *v;
        s.ring_in_bytes = *v;
        b.ring_bytes = *range;
    } else if rings.iter().all(|r| r.0 < r.1) && !rings.is_empty() {
        // One range for both directions, explored only when every ring is live.
        let lo = rings.iter().map(|r| r.0).max().unwrap_or(0);
        let hi = rings.iter().map(|r| r.1).min().unwrap_or(0);
        let (cur_lo, cur_hi) = (
            s.ring_in_bytes.min(s.ring_out_bytes),
            s.ring_in_bytes.max(s.ring_out_bytes),
        );
        b.ring_bytes = (lo.min(cur_lo), hi.max(cur_hi));
    } else {
        // Pinned: one value for both directions, so no ladder step stays inside the bounds
        // (the ring knobs themselves are not live, so [`changes_to`] never touches them).
        s.ring_out_bytes = s.ring_in_bytes;
        b.ring_bytes = (s.ring_in_bytes, s.ring_in_bytes);
    }
    (s, b)
}

/// The knob changes that take a device from its knobs' values to the tuner's settings `to`:
/// `(knob, from, to)` for every explorable knob ([`Knob::explorable`]) the tuner moves whose
/// value would change (a knob whose value in the tuner's units already matches is left alone,
/// so a rounding never writes; any other knob is never changed by the tuner, see
/// [`tuner_space`]).
pub fn changes_to(knobs: &[Knob], to: &DeviceSettings) -> Vec<(String, u64, u64)> {
    knobs
        .iter()
        .filter(|k| k.explorable())
        .filter_map(|k| {
            let target = k.value_for_tuner(to)?;
            (k.to_tuner(k.value)? != k.to_tuner(target)?).then(|| (k.name.clone(), k.value, target))
        })
        .collect()
}

/// A recommendation in the device's own knobs: `knob from → to, ...`, or `keep the current
/// settings` when nothing would change.
pub fn changes_line(knobs: &[Knob], to: &DeviceSettings) -> String {
    let changes = changes_to(knobs, to);
    if changes.is_empty() {
        return "keep the current settings".into();
    }
    changes
        .iter()
        .map(|(name, from, to)| {
            let k = knobs.iter().find(|k| &k.name == name).expect("from knobs");
            let show = |v: u64| {
                Knob {
                    value: v,
                    ..k.clone()
                }
                .display_value()
            };
            format!("{name} {} → {}", show(*from), show(*to))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a device has a knob of that name.
pub fn has(knobs: &[Knob], name: &str) -> bool {
    knobs.iter().any(|k| k.name == name)
}

/// One line of knobs, as `enlight tune` and `enlight top` print them: `name value, ...`, or
/// `no tunable knobs`.
pub fn line(knobs: &[Knob]) -> String {
    if knobs.is_empty() {
        return "no tunable knobs".into();
    }
    let mut out = String::new();
    for (i, k) in knobs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{} {}", k.name, k.display_value());
        if k.disruption != Disruption::Live {
            let _ = write!(out, " ({})", k.disruption.as_str());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_synthetic_device_has_its_control_sockets_five_knobs_with_its_limits() {
        let s = DeviceSettings::default();
        let l = Limits::synthetic();
        let k = synthetic(&s, &l);
        assert_eq!(k.len(), 5);
        let frames = k.iter().find(|k| k.name == "moderation_frames").unwrap();
        assert_eq!(frames.value, 8);
        assert_eq!(
            (frames.min, frames.max),
            (
                Some(l.moderation_frames[0] as u64),
                Some(l.moderation_frames[1] as u64)
            )
        );
        assert_eq!(frames.source, Source::ControlSocket);
        assert_eq!(frames.tuner_kind, Some(TunerKind::ModerationCount));
        assert!(k.iter().all(|k| k.disruption == Disruption::Live));
    }

    #[test]
    fn disruptive_knobs_are_recommend_only_and_say_why() {
        let ring = Knob::new(
            "rx_ring",
            256,
            (Some(1), Some(4096)),
            Unit::Descriptors,
            Source::EthtoolNetlink,
            Disruption::Detaches,
        );
        assert!(ring
            .not_explored_because()
            .unwrap()
            .contains("detaches and re-creates the device"));
        let napi = Knob::new(
            "gro_flush_timeout",
            20_000,
            (Some(0), None),
            Unit::Nanoseconds,
            Source::Sysfs,
            Disruption::Live,
        );
        assert!(napi.not_explored_because().is_none());
        assert_eq!(
            line(&[napi, ring]),
            "gro_flush_timeout 20000 ns, rx_ring 256 (detaches)"
        );
        assert_eq!(line(&[]), "no tunable knobs");
    }

    #[test]
    fn the_tuners_settings_map_onto_each_knob_in_its_own_units() {
        let napi = [
            Knob::new(
                "napi_defer_hard_irqs",
                0,
                (Some(0), Some(DEFER)),
                Unit::Count,
                Source::Sysfs,
                Disruption::Live,
            )
            .tuned_as(TunerKind::ModerationCount),
            Knob::new(
                "gro_flush_timeout",
                1500,
                (Some(0), Some(10_000_000)),
                Unit::Nanoseconds,
                Source::Sysfs,
                Disruption::Live,
            )
            .tuned_as(TunerKind::ModerationDelay),
        ];
        assert_eq!(napi[1].to_tuner(napi[1].value), Some(1));
        let to = DeviceSettings {
            moderation_frames: 2,
            moderation_usecs: 1,
            ..DeviceSettings::default()
        };
        // 1500 ns is 1 us in the tuner's units: not rewritten to 1000.
        assert_eq!(
            changes_to(&napi, &to),
            vec![("napi_defer_hard_irqs".to_string(), 0, 2)]
        );
        let to = DeviceSettings {
            moderation_usecs: 20,
            ..to
        };
        assert_eq!(
            changes_line(&napi, &to),
            "napi_defer_hard_irqs 0 → 2, gro_flush_timeout 1500 ns → 20000 ns"
        );
        let synth = synthetic(&DeviceSettings::default(), &Limits::synthetic());
        assert_eq!(
            changes_line(&synth, &DeviceSettings::default()),
            "keep the current settings"
        );
        let bigger = DeviceSettings {
            ring_in_bytes: 128 * 4096,
            ..DeviceSettings::default()
        };
        assert_eq!(
            changes_to(&synth, &bigger),
            vec![("ring_in_bytes".to_string(), 64 * 4096, 128 * 4096)]
        );
    }

    const DEFER: u64 = i32::MAX as u64;

    #[test]
    fn the_search_space_comes_from_the_knobs_and_disruptive_ones_are_pinned() {
        let napi = crate::kernel::knobs::nic(
            "veth",
            None,
            &[("napi_defer_hard_irqs", 0), ("gro_flush_timeout", 20_000)],
        );
        let (s, b) = tuner_space(&napi, 64);
        assert_eq!((s.moderation_frames, s.moderation_usecs), (0, 20));
        assert_eq!(b.moderation_frames, (0, 256));
        assert_eq!(b.moderation_usecs, (0, 1000));
        assert_eq!(b.poll_budget, (64, 64));
        assert!(b.contains(&s));
        // NAPI's knobs ride the coarse ladders: 20 us up is 50 us, not 50 after 20's neighbours.
        use crate::tuner::Ladder;
        assert_eq!(
            (b.frames_ladder, b.usecs_ladder),
            (Ladder::Napi, Ladder::Napi)
        );
        let up = crate::tuner::Knob::ModerationUsecs.step(&s, crate::tuner::Direction::Up, &b);
        assert_eq!(up.map(|s| s.moderation_usecs), Some(50));
        // A driver's own coalescing keeps the fine ones (e1000: rx_usecs rides the delay
        // ladder, over its floor; NAPI's deferral the count ladder).
        let e1000 = crate::kernel::knobs::nic(
            "e1000",
            Some(&crate::kernel::ethtool::NicSettings {
                rings: None,
                coalesce: Some(crate::kernel::ethtool::Coalesce {
                    rx_usecs: Some(3),
                    ..Default::default()
                }),
            }),
            &[("napi_defer_hard_irqs", 0), ("gro_flush_timeout", 0)],
        );
        let (_, b1000) = tuner_space(&e1000, 64);
        assert_eq!(
            (
                b1000.frames_ladder,
                b1000.usecs_ladder,
                b1000.moderation_usecs_floor
            ),
            (Ladder::Napi, Ladder::Fine, 10)
        );
        // A netvsc-like NIC: its rings detach, so they are pinned where they are.
        let rings = crate::kernel::ethtool::NicSettings {
            rings: Some(crate::kernel::ethtool::Rings {
                rx: 1024,
                tx: 512,
                rx_max: 8192,
                tx_max: 8192,
            }),
            coalesce: None,
        };
        let k = crate::kernel::knobs::nic("hv_netvsc", Some(&rings), &[]);
        let (s, b) = tuner_space(&k, 64);
        assert_eq!(b.ring_bytes, (1024 * 4096, 1024 * 4096));
        assert_eq!(b.moderation_frames, (0, 0), "no count knob: pinned");
        assert!(b.contains(&s));
        // The tuner never steps a pinned ring.
        for dir in [crate::tuner::Direction::Up, crate::tuner::Direction::Down] {
            assert!(crate::tuner::Knob::RingBytes.step(&s, dir, &b).is_none());
        }
        assert!(changes_to(
            &k,
            &DeviceSettings {
                ring_in_bytes: 4096,
                ..s
            }
        )
        .is_empty());
    }

    #[test]
    fn wire_names_are_kebab_case() {
        let k = Knob::new(
            "napi_defer_hard_irqs",
            2,
            (Some(0), Some(i32::MAX as u64)),
            Unit::Count,
            Source::NetdevNetlink,
            Disruption::ResetsQueue,
        );
        let j = serde_json::to_value(&k).unwrap();
        assert_eq!(j["source"], "netdev-netlink");
        assert_eq!(j["disruption"], "resets-queue");
        assert!(j.get("choices").is_none());
    }
}
