//! Kernel NICs as the tuner sees devices: a [`SettingsBackend`] over the knobs the NIC really
//! has ([`super::knobs::nic`]: ethtool rings and coalescing, NAPI moderation in sysfs), and a
//! [`BackendFactory`] that serves kernel devices with it and every other device with the
//! control-socket factory.
//!
//! The tuner's search space is built from those knobs ([`crate::knobs::tuner_space`]): each
//! live knob rides the ladder of its kind (`rx-frames`, else `napi_defer_hard_irqs`, on the
//! moderation-count ladder; `rx-usecs`, else `gro_flush_timeout`, on the delay ladder), and
//! every knob that is not live (a ring resize resets the queue on most drivers and detaches
//! `hv_netvsc`) is pinned where it is: recommend only. The poll budget is the NAPI weight, 64,
//! which is no per-device knob.
//!
//! Every change goes through [`KernelTuner`] (journalled first, restorable), and only when the
//! policy ([`super::tune::policy`]) says `Apply`: any other device is refused as `unsupported`
//! with the reason, so the tuner can only recommend for it. A change of several knobs that
//! fails part-way puts back the ones already made, so nothing is left half-applied.

use std::path::{Path, PathBuf};

use enlight_driver::registry::DeviceRecord;
use enlight_driver::settings::DeviceSettings;

use super::ethtool::NicPatch;
use super::napi::NAPI_KNOBS;
use super::tune::{policy, KernelTuner, Permission, TuneError};
use super::KernelConfig;
use crate::knobs::Knob;
use crate::tuner::backend::{BackendError, BackendFactory, ControlSocketFactory, SettingsBackend};
use crate::tuner::Bounds;

/// The NAPI weight the kernel polls NIC queues with.
pub const NAPI_WEIGHT: u32 = 64;

/// The knobs of NIC `iface` (in `netns`, if given) as read now.
pub fn nic_knobs(iface: &str, netns: Option<&Path>) -> Result<Vec<Knob>, TuneError> {
    let ethtool = KernelTuner::nic_settings(iface, netns)?;
    let driver = super::tune::in_netns(netns, || super::ethtool::driver_name(iface))?;
    let napi = KernelTuner::napi_settings(iface, netns)?;
    let mut knobs = super::knobs::nic(&driver, Some(&ethtool), &napi);
    knobs.extend(super::knobs::napi_instances(&napi_instances(iface, netns)));
    Ok(knobs)
}

/// The NAPI instances of `iface` (in `netns`, if given) through netdev netlink; none on a
/// kernel without the family's NAPI operations (the sysfs knobs still apply there).
pub fn napi_instances(iface: &str, netns: Option<&Path>) -> Vec<super::netdev::NapiInstance> {
    let read = || -> Result<Vec<super::netdev::NapiInstance>, super::netdev::NetdevError> {
        let name = std::ffi::CString::new(iface)
            .map_err(|_| super::netdev::NetdevError::Decode(format!("bad name {iface:?}")))?;
        // SAFETY: a valid NUL-terminated name; if_nametoindex only reads it.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Ok(Vec::new());
        }
        super::netdev::Netdev::open()?.napis(iface, ifindex)
    };
    match super::tune::in_netns(netns, read) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            log::debug!("{iface}: {e}");
            Vec::new()
        }
        Err(e) => {
            log::debug!("{iface}: {e}");
            Vec::new()
        }
    }
}

/// The ethtool patch of one knob change (`None`: not an ethtool knob).
fn ethtool_patch(knob: &str, value: u64) -> Option<NicPatch> {
    let v = u32::try_from(value).ok()?;
    let mut p = NicPatch::default();
    match knob {
        "rx_frames" => p.rx_frames = Some(v),
        "rx_usecs" => p.rx_usecs = Some(v),
        "tx_frames" => p.tx_frames = Some(v),
        "tx_usecs" => p.tx_usecs = Some(v),
        "rx_ring" => p.rx_ring = Some(v),
        "tx_ring" => p.tx_ring = Some(v),
        _ => return None,
    }
    Some(p)
}

