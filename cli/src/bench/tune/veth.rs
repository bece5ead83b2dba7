//! The kernel scenarios' rig: a veth pair between two network namespaces this process creates
//! (`a`, the sending side, and `b`, the receiving side whose NAPI moderation is tuned), removed
//! on drop, so also when a stop signal unwinds the run; the kernel probes counting `b`'s
//! packets as enlightd counts them; traffic from `a` to `b` (iperf3 TCP, or ping with every
//! round trip recorded); the moderation changed through enlightd's own `KernelNicBackend`
//! (journalled); and, for enlight's own run, the real `enlightd --kernel` started inside `b`'s
//! namespace with its tuner on `b`.
//!
//! Why veth behaves like a NIC here: with GRO on, veth hands each received frame to the peer's
//! NAPI instance (a ring of 256 frames, `veth_poll`), and NAPI's deferral works on it as on any
//! NIC: with `napi_defer_hard_irqs` N > 0 and a `gro_flush_timeout` T, after a poll that found
//! work the sender no longer schedules the poll (veth's "interrupt", `rx_notify_masked`, stays
//! masked); a timer polls every T instead, until N polls in a row found nothing. What it does
//! not have: a hardware interrupt, a DMA ring, a second machine. See benches/README.md.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use enlight_probes::kernel::{Group, KernelProbes, NicKey, Selection};
use enlightd::kernel::backend::KernelNicBackend;
use enlightd::kernel::changes::KernelChanges;
use enlightd::kernel::permission::Permission;
use enlightd::tuner::{Cumulative, Objective};

use crate::children::DieWithParent;

use super::device::{netns_command, NicTraffic};

/// The tuned end's name, inside its namespace.
pub const TUNED: &str = "b";
const SENDER: &str = "a";
const SENDER_IP: &str = "10.231.0.1";
const TUNED_IP: &str = "10.231.0.2";

