//! Microbursts: the highest rate of any one collector interval, and the highest latency bucket
//! any completion reached, over a sliding window (`peak_window_secs`).
//!
//! A 50 ms burst of 2,000 I/Os in an otherwise quiet 15 s scrape interval raises the counters'
//! `rate()` by 133/s; the collector, which reads the kernel's counters every interval (1 s by
//! default), saw 2,000 in one interval. So each interval's rate and the highest latency bucket
//! that grew in it are kept for the window, and /metrics serves their maxima as gauges:
//!
//! - a sliding window, not a maximum reset when scraped: several Prometheus servers (or a
//!   person with curl) scraping the same daemon each get the same answer, and none steals
//!   another's peak;
//! - the window must be at least the longest scrape interval of any scraper, so every interval
//!   is in at least one scrape; a peak then shows in every scrape within the window after it
//!   (query with `max_over_time(...[$__interval])` to count each once per graph step);
//! - the rate's resolution is the collector interval (`enlight_collector_interval_seconds`):
//!   a burst shorter than that is averaged over one interval, still far above the scrape's rate.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One interval of one op: when it was read, its rate, the highest bucket that grew in it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    at: Instant,
    ops_per_sec: f64,
    max_bucket: Option<u32>,
}

/// The intervals of one op of one device still inside the window.
#[derive(Debug, Clone, Default)]
pub struct PeakWindow {
    samples: VecDeque<Sample>,
}

impl PeakWindow {
    /// Adds the interval read at `at`, and forgets intervals older than `window`.
    pub fn push(
        &mut self,
        at: Instant,
        ops_per_sec: f64,
        max_bucket: Option<u32>,
        window: Duration,
    ) {
        self.samples.push_back(Sample {
            at,
            ops_per_sec,
            max_bucket,
        });
        while self
            .samples
            .front()
            .is_some_and(|s| at.saturating_duration_since(s.at) > window)
        {
            self.samples.pop_front();
        }
    }

    fn within(&self, now: Instant, window: Duration) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |s| now.saturating_duration_since(s.at) <= window)
    }

    /// The highest interval rate read within `window` before `now` (0 without any).
    pub fn peak_ops_per_sec(&self, now: Instant, window: Duration) -> f64 {
        self.within(now, window)
            .map(|s| s.ops_per_sec)
            .fold(0.0, f64::max)
    }

    /// The highest latency bucket (kernel bucket index) that grew within `window` before `now`.
    pub fn peak_bucket(&self, now: Instant, window: Duration) -> Option<u32> {
        self.within(now, window).filter_map(|s| s.max_bucket).max()
    }
}

/// The highest bucket whose count grew between two cumulative readings.
pub fn highest_grown_bucket(
    before: Option<&std::collections::BTreeMap<u32, u64>>,
    now: &std::collections::BTreeMap<u32, u64>,
) -> Option<u32> {
    now.iter()
        .rev()
        .find(|(b, c)| before.and_then(|p| p.get(b)).copied().unwrap_or(0) < **c)
        .map(|(b, _)| *b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_peak_is_the_highest_interval_in_the_window_and_leaves_with_it() {
        let t0 = Instant::now();
        let w = Duration::from_secs(15);
        let mut p = PeakWindow::default();
        for i in 0..30u64 {
            // One busy interval at 10 s in quiet ones.
            let (rate, bucket) = if i == 10 { (2000.0, 900) } else { (100.0, 400) };
            p.push(t0 + Duration::from_secs(i), rate, Some(bucket), w);
            let now = t0 + Duration::from_secs(i);
            let expected = if (10..=25).contains(&i) {
                2000.0
            } else {
                100.0
            };
            assert_eq!(p.peak_ops_per_sec(now, w), expected, "at {i} s");
            assert_eq!(
                p.peak_bucket(now, w),
                Some(if (10..=25).contains(&i) { 900 } else { 400 })
            );
        }
        // Read again, later, with nothing new: the window has moved on; any number of readers
        // get the same answer.
        let late = t0 + Duration::from_secs(60);
        assert_eq!(p.peak_ops_per_sec(late, w), 0.0);
        assert_eq!(p.peak_ops_per_sec(late, w), 0.0);
        assert_eq!(p.peak_bucket(late, w), None);
        assert!(p.samples.len() <= 16, "old intervals are dropped");
    }

    #[test]
    fn the_highest_grown_bucket_ignores_buckets_that_did_not_grow() {
        let before = BTreeMap::from([(10, 5), (50, 1)]);
        let now = BTreeMap::from([(10, 9), (50, 1), (20, 3)]);
        assert_eq!(highest_grown_bucket(Some(&before), &now), Some(20));
        assert_eq!(highest_grown_bucket(None, &now), Some(50));
        assert_eq!(highest_grown_bucket(Some(&now), &now), None);
    }
}
