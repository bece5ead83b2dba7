//! The kernel's block devices and NICs, as sysfs lists them: name, driver, whether that driver
//! is paravirtual (talks to a hypervisor's backend over shared rings: virtio, Hyper-V VSCs, Xen
//! front ends, VMware's), emulated (a model of real hardware the hypervisor traps register
//! accesses of: e1000, ata_piix, ...) or virtual (no hardware at all: loop, veth, tun, ...), and
//! queues. Read fresh every interval, so devices appearing and disappearing are seen.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How a driver reaches its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverClass {
    /// A paravirtual ("enlightened") driver: shared rings with the host's backend.
    Paravirtual,
    /// A driver for hardware a hypervisor emulates register by register (or real hardware:
    /// from inside a guest the two look the same).
    Emulated,
    /// A software device with no hardware behind it.
    Virtual,
    /// A driver this table does not know.
    Unknown,
}

impl DriverClass {
    /// The name used in the API and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DriverClass::Paravirtual => "paravirtual",
            DriverClass::Emulated => "emulated",
            DriverClass::Virtual => "virtual",
            DriverClass::Unknown => "unknown",
        }
    }
}

/// The class of a driver, by its name.
pub fn classify(driver: &str) -> DriverClass {
    const PARAVIRTUAL: &[&str] = &[
        "virtio_blk",
        "virtio_net",
        "virtio_scsi",
        "virtio-pci",
        "hv_storvsc",
        "hv_netvsc",
        "vmbus",
        "xen-blkfront",
        "vbd",
        "xen-netfront",
        "vif",
        "vmxnet3",
        "vmw_pvscsi",
        "gve",
        "ena",
    ];
    const EMULATED: &[&str] = &[
        "e1000",
        "e1000e",
        "8139cp",
        "8139too",
        "ne2k-pci",
        "pcnet32",
        "tulip",
        "ata_piix",
        "ahci",
        "piix",
        "sym53c8xx",
        "mptspi",
        "megaraid_sas",
        "nvme",
        "igb",
        "ixgbe",
        "i40e",
        "mlx5_core",
        "sd",
    ];
    const VIRTUAL: &[&str] = &[
        "loop",
        "veth",
        "tun",
        "bridge",
        "bonding",
        "dummy",
        "macvlan",
        "ipvlan",
        "vxlan",
        "wireguard",
        "zram",
        "nbd",
        "brd",
        "device-mapper",
        "md",
        "ublk",
        "null_blk",
        "netdevsim",
        "ifb",
        "team",
        "vrf",
        "geneve",
        "gre",
        "sit",
        "ipip",
    ];
    if PARAVIRTUAL.contains(&driver) {
        DriverClass::Paravirtual
    } else if EMULATED.contains(&driver) {
        DriverClass::Emulated
    } else if VIRTUAL.contains(&driver) {
        DriverClass::Virtual
    } else {
        DriverClass::Unknown
    }
}

/// One kernel device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDevice {
    /// The kernel's name (`vda`, `eth0`, `loop3`).
    pub name: String,
    /// `disk` or `nic` (contract 5's device type).
    pub device: String,
    /// The driver's name.
    pub driver: String,
    /// Paravirtual, emulated or virtual.
    pub class: DriverClass,
    /// Hardware queues (blk-mq queues, NIC rx queues).
    pub queues: u32,
    /// A disk's kernel `dev_t` (`major << 20 | minor`), what the block probes key by.
    pub dev: Option<u32>,
    /// A NIC's ifindex (in the daemon's network namespace).
    pub ifindex: Option<u32>,
}

fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path)
        .ok()?
        .file_name()?
        .to_str()
        .map(str::to_string)
}

fn read_trim(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn count_entries(dir: &Path, prefix: &str) -> u32 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .count() as u32
        })
        .unwrap_or(0)
}

/// The driver of disk `disk`: the nearest driver up its device path that is not a generic SCSI
/// or ATA disk driver (for `sda` behind `hv_storvsc` that is `hv_storvsc`, not `sd`), or, for
/// disks without a device (loop, zram, dm), the name the kernel gives its kind.
pub fn block_driver(sysfs: &Path, disk: &str) -> String {
    let device = sysfs.join("block").join(disk).join("device");
    if let Ok(mut dir) = std::fs::canonicalize(&device) {
        let mut generic = None;
        for _ in 0..8 {
            if let Some(driver) = link_name(&dir.join("driver")) {
                if driver == "sd" || driver == "sr" {
                    generic.get_or_insert(driver);
                } else {
                    return driver;
                }
            }
            if !dir.pop() || dir.as_os_str().len() <= "/sys/devices".len() {
                break;
            }
        }
        if let Some(g) = generic {
            return g;
        }
    }
    let stem: String = disk.chars().take_while(|c| !c.is_ascii_digit()).collect();
    match stem.as_str() {
        "loop" => "loop".into(),
        "zram" => "zram".into(),
        "dm-" => "device-mapper".into(),
        "md" => "md".into(),
        "nbd" => "nbd".into(),
        "ram" => "brd".into(),
        "nullb" => "null_blk".into(),
        "ublkb" => "ublk".into(),
        _ => "unknown".into(),
    }
}

