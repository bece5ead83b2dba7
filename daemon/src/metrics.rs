//! Prometheus text exposition (format 0.0.4) of the collector's state.
//!
//! Base units (`_seconds`, `_bytes`), `_total` counters, labels `device`, `kind`, `op`. Series are
//! written in a stable order. The latency histogram's `le` buckets are fixed; a kernel bucket
//! counts toward `le` when its upper bound is at most `le`, so a cumulative count can be short by
//! the completions of the single kernel bucket straddling `le` (at most 1/128 of it in latency
//! terms).

use std::fmt::Write;

use crate::model::{op_name, State, ERROR_KINDS};

/// Upper bounds of `enlight_io_latency_seconds`, in seconds.
pub const LATENCY_BUCKETS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Escapes a label value.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn fmt_f64(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Appends `v` escaped as a label value (what [`escape`] returns, without allocating).
fn push_escaped(out: &mut String, v: &str) {
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

/// Appends a label set's inside, `k1="v1",k2="v2"`.
fn push_labels(out: &mut String, pairs: &[(&str, &str)]) {
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        push_escaped(out, v);
        out.push('"');
    }
}

/// Appends `name{prefix,extra...} `: `prefix` is a label set's inside already escaped (a
/// device's `device="..",kind=".."`, or empty). The caller writes the value and the newline.
fn open_series(out: &mut String, name: &str, prefix: &str, extra: &[(&str, &str)]) {
    out.push_str(name);
    out.push('{');
    out.push_str(prefix);
    if !prefix.is_empty() && !extra.is_empty() {
        out.push(',');
    }
    push_labels(out, extra);
    out.push_str("} ");
}

/// Appends a value as [`fmt_f64`] writes it, and the line's end.
fn push_f64_line(out: &mut String, v: f64) {
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf\n" } else { "-Inf\n" });
    } else {
        let _ = writeln!(out, "{v}");
    }
}

/// A device's `device="..",kind=".."`, escaped.
fn device_prefix(d: &crate::model::DeviceState) -> String {
    let mut p = String::with_capacity(32 + d.record.name.len() + d.record.kind.len());
    push_labels(
        &mut p,
        &[("device", &d.record.name), ("kind", &d.record.kind)],
    );
    p
}

