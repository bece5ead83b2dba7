//! The report of `enlight bench tune`: Markdown and a PNG (plotters, bitmap backend).

use std::fmt::Write;
use std::path::Path;

use anyhow::Result;

use super::score;
use super::{Report, ScenarioResult};

fn frac(v: Option<f64>) -> String {
    v.map(|f| format!("{:.1}%", f * 100.0))
        .unwrap_or_else(|| "n/a".into())
}

/// A p99 in µs, `n/a` where there is no latency (NaN).
fn p99(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else {
        format!("{v:.0}")
    }
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.1}")).unwrap_or_else(|| "-".into())
}

/// The worst phase's fraction of a controller on a scenario.
pub fn worst_fraction(s: &ScenarioResult, controller: &str) -> Option<f64> {
    let run = s.runs.iter().find(|r| r.controller == controller)?;
    run.phases
        .iter()
        .map(|p| p.fraction)
        .collect::<Option<Vec<f64>>>()?
        .into_iter()
        .reduce(f64::min)
}

/// The Markdown report: the header, the summary of every scenario with the targets met, then
/// one section per scenario.
pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    header(&mut o, r);
    summary(&mut o, r);
    for s in &r.scenarios {
        scenario(&mut o, s);
    }
    o
}

/// The title, the machine and the run's parameters, and how to read the figures.
fn header(o: &mut String, r: &Report) {
    let _ = writeln!(
        o,
        "# enlight bench tune{}\n",
        if r.smoke {
            " --smoke (seconds-long phases: these figures mean nothing)"
        } else if r.quick {
            " --quick"
        } else {
            ""
        }
    );
    let first = r.scenarios.first();
    let _ = writeln!(
        o,
        "Machine: {}; kernel {}; device processes {}; tick {} ms; phases of {} s, judged from {} s after each phase start; oracle: a grid of {} points per phase, the {} best re-measured for twice as long, the best of those measured once more for its value.\n",
        r.machine,
        r.kernel,
        match r.device_cpu {
            Some(cpu) => format!("pinned to CPU {cpu}"),
            None => "not pinned".to_string(),
        },
        r.tick_ms,
        first.map(|s| s.phase_s).unwrap_or(0.0),
        first.map(|s| s.eval_from_s).unwrap_or(0.0),
        first
            .and_then(|s| s.oracle.first())
            .map(|o| o.grid.len())
            .unwrap_or(0),
        super::oracle::FINALISTS
    );
    let _ = writeln!(
        o,
        "Fraction = the objective reached as a fraction of the oracle's (worst phase; >100% = better than the best grid point). `t95` = seconds after the phase start from which the rest of the phase reaches 95% of the oracle (worst phase). Objectives: throughput = ops/s (a NIC's bytes/s: MB/s) with p99 under the SLO; latency = p99 with throughput (ops/s; a NIC's bytes/s) within 5% of the best; balanced = interrupts per op with p99 under the SLO.\n"
    );
}

