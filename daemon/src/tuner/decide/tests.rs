//! Properties of the decision function, against a simulated device (no I/O).

use super::*;
use crate::tuner::window::Window;
use enlight_probes::hist::bucket_index;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

/// A closed-loop device whose figures are a function of its settings plus noise: service time
/// `service_ns` at queue depth `qd`; moderation delays completions until `frames` are owed or
/// `usecs` pass; each interrupt costs `irq_cost_ns` of the shared CPU.
#[derive(Clone, Copy, Debug)]
struct SimDevice {
    qd: f64,
    service_ns: f64,
    irq_cost_ns: f64,
    noise: f64,
}

struct Figures {
    ops_per_sec: f64,
    p50_ns: f64,
    p99_ns: f64,
    interrupts_per_op: f64,
}

impl SimDevice {
    fn figures(&self, s: &DeviceSettings) -> Figures {
        let gap = self.service_ns / self.qd;
        let frames_ns = (s.moderation_frames.saturating_sub(1)) as f64 * gap;
        let delay = if s.moderation_frames <= 1 {
            0.0
        } else {
            frames_ns.min(s.moderation_usecs as f64 * 1e3)
        };
        let per_irq = if delay == 0.0 {
            1.0
        } else {
            (delay / gap + 1.0).min(s.moderation_frames as f64)
        };
        let interrupts_per_op = 1.0 / per_irq;
        let budget_ns = 300.0 * ((s.poll_budget as f64 / 64.0).log2()).abs();
        let latency = self.service_ns + delay + budget_ns;
        let per_op = gap + interrupts_per_op * self.irq_cost_ns;
        Figures {
            ops_per_sec: 1e9 / per_op,
            p50_ns: latency,
            p99_ns: latency * 1.5,
            interrupts_per_op,
        }
    }

    fn window(&self, s: &DeviceSettings, dt: f64, rng: &mut impl Rng, worse: f64) -> Window {
        self.window_drifting(s, dt, rng, worse, 1.0)
    }

    /// A window whose throughput is also multiplied by `drift`, a factor of the workload that
    /// owes nothing to the settings (a file filling up, a neighbour).
    fn window_drifting(
        &self,
        s: &DeviceSettings,
        dt: f64,
        rng: &mut impl Rng,
        worse: f64,
        drift: f64,
    ) -> Window {
        let f = self.figures(s);
        let mut n = || 1.0 + self.noise * (rng.gen::<f64>() * 2.0 - 1.0) * 1.7;
        let ops = (f.ops_per_sec / worse * drift * dt * n()).max(0.0) as u64;
        let p50 = f.p50_ns * worse * n();
        let p99 = f.p99_ns * worse * n();
        let tail = ops / 50;
        let mut w = Window {
            duration_s: dt,
            ops,
            bytes: ops * 4096,
            interrupts: (ops as f64 * f.interrupts_per_op * worse.min(1.0 / f.interrupts_per_op))
                as u64,
            ring_full: 0,
            napi_polls: 0,
            buckets: Default::default(),
        };
        *w.buckets.entry(bucket_index(p50 as u64)).or_default() += ops - tail;
        *w.buckets.entry(bucket_index(p99 as u64)).or_default() += tail;
        w
    }
}

fn low_rate() -> SimDevice {
    SimDevice {
        qd: 1.0,
        service_ns: 20_000.0,
        irq_cost_ns: 3_000.0,
        noise: 0.02,
    }
}

fn high_qd() -> SimDevice {
    SimDevice {
        qd: 32.0,
        service_ns: 200_000.0,
        irq_cost_ns: 4_000.0,
        noise: 0.02,
    }
}

fn policy(objective: Objective) -> Policy {
    Policy {
        mode: TunerMode::Auto,
        objective,
        slo_p99_ns: 5_000_000,
        pinned: false,
    }
}

struct Run {
    outcomes: Vec<(u64, Outcome, DeviceSettings)>,
    last: DeviceSettings,
}

