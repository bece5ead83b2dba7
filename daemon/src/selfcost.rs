//! What enlightd itself costs: each of its eBPF programs' run count and run time as the kernel
//! counts them (the figures `bpftool prog show` and bpftop print; the kernel counts them only
//! while run-time statistics are on, which enlightd holds on with `BPF_ENABLE_STATS` for as long
//! as it runs, and which go off when it exits), and the daemon process's own CPU time and
//! resident memory (`/proc/self`).
//!
//! The programs are shared by every device (a USDT program runs for every traced device of an
//! executable), so their cost is per program, next to the IOPS of all devices together:
//! `enlight top` divides one by the other.

use std::collections::BTreeMap;

/// One eBPF program's cumulative statistics, as read from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProgramReading {
    /// The kernel's program id.
    pub id: u32,
    /// Runs counted while statistics were on.
    pub run_count: u64,
    /// Nanoseconds spent in the program while statistics were on.
    pub run_time_ns: u64,
}

// The figures served are the API's, defined once for the daemon and `enlight top`.
pub use enlight_abi::api::{ProcessCost, ProgramCost, SelfCost};

/// Takes this interval's readings of `programs` (one source's: the USDT or the kernel programs),
/// `dt` seconds after the previous ones.
pub fn update_programs(cost: &mut SelfCost, readings: &BTreeMap<String, ProgramReading>, dt: f64) {
    for (name, r) in readings {
        let c = cost.programs.entry(name.clone()).or_default();
        let (prev_runs, prev_ns) = if c.id == r.id {
            (c.runs_total, (c.run_seconds_total * 1e9).round() as u64)
        } else {
            (r.run_count, r.run_time_ns)
        };
        let runs = r.run_count.saturating_sub(prev_runs);
        let ns = r.run_time_ns.saturating_sub(prev_ns);
        c.program = name.clone();
        c.id = r.id;
        c.runs_total = r.run_count;
        c.run_seconds_total = r.run_time_ns as f64 / 1e9;
        if dt > 0.0 {
            c.runs_per_sec = runs as f64 / dt;
            c.ns_per_run = if runs > 0 {
                ns as f64 / runs as f64
            } else {
                0.0
            };
            c.cpu_percent = ns as f64 / 1e9 / dt * 100.0;
        }
    }
}

/// Takes this interval's reading of the process, `dt` seconds after the previous one.
pub fn update_process(cost: &mut SelfCost, cpu_seconds_total: f64, resident_bytes: u64, dt: f64) {
    let p = &mut cost.process;
    if dt > 0.0 && p.cpu_seconds_total > 0.0 {
        p.cpu_percent = (cpu_seconds_total - p.cpu_seconds_total).max(0.0) / dt * 100.0;
    }
    p.cpu_seconds_total = cpu_seconds_total;
    p.resident_bytes = resident_bytes;
}

/// This process's CPU time (user + system, seconds) and resident memory (bytes), from
/// `/proc/self/stat` and `/proc/self/statm`.
pub fn read_process() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: fields are counted after its closing ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 11 and 12 after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some((ticks as f64 / hz, resident_pages * page))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_differences_over_the_interval() {
        let mut c = SelfCost::default();
        let r = |id, run_count, run_time_ns| {
            BTreeMap::from([(
                "enlight_io_reap".to_string(),
                ProgramReading {
                    id,
                    run_count,
                    run_time_ns,
                },
            )])
        };
        update_programs(&mut c, &r(7, 100, 50_000), 0.0);
        update_programs(&mut c, &r(7, 1100, 550_000), 0.5);
        let p = &c.programs["enlight_io_reap"];
        assert_eq!((p.id, p.runs_total), (7, 1100));
        assert_eq!(p.runs_per_sec, 2000.0);
        assert_eq!(p.ns_per_run, 500.0);
        assert!((p.cpu_percent - 0.1).abs() < 1e-9, "{}", p.cpu_percent);
        // A program loaded again (another id) starts afresh rather than going backwards.
        update_programs(&mut c, &r(9, 10, 5_000), 1.0);
        let p = &c.programs["enlight_io_reap"];
        assert_eq!((p.id, p.runs_total, p.runs_per_sec), (9, 10, 0.0));
    }

    #[test]
    fn this_process_has_a_cpu_time_and_memory() {
        let (cpu, rss) = read_process().unwrap();
        assert!(cpu >= 0.0 && rss > 1 << 20, "{cpu} {rss}");
        let mut c = SelfCost::default();
        update_process(&mut c, 1.0, rss, 1.0);
        update_process(&mut c, 1.25, rss, 1.0);
        assert!((c.process.cpu_percent - 25.0).abs() < 1e-9);
    }
}
