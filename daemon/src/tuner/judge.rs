//! How a trial is judged: the incumbent (A) measured before *and after* the candidate (B), the
//! candidate's effect on each metric estimated with the workload's drift taken out, with a
//! confidence interval, and the keep/revert verdict as a non-inferiority test.
//!
//! **Drift.** A device's throughput moves by itself (a file filling up, a neighbour's load): a
//! candidate measured after its incumbent would be credited with the drift. So a trial is
//! A-B-A: the incumbent is measured again after the candidate, and each per-window metric is
//! fitted by least squares as `level + slope·t + effect·[window is B]`. A drift that is linear
//! over the trial lands in `slope`, not in `effect`; what is left over (curvature, noise) widens
//! the interval, so a drifting workload makes trials inconclusive rather than wrong.
//!
//! **p99.** A per-window p99 rests on a handful of tail samples, so the p99 is compared on
//! merged histograms instead: B's against A's before and after together (their mixture straddles
//! B in time, which cancels a linear drift to first order). Each p99 gets an order-statistic
//! confidence interval (the ranks `n·0.99 ± z·√(c·n·0.99·0.01)`, with completions counted in
//! groups of `c` since a stall delays its neighbours together), and the ratio's interval is
//! built from the two (conservatively).
//!
//! **Verdict.** A candidate is kept only when the intervals show, at the tuner's confidence,
//! that every constraint of the objective holds (throughput not lower than the tolerance allows,
//! p99 under the SLO) *and* that the objective improved by at least the margin. Anything else,
//! inconclusive included, is a revert: absence of evidence of harm is not evidence of no harm.
//! A trial whose objective interval lies within ±margin is *flat*: the move makes no difference
//! worth having (the search may try a longer stride), unlike an inconclusive one, which only
//! says the noise hid the answer.
//!
//! Everything here is pure (no I/O, no clock): unit-tested below, and through the decision
//! function's property tests.

use std::collections::BTreeMap;
use std::fmt;

use super::window::Window;
use super::{Objective, Signal, Throughput};

mod verdict;

use verdict::{measured, Estimates, Findings};

/// One window of a trial, with when it ended (seconds on the tuner's clock).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub t_s: f64,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub bytes_per_sec: f64,
    pub interrupts: u64,
    pub interrupts_per_op: f64,
    pub napi_polls: u64,
    pub napi_polls_per_op: f64,
    pub bytes_per_op: f64,
    /// The window's own p99, ns, when it had enough completions for one.
    pub p99_ns: Option<f64>,
    pub buckets: BTreeMap<u32, u64>,
}

/// Consecutive windows at one settings point.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Segment {
    pub samples: Vec<Sample>,
}

impl Segment {
    /// Adds a window that ended at `t_s`; windows without completions are ignored, and a
    /// window's own p99 counts from `min_p99_ops` completions.
    pub fn push(&mut self, t_s: f64, w: &Window, min_p99_ops: u64) {
        if w.ops == 0 || w.duration_s <= 0.0 {
            return;
        }
        self.samples.push(Sample {
            t_s,
            ops: w.ops,
            ops_per_sec: w.ops_per_sec(),
            bytes_per_sec: w.bytes_per_sec(),
            interrupts: w.interrupts,
            interrupts_per_op: w.interrupts_per_op(),
            napi_polls: w.napi_polls,
            napi_polls_per_op: w.napi_polls_per_op(),
            bytes_per_op: w.bytes_per_op(),
            p99_ns: (w.ops >= min_p99_ops.max(1))
                .then(|| w.quantile_ns(0.99))
                .flatten()
                .map(|v| v as f64),
            buckets: w.buckets.clone(),
        });
    }

    /// Keeps only the newest `n` windows.
    pub fn keep_last(&mut self, n: usize) {
        let excess = self.samples.len().saturating_sub(n);
        self.samples.drain(..excess);
    }

    /// Windows held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no window is held.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Completions in all windows.
    pub fn ops(&self) -> u64 {
        self.samples.iter().map(|s| s.ops).sum()
    }

