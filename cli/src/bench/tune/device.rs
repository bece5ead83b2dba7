//! The benchmark's harness: real `enlight disk` and `enlight nic` device processes (the NIC with
//! `ping`/`iperf3` traffic between its namespaces), the real eBPF probes attached to them,
//! windows read from the kernel maps, settings changed through the control socket.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use enlight_driver::registry::{self, DeviceRecord};
use enlight_driver::workload::WorkloadSnapshot;
use enlight_probes::{DevKey, IoKey, Probes};
use enlightd::tuner::backend::ControlBackend;
use enlightd::tuner::Cumulative;

use crate::children::DieWithParent;

/// Name of every benchmark device.
pub const DEVICE: &str = "bench0";

/// Probes, a private runtime directory and a backing file, shared by every run.
pub struct Harness {
    probes: Probes,
    _dir: tempfile::TempDir,
    runtime: PathBuf,
    backing: PathBuf,
    exe: PathBuf,
    /// The CPU device processes are pinned to.
    cpu: Option<usize>,
}

/// One running device process.
pub struct Device {
    child: Child,
    pub pid: u32,
    pub backend: ControlBackend,
    last_line: Arc<Mutex<Option<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Traffic generators of a NIC (killed before the device stops).
    traffic: Vec<Child>,
}

/// Traffic through a NIC scenario's device, from its guest namespace to its host namespace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NicTraffic {
    /// One iperf3 TCP stream (as fast as it goes).
    Tcp,
    /// iperf3 UDP at this many Mbit/s.
    Udp { mbit: u32 },
    /// ICMP echo, this many per second (and their replies).
    Ping { per_sec: u32 },
}

impl std::str::FromStr for NicTraffic {
    type Err = anyhow::Error;

    /// `tcp`, `udp=<Mbit/s>` or `ping=<per second>`.
    fn from_str(s: &str) -> Result<NicTraffic> {
        let num = |v: &str| -> Result<u32> {
            let n: u32 = v
                .parse()
                .with_context(|| format!("{v:?} in {s:?} is not a number"))?;
            anyhow::ensure!(n > 0, "{s:?}: the rate must be positive");
            Ok(n)
        };
        match s.split_once('=') {
            None if s == "tcp" => Ok(NicTraffic::Tcp),
            Some(("udp", v)) => Ok(NicTraffic::Udp { mbit: num(v)? }),
            Some(("ping", v)) => Ok(NicTraffic::Ping { per_sec: num(v)? }),
            _ => {
                bail!("unknown NIC traffic {s:?} (expected tcp, udp=<Mbit/s> or ping=<per second>)")
            }
        }
    }
}

/// `program` inside network namespace `ns` (`ip netns exec`), with no input or output, killed
/// with this process: a traffic generator of a rig.
pub(super) fn netns_command(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .die_with_parent(libc::SIGKILL);
    c
}

impl Harness {
    /// Checks privileges, loads the probes, creates a 256 MiB backing file in a temporary
    /// directory in `/dev/shm` (memory) where there is one: what is compared is the channel's
    /// signalling and moderation, which a real disk's millisecond variance would drown.
    pub fn new(cpu: Option<usize>) -> Result<Harness> {
        enlight_probes::preflight()?;
        let probes = Probes::load().context("loading the eBPF programs")?;
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("enlight-bench-tune-")
            .tempdir_in(base)?;
        let backing = dir.path().join("disk.img");
        enlight_driver::disk::Backing::create(&backing, 256 << 20)?;
        // Keep the executable attached for the whole run through this process (which fires no
        // probe): detaching the last process of an executable unregisters its uprobes, and a
        // device started right after could have its USDT semaphores decremented by that late
        // unregistration and never see `workload_start` enabled.
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut probes = probes;
        probes
            .attach_process(std::process::id(), &exe)
            .context("attaching the probes to this executable")?;
        Ok(Harness {
            probes,
            runtime: dir.path().join("run"),
            backing,
            _dir: dir,
            exe,
            cpu,
        })
    }

