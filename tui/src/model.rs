//! What enlightd's JSON API serves, as `enlight top` reads it: the daemon's own types, from
//! `enlight-abi`, defined once for both sides. Every field a newer or older daemon may lack has a
//! default, so the TUI works against any daemon of the same API version (e.g. one without the
//! tuner: `tuner` is `None`), and a value a newer daemon writes that this build does not know is
//! kept rather than refused: a device kind, a knob's unit, source, disruption or ladder, the
//! tuner's mode, objective, state or a decision's action (each enum's `Other`), and a field
//! (ignored). Where the daemon carries a type of its own (its kernel-probe state and
//! kernel-device details, its tuner's strict enums, the driver's settings), the TUI reads the
//! view with the lenient default: [`Unread`] for the kernel parts, [`enlight_abi::tuner::Lenient`]
//! for the tuner's (its wire enums and [`Settings`], every knob optional).

// The types the daemon serialises and this crate reads alike are defined once, in enlight-abi.
pub use enlight_abi::api::{
    AuditHealth, DeviceHistogram, DeviceView, HealthView, OpHistogram, OpView, ProcessCost,
    ProgramCost, SelfCost, Unread,
};
pub use enlight_abi::knob::{Disruption, Knob, Source, TunerKind, Unit};
pub use enlight_abi::tuner::{Action, Decision, Mode, Objective, Settings, State, TunerView};
pub use enlight_abi::DeviceKind;

/// How `enlight top` shows a knob ([`Knob`] is the daemon's own, from `enlight-abi`).
pub trait KnobDisplay {
    /// `name value[ unit]`, a non-live knob with its disruption.
    fn display(&self) -> String;
}

impl KnobDisplay for Knob {
    fn display(&self) -> String {
        let v = match &self.unit {
            Unit::Choice => self
                .choices
                .get(self.value as usize)
                .cloned()
                .unwrap_or_else(|| self.value.to_string()),
            Unit::Boolean => (if self.value != 0 { "on" } else { "off" }).into(),
            Unit::Microseconds => format!("{} us", self.value),
            Unit::Nanoseconds => format!("{} ns", self.value),
            Unit::Kibibytes => format!("{} KiB", self.value),
            Unit::Bytes => format!("{} B", self.value),
            // Counts, descriptors, frames, and a unit this build does not know: the number.
            _ => self.value.to_string(),
        };
        match &self.disruption {
            Disruption::Live => format!("{} {v}", self.name),
            d if d.as_str().is_empty() => format!("{} {v}", self.name),
            d => format!("{} {v} ({d})", self.name),
        }
    }
}

