//! A trial's phases after the candidate is applied: the candidate measured (B), the incumbent
//! measured again (A), the verdict and what follows it (keep, another round, revert); and the
//! parked tuner watching for a phase change or a regression. Part of [`super::DeviceTuner`]: the
//! decision function's state is the parent module's.

use super::*;

impl DeviceTuner {
    /// The candidate in force: measure it (B), then put the incumbent back to measure it again.
    pub(super) fn step_candidate(&mut self, now_ms: u64, window: &Window) -> Option<Outcome> {
        let cap = self.cap();
        let min_ops = self.params.min_window_ops;
        let t_s = now_ms as f64 / 1e3;
        let rules = self.rules();
        let Phase::Trial {
            skip,
            b,
            bm,
            stage: Stage::Candidate,
            ..
        } = &mut self.phase
        else {
            unreachable!("step_candidate runs on a candidate in force")
        };
        if *skip > 0 {
            *skip -= 1;
            return None;
        }
        b.push(t_s, window, min_ops);
        bm.push(window, min_ops, cap);
        let done =
            b.len() >= self.params.trial_windows as usize && b.ops() >= self.params.min_point_ops;
        let abandoned = b.len() >= cap;
        // A candidate already plainly worse after two windows (against the incumbent's
        // windows before it) is not measured further: most moves are bad, and each bad
        // window costs the workload. The incumbent is measured again all the same, and
        // the verdict is the drift-corrected one.
        let early_worse = !done
            && !abandoned
            && b.len() >= 2
            && judge::judge(&rules, &self.a_seg, b, &Segment::default()).verdict == Verdict::Worse;
        if (!done && !abandoned && !early_worse) || !self.rate_ok(now_ms) {
            return None;
        }
        let Phase::Trial {
            mv,
            candidate,
            b,
            bm,
            first,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Baseline)
        else {
            unreachable!("matched above")
        };
        let incumbent = self.incumbent.expect("a trial starts from an incumbent");
        let first_look = judge::judge(&rules, &self.a_seg, &b, &Segment::default());
        let why = if early_worse {
            format!("plainly worse after {} windows", b.len())
        } else if !done {
            "too few completions".to_string()
        } else {
            format!("{} windows", b.len())
        };
        let value = bm.objective_value(self.policy.objective, self.throughput);
        let reason = format!(
            "{}measured {} ({why}; {}); back to the incumbent to measure it again, so \
             that a drift of the workload is neither credited to nor blamed on the change",
            self.take_note(),
            fmt_settings_delta(&incumbent, &candidate),
            first_look
                .effects
                .iter()
                .map(|e| format!("{}: {}", e.metric, pct(e.estimate)))
                .collect::<Vec<_>>()
                .join(", "),
        );
        self.phase = Phase::Trial {
            mv,
            candidate,
            b,
            bm,
            skip: self.params.settle_windows,
            stage: Stage::Remeasure {
                a2: Segment::default(),
            },
            first,
        };
        self.last_change_ms = Some(now_ms);
        self.expected = Some(incumbent);
        Some(Outcome {
            action: Action::Revert,
            to: incumbent,
            reason,
            objective_value: value,
        })
    }

    /// The incumbent measured again (the second A): judge the round, then measure the
    /// candidate again, keep it or reject it.
    pub(super) fn step_remeasure(
        &mut self,
        now_ms: u64,
        bounds: &Bounds,
        window: &Window,
    ) -> Option<Outcome> {
        if !self.remeasured(now_ms, window) {
            return None;
        }
        let rules = self.rules();
        let a_before = std::mem::take(&mut self.a_seg);
        let Phase::Trial {
            mv,
            candidate,
            b,
            bm,
            stage: Stage::Remeasure { a2 },
            first,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Baseline)
        else {
            unreachable!("step_remeasure runs on the incumbent measured again")
        };
        let (j, shifted) = self.judge_round(&rules, &a_before, &b, &a2);
        let incumbent = self.incumbent.expect("a trial starts from an incumbent");
        // All rounds so far: the earlier ones' windows and this one's. (After one round the
        // pooled judgement is the round's.)
        let (rounds, mut pooled, first_why, a_all, b_all) =
            pool_rounds(rules, self.policy.objective, &j, first, a_before, b, &a2);
        if rounds >= 2 && pooled.keep() && !shifted {
            pooled.why = format!("{} (first round: {first_why})", pooled.why);
            return self.keep_or_reject(
                now_ms, bounds, mv, incumbent, candidate, b_all, bm, a2, pooled, shifted,
            );
        }
        // One round is never enough to keep a candidate (see `EarlierRounds`).
        let unproven = rounds == 1 || !pooled.keep();
        let again = !shifted && rounds < MAX_ROUNDS && unproven && self.promising(&pooled, rounds);
        if !again {
            if let Some(hopeless) = self.beyond_the_noise(&pooled, rounds) {
                pooled.why = format!("{hopeless}; {}", pooled.why);
            }
            return self.keep_or_reject(
                now_ms, bounds, mv, incumbent, candidate, b_all, bm, a2, pooled, shifted,
            );
        }
        let earlier = EarlierRounds {
            a: a_all,
            b: b_all,
            rounds,
            first_why,
        };
        Some(self.another_round(now_ms, mv, incumbent, candidate, bm, a2, &pooled, earlier))
    }

