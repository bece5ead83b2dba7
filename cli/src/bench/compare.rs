//! `enlight bench compare`: emulated against enlightened I/O, side by side in one run.
//!
//! The disk matrix is kind (emulated IDE in PIO mode, synthetic VMBus-style) x transport
//! (thread; KVM when it works, for the emulated disk) x I/O size x queue depth; the NIC part is
//! ping latency and iperf3 throughput through the emulated NE2000 between two namespaces. Every
//! run is a real device process observed by an in-process enlightd with the eBPF probes
//! attached, so latency percentiles and traps per I/O come from the probes (the same figures
//! /metrics serves), and on KVM the exits per I/O come from the kernel's own `kvm:*`
//! tracepoints (eBPF, per VMM process). CPU time per I/O is the device process's user+system
//! time (`wait4`), guest time included.
//!
//! Writes `compare.json` (every figure), `compare.md` (the tables) and `compare.png` (throughput
//! and traps per I/O against I/O size) into `--out`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::children::DieWithParent;
use clap::Args;
use enlight_driver::registry::DeviceKind;
use serde::{Deserialize, Serialize};

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// A smaller matrix and 1-second runs: a few minutes in all.
    #[arg(long)]
    quick: bool,
    /// Directory for compare.json, compare.md and compare.png.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Seconds per disk run, 0.1..=3600 [default: 3, or 1 with --quick; with --guest 10, or
    /// 3 with --quick].
    #[arg(long, value_parser = crate::ranges::seconds(0.1..=3600.0))]
    seconds: Option<f64>,
    /// Compare inside a real guest kernel instead (`enlight lab`): IDE against virtio-blk,
    /// e1000 against virtio-net, measured by the guest's enlightd; writes compare-guest.json,
    /// compare-guest.md and compare-guest.png. The report names the accelerator (TCG or KVM).
    #[arg(long)]
    guest: bool,
    /// With --guest: the lab's image cache (as `enlight lab --cache`).
    #[arg(long, value_name = "DIR", requires = "guest")]
    cache: Option<PathBuf>,
    /// With --guest: the enlightd to run in the guest [default: the one beside this enlight].
    #[arg(long, value_name = "PATH", requires = "guest")]
    enlightd: Option<PathBuf>,
}

/// One disk run (or a skipped one, with the reason).
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct DiskRun {
    pub kind: DeviceKind,
    pub transport: String,
    pub block_size: u32,
    pub queue_depth: u32,
    /// Why this run did not happen, if it did not.
    pub skipped: Option<String>,
    /// Completed I/Os counted by eBPF (`io_reap`).
    pub ops: u64,
    /// Completed I/Os counted by the workload itself.
    pub workload_ops: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mb_per_s: f64,
    /// Latency percentiles from the eBPF histogram, µs.
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Device process CPU (user + system, guest included) per I/O, µs.
    pub cpu_us_per_io: f64,
    /// Register accesses trapped per I/O, from the `trap` probe (eBPF).
    pub traps_per_io: f64,
    /// Doorbells plus interrupts (eventfd signals) per I/O, as the device's `io_reap` hits
    /// carried them to eBPF: what a synthetic device pays instead of traps.
    #[serde(default)]
    pub signals_per_io: f64,
    /// VM exits per I/O from the kernel's tracepoints (eBPF on kvm:*), KVM runs only.
    pub exits_per_io: Option<f64>,
    /// Which tracepoints `exits_per_io` counts.
    pub exits_source: Option<String>,
    /// The VMM's own exit count per I/O (a cross-check of the above).
    pub vmm_exits_per_io: Option<f64>,
}

/// The NIC part.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct NicRun {
    pub kind: DeviceKind,
    pub transport: String,
    pub skipped: Option<String>,
    /// iperf3 TCP throughput guest → host, Mbit/s (receiver side).
    pub iperf3_mbit_s: f64,
    /// ping round trips host → guest, µs.
    pub ping_p50_us: f64,
    pub ping_p99_us: f64,
    pub ping_max_us: f64,
    pub pings: u32,
    /// Frames through the NIC (eBPF tx + rx).
    pub frames: u64,
    /// Register accesses trapped per frame (eBPF).
    pub traps_per_frame: f64,
    /// Doorbells plus interrupts per frame (eBPF `signal`).
    #[serde(default)]
    pub signals_per_frame: f64,
    /// Device process CPU per frame, µs.
    pub cpu_us_per_frame: f64,
    /// VM exits per frame from the kernel's tracepoints (eBPF on kvm:*), KVM runs only.
    #[serde(default)]
    pub exits_per_frame: Option<f64>,
    /// The VMM's own exit count per frame (a cross-check of the above).
    #[serde(default)]
    pub vmm_exits_per_frame: Option<f64>,
}

