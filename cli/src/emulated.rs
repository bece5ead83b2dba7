//! `enlight emulated-disk`: one emulated IDE disk device process.
//!
//! The register-level IDE model (enlight_driver::emulated) over a backing file, driven by the
//! polling ATA PIO driver through a trap transport: `thread` (a hand-off to the model's thread
//! per register access) or `kvm` (a tiny guest driver in a real VM whose `in`/`out` instructions
//! exit to the model; `auto` uses KVM when it works and says why not otherwise). Registered as
//! `kind: "emulated"` so enlightd observes it. `--device ring` runs the enlightened counterpart
//! on KVM instead (a descriptor ring with one ioeventfd doorbell per batch, `kind: "synthetic"`).
//! Prints the workload's figures plus the trap and VM-exit counts as one JSON object per line,
//! like `enlight disk`. `enlight emulated-nic` runs the NE2000 on the same two transports.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use enlight_driver::emulated::{self, BlockTransport, ThreadIdeDisk, TransportKind};
use enlight_driver::registry::{self, DeviceKind, DeviceRecord, Registration};
use enlight_driver::settings::DeviceSettings;
use enlight_driver::workload::{self, Limit, WorkloadSnapshot, WorkloadSpec};
use serde::Serialize;

use crate::{ranges, signals};

#[derive(Args, Debug)]
pub struct EmulatedDiskArgs {
    /// Device name (unique in the runtime directory).
    #[arg(long, default_value = "emu0")]
    name: String,
    /// Device id inside this process (the `dev` argument of the USDT probes), 0..=65535.
    #[arg(long, default_value_t = 0, value_parser = crate::ranges::int(0..=65535u32))]
    dev_id: u32,
    /// Backing file: the disk's contents (the workload writes to it unless rw=100).
    #[arg(long)]
    backing: PathBuf,
    /// Create the backing file with this many MiB (1..=1048576), written out with zeros so that
    /// deleting it later is quick, or grow a smaller one to it (its bytes are kept). A larger
    /// existing file is refused unless --shrink is given.
    #[arg(long, value_name = "MIB", value_parser = ranges::mib)]
    create_mib: Option<u64>,
    /// Let --create-mib cut an existing larger backing file down to MIB, destroying the data
    /// past that point.
    #[arg(long, requires = "create_mib")]
    shrink: bool,
    /// Registry directory [default: $ENLIGHT_RUNTIME_DIR or /run/enlight].
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Workload, as for `enlight disk` (one phase; qd requests are submitted together and
    /// served one after another: an IDE channel has no queue). Block size at most 128k.
    #[arg(long, default_value = "qd=1,bs=4k,rw=70,pattern=random", value_parser = ranges::spec)]
    workload: WorkloadSpec,
    /// Stop after this many seconds, 0.001..=31536000 (overrides the workload's own limit).
    #[arg(long, value_name = "SECS", value_parser = ranges::duration_secs())]
    duration: Option<f64>,
    /// Wait up to SECS (0..=3600) for a tracer (enlightd) to attach every probe before starting.
    #[arg(long, value_name = "SECS", value_parser = ranges::probe_wait_secs())]
    wait_for_probes: Option<f64>,
    /// How register accesses reach the model: thread, kvm, or auto (kvm when it works).
    #[arg(long, default_value = "thread")]
    transport: String,
    /// The device: `ide` (the emulated IDE disk, kind "emulated") or `ring` (its enlightened
    /// counterpart on KVM: a descriptor ring in guest memory and one ioeventfd doorbell per
    /// batch, kind "synthetic"; needs `--transport kvm`).
    #[arg(long, default_value = "ide")]
    device: String,
    /// Print one JSON object per line (the workload's figures, the transport, traps and VM
    /// exits; the last has "done": true) instead of a readable line; the default when stdout is
    /// not a terminal.
    #[arg(long)]
    json: bool,
}

/// One output line: the workload's figures plus the traps behind them.
#[derive(Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    workload: &'a WorkloadSnapshot,
    transport: TransportKind,
    traps: u64,
    vm_exits: u64,
}