    /// The windows' latency buckets merged.
    pub fn buckets(&self) -> BTreeMap<u32, u64> {
        merged([self])
    }

    /// Mean of a per-window value.
    pub fn mean(&self, f: impl Fn(&Sample) -> f64) -> Option<f64> {
        (!self.samples.is_empty())
            .then(|| self.samples.iter().map(f).sum::<f64>() / self.samples.len() as f64)
    }
}

impl Sample {
    /// The window's throughput in `unit`.
    pub fn throughput(&self, unit: Throughput) -> f64 {
        match unit {
            Throughput::Ops => self.ops_per_sec,
            Throughput::Bytes => self.bytes_per_sec,
        }
    }

    /// The window's signals per op of kind `signal`.
    pub fn signals_per_op(&self, signal: Signal) -> f64 {
        match signal {
            Signal::Interrupts => self.interrupts_per_op,
            Signal::NapiPolls => self.napi_polls_per_op,
        }
    }
}

/// The signal `balanced` judges over these segments together ([`Signal::of`] their totals):
/// one for the whole trial, so both sides are measured in the same unit.
pub fn signal_of<'a>(segments: impl IntoIterator<Item = &'a Segment>) -> Signal {
    let (mut irq, mut polls) = (0, 0);
    for s in segments {
        for w in &s.samples {
            irq += w.interrupts;
            polls += w.napi_polls;
        }
    }
    Signal::of(irq, polls)
}

fn merged<'a>(segments: impl IntoIterator<Item = &'a Segment>) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for s in segments {
        for w in &s.samples {
            for (b, n) in &w.buckets {
                *out.entry(*b).or_default() += n;
            }
        }
    }
    out
}

/// A candidate's estimated effect on one metric, relative to the incumbent's level at the
/// candidate's time: `estimate` with the interval `[lo, hi]` (fractions: -0.05 is 5% lower).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Effect {
    pub metric: &'static str,
    pub estimate: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Effect {
    /// Confidently below zero.
    pub fn lower(&self) -> bool {
        self.hi < 0.0
    }
    /// Confidently above zero.
    pub fn higher(&self) -> bool {
        self.lo > 0.0
    }
    /// The whole interval within ±`margin`: no difference worth having.
    pub fn within(&self, margin: f64) -> bool {
        self.lo >= -margin && self.hi <= margin
    }
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:+.1}%", v * 100.0)
    } else if v > 0.0 {
        "+∞".into()
    } else {
        "−∞".into()
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} [{}, {}]",
            self.metric,
            pct(self.estimate),
            pct(self.lo),
            pct(self.hi)
        )
    }
}

/// The two-sided critical value of Student's t with `df` degrees of freedom at the confidence of
/// the normal quantile `z` (Cornish-Fisher expansion; within 1% of the exact value for `df ≥ 3`
/// at the z values a tuner uses, and conservative below).
pub fn t_critical(z: f64, df: usize) -> f64 {
    if df == 0 {
        return f64::INFINITY;
    }
    let n = df as f64;
    let (z3, z5, z7) = (z.powi(3), z.powi(5), z.powi(7));
    z + (z3 + z) / (4.0 * n)
        + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * n * n)
        + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * n * n * n)
}

