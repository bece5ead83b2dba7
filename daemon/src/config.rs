//! enlightd's configuration: a TOML file (every table rejects unknown keys, naming them) plus
//! command-line flags that override it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of /metrics and the JSON API.
    pub listen: SocketAddr,
    /// Device registry directory.
    pub runtime_dir: PathBuf,
    /// How often the maps are read, in milliseconds.
    pub interval_ms: u64,
    /// How long a vanished device's final figures stay on /metrics, in seconds.
    pub device_grace_secs: u64,
    /// The window of the peak gauges (`enlight_io_peak_*`), in seconds: at least the longest
    /// scrape interval of any Prometheus that scrapes this daemon.
    pub peak_window_secs: u64,
    /// The tuner (`[tuner]`, docs/tuner.md).
    pub tuner: crate::tuner::config::TunerConfig,
    /// The running kernel's own devices (`[kernel]`, docs/kernel.md).
    pub kernel: crate::kernel::KernelConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            runtime_dir: enlight_driver::registry::runtime_dir(),
            interval_ms: 1000,
            device_grace_secs: 30,
            peak_window_secs: DEFAULT_PEAK_WINDOW_SECS,
            tuner: crate::tuner::config::TunerConfig::default(),
            kernel: crate::kernel::KernelConfig::default(),
        }
    }
}

/// The default of `peak_window_secs`: Prometheus's own default scrape interval (1 m).
pub const DEFAULT_PEAK_WINDOW_SECS: u64 = 60;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys are named).
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.into(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.message().to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(50..=60_000).contains(&self.interval_ms) {
            return Err(ConfigError::Invalid(format!(
                "interval_ms = {} is outside 50..=60000",
                self.interval_ms
            )));
        }
        if self.device_grace_secs > 86_400 {
            return Err(ConfigError::Invalid(format!(
                "device_grace_secs = {} is over a day",
                self.device_grace_secs
            )));
        }
        if !(1..=3600).contains(&self.peak_window_secs) {
            return Err(ConfigError::Invalid(format!(
                "peak_window_secs = {} is outside 1..=3600",
                self.peak_window_secs
            )));
        }
        self.tuner.validate().map_err(ConfigError::Invalid)?;
        if self.runtime_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("runtime_dir is empty".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// packaging/enlightd.toml, the package's /etc/enlight/enlightd.toml, lists every key with
    /// its default: it parses, it gives the defaults (but for the service's directories), and
    /// no key of the configuration is missing from it.
    #[test]
    fn the_packaged_configuration_lists_every_key_with_its_default() {
        let text = include_str!("../../packaging/enlightd.toml");
        let shipped = Config::parse(text).unwrap();
        let mut expected = Config {
            runtime_dir: "/run/enlight".into(),
            ..Config::default()
        };
        expected.tuner.audit_log = Some("/var/lib/enlight/tuner-audit.jsonl".into());
        assert_eq!(shipped, expected);
        fn keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    let key = format!("{prefix}{k}");
                    keys(&format!("{key}."), v, out);
                    out.push(key);
                }
            }
        }
        let (mut all, mut listed) = (Vec::new(), Vec::new());
        keys("", &toml::Value::try_from(&shipped).unwrap(), &mut all);
        keys(
            "",
            &toml::from_str::<toml::Value>(text).unwrap(),
            &mut listed,
        );
        // Per-device overrides are a table of devices, shown commented out below.
        let missing: Vec<&String> = all
            .iter()
            .filter(|k| !listed.contains(k) && *k != "tuner.devices")
            .collect();
        assert!(
            missing.is_empty(),
            "keys missing from the packaged file: {missing:?}"
        );
        for key in [
            "[tuner.devices.disk0]",
            "mode",
            "objective",
            "slo_p99_us",
            "pinned",
        ] {
            assert!(text.contains(&format!("# {key}")), "{key} not shown");
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn values_are_read() {
        let c = Config::parse(
            "listen = \"127.0.0.1:0\"\ninterval_ms = 200\nruntime_dir = \"/tmp/x\"\n",
        )
        .unwrap();
        assert_eq!(c.interval_ms, 200);
        assert_eq!(c.runtime_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.listen.port(), 0);
    }

    #[test]
    fn the_kernel_section_is_read_and_checked() {
        let c = Config::parse("[kernel]\nenabled = true\ntune = [\"eth1\"]\ndry_run = false\n")
            .unwrap();
        assert!(c.kernel.enabled && !c.kernel.dry_run);
        assert_eq!(c.kernel.tune, ["eth1"]);
        assert!(c.kernel.restore_on_exit, "default");
        let d = Config::default();
        assert!(
            !d.kernel.enabled && d.kernel.dry_run,
            "opt-in, and recommend-only by default"
        );
        let e = Config::parse("[kernel]\ntunes = [\"eth1\"]\n").unwrap_err();
        assert!(e.to_string().contains("tunes"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse("listen = \"127.0.0.1:9\"\nintervall_ms = 5\n").unwrap_err();
        assert!(e.to_string().contains("intervall_ms"), "{e}");
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Config::parse("interval_ms = 1")
            .unwrap_err()
            .to_string()
            .contains("interval_ms"));
        assert!(Config::parse("listen = \"nowhere\"").is_err());
        assert!(Config::parse("interval_ms = \"fast\"").is_err());
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("enlightd.toml");
        std::fs::write(&p, "bogus = 1").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("enlightd.toml") && e.contains("bogus"), "{e}");
        assert!(Config::load(&dir.path().join("missing.toml")).is_err());
    }
}
