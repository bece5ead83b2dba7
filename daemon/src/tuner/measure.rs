//! A settings point's measurement: several windows at the same settings, and the test that says
//! whether another point differs from it with confidence.
//!
//! Decisions never rest on one window. A point keeps each window's figures (ops/s, p99,
//! interrupts per op) and their merged histogram. Rates (ops/s, interrupts per op) differ when
//! the means of the per-window values differ by more than `z` standard errors of the difference
//! (Welch) *and* by more than a relative margin. The p99 is compared on the merged histograms
//! ([`compare_p99`]): a per-window p99 rests on a handful of tail samples and swings by
//! multiples on a busy machine, while a binomial test on the tail of thousands of completions
//! does not.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::window::{quantile_ns, Window};
use super::{Objective, Signal, Throughput};

/// One window's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WindowFigures {
    pub ops_per_sec: f64,
    #[serde(default)]
    pub bytes_per_sec: f64,
    /// `None` when the window had too few completions for a p99.
    pub p99_ns: Option<u64>,
    pub interrupts_per_op: f64,
    #[serde(default)]
    pub napi_polls_per_op: f64,
    pub bytes_per_op: f64,
}

/// Windows measured at one settings point (the newest `cap` of them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub windows: VecDeque<WindowFigures>,
    /// Merged latency buckets of the kept windows' completions... approximately: the oldest
    /// window's buckets are not subtracted when it is dropped, so this is the merged histogram
    /// since the point's measurement started. Quantiles of a stationary workload do not care.
    pub buckets: BTreeMap<u32, u64>,
    pub ops: u64,
    pub interrupts: u64,
    #[serde(default)]
    pub napi_polls: u64,
    pub ring_full: u64,
    pub duration_s: f64,
}

/// Mean and standard error of the mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanSe {
    pub mean: f64,
    pub se: f64,
    pub n: usize,
}

/// Mean and standard error of `v`.
pub fn mean_se(v: &[f64]) -> Option<MeanSe> {
    let n = v.len();
    if n == 0 {
        return None;
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let se = if n > 1 {
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt()
    } else {
        f64::INFINITY
    };
    Some(MeanSe { mean, se, n })
}

/// How `b` compares with `a` in one metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// Significantly lower.
    Lower,
    /// Significantly higher.
    Higher,
    /// No difference the data supports.
    Same,
}

/// Compares the per-window values `b` with `a`: a difference counts when it exceeds both `z`
/// standard errors (Welch) and `margin` times `|mean(a)|`. Fewer than two values on either side
/// is never significant.
pub fn compare(a: &[f64], b: &[f64], margin: f64, z: f64) -> Cmp {
    let (Some(a), Some(b)) = (mean_se(a), mean_se(b)) else {
        return Cmp::Same;
    };
    if a.n < 2 || b.n < 2 {
        return Cmp::Same;
    }
    let diff = b.mean - a.mean;
    let se = (a.se.powi(2) + b.se.powi(2)).sqrt();
    if diff.abs() > z * se && diff.abs() > margin * a.mean.abs() {
        if diff < 0.0 {
            Cmp::Lower
        } else {
            Cmp::Higher
        }
    } else {
        Cmp::Same
    }
}