/// Least-squares fit of `y = level + slope·(t - t̄) + effect·[B]` (the slope only when A was
/// measured on both sides of B, where it can be told from the effect), with the effect relative
/// to A's fitted level at B's mean time and its interval at `z`.
pub fn drift_corrected(
    metric: &'static str,
    a: &[(f64, f64)],
    b: &[(f64, f64)],
    z: f64,
) -> Option<Effect> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let tb_min = b.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let tb_max = b.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let with_slope = a.iter().any(|p| p.0 < tb_min) && a.iter().any(|p| p.0 > tb_max);
    let rows: Vec<(f64, f64, f64)> = a
        .iter()
        .map(|&(t, y)| (t, 0.0, y))
        .chain(b.iter().map(|&(t, y)| (t, 1.0, y)))
        .collect();
    let n = rows.len();
    let k = if with_slope { 3 } else { 2 };
    if n <= k {
        return None;
    }
    let tbar = rows.iter().map(|r| r.0).sum::<f64>() / n as f64;
    // Columns: 1, isB, (t - t̄) when fitted.
    let x =
        |r: &(f64, f64, f64)| -> [f64; 3] { [1.0, r.1, if with_slope { r.0 - tbar } else { 0.0 }] };
    let mut xtx = [[0.0f64; 3]; 3];
    let mut xty = [0.0f64; 3];
    for r in &rows {
        let v = x(r);
        for i in 0..3 {
            xty[i] += v[i] * r.2;
            for j in 0..3 {
                xtx[i][j] += v[i] * v[j];
            }
        }
    }
    if !with_slope {
        // A unit diagonal keeps the matrix invertible; the slope's column is all zeros, so its
        // coefficient is zero and nothing else changes.
        xtx[2][2] = 1.0;
    }
    let inv = invert3(&xtx)?;
    let beta: Vec<f64> = (0..3)
        .map(|i| (0..3).map(|j| inv[i][j] * xty[j]).sum())
        .collect();
    let rss: f64 = rows
        .iter()
        .map(|r| {
            let v = x(r);
            let fit: f64 = (0..3).map(|i| v[i] * beta[i]).sum();
            (r.2 - fit).powi(2)
        })
        .sum();
    let df = n - k;
    let s2 = rss / df as f64;
    let se = (s2 * inv[1][1]).max(0.0).sqrt();
    let tb_mean = b.iter().map(|p| p.0).sum::<f64>() / b.len() as f64;
    let level = beta[0] + beta[2] * (tb_mean - tbar);
    // Every metric judged here is positive; a level at or below zero has no relative effect.
    if !(level.is_finite() && level > 1e-12) {
        return None;
    }
    let half = t_critical(z, df) * se;
    let d = beta[1];
    Some(Effect {
        metric,
        estimate: d / level,
        lo: (d - half) / level,
        hi: (d + half) / level,
    })
}

fn invert3(m: &[[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let scale = m.iter().flatten().map(|v| v.abs()).fold(0.0, f64::max);
    if !det.is_finite() || det.abs() <= 1e-12 * scale.powi(3) {
        return None;
    }
    let c =
        |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    let adj = [
        [c(1, 2, 1, 2), -c(0, 2, 1, 2), c(0, 1, 1, 2)],
        [-c(1, 2, 0, 2), c(0, 2, 0, 2), -c(0, 1, 0, 2)],
        [c(1, 2, 0, 1), -c(0, 2, 0, 1), c(0, 1, 0, 1)],
    ];
    let mut out = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            out[i][j] = adj[i][j] / det;
        }
    }
    Some(out)
}

/// The quantile `q` of merged latency buckets with its order-statistic interval at `z`
/// (completions counted in groups of `cluster`): `(lo_ns, value_ns, hi_ns)`, `hi_ns` infinite
/// when too few completions lie above the quantile to bound it.
pub fn quantile_ci(
    buckets: &BTreeMap<u32, u64>,
    q: f64,
    z: f64,
    cluster: f64,
) -> Option<(f64, f64, f64)> {
    use enlight_probes::hist::{bucket_high_ns, bucket_low_ns, bucket_mid_ns};
    let n: u64 = buckets.values().sum();
    if n == 0 {
        return None;
    }
    let nf = n as f64;
    let sd = (cluster.max(1.0) * nf * q * (1.0 - q)).sqrt();
    let at_rank = |rank: f64| -> Option<u32> {
        if rank > nf {
            return None;
        }
        let rank = (rank.ceil() as u64).max(1);
        let mut seen = 0;
        buckets.iter().find_map(|(b, c)| {
            seen += c;
            (seen >= rank).then_some(*b)
        })
    };
    let mid = at_rank(q * nf)?;
    let lo = at_rank((q * nf - z * sd).max(1.0))?;
    let hi = at_rank(q * nf + z * sd + 1.0);
    Some((
        bucket_low_ns(lo) as f64,
        bucket_mid_ns(mid) as f64,
        hi.map_or(f64::INFINITY, |b| bucket_high_ns(b) as f64),
    ))
}

