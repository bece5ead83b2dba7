//! Block-device queue settings through sysfs (`/sys/block/<disk>/queue/<knob>`, and a SCSI
//! disk's `/sys/block/<disk>/device/queue_depth`), where the kernel makes them writable. Every
//! write is checked first: the knob must exist and be writable for this device, and the value
//! within the knob's range, which comes from the device itself where the kernel says it:
//! `max_sectors_kb` up to `max_hw_sectors_kb`, `nr_requests` up to the tag depth
//! (`mq/0/nr_tags`) without an I/O scheduler, `queue_depth` up to the SCSI host's `can_queue`.
//! The I/O scheduler (`queue/scheduler`) is a choice among those the device lists.

use std::path::{Path, PathBuf};

/// The numeric knobs enlight reads and may tune (all under `queue/` but `queue_depth`, which a
/// SCSI disk has under `device/`).
pub const BLOCK_KNOBS: [&str; 6] = [
    "nr_requests",
    "read_ahead_kb",
    "rq_affinity",
    "nomerges",
    "max_sectors_kb",
    "queue_depth",
];

/// The I/O scheduler knob (a choice, see [`parse_scheduler`]).
pub const SCHEDULER: &str = "scheduler";

/// `nr_requests` with an I/O scheduler is capped by the kernel at `MAX_SCHED_RQ`
/// (`16 * BLKDEV_DEFAULT_RQ`, block/blk-mq.h); without one, at the tag depth.
pub const MAX_SCHED_RQ: u32 = 2048;

/// A device's I/O schedulers as `queue/scheduler` lists them, and the one in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduler {
    /// In the order the kernel lists them.
    pub choices: Vec<String>,
    /// Index of the one in force.
    pub current: usize,
}

impl Scheduler {
    /// The name of the scheduler in force.
    pub fn name(&self) -> &str {
        &self.choices[self.current]
    }
}

/// Parses `queue/scheduler` (`none [mq-deadline] kyber`: the bracketed one is in force).
/// `None` when the text lists no scheduler or not exactly one in brackets (a device without an
/// elevator shows `none` alone, with or without brackets: one choice, nothing to tune). A pure
/// function.
pub fn parse_scheduler(text: &str) -> Option<Scheduler> {
    let mut choices = Vec::new();
    let mut current = None;
    for word in text.split_whitespace() {
        let name = match word.strip_prefix('[').and_then(|w| w.strip_suffix(']')) {
            Some(inner) => {
                if current.replace(choices.len()).is_some() {
                    return None;
                }
                inner
            }
            None => word,
        };
        if name.is_empty() || name.contains(['[', ']']) || choices.iter().any(|c| c == name) {
            return None;
        }
        choices.push(name.to_string());
    }
    match (choices.len(), current) {
        (0, _) => None,
        // `none` alone may be shown without brackets.
        (1, None) => Some(Scheduler {
            choices,
            current: 0,
        }),
        (_, Some(current)) => Some(Scheduler { choices, current }),
        (_, None) => None,
    }
}

/// Why a queue setting could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BlockQueueError {
    /// Not one of [`BLOCK_KNOBS`] (or the scheduler, where a scheduler is meant).
    #[error("unknown block queue knob {0:?} (known: nr_requests, read_ahead_kb, rq_affinity, nomerges, max_sectors_kb, queue_depth, scheduler)")]
    UnknownKnob(String),
    /// A scheduler the device does not offer.
    #[error("{disk}: scheduler {value:?} is not one the device offers ({})", offered.join(", "))]
    NoSuchChoice {
        disk: String,
        value: String,
        offered: Vec<String>,
    },
    /// No such disk.
    #[error("no block device {0}")]
    NoSuchDevice(String),
    /// The device has the knob read-only, or not at all.
    #[error("{knob} on {disk}: not supported by driver {driver} ({why})")]
    Unsupported {
        disk: String,
        driver: String,
        knob: String,
        why: String,
    },
    /// A value outside the knob's range.
    #[error("{disk}: {knob} = {value} is out of range ({min}..={max})")]
    OutOfRange {
        disk: String,
        knob: String,
        value: u32,
        min: u32,
        max: u32,
    },
    /// The kernel refused the write or a read failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file did not hold a number (or a scheduler list).
    #[error("{path}: cannot parse {text:?}")]
    Parse { path: PathBuf, text: String },
}

