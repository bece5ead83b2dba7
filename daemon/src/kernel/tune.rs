//! Changing kernel device settings safely: only devices the configuration names are changed
//! (everything else gets a recommendation, see [`policy`]); every knob's original value is
//! journalled before its first change ([`super::journal`]); [`KernelTuner::restore`] puts every
//! original back (what `enlight restore` and enlightd's clean shutdown call).

use std::path::{Path, PathBuf};

use super::blockq::{BlockQueueError, BlockQueues, SCHEDULER};
use super::ethtool::{Ethtool, EthtoolError, NicPatch, NicSettings};
use super::journal::{Journal, JournalError, KnobValue, Target};
use super::napi::{NapiError, NapiSysfs, NAPI_KNOBS};
use super::netdev::{NapiInstance, NapiPatch, Netdev, NetdevError};

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
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
    #[error("entering network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What may happen to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permission {
    /// The configuration names it and dry-run is off: changes are applied.
    Apply,
    /// Changes are only recommended, for this reason.
    RecommendOnly(String),
}

/// The policy: kernel devices are changed only when the configuration names them and dry-run
/// is off; anything else is a recommendation. A pure function, so it is tested on its own.
pub fn policy(configured: &[String], dry_run: bool, device: &str) -> Permission {
    if !configured.iter().any(|d| d == device) {
        Permission::RecommendOnly(format!(
            "{device} is not named in [kernel] tune, so enlight only recommends"
        ))
    } else if dry_run {
        Permission::RecommendOnly("[kernel] dry_run is on".into())
    } else {
        Permission::Apply
    }
}

/// Runs `f` on a thread inside the network namespace at `netns` (`None`: here). Network
/// namespaces are per thread, so the caller's own thread never moves.
pub fn in_netns<T: Send>(
    netns: Option<&Path>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, TuneError> {
    let Some(path) = netns else {
        return Ok(f());
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(path).map_err(|source| TuneError::Netns {
                path: path.into(),
                source,
            })?;
            use std::os::fd::AsRawFd;
            // SAFETY: setns on an open namespace file; it affects only this (scoped) thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(TuneError::Netns {
                    path: path.into(),
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// Runs `f` on a thread that sees the sysfs of the network namespace at `netns` at `/sys`
/// (`None`: here, the real `/sys`). sysfs shows the interfaces of the namespace it was mounted
/// in, so the thread gets a mount namespace of its own (every mount private, nothing
/// propagates back), enters the network namespace and mounts a fresh sysfs over `/sys` there,
/// as `ip netns exec` does. The mount namespace goes with the thread.
pub fn in_netns_sysfs<T: Send>(
    netns: Option<&Path>,
    f: impl FnOnce() -> T + Send,
) -> Result<T, TuneError> {
    let Some(path) = netns else {
        return Ok(f());
    };
    let failed = |path: &Path| TuneError::Netns {
        path: path.into(),
        source: std::io::Error::last_os_error(),
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(path).map_err(|source| TuneError::Netns {
                path: path.into(),
                source,
            })?;
            use std::os::fd::AsRawFd;
            // SAFETY: unshare of this (scoped) thread's filesystem attributes and mount
            // namespace; no other thread shares them afterwards.
            if unsafe { libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS) } != 0 {
                return Err(failed(path));
            }
            // SAFETY: valid NUL-terminated strings; makes every mount of this thread's new
            // mount namespace private, so the sysfs mounted below never shows outside it.
            if unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            } != 0
            {
                return Err(failed(path));
            }
            // SAFETY: setns on an open namespace file; it affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(failed(path));
            }
            // SAFETY: valid NUL-terminated strings; a sysfs of the network namespace just
            // entered, over /sys in this thread's private mount namespace only.
            if unsafe {
                libc::mount(
                    c"sysfs".as_ptr(),
                    c"/sys".as_ptr(),
                    c"sysfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            } != 0
            {
                return Err(failed(path));
            }
            Ok(f())
        })
        .join()
        .expect("netns sysfs thread panicked")
    })
}

