//! The judge's statistics and verdicts on constructed trials.

use super::*;
use enlight_probes::hist::bucket_index;

/// A window of `ops_per_sec` over 0.5 s with `irq_per_op`, 98% of completions at `p50_ns` and
/// 2% at `p99_ns` (so the p99 is `p99_ns`).
fn window(ops_per_sec: f64, irq_per_op: f64, p50_ns: u64, p99_ns: u64) -> Window {
    let ops = (ops_per_sec * 0.5) as u64;
    let tail = ops / 50;
    let mut w = Window {
        duration_s: 0.5,
        ops,
        bytes: ops * 4096,
        interrupts: (ops as f64 * irq_per_op) as u64,
        ring_full: 0,
        napi_polls: 0,
        buckets: Default::default(),
    };
    *w.buckets.entry(bucket_index(p50_ns)).or_default() += ops - tail;
    *w.buckets.entry(bucket_index(p99_ns)).or_default() += tail;
    w
}

/// Segments of an A-B-A trial of `n` windows each, 0.5 s apart, from `f(t, is_b) -> window`.
fn trial(n: usize, f: impl Fn(f64, bool) -> Window) -> (Segment, Segment, Segment) {
    let mut segs = [Segment::default(), Segment::default(), Segment::default()];
    let mut t = 0.0;
    for (i, seg) in segs.iter_mut().enumerate() {
        // One settle window between segments is not measured.
        t += 0.5;
        for _ in 0..n {
            t += 0.5;
            seg.push(t, &f(t, i == 1), 100);
        }
    }
    let [a, b, c] = segs;
    (a, b, c)
}

fn rules(objective: Objective) -> Rules {
    Rules {
        objective,
        throughput: Throughput::Ops,
        slo_p99_ns: 5_000_000,
        z: 2.0,
        margin: 0.03,
        tolerance: 0.05,
        cluster: 4.0,
        ops_budget: 1.0,
    }
}

/// Deterministic noise in [-1, 1].
fn wiggle(t: f64) -> f64 {
    ((t * 12.9898).sin() * 43758.5453).fract() * 2.0 - 1.0
}

#[test]
fn t_critical_values_match_the_tables() {
    // Student's t, two-sided 95% (z = 1.96): df 5 → 2.571, df 10 → 2.228, df 30 → 2.042.
    for (df, exact) in [(5, 2.571), (10, 2.228), (30, 2.042)] {
        let t = t_critical(1.96, df);
        assert!((t - exact).abs() / exact < 0.01, "df {df}: {t} vs {exact}");
    }
    assert!((t_critical(2.0, 10_000) - 2.0).abs() < 1e-3);
    assert!(t_critical(2.0, 0).is_infinite());
}

#[test]
fn a_linear_drift_is_not_an_effect_when_the_incumbent_is_measured_again() {
    // Throughput falls 3% of its start per second, settings make no difference.
    let drift = |t: f64| 40_000.0 * (1.0 - 0.03 * t);
    let (a1, b, a2) = trial(3, |t, _| window(drift(t), 0.1, 100_000, 400_000));
    let pts = |s: &Segment| -> Vec<(f64, f64)> {
        s.samples.iter().map(|w| (w.t_s, w.ops_per_sec)).collect()
    };
    let a: Vec<_> = pts(&a1).into_iter().chain(pts(&a2)).collect();
    let e = drift_corrected("ops/s", &a, &pts(&b), 2.0).unwrap();
    assert!(e.estimate.abs() < 0.005, "{e}");
    // Compared with the windows before it only, the candidate looks about 7% slower.
    let naive = drift_corrected("ops/s", &pts(&a1), &pts(&b), 2.0).unwrap();
    assert!(naive.estimate < -0.05, "{naive}");
}

