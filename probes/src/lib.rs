//! enlight's eBPF probes: C programs (CO-RE, `src/bpf/enlight.bpf.c`) on the driver's USDT
//! tracepoints, loaded with aya, and the Rust side that attaches them and reads their maps.
//!
//! - [`types`]: the C structs shared with the programs, defined once in `enlight-abi`
//!   ([`enlight_abi::record`]) and re-exported (checked against the object's BTF by a test).
//! - [`hist`]: the log-linear latency buckets the programs count into.
//! - [`usdt`]: parsing `.note.stapsdt` into sites (file offsets, semaphores, argument specs).
//! - [`kernel`]: the kernel-device programs (`src/bpf/kernel.bpf.c`): block, NIC, IRQ, KVM and
//!   Hyper-V tracepoints, attached where they exist.
//! - [`attach`]: every system call: uprobe perf events with semaphores, BPF links with cookies.
//!
//! The compiled object is committed (`src/bpf/enlight.bpf.o`, rebuilt and compared by
//! `build-bpf.sh --check`), so building this crate needs no clang.

pub mod attach;
pub mod hist;
pub mod kernel;
pub mod types;
pub mod usdt;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::UProbe;
use aya::Ebpf;

use crate::attach::SiteLink;
use crate::types::*;

/// The compiled programs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!("bpf/enlight.bpf.o");

/// USDT provider the programs attach to.
pub const PROVIDER: &str = "enlight";

/// Probe name → program name, in attach order: `workload_start` is attached last, so a
/// workload that waits for its semaphore knows every other site is live. (`signal`, `irq_mask`
/// and `ring_full` have no program: `io_reap` carries the counts of those events.)
pub const PROGRAMS: [(&str, &str); 4] = [
    ("io_reap", "enlight_io_reap"),
    ("trap", "enlight_trap"),
    ("settings_change", "enlight_settings_change"),
    ("workload_start", "enlight_workload_start"),
];

/// What is missing for the probes to work; each message is one line saying how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Neither root nor the capabilities.
    #[error("enlight needs root or CAP_BPF+CAP_PERFMON to load eBPF programs (and CAP_SYS_ADMIN to attach USDT sites): run it with sudo (or setcap cap_bpf,cap_perfmon,cap_sys_admin+ep on the binary)")]
    NotPrivileged,
    /// No kernel BTF.
    #[error("the kernel has no BTF (/sys/kernel/btf/vmlinux is missing): boot a kernel built with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    /// No tracefs and it cannot be mounted.
    #[error("tracefs is not mounted and mounting it failed ({0}): run 'mount -t tracefs nodev /sys/kernel/tracing'")]
    NoTracefs(String),
    /// No uprobe PMU.
    #[error("the kernel has no uprobe PMU (/sys/bus/event_source/devices/uprobe): it needs CONFIG_UPROBE_EVENTS=y")]
    NoUprobes,
}

/// Whether this process may attach uprobes (the USDT sites): the kernel's uprobe PMU asks for
/// `CAP_SYS_ADMIN` itself, not `CAP_PERFMON`, since upstream commit ba677dbe77af "perf: Revert to
/// requiring CAP_SYS_ADMIN for uprobes" (2025, backported to the stable kernels down to 5.15: a
/// uprobe placed mid-instruction can corrupt the traced process). Without it
/// the programs load and the kernel tracepoints attach, but every USDT site is refused (EACCES).
pub fn can_attach_uprobes() -> bool {
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    attach::effective_caps() & CAP_SYS_ADMIN != 0
}