/// Runs a tuner against a device for `steps` ticks of `tick_ms`; `worse(step, settings)` injects
/// a regression factor.
#[allow(clippy::too_many_arguments)]
fn run(
    tuner: &mut DeviceTuner,
    dev: SimDevice,
    start: DeviceSettings,
    bounds: &Bounds,
    steps: usize,
    tick_ms: u64,
    seed: u64,
    mut worse: impl FnMut(usize, &DeviceSettings) -> f64,
) -> Run {
    let dt = tick_ms as f64 / 1e3;
    run_with(tuner, start, bounds, steps, tick_ms, seed, |i, s, rng| {
        dev.window(s, dt, rng, worse(i, s))
    })
}

/// Runs a tuner for `steps` ticks of `tick_ms`, the device's window at tick `i` under settings
/// `s` drawn by `window(i, s, rng)`.
fn run_with(
    tuner: &mut DeviceTuner,
    start: DeviceSettings,
    bounds: &Bounds,
    steps: usize,
    tick_ms: u64,
    seed: u64,
    mut window: impl FnMut(usize, &DeviceSettings, &mut rand::rngs::SmallRng) -> Window,
) -> Run {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut current = start;
    let mut outcomes = Vec::new();
    for i in 0..steps {
        let now = (i as u64 + 1) * tick_ms;
        let w = window(i, &current, &mut rng);
        if let Some(o) = tuner.step(now, &current, bounds, &w) {
            let from = current;
            if o.action != Action::Recommend {
                current = o.to;
                tuner.applied(current);
            }
            outcomes.push((now, o, from));
        }
    }
    Run {
        outcomes,
        last: current,
    }
}

fn objective_strategy() -> impl Strategy<Value = Objective> {
    prop_oneof![
        Just(Objective::Latency),
        Just(Objective::Throughput),
        Just(Objective::Balanced)
    ]
}

fn bounds_strategy() -> impl Strategy<Value = Bounds> {
    (
        1u32..16,
        0u32..64,
        0u32..300,
        1u32..64,
        0u32..1000,
        0u32..40,
        1u32..300,
        any::<bool>(),
    )
        .prop_map(|(flo, fspan, fhi, ulo_raw, uspan, blo, bspan, napi)| {
            let fhi = (flo + fspan).max(flo + fhi % 64);
            let ulo = ulo_raw % 40;
            let uhi = ulo + uspan;
            let blo = blo.max(1);
            let bhi = blo + bspan;
            Bounds {
                ring_bytes: (8192, 1 << 20),
                ring_page: 4096,
                moderation_frames: (flo, fhi),
                moderation_usecs: (ulo, uhi),
                moderation_usecs_floor: 1,
                poll_budget: (blo, bhi),
                // Either kind of moderation ladder: NAPI's coarse rungs or the fine ones.
                frames_ladder: if napi { Ladder::Napi } else { Ladder::Fine },
                usecs_ladder: if napi { Ladder::Napi } else { Ladder::Fine },
            }
        })
}

