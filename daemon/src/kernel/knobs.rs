//! The knobs a kernel device really has ([`crate::knobs::Knob`]), from what its driver reports:
//! pure functions of the values read (ethtool netlink, sysfs), so they are tested without I/O.

use super::ethtool::NicSettings;
use crate::knobs::{Disruption, Knob, Source, TunerKind, Unit};

/// How disruptive a ring-size change (`ethtool -G`) is on `driver` (docs/kernel.md, driver
/// catalogue): `hv_netvsc` detaches and re-creates the device (`netvsc_detach`/
/// `netvsc_attach`), the e1000 family takes the interface down and up; the others stop and
/// restart the queue.
pub fn ring_disruption(driver: &str) -> Disruption {
    match driver {
        "hv_netvsc" | "e1000" | "e1000e" | "ena" | "gve" => Disruption::Detaches,
        _ => Disruption::ResetsQueue,
    }
}

/// A kernel NIC's knobs: its driver's rings and coalescing (from ethtool netlink; a knob the
/// driver does not report is not there) and NAPI moderation (sysfs, every netdev). The tuner's
/// moderation ladders go to the driver's own coalescing where it has it (`rx_frames`,
/// `rx_usecs`), else to NAPI's (`napi_defer_hard_irqs`, `gro_flush_timeout`).
pub fn nic(driver: &str, ethtool: Option<&NicSettings>, napi: &[(&'static str, u64)]) -> Vec<Knob> {
    let mut out = Vec::new();
    let rings = ethtool.and_then(|s| s.rings);
    if let Some(r) = rings {
        for (name, v, max) in [("rx_ring", r.rx, r.rx_max), ("tx_ring", r.tx, r.tx_max)] {
            // A driver that reports a maximum of 0 cannot resize that ring.
            if max > 0 {
                out.push(
                    Knob::new(
                        name,
                        v as u64,
                        (Some(1), Some(max as u64)),
                        Unit::Descriptors,
                        Source::EthtoolNetlink,
                        ring_disruption(driver),
                    )
                    .tuned_as(TunerKind::Ring),
                );
            }
        }
    }
    let c = ethtool.and_then(|s| s.coalesce).unwrap_or_default();
    let mut have_count = false;
    let mut have_delay = false;
    for (name, v, unit, kind) in [
        (
            "rx_frames",
            c.rx_frames,
            Unit::Frames,
            Some(TunerKind::ModerationCount),
        ),
        (
            "rx_usecs",
            c.rx_usecs,
            Unit::Microseconds,
            Some(TunerKind::ModerationDelay),
        ),
        ("tx_frames", c.tx_frames, Unit::Frames, None),
        ("tx_usecs", c.tx_usecs, Unit::Microseconds, None),
    ] {
        if let Some(v) = v {
            // The ethtool API carries u32; drivers refuse more than their own limit, which
            // they do not report.
            let mut k = Knob::new(
                name,
                v as u64,
                (Some(0), Some(u32::MAX as u64)),
                unit,
                Source::EthtoolNetlink,
                Disruption::Live,
            );
            if let Some(kind) = kind {
                have_count |= kind == TunerKind::ModerationCount;
                have_delay |= kind == TunerKind::ModerationDelay;
                k = k.tuned_as(kind);
            }
            out.push(k);
        }
    }
    for (name, v) in [
        ("adaptive_rx", c.adaptive_rx),
        ("adaptive_tx", c.adaptive_tx),
    ] {
        if let Some(v) = v {
            out.push(Knob::new(
                name,
                v as u64,
                (Some(0), Some(1)),
                Unit::Boolean,
                Source::EthtoolNetlink,
                Disruption::Live,
            ));
        }
    }
    for (name, v) in napi {
        let (unit, kind, taken) = match *name {
            "napi_defer_hard_irqs" => (Unit::Count, TunerKind::ModerationCount, have_count),
            _ => (Unit::Nanoseconds, TunerKind::ModerationDelay, have_delay),
        };
        let (min, max) = super::napi::range(name).unwrap_or((0, u64::MAX));
        let k = Knob::new(
            name,
            *v,
            (Some(min), Some(max)),
            unit,
            Source::Sysfs,
            Disruption::Live,
        );
        out.push(if taken { k } else { k.tuned_as(kind) });
    }
    out
}

/// The per-instance NAPI knobs (netdev netlink, 6.13+): `napi<id>/defer_hard_irqs`,
/// `napi<id>/gro_flush_timeout` and `napi<id>/irq_suspend_timeout` of each NAPI instance, as
/// the kernel reports them (an attribute it does not report is no knob). The tuner moves the
/// interface-wide sysfs knobs, which set every instance; these show where instances differ.
pub fn napi_instances(instances: &[super::netdev::NapiInstance]) -> Vec<Knob> {
    let mut out = Vec::new();
    for n in instances {
        let defer = n
            .defer_hard_irqs
            .map(|v| ("defer_hard_irqs", v as u64, Unit::Count));
        let gro = n
            .gro_flush_timeout
            .map(|v| ("gro_flush_timeout", v, Unit::Nanoseconds));
        let suspend = n
            .irq_suspend_timeout
            .map(|v| ("irq_suspend_timeout", v, Unit::Nanoseconds));
        for (name, v, unit) in [defer, gro, suspend].into_iter().flatten() {
            let max = match name {
                "defer_hard_irqs" => super::napi::DEFER_MAX,
                _ => u64::MAX,
            };
            out.push(Knob::new(
                &format!("napi{}/{name}", n.id),
                v,
                (Some(0), Some(max)),
                unit,
                Source::NetdevNetlink,
                Disruption::Live,
            ));
        }
    }
    out
}

/// One block queue setting as read from sysfs: name, value, whether writable for this device,
/// and its range.
pub struct QueueSetting {
    pub name: &'static str,
    pub value: u32,
    pub writable: bool,
    pub range: (u32, u32),
}

/// A kernel disk's knobs: its writable block queue settings (a read-only one is no knob).
pub fn disk(settings: &[QueueSetting]) -> Vec<Knob> {
    settings
        .iter()
        .filter(|s| s.writable)
        .map(|s| {
            let unit = match s.name {
                "read_ahead_kb" | "max_sectors_kb" => Unit::Kibibytes,
                _ => Unit::Count,
            };
            Knob::new(
                s.name,
                s.value as u64,
                (Some(s.range.0 as u64), Some(s.range.1 as u64)),
                unit,
                Source::Sysfs,
                Disruption::Live,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ethtool::{Coalesce, Rings};

    #[test]
    fn a_nic_without_coalescing_is_moderated_by_napi() {
        // veth: no rings, no coalescing; NAPI from sysfs.
        let k = nic(
            "veth",
            None,
            &[("napi_defer_hard_irqs", 0), ("gro_flush_timeout", 0)],
        );
        let names: Vec<_> = k.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["napi_defer_hard_irqs", "gro_flush_timeout"]);
        assert_eq!(k[0].tuner_kind, Some(TunerKind::ModerationCount));
        assert_eq!(k[1].tuner_kind, Some(TunerKind::ModerationDelay));
        assert!(k.iter().all(|k| k.source == Source::Sysfs));
    }

    #[test]
    fn a_driver_with_coalescing_keeps_its_own_and_netvsc_rings_detach() {
        let s = NicSettings {
            rings: Some(Rings {
                rx: 1024,
                tx: 1024,
                rx_max: 16384,
                tx_max: 16384,
            }),
            coalesce: Some(Coalesce {
                rx_frames: Some(1),
                ..Default::default()
            }),
        };
        let k = nic(
            "hv_netvsc",
            Some(&s),
            &[("napi_defer_hard_irqs", 0), ("gro_flush_timeout", 0)],
        );
        let by = |n: &str| k.iter().find(|k| k.name == n).unwrap();
        assert_eq!(by("rx_ring").disruption, Disruption::Detaches);
        assert!(by("rx_ring").not_explored_because().is_some());
        assert_eq!(by("rx_frames").tuner_kind, Some(TunerKind::ModerationCount));
        assert_eq!(by("napi_defer_hard_irqs").tuner_kind, None);
        // No rx-usecs in the driver: NAPI's timer rides the delay ladder.
        assert_eq!(
            by("gro_flush_timeout").tuner_kind,
            Some(TunerKind::ModerationDelay)
        );
        assert!(!k.iter().any(|k| k.name == "rx_usecs"));
        assert_eq!(ring_disruption("virtio_net"), Disruption::ResetsQueue);
    }

    /// docs/kernel.md's driver catalogue and [`ring_disruption`] say the same for every driver
    /// the table lists.
    #[test]
    fn the_driver_catalogue_and_the_code_agree() {
        let doc = include_str!("../../../docs/kernel.md");
        let start = doc
            .find("<!-- driver-catalogue: start -->")
            .expect("catalogue");
        let end = doc
            .find("<!-- driver-catalogue: end -->")
            .expect("catalogue end");
        let rows: Vec<Vec<&str>> = doc[start..end]
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| driver") && !l.starts_with("|---"))
            .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
            .collect();
        assert!(rows.len() >= 7, "{rows:?}");
        for row in rows {
            assert_eq!(
                ring_disruption(row[0]).name(),
                row[1],
                "{}: the catalogue says {}, the code {}",
                row[0],
                row[1],
                ring_disruption(row[0]).name()
            );
        }
    }

    #[test]
    fn only_writable_queue_settings_are_disk_knobs() {
        let k = disk(&[
            QueueSetting {
                name: "nr_requests",
                value: 128,
                writable: true,
                range: (4, 65536),
            },
            QueueSetting {
                name: "max_sectors_kb",
                value: 512,
                writable: false,
                range: (4, 512),
            },
        ]);
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].name, "nr_requests");
        assert_eq!(k[0].max, Some(65536));
    }
}
