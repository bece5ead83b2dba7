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

/// What of `settings` can be changed: all of it, but its coalescing when the driver's is fixed
/// ([`super::ethtool::coalescing_fixed`]: virtio_net without `VIRTIO_NET_F_NOTF_COAL`). A
/// fixed value is no knob: left in, it would take the moderation ladders from NAPI's knobs
/// and every trial of it would fail.
pub fn changeable(settings: &NicSettings, coalescing_fixed: bool) -> NicSettings {
    NicSettings {
        coalesce: settings.coalesce.filter(|_| !coalescing_fixed),
        ..*settings
    }
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

/// A kernel disk's knobs: its I/O scheduler when the device offers more than one and lets it
/// be changed, then its writable block queue settings (a read-only one is no knob). The
/// scheduler comes first because switching it resets `nr_requests`: a change of both writes
/// the scheduler first. The tuner moves the queue depth (a SCSI disk's `queue_depth` where it
/// has a writable one, else `nr_requests`), the scheduler, `read_ahead_kb` and
/// `max_sectors_kb`; `rq_affinity` and `nomerges` are shown, not tuned.
pub fn disk(settings: &[QueueSetting], scheduler: Option<&super::blockq::Scheduler>) -> Vec<Knob> {
    let mut out = Vec::new();
    if let Some(s) = scheduler.filter(|s| s.choices.len() > 1) {
        let mut k = Knob::new(
            super::blockq::SCHEDULER,
            s.current as u64,
            (Some(0), Some(s.choices.len() as u64 - 1)),
            Unit::Choice,
            Source::Sysfs,
            // The kernel drains the queue for the switch; nothing is dropped.
            Disruption::Live,
        )
        .tuned_as(TunerKind::Scheduler);
        k.choices = s.choices.clone();
        out.push(k);
    }
    let scsi_depth = settings
        .iter()
        .any(|s| s.name == "queue_depth" && s.writable);
    for s in settings.iter().filter(|s| s.writable) {
        let unit = match s.name {
            "read_ahead_kb" | "max_sectors_kb" => Unit::Kibibytes,
            _ => Unit::Count,
        };
        let kind = match s.name {
            "queue_depth" => Some(TunerKind::QueueDepth),
            "nr_requests" if !scsi_depth => Some(TunerKind::QueueDepth),
            "read_ahead_kb" => Some(TunerKind::ReadAhead),
            "max_sectors_kb" => Some(TunerKind::MaxIo),
            _ => None,
        };
        let k = Knob::new(
            s.name,
            s.value as u64,
            (Some(s.range.0 as u64), Some(s.range.1 as u64)),
            unit,
            Source::Sysfs,
            Disruption::Live,
        );
        out.push(match kind {
            Some(kind) => k.tuned_as(kind),
            None => k,
        });
    }
    out
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

    #[test]
    fn virtio_net_fixed_coalescing_leaves_the_ladders_to_napi() {
        // What virtio_net on 6.1 reports without VIRTIO_NET_F_NOTF_COAL (QEMU 7.2).
        let s = NicSettings {
            rings: Some(Rings {
                rx: 256,
                tx: 256,
                rx_max: 256,
                tx_max: 256,
            }),
            coalesce: Some(Coalesce {
                rx_frames: Some(1),
                rx_usecs: Some(0),
                tx_frames: Some(1),
                tx_usecs: Some(0),
                ..Default::default()
            }),
        };
        let napi = [("napi_defer_hard_irqs", 0), ("gro_flush_timeout", 0)];
        let k = nic("virtio_net", Some(&changeable(&s, true)), &napi);
        let by = |n: &str| k.iter().find(|k| k.name == n);
        assert!(by("rx_frames").is_none() && by("rx_usecs").is_none());
        assert_eq!(
            by("napi_defer_hard_irqs").unwrap().tuner_kind,
            Some(TunerKind::ModerationCount)
        );
        assert_eq!(
            by("gro_flush_timeout").unwrap().tuner_kind,
            Some(TunerKind::ModerationDelay)
        );
        assert_eq!(by("rx_ring").unwrap().disruption, Disruption::ResetsQueue);
        // With the feature, the driver's own coalescing rides the ladders.
        let k = nic("virtio_net", Some(&changeable(&s, false)), &napi);
        let by = |n: &str| k.iter().find(|k| k.name == n).unwrap();
        assert_eq!(by("rx_frames").tuner_kind, Some(TunerKind::ModerationCount));
        assert_eq!(by("napi_defer_hard_irqs").tuner_kind, None);
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
        let k = disk(
            &[
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
            ],
            None,
        );
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].name, "nr_requests");
        assert_eq!(k[0].max, Some(65536));
        assert_eq!(k[0].tuner_kind, Some(TunerKind::QueueDepth));
    }

    fn q(name: &'static str, value: u32, range: (u32, u32)) -> QueueSetting {
        QueueSetting {
            name,
            value,
            writable: true,
            range,
        }
    }

    /// A loop device as this kernel shows it (`[none] mq-deadline kyber`, 128 tags,
    /// max_hw_sectors_kb 1280): the tuner's search space comes from its own knobs and ranges.
    #[test]
    fn a_disks_search_space_comes_from_its_knobs() {
        use crate::tuner::{Direction, Knob as T};
        let sched = crate::kernel::blockq::parse_scheduler("[none] mq-deadline kyber").unwrap();
        let k = disk(
            &[
                q("nr_requests", 128, (4, 128)),
                q("read_ahead_kb", 128, (0, 1 << 20)),
                q("rq_affinity", 1, (0, 2)),
                q("max_sectors_kb", 1280, (4, 1280)),
            ],
            Some(&sched),
        );
        let names: Vec<_> = k.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "scheduler",
                "nr_requests",
                "read_ahead_kb",
                "rq_affinity",
                "max_sectors_kb"
            ]
        );
        assert_eq!(k[0].display_value(), "none");
        assert_eq!(k[3].tuner_kind, None, "rq_affinity is shown, not tuned");
        let (s, b) = crate::knobs::tuner_space(&k, 0);
        assert!(b.contains(&s), "{s:?} {b:?}");
        // nr_requests: the count ladder, from BLKDEV_MIN_RQ up to the device's tag depth.
        assert_eq!(s.moderation_frames, 128);
        assert_eq!(b.moderation_frames, (4, 128));
        assert!(T::ModerationFrames.step(&s, Direction::Up, &b).is_none());
        let down = T::ModerationFrames.step(&s, Direction::Down, &b).unwrap();
        assert_eq!(
            crate::knobs::changes_to(&k, &down),
            vec![("nr_requests".to_string(), 128, 64)]
        );
        // The scheduler: one rung per choice, in the device's order.
        assert_eq!((s.moderation_usecs, b.moderation_usecs), (0, (0, 10)));
        let next = T::ModerationUsecs.step(&s, Direction::Up, &b).unwrap();
        assert_eq!(
            crate::knobs::changes_line(&k, &next),
            "scheduler none → mq-deadline"
        );
        let last = T::ModerationUsecs.step_n(&s, Direction::Up, 4, &b).unwrap();
        assert_eq!(
            crate::knobs::changes_line(&k, &last),
            "scheduler none → kyber"
        );
        // read_ahead_kb on the budget ladder.
        assert_eq!((s.poll_budget, b.poll_budget), (128, (4, 512)));
        let ra = T::PollBudget.step(&s, Direction::Up, &b).unwrap();
        assert_eq!(
            crate::knobs::changes_line(&k, &ra),
            "read_ahead_kb 128 KiB → 256 KiB"
        );
        // max_sectors_kb, in bytes on the ring ladder, never above max_hw_sectors_kb.
        assert_eq!(s.ring_in_bytes, 1280 * 1024);
        assert_eq!(s.ring_out_bytes, s.ring_in_bytes);
        assert_eq!(b.ring_bytes.1, 1280 * 1024);
        assert!(T::RingBytes.step(&s, Direction::Up, &b).is_none());
        assert!(k[4]
            .not_explored_because()
            .unwrap()
            .contains("max_sectors_kb rides the ring ladder"));
        assert!(k[..4].iter().all(|k| k.not_explored_because().is_none()));
        let small = T::RingBytes.step(&s, Direction::Down, &b).unwrap();
        assert_eq!(
            crate::knobs::changes_line(&k, &small),
            "max_sectors_kb 1280 KiB → 1024 KiB"
        );
        // Everything at once: the scheduler is written first.
        let all = enlight_driver::settings::DeviceSettings {
            moderation_frames: 64,
            moderation_usecs: 5,
            ..s
        };
        let order: Vec<_> = crate::knobs::changes_to(&k, &all)
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(order, ["scheduler", "nr_requests"]);
    }

    /// A SCSI disk (hv_storvsc, virtio-scsi) with a writable queue_depth: that is its depth
    /// knob; nr_requests is shown, not tuned. A device with one scheduler has no scheduler knob.
    #[test]
    fn a_scsi_disks_queue_depth_takes_the_depth_ladder() {
        let k = disk(
            &[
                q("nr_requests", 254, (4, 254)),
                q("queue_depth", 30, (1, 254)),
            ],
            crate::kernel::blockq::parse_scheduler("none").as_ref(),
        );
        assert!(!k.iter().any(|k| k.name == "scheduler"));
        let by = |n: &str| k.iter().find(|k| k.name == n).unwrap();
        assert_eq!(by("nr_requests").tuner_kind, None);
        assert_eq!(by("queue_depth").tuner_kind, Some(TunerKind::QueueDepth));
        let (s, b) = crate::knobs::tuner_space(&k, 0);
        assert_eq!((s.moderation_frames, b.moderation_frames), (30, (1, 254)));
        let up = crate::tuner::Knob::ModerationFrames
            .step(&s, crate::tuner::Direction::Up, &b)
            .unwrap();
        assert_eq!(
            crate::knobs::changes_to(&k, &up),
            vec![("queue_depth".to_string(), 30, 32)]
        );
    }
}
