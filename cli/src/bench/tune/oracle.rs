//! The oracle of `enlight bench tune`: the settings grids it sweeps and the sweep itself, once
//! per phase, against which every controller is scored.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use enlight_driver::settings::DeviceSettings;
use enlightd::tuner::window::Window;

use super::rig::{sleep_until, Rig, Run};
use super::score::{self, Figures};
use super::{Length, PhaseOracle, Scenario};

/// The workload the oracle sweeps for a phase: a ramp (a rate that drifts by itself) is swept at
/// its mean rate, so that the points, measured one after another, are measured at one rate.
pub fn oracle_spec(spec: &str) -> String {
    let parts: Vec<&str> = spec.split(',').collect();
    let value = |key: &str| {
        parts
            .iter()
            .find_map(|p| p.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
    };
    match (value("rate"), value("ramp")) {
        (Some(from), Some(to)) => parts
            .iter()
            .filter(|p| !p.starts_with("ramp="))
            .map(|p| {
                if p.starts_with("rate=") {
                    format!("rate={}", (from + to) / 2)
                } else {
                    p.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(","),
        _ => spec.to_string(),
    }
}

/// The oracle's grid for a kernel NIC: `napi_defer_hard_irqs` (the moderation count) by
/// `gro_flush_timeout` in µs (the delay); (0, 0) is the kernel's default. A count without a
/// timeout does nothing, so the grid pairs counts with non-zero timeouts only, plus a timeout
/// alone (GRO held for the timer, interrupts not deferred).
pub fn kernel_grid(length: Length) -> Vec<DeviceSettings> {
    let point = |defer: u32, usecs: u32| DeviceSettings {
        moderation_frames: defer,
        moderation_usecs: usecs,
        poll_budget: enlightd::kernel::backend::NAPI_WEIGHT,
        ..DeviceSettings::default()
    };
    let (defers, usecs): (&[u32], &[u32]) = match length {
        Length::Smoke => return vec![point(0, 0), point(8, 100)],
        Length::Quick => (&[2, 32], &[20, 200]),
        Length::Full => (&[1, 4, 32, 256], &[10, 50, 200, 1000]),
    };
    let mut out = vec![point(0, 0), point(0, usecs[usecs.len() / 2])];
    for &d in defers {
        for &u in usecs {
            out.push(point(d, u));
        }
    }
    out
}

/// The oracle's settings grid (ring sizes stay at their default: no disk scenario fills them).
pub fn grid(length: Length) -> Vec<DeviceSettings> {
    if length == Length::Smoke {
        return vec![
            DeviceSettings::default(),
            DeviceSettings {
                moderation_frames: 1,
                moderation_usecs: 0,
                ..DeviceSettings::default()
            },
        ];
    }
    let (frames, usecs, budgets): (&[u32], &[u32], &[u32]) = if length == Length::Quick {
        (&[1, 8, 64], &[0, 50, 200], &[64])
    } else {
        (&[1, 8, 64], &[0, 20, 100, 500], &[16, 64, 256])
    };
    let mut out = Vec::new();
    for &f in frames {
        for &u in usecs {
            for &b in budgets {
                out.push(DeviceSettings {
                    moderation_frames: f,
                    moderation_usecs: u,
                    poll_budget: b,
                    ..DeviceSettings::default()
                });
            }
        }
    }
    out
}

/// Grid points re-measured before the oracle picks its best (the best of many noisy
/// measurements is biased upwards: picking among re-measured finalists removes most of that).
pub const FINALISTS: usize = 3;

/// Puts `point` in force, settles, and measures one window of `measure`.
fn measure_point<R: Rig>(
    h: &R,
    dev: &mut R::Run,
    current: &mut DeviceSettings,
    point: &DeviceSettings,
    settle: Duration,
    measure: Duration,
) -> Result<Option<Figures>> {
    *current = dev
        .backend()
        .apply(current, point)
        .with_context(|| format!("putting {point:?} in force"))?;
    sleep_until(Instant::now() + settle)?;
    let c0 = h.cumulative(dev)?;
    let t0 = Instant::now();
    sleep_until(t0 + measure)?;
    let c1 = h.cumulative(dev)?;
    let w = Window::between(&c0, &c1, t0.elapsed().as_secs_f64());
    Ok(score::merge([&w]))
}

/// The oracle's sweep of one phase's workload: every grid point, then the [`FINALISTS`] best
/// re-measured for twice as long; the best finalist is the oracle's point, and a third,
/// independent measurement of it is the oracle's value.
pub(super) fn sweep<R: Rig>(
    h: &mut R,
    spec: &str,
    grid: &[DeviceSettings],
    length: Length,
    s: &Scenario,
) -> Result<PhaseOracle> {
    let (settle, measure) = match length {
        Length::Smoke => (Duration::from_millis(200), Duration::from_millis(300)),
        Length::Quick => (Duration::from_millis(500), Duration::from_millis(1000)),
        Length::Full => (Duration::from_millis(500), Duration::from_millis(1500)),
    };
    let spec = &oracle_spec(spec);
    let total = (settle + measure).as_secs_f64() * grid.len() as f64
        + (settle + 2 * measure).as_secs_f64() * (FINALISTS + 1) as f64
        + 3.0;
    let mut dev = h.start(s, &[spec.to_string()], total.ceil(), false)?;
    // Let the workload start before the first point.
    std::thread::sleep(Duration::from_millis(300));
    let mut out = Vec::new();
    let (mut current, _) = dev.backend().get()?;
    for point in grid {
        let f = measure_point(h, &mut dev, &mut current, point, settle, measure)?;
        out.push((*point, f));
    }
    let slo = s.slo_us as f64;
    let measured: Vec<(DeviceSettings, Figures)> =
        out.iter().filter_map(|(p, f)| f.map(|f| (*p, f))).collect();
    let figures: Vec<Figures> = measured.iter().map(|(_, f)| *f).collect();
    let mut finalists = Vec::new();
    if let Some((_, top)) = score::best(s.objective, s.throughput(), slo, &figures) {
        let mut ranked = measured.clone();
        ranked.sort_by(|a, b| {
            let unit = s.throughput();
            score::fraction(s.objective, unit, slo, &b.1, &top).total_cmp(&score::fraction(
                s.objective,
                unit,
                slo,
                &a.1,
                &top,
            ))
        });
        for (point, _) in ranked.into_iter().take(FINALISTS) {
            let f = measure_point(h, &mut dev, &mut current, &point, settle, 2 * measure)?;
            finalists.push((point, f));
        }
    }
    let final_figures: Vec<Figures> = finalists.iter().filter_map(|(_, f)| *f).collect();
    let final_points: Vec<DeviceSettings> = finalists
        .iter()
        .filter(|(_, f)| f.is_some())
        .map(|(p, _)| *p)
        .collect();
    let best_settings =
        score::best(s.objective, s.throughput(), slo, &final_figures).map(|(i, _)| final_points[i]);
    // The winner measured once more: the figures that picked it are the best of three noisy
    // measurements, biased upwards (the winner's curse); an independent measurement is not.
    let best = match best_settings {
        Some(point) => measure_point(h, &mut dev, &mut current, &point, settle, 2 * measure)?,
        None => None,
    };
    h.finish(dev)?;
    Ok(PhaseOracle {
        spec: spec.to_string(),
        grid: out,
        finalists,
        best_settings,
        best,
    })
}

#[cfg(test)]
mod tests {
    use super::oracle_spec;

    #[test]
    fn the_oracle_sweeps_a_ramp_at_its_mean_rate() {
        assert_eq!(
            oracle_spec("qd=32,bs=4k,rate=16000,ramp=6000,rw=70"),
            "qd=32,bs=4k,rate=11000,rw=70"
        );
        assert_eq!(oracle_spec("qd=4,rate=2000"), "qd=4,rate=2000");
    }
}
