//! The runs of `enlight bench compare`: each a real device process (`enlight disk`,
//! `enlight emulated-disk`, `enlight nic`, `enlight emulated-nic`) observed by the bench's own
//! enlightd, its figures read from enlightd's view of the device, the kernel's kvm tracepoints
//! and the process's CPU time.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use enlight_abi::api::DeviceView;
use enlight_driver::registry::DeviceKind;

use super::traffic::{iperf3_bits_per_second, ping_rtts_us};
use super::{DiskRun, NicRun, Report};
use crate::children::DieWithParent;

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

pub(super) struct Bench {
    exe: PathBuf,
    dir: tempfile::TempDir,
    backing: PathBuf,
    daemon: enlightd::Daemon,
    kernel: Option<enlight_probes::kernel::KernelProbes>,
    seconds: f64,
}

impl Bench {
    /// The bench's own enlightd (in this process, the probes attached) over a scratch directory
    /// with a 64 MiB backing file, and the kernel's kvm tracepoints when KVM works (a note in
    /// `report` when they do not load).
    pub(super) fn start(
        seconds: f64,
        kvm: &Result<(), String>,
        report: &mut Report,
    ) -> Result<Bench> {
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
        Ok(Bench {
            exe: std::env::current_exe()?,
            dir,
            backing,
            daemon,
            kernel: kernel_probes,
            seconds,
        })
    }

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
        while self.views()?.iter().any(|d| d.attached) {
            if Instant::now() > deadline {
                bail!("enlightd still attached to an earlier device after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Every device as enlightd's `/api/v1/devices` serves it, read as any client of the API
    /// reads it: the shared ABI's lenient view, which a value this build does not know (a newer
    /// daemon's) does not break. The bench reports the API's figures.
    fn views(&self) -> Result<Vec<DeviceView>> {
        serde_json::from_slice(&self.daemon.handle().devices_json())
            .context("reading enlightd's /api/v1/devices")
    }

    fn view(&self, name: &str) -> Result<DeviceView> {
        self.views()?
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

    pub(super) fn disk_run(
        &self,
        kind: &DeviceKind,
        transport: &str,
        bs: u32,
        qd: u32,
    ) -> Result<DiskRun> {
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
    pub(super) fn nic_run(&self, kind: &DeviceKind, transport: &str, pings: u32) -> Result<NicRun> {
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