/// Everything one run of the bench measured.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Report {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub quick: bool,
    pub seconds_per_run: f64,
    pub kvm: String,
    pub disk: Vec<DiskRun>,
    pub nic: Vec<NicRun>,
    pub notes: Vec<String>,
}

/// A finished child: its stdout lines and its CPU time.
struct Finished {
    lines: Vec<String>,
    cpu_s: f64,
    success: bool,
}

/// Waits for `pid` with `wait4`, returning (exited successfully, user + system seconds).
fn wait_rusage(pid: u32) -> Result<(bool, f64)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with pointers to locals.
    let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru) };
    if rc < 0 {
        bail!("wait4({pid}): {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        tv(ru.ru_utime) + tv(ru.ru_stime),
    ))
}

fn run_child(mut cmd: Command) -> Result<(u32, Finished)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .die_with_parent(libc::SIGTERM)
        .spawn()
        .context("spawning a device process")?;
    let pid = child.id();
    let lines: Vec<String> = BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
        .collect();
    let (success, cpu_s) = wait_rusage(pid)?;
    // The child is reaped; forget it without a second wait.
    std::mem::forget(child);
    Ok((
        pid,
        Finished {
            lines,
            cpu_s,
            success,
        },
    ))
}

struct Bench {
    exe: PathBuf,
    dir: tempfile::TempDir,
    backing: PathBuf,
    daemon: enlightd::Daemon,
    kernel: Option<enlight_probes::kernel::KernelProbes>,
    seconds: f64,
}

