//! Block-device queue settings through sysfs (`/sys/block/<disk>/queue/<knob>`), where the
//! kernel makes them writable. Every write is checked first: the knob must exist and be
//! writable for this device, and the value within the knob's range (some ranges come from the
//! device itself, e.g. `max_sectors_kb` up to `max_hw_sectors_kb`).

use std::path::{Path, PathBuf};

/// The queue knobs enlight reads and may tune.
pub const BLOCK_KNOBS: [&str; 5] = [
    "nr_requests",
    "read_ahead_kb",
    "rq_affinity",
    "nomerges",
    "max_sectors_kb",
];

/// Why a queue setting could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BlockQueueError {
    /// Not one of [`BLOCK_KNOBS`].
    #[error("unknown block queue knob {0:?} (known: nr_requests, read_ahead_kb, rq_affinity, nomerges, max_sectors_kb)")]
    UnknownKnob(String),
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
    /// The file did not hold a number.
    #[error("{path}: not a number: {text:?}")]
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
        let path = self.disk_dir(disk)?.join("queue").join(knob);
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
                let path = dir.join("queue").join(k);
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
        let queue = self.disk_dir(disk)?.join("queue");
        Ok(match knob {
            // BLKDEV_MIN_RQ; the kernel caps the top by the tag set depth itself.
            "nr_requests" => (4, 1 << 16),
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

    /// Writes `value` to `knob` on `disk` after checking the knob is there, writable, and
    /// `value` is in range; returns the value the kernel reports afterwards (it may round).
    pub fn set(&self, disk: &str, knob: &str, value: u32) -> Result<u32, BlockQueueError> {
        let knob = knob_name(knob)?;
        let path = self.disk_dir(disk)?.join("queue").join(knob);
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

    fn unsupported(&self, disk: &str, knob: &str, why: &str) -> BlockQueueError {
        BlockQueueError::Unsupported {
            disk: disk.into(),
            driver: super::discovery::block_driver(&self.sysfs, disk),
            knob: knob.into(),
            why: why.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs tree: only for the pure checks (names, ranges, permissions); the real
    /// writes are tested on a loop device in tests/kernel_tuning.rs.
    fn fake_disk(root: &Path, disk: &str) {
        let q = root.join("block").join(disk).join("queue");
        std::fs::create_dir_all(&q).unwrap();
        for (k, v) in [
            ("nr_requests", "256"),
            ("read_ahead_kb", "128"),
            ("rq_affinity", "1"),
            ("nomerges", "0"),
            ("max_sectors_kb", "512"),
            ("max_hw_sectors_kb", "1024"),
        ] {
            std::fs::write(q.join(k), format!("{v}\n")).unwrap();
        }
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
