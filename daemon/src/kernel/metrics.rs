//! The kernel's families: the kernel probes' attach status (in the shared
//! `enlight_probe_attached` family, after the registry devices'), and the kernel-only families
//! (kernel device info, NAPI, ring and coalescing settings, block queue settings, KVM exits,
//! Hyper-V events, the kernel probes' trouble). A kernel device's figures shared with registry
//! devices (I/O, signalling, knobs) are in [`crate::metrics::devices`], its `driver` label set
//! there with the rest of its identity ([`crate::exposition::device_labels`]).

use crate::exposition::{device_labels, labels, labels_with, Exposition, Family, Labels};
use crate::model::{DeviceState, State};

/// Lines of `enlight_probe_attached` for the kernel probes:
/// `{device="kernel",kind="kernel",probe="block:block_rq_complete",state="attached"}`, 0 with the
/// reason when a probe is not attached. A kernel probe serves every kernel device, so its
/// `device` label is `kernel` (the alert and the panels group by device: an empty label read
/// "probes of  detached"); `state` tells a tracepoint this kernel lacks (`absent`, never an
/// alert) from one that failed to attach (`detached`).
pub fn probe_families(state: &State, out: &mut Exposition) {
    let mut f = Family::gauge(
        "enlight_probe_attached",
        "Whether the probe is attached to the device's process (1) or not (0).",
    );
    for p in &state.kernel.probes {
        let mut l = vec![
            ("device", "kernel"),
            ("kind", enlight_abi::DeviceKind::Kernel.as_str()),
            ("probe", p.probe.as_str()),
            ("state", p.state.name()),
        ];
        if let Some(r) = &p.reason {
            l.push(("reason", r.as_str()));
        }
        f.sample(labels(&l), p.attached as u8 as f64);
    }
    out.add(f);
}

/// A kernel device: its state, its kernel details and its labels.
type KernelDevice<'a> = (&'a DeviceState, &'a super::KernelInfo, Labels);

/// The kernel-only families.
pub fn families(state: &State, out: &mut Exposition) {
    let kernel_devices: Vec<KernelDevice> = state
        .devices
        .values()
        .filter_map(|d| Some((d, d.kernel.as_ref()?, device_labels(d))))
        .collect();
    device_info(&kernel_devices, out);
    napi(&kernel_devices, out);
    settings(&kernel_devices, out);
    kvm(state, out);
    events(state, out);
}

/// One line per kernel device.
fn device_info(kernel_devices: &[KernelDevice], out: &mut Exposition) {
    let mut f = Family::gauge(
        "enlight_kernel_device_info",
        "Kernel devices found in sysfs: driver, whether it is paravirtual, emulated or virtual, and queues (always 1).",
    );
    for (d, k, id) in kernel_devices {
        let queues = k.queues.to_string();
        f.sample(
            labels_with(
                id,
                &[
                    ("class", k.class.name()),
                    ("queues", &queues),
                    ("type", &d.record.device),
                ],
            ),
            1.0,
        );
    }
    out.add(f);
}

/// A NIC's NAPI counters.
fn napi(kernel_devices: &[KernelDevice], out: &mut Exposition) {
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
        let mut f = Family::counter(name, help);
        for (_, k, id) in kernel_devices
            .iter()
            .filter(|(d, _, _)| d.record.device == "nic")
        {
            f.sample(id.clone(), value(k) as f64);
        }
        out.add(f);
    }
}

