//! Soak: hostile guests flood the synthetic disk's and NIC's host services for a while, never
//! reading a completion, while this process samples each host's resident memory. A benchmark, not
//! a test: it reports the RSS series and how much it moved, and asserts nothing.
//!
//! Each host service runs in a child process of its own (this binary re-executed with `--role`),
//! so that its RSS is its alone; the channel's host end reaches it over a Unix socket as in a
//! cross-process device (sealed memfd and eventfds as `SCM_RIGHTS`). The guest side, here, writes
//! requests the host must answer with an error status (an unknown op for the disk, an
//! out-of-range send section for the NIC) as fast as the outbound ring takes them, signals the
//! host, and never reads its inbound ring. Before issue 12's fix the hosts read every request
//! and queued every completion: the disk host grew by 135-775 MB and the NIC host by 0.7-2 GB in
//! 10 s. Children die with this process (`PR_SET_PDEATHSIG`) and end when their socket closes.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use serde::Serialize;

use enlight_driver::channel::{self, ChannelConfig, GuestEnd};
use enlight_driver::disk::{self, Backing, DiskOptions, DiskRequest, VspControl, SECTOR};
use enlight_driver::nic::{FramePipe, NicHostStats, NicKnobs, NicOptions, NicVsp, TxRequest};
use enlight_driver::ring::{WriteOutcome, FLAG_COMPLETION_REQUESTED, PACKET_TYPE_INBAND};
use enlight_driver::settings::DeviceSettings;

mod machine;
use machine::first_line;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Parent: floods both hosts and samples their RSS.
    Guest,
    /// Child: the disk's host service on the host end received over `--sock-fd`.
    DiskHost,
    /// Child: the NIC's host service on the host end received over `--sock-fd`.
    NicHost,
}

#[derive(Parser)]
#[command(about = "Soak: hostile guests flood the disk and NIC hosts; their RSS is sampled")]
struct Args {
    /// Seconds of flooding.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 1.0)]
    sample_secs: f64,
    /// Directory for the disk's backing file.
    #[arg(long, default_value = "/var/tmp")]
    dir: std::path::PathBuf,
    /// Where to write the samples as JSON (nothing written if absent).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Internal: which process this is.
    #[arg(long, value_enum, default_value = "guest", hide = true)]
    role: Role,
    /// Internal: the hand-off socket a host child inherits.
    #[arg(long, hide = true)]
    sock_fd: Option<RawFd>,
    /// Internal: the disk host's backing file.
    #[arg(long, hide = true)]
    backing: Option<std::path::PathBuf>,
}

/// What a host child reports when its socket closes.
#[derive(Serialize, serde::Deserialize, Debug, Default, Clone, Copy)]
struct HostReport {
    requests: u64,
    queue_peak: u64,
    throttled: u64,
}

#[derive(Serialize)]
struct Sample {
    t_secs: f64,
    disk_host_rss_kib: u64,
    nic_host_rss_kib: u64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    kernel: String,
    secs: u64,
    samples: Vec<Sample>,
    disk: Summary,
    nic: Summary,
}