/// Everything one poll of the daemon returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Poll {
    pub devices: Vec<DeviceView>,
    pub health: HealthView,
    pub histograms: Vec<DeviceHistogram>,
    /// Recent tuner decisions (newest last); empty when the daemon has no tuner API.
    pub decisions: Vec<Decision>,
    /// Whether the daemon serves the tuner API at all.
    pub tuner_api: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_without_tuner_reads_as_none_and_a_contract_6_tuner_parses() {
        let plain = r#"{"name":"disk0","device":"disk","kind":"synthetic","pid":1,"present":true,
            "attached":true,"attach_error":null,"settings":{"ring_out_bytes":262144,
            "ring_in_bytes":262144,"moderation_frames":8,"moderation_usecs":50,"poll_budget":64},
            "total":{"op":"all","ops_total":5,"bytes_total":20480,"errors_total":0,
            "ops_per_sec":1.0,"bytes_per_sec":4096.0,"p50_seconds":1e-5,"p90_seconds":null,
            "p99_seconds":null,"p999_seconds":null},"ops":[],"interrupts_total":3,
            "interrupts_per_sec":0.5,"doorbells_total":4,"ring_full_out_total":0,
            "ring_full_in_total":0,"irq_masked_total":0}"#;
        let d: DeviceView = serde_json::from_str(plain).unwrap();
        assert_eq!(d.tuner, None);
        assert_eq!(d.settings.unwrap().moderation_usecs, Some(50));
        let with_null: DeviceView = serde_json::from_str(r#"{"name":"x","tuner":null}"#).unwrap();
        assert_eq!(with_null.tuner, None);
        let tuned: DeviceView = serde_json::from_str(
            r#"{"name":"x","kind":"emulated","tuner":{"mode":"auto","objective":"latency",
            "state":"pinned","pinned":true,"recommendation":null,
            "last_decision":{"ts_unix_ms":5,"device":"x","action":"revert",
              "from":{"moderation_frames":16},"to":{"moderation_frames":8},
              "reason":"p99 rose 30%","objective_value":null}}}"#,
        )
        .unwrap();
        let t = tuned.tuner.unwrap();
        assert!(t.pinned);
        let last = t.last_decision.unwrap();
        assert_eq!(
            (last.action, last.reason.as_str()),
            (Action::Revert, "p99 rose 30%")
        );
        assert_eq!(last.to.moderation_frames, Some(8));
    }

    /// A newer daemon's device (a kind and fields this build does not know) and an older one's
    /// (without the fields added since) both read, and so does the whole list they are in.
    #[test]
    fn an_unknown_kind_or_field_does_not_fail_the_response() {
        let devices = r#"[
            {"name":"vhost0","device":"disk","kind":"vhost-user","pid":9,"present":true,
             "queues":[{"id":0}],"total":{"op":"all","ops_total":3,"p9999_seconds":0.1}},
            {"name":"disk0","device":"disk","kind":"synthetic","pid":1,"present":true},
            {"name":"vda","device":"disk","kind":"kernel","driver":"virtio_blk"}
        ]"#;
        let d: Vec<DeviceView> = serde_json::from_str(devices).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].kind, DeviceKind::Other("vhost-user".into()));
        assert_eq!(d[0].kind.as_str(), "vhost-user");
        assert_eq!(d[0].total.ops_total, 3);
        assert_eq!(
            (d[1].kind.clone(), d[1].knobs.len()),
            (DeviceKind::Synthetic, 0)
        );
        assert_eq!(
            (d[2].kind.clone(), d[2].driver.as_deref()),
            (DeviceKind::Kernel, Some("virtio_blk"))
        );
        let h: Vec<DeviceHistogram> =
            serde_json::from_str(r#"[{"device":"vhost0","kind":"vhost-user","ops":[]}]"#).unwrap();
        assert_eq!(h[0].kind.as_str(), "vhost-user");
    }

    /// A knob shows in its unit; one a newer daemon describes with a unit and a disruption
    /// this build does not know still reads and shows, its value bare and its disruption named.
    #[test]
    fn knobs_show_in_their_units_and_unknown_ones_still_show() {
        let k: Vec<Knob> = serde_json::from_str(
            r#"[{"name":"gro_flush_timeout","value":20000,"unit":"nanoseconds",
                 "source":"sysfs","disruption":"live"},
                {"name":"rx_ring","value":256,"unit":"descriptors","source":"ethtool-netlink",
                 "disruption":"resets-queue","tuner_kind":"ring","explored_on_pressure":true},
                {"name":"scheduler","value":1,"unit":"choice","choices":["none","bfq"]},
                {"name":"rss","value":4,"unit":"queues","source":"devlink",
                 "disruption":"reboots","tuner_kind":"spread","future":1}]"#,
        )
        .unwrap();
        let shown: Vec<String> = k.iter().map(|k| k.display()).collect();
        assert_eq!(
            shown,
            [
                "gro_flush_timeout 20000 ns",
                "rx_ring 256 (resets-queue)",
                "scheduler bfq",
                "rss 4 (reboots)"
            ]
        );
        assert_eq!(k[3].source, Source::Other("devlink".into()));
    }
}
