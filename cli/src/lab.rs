//! `enlight lab`: a real Linux guest under QEMU (Debian's kernel, emulated or paravirtual disks
//! and NICs) with enlightd running inside it, its /metrics and API forwarded to the host
//! (crate `enlight-lab`; docs/lab.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use enlight_lab::{Accel, DiskKind, Guest, GuestSpec, Image, ImageSpec, NicKind};

use crate::children::DieWithParent;

#[derive(Args, Debug)]
pub struct LabArgs {
    /// Cache for the guest kernel and root file system images [default:
    /// $XDG_CACHE_HOME/enlight-lab or ~/.cache/enlight-lab].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// A disk for the guest (repeat for more): ide (emulated PIIX IDE), virtio-blk, virtio-scsi.
    #[arg(long = "disk", value_name = "KIND", default_values_t = [DiskArg(DiskKind::VirtioBlk)])]
    pub disks: Vec<DiskArg>,
    /// A NIC for the guest (repeat for more): e1000 (emulated), virtio-net. Each is on a tap in
    /// a network namespace the lab creates (host end 10.78.<i>.1, guest 10.78.<i>.2).
    #[arg(long = "nic", value_name = "KIND", default_values_t = [NicArg(NicKind::E1000)])]
    pub nics: Vec<NicArg>,
    /// Accelerator: auto (KVM when /dev/kvm runs a full guest, else TCG), kvm, tcg.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    pub accel: String,
    /// Guest memory in MiB, 256..=16384.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(256..=16384))]
    pub memory_mib: u32,
    /// Size of each guest disk in MiB (sparse files, removed on exit), 16..=65536.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=65536))]
    pub disk_mib: u64,
    /// Seconds the guest may take to boot, 5..=3600.
    #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(5..=3600))]
    pub boot_timeout: u64,
    /// The enlightd to run in the guest [default: the enlightd beside this enlight].
    #[arg(long, value_name = "PATH")]
    pub enlightd: Option<PathBuf>,
    /// Host address forwarded to the guest's enlightd (/metrics, API; port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:9470", value_name = "ADDR")]
    pub forward: SocketAddr,
    /// Extra flags for the guest's enlightd (e.g. --enlightd-flags=--dry-run); it always runs
    /// with --kernel.
    #[arg(long, value_name = "FLAGS", default_value = "")]
    pub enlightd_flags: String,
    /// Let the guest's enlightd tune this kernel device live (repeat for more; guest names such
    /// as eth0): the tuner runs in auto mode with `[kernel] tune` naming these and `dry_run =
    /// false`; `enlight restore` in the guest puts the originals back.
    #[arg(long = "tune", value_name = "DEVICE")]
    pub tune: Vec<String>,
    /// Append the guest's serial console to this file when the lab ends (never truncated)
    /// [default: kept only in the guest's run directory, removed on exit].
    #[arg(long, value_name = "PATH")]
    pub console_log: Option<PathBuf>,
    /// Run this command in the guest once enlightd has been started (under TCG it takes a
    /// minute or more before it serves), print its output, then stop.
    #[arg(long, value_name = "SH")]
    pub run: Option<String>,
}

#[derive(Clone, Copy, Debug)]
pub struct DiskArg(pub DiskKind);
#[derive(Clone, Copy, Debug)]
pub struct NicArg(pub NicKind);

impl std::str::FromStr for DiskArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(DiskArg)
    }
}
impl std::str::FromStr for NicArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(NicArg)
    }
}
impl std::fmt::Display for DiskArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name())
    }
}
impl std::fmt::Display for NicArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name())
    }
}

/// The default cache directory.
pub fn default_cache() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("enlight-lab");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/enlight-lab")
}

/// The accelerator asked for, with the reason (auto detects).
pub fn choose_accel(arg: &str) -> (Accel, String) {
    match arg {
        "kvm" => (Accel::Kvm, "asked for with --accel kvm".into()),
        "tcg" => (Accel::Tcg, "asked for with --accel tcg".into()),
        _ => enlight_lab::accel::detect(),
    }
}

/// The executables the guest image carries: the tools the lab runs inside, and enlightd and
/// enlight (the given enlightd, and the enlight beside it, or this one).
pub fn image_executables(enlightd: &std::path::Path) -> Result<Vec<PathBuf>> {
    let me = std::env::current_exe().context("locating this enlight")?;
    let enlight = enlightd
        .parent()
        .map(|d| d.join("enlight"))
        .filter(|p| p.is_file())
        .unwrap_or(me);
    Ok(vec![
        "ethtool".into(),
        "fio".into(),
        "iperf3".into(),
        enlightd.to_path_buf(),
        enlight,
    ])
}

/// The enlightd beside this enlight (what `cargo install` and the package put there).
pub fn sibling_enlightd() -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating this enlight")?;
    let p = me.with_file_name("enlightd");
    anyhow::ensure!(
        p.is_file(),
        "no enlightd beside {} (build it, or name one with --enlightd)",
        me.display()
    );
    Ok(p)
}

/// Builds (or takes from the cache) the image, boots a guest, and starts enlightd in it.
/// The guest enlightd's configuration when it may tune `devices` (pure): auto tuner, the
/// kernel side on, only those devices changed. One line for the guest's `printf`.
pub fn tune_config(devices: &[String]) -> Result<String> {
    for d in devices {
        anyhow::ensure!(
            !d.is_empty()
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "--tune {d:?}: not a device name"
        );
    }
    let names: Vec<String> = devices.iter().map(|d| format!("\\\"{d}\\\"")).collect();
    Ok(format!(
        "[tuner]\\nmode = \\\"auto\\\"\\n[kernel]\\nenabled = true\\ntune = [{}]\\ndry_run = false\\n",
        names.join(", ")
    ))
}

