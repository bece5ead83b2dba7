//! The Prometheus exposition of the shared model, built through the `prometheus` crate
//! ([`crate::exposition`]): one source per part of the model, each setting every label where it
//! builds the sample —
//!
//! - [`devices`]: every device, registry and kernel (I/O, peaks, signalling, settings, device
//!   info, knobs);
//! - [`crate::kernel::metrics`]: the kernel probes and the kernel-only families;
//! - [`health`]: the daemon's own (lost events, errors, ticks, what it costs);
//! - the tuner's ([`crate::tuner::TunerShared::families`]), added per scrape (see
//!   [`crate::scrape`]).
//!
//! Base units (`_seconds`, `_bytes`), `_total` counters, labels `device`, `kind` (and `driver`
//! for a kernel device), `op`. Series are written in a stable order: the families in the order
//! below, each family's devices by name. The latency histogram's `le` buckets are fixed; a
//! kernel bucket counts toward `le` when its upper bound is at most `le`, so a cumulative count
//! can be short by the completions of the single kernel bucket straddling `le` (at most 1/128
//! of it in latency terms).
//!
//! What changed from the hand-written exposition (kept as `metrics/reference.rs`, the tests'
//! oracle), all from the crate's text encoder: a family with no series is left out instead of
//! written as a bare `# HELP`/`# TYPE` pair (the encoder refuses empty families; a scraper reads
//! nothing from them either way), and values are written from `f64`, so a counter beyond 2^53
//! is written as the shortest decimal of its nearest `f64` (18446744073709551615 becomes
//! 18446744073709552000; Prometheus stores every sample as a float64 anyway).
//! Two more would show only with values none of the families has: an infinite value is written
//! `inf` (Rust's spelling, which Prometheus's parser reads; it was `+Inf`), and a `\` or newline
//! in a HELP text is escaped.

pub mod devices;
pub mod health;

use crate::exposition::Exposition;
use crate::model::State;

