//! The journal of kernel settings enlight changed, with each knob's original value, persisted
//! under the runtime directory (`<runtime dir>/kernel/originals.json`) *before* the change is
//! made: a daemon killed mid-change leaves a journal from which `enlight restore` puts the
//! originals back. The first original of a knob is kept however many times it changes later.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a knob belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Target {
    /// A NIC, in the network namespace at `netns` (a `/run/netns/<name>` or `/proc/<pid>/ns/net`
    /// path; `None`: the daemon's own).
    Nic {
        iface: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<PathBuf>,
    },
    /// A block device's queue.
    Block { disk: String },
}

impl Target {
    /// NIC `iface`, in the network namespace at `netns` (`None`: the daemon's own).
    pub fn nic(iface: &str, netns: Option<&Path>) -> Target {
        Target::Nic {
            iface: iface.into(),
            netns: netns.map(Path::to_path_buf),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Nic { iface, netns: None } => write!(f, "nic {iface}"),
            Target::Nic {
                iface,
                netns: Some(ns),
            } => write!(f, "nic {iface} (netns {})", ns.display()),
            Target::Block { disk } => write!(f, "disk {disk}"),
        }
    }
}

/// A knob's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KnobValue {
    Bool(bool),
    U32(u32),
    /// A number past `u32` (a per-NAPI timer in ns); smaller ones are [`KnobValue::U32`], as
    /// the untagged JSON reads them back.
    U64(u64),
    /// A choice by name (a disk's I/O scheduler).
    Text(String),
}

impl KnobValue {
    /// A number, as [`KnobValue::U32`] when it fits (so it reads back equal).
    pub fn number(v: u64) -> KnobValue {
        match u32::try_from(v) {
            Ok(v) => KnobValue::U32(v),
            Err(_) => KnobValue::U64(v),
        }
    }

    /// The number, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            KnobValue::U32(v) => Some(*v as u64),
            KnobValue::U64(v) => Some(*v),
            _ => None,
        }
    }
}

impl std::fmt::Display for KnobValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KnobValue::Bool(b) => write!(f, "{}", if *b { "on" } else { "off" }),
            KnobValue::U32(v) => write!(f, "{v}"),
            KnobValue::U64(v) => write!(f, "{v}"),
            KnobValue::Text(t) => write!(f, "{t}"),
        }
    }
}

/// One changed knob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub target: Target,
    pub knob: String,
    /// The value before enlight first changed it.
    pub original: KnobValue,
    /// The value enlight last set (`None` while the change is being made).
    pub applied: Option<KnobValue>,
    /// When the original was recorded (Unix ms).
    pub recorded_unix_ms: u64,
}

/// The journal file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing it failed.
    #[error("kernel settings journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// It exists but does not parse: it is left alone (it may hold the only record of the
    /// originals), and nothing is changed until someone looks at it.
    #[error("kernel settings journal {path} is corrupt ({message}); it is kept as is: fix or remove it by hand")]
    Corrupt { path: PathBuf, message: String },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    entries: Vec<Entry>,
}

/// The journal, loaded.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    entries: Vec<Entry>,
}