/// The table of every scenario (each controller's worst-phase fraction, enlight's t95 and the
/// changes), then how many scenarios meet each of enlight's targets.
fn summary(o: &mut String, r: &Report) {
    let _ = writeln!(
        o,
        "| scenario | objective | static | dim | enlight | enlight t95 (s) | changes (static/dim/enlight) | most enlight changes in 1 s |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    let (mut reach, mut beats_dim, mut not_worse, mut rate_ok) = (0, 0, 0, 0);
    for s in &r.scenarios {
        let f = |c: &str| worst_fraction(s, c);
        let run = |c: &str| s.runs.iter().find(|x| x.controller == c);
        let t95 = run("enlight").and_then(|x| {
            x.phases
                .iter()
                .map(|p| p.t95_s)
                .collect::<Option<Vec<f64>>>()
                .and_then(|v| v.into_iter().reduce(f64::max))
        });
        let changes = ["static", "dim", "enlight"]
            .map(|c| run(c).map(|x| x.changes.to_string()).unwrap_or_default())
            .join("/");
        let max1 = run("enlight").map(|x| x.max_changes_in_1s).unwrap_or(0);
        if f("enlight").is_some_and(|v| v >= 0.95) && t95.is_some_and(|t| t <= 30.0) {
            reach += 1;
        }
        if let (Some(e), Some(d)) = (f("enlight"), f("dim")) {
            beats_dim += (e > d) as usize;
        }
        if let (Some(e), Some(st)) = (f("enlight"), f("static")) {
            not_worse += (e >= st) as usize;
        }
        rate_ok += (max1 <= 1) as usize;
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            s.scenario.name,
            s.scenario.objective.name(),
            frac(f("static")),
            frac(f("dim")),
            frac(f("enlight")),
            secs(t95),
            changes,
            max1
        );
    }
    let n = r.scenarios.len();
    let _ = writeln!(o, "\nTargets (enlight's tuner):\n");
    let _ = writeln!(
        o,
        "- at least 95% of the oracle within 30 s of every phase start: {reach} of {n} scenarios"
    );
    let _ = writeln!(
        o,
        "- better than the DIM-style controller: {beats_dim} of {n}"
    );
    let _ = writeln!(o, "- not worse than static defaults: {not_worse} of {n}");
    let _ = writeln!(o, "- at most one change per second: {rate_ok} of {n}\n");
}

/// One scenario's section: the oracle's point per phase, a kernel scenario's notes and sweep,
/// the table of every controller's phases, and enlight's changes.
fn scenario(o: &mut String, s: &ScenarioResult) {
    let _ = writeln!(
        o,
        "## {}: {} ({} objective, SLO p99 {} us)\n",
        s.scenario.name,
        s.scenario.description,
        s.scenario.objective.name(),
        s.scenario.slo_us
    );
    let kernel = s.scenario.device == "veth";
    oracle_points(o, s, kernel);
    if kernel {
        kernel_sweep(o, s);
    }
    phase_table(o, s);
    enlight_changes(o, s);
    let _ = writeln!(o);
}

/// The oracle's point and its independent measurement, per phase.
fn oracle_points(o: &mut String, s: &ScenarioResult, kernel: bool) {
    for (i, ph) in s.oracle.iter().enumerate() {
        if let (Some(b), Some(st)) = (ph.best, ph.best_settings) {
            let point = if kernel {
                format!(
                    "napi_defer_hard_irqs {}, gro_flush_timeout {} us",
                    st.moderation_frames, st.moderation_usecs
                )
            } else {
                format!(
                    "frames {}, usecs {}, budget {}",
                    st.moderation_frames, st.moderation_usecs, st.poll_budget
                )
            };
            let _ = writeln!(
                o,
                "- oracle, phase {} (`{}`): {point} → {:.0} ops/s ({:.1} MB/s), p99 {} us, {:.3} interrupts/op",
                i + 1,
                ph.spec,
                b.ops_per_sec,
                b.bytes_per_sec / 1e6,
                p99(b.p99_us),
                b.interrupts_per_op
            );
        }
    }
}

/// A kernel scenario's note on what its figures count, and the oracle's whole sweep.
fn kernel_sweep(o: &mut String, s: &ScenarioResult) {
    let _ = writeln!(
        o,
        "\nKernel scenario: ops are the tuned veth end's packets (received and sent) as enlightd counts them, MB/s their bytes (the throughput the tuner, the oracle and the scores count: a NIC's bytes/s); p99 is ping's round trip where the traffic is ping (enlightd measures no latency for NICs), n/a otherwise; a veth has no interrupts (enlightd's `balanced` would judge NAPI polls per op)."
    );
    let grid: Vec<String> = s
        .oracle
        .iter()
        .flat_map(|ph| ph.grid.iter())
        .map(|(st, f)| match f {
            Some(f) => format!(
                "({}, {} us) {:.0} ops/s {:.1} MB/s p99 {}",
                st.moderation_frames,
                st.moderation_usecs,
                f.ops_per_sec,
                f.bytes_per_sec / 1e6,
                p99(f.p99_us)
            ),
            None => format!(
                "({}, {} us) nothing measured",
                st.moderation_frames, st.moderation_usecs
            ),
        })
        .collect();
    let _ = writeln!(
        o,
        "\nThe sweep, (napi_defer_hard_irqs, gro_flush_timeout): {}",
        grid.join("; ")
    );
}

