//! The device registry: how running devices announce themselves to enlightd.
//!
//! A device process writes `<runtime dir>/devices/<name>.json` (atomically: a temporary file,
//! then a rename) when its device starts and removes it on exit. A record names its process by
//! pid *and* start time (field 22 of `/proc/<pid>/stat`), so a pid the kernel has since given to
//! another process does not pass for the device. Readers skip the records of processes that are
//! gone (a device killed with SIGKILL leaves its file behind) and report malformed files without
//! failing the others; [`scan`] also returns those stale records, and [`remove_stale`] deletes
//! one with its control socket (enlightd does so on discovery, and a device starting under the
//! same name does so first).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::settings::DeviceSettings;
pub use enlight_abi::DeviceKind;

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
    /// `synthetic` or `emulated` (a string on the wire; one this build does not know is kept as
    /// [`DeviceKind::Other`]).
    pub kind: DeviceKind,
    /// The device's id inside its process: the `dev` argument of its USDT probes.
    pub dev_id: u32,
    /// The process serving the device.
    pub pid: u32,
    /// That process's start time, in clock ticks since boot (field 22 of `/proc/<pid>/stat`):
    /// with the pid, what identifies the process. Absent in records written before it existed;
    /// [`Registration::register`] fills it in when the writer left it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start_time: Option<u64>,
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
    /// Another live process already serves a device of this name.
    #[error("a device named {name:?} is already running (pid {pid}); pick another --name")]
    NameInUse { name: String, pid: u32 },
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
    /// Writes `record` into `dir` atomically, filling in the process's start time if the record
    /// lacks it. A record of the same name whose process still runs is not replaced
    /// ([`RegistryError::NameInUse`]); one whose process is gone is removed first, with its
    /// control socket.
    pub fn register(dir: &Path, record: &DeviceRecord) -> Result<Registration, RegistryError> {
        if !valid_name(&record.name) {
            return Err(RegistryError::BadName(record.name.clone()));
        }
        let mut record = record.clone();
        if record.pid_start_time.is_none() {
            record.pid_start_time = start_time_of(record.pid);
        }
        let path = devices_dir(dir).join(format!("{}.json", record.name));
        if let Ok(Some(existing)) = read_record(&path) {
            let same_process =
                existing.pid == record.pid && existing.pid_start_time == record.pid_start_time;
            if !same_process {
                if existing.process_alive() {
                    return Err(RegistryError::NameInUse {
                        name: record.name.clone(),
                        pid: existing.pid,
                    });
                }
                remove_stale(dir, &existing)?;
            }
        }
        write_record(dir, &record)?;
        Ok(Registration { path })
    }

    /// Rewrites the record (e.g. after a settings change).
    pub fn update(&self, record: &DeviceRecord) -> Result<(), RegistryError> {
        let dir = self
            .path
            .parent()
            .and_then(Path::parent)
            .expect("registered under <dir>/devices");
        let mut record = record.clone();
        if record.pid_start_time.is_none() {
            record.pid_start_time = start_time_of(record.pid);
        }
        write_record(dir, &record)
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

/// Writes `<dir>/devices/<name>.json` atomically (a temporary file, then a rename).
fn write_record(dir: &Path, record: &DeviceRecord) -> Result<(), RegistryError> {
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
    Ok(())
}

/// The record at `path`: `Ok(None)` if there is none.
fn read_record(path: &Path) -> Result<Option<DeviceRecord>, RegistryError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| RegistryError::Malformed {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RegistryError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The start time of process `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`),
/// or `None` if there is no such process.
pub fn start_time_of(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces and parentheses: count
    // the fields from the last ')'. Field 3 (the state) is the first after it, 22 the 20th.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl DeviceRecord {
    /// Whether the process this record names still runs: its pid exists and has the recorded
    /// start time (a pid the kernel gave to a new process since has another). A record without
    /// a start time (written by an older enlight) is checked by its executable instead.
    pub fn process_alive(&self) -> bool {
        if !pid_alive(self.pid) {
            return false;
        }
        match self.pid_start_time {
            Some(t) => start_time_of(self.pid) == Some(t),
            None => match std::fs::read_link(format!("/proc/{}/exe", self.pid)) {
                Ok(exe) => {
                    let recorded = self.exe.canonicalize().unwrap_or_else(|_| self.exe.clone());
                    exe == recorded
                }
                // Not ours to read (another user's process): the pid check is all there is.
                Err(_) => true,
            },
        }
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

/// What [`scan`] finds in a runtime directory.
#[derive(Debug, Default)]
pub struct Scan {
    /// Records of running devices, sorted by name.
    pub live: Vec<DeviceRecord>,
    /// Records whose process is gone (or whose pid now belongs to another process).
    pub stale: Vec<DeviceRecord>,
    /// One error per unreadable or malformed file.
    pub errors: Vec<RegistryError>,
}

/// Lists the records of live devices in `dir`, sorted by name, with one error per unreadable or
/// malformed file. A missing directory means no devices.
pub fn list(dir: &Path) -> (Vec<DeviceRecord>, Vec<RegistryError>) {
    let scan = scan(dir);
    (scan.live, scan.errors)
}

/// Every record in `dir`, live and stale ([`DeviceRecord::process_alive`]).
pub fn scan(dir: &Path) -> Scan {
    let devices = devices_dir(dir);
    let mut scan = Scan::default();
    let entries = match std::fs::read_dir(&devices) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return scan,
        Err(source) => {
            scan.errors.push(RegistryError::Io {
                path: devices,
                source,
            });
            return scan;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        match read_record(&path) {
            Ok(Some(r)) if r.process_alive() => scan.live.push(r),
            Ok(Some(r)) => scan.stale.push(r),
            Ok(None) => {} // removed meanwhile
            Err(e) => scan.errors.push(e),
        }
    }
    scan.live.sort_by(|a, b| a.name.cmp(&b.name));
    scan.stale.sort_by(|a, b| a.name.cmp(&b.name));
    scan
}

/// Removes a stale record (see [`scan`]) and its control socket. The file is removed only if it
/// still holds that record (a device that re-registered under the name meanwhile keeps its
/// own), the socket only if nobody answers on it. Returns whether the record was removed.
pub fn remove_stale(dir: &Path, record: &DeviceRecord) -> Result<bool, RegistryError> {
    if !valid_name(&record.name) {
        return Err(RegistryError::BadName(record.name.clone()));
    }
    let path = devices_dir(dir).join(format!("{}.json", record.name));
    match read_record(&path) {
        Ok(Some(now)) if now.pid == record.pid && now.pid_start_time == record.pid_start_time => {}
        _ => return Ok(false),
    }
    if record.process_alive() {
        return Ok(false);
    }
    if let Some(socket) = &record.control {
        let is_socket = std::fs::symlink_metadata(socket)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        if is_socket && std::os::unix::net::UnixStream::connect(socket).is_err() {
            match std::fs::remove_file(socket) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(RegistryError::Io {
                        path: socket.clone(),
                        source,
                    })
                }
            }
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(RegistryError::Io { path, source }),
    }
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
            kind: DeviceKind::Synthetic,
            dev_id: 0,
            pid,
            pid_start_time: None,
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
                    r.pid_start_time = start_time_of(me);
                    r
                })
                .collect::<Vec<_>>()
        );
        assert!(records[0].pid_start_time.is_some(), "filled in by register");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("bad.json"), "{}", errors[0]);
        drop(reg);
        assert!(list(dir.path()).0.is_empty());
    }

    /// A `sleep` child: a live process that is not this one.
    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap()
    }

    fn write_json(dir: &Path, name: &str, json: serde_json::Value) {
        std::fs::create_dir_all(dir.join("devices")).unwrap();
        std::fs::write(dir.join(format!("devices/{name}.json")), json.to_string()).unwrap();
    }

    #[test]
    fn a_reused_pid_is_not_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut other = sleeper();
        let pid = other.id();
        let start = start_time_of(pid).unwrap();
        let sleep_exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        let base = serde_json::json!({
            "name": "x", "device": "disk", "kind": "synthetic", "dev_id": 0, "pid": pid,
            "exe": "/bin/true", "started_unix_ms": 0, "settings": DeviceSettings::default(),
        });
        // The device that wrote this started at another time: the pid is someone else's now.
        let mut reused = base.clone();
        reused["name"] = "reused".into();
        reused["pid_start_time"] = (start + 1).into();
        write_json(dir.path(), "reused", reused);
        // Records written before start times existed stay readable: the executable decides.
        let mut old_other = base.clone();
        old_other["name"] = "old_other".into();
        write_json(dir.path(), "old_other", old_other);
        let mut old_same = base.clone();
        old_same["name"] = "old_same".into();
        old_same["exe"] = sleep_exe.to_string_lossy().into_owned().into();
        write_json(dir.path(), "old_same", old_same);
        let scan = scan(dir.path());
        assert!(scan.errors.is_empty(), "{:?}", scan.errors);
        let names = |v: &[DeviceRecord]| v.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&scan.live), ["old_same"]);
        assert_eq!(names(&scan.stale), ["old_other", "reused"]);
        assert_eq!(names(&list(dir.path()).0), ["old_same"]);
        for r in &scan.stale {
            assert!(remove_stale(dir.path(), r).unwrap(), "{}", r.name);
        }
        assert!(!dir.path().join("devices/reused.json").exists());
        assert!(dir.path().join("devices/old_same.json").exists());
        let _ = other.kill();
        let _ = other.wait();
    }

    #[test]
    fn a_dead_devices_record_and_socket_go_and_its_name_is_free_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id();
        let start = start_time_of(pid);
        gone.wait().unwrap();
        let socket = dir.path().join("control/d.sock");
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let dead = DeviceRecord {
            pid,
            pid_start_time: start,
            control: Some(socket.clone()),
            ..record("d", pid)
        };
        write_record(dir.path(), &dead).unwrap();
        let scan = scan(dir.path());
        assert_eq!((scan.live.len(), scan.stale.len()), (0, 1));
        // A device starting under the same name removes the leftovers first.
        let me = std::process::id();
        let reg = Registration::register(dir.path(), &record("d", me)).unwrap();
        assert!(!socket.exists(), "the dead device's socket is removed");
        assert_eq!(list(dir.path()).0[0].pid, me);
        // And the record of a live device is neither replaced nor removed.
        let mut other = sleeper();
        let e = Registration::register(dir.path(), &record("d", other.id())).unwrap_err();
        assert!(
            matches!(e, RegistryError::NameInUse { pid, .. } if pid == me),
            "{e}"
        );
        assert!(!remove_stale(dir.path(), &list(dir.path()).0[0]).unwrap());
        drop(reg);
        // A stale record of the same name written meanwhile is not removed in its place.
        write_record(dir.path(), &dead).unwrap();
        let newer = DeviceRecord {
            pid_start_time: start.map(|s| s + 1),
            ..dead.clone()
        };
        assert!(!remove_stale(dir.path(), &newer).unwrap());
        assert!(remove_stale(dir.path(), &dead).unwrap());
        let _ = other.kill();
        let _ = other.wait();
    }

    #[test]
    fn start_times_are_read_from_proc() {
        let me = start_time_of(std::process::id()).unwrap();
        assert!(me > 0);
        assert_eq!(start_time_of(std::process::id()), Some(me), "stable");
        assert_eq!(start_time_of(0), None);
        assert_eq!(start_time_of(i32::MAX as u32 - 1), None);
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