#[derive(Serialize)]
struct Summary {
    /// Requests the guest wrote into the outbound ring.
    guest_requests: u64,
    /// Writes that found the ring full (the guest kept trying).
    guest_full: u64,
    host: HostReport,
    rss_first_kib: u64,
    rss_last_kib: u64,
    rss_min_kib: u64,
    rss_max_kib: u64,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Starts a host child on `role`, returns it with the guest end of its channel.
fn spawn_host(
    role: Role,
    cfg: &ChannelConfig,
    backing: Option<&std::path::Path>,
) -> Result<(Child, GuestEnd)> {
    let (ours, theirs) = UnixStream::pair()?;
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--role")
        .arg(match role {
            Role::DiskHost => "disk-host",
            Role::NicHost => "nic-host",
            Role::Guest => unreachable!("the guest is this process"),
        })
        .arg("--sock-fd")
        .arg(fd.to_string())
        .stdout(Stdio::piped());
    if let Some(b) = backing {
        cmd.arg("--backing").arg(b);
    }
    // SAFETY: only async-signal-safe calls between fork and exec: the child inherits the socket
    // (CLOEXEC cleared) and dies with us.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = cmd.spawn().context("starting a host child")?;
    drop(theirs);
    let guest = channel::create_for_peer(cfg, ours)?;
    Ok((child, guest))
}

/// Floods `guest`'s outbound ring with `payload` until `stop`, never reading the inbound ring.
fn flood(
    mut guest: GuestEnd,
    payload: Vec<u8>,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    full: Arc<AtomicU64>,
) -> Result<()> {
    let mut tag = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match guest.tx.try_write(
            PACKET_TYPE_INBAND,
            FLAG_COMPLETION_REQUESTED,
            tag,
            &[&payload],
        )? {
            WriteOutcome::Written { .. } => {
                tag += 1;
                written.fetch_add(1, Ordering::Relaxed);
                guest.to_host.signal()?;
            }
            WriteOutcome::Full { .. } => {
                full.fetch_add(1, Ordering::Relaxed);
                // A hostile guest keeps poking; a little yield keeps this bench from starving
                // the host it measures on a 2-CPU machine.
                guest.to_host.signal()?;
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    Ok(())
}

fn report_line(r: &HostReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(r)?)?;
    Ok(())
}

fn disk_host(sock: UnixStream, backing: &std::path::Path) -> Result<()> {
    let host = channel::receive_host_end(&sock)?;
    let backing = Backing::open(backing)?;
    let control = VspControl::new()?;
    // serve returns when the guest's process is gone (the socket closes).
    let r = disk::serve(host, backing, 0, DiskOptions::default(), control.clone());
    let s = control.stats();
    report_line(&HostReport {
        requests: s.requests.load(Ordering::Relaxed),
        queue_peak: s.queue_peak.load(Ordering::Relaxed),
        throttled: s.throttled.load(Ordering::Relaxed),
    })?;
    r.map_err(Into::into)
}

fn nic_host(sock: UnixStream) -> Result<()> {
    let host = channel::receive_host_end(&sock)?;
    let (outer, inner) = FramePipe::pair()?;
    let knobs = Arc::new(NicKnobs::new(&DeviceSettings::default())?);
    let stats = Arc::new(NicHostStats::default());
    let mut vsp = NicVsp::new(
        host,
        inner,
        0,
        NicOptions::default(),
        knobs,
        Arc::clone(&stats),
    )?;
    // SAFETY: plain syscall; we own the descriptor on success.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    anyhow::ensure!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor owned by nobody else.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let stop = Arc::new(AtomicBool::new(false));
    {
        // The guest's process is gone when the hand-off socket reads end-of-file.
        let (stop, wake) = (Arc::clone(&stop), Arc::clone(&wake));
        std::thread::spawn(move || {
            let mut b = [0u8; 64];
            while matches!(std::io::Read::read(&mut &sock, &mut b), Ok(n) if n > 0) {}
            stop.store(true, Ordering::Release);
            let one = 1u64;
            // SAFETY: writing 8 bytes from a local to an eventfd we hold open.
            unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        });
    }
    let r = vsp.run(&stop, wake.as_raw_fd(), Duration::from_millis(100));
    drop(outer);
    report_line(&HostReport {
        requests: stats.tx_errors.load(Ordering::Relaxed) + stats.tx_frames.load(Ordering::Relaxed),
        queue_peak: stats.queue_peak.load(Ordering::Relaxed),
        throttled: stats.throttled.load(Ordering::Relaxed),
    })?;
    r.map_err(Into::into)
}

fn summary(samples: &[u64], written: u64, full: u64, host: HostReport) -> Summary {
    Summary {
        guest_requests: written,
        guest_full: full,
        host,
        rss_first_kib: samples.first().copied().unwrap_or(0),
        rss_last_kib: samples.last().copied().unwrap_or(0),
        rss_min_kib: samples.iter().copied().min().unwrap_or(0),
        rss_max_kib: samples.iter().copied().max().unwrap_or(0),
    }
}

fn read_report(child: Child) -> Result<HostReport> {
    let out = child.wait_with_output()?;
    let line = BufReader::new(&out.stdout[..])
        .lines()
        .map_while(|l| l.ok())
        .last()
        .unwrap_or_default();
    serde_json::from_str(&line).with_context(|| format!("host report {line:?} ({})", out.status))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let sock = || -> Result<UnixStream> {
        let fd = args.sock_fd.context("--sock-fd")?;
        // SAFETY: the parent passed this inherited socket to us; nobody else here uses it.
        Ok(unsafe { UnixStream::from_raw_fd(fd) })
    };
    match args.role {
        Role::DiskHost => return disk_host(sock()?, args.backing.as_deref().context("--backing")?),
        Role::NicHost => return nic_host(sock()?),
        Role::Guest => {}
    }

    std::fs::create_dir_all(&args.dir)?;
    let backing = tempfile::NamedTempFile::new_in(&args.dir)?;
    Backing::create(backing.path(), 16 << 20)?;
    let (disk_cfg, nic_cfg) = channel_configs();
    let (disk_child, disk_guest) = spawn_host(Role::DiskHost, &disk_cfg, Some(backing.path()))?;
    let (nic_child, nic_guest) = spawn_host(Role::NicHost, &nic_cfg, None)?;
    let (disk_pid, nic_pid) = (disk_child.id(), nic_child.id());

    let floods = Floods::start(disk_guest, nic_guest);
    let samples = sample_rss(&args, disk_pid, nic_pid, &floods);
    let ((dw, df), (nw, nf)) = floods.stop()?;
    // The guest ends are dropped with their threads: each child sees its socket close, reports
    // and exits.
    let disk_report = read_report(disk_child)?;
    let nic_report = read_report(nic_child)?;
    let disk_rss: Vec<u64> = samples.iter().map(|s| s.disk_host_rss_kib).collect();
    let nic_rss: Vec<u64> = samples.iter().map(|s| s.nic_host_rss_kib).collect();
    let report = Report {
        machine: first_line("/proc/cpuinfo", "model name"),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        secs: args.secs,
        disk: summary(&disk_rss, dw, df, disk_report),
        nic: summary(&nic_rss, nw, nf, nic_report),
        samples,
    };
    print_summary(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    Ok(())
}

/// The disk's and the NIC's channels, at the default settings.
fn channel_configs() -> (ChannelConfig, ChannelConfig) {
    let settings = DeviceSettings::default();
    let disk_cfg = ChannelConfig {
        out_ring_bytes: settings.ring_out_bytes as usize,
        in_ring_bytes: settings.ring_in_bytes as usize,
        extra_bytes: (DiskOptions::default().max_io_bytes * DiskOptions::default().queue_slots)
            as usize,
    };
    let nic_cfg = ChannelConfig {
        out_ring_bytes: settings.ring_out_bytes as usize,
        in_ring_bytes: settings.ring_in_bytes as usize,
        extra_bytes: NicOptions::default().extra_bytes(),
    };
    (disk_cfg, nic_cfg)
}

/// The two hostile guests: one thread each flooding its host with requests it must refuse (a
/// disk op that does not exist, a NIC send section out of range), with their counts of
/// requests written and of ring-full tries.
struct Floods {
    stop: Arc<AtomicBool>,
    disk: (Arc<AtomicU64>, Arc<AtomicU64>),
    nic: (Arc<AtomicU64>, Arc<AtomicU64>),
    threads: [std::thread::JoinHandle<Result<()>>; 2],
}

impl Floods {
    fn start(disk_guest: GuestEnd, nic_guest: GuestEnd) -> Floods {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = || (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let ((dw, df), (nw, nf)) = (counters(), counters());
        let bad_disk = DiskRequest {
            op: 0x7777,
            sectors: 8,
            buf_len: 8 * SECTOR,
            ..Default::default()
        };
        let bad_disk = bad_disk.encode().to_vec();
        let bad_nic = TxRequest {
            section: u32::MAX,
            len: 60,
        }
        .encode()
        .to_vec();
        let threads = [
            {
                let (stop, w, f) = (Arc::clone(&stop), Arc::clone(&dw), Arc::clone(&df));
                std::thread::spawn(move || flood(disk_guest, bad_disk, stop, w, f))
            },
            {
                let (stop, w, f) = (Arc::clone(&stop), Arc::clone(&nw), Arc::clone(&nf));
                std::thread::spawn(move || flood(nic_guest, bad_nic, stop, w, f))
            },
        ];
        Floods {
            stop,
            disk: (dw, df),
            nic: (nw, nf),
            threads,
        }
    }

    /// Requests written so far: (disk, NIC).
    fn written(&self) -> (u64, u64) {
        (
            self.disk.0.load(Ordering::Relaxed),
            self.nic.0.load(Ordering::Relaxed),
        )
    }

    /// Stops both floods (dropping the guest ends) and returns (written, full) for the disk,
    /// then for the NIC.
    fn stop(self) -> Result<((u64, u64), (u64, u64))> {
        self.stop.store(true, Ordering::Relaxed);
        for f in self.threads {
            f.join().expect("flood thread")?;
        }
        let load = |(w, f): &(Arc<AtomicU64>, Arc<AtomicU64>)| {
            (w.load(Ordering::Relaxed), f.load(Ordering::Relaxed))
        };
        Ok((load(&self.disk), load(&self.nic)))
    }
}

/// Samples both hosts' RSS every `--sample-secs` for `--secs`, printing a table row each.
fn sample_rss(args: &Args, disk_pid: u32, nic_pid: u32, floods: &Floods) -> Vec<Sample> {
    let start = Instant::now();
    let mut samples = Vec::new();
    println!("| t (s) | disk host RSS (KiB) | NIC host RSS (KiB) | disk requests written | NIC requests written |");
    println!("|---|---|---|---|---|");
    let period = Duration::from_secs_f64(args.sample_secs);
    let mut next = start;
    while start.elapsed() < Duration::from_secs(args.secs) {
        next += period;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let s = Sample {
            t_secs: start.elapsed().as_secs_f64(),
            disk_host_rss_kib: rss_kib(disk_pid),
            nic_host_rss_kib: rss_kib(nic_pid),
        };
        let (dw, nw) = floods.written();
        println!(
            "| {:.0} | {} | {} | {} | {} |",
            s.t_secs, s.disk_host_rss_kib, s.nic_host_rss_kib, dw, nw
        );
        samples.push(s);
    }
    samples
}

fn print_summary(report: &Report) {
    println!(
        "\nMachine: {}, kernel {}, {} s\n",
        report.machine, report.kernel, report.secs
    );
    println!("| host | guest requests written | host requests taken | queue peak | throttled | RSS first / last / min / max (KiB) |");
    println!("|---|---|---|---|---|---|");
    for (name, s) in [("disk", &report.disk), ("NIC", &report.nic)] {
        println!(
            "| {name} | {} | {} | {} | {} | {} / {} / {} / {} |",
            s.guest_requests,
            s.host.requests,
            s.host.queue_peak,
            s.host.throttled,
            s.rss_first_kib,
            s.rss_last_kib,
            s.rss_min_kib,
            s.rss_max_kib
        );
    }
}
