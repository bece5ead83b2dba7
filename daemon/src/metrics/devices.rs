//! The devices' families: every device of the shared model, registry and kernel devices alike
//! (their figures are the same, kept in one map; a kernel device's series carry its `driver`,
//! see [`device_labels`]). Written in the model's device order, so each family lists the
//! devices by name whatever their origin.

use crate::exposition::{device_labels, label, labels_with, Exposition, Family, Labels};
use crate::model::{op_name, DeviceState, OpFigures, State};

use super::LATENCY_BUCKETS;

/// The I/O, peak, signalling, settings and device-info families, and the registry devices'
/// lines of `enlight_probe_attached` (the kernel's follow, from [`crate::kernel::metrics`]).
pub fn families(state: &State, out: &mut Exposition) {
    let ids: Vec<(&DeviceState, Labels)> = state
        .devices
        .values()
        .map(|d| (d, device_labels(d)))
        .collect();
    latency_and_peaks(state, &ids, out);
    io_counters(&ids, out);
    signalling(&ids, out);
    settings(&ids, out);
    device_info(&ids, out);
    probe_attached(&ids, out);
}

/// The latency histogram and the microburst gauges.
fn latency_and_peaks(state: &State, ids: &[(&DeviceState, Labels)], out: &mut Exposition) {
    // Each op's name once per device.
    let ops = |d: &DeviceState| -> Vec<(u32, String)> {
        d.ops.keys().map(|&op| (op, op_name(op))).collect()
    };
    let le_ns: Vec<u64> = LATENCY_BUCKETS
        .iter()
        .map(|&le| (le * 1e9).round() as u64)
        .collect();

    let mut f = Family::histogram(
        "enlight_io_latency_seconds",
        "I/O latency from submit to reap, as the eBPF probes saw it.",
    );
    for (d, id) in ids {
        for (op, f_op) in &d.ops {
            f.histogram_sample(
                labels_with(id, &[("op", &op_name(*op))]),
                cumulative(f_op, &le_ns),
                f_op.latency_sum_ns as f64 / 1e9,
                f_op.ops,
            );
        }
    }
    out.add(f);

    // Microbursts (crate::peaks): sliding-window maxima of the interval rates and latencies.
    let now = std::time::Instant::now();
    let window = state.peak_window;
    let mut f = Family::gauge(
        "enlight_io_peak_ops_per_second",
        "Highest ops/s of any one collector interval within the last enlight_peak_window_seconds (a burst shorter than a scrape interval shows here; the counters' rate averages it away).",
    );
    for (d, id) in ids {
        for (op, name) in ops(d) {
            let v = d
                .peaks
                .get(&op)
                .map_or(0.0, |p| p.peak_ops_per_sec(now, window));
            f.sample(labels_with(id, &[("op", &name)]), v);
        }
    }
    out.add(f);
    let mut f = Family::gauge(
        "enlight_io_peak_latency_seconds",
        "Upper bound of the highest latency bucket (under 1/128 wide) any completion reached within the last enlight_peak_window_seconds; 0 if none completed.",
    );
    for (d, id) in ids {
        for (op, name) in ops(d) {
            let v = d
                .peaks
                .get(&op)
                .and_then(|p| p.peak_bucket(now, window))
                .map_or(0.0, |b| {
                    enlight_probes::hist::bucket_high_ns(b) as f64 / 1e9
                });
            f.sample(labels_with(id, &[("op", &name)]), v);
        }
    }
    out.add(f);
    let mut f = Family::gauge(
        "enlight_peak_window_seconds",
        "The window of the enlight_io_peak_* gauges (peak_window_secs): set it to at least the longest scrape interval.",
    );
    f.sample(vec![], window.as_secs_f64());
    out.add(f);
    let mut f = Family::gauge(
        "enlight_collector_interval_seconds",
        "Time between the last two collector reads: the resolution of the peak rates.",
    );
    f.sample(vec![], state.interval.as_secs_f64());
    out.add(f);
}

