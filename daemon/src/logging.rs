//! enlightd's log (stderr; journald under systemd): one line per thing a person wants to know at
//! the default level (device found, probes attached, device gone, tuner change, knob restored,
//! the first time each problem is seen), the eBPF loader's chatter only at trace level, and a
//! JSON-lines format for log shippers.
//!
//! A problem that recurs every collector interval (a malformed registry file, a process that
//! refuses the probes) is logged once, then counted: [`Repeats`] remembers what was logged and
//! says once when it stopped recurring, with how often it was seen. Its counts also reach
//! `enlight_errors_total` and `/api/v1/health`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-12-07T01:02:03.456Z INFO  enlightd::collector] device disk0 found ...`
    #[default]
    Text,
    /// One JSON object per line: `{"ts":"...","level":"INFO","target":"...","message":"..."}`.
    Json,
}

/// The `env_logger` filter for `-v` given `verbosity` times. The eBPF loader (aya) logs every
/// relocation and map at debug level (over a hundred lines in the first seconds), so it stays at
/// `warn` until `-vv` asks for everything.
pub fn filter(verbosity: u8) -> &'static str {
    match verbosity {
        0 => "info,aya=warn,aya_obj=warn",
        1 => "debug,aya=warn,aya_obj=warn",
        _ => "trace",
    }
}

/// One record as a JSON line (the `--log-format json` format).
pub fn json_line(ts: &str, level: log::Level, target: &str, message: &str) -> String {
    serde_json::json!({
        "ts": ts,
        "level": level.as_str(),
        "target": target,
        "message": message,
    })
    .to_string()
}

/// Installs the global logger: `RUST_LOG` wins over `-v`.
pub fn init(verbosity: u8, format: LogFormat) {
    let mut builder = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(filter(verbosity)),
    );
    if format == LogFormat::Json {
        builder.format(|buf, record| {
            let ts = buf.timestamp_millis().to_string();
            let line = json_line(
                &ts,
                record.level(),
                record.target(),
                &record.args().to_string(),
            );
            writeln!(buf, "{line}")
        });
    }
    builder.init();
}

/// Problems already logged, and how often each was seen since.
#[derive(Debug, Default)]
pub struct Repeats {
    /// Line → times seen while it kept recurring.
    counts: BTreeMap<String, u64>,
    /// Lines seen since the last [`Repeats::end_interval`].
    seen: BTreeSet<String>,
}

impl Repeats {
    /// Notes `line`; true the first time (the caller logs it), false while it recurs.
    pub fn note(&mut self, line: &str) -> bool {
        self.seen.insert(line.to_string());
        let n = self.counts.entry(line.to_string()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Times `line` was seen while recurring (0 if it is not current).
    pub fn count(&self, line: &str) -> u64 {
        self.counts.get(line).copied().unwrap_or(0)
    }

    /// Ends an interval: each line not seen in it is forgotten (so it is logged again if it
    /// comes back) and returned with its count.
    pub fn end_interval(&mut self) -> Vec<(String, u64)> {
        let seen = std::mem::take(&mut self.seen);
        let gone: Vec<String> = self
            .counts
            .keys()
            .filter(|l| !seen.contains(*l))
            .cloned()
            .collect();
        gone.into_iter()
            .map(|l| {
                let n = self.counts.remove(&l).unwrap_or(0);
                (l, n)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recurring_problem_is_reported_once_then_counted_and_its_end_said_once() {
        let mut r = Repeats::default();
        assert!(r.note("registry: bad.json: expected value"));
        r.end_interval();
        for _ in 0..50 {
            assert!(!r.note("registry: bad.json: expected value"));
            assert!(r.end_interval().is_empty());
        }
        assert_eq!(r.count("registry: bad.json: expected value"), 51);
        // Not seen in an interval: it is over, said once with its count.
        assert_eq!(
            r.end_interval(),
            vec![("registry: bad.json: expected value".to_string(), 51)]
        );
        assert!(r.end_interval().is_empty());
        // And a comeback is news again.
        assert!(r.note("registry: bad.json: expected value"));
    }

    #[test]
    fn json_lines_are_json() {
        let line = json_line(
            "2026-12-07T01:02:03.456Z",
            log::Level::Info,
            "enlightd::collector",
            "device \"disk0\" found\nsecond line",
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "device \"disk0\" found\nsecond line");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn the_loader_is_quiet_until_trace() {
        assert!(filter(0).contains("aya=warn") && filter(1).contains("aya=warn"));
        assert_eq!(filter(2), "trace");
    }
}
