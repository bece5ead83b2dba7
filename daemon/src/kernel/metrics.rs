//! The kernel side of the Prometheus exposition: the kernel probes' attach status (in the
//! shared `enlight_probe_attached` family), kernel-only families (NAPI, ring and coalescing
//! settings, block queue settings, KVM exits, Hyper-V events), and the `driver` label on every
//! series of a kernel device.

use std::fmt::Write;

use crate::metrics::escape;
use crate::model::State;

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Lines of `enlight_probe_attached` for the kernel probes (inside that family's block):
/// `{device="kernel",kind="kernel",probe="block:block_rq_complete",state="attached"}`, 0 with the
/// reason when a probe is not attached. A kernel probe serves every kernel device, so its
/// `device` label is `kernel` (the alert and the panels group by device: an empty label read
/// "probes of  detached"); `state` tells a tracepoint this kernel lacks (`absent`, never an
/// alert) from one that failed to attach (`detached`).
pub fn probe_attached_lines(out: &mut String, state: &State) {
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
pub fn finish(out: &mut String, state: &State) {
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

    type Napi = fn(&super::KernelInfo) -> u64;
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
    type Co = fn(&super::ethtool::Coalesce) -> [(&'static str, Option<u32>); 2];
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
                    ("kind", &d.record.kind),
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
                let l = labels(&[("device", &d.record.name), ("kind", &d.record.kind)]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::collector::tests::{fake_sysfs, FakeKernel};
    use crate::kernel::collector::{KernelCollector, KernelOptions};
    use enlight_probes::kernel::{make_dev, BlockKey};
    use std::time::Duration;

    #[test]
    fn kernel_devices_carry_a_driver_label_and_no_synthetic_settings() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(dir.path(), "loop3");
        let fake = FakeKernel::default();
        fake.snap.lock().unwrap().disks.insert(
            BlockKey {
                dev: make_dev(7, 3),
                op: 1,
            },
            crate::collector::tests::io(7, &[(20_000, 7)]),
        );
        let mut c = KernelCollector::new(
            Ok(fake),
            dir.path().into(),
            Duration::from_secs(30),
            KernelOptions::default(),
        );
        let mut state = State::default();
        c.tick(&mut state);
        let text = crate::metrics::render(&state);
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
}
