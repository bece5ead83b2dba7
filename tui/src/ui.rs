//! Rendering: `impl Widget for &App`. Reads the state, never changes it. Every screen fits 80x24
//! and grows with the terminal.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Axis, Block, Borders, Cell, Chart, Clear, Dataset, GraphType, Paragraph, Row, Table, Widget,
    Wrap,
};

use crate::app::{App, Connection, Screen, Window, CHART_SECS};
use crate::model::{Action, Decision, DeviceKind, DeviceView, KnobDisplay, Mode, Settings, Source};
use crate::stats::{columns_in, fmt_bytes, fmt_count, fmt_latency, log_range, union_range};
use crate::widgets::{Histogram, PERCENTILE_COLORS, PERCENTILE_LABELS};

const DIM: Style = Style::new().fg(Color::DarkGray);
const BOLD: Style = Style::new().add_modifier(Modifier::BOLD);

impl Widget for &App {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let [header, body, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(0),
            Constraint::Length(1),
        ])
        .areas(area);
        render_header(self, header, buf);
        match &self.screen {
            Screen::List => render_list(self, body, buf),
            Screen::Device(name) => render_device(self, name, body, buf),
            Screen::Compare(a, b) => render_compare(self, a, b, body, buf),
        }
        render_footer(self, footer, buf);
        if self.help {
            render_help(area, buf);
        }
    }
}

fn render_header(app: &App, area: Rect, buf: &mut Buffer) {
    let mut spans = vec![
        Span::styled("enlight top ", BOLD),
        Span::styled(app.daemon.trim_start_matches("http://"), DIM),
        Span::raw(" "),
    ];
    match &app.connection {
        Connection::Connecting => {
            spans.push(Span::styled("connecting…", Style::new().fg(Color::Yellow)))
        }
        Connection::Connected { .. } => {
            spans.push(Span::styled("● connected", Style::new().fg(Color::Green)))
        }
        Connection::Disconnected { since, .. } => spans.push(Span::styled(
            format!("✖ DISCONNECTED {:.0}s, retrying", app.now - since),
            Style::new()
                .fg(Color::White)
                .bg(Color::Red)
                .add_modifier(Modifier::BOLD),
        )),
    }
    spans.push(Span::raw(format!("  window {}", app.window.label())));
    if app.paused {
        spans.push(Span::styled(
            "  PAUSED",
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ));
    }
    Paragraph::new(Line::from(spans)).render(area, buf);
}

fn render_footer(app: &App, area: Rect, buf: &mut Buffer) {
    let line = if let Some((msg, _)) = &app.status {
        Line::styled(msg.clone(), Style::new().fg(Color::Yellow))
    } else if let Connection::Disconnected { error, .. } = &app.connection {
        Line::styled(error.clone(), Style::new().fg(Color::Red))
    } else {
        let keys = match app.screen {
            Screen::List => {
                "↑↓ select  ⏎ device  c compare  p pin  1/2/3 window  ␣ pause  ? help  q quit"
            }
            Screen::Device(_) => {
                "↑↓ device  esc back  p pin/unpin  1/2/3 window  ␣ pause  ? help  q quit"
            }
            Screen::Compare(..) => {
                "tab other device  esc back  1/2/3 window  ␣ pause  ? help  q quit"
            }
        };
        Line::styled(keys, DIM)
    };
    Paragraph::new(line).render(area, buf);
}

fn render_help(area: Rect, buf: &mut Buffer) {
    let text = vec![
        Line::styled("enlight top: keys", BOLD),
        Line::raw(""),
        Line::raw("↑ ↓ / k j   select a device (also on the device screen)"),
        Line::raw("enter       device view: histogram, percentiles, tuner"),
        Line::raw("c           compare the device with another (tab: next)"),
        Line::raw("esc         back to the device list"),
        Line::raw("1 2 3 / w   window 1 s, 10 s, 60 s (rates, percentiles)"),
        Line::raw("space       pause / resume the display"),
        Line::raw("p           pin / unpin the tuner of the device"),
        Line::raw("? h         this help (any key closes it)"),
        Line::raw("q ctrl-c    quit"),
        Line::raw(""),
        Line::styled("Percentiles come from the kernel's latency buckets,", DIM),
        Line::styled("differenced over the window; tuner: n/a = no tuner.", DIM),
    ];
    let w = 62.min(area.width);
    let h = (text.len() as u16 + 2).min(area.height);
    let popup = Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    );
    Clear.render(popup, buf);
    Paragraph::new(text)
        .block(Block::bordered().title(" help "))
        .render(popup, buf);
}

fn opt_latency(ns: Option<f64>) -> String {
    ns.map(fmt_latency).unwrap_or_else(|| "-".into())
}

fn short_kind(kind: &DeviceKind) -> &str {
    match kind {
        DeviceKind::Synthetic => "synth",
        DeviceKind::Emulated => "emul",
        other => other.as_str(),
    }
}

/// `p50 x p99 y p999 z`, each in its percentile's colour.
fn percentile_spans(p: [Option<f64>; 3]) -> [Span<'static>; 3] {
    [
        Span::styled(
            format!("p50 {} ", opt_latency(p[0])),
            Style::new().fg(PERCENTILE_COLORS[0]),
        ),
        Span::styled(
            format!("p99 {} ", opt_latency(p[1])),
            Style::new().fg(PERCENTILE_COLORS[1]),
        ),
        Span::styled(
            format!("p999 {}", opt_latency(p[2])),
            Style::new().fg(PERCENTILE_COLORS[2]),
        ),
    ]
}

