//! Scoring, pure: figures over a stretch of a run, the oracle's best point, and a run's
//! objective as a fraction of the oracle's.

use std::collections::BTreeMap;

use enlightd::tuner::window::{quantile_ns, Window};
use enlightd::tuner::{Objective, Throughput};
use serde::{Deserialize, Serialize};

/// Figures of a stretch of time (windows merged: totals, not averages of averages).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub ops_per_sec: f64,
    /// Bytes of those ops per second (a kernel NIC's packets: their bytes).
    #[serde(default)]
    pub bytes_per_sec: f64,
    /// NaN when the windows have no latency at all (a kernel NIC under TCP: enlightd measures
    /// no latency for NICs, and the bench adds one only from ping's round trips). Written to
    /// JSON as null.
    #[serde(deserialize_with = "nan_if_null")]
    pub p99_us: f64,
    pub interrupts_per_op: f64,
    pub ops: u64,
}

impl Figures {
    /// Throughput in `unit` (a NIC's bytes/s, a disk's ops/s).
    pub fn throughput(&self, unit: Throughput) -> f64 {
        match unit {
            Throughput::Ops => self.ops_per_sec,
            Throughput::Bytes => self.bytes_per_sec,
        }
    }
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Merges windows into figures (`None` without completions; a p99 of NaN without latency
/// buckets).
pub fn merge<'a>(windows: impl IntoIterator<Item = &'a Window>) -> Option<Figures> {
    let mut buckets: BTreeMap<u32, u64> = BTreeMap::new();
    let (mut ops, mut bytes, mut irq, mut secs) = (0u64, 0u64, 0u64, 0f64);
    for w in windows {
        ops += w.ops;
        bytes += w.bytes;
        irq += w.interrupts;
        secs += w.duration_s;
        for (b, n) in &w.buckets {
            *buckets.entry(*b).or_default() += n;
        }
    }
    if ops == 0 || secs <= 0.0 {
        return None;
    }
    Some(Figures {
        ops_per_sec: ops as f64 / secs,
        bytes_per_sec: bytes as f64 / secs,
        p99_us: quantile_ns(&buckets, 0.99).map_or(f64::NAN, |ns| ns as f64 / 1e3),
        interrupts_per_op: irq as f64 / ops as f64,
        ops,
    })
}

/// The oracle's pick among measured grid points, as the tuner's objectives define "best", with
/// throughput counted in `unit` as the tuner counts it (a NIC's bytes/s, a disk's ops/s):
/// throughput: the most of it with p99 under the SLO (else the lowest p99); latency: lowest p99
/// among points within 5% of the most throughput; balanced: fewest interrupts per op among
/// points under the SLO and within 5% of the most throughput (else the lowest p99). A point
/// without a p99 (NaN) is taken to meet the SLO: nothing says it misses it.
pub fn best(
    objective: Objective,
    unit: Throughput,
    slo_us: f64,
    points: &[Figures],
) -> Option<(usize, Figures)> {
    let max_ops = points
        .iter()
        .map(|p| p.throughput(unit))
        .fold(0.0, f64::max);
    let by = |f: &dyn Fn(&Figures) -> f64, keep: &dyn Fn(&Figures) -> bool| {
        points
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, p)| keep(p))
            .min_by(|a, b| f(&a.1).total_cmp(&f(&b.1)))
    };
    let lowest_p99 = || by(&|p| p.p99_us, &|_| true);
    let meets_slo = |p: &Figures| p.p99_us.is_nan() || p.p99_us <= slo_us;
    match objective {
        Objective::Throughput => by(&|p| -p.throughput(unit), &meets_slo).or_else(lowest_p99),
        Objective::Latency => by(&|p| p.p99_us, &|p| p.throughput(unit) >= 0.95 * max_ops),
        Objective::Balanced => by(&|p| p.interrupts_per_op, &|p| {
            meets_slo(p) && p.throughput(unit) >= 0.95 * max_ops
        })
        .or_else(lowest_p99),
    }
}