/// `thread`, `kvm`, or `auto`: KVM when it works, else threads with the reason on stderr.
pub fn resolve_transport(transport: &str) -> Result<TransportKind> {
    Ok(match transport {
        "auto" => match enlight_vmm::detect() {
            Ok(()) => TransportKind::Kvm,
            Err(reason) => {
                eprintln!(
                    "enlight: KVM transport unavailable ({reason}); using the thread transport"
                );
                TransportKind::Thread
            }
        },
        other => other
            .parse()
            .map_err(|_| anyhow::anyhow!("unknown transport {other:?} (thread, kvm or auto)"))?,
    })
}

/// Opens the emulated disk on the transport asked for.
pub fn open_disk(
    backing: &std::path::Path,
    serial: &str,
    transport: &str,
) -> Result<Box<dyn BlockTransport>> {
    let kind = resolve_transport(transport)?;
    Ok(match kind {
        TransportKind::Thread => Box::new(ThreadIdeDisk::open(backing, serial)?),
        TransportKind::Kvm => Box::new(
            enlight_vmm::KvmIdeDisk::open(backing, serial).context("starting the KVM transport")?,
        ),
    })
}

pub fn run(args: EmulatedDiskArgs) -> Result<()> {
    signals::install_stop_handlers().context("installing signal handlers")?;
    let mut spec = args.workload;
    if let Some(secs) = args.duration {
        spec.limit = Limit::Duration(Duration::from_secs_f64(secs));
    }
    if spec.block_size > emulated::MAX_IO_BYTES {
        bail!(
            "block size {} is above the emulated disk's {}-byte maximum",
            spec.block_size,
            emulated::MAX_IO_BYTES
        );
    }
    if let Some(mib) = args.create_mib {
        crate::disk::size_backing(&args.backing, mib, args.shrink)?;
    }
    let (mut disk, kind): (Box<dyn BlockTransport>, DeviceKind) = match args.device.as_str() {
        "ide" => (
            open_disk(&args.backing, &args.name, &args.transport)
                .with_context(|| format!("starting emulated disk {}", args.name))?,
            DeviceKind::Emulated,
        ),
        "ring" => {
            if args.transport != "kvm" {
                bail!("--device ring runs on --transport kvm (the thread-transport enlightened disk is `enlight disk`)");
            }
            (
                Box::new(
                    enlight_vmm::ring_disk::KvmRingDisk::open(&args.backing, args.dev_id)
                        .context("starting the ring disk on KVM")?,
                ),
                DeviceKind::Synthetic,
            )
        }
        other => bail!("unknown --device {other:?} (ide or ring)"),
    };

    let runtime_dir = args.runtime_dir.unwrap_or_else(registry::runtime_dir);
    let record = DeviceRecord {
        name: args.name.clone(),
        device: "disk".into(),
        kind,
        dev_id: args.dev_id,
        pid: std::process::id(),
        pid_start_time: registry::start_time_of(std::process::id()),
        exe: std::env::current_exe().context("locating this executable")?,
        started_unix_ms: registry::now_unix_ms(),
        // No VMBus rings and no moderation: the record carries the defaults, which nothing reads.
        settings: DeviceSettings::default(),
        control: None,
    };
    let registration = Registration::register(&runtime_dir, &record)
        .with_context(|| format!("registering in {}", runtime_dir.display()))?;
    if let Some(secs) = args.wait_for_probes {
        workload::wait_for_probes(
            args.dev_id,
            spec.queue_depth,
            Duration::from_secs_f64(secs),
            signals::stop_flag(),
        )?;
    }
    let transport = disk.transport();
    let stdout = std::io::stdout();
    let json = crate::output::json_wanted(args.json);
    let emit = |w: &WorkloadSnapshot, traps: u64, vm_exits: u64| {
        let mut out = stdout.lock();
        let line = Line {
            workload: w,
            transport,
            traps,
            vm_exits,
        };
        // A closed pipe (the reader went away) is not a reason to stop the device.
        if json {
            let _ = serde_json::to_writer(&mut out, &line);
        } else {
            let per_op = if w.ops_total > 0 {
                format!(" ({:.0} per I/O)", traps as f64 / w.ops_total as f64)
            } else {
                String::new()
            };
            let exits = if vm_exits > 0 {
                format!(", {vm_exits} KVM exits")
            } else {
                String::new()
            };
            let _ = write!(
                out,
                "{}  [{transport:?}: {traps} traps{per_op}{exits}]",
                crate::output::workload_line(w)
            );
        }
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    };
    let (report, traps) = {
        let d: &mut dyn BlockTransport = disk.as_mut();
        emulated::workload::run(d, args.dev_id, &spec, signals::stop_flag(), |w, t| {
            emit(w, t.traps, t.vm_exits)
        })?
    };
    emit(&report, traps.traps, traps.vm_exits);
    drop(registration);
    Ok(())
}

