//! What the device processes print each second: JSON lines for programs (`--json`, or whenever
//! stdout is not a terminal: `enlight demo`, the tests and scripts read these), and a line a
//! person reads at a terminal. Both come from the same figures; the JSON objects are the
//! documented ones (each command's `--help`).

use std::io::IsTerminal;

use enlight_driver::nic::LatencyFigures;
use enlight_driver::workload::WorkloadSnapshot;

/// Whether to print JSON: asked for, or stdout is a pipe or a file.
pub fn json_wanted(flag: bool) -> bool {
    flag || !std::io::stdout().is_terminal()
}

/// A latency in the unit that reads best: `850ns`, `381us`, `1.01ms`, `26.1ms`, `1.20s`.
pub fn duration_ns(ns: u64) -> String {
    let (v, unit) = match ns {
        0..=999 => return format!("{ns}ns"),
        1_000..=999_999 => (ns as f64 / 1e3, "us"),
        1_000_000..=999_999_999 => (ns as f64 / 1e6, "ms"),
        _ => (ns as f64 / 1e9, "s"),
    };
    if v < 10.0 {
        format!("{v:.2}{unit}")
    } else if v < 100.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.0}{unit}")
    }
}

/// A count with a k/M suffix past 10,000: `950`, `52.8k`, `1.20M`.
pub fn count(v: f64) -> String {
    if v < 10_000.0 {
        format!("{v:.0}")
    } else if v < 10_000_000.0 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{:.2}M", v / 1e6)
    }
}

/// One second of a disk's workload: `   3s  52.8k IOPS  206.4 MB/s  p50 381us  p99 1.01ms
/// p999 26.1ms  errors 0`; the last one (`done`) sums the run up.
pub fn workload_line(w: &WorkloadSnapshot) -> String {
    let bytes = (w.read_bytes + w.write_bytes) as f64;
    let lat = format!(
        "p50 {}  p99 {}  p999 {}",
        duration_ns(w.p50_ns),
        duration_ns(w.p99_ns),
        duration_ns(w.p999_ns)
    );
    if w.done {
        format!(
            "done after {:.1}s: {} I/Os ({} reads, {} writes, {} errors), {} IOPS on average, {:.1} MB/s; {lat}  max {}",
            w.elapsed_s,
            w.ops_total,
            w.reads,
            w.writes,
            w.errors,
            count(w.iops_avg),
            bytes / w.elapsed_s.max(1e-9) / 1e6,
            duration_ns(w.max_ns),
        )
    } else {
        let mb_per_sec = if w.ops_total > 0 {
            w.iops_interval * bytes / w.ops_total as f64 / 1e6
        } else {
            0.0
        };
        format!(
            "{:>5.0}s  {:>6} IOPS  {mb_per_sec:>7.1} MB/s  {lat}  errors {}",
            w.elapsed_s,
            count(w.iops_interval),
            w.errors
        )
    }
}

/// A NIC's latency figures: `p50 120us p99 850us`.
pub fn latency(l: &LatencyFigures) -> String {
    if l.count == 0 {
        "-".into()
    } else {
        format!(
            "p50 {} p99 {}",
            duration_ns(l.p50_ns),
            duration_ns(l.p99_ns)
        )
    }
}

/// Bits per second: `120.3 Mbit/s`.
pub fn bits(v: f64) -> String {
    if v < 1e6 {
        format!("{:.1} kbit/s", v / 1e3)
    } else if v < 1e9 {
        format!("{:.1} Mbit/s", v / 1e6)
    } else {
        format!("{:.2} Gbit/s", v / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration_ns(850), "850ns");
        assert_eq!(duration_ns(380_900), "381us");
        assert_eq!(duration_ns(1_011_700), "1.01ms");
        assert_eq!(duration_ns(26_083_300), "26.1ms");
        assert_eq!(duration_ns(1_200_000_000), "1.20s");
        assert_eq!(count(950.0), "950");
        assert_eq!(count(52_843.0), "52.8k");
        assert_eq!(bits(120.3e6), "120.3 Mbit/s");
    }

    #[test]
    fn a_workload_second_and_its_summary() {
        let mut w = WorkloadSnapshot {
            elapsed_s: 3.0,
            ops_total: 150_000,
            reads: 105_000,
            writes: 45_000,
            read_bytes: 105_000 * 4096,
            write_bytes: 45_000 * 4096,
            errors: 0,
            iops_interval: 52_843.0,
            iops_avg: 50_000.0,
            p50_ns: 380_900,
            p90_ns: 600_000,
            p99_ns: 1_011_700,
            p999_ns: 26_083_300,
            max_ns: 40_000_000,
            done: false,
        };
        assert_eq!(
            workload_line(&w),
            "    3s   52.8k IOPS    216.4 MB/s  p50 381us  p99 1.01ms  p999 26.1ms  errors 0"
        );
        w.done = true;
        let last = workload_line(&w);
        assert!(
            last.starts_with("done after 3.0s: 150000 I/Os (105000 reads, 45000 writes, 0 errors), 50.0k IOPS on average, 204.8 MB/s;"),
            "{last}"
        );
        assert!(last.ends_with("max 40.0ms"), "{last}");
    }
}