/// Upper bounds of `enlight_io_latency_seconds`, in seconds.
pub const LATENCY_BUCKETS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every source's families, in the exposition's order (the tuner's aside).
pub fn exposition(state: &State) -> Exposition {
    let mut out = Exposition::default();
    devices::families(state, &mut out);
    // After the registry devices' lines of enlight_probe_attached, in the same family.
    crate::kernel::metrics::probe_families(state, &mut out);
    health::families(state, &mut out);
    crate::kernel::metrics::families(state, &mut out);
    devices::knob_families(state, &mut out);
    out
}

/// The exposition in the Prometheus text format (without the tuner's families).
pub fn render(state: &State) -> String {
    exposition(state).text()
}

#[cfg(test)]
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
            let v = bucket(&le.to_string());
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

    /// Adds a kernel device (loop3, from a fake sysfs) to `state`.
    fn add_a_kernel_device(state: &mut State) {
        let dir = tempfile::tempdir().unwrap();
        crate::kernel::collector::tests::fake_sysfs(dir.path(), "loop3");
        let mut k = crate::kernel::collector::KernelCollector::new(
            Ok(crate::kernel::collector::tests::FakeKernel::default()),
            dir.path().into(),
            Duration::from_secs(30),
            crate::kernel::collector::KernelOptions::default(),
        );
        k.tick(state);
    }

    /// The hand-written exposition with the crate's encoder's two differences applied (see the
    /// module's doc): families without a series left out, and integer values written as the
    /// `f64` they become (the same digits below 2^53).
    fn as_the_encoder_writes(hand: &str) -> String {
        let mut out = String::with_capacity(hand.len());
        let lines: Vec<&str> = hand.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let l = lines[i];
            if l.starts_with("# HELP ") {
                let name = l.split(' ').nth(2).unwrap();
                let has_series = lines
                    .get(i + 2)
                    .is_some_and(|n| !n.starts_with('#') && n.starts_with(name));
                if !has_series {
                    i += 2;
                    continue;
                }
            } else if !l.starts_with('#') {
                let (series, value) = l.rsplit_once(' ').unwrap();
                if let Ok(v) = value.parse::<u64>() {
                    out.push_str(series);
                    out.push(' ');
                    out.push_str(&(v as f64).to_string());
                    out.push('\n');
                    i += 1;
                    continue;
                }
            }
            out.push_str(l);
            out.push('\n');
            i += 1;
        }
        out
    }

    fn assert_same(new: &str, old: &str, what: &str) {
        if new != old {
            let at = new.lines().zip(old.lines()).position(|(a, b)| a != b);
            panic!(
                "{what}: first difference at line {at:?}: {:?} ({} lines now, {} before)",
                at.map(|i| (new.lines().nth(i), old.lines().nth(i))),
                new.lines().count(),
                old.lines().count()
            );
        }
    }

    /// Through the crate, the exposition is what the hand-written one was, byte for byte, but
    /// for the encoder's two differences: for fleets of every shape (names and kinds that need
    /// escaping, counters beyond 2^53), with the kernel's devices and without.
    #[test]
    fn render_equals_the_hand_written_exposition_but_for_the_encoders_differences() {
        assert_same(
            &render(&State::default()),
            &as_the_encoder_writes(&reference::render(&State::default())),
            "no devices",
        );
        for (n, buckets) in [(1, 0), (1, 1), (3, 40), (16, 200), (64, 300)] {
            let state = fleet(n, buckets);
            let plain = reference::render(&state);
            // The fleet's random counters are beyond 2^53: they are rounded.
            assert_ne!(plain, as_the_encoder_writes(&plain));
            assert_same(
                &render(&state),
                &as_the_encoder_writes(&plain),
                &format!("{n} devices, {buckets} buckets"),
            );
        }
        let (mut state, _dir, _reg, _server) = state_with_device();
        // A kernel device too: its lines carry the driver label, it has no synthetic settings.
        add_a_kernel_device(&mut state);
        assert!(state.devices.values().any(|d| d.kernel.is_some()));
        let plain = reference::render(&state);
        // Nothing to round here: only the empty families go.
        assert!(plain.contains("# TYPE enlight_kvm_exits_total counter\n#"));
        assert_same(
            &render(&state),
            &as_the_encoder_writes(&plain),
            "with a kernel device",
        );
    }

    /// Every sample of the families, as a parser reads them: `(name, labels sorted, value)`.
    fn samples(e: &Exposition) -> Vec<crate::testing::Sample> {
        use prometheus::proto::MetricType;
        let mut out = Vec::new();
        for f in e.families() {
            for m in f.get_metric() {
                let mut push = |suffix: &str, extra: Option<(&str, String)>, v: f64| {
                    let mut l: Vec<(String, String)> = m
                        .get_label()
                        .iter()
                        .map(|l| (l.name().to_string(), l.value().to_string()))
                        .collect();
                    l.extend(extra.map(|(k, v)| (k.to_string(), v)));
                    l.sort();
                    out.push((format!("{}{suffix}", f.name()), l, v));
                };
                match f.get_field_type() {
                    MetricType::COUNTER => push("", None, m.get_counter().get_value()),
                    MetricType::GAUGE => push("", None, m.get_gauge().get_value()),
                    MetricType::HISTOGRAM => {
                        let h = m.get_histogram();
                        for b in h.get_bucket() {
                            push(
                                "_bucket",
                                Some(("le", b.upper_bound().to_string())),
                                b.cumulative_count() as f64,
                            );
                        }
                        let n = h.get_sample_count() as f64;
                        push("_bucket", Some(("le", "+Inf".into())), n);
                        push("_sum", None, h.get_sample_sum());
                        push("_count", None, n);
                    }
                    t => panic!("{}: {t:?} is not built", f.name()),
                }
            }
        }
        out.sort_by(|a, b| a.partial_cmp(b).unwrap());
        out
    }

    /// A strict OpenMetrics parser (python3-prometheus-client's) reads the OpenMetrics
    /// exposition, and reads in it exactly the samples of the families (those of the text
    /// format): names and labels unchanged, counters' `_total` on their samples.
    #[test]
    fn an_openmetrics_parser_reads_the_same_samples() {
        let (mut state, _dir, _reg, _server) = state_with_device();
        add_a_kernel_device(&mut state);
        for state in [state, fleet(16, 200), State::default()] {
            let e = exposition(&state);
            let om = e.openmetrics();
            assert!(om.ends_with("\n# EOF\n"));
            assert!(om.contains("# TYPE enlight_errors counter\n"));
            assert!(!om.contains("_total counter"));
            if let Some(read) = crate::testing::openmetrics_check(&om) {
                let want = samples(&e);
                assert_eq!(read.len(), want.len());
                let diff: Vec<_> = read.iter().zip(&want).filter(|(a, b)| a != b).collect();
                assert!(diff.is_empty(), "read, built: {diff:?}");
            }
        }
    }

    /// The OpenMetrics check fails on what the specification forbids and the text format
    /// allows: no `# EOF`, a counter family named `_total`, a counter's sample without it.
    #[test]
    fn the_openmetrics_check_refuses_what_the_specification_forbids() {
        if crate::testing::openmetrics_check("# TYPE a counter\na_total 1\n# EOF\n").is_none() {
            return; // skipped, loudly
        }
        for bad in [
            "# TYPE a counter\na_total 1\n",
            "# TYPE a_total counter\na_total 1\n# EOF\n",
            "# TYPE a counter\na 1\n# EOF\n",
        ] {
            let refused = std::panic::catch_unwind(|| crate::testing::openmetrics_check(bad));
            assert!(refused.is_err(), "accepted {bad:?}");
        }
    }

    /// A kernel device's series, wherever they are built, carry its driver; it has no
    /// synthetic settings.
    #[test]
    fn kernel_devices_carry_a_driver_label_and_no_synthetic_settings() {
        let dir = tempfile::tempdir().unwrap();
        crate::kernel::collector::tests::fake_sysfs(dir.path(), "loop3");
        let fake = crate::kernel::collector::tests::FakeKernel::default();
        fake.snap.lock().unwrap().disks.insert(
            enlight_probes::kernel::BlockKey {
                dev: enlight_probes::kernel::make_dev(7, 3),
                op: 1,
            },
            crate::collector::tests::io(7, &[(20_000, 7)]),
        );
        let mut c = crate::kernel::collector::KernelCollector::new(
            Ok(fake),
            dir.path().into(),
            Duration::from_secs(30),
            crate::kernel::collector::KernelOptions::default(),
        );
        let mut state = State::default();
        c.tick(&mut state);
        let text = render(&state);
        assert!(
            text.contains(
                "enlight_io_ops_total{device=\"loop3\",kind=\"kernel\",driver=\"loop\",op=\"write\"} 7"
            ),
            "{text}"
        );
        assert!(text.contains(
            "enlight_kernel_block_queue_setting{device=\"loop3\",kind=\"kernel\",driver=\"loop\",knob=\"read_ahead_kb\"} 128"
        ));
        assert!(text.contains(
            "enlight_probe_attached{device=\"kernel\",kind=\"kernel\",probe=\"hyperv:vmbus_*\",state=\"absent\",reason=\"no hyperv tracepoints\"} 0"
        ));
        assert!(!text.contains("enlight_ring_size_bytes{device=\"loop3\""));
        assert!(!text.contains("enlight_moderation_frames{device=\"loop3\""));
        for line in text.lines().filter(|l| l.contains("device=\"loop3\"")) {
            assert!(line.contains("driver=\"loop\""), "{line}");
        }
        crate::testing::promtool_check(&text);
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

/// What rendering costs per tick, printed (no assertion: timings depend on the machine).
/// `cargo test --release -p enlightd --lib render_cost -- --ignored --nocapture`
#[cfg(test)]
mod cost {
    use super::*;
    use std::time::{Duration, Instant};

    fn median(mut f: impl FnMut() -> usize) -> (Duration, usize) {
        let mut times = Vec::new();
        let mut len = 0;
        for _ in 0..31 {
            let t = Instant::now();
            len = std::hint::black_box(f());
            times.push(t.elapsed());
        }
        times.sort();
        (times[times.len() / 2], len)
    }

    #[test]
    #[ignore = "prints timings; run in release"]
    fn render_cost() {
        for n in [16, 64, 256] {
            let state = tests::fleet(n, 300);
            let e = exposition(&state);
            let (build, series) = median(|| exposition(&state).series());
            let (text, bytes) = median(|| e.text().len());
            let (om, om_bytes) = median(|| e.openmetrics().len());
            let (hand, hand_bytes) = median(|| reference::render(&state).len());
            println!(
                "{n} devices, {series} series: families {build:?}, text {text:?} ({bytes} B), \
                 OpenMetrics {om:?} ({om_bytes} B); the hand-written plain renderer {hand:?} \
                 ({hand_bytes} B)"
            );
        }
    }
}
