//! enlightd's configuration: a TOML file (every table rejects unknown keys, naming them) plus
//! command-line flags that override it.
//!
//! Every error names the key, the line and what the key accepts. The mechanism is general, so
//! a key added to any section gets it without code of its own:
//! - every key has a [`KeySpec`] (its dotted path and what it accepts: an integer range or a
//!   description) in its section's `KEYS` table ([`KEYS`], `tuner::config::KEYS`,
//!   `kernel::KEYS`); a unit test fails for a field that has none;
//! - a type error comes out of serde with the key's path (`serde_path_to_error`) and the
//!   offending value's place in the file (the toml crate's span);
//! - a range error comes out of a section's `validate` as a [`KeyError`] naming the key (integer
//!   ranges are checked by [`KeySpec::check`] against the same table), and the line is looked up
//!   from the key's path in the parsed document (`toml_edit`'s spans).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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

/// What a key accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepts {
    /// An integer in `min..=max`, in `unit`.
    Int {
        /// Smallest value.
        min: u64,
        /// Largest value.
        max: u64,
        /// What the number counts (`milliseconds`, `percent`).
        unit: &'static str,
    },
    /// Anything else, described.
    Text(&'static str),
}

/// One configuration key: its dotted path (`*` stands for any name, as in
/// `tuner.devices.*.slo_p99_us`) and what it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpec {
    /// `interval_ms`, `tuner.min_improvement_pct`, `tuner.devices.*.mode`.
    pub key: &'static str,
    /// What it accepts.
    pub accepts: Accepts,
}

impl KeySpec {
    /// An integer key.
    pub const fn int(key: &'static str, min: u64, max: u64, unit: &'static str) -> KeySpec {
        KeySpec {
            key,
            accepts: Accepts::Int { min, max, unit },
        }
    }

    /// A key described in words.
    pub const fn text(key: &'static str, accepts: &'static str) -> KeySpec {
        KeySpec {
            key,
            accepts: Accepts::Text(accepts),
        }
    }

    /// What the key accepts, as errors state it.
    pub fn describe(&self) -> String {
        match self.accepts {
            Accepts::Int { min, max, unit } => format!("{min}..={max} ({unit})"),
            Accepts::Text(t) => t.to_string(),
        }
    }

    /// Checks an integer value of this key (`path` is the key as written, e.g. with a device's
    /// name in place of `*`).
    pub fn check(&self, path: &str, value: u64) -> Result<(), KeyError> {
        match self.accepts {
            Accepts::Int { min, max, .. } if !(min..=max).contains(&value) => Err(KeyError {
                key: path.to_string(),
                message: format!("{path} = {value} is outside {}", self.describe()),
            }),
            _ => Ok(()),
        }
    }

    /// Whether `path` (dotted, as written) is this key.
    pub fn matches(&self, path: &str) -> bool {
        let (mut want, mut have) = (self.key.split('.'), path.split('.'));
        loop {
            match (want.next(), have.next()) {
                (None, None) => return true,
                (Some(w), Some(h)) if w == "*" || w == h => {}
                _ => return false,
            }
        }
    }
}

/// The top-level keys (the sections' own: `tuner::config::KEYS`, `kernel::KEYS`).
pub const KEYS: &[KeySpec] = &[
    KeySpec::text(
        "listen",
        "an address and port such as \"127.0.0.1:9464\" (port 0: any free port)",
    ),
    KeySpec::text("runtime_dir", "a directory path, not empty"),
    KeySpec::int("interval_ms", 50, 60_000, "milliseconds"),
    KeySpec::int("device_grace_secs", 0, 86_400, "seconds"),
    KeySpec::int("peak_window_secs", 1, 3600, "seconds"),
    KeySpec::text("tuner", "a table: [tuner] (docs/tuner.md)"),
    KeySpec::text("kernel", "a table: [kernel] (docs/kernel.md)"),
];

