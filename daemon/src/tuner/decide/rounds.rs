//! A trial's rounds: one A-B-A round never keeps a candidate; a promising one earns another,
//! up to [`MAX_ROUNDS`], and all rounds together are judged at a stricter confidence. Part of
//! [`super::DeviceTuner`]'s decision function.

use super::*;

/// The earlier A-B-A rounds of a trial whose candidate looked promising. One round is never
/// enough to keep a candidate: at the tuner's confidence a candidate that does nothing looks
/// better about one trial in fifty, and a search makes dozens of trials. A promising round (the
/// objective improved at the tuner's confidence, or by at least the margin; no constraint
/// broken) earns another round, up to [`MAX_ROUNDS`]; the candidate is kept when all rounds
/// together show it better at a stricter confidence ([`POOLED_Z_EXTRA`] more) and the latest
/// round alone points the same way.
#[derive(Debug, Clone)]
pub(super) struct EarlierRounds {
    /// The incumbent's windows of the earlier rounds (the latest round's "after" windows are
    /// the next round's "before").
    pub(super) a: Segment,
    /// The candidate's windows of the earlier rounds.
    pub(super) b: Segment,
    pub(super) rounds: u32,
    pub(super) first_why: String,
}

/// Rounds a trial runs at most.
pub(super) const MAX_ROUNDS: u32 = 3;
/// How much stricter (in `z`) all rounds together must be than one round.
pub(super) const POOLED_Z_EXTRA: f64 = 1.0;

/// A round's verdict with the earlier rounds' windows pooled in: `(rounds, verdict, the first
/// round's reason, all incumbent windows, all candidate windows)`. Pooled, the constraints are
/// judged at the tuner's confidence and the objective at a stricter one (it is a second look at
/// the same question), and the latest round alone must point the same way.
pub(super) fn pool_rounds(
    rules: Rules,
    objective: Objective,
    j: &Judgement,
    first: Option<Box<EarlierRounds>>,
    a_before: Segment,
    b: Segment,
    a2: &Segment,
) -> (u32, Judgement, String, Segment, Segment) {
    match first {
        None => (1, j.clone(), j.why.clone(), a_before, b),
        Some(e) => {
            let mut a_all = e.a;
            a_all.samples.extend(a_before.samples);
            let mut b_all = e.b;
            b_all.samples.extend(b.samples);
            // The constraints at the tuner's confidence, the objective at a
            // stricter one (this is a second look at the same question).
            let strict = Rules {
                z: rules.z + POOLED_Z_EXTRA,
                ..rules
            };
            let mut pooled = judge::judge(&rules, &a_all, &b_all, a2);
            let strict_improved = judge::judge(&strict, &a_all, &b_all, a2).objective_improved;
            let latest_agrees = j.gain.is_some_and(|g| g > 0.0);
            pooled.why = format!(
                "{} rounds together: {}; this round alone: {}",
                e.rounds + 1,
                pooled.why,
                j.why
            );
            if pooled.keep() && !strict_improved {
                pooled.verdict = Verdict::Inconclusive;
                pooled.why = format!(
                    "{} not shown to improve at the stricter z = {:.1} of {} rounds; {}",
                    objective.name(),
                    strict.z,
                    e.rounds + 1,
                    pooled.why
                );
            } else if pooled.keep() && !latest_agrees {
                pooled.verdict = Verdict::Inconclusive;
                pooled.why = format!("this round points the other way; {}", pooled.why);
            }
            (e.rounds + 1, pooled, e.first_why, a_all, b_all)
        }
    }
}

/// Whether more rounds could still show the objective's estimated gain, after `rounds` rounds
/// whose (pooled) judgement is `j`. An interval's half width shrinks about as 1/sqrt(windows),
/// so after [`MAX_ROUNDS`] it would be `hw * sqrt(rounds / MAX_ROUNDS)`, and the pooled verdict
/// asks for `(z + POOLED_Z_EXTRA) / z` of it: a gain smaller than that cannot be shown at the
/// current noise however the coming rounds fall out (the low-rate disk's p99 in `bench tune`:
/// -55% [-171%, +60%] after one round), and another round would only cost the workload.
pub(super) fn could_be_shown(j: &Judgement, rounds: u32, z: f64) -> bool {
    let (Some(gain), Some(hw)) = (j.gain, j.gain_half_width) else {
        return false;
    };
    if !hw.is_finite() || rounds >= MAX_ROUNDS {
        return false;
    }
    let stricter = if z > 0.0 {
        (z + POOLED_Z_EXTRA) / z
    } else {
        1.0
    };
    gain > hw * (rounds as f64 / MAX_ROUNDS as f64).sqrt() * stricter
}
