//! Pure figures from cumulative counters: window deltas of latency histograms, percentiles, and the
//! log-scale columns the histogram widget draws. No I/O, no terminal: unit-tested directly.

use crate::model::OpHistogram;

/// A latency histogram: `(low_ns, high_ns, count)` per non-empty bucket, ascending by `low_ns`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hist {
    pub buckets: Vec<(u64, u64, u64)>,
}

impl Hist {
    /// Every op of a device together.
    pub fn merge_ops(ops: &[OpHistogram]) -> Hist {
        let mut all: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
        for op in ops {
            for &[lo, hi, c] in &op.buckets {
                let e = all.entry(lo).or_insert((hi, 0));
                e.1 += c;
            }
        }
        Hist {
            buckets: all
                .into_iter()
                .filter(|(_, (_, c))| *c > 0)
                .map(|(lo, (hi, c))| (lo, hi, c))
                .collect(),
        }
    }

    /// Total count.
    pub fn total(&self) -> u64 {
        self.buckets.iter().map(|b| b.2).sum()
    }

    /// What was added between `older` and `self` (both cumulative). A bucket that went backwards
    /// (the daemon restarted) counts as zero: callers detect restarts and drop old samples.
    pub fn since(&self, older: &Hist) -> Hist {
        let mut j = 0;
        let mut out = Vec::new();
        for &(lo, hi, c) in &self.buckets {
            while j < older.buckets.len() && older.buckets[j].0 < lo {
                j += 1;
            }
            let before = match older.buckets.get(j) {
                Some(&(olo, _, oc)) if olo == lo => oc,
                _ => 0,
            };
            let d = c.saturating_sub(before);
            if d > 0 {
                out.push((lo, hi, d));
            }
        }
        Hist { buckets: out }
    }

    /// The `q` quantile (0..=1) in ns: the midpoint of the bucket holding the `ceil(q * n)`-th
    /// smallest value (buckets are under 1/128 wide, so the midpoint errs by under 0.4%).
    pub fn quantile_ns(&self, q: f64) -> Option<f64> {
        let n = self.total();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for &(lo, hi, c) in &self.buckets {
            seen += c;
            if seen >= rank {
                return Some((lo as f64 + hi as f64) / 2.0);
            }
        }
        self.buckets
            .last()
            .map(|&(lo, hi, _)| (lo + hi) as f64 / 2.0)
    }

    /// p50, p99 and p999 in ns.
    pub fn percentiles(&self) -> [Option<f64>; 3] {
        [
            self.quantile_ns(0.5),
            self.quantile_ns(0.99),
            self.quantile_ns(0.999),
        ]
    }
}

/// Log-scale columns for drawing: `columns` equal slices of `[lo_ns, hi_ns)` in log space.
#[derive(Debug, Clone, PartialEq)]
pub struct Columns {
    pub lo_ns: f64,
    pub hi_ns: f64,
    pub counts: Vec<u64>,
}

impl Columns {
    /// The column a latency falls in.
    pub fn column_of(&self, ns: f64) -> usize {
        let n = self.counts.len();
        if n == 0 || ns <= self.lo_ns {
            return 0;
        }
        let f = (ns / self.lo_ns).ln() / (self.hi_ns / self.lo_ns).ln();
        ((f * n as f64) as usize).min(n - 1)
    }

    /// The latency at the left edge of column `i`.
    pub fn edge_ns(&self, i: usize) -> f64 {
        let f = i as f64 / self.counts.len().max(1) as f64;
        self.lo_ns * (self.hi_ns / self.lo_ns).powf(f)
    }
}

/// The log-scale range to draw a histogram in: its non-empty range with a little room either
/// side, widened to at least one decade.
pub fn log_range(h: &Hist) -> Option<(f64, f64)> {
    let first = h.buckets.first()?;
    let last = h.buckets.last()?;
    let mut lo = (first.0.max(1) as f64) / 1.25;
    let mut hi = (last.1.max(first.0 + 1) as f64) * 1.25;
    if hi / lo < 10.0 {
        let mid = (lo * hi).sqrt();
        lo = mid / 10f64.sqrt();
        hi = mid * 10f64.sqrt();
    }
    Some((lo, hi))
}

/// The range covering two ranges (to draw two histograms on one scale).
pub fn union_range(a: Option<(f64, f64)>, b: Option<(f64, f64)>) -> Option<(f64, f64)> {
    match (a, b) {
        (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
        (a, b) => a.or(b),
    }
}

/// Spreads a histogram over `columns` equal log-scale slices of `[lo_ns, hi_ns)`; each bucket is
/// counted in the column of its midpoint (clamped to the ends).
pub fn columns_in(h: &Hist, lo_ns: f64, hi_ns: f64, columns: usize) -> Columns {
    let mut cols = Columns {
        lo_ns,
        hi_ns,
        counts: vec![0; columns],
    };
    if columns > 0 {
        for &(blo, bhi, c) in &h.buckets {
            let i = cols.column_of((blo + bhi) as f64 / 2.0);
            cols.counts[i] += c;
        }
    }
    cols
}

/// [`columns_in`] over the histogram's own [`log_range`].
pub fn log_columns(h: &Hist, columns: usize) -> Option<Columns> {
    if columns == 0 {
        return None;
    }
    let (lo, hi) = log_range(h)?;
    Some(columns_in(h, lo, hi, columns))
}

/// A latency for people: `850ns`, `12.3us`, `380us`, `1.25ms`, `2.0s` (at most 6 characters).
pub fn fmt_latency(ns: f64) -> String {
    if !ns.is_finite() || ns < 0.0 {
        return "-".into();
    }
    let (v, unit) = if ns < 1e3 {
        (ns, "ns")
    } else if ns < 1e6 {
        (ns / 1e3, "us")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    if v >= 100.0 {
        format!("{v:.0}{unit}")
    } else if v >= 10.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.2}{unit}")
    }
}