fn rejected(e: &TuneError) -> BackendError {
    use super::ethtool::EthtoolError as E;
    use super::napi::NapiError as N;
    BackendError::Rejected {
        kind: match e {
            TuneError::Ethtool(E::Unsupported { .. }) | TuneError::Napi(N::Unsupported { .. }) => {
                "unsupported"
            }
            TuneError::Ethtool(E::OutOfRange { .. })
            | TuneError::Napi(N::OutOfRange { .. })
            | TuneError::BlockQueue(_) => "out_of_range",
            _ => "internal",
        }
        .into(),
        message: e.to_string(),
    }
}

/// One kernel NIC's knobs.
pub struct KernelNicBackend {
    iface: String,
    netns: Option<PathBuf>,
    permission: Permission,
    tuner: KernelTuner,
    /// The knobs this backend set, with the value the kernel reported afterwards: re-read
    /// every tick, so a change by anyone else is seen within one.
    owned: std::collections::BTreeMap<String, u64>,
    /// Someone else's change: no write from this backend after it (the tuner pins the device;
    /// unpinning opens a fresh backend).
    someone_else: Option<String>,
    /// Whether the tuner has been told.
    reported: bool,
}

/// Whether someone else changed a knob enlight set: the first knob whose value in `knobs`
/// differs from what enlight left it at (`owned`), said as what changed from what to what. A
/// pure function.
pub fn changed_by_someone_else(
    iface: &str,
    owned: &std::collections::BTreeMap<String, u64>,
    knobs: &[Knob],
) -> Option<String> {
    owned.iter().find_map(|(name, ours)| {
        let k = knobs.iter().find(|k| &k.name == name)?;
        (k.value != *ours).then(|| {
            let show = |v: u64| {
                Knob {
                    value: v,
                    ..k.clone()
                }
                .display_value()
            };
            format!(
                "{name} on {iface} changed from {} (set by enlight) to {} by someone else",
                show(*ours),
                show(k.value)
            )
        })
    })
}

impl KernelNicBackend {
    /// The NIC `iface` (in the network namespace at `netns`, if given), journalling under
    /// `runtime_dir`, changing it only if `permission` is `Apply`.
    pub fn open(
        iface: &str,
        netns: Option<&Path>,
        permission: Permission,
        runtime_dir: &Path,
    ) -> Result<KernelNicBackend, BackendError> {
        Ok(KernelNicBackend {
            iface: iface.into(),
            netns: netns.map(Path::to_path_buf),
            permission,
            tuner: KernelTuner::open(runtime_dir)
                .map_err(|e| BackendError::Unreachable(e.to_string()))?,
            owned: Default::default(),
            someone_else: None,
            reported: false,
        })
    }

    /// Reads the knobs and notes a change of an owned knob by someone else (the knob is no
    /// longer ours then: enlight never writes over it).
    fn read(&mut self) -> Result<Vec<Knob>, BackendError> {
        let knobs = nic_knobs(&self.iface, self.netns.as_deref())
            .map_err(|e| BackendError::Unreachable(e.to_string()))?;
        if let Some(why) = changed_by_someone_else(&self.iface, &self.owned, &knobs) {
            self.owned.clear();
            self.someone_else = Some(why);
            self.reported = false;
        }
        Ok(knobs)
    }
}

impl KernelNicBackend {
    /// Sets one knob through its source (journalled by [`KernelTuner`]).
    fn set_one(&mut self, knob: &str, value: u64) -> Result<(), TuneError> {
        if NAPI_KNOBS.contains(&knob) {
            self.tuner
                .set_napi(&self.iface, self.netns.as_deref(), knob, value)
                .map(|_| ())
        } else if let Some(patch) = ethtool_patch(knob, value) {
            self.tuner
                .set_nic(&self.iface, self.netns.as_deref(), &patch)
                .map(|_| ())
        } else {
            Err(TuneError::Ethtool(
                super::ethtool::EthtoolError::Unsupported {
                    iface: self.iface.clone(),
                    driver: super::ethtool::driver_name(&self.iface),
                    what: format!("{knob} (not a knob enlight sets)"),
                },
            ))
        }
    }
}

