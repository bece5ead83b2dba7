//! The exposition as `render` wrote it before it was made fast (issue 17): kept verbatim as the
//! oracle its output must equal byte for byte (dashboards and rules depend on every name and
//! label).

use std::fmt::Write;

use super::{fmt_f64, header, labels, LATENCY_BUCKETS};
use crate::model::{op_name, State, ERROR_KINDS};

/// Renders the whole exposition.
pub fn render(state: &State) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let devices = || state.devices.values();

    header(
        &mut out,
        "enlight_io_latency_seconds",
        "histogram",
        "I/O latency from submit to reap, as the eBPF probes saw it.",
    );
    for d in devices() {
        for (op, f) in &d.ops {
            let op = op_name(*op);
            let base = [
                ("device", d.record.name.as_str()),
                ("kind", d.record.kind.as_str()),
                ("op", op.as_str()),
            ];
            for le in LATENCY_BUCKETS {
                let le_ns = (le * 1e9).round() as u64;
                let count: u64 = f
                    .buckets
                    .iter()
                    .filter(|(b, _)| enlight_probes::hist::bucket_high_ns(**b) <= le_ns)
                    .map(|(_, c)| c)
                    .sum();
                let le_s = fmt_f64(le);
                let mut l = base.to_vec();
                l.push(("le", &le_s));
                let _ = writeln!(
                    out,
                    "enlight_io_latency_seconds_bucket{} {count}",
                    labels(&l)
                );
            }
            let mut l = base.to_vec();
            l.push(("le", "+Inf"));
            let _ = writeln!(
                out,
                "enlight_io_latency_seconds_bucket{} {}",
                labels(&l),
                f.ops
            );
            let _ = writeln!(
                out,
                "enlight_io_latency_seconds_sum{} {}",
                labels(&base),
                fmt_f64(f.latency_sum_ns as f64 / 1e9)
            );
            let _ = writeln!(
                out,
                "enlight_io_latency_seconds_count{} {}",
                labels(&base),
                f.ops
            );
        }
    }

    // Microbursts (crate::peaks): sliding-window maxima of the interval rates and latencies.
    let now = std::time::Instant::now();
    let window = state.peak_window;
    header(
        &mut out,
        "enlight_io_peak_ops_per_second",
        "gauge",
        "Highest ops/s of any one collector interval within the last enlight_peak_window_seconds (a burst shorter than a scrape interval shows here; the counters' rate averages it away).",
    );
    for d in devices() {
        for op in d.ops.keys() {
            let v = d
                .peaks
                .get(op)
                .map_or(0.0, |p| p.peak_ops_per_sec(now, window));
            let name = op_name(*op);
            let l = labels(&[
                ("device", &d.record.name),
                ("kind", &d.record.kind),
                ("op", &name),
            ]);
            let _ = writeln!(out, "enlight_io_peak_ops_per_second{l} {}", fmt_f64(v));
        }
    }
    header(
        &mut out,
        "enlight_io_peak_latency_seconds",
        "gauge",
        "Upper bound of the highest latency bucket (under 1/128 wide) any completion reached within the last enlight_peak_window_seconds; 0 if none completed.",
    );
    for d in devices() {
        for op in d.ops.keys() {
            let v = d
                .peaks
                .get(op)
                .and_then(|p| p.peak_bucket(now, window))
                .map_or(0.0, |b| {
                    enlight_probes::hist::bucket_high_ns(b) as f64 / 1e9
                });
            let name = op_name(*op);
            let l = labels(&[
                ("device", &d.record.name),
                ("kind", &d.record.kind),
                ("op", &name),
            ]);
            let _ = writeln!(out, "enlight_io_peak_latency_seconds{l} {}", fmt_f64(v));
        }
    }
    header(
        &mut out,
        "enlight_peak_window_seconds",
        "gauge",
        "The window of the enlight_io_peak_* gauges (peak_window_secs): set it to at least the longest scrape interval.",
    );
    let _ = writeln!(
        out,
        "enlight_peak_window_seconds {}",
        fmt_f64(window.as_secs_f64())
    );
    header(
        &mut out,
        "enlight_collector_interval_seconds",
        "gauge",
        "Time between the last two collector reads: the resolution of the peak rates.",
    );
    let _ = writeln!(
        out,
        "enlight_collector_interval_seconds {}",
        fmt_f64(state.interval.as_secs_f64())
    );

    type OpValue = fn(&crate::model::OpFigures) -> u64;
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
        header(&mut out, name, "counter", help);
        for d in devices() {
            for (op, f) in &d.ops {
                let op = op_name(*op);
                let l = labels(&[
                    ("device", &d.record.name),
                    ("kind", &d.record.kind),
                    ("op", &op),
                ]);
                let _ = writeln!(out, "{name}{l} {}", value(f));
            }
        }
    }

    let dev_labels = |d: &crate::model::DeviceState| {
        labels(&[("device", &d.record.name), ("kind", &d.record.kind)])
    };
    header(
        &mut out,
        "enlight_interrupts_total",
        "counter",
        "Host-to-guest signals (interrupts) sent.",
    );
    for d in devices() {
        let _ = writeln!(
            out,
            "enlight_interrupts_total{} {}",
            dev_labels(d),
            d.events.interrupts
        );
    }
    header(
        &mut out,
        "enlight_traps_total",
        "counter",
        "Register accesses an emulated device trapped to its device model (0 for synthetic devices).",
    );
    for d in devices() {
        let _ = writeln!(out, "enlight_traps_total{} {}", dev_labels(d), d.traps);
    }
    header(
        &mut out,
        "enlight_settings_changes_total",
        "counter",
        "Settings changes applied through the device's control socket, by knob (settings_change probe).",
    );
    for d in devices() {
        // Only the knobs the device has (an emulated device has none).
        for knob in enlight_driver::settings::Knob::ALL
            .into_iter()
            .filter(|k| crate::knobs::has(&d.knobs, k.name()))
        {
            let l = labels(&[
                ("device", &d.record.name),
                ("kind", &d.record.kind),
                ("knob", knob.name()),
            ]);
            let v = d.settings_changes.get(&(knob as u32)).copied().unwrap_or(0);
            let _ = writeln!(out, "enlight_settings_changes_total{l} {v}");
        }
    }
    header(
        &mut out,
        "enlight_doorbells_total",
        "counter",
        "Guest-to-host signals (doorbells) sent.",
    );
    for d in devices() {
        let _ = writeln!(
            out,
            "enlight_doorbells_total{} {}",
            dev_labels(d),
            d.events.doorbells
        );
    }
    header(
        &mut out,
        "enlight_ring_full_total",
        "counter",
        "Writes that found the ring full and blocked on pending_send_sz.",
    );
    for d in devices() {
        for (dir, v) in [
            ("out", d.events.ring_full_out),
            ("in", d.events.ring_full_in),
        ] {
            let l = labels(&[
                ("device", &d.record.name),
                ("kind", &d.record.kind),
                ("direction", dir),
            ]);
            let _ = writeln!(out, "enlight_ring_full_total{l} {v}");
        }
    }
    header(
        &mut out,
        "enlight_interrupt_mask_changes_total",
        "counter",
        "Guest interrupt_mask changes (entering and leaving polling).",
    );
    for d in devices() {
        for (st, v) in [
            ("masked", d.events.irq_masked),
            ("unmasked", d.events.irq_unmasked),
        ] {
            let l = labels(&[
                ("device", &d.record.name),
                ("kind", &d.record.kind),
                ("state", st),
            ]);
            let _ = writeln!(out, "enlight_interrupt_mask_changes_total{l} {v}");
        }
    }

    header(
        &mut out,
        "enlight_ring_size_bytes",
        "gauge",
        "Ring data area per direction.",
    );
    // The settings gauges: only for knobs the device has (its control socket's).
    for d in devices() {
        let s = &d.record.settings;
        for (dir, v) in [("out", s.ring_out_bytes), ("in", s.ring_in_bytes)] {
            if !crate::knobs::has(&d.knobs, &format!("ring_{dir}_bytes")) {
                continue;
            }
            let l = labels(&[
                ("device", &d.record.name),
                ("kind", &d.record.kind),
                ("direction", dir),
            ]);
            let _ = writeln!(out, "enlight_ring_size_bytes{l} {v}");
        }
    }
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
        header(&mut out, name, "gauge", help);
        for d in devices().filter(|d| crate::knobs::has(&d.knobs, &name["enlight_".len()..])) {
            let _ = writeln!(out, "{name}{} {}", dev_labels(d), value(&d.record.settings));
        }
    }
    header(
        &mut out,
        "enlight_device_info",
        "gauge",
        "Known devices (1); present=\"false\" for a vanished device still in its grace period.",
    );
    for d in devices() {
        let pid = d.record.pid.to_string();
        let present = d.present.to_string();
        let l = labels(&[
            ("device", &d.record.name),
            ("kind", &d.record.kind),
            ("type", &d.record.device),
            ("pid", &pid),
            ("present", &present),
        ]);
        let _ = writeln!(out, "enlight_device_info{l} 1");
    }

    header(
        &mut out,
        "enlight_probe_attached",
        "gauge",
        "Whether the probe is attached to the device's process (1) or not (0).",
    );
    // Kernel devices have no USDT probes: the kernel probes' lines follow, once each.
    for d in devices().filter(|d| d.kernel.is_none()) {
        for (probe, _) in enlight_probes::PROGRAMS {
            let attached = d.attached && d.sites_by_probe.get(probe).copied().unwrap_or(0) > 0;
            let l = labels(&[
                ("device", &d.record.name),
                ("kind", &d.record.kind),
                ("probe", probe),
                ("state", if attached { "attached" } else { "detached" }),
            ]);
            let _ = writeln!(out, "enlight_probe_attached{l} {}", attached as u8);
        }
    }
    crate::kernel::metrics::probe_attached_lines(&mut out, state);
    header(
        &mut out,
        "enlight_probe_events_lost_total",
        "counter",
        "Events the eBPF programs could not account, by reason.",
    );
    let h = &state.health;
    for (reason, v) in [
        ("map_full", h.events_lost),
        ("batch_truncated", h.batch_truncated),
        ("read_failed", h.read_failures),
        ("no_spec", h.no_spec),
    ] {
        let _ = writeln!(
            out,
            "enlight_probe_events_lost_total{} {v}",
            labels(&[("reason", reason)])
        );
    }
    header(
        &mut out,
        "enlight_errors_total",
        "counter",
        "Errors of the daemon, by kind.",
    );
    for kind in ERROR_KINDS {
        let v = state.errors.get(kind).copied().unwrap_or(0);
        let _ = writeln!(out, "enlight_errors_total{} {v}", labels(&[("kind", kind)]));
    }
    header(
        &mut out,
        "enlight_devices",
        "gauge",
        "Devices currently registered.",
    );
    let _ = writeln!(
        out,
        "enlight_devices {}",
        devices().filter(|d| d.present).count()
    );
    header(
        &mut out,
        "enlight_collector_ticks_total",
        "counter",
        "Collector intervals completed.",
    );
    let _ = writeln!(out, "enlight_collector_ticks_total {}", state.ticks);
    header(
        &mut out,
        "enlight_collector_tick_seconds",
        "gauge",
        "Duration of the last collector interval's work.",
    );
    let _ = writeln!(
        out,
        "enlight_collector_tick_seconds {}",
        fmt_f64(state.last_tick.as_secs_f64())
    );
    crate::selfcost::render_metrics(&mut out, &state.self_cost);
    // The driver label of kernel devices, and the kernel-only families.
    crate::kernel::metrics::finish(&mut out, state);
    crate::knobs::render_metrics(&mut out, state);
    out
}
