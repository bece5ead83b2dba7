//! The controllers' runs of `enlight bench tune`: static defaults, the DIM-style controller and
//! enlight's tuner (or, on a kernel scenario, the real enlightd) each run a scenario's whole
//! plan, deciding every tick; each run is then scored phase by phase against the oracle.

use std::time::{Duration, Instant};

use anyhow::Result;
use enlight_driver::settings::DeviceSettings;
use enlightd::tuner::decide::{Policy, TunerParams};
use enlightd::tuner::dim::Dim;
use enlightd::tuner::window::Window;
use enlightd::tuner::{Action, Bounds, Controller, DeviceTuner, Static, TunerMode};

use super::rig::{sleep_until, Rig, Run};
use super::score;
use super::{
    oracle, ControllerRun, Length, PhaseOracle, PhaseScore, Point, Scenario, ScenarioResult,
};

/// A kernel NIC's point in its own knobs' words.
fn settings_text(s: &DeviceSettings) -> String {
    format!(
        "napi_defer_hard_irqs {}, gro_flush_timeout {} us",
        s.moderation_frames, s.moderation_usecs
    )
}

/// enlight's own run on a kernel scenario: the real enlightd decides and applies, so the bench
/// only watches (the settings it reads each tick say what enlightd changed).
struct Enlightd;

impl Controller for Enlightd {
    fn name(&self) -> &'static str {
        "enlight"
    }
    fn step(
        &mut self,
        _: u64,
        _: &DeviceSettings,
        _: &Bounds,
        _: &Window,
    ) -> Option<enlightd::tuner::decide::Outcome> {
        None
    }
}

fn tuner_for(s: &Scenario) -> DeviceTuner {
    DeviceTuner::new(
        Policy {
            mode: TunerMode::Auto,
            objective: s.objective,
            slo_p99_ns: s.slo_us * 1000,
            pinned: false,
        },
        TunerParams::default(),
    )
    .counting(s.throughput())
}

/// One controller on one scenario's whole plan.
fn run_controller<R: Rig>(
    h: &mut R,
    s: &Scenario,
    phase_s: f64,
    ctl: &mut dyn Controller,
    tick: Duration,
) -> Result<ControllerRun> {
    // On a kernel scenario enlight's run is the real enlightd's.
    let enlightd = s.device == "veth" && ctl.name() == "enlight";
    let mut dev = h.start(s, &s.phases, phase_s * s.phases.len() as f64, enlightd)?;
    let (mut current, bounds) = dev.backend().get()?;
    let t0 = Instant::now();
    let mut prev = h.cumulative(&dev)?;
    let mut prev_t = t0;
    let mut next = t0 + tick;
    let mut points = Vec::new();
    loop {
        sleep_until(next)?;
        next += tick;
        let exited = dev.ended()?;
        let now = Instant::now();
        let cum = h.cumulative(&dev)?;
        let window = Window::between(&prev, &cum, now.duration_since(prev_t).as_secs_f64());
        let t_start = prev_t.duration_since(t0).as_secs_f64();
        prev = cum;
        prev_t = now;
        let t = now.duration_since(t0).as_secs_f64();
        let phase_at = |t: f64| (t / phase_s).floor().max(0.0) as usize;
        let (phase, phase_end) = (phase_at(t_start), phase_at(t - 1e-9));
        if exited || phase_end >= s.phases.len() {
            break;
        }
        let mut change = None;
        if let Ok((reported, _)) = dev.backend().get() {
            // Changed by someone other than this loop: enlightd, on a kernel scenario.
            if enlightd && reported != current {
                change = Some(format!(
                    "enlightd: {} → {}",
                    settings_text(&current),
                    settings_text(&reported)
                ));
            }
            current = reported;
        }
        let during = current;
        let now_ms = now.duration_since(t0).as_millis() as u64;
        if let Some(o) = ctl.step(now_ms, &current, &bounds, &window) {
            if o.action != Action::Recommend {
                match dev.backend().apply(&current, &o.to) {
                    Ok(in_force) => {
                        current = in_force;
                        change = Some(o.reason);
                    }
                    Err(e) => log::warn!("{}: applying {:?}: {e}", ctl.name(), o.to),
                }
            }
        }
        points.push(Point {
            t,
            t_start,
            phase,
            straddles: phase_end != phase,
            settings: during,
            figures: score::merge([&window]),
            change,
            window,
        });
    }
    let finished = h.finish(dev)?;
    let ebpf_ops = finished
        .ebpf_ops
        .unwrap_or_else(|| points.iter().map(|p| p.window.ops).sum());
    let change_times: Vec<f64> = points
        .iter()
        .filter(|p| p.change.is_some())
        .map(|p| p.t)
        .collect();
    let max_changes_in_1s = change_times
        .iter()
        .map(|&t0| {
            change_times
                .iter()
                .filter(|&&t| t >= t0 && t < t0 + 0.95)
                .count()
        })
        .max()
        .unwrap_or(0);
    Ok(ControllerRun {
        controller: ctl.name().to_string(),
        changes: change_times.len(),
        max_changes_in_1s,
        points,
        phases: Vec::new(),
        workload_ops: finished.workload_ops,
        ebpf_ops,
        enlightd_decisions: finished.decisions,
    })
}