/// Every key of every section.
pub fn all_keys() -> impl Iterator<Item = &'static KeySpec> {
    KEYS.iter()
        .chain(crate::tuner::config::KEYS)
        .chain(crate::kernel::KEYS)
}

/// The spec of `path` (dotted, as written).
pub fn spec_of(path: &str) -> Option<&'static KeySpec> {
    all_keys().find(|k| k.matches(path))
}

/// The spec of a key the code names (panics on a key missing from the tables: a bug, which
/// the tests catch).
pub fn spec(key: &str) -> &'static KeySpec {
    spec_of(key).unwrap_or_else(|| panic!("configuration key {key} has no KeySpec"))
}

/// A bad value, found by a section's `validate`: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// The key's dotted path as written (`tuner.devices.disk0.slo_p99_us`).
    pub key: String,
    /// What is wrong, naming the key and the value.
    pub message: String,
}

impl KeyError {
    /// A key whose value is wrong for another reason than its range.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> KeyError {
        KeyError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Where a bad value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A file, at a line when the key is in it.
    File { path: PathBuf, line: Option<usize> },
    /// Defaults or flags (the key was not read from a file).
    Flags,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML at all.
    #[error("config {path}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    /// A key that cannot be used: unknown, of the wrong type, or out of range. Names the key,
    /// the line (for a file) and what the key accepts.
    #[error("{}{message}{}",
        match origin {
            Origin::File { path, line: Some(l) } => format!("config {}, line {l}: ", path.display()),
            Origin::File { path, line: None } => format!("config {}: ", path.display()),
            Origin::Flags => "config: ".to_string(),
        },
        accepts.as_ref().filter(|a| !message.contains(a.as_str()))
            .map(|a| format!(" (accepted: {a})")).unwrap_or_default())]
    Key {
        /// The file and line, or the flags.
        origin: Origin,
        /// The key's dotted path (`[tuner]` for an unknown key in that table).
        key: String,
        /// What is wrong; it names the key.
        message: String,
        /// What the key accepts.
        accepts: Option<String>,
    },
}