fn clamp_into(s: DeviceSettings, b: &Bounds) -> DeviceSettings {
    let c = |v: u32, (lo, hi): (u32, u32)| v.clamp(lo, hi);
    DeviceSettings {
        ring_out_bytes: c(s.ring_out_bytes, b.ring_bytes),
        ring_in_bytes: c(s.ring_in_bytes, b.ring_bytes),
        moderation_frames: c(s.moderation_frames, b.moderation_frames),
        moderation_usecs: c(s.moderation_usecs, b.moderation_usecs),
        poll_budget: c(s.poll_budget, b.poll_budget),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn bounds_are_always_respected(
        bounds in bounds_strategy(),
        objective in objective_strategy(),
        qd in 1u32..64,
        noise in 0.0f64..0.3,
        seed in any::<u64>(),
    ) {
        let dev = SimDevice { qd: qd as f64, service_ns: 50_000.0, irq_cost_ns: 3_000.0, noise };
        let start = clamp_into(DeviceSettings::default(), &bounds);
        prop_assume!(bounds.contains(&start));
        let mut t = DeviceTuner::new(policy(objective), TunerParams::default());
        let r = run(&mut t, dev, start, &bounds, 300, 500, seed, |_, _| 1.0);
        for (_, o, _) in &r.outcomes {
            prop_assert!(bounds.contains(&o.to), "{:?} outside {:?}", o.to, bounds);
        }
    }

    #[test]
    fn an_injected_regression_is_reverted(
        objective in objective_strategy(),
        factor in 1.3f64..3.0,
        seed in any::<u64>(),
    ) {
        // Every candidate the tuner tries is made `factor` times worse: each trial must end in a
        // revert to the settings before it, and the device must end where it started.
        let start = DeviceSettings::default();
        let mut t = DeviceTuner::new(policy(objective), TunerParams::default());
        let r = run(&mut t, high_qd(), start, &Bounds::default(), 200, 500, seed,
            |_, s| if *s == start { 1.0 } else { factor });
        prop_assert!(!r.outcomes.is_empty());
        for pair in r.outcomes.chunks(2) {
            prop_assert_eq!(pair[0].1.action, Action::Change);
            if let Some(second) = pair.get(1) {
                prop_assert_eq!(second.1.action, Action::Revert, "{}", second.1.reason);
                prop_assert_eq!(second.1.to, start);
            }
        }
        prop_assert_eq!(r.last, start);
        prop_assert_eq!(t.state(), TunerState::Converged);
    }

    #[test]
    fn at_most_one_change_per_interval(
        objective in objective_strategy(),
        tick_ms in 50u64..1500,
        interval_ms in 100u64..5000,
        noise in 0.0f64..0.5,
        seed in any::<u64>(),
    ) {
        let params = TunerParams { min_change_interval_ms: interval_ms, ..TunerParams::default() };
        let dev = SimDevice { noise, ..high_qd() };
        let mut t = DeviceTuner::new(policy(objective), params);
        let r = run(&mut t, dev, DeviceSettings::default(), &Bounds::default(), 400, tick_ms, seed, |_, _| 1.0);
        for pair in r.outcomes.windows(2) {
            prop_assert!(pair[1].0 - pair[0].0 >= interval_ms,
                "changes at {} and {} ms with a {} ms interval", pair[0].0, pair[1].0, interval_ms);
        }
    }

    #[test]
    fn pinned_never_changes_and_dry_run_never_applies(
        objective in objective_strategy(),
        noise in 0.0f64..0.3,
        seed in any::<u64>(),
    ) {
        let mut pinned = DeviceTuner::new(Policy { pinned: true, ..policy(objective) }, TunerParams::default());
        let r = run(&mut pinned, low_rate(), DeviceSettings::default(), &Bounds::default(), 200, 500, seed, |_, _| 1.0);
        prop_assert!(r.outcomes.is_empty());
        prop_assert_eq!(pinned.state(), TunerState::Pinned);

        let dev = SimDevice { noise, ..low_rate() };
        let mut dry = DeviceTuner::new(Policy { mode: TunerMode::DryRun, ..policy(objective) }, TunerParams::default());
        let r = run(&mut dry, dev, DeviceSettings::default(), &Bounds::default(), 200, 500, seed, |_, _| 1.0);
        prop_assert!(!r.outcomes.is_empty(), "a dry run still recommends");
        for (_, o, from) in &r.outcomes {
            prop_assert_eq!(o.action, Action::Recommend);
            prop_assert_eq!(*from, DeviceSettings::default());
        }
        prop_assert_eq!(r.last, DeviceSettings::default());
        prop_assert_eq!(dry.recommendation(), Some(r.outcomes.last().unwrap().1.to));
    }
}

/// Best value of the objective over a grid of the simulated device, and the tuner's (for
/// latency, among the points that keep 95% of the default settings' throughput: the tuner's
/// constraint).
fn best_on_grid(dev: &SimDevice, objective: Objective) -> f64 {
    let floor = 0.95 * dev.figures(&DeviceSettings::default()).ops_per_sec;
    let mut best = f64::NEG_INFINITY;
    for f in crate::tuner::FRAMES_LADDER {
        for u in crate::tuner::USECS_LADDER {
            let s = DeviceSettings {
                moderation_frames: f,
                moderation_usecs: u,
                ..DeviceSettings::default()
            };
            if objective == Objective::Latency && dev.figures(&s).ops_per_sec < floor {
                continue;
            }
            best = best.max(score(dev, &s, objective));
        }
    }
    best
}

fn score(dev: &SimDevice, s: &DeviceSettings, objective: Objective) -> f64 {
    let f = dev.figures(s);
    match objective {
        Objective::Latency => -f.p99_ns,
        Objective::Throughput => f.ops_per_sec,
        Objective::Balanced => -f.interrupts_per_op,
    }
}

#[test]
fn the_tuner_finds_the_simulated_optimum_within_90_seconds() {
    // 90 s, not 30 s as before trials cancelled drift: every kept move costs at least two A-B-A rounds (see `EarlierRounds`).
    for (dev, objective) in [
        (low_rate(), Objective::Latency),
        (high_qd(), Objective::Throughput),
    ] {
        let dev = SimDevice { noise: 0.01, ..dev };
        let mut t = DeviceTuner::new(policy(objective), TunerParams::default());
        let r = run(
            &mut t,
            dev,
            DeviceSettings::default(),
            &Bounds::default(),
            180,
            500,
            7,
            |_, _| 1.0,
        );
        let (got, best) = (
            score(&dev, &r.last, objective),
            best_on_grid(&dev, objective),
        );
        let (default, _) = (score(&dev, &DeviceSettings::default(), objective), ());
        let frac = if objective == Objective::Latency {
            best / got
        } else {
            got / best
        };
        assert!(
            frac >= 0.95,
            "{objective:?}: reached {got} vs best {best} (default {default}) with {:?}",
            r.outcomes
                .iter()
                .map(|(_, o, _)| &o.reason)
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_change_from_outside_restarts_from_what_the_device_reports() {
    let mut t = DeviceTuner::new(policy(Objective::Latency), TunerParams::default());
    let dev = low_rate();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let b = Bounds::default();
    let s = DeviceSettings::default();
    assert!(t
        .step(500, &s, &b, &dev.window(&s, 0.5, &mut rng, 1.0))
        .is_none());
    assert_eq!(t.recommendation(), Some(s));
    let other = DeviceSettings {
        moderation_frames: 1,
        ..s
    };
    t.step(1000, &other, &b, &dev.window(&other, 0.5, &mut rng, 1.0));
    assert_eq!(t.recommendation(), Some(other));
    let mut changed = None;
    for i in 3..40 {
        if let Some(o) = t.step(i * 500, &other, &b, &dev.window(&other, 0.5, &mut rng, 1.0)) {
            changed = Some(o);
            break;
        }
    }
    let o = changed.expect("the tuner explores from the new settings");
    assert!(
        o.reason.contains("settings changed outside the tuner"),
        "{}",
        o.reason
    );
    assert_eq!(
        o.to.moderation_frames, 1,
        "moves start from what the device reports"
    );
}

#[test]
fn repeated_apply_failures_freeze_the_device() {
    let mut t = DeviceTuner::new(policy(Objective::Latency), TunerParams::default());
    let dev = low_rate();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let (b, s) = (Bounds::default(), DeviceSettings::default());
    let mut failures = 0;
    for i in 1..200u64 {
        if t.step(i * 500, &s, &b, &dev.window(&s, 0.5, &mut rng, 1.0))
            .is_some()
        {
            t.apply_failed("busy");
            failures += 1;
        }
    }
    assert_eq!(failures, 3);
    assert_eq!(t.state(), TunerState::Frozen);
}

#[test]
fn a_phase_change_after_convergence_re_explores() {
    let mut t = DeviceTuner::new(policy(Objective::Latency), TunerParams::default());
    let dev_a = low_rate();
    let dev_b = SimDevice {
        service_ns: 80_000.0,
        ..high_qd()
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let b = Bounds::default();
    let mut current = DeviceSettings::default();
    let mut reasons = Vec::new();
    for i in 1..400u64 {
        let dev = if i < 200 { dev_a } else { dev_b };
        if i == 199 {
            assert_eq!(t.state(), TunerState::Converged);
        }
        if let Some(o) = t.step(
            i * 500,
            &current,
            &b,
            &dev.window(&current, 0.5, &mut rng, 1.0),
        ) {
            current = o.to;
            t.applied(current);
            reasons.push((i, o.reason));
        }
    }
    assert!(
        reasons
            .iter()
            .any(|(i, r)| *i > 200 && r.contains("phase change")),
        "{reasons:?}"
    );
}

#[test]
fn balanced_tries_less_moderation_only_where_it_can_meet_its_constraints() {
    let less = |from: &DeviceSettings, to: &DeviceSettings| {
        to.moderation_frames < from.moderation_frames || to.moderation_usecs < from.moderation_usecs
    };
    let explore = |slo_p99_ns: u64| {
        let policy = Policy {
            slo_p99_ns,
            ..policy(Objective::Balanced)
        };
        let mut t = DeviceTuner::new(policy, TunerParams::default());
        let b = Bounds::default();
        run(
            &mut t,
            high_qd(),
            DeviceSettings::default(),
            &b,
            200,
            500,
            11,
            |_, _| 1.0,
        )
    };
    // Within the SLO: less moderation can only add interrupts per op, so it is never tried.
    let r = explore(policy(Objective::Balanced).slo_p99_ns);
    assert!(!r.outcomes.is_empty(), "the tuner explored");
    for (_, o, from) in &r.outcomes {
        if o.action == Action::Change {
            assert!(!less(from, &o.to), "{}", o.reason);
        }
    }
    // Over the SLO by less than the moderation delay in force (p99 about 366 us at the
    // defaults, 44 us of it moderation; SLO 340 us): less moderation is tried first, to bring
    // p99 down.
    let r = explore(340_000);
    let first = r.outcomes.first().expect("the tuner explored");
    assert!(
        first.1.action == Action::Change && less(&first.2, &first.1.to),
        "{:?}",
        r.outcomes
            .iter()
            .map(|(_, o, _)| &o.reason)
            .collect::<Vec<_>>()
    );
    // Over the SLO by far more than moderation holds anything back (SLO 1 us): that is no
    // moderation's doing, and less of it is never tried.
    let r = explore(1_000);
    assert!(!r.outcomes.is_empty(), "the tuner explored");
    for (_, o, from) in &r.outcomes {
        if o.action == Action::Change {
            assert!(!less(from, &o.to), "{}", o.reason);
        }
    }
}

/// Whether a run kept nothing: every change is a trial undone by the next decision (a revert to
/// `start`, the incumbent measured again), and the device ends at `start`.
fn kept_nothing(r: &Run, start: DeviceSettings) -> Result<(), String> {
    for pair in r.outcomes.chunks(2) {
        if pair[0].1.action != Action::Change {
            return Err(format!("not a trial: {}", pair[0].1.reason));
        }
        if let Some(second) = pair.get(1) {
            if second.1.action != Action::Revert || second.1.to != start {
                return Err(format!("kept: {}", second.1.reason));
            }
        }
    }
    if r.last != start {
        return Err(format!("ended at {:?}", r.last));
    }
    Ok(())
}

// The tuner's verdicts are statistical: at its confidence, a candidate that does nothing is
// kept only when two A-B-A rounds both show it better by chance (about one trial in a few
// thousand, and these tests run hundreds of trials). So these cases come from a fixed seed: the
// same cases on every run, none of which may fail, rather than a new draw that fails once in a
// while by the tuner's design.
proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        rng_seed: proptest::test_runner::RngSeed::Fixed(16),
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_stationary_workload_converges_and_stays_put(
        objective in objective_strategy(),
        high in any::<bool>(),
        noise in 0.0f64..0.04,
        seed in any::<u64>(),
    ) {
        let dev = SimDevice { noise, ..if high { high_qd() } else { low_rate() } };
        let mut t = DeviceTuner::new(policy(objective), TunerParams::default());
        let r = run(&mut t, dev, DeviceSettings::default(), &Bounds::default(), 600, 500, seed, |_, _| 1.0);
        // 200 s: with 4% noise per window a search of A-B-A rounds (two or three for anything
        // kept) takes up to about 150 s. Among fixed cases: a random draw found one (latency,
        // low rate, 3.8% noise) whose search ran its last trial from 199 s to 202 s.
        let late: Vec<_> = r.outcomes.iter().filter(|(now, _, _)| *now > 200_000).collect();
        prop_assert!(late.is_empty(), "changes after 200 s of a stationary workload: {late:?}");
        prop_assert_eq!(t.state(), TunerState::Converged);
    }

    #[test]
    fn a_drift_alone_keeps_no_change_and_parks(
        objective in objective_strategy(),
        rate in 0.002f64..0.007,
        up in any::<bool>(),
        noise in 0.0f64..0.04,
        high in any::<bool>(),
        seed in any::<u64>(),
    ) {
        // Throughput drifts linearly by `rate` of its start per second, up or down, and nothing
        // the tuner sets makes any difference (the figures of the default settings, always).
        let dev = SimDevice { noise, ..if high { high_qd() } else { low_rate() } };
        let fixed = DeviceSettings::default();
        let slope = if up { rate } else { -rate };
        let mut t = DeviceTuner::new(policy(objective), TunerParams::default());
        let start = DeviceSettings::default();
        let r = run_with(&mut t, start, &Bounds::default(), 180, 500, seed, |i, _, rng| {
            let drift = 1.0 + slope * (i as f64 * 0.5);
            dev.window_drifting(&fixed, 0.5, rng, 1.0, drift)
        });
        if let Err(e) = kept_nothing(&r, start) {
            prop_assert!(false, "{e}");
        }
        prop_assert_eq!(t.state(), TunerState::Converged);
    }

    #[test]
    fn with_a_real_dependence_and_a_drift_the_optimum_is_still_found(
        rate in 0.0f64..0.004,
        up in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let dev = SimDevice { noise: 0.01, ..high_qd() };
        let objective = Objective::Throughput;
        let slope = if up { rate } else { -rate };
        let mut t = DeviceTuner::new(policy(objective), TunerParams::default());
        let r = run_with(&mut t, DeviceSettings::default(), &Bounds::default(), 160, 500, seed,
            |i, s, rng| dev.window_drifting(s, 0.5, rng, 1.0, 1.0 + slope * (i as f64 * 0.5)));
        let (got, best) = (score(&dev, &r.last, objective), best_on_grid(&dev, objective));
        prop_assert!(got / best >= 0.95, "reached {got} vs best {best}: {:?}",
            r.outcomes.iter().map(|(_, o, _)| &o.reason).collect::<Vec<_>>());
    }

    #[test]
    fn a_change_that_costs_10_to_20_percent_of_throughput_is_reverted(
        objective in prop_oneof![Just(Objective::Latency), Just(Objective::Balanced)],
        cost in 0.10f64..0.20,
        noise in 0.0f64..0.05,
        rate in -0.003f64..0.003,
        seed in any::<u64>(),
    ) {
        // Every candidate halves the interrupts per op and cuts p99 by 30% (what balanced and
        // latency optimise) but costs `cost` of the throughput: beyond the 5% tolerance.
        let dev = SimDevice { noise, ..high_qd() };
        let start = DeviceSettings::default();
        let mut t = DeviceTuner::new(policy(objective), TunerParams::default());
        let r = run_with(&mut t, start, &Bounds::default(), 200, 500, seed, |i, s, rng| {
            let drift = 1.0 + rate * (i as f64 * 0.5);
            let mut w = dev.window_drifting(&start, 0.5, rng, 1.0, drift);
            if *s != start {
                let kept = ((w.ops as f64) * (1.0 - cost)) as u64;
                let scale = kept as f64 / w.ops.max(1) as f64;
                w.buckets = w
                    .buckets
                    .iter()
                    .map(|(b, n)| {
                        let lat = enlight_probes::hist::bucket_mid_ns(*b) as f64 * 0.7;
                        (bucket_index(lat as u64), (*n as f64 * scale) as u64)
                    })
                    .collect();
                w.ops = w.buckets.values().sum();
                w.bytes = w.ops * 4096;
                w.interrupts /= 2;
                w.interrupts = (w.interrupts as f64 * scale) as u64;
            }
            w
        });
        prop_assert!(!r.outcomes.is_empty());
        if let Err(e) = kept_nothing(&r, start) {
            prop_assert!(false, "{e}");
        }
    }
}

/// Segments of windows with `bytes_per_op` each.
fn segment_of(bytes_per_op: &[u64]) -> Segment {
    let mut s = Segment::default();
    for (i, &bpo) in bytes_per_op.iter().enumerate() {
        let w = Window {
            duration_s: 0.5,
            ops: 1000,
            bytes: 1000 * bpo,
            ..Default::default()
        };
        s.push(i as f64 * 0.5, &w, 100);
    }
    s
}

#[test]
fn a_nics_own_gro_is_no_workload_change_but_the_incumbent_moving_is() {
    // kernel-tcp: a NAPI timer makes GRO merge twice as many segments per packet, so the
    // candidate's bytes/packet double; the incumbent's, before and after, stay.
    let (a1, b, a2) = (
        segment_of(&[1500, 1500]),
        segment_of(&[3000, 3000]),
        segment_of(&[1500, 1500]),
    );
    assert_eq!(
        workload_shift(Throughput::Ops, &a1, &b, &a2, 0.3),
        Some((1500.0, 3000.0))
    );
    assert_eq!(workload_shift(Throughput::Bytes, &a1, &b, &a2, 0.3), None);
    // The incumbent's own bytes/op moved across the trial: the workload did change.
    let a2_moved = segment_of(&[600, 600]);
    assert_eq!(
        workload_shift(Throughput::Bytes, &a1, &b, &a2_moved, 0.3),
        Some((1500.0, 600.0))
    );
    // Nothing measured before the candidate: nothing to compare.
    assert_eq!(
        workload_shift(Throughput::Bytes, &Segment::default(), &b, &a2_moved, 0.3),
        None
    );
}

#[test]
fn napi_deferral_is_never_tried_alone_without_a_timer() {
    // NAPI's knobs at the kernel's defaults (0, 0), on a device where nothing makes a
    // difference: every objective's search parks without ever moving napi_defer_hard_irqs
    // alone while gro_flush_timeout is 0 (a no-op for the kernel).
    let b = Bounds {
        moderation_frames: (0, 256),
        moderation_usecs: (0, 1000),
        frames_ladder: Ladder::Napi,
        usecs_ladder: Ladder::Napi,
        ..Bounds::default()
    };
    let start = DeviceSettings {
        moderation_frames: 0,
        moderation_usecs: 0,
        ..DeviceSettings::default()
    };
    for objective in [
        Objective::Throughput,
        Objective::Latency,
        Objective::Balanced,
    ] {
        let mut t = DeviceTuner::new(policy(objective), TunerParams::default());
        let r = run(&mut t, low_rate(), start, &b, 300, 500, 5, |_, _| 1.0);
        let mut tried = Vec::new();
        for (_, o, from) in &r.outcomes {
            // Moves of the deferral (other knobs, the budget, move on their own).
            if o.action == Action::Change
                && *from == start
                && o.to.moderation_frames != start.moderation_frames
            {
                tried.push((o.to.moderation_frames, o.to.moderation_usecs));
            }
        }
        assert!(
            tried.iter().all(|&(_, usecs)| usecs > 0),
            "{objective:?}: {tried:?}"
        );
        // The joint move (deferral and timer together) is still tried where the objective's
        // prior has it.
        if objective == Objective::Throughput {
            assert_eq!(tried.first(), Some(&(1, 10)), "{tried:?}");
        }
    }
}

/// A knob value the device refuses every time (e1000's rx-usecs 5, EINVAL) is proposed again
/// from each new incumbent unless the tuner remembers it: once, however often the search
/// passes it.
#[test]
fn a_value_the_device_always_refuses_is_not_proposed_again_and_again() {
    let mut t = DeviceTuner::new(policy(Objective::Balanced), TunerParams::default());
    let dev_a = high_qd();
    let dev_b = SimDevice {
        service_ns: 60_000.0,
        ..high_qd()
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let b = Bounds::default();
    let mut current = DeviceSettings::default();
    let refused = |s: &DeviceSettings| s.poll_budget == 128;
    let (mut refusals, mut changes, mut reasons) = (0, 0, String::new());
    for i in 1..1200u64 {
        // Phase changes re-open the search from wherever the tuner stands.
        let dev = if (i / 300) % 2 == 0 { &dev_a } else { &dev_b };
        let w = dev.window(&current, 0.5, &mut rng, 1.0);
        if let Some(o) = t.step(i * 500, &current, &b, &w) {
            reasons.push_str(&o.reason);
            if refused(&o.to) {
                refusals += 1;
                t.apply_failed("Invalid argument (os error 22)");
            } else {
                if o.action == Action::Change {
                    changes += 1;
                }
                current = o.to;
                t.applied(current);
            }
        }
    }
    assert_ne!(t.state(), TunerState::Frozen, "failures were not in a row");
    assert!(
        changes > 3,
        "the search went on around the refused value ({changes} changes)"
    );
    assert!(refusals <= 1, "poll budget 128 proposed {refusals} times");
    assert!(
        reasons.contains(
            "applying failed (Invalid argument (os error 22)); not proposed again: poll_budget 128"
        ),
        "the next decision says why"
    );
}

/// A judgement whose objective's estimated gain is `gain` with an interval of ±`half_width`,
/// nothing shown either way.
fn pointing(gain: f64, half_width: f64) -> Judgement {
    Judgement {
        verdict: Verdict::Inconclusive,
        why: String::new(),
        effects: Vec::new(),
        ops_estimate: None,
        drift_corrected: true,
        objective_improved: false,
        constraint_broken: false,
        gain: Some(gain),
        gain_half_width: Some(half_width),
    }
}

#[test]
fn a_gain_the_noise_would_still_hide_after_every_round_earns_no_further_round() {
    let z = TunerParams::default().z;
    // The low-rate disk's p99 in `bench tune` after one round: -55% [-171%, +60%].
    assert!(!could_be_shown(&pointing(0.55, 1.15), 1, z));
    // A 5% gain at ±5%: three rounds (±2.9%, ±4.3% at the stricter z) could show it; at ±6%
    // (±3.5%, ±5.2%) they could not.
    assert!(could_be_shown(&pointing(0.05, 0.05), 1, z));
    assert!(!could_be_shown(&pointing(0.05, 0.06), 1, z));
    // ... and nothing more can once the last round is in.
    assert!(!could_be_shown(&pointing(0.05, 0.05), MAX_ROUNDS, z));
    // An unbounded interval, or none at all, shows nothing.
    assert!(!could_be_shown(&pointing(0.5, f64::INFINITY), 1, z));
    assert!(!could_be_shown(
        &Judgement {
            gain: None,
            ..pointing(0.5, 0.1)
        },
        1,
        z
    ));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        rng_seed: proptest::test_runner::RngSeed::Fixed(17),
        ..ProptestConfig::default()
    })]

    /// Know when to stop (issue 16 item 3): on a device whose figures owe nothing to the
    /// settings, with up to 4% noise per window, every trial ends within the noise, and after
    /// `max_fruitless_trials` of them the tuner parks with moves untried, says so, and stays
    /// put: well inside the first 30 s of a phase that `bench tune` scores from.
    #[test]
    fn trials_lost_in_the_noise_park_the_tuner_within_30_seconds(
        objective in objective_strategy(),
        high in any::<bool>(),
        noise in 0.01f64..0.04,
        seed in any::<u64>(),
    ) {
        let dev = SimDevice { noise, ..if high { high_qd() } else { low_rate() } };
        let fixed = DeviceSettings::default();
        let mut t = DeviceTuner::new(policy(objective), TunerParams::default());
        let mut announced = Vec::new();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut current = fixed;
        let mut last_change_ms = 0;
        for i in 0..240u64 {
            let now = (i + 1) * 500;
            let w = dev.window(&fixed, 0.5, &mut rng, 1.0);
            if let Some(o) = t.step(now, &current, &Bounds::default(), &w) {
                current = o.to;
                t.applied(current);
                last_change_ms = now;
            }
            announced.extend(t.take_announcement());
        }
        prop_assert_eq!(t.state(), TunerState::Converged);
        prop_assert!(last_change_ms <= 30_000, "last change at {last_change_ms} ms: {announced:?}");
        prop_assert_eq!(current, fixed);
        prop_assert!(
            announced.iter().any(|a| a.contains("left untried") || a.contains("no move left")),
            "{announced:?}"
        );
    }
}
