//! The exposition as enlightd wrote it by hand before it was built through the `prometheus`
//! crate (issue 15): the plain renderer of issue 17 and the parts it called (the self-cost,
//! kernel and knob families, and `finish`, which put the `driver` label into already-written
//! lines), kept verbatim as the oracle the new exposition is compared with
//! (`metrics::tests::render_equals_the_hand_written_exposition_but_for_the_encoders_differences`).
//! Dashboards and rules depend on every name, label and bucket.

#![allow(clippy::all)]

use std::fmt::Write;

use super::LATENCY_BUCKETS;
use crate::model::{op_name, State, ERROR_KINDS};

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
                ("kind", d.record.kind.as_str()),
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
                ("kind", d.record.kind.as_str()),
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
                    ("kind", d.record.kind.as_str()),
                    ("op", &op),
                ]);
                let _ = writeln!(out, "{name}{l} {}", value(f));
            }
        }
    }

    let dev_labels = |d: &crate::model::DeviceState| {
        labels(&[("device", &d.record.name), ("kind", d.record.kind.as_str())])
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
                ("kind", d.record.kind.as_str()),
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
                ("kind", d.record.kind.as_str()),
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
                ("kind", d.record.kind.as_str()),
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
                ("kind", d.record.kind.as_str()),
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
            ("kind", d.record.kind.as_str()),
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
                ("kind", d.record.kind.as_str()),
                ("probe", probe),
                ("state", if attached { "attached" } else { "detached" }),
            ]);
            let _ = writeln!(out, "enlight_probe_attached{l} {}", attached as u8);
        }
    }
    probe_attached_lines(&mut out, state);
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
    selfcost_render_metrics(&mut out, &state.self_cost);
    // The driver label of kernel devices, and the kernel-only families.
    finish(&mut out, state);
    knobs_render_metrics(&mut out, state);
    out
}

// From selfcost.rs.

/// The self-cost families of /metrics: `enlight_bpf_stats_enabled`,
/// `enlight_bpf_program_runs_total`, `enlight_bpf_program_run_seconds_total`,
/// `enlight_bpf_program_info` (the program's kernel id), `process_cpu_seconds_total` and
/// `process_resident_memory_bytes` (the names Prometheus client libraries give a process's own
/// figures).
fn selfcost_render_metrics(out: &mut String, cost: &crate::selfcost::SelfCost) {
    use std::fmt::Write;
    let mut family = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for l in lines {
            let _ = writeln!(out, "{l}");
        }
    };
    family(
        "enlight_bpf_stats_enabled",
        "gauge",
        "1 while enlightd holds the kernel's BPF run-time statistics on (BPF_ENABLE_STATS; needs CAP_SYS_ADMIN): without them the program run counts and times stand still.",
        vec![format!("enlight_bpf_stats_enabled {}", cost.bpf_stats_enabled as u8)],
    );
    let per_program = |f: &dyn Fn(&crate::selfcost::ProgramCost) -> String| -> Vec<String> {
        cost.programs.values().map(f).collect()
    };
    let label = |p: &crate::selfcost::ProgramCost| format!("program=\"{}\"", escape(&p.program));
    family(
        "enlight_bpf_program_runs_total",
        "counter",
        "Runs of each of enlightd's eBPF programs, as the kernel counts them (bpftool prog show: run_cnt).",
        per_program(&|p| format!("enlight_bpf_program_runs_total{{{}}} {}", label(p), p.runs_total)),
    );
    family(
        "enlight_bpf_program_run_seconds_total",
        "counter",
        "Time spent in each of enlightd's eBPF programs, as the kernel counts it (bpftool prog show: run_time_ns).",
        per_program(&|p| {
            format!(
                "enlight_bpf_program_run_seconds_total{{{}}} {}",
                label(p),
                p.run_seconds_total
            )
        }),
    );
    family(
        "enlight_bpf_program_info",
        "gauge",
        "enlightd's eBPF programs (1), with the kernel's id of each (bpftool prog show id ID).",
        per_program(&|p| format!("enlight_bpf_program_info{{{},id=\"{}\"}} 1", label(p), p.id)),
    );
    family(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time enlightd spent, in seconds.",
        vec![format!(
            "process_cpu_seconds_total {}",
            cost.process.cpu_seconds_total
        )],
    );
    family(
        "process_resident_memory_bytes",
        "gauge",
        "enlightd's resident memory, in bytes.",
        vec![format!(
            "process_resident_memory_bytes {}",
            cost.process.resident_bytes
        )],
    );
}

