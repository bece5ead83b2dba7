//! The exposition's building blocks: families of samples in the `prometheus` crate's model
//! ([`MetricFamily`]), each sample's labels set where it is built, and the two formats they are
//! written in — Prometheus text 0.0.4 (the crate's [`TextEncoder`]) and OpenMetrics 1.0.0
//! (written here: the crate has no OpenMetrics encoder).
//!
//! Why families built per tick rather than a `prometheus::core::Collector` per source in a
//! `Registry`: the figures live in the shared model ([`crate::model::State`]), behind the
//! collector's lock, and are rendered once per tick from a borrowed state (see
//! [`crate::scrape`]); a registered collector must own `'static` state and declare fixed label
//! names per family, while a kernel device's series carry a `driver` label that a registry
//! device's series of the same family do not. `Registry::gather` would also sort the families by
//! name and each family's series by label values, moving every line of the exposition the
//! dashboards and tests know, and spend time doing it. So each source (devices, kernel, tuner,
//! self-health) is a function from the model to families, and [`Exposition`] puts them
//! together in the order they come, merging the families two sources share.
//!
//! This module reads no source: the sources import it, and [`crate::metrics`] composes them.

use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::TextEncoder;

use crate::model::DeviceState;

/// A series' labels, in the order they are written.
pub type Labels = Vec<LabelPair>;

/// A label pair.
pub fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

/// `base` followed by `extra`.
pub fn labels_with(base: &[LabelPair], extra: &[(&str, &str)]) -> Labels {
    let mut v = Vec::with_capacity(base.len() + extra.len());
    v.extend_from_slice(base);
    v.extend(extra.iter().map(|(k, v)| label(k, v)));
    v
}

/// Labels from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    labels_with(&[], pairs)
}

/// A device's identity on every one of its series: `device`, `kind`, and for a device of the
/// running kernel its `driver`.
pub fn device_labels(d: &DeviceState) -> Labels {
    let mut v = labels(&[("device", &d.record.name), ("kind", d.record.kind.as_str())]);
    if let Some(k) = &d.kernel {
        v.push(label("driver", &k.driver));
    }
    v
}

/// One family being built.
pub struct Family(MetricFamily);

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Family {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        Family(mf)
    }

    /// A counter family.
    pub fn counter(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::COUNTER)
    }

    /// A gauge family.
    pub fn gauge(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::GAUGE)
    }

    /// A histogram family.
    pub fn histogram(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::HISTOGRAM)
    }

    /// Adds a counter's or a gauge's sample.
    pub fn sample(&mut self, labels: Labels, value: f64) {
        let mut m = proto::Metric::from_label(labels);
        match self.0.get_field_type() {
            MetricType::COUNTER => {
                let mut c = proto::Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = proto::Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        self.0.mut_metric().push(m);
    }

    /// Adds a histogram's sample: cumulative counts at each upper bound (without `+Inf`, which
    /// is `count`), the sum and the count.
    pub fn histogram_sample(
        &mut self,
        labels: Labels,
        buckets: impl IntoIterator<Item = (f64, u64)>,
        sum: f64,
        count: u64,
    ) {
        let mut h = proto::Histogram::default();
        h.set_bucket(
            buckets
                .into_iter()
                .map(|(le, c)| {
                    let mut b = proto::Bucket::default();
                    b.set_upper_bound(le);
                    b.set_cumulative_count(c);
                    b
                })
                .collect(),
        );
        h.set_sample_sum(sum);
        h.set_sample_count(count);
        let mut m = proto::Metric::from_label(labels);
        m.set_histogram(h);
        self.0.mut_metric().push(m);
    }
}

/// Families in the order they were added; a family added again (another source's series of
/// it) gets the new series after its own.
#[derive(Debug, Default, Clone)]
pub struct Exposition {
    families: Vec<MetricFamily>,
}

impl Exposition {
    /// Adds a family's series.
    pub fn add(&mut self, family: Family) {
        let mut mf = family.0;
        if let Some(have) = self.families.iter_mut().find(|f| f.name() == mf.name()) {
            debug_assert_eq!(have.get_field_type(), mf.get_field_type(), "{}", mf.name());
            have.mut_metric().append(mf.mut_metric());
        } else {
            self.families.push(mf);
        }
    }

    /// The families, empty ones included.
    pub fn families(&self) -> &[MetricFamily] {
        &self.families
    }

    /// The Prometheus text format (0.0.4), through the crate's encoder.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.series() * 96);
        self.text_into(&mut out);
        out
    }

    /// Appends [`text`](Self::text) to `out`. Families without a series are left out: the
    /// encoder refuses them (and a scraper has nothing to read in them).
    pub fn text_into(&self, out: &mut String) {
        for f in self.families.iter().filter(|f| !f.get_metric().is_empty()) {
            // One family at a time: no copy of the whole model to leave the empty ones out.
            TextEncoder::new()
                .encode_utf8(std::slice::from_ref(f), out)
                // Writing into a String cannot fail, and every family here has a name and a
                // series: the encoder's only errors.
                .expect("a named family with series encodes");
        }
    }

    /// The OpenMetrics text (1.0.0) of these families, without the closing `# EOF` (the
    /// tuner's families may follow).
    pub fn openmetrics_into(&self, out: &mut String) {
        for f in self.families.iter().filter(|f| !f.get_metric().is_empty()) {
            openmetrics_family(f, out);
        }
    }

    /// [`openmetrics_into`](Self::openmetrics_into), closed with `# EOF`.
    pub fn openmetrics(&self) -> String {
        let mut out = String::with_capacity(self.series() * 96);
        self.openmetrics_into(&mut out);
        out.push_str(OPENMETRICS_EOF);
        out
    }

    /// Series in all families.
    pub fn series(&self) -> usize {
        self.families.iter().map(|f| f.get_metric().len()).sum()
    }
}

