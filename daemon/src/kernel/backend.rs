//! Kernel NICs and disks as the tuner sees devices. [`KernelDiskBackend`] serves a disk's
//! queue depth, I/O scheduler, read-ahead and largest request (see its docs); the rest of
//! this note is about NICs: a [`SettingsBackend`] over the knobs the NIC really
//! has ([`super::knobs::nic`]: ethtool rings and coalescing, NAPI moderation in sysfs), and a
//! [`BackendFactory`] that serves kernel devices with it and every other device with the
//! control-socket factory.
//!
//! The tuner's search space is built from those knobs ([`crate::knobs::tuner_space`]): each
//! live knob rides the ladder of its kind (`rx-frames`, else `napi_defer_hard_irqs`, on the
//! moderation-count ladder; `rx-usecs`, else `gro_flush_timeout`, on the delay ladder), and
//! every knob that is not live (a ring resize resets the queue on most drivers and detaches
//! `hv_netvsc`) is pinned where it is: recommend only, but for the rx ring of a driver whose
//! resize only resets the queue (virtio_net, mlx5_core), which rides the ring ladder when
//! `[kernel] ring_resets = "explore"` (the default): the tuner tries that ladder only while the
//! NIC shows ring pressure ([`super::collector::ring_pressure`]). The poll budget is the NAPI
//! weight, 64, which is no per-device knob.
//!
//! Every change goes through [`KernelChanges`] (journalled first, restorable), and only when the
//! policy ([`super::permission::policy`]) says `Apply`: any other device is refused as `unsupported`
//! with the reason, so the tuner can only recommend for it. A change of several knobs that
//! fails part-way puts back the ones already made, so nothing is left half-applied.

use std::path::{Path, PathBuf};

use enlight_driver::registry::DeviceRecord;
use enlight_driver::settings::DeviceSettings;

use super::blockq::BlockQueues;
use super::changes::{ChangeError, KernelChanges};
use super::ethtool::NicPatch;
use super::napi::NAPI_KNOBS;
use super::permission::{policy, Permission};
use super::KernelConfig;
use crate::knobs::{Knob, KnobExt};
use crate::tuner::backend::{BackendError, BackendFactory, ControlSocketFactory, SettingsBackend};
use crate::tuner::Bounds;

/// The NAPI weight the kernel polls NIC queues with.
pub const NAPI_WEIGHT: u32 = 64;

