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
}

impl Judgement {
    /// Whether the candidate is kept.
    pub fn keep(&self) -> bool {
        self.verdict == Verdict::Better
    }
}

/// What a trial measured: each metric's drift-corrected effect and the latency histograms.
struct Estimates {
    /// Throughput, in the device's unit.
    ops: Option<Effect>,
    /// Signals (interrupts or NAPI polls) per op, of kind `signal`.
    irq: Option<Effect>,
    signal: Signal,
    p99: Option<Effect>,
    /// The incumbent's windows' latency buckets, before and after the candidate, merged.
    a_buckets: BTreeMap<u32, u64>,
    b_buckets: BTreeMap<u32, u64>,
    /// How many tail completions come together (for the order-statistic intervals).
    cluster: f64,
}

impl Estimates {
    fn of(r: &Rules, a_before: &Segment, b: &Segment, a_after: &Segment) -> Estimates {
        let points = |segs: &[&Segment], f: &dyn Fn(&Sample) -> f64| -> Vec<(f64, f64)> {
            segs.iter()
                .flat_map(|s| s.samples.iter().map(|w| (w.t_s, f(w))))
                .collect()
        };
        let a_segs = [a_before, a_after];
        let unit = r.throughput;
        // `ops` is the throughput in the device's unit (its effect is named by it).
        let ops = drift_corrected(
            unit.name(),
            &points(&a_segs, &|w| w.throughput(unit)),
            &points(&[b], &|w| w.throughput(unit)),
            r.z,
        );
        let signal = signal_of([a_before, b, a_after]);
        let irq = drift_corrected(
            signal.per_op(),
            &points(&a_segs, &|w| w.signals_per_op(signal)),
            &points(&[b], &|w| w.signals_per_op(signal)),
            r.z,
        );
        let a_buckets = merged(a_segs);
        let b_buckets = b.buckets();
        // Completions in the tail come in groups: at least `cluster`, more when the windows'
        // tail counts say so.
        let cluster = r
            .cluster
            .max(tail_dispersion(&[&[a_before, a_after], &[b]], 0.99));
        // The p99's effect from the windows' own p99s, drift-corrected, when each side has at
        // least two (their spread is the honest noise, whatever groups the tail comes in);
        // otherwise from the merged histograms.
        let known = |v: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
            v.into_iter().filter(|p| p.1.is_finite()).collect()
        };
        let a_p99s = known(points(&a_segs, &|w| w.p99_ns.unwrap_or(f64::NAN)));
        let b_p99s = known(points(&[b], &|w| w.p99_ns.unwrap_or(f64::NAN)));
        let p99 = if a_p99s.len() >= 2 && b_p99s.len() >= 2 {
            drift_corrected("p99", &a_p99s, &b_p99s, r.z)
        } else {
            None
        }
        .or_else(|| p99_effect(&a_buckets, &b_buckets, r.z, cluster));
        Estimates {
            ops,
            irq,
            signal,
            p99,
            a_buckets,
            b_buckets,
            cluster,
        }
    }
}

/// What the estimates say against the objective and its constraints, before a verdict.
struct Findings {
    /// The objective's effect, and whether lower is better for it.
    objective: Option<Effect>,
    lower_is_better: bool,
    objective_name: String,
    /// The objective improved (or worsened) confidently by at least the margin; or its whole
    /// interval lies within ±margin.
    improved: bool,
    worse: bool,
    flat: bool,
    /// Which constraints the objective has: throughput (latency, balanced) and the SLO
    /// (throughput, balanced, where latency is measured at all).
    guard_ops: bool,
    guard_slo: bool,
    /// Throughput shown to hold within the tolerance, or confidently below it.
    ops_ok: bool,
    ops_broken: bool,
    /// The incumbent met the SLO; the candidate is confidently under or over it; its p99 is
    /// confidently lower by at least the margin.
    a_feasible: bool,
    b_under: bool,
    b_over: bool,
    p99_better: bool,
    /// The candidate's p99, ns (the middle of its interval), if any.
    b_p99_ns: Option<f64>,
}

impl Findings {
    fn of(r: &Rules, e: &Estimates, b: &Segment) -> Findings {
        // Throughput not lower than the tolerance allows (latency and balanced).
        let floor = 1.0 - r.tolerance;
        let ops_ok = e.ops.is_some_and(|o| r.ops_budget * (1.0 + o.lo) >= floor);
        let ops_broken = e.ops.is_some_and(|o| r.ops_budget * (1.0 + o.hi) < floor);
        // p99 under the SLO (throughput and balanced), and whether the incumbent met it.
        let slo = r.slo_p99_ns as f64;
        let a_feasible =
            quantile_ci(&e.a_buckets, 0.99, r.z, e.cluster).is_some_and(|(_, mid, _)| mid <= slo);
        let b_slo = p99_against_slo(b, r.slo_p99_ns, r.z, r.cluster);
        let p99_better = e.p99.is_some_and(|p| p.lower() && p.estimate <= -r.margin);
        let objective_name = match r.objective {
            Objective::Throughput => format!("throughput ({})", r.throughput.name()),
            Objective::Latency => "latency (p99)".to_string(),
            Objective::Balanced => format!("balanced ({})", e.signal.per_op()),
        };
        let (objective, lower_is_better) = match r.objective {
            Objective::Throughput => (e.ops, false),
            Objective::Latency => (e.p99, true),
            Objective::Balanced => (e.irq, true),
        };
        let sign = if lower_is_better { -1.0 } else { 1.0 };
        let better = |o: &Effect| {
            (if lower_is_better {
                o.lower()
            } else {
                o.higher()
            }) && sign * o.estimate >= r.margin
        };
        let poorer = |o: &Effect| {
            (if lower_is_better {
                o.higher()
            } else {
                o.lower()
            }) && -sign * o.estimate >= r.margin
        };
        // The SLO guards only what is measured: without a single timed completion on either
        // side (a kernel NIC's packets carry no latency) there is no p99 to hold under it, and
        // taking its absence for "over the SLO" made every candidate "back under" it, so every
        // change was kept (bench tune kernel-tcp: a 12.9% fall of ops/s kept).
        let latency_measured =
            e.a_buckets.values().any(|&c| c > 0) || e.b_buckets.values().any(|&c| c > 0);
        Findings {
            objective,
            lower_is_better,
            objective_name,
            improved: objective.is_some_and(|o| better(&o)),
            worse: objective.is_some_and(|o| poorer(&o)),
            flat: objective.is_some_and(|o| o.within(r.margin)),
            guard_ops: matches!(r.objective, Objective::Latency | Objective::Balanced),
            guard_slo: latency_measured
                && matches!(r.objective, Objective::Throughput | Objective::Balanced),
            ops_ok,
            ops_broken,
            a_feasible,
            b_under: b_slo == Some(true),
            b_over: b_slo == Some(false),
            p99_better,
            b_p99_ns: quantile_ci(&e.b_buckets, 0.99, r.z, e.cluster).map(|(_, mid, _)| mid),
        }
    }

