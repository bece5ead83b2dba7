//! Putting kernel settings back: [`KernelChanges::restore`] writes every journalled original
//! back in [`restore_order`], leaving (and forgetting) a knob someone else changed after enlight
//! did, and keeping a failed one in the journal for a later try.

use std::path::Path;

use super::{napis_here, patch_of, settings_values, KernelChanges};
use crate::kernel::blockq::SCHEDULER;
use crate::kernel::ethtool::Ethtool;
use crate::kernel::journal::{Entry, KnobValue, Target};
use crate::kernel::napi::NAPI_KNOBS;
use crate::kernel::napi_instance::{
    napi_instance_patch, napi_instance_value, parse_napi_instance_knob,
};
use crate::kernel::netdev::Netdev;
use crate::kernel::netns::{in_netns, in_netns_sysfs};

/// The order [`KernelChanges::restore`] puts entries back in: a disk's scheduler before its
/// other knobs (switching the scheduler resets `nr_requests` to the new one's default, so
/// `nr_requests` goes back after it), everything else as journalled. A pure function.
pub fn restore_order(entries: &[Entry]) -> Vec<Entry> {
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

/// What [`KernelChanges::restore`] did.
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

/// The values now of the per-NAPI settings among `entries` (`None`: the instance is gone).
fn napi_instance_values(entries: &[Entry]) -> Vec<(Target, String, Option<u64>)> {
    entries
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
        .collect()
}

impl KernelChanges {
    /// Puts every journalled original back; each restored knob leaves the journal, a failed
    /// one stays (with the reason in the report) so a later restore can retry.
    pub fn restore(&mut self) -> RestoreReport {
        let mut report = RestoreReport::default();
        // What is on disk now: other backends (one per device) journal into the same file.
        if let Err(e) = self.journal.reload() {
            log::warn!("restore: {e}; restoring the entries already loaded");
        }
        let entries = restore_order(self.journal.entries());
        // Both read before anything is written: putting a scheduler back resets nr_requests,
        // and restoring an interface-wide NAPI sysfs knob sets every instance.
        let operators = self.operators_disk_values(&entries);
        let napi_now = napi_instance_values(&entries);
        for e in entries {
            let result = self.restore_entry(&e, &operators, &napi_now);
            self.account(e, result, &mut report);
        }
        self.put_back_operators_values(operators, &mut report);
        report
    }

    /// Disk knobs someone else changed after enlight did, with their value now.
    fn operators_disk_values(&self, entries: &[Entry]) -> Vec<(Target, String, KnobValue)> {
        entries
            .iter()
            .filter_map(|e| {
                let Target::Block { disk } = &e.target else {
                    return None;
                };
                let now = self.block_value(disk, &e.knob)?;
                (e.applied.as_ref().is_some_and(|ours| *ours != now))
                    .then(|| (e.target.clone(), e.knob.clone(), now))
            })
            .collect()
    }

    /// Puts one entry back through its source: `Ok(None)` put back, `Ok(Some(why))` left as
    /// someone else set it, `Err(why)` failed. `operators` and `napi_now` are the values read
    /// before anything was written.
    fn restore_entry(
        &self,
        e: &Entry,
        operators: &[(Target, String, KnobValue)],
        napi_now: &[(Target, String, Option<u64>)],
    ) -> Result<Option<String>, String> {
        match &e.target {
            Target::Nic { iface, netns } if NAPI_KNOBS.contains(&e.knob.as_str()) => {
                self.restore_napi_sysfs(e, iface, netns.as_deref())
            }
            Target::Nic { iface, netns } if parse_napi_instance_knob(&e.knob).is_some() => {
                let now = napi_now
                    .iter()
                    .find(|(t, k, _)| *t == e.target && *k == e.knob)
                    .and_then(|(_, _, v)| *v);
                Self::restore_napi_instance(e, iface, netns.as_deref(), now)
            }
            Target::Nic { iface, netns } => Self::restore_ethtool(e, iface, netns.as_deref()),
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
            Target::Block { disk } => self.restore_block(e, disk),
        }
    }

    /// Records what became of entry `e` in `report`; a knob put back or left leaves the
    /// journal.
    fn account(
        &mut self,
        e: Entry,
        result: Result<Option<String>, String>,
        report: &mut RestoreReport,
    ) {
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

    /// An operator's value that a scheduler put back has reset (nr_requests) goes back in.
    fn put_back_operators_values(
        &self,
        operators: Vec<(Target, String, KnobValue)>,
        report: &mut RestoreReport,
    ) {
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
    }

    /// Puts an interface-wide NAPI sysfs knob back (`Ok(Some(why))`: left as someone else set
    /// it).
    fn restore_napi_sysfs(
        &self,
        e: &Entry,
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
        e: &Entry,
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
        e: &Entry,
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
                    let now = settings_values(&now).into_iter().find(|(k, _)| *k == knob);
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
    fn restore_block(&self, e: &Entry, disk: &str) -> Result<Option<String>, String> {
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
    use crate::kernel::blockq::BlockQueues;
    use crate::kernel::changes::ChangeError;

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
        let mut t = KernelChanges::open_at(run.path(), sys.path()).unwrap();
        let e = t.set_block("vdz", "nr_requests", 256).unwrap_err();
        assert!(
            matches!(&e, ChangeError::BlockQueue(B::OutOfRange { max: 128, .. })),
            "{e:?}"
        );
        assert!(e.to_string().contains("vdz: nr_requests = 256"), "{e}");
        let e = t.set_block("vdz", "queue_depth", 16).unwrap_err();
        assert!(
            matches!(&e, ChangeError::BlockQueue(B::Unsupported { knob, .. }) if knob == "queue_depth"),
            "{e:?}"
        );
        let e = t.set_scheduler("vdz", "bfq").unwrap_err();
        assert!(
            matches!(&e, ChangeError::BlockQueue(B::NoSuchChoice { .. })),
            "{e:?}"
        );
        let e = t.set_block("vdgone", "nr_requests", 64).unwrap_err();
        assert!(
            matches!(&e, ChangeError::BlockQueue(B::NoSuchDevice(d)) if d == "vdgone"),
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
        let mut t = KernelChanges::open_at(run.path(), sys.path()).unwrap();
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

    /// Per-NAPI settings are restored after the interface-wide knobs (whose write sets every
    /// instance).
    #[test]
    fn per_napi_knobs_are_restored_last() {
        let nic = Target::Nic {
            iface: "b".into(),
            netns: None,
        };
        let entry = |knob: &str| Entry {
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
    }
}