/// Block queues under a sysfs root (normally `/sys`).
#[derive(Debug, Clone)]
pub struct BlockQueues {
    sysfs: PathBuf,
}

impl Default for BlockQueues {
    fn default() -> Self {
        BlockQueues::at("/sys")
    }
}

fn knob_name(knob: &str) -> Result<&'static str, BlockQueueError> {
    BLOCK_KNOBS
        .iter()
        .find(|k| **k == knob)
        .copied()
        .ok_or_else(|| BlockQueueError::UnknownKnob(knob.into()))
}

impl BlockQueues {
    /// Queues under `sysfs`.
    pub fn at(sysfs: impl Into<PathBuf>) -> Self {
        BlockQueues {
            sysfs: sysfs.into(),
        }
    }

    fn disk_dir(&self, disk: &str) -> Result<PathBuf, BlockQueueError> {
        if disk.is_empty() || disk.contains('/') || disk.starts_with('.') {
            return Err(BlockQueueError::NoSuchDevice(disk.into()));
        }
        let dir = self.sysfs.join("block").join(disk);
        if !dir.exists() {
            return Err(BlockQueueError::NoSuchDevice(disk.into()));
        }
        Ok(dir)
    }

    /// Where `knob` of the disk at `dir` lives.
    fn knob_path(dir: &Path, knob: &str) -> PathBuf {
        match knob {
            "queue_depth" => dir.join("device").join(knob),
            _ => dir.join("queue").join(knob),
        }
    }

    fn read_u32(path: &Path) -> Result<u32, BlockQueueError> {
        let text = std::fs::read_to_string(path).map_err(|source| BlockQueueError::Io {
            path: path.into(),
            source,
        })?;
        text.trim().parse().map_err(|_| BlockQueueError::Parse {
            path: path.into(),
            text: text.trim().into(),
        })
    }

    /// The current value of `knob` on `disk`.
    pub fn get(&self, disk: &str, knob: &str) -> Result<u32, BlockQueueError> {
        let knob = knob_name(knob)?;
        let path = Self::knob_path(&self.disk_dir(disk)?, knob);
        if !path.exists() {
            return Err(self.unsupported(disk, knob, "the kernel has no such file for it"));
        }
        Self::read_u32(&path)
    }

    /// Every known knob's value on `disk` (knobs the device lacks are left out).
    pub fn all(&self, disk: &str) -> Result<Vec<(&'static str, u32)>, BlockQueueError> {
        self.disk_dir(disk)?;
        Ok(BLOCK_KNOBS
            .iter()
            .filter_map(|k| self.get(disk, k).ok().map(|v| (*k, v)))
            .collect())
    }

    /// Every known knob of `disk` the kernel has, with whether it is writable for this device
    /// and its range (the knobs [`super::knobs::disk`] shows).
    pub fn settings(&self, disk: &str) -> Vec<super::knobs::QueueSetting> {
        use std::os::unix::fs::PermissionsExt;
        let Ok(dir) = self.disk_dir(disk) else {
            return Vec::new();
        };
        BLOCK_KNOBS
            .iter()
            .filter_map(|k| {
                let path = Self::knob_path(&dir, k);
                let writable = std::fs::metadata(&path).ok()?.permissions().mode() & 0o200 != 0;
                Some(super::knobs::QueueSetting {
                    name: k,
                    value: Self::read_u32(&path).ok()?,
                    writable,
                    range: self.range(disk, k).ok()?,
                })
            })
            .collect()
    }

