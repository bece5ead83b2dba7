//! The device registry: how running devices announce themselves to enlightd.
//!
//! A device process writes `<runtime dir>/devices/<name>.json` (atomically: a temporary file,
//! then a rename) when its device starts and removes it on exit. Readers skip records whose
//! process is gone (a device killed with SIGKILL leaves its file behind) and report malformed
//! files without failing the others.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::settings::DeviceSettings;

/// Environment variable overriding the runtime directory.
pub const RUNTIME_DIR_ENV: &str = "ENLIGHT_RUNTIME_DIR";
/// Default runtime directory.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/enlight";

/// One running device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// Unique device name (`[A-Za-z0-9_.-]`, at most 64 characters).
    pub name: String,
    /// Device type: `disk` (later `nic`).
    pub device: String,
    /// `synthetic` or `emulated`.
    pub kind: String,
    /// The device's id inside its process: the `dev` argument of its USDT probes.
    pub dev_id: u32,
    /// The process serving the device.
    pub pid: u32,
    /// The executable carrying the device's USDT probes.
    pub exe: PathBuf,
    /// When the device started (Unix time, ms).
    pub started_unix_ms: u64,
    /// Current settings (rewritten on every change applied through the control socket).
    pub settings: DeviceSettings,
    /// The device's control socket (contract 4), if it serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<PathBuf>,
}

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The device name would not make a safe file name.
    #[error(
        "invalid device name {0:?}: use 1-64 characters from [A-Za-z0-9_.-], not starting with '.'"
    )]
    BadName(String),
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A record that does not parse.
    #[error("{path}: malformed device record: {source}")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The runtime directory: `$ENLIGHT_RUNTIME_DIR`, else `/run/enlight`.
pub fn runtime_dir() -> PathBuf {
    std::env::var_os(RUNTIME_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR))
}

fn devices_dir(dir: &Path) -> PathBuf {
    dir.join("devices")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// A registered device; the record is removed when this is dropped.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
}

impl Registration {
    /// Writes `record` into `dir` atomically.
    pub fn register(dir: &Path, record: &DeviceRecord) -> Result<Registration, RegistryError> {
        if !valid_name(&record.name) {
            return Err(RegistryError::BadName(record.name.clone()));
        }
        let devices = devices_dir(dir);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RegistryError::Io { path, source }
        };
        std::fs::create_dir_all(&devices).map_err(io(&devices))?;
        let path = devices.join(format!("{}.json", record.name));
        let tmp = devices.join(format!(".{}.json.tmp", record.name));
        let body = serde_json::to_vec_pretty(record).expect("a DeviceRecord always serialises");
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&body)
            .and_then(|_| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(Registration { path })
    }

    /// Rewrites the record (e.g. after a settings change).
    pub fn update(&self, record: &DeviceRecord) -> Result<(), RegistryError> {
        let dir = self
            .path
            .parent()
            .and_then(Path::parent)
            .expect("registered under <dir>/devices");
        std::mem::forget(Registration::register(dir, record)?);
        Ok(())
    }

    /// Path of the record file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a process exists.
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 performs only the existence and permission check.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Lists the records of live devices in `dir`, sorted by name, with one error per unreadable or
/// malformed file. A missing directory means no devices.
pub fn list(dir: &Path) -> (Vec<DeviceRecord>, Vec<RegistryError>) {
    let devices = devices_dir(dir);
    let mut records = Vec::new();
    let mut errors = Vec::new();
    let entries = match std::fs::read_dir(&devices) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (records, errors),
        Err(source) => {
            errors.push(RegistryError::Io {
                path: devices,
                source,
            });
            return (records, errors);
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<DeviceRecord>(&bytes) {
                Ok(r) if pid_alive(r.pid) => records.push(r),
                Ok(_) => {}
                Err(source) => errors.push(RegistryError::Malformed { path, source }),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // removed meanwhile
            Err(source) => errors.push(RegistryError::Io { path, source }),
        }
    }
    records.sort_by(|a, b| a.name.cmp(&b.name));
    (records, errors)
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, pid: u32) -> DeviceRecord {
        DeviceRecord {
            name: name.into(),
            device: "disk".into(),
            kind: "synthetic".into(),
            dev_id: 0,
            pid,
            exe: "/bin/true".into(),
            started_unix_ms: now_unix_ms(),
            settings: DeviceSettings::default(),
            control: None,
        }
    }

    #[test]
    fn register_list_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let reg = Registration::register(dir.path(), &record("disk0", me)).unwrap();
        let _dead =
            Registration::register(dir.path(), &record("gone", i32::MAX as u32 - 1)).unwrap();
        std::fs::write(dir.path().join("devices/bad.json"), b"{not json").unwrap();
        let (records, errors) = list(dir.path());
        assert_eq!(
            records,
            vec![record("disk0", me)]
                .into_iter()
                .map(|mut r| {
                    r.started_unix_ms = records[0].started_unix_ms;
                    r
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("bad.json"), "{}", errors[0]);
        drop(reg);
        assert!(list(dir.path()).0.is_empty());
    }

    #[test]
    fn hostile_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["../x", "", ".hidden", "a/b", "x".repeat(65).as_str()] {
            assert!(
                matches!(
                    Registration::register(dir.path(), &record(name, 1)),
                    Err(RegistryError::BadName(_))
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn missing_directory_means_no_devices() {
        let (r, e) = list(Path::new("/nonexistent/enlight"));
        assert!(r.is_empty() && e.is_empty());
    }
}