/// `8f/50us` (frames / microseconds), or `-`.
fn moderation(s: &Settings) -> String {
    match (s.moderation_frames, s.moderation_usecs) {
        (Some(f), Some(u)) => format!("{f}f/{u}us"),
        (Some(f), None) => format!("{f}f"),
        (None, Some(u)) => format!("{u}us"),
        (None, None) => "-".into(),
    }
}

/// The tuner column: its state, `pinned`, or `n/a` without a tuner.
fn tuner_state(d: &DeviceView) -> String {
    match &d.tuner {
        None => "n/a".into(),
        Some(t) if t.pinned => "pinned".into(),
        Some(t) if t.mode == Mode::Off => "off".into(),
        Some(t) => t.state.to_string(),
    }
}

fn render_list(app: &App, area: Rect, buf: &mut Buffer) {
    let [table_area, health_area] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(4)]).areas(area);
    let header = Row::new(
        [
            "NAME", "KIND", "OPS/S", "MB/S", "P50", "P99", "P999", "IRQ/S", "RING", "MOD", "TUNER",
        ]
        .map(|h| Cell::from(h).style(BOLD)),
    );
    let rows: Vec<Row> = app
        .devices
        .iter()
        .map(|d| {
            let f = app.figures(&d.name);
            let [p50, p99, p999] = f.as_ref().map(|f| f.percentiles).unwrap_or([None; 3]);
            let style = if d.present { Style::default() } else { DIM };
            Row::new(vec![
                Cell::from(d.name.clone()),
                Cell::from(short_kind(&d.kind).to_string()),
                Cell::from(fmt_count(f.as_ref().map_or(0.0, |f| f.ops_per_sec))),
                Cell::from(format!(
                    "{:.1}",
                    f.as_ref().map_or(0.0, |f| f.bytes_per_sec) / 1e6
                )),
                Cell::from(opt_latency(p50)),
                Cell::from(opt_latency(p99)),
                Cell::from(opt_latency(p999)),
                Cell::from(fmt_count(f.as_ref().map_or(0.0, |f| f.interrupts_per_sec))),
                Cell::from(
                    d.settings
                        .as_ref()
                        .and_then(|s| s.ring_out_bytes)
                        .map_or("-".into(), fmt_bytes),
                ),
                Cell::from(d.settings.as_ref().map_or("-".into(), moderation)),
                Cell::from(tuner_state(d)),
            ])
            .style(style)
        })
        .collect();
    let widths = [
        Constraint::Min(6),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(4),
        Constraint::Length(8),
        Constraint::Length(9),
    ];
    let mut state = ratatui::widgets::TableState::default().with_selected(Some(app.selected));
    let table = Table::new(rows, widths)
        .header(header)
        .column_spacing(1)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    if app.devices.is_empty() {
        Paragraph::new(vec![
            Line::from(""),
            Line::styled(
                match app.connection {
                    Connection::Connected { .. } => "  no devices registered with enlightd yet",
                    _ => "  waiting for enlightd…",
                },
                DIM,
            ),
        ])
        .render(table_area, buf);
    } else {
        ratatui::widgets::StatefulWidget::render(table, table_area, buf, &mut state);
    }
    let h = &app.health;
    let errors: u64 = h.errors.values().sum();
    let mut lines = vec![Line::from(vec![
        Span::styled("enlightd ", BOLD),
        Span::raw(format!(
            "devices {} attached {}  events lost {}  errors {}  ticks {}  tuner API {}",
            h.devices,
            h.devices_attached,
            h.events_lost,
            errors,
            h.ticks,
            if app.tuner_api { "yes" } else { "n/a" }
        )),
    ])];
    lines.push(cost_line(app));
    if let Some(e) = h.recent_errors.last() {
        lines.push(Line::styled(
            format!("last error: {e}"),
            Style::new().fg(Color::Red),
        ));
    }
    Paragraph::new(lines)
        .block(Block::new().borders(Borders::TOP).border_style(DIM))
        .wrap(Wrap { trim: true })
        .render(health_area, buf);
}

/// What enlightd costs next to what it watches: its eBPF programs' share of a CPU, their runs,
/// and their time per I/O of all devices together (over the selected window), then the daemon's
/// own CPU and memory.
fn cost_line(app: &App) -> Line<'static> {
    let c = &app.health.self_cost;
    let iops: f64 = app
        .devices
        .iter()
        .filter_map(|d| app.figures(&d.name))
        .map(|f| f.ops_per_sec)
        .sum();
    let ebpf = if c.bpf_stats_enabled {
        let cpu: f64 = c.programs.values().map(|p| p.cpu_percent).sum();
        let runs: f64 = c.programs.values().map(|p| p.runs_per_sec).sum();
        let per_io = if iops > 0.0 {
            format!(" {}/IO", fmt_latency(cpu / 100.0 * 1e9 / iops))
        } else {
            String::new()
        };
        format!(
            "eBPF {cpu:.2}% {} runs/s{per_io} at {} IOPS;",
            fmt_count(runs),
            fmt_count(iops)
        )
    } else {
        "eBPF n/a (BPF statistics off);".into()
    };
    Line::from(vec![
        Span::styled("cost ", BOLD),
        Span::raw(format!(
            "{ebpf} enlightd {:.1}% CPU {}",
            c.process.cpu_percent,
            fmt_bytes(c.process.resident_bytes)
        )),
    ])
}