pub fn boot(
    cache: PathBuf,
    enlightd: PathBuf,
    spec: &GuestSpec,
    enlightd_flags: &str,
    tune: &[String],
) -> Result<Guest> {
    let image = Image::prepare(&ImageSpec {
        cache_dir: cache,
        executables: image_executables(&enlightd)?,
    })
    .context("preparing the guest image")?;
    eprintln!(
        "enlight lab: kernel {} ({}), image {}{}",
        image.kernel_release,
        image.kernel_package,
        image.initrd.display(),
        if image.rebuilt {
            " (built)"
        } else {
            " (cached)"
        }
    );
    let guest = Guest::boot(
        spec,
        &image,
        &|c| {
            c.die_with_parent(libc::SIGKILL);
        },
        &crate::signals::stop_requested,
    )?;
    let mut flags = enlightd_flags.to_string();
    if !tune.is_empty() {
        guest.check(
            &format!("printf \"{}\" > /etc/enlightd.toml", tune_config(tune)?),
            Duration::from_secs(30),
        )?;
        flags.push_str(" --config /etc/enlightd.toml");
    }
    guest.check(
        &format!(
            "enlightd --kernel --listen 0.0.0.0:9464 --interval-ms 500 {flags} > /tmp/enlightd.log 2>&1 &"
        ),
        Duration::from_secs(30),
    )?;
    Ok(guest)
}

pub fn run(args: LabArgs) -> Result<()> {
    crate::signals::install_stop_handlers()?;
    let (accel, why) = choose_accel(&args.accel);
    eprintln!(
        "enlight lab: accelerator {accel} ({why}){}",
        if accel == Accel::Tcg {
            ": an emulator; its timings are not a KVM guest's"
        } else {
            ""
        }
    );
    let enlightd = match args.enlightd {
        Some(p) => p,
        None => sibling_enlightd()?,
    };
    if let Some(p) = &args.console_log {
        // QEMU's file chardev truncates; a file the user names is only ever appended to, so
        // the guest's console goes to our run directory and is appended at the end.
        anyhow::ensure!(!p.is_dir(), "--console-log {} is a directory", p.display());
    }
    let spec = GuestSpec {
        accel,
        disks: args.disks.iter().map(|d| d.0).collect(),
        nics: args.nics.iter().map(|n| n.0).collect(),
        memory_mib: args.memory_mib,
        disk_mib: args.disk_mib,
        boot_timeout: Duration::from_secs(args.boot_timeout),
        ..GuestSpec::default()
    };
    let cache = args.cache.unwrap_or_else(default_cache);
    let result = (|| -> Result<()> {
        let guest = boot(cache, enlightd, &spec, &args.enlightd_flags, &args.tune)?;
        let result = serve(&guest, &args.forward, args.run.as_deref());
        if let Some(p) = &args.console_log {
            append_console(&guest, p);
        }
        result
    })();
    eprintln!("enlight lab: guest stopped; its network namespace, taps and disk images removed");
    result
}

fn append_console(guest: &Guest, to: &std::path::Path) {
    use std::io::Write;
    let Ok(text) = std::fs::read(guest.console_log()) else {
        return;
    };
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(to)
    {
        Ok(mut f) => {
            let _ = f.write_all(&text);
        }
        Err(e) => eprintln!("enlight lab: --console-log {}: {e}", to.display()),
    }
}

fn serve(guest: &Guest, forward: &SocketAddr, run: Option<&str>) -> Result<()> {
    let bound = guest.forward(*forward, 9464)?;
    for n in &guest.nics {
        eprintln!(
            "enlight lab: {} in the guest is {} ({}); host end {} on {} in network namespace {}",
            n.kind.name(),
            n.guest_addr,
            n.mac,
            n.host_addr,
            n.tap,
            guest.netns_name()
        );
    }
    for (kind, _) in &guest.disks {
        eprintln!("enlight lab: disk {} ({})", kind.name(), kind.driver());
    }
    crate::signals::line(format!(
        "guest {} ({}) ready: metrics http://{bound}/metrics  API http://{bound}/api/v1/devices  (enlight top --daemon {bound})",
        guest.kernel_release, guest.accel
    ));
    if let Some(cmd) = run {
        let out = guest.run(cmd, Duration::from_secs(3600))?;
        crate::signals::text(&out.output);
        anyhow::ensure!(out.success(), "guest command failed ({})", out.status);
        return Ok(());
    }
    eprintln!("enlight lab: Ctrl-C (or SIGTERM, SIGHUP) stops the guest and removes everything");
    while !crate::signals::stop_requested() {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tuning_config_names_only_the_given_devices() {
        let c = tune_config(&["eth0".into(), "vda".into()]).unwrap();
        // What the guest's printf turns it into.
        let text = c.replace("\\n", "\n").replace("\\\"", "\"");
        assert!(text.contains("mode = \"auto\""), "{text}");
        assert!(text.contains("tune = [\"eth0\", \"vda\"]"), "{text}");
        assert!(text.contains("dry_run = false"), "{text}");
        assert!(tune_config(&["eth0; rm -rf /".into()]).is_err());
    }
}