    /// The range `knob` accepts on `disk`.
    pub fn range(&self, disk: &str, knob: &str) -> Result<(u32, u32), BlockQueueError> {
        let knob = knob_name(knob)?;
        let dir = self.disk_dir(disk)?;
        let queue = dir.join("queue");
        Ok(match knob {
            // BLKDEV_MIN_RQ up to the tag depth without a scheduler (the kernel refuses more),
            // MAX_SCHED_RQ with one.
            "nr_requests" => {
                let elevator = std::fs::read_to_string(queue.join(SCHEDULER))
                    .ok()
                    .and_then(|t| parse_scheduler(&t))
                    .is_some_and(|s| s.name() != "none");
                if elevator {
                    (4, MAX_SCHED_RQ)
                } else {
                    let tags = Self::read_u32(&dir.join("mq").join("0").join("nr_tags"))?;
                    (4, tags.max(4))
                }
            }
            // At least one; at most what the SCSI host queues (scsi_change_queue_depth
            // refuses more). A host that does not say: no higher than now.
            "queue_depth" => {
                let now = Self::read_u32(&dir.join("device").join("queue_depth"))?;
                (
                    1,
                    Self::scsi_can_queue(&dir.join("device"))
                        .unwrap_or(now)
                        .max(1),
                )
            }
            // 0 disables read-ahead; 1 GiB is far beyond any useful value.
            "read_ahead_kb" => (0, 1 << 20),
            "rq_affinity" | "nomerges" => (0, 2),
            "max_sectors_kb" => {
                let hw = Self::read_u32(&queue.join("max_hw_sectors_kb"))?;
                // At least one page.
                (4, hw)
            }
            _ => unreachable!("knob_name checked"),
        })
    }

    /// `can_queue` of the SCSI host above the SCSI device `device` (`.../hostN/scsi_host/hostN/`).
    fn scsi_can_queue(device: &Path) -> Option<u32> {
        let mut dir = std::fs::canonicalize(device).ok()?;
        for _ in 0..4 {
            dir.pop();
            let hosts = dir.join("scsi_host");
            if let Some(host) = std::fs::read_dir(&hosts)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(Result::ok)
            {
                return Self::read_u32(&host.path().join("can_queue")).ok();
            }
        }
        None
    }

    /// The I/O scheduler of `disk`: the ones it offers and the one in force.
    pub fn scheduler(&self, disk: &str) -> Result<Scheduler, BlockQueueError> {
        let path = self.disk_dir(disk)?.join("queue").join(SCHEDULER);
        if !path.exists() {
            return Err(self.unsupported(disk, SCHEDULER, "the kernel has no such file for it"));
        }
        let text = std::fs::read_to_string(&path).map_err(|source| BlockQueueError::Io {
            path: path.clone(),
            source,
        })?;
        parse_scheduler(&text).ok_or_else(|| BlockQueueError::Parse {
            path,
            text: text.trim().into(),
        })
    }

    /// Whether the scheduler of `disk` can be changed (the file is writable and offers more
    /// than one).
    pub fn scheduler_writable(&self, disk: &str) -> bool {
        use std::os::unix::fs::PermissionsExt;
        let Ok(dir) = self.disk_dir(disk) else {
            return false;
        };
        std::fs::metadata(dir.join("queue").join(SCHEDULER))
            .is_ok_and(|m| m.permissions().mode() & 0o200 != 0)
            && self.scheduler(disk).is_ok_and(|s| s.choices.len() > 1)
    }

