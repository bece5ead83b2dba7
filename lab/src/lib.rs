//! `enlight-lab`: a real Linux guest under QEMU with enlightd inside it.
//!
//! - [`image`]: Debian's guest kernel (`apt-get download` + `dpkg -x`, the version looked up with
//!   `apt-cache`) and a busybox initramfs holding the drivers' modules, ethtool, fio, iperf3,
//!   enlightd and enlight with their shared libraries, cached under a directory the user names
//!   and rebuilt when a fingerprint of its inputs changes.
//! - [`accel`]: KVM when `/dev/kvm` runs a full guest (hardware VMX/SVM), TCG otherwise, and why.
//! - [`guest`]: boots the guest with the devices asked for (IDE, virtio-blk, virtio-scsi disks;
//!   e1000, virtio-net NICs on taps in a network namespace the lab creates), waits for it within
//!   a deadline (an error names the last console line), runs commands in it over a second
//!   serial port, forwards a host TCP port to the guest (for Prometheus and `enlight top`), and
//!   removes everything it created when dropped.
//! - [`modules`]: the modules those devices need, in load order.

pub mod accel;
pub mod guest;
pub mod image;
pub mod modules;
mod netns;

pub use accel::Accel;
pub use guest::{CommandOutput, Guest, GuestSpec};
pub use image::{Image, ImageSpec};

/// A disk the guest can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiskKind {
    /// Emulated IDE on the PIIX controller of QEMU's `pc` machine (guest driver `ata_piix`).
    Ide,
    /// Paravirtual virtio-blk (guest driver `virtio_blk`).
    VirtioBlk,
    /// Paravirtual SCSI (guest drivers `virtio_scsi` + `sd_mod`).
    VirtioScsi,
}

/// A NIC the guest can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NicKind {
    /// Emulated Intel 82540EM (guest driver `e1000`).
    E1000,
    /// Paravirtual virtio-net (guest driver `virtio_net`).
    VirtioNet,
}

impl DiskKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            DiskKind::Ide => "ide",
            DiskKind::VirtioBlk => "virtio-blk",
            DiskKind::VirtioScsi => "virtio-scsi",
        }
    }
    /// The guest driver that runs it.
    pub fn driver(self) -> &'static str {
        match self {
            DiskKind::Ide => "ata_piix",
            DiskKind::VirtioBlk => "virtio_blk",
            DiskKind::VirtioScsi => "virtio_scsi",
        }
    }
}

impl NicKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            NicKind::E1000 => "e1000",
            NicKind::VirtioNet => "virtio-net",
        }
    }
    /// The guest driver that runs it.
    pub fn driver(self) -> &'static str {
        match self {
            NicKind::E1000 => "e1000",
            NicKind::VirtioNet => "virtio_net",
        }
    }
}

impl std::str::FromStr for DiskKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ide" => Ok(DiskKind::Ide),
            "virtio-blk" => Ok(DiskKind::VirtioBlk),
            "virtio-scsi" => Ok(DiskKind::VirtioScsi),
            _ => Err(format!(
                "unknown disk {s:?}: ide, virtio-blk or virtio-scsi"
            )),
        }
    }
}

impl std::str::FromStr for NicKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "e1000" => Ok(NicKind::E1000),
            "virtio-net" => Ok(NicKind::VirtioNet),
            _ => Err(format!("unknown NIC {s:?}: e1000 or virtio-net")),
        }
    }
}

/// What the lab can fail at.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Tool(String),
    #[error("guest kernel modules: {0}")]
    Module(String),
    #[error("the guest did not {what} within {secs} s; last console line: {last_line:?}\n--- the console's last lines (its log goes with the guest's run directory) ---\n{log}")]
    Deadline {
        what: String,
        secs: u64,
        last_line: String,
        log: String,
    },
    #[error("the guest exited ({status}) before {what}; last console line: {last_line:?}\n--- the console's last lines (its log goes with the guest's run directory) ---\n{log}")]
    Exited {
        what: String,
        status: String,
        last_line: String,
        log: String,
    },
    #[error("the guest image {image} is {image_mib} MiB, too large for a guest of {memory_mib} MiB: the kernel holds the image and its unpacked copy in RAM at once (give the guest at least {needed_mib} MiB)")]
    ImageTooLarge {
        image: String,
        image_mib: u64,
        memory_mib: u32,
        needed_mib: u64,
    },
    #[error("guest command channel: {0}")]
    Channel(String),
}

impl LabError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Runs a host tool to completion; a failure names it and keeps its stderr.
pub(crate) fn run_tool(cmd: &mut std::process::Command) -> Result<String, LabError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| LabError::Tool(format!("{shown}: {e} (is it installed?)")))?;
    if !out.status.success() {
        return Err(LabError::Tool(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