/// Checks privileges and kernel features; mounts tracefs if it is missing.
pub fn preflight() -> Result<(), PreflightError> {
    const CAP_PERFMON: u64 = 1 << 38;
    const CAP_BPF: u64 = 1 << 39;
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    let caps = attach::effective_caps();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root
        && caps & CAP_SYS_ADMIN == 0
        && caps & (CAP_BPF | CAP_PERFMON) != (CAP_BPF | CAP_PERFMON)
    {
        return Err(PreflightError::NotPrivileged);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(PreflightError::NoBtf);
    }
    if !Path::new("/sys/kernel/tracing/events").exists() {
        attach::mount_tracefs().map_err(|e| PreflightError::NoTracefs(e.to_string()))?;
    }
    if attach::uprobe_pmu_type().is_err() {
        return Err(PreflightError::NoUprobes);
    }
    Ok(())
}

/// Errors of loading, attaching and reading.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The object did not load.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program did not load (the verifier's log is in the message).
    #[error("loading program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    /// A map is missing or unusable.
    #[error("map {name}: {reason}")]
    Map { name: &'static str, reason: String },
    /// The executable's USDT notes could not be read.
    #[error(transparent)]
    Usdt(#[from] usdt::UsdtError),
    /// The kernel refused an attachment.
    #[error("attaching {probe} in pid {pid} ({exe}): {source}")]
    Attach {
        probe: String,
        pid: u32,
        exe: String,
        source: std::io::Error,
    },
    /// Every spec slot is in use.
    #[error("no free USDT spec slot ({USDT_MAX_SPECS} sites attached)")]
    NoSpecSlot,
    /// The kernel's run-time statistics could not be enabled or read.
    #[error("BPF run-time statistics: {0}")]
    RunStats(String),
}

/// What the kernel counted for one USDT program while run-time statistics were enabled
/// ([`enable_run_stats`]): every hit of every site it is attached to, and the time spent in the
/// program itself (not the trap that leads to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProgramRunStats {
    /// The kernel's id of the program (`bpftool prog show id N`).
    pub id: u32,
    /// Program runs (site hits).
    pub run_count: u64,
    /// Nanoseconds spent in the program.
    pub run_time_ns: u64,
}

/// Turns on the kernel's BPF run-time statistics (`BPF_ENABLE_STATS`) for as long as the
/// returned descriptor lives. They cost two clock reads per program run, so they are on only
/// while someone measures.
pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd, ProbeError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| ProbeError::RunStats(e.to_string()))
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> ProbeError {
    move |e| ProbeError::Map {
        name,
        reason: e.to_string(),
    }
}

/// What `attach_process` attached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachReport {
    /// The executable the sites were read from.
    pub exe: PathBuf,
    /// Sites attached in all.
    pub sites_attached: usize,
    /// Sites attached per probe name.
    pub sites_by_probe: BTreeMap<String, usize>,
    /// Probes with a program but no site in the executable.
    pub missing: Vec<String>,
    /// Sites whose semaphore the kernel now maintains.
    pub semaphores: usize,
}

/// (process, device, op).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoKey {
    pub pid: u32,
    pub dev: u32,
    pub op: u32,
}

/// (process, device, knob): the key of the settings-change counts (knob codes of contract 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KnobKey {
    pub pid: u32,
    pub dev: u32,
    pub knob: u32,
}

/// Cumulative I/O counters of one (process, device, op).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoStats {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency_sum_ns: u64,
    /// (bucket index, count), sorted by index; see [`hist`].
    pub buckets: Vec<(u32, u64)>,
}

/// (process, device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevKey {
    pub pid: u32,
    pub dev: u32,
}

/// Cumulative signalling counters of one device: the map's own record, summed over CPUs and
/// processes (`+=` is the ABI crate's).
pub type DevEvents = DevEventsRaw;

/// The programs' own trouble counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// Map updates that failed (map full): events lost.
    pub events_lost: u64,
    /// `io_reap` hits with more completions than one hit may carry.
    pub batch_truncated: u64,
    /// Failed reads of arguments or user memory.
    pub read_failures: u64,
    /// Hits with no argument spec.
    pub no_spec: u64,
}