/// The driver of NIC `iface`: its device's driver in sysfs, else what the kernel's ethtool
/// driver query says (virtual NICs: `veth`, `tun`, `bridge`, ...).
pub fn nic_driver(sysfs: &Path, iface: &str) -> String {
    link_name(&sysfs.join("class/net").join(iface).join("device/driver"))
        .unwrap_or_else(|| super::ethtool::driver_name(iface))
}

/// Every block device with media (size > 0) and every NIC but loopback, under `sysfs`.
pub fn discover(sysfs: &Path) -> Vec<KernelDevice> {
    let mut out = Vec::new();
    let mut disks: Vec<PathBuf> = std::fs::read_dir(sysfs.join("block"))
        .map(|it| it.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    disks.sort();
    for dir in disks {
        let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        let size: u64 = read_trim(&dir.join("size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if size == 0 {
            continue; // an unbound loop device, an empty drive
        }
        let dev = read_trim(&dir.join("dev")).and_then(|d| {
            let (maj, min) = d.split_once(':')?;
            Some(enlight_probes::kernel::make_dev(
                maj.parse().ok()?,
                min.parse().ok()?,
            ))
        });
        let driver = block_driver(sysfs, &name);
        out.push(KernelDevice {
            class: classify(&driver),
            queues: count_entries(&dir.join("mq"), "").max(1),
            name,
            device: "disk".into(),
            driver,
            dev,
            ifindex: None,
        });
    }
    let mut nics: Vec<PathBuf> = std::fs::read_dir(sysfs.join("class/net"))
        .map(|it| it.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    nics.sort();
    for dir in nics {
        let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if name == "lo" || !dir.join("ifindex").exists() {
            continue;
        }
        let driver = nic_driver(sysfs, &name);
        out.push(KernelDevice {
            class: classify(&driver),
            queues: count_entries(&dir.join("queues"), "rx-").max(1),
            ifindex: read_trim(&dir.join("ifindex")).and_then(|s| s.parse().ok()),
            name,
            device: "nic".into(),
            driver,
            dev: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers_are_classified() {
        assert_eq!(classify("virtio_blk"), DriverClass::Paravirtual);
        assert_eq!(classify("hv_netvsc"), DriverClass::Paravirtual);
        assert_eq!(classify("hv_storvsc"), DriverClass::Paravirtual);
        assert_eq!(classify("e1000"), DriverClass::Emulated);
        assert_eq!(classify("ata_piix"), DriverClass::Emulated);
        assert_eq!(classify("veth"), DriverClass::Virtual);
        assert_eq!(classify("loop"), DriverClass::Virtual);
        assert_eq!(classify("frobnicator"), DriverClass::Unknown);
    }

    /// A fake sysfs: a virtio disk, an unbound loop device, a bound one, a virtio NIC and lo.
    #[test]
    fn devices_are_found_with_driver_queues_and_ids() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path();
        let mk = |p: &str| std::fs::create_dir_all(s.join(p)).unwrap();
        let w = |p: &str, v: &str| std::fs::write(s.join(p), v).unwrap();
        mk("devices/pci0000:00/0000:00:02.0/virtio1");
        mk("bus/virtio/drivers/virtio_blk");
        mk("bus/virtio/drivers/virtio_net");
        std::os::unix::fs::symlink(
            s.join("bus/virtio/drivers/virtio_blk"),
            s.join("devices/pci0000:00/0000:00:02.0/virtio1/driver"),
        )
        .unwrap();
        mk("block/vda/mq/0");
        mk("block/vda/mq/1");
        w("block/vda/size", "1000\n");
        w("block/vda/dev", "254:0\n");
        std::os::unix::fs::symlink(
            s.join("devices/pci0000:00/0000:00:02.0/virtio1"),
            s.join("block/vda/device"),
        )
        .unwrap();
        mk("block/loop0");
        w("block/loop0/size", "0\n");
        mk("block/loop1");
        w("block/loop1/size", "2048\n");
        w("block/loop1/dev", "7:1\n");
        mk("devices/virtio2");
        std::os::unix::fs::symlink(
            s.join("bus/virtio/drivers/virtio_net"),
            s.join("devices/virtio2/driver"),
        )
        .unwrap();
        mk("class/net/eth0/queues/rx-0");
        mk("class/net/eth0/queues/tx-0");
        w("class/net/eth0/ifindex", "2\n");
        std::os::unix::fs::symlink(s.join("devices/virtio2"), s.join("class/net/eth0/device"))
            .unwrap();
        mk("class/net/lo");
        w("class/net/lo/ifindex", "1\n");

        let found = discover(s);
        let names: Vec<&str> = found.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["loop1", "vda", "eth0"]);
        let vda = &found[1];
        assert_eq!(
            (vda.driver.as_str(), vda.class, vda.queues, vda.dev),
            (
                "virtio_blk",
                DriverClass::Paravirtual,
                2,
                Some(enlight_probes::kernel::make_dev(254, 0))
            )
        );
        assert_eq!(found[0].driver, "loop");
        assert_eq!(found[0].class, DriverClass::Virtual);
        let eth0 = &found[2];
        assert_eq!(
            (
                eth0.driver.as_str(),
                eth0.ifindex,
                eth0.queues,
                eth0.device.as_str()
            ),
            ("virtio_net", Some(2), 1, "nic")
        );
    }
}
