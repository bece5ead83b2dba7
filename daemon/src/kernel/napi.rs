//! NAPI moderation per interface, through sysfs: `/sys/class/net/<if>/napi_defer_hard_irqs`
//! and `/sys/class/net/<if>/gro_flush_timeout`. Every netdev has them (since 5.10 and 3.19), so
//! this moderation works where a driver has no interrupt coalescing (`hv_netvsc`, `virtio_net`
//! without `VIRTIO_NET_F_NOTF_COAL`, `veth`): with `napi_defer_hard_irqs` = N > 0 and a non-zero
//! `gro_flush_timeout`, NAPI keeps the device's interrupt masked for up to N empty polls, a
//! timer of `gro_flush_timeout` ns re-polling it instead.
//!
//! A write sets the value for the device and every NAPI instance it has (the kernel copies it
//! into each `napi_struct`); per-instance values go through the `netdev` generic netlink
//! family instead. Kernels of every version have the sysfs files, so this path also serves
//! guests whose kernel lacks the netdev family's NAPI operations (before 6.13).

use std::path::{Path, PathBuf};

/// The NAPI knobs in sysfs.
pub const NAPI_KNOBS: [&str; 2] = ["napi_defer_hard_irqs", "gro_flush_timeout"];

/// The largest `napi_defer_hard_irqs` the kernel accepts (`S32_MAX`).
pub const DEFER_MAX: u64 = i32::MAX as u64;
/// The largest `gro_flush_timeout` enlight writes, ns: the kernel takes any `unsigned long`,
/// but a timer of more than a second between polls would stall a NIC; 10 ms is far past any
/// useful moderation.
pub const GRO_FLUSH_MAX_NS: u64 = 10_000_000;

