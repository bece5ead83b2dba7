//! How the tuner reads and changes a device's settings.
//!
//! [`SettingsBackend`] is one device's knobs; [`BackendFactory`] decides which backend (if any)
//! serves a device from its registry record. Synthetic (and emulated) devices are served by
//! [`ControlBackend`] over their control socket (contract 4). Kernel devices (ethtool coalescing
//! and ring parameters, block-queue sysfs) plug in as another factory without touching the tuner.

use enlight_driver::control::{ControlClient, ControlError, Limits, SettingsPatch};
use enlight_driver::registry::DeviceRecord;
use enlight_driver::settings::DeviceSettings;

use super::Bounds;

/// Why a backend could not read or apply settings.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The device said no; `kind` is contract 4's error kind.
    #[error("{kind}: {message}")]
    Rejected { kind: String, message: String },
    /// The device could not be reached.
    #[error("unreachable: {0}")]
    Unreachable(String),
}

impl From<ControlError> for BackendError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Io { .. } | ControlError::BadResponse(_) => {
                BackendError::Unreachable(e.to_string())
            }
            other => BackendError::Rejected {
                kind: other.kind().to_string(),
                message: other.to_string(),
            },
        }
    }
}

/// A notification from the kernel that some knobs of a device now have these values (the
/// ethtool netlink `monitor` group, [`crate::kernel::monitor`]): whoever changed them, enlight
/// included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnobNotice {
    /// The device (for kernel NICs, the interface name).
    pub device: String,
    /// Its interface index, 0 if the notification did not say.
    pub ifindex: u32,
    /// What the notification is about (`coalescing`, `rings`).
    pub what: String,
    /// Knob name (as the device's knobs name them) → value now.
    pub knobs: Vec<(String, u64)>,
}

/// One device's knobs.
pub trait SettingsBackend: Send {
    /// The settings in force and the device's bounds, as the device reports them.
    fn get(&mut self) -> Result<(DeviceSettings, Bounds), BackendError>;
    /// Puts `to` in force (only the knobs that differ from `from` are sent) and returns what the
    /// device reports in force afterwards.
    fn apply(
        &mut self,
        from: &DeviceSettings,
        to: &DeviceSettings,
    ) -> Result<DeviceSettings, BackendError>;
    /// After [`SettingsBackend::get`]: why the device must be left alone, if someone else
    /// changed a knob this backend had set (said once per change; the tuner pins the device).
    fn changed_by_someone_else(&mut self) -> Option<String> {
        None
    }
    /// A kernel notification of knob values now in force ([`KnobNotice`]): why the device
    /// must be left alone if it shows someone else changed a knob this backend set (then
    /// [`SettingsBackend::changed_by_someone_else`] does not say it again); `None` when the
    /// values are enlight's own writes or concern no knob it set.
    fn notified(&mut self, _notice: &KnobNotice) -> Option<String> {
        None
    }
    /// Why this device may only get recommendations (a kernel device not named in `[kernel]
    /// tune`, or `[kernel] dry_run`): the tuner then runs it in dry-run mode rather than
    /// trying changes that can only fail. `None`: changes may be applied.
    fn recommend_only(&self) -> Option<String> {
        None
    }
    /// `to` said in the device's own knobs (`nr_requests 128 → 64`), where they are not the
    /// tuner's settings themselves (kernel devices); `None`: the settings say it.
    fn in_own_knobs(&mut self, _to: &DeviceSettings) -> Option<String> {
        None
    }
}

/// Picks the backend of a device.
pub trait BackendFactory: Send {
    /// `None` when this factory cannot tune the device (e.g. it has no control socket).
    fn open(&self, record: &DeviceRecord)
        -> Option<Result<Box<dyn SettingsBackend>, BackendError>>;
}

impl From<&Limits> for Bounds {
    fn from(l: &Limits) -> Bounds {
        Bounds {
            ring_bytes: (l.ring_bytes[0], l.ring_bytes[1]),
            ring_page: l.ring_page,
            moderation_frames: (l.moderation_frames[0], l.moderation_frames[1]),
            moderation_usecs: (l.moderation_usecs[0], l.moderation_usecs[1]),
            moderation_usecs_floor: 1,
            poll_budget: (l.poll_budget[0], l.poll_budget[1]),
            frames_ladder: super::Ladder::Fine,
            usecs_ladder: super::Ladder::Fine,
        }
    }
}

/// A device's control socket.
pub struct ControlBackend {
    client: ControlClient,
}

impl ControlBackend {
    /// Connects to `path`.
    pub fn connect(path: &std::path::Path) -> Result<ControlBackend, BackendError> {
        Ok(ControlBackend {
            client: ControlClient::connect(path)?,
        })
    }
}

impl SettingsBackend for ControlBackend {
    fn get(&mut self) -> Result<(DeviceSettings, Bounds), BackendError> {
        let (settings, limits, _generation) = self.client.get()?;
        Ok((settings, Bounds::from(&limits)))
    }

    fn apply(
        &mut self,
        from: &DeviceSettings,
        to: &DeviceSettings,
    ) -> Result<DeviceSettings, BackendError> {
        let patch = SettingsPatch::between(from, to);
        if patch.is_empty() {
            return Ok(*to);
        }
        Ok(self.client.set(patch)?)
    }
}

/// Serves every device whose record names a control socket.
#[derive(Debug, Default, Clone, Copy)]
pub struct ControlSocketFactory;

impl BackendFactory for ControlSocketFactory {
    fn open(
        &self,
        record: &DeviceRecord,
    ) -> Option<Result<Box<dyn SettingsBackend>, BackendError>> {
        let path = record.control.as_ref()?;
        Some(ControlBackend::connect(path).map(|b| Box::new(b) as Box<dyn SettingsBackend>))
    }
}