/// Three lines about a device: what it is, its figures over the window, its signalling and
/// settings.
fn summary_lines(app: &App, d: &DeviceView) -> Vec<Line<'static>> {
    let f = app.figures(&d.name);
    let [p50, p99, p999] = f.as_ref().map(|f| f.percentiles).unwrap_or([None; 3]);
    let ops: Vec<&str> = d.ops.iter().map(|o| o.op.as_str()).collect();
    // Only the unusual states: an attached, present device is the normal case.
    let state = match (d.present, d.attached) {
        (false, _) => "gone  ",
        (true, true) => "",
        (true, false) => "not attached  ",
    };
    let ops_per_sec = f.as_ref().map_or(0.0, |f| f.ops_per_sec);
    let irq = f.as_ref().map_or(0.0, |f| f.interrupts_per_sec);
    let per_op = if ops_per_sec > 0.0 {
        format!("{:.2}", irq / ops_per_sec)
    } else {
        "-".into()
    };
    // A device without settings (an older enlightd's emulated one) shows each as `-`.
    let s = &d.settings.clone().unwrap_or_default();
    let ring = match (s.ring_out_bytes, s.ring_in_bytes) {
        (Some(o), Some(i)) => format!("{}/{}", fmt_bytes(o), fmt_bytes(i)),
        _ => "-".into(),
    };
    let tuner = match &d.tuner {
        None => "tuner: n/a".to_string(),
        Some(t) => format!(
            "tuner: {} {} {}{}",
            t.mode,
            t.objective,
            t.state,
            if t.pinned { " (pinned)" } else { "" }
        ),
    };
    vec![
        Line::from(vec![
            Span::styled(d.name.clone(), BOLD),
            Span::raw(format!(
                "  {}/{}{}  pid {}  {}  {}",
                d.device,
                d.kind,
                d.driver
                    .as_deref()
                    .map(|drv| format!(" ({drv})"))
                    .unwrap_or_default(),
                d.pid,
                if ops.is_empty() {
                    "-".into()
                } else {
                    ops.join(",")
                },
                state
            )),
            Span::styled(tuner, Style::new().fg(Color::Magenta)),
        ]),
        Line::from(
            [Span::raw(format!(
                "ops/s {}  MB/s {:.1}  ",
                fmt_count(ops_per_sec),
                f.as_ref().map_or(0.0, |f| f.bytes_per_sec) / 1e6
            ))]
            .into_iter()
            .chain(percentile_spans([p50, p99, p999]))
            .chain([Span::raw(" ")])
            .collect::<Vec<_>>(),
        ),
        // A control-socket device's settings (or an older enlightd's, which sent no knobs).
        if d.knobs.iter().any(|k| k.source == Source::ControlSocket)
            || (d.knobs.is_empty()
                && d.settings
                    .as_ref()
                    .is_some_and(|s| *s != Settings::default()))
        {
            Line::raw(format!(
                "irq/s {}  irq/op {per_op}  ring out/in {ring}  moderation {}  budget {}",
                fmt_count(irq),
                moderation(s),
                s.poll_budget.map_or("-".into(), |b| b.to_string())
            ))
        } else {
            // Only the knobs the device has, with the values read from it.
            Line::raw(format!(
                "irq/s {}  irq/op {per_op}  knobs: {}",
                fmt_count(irq),
                if d.knobs.is_empty() {
                    "none".to_string()
                } else {
                    d.knobs
                        .iter()
                        .map(|k| k.display())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ))
        },
    ]
}

fn render_histogram(
    app: &App,
    name: &str,
    range: Option<(f64, f64)>,
    area: Rect,
    buf: &mut Buffer,
) {
    let f = app.figures(name);
    let hist = f.as_ref().map(|f| f.hist.clone()).unwrap_or_default();
    let span = f.as_ref().map_or(0.0, |f| f.span);
    let title = if span > 0.0 {
        format!(
            " latency, last {:.0}s: {} ops ",
            span,
            fmt_count(hist.total() as f64)
        )
    } else {
        format!(
            " latency, cumulative: {} ops ",
            fmt_count(hist.total() as f64)
        )
    };
    let block = Block::bordered().title(title).border_style(DIM);
    let inner = block.inner(area);
    block.render(area, buf);
    let range = range.or_else(|| log_range(&hist));
    match range {
        Some((lo, hi)) if hist.total() > 0 => {
            let cols = columns_in(&hist, lo, hi, inner.width as usize);
            Histogram {
                columns: &cols,
                percentiles: f.map(|f| f.percentiles).unwrap_or([None; 3]),
            }
            .render(inner, buf);
        }
        _ => Paragraph::new(Line::styled("no I/O in this window", DIM)).render(inner, buf),
    }
}