// From kernel/metrics.rs.

/// Lines of `enlight_probe_attached` for the kernel probes (inside that family's block):
/// `{device="kernel",kind="kernel",probe="block:block_rq_complete",state="attached"}`, 0 with the
/// reason when a probe is not attached. A kernel probe serves every kernel device, so its
/// `device` label is `kernel` (the alert and the panels group by device: an empty label read
/// "probes of  detached"); `state` tells a tracepoint this kernel lacks (`absent`, never an
/// alert) from one that failed to attach (`detached`).
fn probe_attached_lines(out: &mut String, state: &State) {
    for p in &state.kernel.probes {
        let mut l = vec![
            ("device", "kernel"),
            ("kind", "kernel"),
            ("probe", p.probe.as_str()),
            ("state", p.state.name()),
        ];
        if let Some(r) = &p.reason {
            l.push(("reason", r.as_str()));
        }
        let _ = writeln!(
            out,
            "enlight_probe_attached{} {}",
            labels(&l),
            p.attached as u8
        );
    }
}

/// Families the settings gauges of registry devices live in; a kernel device has none of those
/// knobs (its own are in `enlight_kernel_*`), so its lines there are dropped.
const SYNTHETIC_SETTINGS: [&str; 4] = [
    "enlight_ring_size_bytes{",
    "enlight_moderation_frames{",
    "enlight_moderation_usecs{",
    "enlight_poll_budget{",
];

/// Finishes an exposition: adds `driver="..."` after `kind="kernel"` on every series of a kernel
/// device (every per-device series starts `device="..",kind=".."`), drops the synthetic-settings
/// lines of kernel devices, and appends the kernel-only families.
fn finish(out: &mut String, state: &State) {
    let kernel: Vec<(String, String)> = state
        .devices
        .values()
        .filter_map(|d| {
            d.kernel.as_ref().map(|k| {
                (
                    format!("{{device=\"{}\",kind=\"kernel\"", escape(&d.record.name)),
                    format!(
                        "{{device=\"{}\",kind=\"kernel\",driver=\"{}\"",
                        escape(&d.record.name),
                        escape(&k.driver)
                    ),
                )
            })
        })
        .collect();
    if !kernel.is_empty() {
        let mut rewritten = String::with_capacity(out.len() + 64 * kernel.len());
        for line in out.lines() {
            // Every line is looked at, once per render (every tick): only a kernel device's
            // lines are copied into a string of their own.
            if let Some((from, to)) = kernel.iter().find(|(from, _)| line.contains(from.as_str())) {
                if SYNTHETIC_SETTINGS.iter().any(|m| line.starts_with(m)) {
                    continue;
                }
                rewritten.push_str(&line.replacen(from.as_str(), to, 1));
            } else {
                rewritten.push_str(line);
            }
            rewritten.push('\n');
        }
        *out = rewritten;
    }
    render_kernel(out, state);
}

