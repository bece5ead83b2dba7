//! A knob a device really has, as enlightd describes it (`knobs` of `/api/v1/devices`, the
//! `enlight_knob` series of `/metrics`): its value read from where it lives, its limits, unit,
//! source and how disruptive a change is. enlightd builds them (`enlightd::knobs`, where the
//! tuner's use of them lives); `enlight top` and `enlight tune` show them.
//!
//! **Compatibility.** Each enum is a string on the wire (`unit` snake_case, `source` and
//! `disruption` kebab-case, `tuner_kind` snake_case). A string this build does not know (a newer
//! daemon's unit, source, disruption or ladder) is kept as written, in the enum's `Other`, and
//! written back unchanged, as [`crate::DeviceKind`] does: an older client still shows a newer
//! daemon's knobs. [`Knob`] is `#[serde(default)]`: a field an older daemon did not send reads
//! as its default.

use serde::{Deserialize, Serialize};

wire_enum! {
    /// Where a knob lives.
    pub enum Source {
        /// The device process's control socket (contract 4).
        ControlSocket = "control-socket",
        /// The `ethtool` generic netlink family (`ethtool -g/-c`).
        EthtoolNetlink = "ethtool-netlink",
        /// A sysfs file.
        Sysfs = "sysfs",
        /// The `netdev` generic netlink family (per NAPI instance, kernel 6.13+).
        NetdevNetlink = "netdev-netlink",
    }
}

wire_enum! {
    /// What a change of the knob does to the device.
    pub enum Disruption {
        /// Takes effect while I/O runs, nothing is dropped.
        Live = "live",
        /// The driver stops and restarts the queue (in-flight packets may be dropped).
        ResetsQueue = "resets-queue",
        /// The driver detaches and re-creates the device (a link flap).
        Detaches = "detaches",
    }
}

wire_enum! {
    /// A knob's unit.
    pub enum Unit {
        Bytes = "bytes",
        Kibibytes = "kibibytes",
        Descriptors = "descriptors",
        Frames = "frames",
        Microseconds = "microseconds",
        Nanoseconds = "nanoseconds",
        /// A count (of polls, requests, completions).
        Count = "count",
        /// 0 or 1.
        Boolean = "boolean",
        /// One of `choices` (the value is its index).
        Choice = "choice",
    }
}

impl Unit {
    /// The label value of `/metrics` and the suffix `enlight tune` prints (`KiB`, `us`, `ns`,
    /// `bool`: shorter than the wire's names; an unknown unit's is its wire string).
    pub fn name(&self) -> &str {
        match self {
            Unit::Bytes => "bytes",
            Unit::Kibibytes => "KiB",
            Unit::Descriptors => "descriptors",
            Unit::Frames => "frames",
            Unit::Microseconds => "us",
            Unit::Nanoseconds => "ns",
            Unit::Count => "count",
            Unit::Boolean => "bool",
            Unit::Choice => "choice",
            Unit::Other(s) => s,
        }
    }
}

wire_enum! {
    /// Which ladder of enlightd's tuner a knob rides (what each means for the tuner is
    /// `enlightd::knobs`' business).
    pub enum TunerKind {
        /// Completions (frames, deferred polls) before an interrupt: `moderation_frames`' ladder.
        ModerationCount = "moderation_count",
        /// Time before an interrupt (or a re-poll): `moderation_usecs`' ladder.
        ModerationDelay = "moderation_delay",
        /// Ring size.
        Ring = "ring",
        /// Polling budget.
        PollBudget = "poll_budget",
        /// A disk's queue depth (`nr_requests`, or a SCSI disk's `device/queue_depth`): rides
        /// the count ladder, as requests.
        QueueDepth = "queue_depth",
        /// A disk's I/O scheduler: a choice, its index riding the delay ladder's rungs.
        Scheduler = "scheduler",
        /// A disk's `read_ahead_kb`: rides the budget ladder, in KiB.
        ReadAhead = "read_ahead",
        /// A disk's largest request, `max_sectors_kb`: rides the ring ladder, in bytes.
        MaxIo = "max_io",
    }
}