/// Operations, bytes and errors per op.
fn io_counters(ids: &[(&DeviceState, Labels)], out: &mut Exposition) {
    type OpValue = fn(&OpFigures) -> u64;
    let per_op: [(&str, &str, OpValue); 3] = [
        ("enlight_io_ops_total", "Completed I/O operations.", |f| {
            f.ops
        }),
        (
            "enlight_io_bytes_total",
            "Bytes transferred by completed I/O operations.",
            |f| f.bytes,
        ),
        (
            "enlight_io_errors_total",
            "I/O operations completed with an error status.",
            |f| f.errors,
        ),
    ];
    for (name, help, value) in per_op {
        let mut f = Family::counter(name, help);
        for (d, id) in ids {
            for (op, f_op) in &d.ops {
                f.sample(
                    labels_with(id, &[("op", &op_name(*op))]),
                    value(f_op) as f64,
                );
            }
        }
        out.add(f);
    }
}

/// Signals both ways, traps, settings changes, full rings and interrupt-mask changes.
fn signalling(ids: &[(&DeviceState, Labels)], out: &mut Exposition) {
    let per_device = |name: &str, kind: &str, help: &str, value: &dyn Fn(&DeviceState) -> u64| {
        let mut f = if kind == "counter" {
            Family::counter(name, help)
        } else {
            Family::gauge(name, help)
        };
        for (d, id) in ids {
            f.sample(id.clone(), value(d) as f64);
        }
        f
    };
    out.add(per_device(
        "enlight_interrupts_total",
        "counter",
        "Host-to-guest signals (interrupts) sent.",
        &|d| d.events.interrupts,
    ));
    out.add(per_device(
        "enlight_traps_total",
        "counter",
        "Register accesses an emulated device trapped to its device model (0 for synthetic devices).",
        &|d| d.traps,
    ));
    let mut f = Family::counter(
        "enlight_settings_changes_total",
        "Settings changes applied through the device's control socket, by knob (settings_change probe).",
    );
    for (d, id) in ids {
        // Only the knobs the device has (an emulated device has none).
        for knob in enlight_driver::settings::Knob::ALL
            .into_iter()
            .filter(|k| crate::knobs::has(&d.knobs, k.name()))
        {
            let v = d.settings_changes.get(&(knob as u32)).copied().unwrap_or(0);
            f.sample(labels_with(id, &[("knob", knob.name())]), v as f64);
        }
    }
    out.add(f);
    out.add(per_device(
        "enlight_doorbells_total",
        "counter",
        "Guest-to-host signals (doorbells) sent.",
        &|d| d.events.doorbells,
    ));
    let mut f = Family::counter(
        "enlight_ring_full_total",
        "Writes that found the ring full and blocked on pending_send_sz.",
    );
    for (d, id) in ids {
        for (dir, v) in [
            ("out", d.events.ring_full_out),
            ("in", d.events.ring_full_in),
        ] {
            f.sample(labels_with(id, &[("direction", dir)]), v as f64);
        }
    }
    out.add(f);
    let mut f = Family::counter(
        "enlight_interrupt_mask_changes_total",
        "Guest interrupt_mask changes (entering and leaving polling).",
    );
    for (d, id) in ids {
        for (st, v) in [
            ("masked", d.events.irq_masked),
            ("unmasked", d.events.irq_unmasked),
        ] {
            f.sample(labels_with(id, &[("state", st)]), v as f64);
        }
    }
    out.add(f);
}

/// The settings gauges of registry devices.
fn settings(ids: &[(&DeviceState, Labels)], out: &mut Exposition) {
    // The settings gauges of registry devices: only for knobs the device has (its control
    // socket's). A kernel device's knobs are in enlight_knob_value and enlight_kernel_*.
    let registry = || ids.iter().filter(|(d, _)| d.kernel.is_none());
    let mut f = Family::gauge("enlight_ring_size_bytes", "Ring data area per direction.");
    for (d, id) in registry() {
        let s = &d.record.settings;
        for (dir, knob, v) in [
            ("out", "ring_out_bytes", s.ring_out_bytes),
            ("in", "ring_in_bytes", s.ring_in_bytes),
        ] {
            if crate::knobs::has(&d.knobs, knob) {
                f.sample(labels_with(id, &[("direction", dir)]), v as f64);
            }
        }
    }
    out.add(f);
    type Knob = fn(&enlight_driver::settings::DeviceSettings) -> u32;
    let knobs: [(&str, &str, Knob); 3] = [
        (
            "enlight_moderation_frames",
            "Interrupt moderation: completions per signal.",
            |s| s.moderation_frames,
        ),
        (
            "enlight_moderation_usecs",
            "Interrupt moderation: microseconds before a signal.",
            |s| s.moderation_usecs,
        ),
        (
            "enlight_poll_budget",
            "Completions the guest reaps per polling pass.",
            |s| s.poll_budget,
        ),
    ];
    for (name, help, value) in knobs {
        let mut f = Family::gauge(name, help);
        for (d, id) in
            registry().filter(|(d, _)| crate::knobs::has(&d.knobs, &name["enlight_".len()..]))
        {
            f.sample(id.clone(), value(&d.record.settings) as f64);
        }
        out.add(f);
    }
}