/// Where the journal of `runtime_dir` lives.
pub fn journal_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("kernel").join("originals.json")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The entries of the journal at `path` (none if there is no file).
fn read_entries(path: &Path) -> Result<Vec<Entry>, JournalError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice::<File>(&bytes)
            .map_err(|e| JournalError::Corrupt {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
            .entries),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(JournalError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Journal {
    /// Loads the journal of `runtime_dir` (empty if there is none yet).
    pub fn open(runtime_dir: &Path) -> Result<Journal, JournalError> {
        let path = journal_path(runtime_dir);
        let entries = read_entries(&path)?;
        Ok(Journal { path, entries })
    }

    /// Applies `change` to the journal as it is on disk now, under an exclusive lock, and
    /// writes it back if `change` says it changed anything. Several `Journal`s share one file
    /// (each kernel device's tuner backend has its own, and `enlight restore` may run beside
    /// the daemon): a change made from memory alone would write over the others' entries, and
    /// their originals would be lost (the lab test found a disk's original gone this way after
    /// a NIC's change was journalled).
    fn update(
        &mut self,
        mut change: impl FnMut(&mut Vec<Entry>) -> bool,
    ) -> Result<(), JournalError> {
        let dir = self.path.parent().expect("journal path has a parent");
        if !dir.exists() {
            // No journal on disk: a change that would change nothing in an empty one (a forget,
            // a note) creates nothing.
            self.entries.clear();
            if !change(&mut Vec::new()) {
                return Ok(());
            }
        }
        let _lock = self.lock()?;
        self.entries = read_entries(&self.path)?;
        if change(&mut self.entries) {
            self.save()?;
        }
        Ok(())
    }

    /// An exclusive `flock` on the journal's directory (created if missing), released when the
    /// returned file is dropped. The directory, not a lock file: nothing is left behind in the
    /// runtime directory when the journal empties.
    fn lock(&self) -> Result<std::fs::File, JournalError> {
        let dir = self.path.parent().expect("journal path has a parent");
        let io = |source| JournalError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let d = std::fs::File::open(dir).map_err(io)?;
        d.lock().map_err(io)?;
        Ok(d)
    }

    /// Every entry.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded original of a knob, if enlight changed it.
    pub fn original(&self, target: &Target, knob: &str) -> Option<KnobValue> {
        self.entries
            .iter()
            .find(|e| &e.target == target && e.knob == knob)
            .map(|e| e.original.clone())
    }

    /// Records `original` for a knob about to change (unless an earlier original is already
    /// recorded) and writes the journal to disk before returning.
    pub fn record_original(
        &mut self,
        target: &Target,
        knob: &str,
        original: KnobValue,
    ) -> Result<(), JournalError> {
        self.update(|entries| {
            let known = entries
                .iter()
                .any(|e| &e.target == target && e.knob == knob);
            if !known {
                entries.push(Entry {
                    target: target.clone(),
                    knob: knob.into(),
                    original: original.clone(),
                    applied: None,
                    recorded_unix_ms: now_ms(),
                });
            }
            !known
        })
    }

    /// Notes the value a knob now has.
    pub fn note_applied(
        &mut self,
        target: &Target,
        knob: &str,
        value: KnobValue,
    ) -> Result<(), JournalError> {
        self.update(|entries| {
            match entries
                .iter_mut()
                .find(|e| &e.target == target && e.knob == knob)
            {
                Some(e) => {
                    e.applied = Some(value.clone());
                    true
                }
                None => false,
            }
        })
    }

    /// Drops a knob (its original is back in force).
    pub fn forget(&mut self, target: &Target, knob: &str) -> Result<(), JournalError> {
        self.update(|entries| {
            let before = entries.len();
            entries.retain(|e| !(&e.target == target && e.knob == knob));
            entries.len() != before
        })
    }

    /// Reads the journal again from disk (another `Journal` may have changed it).
    pub fn reload(&mut self) -> Result<(), JournalError> {
        self.entries = read_entries(&self.path)?;
        Ok(())
    }

    /// Writes the journal atomically (temporary file, fsync, rename, fsync of the directory);
    /// an empty journal removes the file.
    fn save(&self) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().expect("journal path has a parent");
        if self.entries.is_empty() {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
            return Ok(());
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&File {
            entries: self.entries.clone(),
        })
        .expect("journal serializes");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&text).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_journals_on_one_file_keep_each_others_entries() {
        // As enlightd has it: one journal per tuned device, all opened before any change.
        let dir = tempfile::tempdir().unwrap();
        let mut nic_side = Journal::open(dir.path()).unwrap();
        let mut disk_side = Journal::open(dir.path()).unwrap();
        let eth = nic("eth0");
        let vda = Target::Block { disk: "vda".into() };
        nic_side
            .record_original(&eth, "rx_usecs", KnobValue::U32(3))
            .unwrap();
        disk_side
            .record_original(&vda, "nr_requests", KnobValue::U32(256))
            .unwrap();
        nic_side
            .note_applied(&eth, "rx_usecs", KnobValue::U32(0))
            .unwrap();
        let on_disk = Journal::open(dir.path()).unwrap();
        assert_eq!(on_disk.entries().len(), 2, "{:?}", on_disk.entries());
        assert_eq!(
            on_disk.original(&vda, "nr_requests"),
            Some(KnobValue::U32(256))
        );
        // Forgetting one keeps the other's.
        nic_side.forget(&eth, "rx_usecs").unwrap();
        let on_disk = Journal::open(dir.path()).unwrap();
        assert_eq!(on_disk.entries().len(), 1);
        disk_side.forget(&vda, "nr_requests").unwrap();
        assert!(!journal_path(dir.path()).exists());
        // A forget on a runtime directory with no journal creates nothing.
        let empty = tempfile::tempdir().unwrap();
        Journal::open(empty.path())
            .unwrap()
            .forget(&vda, "nr_requests")
            .unwrap();
        assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
    }

    fn nic(iface: &str) -> Target {
        Target::Nic {
            iface: iface.into(),
            netns: None,
        }
    }

    #[test]
    fn the_first_original_is_kept_and_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(j.entries().is_empty());
        j.record_original(&nic("eth9"), "rx_frames", KnobValue::U32(1))
            .unwrap();
        j.note_applied(&nic("eth9"), "rx_frames", KnobValue::U32(16))
            .unwrap();
        // A second change of the same knob does not overwrite the original.
        j.record_original(&nic("eth9"), "rx_frames", KnobValue::U32(16))
            .unwrap();
        j.record_original(
            &Target::Block {
                disk: "loop7".into(),
            },
            "read_ahead_kb",
            KnobValue::U32(128),
        )
        .unwrap();
        j.record_original(&nic("eth9"), "adaptive_rx", KnobValue::Bool(false))
            .unwrap();
        j.record_original(
            &Target::Block {
                disk: "loop7".into(),
            },
            "scheduler",
            KnobValue::Text("none".into()),
        )
        .unwrap();
        drop(j);
        // As if the daemon had been killed: a new process reads what is on disk.
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.entries().len(), 4);
        assert_eq!(
            j.original(
                &Target::Block {
                    disk: "loop7".into()
                },
                "scheduler"
            ),
            Some(KnobValue::Text("none".into()))
        );
        assert_eq!(
            j.original(&nic("eth9"), "rx_frames"),
            Some(KnobValue::U32(1))
        );
        assert_eq!(j.entries()[0].applied, Some(KnobValue::U32(16)));
        assert_eq!(
            j.original(&nic("eth9"), "adaptive_rx"),
            Some(KnobValue::Bool(false))
        );
    }

    /// A per-NAPI timer past u32 round-trips through the file; a small one reads back as U32.
    #[test]
    fn large_numbers_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let big = KnobValue::number(5_000_000_000);
        assert_eq!(big, KnobValue::U64(5_000_000_000));
        j.record_original(&nic("eth9"), "napi8193/irq_suspend_timeout", big.clone())
            .unwrap();
        j.record_original(
            &nic("eth9"),
            "napi8193/gro_flush_timeout",
            KnobValue::number(20_000),
        )
        .unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(
            j.original(&nic("eth9"), "napi8193/irq_suspend_timeout"),
            Some(big)
        );
        assert_eq!(
            j.original(&nic("eth9"), "napi8193/gro_flush_timeout"),
            Some(KnobValue::U32(20_000))
        );
        assert_eq!(KnobValue::Text("x".into()).as_u64(), None);
    }

    #[test]
    fn forgetting_everything_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.record_original(&nic("eth9"), "rx_usecs", KnobValue::U32(0))
            .unwrap();
        assert!(journal_path(dir.path()).exists());
        j.forget(&nic("eth9"), "rx_usecs").unwrap();
        assert!(!journal_path(dir.path()).exists());
    }

    #[test]
    fn a_corrupt_journal_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal_path(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{\"entries\": [ {\"tar").unwrap();
        let e = Journal::open(dir.path()).unwrap_err();
        assert!(matches!(e, JournalError::Corrupt { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"entries\": [ {\"tar");
    }
}
