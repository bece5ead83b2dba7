//! Value parsers for the numeric flags: each refuses a value outside its range with an error that
//! names the range (clap adds the flag), so no number reaches a `Duration`, an allocation or a
//! thread count unchecked. Every flag's `--help` states the same range.

use std::ops::RangeInclusive;

use enlight_driver::settings::Knob;
use enlight_driver::workload::{limits, Plan, WorkloadSpec};

/// `--duration` of the device processes: seconds, 0.001 up to a year.
pub const DURATION_SECS: RangeInclusive<f64> = 0.001..=limits::DURATION_MAX_SECS as f64;
/// `--wait-for-probes`: seconds, up to an hour.
pub const PROBE_WAIT_SECS: RangeInclusive<f64> = 0.0..=3600.0;
/// `--create-mib` and `demo --size-mib`: 1 MiB to 1 TiB.
pub const MIB: RangeInclusive<u64> = 1..=1 << 20;

/// A number of seconds in `range` (finite: `inf`, `NaN`, `1e300` and negative numbers are
/// refused).
pub fn seconds(
    range: RangeInclusive<f64>,
) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && range.contains(v))
            .ok_or_else(|| {
                format!(
                    "{s} is not a number of seconds in {}..={}",
                    range.start(),
                    range.end()
                )
            })
    }
}

/// [`seconds`] in [`DURATION_SECS`].
pub fn duration_secs() -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    seconds(DURATION_SECS)
}

/// [`seconds`] in [`PROBE_WAIT_SECS`].
pub fn probe_wait_secs() -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    seconds(PROBE_WAIT_SECS)
}

/// An integer in `range` (the error states the range whatever was wrong: not a number, too
/// large for the type, or outside the range).
pub fn int<T>(
    range: RangeInclusive<T>,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Clone + Send + Sync + 'static,
{
    move |s: &str| {
        s.trim()
            .parse::<T>()
            .ok()
            .filter(|v| range.contains(v))
            .ok_or_else(|| {
                format!(
                    "{s} is not an integer in {}..={}",
                    range.start(),
                    range.end()
                )
            })
    }
}

/// A size in MiB in [`MIB`].
pub fn mib(s: &str) -> Result<u64, String> {
    int(MIB)(s).map_err(|e| format!("{e} (MiB)"))
}

/// A value of a device knob, in the synthetic devices' limits ([`SettingsLimits`]); ring sizes
/// also a multiple of the page size.
pub fn knob(knob: Knob) -> impl Fn(&str) -> Result<u32, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let limits = enlight_driver::control::Limits::synthetic();
        let [min, max] = limits.range(knob);
        let value = s
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("{s} is not an integer in {min}..={max}"))?;
        limits
            .check(knob, value)
            .map(|()| value)
            .map_err(|e| e.to_string())
    }
}

/// Checks a workload plan (phases joined by `;`) and keeps its text (`enlight demo` passes it
/// on to its device process).
pub fn plan_text(s: &str) -> Result<String, String> {
    s.parse::<Plan>()
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// A workload plan; the error names the key and its range.
pub fn plan(s: &str) -> Result<Plan, String> {
    s.parse::<Plan>().map_err(|e| e.to_string())
}

/// One workload phase; the error names the key and its range.
pub fn spec(s: &str) -> Result<WorkloadSpec, String> {
    s.parse::<WorkloadSpec>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use enlight_driver::settings::SettingsLimits;

    #[test]
    fn ranges_refuse_what_would_panic_later() {
        let d = duration_secs();
        for bad in [
            "inf",
            "NaN",
            "1e300",
            "-1",
            "99999999999999999999",
            "0",
            "x",
        ] {
            let e = d(bad).unwrap_err();
            assert!(e.contains("0.001..=31536000"), "{bad}: {e}");
        }
        assert_eq!(d("1.5"), Ok(1.5));
        assert_eq!(d("31536000"), Ok(31_536_000.0));
        assert!(mib("0").unwrap_err().contains("1..=1048576"));
        let big = int(1..=31_536_000u64)("99999999999999999999").unwrap_err();
        assert!(big.contains("1..=31536000"), "{big}");
        assert!(mib("1048577").is_err());
        assert_eq!(mib("32"), Ok(32));
        let ring = knob(Knob::RingOutBytes);
        assert!(ring("5000").unwrap_err().contains("8192 to 67108864"));
        assert!(ring("12289").is_err(), "not a page multiple");
        assert_eq!(ring("16384"), Ok(16384));
        assert!(knob(Knob::PollBudget)("0")
            .unwrap_err()
            .contains("1..=4096"));
        assert!(knob(Knob::ModerationUsecs)("-1")
            .unwrap_err()
            .contains("0..=100000"));
        assert_eq!(
            *SettingsLimits::FRAMES.end(),
            1024,
            "--moderation-frames' help states 1..=1024"
        );
        assert!(plan_text("qd=0").unwrap_err().contains("1..=4096"));
    }
}