    /// Starts `enlight disk` with workload `plan`, waits for its registry record, attaches the
    /// probes (which lets its workload start) and connects to its control socket.
    pub fn start(&mut self, plan: &str) -> Result<Device> {
        let mut last = None;
        for attempt in 1..=4 {
            match self.start_once(plan) {
                Ok(d) => return Ok(d),
                Err(e) => {
                    eprintln!("   device start {attempt} failed: {e:#}; retrying");
                    last = Some(e);
                    // Re-register the executable's uprobes from scratch.
                    let me = std::process::id();
                    self.probes.detach_process(me);
                    std::thread::sleep(Duration::from_millis(300));
                    self.probes
                        .attach_process(me, &self.exe)
                        .context("re-attaching the probes to this executable")?;
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn start_once(&mut self, plan: &str) -> Result<Device> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("disk")
            .args([
                "--name",
                DEVICE,
                "--workload",
                plan,
                "--wait-for-probes",
                "8",
            ])
            .arg("--backing")
            .arg(&self.backing);
        self.spawn_device(cmd, "enlight disk", |_, _| Ok(Vec::new()))
    }

    /// Starts `enlight nic` for `secs` seconds, attaches the probes (which lets it announce
    /// itself ready), then starts `traffic` between its namespaces and waits for the first
    /// frames counted. `enlight nic` has no workload of its own: without traffic nothing is
    /// ever counted, and its ready line (the namespaces' names) comes only once the probes are
    /// attached.
    pub fn start_nic(&mut self, traffic: NicTraffic, secs: f64) -> Result<Device> {
        let mut last = None;
        for attempt in 1..=4 {
            let mut cmd = Command::new(&self.exe);
            cmd.args(["nic", "--name", DEVICE, "--wait-for-probes", "8"])
                .arg("--duration")
                .arg(format!("{:.1}", secs + 5.0));
            let run = self.spawn_device(cmd, "enlight nic", |first_line, deadline| {
                start_traffic(first_line, deadline, traffic, secs)
            });
            match run {
                Ok(d) => return Ok(d),
                Err(e) => {
                    eprintln!("   NIC start {attempt} failed: {e:#}; retrying");
                    last = Some(e);
                    let me = std::process::id();
                    self.probes.detach_process(me);
                    std::thread::sleep(Duration::from_millis(300));
                    self.probes
                        .attach_process(me, &self.exe)
                        .context("re-attaching the probes to this executable")?;
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// Spawns a device process, waits for its registry record, connects to its control socket,
    /// attaches the probes, runs `then` (given the process's first stdout line as it comes, and
    /// a deadline) for any helper processes, and waits for the first completions counted.
    fn spawn_device(
        &mut self,
        mut cmd: Command,
        what: &str,
        then: impl FnOnce(&Mutex<Option<String>>, Instant) -> Result<Vec<Child>>,
    ) -> Result<Device> {
        if let Some(cpu) = self.cpu {
            // SAFETY: the closure runs in the child between fork and exec and only makes one
            // system call (sched_setaffinity is async-signal-safe) on a set built on its stack.
            unsafe {
                cmd.pre_exec(move || {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .arg("--runtime-dir")
            .arg(&self.runtime)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .die_with_parent(libc::SIGTERM)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let pid = child.id();
        let first_line = Arc::new(Mutex::new(None::<String>));
        let last_line = Arc::new(Mutex::new(None));
        let reader = {
            let out = child.stdout.take().expect("piped stdout");
            let last_line = Arc::clone(&last_line);
            let first_line = Arc::clone(&first_line);
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    first_line
                        .lock()
                        .expect("line lock")
                        .get_or_insert_with(|| line.clone());
                    *last_line.lock().expect("line lock") = Some(line);
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        let record: DeviceRecord = loop {
            if let Some(r) = registry::list(&self.runtime)
                .0
                .into_iter()
                .find(|r| r.pid == pid)
            {
                break r;
            }
            if let Some(status) = child.try_wait()? {
                bail!("{what} exited ({status}) before registering");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("{what} did not register within 15 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let control = record
            .control
            .clone()
            .context("the device record names no control socket")?;
        // The record is written just before the socket is bound: retry for a while.
        let backend = loop {
            match ControlBackend::connect(&control) {
                Ok(b) => break b,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("connecting to {}", control.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        self.probes
            .attach_process(pid, &record.exe)
            .context("attaching the probes")?;
        let mut traffic = match then(&first_line, Instant::now() + Duration::from_secs(10)) {
            Ok(t) => t,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                self.probes.detach_process(pid);
                return Err(e);
            }
        };
        // The run's clock starts when the workload does.
        let deadline = Instant::now() + Duration::from_secs(8);
        loop {
            // Attaching a pid forgets its counts so far (the workload may have started already,
            // the executable being attached through this process): wait for completions.
            if self.cumulative(pid)?.ops > 0 {
                break;
            }
            if Instant::now() > deadline {
                // SAFETY: killing our own child by its pid.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                let _ = child.wait();
                stop_traffic(&mut traffic);
                self.probes.detach_process(pid);
                bail!("the workload of pid {pid} did not start within 8 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Device {
            child,
            pid,
            backend,
            last_line,
            reader: Some(reader),
            traffic,
        })
    }

    /// The device's cumulative counters, as the probes count them.
    pub fn cumulative(&self, pid: u32) -> Result<Cumulative> {
        let snap = self.probes.snapshot()?;
        let mut c = Cumulative::default();
        for (key, stats) in snap.io.range(
            IoKey { pid, dev: 0, op: 0 }..=IoKey {
                pid,
                dev: 0,
                op: u32::MAX,
            },
        ) {
            let _ = key;
            c.ops += stats.ops;
            c.bytes += stats.bytes;
            for (b, n) in &stats.buckets {
                *c.buckets.entry(*b).or_default() += n;
            }
        }
        if let Some(e) = snap.events.get(&DevKey { pid, dev: 0 }) {
            c.interrupts = e.interrupts;
            c.ring_full = e.ring_full_in + e.ring_full_out;
        }
        Ok(c)
    }

    /// Stops the device if it still runs (SIGTERM: in-flight I/O completes), waits for it, reads
    /// the final counters, detaches. Returns the workload's own final figures and the eBPF count.
    pub fn finish(&mut self, mut dev: Device) -> Result<(Option<WorkloadSnapshot>, u64)> {
        stop_traffic(&mut dev.traffic);
        if dev.child.try_wait()?.is_none() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(dev.pid as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while dev.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = dev.child.kill();
                let _ = dev.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let ebpf_ops = self.cumulative(dev.pid)?.ops;
        self.probes.detach_process(dev.pid);
        if let Some(r) = dev.reader.take() {
            let _ = r.join();
        }
        let last = dev
            .last_line
            .lock()
            .expect("line lock")
            .as_deref()
            .and_then(|l| serde_json::from_str(l).ok());
        Ok((last, ebpf_ops))
    }
}

impl Device {
    /// Whether the process has exited.
    pub fn exited(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_some())
    }
}

/// Reads `enlight nic`'s ready line (its namespaces) and starts `traffic` for `secs` seconds.
fn start_traffic(
    first_line: &Mutex<Option<String>>,
    deadline: Instant,
    traffic: NicTraffic,
    secs: f64,
) -> Result<Vec<Child>> {
    let ready: serde_json::Value = loop {
        if let Some(line) = first_line.lock().expect("line lock").clone() {
            break serde_json::from_str(&line)
                .with_context(|| format!("enlight nic's first line {line:?}"))?;
        }
        if Instant::now() > deadline {
            bail!("enlight nic printed no ready line (did the probes attach?)");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    anyhow::ensure!(
        ready["event"] == "ready",
        "enlight nic's first line: {ready}"
    );
    let field = |k: &str| -> Result<String> {
        Ok(ready[k]
            .as_str()
            .with_context(|| format!("no {k} in {ready}"))?
            .to_string())
    };
    let (guest, host, host_ip) = (
        field("guest_netns")?,
        field("host_netns")?,
        field("host_ip")?,
    );
    let secs_arg = format!("{}", secs.ceil() as u64 + 2);
    let mut children = Vec::new();
    let spawned = (|| -> Result<()> {
        match traffic {
            NicTraffic::Ping { per_sec } => {
                let interval = format!("{:.4}", 1.0 / per_sec as f64);
                children.push(
                    netns_command(&guest, "ping")
                        .args(["-q", "-i", &interval, "-w", &secs_arg, &host_ip])
                        .spawn()
                        .context("starting ping")?,
                );
            }
            NicTraffic::Tcp | NicTraffic::Udp { .. } => {
                children.push(
                    netns_command(&host, "iperf3")
                        .args(["-s", "-1", "-B", &host_ip, "-p", "5201"])
                        .spawn()
                        .context("starting the iperf3 server")?,
                );
                let mut client = netns_command(&guest, "iperf3");
                client.args(["-c", &host_ip, "-p", "5201", "-t", &secs_arg]);
                client.args(["--connect-timeout", "2000"]);
                if let NicTraffic::Udp { mbit } = traffic {
                    client.args(["-u", "-b", &format!("{mbit}M")]);
                }
                // The server needs a moment to listen; the client retries until it connects.
                let until = Instant::now() + Duration::from_secs(5);
                loop {
                    std::thread::sleep(Duration::from_millis(200));
                    let mut c = client.spawn().context("starting the iperf3 client")?;
                    std::thread::sleep(Duration::from_millis(300));
                    match c.try_wait()? {
                        Some(status) if Instant::now() < until => {
                            log::debug!("iperf3 client exited early ({status}); retrying");
                        }
                        Some(status) => bail!("the iperf3 client exited with {status}"),
                        None => {
                            children.push(c);
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = spawned {
        stop_traffic(&mut children);
        return Err(e);
    }
    Ok(children)
}

/// Kills traffic generators and reaps them.
fn stop_traffic(children: &mut Vec<Child>) {
    for mut c in children.drain(..) {
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        stop_traffic(&mut self.traffic);
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::NicTraffic;

    #[test]
    fn nic_traffic_specs_parse_and_bad_ones_are_named() {
        assert_eq!("tcp".parse::<NicTraffic>().unwrap(), NicTraffic::Tcp);
        assert_eq!(
            "udp=200".parse::<NicTraffic>().unwrap(),
            NicTraffic::Udp { mbit: 200 }
        );
        assert_eq!(
            "ping=500".parse::<NicTraffic>().unwrap(),
            NicTraffic::Ping { per_sec: 500 }
        );
        for (bad, needle) in [
            ("udp", "unknown NIC traffic"),
            ("ping=0", "positive"),
            ("ping=fast", "not a number"),
            ("qd=32", "unknown NIC traffic"),
        ] {
            let err = bad.parse::<NicTraffic>().unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn every_nic_scenario_has_one_parseable_phase() {
        let nics: Vec<_> = super::super::scenarios()
            .into_iter()
            .filter(|s| s.device == "nic")
            .collect();
        assert!(nics.len() >= 2);
        for s in nics {
            assert_eq!(s.phases.len(), 1, "{}", s.name);
            s.phases[0].parse::<NicTraffic>().unwrap();
        }
    }
}