/// Everything the maps hold, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub io: BTreeMap<IoKey, IoStats>,
    pub events: BTreeMap<DevKey, DevEvents>,
    /// Register accesses trapped by emulated devices (sum of `trap`'s counts).
    pub traps: BTreeMap<DevKey, u64>,
    /// Settings changes applied through control sockets (`settings_change` hits).
    pub settings_changes: BTreeMap<KnobKey, u64>,
    pub health: Health,
}

/// Detaches `links`, each from its own thread. Closing a uprobe's perf event and BPF link waits
/// for RCU grace periods (about 0.1 s per site on this kernel): closing 20 sites one after
/// another took about 2 s, concurrently about 1.5 s (the waits overlap only in part).
fn drop_links_concurrently(links: Vec<SiteLink>) {
    if links.len() <= 1 {
        drop(links);
        return;
    }
    std::thread::scope(|scope| {
        for link in links {
            // When no thread can be spawned, the failed spawn drops its closure, and with it
            // the link, on this thread: the link is detached either way.
            let spawned = std::thread::Builder::new()
                .name("enlight-detach".into())
                .spawn_scoped(scope, move || drop(link));
            if let Err(e) = spawned {
                log::debug!("detaching on the calling thread: {e}");
            }
        }
    });
}

/// The attachment of the programs to one executable (by inode), shared by every attached
/// process that runs it.
struct ExeAttachment {
    links: Vec<SiteLink>,
    spec_ids: Vec<u32>,
    report: AttachReport,
    pids: std::collections::BTreeSet<u32>,
}

/// An executable's identity: (device, inode).
type ExeKey = (u64, u64);

fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid != 0
        && (unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// The loaded programs and their attachments.
///
/// Uprobes are attached per executable, system-wide (as libbpf does: pid -1, CPU 0; the program
/// runs on whichever CPU the site is hit), not per process: a
/// perf event bound to a task is switched in and out with the task on every context switch, and
/// an I/O path that hands off between threads switches very often (measured: attaching one idle
/// probe per task cost 18% of IOPS at 440k IOPS). The programs key everything by process, and
/// entries of processes nobody attached are pruned.
pub struct Probes {
    ebpf: Ebpf,
    pmu_type: u32,
    free_spec_ids: Vec<u32>,
    exes: HashMap<ExeKey, ExeAttachment>,
    pids: HashMap<u32, ExeKey>,
}

impl Probes {
    /// Loads the embedded object and every program (nothing is attached yet).
    pub fn load() -> Result<Probes, ProbeError> {
        // The kernel accounts BPF memory by cgroup; raising the limit is only for old kernels.
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid struct; failure is fine (see above).
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
        let mut ebpf = aya::EbpfLoader::new().load(OBJECT)?;
        for (_, name) in PROGRAMS {
            let program = ebpf.program_mut(name).ok_or_else(|| ProbeError::Map {
                name,
                reason: "program missing from the object".into(),
            })?;
            let uprobe: &mut UProbe = program
                .try_into()
                .map_err(|source| ProbeError::Program { name, source })?;
            uprobe
                .load()
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        let pmu_type = attach::uprobe_pmu_type().map_err(|e| ProbeError::Attach {
            probe: "uprobe PMU".into(),
            pid: 0,
            exe: String::new(),
            source: e,
        })?;
        Ok(Probes {
            ebpf,
            pmu_type,
            free_spec_ids: (0..USDT_MAX_SPECS).rev().collect(),
            exes: HashMap::new(),
            pids: HashMap::new(),
        })
    }

    /// Attaches every program to every site of its probe in the executable process `pid` runs,
    /// read from `/proc/<pid>/exe` (the binary the process really runs, even if `exe` was
    /// replaced on disk since; `exe` is used if that link cannot be read). Other processes of the
    /// same executable share the attachment. Attaching a pid twice first detaches it.
    pub fn attach_process(&mut self, pid: u32, exe: &Path) -> Result<AttachReport, ProbeError> {
        let all: Vec<&str> = PROGRAMS.iter().map(|(p, _)| *p).collect();
        self.attach_process_only(pid, exe, &all)
    }

    /// [`attach_process`](Self::attach_process) restricted to the probes named in `probes`
    /// (names from [`PROGRAMS`]); the others are reported as missing. An executable already
    /// attached keeps the probe set it was first attached with.
    pub fn attach_process_only(
        &mut self,
        pid: u32,
        exe: &Path,
        probes: &[&str],
    ) -> Result<AttachReport, ProbeError> {
        self.detach_process(pid);
        let proc_exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let target = if std::fs::metadata(&proc_exe).is_ok() {
            proc_exe
        } else {
            exe.to_path_buf()
        };
        let attach_err = |probe: &str, source: std::io::Error| ProbeError::Attach {
            probe: probe.to_string(),
            pid,
            exe: exe.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(&target).map_err(|e| attach_err("executable", e))?;
        let key: ExeKey = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        if let Some(existing) = self.exes.get_mut(&key) {
            existing.pids.insert(pid);
            self.pids.insert(pid, key);
            return Ok(existing.report.clone());
        }
        let mut sites: Vec<usdt::Site> = usdt::sites(&target)?
            .into_iter()
            .filter(|s| s.provider == PROVIDER)
            .collect();
        let order = |name: &str| PROGRAMS.iter().position(|(p, _)| *p == name);
        sites.retain(|s| order(&s.name).is_some() && probes.contains(&s.name.as_str()));
        sites.sort_by_key(|s| order(&s.name));
        let mut report = AttachReport {
            exe: exe.to_path_buf(),
            ..Default::default()
        };
        let mut links = Vec::new();
        let mut spec_ids = Vec::new();
        let result = (|| {
            for site in &sites {
                let (_, prog_name) = PROGRAMS[order(&site.name).expect("filtered")];
                let id = self.free_spec_ids.pop().ok_or(ProbeError::NoSpecSlot)?;
                spec_ids.push(id);
                {
                    let map = self
                        .ebpf
                        .map_mut("usdt_specs")
                        .ok_or_else(|| ProbeError::Map {
                            name: "usdt_specs",
                            reason: "missing".into(),
                        })?;
                    let mut specs: Array<&mut MapData, UsdtSpec> =
                        Array::try_from(map).map_err(map_err("usdt_specs"))?;
                    specs.set(id, site.spec, 0).map_err(map_err("usdt_specs"))?;
                }
                let program: &UProbe = self
                    .ebpf
                    .program(prog_name)
                    .expect("loaded in load()")
                    .try_into()
                    .map_err(|source| ProbeError::Program {
                        name: prog_name,
                        source,
                    })?;
                let fd = program.fd().map_err(|source| ProbeError::Program {
                    name: prog_name,
                    source,
                })?;
                let link = attach::attach_site(
                    fd.as_fd(),
                    self.pmu_type,
                    &target,
                    site.file_offset,
                    site.semaphore_offset,
                    id as u64,
                )
                .map_err(|source| attach_err(&format!("{PROVIDER}:{}", site.name), source))?;
                links.push(link);
                report.sites_attached += 1;
                *report.sites_by_probe.entry(site.name.clone()).or_default() += 1;
                if site.semaphore_offset != 0 {
                    report.semaphores += 1;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Roll back: dropping the links detaches; the spec slots go back to the pool.
            drop_links_concurrently(links);
            self.free_spec_ids.extend(spec_ids);
            return Err(e);
        }
        report.missing = PROGRAMS
            .iter()
            .filter(|(p, _)| !report.sites_by_probe.contains_key(*p))
            .map(|(p, _)| p.to_string())
            .collect();
        self.exes.insert(
            key,
            ExeAttachment {
                links,
                spec_ids,
                report: report.clone(),
                pids: [pid].into(),
            },
        );
        self.pids.insert(pid, key);
        Ok(report)
    }

    /// The kernel's run counts and run times of each USDT program, keyed by probe name
    /// (cumulative since loading; they advance only while [`enable_run_stats`] is in force).
    pub fn program_run_stats(&self) -> Result<BTreeMap<&'static str, ProgramRunStats>, ProbeError> {
        let mut out = BTreeMap::new();
        for (probe, name) in PROGRAMS {
            let program = self.ebpf.program(name).ok_or_else(|| ProbeError::Map {
                name,
                reason: "program missing from the object".into(),
            })?;
            let uprobe: &UProbe = program
                .try_into()
                .map_err(|source| ProbeError::Program { name, source })?;
            let info = uprobe
                .info()
                .map_err(|source| ProbeError::Program { name, source })?;
            out.insert(
                probe,
                ProgramRunStats {
                    id: info.id(),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                },
            );
        }
        Ok(out)
    }

    /// Forgets `pid`: deletes its entries (and those of dead processes nobody attached) from every
    /// map, and detaches from its executable once no attached process runs it.
    pub fn detach_process(&mut self, pid: u32) {
        if let Some(key) = self.pids.remove(&pid) {
            if let Some(exe) = self.exes.get_mut(&key) {
                exe.pids.remove(&pid);
                if exe.pids.is_empty() {
                    let exe = self.exes.remove(&key).expect("present");
                    drop_links_concurrently(exe.links);
                    self.free_spec_ids.extend(exe.spec_ids);
                }
            }
        }
        // Entries of `pid` go, and so do those of dead processes nobody attached (another
        // process of an attached executable): a live one may be a device about to be attached.
        let attached: std::collections::BTreeSet<u32> = self.pids.keys().copied().collect();
        let keep = |tgid: u32| tgid != pid && (attached.contains(&tgid) || process_alive(tgid));
        if let Some(map) = self.ebpf.map_mut("io_hist") {
            if let Ok(mut m) = PerCpuHashMap::<&mut MapData, IoKeyRaw, IoHistRaw>::try_from(map) {
                let keys: Vec<IoKeyRaw> = m.keys().flatten().filter(|k| !keep(k.tgid)).collect();
                for k in keys {
                    let _ = m.remove(&k);
                }
            }
        }
        if let Some(map) = self.ebpf.map_mut("dev_traps") {
            if let Ok(mut m) = PerCpuHashMap::<&mut MapData, DevKeyRaw, u64>::try_from(map) {
                let keys: Vec<DevKeyRaw> = m.keys().flatten().filter(|k| !keep(k.tgid)).collect();
                for k in keys {
                    let _ = m.remove(&k);
                }
            }
        }
        if let Some(map) = self.ebpf.map_mut("settings_changes") {
            if let Ok(mut m) = PerCpuHashMap::<&mut MapData, KnobKeyRaw, u64>::try_from(map) {
                let keys: Vec<KnobKeyRaw> = m.keys().flatten().filter(|k| !keep(k.tgid)).collect();
                for k in keys {
                    let _ = m.remove(&k);
                }
            }
        }
        if let Some(map) = self.ebpf.map_mut("dev_events") {
            if let Ok(mut m) = PerCpuHashMap::<&mut MapData, DevKeyRaw, DevEventsRaw>::try_from(map)
            {
                let keys: Vec<DevKeyRaw> = m.keys().flatten().filter(|k| !keep(k.tgid)).collect();
                for k in keys {
                    let _ = m.remove(&k);
                }
            }
        }
    }

    /// Processes with attachments.
    pub fn attached_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.pids.keys().copied().collect();
        pids.sort_unstable();
        pids
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, ProbeError> {
        self.ebpf.map(name).ok_or_else(|| ProbeError::Map {
            name,
            reason: "missing".into(),
        })
    }

    /// Reads every map, summing the per-CPU values.
    pub fn snapshot(&self) -> Result<Snapshot, ProbeError> {
        let mut snap = Snapshot::default();
        let io = PerCpuHashMap::<&MapData, IoKeyRaw, IoHistRaw>::try_from(self.map("io_hist")?)
            .map_err(map_err("io_hist"))?;
        let mut buckets = vec![0u64; BUCKETS];
        for entry in io.iter() {
            let (k, values) = entry.map_err(map_err("io_hist"))?;
            let s = snap
                .io
                .entry(IoKey {
                    pid: k.tgid,
                    dev: k.dev,
                    op: k.op,
                })
                .or_default();
            buckets.iter_mut().for_each(|b| *b = 0);
            for v in values.iter() {
                s.ops += v.stats.ops;
                s.bytes += v.stats.bytes;
                s.errors += v.stats.errors;
                s.latency_sum_ns += v.stats.latency_sum_ns;
                for (sum, c) in buckets.iter_mut().zip(v.buckets.iter()) {
                    *sum += c;
                }
            }
            s.buckets = buckets
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (i as u32, *c))
                .collect();
        }
        // io_reap creates a device's read and write entries up front (see enlight.bpf.c); an op
        // that never completed is not reported.
        snap.io.retain(|_, s| s.ops > 0);
        let events =
            PerCpuHashMap::<&MapData, DevKeyRaw, DevEventsRaw>::try_from(self.map("dev_events")?)
                .map_err(map_err("dev_events"))?;
        for entry in events.iter() {
            let (k, values) = entry.map_err(map_err("dev_events"))?;
            let e = snap
                .events
                .entry(DevKey {
                    pid: k.tgid,
                    dev: k.dev,
                })
                .or_default();
            for v in values.iter() {
                *e += v;
            }
        }
        let traps = PerCpuHashMap::<&MapData, DevKeyRaw, u64>::try_from(self.map("dev_traps")?)
            .map_err(map_err("dev_traps"))?;
        for entry in traps.iter() {
            let (k, values) = entry.map_err(map_err("dev_traps"))?;
            *snap
                .traps
                .entry(DevKey {
                    pid: k.tgid,
                    dev: k.dev,
                })
                .or_default() += values.iter().sum::<u64>();
        }
        let changes =
            PerCpuHashMap::<&MapData, KnobKeyRaw, u64>::try_from(self.map("settings_changes")?)
                .map_err(map_err("settings_changes"))?;
        for entry in changes.iter() {
            let (k, values) = entry.map_err(map_err("settings_changes"))?;
            *snap
                .settings_changes
                .entry(KnobKey {
                    pid: k.tgid,
                    dev: k.dev,
                    knob: k.knob,
                })
                .or_default() += values.iter().sum::<u64>();
        }
        let health = PerCpuArray::<&MapData, u64>::try_from(self.map("health")?)
            .map_err(map_err("health"))?;
        let sum = |i: u32| -> Result<u64, ProbeError> {
            Ok(health.get(&i, 0).map_err(map_err("health"))?.iter().sum())
        };
        snap.health = Health {
            events_lost: sum(HEALTH_MAP_FULL)?,
            batch_truncated: sum(HEALTH_BATCH_TRUNCATED)?,
            read_failures: sum(HEALTH_READ_FAILED)?,
            no_spec: sum(HEALTH_NO_SPEC)?,
        };
        Ok(snap)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `(size, member names with byte offsets)` of every struct in a raw `.BTF` section. A small
    /// reader of the format (kernel Documentation/bpf/btf.rst), enough to compare layouts.
    pub(crate) fn btf_structs(btf: &[u8]) -> HashMap<String, (usize, Vec<(String, usize)>)> {
        let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_eq!(u16::from_le_bytes([btf[0], btf[1]]), 0xeb9f, "BTF magic");
        let hdr_len = u32_at(btf, 4) as usize;
        let (type_off, type_len) = (u32_at(btf, 8) as usize, u32_at(btf, 12) as usize);
        let str_off = u32_at(btf, 16) as usize;
        let types = &btf[hdr_len + type_off..hdr_len + type_off + type_len];
        let strings = &btf[hdr_len + str_off..];
        let name = |off: u32| {
            let s = &strings[off as usize..];
            String::from_utf8_lossy(&s[..s.iter().position(|&b| b == 0).unwrap()]).into_owned()
        };
        let mut out = HashMap::new();
        let mut at = 0;
        while at < types.len() {
            let (name_off, info, size) = (
                u32_at(types, at),
                u32_at(types, at + 4),
                u32_at(types, at + 8),
            );
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            at += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => vlen * 12, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => vlen * 8,           // ENUM, FUNC_PROTO
                _ => 0,                       // PTR, FWD, TYPEDEF, modifiers, FUNC, FLOAT, TYPE_TAG
            };
            if kind == 4 {
                let members = (0..vlen)
                    .map(|i| {
                        let m = at + i * 12;
                        (name(u32_at(types, m)), u32_at(types, m + 8) as usize / 8)
                    })
                    .collect();
                out.insert(name(name_off), (size as usize, members));
            }
            at += extra;
        }
        out
    }

    pub(crate) fn btf_section(obj: &[u8]) -> &[u8] {
        use object::{Object, ObjectSection};
        let file = object::File::parse(obj).unwrap();
        file.section_by_name(".BTF")
            .expect(".BTF section")
            .data()
            .unwrap()
    }

    /// The Rust mirrors and the C structs in the shipped object agree on size and layout.
    #[test]
    fn shared_types_match_the_objects_btf() {
        let structs = btf_structs(btf_section(OBJECT));
        for (name, size) in SHARED_STRUCTS {
            let (btf_size, _) = structs
                .get(name)
                .unwrap_or_else(|| panic!("{name} not in the object's BTF"));
            assert_eq!(*btf_size, size, "{name}");
        }
        let offsets = |name: &str| structs[name].1.iter().map(|(_, o)| *o).collect::<Vec<_>>();
        use std::mem::offset_of;
        assert_eq!(
            offsets("enlight_io_key"),
            [
                offset_of!(IoKeyRaw, tgid),
                offset_of!(IoKeyRaw, dev),
                offset_of!(IoKeyRaw, op),
                offset_of!(IoKeyRaw, pad)
            ]
        );
        assert_eq!(
            offsets("enlight_knob_key"),
            [
                offset_of!(KnobKeyRaw, tgid),
                offset_of!(KnobKeyRaw, dev),
                offset_of!(KnobKeyRaw, knob),
                offset_of!(KnobKeyRaw, pad)
            ]
        );
        assert_eq!(
            offsets("enlight_usdt_arg"),
            [
                offset_of!(UsdtArg, val_off),
                offset_of!(UsdtArg, arg_type),
                offset_of!(UsdtArg, reg_off),
                offset_of!(UsdtArg, arg_signed),
                offset_of!(UsdtArg, arg_bitshift)
            ]
        );
        assert_eq!(
            offsets("enlight_usdt_spec"),
            [
                offset_of!(UsdtSpec, args),
                offset_of!(UsdtSpec, arg_cnt),
                offset_of!(UsdtSpec, pad)
            ]
        );
        assert_eq!(structs["enlight_dev_events"].1.len(), 7);
        // struct enlight_signal_counts, what io_reap's fourth argument points at, is only a
        // local in the programs, so not in the object's BTF. Its one Rust definition is
        // enlight_abi::record::SignalDeltas (size asserted there and in enlight.h), which the
        // driver writes, and enlight_add_signals adds it field by field into the first six
        // fields of enlight_dev_events, in the same order. (The privileged attach test reads
        // every field back.)
        assert_eq!(
            offsets("enlight_dev_events")[..6],
            [
                offset_of!(SignalDeltas, doorbells),
                offset_of!(SignalDeltas, interrupts),
                offset_of!(SignalDeltas, ring_full_out),
                offset_of!(SignalDeltas, ring_full_in),
                offset_of!(SignalDeltas, irq_masked),
                offset_of!(SignalDeltas, irq_unmasked)
            ]
        );
    }
}
