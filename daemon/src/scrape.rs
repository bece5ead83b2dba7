//! What `/metrics` and `/api/v1/devices` serve, rendered once per collector tick.
//!
//! Rendering the exposition of 64 devices (about 5,000 series) and building each device's view
//! (an HDR histogram per op for its percentiles) took 15-25 ms per scrape on main, inside the
//! state lock, and grew with the fleet. The state only changes when the collector ticks, so the
//! collector renders both right after its tick, while it still holds the state lock, and a
//! scrape clones an `Arc` of the bytes. Holding the lock while publishing keeps one guarantee
//! callers rely on: once [`crate::DaemonHandle::ticks`] says tick N is done, what a scrape serves
//! is tick N's state or a later one, never older.
//!
//! Freshness: a scrape sees the state of the last tick, as before (the state never changed
//! between ticks). The one figure that used to move between ticks is the window of the peak
//! gauges (`enlight_io_peak_*`, the devices' `peak_*`): it ended at the scrape, now it ends at
//! the render, after the tick's read. So an interval leaves the window up to one collector
//! interval later than it used to, and no interval is ever missed; the peak window is meant to be
//! at least the longest scrape interval anyway (see [`crate::peaks`]).
//!
//! The exposition's families are built at every tick. Each of the two formats served
//! (`/metrics` negotiates: Prometheus text 0.0.4, or OpenMetrics when the scraper asks for it, as
//! Prometheus does by default) is written from them at the tick too when someone asked for that
//! format within the last [`KEEP_WRITING`], so its scrapes are served bytes; otherwise by the
//! first request that asks for it, and served as bytes from then on. Writing costs more than
//! building (at 64 devices, in release: families 2-3 ms, the crate's text encoder 3-4 ms,
//! OpenMetrics 1.5 ms), so a daemon nobody scrapes, or scrapes in one format only, does not pay
//! for both at every interval.
//!
//! The tuner's families and views are not cached: the tuner updates them on its own schedule,
//! between ticks, and they are small. They are added per scrape when a tuner runs.

use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;

use crate::api::DeviceView;
use crate::exposition::{Exposition, Format, OPENMETRICS_EOF};
use crate::model::State;

/// One tick's rendering.
#[derive(Debug, Default)]
pub struct Rendered {
    /// The tick rendered (`State::ticks`).
    pub ticks: u64,
    /// The exposition's families, without the tuner's.
    pub exposition: Exposition,
    /// `exposition` in the text format (0.0.4), once asked for.
    text: OnceLock<Bytes>,
    /// `exposition` in OpenMetrics, closed with `# EOF`, once asked for.
    openmetrics: OnceLock<Bytes>,
    /// Every device's view, without the tuner's part (`tuner: None`).
    pub devices: Arc<Vec<DeviceView>>,
    /// `devices` as JSON.
    pub devices_json: Bytes,
}

impl Rendered {
    /// Renders `state`.
    pub fn of(state: &State) -> Rendered {
        let devices = crate::api::devices(state);
        // Serializing plain data (strings, numbers, maps with string keys) cannot fail.
        let json = serde_json::to_vec(&devices).expect("device views serialize");
        Rendered {
            ticks: state.ticks,
            exposition: crate::metrics::exposition(state),
            text: OnceLock::new(),
            openmetrics: OnceLock::new(),
            devices: Arc::new(devices),
            devices_json: Bytes::from(json),
        }
    }

    /// The exposition in the text format (0.0.4), without the tuner's families.
    pub fn metrics(&self) -> &Bytes {
        self.text
            .get_or_init(|| Bytes::from(self.exposition.text().into_bytes()))
    }

    /// The exposition in OpenMetrics, closed with `# EOF`, without the tuner's families.
    pub fn openmetrics(&self) -> &Bytes {
        self.openmetrics
            .get_or_init(|| Bytes::from(self.exposition.openmetrics().into_bytes()))
    }
}

