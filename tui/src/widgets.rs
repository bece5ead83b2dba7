//! Widgets of `enlight top` that ratatui lacks: a log-scale latency histogram with percentile
//! markers. Tested by rendering into a `Buffer`.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::widgets::Widget;

use crate::stats::{fmt_latency, Columns};

/// Eighths of a cell, for bar tops.
const BARS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The colours of the p50, p99 and p999 markers (the chart uses the same).
pub const PERCENTILE_COLORS: [Color; 3] = [Color::Green, Color::Yellow, Color::Red];
/// Labels of the percentiles.
pub const PERCENTILE_LABELS: [&str; 3] = ["p50", "p99", "p999"];

/// A latency histogram drawn as vertical bars over log-scale columns (one per cell), with a row
/// of percentile markers and a row of latency labels underneath.
///
/// ```text
///        ▂█▇▃
///       ▅████▆▂▁            ▁
///  ^p50   ^p99 ^p999
///  10us      100us      1ms
/// ```
pub struct Histogram<'a> {
    /// Counts per column (`columns.counts.len()` is expected to equal the area's width).
    pub columns: &'a Columns,
    /// p50, p99, p999 in ns.
    pub percentiles: [Option<f64>; 3],
}

impl Widget for Histogram<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        if area.height < 3 || area.width < 8 {
            return;
        }
        let bar_rows = area.height - 2;
        let max = self.columns.counts.iter().copied().max().unwrap_or(0);
        let width = (area.width as usize).min(self.columns.counts.len());
        let marker_y = area.y + bar_rows;
        let axis_y = marker_y + 1;
        // Percentile columns, drawn as faint vertical guides behind the bars.
        let marks: Vec<(usize, usize)> = self
            .percentiles
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|ns| (i, self.columns.column_of(ns))))
            .collect();
        for &(i, col) in &marks {
            if col < width {
                for row in 0..bar_rows {
                    buf[(area.x + col as u16, area.y + row)]
                        .set_char('┊')
                        .set_style(Style::default().fg(PERCENTILE_COLORS[i]));
                }
            }
        }
        if max > 0 {
            let eighths_total = bar_rows as u64 * 8;
            for (col, &count) in self.columns.counts.iter().take(width).enumerate() {
                if count == 0 {
                    continue;
                }
                // Any non-empty column shows at least one eighth.
                let h = ((count as u128 * eighths_total as u128).div_ceil(max as u128)) as u64;
                for row in 0..bar_rows {
                    let from_bottom = (bar_rows - 1 - row) as u64;
                    let fill = h.saturating_sub(from_bottom * 8).min(8) as usize;
                    if fill > 0 {
                        buf[(area.x + col as u16, area.y + row)]
                            .set_char(BARS[fill])
                            .set_style(Style::default().fg(Color::Cyan));
                    }
                }
            }
        }
        // Marker labels: "^p50" at the column, moved right past an earlier label if they touch.
        let mut next_free = 0usize;
        for &(i, col) in &marks {
            let label = format!("^{}", PERCENTILE_LABELS[i]);
            let start = col.max(next_free);
            if start + label.len() > width {
                continue;
            }
            buf.set_string(
                area.x + start as u16,
                marker_y,
                &label,
                Style::default().fg(PERCENTILE_COLORS[i]),
            );
            next_free = start + label.len() + 1;
        }
        // Axis labels at every factor of ten (1-2-5 steps when a decade is wide), never touching.
        let mut next_free = 0usize;
        let lo = self.columns.lo_ns;
        let hi = self.columns.hi_ns;
        let mut decade = 10f64.powf(lo.log10().floor());
        while decade <= hi {
            for m in [1.0, 2.0, 5.0] {
                let v = decade * m;
                if v < lo || v >= hi {
                    continue;
                }
                let decades = (hi / lo).log10();
                if m != 1.0 && width as f64 / decades < 24.0 {
                    continue;
                }
                let col = self.columns.column_of(v);
                let label = axis_label(v);
                if col < next_free || col + label.len() > width {
                    continue;
                }
                buf.set_string(
                    area.x + col as u16,
                    axis_y,
                    &label,
                    Style::default().fg(Color::DarkGray),
                );
                next_free = col + label.len() + 2;
            }
            decade *= 10.0;
        }
    }
}

/// A round latency without trailing zeros: `10us`, `200us`, `1ms`.
fn axis_label(ns: f64) -> String {
    let s = fmt_latency(ns);
    let unit_at = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(unit_at);
    let num = if num.contains('.') {
        num.trim_end_matches('0').trim_end_matches('.')
    } else {
        num
    };
    format!("{num}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{columns_in, Hist};

    fn lines(buf: &Buffer) -> Vec<String> {
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect()
    }

    #[test]
    fn bars_scale_to_the_tallest_column_and_markers_sit_under_their_percentiles() {
        // Two decades (10us..1ms) over 20 columns: 10 columns per decade.
        let h = Hist {
            buckets: vec![
                (10_000, 10_078, 80),
                (100_000, 100_781, 20),
                (500_000, 503_906, 1),
            ],
        };
        let cols = columns_in(&h, 10_000.0, 1_000_000.0, 20);
        let area = Rect::new(0, 0, 20, 5);
        let mut buf = Buffer::empty(area);
        Histogram {
            columns: &cols,
            percentiles: [h.quantile_ns(0.5), h.quantile_ns(0.99), None],
        }
        .render(area, &mut buf);
        let l = lines(&buf);
        assert_eq!(
            l,
            vec![
                "█         ┊         ",
                "█         ┊         ",
                "█         ▆      ▁  ",
                "^p50      ^p99      ",
                "10us      100us     ",
            ],
            "{l:#?}"
        );
        // The single slow op still shows (one eighth), at ~502us: column 10 + log10(5.02)*10 = 17.
        let mut buf = Buffer::empty(Rect::new(0, 0, 20, 8));
        Histogram {
            columns: &cols,
            percentiles: [None; 3],
        }
        .render(buf.area, &mut buf);
        let l = lines(&buf);
        assert_eq!(&l[4], "█         ▄         ", "{l:#?}");
        assert_eq!(&l[5], "█         █      ▁  ", "{l:#?}");
        // 10 columns per decade is too narrow for 2x and 5x labels.
        assert_eq!(&l[7], "10us      100us     ", "{l:#?}");
    }

    #[test]
    fn too_small_an_area_draws_nothing() {
        let h = Hist {
            buckets: vec![(10_000, 10_078, 80)],
        };
        let cols = columns_in(&h, 1e3, 1e6, 20);
        let mut buf = Buffer::empty(Rect::new(0, 0, 20, 2));
        Histogram {
            columns: &cols,
            percentiles: [None; 3],
        }
        .render(buf.area, &mut buf);
        assert!(lines(&buf).iter().all(|l| l.trim().is_empty()));
    }
}
