//! Windowed histograms: what happened on a device during one interval, as the difference of two
//! cumulative readings of the eBPF-fed counters and latency buckets.
//!
//! The kernel keeps cumulative per-bucket counts; the difference of two readings is the exact
//! histogram of the completions in between, so a window's p99 is the p99 of that interval's I/O
//! (to the bucket width, under 1/128), not a running average.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Cumulative counters of one device, all ops together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cumulative {
    pub ops: u64,
    pub bytes: u64,
    pub interrupts: u64,
    pub ring_full: u64,
    /// NAPI polls (kernel NICs; 0 elsewhere): `balanced`'s signal where no interrupt is seen.
    #[serde(default)]
    pub napi_polls: u64,
    /// Kernel latency bucket index → count.
    pub buckets: BTreeMap<u32, u64>,
}

impl Cumulative {
    /// Sums the per-op figures and signalling counters the collector keeps.
    pub fn from_figures<'a>(
        ops: impl IntoIterator<Item = &'a crate::model::OpFigures>,
        events: &enlight_probes::DevEvents,
    ) -> Cumulative {
        let mut c = Cumulative {
            interrupts: events.interrupts,
            ring_full: events.ring_full_in + events.ring_full_out,
            ..Default::default()
        };
        for f in ops {
            c.ops += f.ops;
            c.bytes += f.bytes;
            for (b, n) in &f.buckets {
                *c.buckets.entry(*b).or_default() += n;
            }
        }
        c
    }
}

/// One interval of one device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Length of the interval, seconds.
    pub duration_s: f64,
    pub ops: u64,
    pub bytes: u64,
    /// Host → guest signals.
    pub interrupts: u64,
    /// Writers that found a ring full.
    pub ring_full: u64,
    /// NAPI polls (kernel NICs).
    #[serde(default)]
    pub napi_polls: u64,
    /// Latency bucket index → completions in this interval.
    pub buckets: BTreeMap<u32, u64>,
}

impl Window {
    /// The interval between two readings. A counter that went backwards (a device restarted
    /// without the collector carrying its totals) gives an empty window rather than garbage.
    pub fn between(prev: &Cumulative, now: &Cumulative, duration_s: f64) -> Window {
        if now.ops < prev.ops || now.interrupts < prev.interrupts {
            return Window {
                duration_s,
                ..Default::default()
            };
        }
        let mut buckets = BTreeMap::new();
        for (b, n) in &now.buckets {
            let d = n.saturating_sub(prev.buckets.get(b).copied().unwrap_or(0));
            if d > 0 {
                buckets.insert(*b, d);
            }
        }
        Window {
            duration_s,
            ops: now.ops - prev.ops,
            bytes: now.bytes.saturating_sub(prev.bytes),
            interrupts: now.interrupts - prev.interrupts,
            ring_full: now.ring_full.saturating_sub(prev.ring_full),
            napi_polls: now.napi_polls.saturating_sub(prev.napi_polls),
            buckets,
        }
    }

    /// A window of `ops` completions all at `latency_ns` (tests and simulations).
    pub fn uniform(duration_s: f64, ops: u64, latency_ns: u64, interrupts: u64) -> Window {
        let mut buckets = BTreeMap::new();
        if ops > 0 {
            buckets.insert(enlight_probes::hist::bucket_index(latency_ns), ops);
        }
        Window {
            duration_s,
            ops,
            bytes: ops * 4096,
            interrupts,
            ring_full: 0,
            napi_polls: 0,
            buckets,
        }
    }

    /// Completions per second.
    pub fn ops_per_sec(&self) -> f64 {
        if self.duration_s > 0.0 {
            self.ops as f64 / self.duration_s
        } else {
            0.0
        }
    }

    /// Bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        if self.duration_s > 0.0 {
            self.bytes as f64 / self.duration_s
        } else {
            0.0
        }
    }

    /// Throughput in `unit`.
    pub fn throughput(&self, unit: super::Throughput) -> f64 {
        match unit {
            super::Throughput::Ops => self.ops_per_sec(),
            super::Throughput::Bytes => self.bytes_per_sec(),
        }
    }

    /// NAPI polls per completion (0 without completions).
    pub fn napi_polls_per_op(&self) -> f64 {
        if self.ops > 0 {
            self.napi_polls as f64 / self.ops as f64
        } else {
            0.0
        }
    }

    /// Interrupts per completion (0 without completions).
    pub fn interrupts_per_op(&self) -> f64 {
        if self.ops > 0 {
            self.interrupts as f64 / self.ops as f64
        } else {
            0.0
        }
    }

    /// Average bytes per completion.
    pub fn bytes_per_op(&self) -> f64 {
        if self.ops > 0 {
            self.bytes as f64 / self.ops as f64
        } else {
            0.0
        }
    }

    /// The latency quantile `q` in ns (the middle of its bucket), `None` without completions.
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        quantile_ns(&self.buckets, q)
    }
}

/// The quantile `q` of a bucket map, in ns: the middle of the bucket holding the
/// `ceil(q * total)`-th completion.
pub fn quantile_ns(buckets: &BTreeMap<u32, u64>, q: f64) -> Option<u64> {
    let total: u64 = buckets.values().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (b, n) in buckets {
        seen += n;
        if seen >= rank {
            return Some(enlight_probes::hist::bucket_mid_ns(*b));
        }
    }
    buckets
        .keys()
        .next_back()
        .map(|b| enlight_probes::hist::bucket_mid_ns(*b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use enlight_probes::hist::bucket_index;

    fn cum(ops: u64, lat: &[(u64, u64)], irq: u64) -> Cumulative {
        let mut c = Cumulative {
            ops,
            bytes: ops * 4096,
            interrupts: irq,
            ..Default::default()
        };
        for (l, n) in lat {
            *c.buckets.entry(bucket_index(*l)).or_default() += n;
        }
        c
    }

    #[test]
    fn a_window_is_the_difference_of_two_readings() {
        let a = cum(1000, &[(10_000, 1000)], 100);
        let b = cum(2000, &[(10_000, 1000), (50_000, 990), (900_000, 10)], 150);
        let w = Window::between(&a, &b, 0.5);
        assert_eq!((w.ops, w.interrupts), (1000, 50));
        assert_eq!(w.ops_per_sec(), 2000.0);
        assert_eq!(w.interrupts_per_op(), 0.05);
        // The old 10 us completions are not in this window: its p50 is 50 us, its p99 50 us and
        // its p99.9 the 900 us tail.
        let p50 = w.quantile_ns(0.5).unwrap() as f64;
        assert!((p50 - 50_000.0).abs() / 50_000.0 < 0.01, "{p50}");
        assert!((w.quantile_ns(0.99).unwrap() as f64 - 50_000.0).abs() < 500.0);
        assert!((w.quantile_ns(0.999).unwrap() as f64 - 900_000.0).abs() / 9e5 < 0.01);
    }

    #[test]
    fn counters_going_backwards_give_an_empty_window() {
        let a = cum(1000, &[(10_000, 1000)], 100);
        let b = cum(10, &[(10_000, 10)], 1);
        let w = Window::between(&a, &b, 1.0);
        assert_eq!(w.ops, 0);
        assert_eq!(w.quantile_ns(0.99), None);
    }
}