/// Compares the p99 of `b` with `a`'s from their merged histograms, with a binomial test on the
/// tail: if `b`'s p99 were `a`'s, about 1% of `b`'s completions would lie above `a`'s p99
/// bucket; "lower" needs significantly fewer than that (by `z` standard deviations, counting
/// completions in groups of `cluster`, since stalls delay neighbours together) and a p99 lower
/// by more than `margin`; "higher" is the same test the other way round.
pub fn compare_p99(a: &Measurement, b: &Measurement, margin: f64, z: f64, cluster: f64) -> Cmp {
    let (Some(qa), Some(qb)) = (a.p99_bucket(), b.p99_bucket()) else {
        return Cmp::Same;
    };
    let mid = enlight_probes::hist::bucket_mid_ns;
    let tail_below = |m: &Measurement, above: u32| {
        let n: u64 = m.buckets.values().sum();
        let k: u64 = m.buckets.range(above + 1..).map(|(_, c)| c).sum();
        let (n, k) = (n as f64 / cluster, k as f64 / cluster);
        let expected = 0.01 * n;
        let sd = (n * 0.01 * 0.99).sqrt().max(1e-9);
        (expected - k) / sd > z
    };
    let (va, vb) = (mid(qa) as f64, mid(qb) as f64);
    if vb < va * (1.0 - margin) && tail_below(b, qa) {
        Cmp::Lower
    } else if vb > va * (1.0 + margin) && tail_below(a, qb) {
        Cmp::Higher
    } else {
        Cmp::Same
    }
}

impl Cmp {
    /// The same comparison with "lower" and "higher" swapped (for metrics where lower is better:
    /// the result then reads "Higher" = better).
    pub fn flip(self) -> Cmp {
        match self {
            Cmp::Lower => Cmp::Higher,
            Cmp::Higher => Cmp::Lower,
            Cmp::Same => Cmp::Same,
        }
    }
}

impl Measurement {
    /// Adds a window; windows with no completions are ignored; a p99 is kept for windows with at
    /// least `min_window_ops` completions. At most `cap` windows are kept.
    pub fn push(&mut self, w: &Window, min_window_ops: u64, cap: usize) {
        if w.ops == 0 || w.duration_s <= 0.0 {
            return;
        }
        self.windows.push_back(WindowFigures {
            ops_per_sec: w.ops_per_sec(),
            bytes_per_sec: w.bytes_per_sec(),
            p99_ns: (w.ops >= min_window_ops)
                .then(|| w.quantile_ns(0.99))
                .flatten(),
            interrupts_per_op: w.interrupts_per_op(),
            napi_polls_per_op: w.napi_polls_per_op(),
            bytes_per_op: w.bytes_per_op(),
        });
        while self.windows.len() > cap.max(1) {
            self.windows.pop_front();
        }
        for (b, n) in &w.buckets {
            *self.buckets.entry(*b).or_default() += n;
        }
        self.ops += w.ops;
        self.interrupts += w.interrupts;
        self.napi_polls += w.napi_polls;
        self.ring_full += w.ring_full;
        self.duration_s += w.duration_s;
    }

    /// Windows kept.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether nothing was measured.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Windows with a p99.
    pub fn p99_windows(&self) -> usize {
        self.windows.iter().filter(|w| w.p99_ns.is_some()).count()
    }

    /// Per-window values of a metric.
    pub fn values(&self, metric: Metric) -> Vec<f64> {
        self.windows
            .iter()
            .filter_map(|w| match metric {
                Metric::OpsPerSec => Some(w.ops_per_sec),
                Metric::BytesPerSec => Some(w.bytes_per_sec),
                Metric::NapiPollsPerOp => Some(w.napi_polls_per_op),
                Metric::P99 => w.p99_ns.map(|v| v as f64),
                Metric::InterruptsPerOp => Some(w.interrupts_per_op),
                Metric::BytesPerOp => Some(w.bytes_per_op),
            })
            .collect()
    }

    /// Mean of a metric's per-window values.
    pub fn mean(&self, metric: Metric) -> Option<f64> {
        mean_se(&self.values(metric)).map(|m| m.mean)
    }

    /// p99 of the merged histogram, ns.
    pub fn p99_ns(&self) -> Option<u64> {
        quantile_ns(&self.buckets, 0.99)
    }

