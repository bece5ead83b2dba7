//! Kernel NICs as the tuner sees devices: a [`SettingsBackend`] over ethtool coalescing, and a
//! [`BackendFactory`] that serves kernel devices with it and every other device with the
//! control-socket factory.
//!
//! The tuner speaks [`DeviceSettings`]; a kernel NIC maps onto it as:
//! - `moderation_frames` ↔ `rx-frames`, `moderation_usecs` ↔ `rx-usecs` (ethtool coalescing),
//!   explored within [`FRAMES`] and [`USECS`] when the driver has the knob, else fixed;
//! - `ring_in_bytes`/`ring_out_bytes` ↔ rx/tx ring descriptors × [`RING_UNIT`], reported but
//!   fixed (bounds = current value): resizing a ring resets the queue on most drivers (a link
//!   flap on some), which no live exploration should do;
//! - `poll_budget` ↔ the NAPI weight, fixed at 64 (not a per-device knob).
//!
//! Every change goes through [`KernelTuner`] (journalled first, restorable), and only when the
//! policy ([`super::tune::policy`]) says `Apply`: any other device is refused as `unsupported`
//! with the reason, so the tuner can only recommend for it.

use std::path::{Path, PathBuf};

use enlight_driver::registry::DeviceRecord;
use enlight_driver::settings::DeviceSettings;

use super::ethtool::{NicPatch, NicSettings};
use super::tune::{policy, KernelTuner, Permission};
use super::KernelConfig;
use crate::tuner::backend::{BackendError, BackendFactory, ControlSocketFactory, SettingsBackend};
use crate::tuner::Bounds;

/// Bytes one ring descriptor stands for in [`DeviceSettings`]' ring sizes (a page, so the
/// tuner's page-multiple rule holds).
pub const RING_UNIT: u32 = 4096;
/// The NAPI weight the kernel polls NIC queues with.
pub const NAPI_WEIGHT: u32 = 64;
/// Range explored for `rx-frames`.
pub const FRAMES: (u32, u32) = (1, 256);
/// Range explored for `rx-usecs`.
pub const USECS: (u32, u32) = (0, 1000);

/// The settings and bounds of a NIC as the tuner sees them.
pub fn as_device_settings(s: &NicSettings) -> (DeviceSettings, Bounds) {
    let (rx, tx) = s
        .rings
        .map(|r| (r.rx * RING_UNIT, r.tx * RING_UNIT))
        .unwrap_or((RING_UNIT, RING_UNIT));
    let c = s.coalesce.unwrap_or_default();
    let frames = c.rx_frames.unwrap_or(1);
    let usecs = c.rx_usecs.unwrap_or(0);
    let settings = DeviceSettings {
        ring_out_bytes: tx,
        ring_in_bytes: rx,
        moderation_frames: frames,
        moderation_usecs: usecs,
        poll_budget: NAPI_WEIGHT,
    };
    let bounds = Bounds {
        ring_bytes: (rx.min(tx), rx.max(tx)),
        ring_page: RING_UNIT,
        moderation_frames: if c.rx_frames.is_some() {
            (FRAMES.0, FRAMES.1.max(frames))
        } else {
            (frames, frames)
        },
        moderation_usecs: if c.rx_usecs.is_some() {
            (USECS.0, USECS.1.max(usecs))
        } else {
            (usecs, usecs)
        },
        poll_budget: (NAPI_WEIGHT, NAPI_WEIGHT),
    };
    (settings, bounds)
}

/// The coalescing change from `from` to `to` (rings and budget are not the tuner's to change).
pub fn patch_between(from: &DeviceSettings, to: &DeviceSettings) -> NicPatch {
    NicPatch {
        rx_frames: (from.moderation_frames != to.moderation_frames).then_some(to.moderation_frames),
        rx_usecs: (from.moderation_usecs != to.moderation_usecs).then_some(to.moderation_usecs),
        ..Default::default()
    }
}

/// One kernel NIC's knobs.
pub struct KernelNicBackend {
    iface: String,
    netns: Option<PathBuf>,
    permission: Permission,
    tuner: KernelTuner,
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
        })
    }
}

impl SettingsBackend for KernelNicBackend {
    fn get(&mut self) -> Result<(DeviceSettings, Bounds), BackendError> {
        let s = KernelTuner::nic_settings(&self.iface, self.netns.as_deref())
            .map_err(|e| BackendError::Unreachable(e.to_string()))?;
        Ok(as_device_settings(&s))
    }

    fn apply(
        &mut self,
        from: &DeviceSettings,
        to: &DeviceSettings,
    ) -> Result<DeviceSettings, BackendError> {
        if let Permission::RecommendOnly(why) = &self.permission {
            return Err(BackendError::Rejected {
                kind: "unsupported".into(),
                message: format!("{}: recommend only ({why})", self.iface),
            });
        }
        let patch = patch_between(from, to);
        if patch.is_empty() {
            return Ok(*from);
        }
        let after = self
            .tuner
            .set_nic(&self.iface, self.netns.as_deref(), &patch)
            .map_err(|e| BackendError::Rejected {
                kind: match &e {
                    super::tune::TuneError::Ethtool(
                        super::ethtool::EthtoolError::Unsupported { .. },
                    ) => "unsupported",
                    super::tune::TuneError::Ethtool(super::ethtool::EthtoolError::OutOfRange {
                        ..
                    })
                    | super::tune::TuneError::BlockQueue(_) => "out_of_range",
                    _ => "internal",
                }
                .into(),
                message: e.to_string(),
            })?;
        Ok(as_device_settings(&after).0)
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
    use crate::kernel::ethtool::{Coalesce, Rings};

    #[test]
    fn nic_settings_map_onto_the_tuners_knobs() {
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
        let (d, b) = as_device_settings(&s);
        assert_eq!(
            (
                d.ring_in_bytes,
                d.ring_out_bytes,
                d.moderation_frames,
                d.moderation_usecs
            ),
            (256 * RING_UNIT, 512 * RING_UNIT, 1, 0)
        );
        assert!(b.contains(&d));
        assert_eq!(b.moderation_frames, FRAMES);
        assert_eq!(b.poll_budget, (NAPI_WEIGHT, NAPI_WEIGHT));
        // A driver without rx-usecs (tun): that knob is pinned where it is.
        let tun = NicSettings {
            rings: None,
            coalesce: Some(Coalesce {
                rx_frames: Some(0),
                ..Default::default()
            }),
        };
        let (d, b) = as_device_settings(&tun);
        assert_eq!(b.moderation_usecs, (0, 0));
        assert_eq!(d.moderation_frames, 0);
    }

    #[test]
    fn only_coalescing_changes_are_sent() {
        let from = DeviceSettings::default();
        let to = DeviceSettings {
            moderation_frames: 32,
            ring_in_bytes: from.ring_in_bytes * 2,
            ..from
        };
        let p = patch_between(&from, &to);
        assert_eq!(p.rx_frames, Some(32));
        assert_eq!((p.rx_usecs, p.rx_ring), (None, None));
        assert!(patch_between(&from, &from).is_empty());
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
