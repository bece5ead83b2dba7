//! Changing kernel device settings safely: only devices the configuration names are changed
//! (everything else gets a recommendation, see [`policy`]); every knob's original value is
//! journalled before its first change ([`super::journal`]); [`KernelTuner::restore`] puts every
//! original back (what `enlight restore` and enlightd's clean shutdown call).

use std::path::{Path, PathBuf};

use super::blockq::{BlockQueueError, BlockQueues};
use super::ethtool::{Ethtool, EthtoolError, NicPatch, NicSettings};
use super::journal::{Journal, JournalError, KnobValue, Target};
use super::napi::{NapiError, NapiSysfs, NAPI_KNOBS};

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
        let target = Target::Nic {
            iface: iface.into(),
            netns: netns.map(Path::to_path_buf),
        };
        let journal = &mut self.journal;
        in_netns(netns, || -> Result<NicSettings, TuneError> {
            let mut ethtool = Ethtool::open()?;
            let current = ethtool.settings(iface)?;
            let now = nic_knobs(&current);
            for (knob, _) in patch_knobs(patch) {
                if let Some((_, original)) = now.iter().find(|(k, _)| *k == knob) {
                    journal.record_original(&target, knob, *original)?;
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
        let target = Target::Nic {
            iface: iface.into(),
            netns: netns.map(Path::to_path_buf),
        };
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
        // Checks (writable, range) before the journal is touched.
        let (min, max) = self.queues.range(disk, knob)?;
        if !(min..=max).contains(&value) {
            return Err(BlockQueueError::OutOfRange {
                disk: disk.into(),
                knob: knob.into(),
                value,
                min,
                max,
            }
            .into());
        }
        self.journal
            .record_original(&target, knob, KnobValue::U32(original))?;
        let now = self.queues.set(disk, knob, value)?;
        self.journal
            .note_applied(&target, knob, KnobValue::U32(now))?;
        Ok(now)
    }

    /// Puts every journalled original back; each restored knob leaves the journal, a failed
    /// one stays (with the reason in the report) so a later restore can retry.
    pub fn restore(&mut self) -> RestoreReport {
        let mut report = RestoreReport::default();
        let entries: Vec<_> = self.journal.entries().to_vec();
        for e in entries {
            // Ok(Some(why)): left as someone else set it.
            let result: Result<Option<String>, String> = match &e.target {
                Target::Nic { iface, netns } if NAPI_KNOBS.contains(&e.knob.as_str()) => {
                    match e.original {
                        KnobValue::U32(v) => {
                            let napi = &self.napi;
                            let applied = e.applied;
                            in_netns_sysfs(netns.as_deref(), || {
                                let now = napi.get(iface, &e.knob).map_err(|err| err.to_string())?;
                                if let Some(KnobValue::U32(ours)) = applied {
                                    if now != ours as u64 {
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
                        KnobValue::Bool(_) => Err(format!("{}: not a boolean knob", e.knob)),
                    }
                }
                Target::Nic { iface, netns } => match patch_of(&e.knob, e.original) {
                    None => Err(format!("unknown NIC knob {}", e.knob)),
                    Some(patch) => in_netns(netns.as_deref(), || {
                        Ethtool::open()
                            .and_then(|mut t| t.apply(iface, &patch))
                            .map(|_| None)
                            .map_err(|err| err.to_string())
                    })
                    .map_err(|err| err.to_string())
                    .and_then(|r| r),
                },
                Target::Block { disk } => match e.original {
                    KnobValue::U32(v) => self
                        .queues
                        .set(disk, &e.knob, v)
                        .map(|_| None)
                        .map_err(|err| err.to_string()),
                    KnobValue::Bool(_) => Err(format!("{}: not a boolean knob", e.knob)),
                },
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
        report
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
            let single = patch_of(k, v).unwrap();
            assert_eq!(patch_knobs(&single), vec![(k, v)]);
        }
        assert!(patch_of("rx_ring", KnobValue::Bool(true)).is_none());
        assert!(patch_of("mtu", KnobValue::U32(1500)).is_none());
    }
}
