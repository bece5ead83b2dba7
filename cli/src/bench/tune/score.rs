//! Scoring, pure: figures over a stretch of a run, the oracle's best point, and a run's
//! objective as a fraction of the oracle's.

use std::collections::BTreeMap;

use enlightd::tuner::window::{quantile_ns, Window};
use enlightd::tuner::Objective;
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

/// The oracle's pick among measured grid points, as the tuner's objectives define "best":
/// throughput: most ops/s with p99 under the SLO (else the lowest p99); latency: lowest p99
/// among points within 5% of the most ops/s; balanced: fewest interrupts per op among points
/// under the SLO and within 5% of the most ops/s (else the lowest p99). A point without a
/// p99 (NaN) is taken to meet the SLO: nothing says it misses it.
pub fn best(objective: Objective, slo_us: f64, points: &[Figures]) -> Option<(usize, Figures)> {
    let max_ops = points.iter().map(|p| p.ops_per_sec).fold(0.0, f64::max);
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
        Objective::Throughput => by(&|p| -p.ops_per_sec, &meets_slo).or_else(lowest_p99),
        Objective::Latency => by(&|p| p.p99_us, &|p| p.ops_per_sec >= 0.95 * max_ops),
        Objective::Balanced => by(&|p| p.interrupts_per_op, &|p| {
            meets_slo(p) && p.ops_per_sec >= 0.95 * max_ops
        })
        .or_else(lowest_p99),
    }
}

/// `got` as a fraction of `oracle` (1.0 = as good; above 1 = better than the oracle's grid).
/// Lower-is-better objectives are inverted; missing the SLO (throughput, balanced) or falling
/// below 95% of the oracle's ops/s (latency, balanced) multiplies the fraction by the shortfall.
pub fn fraction(objective: Objective, slo_us: f64, got: &Figures, oracle: &Figures) -> f64 {
    let slo_penalty = if got.p99_us > slo_us {
        slo_us / got.p99_us
    } else {
        1.0
    };
    let floor = 0.95 * oracle.ops_per_sec;
    let ops_penalty = if got.ops_per_sec < floor {
        got.ops_per_sec / floor
    } else {
        1.0
    };
    match objective {
        Objective::Throughput => got.ops_per_sec / oracle.ops_per_sec * slo_penalty,
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
        assert_eq!(best(Objective::Throughput, 100.0, &pts).unwrap().0, 1);
        assert_eq!(best(Objective::Throughput, 70.0, &pts).unwrap().0, 2);
        // Within 5% of 120 ops/s: points 1 and 2; lowest p99 is point 2.
        assert_eq!(best(Objective::Latency, 100.0, &pts).unwrap().0, 2);
        assert_eq!(best(Objective::Balanced, 100.0, &pts).unwrap().0, 2);
        // Nothing under the SLO: the lowest p99.
        assert_eq!(best(Objective::Balanced, 10.0, &pts).unwrap().0, 3);
    }

    #[test]
    fn fractions_invert_lower_is_better_and_penalise_misses() {
        let o = f(100.0, 50.0, 0.5);
        assert!(
            (fraction(Objective::Throughput, 80.0, &f(90.0, 60.0, 1.0), &o) - 0.9).abs() < 1e-9
        );
        assert!(
            (fraction(Objective::Throughput, 80.0, &f(100.0, 160.0, 1.0), &o) - 0.5).abs() < 1e-9
        );
        assert!((fraction(Objective::Latency, 80.0, &f(100.0, 100.0, 1.0), &o) - 0.5).abs() < 1e-9);
        assert!((fraction(Objective::Balanced, 80.0, &f(100.0, 60.0, 1.0), &o) - 0.5).abs() < 1e-9);
        assert!(fraction(Objective::Latency, 80.0, &f(47.5, 50.0, 1.0), &o) < 0.51);
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
        assert_eq!(best(Objective::Throughput, 10.0, &pts).unwrap().0, 1);
        assert!(
            (fraction(Objective::Throughput, 10.0, &pts[0], &pts[1]) - 100.0 / 120.0).abs() < 1e-9
        );
        // Through JSON and back: NaN is written as null and read as NaN.
        let json = serde_json::to_string(&got).unwrap();
        assert!(json.contains("\"p99_us\":null"), "{json}");
        let back: Figures = serde_json::from_str(&json).unwrap();
        assert!(back.p99_us.is_nan());
    }
}