    /// The objective improved at the tuner's confidence (for an incumbent over the SLO: p99
    /// back under it, or confidently lower), whatever the constraints.
    fn objective_improved(&self) -> bool {
        if self.guard_slo && !self.a_feasible {
            self.b_under || self.p99_better
        } else {
            self.improved
        }
    }

    /// A constraint is confidently broken.
    fn constraint_broken(&self) -> bool {
        (self.guard_ops && self.ops_broken) || (self.guard_slo && self.a_feasible && self.b_over)
    }

    /// The verdict, and why in words: a broken constraint first, then an incumbent over the
    /// SLO, then the objective and the constraints it must be shown to keep.
    fn verdict(&self, r: &Rules) -> (Verdict, String) {
        let unit = r.throughput.name();
        let slo = us(r.slo_p99_ns as f64);
        let b_p99 = self.b_p99_ns.map(us).unwrap_or_else(|| "n/a".into());
        let name = &self.objective_name;
        let not_kept_ops = || {
            format!(
                "throughput ({unit}) not shown to stay within {:.0}% of the incumbent's",
                r.tolerance * 100.0
            )
        };
        let flat_or_inconclusive = if self.flat {
            Verdict::Flat
        } else {
            Verdict::Inconclusive
        };
        if self.guard_ops && self.ops_broken {
            (
                Verdict::Worse,
                format!(
                    "throughput ({unit}) confidently below {:.0}% of the incumbent's",
                    (1.0 - r.tolerance) * 100.0
                ),
            )
        } else if self.guard_slo && self.a_feasible && self.b_over {
            (Verdict::Worse, format!("p99 {b_p99} over the SLO of {slo}"))
        } else if self.guard_slo && !self.a_feasible {
            self.verdict_over_slo(&b_p99, &slo, not_kept_ops)
        } else if self.worse {
            (Verdict::Worse, format!("{name} confidently worse"))
        } else if self.guard_ops && !self.ops_ok {
            (flat_or_inconclusive, not_kept_ops())
        } else if self.guard_slo && !self.b_under {
            (
                flat_or_inconclusive,
                format!("p99 {b_p99} not shown to be under the SLO of {slo}"),
            )
        } else if self.improved {
            (
                Verdict::Better,
                format!(
                    "{name} improved by at least the margin of {:.0}%, every constraint shown to \
                     hold",
                    r.margin * 100.0
                ),
            )
        } else if self.flat {
            (
                Verdict::Flat,
                format!(
                    "{name} within ±{:.0}%: no difference worth a change",
                    r.margin * 100.0
                ),
            )
        } else {
            (
                Verdict::Inconclusive,
                format!("{name} not shown to improve"),
            )
        }
    }

    /// The incumbent breaks the SLO: a candidate is better when it confidently meets it, or
    /// when its p99 is confidently lower (and, for balanced, throughput holds).
    fn verdict_over_slo(
        &self,
        b_p99: &str,
        slo: &str,
        not_kept_ops: impl Fn() -> String,
    ) -> (Verdict, String) {
        let ops_hold = !self.guard_ops || self.ops_ok;
        if (self.b_under || self.p99_better) && ops_hold {
            let what = if self.b_under {
                format!("p99 {b_p99} back under the SLO of {slo}")
            } else {
                "p99 confidently lower, the incumbent being over the SLO".into()
            };
            (Verdict::Better, what)
        } else if !ops_hold {
            (Verdict::Inconclusive, not_kept_ops())
        } else {
            (
                Verdict::Inconclusive,
                format!("the incumbent is over the SLO of {slo} and p99 is not confidently lower"),
            )
        }
    }
}

/// A latency in ns as microseconds for a reason.
fn us(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1}us", v / 1e3)
    } else {
        "unbounded".into()
    }
}

/// How the effects were measured, and their figures.
fn measured(a_before: &Segment, b: &Segment, a_after: &Segment, effects: &[Effect]) -> String {
    let figures = if effects.is_empty() {
        "no effect measurable".to_string()
    } else {
        effects
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let how = if a_after.is_empty() {
        format!(
            "effects against the incumbent's {} windows before the candidate's {}",
            a_before.len(),
            b.len()
        )
    } else {
        format!(
            "effects corrected for drift (incumbent {}+{} windows around the candidate's {})",
            a_before.len(),
            a_after.len(),
            b.len()
        )
    };
    format!("{how}: {figures}")
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
        effects,
    }
}

#[cfg(test)]
mod tests;