/// How long after a request in a format the collector keeps writing that format at every
/// tick: longer than the scrape intervals in use (Prometheus's are 15-60 s).
pub const KEEP_WRITING: Duration = Duration::from_secs(120);

/// The latest [`Rendered`], swapped whole: readers hold the lock only to clone an `Arc`.
#[derive(Debug, Default)]
pub struct ScrapeCache {
    latest: RwLock<Arc<Rendered>>,
    /// When each format (text, OpenMetrics) was last asked for.
    asked: Mutex<[Option<Instant>; 2]>,
}

fn format_index(format: Format) -> usize {
    match format {
        Format::Text => 0,
        Format::OpenMetrics => 1,
    }
}

impl ScrapeCache {
    /// Renders `state` (writing the formats asked for within [`KEEP_WRITING`]) and makes it
    /// what scrapes see from now on.
    pub fn publish(&self, state: &State) {
        let rendered = Rendered::of(state);
        let asked = *self.asked.lock().expect("scrape cache lock");
        let recent =
            |f: Format| asked[format_index(f)].is_some_and(|at| at.elapsed() < KEEP_WRITING);
        if recent(Format::Text) {
            rendered.metrics();
        }
        if recent(Format::OpenMetrics) {
            rendered.openmetrics();
        }
        *self.latest.write().expect("scrape cache lock") = Arc::new(rendered);
    }

    /// What `/metrics` serves in `format` (see [`metrics_with`]); notes that it was asked for.
    pub fn serve(&self, format: Format, tuner: &Exposition) -> Bytes {
        self.asked.lock().expect("scrape cache lock")[format_index(format)] = Some(Instant::now());
        metrics_with(&self.latest(), format, tuner)
    }

    /// Whether the latest rendering has `format` written already (tests).
    #[cfg(test)]
    fn written(&self, format: Format) -> bool {
        let r = self.latest();
        match format {
            Format::Text => r.text.get().is_some(),
            Format::OpenMetrics => r.openmetrics.get().is_some(),
        }
    }

    /// The latest rendering.
    pub fn latest(&self) -> Arc<Rendered> {
        Arc::clone(&self.latest.read().expect("scrape cache lock"))
    }
}