/// One line per known device.
fn device_info(ids: &[(&DeviceState, Labels)], out: &mut Exposition) {
    let mut f = Family::gauge(
        "enlight_device_info",
        "Known devices (1); present=\"false\" for a vanished device still in its grace period.",
    );
    for (d, id) in ids {
        let pid = d.record.pid.to_string();
        f.sample(
            labels_with(
                id,
                &[
                    ("type", &d.record.device),
                    ("pid", &pid),
                    ("present", if d.present { "true" } else { "false" }),
                ],
            ),
            1.0,
        );
    }
    out.add(f);
}

/// The registry devices' lines of `enlight_probe_attached`.
fn probe_attached(ids: &[(&DeviceState, Labels)], out: &mut Exposition) {
    let registry = || ids.iter().filter(|(d, _)| d.kernel.is_none());
    let mut f = Family::gauge(
        "enlight_probe_attached",
        "Whether the probe is attached to the device's process (1) or not (0).",
    );
    // Kernel devices have no USDT probes: the kernel probes' lines follow, once each.
    for (d, id) in registry() {
        for (probe, _) in enlight_probes::PROGRAMS {
            let attached = d.attached && d.sites_by_probe.get(probe).copied().unwrap_or(0) > 0;
            f.sample(
                labels_with(
                    id,
                    &[
                        ("probe", probe),
                        ("state", if attached { "attached" } else { "detached" }),
                    ],
                ),
                attached as u8 as f64,
            );
        }
    }
    out.add(f);
}

/// Cumulative counts at each of [`LATENCY_BUCKETS`] (`le_ns`, in ns): a kernel bucket counts
/// toward `le` when its upper bound is at most `le`. Bucket indices ascend and so do their
/// upper bounds: one pass gives every count.
fn cumulative(f: &OpFigures, le_ns: &[u64]) -> Vec<(f64, u64)> {
    let mut buckets = f.buckets.iter().peekable();
    let mut count: u64 = 0;
    LATENCY_BUCKETS
        .iter()
        .zip(le_ns)
        .map(|(&le, &le_ns)| {
            while let Some((_, c)) =
                buckets.next_if(|(b, _)| enlight_probes::hist::bucket_high_ns(**b) <= le_ns)
            {
                count += c;
            }
            (le, count)
        })
        .collect()
}

/// `enlight_knob_value` (every knob a device has, with its unit, source and disruption) and
/// `enlight_knob_limit` (its min and max where the source says).
pub fn knob_families(state: &State, out: &mut Exposition) {
    let ids: Vec<(&DeviceState, Labels)> = state
        .devices
        .values()
        .filter(|d| !d.knobs.is_empty())
        .map(|d| (d, device_labels(d)))
        .collect();
    let mut f = Family::gauge(
        "enlight_knob_value",
        "A knob the device really has, its value read from its source (a choice knob: the index of its choice).",
    );
    for (d, id) in &ids {
        for k in &d.knobs {
            f.sample(
                labels_with(
                    id,
                    &[
                        ("knob", &k.name),
                        ("unit", k.unit.name()),
                        ("source", k.source.as_str()),
                        ("disruption", k.disruption.as_str()),
                    ],
                ),
                k.value as f64,
            );
        }
    }
    out.add(f);
    let mut f = Family::gauge(
        "enlight_knob_limit",
        "The lowest (limit=\"min\") and highest (limit=\"max\") value a knob accepts, where its source says.",
    );
    for (d, id) in &ids {
        for k in &d.knobs {
            for (limit, v) in [("min", k.min), ("max", k.max)] {
                let Some(v) = v else { continue };
                let mut l = id.clone();
                l.extend([label("knob", &k.name), label("limit", limit)]);
                f.sample(l, v as f64);
            }
        }
    }
    out.add(f);
}