/// How much more the tail counts of windows vary than binomial sampling explains: windows'
/// completions above the quantile `q` of their group's merged histogram, against the group's
/// share (a quasi-binomial dispersion, pooled over the groups; 1 when there is no extra
/// variation, or when too few windows tell). A stall, a neighbour's burst or a p99 that moves
/// from window to window puts whole groups of completions in the tail together; the p99
/// intervals widen by it.
pub fn tail_dispersion(groups: &[&[&Segment]], q: f64) -> f64 {
    let (mut chi2, mut dof) = (0.0, 0usize);
    for segs in groups {
        let buckets = merged(segs.iter().copied());
        let n: u64 = buckets.values().sum();
        if n == 0 {
            continue;
        }
        let rank = ((q * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        let Some(at) = buckets.iter().find_map(|(b, c)| {
            seen += c;
            (seen >= rank).then_some(*b)
        }) else {
            continue;
        };
        let windows: Vec<&Sample> = segs.iter().flat_map(|s| s.samples.iter()).collect();
        let tail = |w: &Sample| w.buckets.range(at + 1..).map(|(_, c)| *c).sum::<u64>();
        let k: u64 = windows.iter().map(|w| tail(w)).sum();
        if k == 0 || k == n {
            // Nothing (or everything) above the quantile in every window: no variation.
            dof += windows.len().saturating_sub(1);
            continue;
        }
        let p = k as f64 / n as f64;
        for w in &windows {
            let e = w.ops as f64 * p;
            chi2 += (tail(w) as f64 - e).powi(2) / (e * (1.0 - p)).max(1e-9);
        }
        dof += windows.len().saturating_sub(1);
    }
    if dof == 0 {
        1.0
    } else {
        (chi2 / dof as f64).max(1.0)
    }
}

/// Whether the p99 of `seg` is under `slo_ns` with confidence (`Some(true)`), over it
/// (`Some(false)`), or neither: a quasi-binomial test of the share of completions above the SLO
/// against 1%, its variance widened by `cluster` or by how much more the windows' counts above
/// the SLO vary than binomial sampling explains, whichever is more.
pub fn p99_against_slo(seg: &Segment, slo_ns: u64, z: f64, cluster: f64) -> Option<bool> {
    let at = enlight_probes::hist::bucket_index(slo_ns);
    let above = |w: &Sample| w.buckets.range(at + 1..).map(|(_, c)| *c).sum::<u64>();
    // Completions with a latency, not ops: a device that measures no latency (a kernel NIC
    // counts packets only) has ops and no buckets, and its p99 is unknown, not under the SLO.
    let timed = |w: &Sample| w.buckets.values().sum::<u64>();
    let n: u64 = seg.samples.iter().map(timed).sum();
    if n == 0 {
        return None;
    }
    let k: u64 = seg.samples.iter().map(above).sum();
    let p_hat = (k as f64 / n as f64).clamp(1e-4, 1.0 - 1e-4);
    let chi2: f64 = seg
        .samples
        .iter()
        .map(|w| {
            let e = timed(w) as f64 * p_hat;
            (above(w) as f64 - e).powi(2) / (e * (1.0 - p_hat))
        })
        .sum();
    let phi = if seg.len() > 1 {
        (chi2 / (seg.len() - 1) as f64).max(1.0)
    } else {
        1.0
    };
    let (nf, kf) = (n as f64, k as f64);
    let sd = (cluster.max(phi) * nf * 0.01 * 0.99).sqrt();
    let zscore = (0.01 * nf - kf) / sd.max(1e-9);
    if zscore > z {
        Some(true)
    } else if zscore < -z {
        Some(false)
    } else {
        None
    }
}

/// The candidate's p99 against the incumbent's, relative, from merged histograms, each p99's
/// interval widened by `cluster` (completions that stall together).
pub fn p99_effect(
    a: &BTreeMap<u32, u64>,
    b: &BTreeMap<u32, u64>,
    z: f64,
    cluster: f64,
) -> Option<Effect> {
    let (alo, amid, ahi) = quantile_ci(a, 0.99, z, cluster)?;
    let (blo, bmid, bhi) = quantile_ci(b, 0.99, z, cluster)?;
    if amid <= 0.0 || alo <= 0.0 {
        return None;
    }
    Some(Effect {
        metric: "p99",
        estimate: bmid / amid - 1.0,
        lo: blo / ahi - 1.0,
        hi: bhi / alo - 1.0,
    })
}

/// What a trial showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every constraint holds and the objective improved, at the tuner's confidence: keep.
    Better,
    /// The objective's interval lies within ±margin and nothing is confidently broken: revert
    /// (the move does nothing worth a change).
    Flat,
    /// A constraint confidently broken, or the objective confidently worse: revert.
    Worse,
    /// The intervals are too wide to tell: revert.
    Inconclusive,
}

/// What the judge needs to know besides the windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    pub objective: Objective,
    /// What throughput is counted in (a NIC's bytes/s, a disk's ops/s): the objective of
    /// `throughput`, the guard of `latency` and `balanced`.
    pub throughput: Throughput,
    /// p99 SLO, ns (throughput and balanced).
    pub slo_p99_ns: u64,
    /// Normal quantile of the confidence (the tuner's `z`).
    pub z: f64,
    /// Smallest relative improvement kept; also the band of "flat".
    pub margin: f64,
    /// Largest throughput loss allowed (latency and balanced), relative.
    pub tolerance: f64,
    /// Completions counted as one in the p99 intervals.
    pub cluster: f64,
    /// Throughput already given up in this phase by kept changes (their estimated effects
    /// multiplied: 0.98 after one change that cost 2%); the tolerance bounds the total.
    pub ops_budget: f64,
}