impl SettingsBackend for KernelNicBackend {
    fn get(&mut self) -> Result<(DeviceSettings, Bounds), BackendError> {
        let knobs = self.read()?;
        Ok(crate::knobs::tuner_space(&knobs, NAPI_WEIGHT))
    }

    fn changed_by_someone_else(&mut self) -> Option<String> {
        if self.reported {
            return None;
        }
        self.reported = true;
        self.someone_else.clone()
    }

    fn apply(
        &mut self,
        _from: &DeviceSettings,
        to: &DeviceSettings,
    ) -> Result<DeviceSettings, BackendError> {
        if let Permission::RecommendOnly(why) = &self.permission {
            return Err(BackendError::Rejected {
                kind: "unsupported".into(),
                message: format!("{}: recommend only ({why})", self.iface),
            });
        }
        // What is in force now, not what the tuner last saw: only real differences are written,
        // and nothing once someone else has changed a knob enlight set.
        let knobs = self.read()?;
        if let Some(why) = &self.someone_else {
            return Err(BackendError::Rejected {
                kind: "busy".into(),
                message: format!("{why}: enlight leaves it alone"),
            });
        }
        let mut done: Vec<(String, u64)> = Vec::new();
        for (knob, before, after) in crate::knobs::changes_to(&knobs, to) {
            if let Err(e) = self.set_one(&knob, after) {
                // Nothing half-applied: the knobs already changed go back (their originals
                // stay journalled until `enlight restore` or a clean exit).
                for (k, v) in done.iter().rev() {
                    if let Err(undo) = self.set_one(k, *v) {
                        log::warn!("{}: putting {k} back to {v}: {undo}", self.iface);
                    }
                }
                return Err(rejected(&e));
            }
            done.push((knob, before));
        }
        let after = nic_knobs(&self.iface, self.netns.as_deref())
            .map_err(|e| BackendError::Unreachable(e.to_string()))?;
        for (name, _) in &done {
            if let Some(k) = after.iter().find(|k| &k.name == name) {
                self.owned.insert(name.clone(), k.value);
            }
        }
        Ok(crate::knobs::tuner_space(&after, NAPI_WEIGHT).0)
    }
}

/// Serves kernel NICs with [`KernelNicBackend`] and every other device with the control
/// socket ([`ControlSocketFactory`]). Kernel disks have no [`DeviceSettings`] knobs.
pub struct KernelAwareFactory {
    config: KernelConfig,
    runtime_dir: PathBuf,
}

impl KernelAwareFactory {
    /// Applies `config`'s policy, journalling under `runtime_dir`.
    pub fn new(config: KernelConfig, runtime_dir: PathBuf) -> Self {
        KernelAwareFactory {
            config,
            runtime_dir,
        }
    }
}