    /// Checks that `disk`'s scheduler can be switched to `name`: the file is writable and
    /// `name` is one the device offers. Returns the scheduler in force now.
    pub fn check_scheduler(&self, disk: &str, name: &str) -> Result<Scheduler, BlockQueueError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.disk_dir(disk)?.join("queue").join(SCHEDULER);
        let now = self.scheduler(disk)?;
        let meta = std::fs::metadata(&path).map_err(|source| BlockQueueError::Io {
            path: path.clone(),
            source,
        })?;
        if meta.permissions().mode() & 0o200 == 0 {
            return Err(self.unsupported(disk, SCHEDULER, "read-only for this device"));
        }
        if !now.choices.iter().any(|c| c == name) {
            return Err(BlockQueueError::NoSuchChoice {
                disk: disk.into(),
                value: name.into(),
                offered: now.choices,
            });
        }
        Ok(now)
    }

    /// Switches `disk` to scheduler `name` after [`Self::check_scheduler`]; returns the one in
    /// force afterwards. (The kernel drains the queue for the switch, and resets `nr_requests`
    /// to the new scheduler's default.)
    pub fn set_scheduler(&self, disk: &str, name: &str) -> Result<String, BlockQueueError> {
        self.check_scheduler(disk, name)?;
        let path = self.disk_dir(disk)?.join("queue").join(SCHEDULER);
        std::fs::write(&path, format!("{name}\n")).map_err(|source| BlockQueueError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(self.scheduler(disk)?.name().to_string())
    }

    /// Writes `value` to `knob` on `disk` after checking the knob is there, writable, and
    /// `value` is in range; returns the value the kernel reports afterwards (it may round).
    pub fn set(&self, disk: &str, knob: &str, value: u32) -> Result<u32, BlockQueueError> {
        let path = self.check(disk, knob, value)?;
        std::fs::write(&path, format!("{value}\n")).map_err(|source| {
            if source.raw_os_error() == Some(libc::EINVAL) && knob == "nr_requests" {
                // Devices without a scheduler take no nr_requests change.
                self.unsupported(disk, knob, &format!("the kernel refused it: {source}"))
            } else {
                BlockQueueError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Self::read_u32(&path)
    }

    /// Checks that `knob` exists on `disk`, is writable and takes `value`; returns its file.
    pub fn check(&self, disk: &str, knob: &str, value: u32) -> Result<PathBuf, BlockQueueError> {
        let knob = knob_name(knob)?;
        let path = Self::knob_path(&self.disk_dir(disk)?, knob);
        let meta = std::fs::metadata(&path)
            .map_err(|_| self.unsupported(disk, knob, "the kernel has no such file for it"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o200 == 0 {
                return Err(self.unsupported(disk, knob, "read-only for this device"));
            }
        }
        let (min, max) = self.range(disk, knob)?;
        if !(min..=max).contains(&value) {
            return Err(BlockQueueError::OutOfRange {
                disk: disk.into(),
                knob: knob.into(),
                value,
                min,
                max,
            });
        }
        Ok(path)
    }

    fn unsupported(&self, disk: &str, knob: &str, why: &str) -> BlockQueueError {
        BlockQueueError::Unsupported {
            disk: disk.into(),
            driver: super::discovery::block_driver(&self.sysfs, disk),
            knob: knob.into(),
            why: why.into(),
        }
    }
}

/// A fake sysfs block queue for unit tests: `/block/<disk>/queue/<knob>` under `root` for each
/// of `knobs`, the scheduler list `[none] mq-deadline kyber`, and one hardware queue of 128
/// tags.
#[cfg(test)]
pub(crate) fn fake_queue(root: &Path, disk: &str, knobs: &[(&str, &str)]) {
    let q = root.join("block").join(disk).join("queue");
    std::fs::create_dir_all(&q).unwrap();
    for (k, v) in knobs
        .iter()
        .chain(&[("scheduler", "[none] mq-deadline kyber")])
    {
        std::fs::write(q.join(k), format!("{v}\n")).unwrap();
    }
    let mq = root.join("block").join(disk).join("mq/0");
    std::fs::create_dir_all(&mq).unwrap();
    std::fs::write(mq.join("nr_tags"), "128\n").unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs tree: only for the pure checks (names, ranges, permissions); the real
    /// writes are tested on a loop device in tests/kernel_tuning.rs.
    fn fake_disk(root: &Path, disk: &str) {
        fake_queue(
            root,
            disk,
            &[
                ("nr_requests", "256"),
                ("read_ahead_kb", "128"),
                ("rq_affinity", "1"),
                ("nomerges", "0"),
                ("max_sectors_kb", "512"),
                ("max_hw_sectors_kb", "1024"),
            ],
        );
    }

    /// A fake SCSI disk: `device/` is a link into a device tree with the host's `can_queue`
    /// above it, as under /sys/devices.
    fn fake_scsi_disk(root: &Path, disk: &str, can_queue: Option<u32>) {
        fake_disk(root, disk);
        let host = root.join("devices/vmbus/host3");
        let sdev = host.join("target3:0:0/3:0:0:0");
        std::fs::create_dir_all(&sdev).unwrap();
        std::fs::write(sdev.join("queue_depth"), "30\n").unwrap();
        if let Some(c) = can_queue {
            let sh = host.join("scsi_host/host3");
            std::fs::create_dir_all(&sh).unwrap();
            std::fs::write(sh.join("can_queue"), format!("{c}\n")).unwrap();
        }
        std::os::unix::fs::symlink(&sdev, root.join("block").join(disk).join("device")).unwrap();
    }

    #[test]
    fn scheduler_lists_parse_with_the_one_in_force() {
        let s = parse_scheduler("[none] mq-deadline kyber\n").unwrap();
        assert_eq!(s.choices, ["none", "mq-deadline", "kyber"]);
        assert_eq!((s.current, s.name()), (0, "none"));
        let s = parse_scheduler("none [mq-deadline] kyber bfq").unwrap();
        assert_eq!((s.current, s.name()), (1, "mq-deadline"));
        assert_eq!(s.choices.len(), 4);
        // A device without an elevator: `none` alone, bracketed or not.
        assert_eq!(parse_scheduler("none").unwrap().choices, ["none"]);
        assert_eq!(parse_scheduler("[none]").unwrap().name(), "none");
        for bad in [
            "",
            "  \n",
            "none mq-deadline",
            "[none] [mq-deadline]",
            "[] none",
            "[none mq-deadline]",
            "none [none]",
        ] {
            assert_eq!(parse_scheduler(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn schedulers_are_chosen_only_among_those_offered() {
        let dir = tempfile::tempdir().unwrap();
        fake_disk(dir.path(), "vdz");
        let q = BlockQueues::at(dir.path());
        assert_eq!(q.scheduler("vdz").unwrap().name(), "none");
        assert!(q.scheduler_writable("vdz"));
        let e = q.set_scheduler("vdz", "bfq").unwrap_err();
        assert!(
            matches!(&e, BlockQueueError::NoSuchChoice { offered, .. } if offered.len() == 3),
            "{e:?}"
        );
        assert!(e.to_string().contains("none, mq-deadline, kyber"), "{e}");
        // A regular file takes the name as written; the kernel would bracket it.
        std::fs::write(
            dir.path().join("block/vdz/queue/scheduler"),
            "none [mq-deadline] kyber\n",
        )
        .unwrap();
        assert_eq!(q.scheduler("vdz").unwrap().current, 1);
        assert!(matches!(
            q.scheduler("vdy"),
            Err(BlockQueueError::NoSuchDevice(_))
        ));
        std::fs::write(dir.path().join("block/vdz/queue/scheduler"), "garbage [\n").unwrap();
        assert!(matches!(
            q.scheduler("vdz"),
            Err(BlockQueueError::Parse { .. })
        ));
        assert!(!q.scheduler_writable("vdz"));
    }

    #[test]
    fn nr_requests_is_capped_by_the_tag_depth_without_a_scheduler() {
        let dir = tempfile::tempdir().unwrap();
        fake_disk(dir.path(), "vdz");
        let q = BlockQueues::at(dir.path());
        assert_eq!(q.range("vdz", "nr_requests").unwrap(), (4, 128));
        assert!(matches!(
            q.set("vdz", "nr_requests", 256),
            Err(BlockQueueError::OutOfRange { max: 128, .. })
        ));
        std::fs::write(
            dir.path().join("block/vdz/queue/scheduler"),
            "none [mq-deadline] kyber\n",
        )
        .unwrap();
        assert_eq!(q.range("vdz", "nr_requests").unwrap(), (4, MAX_SCHED_RQ));
        assert_eq!(q.set("vdz", "nr_requests", 256).unwrap(), 256);
    }

    #[test]
    fn a_scsi_disks_queue_depth_is_a_knob_up_to_the_hosts_can_queue() {
        let dir = tempfile::tempdir().unwrap();
        fake_scsi_disk(dir.path(), "sdz", Some(64));
        let q = BlockQueues::at(dir.path());
        assert_eq!(q.get("sdz", "queue_depth").unwrap(), 30);
        assert_eq!(q.range("sdz", "queue_depth").unwrap(), (1, 64));
        assert_eq!(q.set("sdz", "queue_depth", 64).unwrap(), 64);
        assert!(matches!(
            q.set("sdz", "queue_depth", 65),
            Err(BlockQueueError::OutOfRange { max: 64, .. })
        ));
        assert!(q.settings("sdz").iter().any(|s| s.name == "queue_depth"));
        // A host that does not say how much it queues: no higher than now.
        let dir = tempfile::tempdir().unwrap();
        fake_scsi_disk(dir.path(), "sdy", None);
        assert_eq!(
            BlockQueues::at(dir.path())
                .range("sdy", "queue_depth")
                .unwrap(),
            (1, 30)
        );
        // A virtio disk has no SCSI queue depth.
        let dir = tempfile::tempdir().unwrap();
        fake_disk(dir.path(), "vdz");
        assert!(matches!(
            BlockQueues::at(dir.path()).get("vdz", "queue_depth"),
            Err(BlockQueueError::Unsupported { .. })
        ));
    }

    #[test]
    fn reads_checks_and_writes_knobs() {
        let dir = tempfile::tempdir().unwrap();
        fake_disk(dir.path(), "vdz");
        let q = BlockQueues::at(dir.path());
        assert_eq!(q.get("vdz", "read_ahead_kb").unwrap(), 128);
        assert_eq!(q.all("vdz").unwrap().len(), 5);
        assert_eq!(q.set("vdz", "read_ahead_kb", 256).unwrap(), 256);
        assert!(matches!(
            q.set("vdz", "max_sectors_kb", 2048),
            Err(BlockQueueError::OutOfRange { max: 1024, .. })
        ));
        assert!(matches!(
            q.set("vdz", "rq_affinity", 3),
            Err(BlockQueueError::OutOfRange { .. })
        ));
        assert!(matches!(
            q.get("vdz", "scheduler"),
            Err(BlockQueueError::UnknownKnob(_))
        ));
        assert!(matches!(
            q.get("vdz", "rotational"),
            Err(BlockQueueError::UnknownKnob(_))
        ));
        assert!(matches!(
            q.get("../etc", "nomerges"),
            Err(BlockQueueError::NoSuchDevice(_))
        ));
        assert!(matches!(
            q.get("vdy", "nomerges"),
            Err(BlockQueueError::NoSuchDevice(_))
        ));
    }

    #[test]
    fn read_only_and_missing_knobs_are_unsupported() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        fake_disk(dir.path(), "vdz");
        let f = dir.path().join("block/vdz/queue/nomerges");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = BlockQueues::at(dir.path())
            .set("vdz", "nomerges", 1)
            .unwrap_err();
        assert!(e.to_string().contains("not supported by driver"), "{e}");
        std::fs::remove_file(dir.path().join("block/vdz/queue/rq_affinity")).unwrap();
        assert!(matches!(
            BlockQueues::at(dir.path()).set("vdz", "rq_affinity", 1),
            Err(BlockQueueError::Unsupported { .. })
        ));
    }
}