/// Renders the whole exposition.
///
/// Written straight into one buffer, with each device's labels escaped once and each latency
/// histogram summed in one pass over its buckets: the collector renders every tick (see
/// [`crate::scrape`]), so this is on every tick's bill. The output is byte for byte what the
/// plain version (kept as the tests' oracle) writes.
pub fn render(state: &State) -> String {
    // About 85 bytes per series; a device has about 80.
    let mut out = String::with_capacity(16 * 1024 + state.devices.len() * 8 * 1024);
    let devices = || state.devices.values();
    let prefixes: Vec<String> = devices().map(device_prefix).collect();
    let with_prefix = || devices().zip(prefixes.iter().map(String::as_str));
    let le_labels: Vec<(u64, String)> = LATENCY_BUCKETS
        .iter()
        .map(|&le| ((le * 1e9).round() as u64, fmt_f64(le)))
        .collect();

    header(
        &mut out,
        "enlight_io_latency_seconds",
        "histogram",
        "I/O latency from submit to reap, as the eBPF probes saw it.",
    );
    for (d, dev) in with_prefix() {
        for (op, f) in &d.ops {
            let op = op_name(*op);
            // Bucket indices ascend, and so do their upper bounds: one pass gives every
            // cumulative count.
            let mut buckets = f.buckets.iter().peekable();
            let mut count: u64 = 0;
            for (le_ns, le_s) in &le_labels {
                while let Some((_, c)) =
                    buckets.next_if(|(b, _)| enlight_probes::hist::bucket_high_ns(**b) <= *le_ns)
                {
                    count += c;
                }
                open_series(
                    &mut out,
                    "enlight_io_latency_seconds_bucket",
                    dev,
                    &[("op", &op), ("le", le_s)],
                );
                let _ = writeln!(out, "{count}");
            }
            open_series(
                &mut out,
                "enlight_io_latency_seconds_bucket",
                dev,
                &[("op", &op), ("le", "+Inf")],
            );
            let _ = writeln!(out, "{}", f.ops);
            open_series(
                &mut out,
                "enlight_io_latency_seconds_sum",
                dev,
                &[("op", &op)],
            );
            push_f64_line(&mut out, f.latency_sum_ns as f64 / 1e9);
            open_series(
                &mut out,
                "enlight_io_latency_seconds_count",
                dev,
                &[("op", &op)],
            );
            let _ = writeln!(out, "{}", f.ops);
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
    for (d, dev) in with_prefix() {
        for op in d.ops.keys() {
            let v = d
                .peaks
                .get(op)
                .map_or(0.0, |p| p.peak_ops_per_sec(now, window));
            let name = op_name(*op);
            open_series(
                &mut out,
                "enlight_io_peak_ops_per_second",
                dev,
                &[("op", &name)],
            );
            push_f64_line(&mut out, v);
        }
    }
    header(
        &mut out,
        "enlight_io_peak_latency_seconds",
        "gauge",
        "Upper bound of the highest latency bucket (under 1/128 wide) any completion reached within the last enlight_peak_window_seconds; 0 if none completed.",
    );
    for (d, dev) in with_prefix() {
        for op in d.ops.keys() {
            let v = d
                .peaks
                .get(op)
                .and_then(|p| p.peak_bucket(now, window))
                .map_or(0.0, |b| {
                    enlight_probes::hist::bucket_high_ns(b) as f64 / 1e9
                });
            let name = op_name(*op);
            open_series(
                &mut out,
                "enlight_io_peak_latency_seconds",
                dev,
                &[("op", &name)],
            );
            push_f64_line(&mut out, v);
        }
    }
    header(
        &mut out,
        "enlight_peak_window_seconds",
        "gauge",
        "The window of the enlight_io_peak_* gauges (peak_window_secs): set it to at least the longest scrape interval.",
    );
    out.push_str("enlight_peak_window_seconds ");
    push_f64_line(&mut out, window.as_secs_f64());
    header(
        &mut out,
        "enlight_collector_interval_seconds",
        "gauge",
        "Time between the last two collector reads: the resolution of the peak rates.",
    );
    out.push_str("enlight_collector_interval_seconds ");
    push_f64_line(&mut out, state.interval.as_secs_f64());

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
        for (d, dev) in with_prefix() {
            for (op, f) in &d.ops {
                open_series(&mut out, name, dev, &[("op", &op_name(*op))]);
                let _ = writeln!(out, "{}", value(f));
            }
        }
    }

    header(
        &mut out,
        "enlight_interrupts_total",
        "counter",
        "Host-to-guest signals (interrupts) sent.",
    );
    for (d, dev) in with_prefix() {
        open_series(&mut out, "enlight_interrupts_total", dev, &[]);
        let _ = writeln!(out, "{}", d.events.interrupts);
    }
    header(
        &mut out,
        "enlight_traps_total",
        "counter",
        "Register accesses an emulated device trapped to its device model (0 for synthetic devices).",
    );
    for (d, dev) in with_prefix() {
        open_series(&mut out, "enlight_traps_total", dev, &[]);
        let _ = writeln!(out, "{}", d.traps);
    }
    header(
        &mut out,
        "enlight_settings_changes_total",
        "counter",
        "Settings changes applied through the device's control socket, by knob (settings_change probe).",
    );
    for (d, dev) in with_prefix() {
        // Only the knobs the device has (an emulated device has none).
        for knob in enlight_driver::settings::Knob::ALL
            .into_iter()
            .filter(|k| crate::knobs::has(&d.knobs, k.name()))
        {
            let v = d.settings_changes.get(&(knob as u32)).copied().unwrap_or(0);
            open_series(
                &mut out,
                "enlight_settings_changes_total",
                dev,
                &[("knob", knob.name())],
            );
            let _ = writeln!(out, "{v}");
        }
    }
    header(
        &mut out,
        "enlight_doorbells_total",
        "counter",
        "Guest-to-host signals (doorbells) sent.",
    );
    for (d, dev) in with_prefix() {
        open_series(&mut out, "enlight_doorbells_total", dev, &[]);
        let _ = writeln!(out, "{}", d.events.doorbells);
    }
    header(
        &mut out,
        "enlight_ring_full_total",
        "counter",
        "Writes that found the ring full and blocked on pending_send_sz.",
    );
    for (d, dev) in with_prefix() {
        for (dir, v) in [
            ("out", d.events.ring_full_out),
            ("in", d.events.ring_full_in),
        ] {
            open_series(
                &mut out,
                "enlight_ring_full_total",
                dev,
                &[("direction", dir)],
            );
            let _ = writeln!(out, "{v}");
        }
    }
    header(
        &mut out,
        "enlight_interrupt_mask_changes_total",
        "counter",
        "Guest interrupt_mask changes (entering and leaving polling).",
    );
    for (d, dev) in with_prefix() {
        for (st, v) in [
            ("masked", d.events.irq_masked),
            ("unmasked", d.events.irq_unmasked),
        ] {
            open_series(
                &mut out,
                "enlight_interrupt_mask_changes_total",
                dev,
                &[("state", st)],
            );
            let _ = writeln!(out, "{v}");
        }
    }

    header(
        &mut out,
        "enlight_ring_size_bytes",
        "gauge",
        "Ring data area per direction.",
    );
    // The settings gauges: only for knobs the device has (its control socket's).
    for (d, dev) in with_prefix() {
        let s = &d.record.settings;
        for (dir, knob, v) in [
            ("out", "ring_out_bytes", s.ring_out_bytes),
            ("in", "ring_in_bytes", s.ring_in_bytes),
        ] {
            if !crate::knobs::has(&d.knobs, knob) {
                continue;
            }
            open_series(
                &mut out,
                "enlight_ring_size_bytes",
                dev,
                &[("direction", dir)],
            );
            let _ = writeln!(out, "{v}");
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
        for (d, dev) in
            with_prefix().filter(|(d, _)| crate::knobs::has(&d.knobs, &name["enlight_".len()..]))
        {
            open_series(&mut out, name, dev, &[]);
            let _ = writeln!(out, "{}", value(&d.record.settings));
        }
    }
    header(
        &mut out,
        "enlight_device_info",
        "gauge",
        "Known devices (1); present=\"false\" for a vanished device still in its grace period.",
    );
    for (d, dev) in with_prefix() {
        let pid = d.record.pid.to_string();
        open_series(
            &mut out,
            "enlight_device_info",
            dev,
            &[
                ("type", &d.record.device),
                ("pid", &pid),
                ("present", if d.present { "true" } else { "false" }),
            ],
        );
        out.push_str("1\n");
    }

    header(
        &mut out,
        "enlight_probe_attached",
        "gauge",
        "Whether the probe is attached to the device's process (1) or not (0).",
    );
    // Kernel devices have no USDT probes: the kernel probes' lines follow, once each.
    for (d, dev) in with_prefix().filter(|(d, _)| d.kernel.is_none()) {
        for (probe, _) in enlight_probes::PROGRAMS {
            let attached = d.attached && d.sites_by_probe.get(probe).copied().unwrap_or(0) > 0;
            open_series(
                &mut out,
                "enlight_probe_attached",
                dev,
                &[
                    ("probe", probe),
                    ("state", if attached { "attached" } else { "detached" }),
                ],
            );
            let _ = writeln!(out, "{}", attached as u8);
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
        open_series(
            &mut out,
            "enlight_probe_events_lost_total",
            "",
            &[("reason", reason)],
        );
        let _ = writeln!(out, "{v}");
    }
    header(
        &mut out,
        "enlight_errors_total",
        "counter",
        "Errors of the daemon, by kind.",
    );
    for kind in ERROR_KINDS {
        let v = state.errors.get(kind).copied().unwrap_or(0);
        open_series(&mut out, "enlight_errors_total", "", &[("kind", kind)]);
        let _ = writeln!(out, "{v}");
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
    out.push_str("enlight_collector_tick_seconds ");
    push_f64_line(&mut out, state.last_tick.as_secs_f64());
    crate::selfcost::render_metrics(&mut out, &state.self_cost);
    // The driver label of kernel devices, and the kernel-only families.
    crate::kernel::metrics::finish(&mut out, state);
    crate::knobs::render_metrics(&mut out, state);
    out
}

#[cfg(test)]
#[path = "metrics_reference.rs"]
mod reference;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::collector::tests::{io, record, FakeProbes};
    use crate::collector::Collector;
    use enlight_driver::registry::Registration;
    use enlight_probes::IoKey;
    use std::time::Duration;

    fn state_with_device() -> (
        State,
        tempfile::TempDir,
        Registration,
        enlight_driver::control::ControlServer,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let fake = FakeProbes::default();
        let mut r = record("disk\"0", me);
        r.name = "disk_0".into();
        r.kind = "synth\"etic".into(); // exercises label escaping
                                       // A real control socket: the device's knobs (and so its settings gauges) come from it.
        let socket = dir.path().join("control/disk_0.sock");
        let knobs = std::sync::Arc::new(
            enlight_driver::nic::NicKnobs::new(&r.settings).expect("valid settings"),
        );
        let server =
            enlight_driver::control::ControlServer::start(&socket, knobs, 0, None).unwrap();
        r.control = Some(socket);
        let reg = Registration::register(dir.path(), &r).unwrap();
        fake.snapshot.lock().unwrap().settings_changes.insert(
            enlight_probes::KnobKey {
                pid: me,
                dev: 0,
                knob: 4,
            },
            3,
        );
        fake.snapshot.lock().unwrap().io.insert(
            IoKey {
                pid: me,
                dev: 0,
                op: 0,
            },
            io(10, &[(800, 2), (3_000, 5), (2_000_000, 3)]),
        );
        let mut c = Collector::new(fake, dir.path().into(), Duration::from_secs(60));
        let mut state = State::default();
        c.tick(&mut state);
        (state, dir, reg, server)
    }

    #[test]
    fn histogram_is_cumulative_and_complete() {
        let (state, _dir, _reg, _server) = state_with_device();
        let text = render(&state);
        let bucket = |le: &str| -> u64 {
            let needle = format!("op=\"read\",le=\"{le}\"}} ");
            let line = text
                .lines()
                .find(|l| l.starts_with("enlight_io_latency_seconds_bucket") && l.contains(&needle))
                .unwrap();
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(bucket("0.000001"), 2);
        assert_eq!(bucket("0.000005"), 7);
        assert_eq!(bucket("0.0025"), 10);
        assert_eq!(bucket("+Inf"), 10);
        let mut last = 0;
        for le in LATENCY_BUCKETS {
            let v = bucket(&fmt_f64(le));
            assert!(v >= last);
            last = v;
        }
        assert!(text.contains("kind=\"synth\\\"etic\""), "label escaping");
        assert!(text.contains(
            "enlight_io_ops_total{device=\"disk_0\",kind=\"synth\\\"etic\",op=\"read\"} 10"
        ));
        assert!(text.contains("enlight_errors_total{kind=\"attach\"} 0"));
        assert!(text.contains(
            "enlight_settings_changes_total{device=\"disk_0\",kind=\"synth\\\"etic\",knob=\"poll_budget\"} 3"
        ));
        assert!(text.contains(
            "enlight_settings_changes_total{device=\"disk_0\",kind=\"synth\\\"etic\",knob=\"ring_out_bytes\"} 0"
        ));
        assert!(text.contains(
            "enlight_probe_attached{device=\"disk_0\",kind=\"synth\\\"etic\",probe=\"io_reap\",state=\"attached\"} 1"
        ));
    }

    #[test]
    fn label_values_are_escaped_exactly() {
        assert_eq!(escape(r"a\b"), r"a\\b");
        assert_eq!(escape("say \"hi\"\nbye"), r#"say \"hi\"\nbye"#);
        assert_eq!(
            labels(&[("device", "d\"0"), ("op", "read")]),
            r#"{device="d\"0",op="read"}"#
        );
        assert_eq!(fmt_f64(f64::INFINITY), "+Inf");
        assert_eq!(fmt_f64(2.5e-6), "0.0000025");
    }

    /// A fleet of `n` registry devices as the collector leaves them: two or three ops each
    /// with `buckets` latency buckets spread over 2 µs..20 ms, peaks, signalling counters,
    /// the synthetic devices' knobs; some vanished, detached, emulated (no knobs), some with
    /// names and kinds that need escaping.
    pub(crate) fn fleet(n: usize, buckets: usize) -> State {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(n as u64 * 1000 + buckets as u64);
        let mut state = State::default();
        let t0 = std::time::Instant::now();
        let limits = enlight_driver::control::Limits::synthetic();
        for i in 0..n {
            let mut r = crate::collector::tests::record(&format!("disk{i}"), 1000 + i as u32);
            if i % 7 == 3 {
                r.name = format!("odd\\\"{i}\n");
                r.kind = "synth\"etic".into();
            }
            let mut d = crate::model::DeviceState::new(r);
            d.present = i % 11 != 5;
            d.attached = i % 13 != 6;
            for (p, _) in enlight_probes::PROGRAMS {
                d.sites_by_probe.insert(p.to_string(), rng.gen_range(0..3));
            }
            if i % 5 != 4 {
                d.knobs = crate::knobs::synthetic(&d.record.settings, &limits);
            } else {
                d.record.kind = "emulated".into();
                d.traps = rng.gen();
            }
            let ops: &[u32] = if i % 2 == 0 { &[0, 1] } else { &[0, 1, 2] };
            for &op in ops {
                let mut f = crate::model::OpFigures::default();
                for _ in 0..buckets {
                    let lat = rng.gen_range(2_000u64..20_000_000);
                    *f.buckets
                        .entry(enlight_probes::hist::bucket_index(lat))
                        .or_default() += rng.gen_range(1..1000);
                }
                f.ops = f.buckets.values().sum();
                f.bytes = f.ops * 4096;
                f.errors = rng.gen_range(0..3);
                f.latency_sum_ns = rng.gen_range(0..1 << 50);
                f.ops_per_sec = rng.gen_range(0.0..100.0);
                let peaks = d.peaks.entry(op).or_default();
                for s in 0..5 {
                    peaks.push(
                        t0 - Duration::from_secs(5 - s),
                        rng.gen_range(0.0..5e4),
                        f.buckets.keys().next().copied(),
                        Duration::from_secs(60),
                    );
                }
                d.ops.insert(op, f);
            }
            d.events.interrupts = rng.gen();
            d.events.doorbells = rng.gen();
            d.events.ring_full_out = rng.gen();
            d.events.irq_masked = rng.gen();
            d.settings_changes
                .insert(rng.gen_range(0..5), rng.gen_range(0..9));
            state.devices.insert(d.record.name.clone(), d);
        }
        state.peak_window = Duration::from_secs(60);
        state.interval = Duration::from_millis(1003);
        state.last_tick = Duration::from_micros(1234);
        state.ticks = 42;
        state.health.events_lost = 3;
        state.errors.insert("attach", 2);
        state
    }

    /// The fast render writes exactly what the plain one did, byte for byte, for fleets of
    /// every shape, with the kernel's devices and without.
    #[test]
    fn render_equals_the_plain_reference_byte_for_byte() {
        assert_eq!(
            render(&State::default()),
            reference::render(&State::default())
        );
        for (n, buckets) in [(1, 0), (1, 1), (3, 40), (16, 200), (64, 300)] {
            let state = fleet(n, buckets);
            let (fast, plain) = (render(&state), reference::render(&state));
            if fast != plain {
                let at = fast.lines().zip(plain.lines()).position(|(a, b)| a != b);
                panic!(
                    "{n} devices, {buckets} buckets: first difference at line {at:?}: {:?}",
                    at.map(|i| (fast.lines().nth(i), plain.lines().nth(i)))
                );
            }
        }
        let (mut state, _dir, _reg, _server) = state_with_device();
        // A kernel device too: its lines get the driver label, its synthetic settings go.
        let dir = tempfile::tempdir().unwrap();
        crate::kernel::collector::tests::fake_sysfs(dir.path(), "loop3");
        let mut k = crate::kernel::collector::KernelCollector::new(
            Ok(crate::kernel::collector::tests::FakeKernel::default()),
            dir.path().into(),
            Duration::from_secs(30),
            crate::kernel::collector::KernelOptions::default(),
        );
        k.tick(&mut state);
        assert!(state.devices.values().any(|d| d.kernel.is_some()));
        assert_eq!(render(&state), reference::render(&state));
    }

    /// Debian's promtool, a parser nobody here wrote, accepts the exposition.
    #[test]
    fn promtool_accepts_the_exposition() {
        let (state, _dir, _reg, _server) = state_with_device();
        crate::testing::promtool_check(&render(&state));
        crate::testing::promtool_check(&render(&State::default()));
    }

    /// A device shows the knobs it has and no other: the synthetic one its control socket's
    /// five (values and limits from the device), an emulated one (no control socket) none.
    #[test]
    fn settings_gauges_only_for_knobs_a_device_has() {
        let (mut state, dir, _reg, _server) = state_with_device();
        let text = render(&state);
        assert!(text.contains(
            "enlight_knob_value{device=\"disk_0\",kind=\"synth\\\"etic\",knob=\"moderation_frames\",unit=\"frames\",source=\"control-socket\",disruption=\"live\"} 8"
        ), "{text}");
        assert!(text.contains(
            "enlight_knob_limit{device=\"disk_0\",kind=\"synth\\\"etic\",knob=\"moderation_frames\",limit=\"max\"} 1024"
        ));
        let mut emu = record("emu0", std::process::id());
        emu.kind = "emulated".into();
        let _emu = Registration::register(dir.path(), &emu).unwrap();
        let mut c = Collector::new(
            FakeProbes::default(),
            dir.path().into(),
            Duration::from_secs(60),
        );
        c.tick(&mut state);
        let text = render(&state);
        assert!(state.devices["emu0"].knobs.is_empty());
        assert!(!state.devices["disk_0"].knobs.is_empty());
        for line in text.lines().filter(|l| l.contains("device=\"emu0\"")) {
            assert!(
                ![
                    "enlight_knob",
                    "enlight_ring_size",
                    "enlight_moderation",
                    "enlight_poll_budget",
                    "enlight_settings_changes"
                ]
                .iter()
                .any(|f| line.starts_with(f)),
                "an emulated device has no knobs: {line}"
            );
        }
        assert!(text.contains("enlight_moderation_frames{device=\"disk_0\""));
        let view = crate::api::device_view(&state.devices["emu0"]);
        assert!(view.settings.is_none() && view.knobs.is_empty());
        crate::testing::promtool_check(&text);
    }
}
