//! The settings of one NAPI instance as enlight names them: `napi<id>/<setting>` (in the
//! journal, the knob lists and the API), the range enlight writes for each, and the netdev
//! netlink ([`super::netdev`]) reply field and `napi-set` request of each. Pure functions.

use super::netdev::{NapiInstance, NapiPatch};

/// The settings of one NAPI instance (netdev netlink, [`super::netdev`]) enlight writes.
pub const NAPI_INSTANCE_KNOBS: [&str; 3] = [
    "defer_hard_irqs",
    "gro_flush_timeout",
    "irq_suspend_timeout",
];

/// The largest `irq_suspend_timeout` enlight writes, ns: a second (the kernel takes any u64;
/// a suspended IRQ is re-armed when the timer fires, so longer only stalls an idle queue).
pub const IRQ_SUSPEND_MAX_NS: u64 = 1_000_000_000;

/// The knob name of setting `attr` of NAPI instance `id` (journal, knob lists):
/// `napi<id>/<attr>`.
pub fn napi_instance_knob(id: u32, attr: &str) -> String {
    format!("napi{id}/{attr}")
}

/// The instance and setting of a per-NAPI knob name (`napi8193/gro_flush_timeout`); `None`
/// for any other name.
pub fn parse_napi_instance_knob(knob: &str) -> Option<(u32, &'static str)> {
    let (id, attr) = knob.strip_prefix("napi")?.split_once('/')?;
    let attr = NAPI_INSTANCE_KNOBS.into_iter().find(|a| *a == attr)?;
    Some((id.parse().ok()?, attr))
}

/// The range enlight writes for a per-NAPI setting: the sysfs knobs' ranges, and up to a
/// second for `irq_suspend_timeout`.
pub fn napi_instance_range(attr: &str) -> (u64, u64) {
    match attr {
        "defer_hard_irqs" => (0, super::napi::DEFER_MAX),
        "gro_flush_timeout" => (0, super::napi::GRO_FLUSH_MAX_NS),
        _ => (0, IRQ_SUSPEND_MAX_NS),
    }
}

/// The interface-wide sysfs knob ([`super::napi`]) whose write also sets `attr` of every
/// instance; `None` for a setting sysfs does not have.
pub fn napi_sysfs_knob(attr: &str) -> Option<&'static str> {
    match attr {
        "defer_hard_irqs" => Some("napi_defer_hard_irqs"),
        "gro_flush_timeout" => Some("gro_flush_timeout"),
        _ => None,
    }
}

/// A NAPI instance's value of `attr`, if the kernel reported it.
pub fn napi_instance_value(n: &NapiInstance, attr: &str) -> Option<u64> {
    match attr {
        "defer_hard_irqs" => n.defer_hard_irqs.map(u64::from),
        "gro_flush_timeout" => n.gro_flush_timeout,
        "irq_suspend_timeout" => n.irq_suspend_timeout,
        _ => None,
    }
}

/// The `napi-set` of one setting.
pub fn napi_instance_patch(attr: &str, value: u64) -> NapiPatch {
    let mut p = NapiPatch::default();
    match attr {
        "defer_hard_irqs" => p.defer_hard_irqs = Some(value.min(u32::MAX as u64) as u32),
        "gro_flush_timeout" => p.gro_flush_timeout = Some(value),
        _ => p.irq_suspend_timeout = Some(value),
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per-NAPI knob names parse back to their instance and setting; nothing else does.
    #[test]
    fn per_napi_knobs_are_named_and_parsed_back() {
        assert_eq!(
            parse_napi_instance_knob(&napi_instance_knob(8193, "gro_flush_timeout")),
            Some((8193, "gro_flush_timeout"))
        );
        for bad in [
            "napi_defer_hard_irqs",
            "napiX/gro_flush_timeout",
            "napi1/mtu",
            "rx_usecs",
        ] {
            assert_eq!(parse_napi_instance_knob(bad), None, "{bad}");
        }
        assert_eq!(
            napi_instance_range("irq_suspend_timeout").1,
            IRQ_SUSPEND_MAX_NS
        );
        assert_eq!(
            napi_instance_patch("defer_hard_irqs", 3),
            NapiPatch {
                defer_hard_irqs: Some(3),
                ..Default::default()
            }
        );
        assert_eq!(
            napi_sysfs_knob("defer_hard_irqs"),
            Some("napi_defer_hard_irqs")
        );
        assert_eq!(napi_sysfs_knob("irq_suspend_timeout"), None);
    }
}