#[derive(Args, Debug)]
pub struct EmulatedNicArgs {
    /// Device name (unique in the runtime directory; at most 22 of [A-Za-z0-9_] for the
    /// namespace names).
    #[arg(long, default_value = "emunic0")]
    name: String,
    /// Device id inside this process (the `dev` argument of the USDT probes and the last byte
    /// of the NIC's MAC address), 0..=255.
    #[arg(long, default_value_t = 0, value_parser = crate::ranges::int(0..=255u32))]
    dev_id: u32,
    /// Registry directory [default: $ENLIGHT_RUNTIME_DIR or /run/enlight].
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Stop after this many seconds, 0.001..=31536000 (else at SIGINT/SIGTERM/SIGHUP).
    #[arg(long, value_name = "SECS", value_parser = ranges::duration_secs())]
    duration: Option<f64>,
    /// Wait up to SECS (0..=3600) for a tracer (enlightd) to attach every probe before carrying
    /// frames.
    #[arg(long, value_name = "SECS", value_parser = ranges::probe_wait_secs())]
    wait_for_probes: Option<f64>,
    /// How the guest driver's register accesses reach the NE2000 model: thread (a hand-off to
    /// the model's thread per access), kvm (a guest program in a real VM whose `in`/`out`
    /// instructions exit to the model), or auto (kvm when it works, with the reason otherwise).
    #[arg(long, default_value = "thread")]
    transport: String,
    /// Print one JSON object per line (first the namespaces, then the NIC's figures each
    /// second, the last with "done": true) instead of readable lines; the default when stdout
    /// is not a terminal.
    #[arg(long)]
    json: bool,
}

/// The first line `enlight emulated-nic` prints: where to send traffic.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct NicEndpoints {
    pub guest_netns: String,
    pub host_netns: String,
    pub guest_ip: String,
    pub host_ip: String,
}

/// `enlight emulated-nic`: an NE2000 between two namespaces it creates (and removes on exit),
/// its guest driver on the thread transport or in a KVM guest (`--transport`).
pub fn run_nic(args: EmulatedNicArgs) -> Result<()> {
    use enlight_driver::emulated::nic;
    use enlight_driver::netns::{NetPair, GUEST_IP, HOST_IP};
    use std::sync::atomic::{AtomicBool, Ordering};

    signals::install_stop_handlers().context("installing signal handlers")?;
    let transport = resolve_transport(&args.transport)?;
    if transport == TransportKind::Kvm {
        // Fail before creating anything when KVM was asked for and does not work.
        enlight_vmm::detect().map_err(|reason| {
            anyhow::anyhow!("starting the KVM transport: KVM unavailable: {reason}")
        })?;
    }
    let pair = NetPair::create(&args.name, 1500)
        .with_context(|| format!("creating the namespaces of {}", args.name))?;
    let endpoints = NicEndpoints {
        guest_netns: pair.guest.name().to_string(),
        host_netns: pair.host.name().to_string(),
        guest_ip: GUEST_IP.to_string(),
        host_ip: HOST_IP.to_string(),
    };
    let (guest_tap, host_tap, namespaces) = pair.split();
    let runtime_dir = args.runtime_dir.unwrap_or_else(registry::runtime_dir);
    let record = DeviceRecord {
        name: args.name.clone(),
        device: "nic".into(),
        kind: DeviceKind::Emulated,
        dev_id: args.dev_id,
        pid: std::process::id(),
        pid_start_time: registry::start_time_of(std::process::id()),
        exe: std::env::current_exe().context("locating this executable")?,
        started_unix_ms: registry::now_unix_ms(),
        settings: DeviceSettings::default(),
        control: None,
    };
    let registration = Registration::register(&runtime_dir, &record)
        .with_context(|| format!("registering in {}", runtime_dir.display()))?;
    if let Some(secs) = args.wait_for_probes {
        workload::wait_for_probes(
            args.dev_id,
            1,
            Duration::from_secs_f64(secs),
            signals::stop_flag(),
        )?;
    }
    let json = crate::output::json_wanted(args.json);
    let print = |v: &dyn lines::Line| {
        let mut out = std::io::stdout().lock();
        // A closed pipe (the reader went away) is not a reason to stop the device.
        let text = if json { v.json() } else { v.human() };
        let _ = out.write_all(text.as_bytes());
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    };
    let started = std::time::Instant::now();
    let on_interval = |f: &nic::NicFigures| print(&(started.elapsed(), *f));
    print(&endpoints);
    // The NIC stops at a signal or at the deadline, whichever first.
    let stop = AtomicBool::new(false);
    let deadline = args
        .duration
        .map(|s| std::time::Instant::now() + Duration::from_secs_f64(s));
    let (figures, model) = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if signals::stop_flag().load(Ordering::Relaxed)
                    || deadline.is_some_and(|d| std::time::Instant::now() >= d)
                {
                    stop.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mac = [0x02, 0x00, 0x00, 0x0e, 0x20, args.dev_id as u8];
        let r = match transport {
            TransportKind::Thread => {
                nic::serve(guest_tap, host_tap, mac, args.dev_id, &stop, on_interval)
            }
            TransportKind::Kvm => nic::serve_with(
                guest_tap,
                host_tap,
                mac,
                args.dev_id,
                &stop,
                on_interval,
                enlight_vmm::nic::KvmNe2kGuest::new,
            ),
        };
        stop.store(true, Ordering::Relaxed);
        r
    })?;
    print(&FinalNicLine {
        figures,
        model_tx_frames: model.tx_frames,
        model_rx_frames: model.rx_frames,
        model_rx_refused: model.rx_refused,
        model_accesses: model.accesses,
        transport,
        done: true,
    });
    drop(registration);
    drop(namespaces);
    Ok(())
}

