//! The knobs a kernel device really has ([`crate::knobs::Knob`]), from what its driver reports:
//! pure functions of the values read (ethtool netlink, sysfs), so they are tested without I/O.

use super::ethtool::NicSettings;
use crate::knobs::{Disruption, Knob, Source, TunerKind, Unit};

/// One NIC driver's row of the driver catalogue in docs/kernel.md, drawn from the driver's
/// ethtool ops in the kernel source (the table cites the file and function of each row; a
/// unit test keeps the two in step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverRule {
    pub driver: &'static str,
    /// What a ring-size change (`ethtool -G`, `set_ringparam`) does; `None`: the driver has
    /// no `set_ringparam`.
    pub rings: Option<Disruption>,
    /// The coalescing knobs its `supported_coalesce_params` admit, in enlight's names.
    pub coalesce: &'static [&'static str],
    /// Whether switching adaptive moderation on or off re-creates the queues (mlx5's
    /// `mlx5e_safe_switch_params`); the other coalescing changes are live on every driver
    /// listed.
    pub adaptive_resets: bool,
    /// The delays its `rx-usecs` takes, `(smallest non-zero, largest)`, where the driver gives
    /// the values below the smallest another meaning or refuses them (e1000: 1, 3 and 4 are
    /// adaptive modes, 2 and 5-9 are refused); `None`: any value, in microseconds.
    pub rx_usecs_delays: Option<(u32, u32)>,
}

const USECS_FRAMES_ADAPTIVE: &[&str] = &[
    "rx_usecs",
    "rx_frames",
    "tx_usecs",
    "tx_frames",
    "adaptive_rx",
    "adaptive_tx",
];

/// The driver catalogue (docs/kernel.md): the NIC drivers enlight knows the rules of.
pub const DRIVERS: &[DriverRule] = &[
    // netvsc_set_ringparam: netvsc_detach then netvsc_attach; no coalesce ops.
    DriverRule {
        driver: "hv_netvsc",
        rings: Some(Disruption::Detaches),
        coalesce: &[],
        adaptive_resets: false,
        rx_usecs_delays: None,
    },
    // virtnet_set_ringparam: virtnet_rx_resize/virtnet_tx_resize reset each virtqueue;
    // virtnet_set_coalesce: a control-queue command (VIRTIO_NET_F_NOTF_COAL).
    DriverRule {
        driver: "virtio_net",
        rings: Some(Disruption::ResetsQueue),
        coalesce: USECS_FRAMES_ADAPTIVE,
        adaptive_resets: false,
        rx_usecs_delays: None,
    },
    // e1000_set_ringparam: e1000_down ... e1000_up (link down and up); e1000_set_coalesce
    // writes the ITR register.
    DriverRule {
        driver: "e1000",
        rings: Some(Disruption::Detaches),
        coalesce: &["rx_usecs"],
        adaptive_resets: false,
        rx_usecs_delays: Some((10, 10_000)),
    },
    // e1000e's e1000_set_ringparam: e1000e_down(adapter, true) ... e1000e_up.
    DriverRule {
        driver: "e1000e",
        rings: Some(Disruption::Detaches),
        coalesce: &["rx_usecs"],
        adaptive_resets: false,
        rx_usecs_delays: Some((10, 10_000)),
    },
    // ena_set_ringparam: ena_update_queue_sizes closes and re-opens the device.
    DriverRule {
        driver: "ena",
        rings: Some(Disruption::Detaches),
        coalesce: &["rx_usecs", "tx_usecs", "adaptive_rx"],
        adaptive_resets: false,
        rx_usecs_delays: None,
    },
    // gve_set_ringparam: queues torn down and re-created (kernels that allow it);
    // gve_set_coalesce: DQO only, per notify block.
    DriverRule {
        driver: "gve",
        rings: Some(Disruption::Detaches),
        coalesce: &["rx_usecs", "tx_usecs"],
        adaptive_resets: false,
        rx_usecs_delays: None,
    },
    // mlx5e_ethtool_set_ringparam: mlx5e_safe_switch_params (new channels, then the old
    // closed); mlx5e_ethtool_set_coalesce: mlx5_core_modify_cq_moderation, a reset when the
    // adaptive (DIM) or CQE mode changes.
    DriverRule {
        driver: "mlx5_core",
        rings: Some(Disruption::ResetsQueue),
        coalesce: USECS_FRAMES_ADAPTIVE,
        adaptive_resets: true,
        rx_usecs_delays: None,
    },
];

