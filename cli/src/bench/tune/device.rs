//! The benchmark's harness: real `enlight disk` device processes, the real eBPF probes attached
//! to them, windows read from the kernel maps, settings changed through the control socket.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use enlight_driver::registry::{self, DeviceRecord};
use enlight_driver::settings::DeviceSettings;
use enlight_driver::workload::WorkloadSnapshot;
use enlight_probes::{DevKey, IoKey, Probes};
use enlightd::tuner::backend::{ControlBackend, SettingsBackend};
use enlightd::tuner::{Bounds, Cumulative};

/// Name of every benchmark device.
pub const DEVICE: &str = "bench0";

/// Probes, a private runtime directory and a backing file, shared by every run.
pub struct Harness {
    probes: Probes,
    _dir: tempfile::TempDir,
    runtime: PathBuf,
    backing: PathBuf,
    exe: PathBuf,
}

/// One running device process.
pub struct Device {
    child: Child,
    pub pid: u32,
    pub backend: ControlBackend,
    last_line: Arc<Mutex<Option<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Harness {
    /// Checks privileges, loads the probes, creates a 256 MiB backing file in a temporary
    /// directory in `/dev/shm` (memory) where there is one: what is compared is the channel's
    /// signalling and moderation, which a real disk's millisecond variance would drown.
    pub fn new() -> Result<Harness> {
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
        let mut child = Command::new(&self.exe)
            .arg("disk")
            .args([
                "--name",
                DEVICE,
                "--workload",
                plan,
                "--wait-for-probes",
                "8",
            ])
            .arg("--backing")
            .arg(&self.backing)
            .arg("--runtime-dir")
            .arg(&self.runtime)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting enlight disk")?;
        let pid = child.id();
        let last_line = Arc::new(Mutex::new(None));
        let reader = {
            let out = child.stdout.take().expect("piped stdout");
            let last_line = Arc::clone(&last_line);
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
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
                bail!("enlight disk exited ({status}) before registering");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("enlight disk did not register within 15 s");
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

    /// Settings and bounds as the device reports them.
    pub fn get(&mut self) -> Result<(DeviceSettings, Bounds)> {
        Ok(self.backend.get()?)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
