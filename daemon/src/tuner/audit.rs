//! The audit log: one JSON object per decision per line ([`super::Decision`]), appended, so
//! `jq` or a log shipper can follow it. A write failure is reported to the caller (counted in
//! enlightd's errors) and never stops tuning.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::Decision;

/// An append-only JSON-lines file.
pub struct AuditLog {
    path: PathBuf,
    file: File,
}

impl AuditLog {
    /// Opens (creating it and its directory if needed) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one decision as one line (a single write, so lines never interleave).
    pub fn record(&mut self, decision: &Decision) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(decision).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)
    }
}

/// Reads an audit log back (tests, tools): every line that parses.
pub fn read(path: &Path) -> std::io::Result<Vec<Decision>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuner::Action;
    use enlight_driver::settings::DeviceSettings;

    #[test]
    fn decisions_are_appended_one_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.jsonl");
        let d = Decision {
            ts_unix_ms: 1,
            device: "disk0".into(),
            action: Action::Change,
            from: DeviceSettings::default(),
            to: DeviceSettings {
                poll_budget: 32,
                ..DeviceSettings::default()
            },
            reason: "a reason\nwith a newline".into(),
            objective_value: Some(0.5),
        };
        let mut log = AuditLog::open(&path).unwrap();
        log.record(&d).unwrap();
        drop(log);
        AuditLog::open(&path).unwrap().record(&d).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert_eq!(read(&path).unwrap(), vec![d.clone(), d]);
    }
}