fn render_chart(app: &App, name: &str, area: Rect, buf: &mut Buffer) {
    let wi = Window::ALL
        .iter()
        .position(|w| *w == app.window)
        .unwrap_or(1);
    let points = app.chart.get(name);
    let now = app.now;
    let series: Vec<Vec<(f64, f64)>> = (0..3)
        .map(|k| {
            points
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    p.by_window[wi][k]
                        .filter(|ns| *ns > 0.0)
                        .map(|ns| (p.at - now, ns.log10()))
                })
                .collect()
        })
        .collect();
    let ys = series.iter().flatten().map(|p| p.1);
    let (ymin, ymax) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let block = Block::bordered()
        .title(format!(
            " p50 p99 p999 over the last {:.0}s ({} window) ",
            CHART_SECS,
            app.window.label()
        ))
        .border_style(DIM);
    if !ymin.is_finite() {
        let inner = block.inner(area);
        block.render(area, buf);
        Paragraph::new(Line::styled("collecting…", DIM)).render(inner, buf);
        return;
    }
    let (ymin, ymax) = if ymax - ymin < 0.3 {
        let mid = (ymin + ymax) / 2.0;
        (mid - 0.15, mid + 0.15)
    } else {
        (ymin - 0.05, ymax + 0.05)
    };
    let datasets: Vec<Dataset> = series
        .iter()
        .enumerate()
        .map(|(k, s)| {
            Dataset::default()
                .name(PERCENTILE_LABELS[k])
                .marker(Marker::Braille)
                .graph_type(GraphType::Line)
                .style(Style::new().fg(PERCENTILE_COLORS[k]))
                .data(s)
        })
        .collect();
    let label = |y: f64| Span::styled(fmt_latency(10f64.powf(y)), DIM);
    Chart::new(datasets)
        .block(block)
        .x_axis(Axis::default().bounds([-CHART_SECS, 0.0]).labels([
            Span::styled(format!("-{CHART_SECS:.0}s"), DIM),
            Span::styled("now", DIM),
        ]))
        .y_axis(
            Axis::default()
                .bounds([ymin, ymax])
                .labels([label(ymin), label(ymax)]),
        )
        .legend_position(Some(ratatui::widgets::LegendPosition::TopLeft))
        .hidden_legend_constraints((Constraint::Ratio(1, 2), Constraint::Ratio(1, 2)))
        .render(area, buf);
}

/// `moderation_frames 8→16, poll_budget 64→32`: the knobs a decision changes.
pub fn settings_diff(from: Option<&Settings>, to: Option<&Settings>) -> String {
    let (Some(from), Some(to)) = (from, to) else {
        return String::new();
    };
    let knobs: [(&str, Option<u64>, Option<u64>); 5] = [
        ("ring_out", from.ring_out_bytes, to.ring_out_bytes),
        ("ring_in", from.ring_in_bytes, to.ring_in_bytes),
        ("mod_frames", from.moderation_frames, to.moderation_frames),
        ("mod_usecs", from.moderation_usecs, to.moderation_usecs),
        ("poll_budget", from.poll_budget, to.poll_budget),
    ];
    knobs
        .iter()
        .filter(|(_, a, b)| a != b && b.is_some())
        .map(|(k, a, b)| {
            format!(
                "{k} {}→{}",
                a.map_or("-".into(), |v| v.to_string()),
                b.map_or("-".into(), |v| v.to_string())
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `HH:MM:SS` (UTC) of a Unix time in ms.
fn clock(ts_unix_ms: u64) -> String {
    let s = ts_unix_ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn decision_line(d: &Decision) -> Line<'static> {
    let color = match d.action {
        Action::Revert => Color::Red,
        Action::Change => Color::Green,
        _ => Color::Cyan,
    };
    let diff = settings_diff(Some(&d.from), Some(&d.to));
    Line::from(vec![
        Span::styled(clock(d.ts_unix_ms), DIM),
        Span::raw(" "),
        Span::styled(format!("{:<10}", d.action), Style::new().fg(color)),
        Span::raw(if diff.is_empty() {
            String::new()
        } else {
            format!("{diff}: ")
        }),
        Span::raw(d.reason.clone()),
    ])
}

fn render_decisions(app: &App, d: &DeviceView, area: Rect, buf: &mut Buffer) {
    let block = Block::bordered()
        .title(" tuner decisions (newest first) ")
        .border_style(DIM);
    let inner = block.inner(area);
    block.render(area, buf);
    let mut decisions: Vec<&Decision> = app.decisions_for(&d.name);
    if decisions.is_empty() {
        if let Some(last) = d.tuner.as_ref().and_then(|t| t.last_decision.as_ref()) {
            decisions.push(last);
        }
    }
    // A dry-run tuner's standing advice, when it differs from what is in force.
    let advice = d
        .tuner
        .as_ref()
        .and_then(|t| t.recommendation.as_ref())
        .map(|r| settings_diff(Some(&d.settings.clone().unwrap_or_default()), Some(r)))
        .filter(|diff| !diff.is_empty())
        .map(|diff| Line::styled(format!("recommends: {diff}"), Style::new().fg(Color::Cyan)));
    let room = (inner.height as usize).saturating_sub(advice.is_some() as usize);
    let mut lines: Vec<Line> = advice.into_iter().collect();
    lines.extend(if decisions.is_empty() {
        vec![Line::styled(
            match (&d.tuner, app.tuner_api) {
                (None, _) => "tuner: n/a (no tuner runs for this device)",
                (Some(_), _) => "no decisions yet",
            },
            DIM,
        )]
    } else {
        decisions
            .iter()
            .rev()
            .take(room)
            .map(|d| decision_line(d))
            .collect()
    });
    Paragraph::new(lines).render(inner, buf);
}

fn render_device(app: &App, name: &str, area: Rect, buf: &mut Buffer) {
    let Some(d) = app.device(name) else {
        Paragraph::new(Line::styled(
            format!("device {name} is gone (esc: back)"),
            DIM,
        ))
        .render(area, buf);
        return;
    };
    let decisions_h = if area.height >= 30 { 8 } else { 4 };
    let [summary, hist, chart, decisions] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Fill(3),
        Constraint::Fill(2),
        Constraint::Length(decisions_h),
    ])
    .areas(area);
    // Not wrapped: a long line is cut at the edge rather than pushing the next ones out.
    Paragraph::new(summary_lines(app, d)).render(summary, buf);
    render_histogram(app, name, None, hist, buf);
    render_chart(app, name, chart, buf);
    render_decisions(app, d, decisions, buf);
}

/// `b / a` with enough digits to tell small ratios apart: `40.2x`, `1.35x`, `0.0018x`.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => {
            let r = b / a;
            if r >= 10.0 {
                format!("{r:.1}x")
            } else if r >= 0.1 || r == 0.0 {
                format!("{r:.2}x")
            } else {
                // Two significant digits.
                let digits = (-r.log10().floor()) as usize + 1;
                format!("{r:.digits$}x")
            }
        }
        _ => "-".into(),
    }
}