fn render_kernel(out: &mut String, state: &State) {
    let kernel_devices = || state.devices.values().filter(|d| d.kernel.is_some());
    let id = |d: &crate::model::DeviceState| {
        let k = d.kernel.as_ref().expect("filtered");
        vec![
            ("device", d.record.name.clone()),
            ("kind", "kernel".to_string()),
            ("driver", k.driver.clone()),
        ]
    };
    let with = |base: &[(&'static str, String)], extra: &[(&'static str, &str)]| {
        let mut v: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
        v.extend_from_slice(extra);
        labels(&v)
    };

    header(
        out,
        "enlight_kernel_device_info",
        "gauge",
        "Kernel devices found in sysfs: driver, whether it is paravirtual, emulated or virtual, and queues (always 1).",
    );
    for d in kernel_devices() {
        let k = d.kernel.as_ref().expect("filtered");
        let queues = k.queues.to_string();
        let _ = writeln!(
            out,
            "enlight_kernel_device_info{} 1",
            with(
                &id(d),
                &[
                    ("class", k.class.name()),
                    ("queues", &queues),
                    ("type", &d.record.device)
                ]
            )
        );
    }

    type Napi = fn(&crate::kernel::KernelInfo) -> u64;
    let napi: [(&str, &str, Napi); 3] = [
        (
            "enlight_napi_polls_total",
            "NAPI polls of the NIC's queues.",
            |k| k.napi_polls,
        ),
        (
            "enlight_napi_packets_total",
            "Packets the NIC's NAPI polls handled.",
            |k| k.napi_packets,
        ),
        (
            "enlight_napi_budget_exhausted_total",
            "NAPI polls that used their whole budget (the queue stays in polling).",
            |k| k.napi_budget_exhausted,
        ),
    ];
    for (name, help, value) in napi {
        header(out, name, "counter", help);
        for d in kernel_devices().filter(|d| d.record.device == "nic") {
            let _ = writeln!(
                out,
                "{name}{} {}",
                with(&id(d), &[]),
                value(d.kernel.as_ref().expect("filtered"))
            );
        }
    }

    header(
        out,
        "enlight_kernel_ring_entries",
        "gauge",
        "NIC ring size in descriptors (ethtool -g), per direction; limit=\"max\" is the driver's maximum.",
    );
    for d in kernel_devices() {
        if let Some(r) = d.kernel.as_ref().and_then(|k| k.nic).and_then(|n| n.rings) {
            for (dir, cur, max) in [("rx", r.rx, r.rx_max), ("tx", r.tx, r.tx_max)] {
                let _ = writeln!(
                    out,
                    "enlight_kernel_ring_entries{} {cur}",
                    with(&id(d), &[("direction", dir), ("limit", "current")])
                );
                let _ = writeln!(
                    out,
                    "enlight_kernel_ring_entries{} {max}",
                    with(&id(d), &[("direction", dir), ("limit", "max")])
                );
            }
        }
    }
    type Co = fn(&crate::kernel::ethtool::Coalesce) -> [(&'static str, Option<u32>); 2];
    let coalesce: [(&str, &str, Co); 3] = [
        (
            "enlight_kernel_coalesce_usecs",
            "NIC interrupt coalescing: microseconds (ethtool -c), per direction.",
            |c| [("rx", c.rx_usecs), ("tx", c.tx_usecs)],
        ),
        (
            "enlight_kernel_coalesce_frames",
            "NIC interrupt coalescing: frames (ethtool -c), per direction.",
            |c| [("rx", c.rx_frames), ("tx", c.tx_frames)],
        ),
        (
            "enlight_kernel_coalesce_adaptive",
            "NIC adaptive coalescing on (1) or off (0), per direction.",
            |c| {
                [
                    ("rx", c.adaptive_rx.map(u32::from)),
                    ("tx", c.adaptive_tx.map(u32::from)),
                ]
            },
        ),
    ];
    for (name, help, value) in coalesce {
        header(out, name, "gauge", help);
        for d in kernel_devices() {
            if let Some(c) = d
                .kernel
                .as_ref()
                .and_then(|k| k.nic)
                .and_then(|n| n.coalesce)
            {
                for (dir, v) in value(&c) {
                    if let Some(v) = v {
                        let _ = writeln!(out, "{name}{} {v}", with(&id(d), &[("direction", dir)]));
                    }
                }
            }
        }
    }
    header(
        out,
        "enlight_kernel_block_queue_setting",
        "gauge",
        "Block queue settings from sysfs (/sys/block/<disk>/queue/<knob>).",
    );
    for d in kernel_devices() {
        for (knob, v) in &d.kernel.as_ref().expect("filtered").block_queue {
            let _ = writeln!(
                out,
                "enlight_kernel_block_queue_setting{} {v}",
                with(&id(d), &[("knob", knob)])
            );
        }
    }

    header(
        out,
        "enlight_kvm_exits_total",
        "counter",
        "KVM exits (kvm:kvm_exit) of the process serving a device, by reason.",
    );
    for d in state
        .devices
        .values()
        .filter(|d| d.kernel.is_none() && d.record.pid != 0)
    {
        if let Some(reasons) = state.kernel.kvm_exits.get(&d.record.pid) {
            for (reason, n) in reasons {
                let l = labels(&[
                    ("device", &d.record.name),
                    ("kind", d.record.kind.as_str()),
                    ("reason", reason),
                ]);
                let _ = writeln!(out, "enlight_kvm_exits_total{l} {n}");
            }
        }
    }
    for (name, help, counts) in [
        (
            "enlight_kvm_pio_total",
            "Port I/O exits (kvm:kvm_pio) of the process serving a device.",
            &state.kernel.kvm_pio,
        ),
        (
            "enlight_kvm_mmio_total",
            "MMIO accesses (kvm:kvm_mmio) of the process serving a device.",
            &state.kernel.kvm_mmio,
        ),
    ] {
        header(out, name, "counter", help);
        for d in state
            .devices
            .values()
            .filter(|d| d.kernel.is_none() && d.record.pid != 0)
        {
            if let Some(n) = counts.get(&d.record.pid) {
                let l = labels(&[("device", &d.record.name), ("kind", d.record.kind.as_str())]);
                let _ = writeln!(out, "{name}{l} {n}");
            }
        }
    }
    header(
        out,
        "enlight_kernel_events_total",
        "counter",
        "Hits of kernel tracepoints counted as events (hyperv:vmbus_* where the kernel has them).",
    );
    for (event, n) in &state.kernel.events {
        let _ = writeln!(
            out,
            "enlight_kernel_events_total{} {n}",
            labels(&[("event", event)])
        );
    }
    header(
        out,
        "enlight_kernel_probe_trouble_total",
        "counter",
        "The kernel probes' own trouble: events lost to full maps, block completions never seen issued, program runs the kernel skipped (re-entered on one CPU).",
    );
    for (what, n) in [
        ("events_lost", state.kernel.events_lost),
        (
            "completion_without_issue",
            state.kernel.completions_without_issue,
        ),
    ] {
        let _ = writeln!(
            out,
            "enlight_kernel_probe_trouble_total{} {n}",
            labels(&[("what", what)])
        );
    }
}

// From knobs.rs.

/// `enlight_knob_value` (every knob a device has, with its unit, source and disruption) and
/// `enlight_knob_limit` (its min and max where the source says), after the rest of the
/// exposition.
fn knobs_render_metrics(out: &mut String, state: &crate::model::State) {
    let labels = |pairs: &[(&str, &str)]| {
        let inner: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        format!("{{{}}}", inner.join(","))
    };
    let id = |d: &crate::model::DeviceState| {
        let mut v = vec![
            ("device", d.record.name.clone()),
            ("kind", d.record.kind.to_string()),
        ];
        if let Some(k) = &d.kernel {
            v.push(("driver", k.driver.clone()));
        }
        v
    };
    let _ = writeln!(
        out,
        "# HELP enlight_knob_value A knob the device really has, its value read from its source (a choice knob: the index of its choice)."
    );
    let _ = writeln!(out, "# TYPE enlight_knob_value gauge");
    for d in state.devices.values() {
        for k in &d.knobs {
            let owned = id(d);
            let mut l: Vec<(&str, &str)> = owned.iter().map(|(a, b)| (*a, b.as_str())).collect();
            l.extend_from_slice(&[
                ("knob", k.name.as_str()),
                ("unit", k.unit.name()),
                ("source", k.source.as_str()),
                ("disruption", k.disruption.as_str()),
            ]);
            let _ = writeln!(out, "enlight_knob_value{} {}", labels(&l), k.value);
        }
    }
    let _ = writeln!(
        out,
        "# HELP enlight_knob_limit The lowest (limit=\"min\") and highest (limit=\"max\") value a knob accepts, where its source says."
    );
    let _ = writeln!(out, "# TYPE enlight_knob_limit gauge");
    for d in state.devices.values() {
        let owned = id(d);
        for k in &d.knobs {
            for (limit, v) in [("min", k.min), ("max", k.max)] {
                let Some(v) = v else { continue };
                let mut l: Vec<(&str, &str)> =
                    owned.iter().map(|(a, b)| (*a, b.as_str())).collect();
                l.extend_from_slice(&[("knob", k.name.as_str()), ("limit", limit)]);
                let _ = writeln!(out, "enlight_knob_limit{} {v}", labels(&l));
            }
        }
    }
}
