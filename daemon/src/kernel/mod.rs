//! The running kernel's own devices: discovery from sysfs, the collector that turns the kernel
//! probes' maps into device state, the tuner's backends for them, and the changes to their
//! settings (ethtool netlink and NAPI for NICs, sysfs queue settings for block devices) with a
//! persisted journal of every original value.
//! See docs/kernel.md.

pub mod backend;
pub mod blockq;
pub mod changes;
pub mod collector;
pub mod discovery;
pub mod ethtool;
pub mod journal;
pub mod knobs;
pub mod metrics;
pub mod monitor;
pub mod napi;
pub mod napi_instance;
pub mod netdev;
pub mod netns;
pub mod permission;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use discovery::DriverClass;

/// What each `[kernel]` key accepts (docs/kernel.md), named in every error about the key.
pub const KEYS: &[crate::config::KeySpec] = &[
    crate::config::KeySpec::text("kernel.enabled", "true or false"),
    crate::config::KeySpec::text(
        "kernel.tune",
        "a list of kernel device names, e.g. [\"eth1\", \"vdb\"] (each a NIC or disk that \
         exists; needs enabled = true or --kernel)",
    ),
    crate::config::KeySpec::text("kernel.dry_run", "true or false"),
    crate::config::KeySpec::text("kernel.restore_on_exit", "true or false"),
    crate::config::KeySpec::text("kernel.sysfs", "the directory sysfs is mounted on (/sys)"),
    crate::config::KeySpec::text(
        "kernel.ring_resets",
        "\"explore\" (the tuner may resize the rx ring of a driver whose ring change only resets \
         the queue, when the ring shows pressure) or \"recommend\" (recommend only)",
    ),
];

/// What the tuner may do with a ring whose change resets the queue (`[kernel] ring_resets`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RingResets {
    /// Explore the rx ring live on drivers whose catalogue row says a ring change only resets
    /// the queue (virtio_net, mlx5_core), and only while the device shows ring pressure: the
    /// reset drops what is in flight on that one queue, once per change, which a device whose
    /// ring overflows already loses more of. The device must be named in `tune` (and dry run
    /// off) as for any change.
    #[default]
    Explore,
    /// Recommend ring changes only, on every driver.
    Recommend,
}

/// `[kernel]` in enlightd's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelConfig {
    /// Observe the kernel's own devices: load the kernel probes and list devices from sysfs.
    pub enabled: bool,
    /// Devices enlight may change (by kernel name: `eth1`, `vdb`). Any other device only gets
    /// recommendations.
    pub tune: Vec<String>,
    /// Recommend only, even for the devices in `tune` (the default: changing a production
    /// machine's devices is opt-in twice).
    pub dry_run: bool,
    /// Put every original setting back when enlightd shuts down cleanly.
    pub restore_on_exit: bool,
    /// Where sysfs is mounted.
    pub sysfs: std::path::PathBuf,
    /// Whether the tuner explores queue-resetting rx rings under pressure ([`RingResets`]).
    pub ring_resets: RingResets,
}

/// The names in `[kernel] tune` that are no disk or NIC of this machine (as discovered from
/// `config.sysfs`).
pub fn unknown_tune_names(config: &KernelConfig) -> Vec<String> {
    let devices = discovery::discover(&config.sysfs);
    config
        .tune
        .iter()
        .filter(|n| !devices.iter().any(|d| &d.name == *n))
        .cloned()
        .collect()
}

impl KernelConfig {
    /// Checks what can be checked without looking at the machine (`enlightd --check` also
    /// checks that every device in `tune` exists).
    pub fn validate(&self) -> Result<(), crate::config::KeyError> {
        if let Some(name) = self
            .tune
            .iter()
            .find(|n| n.is_empty() || n.len() > 64 || n.contains('/') || n.starts_with('.'))
        {
            return Err(crate::config::KeyError::new(
                "kernel.tune",
                format!("kernel.tune names {name:?}, which is no kernel device name"),
            ));
        }
        if self.sysfs.as_os_str().is_empty() {
            return Err(crate::config::KeyError::new(
                "kernel.sysfs",
                "kernel.sysfs is empty",
            ));
        }
        Ok(())
    }
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            enabled: false,
            tune: Vec::new(),
            dry_run: true,
            restore_on_exit: true,
            sysfs: "/sys".into(),
            ring_resets: RingResets::default(),
        }
    }
}