/// A trial's verdict and the effects it rests on.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub verdict: Verdict,
    /// Why, in words, with the figures.
    pub why: String,
    /// Effects on throughput (ops/s or bytes/s), interrupts/op (or NAPI polls/op) and p99,
    /// where measurable.
    pub effects: Vec<Effect>,
    /// The throughput effect's estimate (for the throughput budget).
    pub ops_estimate: Option<f64>,
    /// Whether the drift was measured (the incumbent on both sides of the candidate).
    pub drift_corrected: bool,
    /// The objective improved by at least the margin at the tuner's confidence (for an
    /// incumbent over the SLO: p99 back under it, or confidently lower), whatever the
    /// constraints.
    pub objective_improved: bool,
    /// A constraint is confidently broken.
    pub constraint_broken: bool,
    /// The objective's estimated relative improvement (positive: better), if measurable.
    pub gain: Option<f64>,
    /// Half the width of the objective's interval (relative; infinite where a bound is), if
    /// measurable: how far `gain` is from being shown, for the decision whether more rounds
    /// could show it.
    pub gain_half_width: Option<f64>,
}

impl Judgement {
    /// Whether the candidate is kept.
    pub fn keep(&self) -> bool {
        self.verdict == Verdict::Better
    }
}

/// Judges a trial: the incumbent's windows `a_before` and `a_after` around the candidate's `b`
/// (`a_after` empty while the candidate is still being measured: then without drift
/// correction, which only serves to stop a plainly bad candidate early).
pub fn judge(r: &Rules, a_before: &Segment, b: &Segment, a_after: &Segment) -> Judgement {
    let e = Estimates::of(r, a_before, b, a_after);
    let f = Findings::of(r, &e, b);
    let (verdict, why) = f.verdict(r);
    let effects: Vec<Effect> = [e.ops, e.irq, e.p99].into_iter().flatten().collect();
    Judgement {
        verdict,
        why: format!("{why}; {}", measured(a_before, b, a_after, &effects)),
        ops_estimate: e.ops.map(|o| o.estimate),
        drift_corrected: !a_after.is_empty(),
        objective_improved: f.objective_improved(),
        constraint_broken: f.constraint_broken(),
        gain: f.objective.map(|o| {
            if f.lower_is_better {
                -o.estimate
            } else {
                o.estimate
            }
        }),
        gain_half_width: f.objective.map(|o| (o.hi - o.lo) / 2.0),
        effects,
    }
}

#[cfg(test)]
mod tests;