#[test]
fn a_real_effect_is_measured_through_the_drift() {
    let drift = |t: f64| 40_000.0 * (1.0 + 0.02 * t);
    let (a1, b, a2) = trial(3, |t, is_b| {
        let f = if is_b { 0.85 } else { 1.0 };
        window(
            drift(t) * f * (1.0 + 0.01 * wiggle(t)),
            0.1,
            100_000,
            400_000,
        )
    });
    let j = judge(&rules(Objective::Latency), &a1, &b, &a2);
    let ops = j.effects.iter().find(|e| e.metric == "ops/s").unwrap();
    assert!((ops.estimate + 0.15).abs() < 0.02, "{ops}");
    assert!(ops.lo < ops.estimate && ops.estimate < ops.hi);
    assert_eq!(j.verdict, Verdict::Worse, "{}", j.why);
    assert!(j.drift_corrected);
    assert!(j.why.contains("corrected for drift"), "{}", j.why);
}

#[test]
fn quantile_intervals_bracket_the_quantile_and_narrow_with_samples() {
    let w = window(20_000.0, 0.1, 100_000, 400_000);
    let mut few = Segment::default();
    few.push(1.0, &w, 100);
    let mut many = Segment::default();
    for i in 0..20 {
        many.push(i as f64, &w, 100);
    }
    let (lo, mid, hi) = quantile_ci(&few.buckets(), 0.99, 2.0, 4.0).unwrap();
    assert!(lo <= mid && mid <= hi, "{lo} {mid} {hi}");
    let (lo2, _, hi2) = quantile_ci(&many.buckets(), 0.99, 2.0, 4.0).unwrap();
    assert!(hi2 - lo2 <= hi - lo);
    assert!(quantile_ci(&BTreeMap::new(), 0.99, 2.0, 4.0).is_none());
}

#[test]
fn fewer_interrupts_at_the_same_throughput_is_kept_for_balanced() {
    let (a1, b, a2) = trial(3, |t, is_b| {
        let irq = if is_b { 0.07 } else { 0.1 };
        window(40_000.0 * (1.0 + 0.01 * wiggle(t)), irq, 100_000, 400_000)
    });
    let j = judge(&rules(Objective::Balanced), &a1, &b, &a2);
    assert_eq!(j.verdict, Verdict::Better, "{}", j.why);
    assert!(j.keep());
    assert!(j.why.contains("interrupts/op -30.0%"), "{}", j.why);
}

#[test]
fn a_noisy_throughput_drop_is_not_kept_even_with_fewer_interrupts() {
    // The demo: interrupts/op fall, throughput falls ~20% with 10% noise per window.
    // Not *proven* worse, so the old guard passed it; not shown within 5% either: revert.
    let (a1, b, a2) = trial(3, |t, is_b| {
        let (ops, irq) = if is_b {
            (32_000.0, 0.14)
        } else {
            (40_000.0, 0.17)
        };
        window(ops * (1.0 + 0.1 * wiggle(t)), irq, 2_000_000, 2_400_000)
    });
    let j = judge(&rules(Objective::Balanced), &a1, &b, &a2);
    assert!(!j.keep(), "{}", j.why);
    assert!(j.why.contains("throughput"), "{}", j.why);
}

/// A kernel NIC's windows: packets, no latency buckets.
fn untimed(ops_per_sec: f64, irq_per_op: f64) -> Window {
    let mut w = window(ops_per_sec, irq_per_op, 1_000, 1_000);
    w.buckets.clear();
    w
}

#[test]
fn a_device_without_latency_is_judged_on_what_it_measures() {
    // `enlight bench tune --scenario kernel-tcp`: the tuner kept a change that cut packets/s by
    // 12.9% because no latency read as "over the SLO" and any candidate as "back under it".
    for objective in [Objective::Throughput, Objective::Balanced] {
        let (a1, b, a2) = trial(4, |t, is_b| {
            let ops = if is_b { 34_800.0 } else { 40_000.0 };
            untimed(ops * (1.0 + 0.01 * wiggle(t)), 0.1)
        });
        let j = judge(&rules(objective), &a1, &b, &a2);
        assert!(!j.keep(), "{objective:?}: {}", j.why);
        assert!(!j.why.contains("SLO"), "{objective:?}: {}", j.why);
        assert_eq!(p99_against_slo(&b, 5_000_000, 2.0, 4.0), None);
    }
    // A real gain is still kept on throughput alone.
    let (a1, b, a2) = trial(4, |t, is_b| {
        let ops = if is_b { 46_000.0 } else { 40_000.0 };
        untimed(ops * (1.0 + 0.01 * wiggle(t)), 0.1)
    });
    let j = judge(&rules(Objective::Throughput), &a1, &b, &a2);
    assert_eq!(j.verdict, Verdict::Better, "{}", j.why);
}

