//! Privileged: a real 50 ms burst (QD32) between two quiet phases (QD1 at 200 IOPS) on a live
//! synthetic disk shows on /metrics as it would to a scraper that comes every 15 s: the peak
//! gauges hold the burst's interval rate (far above what the counters' rate over 15 s shows) and
//! the highest latency bucket any completion reached (the workload's own largest latency, to the
//! buckets' precision), for the peak window (2 s here) and no longer.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{daemon_config, require_privileges};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

/// The value of `name{...op="read"...}` on /metrics.
fn read_gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("op=\"read\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_fifty_millisecond_burst_shows_in_the_peak_gauges_for_the_window() {
    let _lock = require_privileges();
    let dir = tempfile::tempdir().unwrap();
    let mut config = daemon_config(dir.path());
    config.peak_window_secs = 2;
    let daemon = enlightd::Daemon::start(config).expect("start enlightd");
    let handle = daemon.handle();
    let background_secs = 6.0;
    let mut device = Command::new(ENLIGHT)
        .args(["disk", "--name", "burst0", "--create-mib", "16", "--json"])
        .args([
            "--workload",
            "qd=1,bs=4k,rw=100,rate=200,duration=2s;qd=32,bs=4k,rw=100,duration=50ms;qd=1,bs=4k,rw=100,rate=200,duration=4s",
        ])
        .args(["--wait-for-probes", "30"])
        .arg("--backing")
        .arg(dir.path().join("burst0.img"))
        .arg("--runtime-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn enlight disk");

    // Read /metrics every 50 ms (twice per collector interval) while the device runs and for
    // a window and a half after.
    let mut readings: Vec<(Instant, f64, f64)> = Vec::new();
    let mut exited_at = None;
    loop {
        let m = handle.render_metrics();
        if let (Some(rate), Some(lat)) = (
            read_gauge(&m, "enlight_io_peak_ops_per_second"),
            read_gauge(&m, "enlight_io_peak_latency_seconds"),
        ) {
            readings.push((Instant::now(), rate, lat));
        }
        if exited_at.is_none() && device.try_wait().unwrap().is_some() {
            exited_at = Some(Instant::now());
        }
        if exited_at.is_some_and(|t| t.elapsed() > Duration::from_millis(3000)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = support::final_line(device);
    let w: enlight_driver::workload::WorkloadSnapshot = serde_json::from_str(&last).unwrap();
    assert!(w.done, "{last}");
    // The quiet phases' rate is a hard bound of their schedule; the rest is the burst.
    let background = (200.0 * background_secs) as u64 + 10;
    let burst_ops = w.ops_total.saturating_sub(background);
    assert!(burst_ops >= 64, "the burst did {burst_ops} I/Os: {last}");

    let peak_rate = readings.iter().map(|r| r.1).fold(0.0, f64::max);
    // The first reading that showed it (the gauge holds it for the window after).
    let peak_at = readings.iter().find(|r| r.1 == peak_rate).unwrap().0;
    let peak_latency = readings.iter().map(|r| r.2).fold(0.0, f64::max);
    // What a scrape every 15 s would get from the counters: the run's I/Os over 15 s.
    let scrape_rate = w.ops_total as f64 / 15.0;
    eprintln!(
        "burst of {burst_ops} I/Os: peak gauge {peak_rate:.0}/s, rate over a 15 s scrape \
         {scrape_rate:.0}/s; peak latency {:.3} ms, the workload's largest {:.3} ms",
        peak_latency * 1e3,
        w.max_ns as f64 / 1e6
    );
    // The burst falls in at most two collector intervals (50 ms < 100 ms), each at most 0.5 s
    // long even on a loaded machine: one of them ran at burst_ops / 2 / 0.5 or more.
    assert!(
        peak_rate >= burst_ops as f64,
        "peak {peak_rate:.0}/s below {burst_ops}/s"
    );
    assert!(
        peak_rate > 2.0 * scrape_rate,
        "the burst ({peak_rate:.0}/s) is not visible over the scrape's rate ({scrape_rate:.0}/s)"
    );
    // The highest bucket reached is the largest latency's bucket (HDR and kernel buckets are
    // both within 1% of a value).
    let max_s = w.max_ns as f64 / 1e9;
    assert!(
        (peak_latency - max_s).abs() <= 0.03 * max_s,
        "peak latency {peak_latency} s vs the workload's largest {max_s} s"
    );
    // The window slides: 2.5 s after the burst (the quiet phase still running) the gauge is back
    // near the quiet rate; a window after the device stopped, it is 0.
    if peak_rate > 1000.0 {
        let later: Vec<f64> = readings
            .iter()
            .filter(|r| {
                r.0 > peak_at + Duration::from_millis(2500)
                    && exited_at.is_some_and(|e| r.0 + Duration::from_millis(200) < e)
            })
            .map(|r| r.1)
            .collect();
        assert!(
            !later.is_empty(),
            "no reading during the quiet phase after the burst"
        );
        assert!(
            later.iter().all(|r| *r < peak_rate / 2.0),
            "the peak did not leave the window: {later:?}"
        );
    }
    let (_, end_rate, end_latency) = *readings.last().unwrap();
    assert_eq!(
        (end_rate, end_latency),
        (0.0, 0.0),
        "a window after the end"
    );
    let m = handle.render_metrics();
    assert!(m.contains("enlight_peak_window_seconds 2\n"), "{m}");
    enlightd::testing::promtool_check(&m);
}