/// Knob name → value, of a NIC's settings.
fn nic_knobs(s: &NicSettings) -> Vec<(&'static str, KnobValue)> {
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

/// Knob name → value, of a patch.
fn patch_knobs(p: &NicPatch) -> Vec<(&'static str, KnobValue)> {
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

/// The settings of one NAPI instance (netdev netlink, [`super::netdev`]) enlight writes.
pub const NAPI_INSTANCE_KNOBS: [&str; 3] = [
    "defer_hard_irqs",
    "gro_flush_timeout",
    "irq_suspend_timeout",
];

/// The largest `irq_suspend_timeout` enlight writes, ns: a second (the kernel takes any u64;
/// a suspended IRQ is re-armed when the timer fires, so longer only stalls an idle queue).
pub const IRQ_SUSPEND_MAX_NS: u64 = 1_000_000_000;

/// The knob name of setting `attr` of NAPI instance `id` (journal, knob lists):
/// `napi<id>/<attr>`.
pub fn napi_instance_knob(id: u32, attr: &str) -> String {
    format!("napi{id}/{attr}")
}

/// The instance and setting of a per-NAPI knob name (`napi8193/gro_flush_timeout`); `None`
/// for any other name. A pure function.
pub fn parse_napi_instance_knob(knob: &str) -> Option<(u32, &'static str)> {
    let (id, attr) = knob.strip_prefix("napi")?.split_once('/')?;
    let attr = NAPI_INSTANCE_KNOBS.into_iter().find(|a| *a == attr)?;
    Some((id.parse().ok()?, attr))
}

/// The range enlight writes for a per-NAPI setting: the sysfs knobs' ranges, and up to a
/// second for `irq_suspend_timeout`.
pub fn napi_instance_range(attr: &str) -> (u64, u64) {
    match attr {
        "defer_hard_irqs" => (0, super::napi::DEFER_MAX),
        "gro_flush_timeout" => (0, super::napi::GRO_FLUSH_MAX_NS),
        _ => (0, IRQ_SUSPEND_MAX_NS),
    }
}

/// A NAPI instance's value of `attr`, if the kernel reported it.
fn napi_instance_value(n: &NapiInstance, attr: &str) -> Option<u64> {
    match attr {
        "defer_hard_irqs" => n.defer_hard_irqs.map(u64::from),
        "gro_flush_timeout" => n.gro_flush_timeout,
        "irq_suspend_timeout" => n.irq_suspend_timeout,
        _ => None,
    }
}

/// The `napi-set` of one setting.
fn napi_instance_patch(attr: &str, value: u64) -> NapiPatch {
    let mut p = NapiPatch::default();
    match attr {
        "defer_hard_irqs" => p.defer_hard_irqs = Some(value.min(u32::MAX as u64) as u32),
        "gro_flush_timeout" => p.gro_flush_timeout = Some(value),
        _ => p.irq_suspend_timeout = Some(value),
    }
    p
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
fn napis_here(iface: &str) -> Result<Vec<NapiInstance>, TuneError> {
    let index = ifindex(iface)?;
    Ok(Netdev::open()?.napis(iface, index)?)
}

/// The order [`KernelTuner::restore`] puts entries back in: a disk's scheduler before its
/// other knobs (switching the scheduler resets `nr_requests` to the new one's default, so
/// `nr_requests` goes back after it), everything else as journalled. A pure function.
pub fn restore_order(entries: &[super::journal::Entry]) -> Vec<super::journal::Entry> {
    let mut out = entries.to_vec();
    // A stable sort: schedulers move to the front; per-NAPI settings to the back, after the
    // interface-wide sysfs knobs (writing one of those sets every instance).
    out.sort_by_key(|e| {
        if matches!(e.target, Target::Block { .. }) && e.knob == SCHEDULER {
            0
        } else if parse_napi_instance_knob(&e.knob).is_some() {
            2
        } else {
            1
        }
    });
    out
}

/// What [`KernelTuner::restore`] did.
#[derive(Debug, Default)]
pub struct RestoreReport {
    /// `(target, knob, original value put back)`.
    pub restored: Vec<(Target, String, KnobValue)>,
    /// `(target, knob, why not)`: these stay in the journal.
    pub failed: Vec<(Target, String, String)>,
    /// `(target, knob, what happened)`: someone else changed the knob after enlight did, so
    /// their value stays (enlight never writes over an operator's change) and the knob leaves
    /// the journal.
    pub left: Vec<(Target, String, String)>,
}

/// Applies kernel settings with the journal.
pub struct KernelTuner {
    journal: Journal,
    queues: BlockQueues,
    napi: NapiSysfs,
}

impl KernelTuner {
    /// A tuner journalling under `runtime_dir`, writing block queues under the real `/sys`.
    pub fn open(runtime_dir: &Path) -> Result<KernelTuner, TuneError> {
        Ok(KernelTuner {
            journal: Journal::open(runtime_dir)?,
            queues: BlockQueues::default(),
            napi: NapiSysfs::default(),
        })
    }

    /// A tuner journalling under `runtime_dir`, writing block queues under `sysfs` (tests give
    /// a tree of their own).
    pub fn open_at(runtime_dir: &Path, sysfs: &Path) -> Result<KernelTuner, TuneError> {
        Ok(KernelTuner {
            journal: Journal::open(runtime_dir)?,
            queues: BlockQueues::at(sysfs),
            napi: NapiSysfs::default(),
        })
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Reads a NIC's settings (in `netns`, if given).
    pub fn nic_settings(iface: &str, netns: Option<&Path>) -> Result<NicSettings, TuneError> {
        in_netns(netns, || -> Result<NicSettings, EthtoolError> {
            Ethtool::open()?.settings(iface)
        })?
        .map_err(TuneError::from)
    }

    /// Applies `patch` to NIC `iface` (in `netns`, if given): reads the current values,
    /// journals the original of every knob the patch touches, then applies (checking limits
    /// and support first). Returns the settings in force afterwards.
    pub fn set_nic(
        &mut self,
        iface: &str,
        netns: Option<&Path>,
        patch: &NicPatch,
    ) -> Result<NicSettings, TuneError> {
        let target = Target::nic(iface, netns);
        let journal = &mut self.journal;
        in_netns(netns, || -> Result<NicSettings, TuneError> {
            let mut ethtool = Ethtool::open()?;
            let current = ethtool.settings(iface)?;
            let now = nic_knobs(&current);
            for (knob, _) in patch_knobs(patch) {
                if let Some((_, original)) = now.iter().find(|(k, _)| *k == knob) {
                    journal.record_original(&target, knob, original.clone())?;
                }
                // A knob the driver lacks has no original: apply() refuses it below, typed.
            }
            let after = ethtool.apply(iface, patch)?;
            for (knob, value) in nic_knobs(&after) {
                if patch_knobs(patch).iter().any(|(k, _)| *k == knob) {
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
    ) -> Result<u64, TuneError> {
        let target = Target::nic(iface, netns);
        let journal = &mut self.journal;
        let napi = &self.napi;
        in_netns_sysfs(netns, || -> Result<u64, TuneError> {
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
    ) -> Result<u64, TuneError> {
        let target = Target::nic(iface, netns);
        let journal = &mut self.journal;
        in_netns(netns, || -> Result<u64, TuneError> {
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
            let find = |netdev: &mut Netdev| -> Result<NapiInstance, TuneError> {
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
            let sysfs = match attr {
                "defer_hard_irqs" => Some("napi_defer_hard_irqs"),
                "gro_flush_timeout" => Some("gro_flush_timeout"),
                _ => None,
            };
            let original = sysfs
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

    /// The NAPI sysfs knobs of `iface` (in `netns`, if given).
    pub fn napi_settings(
        iface: &str,
        netns: Option<&Path>,
    ) -> Result<Vec<(&'static str, u64)>, TuneError> {
        in_netns_sysfs(netns, || NapiSysfs::default().all(iface))
    }

    /// Sets block queue `knob` of `disk` to `value`, journalling the original first.
    pub fn set_block(&mut self, disk: &str, knob: &str, value: u32) -> Result<u32, TuneError> {
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
    pub fn set_scheduler(&mut self, disk: &str, name: &str) -> Result<String, TuneError> {
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

    /// The block queues this tuner writes.
    pub fn queues(&self) -> &BlockQueues {
        &self.queues
    }

    /// Puts every journalled original back; each restored knob leaves the journal, a failed
    /// one stays (with the reason in the report) so a later restore can retry.
    pub fn restore(&mut self) -> RestoreReport {
        let mut report = RestoreReport::default();
        // What is on disk now: other tuners (one per device) journal into the same file.
        if let Err(e) = self.journal.reload() {
            log::warn!("restore: {e}; restoring what this tuner knows");
        }
        let entries = restore_order(self.journal.entries());
        // Disk knobs someone else changed after enlight did, with their value now: read
        // before anything is written, since putting a scheduler back resets nr_requests.
        let operators: Vec<(Target, String, KnobValue)> = entries
            .iter()
            .filter_map(|e| {
                let Target::Block { disk } = &e.target else {
                    return None;
                };
                let now = self.block_value(disk, &e.knob)?;
                (e.applied.as_ref().is_some_and(|ours| *ours != now))
                    .then(|| (e.target.clone(), e.knob.clone(), now))
            })
            .collect();
        // Per-NAPI settings' values now, read before anything is written: restoring an
        // interface-wide sysfs knob sets every instance. `None`: the instance is gone.
        let napi_now: Vec<(Target, String, Option<u64>)> = entries
            .iter()
            .filter_map(|e| {
                let Target::Nic { iface, netns } = &e.target else {
                    return None;
                };
                let (id, attr) = parse_napi_instance_knob(&e.knob)?;
                let now = in_netns(netns.as_deref(), || napis_here(iface))
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|v| v.into_iter().find(|n| n.id == id))
                    .and_then(|n| napi_instance_value(&n, attr));
                Some((e.target.clone(), e.knob.clone(), now))
            })
            .collect();
        for e in entries {
            // Ok(Some(why)): left as someone else set it.
            let result: Result<Option<String>, String> = match &e.target {
                Target::Nic { iface, netns } if NAPI_KNOBS.contains(&e.knob.as_str()) => {
                    self.restore_napi_sysfs(&e, iface, netns.as_deref())
                }
                Target::Nic { iface, netns } if parse_napi_instance_knob(&e.knob).is_some() => {
                    let now = napi_now
                        .iter()
                        .find(|(t, k, _)| *t == e.target && *k == e.knob)
                        .and_then(|(_, _, v)| *v);
                    Self::restore_napi_instance(&e, iface, netns.as_deref(), now)
                }
                Target::Nic { iface, netns } => Self::restore_ethtool(&e, iface, netns.as_deref()),
                Target::Block { .. }
                    if operators
                        .iter()
                        .any(|(t, k, _)| *t == e.target && *k == e.knob) =>
                {
                    let now = &operators
                        .iter()
                        .find(|(t, k, _)| *t == e.target && *k == e.knob)
                        .expect("checked")
                        .2;
                    Ok(Some(format!(
                        "changed from {} (set by enlight) to {now} by someone else: left as it is",
                        e.applied.as_ref().expect("an operator's change has ours")
                    )))
                }
                Target::Block { disk } => self.restore_block(&e, disk),
            };
            match result {
                Ok(left) => {
                    if let Err(err) = self.journal.forget(&e.target, &e.knob) {
                        report
                            .failed
                            .push((e.target.clone(), e.knob.clone(), err.to_string()));
                    } else if let Some(why) = left {
                        report.left.push((e.target, e.knob, why));
                    } else {
                        report.restored.push((e.target, e.knob, e.original));
                    }
                }
                Err(why) => report.failed.push((e.target, e.knob, why)),
            }
        }
        // An operator's value that a scheduler put back has reset (nr_requests) goes back in.
        for (target, knob, value) in operators {
            let Target::Block { disk } = &target else {
                continue;
            };
            if self.block_value(disk, &knob).as_ref() == Some(&value) {
                continue;
            }
            let put = match &value {
                KnobValue::U32(v) => self.queues.set(disk, &knob, *v).map(|_| ()),
                KnobValue::Text(name) => self.queues.set_scheduler(disk, name).map(|_| ()),
                KnobValue::Bool(_) | KnobValue::U64(_) => Ok(()),
            };
            if let Err(err) = put {
                report.failed.push((
                    target.clone(),
                    knob.clone(),
                    format!("putting back the operator's {value} after the scheduler: {err}"),
                ));
            }
        }
        report
    }

    /// Puts an interface-wide NAPI sysfs knob back (`Ok(Some(why))`: left as someone else set
    /// it).
    fn restore_napi_sysfs(
        &self,
        e: &super::journal::Entry,
        iface: &str,
        netns: Option<&Path>,
    ) -> Result<Option<String>, String> {
        match e.original {
            KnobValue::U32(v) => {
                let napi = &self.napi;
                let applied = &e.applied;
                in_netns_sysfs(netns, || {
                    let now = napi.get(iface, &e.knob).map_err(|err| err.to_string())?;
                    if let Some(KnobValue::U32(ours)) = applied {
                        if now != *ours as u64 {
                            return Ok(Some(format!(
                                "changed from {ours} (set by enlight) to {now} by someone else: left as it is"
                            )));
                        }
                    }
                    napi.put_back(iface, &e.knob, v as u64)
                        .map(|_| None)
                        .map_err(|err| err.to_string())
                })
                .map_err(|err| err.to_string())
                .and_then(|r| r)
            }
            _ => Err(format!("{}: not a number: {}", e.knob, e.original)),
        }
    }

    /// Puts a per-NAPI-instance setting back through netdev netlink, from its value `now`
    /// (read before anything was written; `None`: the instance is gone).
    fn restore_napi_instance(
        e: &super::journal::Entry,
        iface: &str,
        netns: Option<&Path>,
        now: Option<u64>,
    ) -> Result<Option<String>, String> {
        let Some((id, attr)) = parse_napi_instance_knob(&e.knob) else {
            return Err(format!("{}: not a per-NAPI knob", e.knob));
        };
        let ours = e.applied.as_ref().and_then(KnobValue::as_u64);
        match (now, e.original.as_u64()) {
            // Gone with its device (re-created since): a new instance starts from
            // the interface-wide values, restored above.
            (None, _) => Ok(Some(
                "the NAPI instance is gone (its device was removed or re-created): nothing to put back"
                    .to_string(),
            )),
            (Some(now), _) if ours.is_some_and(|o| o != now) => Ok(Some(format!(
                "changed from {} (set by enlight) to {now} by someone else: left as it is",
                ours.expect("checked")
            ))),
            (Some(_), None) => Err(format!("{}: not a number: {}", e.knob, e.original)),
            (Some(_), Some(v)) => in_netns(netns, || {
                Netdev::open()
                    .and_then(|mut n| n.set(iface, id, &napi_instance_patch(attr, v)))
                    .map(|_| None)
                    .map_err(|err| err.to_string())
            })
            .map_err(|err| err.to_string())
            .and_then(|r| r),
        }
    }

    /// Puts an ethtool knob (coalescing, rings) back, unless an admin changed it since.
    fn restore_ethtool(
        e: &super::journal::Entry,
        iface: &str,
        netns: Option<&Path>,
    ) -> Result<Option<String>, String> {
        match patch_of(&e.knob, e.original.clone()) {
            None => Err(format!("unknown NIC knob {}", e.knob)),
            Some(patch) => {
                let applied = e.applied.clone();
                let knob = e.knob.as_str();
                in_netns(netns, || {
                    let mut t = Ethtool::open().map_err(|err| err.to_string())?;
                    // An admin's value since enlight's change stays (the ethtool
                    // monitor pinned the device for it; a restore must not undo it).
                    let now = t.settings(iface).map_err(|err| err.to_string())?;
                    let now = nic_knobs(&now).into_iter().find(|(k, _)| *k == knob);
                    if let (Some(ours), Some((_, now))) = (&applied, now) {
                        if now != *ours {
                            return Ok(Some(format!(
                                "changed from {ours} (set by enlight) to {now} by someone else: left as it is"
                            )));
                        }
                    }
                    t.apply(iface, &patch)
                        .map(|_| None)
                        .map_err(|err| err.to_string())
                })
                .map_err(|err| err.to_string())
                .and_then(|r| r)
            }
        }
    }

    /// Puts a block queue knob back.
    fn restore_block(
        &self,
        e: &super::journal::Entry,
        disk: &str,
    ) -> Result<Option<String>, String> {
        match &e.original {
            KnobValue::U32(v) => self
                .queues
                .set(disk, &e.knob, *v)
                .map(|_| None)
                .map_err(|err| err.to_string()),
            KnobValue::Text(name) if e.knob == SCHEDULER => self
                .queues
                .set_scheduler(disk, name)
                .map(|_| None)
                .map_err(|err| err.to_string()),
            other => Err(format!("{}: cannot be set to {other}", e.knob)),
        }
    }

    /// A disk knob's value now (the scheduler by name), `None` if it cannot be read.
    fn block_value(&self, disk: &str, knob: &str) -> Option<KnobValue> {
        if knob == SCHEDULER {
            self.queues
                .scheduler(disk)
                .ok()
                .map(|s| KnobValue::Text(s.name().into()))
        } else {
            self.queues.get(disk, knob).ok().map(KnobValue::U32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_named_devices_are_changed_and_never_in_dry_run() {
        let named = vec!["eth1".to_string(), "loop3".to_string()];
        assert_eq!(policy(&named, false, "eth1"), Permission::Apply);
        assert!(matches!(
            policy(&named, false, "eth0"),
            Permission::RecommendOnly(r) if r.contains("not named")
        ));
        assert!(matches!(
            policy(&named, true, "eth1"),
            Permission::RecommendOnly(r) if r.contains("dry_run")
        ));
        assert!(matches!(
            policy(&[], false, "vda"),
            Permission::RecommendOnly(_)
        ));
    }

    fn fake_disk(root: &Path, disk: &str) {
        crate::kernel::blockq::fake_queue(
            root,
            disk,
            &[
                ("nr_requests", "128"),
                ("read_ahead_kb", "128"),
                ("max_sectors_kb", "512"),
                ("max_hw_sectors_kb", "1024"),
            ],
        );
    }

    /// A bad value, a knob the device lacks, a scheduler it does not offer and a device that
    /// vanished: each a typed error naming the device and knob, nothing written, nothing
    /// journalled; then a good change is journalled and restored, scheduler first.
    #[test]
    fn disk_changes_are_checked_before_the_journal_and_restored_scheduler_first() {
        use crate::kernel::blockq::BlockQueueError as B;
        let sys = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        fake_disk(sys.path(), "vdz");
        let mut t = KernelTuner::open_at(run.path(), sys.path()).unwrap();
        let e = t.set_block("vdz", "nr_requests", 256).unwrap_err();
        assert!(
            matches!(&e, TuneError::BlockQueue(B::OutOfRange { max: 128, .. })),
            "{e:?}"
        );
        assert!(e.to_string().contains("vdz: nr_requests = 256"), "{e}");
        let e = t.set_block("vdz", "queue_depth", 16).unwrap_err();
        assert!(
            matches!(&e, TuneError::BlockQueue(B::Unsupported { knob, .. }) if knob == "queue_depth"),
            "{e:?}"
        );
        let e = t.set_scheduler("vdz", "bfq").unwrap_err();
        assert!(
            matches!(&e, TuneError::BlockQueue(B::NoSuchChoice { .. })),
            "{e:?}"
        );
        let e = t.set_block("vdgone", "nr_requests", 64).unwrap_err();
        assert!(
            matches!(&e, TuneError::BlockQueue(B::NoSuchDevice(d)) if d == "vdgone"),
            "{e:?}"
        );
        assert!(t.journal().entries().is_empty());
        assert_eq!(
            std::fs::read_to_string(sys.path().join("block/vdz/queue/nr_requests")).unwrap(),
            "128\n"
        );

        // A scheduler switch alone journals nr_requests too (the kernel resets it).
        assert_eq!(t.set_scheduler("vdz", "kyber").unwrap(), "kyber");
        assert_eq!(
            t.journal()
                .original(&Target::Block { disk: "vdz".into() }, "nr_requests"),
            Some(KnobValue::U32(128))
        );
        std::fs::write(
            sys.path().join("block/vdz/queue/scheduler"),
            "none mq-deadline [kyber]\n",
        )
        .unwrap();
        // The fake's kyber default; with a scheduler up to MAX_SCHED_RQ.
        std::fs::write(sys.path().join("block/vdz/queue/nr_requests"), "256\n").unwrap();
        assert_eq!(t.set_block("vdz", "nr_requests", 64).unwrap(), 64);
        // What the kernel shows after the switch (a plain file keeps what was written).
        let sched = sys.path().join("block/vdz/queue/scheduler");
        std::fs::write(&sched, "none mq-deadline [kyber]\n").unwrap();
        let order: Vec<_> = restore_order(t.journal().entries())
            .into_iter()
            .map(|e| e.knob)
            .collect();
        assert_eq!(order, ["scheduler", "nr_requests"]);
        assert_eq!(
            t.journal()
                .original(&Target::Block { disk: "vdz".into() }, "nr_requests"),
            Some(KnobValue::U32(128)),
            "the first original is kept"
        );
        // Vanished mid-tuning: the restore fails, typed in the report, and the entries stay.
        let moved = sys.path().join("elsewhere");
        std::fs::rename(sys.path().join("block/vdz"), &moved).unwrap();
        let report = t.restore();
        assert_eq!(report.failed.len(), 2, "{:?}", report.failed);
        assert!(report.failed[0].2.contains("no block device vdz"));
        assert_eq!(t.journal().entries().len(), 2);
        // Back: restored, the journal empty.
        std::fs::rename(&moved, sys.path().join("block/vdz")).unwrap();
        let report = t.restore();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(report.restored.len(), 2);
        assert!(t.journal().entries().is_empty());
        let q = BlockQueues::at(sys.path());
        assert_eq!(q.scheduler("vdz").unwrap().name(), "none");
        assert_eq!(q.get("vdz", "nr_requests").unwrap(), 128);
    }

    /// An operator's change of a disk knob enlight set is left by the restore, and stays in
    /// force even when putting the scheduler back made the kernel reset it.
    #[test]
    fn a_restore_leaves_an_operators_disk_change_in_force() {
        let sys = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        fake_disk(sys.path(), "vdz");
        let q = sys.path().join("block/vdz/queue");
        let mut t = KernelTuner::open_at(run.path(), sys.path()).unwrap();
        t.set_scheduler("vdz", "mq-deadline").unwrap();
        std::fs::write(q.join("scheduler"), "none [mq-deadline] kyber\n").unwrap();
        std::fs::write(q.join("nr_requests"), "256\n").unwrap();
        t.set_block("vdz", "nr_requests", 64).unwrap();
        t.set_block("vdz", "read_ahead_kb", 512).unwrap();
        // The operator: nr_requests 32.
        std::fs::write(q.join("nr_requests"), "32\n").unwrap();
        let report = t.restore();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let restored: Vec<_> = report.restored.iter().map(|r| r.1.as_str()).collect();
        assert_eq!(restored, ["scheduler", "read_ahead_kb"]);
        assert_eq!(report.left.len(), 1);
        assert!(
            report.left[0]
                .2
                .contains("changed from 64 (set by enlight) to 32"),
            "{:?}",
            report.left
        );
        let read = |k: &str| std::fs::read_to_string(q.join(k)).unwrap();
        assert_eq!(read("nr_requests"), "32\n");
        assert_eq!(read("read_ahead_kb"), "128\n");
        assert!(t.journal().entries().is_empty());
    }

    /// Per-NAPI knob names parse back to their instance and setting, and are restored after
    /// the interface-wide knobs (whose write sets every instance).
    #[test]
    fn per_napi_knobs_are_named_and_restored_last() {
        assert_eq!(
            parse_napi_instance_knob(&napi_instance_knob(8193, "gro_flush_timeout")),
            Some((8193, "gro_flush_timeout"))
        );
        for bad in [
            "napi_defer_hard_irqs",
            "napiX/gro_flush_timeout",
            "napi1/mtu",
            "rx_usecs",
        ] {
            assert_eq!(parse_napi_instance_knob(bad), None, "{bad}");
        }
        let nic = Target::Nic {
            iface: "b".into(),
            netns: None,
        };
        let entry = |knob: &str| super::super::journal::Entry {
            target: nic.clone(),
            knob: knob.into(),
            original: KnobValue::U32(0),
            applied: None,
            recorded_unix_ms: 0,
        };
        let order: Vec<_> = restore_order(&[
            entry("napi8193/gro_flush_timeout"),
            entry("gro_flush_timeout"),
            entry("napi8194/defer_hard_irqs"),
            entry("napi_defer_hard_irqs"),
        ])
        .into_iter()
        .map(|e| e.knob)
        .collect();
        assert_eq!(
            order,
            [
                "gro_flush_timeout",
                "napi_defer_hard_irqs",
                "napi8193/gro_flush_timeout",
                "napi8194/defer_hard_irqs"
            ]
        );
        assert_eq!(
            napi_instance_range("irq_suspend_timeout").1,
            IRQ_SUSPEND_MAX_NS
        );
        assert_eq!(
            napi_instance_patch("defer_hard_irqs", 3),
            NapiPatch {
                defer_hard_irqs: Some(3),
                ..Default::default()
            }
        );
    }

    #[test]
    fn patches_and_knobs_round_trip() {
        let p = NicPatch {
            rx_ring: Some(512),
            rx_frames: Some(8),
            adaptive_tx: Some(true),
            ..Default::default()
        };
        let knobs = patch_knobs(&p);
        assert_eq!(knobs.len(), 3);
        for (k, v) in knobs {
            let single = patch_of(k, v.clone()).unwrap();
            assert_eq!(patch_knobs(&single), vec![(k, v)]);
        }
        assert!(patch_of("rx_ring", KnobValue::Bool(true)).is_none());
        assert!(patch_of("mtu", KnobValue::U32(1500)).is_none());
    }
}