/// Every controller's figures per phase.
fn phase_table(o: &mut String, s: &ScenarioResult) {
    let _ = writeln!(
        o,
        "\n| controller | phase | fraction | ops/s | MB/s | p99 (us) | interrupts/op | t95 (s) | last change (s) | changes | I/Os eBPF / workload |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|");
    for run in &s.runs {
        for (i, p) in run.phases.iter().enumerate() {
            let (ops, mbs, p99_text, irq) = p
                .figures
                .map(|f| {
                    (
                        format!("{:.0}", f.ops_per_sec),
                        format!("{:.1}", f.bytes_per_sec / 1e6),
                        p99(f.p99_us),
                        format!("{:.3}", f.interrupts_per_op),
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                run.controller,
                i + 1,
                frac(p.fraction),
                ops,
                mbs,
                p99_text,
                irq,
                secs(p.t95_s),
                secs(p.last_change_s),
                p.changes,
                if i == 0 {
                    format!(
                        "{} / {}",
                        run.ebpf_ops,
                        run.workload_ops
                            .map(|w| w.to_string())
                            .unwrap_or("?".into())
                    )
                } else {
                    String::new()
                }
            );
        }
    }
}

/// enlight's changes, and on a kernel scenario enlightd's own decisions.
fn enlight_changes(o: &mut String, s: &ScenarioResult) {
    let Some(run) = s.runs.iter().find(|r| r.controller == "enlight") else {
        return;
    };
    let _ = writeln!(o, "\nenlight's changes:\n");
    for p in run.points.iter().filter(|p| p.change.is_some()) {
        let _ = writeln!(o, "- {:.1} s: {}", p.t, p.change.as_deref().unwrap_or(""));
    }
    if s.scenario.device == "veth" {
        let _ = writeln!(
            o,
            "\nenlightd's decisions on the veth (its audit log, {} in all):\n",
            run.enlightd_decisions.len()
        );
        for d in &run.enlightd_decisions {
            let _ = writeln!(o, "- {d}");
        }
    }
}

/// One panel per scenario: each controller's objective as a fraction of the oracle's, over
/// 2 s of windows, against time.
pub fn png(r: &Report, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    crate::bench::font::register_font()?;
    let n = r.scenarios.len().max(1);
    let rows = n.div_ceil(2);
    let root = BitMapBackend::new(path, (1400, 380 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((rows, 2));
    for (s, area) in r.scenarios.iter().zip(panels.iter()) {
        let t_max = s.phase_s * s.oracle.len() as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{} ({})", s.scenario.name, s.scenario.objective.name()),
                ("sans-serif", 20),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..t_max, 0f64..1.5f64)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("fraction of oracle")
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                [(0.0, 1.0), (t_max, 1.0)],
                GREEN.stroke_width(2),
            ))?
            .label("oracle")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN));
        chart.draw_series(LineSeries::new(
            [(0.0, 0.95), (t_max, 0.95)],
            GREEN.mix(0.4),
        ))?;
        for (run, color) in s.runs.iter().zip([RGBColor(120, 120, 120), BLUE, RED]) {
            let mut pts = Vec::new();
            for (k, p) in run.points.iter().enumerate() {
                let from = k.saturating_sub(3);
                let same_phase = run.points[from..=k].iter().filter(|q| q.phase == p.phase);
                let (Some(f), Some(best)) = (
                    score::merge(same_phase.map(|q| &q.window)),
                    s.oracle.get(p.phase).and_then(|o| o.best),
                ) else {
                    continue;
                };
                let v = score::fraction(
                    s.scenario.objective,
                    s.scenario.throughput(),
                    s.scenario.slo_us as f64,
                    &f,
                    &best,
                );
                pts.push((p.t, v.min(1.5)));
            }
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(run.controller.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