impl ConfigError {
    /// The key this error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The line it is about, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Key {
                origin: Origin::File { line, .. },
                ..
            }
            | ConfigError::Syntax { line, .. } => *line,
            _ => None,
        }
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The line where key `path` (dotted) is written in `doc`, if it is.
fn line_of_key(text: &str, doc: &toml_edit::ImDocument<&str>, path: &str) -> Option<usize> {
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut segments = path.split('.').peekable();
    while let Some(seg) = segments.next() {
        let (key, item) = table.get_key_value(seg)?;
        if segments.peek().is_none() {
            let span = key.span().or_else(|| item.span())?;
            return Some(line_of(text, span.start));
        }
        table = item.as_table_like()?;
    }
    None
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse_file(&text, path)
    }

    /// Parses and validates TOML text (errors name the file as `<text>`).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_file(text, Path::new("<text>"))
    }

    fn parse_file(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let doc = toml_edit::ImDocument::parse(text).map_err(|e| ConfigError::Syntax {
            path: path.into(),
            line: e.span().map(|s| line_of(text, s.start)),
            message: e.message().trim().replace('\n', "; "),
        })?;
        let config: Config = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                let line = inner.span().map(|s| line_of(text, s.start));
                let message = inner.message().trim().to_string();
                // An unknown key's path is the unknown key itself: what it accepts is nothing.
                let accepts = if message.starts_with("unknown field") {
                    None
                } else {
                    spec_of(&key).map(KeySpec::describe)
                };
                ConfigError::Key {
                    origin: Origin::File {
                        path: path.into(),
                        line,
                    },
                    message: format!("{key}: {message}"),
                    key,
                    accepts,
                }
            })?;
        config.check().map_err(|e| ConfigError::Key {
            origin: Origin::File {
                path: path.into(),
                line: line_of_key(text, &doc, &e.key),
            },
            accepts: spec_of(&e.key).map(KeySpec::describe),
            key: e.key,
            message: e.message,
        })?;
        Ok(config)
    }

    /// Checks ranges (after flags have overridden the file: errors name the key and what it
    /// accepts, without a line).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(|e| ConfigError::Key {
            origin: Origin::Flags,
            accepts: spec_of(&e.key).map(KeySpec::describe),
            key: e.key,
            message: e.message,
        })
    }

    /// Every section's checks, the first bad key first.
    fn check(&self) -> Result<(), KeyError> {
        spec("interval_ms").check("interval_ms", self.interval_ms)?;
        spec("device_grace_secs").check("device_grace_secs", self.device_grace_secs)?;
        spec("peak_window_secs").check("peak_window_secs", self.peak_window_secs)?;
        if self.runtime_dir.as_os_str().is_empty() {
            return Err(KeyError::new("runtime_dir", "runtime_dir is empty"));
        }
        self.tuner.validate()?;
        self.kernel.validate()?;
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

    /// Issue 12, item 12: a type error names the key, the line and what the key accepts.
    #[test]
    fn a_type_error_names_key_line_and_range() {
        let e = Config::parse("listen = \"127.0.0.1:9\"\n\n[tuner]\nmode = \"auto\"\nmin_improvement_pct = \"lots\"\n")
            .unwrap_err();
        let text = e.to_string();
        assert_eq!(e.key(), Some("tuner.min_improvement_pct"), "{text}");
        assert_eq!(e.line(), Some(5), "{text}");
        assert!(
            text.contains("line 5") && text.contains("0..=99") && text.contains("lots"),
            "{text}"
        );
        let e = Config::parse("interval_ms = -3").unwrap_err();
        assert_eq!((e.key(), e.line()), (Some("interval_ms"), Some(1)), "{e}");
        assert!(e.to_string().contains("50..=60000"), "{e}");
        let e = Config::parse("[tuner.devices.disk0]\nslo_p99_us = 1.5\n").unwrap_err();
        assert_eq!(e.key(), Some("tuner.devices.disk0.slo_p99_us"), "{e}");
        assert!(e.to_string().contains("1..=10000000"), "{e}");
        let e = Config::parse("[kernel]\ntune = \"eth1\"\n").unwrap_err();
        assert_eq!((e.key(), e.line()), (Some("kernel.tune"), Some(2)), "{e}");
        assert!(
            e.to_string().contains("a list of kernel device names"),
            "{e}"
        );
    }

    /// Issue 12, item 12: `min_improvement_pct = 500` is reported by its own name, with its
    /// range and line (it was reported as the decision function's `min_improvement = 5`).
    #[test]
    fn a_range_error_names_the_key_as_written_with_line_and_range() {
        let e = Config::parse("# tuner\n[tuner]\n\nmin_improvement_pct = 500\n").unwrap_err();
        let text = e.to_string();
        assert_eq!(
            (e.key(), e.line()),
            (Some("tuner.min_improvement_pct"), Some(4)),
            "{text}"
        );
        assert!(
            text.contains("tuner.min_improvement_pct = 500 is outside 0..=99 (percent)"),
            "{text}"
        );
        assert!(!text.contains("min_improvement ="), "{text}");
        let e = Config::parse("[tuner.devices.nvme0]\nslo_p99_us = 0\n").unwrap_err();
        assert_eq!(
            (e.key(), e.line()),
            (Some("tuner.devices.nvme0.slo_p99_us"), Some(2)),
            "{e}"
        );
        // Inline tables and dotted keys have lines too.
        let e = Config::parse("tuner = { trial_windows = 1 }\n").unwrap_err();
        assert_eq!(
            (e.key(), e.line()),
            (Some("tuner.trial_windows"), Some(1)),
            "{e}"
        );
        let e = Config::parse("\ntuner.decisions_kept = 0\n").unwrap_err();
        assert_eq!(
            (e.key(), e.line()),
            (Some("tuner.decisions_kept"), Some(2)),
            "{e}"
        );
    }

    /// Every integer key refuses the value past each end of its range, by name and line.
    #[test]
    fn every_integer_key_refuses_values_outside_its_range() {
        for k in all_keys() {
            let Accepts::Int { min, max, .. } = k.accepts else {
                continue;
            };
            let path = k.key.replace('*', "d0");
            let (table, leaf) = path.rsplit_once('.').unwrap_or(("", &path));
            let mut bad = vec![max + 1];
            if min > 0 {
                bad.push(min - 1);
            }
            for v in bad {
                let text = if table.is_empty() {
                    format!("{leaf} = {v}\n")
                } else {
                    format!("[{table}]\n{leaf} = {v}\n")
                };
                let e = Config::parse(&text).unwrap_err();
                let line = if table.is_empty() { 1 } else { 2 };
                assert_eq!(
                    (e.key(), e.line()),
                    (Some(path.as_str()), Some(line)),
                    "{text}: {e}"
                );
                assert!(e.to_string().contains(&format!("{min}..={max}")), "{e}");
            }
            let ok = if table.is_empty() {
                format!("{leaf} = {max}\n")
            } else {
                format!("[{table}]\n{leaf} = {min}\n")
            };
            Config::parse(&ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    /// The names of a struct's fields, as serde sees them: a deserializer that records the
    /// field list it is handed and stops.
    fn fields_of<'de, T: Deserialize<'de>>() -> Vec<&'static str> {
        struct Names(std::cell::RefCell<Vec<&'static str>>);
        #[derive(Debug)]
        struct Stop;
        impl std::fmt::Display for Stop {
            fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("stop")
            }
        }
        impl std::error::Error for Stop {}
        impl serde::de::Error for Stop {
            fn custom<M: std::fmt::Display>(_: M) -> Self {
                Stop
            }
        }
        impl<'de> serde::Deserializer<'de> for &Names {
            type Error = Stop;
            fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
                Err(Stop)
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Stop> {
                self.0.borrow_mut().extend_from_slice(fields);
                Err(Stop)
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let names = Names(Default::default());
        let _ = T::deserialize(&names);
        names.0.into_inner()
    }

    /// The mechanism is general: every field of every section has a [`KeySpec`], so a key
    /// added later gets its line and range in errors (this test fails until it has one).
    #[test]
    fn every_key_of_every_section_has_a_spec() {
        let sections = [
            ("", fields_of::<Config>()),
            ("tuner.", fields_of::<crate::tuner::config::TunerConfig>()),
            (
                "tuner.devices.*.",
                fields_of::<crate::tuner::config::DeviceTunerConfig>(),
            ),
            ("kernel.", fields_of::<crate::kernel::KernelConfig>()),
        ];
        let mut missing = Vec::new();
        for (prefix, fields) in &sections {
            assert!(!fields.is_empty(), "no fields seen for {prefix:?}");
            for f in fields {
                let key = format!("{prefix}{f}");
                if spec_of(&key.replace('*', "d0")).is_none() {
                    missing.push(key);
                }
            }
        }
        assert!(missing.is_empty(), "keys without a KeySpec: {missing:?}");
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
        // Queue-resetting rx rings: explored on pressure unless the operator says otherwise.
        assert_eq!(d.kernel.ring_resets, crate::kernel::RingResets::Explore);
        let c = Config::parse("[kernel]\nring_resets = \"recommend\"\n").unwrap();
        assert_eq!(c.kernel.ring_resets, crate::kernel::RingResets::Recommend);
        let e =
            Config::parse("[kernel]\nenabled = true\nring_resets = \"sometimes\"\n").unwrap_err();
        assert_eq!(
            (e.key(), e.line()),
            (Some("kernel.ring_resets"), Some(3)),
            "{e}"
        );
        assert!(
            e.to_string().contains("sometimes") && e.to_string().contains("\"recommend\""),
            "{e}"
        );
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