/// The Content-Type of the text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The Content-Type of OpenMetrics.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The line that ends an OpenMetrics exposition.
pub const OPENMETRICS_EOF: &str = "# EOF\n";

/// The two formats served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4.
    Text,
    /// OpenMetrics text 1.0.0.
    OpenMetrics,
}

/// The format a request's `Accept` header asks for: OpenMetrics when it names
/// `application/openmetrics-text` (any version: 1.0.0 is served, which 0.0.1 readers such as
/// Prometheus's parser read too) with a quality above 0 and at least that of any other range
/// it names that the text format satisfies (`text/plain`, `text/*`, `*/*`); the text format
/// otherwise, and without an `Accept`. Prometheus asks
/// `application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`.
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::Text;
    };
    let (mut om, mut text) = (0.0f64, 0.0f64);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => om = om.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    if om > 0.0 && om >= text {
        Format::OpenMetrics
    } else {
        Format::Text
    }
}

/// A value as OpenMetrics writes numbers: Rust's shortest round-trip decimal (what the text
/// encoder writes too), `+Inf`, `-Inf` and `NaN` spelt as the specification spells them.
fn push_om_value(out: &mut String, v: f64) {
    use std::fmt::Write;
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Appends `v` with `\`, newline and `"` escaped (OpenMetrics escapes all three in label
/// values and in HELP text; the 0.0.4 text format leaves `"` alone in HELP).
fn push_om_escaped(out: &mut String, v: &str) {
    if !v.contains(['\\', '"', '\n']) {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn push_om_sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[LabelPair],
    extra: Option<(&str, &str)>,
    value: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || extra.is_some() {
        out.push('{');
        let pairs = labels.iter().map(|l| (l.name(), l.value())).chain(extra);
        for (i, (k, v)) in pairs.enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            push_om_escaped(out, v);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    push_om_value(out, value);
    out.push('\n');
}

/// One family in OpenMetrics: a counter's family name loses its `_total`, which its samples
/// carry (so the series are the ones the text format gives); a histogram's buckets end at
/// `+Inf` and its `le` values are written as the text encoder writes them, so a scraper sees
/// the same series in either format.
fn openmetrics_family(f: &MetricFamily, out: &mut String) {
    let kind = f.get_field_type();
    let name = match kind {
        MetricType::COUNTER => f.name().strip_suffix("_total").unwrap_or(f.name()),
        _ => f.name(),
    };
    let type_name = match kind {
        MetricType::COUNTER => "counter",
        MetricType::GAUGE => "gauge",
        MetricType::HISTOGRAM => "histogram",
        MetricType::SUMMARY => "summary",
        MetricType::UNTYPED => "unknown",
    };
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    push_om_escaped(out, f.help());
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(type_name);
    out.push('\n');
    for m in f.get_metric() {
        let l = m.get_label();
        match kind {
            MetricType::COUNTER => {
                push_om_sample(out, name, "_total", l, None, m.get_counter().get_value())
            }
            MetricType::GAUGE => push_om_sample(out, name, "", l, None, m.get_gauge().get_value()),
            MetricType::HISTOGRAM => {
                let h = m.get_histogram();
                let mut inf = false;
                for b in h.get_bucket() {
                    let le = b.upper_bound();
                    inf |= le == f64::INFINITY;
                    let le = if le == f64::INFINITY {
                        "+Inf".to_string()
                    } else {
                        le.to_string()
                    };
                    push_om_sample(
                        out,
                        name,
                        "_bucket",
                        l,
                        Some(("le", &le)),
                        b.cumulative_count() as f64,
                    );
                }
                if !inf {
                    push_om_sample(
                        out,
                        name,
                        "_bucket",
                        l,
                        Some(("le", "+Inf")),
                        h.get_sample_count() as f64,
                    );
                }
                push_om_sample(out, name, "_sum", l, None, h.get_sample_sum());
                push_om_sample(out, name, "_count", l, None, h.get_sample_count() as f64);
            }
            // Nothing here builds summaries or untyped families.
            MetricType::SUMMARY | MetricType::UNTYPED => {
                unreachable!("{}: no summaries or untyped families are built", f.name())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Exposition {
        let mut e = Exposition::default();
        let mut c = Family::counter("x_ops_total", "Ops, \"all\" of them.\nTwo lines \\ here.");
        c.sample(labels(&[("device", "a\"b\\c\nd"), ("op", "read")]), 3.0);
        e.add(c);
        let mut g = Family::gauge("x_peak", "A gauge.");
        g.sample(vec![], 0.25);
        g.sample(labels(&[("k", "v")]), f64::INFINITY);
        e.add(g);
        e.add(Family::gauge("x_empty", "No series."));
        let mut h = Family::histogram("x_latency_seconds", "Latency.");
        h.histogram_sample(
            labels(&[("op", "read")]),
            [(1e-6, 1), (2.5e-6, 4), (1.0, 5)],
            0.5,
            6,
        );
        e.add(h);
        // A second source's series of a family already there join it.
        let mut c2 = Family::counter("x_ops_total", "Ops, \"all\" of them.\nTwo lines \\ here.");
        c2.sample(labels(&[("device", "z"), ("op", "write")]), 1.0);
        e.add(c2);
        e
    }

    #[test]
    fn the_text_format_is_the_crates_and_leaves_empty_families_out() {
        let text = sample().text();
        assert_eq!(
            text,
            "# HELP x_ops_total Ops, \"all\" of them.\\nTwo lines \\\\ here.\n\
             # TYPE x_ops_total counter\n\
             x_ops_total{device=\"a\\\"b\\\\c\\nd\",op=\"read\"} 3\n\
             x_ops_total{device=\"z\",op=\"write\"} 1\n\
             # HELP x_peak A gauge.\n\
             # TYPE x_peak gauge\n\
             x_peak 0.25\n\
             x_peak{k=\"v\"} inf\n\
             # HELP x_latency_seconds Latency.\n\
             # TYPE x_latency_seconds histogram\n\
             x_latency_seconds_bucket{op=\"read\",le=\"0.000001\"} 1\n\
             x_latency_seconds_bucket{op=\"read\",le=\"0.0000025\"} 4\n\
             x_latency_seconds_bucket{op=\"read\",le=\"1\"} 5\n\
             x_latency_seconds_bucket{op=\"read\",le=\"+Inf\"} 6\n\
             x_latency_seconds_sum{op=\"read\"} 0.5\n\
             x_latency_seconds_count{op=\"read\"} 6\n"
        );
        assert_eq!(sample().families().len(), 4);
    }

    #[test]
    fn openmetrics_names_counters_without_total_and_ends_with_eof() {
        let om = sample().openmetrics();
        assert_eq!(
            om,
            "# HELP x_ops Ops, \\\"all\\\" of them.\\nTwo lines \\\\ here.\n\
             # TYPE x_ops counter\n\
             x_ops_total{device=\"a\\\"b\\\\c\\nd\",op=\"read\"} 3\n\
             x_ops_total{device=\"z\",op=\"write\"} 1\n\
             # HELP x_peak A gauge.\n\
             # TYPE x_peak gauge\n\
             x_peak 0.25\n\
             x_peak{k=\"v\"} +Inf\n\
             # HELP x_latency_seconds Latency.\n\
             # TYPE x_latency_seconds histogram\n\
             x_latency_seconds_bucket{op=\"read\",le=\"0.000001\"} 1\n\
             x_latency_seconds_bucket{op=\"read\",le=\"0.0000025\"} 4\n\
             x_latency_seconds_bucket{op=\"read\",le=\"1\"} 5\n\
             x_latency_seconds_bucket{op=\"read\",le=\"+Inf\"} 6\n\
             x_latency_seconds_sum{op=\"read\"} 0.5\n\
             x_latency_seconds_count{op=\"read\"} 6\n\
             # EOF\n"
        );
    }

    #[test]
    fn openmetrics_is_served_when_the_scraper_prefers_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            negotiate(Some("application/openmetrics-text; version=0.0.1")),
            Format::OpenMetrics
        );
        assert_eq!(negotiate(None), Format::Text);
        assert_eq!(negotiate(Some("*/*")), Format::Text);
        assert_eq!(negotiate(Some("text/plain")), Format::Text);
        assert_eq!(
            negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("Application/OpenMetrics-Text; Q=0.8, */*;q=0.1")),
            Format::OpenMetrics
        );
    }
}
