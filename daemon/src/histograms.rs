//! `/api/v1/histograms` and `/api/v1/devices/{name}/histogram`: each device's cumulative latency
//! histogram per op, as the kernel buckets it (log-linear, under 1/128 wide), so that a client
//! (`enlight top`) can difference two reads and get the exact distribution of any window.
//! Only non-empty buckets are listed; counts are cumulative since the device was first seen.

use crate::model::{op_name, DeviceState, State};

// The types are the API's, defined once for the daemon and `enlight top`.
pub use enlight_abi::api::{DeviceHistogram, OpHistogram};

/// The histograms of one device.
pub fn device_histogram(d: &DeviceState) -> DeviceHistogram {
    DeviceHistogram {
        device: d.record.name.clone(),
        kind: d.record.kind.clone(),
        ops: d
            .ops
            .iter()
            .map(|(op, f)| OpHistogram {
                op: op_name(*op),
                count: f.buckets.values().sum(),
                buckets: f
                    .buckets
                    .iter()
                    .filter(|(_, &c)| c > 0)
                    .map(|(&b, &c)| {
                        [
                            enlight_probes::hist::bucket_low_ns(b),
                            enlight_probes::hist::bucket_high_ns(b),
                            c,
                        ]
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The histograms of every device.
pub fn histograms(state: &State) -> Vec<DeviceHistogram> {
    state.devices.values().map(device_histogram).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::tests::{io, record, FakeProbes};
    use crate::collector::Collector;
    use enlight_driver::registry::Registration;
    use enlight_probes::IoKey;

    #[test]
    fn buckets_are_the_kernels_with_their_bounds_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let _reg = Registration::register(dir.path(), &record("disk0", me)).unwrap();
        let fake = FakeProbes::default();
        fake.snapshot.lock().unwrap().io.insert(
            IoKey {
                pid: me,
                dev: 0,
                op: 1,
            },
            io(30, &[(20_000, 20), (90_000, 10)]),
        );
        let mut collector =
            Collector::new(fake, dir.path().into(), std::time::Duration::from_secs(30));
        let mut state = State::default();
        collector.tick(&mut state);
        let all = histograms(&state);
        assert_eq!(all.len(), 1);
        let h = &all[0];
        assert_eq!((h.device.as_str(), h.ops.len()), ("disk0", 1));
        let w = &h.ops[0];
        assert_eq!((w.op.as_str(), w.count), ("write", 30));
        assert_eq!(w.buckets.len(), 2);
        let [lo, hi, c] = w.buckets[0];
        assert!(lo <= 20_000 && 20_000 < hi && c == 20, "{:?}", w.buckets);
        let [lo, hi, c] = w.buckets[1];
        assert!(lo <= 90_000 && 90_000 < hi && c == 10, "{:?}", w.buckets);
    }
}