/// A NIC's rings and interrupt coalescing as ethtool reads them, and a disk's queue settings.
fn settings(kernel_devices: &[KernelDevice], out: &mut Exposition) {
    let mut f = Family::gauge(
        "enlight_kernel_ring_entries",
        "NIC ring size in descriptors (ethtool -g), per direction; limit=\"max\" is the driver's maximum.",
    );
    for (_, k, id) in kernel_devices {
        if let Some(r) = k.nic.and_then(|n| n.rings) {
            for (dir, cur, max) in [("rx", r.rx, r.rx_max), ("tx", r.tx, r.tx_max)] {
                f.sample(
                    labels_with(id, &[("direction", dir), ("limit", "current")]),
                    cur as f64,
                );
                f.sample(
                    labels_with(id, &[("direction", dir), ("limit", "max")]),
                    max as f64,
                );
            }
        }
    }
    out.add(f);
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
        let mut f = Family::gauge(name, help);
        for (_, k, id) in kernel_devices {
            if let Some(c) = k.nic.and_then(|n| n.coalesce) {
                for (dir, v) in value(&c) {
                    if let Some(v) = v {
                        f.sample(labels_with(id, &[("direction", dir)]), v as f64);
                    }
                }
            }
        }
        out.add(f);
    }
    let mut f = Family::gauge(
        "enlight_kernel_block_queue_setting",
        "Block queue settings from sysfs (/sys/block/<disk>/queue/<knob>).",
    );
    for (_, k, id) in kernel_devices {
        for (knob, v) in &k.block_queue {
            f.sample(labels_with(id, &[("knob", knob)]), *v as f64);
        }
    }
    out.add(f);
}

/// KVM's view of the processes serving registry devices, by pid.
fn kvm(state: &State, out: &mut Exposition) {
    // KVM's view of the processes serving registry devices, by pid.
    let served: Vec<_> = state
        .devices
        .values()
        .filter(|d| d.kernel.is_none() && d.record.pid != 0)
        .map(|d| (d, device_labels(d)))
        .collect();
    let mut f = Family::counter(
        "enlight_kvm_exits_total",
        "KVM exits (kvm:kvm_exit) of the process serving a device, by reason.",
    );
    for (d, id) in &served {
        if let Some(reasons) = state.kernel.kvm_exits.get(&d.record.pid) {
            for (reason, n) in reasons {
                f.sample(labels_with(id, &[("reason", reason)]), *n as f64);
            }
        }
    }
    out.add(f);
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
        let mut f = Family::counter(name, help);
        for (d, id) in &served {
            if let Some(n) = counts.get(&d.record.pid) {
                f.sample(id.clone(), *n as f64);
            }
        }
        out.add(f);
    }
}

/// The kernel tracepoints' event counts and the kernel probes' own trouble.
fn events(state: &State, out: &mut Exposition) {
    let mut f = Family::counter(
        "enlight_kernel_events_total",
        "Hits of kernel tracepoints counted as events (hyperv:vmbus_* where the kernel has them).",
    );
    for (event, n) in &state.kernel.events {
        f.sample(labels(&[("event", event)]), *n as f64);
    }
    out.add(f);
    let mut f = Family::counter(
        "enlight_kernel_probe_trouble_total",
        "The kernel probes' own trouble: events lost to full maps, block completions never seen issued, program runs the kernel skipped (re-entered on one CPU).",
    );
    for (what, n) in [
        ("events_lost", state.kernel.events_lost),
        (
            "completion_without_issue",
            state.kernel.completions_without_issue,
        ),
    ] {
        f.sample(labels(&[("what", what)]), n as f64);
    }
    out.add(f);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::collector::tests::{fake_sysfs, FakeKernel};
    use crate::kernel::collector::{KernelCollector, KernelOptions};
    use std::time::Duration;

    /// The kernel's own families, alone: its probes' lines and a kernel device's settings with
    /// its driver; the figures it shares with registry devices are the devices source's.
    #[test]
    fn the_kernel_families_label_where_they_are_built() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(dir.path(), "loop3");
        let mut c = KernelCollector::new(
            Ok(FakeKernel::default()),
            dir.path().into(),
            Duration::from_secs(30),
            KernelOptions::default(),
        );
        let mut state = State::default();
        c.tick(&mut state);
        let mut e = Exposition::default();
        probe_families(&state, &mut e);
        families(&state, &mut e);
        let text = e.text();
        assert!(text.contains(
            "enlight_kernel_block_queue_setting{device=\"loop3\",kind=\"kernel\",driver=\"loop\",knob=\"read_ahead_kb\"} 128\n"
        ), "{text}");
        assert!(text.contains(
            "enlight_probe_attached{device=\"kernel\",kind=\"kernel\",probe=\"hyperv:vmbus_*\",state=\"absent\",reason=\"no hyperv tracepoints\"} 0\n"
        ));
        assert!(!text.contains("enlight_io_"));
        crate::testing::promtool_check(&text);
    }
}