#[test]
fn a_p99_over_the_slo_is_never_kept_for_throughput() {
    let (a1, b, a2) = trial(3, |t, is_b| {
        let (ops, p99) = if is_b {
            (50_000.0, 9_000_000)
        } else {
            (40_000.0, 3_000_000)
        };
        window(ops * (1.0 + 0.01 * wiggle(t)), 0.1, 1_000_000, p99)
    });
    let j = judge(&rules(Objective::Throughput), &a1, &b, &a2);
    assert_eq!(j.verdict, Verdict::Worse, "{}", j.why);
    assert!(j.why.contains("over the SLO"), "{}", j.why);
}

#[test]
fn a_flat_move_is_told_from_an_inconclusive_one() {
    let quiet = trial(3, |t, _| {
        window(40_000.0 * (1.0 + 0.002 * wiggle(t)), 0.1, 100_000, 400_000)
    });
    let j = judge(&rules(Objective::Throughput), &quiet.0, &quiet.1, &quiet.2);
    assert_eq!(j.verdict, Verdict::Flat, "{}", j.why);
    let noisy = trial(3, |t, _| {
        window(40_000.0 * (1.0 + 0.2 * wiggle(t)), 0.1, 100_000, 400_000)
    });
    let j = judge(&rules(Objective::Throughput), &noisy.0, &noisy.1, &noisy.2);
    assert_eq!(j.verdict, Verdict::Inconclusive, "{}", j.why);
}

#[test]
fn the_throughput_given_up_earlier_counts_against_the_tolerance() {
    // 2% fewer ops/s is within 5% alone, but not after changes that already cost 4%.
    let (a1, b, a2) = trial(4, |t, is_b| {
        let (ops, irq) = if is_b {
            (39_200.0, 0.05)
        } else {
            (40_000.0, 0.1)
        };
        window(ops * (1.0 + 0.001 * wiggle(t)), irq, 100_000, 400_000)
    });
    let fresh = judge(&rules(Objective::Balanced), &a1, &b, &a2);
    assert!(fresh.keep(), "{}", fresh.why);
    let spent = Rules {
        ops_budget: 0.96,
        ..rules(Objective::Balanced)
    };
    let j = judge(&spent, &a1, &b, &a2);
    assert!(!j.keep(), "{}", j.why);
}

#[test]
fn tails_that_move_from_window_to_window_widen_the_p99_interval() {
    // Each window's whole tail lands in one bucket that moves by ±10%: the merged histogram
    // holds thousands of completions, but only a few independent tail values.
    let steady = trial(3, |_, _| window(40_000.0, 0.1, 100_000, 400_000));
    let moving = trial(3, |t, _| {
        window(
            40_000.0,
            0.1,
            100_000,
            (400_000.0 * (1.0 + 0.1 * wiggle(t))) as u64,
        )
    });
    let d_steady = tail_dispersion(&[&[&steady.0, &steady.2], &[&steady.1]], 0.99);
    let d_moving = tail_dispersion(&[&[&moving.0, &moving.2], &[&moving.1]], 0.99);
    assert!(d_steady < 2.0, "{d_steady}");
    assert!(d_moving > 20.0, "{d_moving}");
    // So a latency candidate whose windows happened to draw low tails is not kept.
    let j = judge(&rules(Objective::Latency), &moving.0, &moving.1, &moving.2);
    assert!(!j.keep(), "{}", j.why);
}

/// A kernel NIC's untimed window of `packets_per_sec` carrying `bytes_per_packet`, with
/// `polls_per_packet` NAPI polls and no interrupt (a veth).
fn packets(packets_per_sec: f64, bytes_per_packet: f64, polls_per_packet: f64) -> Window {
    let mut w = untimed(packets_per_sec, 0.0);
    w.bytes = (w.ops as f64 * bytes_per_packet) as u64;
    w.napi_polls = (w.ops as f64 * polls_per_packet) as u64;
    w
}

