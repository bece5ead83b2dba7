//! From a trial's windows to a verdict: each metric's drift-corrected effect ([`Estimates`]),
//! what they say against the objective and its constraints ([`Findings`]), and the verdict with
//! its reason in words.

use super::*;

/// What a trial measured: each metric's drift-corrected effect and the latency histograms.
pub(super) struct Estimates {
    /// Throughput, in the device's unit.
    pub(super) ops: Option<Effect>,
    /// Signals (interrupts or NAPI polls) per op, of kind `signal`.
    pub(super) irq: Option<Effect>,
    pub(super) signal: Signal,
    pub(super) p99: Option<Effect>,
    /// The incumbent's windows' latency buckets, before and after the candidate, merged.
    pub(super) a_buckets: BTreeMap<u32, u64>,
    pub(super) b_buckets: BTreeMap<u32, u64>,
    /// How many tail completions come together (for the order-statistic intervals).
    pub(super) cluster: f64,
}

impl Estimates {
    pub(super) fn of(r: &Rules, a_before: &Segment, b: &Segment, a_after: &Segment) -> Estimates {
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
pub(super) struct Findings {
    /// The objective's effect, and whether lower is better for it.
    pub(super) objective: Option<Effect>,
    pub(super) lower_is_better: bool,
    pub(super) objective_name: String,
    /// The objective improved (or worsened) confidently by at least the margin; or its whole
    /// interval lies within ±margin.
    pub(super) improved: bool,
    pub(super) worse: bool,
    pub(super) flat: bool,
    /// Which constraints the objective has: throughput (latency, balanced) and the SLO
    /// (throughput, balanced, where latency is measured at all).
    pub(super) guard_ops: bool,
    pub(super) guard_slo: bool,
    /// Throughput shown to hold within the tolerance, or confidently below it.
    pub(super) ops_ok: bool,
    pub(super) ops_broken: bool,
    /// The incumbent met the SLO; the candidate is confidently under or over it; its p99 is
    /// confidently lower by at least the margin.
    pub(super) a_feasible: bool,
    pub(super) b_under: bool,
    pub(super) b_over: bool,
    pub(super) p99_better: bool,
    /// The candidate's p99, ns (the middle of its interval), if any.
    pub(super) b_p99_ns: Option<f64>,
}

impl Findings {
    pub(super) fn of(r: &Rules, e: &Estimates, b: &Segment) -> Findings {
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
    pub(super) fn objective_improved(&self) -> bool {
        if self.guard_slo && !self.a_feasible {
            self.b_under || self.p99_better
        } else {
            self.improved
        }
    }

    /// A constraint is confidently broken.
    pub(super) fn constraint_broken(&self) -> bool {
        (self.guard_ops && self.ops_broken) || (self.guard_slo && self.a_feasible && self.b_over)
    }

    /// The verdict, and why in words: a broken constraint first, then an incumbent over the
    /// SLO, then the objective and the constraints it must be shown to keep.
    pub(super) fn verdict(&self, r: &Rules) -> (Verdict, String) {
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
pub(super) fn measured(
    a_before: &Segment,
    b: &Segment,
    a_after: &Segment,
    effects: &[Effect],
) -> String {
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