impl BackendFactory for KernelAwareFactory {
    fn open(
        &self,
        record: &DeviceRecord,
    ) -> Option<Result<Box<dyn SettingsBackend>, BackendError>> {
        if record.kind != "kernel" {
            return ControlSocketFactory.open(record);
        }
        if record.device != "nic" {
            return None;
        }
        let permission = policy(&self.config.tune, self.config.dry_run, &record.name);
        Some(
            KernelNicBackend::open(&record.name, None, permission, &self.runtime_dir)
                .map(|b| Box::new(b) as Box<dyn SettingsBackend>),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ethtool::{Coalesce, NicSettings, Rings};

    #[test]
    fn nic_knobs_make_the_tuners_search_space() {
        let s = NicSettings {
            rings: Some(Rings {
                rx: 256,
                tx: 512,
                rx_max: 4096,
                tx_max: 4096,
            }),
            coalesce: Some(Coalesce {
                rx_frames: Some(1),
                rx_usecs: Some(0),
                ..Default::default()
            }),
        };
        let knobs = crate::kernel::knobs::nic(
            "virtio_net",
            Some(&s),
            &[("napi_defer_hard_irqs", 0), ("gro_flush_timeout", 0)],
        );
        let (d, b) = crate::knobs::tuner_space(&knobs, NAPI_WEIGHT);
        assert_eq!((d.moderation_frames, d.moderation_usecs), (1, 0));
        assert!(b.contains(&d));
        assert_eq!(b.moderation_frames, (0, 256));
        assert_eq!(b.poll_budget, (NAPI_WEIGHT, NAPI_WEIGHT));
        // Rings reset the queue on virtio_net: pinned.
        assert_eq!(b.ring_bytes.0, b.ring_bytes.1);
        // A driver without rx-usecs (tun): NAPI's timer takes the delay ladder.
        let tun = NicSettings {
            rings: None,
            coalesce: Some(Coalesce {
                rx_frames: Some(0),
                ..Default::default()
            }),
        };
        let knobs = crate::kernel::knobs::nic(
            "tun",
            Some(&tun),
            &[("napi_defer_hard_irqs", 0), ("gro_flush_timeout", 20_000)],
        );
        let (d, b) = crate::knobs::tuner_space(&knobs, NAPI_WEIGHT);
        assert_eq!(d.moderation_usecs, 20);
        assert_eq!(b.moderation_usecs, (0, 1000));
        let to = DeviceSettings {
            moderation_frames: 8,
            ..d
        };
        assert_eq!(
            crate::knobs::changes_to(&knobs, &to),
            vec![("rx_frames".to_string(), 0, 8)]
        );
    }

    #[test]
    fn a_knob_someone_else_changed_is_named_with_both_values() {
        let knobs = crate::kernel::knobs::nic(
            "veth",
            None,
            &[("napi_defer_hard_irqs", 10), ("gro_flush_timeout", 50_000)],
        );
        let mut owned = std::collections::BTreeMap::new();
        owned.insert("napi_defer_hard_irqs".to_string(), 10);
        assert_eq!(changed_by_someone_else("b", &owned, &knobs), None);
        owned.insert("gro_flush_timeout".to_string(), 200_000);
        assert_eq!(
            changed_by_someone_else("b", &owned, &knobs).as_deref(),
            Some("gro_flush_timeout on b changed from 200000 ns (set by enlight) to 50000 ns by someone else")
        );
    }

    #[test]
    fn only_knobs_enlight_sets_make_patches() {
        assert_eq!(ethtool_patch("rx_frames", 32).unwrap().rx_frames, Some(32));
        assert!(ethtool_patch("adaptive_rx", 1).is_none());
        assert!(ethtool_patch("rx_frames", u64::MAX).is_none());
    }

    #[test]
    fn recommend_only_devices_refuse_changes_and_others_use_the_control_socket() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = KernelNicBackend::open(
            "eth0",
            None,
            Permission::RecommendOnly("not named".into()),
            dir.path(),
        )
        .unwrap();
        let from = DeviceSettings::default();
        let to = DeviceSettings {
            moderation_frames: 2,
            ..from
        };
        let e = b.apply(&from, &to).unwrap_err();
        assert!(e.to_string().contains("recommend only"), "{e}");
        let factory = KernelAwareFactory::new(KernelConfig::default(), dir.path().into());
        let mut record = DeviceRecord {
            name: "vda".into(),
            device: "disk".into(),
            kind: "kernel".into(),
            dev_id: 0,
            pid: 0,
            pid_start_time: None,
            exe: PathBuf::new(),
            started_unix_ms: 0,
            settings: DeviceSettings::default(),
            control: None,
        };
        assert!(
            factory.open(&record).is_none(),
            "kernel disks have no tuner knobs"
        );
        record.kind = "synthetic".into();
        assert!(factory.open(&record).is_none(), "no control socket");
    }
}