fn render_compare(app: &App, left: &str, right: &str, area: Rect, buf: &mut Buffer) {
    let [cols, bottom] = Layout::vertical([Constraint::Min(6), Constraint::Length(2)]).areas(area);
    let [l, r] = Layout::horizontal([Constraint::Fill(1), Constraint::Fill(1)]).areas(cols);
    let hist = |n: &str| app.figures(n).map(|f| f.hist).unwrap_or_default();
    let range = union_range(log_range(&hist(left)), log_range(&hist(right)));
    for (name, area) in [(left, l), (right, r)] {
        let Some(d) = app.device(name) else {
            Paragraph::new(Line::styled(format!("{name}: gone"), DIM)).render(area, buf);
            continue;
        };
        let [head, h] = Layout::vertical([Constraint::Length(4), Constraint::Min(4)]).areas(area);
        let f = app.figures(name);
        let [p50, p99, p999] = f.as_ref().map(|f| f.percentiles).unwrap_or([None; 3]);
        let ops = f.as_ref().map_or(0.0, |f| f.ops_per_sec);
        let irq = f.as_ref().map_or(0.0, |f| f.interrupts_per_sec);
        let lines = vec![
            Line::from(vec![
                Span::styled(d.name.clone(), BOLD),
                Span::raw(format!("  {}/{}  {}", d.device, d.kind, tuner_state(d))),
            ]),
            Line::raw(format!(
                "ops/s {}  MB/s {:.1}",
                fmt_count(ops),
                f.as_ref().map_or(0.0, |f| f.bytes_per_sec) / 1e6
            )),
            Line::from(percentile_spans([p50, p99, p999]).to_vec()),
            Line::raw(format!(
                "irq/s {}  irq/op {}  mod {}",
                fmt_count(irq),
                if ops > 0.0 {
                    format!("{:.2}", irq / ops)
                } else {
                    "-".into()
                },
                d.settings.as_ref().map_or("-".into(), moderation)
            )),
        ];
        Paragraph::new(lines).render(head, buf);
        render_histogram(app, name, range, h, buf);
    }
    let fl = app.figures(left);
    let fr = app.figures(right);
    let p =
        |f: &Option<crate::app::WindowFigures>, k: usize| f.as_ref().and_then(|f| f.percentiles[k]);
    let o = |f: &Option<crate::app::WindowFigures>| f.as_ref().map(|f| f.ops_per_sec);
    Paragraph::new(vec![Line::from(vec![
        Span::styled(format!("{right} vs {left}: "), BOLD),
        Span::raw(format!(
            "p50 {}  p99 {}  p999 {}  ops/s {}",
            ratio(p(&fl, 0), p(&fr, 0)),
            ratio(p(&fl, 1), p(&fr, 1)),
            ratio(p(&fl, 2), p(&fr, 2)),
            ratio(o(&fl), o(&fr)),
        )),
    ])])
    .block(Block::new().borders(Borders::TOP).border_style(DIM))
    .render(bottom, buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::tests::{device, poll};
    use crate::app::Event;
    use crate::model::TunerView;
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    /// An app that has seen 30 one-second reads of two devices: `disk0` (synthetic, a tuner that
    /// made one decision) at 1000 ops/s around 10us and 100us, and `emu0` (emulated, no tuner)
    /// at 200 ops/s around 80us.
    pub(crate) fn sample_app() -> App {
        let mut app = App::new("http://127.0.0.1:9464");
        let tuner = TunerView {
            mode: "auto".into(),
            objective: "latency".into(),
            state: "converged".into(),
            pinned: false,
            ..TunerView::default()
        };
        for t in 0..=30u64 {
            let mut d = device("disk0", "synthetic", 1000 * t, Some(tuner.clone()));
            d.settings = Some(Settings {
                ring_out_bytes: Some(262_144),
                ring_in_bytes: Some(262_144),
                moderation_frames: Some(8),
                moderation_usecs: Some(50),
                poll_budget: Some(64),
            });
            d.ops = vec![crate::model::OpView {
                op: "read".into(),
                ..Default::default()
            }];
            let mut e = device("emu0", "emulated", 200 * t, None);
            e.interrupts_total = 200 * t;
            let mut p = poll(
                t + 1,
                vec![
                    (
                        d,
                        vec![[10_000, 10_078, 990 * t], [100_000, 100_781, 10 * t]],
                    ),
                    (e, vec![[80_000, 80_625, 200 * t]]),
                ],
            );
            p.decisions = vec![Decision {
                ts_unix_ms: 1_764_000_000_000,
                device: "disk0".into(),
                action: "change".into(),
                from: Settings {
                    moderation_frames: Some(16),
                    ..Settings::default()
                },
                to: Settings {
                    moderation_frames: Some(8),
                    ..Settings::default()
                },
                reason: "p99 fell 12% at 8 frames".into(),
                objective_value: Some(1.0),
            }];
            p.health.devices = 2;
            p.health.devices_attached = 2;
            p.health.self_cost.bpf_stats_enabled = true;
            p.health.self_cost.programs.insert(
                "enlight_io_reap".into(),
                crate::model::ProgramCost {
                    program: "enlight_io_reap".into(),
                    runs_per_sec: 1200.0,
                    ns_per_run: 500.0,
                    cpu_percent: 0.06,
                    ..Default::default()
                },
            );
            p.health.self_cost.process.cpu_percent = 1.5;
            p.health.self_cost.process.resident_bytes = 18 << 20;
            app.on_event(Event::Update {
                at: t as f64,
                poll: p,
            });
        }
        app
    }

    pub(crate) fn screen(app: &App, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| f.render_widget(app, f.area())).unwrap();
        let buf = t.backend().buffer();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .collect()
    }

    pub(crate) fn key(app: &mut App, c: KeyCode) {
        app.on_event(Event::Key(KeyEvent::new(c, KeyModifiers::NONE)));
    }

    #[test]
    fn the_device_list_at_80x24() {
        let app = sample_app();
        let s = screen(&app, 80, 24);
        let expected_top = [
            "enlight top 127.0.0.1:9464 ● connected  window 10s",
            "NAME    KIND   OPS/S  MB/S   P50    P99    P999   IRQ/S  RING MOD      TUNER",
            "disk0   synth  1000   4.1    10.0us 10.0us 100us  250    256K 8f/50us  converged",
            "emu0    emul   200    0.8    80.3us 80.3us 80.3us 200    -    -        n/a",
        ];
        assert_eq!(&s[..4], &expected_top, "{s:#?}");
        assert!(s[4..19].iter().all(|l| l.is_empty()), "{s:#?}");
        assert_eq!(
            &s[19..],
            &[
                "────────────────────────────────────────────────────────────────────────────────",
                "enlightd devices 2 attached 2  events lost 0  errors 0  ticks 31  tuner API yes",
                "cost eBPF 0.06% 1200 runs/s 500ns/IO at 1200 IOPS; enlightd 1.5% CPU 18M",
                "",
                "↑↓ select  ⏎ device  c compare  p pin  1/2/3 window  ␣ pause  ? help  q quit",
            ],
            "{s:#?}"
        );
        // The selected row is highlighted.
        let mut t = Terminal::new(TestBackend::new(80, 24)).unwrap();
        t.draw(|f| f.render_widget(&app, f.area())).unwrap();
        let buf = t.backend().buffer();
        assert!(buf[(0, 2)].modifier.contains(Modifier::REVERSED));
        assert!(!buf[(0, 3)].modifier.contains(Modifier::REVERSED));
    }

    #[test]
    fn the_window_keys_change_the_figures() {
        let mut app = sample_app();
        key(&mut app, KeyCode::Char('1'));
        let s = screen(&app, 80, 24);
        assert!(s[0].ends_with("window 1s"), "{}", s[0]);
        // In any one second 1% of disk0's ops are slow: p99 sits at the boundary (10us),
        // p999 at 100us; over one second the rates are the same.
        assert!(
            s[2].starts_with("disk0   synth  1000   4.1    10.0us 10.0us 100us"),
            "{}",
            s[2]
        );
    }

    #[test]
    fn the_device_view_at_80x24_shows_histogram_percentiles_chart_and_decisions() {
        let mut app = sample_app();
        key(&mut app, KeyCode::Enter);
        let s = screen(&app, 80, 24);
        assert_eq!(
            &s[1..4],
            &[
                "disk0  disk/synthetic  pid 42  read  tuner: auto latency converged",
                "ops/s 1000  MB/s 4.1  p50 10.0us p99 10.0us p999 100us",
                "irq/s 250  irq/op 0.25  ring out/in 256K/256K  moderation 8f/50us  budget 64",
            ],
            "{s:#?}"
        );
        assert!(
            s[4].starts_with("┌ latency, last 10s: 10.0k ops ─"),
            "{s:#?}"
        );
        let markers = s.iter().find(|l| l.contains("^p50")).expect("marker row");
        let (p50, p99, p999) = (
            markers.find("^p50").unwrap(),
            markers.find("^p99").unwrap(),
            markers.find("^p999").unwrap(),
        );
        assert!(p50 < p99 && p99 < p999, "{markers}");
        let axis = s
            .iter()
            .find(|l| l.contains("10us") && l.contains("100us"))
            .unwrap();
        // The marker of p999 (100us) sits under the 100us label.
        assert_eq!(axis.find("100us").unwrap(), p999, "{s:#?}");
        // The bar at 10us is full height, the one at 100us one eighth.
        let bars: Vec<&String> = s.iter().filter(|l| l.contains('█')).collect();
        assert!(bars.len() >= 4, "{s:#?}");
        assert!(s
            .iter()
            .any(|l| l.contains(" p50 p99 p999 over the last 120s (10s window) ")));
        assert!(
            s.iter().any(|l| l.contains("⠉") || l.contains("⠤")),
            "chart drawn: {s:#?}"
        );
        assert_eq!(
            s[20],
            "│16:00:00 change    mod_frames 16→8: p99 fell 12% at 8 frames                  │"
        );
        assert!(s[23].starts_with("↑↓ device  esc back  p pin/unpin"));
    }

    #[test]
    fn a_dry_run_recommendation_shows_above_the_decisions() {
        let mut app = sample_app();
        let advice = Settings {
            moderation_frames: Some(16),
            ..app.devices[0].settings.clone().unwrap()
        };
        if let Some(t) = app.devices[0].tuner.as_mut() {
            t.mode = "dry_run".into();
            t.recommendation = Some(advice);
        }
        key(&mut app, KeyCode::Enter);
        let s = screen(&app, 80, 24);
        assert_eq!(
            &s[20..22],
            &[
                "│recommends: mod_frames 8→16                                                   │",
                "│16:00:00 change    mod_frames 16→8: p99 fell 12% at 8 frames                  │",
            ],
            "{s:#?}"
        );
    }

    #[test]
    fn a_kernel_device_shows_its_driver() {
        let mut app = sample_app();
        app.devices[0].kind = "kernel".into();
        app.devices[0].driver = Some("virtio_blk".into());
        key(&mut app, KeyCode::Enter);
        let s = screen(&app, 80, 24);
        assert!(
            s[1].contains("disk/kernel (virtio_blk)  pid 42"),
            "{}",
            s[1]
        );
    }

    #[test]
    fn a_device_without_tuner_says_n_a() {
        let mut app = sample_app();
        key(&mut app, KeyCode::Down);
        key(&mut app, KeyCode::Enter);
        let s = screen(&app, 80, 24);
        assert!(s[1].ends_with("tuner: n/a"), "{}", s[1]);
        assert!(s
            .iter()
            .any(|l| l.contains("tuner: n/a (no tuner runs for this device)")));
        assert_eq!(
            app.on_event(Event::Key(KeyEvent::new(
                KeyCode::Char('p'),
                KeyModifiers::NONE
            ))),
            None
        );
        let s = screen(&app, 80, 24);
        assert_eq!(s[23], "no tuner runs for emu0");
    }

    #[test]
    fn the_compare_view_puts_two_devices_side_by_side_on_one_scale() {
        let mut app = sample_app();
        key(&mut app, KeyCode::Char('c'));
        let s = screen(&app, 80, 24);
        assert_eq!(
            &s[1..5],
            &[
                "disk0  disk/synthetic  converged        emu0  disk/emulated  n/a",
                "ops/s 1000  MB/s 4.1                    ops/s 200  MB/s 0.8",
                "p50 10.0us p99 10.0us p999 100us        p50 80.3us p99 80.3us p999 80.3us",
                "irq/s 250  irq/op 0.25  mod 8f/50us     irq/s 200  irq/op 1.00  mod -",
            ],
            "{s:#?}"
        );
        // One latency scale for both: the axis rows are identical.
        let axis = s
            .iter()
            .find(|l| l.contains("10us") && l.contains("100us"))
            .unwrap();
        let (left, right) = axis.split_at(axis.char_indices().nth(40).unwrap().0);
        assert_eq!(
            left.trim_start_matches('│').trim_end_matches('│'),
            right.trim_start_matches('│').trim_end_matches('│'),
            "{axis}"
        );
        assert_eq!(
            s[22],
            "emu0 vs disk0: p50 8.00x  p99 8.00x  p999 0.80x  ops/s 0.20x"
        );
    }

    #[test]
    fn help_overlays_the_screen_and_any_key_closes_it() {
        let mut app = sample_app();
        key(&mut app, KeyCode::Char('?'));
        let s = screen(&app, 80, 24);
        assert!(s.iter().any(|l| l.contains("┌ help ─")), "{s:#?}");
        assert!(s
            .iter()
            .any(|l| l.contains("p           pin / unpin the tuner of the device")));
        key(&mut app, KeyCode::Char('x'));
        assert!(!screen(&app, 80, 24).iter().any(|l| l.contains("┌ help ─")));
    }

    #[test]
    fn a_lost_daemon_shows_in_the_header_and_footer_with_the_last_figures_kept() {
        let mut app = sample_app();
        app.on_event(Event::Disconnected {
            at: 31.0,
            error: "cannot reach enlightd at http://127.0.0.1:9464: Connection refused".into(),
        });
        app.on_event(Event::Tick { at: 34.0 });
        let s = screen(&app, 80, 24);
        assert_eq!(
            s[0],
            "enlight top 127.0.0.1:9464 ✖ DISCONNECTED 3s, retrying  window 10s"
        );
        assert!(s[2].starts_with("disk0"), "last figures kept: {s:#?}");
        assert_eq!(
            s[23],
            "cannot reach enlightd at http://127.0.0.1:9464: Connection refused"
        );
    }

    #[test]
    fn every_screen_fits_small_and_large_terminals() {
        for (w, h) in [(80, 24), (120, 40), (200, 60), (40, 12)] {
            let mut app = sample_app();
            assert!(screen(&app, w, h)[0].starts_with("enlight top"));
            key(&mut app, KeyCode::Enter);
            let s = screen(&app, w, h);
            assert!(s.iter().any(|l| l.contains("latency")), "{w}x{h}: {s:#?}");
            key(&mut app, KeyCode::Esc);
            key(&mut app, KeyCode::Char('c'));
            screen(&app, w, h);
            key(&mut app, KeyCode::Char('?'));
            screen(&app, w, h);
        }
        // Paused shows in the header.
        let mut app = sample_app();
        key(&mut app, KeyCode::Char(' '));
        assert!(screen(&app, 80, 24)[0].ends_with("window 10s  PAUSED"));
    }

    /// A kernel NIC's detail shows the knobs it has with their values, an emulated device
    /// says it has none; neither shows ring or moderation settings it does not have.
    #[test]
    fn kernel_and_emulated_devices_show_only_their_own_knobs() {
        let mut app = App::new("http://127.0.0.1:9464");
        for t in 0..=3u64 {
            let mut k = device("veth1", "kernel", 100 * t, None);
            k.knobs = vec![
                crate::model::Knob {
                    name: "napi_defer_hard_irqs".into(),
                    value: 2,
                    unit: "count".into(),
                    source: "sysfs".into(),
                    disruption: "live".into(),
                    ..Default::default()
                },
                crate::model::Knob {
                    name: "gro_flush_timeout".into(),
                    value: 20_000,
                    unit: "nanoseconds".into(),
                    source: "sysfs".into(),
                    disruption: "live".into(),
                    ..Default::default()
                },
            ];
            let e = device("ide0", "emulated", 100 * t, None);
            let p = poll(t + 1, vec![(k, vec![[1000, 1010, 100 * t]]), (e, vec![])]);
            app.on_event(Event::Update {
                at: t as f64,
                poll: p,
            });
        }
        key(&mut app, KeyCode::Enter);
        let s = screen(&app, 120, 40).join("\n");
        assert!(
            s.contains("knobs: napi_defer_hard_irqs 2, gro_flush_timeout 20000 ns"),
            "{s}"
        );
        assert!(
            !s.contains("ring out/in") && !s.contains("moderation"),
            "{s}"
        );
        key(&mut app, KeyCode::Esc);
        key(&mut app, KeyCode::Down);
        key(&mut app, KeyCode::Enter);
        let s = screen(&app, 120, 40).join("\n");
        assert!(s.contains("knobs: none"), "{s}");
    }

    /// A newer daemon's tuner state shows as it wrote it; a tuner that is off shows `off`.
    #[test]
    fn a_tuner_state_this_build_does_not_know_shows_as_written() {
        let d: DeviceView =
            serde_json::from_str(r#"{"name":"x","tuner":{"mode":"auto","state":"warming"}}"#)
                .unwrap();
        assert_eq!(tuner_state(&d), "warming");
        let off: DeviceView =
            serde_json::from_str(r#"{"name":"x","tuner":{"mode":"off","state":"idle"}}"#).unwrap();
        assert_eq!(tuner_state(&off), "off");
        let d: Decision = serde_json::from_str(r#"{"action":"escalate","reason":"r"}"#).unwrap();
        let line = decision_line(&d).to_string();
        assert!(line.contains("escalate") && line.ends_with('r'), "{line}");
    }

    #[test]
    fn decision_diffs_name_only_the_knobs_that_changed() {
        let a = Settings {
            ring_out_bytes: Some(4096),
            moderation_frames: Some(8),
            poll_budget: Some(64),
            ..Settings::default()
        };
        let b = Settings {
            ring_out_bytes: Some(8192),
            moderation_frames: Some(8),
            poll_budget: Some(32),
            ..Settings::default()
        };
        assert_eq!(
            settings_diff(Some(&a), Some(&b)),
            "ring_out 4096→8192, poll_budget 64→32"
        );
        assert_eq!(settings_diff(None, Some(&b)), "");
        assert_eq!(ratio(Some(2.0), Some(80.5)), "40.2x");
        assert_eq!(ratio(Some(1.0), Some(1.354)), "1.35x");
        assert_eq!(ratio(Some(28_400.0), Some(50.0)), "0.0018x");
        assert_eq!(ratio(Some(0.0), Some(1.0)), "-");
        assert_eq!(clock(1_764_000_000_000), "16:00:00");
    }
}