/// A count or rate for people: `950`, `12.3k`, `4.56M`.
pub fn fmt_count(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v < 1e4 {
        format!("{v:.0}")
    } else if v < 1e6 {
        format!("{:.1}k", v / 1e3)
    } else if v < 1e9 {
        format!("{:.2}M", v / 1e6)
    } else {
        format!("{:.2}G", v / 1e9)
    }
}

/// Bytes for people, in binary units: `4K`, `256K`, `1M`, `1.5M`.
pub fn fmt_bytes(v: u64) -> String {
    let v = v as f64;
    let (x, unit) = if v < 1024.0 {
        (v, "")
    } else if v < 1024.0 * 1024.0 {
        (v / 1024.0, "K")
    } else if v < 1024.0 * 1024.0 * 1024.0 {
        (v / 1024.0 / 1024.0, "M")
    } else {
        (v / 1024.0 / 1024.0 / 1024.0, "G")
    };
    if x.fract() == 0.0 || x >= 100.0 {
        format!("{x:.0}{unit}")
    } else {
        format!("{x:.1}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(b: &[(u64, u64, u64)]) -> Hist {
        Hist {
            buckets: b.to_vec(),
        }
    }

    #[test]
    fn quantiles_pick_the_bucket_of_the_rank_and_report_its_midpoint() {
        // 900 values at ~10us, 90 at ~100us, 9 at ~1ms, 1 at ~10ms.
        let h = hist(&[
            (10_000, 10_078, 900),
            (100_000, 100_781, 90),
            (1_000_000, 1_007_812, 9),
            (10_000_000, 10_078_125, 1),
        ]);
        assert_eq!(h.total(), 1000);
        assert_eq!(h.quantile_ns(0.5), Some(10_039.0));
        assert_eq!(h.quantile_ns(0.9), Some(10_039.0));
        assert_eq!(h.quantile_ns(0.99), Some(100_390.5));
        assert_eq!(h.quantile_ns(0.999), Some(1_003_906.0));
        assert_eq!(h.quantile_ns(1.0), Some(10_039_062.5));
        assert_eq!(Hist::default().quantile_ns(0.5), None);
    }

    #[test]
    fn a_window_is_the_difference_of_two_cumulative_reads() {
        let old = hist(&[(10, 11, 5), (20, 21, 7)]);
        let new = hist(&[(5, 6, 1), (10, 11, 5), (20, 21, 9), (40, 42, 3)]);
        assert_eq!(
            new.since(&old),
            hist(&[(5, 6, 1), (20, 21, 2), (40, 42, 3)])
        );
        // A restarted daemon's smaller counts never go negative.
        assert_eq!(old.since(&new), hist(&[]));
    }

    #[test]
    fn ops_merge_bucket_by_bucket() {
        let ops = vec![
            OpHistogram {
                op: "read".into(),
                count: 3,
                buckets: vec![[10, 11, 1], [20, 21, 2]],
            },
            OpHistogram {
                op: "write".into(),
                count: 4,
                buckets: vec![[20, 21, 4]],
            },
        ];
        assert_eq!(Hist::merge_ops(&ops), hist(&[(10, 11, 1), (20, 21, 6)]));
    }

    #[test]
    fn log_columns_cover_the_range_and_keep_every_count() {
        let h = hist(&[
            (1_000, 1_008, 10),
            (100_000, 100_781, 5),
            (1_000_000, 1_007_812, 1),
        ]);
        let c = log_columns(&h, 30).unwrap();
        assert_eq!(c.counts.iter().sum::<u64>(), 16);
        assert!(c.lo_ns < 1_000.0 && c.hi_ns > 1_007_812.0);
        // Three decades over 30 columns: the three buckets land far apart, in order.
        let cols: Vec<usize> = c
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(cols.len(), 3);
        assert!(
            cols[1] - cols[0] >= 15 && cols[2] - cols[1] >= 7,
            "{cols:?}"
        );
        assert!(c.edge_ns(0) == c.lo_ns && (c.edge_ns(30) - c.hi_ns).abs() < 1e-6 * c.hi_ns);
        // A narrow histogram is widened to a decade.
        let narrow = log_columns(&hist(&[(10_000, 10_078, 3)]), 10).unwrap();
        assert!(narrow.hi_ns / narrow.lo_ns >= 9.99);
        assert_eq!(log_columns(&Hist::default(), 10), None);
    }

    #[test]
    fn figures_format_short() {
        assert_eq!(fmt_latency(850.0), "850ns");
        assert_eq!(fmt_latency(12_340.0), "12.3us");
        assert_eq!(fmt_latency(380_900.0), "381us");
        assert_eq!(fmt_latency(1_250_000.0), "1.25ms");
        assert_eq!(fmt_latency(2e9), "2.00s");
        assert_eq!(fmt_count(950.0), "950");
        assert_eq!(fmt_count(52_843.0), "52.8k");
        assert_eq!(fmt_bytes(262_144), "256K");
        assert_eq!(fmt_bytes(1_572_864), "1.5M");
        assert_eq!(fmt_bytes(4096), "4K");
    }
}