/// Why a NAPI sysfs knob could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NapiError {
    /// Not one of [`NAPI_KNOBS`].
    #[error(
        "unknown NAPI knob {knob:?} on {iface} (known: napi_defer_hard_irqs, gro_flush_timeout)"
    )]
    UnknownKnob { iface: String, knob: String },
    /// No such interface.
    #[error("no network interface {0}")]
    NoSuchDevice(String),
    /// The interface has no such file (a kernel before the knob existed).
    #[error("{knob} on {iface}: not supported by driver {driver} (the kernel has no {path})")]
    Unsupported {
        iface: String,
        driver: String,
        knob: String,
        path: PathBuf,
    },
    /// Out of the range enlight writes.
    #[error("{iface} (driver {driver}): {knob} = {value} is out of range ({min}..={max})")]
    OutOfRange {
        iface: String,
        driver: String,
        knob: String,
        value: u64,
        min: u64,
        max: u64,
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

/// NAPI knobs of interfaces under a sysfs root (normally `/sys`, the daemon's own network
/// namespace: sysfs shows the namespace of whoever mounted it).
#[derive(Debug, Clone)]
pub struct NapiSysfs {
    sysfs: PathBuf,
}

impl Default for NapiSysfs {
    fn default() -> Self {
        NapiSysfs::at("/sys")
    }
}

/// The range of `knob` enlight accepts.
pub fn range(knob: &str) -> Option<(u64, u64)> {
    match knob {
        "napi_defer_hard_irqs" => Some((0, DEFER_MAX)),
        "gro_flush_timeout" => Some((0, GRO_FLUSH_MAX_NS)),
        _ => None,
    }
}

impl NapiSysfs {
    /// Interfaces under `sysfs`.
    pub fn at(sysfs: impl Into<PathBuf>) -> Self {
        NapiSysfs {
            sysfs: sysfs.into(),
        }
    }

    fn file(&self, iface: &str, knob: &str) -> Result<PathBuf, NapiError> {
        if range(knob).is_none() {
            return Err(NapiError::UnknownKnob {
                iface: iface.into(),
                knob: knob.into(),
            });
        }
        if iface.is_empty() || iface.contains('/') || iface.starts_with('.') {
            return Err(NapiError::NoSuchDevice(iface.into()));
        }
        let dir = self.sysfs.join("class/net").join(iface);
        if !dir.exists() {
            return Err(NapiError::NoSuchDevice(iface.into()));
        }
        let path = dir.join(knob);
        if !path.exists() {
            return Err(NapiError::Unsupported {
                iface: iface.into(),
                driver: self.driver(iface),
                knob: knob.into(),
                path,
            });
        }
        Ok(path)
    }

    fn driver(&self, iface: &str) -> String {
        std::fs::read_link(
            self.sysfs
                .join("class/net")
                .join(iface)
                .join("device/driver"),
        )
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| super::ethtool::driver_name(iface))
    }

    fn read(path: &Path) -> Result<u64, NapiError> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                NapiError::NoSuchDevice(
                    path.parent()
                        .and_then(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                )
            } else {
                NapiError::Io {
                    path: path.into(),
                    source,
                }
            }
        })?;
        text.trim().parse().map_err(|_| NapiError::Parse {
            path: path.into(),
            text: text.trim().into(),
        })
    }

    /// The value of `knob` on `iface`.
    pub fn get(&self, iface: &str, knob: &str) -> Result<u64, NapiError> {
        Self::read(&self.file(iface, knob)?)
    }

    /// Both knobs of `iface` (those the kernel has).
    pub fn all(&self, iface: &str) -> Vec<(&'static str, u64)> {
        NAPI_KNOBS
            .iter()
            .filter_map(|k| self.get(iface, k).ok().map(|v| (*k, v)))
            .collect()
    }

    /// Checks `value` for `knob` on `iface` without writing: the interface has the knob and the
    /// value is in range.
    pub fn check(&self, iface: &str, knob: &str, value: u64) -> Result<(), NapiError> {
        self.file(iface, knob)?;
        let (min, max) = range(knob).expect("file() checked the name");
        if !(min..=max).contains(&value) {
            return Err(NapiError::OutOfRange {
                iface: iface.into(),
                driver: self.driver(iface),
                knob: knob.into(),
                value,
                min,
                max,
            });
        }
        Ok(())
    }

    /// Writes `value` to `knob` on `iface` after [`NapiSysfs::check`]; returns the value the
    /// kernel reports afterwards.
    pub fn set(&self, iface: &str, knob: &str, value: u64) -> Result<u64, NapiError> {
        self.check(iface, knob, value)?;
        self.put_back(iface, knob, value)
    }

    /// Writes an original value back (journal restore): the knob must exist, but the value is
    /// whatever the kernel had, even beyond the range enlight itself writes.
    pub fn put_back(&self, iface: &str, knob: &str, value: u64) -> Result<u64, NapiError> {
        let path = self.file(iface, knob)?;
        std::fs::write(&path, format!("{value}\n")).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::ENODEV)
            {
                NapiError::NoSuchDevice(iface.into())
            } else {
                NapiError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Self::read(&path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_nic(root: &Path, iface: &str) {
        let d = root.join("class/net").join(iface);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("napi_defer_hard_irqs"), "0\n").unwrap();
        std::fs::write(d.join("gro_flush_timeout"), "0\n").unwrap();
    }

    #[test]
    fn reads_checks_and_writes_napi_knobs() {
        let dir = tempfile::tempdir().unwrap();
        fake_nic(dir.path(), "eth9");
        let n = NapiSysfs::at(dir.path());
        assert_eq!(n.all("eth9").len(), 2);
        assert_eq!(n.set("eth9", "gro_flush_timeout", 20_000).unwrap(), 20_000);
        assert_eq!(n.get("eth9", "gro_flush_timeout").unwrap(), 20_000);
        let e = n.set("eth9", "gro_flush_timeout", GRO_FLUSH_MAX_NS + 1);
        assert!(matches!(e, Err(NapiError::OutOfRange { .. })), "{e:?}");
        // Nothing half-applied: the refused value never reached the file.
        assert_eq!(n.get("eth9", "gro_flush_timeout").unwrap(), 20_000);
        assert!(matches!(
            n.get("eth9", "rx_usecs"),
            Err(NapiError::UnknownKnob { .. })
        ));
        assert!(matches!(
            n.get("nope0", "gro_flush_timeout"),
            Err(NapiError::NoSuchDevice(_))
        ));
        assert!(matches!(
            n.get("../x", "gro_flush_timeout"),
            Err(NapiError::NoSuchDevice(_))
        ));
        std::fs::remove_file(dir.path().join("class/net/eth9/napi_defer_hard_irqs")).unwrap();
        let e = n.set("eth9", "napi_defer_hard_irqs", 2).unwrap_err();
        assert!(
            e.to_string()
                .contains("napi_defer_hard_irqs on eth9: not supported by driver"),
            "{e}"
        );
    }
}