#[test]
fn a_nics_throughput_is_its_bytes_not_its_packets() {
    // bench tune kernel-tcp, run 2: the kept point raised packets/s by 41% while bytes/s fell
    // by 26% (GRO merged fewer segments per packet).
    let (a1, b, a2) = trial(4, |t, is_b| {
        let (pps, bpp) = if is_b {
            (40_000.0 * 1.41, 1.0e4 * 0.74 / 1.41)
        } else {
            (40_000.0, 1.0e4)
        };
        packets(pps * (1.0 + 0.01 * wiggle(t)), bpp, 0.1)
    });
    let in_packets = judge(&rules(Objective::Throughput), &a1, &b, &a2);
    assert!(in_packets.keep(), "{}", in_packets.why);
    let bytes = Rules {
        throughput: Throughput::Bytes,
        ..rules(Objective::Throughput)
    };
    let j = judge(&bytes, &a1, &b, &a2);
    assert_eq!(j.verdict, Verdict::Worse, "{}", j.why);
    assert!(
        j.why.contains("throughput (bytes/s) confidently worse"),
        "{}",
        j.why
    );
    let e = j.effects.iter().find(|e| e.metric == "bytes/s").unwrap();
    assert!((e.estimate + 0.26).abs() < 0.02, "{e}");
    assert!((j.ops_estimate.unwrap() + 0.26).abs() < 0.02);
    // Fewer, larger packets carrying 10% more bytes are kept; so are they as the guard of
    // latency and balanced (a move that lost 26% of the bytes is not).
    let (a1, b, a2) = trial(4, |t, is_b| {
        let (pps, bpp) = if is_b {
            (30_000.0, 1.1e4 * 40.0 / 30.0)
        } else {
            (40_000.0, 1.0e4)
        };
        packets(pps * (1.0 + 0.01 * wiggle(t)), bpp, 0.1)
    });
    assert_eq!(judge(&bytes, &a1, &b, &a2).verdict, Verdict::Better);
}

#[test]
fn balanced_on_a_nic_without_interrupts_judges_napi_polls_per_op() {
    // A veth: no IRQ, so interrupts/op are 0 on both sides; deferral halves polls per packet
    // while bytes/s hold.
    let (a1, b, a2) = trial(4, |t, is_b| {
        let polls = if is_b { 0.05 } else { 0.1 };
        packets(40_000.0 * (1.0 + 0.01 * wiggle(t)), 1500.0, polls)
    });
    let r = Rules {
        throughput: Throughput::Bytes,
        ..rules(Objective::Balanced)
    };
    let j = judge(&r, &a1, &b, &a2);
    assert_eq!(j.verdict, Verdict::Better, "{}", j.why);
    assert!(
        j.why.contains("balanced (napi polls/op) improved"),
        "{}",
        j.why
    );
    let e = j
        .effects
        .iter()
        .find(|e| e.metric == "napi polls/op")
        .unwrap();
    assert!((e.estimate + 0.5).abs() < 0.02, "{e}");
    // More polls per packet is worse.
    let (a1, b, a2) = trial(4, |t, is_b| {
        let polls = if is_b { 0.2 } else { 0.1 };
        packets(40_000.0 * (1.0 + 0.01 * wiggle(t)), 1500.0, polls)
    });
    assert_eq!(judge(&r, &a1, &b, &a2).verdict, Verdict::Worse);
    // With interrupts measured, polls do not count: the interrupts/op here stay put.
    let (a1, b, a2) = trial(4, |t, is_b| {
        let polls = if is_b { 0.05 } else { 0.1 };
        let mut w = packets(40_000.0 * (1.0 + 0.01 * wiggle(t)), 1500.0, polls);
        w.interrupts = w.ops / 10;
        w
    });
    let j = judge(&r, &a1, &b, &a2);
    assert!(!j.keep(), "{}", j.why);
    assert!(j.effects.iter().any(|e| e.metric == "interrupts/op"));
    assert!(!j.effects.iter().any(|e| e.metric == "napi polls/op"));
}