impl Bench {
    fn settle(&self, ticks: u64) {
        let h = self.daemon.handle();
        let target = h.ticks() + ticks;
        let deadline = Instant::now() + Duration::from_secs(20);
        while h.ticks() < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until enlightd holds no attachment: the probes attach per executable, so a
    /// lingering one would enable the next device's semaphores before enlightd has attached to
    /// that device, and it would start unobserved.
    fn wait_detached(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.daemon.handle().devices().iter().any(|d| d.attached) {
            if Instant::now() > deadline {
                bail!("enlightd still attached to an earlier device after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn view(&self, name: &str) -> Result<enlightd::DeviceView> {
        self.daemon
            .handle()
            .devices()
            .into_iter()
            .find(|d| d.name == name)
            .with_context(|| format!("enlightd never saw {name}"))
    }

    /// (exits counted by the kernel's tracepoints for `pid`, which tracepoints).
    fn kernel_exits(&self, pid: u32) -> Option<(u64, String)> {
        use enlight_probes::kernel::types::{KVM_EXIT, KVM_MMIO, KVM_PIO};
        let snap = self.kernel.as_ref()?.snapshot().ok()?;
        let sum = |ev: u32| -> u64 {
            snap.kvm
                .iter()
                .filter(|(k, _)| k.pid == pid && k.event == ev)
                .map(|(_, n)| n)
                .sum()
        };
        let exits = sum(KVM_EXIT);
        if exits > 0 {
            Some((exits, "kvm:kvm_exit".into()))
        } else {
            // A KVM backend that never fires kvm_exit (this image's nested PVM) still fires
            // kvm_pio and kvm_mmio for the exits that reach the VMM.
            Some((
                sum(KVM_PIO) + sum(KVM_MMIO),
                "kvm:kvm_pio + kvm:kvm_mmio".into(),
            ))
        }
    }

    fn disk_run(&self, kind: &DeviceKind, transport: &str, bs: u32, qd: u32) -> Result<DiskRun> {
        let name = format!("cmp-{kind}-{transport}-{bs}-{qd}");
        let workload = format!(
            "qd={qd},bs={bs},rw=70,pattern=random,duration={}s,seed=7",
            self.seconds
        );
        self.wait_detached()?;
        let mut cmd = Command::new(&self.exe);
        if *kind == DeviceKind::Synthetic && transport == "thread" {
            cmd.args(["disk"]);
        } else if *kind == DeviceKind::Synthetic {
            cmd.args([
                "emulated-disk",
                "--device",
                "ring",
                "--transport",
                transport,
            ]);
        } else {
            cmd.args(["emulated-disk", "--transport", transport]);
        }
        cmd.args([
            "--name",
            &name,
            "--workload",
            &workload,
            "--wait-for-probes",
            "30",
        ])
        .arg("--backing")
        .arg(&self.backing)
        .arg("--runtime-dir")
        .arg(self.dir.path());
        let (pid, done) = run_child(cmd)?;
        if !done.success {
            bail!("{name}: the device process failed");
        }
        let last: serde_json::Value = serde_json::from_str(
            done.lines
                .last()
                .with_context(|| format!("{name}: no report"))?,
        )?;
        self.settle(3);
        let v = self.view(&name)?;
        let seconds = last["elapsed_s"].as_f64().unwrap_or(self.seconds).max(1e-9);
        let ops = v.total.ops_total;
        let per = |x: f64| if ops > 0 { x / ops as f64 } else { 0.0 };
        let us = |s: Option<f64>| s.unwrap_or(0.0) * 1e6;
        let mut run = DiskRun {
            kind: kind.clone(),
            transport: transport.into(),
            block_size: bs,
            queue_depth: qd,
            skipped: None,
            ops,
            workload_ops: last["ops_total"].as_u64().unwrap_or(0),
            seconds,
            iops: ops as f64 / seconds,
            mb_per_s: v.total.bytes_total as f64 / seconds / 1e6,
            p50_us: us(v.total.p50_seconds),
            p99_us: us(v.total.p99_seconds),
            p999_us: us(v.total.p999_seconds),
            cpu_us_per_io: per(done.cpu_s * 1e6),
            traps_per_io: per(v.traps_total as f64),
            signals_per_io: per((v.doorbells_total + v.interrupts_total) as f64),
            ..Default::default()
        };
        if transport == "kvm" {
            if let Some((exits, source)) = self.kernel_exits(pid) {
                run.exits_per_io = Some(per(exits as f64));
                run.exits_source = Some(source);
            }
            run.vmm_exits_per_io = last["vm_exits"].as_u64().map(|e| per(e as f64));
        }
        Ok(run)
    }

    /// `kind` emulated runs `enlight emulated-nic` (on `transport`), synthetic `enlight
    /// nic`; both print their namespaces and addresses first.
    fn nic_run(&self, kind: &DeviceKind, transport: &str, pings: u32) -> Result<NicRun> {
        let (name, subcommand) = match (kind, transport) {
            (DeviceKind::Synthetic, _) => ("cmp_nic", "nic"),
            (_, "kvm") => ("cmp_emunick", "emulated-nic"),
            _ => ("cmp_emunic", "emulated-nic"),
        };
        self.wait_detached()?;
        let mut cmd = Command::new(&self.exe);
        cmd.args([subcommand, "--name", name, "--wait-for-probes", "30"]);
        if subcommand == "emulated-nic" {
            cmd.args(["--transport", transport]);
        }
        let mut child = cmd
            .arg("--runtime-dir")
            .arg(self.dir.path())
            .stdout(Stdio::piped())
            .die_with_parent(libc::SIGTERM)
            .spawn()
            .with_context(|| format!("spawning enlight {subcommand}"))?;
        let pid = child.id();
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut first = String::new();
        out.read_line(&mut first)?;
        let ends: crate::emulated::NicEndpoints =
            serde_json::from_str(&first).context("the NIC's endpoints line")?;
        // The NIC carries frames only once its probes are attached.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.view(name).map(|v| v.attached).unwrap_or(false) {
            if Instant::now() > deadline {
                bail!("enlightd did not attach to {name}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.settle(2);
        let (ping, rtts) = ping_rtts_us(&ends, pings)?;
        let q = |p: f64| {
            rtts.get(((rtts.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(0.0)
        };
        let iperf3 = iperf3_bits_per_second(&ends, name, self.seconds.max(2.0));
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let lines: Vec<String> = out.lines().map_while(Result::ok).collect();
        let (_, cpu_s) = wait_rusage(pid)?;
        std::mem::forget(child);
        let bps = iperf3?;
        ensure!(
            !rtts.is_empty(),
            "no ping reply through {name}:\n{}",
            String::from_utf8_lossy(&ping.stdout)
        );
        self.settle(3);
        let v = self.view(name)?;
        let frames = v.total.ops_total;
        let per = |n: f64| if frames > 0 { n / frames as f64 } else { 0.0 };
        let (exits_per_frame, vmm_exits_per_frame) = if transport == "kvm" {
            let last: serde_json::Value = lines
                .last()
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or_default();
            (
                self.kernel_exits(pid).map(|(n, _)| per(n as f64)),
                last["vm_exits"].as_u64().map(|e| per(e as f64)),
            )
        } else {
            (None, None)
        };
        Ok(NicRun {
            kind: kind.clone(),
            transport: transport.into(),
            exits_per_frame,
            vmm_exits_per_frame,
            signals_per_frame: if frames > 0 {
                (v.doorbells_total + v.interrupts_total) as f64 / frames as f64
            } else {
                0.0
            },
            skipped: None,
            iperf3_mbit_s: bps / 1e6,
            ping_p50_us: q(0.5),
            ping_p99_us: q(0.99),
            ping_max_us: rtts.last().copied().unwrap_or(0.0),
            pings: rtts.len() as u32,
            frames,
            traps_per_frame: if frames > 0 {
                v.traps_total as f64 / frames as f64
            } else {
                0.0
            },
            cpu_us_per_frame: if frames > 0 {
                cpu_s * 1e6 / frames as f64
            } else {
                0.0
            },
        })
    }
}

/// `pings` pings from the host end to the guest end of a NIC, 10 ms apart: ping's output, and
/// the round-trip times it printed, in µs, sorted.
fn ping_rtts_us(
    ends: &crate::emulated::NicEndpoints,
    pings: u32,
) -> Result<(std::process::Output, Vec<f64>)> {
    let ping = Command::new("ip")
        .args(["netns", "exec", &ends.host_netns, "ping", "-c"])
        .arg(pings.to_string())
        .args(["-i", "0.01", "-W", "2", &ends.guest_ip])
        .die_with_parent(libc::SIGKILL)
        .output()
        .context("running ping (apt-get install iputils-ping)")?;
    let mut rtts: Vec<f64> = String::from_utf8_lossy(&ping.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    rtts.sort_by(f64::total_cmp);
    Ok((ping, rtts))
}

/// One iperf3 TCP run of `seconds` from the guest end of NIC `name` to a server at its host
/// end: the bits per second received.
fn iperf3_bits_per_second(
    ends: &crate::emulated::NicEndpoints,
    name: &str,
    seconds: f64,
) -> Result<f64> {
    let server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ends.host_netns,
            "iperf3",
            "-s",
            "-1",
            "-B",
            &ends.host_ip,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .die_with_parent(libc::SIGKILL)
        .spawn()
        .context("running iperf3 (apt-get install iperf3)")?;
    // iperf3 3.12 with -J exits 0 even when it could not connect, saying so only in the
    // JSON's "error": retry while the server is not listening yet; any other failure is
    // reported, not read as 0 bit/s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let iperf3: Result<f64> = loop {
        let client = match Command::new("ip")
            .args([
                "netns",
                "exec",
                &ends.guest_netns,
                "iperf3",
                "-J",
                "-c",
                &ends.host_ip,
                "-t",
            ])
            .arg(format!("{seconds}"))
            .die_with_parent(libc::SIGKILL)
            .output()
        {
            Ok(client) => client,
            // The server is still waiting for its one client: it is killed below.
            Err(e) => break Err(anyhow::Error::new(e).context("running iperf3")),
        };
        let j: serde_json::Value = serde_json::from_slice(&client.stdout).unwrap_or_default();
        if let Some(bps) = j["end"]["sum_received"]["bits_per_second"].as_f64() {
            break Ok(bps);
        }
        let why = j["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&client.stderr).into_owned());
        if !why.contains("unable to connect") || Instant::now() > deadline {
            break Err(anyhow::anyhow!("iperf3 through {name}: {why}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut server = server;
    if iperf3.is_err() {
        let _ = server.kill();
    }
    let _ = server.wait();
    iperf3
}

/// Seconds one batch of `qd` requests of `bs` bytes is expected to take on `transport`, from
/// the trap count of a request and a conservative cost per trap on this kind of host.
fn estimated_batch_s(transport: &str, bs: u32, qd: u32) -> f64 {
    let traps = 8.0 + (bs / 512) as f64 * 257.0;
    let per_trap = if transport == "kvm" { 100e-6 } else { 5e-6 };
    qd as f64 * traps * per_trap
}

pub fn run(args: CompareArgs) -> Result<()> {
    if args.guest {
        return super::guest::run(
            args.quick,
            args.seconds,
            &args.out,
            args.cache,
            args.enlightd,
        );
    }
    enlight_probes::preflight().context("the comparison is measured by the eBPF probes")?;
    let seconds = args.seconds.unwrap_or(if args.quick { 1.0 } else { 3.0 });
    let host = super::machine::Machine::read();
    let kvm = enlight_vmm::detect();
    let mut report = Report {
        kernel: host.kernel.unwrap_or_default(),
        cpu: host.cpu_model.unwrap_or_default(),
        cores: host.cpus.unwrap_or(1),
        quick: args.quick,
        seconds_per_run: seconds,
        kvm: match &kvm {
            Ok(()) => "available".into(),
            Err(r) => format!("unavailable: {r}"),
        },
        ..Default::default()
    };
    let dir = tempfile::Builder::new()
        .prefix("enlight-compare-")
        .tempdir()?;
    let backing = dir.path().join("disk.img");
    enlight_driver::disk::Backing::create(&backing, 64 << 20)?;
    // Whatever else the daemon's configuration holds keeps its default.
    #[allow(clippy::needless_update)]
    let config = enlightd::Config {
        runtime_dir: dir.path().into(),
        interval_ms: 100,
        device_grace_secs: 3600,
        listen: "127.0.0.1:0".parse()?,
        ..enlightd::Config::default()
    };
    let daemon = enlightd::Daemon::start(config).context("starting enlightd")?;
    let kernel_probes = if kvm.is_ok() {
        use enlight_probes::kernel::{Group, KernelProbes, Selection};
        match KernelProbes::load(&Selection(vec![Group::Kvm])) {
            Ok(k) => Some(k),
            Err(e) => {
                report
                    .notes
                    .push(format!("kvm tracepoints not loaded: {e}"));
                None
            }
        }
    } else {
        None
    };
    let bench = Bench {
        exe: std::env::current_exe()?,
        dir,
        backing,
        daemon,
        kernel: kernel_probes,
        seconds,
    };
    let (sizes, depths): (&[u32], &[u32]) = if args.quick {
        (&[512, 4096, 65536], &[1, 8])
    } else {
        (&[512, 4096, 16384, 65536], &[1, 8, 32])
    };
    let mut cases = vec![(DeviceKind::Emulated, "thread")];
    if kvm.is_ok() {
        cases.push((DeviceKind::Emulated, "kvm"));
    } else if let Err(r) = &kvm {
        report.notes.push(format!("no KVM transport: {r}"));
    }
    cases.push((DeviceKind::Synthetic, "thread"));
    if kvm.is_ok() {
        cases.push((DeviceKind::Synthetic, "kvm"));
    }
    report.notes.push(
        "synthetic/thread is the VMBus-style disk (`enlight disk`: rings in shared memory, \
         eventfd signals between threads); synthetic/kvm is the descriptor ring in guest memory \
         with one ioeventfd doorbell per batch (`enlight emulated-disk --device ring`)"
            .into(),
    );
    let budget = if args.quick { 3.0 } else { 12.0 };
    for (kind, transport) in &cases {
        let (kind, transport) = (kind, *transport);
        for &bs in sizes {
            for &qd in depths {
                let est = estimated_batch_s(transport, bs, qd);
                let run = if *kind == DeviceKind::Emulated && est > budget {
                    DiskRun {
                        kind: kind.clone(),
                        transport: transport.into(),
                        block_size: bs,
                        queue_depth: qd,
                        skipped: Some(format!(
                            "one batch of {qd} x {bs} B is about {est:.0} s of traps here"
                        )),
                        ..Default::default()
                    }
                } else {
                    crate::signals::check_stop()?;
                    eprintln!("compare: disk {kind}/{transport} bs={bs} qd={qd}");
                    let mut run = bench.disk_run(kind, transport, bs, qd)?;
                    // eBPF must have seen every I/O the workload did; an attach that failed
                    // (and was retried too late) shows as a shortfall: run it again.
                    for attempt in 2..=3 {
                        if run.ops == run.workload_ops {
                            break;
                        }
                        report.notes.push(format!(
                            "{kind}/{transport} {bs} B QD {qd}: eBPF saw {} of {} I/Os; run again (attempt {attempt})",
                            run.ops, run.workload_ops
                        ));
                        run = bench.disk_run(kind, transport, bs, qd)?;
                    }
                    run
                };
                report.disk.push(run);
            }
        }
    }
    let mut nic_cases = vec![(DeviceKind::Emulated, "thread")];
    if kvm.is_ok() {
        // The NE2000 on KVM: ~770 PIO exits per full frame. The ping count is kept small so the
        // run stays within seconds on hosts whose exits cost tens of microseconds (nested KVM).
        nic_cases.push((DeviceKind::Emulated, "kvm"));
    }
    nic_cases.push((DeviceKind::Synthetic, "thread"));
    for (kind, transport) in nic_cases {
        crate::signals::check_stop()?;
        eprintln!("compare: NIC {kind}/{transport} (ping, iperf3)");
        let pings = match (transport, args.quick) {
            ("kvm", _) => 50,
            (_, true) => 50,
            _ => 200,
        };
        let run = bench.nic_run(&kind, transport, pings)?;
        report.nic.push(run);
    }
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join("compare.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
    let md = markdown(&report);
    std::fs::write(args.out.join("compare.md"), &md)?;
    png(&report, &args.out.join("compare.png"))?;
    crate::signals::line(md);
    eprintln!(
        "compare: wrote {}, compare.md and compare.png",
        json.display()
    );
    Ok(())
}

fn human_size(b: u32) -> String {
    if b >= 1024 {
        format!("{} KiB", b / 1024)
    } else {
        format!("{b} B")
    }
}

/// The Markdown tables of a report.
pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Kernel {}, {} ({} cores); {} s per run{}; KVM {}.\n",
        r.kernel,
        r.cpu,
        r.cores,
        r.seconds_per_run,
        if r.quick { " (--quick)" } else { "" },
        r.kvm
    );
    let _ = writeln!(
        o,
        "| disk | transport | I/O size | QD | IOPS | MB/s | p50 µs | p99 µs | p99.9 µs | CPU µs/I/O | traps/I/O | exits/I/O | signals/I/O |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for d in &r.disk {
        if let Some(why) = &d.skipped {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | skipped: {why} ||||||||| ",
                d.kind,
                d.transport,
                human_size(d.block_size),
                d.queue_depth
            );
            continue;
        }
        let _ =
            writeln!(
            o,
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {:.2} |",
            d.kind,
            d.transport,
            human_size(d.block_size),
            d.queue_depth,
            d.iops,
            d.mb_per_s,
            d.p50_us,
            d.p99_us,
            d.p999_us,
            d.cpu_us_per_io,
            d.traps_per_io,
            d.exits_per_io.map(|e| format!("{e:.1}")).unwrap_or_else(|| "-".into()),
            d.signals_per_io
        );
    }
    let _ = writeln!(
        o,
        "\n| NIC | transport | iperf3 Mbit/s | ping p50 µs | ping p99 µs | ping max µs | frames | traps/frame | exits/frame | signals/frame | CPU µs/frame |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|");
    for n in &r.nic {
        let exits = n
            .exits_per_frame
            .map_or_else(|| "-".to_string(), |e| format!("{e:.1}"));
        let _ = writeln!(
            o,
            "| {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {:.1} | {} | {:.2} | {:.1} |",
            n.kind,
            n.transport,
            n.iperf3_mbit_s,
            n.ping_p50_us,
            n.ping_p99_us,
            n.ping_max_us,
            n.frames,
            n.traps_per_frame,
            exits,
            n.signals_per_frame,
            n.cpu_us_per_frame
        );
    }
    if !r.notes.is_empty() {
        let _ = writeln!(o);
        for n in &r.notes {
            let _ = writeln!(o, "- {n}");
        }
    }
    o
}

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers DejaVu Sans as plotters' "sans-serif".
pub(super) fn register_font() -> Result<()> {
    use plotters::style::FontStyle;
    let font = FONT_PATHS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .context("no DejaVuSans.ttf (apt-get install fonts-dejavu-core)")?;
    // plotters keeps registered fonts for the life of the process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("DejaVuSans.ttf is not a usable font"))?;
    Ok(())
}

/// Two panels against I/O size at queue depth 1: throughput (MB/s) and traps per I/O, one line
/// per (kind, transport), both on log scales.
pub fn png(r: &Report, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let root = BitMapBackend::new(path, (1400, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let mut series: Vec<(String, Vec<&DiskRun>)> = Vec::new();
    for d in r
        .disk
        .iter()
        .filter(|d| d.skipped.is_none() && d.queue_depth == 1)
    {
        let key = format!("{} / {}", d.kind, d.transport);
        match series.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(d),
            None => series.push((key, vec![d])),
        }
    }
    let colors = [RED, BLUE, RGBColor(0, 150, 0), RGBColor(200, 120, 0)];
    type Metric = fn(&DiskRun) -> f64;
    let panel_specs: [(&str, &str, Metric); 2] = [
        ("Throughput at QD 1", "MB/s", |d| d.mb_per_s),
        (
            "Traps per I/O (eBPF; thread = KVM; synthetic 0, on the floor)",
            "register accesses trapped",
            |d| d.traps_per_io,
        ),
    ];
    for (area, (title, ylabel, f)) in panels.iter().zip(panel_specs) {
        let ys: Vec<f64> = series
            .iter()
            .flat_map(|(_, v)| v.iter().map(|d| f(d)))
            .filter(|y| *y > 0.0)
            .collect();
        let ymin = ys.iter().copied().fold(f64::INFINITY, f64::min).min(1.0) / 2.0;
        let ymax = ys.iter().copied().fold(1.0, f64::max) * 2.0;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((256f64..131072f64).log_scale(), (ymin..ymax).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("I/O size, bytes")
            .y_desc(ylabel)
            .draw()?;
        for ((name, runs), color) in series.iter().zip(colors.iter().cycle()) {
            let pts: Vec<(f64, f64)> = runs
                .iter()
                .map(|d| (d.block_size as f64, f(d).max(ymin)))
                .collect();
            let color = *color;
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let run = |kind: &str, transport: &str, bs: u32, mb: f64, traps: f64| DiskRun {
            kind: kind.into(),
            transport: transport.into(),
            block_size: bs,
            queue_depth: 1,
            ops: 100,
            mb_per_s: mb,
            traps_per_io: traps,
            exits_per_io: (transport == "kvm").then_some(traps + 1.0),
            ..Default::default()
        };
        Report {
            kernel: "6.18".into(),
            cpu: "test".into(),
            cores: 2,
            disk: vec![
                run("emulated", "thread", 512, 0.5, 264.0),
                run("emulated", "thread", 4096, 0.4, 2063.0),
                run("emulated", "kvm", 512, 0.02, 264.0),
                run("synthetic", "thread", 512, 20.0, 0.0),
                DiskRun {
                    kind: "emulated".into(),
                    transport: "kvm".into(),
                    block_size: 65536,
                    queue_depth: 8,
                    skipped: Some("too slow".into()),
                    ..Default::default()
                },
            ],
            nic: vec![
                NicRun {
                    kind: "emulated".into(),
                    transport: "thread".into(),
                    ..Default::default()
                },
                NicRun {
                    kind: "emulated".into(),
                    transport: "kvm".into(),
                    iperf3_mbit_s: 0.11,
                    traps_per_frame: 600.0,
                    exits_per_frame: Some(651.5),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn markdown_has_a_row_per_run_and_names_skips() {
        let md = markdown(&sample());
        assert_eq!(
            md.lines().filter(|l| l.starts_with("| emulated")).count(),
            6
        );
        assert!(
            md.contains("| emulated | kvm | 0.11 |") && md.contains("| 600.0 | 651.5 |"),
            "the KVM NIC row with its exits per frame:\n{md}"
        );
        assert!(md.contains("| emulated | kvm | 512 B | 1 |"));
        assert!(md.contains("skipped: too slow"));
        assert!(
            md.contains("| 265.0 |"),
            "exits per I/O shown for KVM:\n{md}"
        );
    }

    #[test]
    fn the_chart_renders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        png(&sample(), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 10_000);
    }

    #[test]
    fn kvm_runs_are_estimated_far_slower_than_thread_runs() {
        assert!(estimated_batch_s("kvm", 65536, 8) > 12.0);
        assert!(estimated_batch_s("thread", 4096, 8) < 1.0);
    }
}
