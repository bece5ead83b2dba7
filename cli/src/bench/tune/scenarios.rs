//! The scenarios of `enlight bench tune`: each a workload plan of one or more phases on one
//! device (the synthetic disk or NIC, or a kernel veth pair) and the objective it is judged by.

use enlightd::tuner::{Objective, Throughput};
use serde::{Deserialize, Serialize};

/// A workload scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    /// One workload spec per phase (without duration).
    pub phases: Vec<String>,
    pub objective: Objective,
    pub slo_us: u64,
    /// The device: `disk` (phases are workload specs), `nic` (the synthetic NIC; one phase of
    /// traffic: `tcp`, `udp=<Mbit/s>` or `ping=<per second>`, see [`device::NicTraffic`]) or
    /// `veth` (a kernel veth pair, NAPI moderation of its receiving end tuned by enlightd; one
    /// phase of traffic as for `nic`, see [`veth`]).
    #[serde(default = "disk_device")]
    pub device: String,
}

pub(super) fn disk_device() -> String {
    "disk".into()
}

impl Scenario {
    /// What throughput is counted in, as enlightd's tuner counts it for the device
    /// ([`Throughput::of_device`]): a NIC's (synthetic or the veth) bytes/s, a disk's ops/s.
    /// Every controller and the oracle are scored in it.
    pub fn throughput(&self) -> Throughput {
        Throughput::of_device(if self.device == "veth" {
            "nic"
        } else {
            &self.device
        })
    }
}

/// The disk scenarios, then the NIC's.
pub fn scenarios() -> Vec<Scenario> {
    let s = |name: &str, description: &str, phases: &[&str], objective, slo_us| Scenario {
        name: name.into(),
        description: description.into(),
        phases: phases.iter().map(|p| p.to_string()).collect(),
        objective,
        slo_us,
        device: disk_device(),
    };
    let nic = |name: &str, description: &str, traffic: &str, objective, slo_us| Scenario {
        device: "nic".into(),
        ..s(name, description, &[traffic], objective, slo_us)
    };
    vec![
        s(
            "steady-throughput",
            "closed loop, QD 32, 4 KiB random, 70% reads",
            &["qd=32,bs=4k,rw=70"],
            Objective::Throughput,
            5_000,
        ),
        s(
            "low-rate-latency",
            "open loop at 2000 IOPS, at most 4 in flight, 4 KiB random",
            &["qd=4,bs=4k,rw=70,rate=2000"],
            Objective::Latency,
            5_000,
        ),
        s(
            "bursty",
            "QD 32 for 200 ms, idle for 300 ms, repeated",
            &["qd=32,bs=4k,rw=70,burst=200ms:300ms"],
            Objective::Balanced,
            2_000,
        ),
        s(
            "phase-change",
            "2000 IOPS at QD <= 4, then closed loop at QD 32",
            &["qd=4,bs=4k,rw=70,rate=2000", "qd=32,bs=4k,rw=70"],
            Objective::Latency,
            5_000,
        ),
        s(
            "drift",
            "open loop ramping down from 16000 to 6000 IOPS at QD <= 32 whatever the settings",
            &["qd=32,bs=4k,rw=70,rate=16000,ramp=6000"],
            Objective::Balanced,
            5_000,
        ),
        s(
            "mixed-sizes",
            "closed loop, QD 16, 70% 4 KiB and 30% 64 KiB",
            &["qd=16,bs=4k,mix=64k:30,rw=70"],
            Objective::Throughput,
            10_000,
        ),
        nic(
            "nic-tcp-throughput",
            "synthetic NIC: one iperf3 TCP stream, guest to host namespace",
            "tcp",
            Objective::Throughput,
            5_000,
        ),
        nic(
            "nic-ping-latency",
            "synthetic NIC: 500 pings/s (and their replies), nothing else",
            "ping=500",
            Objective::Latency,
            2_000,
        ),
        Scenario {
            device: "veth".into(),
            ..s(
                "kernel-tcp",
                "kernel veth pair, GRO on the receiver, TSO off on the sender: one iperf3 TCP \
                 stream; enlightd --kernel tunes the receiver's NAPI moderation",
                &["tcp"],
                Objective::Throughput,
                5_000,
            )
        },
        Scenario {
            device: "veth".into(),
            ..s(
                "kernel-ping",
                "kernel veth pair, GRO on the receiver: 500 pings/s, round trips from ping; \
                 enlightd --kernel tunes the receiver's NAPI moderation",
                &["ping=500"],
                Objective::Latency,
                2_000,
            )
        },
    ]
}