/// The last line of `enlight emulated-nic`.
#[derive(Serialize)]
struct FinalNicLine {
    #[serde(flatten)]
    figures: enlight_driver::emulated::nic::NicFigures,
    model_tx_frames: u64,
    model_rx_frames: u64,
    model_rx_refused: u64,
    model_accesses: u64,
    transport: TransportKind,
    done: bool,
}

/// `enlight emulated-nic`'s three kinds of line, as JSON or for a person.
mod lines {
    use enlight_driver::emulated::nic::NicFigures;
    use std::time::Duration;

    pub trait Line {
        fn json(&self) -> String;
        fn human(&self) -> String;
    }

    fn json(v: &impl serde::Serialize) -> String {
        serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    fn figures(f: &NicFigures) -> String {
        let exits = if f.vm_exits > 0 {
            format!(", {} KVM exits", f.vm_exits)
        } else {
            String::new()
        };
        format!(
            "tx {} frames ({} B), rx {} frames ({} B), {} traps{exits}, errors tx {} rx {}",
            f.tx_frames, f.tx_bytes, f.rx_frames, f.rx_bytes, f.traps, f.tx_errors, f.rx_errors
        )
    }

    impl Line for super::NicEndpoints {
        fn json(&self) -> String {
            json(self)
        }
        fn human(&self) -> String {
            format!(
                "ready: guest {} ({}), host {} ({})\n  try: ip netns exec {} ping {}",
                self.guest_netns,
                self.guest_ip,
                self.host_netns,
                self.host_ip,
                self.guest_netns,
                self.host_ip
            )
        }
    }

    /// A second's figures (totals so far), with the time since the start.
    impl Line for (Duration, NicFigures) {
        fn json(&self) -> String {
            json(&self.1)
        }
        fn human(&self) -> String {
            format!("{:>5.0}s  {}", self.0.as_secs_f64(), figures(&self.1))
        }
    }

    impl Line for super::FinalNicLine {
        fn json(&self) -> String {
            json(self)
        }
        fn human(&self) -> String {
            format!(
                "done ({:?} transport): {}; the card saw tx {} rx {} frames, refused {}, {} register accesses",
                self.transport,
                figures(&self.figures),
                self.model_tx_frames,
                self.model_rx_frames,
                self.model_rx_refused,
                self.model_accesses
            )
        }
    }
}
