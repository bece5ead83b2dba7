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
//! The tuner's families and views are not cached: the tuner updates them on its own schedule,
//! between ticks, and they are small. They are added per scrape when a tuner runs.

use std::sync::{Arc, RwLock};

use axum::body::Bytes;

use crate::api::DeviceView;
use crate::model::State;

/// One tick's rendering.
#[derive(Debug, Default)]
pub struct Rendered {
    /// The tick rendered (`State::ticks`).
    pub ticks: u64,
    /// The Prometheus exposition, without the tuner's families.
    pub metrics: Bytes,
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
            metrics: Bytes::from(crate::metrics::render(state).into_bytes()),
            devices: Arc::new(devices),
            devices_json: Bytes::from(json),
        }
    }
}

/// The latest [`Rendered`], swapped whole: readers hold the lock only to clone an `Arc`.
#[derive(Debug, Default)]
pub struct ScrapeCache {
    latest: RwLock<Arc<Rendered>>,
}

impl ScrapeCache {
    /// Renders `state` and makes it what scrapes see from now on.
    pub fn publish(&self, state: &State) {
        let rendered = Arc::new(Rendered::of(state));
        *self.latest.write().expect("scrape cache lock") = rendered;
    }

    /// The latest rendering.
    pub fn latest(&self) -> Arc<Rendered> {
        Arc::clone(&self.latest.read().expect("scrape cache lock"))
    }
}

/// The exposition served: the cached one, followed by the tuner's families (`tuner`, empty
/// when no tuner runs, then the cached bytes are served as they are, without a copy).
pub fn metrics_with(cached: &Bytes, tuner: &str) -> Bytes {
    if tuner.is_empty() {
        return cached.clone();
    }
    let mut v = Vec::with_capacity(cached.len() + tuner.len());
    v.extend_from_slice(cached);
    v.extend_from_slice(tuner.as_bytes());
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
        assert!(cache.latest().metrics.is_empty());
        c.tick(&mut state);
        cache.publish(&state);
        let r = cache.latest();
        assert_eq!(r.ticks, 1);
        assert_eq!(
            std::str::from_utf8(&r.metrics).unwrap(),
            crate::metrics::render(&state)
        );
        assert_eq!(*r.devices, crate::api::devices(&state));
        let parsed: Vec<DeviceView> = serde_json::from_slice(&r.devices_json).unwrap();
        assert_eq!(parsed, *r.devices);
        assert_eq!(r.devices[0].total.ops_total, 10);
    }

    #[test]
    fn the_tuners_families_follow_the_cached_exposition() {
        let cached = Bytes::from_static(b"a 1\n");
        let same = metrics_with(&cached, "");
        assert_eq!(same.as_ptr(), cached.as_ptr(), "served without a copy");
        assert_eq!(&metrics_with(&cached, "b 2\n")[..], b"a 1\nb 2\n");
    }
}