/// The catalogue's row of `driver`, if it has one.
pub fn driver_rule(driver: &str) -> Option<&'static DriverRule> {
    DRIVERS.iter().find(|r| r.driver == driver)
}

/// How disruptive a ring-size change (`ethtool -G`) is on `driver`: the catalogue's rule; a
/// driver it does not list is assumed to stop and restart the queue (never explored live
/// either way).
pub fn ring_disruption(driver: &str) -> Disruption {
    driver_rule(driver)
        .and_then(|r| r.rings.clone())
        .unwrap_or(Disruption::ResetsQueue)
}

/// How disruptive a change of coalescing knob `knob` is on `driver`.
pub fn coalesce_disruption(driver: &str, knob: &str) -> Disruption {
    match driver_rule(driver) {
        Some(r) if r.adaptive_resets && knob.starts_with("adaptive_") => Disruption::ResetsQueue,
        _ => Disruption::Live,
    }
}

/// Whether the tuner may explore coalescing knob `knob` of `driver`: on a driver of the
/// catalogue only the knobs its `supported_coalesce_params` admit (the kernel reports only
/// those; anything else is shown, not tuned), on any other driver whatever it reports.
pub fn coalesce_tunable(driver: &str, knob: &str) -> bool {
    driver_rule(driver).is_none_or(|r| r.coalesce.contains(&knob))
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
                coalesce_disruption(driver, name),
            );
            if name == "rx_usecs" {
                if let Some((lo, hi)) = driver_rule(driver).and_then(|r| r.rx_usecs_delays) {
                    k.max = Some(hi as u64);
                    k.delays_from = Some(lo as u64);
                }
            }
            if let Some(kind) = kind.filter(|_| coalesce_tunable(driver, name)) {
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
                coalesce_disruption(driver, name),
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

/// Lets the tuner explore `driver`'s rx ring on pressure ([`Knob::explored_on_pressure`]) when
/// `mode` allows it and the driver's catalogue row says a ring change only resets the queue
/// (virtio_net, mlx5_core). Everything else stays as it is: rings that detach the device or
/// flap the link (hv_netvsc, e1000, e1000e, ena, gve), the rings of drivers the catalogue does
/// not know (what a change does there is unknown), and every tx ring: the pressure the tuner
/// sees is on the receive side (NAPI polls that used their whole budget, receive overruns;
/// see [`super::collector::ring_pressure`]), and nothing measured tells a tx ring that fills.
pub fn explore_ring_resets(driver: &str, knobs: &mut [Knob], mode: super::RingResets) {
    let resets_only =
        driver_rule(driver).and_then(|r| r.rings.clone()) == Some(Disruption::ResetsQueue);
    if mode != super::RingResets::Explore || !resets_only {
        return;
    }
    for k in knobs.iter_mut() {
        if k.name == "rx_ring" && k.tuner_kind == Some(TunerKind::Ring) {
            k.explored_on_pressure = true;
        }
    }
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
            // What enlight writes (KernelChanges::set_napi_instance checks the same).
            let (_, max) = super::napi_instance::napi_instance_range(name);
            out.push(Knob::new(
                &super::napi_instance::napi_instance_knob(n.id, name),
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
    use crate::knobs::KnobExt;

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
        // virtio_net (coalescing with VIRTIO_NET_F_NOTF_COAL), with netvsc's rings for the
        // ring rule.
        let k = nic(
            "virtio_net",
            Some(&s),
            &[("napi_defer_hard_irqs", 0), ("gro_flush_timeout", 0)],
        );
        let by = |n: &str| k.iter().find(|k| k.name == n).unwrap();
        assert_eq!(by("rx_ring").disruption, Disruption::ResetsQueue);
        assert!(by("rx_ring").not_explored_because().is_some());
        assert_eq!(by("rx_frames").tuner_kind, Some(TunerKind::ModerationCount));
        assert_eq!(by("napi_defer_hard_irqs").tuner_kind, None);
        let netvsc = nic("hv_netvsc", Some(&s), &[]);
        let ring = netvsc.iter().find(|k| k.name == "rx_ring").unwrap();
        assert_eq!(ring.disruption, Disruption::Detaches);
        // netvsc has no coalescing ops: a reported rx-frames (no kernel sends one) is shown,
        // never tuned.
        let frames = netvsc.iter().find(|k| k.name == "rx_frames").unwrap();
        assert_eq!(frames.tuner_kind, None);
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

    /// docs/kernel.md's driver catalogue and [`DRIVERS`] say the same: every NIC row's ring
    /// change, coalescing knobs and coalescing disruption, every rule has its row, and every
    /// row cites a kernel source file and function.
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
        let names = |cell: &str| -> Vec<String> {
            cell.split(',')
                .map(|s| s.trim().trim_matches('`').replace('-', "_"))
                .filter(|s| !s.is_empty() && s != "none")
                .collect()
        };
        let mut nics = 0;
        for row in &rows {
            assert!(row.len() >= 7, "{row:?}");
            let (driver, kind) = (row[0], row[1]);
            assert!(
                row[6].contains("drivers/") && row[6].contains("()"),
                "{driver}: no source file and function: {}",
                row[6]
            );
            if kind != "nic" {
                assert!(
                    driver_rule(driver).is_none(),
                    "{driver}: a disk with a NIC rule"
                );
                continue;
            }
            nics += 1;
            let rule =
                driver_rule(driver).unwrap_or_else(|| panic!("{driver}: no rule in DRIVERS"));
            let rings = rule.rings.as_ref().map_or("none", |d| d.as_str());
            assert_eq!(
                rings, row[2],
                "{driver}: ring change: code {rings}, catalogue {}",
                row[2]
            );
            let mut doc_knobs = names(row[3]);
            let mut code: Vec<String> = rule.coalesce.iter().map(|s| s.to_string()).collect();
            doc_knobs.sort();
            code.sort();
            assert_eq!(code, doc_knobs, "{driver}: coalescing knobs");
            let change = if rule.coalesce.is_empty() {
                "none"
            } else if rule.adaptive_resets {
                "live; adaptive resets-queue"
            } else {
                "live"
            };
            assert_eq!(change, row[4], "{driver}: coalescing change");
        }
        assert_eq!(nics, DRIVERS.len(), "a rule without a catalogue row");
        assert!(rows.len() > nics, "the disk drivers are catalogued too");
    }

    #[test]
    fn catalogue_rules_classify_knobs() {
        assert_eq!(ring_disruption("hv_netvsc"), Disruption::Detaches);
        assert_eq!(ring_disruption("mlx5_core"), Disruption::ResetsQueue);
        assert_eq!(ring_disruption("some_new_nic"), Disruption::ResetsQueue);
        assert_eq!(
            coalesce_disruption("mlx5_core", "adaptive_rx"),
            Disruption::ResetsQueue
        );
        assert_eq!(
            coalesce_disruption("mlx5_core", "rx_usecs"),
            Disruption::Live
        );
        assert_eq!(coalesce_disruption("ena", "adaptive_rx"), Disruption::Live);
        // e1000 admits rx-usecs only: a reported rx-frames is shown, not tuned.
        let s = NicSettings {
            rings: None,
            coalesce: Some(Coalesce {
                rx_frames: Some(1),
                rx_usecs: Some(3),
                ..Default::default()
            }),
        };
        let k = nic("e1000", Some(&s), &[("napi_defer_hard_irqs", 0)]);
        let by = |n: &str| k.iter().find(|k| k.name == n).unwrap();
        assert_eq!(by("rx_frames").tuner_kind, None);
        assert_eq!(by("rx_usecs").tuner_kind, Some(TunerKind::ModerationDelay));
        // The count ladder goes to NAPI's deferral instead.
        assert_eq!(
            by("napi_defer_hard_irqs").tuner_kind,
            Some(TunerKind::ModerationCount)
        );
        // tun is not catalogued: what it reports is tuned.
        assert!(coalesce_tunable("tun", "rx_frames"));
    }

    #[test]
    fn the_tuner_steps_over_e1000s_rx_usecs_modes() {
        // e1000_set_coalesce: 0 off, 1/3/4 adaptive modes, 2 and 5-9 EINVAL, then 10-10000 us.
        // The lab's 6.1 guest refused the tuner's 3 -> 5 us with EINVAL, trial after trial.
        let s = NicSettings {
            rings: None,
            coalesce: Some(Coalesce {
                rx_usecs: Some(3),
                ..Default::default()
            }),
        };
        let k = nic("e1000", Some(&s), &[("napi_defer_hard_irqs", 0)]);
        let usecs = k.iter().find(|k| k.name == "rx_usecs").unwrap();
        assert_eq!((usecs.delays_from, usecs.max), (Some(10), Some(10_000)));
        let (at, bounds) = crate::knobs::tuner_space(&k, 64);
        assert_eq!(bounds.moderation_usecs_floor, 10);
        let step = |dir| {
            crate::tuner::Knob::ModerationUsecs
                .step(&at, dir, &bounds)
                .map(|s| s.moderation_usecs)
        };
        assert_eq!(step(crate::tuner::Direction::Up), Some(10));
        assert_eq!(step(crate::tuner::Direction::Down), Some(0));
        // Other drivers keep the whole ladder.
        let (at, bounds) = crate::knobs::tuner_space(&nic("tun", Some(&s), &[]), 64);
        let up =
            crate::tuner::Knob::ModerationUsecs.step(&at, crate::tuner::Direction::Up, &bounds);
        assert_eq!(up.map(|s| s.moderation_usecs), Some(5));
    }

    /// virtio_net's rings as QEMU 7.2 gives them to a 6.1 guest, its rx ring shrunk to 128 by
    /// an operator; fixed coalescing, NAPI from sysfs.
    fn virtio_net_knobs(mode: crate::kernel::RingResets) -> Vec<Knob> {
        let s = NicSettings {
            rings: Some(Rings {
                rx: 128,
                tx: 256,
                rx_max: 256,
                tx_max: 256,
            }),
            coalesce: None,
        };
        let mut k = nic(
            "virtio_net",
            Some(&s),
            &[("napi_defer_hard_irqs", 0), ("gro_flush_timeout", 0)],
        );
        explore_ring_resets("virtio_net", &mut k, mode);
        k
    }

    #[test]
    fn only_a_queue_resetting_drivers_rx_ring_is_explored_and_only_when_allowed() {
        use crate::kernel::RingResets;
        let k = virtio_net_knobs(RingResets::Explore);
        let by = |n: &str| k.iter().find(|k| k.name == n).unwrap();
        let rx = by("rx_ring");
        assert!(rx.explored_on_pressure && rx.explorable());
        assert_eq!(
            rx.disruption,
            Disruption::ResetsQueue,
            "still said as it is"
        );
        assert_eq!(rx.not_explored_because(), None);
        let tx = by("tx_ring");
        assert!(!tx.explorable());
        assert_eq!(
            tx.not_explored_because().unwrap(),
            "tx_ring resets the queue when changed: recommend only"
        );
        // The operator's switch keeps both recommend only.
        let k = virtio_net_knobs(RingResets::Recommend);
        assert!(k.iter().all(|k| !k.explored_on_pressure));
        assert!(k
            .iter()
            .find(|k| k.name == "rx_ring")
            .unwrap()
            .not_explored_because()
            .unwrap()
            .contains("resets the queue"));
        // mlx5 resets the queue too; rings that detach or flap the link, and the rings of a
        // driver the catalogue does not know, stay recommend only with their reason.
        let rings = NicSettings {
            rings: Some(Rings {
                rx: 512,
                tx: 512,
                rx_max: 8192,
                tx_max: 8192,
            }),
            coalesce: None,
        };
        for (driver, explored) in [
            ("mlx5_core", true),
            ("hv_netvsc", false),
            ("e1000", false),
            ("e1000e", false),
            ("ena", false),
            ("gve", false),
            ("some_new_nic", false),
        ] {
            let mut k = nic(driver, Some(&rings), &[]);
            explore_ring_resets(driver, &mut k, RingResets::Explore);
            let rx = k.iter().find(|k| k.name == "rx_ring").unwrap();
            assert_eq!(rx.explorable(), explored, "{driver}");
            assert_eq!(rx.not_explored_because().is_none(), explored, "{driver}");
            assert!(!k.iter().find(|k| k.name == "tx_ring").unwrap().explorable());
        }
        let mut e1000 = nic("e1000", Some(&rings), &[]);
        explore_ring_resets("e1000", &mut e1000, RingResets::Explore);
        assert!(e1000[0]
            .not_explored_because()
            .unwrap()
            .contains("rx_ring detaches and re-creates the device"));
    }

    #[test]
    fn the_ring_ladder_moves_virtio_nets_rx_ring_alone() {
        use crate::tuner::{Direction, Knob as T};
        let k = virtio_net_knobs(crate::kernel::RingResets::Explore);
        let (s, b) = crate::knobs::tuner_space(&k, 64);
        // The ring slot stands for the rx ring: 128 descriptors, up to its 256.
        assert_eq!(
            (s.ring_in_bytes, s.ring_out_bytes),
            (128 * 4096, 128 * 4096)
        );
        assert_eq!(b.ring_bytes, (16 * 1024, 256 * 4096));
        assert!(b.contains(&s));
        let up = T::RingBytes.step(&s, Direction::Up, &b).unwrap();
        assert_eq!(
            crate::knobs::changes_to(&k, &up),
            vec![("rx_ring".to_string(), 128, 256)],
            "the tx ring is never written"
        );
        assert!(
            T::RingBytes.step(&up, Direction::Up, &b).is_none(),
            "256 is the most"
        );
        // Recommend only: pinned.
        let k = virtio_net_knobs(crate::kernel::RingResets::Recommend);
        let (s, b) = crate::knobs::tuner_space(&k, 64);
        assert!(T::RingBytes.step(&s, Direction::Up, &b).is_none());
    }

    /// The tuner tries the rx ring only when the NIC shows ring pressure (its windows'
    /// `ring_full`, fed from NAPI polls that used their whole budget), and then tries it.
    #[test]
    fn the_ring_ladder_is_tried_only_under_pressure() {
        use crate::tuner::decide::{DeviceTuner, Policy, TunerParams};
        use crate::tuner::{Action, Objective, TunerMode};
        let k = virtio_net_knobs(crate::kernel::RingResets::Explore);
        let (start, b) = crate::knobs::tuner_space(&k, 64);
        let run = |pressure: u64| {
            let mut t = DeviceTuner::new(
                Policy {
                    mode: TunerMode::Auto,
                    objective: Objective::Throughput,
                    slo_p99_ns: 5_000_000,
                    pinned: false,
                },
                TunerParams {
                    min_change_interval_ms: 100,
                    settle_windows: 0,
                    trial_windows: 2,
                    ..TunerParams::default()
                },
            );
            let mut current = start;
            let mut rings = Vec::new();
            for i in 0..600u64 {
                let mut w = crate::tuner::window::Window::uniform(0.5, 5000, 50_000, 1000);
                w.ring_full = pressure;
                if let Some(o) = t.step((i + 1) * 500, &current, &b, &w) {
                    if o.action != Action::Recommend {
                        current = o.to;
                        t.applied(current);
                        if o.action == Action::Change
                            && current.ring_in_bytes != start.ring_in_bytes
                        {
                            rings.push(crate::knobs::changes_to(&k, &current));
                        }
                    }
                }
            }
            rings
        };
        assert!(run(0).is_empty(), "no pressure, no ring trial");
        let tried = run(3);
        assert!(
            tried
                .iter()
                .any(|c| c.contains(&("rx_ring".to_string(), 128, 256))),
            "{tried:?}"
        );
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