/// One knob of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Knob {
    /// Its name where it lives (`moderation_frames`, `rx_frames`, `napi_defer_hard_irqs`,
    /// `nr_requests`, ...).
    pub name: String,
    /// The value in force, as read from the source (for a choice: the index into `choices`).
    pub value: u64,
    /// Lowest value accepted (`None`: the source does not say).
    pub min: Option<u64>,
    /// Highest value accepted (`None`: the source does not say).
    pub max: Option<u64>,
    pub unit: Unit,
    pub source: Source,
    pub disruption: Disruption,
    /// The ladder it rides in the tuner (`None`: the tuner does not move it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tuner_kind: Option<TunerKind>,
    /// A choice knob's options (the I/O scheduler).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// A delay knob whose driver reads the values between 1 and this one as modes or refuses
    /// them (e1000's rx-usecs: from 10): the tuner steps over them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delays_from: Option<u64>,
    /// A knob that is not live whose change the tuner may still try, live, when the device
    /// shows pressure on it: the rx ring of a driver whose resize only resets the queue
    /// (virtio_net, mlx5_core), where `[kernel] ring_resets = "explore"`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub explored_on_pressure: bool,
}

impl Knob {
    /// A knob with no tuner ladder and no choices.
    pub fn new(
        name: &str,
        value: u64,
        (min, max): (Option<u64>, Option<u64>),
        unit: Unit,
        source: Source,
        disruption: Disruption,
    ) -> Knob {
        Knob {
            name: name.into(),
            value,
            min,
            max,
            unit,
            source,
            disruption,
            tuner_kind: None,
            choices: Vec::new(),
            delays_from: None,
            explored_on_pressure: false,
        }
    }

    /// The same knob, riding `kind`'s ladder.
    pub fn tuned_as(mut self, kind: TunerKind) -> Knob {
        self.tuner_kind = Some(kind);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_as_the_daemon_always_wrote_them() {
        fn wire<T: Serialize>(values: &[T]) -> String {
            let v: Vec<String> = values
                .iter()
                .map(|v| serde_json::to_string(v).unwrap())
                .collect();
            v.join(",")
        }
        assert_eq!(
            wire(Unit::KNOWN),
            r#""bytes","kibibytes","descriptors","frames","microseconds","nanoseconds","count","boolean","choice""#
        );
        assert_eq!(
            wire(Source::KNOWN),
            r#""control-socket","ethtool-netlink","sysfs","netdev-netlink""#
        );
        assert_eq!(
            wire(Disruption::KNOWN),
            r#""live","resets-queue","detaches""#
        );
        assert_eq!(
            wire(TunerKind::KNOWN),
            r#""moderation_count","moderation_delay","ring","poll_budget","queue_depth","scheduler","read_ahead","max_io""#
        );
        for u in Unit::KNOWN.iter().chain([&Unit::Other("lumens".into())]) {
            assert_eq!(&Unit::from_wire(u.as_str()), u);
        }
        assert_eq!(
            (Unit::Microseconds.name(), Unit::Boolean.name()),
            ("us", "bool")
        );
    }

    /// An older daemon's knob (before the tuner's fields) and a newer one's (a unit, source,
    /// disruption and ladder this build does not know, and a field it does not know) both read,
    /// and the unknown strings are written back as they came.
    #[test]
    fn old_and_new_knobs_read() {
        let old = r#"{"name":"moderation_frames","value":8,"min":1,"max":1024,
            "unit":"frames","source":"control-socket","disruption":"live"}"#;
        let k: Knob = serde_json::from_str(old).unwrap();
        assert_eq!(
            k,
            Knob::new(
                "moderation_frames",
                8,
                (Some(1), Some(1024)),
                Unit::Frames,
                Source::ControlSocket,
                Disruption::Live
            )
        );
        let new = r#"{"name":"rss","value":3,"unit":"queues","source":"devlink",
            "disruption":"reboots","tuner_kind":"rss_spread","weights":[1,2]}"#;
        let k: Knob = serde_json::from_str(new).unwrap();
        assert_eq!(
            (&k.unit, &k.source, &k.disruption, &k.tuner_kind),
            (
                &Unit::Other("queues".into()),
                &Source::Other("devlink".into()),
                &Disruption::Other("reboots".into()),
                &Some(TunerKind::Other("rss_spread".into()))
            )
        );
        assert_eq!((k.min, k.max, k.choices.len()), (None, None, 0));
        assert_eq!(
            serde_json::to_string(&k).unwrap(),
            r#"{"name":"rss","value":3,"min":null,"max":null,"unit":"queues","source":"devlink","disruption":"reboots","tuner_kind":"rss_spread"}"#
        );
        // Not a string: an error, as before.
        assert!(serde_json::from_str::<Knob>(r#"{"unit":3}"#).is_err());
    }
}
