//! The report of `enlight bench compare`: its Markdown tables and its chart (plotters, bitmap
//! backend).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::{DiskRun, Report};

fn human_size(b: u32) -> String {
    if b >= 1024 {
        format!("{} KiB", b / 1024)
    } else {
        format!("{b} B")
    }
}

/// The Markdown tables of a report.
pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Kernel {}, {} ({} cores); {} s per run{}; KVM {}.\n",
        r.kernel,
        r.cpu,
        r.cores,
        r.seconds_per_run,
        if r.quick { " (--quick)" } else { "" },
        r.kvm
    );
    let _ = writeln!(
        o,
        "| disk | transport | I/O size | QD | IOPS | MB/s | p50 µs | p99 µs | p99.9 µs | CPU µs/I/O | traps/I/O | exits/I/O | signals/I/O |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for d in &r.disk {
        if let Some(why) = &d.skipped {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | skipped: {why} ||||||||| ",
                d.kind,
                d.transport,
                human_size(d.block_size),
                d.queue_depth
            );
            continue;
        }
        let _ =
            writeln!(
            o,
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {:.2} |",
            d.kind,
            d.transport,
            human_size(d.block_size),
            d.queue_depth,
            d.iops,
            d.mb_per_s,
            d.p50_us,
            d.p99_us,
            d.p999_us,
            d.cpu_us_per_io,
            d.traps_per_io,
            d.exits_per_io.map(|e| format!("{e:.1}")).unwrap_or_else(|| "-".into()),
            d.signals_per_io
        );
    }
    let _ = writeln!(
        o,
        "\n| NIC | transport | iperf3 Mbit/s | ping p50 µs | ping p99 µs | ping max µs | frames | traps/frame | exits/frame | signals/frame | CPU µs/frame |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|");
    for n in &r.nic {
        let exits = n
            .exits_per_frame
            .map_or_else(|| "-".to_string(), |e| format!("{e:.1}"));
        let _ = writeln!(
            o,
            "| {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {:.1} | {} | {:.2} | {:.1} |",
            n.kind,
            n.transport,
            n.iperf3_mbit_s,
            n.ping_p50_us,
            n.ping_p99_us,
            n.ping_max_us,
            n.frames,
            n.traps_per_frame,
            exits,
            n.signals_per_frame,
            n.cpu_us_per_frame
        );
    }
    if !r.notes.is_empty() {
        let _ = writeln!(o);
        for n in &r.notes {
            let _ = writeln!(o, "- {n}");
        }
    }
    o
}

/// Two panels against I/O size at queue depth 1: throughput (MB/s) and traps per I/O, one line
/// per (kind, transport), both on log scales.
pub fn png(r: &Report, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    crate::bench::font::register_font()?;
    let root = BitMapBackend::new(path, (1400, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let mut series: Vec<(String, Vec<&DiskRun>)> = Vec::new();
    for d in r
        .disk
        .iter()
        .filter(|d| d.skipped.is_none() && d.queue_depth == 1)
    {
        let key = format!("{} / {}", d.kind, d.transport);
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(d),
            None => series.push((key, vec![d])),
        }
    }
    let colors = [RED, BLUE, RGBColor(0, 150, 0), RGBColor(200, 120, 0)];
    type Metric = fn(&DiskRun) -> f64;
    let panel_specs: [(&str, &str, Metric); 2] = [
        ("Throughput at QD 1", "MB/s", |d| d.mb_per_s),
        (
            "Traps per I/O (eBPF; thread = KVM; synthetic 0, on the floor)",
            "register accesses trapped",
            |d| d.traps_per_io,
        ),
    ];
    for (area, (title, ylabel, f)) in panels.iter().zip(panel_specs) {
        let ys: Vec<f64> = series
            .iter()
            .flat_map(|(_, v)| v.iter().map(|d| f(d)))
            .filter(|y| *y > 0.0)
            .collect();
        let ymin = ys.iter().copied().fold(f64::INFINITY, f64::min).min(1.0) / 2.0;
        let ymax = ys.iter().copied().fold(1.0, f64::max) * 2.0;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((256f64..131072f64).log_scale(), (ymin..ymax).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("I/O size, bytes")
            .y_desc(ylabel)
            .draw()?;
        for ((name, runs), color) in series.iter().zip(colors.iter().cycle()) {
            let pts: Vec<(f64, f64)> = runs
                .iter()
                .map(|d| (d.block_size as f64, f(d).max(ymin)))
                .collect();
            let color = *color;
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::compare::NicRun;

    fn sample() -> Report {
        let run = |kind: &str, transport: &str, bs: u32, mb: f64, traps: f64| DiskRun {
            kind: kind.into(),
            transport: transport.into(),
            block_size: bs,
            queue_depth: 1,
            ops: 100,
            mb_per_s: mb,
            traps_per_io: traps,
            exits_per_io: (transport == "kvm").then_some(traps + 1.0),
            ..Default::default()
        };
        Report {
            kernel: "6.18".into(),
            cpu: "test".into(),
            cores: 2,
            disk: vec![
                run("emulated", "thread", 512, 0.5, 264.0),
                run("emulated", "thread", 4096, 0.4, 2063.0),
                run("emulated", "kvm", 512, 0.02, 264.0),
                run("synthetic", "thread", 512, 20.0, 0.0),
                DiskRun {
                    kind: "emulated".into(),
                    transport: "kvm".into(),
                    block_size: 65536,
                    queue_depth: 8,
                    skipped: Some("too slow".into()),
                    ..Default::default()
                },
            ],
            nic: vec![
                NicRun {
                    kind: "emulated".into(),
                    transport: "thread".into(),
                    ..Default::default()
                },
                NicRun {
                    kind: "emulated".into(),
                    transport: "kvm".into(),
                    iperf3_mbit_s: 0.11,
                    traps_per_frame: 600.0,
                    exits_per_frame: Some(651.5),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn markdown_has_a_row_per_run_and_names_skips() {
        let md = markdown(&sample());
        assert_eq!(
            md.lines().filter(|l| l.starts_with("| emulated")).count(),
            6
        );
        assert!(
            md.contains("| emulated | kvm | 0.11 |") && md.contains("| 600.0 | 651.5 |"),
            "the KVM NIC row with its exits per frame:\n{md}"
        );
        assert!(md.contains("| emulated | kvm | 512 B | 1 |"));
        assert!(md.contains("skipped: too slow"));
        assert!(
            md.contains("| 265.0 |"),
            "exits per I/O shown for KVM:\n{md}"
        );
    }

    #[test]
    fn the_chart_renders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        png(&sample(), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 10_000);
    }
}