    /// One window of the incumbent measured again: whether the round is complete (enough
    /// windows, and a change allowed now: whatever comes next may be one).
    fn remeasured(&mut self, now_ms: u64, window: &Window) -> bool {
        let cap = self.cap();
        let min_ops = self.params.min_window_ops;
        let t_s = now_ms as f64 / 1e3;
        let rate_ok = self.rate_ok(now_ms);
        let Phase::Trial {
            skip,
            b,
            stage: Stage::Remeasure { a2 },
            ..
        } = &mut self.phase
        else {
            unreachable!("remeasured runs on the incumbent measured again")
        };
        if *skip > 0 {
            *skip -= 1;
            return false;
        }
        a2.push(t_s, window, min_ops);
        self.incumbent_m.push(window, min_ops, cap);
        let done = a2.len() >= self.params.trial_windows.min(b.len().max(2) as u32) as usize
            && a2.ops() >= self.params.min_point_ops.min(b.ops());
        (done || a2.len() >= cap) && rate_ok
    }

    /// This round's judgement (the incumbent `a_before` and `a2` around the candidate's `b`),
    /// inconclusive if the workload changed during it; and whether it did.
    fn judge_round(
        &self,
        rules: &Rules,
        a_before: &Segment,
        b: &Segment,
        a2: &Segment,
    ) -> (Judgement, bool) {
        let shift = workload_shift(self.throughput, a_before, b, a2, self.params.phase_change);
        let mut j = judge::judge(rules, a_before, b, a2);
        if let Some((from, to)) = shift {
            j.verdict = Verdict::Inconclusive;
            j.why = format!(
                "the workload changed during the trial (bytes/op {from:.0}→{to:.0}); {}",
                j.why
            );
        }
        (j, shift.is_some())
    }

    /// Whether a candidate judged `j` after `rounds` rounds deserves another: no constraint
    /// broken, and the objective improved at the tuner's confidence or by at least the margin
    /// with a noise that more rounds could see through ([`could_be_shown`]).
    fn promising(&self, j: &Judgement, rounds: u32) -> bool {
        !j.constraint_broken
            && (j.objective_improved
                || (j.gain.is_some_and(|g| g >= self.params.min_improvement)
                    && could_be_shown(j, rounds, self.params.z)))
    }

    /// Why a candidate that pointed the right way by at least the margin gets no more rounds,
    /// if that is the reason: its gain is within what the noise of [`MAX_ROUNDS`] rounds hides.
    fn beyond_the_noise(&self, j: &Judgement, rounds: u32) -> Option<String> {
        let (gain, hw) = (j.gain?, j.gain_half_width?);
        let pointed_right = !j.constraint_broken && !j.objective_improved && !j.keep();
        (pointed_right
            && rounds < MAX_ROUNDS
            && gain >= self.params.min_improvement
            && !could_be_shown(j, rounds, self.params.z))
        .then(|| {
            format!(
                "not measured again: the {} objective's estimate, {}, is within what the noise \
                 (±{:.1}% after {rounds} round{}) would still hide after {MAX_ROUNDS} rounds",
                self.policy.objective.name(),
                pct(gain),
                hw * 100.0,
                if rounds == 1 { "" } else { "s" },
            )
        })
    }