/// Scores a run's phases against the oracle.
fn score_run(
    run: &mut ControllerRun,
    s: &Scenario,
    oracle: &[PhaseOracle],
    phase_s: f64,
    eval_from: f64,
) {
    let slo = s.slo_us as f64;
    run.phases = oracle
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let start = i as f64 * phase_s;
            // Windows wholly inside the phase: the one across the boundary holds the previous
            // phase's traffic too.
            let in_phase: Vec<&Point> = run
                .points
                .iter()
                .filter(|p| p.phase == i && !p.straddles)
                .collect();
            let eval: Vec<&Window> = in_phase
                .iter()
                .filter(|p| p.t - start > eval_from)
                .map(|p| &p.window)
                .collect();
            let figures = score::merge(eval.iter().copied());
            let fraction = match (&figures, &o.best) {
                (Some(f), Some(b)) => Some(score::fraction(s.objective, s.throughput(), slo, f, b)),
                _ => None,
            };
            // The earliest tick from which the rest of the phase reaches 95% of the oracle.
            let t95_s = o.best.and_then(|best| {
                (0..in_phase.len()).find_map(|k| {
                    let rest = score::merge(in_phase[k..].iter().map(|p| &p.window))?;
                    (score::fraction(s.objective, s.throughput(), slo, &rest, &best) >= 0.95)
                        .then(|| (in_phase[k].t_start - start).max(0.0))
                })
            });
            let changes: Vec<f64> = in_phase
                .iter()
                .filter(|p| p.change.is_some())
                .map(|p| p.t - start)
                .collect();
            PhaseScore {
                figures,
                fraction,
                t95_s,
                last_change_s: changes.last().copied(),
                changes: changes.len(),
            }
        })
        .collect();
}

/// One scenario on its rig: the oracle's sweep of each phase, then each controller's run.
pub(super) fn scenario<R: Rig>(
    h: &mut R,
    s: &Scenario,
    grid: &[DeviceSettings],
    length: Length,
    phase_s: f64,
    eval_from: f64,
    tick: Duration,
) -> Result<ScenarioResult> {
    eprintln!(
        "== {} ({}): oracle sweep of {} points per phase",
        s.name,
        s.description,
        grid.len()
    );
    let mut oracle = Vec::new();
    for spec in &s.phases {
        let o = oracle::sweep(h, spec, grid, length, s)?;
        if let (Some(best), Some(st)) = (o.best, o.best_settings) {
            eprintln!(
                "   oracle {}: {st:?} -> {:.0} ops/s ({:.1} MB/s), p99 {:.0} us, {:.3} irq/op",
                o.spec,
                best.ops_per_sec,
                best.bytes_per_sec / 1e6,
                best.p99_us,
                best.interrupts_per_op
            );
        }
        oracle.push(o);
    }
    let mut runs = Vec::new();
    let enlight: Box<dyn Controller> = if s.device == "veth" {
        Box::new(Enlightd)
    } else {
        Box::new(tuner_for(s))
    };
    let mut controllers: Vec<Box<dyn Controller>> =
        vec![Box::new(Static), Box::new(Dim::default()), enlight];
    for ctl in controllers.iter_mut() {
        let mut run = run_controller(h, s, phase_s, ctl.as_mut(), tick)?;
        score_run(&mut run, s, &oracle, phase_s, eval_from);
        eprintln!(
            "   {:8} fractions {:?}, changes {}, t95 {:?}",
            run.controller,
            run.phases
                .iter()
                .map(|p| p.fraction.map(|f| (f * 1000.0).round() / 1000.0))
                .collect::<Vec<_>>(),
            run.changes,
            run.phases.iter().map(|p| p.t95_s).collect::<Vec<_>>()
        );
        runs.push(run);
    }
    Ok(ScenarioResult {
        scenario: s.clone(),
        phase_s,
        eval_from_s: eval_from,
        oracle,
        runs,
    })
}