/// `got` as a fraction of `oracle` (1.0 = as good; above 1 = better than the oracle's grid),
/// throughput counted in `unit`. Lower-is-better objectives are inverted; missing the SLO
/// (throughput, balanced) or falling below 95% of the oracle's throughput (latency, balanced)
/// multiplies the fraction by the shortfall.
pub fn fraction(
    objective: Objective,
    unit: Throughput,
    slo_us: f64,
    got: &Figures,
    oracle: &Figures,
) -> f64 {
    let slo_penalty = if got.p99_us > slo_us {
        slo_us / got.p99_us
    } else {
        1.0
    };
    let floor = 0.95 * oracle.throughput(unit);
    let ops_penalty = if got.throughput(unit) < floor {
        got.throughput(unit) / floor
    } else {
        1.0
    };
    match objective {
        Objective::Throughput => got.throughput(unit) / oracle.throughput(unit) * slo_penalty,
        Objective::Latency => oracle.p99_us / got.p99_us * ops_penalty,
        Objective::Balanced => {
            let base = if got.interrupts_per_op <= 0.0 {
                1.0
            } else {
                (oracle.interrupts_per_op / got.interrupts_per_op).min(1e6)
            };
            base * slo_penalty * ops_penalty
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(ops: f64, p99: f64, irq: f64) -> Figures {
        Figures {
            ops_per_sec: ops,
            bytes_per_sec: ops * 4096.0,
            p99_us: p99,
            interrupts_per_op: irq,
            ops: 1000,
        }
    }

    #[test]
    fn the_oracle_picks_by_objective() {
        let pts = [
            f(100.0, 50.0, 1.0),
            f(120.0, 90.0, 0.5),
            f(118.0, 60.0, 0.2),
            f(60.0, 20.0, 0.1),
        ];
        assert_eq!(
            best(Objective::Throughput, Throughput::Ops, 100.0, &pts)
                .unwrap()
                .0,
            1
        );
        assert_eq!(
            best(Objective::Throughput, Throughput::Ops, 70.0, &pts)
                .unwrap()
                .0,
            2
        );
        // Within 5% of 120 ops/s: points 1 and 2; lowest p99 is point 2.
        assert_eq!(
            best(Objective::Latency, Throughput::Ops, 100.0, &pts)
                .unwrap()
                .0,
            2
        );
        assert_eq!(
            best(Objective::Balanced, Throughput::Ops, 100.0, &pts)
                .unwrap()
                .0,
            2
        );
        // Nothing under the SLO: the lowest p99.
        assert_eq!(
            best(Objective::Balanced, Throughput::Ops, 10.0, &pts)
                .unwrap()
                .0,
            3
        );
    }

    #[test]
    fn fractions_invert_lower_is_better_and_penalise_misses() {
        let o = f(100.0, 50.0, 0.5);
        assert!(
            (fraction(
                Objective::Throughput,
                Throughput::Ops,
                80.0,
                &f(90.0, 60.0, 1.0),
                &o
            ) - 0.9)
                .abs()
                < 1e-9
        );
        assert!(
            (fraction(
                Objective::Throughput,
                Throughput::Ops,
                80.0,
                &f(100.0, 160.0, 1.0),
                &o
            ) - 0.5)
                .abs()
                < 1e-9
        );
        assert!(
            (fraction(
                Objective::Latency,
                Throughput::Ops,
                80.0,
                &f(100.0, 100.0, 1.0),
                &o
            ) - 0.5)
                .abs()
                < 1e-9
        );
        assert!(
            (fraction(
                Objective::Balanced,
                Throughput::Ops,
                80.0,
                &f(100.0, 60.0, 1.0),
                &o
            ) - 0.5)
                .abs()
                < 1e-9
        );
        assert!(
            fraction(
                Objective::Latency,
                Throughput::Ops,
                80.0,
                &f(47.5, 50.0, 1.0),
                &o
            ) < 0.51
        );
    }

    #[test]
    fn figures_without_latency_have_no_p99_and_meet_any_slo() {
        let w = Window {
            duration_s: 2.0,
            ops: 1000,
            bytes: 1_500_000,
            ..Default::default()
        };
        let got = merge([&w]).unwrap();
        assert!(got.p99_us.is_nan());
        assert_eq!((got.ops_per_sec, got.bytes_per_sec), (500.0, 750_000.0));
        let pts = [f(100.0, f64::NAN, 0.0), f(120.0, f64::NAN, 0.0)];
        assert_eq!(
            best(Objective::Throughput, Throughput::Ops, 10.0, &pts)
                .unwrap()
                .0,
            1
        );
        assert!(
            (fraction(
                Objective::Throughput,
                Throughput::Ops,
                10.0,
                &pts[0],
                &pts[1]
            ) - 100.0 / 120.0)
                .abs()
                < 1e-9
        );
        // Through JSON and back: NaN is written as null and read as NaN.
        let json = serde_json::to_string(&got).unwrap();
        assert!(json.contains("\"p99_us\":null"), "{json}");
        let back: Figures = serde_json::from_str(&json).unwrap();
        assert!(back.p99_us.is_nan());
    }

    #[test]
    fn a_nic_is_scored_on_its_bytes() {
        // kernel-tcp, run 2: a point with 41% more packets/s than static but 26% fewer bytes/s.
        let mut static_ = f(10_000.0, f64::NAN, 0.0);
        static_.bytes_per_sec = 671e6;
        let mut kept = f(14_100.0, f64::NAN, 0.0);
        kept.bytes_per_sec = 493e6;
        let pts = [static_, kept];
        assert_eq!(
            best(Objective::Throughput, Throughput::Ops, 10.0, &pts)
                .unwrap()
                .0,
            1
        );
        assert_eq!(
            best(Objective::Throughput, Throughput::Bytes, 10.0, &pts)
                .unwrap()
                .0,
            0
        );
        let v = fraction(
            Objective::Throughput,
            Throughput::Bytes,
            10.0,
            &kept,
            &static_,
        );
        assert!((v - 493.0 / 671.0).abs() < 1e-9, "{v}");
        // Latency's throughput floor is in bytes too: 26% fewer bytes is a shortfall.
        let (mut fast, mut slow) = (kept, static_);
        fast.p99_us = 50.0;
        slow.p99_us = 50.0;
        let v = fraction(Objective::Latency, Throughput::Bytes, 10.0, &fast, &slow);
        assert!((v - 493.0 / (0.95 * 671.0)).abs() < 1e-9, "{v}");
        assert_eq!(
            fraction(Objective::Latency, Throughput::Ops, 10.0, &fast, &slow),
            1.0
        );
    }
}