/// The knobs of NIC `iface` (in `netns`, if given) as read now, its rx ring explored on
/// pressure where `ring_resets` and its driver allow ([`super::knobs::explore_ring_resets`]).
pub fn nic_knobs(
    iface: &str,
    netns: Option<&Path>,
    ring_resets: super::RingResets,
) -> Result<Vec<Knob>, ChangeError> {
    let ethtool = super::changes::nic_settings(iface, netns)?;
    let driver = super::netns::in_netns(netns, || super::ethtool::driver_name(iface))?;
    let napi = super::changes::napi_settings(iface, netns)?;
    let features = super::netns::in_netns_sysfs(netns, || {
        super::ethtool::virtio_features(Path::new("/sys"), iface)
    })?;
    let fixed = super::ethtool::coalescing_fixed(&driver, features.as_deref());
    let ethtool = super::knobs::changeable(&ethtool, fixed);
    let mut knobs = super::knobs::nic(&driver, Some(&ethtool), &napi);
    super::knobs::explore_ring_resets(&driver, &mut knobs, ring_resets);
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
    match super::netns::in_netns(netns, read) {
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

fn rejected(e: &ChangeError) -> BackendError {
    use super::blockq::BlockQueueError as Q;
    use super::ethtool::EthtoolError as E;
    use super::napi::NapiError as N;
    BackendError::Rejected {
        kind: match e {
            ChangeError::Ethtool(E::Unsupported { .. })
            | ChangeError::Napi(N::Unsupported { .. })
            | ChangeError::BlockQueue(Q::Unsupported { .. } | Q::UnknownKnob(_)) => "unsupported",
            ChangeError::Ethtool(E::OutOfRange { .. })
            | ChangeError::Napi(N::OutOfRange { .. })
            | ChangeError::BlockQueue(Q::OutOfRange { .. } | Q::NoSuchChoice { .. }) => {
                "out_of_range"
            }
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
    changes: KernelChanges,
    /// The knobs this backend set, with the value the kernel reported afterwards: re-read
    /// every tick, so a change by anyone else is seen within one.
    owned: std::collections::BTreeMap<String, u64>,
    /// Someone else's change: no write from this backend after it (the tuner pins the device;
    /// unpinning opens a fresh backend).
    someone_else: Option<String>,
    /// Whether the tuner has been told.
    reported: bool,
    /// Ethtool values this backend wrote whose notification has not arrived yet, oldest
    /// first ([`judge_notice`]).
    pending: Vec<(String, u64)>,
    /// The knobs as last read (units, for saying what changed).
    shown: Vec<Knob>,
    /// Whether a queue-resetting rx ring is explored on pressure.
    ring_resets: super::RingResets,
}

/// The most ethtool writes [`KernelNicBackend`] remembers as awaiting their notification.
const PENDING_MAX: usize = 64;

/// What a kernel notification of knob values (`notified`, knob → value now) says about the
/// knobs enlight set (`owned`, knob → the value enlight left it at): `Some(what changed from
/// what to what)` when someone else changed one. A value is enlight's own when it is one
/// enlight wrote whose notification had not come yet (`pending`, oldest first: the entry and
/// every older one of that knob are used up), or what enlight left the knob at; knobs
/// enlight did not set are not its business. `shown` gives the units to say it in. A pure
/// function.
pub fn judge_notice(
    iface: &str,
    owned: &std::collections::BTreeMap<String, u64>,
    pending: &mut Vec<(String, u64)>,
    notified: &[(String, u64)],
    shown: &[Knob],
) -> Option<String> {
    let mut theirs = std::collections::BTreeMap::new();
    let mut knobs = Vec::new();
    for (name, value) in notified {
        if let Some(i) = pending.iter().position(|(k, v)| k == name && v == value) {
            let mut at = 0;
            pending.retain(|(k, _)| {
                at += 1;
                !(k == name && at <= i + 1)
            });
            continue;
        }
        let Some(ours) = owned.get(name) else {
            continue;
        };
        if ours == value {
            pending.retain(|(k, _)| k != name);
            continue;
        }
        theirs.insert(name.clone(), *ours);
        knobs.push(match shown.iter().find(|k| &k.name == name) {
            Some(k) => Knob {
                value: *value,
                ..k.clone()
            },
            None => Knob::new(
                name,
                *value,
                (None, None),
                crate::knobs::Unit::Count,
                crate::knobs::Source::EthtoolNetlink,
                crate::knobs::Disruption::Live,
            ),
        });
    }
    changed_by_someone_else(iface, &theirs, &knobs)
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
            changes: KernelChanges::open(runtime_dir)
                .map_err(|e| BackendError::Unreachable(e.to_string()))?,
            owned: Default::default(),
            someone_else: None,
            reported: false,
            pending: Vec::new(),
            shown: Vec::new(),
            ring_resets: Default::default(),
        })
    }

    /// The same backend with `[kernel] ring_resets` = `mode` (the default: explore).
    pub fn with_ring_resets(mut self, mode: super::RingResets) -> KernelNicBackend {
        self.ring_resets = mode;
        self
    }

    /// Reads the knobs and notes a change of an owned knob by someone else (the knob is no
    /// longer ours then: enlight never writes over it).
    fn read(&mut self) -> Result<Vec<Knob>, BackendError> {
        let knobs = nic_knobs(&self.iface, self.netns.as_deref(), self.ring_resets)
            .map_err(|e| BackendError::Unreachable(e.to_string()))?;
        if let Some(why) = changed_by_someone_else(&self.iface, &self.owned, &knobs) {
            self.owned.clear();
            self.someone_else = Some(why);
            self.reported = false;
        }
        self.shown = knobs.clone();
        Ok(knobs)
    }

    /// Notes an ethtool value about to be written (its notification will say it): sysfs
    /// knobs send none.
    fn expect_notice(&mut self, knob: &str, value: u64) {
        if NAPI_KNOBS.contains(&knob) {
            return;
        }
        self.pending.push((knob.to_string(), value));
        let over = self.pending.len().saturating_sub(PENDING_MAX);
        self.pending.drain(..over);
    }
}

impl KernelNicBackend {
    /// Sets one knob through its source (journalled by [`KernelChanges`]).
    fn set_one(&mut self, knob: &str, value: u64) -> Result<(), ChangeError> {
        if let Some((id, attr)) = super::napi_instance::parse_napi_instance_knob(knob) {
            // A NAPI instance's own setting: netdev napi-set, journalled the same way.
            self.changes
                .set_napi_instance(&self.iface, self.netns.as_deref(), id, attr, value)
                .map(|_| ())
        } else if NAPI_KNOBS.contains(&knob) {
            self.changes
                .set_napi(&self.iface, self.netns.as_deref(), knob, value)
                .map(|_| ())
        } else if let Some(patch) = ethtool_patch(knob, value) {
            self.changes
                .set_nic(&self.iface, self.netns.as_deref(), &patch)
                .map(|_| ())
        } else {
            Err(ChangeError::Ethtool(
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
    fn recommend_only(&self) -> Option<String> {
        match &self.permission {
            Permission::Apply => None,
            Permission::RecommendOnly(why) => Some(why.clone()),
        }
    }

    fn get(&mut self) -> Result<(DeviceSettings, Bounds), BackendError> {
        let knobs = self.read()?;
        Ok(crate::knobs::tuner_space(&knobs, NAPI_WEIGHT))
    }

    fn in_own_knobs(&mut self, to: &DeviceSettings) -> Option<String> {
        nic_knobs(&self.iface, self.netns.as_deref(), self.ring_resets)
            .ok()
            .map(|k| crate::knobs::changes_line(&k, to))
    }

    fn changed_by_someone_else(&mut self) -> Option<String> {
        if self.reported {
            return None;
        }
        self.reported = true;
        self.someone_else.clone()
    }

    fn notified(&mut self, notice: &crate::tuner::backend::KnobNotice) -> Option<String> {
        if notice.device != self.iface || self.someone_else.is_some() {
            return None;
        }
        let why = judge_notice(
            &self.iface,
            &self.owned,
            &mut self.pending,
            &notice.knobs,
            &self.shown,
        )?;
        self.owned.clear();
        self.someone_else = Some(why.clone());
        // Said here; the next read must not say it again.
        self.reported = true;
        Some(why)
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
            self.expect_notice(&knob, after);
            if let Err(e) = self.set_one(&knob, after) {
                // Nothing half-applied: the knobs already changed go back (their originals
                // stay journalled until `enlight restore` or a clean exit).
                for (k, v) in done.iter().rev() {
                    self.expect_notice(k, *v);
                    if let Err(undo) = self.set_one(k, *v) {
                        log::warn!("{}: putting {k} back to {v}: {undo}", self.iface);
                    }
                }
                return Err(rejected(&e));
            }
            done.push((knob, before));
        }
        let after = nic_knobs(&self.iface, self.netns.as_deref(), self.ring_resets)
            .map_err(|e| BackendError::Unreachable(e.to_string()))?;
        for (name, _) in &done {
            if let Some(k) = after.iter().find(|k| &k.name == name) {
                // A driver that rounds notifies the value it keeps.
                if !self.pending.contains(&(name.clone(), k.value)) {
                    self.expect_notice(name, k.value);
                }
                self.owned.insert(name.clone(), k.value);
            }
        }
        self.shown = after.clone();
        Ok(crate::knobs::tuner_space(&after, NAPI_WEIGHT).0)
    }
}

/// The knobs of kernel disk `disk` as read now under `queues`' sysfs
/// ([`super::knobs::disk`]); a disk that is gone is an error.
pub fn disk_knobs(queues: &BlockQueues, disk: &str) -> Result<Vec<Knob>, ChangeError> {
    // NoSuchDevice for a disk that vanished.
    queues.all(disk)?;
    let scheduler = queues
        .scheduler(disk)
        .ok()
        .filter(|_| queues.scheduler_writable(disk));
    Ok(super::knobs::disk(
        &queues.settings(disk),
        scheduler.as_ref(),
    ))
}

/// One kernel disk's knobs, for the tuner: its queue depth (`nr_requests`, or a SCSI disk's
/// `device/queue_depth`), I/O scheduler, `read_ahead_kb` and `max_sectors_kb`, each within the
/// range the device permits ([`crate::knobs::tuner_space`] over [`super::knobs::disk`]).
/// Every change goes through [`KernelChanges`] (journalled first), only when the policy says
/// `Apply`; a change of several knobs that fails part-way puts back the ones already made;
/// a knob enlight set that anyone else changes is seen at the next read (every tick), and
/// enlight never writes over it.
pub struct KernelDiskBackend {
    disk: String,
    permission: Permission,
    changes: KernelChanges,
    /// The knobs this backend set, with the value read back afterwards.
    owned: std::collections::BTreeMap<String, u64>,
    someone_else: Option<String>,
    reported: bool,
}

/// What the tuner's point `to` means in the disk's own knobs.
fn choice_name(knobs: &[Knob], knob: &str, value: u64) -> Option<String> {
    knobs
        .iter()
        .find(|k| k.name == knob)
        .and_then(|k| k.choices.get(value as usize).cloned())
}

impl KernelDiskBackend {
    /// Disk `disk` under the real `/sys`, journalling under `runtime_dir`, changing it only if
    /// `permission` is `Apply`.
    pub fn open(
        disk: &str,
        permission: Permission,
        runtime_dir: &Path,
    ) -> Result<KernelDiskBackend, BackendError> {
        Self::open_at(disk, permission, runtime_dir, Path::new("/sys"))
    }

    /// As [`Self::open`], with sysfs at `sysfs` (tests give a tree of their own).
    pub fn open_at(
        disk: &str,
        permission: Permission,
        runtime_dir: &Path,
        sysfs: &Path,
    ) -> Result<KernelDiskBackend, BackendError> {
        Ok(KernelDiskBackend {
            disk: disk.into(),
            permission,
            changes: KernelChanges::open_at(runtime_dir, sysfs)
                .map_err(|e| BackendError::Unreachable(e.to_string()))?,
            owned: Default::default(),
            someone_else: None,
            reported: false,
        })
    }

    fn knobs(&self) -> Result<Vec<Knob>, BackendError> {
        disk_knobs(self.changes.queues(), &self.disk)
            .map_err(|e| BackendError::Unreachable(e.to_string()))
    }

    fn read(&mut self) -> Result<Vec<Knob>, BackendError> {
        let knobs = self.knobs()?;
        if let Some(why) = changed_by_someone_else(&self.disk, &self.owned, &knobs) {
            self.owned.clear();
            self.someone_else = Some(why);
            self.reported = false;
        }
        Ok(knobs)
    }

    /// Sets one knob (journalled by [`KernelChanges`]); the scheduler by the name of its choice.
    fn set_one(&mut self, knobs: &[Knob], knob: &str, value: u64) -> Result<(), ChangeError> {
        if knob == super::blockq::SCHEDULER {
            let name = choice_name(knobs, knob, value).ok_or_else(|| {
                super::blockq::BlockQueueError::NoSuchChoice {
                    disk: self.disk.clone(),
                    value: format!("#{value}"),
                    offered: knobs
                        .iter()
                        .find(|k| k.name == knob)
                        .map(|k| k.choices.clone())
                        .unwrap_or_default(),
                }
            })?;
            self.changes.set_scheduler(&self.disk, &name).map(|_| ())
        } else {
            let v =
                u32::try_from(value).map_err(|_| super::blockq::BlockQueueError::OutOfRange {
                    disk: self.disk.clone(),
                    knob: knob.into(),
                    value: u32::MAX,
                    min: 0,
                    max: u32::MAX,
                })?;
            self.changes.set_block(&self.disk, knob, v).map(|_| ())
        }
    }
}

impl SettingsBackend for KernelDiskBackend {
    fn recommend_only(&self) -> Option<String> {
        match &self.permission {
            Permission::Apply => None,
            Permission::RecommendOnly(why) => Some(why.clone()),
        }
    }

    fn get(&mut self) -> Result<(DeviceSettings, Bounds), BackendError> {
        let knobs = self.read()?;
        Ok(crate::knobs::tuner_space(&knobs, 0))
    }

    fn changed_by_someone_else(&mut self) -> Option<String> {
        if self.reported {
            return None;
        }
        self.reported = true;
        self.someone_else.clone()
    }

    fn in_own_knobs(&mut self, to: &DeviceSettings) -> Option<String> {
        self.knobs()
            .ok()
            .map(|k| crate::knobs::changes_line(&k, to))
    }

    fn apply(
        &mut self,
        _from: &DeviceSettings,
        to: &DeviceSettings,
    ) -> Result<DeviceSettings, BackendError> {
        if let Permission::RecommendOnly(why) = &self.permission {
            return Err(BackendError::Rejected {
                kind: "unsupported".into(),
                message: format!("{}: recommend only ({why})", self.disk),
            });
        }
        let knobs = self.read()?;
        if let Some(why) = &self.someone_else {
            return Err(BackendError::Rejected {
                kind: "busy".into(),
                message: format!("{why}: enlight leaves it alone"),
            });
        }
        // In the knobs' order: the scheduler before nr_requests (switching resets it).
        let mut done: Vec<(String, u64)> = Vec::new();
        for (knob, before, after) in crate::knobs::changes_to(&knobs, to) {
            if let Err(e) = self.set_one(&knobs, &knob, after) {
                for (k, v) in done.iter().rev() {
                    if let Err(undo) = self.set_one(&knobs, k, *v) {
                        log::warn!("{}: putting {k} back to {v}: {undo}", self.disk);
                    }
                }
                return Err(rejected(&e));
            }
            done.push((knob, before));
        }
        let after = self.knobs()?;
        // What enlight owns now, as read back: every knob of this disk in the journal (the
        // ones just set, and nr_requests after a scheduler switch reset it: the kernel's
        // doing, on enlight's write, and restored with the rest).
        let target = super::journal::Target::Block {
            disk: self.disk.clone(),
        };
        let journalled: Vec<String> = self
            .changes
            .journal()
            .entries()
            .iter()
            .filter(|e| e.target == target)
            .map(|e| e.knob.clone())
            .collect();
        for name in journalled
            .into_iter()
            .chain(done.into_iter().map(|(k, _)| k))
        {
            if let Some(k) = after.iter().find(|k| k.name == name) {
                self.owned.insert(name, k.value);
            }
        }
        Ok(crate::knobs::tuner_space(&after, 0).0)
    }
}

/// Serves kernel NICs with [`KernelNicBackend`], kernel disks with [`KernelDiskBackend`] and
/// every other device with the control socket ([`ControlSocketFactory`]).
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
        if record.kind != enlight_abi::DeviceKind::Kernel {
            return ControlSocketFactory.open(record);
        }
        let permission = policy(&self.config.tune, self.config.dry_run, &record.name);
        if record.device == "disk" {
            return Some(
                KernelDiskBackend::open(&record.name, permission, &self.runtime_dir)
                    .map(|b| Box::new(b) as Box<dyn SettingsBackend>),
            );
        }
        if record.device != "nic" {
            return None;
        }
        Some(
            KernelNicBackend::open(&record.name, None, permission, &self.runtime_dir).map(|b| {
                Box::new(b.with_ring_resets(self.config.ring_resets)) as Box<dyn SettingsBackend>
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ethtool::{Coalesce, NicSettings, Rings};

    /// Notifications of enlight's own writes (late ones too, in order) are told from an
    /// admin's change of a knob enlight set; knobs enlight did not set are none of its
    /// business.
    #[test]
    fn a_notice_of_our_own_writes_is_told_from_an_admins_change() {
        let owned: std::collections::BTreeMap<String, u64> = [("rx_frames".to_string(), 16)].into();
        let shown = crate::kernel::knobs::nic(
            "tun",
            Some(&NicSettings {
                rings: None,
                coalesce: Some(Coalesce {
                    rx_frames: Some(16),
                    ..Default::default()
                }),
            }),
            &[],
        );
        let n = |v: u64| vec![("rx_frames".to_string(), v), ("tx_usecs".to_string(), 99)];
        // enlight wrote 8 then 16; both notifications come after the second write.
        let mut pending = vec![("rx_frames".to_string(), 8), ("rx_frames".to_string(), 16)];
        assert_eq!(
            judge_notice("tap0", &owned, &mut pending, &n(8), &shown),
            None
        );
        assert_eq!(pending, [("rx_frames".to_string(), 16)]);
        assert_eq!(
            judge_notice("tap0", &owned, &mut pending, &n(16), &shown),
            None
        );
        assert!(pending.is_empty());
        // The state enlight left, notified again (someone changed tx_usecs): not a change.
        assert_eq!(
            judge_notice("tap0", &owned, &mut pending, &n(16), &shown),
            None
        );
        // An admin's 2.
        let why = judge_notice("tap0", &owned, &mut pending, &n(2), &shown).unwrap();
        assert_eq!(
            why,
            "rx_frames on tap0 changed from 16 (set by enlight) to 2 by someone else"
        );
        // Nothing owned: nothing to defend.
        assert_eq!(
            judge_notice("tap0", &Default::default(), &mut pending, &n(2), &shown),
            None
        );
    }

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
            factory.open(&record).is_some(),
            "kernel disks are tuned (recommend only here: not named)"
        );
        record.kind = "synthetic".into();
        assert!(factory.open(&record).is_none(), "no control socket");
    }

    fn fake_disk(root: &Path, disk: &str) {
        crate::kernel::blockq::fake_queue(
            root,
            disk,
            &[
                ("nr_requests", "128"),
                ("read_ahead_kb", "128"),
                ("max_sectors_kb", "1280"),
                ("max_hw_sectors_kb", "1280"),
            ],
        );
    }

    /// The disk backend on a fake sysfs tree: the tuner's point becomes knob writes, each
    /// journalled; an operator's change is seen at the next read and never written over; a
    /// disk that vanished is unreachable. (The real kernel: cli/tests/kernel_disk_tuning.rs.)
    #[test]
    fn a_disk_backend_writes_its_knobs_through_the_journal_and_backs_off() {
        let sys = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        fake_disk(sys.path(), "vdz");
        let mut b =
            KernelDiskBackend::open_at("vdz", Permission::Apply, run.path(), sys.path()).unwrap();
        let (from, bounds) = b.get().unwrap();
        assert_eq!(from.moderation_frames, 128);
        assert_eq!(bounds.moderation_frames, (4, 128));
        let to = DeviceSettings {
            moderation_frames: 64,
            poll_budget: 256,
            ..from
        };
        assert_eq!(
            b.in_own_knobs(&to).unwrap(),
            "nr_requests 128 → 64, read_ahead_kb 128 KiB → 256 KiB"
        );
        let now = b.apply(&from, &to).unwrap();
        assert_eq!((now.moderation_frames, now.poll_budget), (64, 256));
        let read =
            |k: &str| std::fs::read_to_string(sys.path().join("block/vdz/queue").join(k)).unwrap();
        assert_eq!(read("nr_requests"), "64\n");
        let j = crate::kernel::journal::Journal::open(run.path()).unwrap();
        let target = crate::kernel::journal::Target::Block { disk: "vdz".into() };
        assert_eq!(
            j.original(&target, "nr_requests"),
            Some(crate::kernel::journal::KnobValue::U32(128))
        );
        assert_eq!(
            j.original(&target, "read_ahead_kb"),
            Some(crate::kernel::journal::KnobValue::U32(128))
        );
        // Beyond the tag depth: refused, typed, and nothing half-applied.
        let too_deep = DeviceSettings {
            moderation_frames: 256,
            poll_budget: 512,
            ..now
        };
        let e = b.apply(&now, &too_deep).unwrap_err();
        assert!(
            matches!(&e, BackendError::Rejected { kind, message } if kind == "out_of_range" && message.contains("nr_requests")),
            "{e:?}"
        );
        assert_eq!(read("read_ahead_kb"), "256\n");
        // An operator's change.
        std::fs::write(sys.path().join("block/vdz/queue/nr_requests"), "32\n").unwrap();
        b.get().unwrap();
        let why = b.changed_by_someone_else().unwrap();
        assert!(
            why.contains("nr_requests on vdz changed from 64 (set by enlight) to 32"),
            "{why}"
        );
        let e = b.apply(&now, &to).unwrap_err();
        assert!(e.to_string().contains("someone else"), "{e}");
        assert_eq!(read("nr_requests"), "32\n");
        // Gone.
        std::fs::remove_dir_all(sys.path().join("block/vdz")).unwrap();
        assert!(matches!(b.get(), Err(BackendError::Unreachable(m)) if m.contains("vdz")));
    }
}
