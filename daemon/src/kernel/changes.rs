//! Changing kernel device settings safely: every value is checked against what the device
//! permits before anything is written; every knob's original value is journalled before its
//! first change ([`super::journal`]); [`KernelChanges::restore`] puts every original back (what
//! `enlight restore` and enlightd's clean shutdown call). Which devices may be changed at all is
//! [`super::permission`]'s; a NIC in another network namespace is reached through
//! [`super::netns`].

mod restore;

use std::path::Path;

use super::blockq::{BlockQueueError, BlockQueues, SCHEDULER};
use super::ethtool::{Ethtool, EthtoolError, NicPatch, NicSettings};
use super::journal::{Journal, JournalError, KnobValue, Target};
use super::napi::{NapiError, NapiSysfs};
use super::napi_instance::{
    napi_instance_knob, napi_instance_patch, napi_instance_range, napi_instance_value,
    napi_sysfs_knob, parse_napi_instance_knob, NAPI_INSTANCE_KNOBS,
};
use super::netdev::{NapiInstance, Netdev, NetdevError};
use super::netns::{in_netns, in_netns_sysfs, NetnsError};

pub use restore::{restore_order, RestoreReport};

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Ethtool(#[from] EthtoolError),
    #[error(transparent)]
    BlockQueue(#[from] BlockQueueError),
    #[error(transparent)]
    Napi(#[from] NapiError),
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The network namespace could not be entered (or its sysfs mounted).
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// Reads a NIC's settings (in `netns`, if given).
pub fn nic_settings(iface: &str, netns: Option<&Path>) -> Result<NicSettings, ChangeError> {
    in_netns(netns, || -> Result<NicSettings, EthtoolError> {
        Ethtool::open()?.settings(iface)
    })?
    .map_err(ChangeError::from)
}

/// The NAPI sysfs knobs of `iface` (in `netns`, if given).
pub fn napi_settings(
    iface: &str,
    netns: Option<&Path>,
) -> Result<Vec<(&'static str, u64)>, ChangeError> {
    Ok(in_netns_sysfs(netns, || NapiSysfs::default().all(iface))?)
}

/// Knob name → value (as the journal names and holds them), of a NIC's ethtool settings.
fn settings_values(s: &NicSettings) -> Vec<(&'static str, KnobValue)> {
    let mut out = Vec::new();
    if let Some(r) = s.rings {
        out.push(("rx_ring", KnobValue::U32(r.rx)));
        out.push(("tx_ring", KnobValue::U32(r.tx)));
    }
    if let Some(c) = s.coalesce {
        let u = [
            ("rx_usecs", c.rx_usecs),
            ("rx_frames", c.rx_frames),
            ("tx_usecs", c.tx_usecs),
            ("tx_frames", c.tx_frames),
        ];
        for (k, v) in u {
            if let Some(v) = v {
                out.push((k, KnobValue::U32(v)));
            }
        }
        for (k, v) in [
            ("adaptive_rx", c.adaptive_rx),
            ("adaptive_tx", c.adaptive_tx),
        ] {
            if let Some(v) = v {
                out.push((k, KnobValue::Bool(v)));
            }
        }
    }
    out
}

/// Knob name → value (as the journal names and holds them), of an ethtool patch.
fn patch_values(p: &NicPatch) -> Vec<(&'static str, KnobValue)> {
    let mut out = Vec::new();
    for (k, v) in [
        ("rx_ring", p.rx_ring),
        ("tx_ring", p.tx_ring),
        ("rx_usecs", p.rx_usecs),
        ("rx_frames", p.rx_frames),
        ("tx_usecs", p.tx_usecs),
        ("tx_frames", p.tx_frames),
    ] {
        if let Some(v) = v {
            out.push((k, KnobValue::U32(v)));
        }
    }
    for (k, v) in [
        ("adaptive_rx", p.adaptive_rx),
        ("adaptive_tx", p.adaptive_tx),
    ] {
        if let Some(v) = v {
            out.push((k, KnobValue::Bool(v)));
        }
    }
    out
}

/// A patch setting one knob.
fn patch_of(knob: &str, value: KnobValue) -> Option<NicPatch> {
    let mut p = NicPatch::default();
    match (knob, value) {
        ("rx_ring", KnobValue::U32(v)) => p.rx_ring = Some(v),
        ("tx_ring", KnobValue::U32(v)) => p.tx_ring = Some(v),
        ("rx_usecs", KnobValue::U32(v)) => p.rx_usecs = Some(v),
        ("rx_frames", KnobValue::U32(v)) => p.rx_frames = Some(v),
        ("tx_usecs", KnobValue::U32(v)) => p.tx_usecs = Some(v),
        ("tx_frames", KnobValue::U32(v)) => p.tx_frames = Some(v),
        ("adaptive_rx", KnobValue::Bool(v)) => p.adaptive_rx = Some(v),
        ("adaptive_tx", KnobValue::Bool(v)) => p.adaptive_tx = Some(v),
        _ => return None,
    }
    Some(p)
}

/// The interface index of `iface` in the calling thread's network namespace.
fn ifindex(iface: &str) -> Result<u32, NapiError> {
    let name = std::ffi::CString::new(iface).map_err(|_| NapiError::NoSuchDevice(iface.into()))?;
    // SAFETY: a valid NUL-terminated name; if_nametoindex only reads it.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(NapiError::NoSuchDevice(iface.into())),
        i => Ok(i),
    }
}

/// The NAPI instances of `iface` in the calling thread's network namespace.
fn napis_here(iface: &str) -> Result<Vec<NapiInstance>, ChangeError> {
    let index = ifindex(iface)?;
    Ok(Netdev::open()?.napis(iface, index)?)
}

/// The changes enlight makes to kernel device settings: each one checked, its original
/// journalled, then written; and put back by [`KernelChanges::restore`] (`restore.rs`).
pub struct KernelChanges {
    journal: Journal,
    queues: BlockQueues,
    napi: NapiSysfs,
}

impl KernelChanges {
    /// Changes journalled under `runtime_dir`, block queues written under the real `/sys`.
    pub fn open(runtime_dir: &Path) -> Result<KernelChanges, ChangeError> {
        Ok(KernelChanges {
            journal: Journal::open(runtime_dir)?,
            queues: BlockQueues::default(),
            napi: NapiSysfs::default(),
        })
    }

    /// Changes journalled under `runtime_dir`, block queues written under `sysfs` (tests give a
    /// tree of their own).
    pub fn open_at(runtime_dir: &Path, sysfs: &Path) -> Result<KernelChanges, ChangeError> {
        Ok(KernelChanges {
            journal: Journal::open(runtime_dir)?,
            queues: BlockQueues::at(sysfs),
            napi: NapiSysfs::default(),
        })
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Applies `patch` to NIC `iface` (in `netns`, if given): reads the current values,
    /// journals the original of every knob the patch touches, then applies (checking limits
    /// and support first). Returns the settings in force afterwards.
    pub fn set_nic(
        &mut self,
        iface: &str,
        netns: Option<&Path>,
        patch: &NicPatch,
    ) -> Result<NicSettings, ChangeError> {
        let target = Target::nic(iface, netns);
        let journal = &mut self.journal;
        in_netns(netns, || -> Result<NicSettings, ChangeError> {
            let mut ethtool = Ethtool::open()?;
            let current = ethtool.settings(iface)?;
            let now = settings_values(&current);
            for (knob, _) in patch_values(patch) {
                if let Some((_, original)) = now.iter().find(|(k, _)| *k == knob) {
                    journal.record_original(&target, knob, original.clone())?;
                }
                // A knob the driver lacks has no original: apply() refuses it below, typed.
            }
            let after = ethtool.apply(iface, patch)?;
            for (knob, value) in settings_values(&after) {
                if patch_values(patch).iter().any(|(k, _)| *k == knob) {
                    journal.note_applied(&target, knob, value)?;
                }
            }
            Ok(after)
        })?
    }

    /// Sets NAPI sysfs `knob` (`napi_defer_hard_irqs`, `gro_flush_timeout`) of `iface` (in
    /// `netns`, if given) to `value`: checked first (knob, range), the original journalled,
    /// then written. Returns the value the kernel reports afterwards.
    pub fn set_napi(
        &mut self,
        iface: &str,
        netns: Option<&Path>,
        knob: &str,
        value: u64,
    ) -> Result<u64, ChangeError> {
        let target = Target::nic(iface, netns);
        let journal = &mut self.journal;
        let napi = &self.napi;
        in_netns_sysfs(netns, || -> Result<u64, ChangeError> {
            let original = napi.get(iface, knob)?;
            napi.check(iface, knob, value)?;
            // Both knobs are at most i32::MAX and 10 ms in ns ([`super::napi::range`]), and
            // so are the originals unless someone wrote a timer of more than 4 s.
            let as_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
            journal.record_original(&target, knob, KnobValue::U32(as_u32(original)))?;
            let now = napi.set(iface, knob, value)?;
            journal.note_applied(&target, knob, KnobValue::U32(as_u32(now)))?;
            // The write set every NAPI instance: the per-instance settings enlight journalled
            // now hold enlight's value, not an admin's.
            let attr = knob.trim_start_matches("napi_");
            let instances: Vec<String> = journal
                .entries()
                .iter()
                .filter(|e| {
                    e.target == target
                        && parse_napi_instance_knob(&e.knob).is_some_and(|(_, a)| a == attr)
                })
                .map(|e| e.knob.clone())
                .collect();
            for k in instances {
                journal.note_applied(&target, &k, KnobValue::number(now))?;
            }
            Ok(now)
        })?
    }

    /// Sets `attr` (`defer_hard_irqs`, `gro_flush_timeout`, `irq_suspend_timeout`) of NAPI
    /// instance `id` of `iface` (in `netns`, if given) through netdev `napi-set`: the instance
    /// read first (it must exist and report the setting), the value checked against
    /// [`napi_instance_range`], the original journalled as `napi<id>/<attr>`, then written
    /// and read back. Returns the value the kernel reports afterwards.
    pub fn set_napi_instance(
        &mut self,
        iface: &str,
        netns: Option<&Path>,
        id: u32,
        attr: &str,
        value: u64,
    ) -> Result<u64, ChangeError> {
        let target = Target::nic(iface, netns);
        let journal = &mut self.journal;
        in_netns(netns, || -> Result<u64, ChangeError> {
            let driver = super::ethtool::driver_name(iface);
            let name = napi_instance_knob(id, attr);
            if !NAPI_INSTANCE_KNOBS.contains(&attr) {
                return Err(NapiError::UnknownKnob {
                    iface: iface.into(),
                    knob: name,
                }
                .into());
            }
            let index = ifindex(iface)?;
            let mut netdev = Netdev::open()?;
            let find = |netdev: &mut Netdev| -> Result<NapiInstance, ChangeError> {
                netdev
                    .napis(iface, index)?
                    .into_iter()
                    .find(|n| n.id == id)
                    .ok_or_else(|| {
                        NetdevError::NoSuchNapi {
                            iface: iface.into(),
                            driver: driver.clone(),
                            id,
                        }
                        .into()
                    })
            };
            let original = napi_instance_value(&find(&mut netdev)?, attr).ok_or_else(|| {
                NapiError::Unsupported {
                    iface: iface.into(),
                    driver: driver.clone(),
                    knob: name.clone(),
                    path: "netdev napi-get".into(),
                }
            })?;
            let (min, max) = napi_instance_range(attr);
            if !(min..=max).contains(&value) {
                return Err(NapiError::OutOfRange {
                    iface: iface.into(),
                    driver,
                    knob: name,
                    value,
                    min,
                    max,
                }
                .into());
            }
            // When enlight already changed the interface-wide knob, its write set this
            // instance too: the instance's original is that knob's original (which a restore
            // puts back first), not enlight's value.
            journal.reload()?;
            let original = napi_sysfs_knob(attr)
                .and_then(|k| journal.original(&target, k))
                .and_then(|v| v.as_u64())
                .unwrap_or(original);
            journal.record_original(&target, &name, KnobValue::number(original))?;
            netdev.set(iface, id, &napi_instance_patch(attr, value))?;
            let now = napi_instance_value(&find(&mut netdev)?, attr).unwrap_or(value);
            journal.note_applied(&target, &name, KnobValue::number(now))?;
            Ok(now)
        })?
    }

    /// Sets block queue `knob` of `disk` to `value`, journalling the original first.
    pub fn set_block(&mut self, disk: &str, knob: &str, value: u32) -> Result<u32, ChangeError> {
        let target = Target::Block { disk: disk.into() };
        let original = self.queues.get(disk, knob)?;
        // Checks (there, writable, in range) before the journal is touched.
        self.queues.check(disk, knob, value)?;
        self.journal
            .record_original(&target, knob, KnobValue::U32(original))?;
        let now = self.queues.set(disk, knob, value)?;
        self.journal
            .note_applied(&target, knob, KnobValue::U32(now))?;
        Ok(now)
    }

    /// Switches the I/O scheduler of `disk` to `name` (one the device offers), journalling the
    /// original first, and `nr_requests`' too (the kernel resets it on the switch). Returns
    /// the scheduler in force afterwards.
    pub fn set_scheduler(&mut self, disk: &str, name: &str) -> Result<String, ChangeError> {
        let target = Target::Block { disk: disk.into() };
        // Checks (writable, offered) before the journal is touched.
        let now = self.queues.check_scheduler(disk, name)?;
        // The switch resets nr_requests to the new scheduler's default: its original is
        // journalled too, so a restore (scheduler first) puts back the depth that was there.
        let depth = self.queues.get(disk, "nr_requests").ok();
        self.journal
            .record_original(&target, SCHEDULER, KnobValue::Text(now.name().into()))?;
        if let Some(d) = depth {
            self.journal
                .record_original(&target, "nr_requests", KnobValue::U32(d))?;
        }
        let after = self.queues.set_scheduler(disk, name)?;
        self.journal
            .note_applied(&target, SCHEDULER, KnobValue::Text(after.clone()))?;
        if let Ok(d) = self.queues.get(disk, "nr_requests") {
            if depth.is_some() {
                self.journal
                    .note_applied(&target, "nr_requests", KnobValue::U32(d))?;
            }
        }
        Ok(after)
    }

    /// The block queues these changes write.
    pub fn queues(&self) -> &BlockQueues {
        &self.queues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_and_knobs_round_trip() {
        let p = NicPatch {
            rx_ring: Some(512),
            rx_frames: Some(8),
            adaptive_tx: Some(true),
            ..Default::default()
        };
        let knobs = patch_values(&p);
        assert_eq!(knobs.len(), 3);
        for (k, v) in knobs {
            let single = patch_of(k, v.clone()).unwrap();
            assert_eq!(patch_values(&single), vec![(k, v)]);
        }
        assert!(patch_of("rx_ring", KnobValue::Bool(true)).is_none());
        assert!(patch_of("mtu", KnobValue::U32(1500)).is_none());
    }
}