    /// The bucket holding the merged histogram's p99.
    pub fn p99_bucket(&self) -> Option<u32> {
        let total: u64 = self.buckets.values().sum();
        if total == 0 {
            return None;
        }
        let rank = ((0.99 * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        self.buckets.iter().find_map(|(b, n)| {
            seen += n;
            (seen >= rank).then_some(*b)
        })
    }

    /// The value the objective optimises, in its own units: ops/s or bytes/s (throughput, by
    /// `unit`), p99 in seconds (latency), interrupts per op (balanced; NAPI polls per op when
    /// the point saw no interrupt but polls, [`Signal::of`]).
    pub fn objective_value(&self, objective: Objective, unit: Throughput) -> Option<f64> {
        match objective {
            Objective::Throughput => self.mean(Metric::throughput(unit)),
            Objective::Latency => self.p99_ns().map(|v| v as f64 / 1e9),
            Objective::Balanced => self.mean(match Signal::of(self.interrupts, self.napi_polls) {
                Signal::Interrupts => Metric::InterruptsPerOp,
                Signal::NapiPolls => Metric::NapiPollsPerOp,
            }),
        }
    }
}

/// A per-window metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    OpsPerSec,
    BytesPerSec,
    P99,
    InterruptsPerOp,
    NapiPollsPerOp,
    BytesPerOp,
}

impl Metric {
    /// The throughput metric in `unit`.
    pub fn throughput(unit: Throughput) -> Metric {
        match unit {
            Throughput::Ops => Metric::OpsPerSec,
            Throughput::Bytes => Metric::BytesPerSec,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_within_the_spread_is_not_a_difference() {
        let a = [100.0, 104.0, 96.0, 101.0];
        let b = [103.0, 99.0, 105.0, 100.0];
        assert_eq!(compare(&a, &b, 0.03, 2.0), Cmp::Same);
        let c = [120.0, 121.0, 119.0, 122.0];
        assert_eq!(compare(&a, &c, 0.03, 2.0), Cmp::Higher);
        assert_eq!(compare(&c, &a, 0.03, 2.0), Cmp::Lower);
        // Significant in z but under the margin.
        let d = [100.5, 100.6, 100.5, 100.6];
        let e = [101.5, 101.6, 101.5, 101.6];
        assert_eq!(compare(&d, &e, 0.03, 2.0), Cmp::Same);
        // One value is never enough.
        assert_eq!(compare(&a, &[500.0], 0.03, 2.0), Cmp::Same);
    }

    #[test]
    fn p99s_are_compared_on_the_merged_tails() {
        let m = |lat_tail: u64, n: u64| {
            let mut m = Measurement::default();
            let mut w = Window::uniform(1.0, n - n / 50, 20_000, 0);
            *w.buckets
                .entry(enlight_probes::hist::bucket_index(lat_tail))
                .or_default() += n / 50;
            w.ops = n;
            m.push(&w, 100, 8);
            m
        };
        // 2% of completions at the tail: p99 is the tail value.
        let (slow, fast) = (m(400_000, 5000), m(100_000, 5000));
        assert_eq!(compare_p99(&slow, &fast, 0.03, 2.0, 1.0), Cmp::Lower);
        assert_eq!(compare_p99(&fast, &slow, 0.03, 2.0, 1.0), Cmp::Higher);
        assert_eq!(
            compare_p99(&slow, &m(400_000, 5000), 0.03, 2.0, 1.0),
            Cmp::Same
        );
        // Too few completions to tell.
        assert_eq!(
            compare_p99(&m(400_000, 100), &m(100_000, 100), 0.03, 2.0, 1.0),
            Cmp::Same
        );
    }

    #[test]
    fn small_windows_give_no_p99() {
        let mut m = Measurement::default();
        m.push(&Window::uniform(1.0, 50, 10_000, 50), 200, 8);
        m.push(&Window::uniform(1.0, 500, 10_000, 50), 200, 8);
        m.push(&Window::uniform(1.0, 0, 10_000, 0), 200, 8);
        assert_eq!((m.len(), m.p99_windows()), (2, 1));
        assert_eq!(m.ops, 550);
        assert!(m.p99_ns().is_some());
    }
}