/// The exposition served in `format`: the cached one, followed by the tuner's families (`tuner`,
/// empty when no tuner runs: then the cached bytes are served as they are, without a copy).
pub fn metrics_with(rendered: &Rendered, format: Format, tuner: &Exposition) -> Bytes {
    let (cached, extra) = match format {
        Format::Text => (rendered.metrics(), tuner.text()),
        Format::OpenMetrics => (rendered.openmetrics(), {
            let mut s = String::new();
            tuner.openmetrics_into(&mut s);
            s
        }),
    };
    if extra.is_empty() {
        return cached.clone();
    }
    let mut v = Vec::with_capacity(cached.len() + extra.len());
    match format {
        Format::Text => {
            v.extend_from_slice(cached);
            v.extend_from_slice(extra.as_bytes());
        }
        Format::OpenMetrics => {
            // The tuner's families go before the cached `# EOF`.
            let body = cached
                .strip_suffix(OPENMETRICS_EOF.as_bytes())
                .unwrap_or(cached);
            v.extend_from_slice(body);
            v.extend_from_slice(extra.as_bytes());
            v.extend_from_slice(OPENMETRICS_EOF.as_bytes());
        }
    }
    Bytes::from(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::tests::{io, record, FakeProbes};
    use crate::collector::Collector;
    use enlight_driver::registry::Registration;
    use enlight_probes::IoKey;
    use std::time::Duration;

    #[test]
    fn publishes_what_render_and_the_views_give() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let fake = FakeProbes::default();
        let _reg = Registration::register(dir.path(), &record("disk0", me)).unwrap();
        fake.snapshot.lock().unwrap().io.insert(
            IoKey {
                pid: me,
                dev: 0,
                op: 0,
            },
            io(10, &[(3_000, 10)]),
        );
        let mut c = Collector::new(fake, dir.path().into(), Duration::from_secs(60));
        let mut state = State::default();
        let cache = ScrapeCache::default();
        assert_eq!(cache.latest().ticks, 0);
        assert!(cache.latest().metrics().is_empty());
        c.tick(&mut state);
        cache.publish(&state);
        let r = cache.latest();
        assert_eq!(r.ticks, 1);
        assert_eq!(
            std::str::from_utf8(r.metrics()).unwrap(),
            crate::metrics::render(&state)
        );
        assert_eq!(*r.devices, crate::api::devices(&state));
        let parsed: Vec<DeviceView> = serde_json::from_slice(&r.devices_json).unwrap();
        assert_eq!(parsed, *r.devices);
        assert_eq!(r.devices[0].total.ops_total, 10);
    }

    #[test]
    fn a_format_asked_for_is_written_at_the_next_ticks() {
        let cache = ScrapeCache::default();
        let state = State::default();
        cache.publish(&state);
        assert!(!cache.written(Format::Text) && !cache.written(Format::OpenMetrics));
        let none = Exposition::default();
        let om = cache.serve(Format::OpenMetrics, &none);
        assert!(om.ends_with(b"# EOF\n"));
        // Written by that request, for the rest of the tick.
        assert!(cache.written(Format::OpenMetrics) && !cache.written(Format::Text));
        cache.publish(&state);
        assert!(
            cache.written(Format::OpenMetrics),
            "asked for: written at the tick"
        );
        assert!(!cache.written(Format::Text), "never asked for: not written");
        *cache.asked.lock().unwrap() = [None, Instant::now().checked_sub(KEEP_WRITING)];
        cache.publish(&state);
        assert!(
            !cache.written(Format::OpenMetrics),
            "not asked for lately: not written"
        );
        assert_eq!(cache.serve(Format::OpenMetrics, &none), om);
    }

    #[test]
    fn the_tuners_families_follow_the_cached_exposition() {
        let r = Rendered::of(&State {
            ticks: 3,
            ..State::default()
        });
        let om = std::str::from_utf8(r.openmetrics()).unwrap();
        assert!(om.contains("# HELP enlight_collector_ticks Collector intervals completed.\n# TYPE enlight_collector_ticks counter\nenlight_collector_ticks_total 3\n"), "{om}");
        assert!(
            om.ends_with(
                "enlight_kernel_probe_trouble_total{what=\"completion_without_issue\"} 0\n# EOF\n"
            ),
            "{om}"
        );
        let none = Exposition::default();
        for format in [Format::Text, Format::OpenMetrics] {
            let same = metrics_with(&r, format, &none);
            let cached = match format {
                Format::Text => r.metrics(),
                Format::OpenMetrics => r.openmetrics(),
            };
            assert_eq!(same.as_ptr(), cached.as_ptr(), "served without a copy");
        }
        let mut tuner = Exposition::default();
        let mut f = crate::exposition::Family::gauge("enlight_tuner_pinned", "Pinned.");
        f.sample(vec![], 1.0);
        tuner.add(f);
        let text = metrics_with(&r, Format::Text, &tuner);
        assert!(text.starts_with(r.metrics()));
        assert_eq!(
            &text[r.metrics().len()..],
            b"# HELP enlight_tuner_pinned Pinned.\n# TYPE enlight_tuner_pinned gauge\nenlight_tuner_pinned 1\n"
        );
        let om = metrics_with(&r, Format::OpenMetrics, &tuner);
        let body = r.openmetrics().len() - OPENMETRICS_EOF.len();
        assert_eq!(om[..body], r.openmetrics()[..body]);
        assert_eq!(
            &om[body..],
            b"# HELP enlight_tuner_pinned Pinned.\n# TYPE enlight_tuner_pinned gauge\nenlight_tuner_pinned 1\n# EOF\n"
        );
    }
}