/// The namespaces' name prefix; the pid of the bench that made them follows.
const PREFIX: &str = "enl-bt-";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs `args` inside namespace `ns`, failing with its output.
fn exec(ns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip netns exec")?;
    anyhow::ensure!(
        out.status.success(),
        "{} in {ns}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pid in a namespace name this bench made (`enl-bt-<pid>-a`), if it is one.
pub fn owner_pid(netns: &str) -> Option<u32> {
    let rest = netns.strip_prefix(PREFIX)?;
    let (pid, side) = rest.rsplit_once('-')?;
    matches!(side, "a" | "b").then_some(())?;
    pid.parse().ok()
}

/// Removes namespaces an earlier bench left behind when it was killed (SIGKILL leaves no
/// chance to clean up): only names of this bench's pattern whose process is gone.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = owner_pid(&name) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("   removing namespace {name} left by a killed bench (pid {pid})");
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
}

/// A veth pair in two namespaces of our own; both deleted on drop (the pair with them).
pub struct VethPair {
    pub ns_a: String,
    pub ns_b: String,
    /// `/run/netns/<ns_b>`, for enlightd's netns-aware calls.
    pub netns_b: PathBuf,
    /// `b`'s NAPI knobs as created (what every run starts from).
    pub baseline: (u64, u64),
}

impl VethPair {
    /// Creates the pair: `a` (sender) in one namespace, `b` in the other, IPv4 only, GRO on
    /// `b` (so `b` receives through NAPI) and TSO off on `a` (frames of one MTU reach `b`,
    /// so the per-frame cost, which NAPI moderation batches, is what the run is bound by).
    pub fn create() -> Result<VethPair> {
        remove_stale();
        let pid = std::process::id();
        let ns_a = format!("{PREFIX}{pid}-a");
        let ns_b = format!("{PREFIX}{pid}-b");
        ip(&["netns", "add", &ns_a])?;
        let mut pair = VethPair {
            ns_a: ns_a.clone(),
            ns_b: ns_b.clone(),
            netns_b: PathBuf::from("/run/netns").join(&ns_b),
            baseline: (0, 0),
        };
        // From here on, drop removes whatever was made.
        ip(&["netns", "add", &ns_b])?;
        // `name` spelled out: a bare `a` would be read as `address`.
        ip(&[
            "link", "add", "name", SENDER, "netns", &ns_a, "type", "veth", "peer", "name", TUNED,
            "netns", &ns_b,
        ])?;
        for (ns, dev, addr) in [
            (&ns_a, SENDER, format!("{SENDER_IP}/24")),
            (&ns_b, TUNED, format!("{TUNED_IP}/24")),
        ] {
            // No IPv6: no router or neighbour solicitations among the counted packets.
            exec(ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
            exec(
                ns,
                &["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
            )?;
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
        }
        exec(&ns_b, &["ethtool", "-K", TUNED, "gro", "on"])
            .context("ethtool (Debian package ethtool)")?;
        exec(
            &ns_a,
            &["ethtool", "-K", SENDER, "tso", "off", "gro", "off"],
        )?;
        pair.baseline = (
            pair.knob("napi_defer_hard_irqs")?,
            pair.knob("gro_flush_timeout")?,
        );
        Ok(pair)
    }

    /// A NAPI knob of `b`, from sysfs as its namespace sees it.
    pub fn knob(&self, knob: &str) -> Result<u64> {
        let text = exec(
            &self.ns_b,
            &["cat", &format!("/sys/class/net/{TUNED}/{knob}")],
        )?;
        text.trim()
            .parse()
            .with_context(|| format!("{knob} of {TUNED}: {text:?}"))
    }

    /// Puts `b`'s NAPI knobs back to what they were when the pair was made (every run starts
    /// there), written directly, not through enlight.
    pub fn reset(&self) -> Result<()> {
        let (defer, timeout) = self.baseline;
        exec(
            &self.ns_b,
            &[
                "sh",
                "-c",
                &format!(
                    "echo {defer} > /sys/class/net/{TUNED}/napi_defer_hard_irqs && \
                     echo {timeout} > /sys/class/net/{TUNED}/gro_flush_timeout"
                ),
            ],
        )?;
        Ok(())
    }

    /// The probes' key of `b`: its namespace's inode and its ifindex.
    fn key(&self) -> Result<NicKey> {
        use std::os::unix::fs::MetadataExt;
        let netns = std::fs::metadata(&self.netns_b)
            .with_context(|| self.netns_b.display().to_string())?
            .ino() as u32;
        let ifindex = enlightd::kernel::netns::in_netns(Some(&self.netns_b), || {
            let name = std::ffi::CString::new(TUNED).expect("no NUL");
            // SAFETY: a valid NUL-terminated name; if_nametoindex only reads it.
            unsafe { libc::if_nametoindex(name.as_ptr()) }
        })?;
        anyhow::ensure!(ifindex != 0, "no {TUNED} in {}", self.ns_b);
        Ok(NicKey { netns, ifindex })
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in [&self.ns_a, &self.ns_b] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("warning: removing namespace {ns}: {e:#}");
            }
        }
    }
}

/// A child killed and reaped on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The rig: the pair and the probes, shared by every run.
pub struct VethRig {
    pub pair: VethPair,
    probes: KernelProbes,
    key: NicKey,
    _dir: tempfile::TempDir,
    dir: PathBuf,
    enlightd: PathBuf,
    runs: u32,
    /// enlightd's collector interval (the bench's tick).
    pub tick_ms: u64,
}

/// How enlightd's tuner is told to run (enlight's own run).
#[derive(Debug, Clone, Copy)]
pub struct EnlightdTuner {
    pub objective: Objective,
    pub slo_us: u64,
    pub interval_ms: u64,
}

/// One run on the pair: traffic, optionally enlightd, and the backend the bench reads (and, for
/// the sweep and the in-process controllers, changes) `b`'s knobs through.
pub struct VethRun {
    pub backend: KernelNicBackend,
    journal: PathBuf,
    traffic: Vec<Guard>,
    enlightd: Option<Guard>,
    /// Cumulative round-trip times of the ping traffic, by latency bucket.
    rtts: Arc<Mutex<BTreeMap<u32, u64>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    ends: Instant,
    pub enlightd_log: Option<PathBuf>,
    /// enlightd's audit log (its tuner's decisions).
    audit: Option<PathBuf>,
}

impl VethRig {
    /// Checks privileges and tools, creates the pair and loads the kernel probes.
    pub fn new(tick_ms: u64) -> Result<VethRig> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        anyhow::ensure!(
            euid == 0,
            "the kernel scenarios create network namespaces: run as root"
        );
        for tool in ["ip", "ethtool", "iperf3", "ping"] {
            anyhow::ensure!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()?
                    .success(),
                "the kernel scenarios need {tool} (Debian packages iproute2, ethtool, iperf3, iputils-ping)"
            );
        }
        let enlightd = std::env::current_exe()?
            .parent()
            .context("this executable's directory")?
            .join("enlightd");
        anyhow::ensure!(
            enlightd.is_file(),
            "no enlightd beside this executable ({}): build both (cargo build -p enlight)",
            enlightd.display()
        );
        let pair = VethPair::create()?;
        let probes = KernelProbes::load(&Selection(vec![Group::Net, Group::Napi]))
            .context("loading the kernel probes")?;
        anyhow::ensure!(
            probes.group_attached(Group::Net) && probes.group_attached(Group::Napi),
            "the kernel's net and napi probes did not attach: {:?}",
            probes.status()
        );
        let key = pair.key()?;
        let dir = tempfile::Builder::new()
            .prefix("enlight-bench-tune-kernel-")
            .tempdir()?;
        Ok(VethRig {
            pair,
            probes,
            key,
            dir: dir.path().to_path_buf(),
            _dir: dir,
            enlightd,
            runs: 0,
            tick_ms,
        })
    }

    /// `b`'s counters as enlightd counts them (`Cumulative::from_figures` over its tx and rx
    /// packets and bytes, and its NAPI polls; a veth has no IRQ, so no interrupts), with the ping round trips, if any, as the
    /// latency buckets: enlightd has no latency of its own for a NIC.
    pub fn cumulative(&self, run: &VethRun) -> Result<Cumulative> {
        let snap = self.probes.snapshot()?;
        let mut c = Cumulative::default();
        if let Some(n) = snap.nics.get(&self.key) {
            c.ops = n.tx_packets + n.rx_packets;
            c.bytes = n.tx_bytes + n.rx_bytes;
            c.napi_polls = n.napi_polls;
        }
        c.buckets = run.rtts.lock().expect("rtt lock").clone();
        Ok(c)
    }

    /// Starts `traffic` from `a` to `b` for `secs` seconds, from `b`'s knobs as the pair was
    /// made, with enlightd tuning `b` if `tuner` is given; waits for the first packets counted.
    pub fn start(
        &mut self,
        traffic: NicTraffic,
        secs: f64,
        tuner: Option<EnlightdTuner>,
    ) -> Result<VethRun> {
        self.pair.reset()?;
        self.runs += 1;
        let journal = self.dir.join(format!("journal-{}", self.runs));
        std::fs::create_dir_all(&journal)?;
        let backend =
            KernelNicBackend::open(TUNED, Some(&self.pair.netns_b), Permission::Apply, &journal)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut run = VethRun {
            backend,
            journal,
            traffic: Vec::new(),
            enlightd: None,
            rtts: Arc::default(),
            reader: None,
            ends: Instant::now() + Duration::from_secs_f64(secs),
            enlightd_log: None,
            audit: None,
        };
        if let Some(t) = tuner {
            self.start_enlightd(&mut run, t)?;
        }
        self.start_traffic(&mut run, traffic, secs)?;
        let deadline = Instant::now() + Duration::from_secs(8);
        let c0 = self.cumulative(&run)?.ops;
        while self.cumulative(&run)?.ops <= c0 + 10 {
            crate::signals::check_stop()?;
            if Instant::now() > deadline {
                bail!("no traffic reached {TUNED} within 8 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        run.ends = Instant::now() + Duration::from_secs_f64(secs);
        Ok(run)
    }

    fn start_enlightd(&self, run: &mut VethRun, t: EnlightdTuner) -> Result<()> {
        let dir = self.dir.join(format!("enlightd-{}", self.runs));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("enlightd.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n\
                 runtime_dir = \"{run}\"\n\
                 interval_ms = {interval}\n\
                 [kernel]\n\
                 enabled = true\n\
                 tune = [\"{TUNED}\"]\n\
                 dry_run = false\n\
                 restore_on_exit = true\n\
                 [tuner]\n\
                 mode = \"off\"\n\
                 [tuner.devices.{TUNED}]\n\
                 mode = \"auto\"\n\
                 objective = \"{objective}\"\n\
                 slo_p99_us = {slo}\n",
                run = dir.join("run").display(),
                interval = t.interval_ms,
                objective = t.objective.name(),
                slo = t.slo_us,
            ),
        )?;
        let log_path = dir.join("enlightd.log");
        let log = std::fs::File::create(&log_path)?;
        // Inside b's namespace: `ip netns exec` also mounts that namespace's sysfs, so enlightd
        // lists b as one of its own kernel NICs, the only ones it tunes.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.pair.ns_b])
            .arg(&self.enlightd)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .die_with_parent(libc::SIGTERM)
            .spawn()
            .context("starting enlightd")?;
        run.enlightd = Some(Guard(child));
        run.enlightd_log = Some(log_path.clone());
        run.audit = Some(dir.join("run").join("tuner-audit.jsonl"));
        // Ready once it has found b (its log says so); its tuner then needs windows of traffic.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            crate::signals::check_stop()?;
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains(&format!("kernel device {TUNED} found")) {
                return Ok(());
            }
            if let Some(g) = run.enlightd.as_mut() {
                if let Some(status) = g.0.try_wait()? {
                    bail!("enlightd exited ({status}) before finding {TUNED}: {text}");
                }
            }
            if Instant::now() > deadline {
                bail!("enlightd did not list {TUNED} within 20 s: {text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_traffic(&self, run: &mut VethRun, traffic: NicTraffic, secs: f64) -> Result<()> {
        let secs_arg = format!("{}", secs.ceil() as u64 + 2);
        match traffic {
            NicTraffic::Ping { per_sec } => {
                let interval = format!("{:.4}", 1.0 / per_sec as f64);
                let mut child = netns_command(&self.pair.ns_a, "ping")
                    .args(["-n", "-i", &interval, "-w", &secs_arg, TUNED_IP])
                    .stdout(Stdio::piped())
                    .spawn()
                    .context("starting ping")?;
                let out = child.stdout.take().expect("piped stdout");
                run.traffic.push(Guard(child));
                let rtts = Arc::clone(&run.rtts);
                run.reader = Some(std::thread::spawn(move || {
                    for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                        if let Some(ns) = rtt_ns(&line) {
                            *rtts
                                .lock()
                                .expect("rtt lock")
                                .entry(enlight_probes::hist::bucket_index(ns))
                                .or_default() += 1;
                        }
                    }
                }));
            }
            NicTraffic::Tcp | NicTraffic::Udp { .. } => {
                run.traffic.push(Guard(
                    netns_command(&self.pair.ns_b, "iperf3")
                        .args(["-s", "-1", "-B", TUNED_IP, "-p", "5201"])
                        .spawn()
                        .context("starting the iperf3 server")?,
                ));
                let mut client = netns_command(&self.pair.ns_a, "iperf3");
                client.args(["-c", TUNED_IP, "-p", "5201", "-t", &secs_arg]);
                client.args(["--connect-timeout", "2000"]);
                if let NicTraffic::Udp { mbit } = traffic {
                    client.args(["-u", "-b", &format!("{mbit}M")]);
                }
                // The server needs a moment to listen; the client retries until it connects.
                let until = Instant::now() + Duration::from_secs(5);
                loop {
                    std::thread::sleep(Duration::from_millis(200));
                    let mut c = Guard(client.spawn().context("starting the iperf3 client")?);
                    std::thread::sleep(Duration::from_millis(300));
                    match c.0.try_wait()? {
                        Some(status) if Instant::now() < until => {
                            log::debug!("iperf3 client exited early ({status}); retrying");
                        }
                        Some(status) => bail!("the iperf3 client exited with {status}"),
                        None => {
                            run.traffic.push(c);
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Stops the run's traffic and enlightd (SIGTERM: it restores what it changed), puts back
    /// what the bench's own backend journalled, and resets `b` to its knobs as made. Returns
    /// enlightd's decisions on `b` from its audit log, one line each (none without enlightd).
    pub fn finish(&mut self, mut run: VethRun) -> Result<Vec<String>> {
        run.traffic.clear();
        if let Some(r) = run.reader.take() {
            let _ = r.join();
        }
        if let Some(mut g) = run.enlightd.take() {
            if let Ok(None) = g.0.try_wait() {
                // SAFETY: signalling our own child by its pid.
                unsafe { libc::kill(g.0.id() as libc::pid_t, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while g.0.try_wait()?.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let report = KernelChanges::open(&run.journal)?.restore();
        anyhow::ensure!(
            report.failed.is_empty(),
            "restoring {TUNED}: {:?}",
            report.failed
        );
        self.pair.reset()?;
        let decisions = match &run.audit {
            Some(path) => enlightd::tuner::audit::read(path)
                .with_context(|| format!("enlightd's audit log {}", path.display()))?,
            None => Vec::new(),
        };
        Ok(decisions
            .iter()
            .filter(|d| d.device == TUNED)
            .map(|d| format!("{:?}: {}", d.action, d.reason))
            .collect())
    }
}

impl VethRun {
    /// Whether the run's time is up.
    pub fn over(&self) -> bool {
        Instant::now() >= self.ends
    }

    /// Whether enlightd, if it runs, has exited.
    pub fn enlightd_exited(&mut self) -> Result<bool> {
        Ok(match self.enlightd.as_mut() {
            Some(g) => g.0.try_wait()?.is_some(),
            None => false,
        })
    }
}

/// The round-trip time in ns of one line of ping's output (`... time=0.052 ms`).
pub fn rtt_ns(line: &str) -> Option<u64> {
    let rest = line.split("time=").nth(1)?;
    let (value, unit) = rest.trim().split_once(' ')?;
    let v: f64 = value.parse().ok()?;
    let ns = match unit.trim() {
        "ms" => v * 1e6,
        "us" | "µs" => v * 1e3,
        "s" => v * 1e9,
        _ => return None,
    };
    (ns.is_finite() && ns >= 0.0).then(|| ns.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_lines_give_round_trips_and_other_lines_none() {
        assert_eq!(
            rtt_ns("64 bytes from 10.231.0.2: icmp_seq=1 ttl=64 time=0.052 ms"),
            Some(52_000)
        );
        assert_eq!(
            rtt_ns("64 bytes from 10.231.0.2: icmp_seq=9 ttl=64 time=1.25 ms"),
            Some(1_250_000)
        );
        assert_eq!(
            rtt_ns("PING 10.231.0.2 (10.231.0.2) 56(84) bytes of data."),
            None
        );
        assert_eq!(
            rtt_ns("rtt min/avg/max/mdev = 0.010/0.020/0.030/0.004 ms"),
            None
        );
    }

    #[test]
    fn only_this_benchs_namespaces_are_taken_for_stale_ones() {
        assert_eq!(owner_pid("enl-bt-1234-a"), Some(1234));
        assert_eq!(owner_pid("enl-bt-77-b"), Some(77));
        assert_eq!(owner_pid("enl-bt-77-c"), None);
        assert_eq!(owner_pid("enl-knobs-a"), None);
        assert_eq!(owner_pid("enl-bt-x-a"), None);
    }
}