    /// A promising candidate applied again for another A-B-A round before it can be kept.
    #[allow(clippy::too_many_arguments)]
    fn another_round(
        &mut self,
        now_ms: u64,
        mv: Move,
        incumbent: DeviceSettings,
        candidate: DeviceSettings,
        bm: Measurement,
        a2: Segment,
        pooled: &Judgement,
        earlier: EarlierRounds,
    ) -> Outcome {
        let rounds = earlier.rounds;
        let reason = format!(
            "{}{} looks promising after {rounds} round{} ({}); applying it again for \
             another A-B-A round before keeping it",
            self.take_note(),
            fmt_settings_delta(&incumbent, &candidate),
            if rounds == 1 { "" } else { "s" },
            pooled.why
        );
        let value = self.objective_value();
        self.a_seg = a2;
        self.phase = Phase::Trial {
            mv,
            candidate,
            b: Segment::default(),
            bm,
            skip: self.params.settle_windows,
            stage: Stage::Candidate,
            first: Some(Box::new(earlier)),
        };
        self.last_change_ms = Some(now_ms);
        self.expected = Some(candidate);
        Outcome {
            action: Action::Change,
            to: candidate,
            reason,
            objective_value: value,
        }
    }

    /// Parked: watch for a phase change (explore again) or a regression after the last kept
    /// change (revert it).
    pub(super) fn step_converged(
        &mut self,
        now_ms: u64,
        current: &DeviceSettings,
        window: &Window,
    ) -> Option<Outcome> {
        let min_ops = self.params.min_window_ops;
        let Phase::Converged {
            deviant,
            sign,
            history,
        } = &mut self.phase
        else {
            unreachable!("step_converged runs parked")
        };
        if window.ops == 0 || window.duration_s <= 0.0 {
            return None;
        }
        let pc = self.params.phase_change;
        // The reference is the median of the recent windows, so a slow drift moves it
        // along and only a step stands out; before enough windows, the incumbent's.
        let median = |f: fn(&(f64, f64)) -> f64| {
            let mut v: Vec<f64> = history.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        let (ops_ref, bpo_ref) = match (median(|h| h.0), median(|h| h.1)) {
            (Some(o), Some(b)) if history.len() >= 3 => (o, b),
            _ => (
                self.incumbent_m.mean(Metric::OpsPerSec).unwrap_or(0.0),
                self.incumbent_m.mean(Metric::BytesPerOp).unwrap_or(0.0),
            ),
        };
        let rel = |a: f64, b: f64| if a > 0.0 { (b - a) / a } else { 0.0 };
        let d_ops = rel(ops_ref, window.ops_per_sec());
        let d_bpo = rel(bpo_ref, window.bytes_per_op());
        let dir = |d: f64| -> i8 {
            if d.abs() > pc {
                d.signum() as i8
            } else {
                0
            }
        };
        let now_sign = (dir(d_ops), dir(d_bpo));
        if now_sign == (0, 0) {
            *deviant = 0;
            history.push_back((window.ops_per_sec(), window.bytes_per_op()));
            while history.len() > PHASE_HISTORY {
                history.pop_front();
            }
            return None;
        }
        // Deviant windows count only in a row and the same way: noise flips sides.
        *deviant = if *deviant > 0 && *sign == now_sign {
            *deviant + 1
        } else {
            1
        };
        *sign = now_sign;
        if *deviant < self.params.phase_windows {
            return None;
        }
        let p99_ref = self.incumbent_m.p99_ns();
        let w_p99 = (window.ops >= min_ops)
            .then(|| window.quantile_ns(0.99))
            .flatten();
        let what = format!(
            "ops/s {:.0}→{:.0}, bytes/op {:.0}→{:.0}, p99 {}→{}",
            ops_ref,
            window.ops_per_sec(),
            bpo_ref,
            window.bytes_per_op(),
            us(p99_ref),
            us(w_p99)
        );
        let recent_change = self.previous.as_ref().is_some_and(|(_, _, at, _)| {
            now_ms.saturating_sub(*at) <= self.params.regression_guard_ms
        });
        if recent_change && d_bpo.abs() <= pc / 3.0 && self.rate_ok(now_ms) {
            return self.revert_regression(now_ms, &what);
        }
        // A new phase: re-explore from the settings in force.
        self.previous = None;
        self.best_ops_seen = 0.0;
        self.reset(Some(*current), &format!("phase change ({what})"));
        self.skip = 0;
        None
    }

    /// A regression soon after the last kept change (throughput moved with the workload's
    /// request size unchanged): put the settings before it back, and explore again without
    /// that move. `what` says what moved.
    pub(super) fn revert_regression(&mut self, now_ms: u64, what: &str) -> Option<Outcome> {
        let (prev, prev_m, _, mv) = self
            .previous
            .take()
            .expect("the caller saw a recent kept change");
        let from = self.incumbent.expect("converged from an incumbent");
        let value = self.objective_value();
        self.incumbent = Some(prev);
        self.judged.clear();
        self.incumbent_m = prev_m;
        self.a_seg = Segment::default();
        self.phase = Phase::Baseline;
        self.skip = self.params.settle_windows;
        self.queue = prior(self.policy.objective)
            .into_iter()
            .filter(|m| (m.knob, m.dir) != (mv.knob, mv.dir))
            .collect();
        self.last_change_ms = Some(now_ms);
        self.expected = Some(prev);
        Some(Outcome {
            action: Action::Revert,
            to: prev,
            reason: format!(
                "regression after the last change ({what}): reverting {}",
                fmt_settings_delta(&from, &prev)
            ),
            objective_value: value,
        })
    }

    /// The end of a trial: the judge's verdict on the candidate, measured between two
    /// measurements of the incumbent (which is in force again).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn keep_or_reject(
        &mut self,
        now_ms: u64,
        bounds: &Bounds,
        mv: Move,
        incumbent: DeviceSettings,
        candidate: DeviceSettings,
        b: Segment,
        bm: Measurement,
        a2: Segment,
        j: Judgement,
        shifted: bool,
    ) -> Option<Outcome> {
        let delta = fmt_settings_delta(&incumbent, &candidate);
        if j.keep() {
            self.best_ops_seen = self
                .best_ops_seen
                .max(bm.mean(Metric::throughput(self.throughput)).unwrap_or(0.0));
            self.ops_budget = (self.ops_budget * (1.0 + j.ops_estimate.unwrap_or(0.0))).min(1.0);
            self.tally = [0; 3];
            self.judged.clear();
            let value = self.objective_value();
            self.previous = Some((incumbent, self.incumbent_m.clone(), now_ms, mv));
            self.incumbent = Some(candidate);
            self.incumbent_m = bm;
            // The candidate's windows are the A of the next trial (the judge fits the drift
            // over their times, however far back).
            self.a_seg = b;
            self.skip = self.params.settle_windows;
            // Same move again first, twice as far (a trial costs two rounds: where a knob keeps
            // paying, the search gets there sooner); then one rung at a time; never straight
            // back.
            let mut q: VecDeque<Move> = prior(self.policy.objective)
                .into_iter()
                .filter(|o| o.knob != mv.knob)
                .collect();
            q.push_front(Move {
                stride: (mv.stride * 2).min(MAX_STRIDE),
                ..mv
            });
            q.push_back(Move { stride: 1, ..mv });
            self.queue = q;
            self.last_change_ms = Some(now_ms);
            self.expected = Some(candidate);
            return Some(Outcome {
                action: Action::Change,
                to: candidate,
                reason: format!("{}kept {delta}: {}", self.take_note(), j.why),
                objective_value: value,
            });
        }
        self.judged.push(candidate);
        match j.verdict {
            Verdict::Flat => self.tally[0] += 1,
            Verdict::Inconclusive => self.tally[1] += 1,
            Verdict::Worse => self.tally[2] += 1,
            Verdict::Better => {}
        }
        // A move that makes no difference, or one that pointed the right way without showing
        // it, is retried once further along its ladder (flat stretches; a larger step has a
        // larger effect to measure); one that pointed the wrong way is not.
        let pointed_right = j.verdict == Verdict::Inconclusive && j.gain.is_some_and(|g| g > 0.0);
        if (j.verdict == Verdict::Flat || pointed_right) && mv.stride < MAX_STRIDE && !shifted {
            self.queue.push_front(Move {
                stride: MAX_STRIDE,
                ..mv
            });
        }
        if shifted {
            self.incumbent_m = Measurement::default();
            self.a_seg = Segment::default();
        } else {
            self.a_seg = a2;
        }
        let earlier = self.take_note();
        self.note = Some(format!("{earlier}not kept: {delta}: {}", j.why));
        // Know when to stop: after a run of trials whose effects stayed within the noise (flat
        // or inconclusive; a confidently worse one is cut short and says where not to go), the
        // moves left, later in the order and so less likely to pay, will not pay for their
        // trials either.
        let [flat, inconclusive, _worse] = self.tally;
        let fruitless = flat + inconclusive;
        if fruitless >= self.params.max_fruitless_trials && !self.queue.is_empty() {
            let untried = std::mem::take(&mut self.queue).len();
            let note = self.take_note();
            self.note = Some(format!(
                "{note}{fruitless} trials since the last kept change ended within the noise (max_fruitless_trials): \
                 {untried} move{} left untried",
                if untried == 1 { "" } else { "s" }
            ));
        }
        self.skip = 0;
        if self.a_seg.is_empty() {
            return None;
        }
        self.next_move(now_ms, bounds)
    }
}