/// What a kernel device's [`crate::model::DeviceState`] carries beyond the common figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// The driver (`virtio_blk`, `hv_netvsc`, `e1000`, `loop`, ...): the `driver` label.
    pub driver: String,
    /// Paravirtual, emulated or virtual.
    pub class: DriverClass,
    /// Hardware queues.
    pub queues: u32,
    /// The IRQs whose handlers serve it.
    pub irqs: Vec<u32>,
    /// NAPI polls (NICs), cumulative.
    pub napi_polls: u64,
    /// Packets those polls handled.
    pub napi_packets: u64,
    /// Polls that used their whole budget.
    pub napi_budget_exhausted: u64,
    /// Mean packets per poll over the last interval (0 without polls).
    pub napi_batch_mean: f64,
    /// Received frames the NIC dropped for want of a free rx descriptor or FIFO room
    /// (`rx_missed_errors` + `rx_fifo_errors` of its sysfs statistics), cumulative; 0 for a
    /// disk and for a driver that counts neither (virtio_net: the host holds what does not
    /// fit).
    #[serde(default)]
    pub rx_overruns: u64,
    /// Ring sizes and coalescing (NICs whose driver has them).
    pub nic: Option<ethtool::NicSettings>,
    /// Block queue settings (disks), knob → value.
    pub block_queue: BTreeMap<String, u32>,
    /// Whether enlight may change it (`apply`) or only recommends (`recommend`), and why.
    pub tuning: String,
}

/// One kernel probe's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeView {
    pub probe: String,
    pub attached: bool,
    pub reason: Option<String>,
    /// Attached, detached (the kernel has the tracepoint but it is not attached), absent (this
    /// kernel has no such tracepoint: nothing is missing) or off (not selected).
    #[serde(default)]
    pub state: ProbeState,
}

/// A probe's state, the `state` label of `enlight_probe_attached`. Only `detached` means
/// figures are missing (and only it fires `EnlightProbeDetached`): a tracepoint this kernel
/// does not have (`hyperv:vmbus_*` on any guest that is not on Hyper-V) is `absent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProbeState {
    #[default]
    Attached,
    Detached,
    Absent,
    Off,
}

impl ProbeState {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            ProbeState::Attached => "attached",
            ProbeState::Detached => "detached",
            ProbeState::Absent => "absent",
            ProbeState::Off => "off",
        }
    }

    /// The state of a probe from what the loader reports. A pure function.
    pub fn of(attached: bool, absent: bool, reason: Option<&str>) -> ProbeState {
        if attached {
            ProbeState::Attached
        } else if absent {
            ProbeState::Absent
        } else if reason == Some("not selected") {
            ProbeState::Off
        } else {
            ProbeState::Detached
        }
    }
}

/// The kernel side of the daemon's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelState {
    /// Whether the kernel probes are loaded at all (`None`: disabled by configuration).
    pub probes_loaded: Option<bool>,
    /// Why they are not, if they are not.
    pub load_error: Option<String>,
    /// Every kernel probe's status.
    pub probes: Vec<ProbeView>,
    /// `kvm:kvm_exit` counts per process (VMM pid) and reason, cumulative.
    pub kvm_exits: BTreeMap<u32, BTreeMap<String, u64>>,
    /// `kvm:kvm_pio` and `kvm:kvm_mmio` counts per process (VMM pid), cumulative.
    pub kvm_pio: BTreeMap<u32, u64>,
    pub kvm_mmio: BTreeMap<u32, u64>,
    /// Hits of generically counted events (`hyperv:vmbus_*`), cumulative.
    pub events: BTreeMap<String, u64>,
    /// The programs' own trouble counters.
    pub events_lost: u64,
    pub completions_without_issue: u64,
    /// Program runs the kernel skipped because the program was already running on that CPU
    /// (an interrupt arrived while it ran): the one way events are lost with room in the maps.
    pub recursion_misses: u64,
}

#[cfg(test)]
mod tests {
    use super::ProbeState;

    /// `[kernel] tune` names disks as it names NICs: by their kernel name, checked against
    /// what sysfs lists (a disk with no media, e.g. an unbound loop device, is no device).
    #[test]
    fn tune_names_disks_by_their_kernel_name() {
        let sys = tempfile::tempdir().unwrap();
        for (disk, size) in [("loop3", "16384"), ("loop4", "0")] {
            let d = sys.path().join("block").join(disk);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("size"), format!("{size}\n")).unwrap();
            std::fs::write(d.join("dev"), "7:3\n").unwrap();
        }
        let config = super::KernelConfig {
            enabled: true,
            tune: vec!["loop3".into(), "loop4".into(), "vdq".into()],
            dry_run: false,
            sysfs: sys.path().into(),
            ..Default::default()
        };
        assert!(config.validate().is_ok());
        assert_eq!(super::unknown_tune_names(&config), ["loop4", "vdq"]);
        assert_eq!(
            super::permission::policy(&config.tune, config.dry_run, "loop3"),
            super::permission::Permission::Apply
        );
    }

    #[test]
    fn a_tracepoint_the_kernel_lacks_is_absent_not_detached() {
        assert_eq!(ProbeState::of(true, false, None), ProbeState::Attached);
        assert_eq!(
            ProbeState::of(false, true, Some("no hyperv tracepoints")),
            ProbeState::Absent
        );
        assert_eq!(
            ProbeState::of(false, false, Some("not selected")),
            ProbeState::Off
        );
        assert_eq!(
            ProbeState::of(false, false, Some("the verifier refused it")),
            ProbeState::Detached
        );
    }
}
