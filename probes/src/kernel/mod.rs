//! Probes on the running kernel's own devices (`src/bpf/kernel.bpf.c`, a separate object from the
//! USDT programs): block request latency per disk, per-NIC packets and NAPI poll sizes, IRQ
//! counts, KVM exits per VMM thread, and `hyperv:vmbus_*` events where the kernel has them.
//!
//! [`KernelProbes::load`] attaches what exists and reports what does not: every probe gets a
//! [`ProbeStatus`] (attached, or why not), and only an object that does not load at all is an
//! error. A missing tracepoint (no KVM, not a Hyper-V guest, an old kernel) costs that probe and
//! nothing else.

mod attach;
pub mod kvm;
pub mod tracefs;
pub mod types;

use attach::{attach_counter, attach_hyperv, attach_one, set_kvm_fields};

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap as AyaHashMap, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Btf, Ebpf};

use std::os::fd::AsFd;

use crate::attach::SiteLink;
use crate::types::{IoHistRaw, IoKeyRaw, BUCKETS};
use crate::IoStats;
use tracefs::Catalog;
use types::*;

/// The compiled kernel-device programs.
pub static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/kernel.bpf.o");

/// How a program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attach {
    /// A BTF tracepoint (`tp_btf`): typed arguments, CO-RE reads.
    Btf,
    /// A classic tracepoint (fields at offsets from tracefs).
    Classic,
}

/// Groups of probes that can be switched on and off together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    /// Block request latency (issue → complete, one program at completion).
    Block,
    /// Packets per interface (xmit, receive).
    Net,
    /// NAPI poll sizes.
    Napi,
    /// IRQ handler counts.
    Irq,
    /// KVM exits, PIO and MMIO per VMM thread.
    Kvm,
    /// `hyperv:vmbus_*` event counts.
    Hyperv,
}

/// `(probe name, program, how, group)` of every fixed probe. `hyperv:vmbus_*` events are found
/// at load time (their set varies between kernels) and all share `enlight_count_event`.
const PROBES: [(&str, &str, Attach, Group); 8] = [
    (
        "block:block_rq_complete",
        "enlight_blk_complete",
        Attach::Btf,
        Group::Block,
    ),
    (
        "net:net_dev_xmit",
        "enlight_net_xmit",
        Attach::Btf,
        Group::Net,
    ),
    (
        "net:netif_receive_skb",
        "enlight_net_receive",
        Attach::Btf,
        Group::Net,
    ),
    (
        "napi:napi_poll",
        "enlight_napi_poll",
        Attach::Btf,
        Group::Napi,
    ),
    (
        "irq:irq_handler_entry",
        "enlight_irq_entry",
        Attach::Btf,
        Group::Irq,
    ),
    (
        "kvm:kvm_exit",
        "enlight_kvm_exit",
        Attach::Classic,
        Group::Kvm,
    ),
    (
        "kvm:kvm_pio",
        "enlight_kvm_pio",
        Attach::Classic,
        Group::Kvm,
    ),
    (
        "kvm:kvm_mmio",
        "enlight_kvm_mmio",
        Attach::Classic,
        Group::Kvm,
    ),
];

/// The program counting any classic tracepoint's hits by event id.
const EVENT_COUNTER: &str = "enlight_count_event";
/// The status key of the Hyper-V events when the kernel has none.
pub const HYPERV_PROBE: &str = "hyperv:vmbus_*";

/// Which probe groups to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection(pub Vec<Group>);

impl Default for Selection {
    /// Every group.
    fn default() -> Self {
        Selection(vec![
            Group::Block,
            Group::Net,
            Group::Napi,
            Group::Irq,
            Group::Kvm,
            Group::Hyperv,
        ])
    }
}

impl Selection {
    fn has(&self, g: Group) -> bool {
        self.0.contains(&g)
    }
}

/// Whether one probe is attached, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeStatus {
    /// The group the probe belongs to.
    pub group: Group,
    /// Whether its program is attached.
    pub attached: bool,
    /// Why it is not (absent tracepoint, the kernel refused, not selected).
    pub reason: Option<String>,
    /// Not attached because this kernel has no such tracepoint (as opposed to one the kernel
    /// has but refused, or one not selected): nothing is missing from the figures then.
    pub absent: bool,
}

/// The object itself did not load; every other failure is a [`ProbeStatus`].
#[derive(Debug, thiserror::Error)]
pub enum KernelProbeError {
    /// The object (maps) did not load.
    #[error("loading the kernel-device eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A tracepoint could not be attached.
    #[error("attaching {probe}: {reason}")]
    Attach { probe: String, reason: String },
    /// A map is missing or unusable.
    #[error("kernel probe map {name}: {reason}")]
    Map { name: &'static str, reason: String },
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> KernelProbeError {
    move |e| KernelProbeError::Map {
        name,
        reason: e.to_string(),
    }
}

/// (disk, op): the disk by its kernel `dev_t` (`major << 20 | minor`, [`dev_major`]/[`dev_minor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockKey {
    pub dev: u32,
    pub op: u32,
}

/// Major number of a kernel `dev_t`.
pub fn dev_major(dev: u32) -> u32 {
    dev >> 20
}

/// Minor number of a kernel `dev_t`.
pub fn dev_minor(dev: u32) -> u32 {
    dev & 0xfffff
}

/// The kernel `dev_t` of `major:minor`.
pub fn make_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xfffff)
}

/// A network interface: its namespace (inode of `/proc/<pid>/ns/net`) and ifindex in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NicKey {
    pub netns: u32,
    pub ifindex: u32,
}

/// Cumulative counters of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicStats {
    /// Packets the driver accepted for transmission.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets the driver refused (`net_dev_xmit` with rc != 0).
    pub tx_errors: u64,
    /// Packets the stack received from the interface.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// NAPI polls and the packets they handled.
    pub napi_polls: u64,
    pub napi_work: u64,
    /// Polls that used their whole budget.
    pub napi_budget_exhausted: u64,
    /// Polls by packets handled: index n = n packets, the last index = 64 or more.
    pub napi_work_hist: Vec<u64>,
}

impl Default for NicStats {
    fn default() -> Self {
        NicStats {
            tx_packets: 0,
            tx_bytes: 0,
            tx_errors: 0,
            rx_packets: 0,
            rx_bytes: 0,
            napi_polls: 0,
            napi_work: 0,
            napi_budget_exhausted: 0,
            napi_work_hist: vec![0; NAPI_SLOTS],
        }
    }
}

impl NicStats {
    fn add_raw(&mut self, v: &NicStatsRaw) {
        self.tx_packets += v.tx_packets;
        self.tx_bytes += v.tx_bytes;
        self.tx_errors += v.tx_errors;
        self.rx_packets += v.rx_packets;
        self.rx_bytes += v.rx_bytes;
        self.napi_polls += v.napi_polls;
        self.napi_work += v.napi_work;
        self.napi_budget_exhausted += v.napi_budget_exhausted;
        for (sum, c) in self.napi_work_hist.iter_mut().zip(v.napi_work_hist.iter()) {
            *sum += c;
        }
    }
}

/// One KVM counter: a VMM thread, the event, and its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KvmKey {
    /// Process (VMM).
    pub pid: u32,
    /// Thread (a vCPU thread, normally).
    pub tid: u32,
    /// [`types::KVM_EXIT`], [`types::KVM_PIO`] or [`types::KVM_MMIO`].
    pub event: u32,
    /// `kvm_exit`'s isa (1 VMX, 2 SVM), 0 for the others.
    pub isa: u32,
    /// Exit reason, PIO direction (0 in, 1 out) or MMIO type (0 unsatisfied read, 1 read, 2 write).
    pub reason: u32,
}

/// The programs' own trouble counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelHealth {
    /// Map updates that failed (map full): events lost.
    pub events_lost: u64,
    /// Completed requests with no start time stamped in them (neither the issue time nor the
    /// allocation time: a queue with no statistics, no scheduler and no blk-stat consumer), so
    /// with no latency. The name is from when an issue program recorded start times.
    pub completions_without_issue: u64,
    /// Failed kernel memory reads.
    pub read_failures: u64,
    /// Completions timed from the request's allocation because its queue keeps no issue time
    /// (no blk-stat consumer such as the writeback throttle): their latency includes the time
    /// spent in the I/O scheduler.
    pub timed_from_allocation: u64,
}

/// Everything the kernel-device maps hold, summed over CPUs; cumulative since load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelSnapshot {
    /// Block requests per (disk, op), with log-linear latency buckets ([`crate::hist`]).
    pub disks: BTreeMap<BlockKey, IoStats>,
    /// Per interface.
    pub nics: BTreeMap<NicKey, NicStats>,
    /// Handler invocations per IRQ number (once per handler of a shared IRQ).
    pub irqs: BTreeMap<u32, u64>,
    /// KVM events per thread and reason.
    pub kvm: BTreeMap<KvmKey, u64>,
    /// Hits of each generically counted event, by `category:name`.
    pub events: BTreeMap<String, u64>,
    pub health: KernelHealth,
}

impl KernelSnapshot {
    /// `kvm:kvm_exit` counts per process (VMM) and exit reason name, summed over its threads.
    pub fn kvm_exits(&self) -> BTreeMap<u32, BTreeMap<String, u64>> {
        let mut out: BTreeMap<u32, BTreeMap<String, u64>> = BTreeMap::new();
        for (k, n) in self.kvm.iter().filter(|(k, _)| k.event == KVM_EXIT) {
            *out.entry(k.pid)
                .or_default()
                .entry(kvm::exit_reason_name(k.isa, k.reason))
                .or_default() += n;
        }
        out
    }
}

impl KernelSnapshot {
    /// Counts of one KVM event ([`types::KVM_EXIT`], [`types::KVM_PIO`], [`types::KVM_MMIO`])
    /// per process, summed over its threads and reasons.
    pub fn kvm_event_counts(&self, event: u32) -> BTreeMap<u32, u64> {
        let mut out: BTreeMap<u32, u64> = BTreeMap::new();
        for (k, n) in self.kvm.iter().filter(|(k, _)| k.event == event) {
            *out.entry(k.pid).or_default() += n;
        }
        out
    }
}

/// The loaded kernel-device programs and their attachments. Dropping it detaches everything.
pub struct KernelProbes {
    /// Perf-event links of the event counter (dropped before the programs: field order).
    links: Vec<SiteLink>,
    ebpf: Ebpf,
    status: BTreeMap<String, ProbeStatus>,
    /// Event id → `category:name` for the generic counter.
    event_names: BTreeMap<u32, String>,
}

impl KernelProbes {
    /// Loads the object and attaches every selected probe whose tracepoint the kernel has,
    /// looking tracepoints up in the real tracefs.
    pub fn load(selection: &Selection) -> Result<KernelProbes, KernelProbeError> {
        KernelProbes::load_with(selection, &tracefs::Tracefs::default())
    }

    /// [`load`](Self::load), asking `catalog` which tracepoints exist (what a test may fake);
    /// everything else (BTF, the kernel's verdict, attaching) is real.
    pub fn load_with(
        selection: &Selection,
        catalog: &dyn Catalog,
    ) -> Result<KernelProbes, KernelProbeError> {
        // The kernel accounts BPF memory by cgroup; raising the limit is only for old kernels.
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid struct; failure is fine (see above).
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
        let mut ebpf = aya::EbpfLoader::new().load(KERNEL_OBJECT)?;
        let mut status = BTreeMap::new();
        let mut event_names = BTreeMap::new();
        let btf = Btf::from_sys_fs().map_err(|e| e.to_string());
        set_kvm_fields(&mut ebpf, catalog)?;
        for (probe, program, how, group) in PROBES {
            let probe_status = if !selection.has(group) {
                ProbeStatus {
                    group,
                    attached: false,
                    reason: Some("not selected".into()),
                    absent: false,
                }
            } else {
                let (category, name) = probe.split_once(':').expect("category:name");
                let absent = !catalog.exists(category, name);
                let result = if absent {
                    Err(format!("tracepoint {probe} does not exist in this kernel"))
                } else {
                    attach_one(&mut ebpf, program, how, category, name, btf.as_ref())
                };
                match result {
                    Ok(()) => ProbeStatus {
                        group,
                        attached: true,
                        reason: None,
                        absent: false,
                    },
                    Err(reason) => {
                        log::info!("kernel probe {probe} not attached: {reason}");
                        ProbeStatus {
                            group,
                            attached: false,
                            reason: Some(reason),
                            absent,
                        }
                    }
                }
            };
            status.insert(probe.to_string(), probe_status);
        }
        let mut links = Vec::new();
        attach_hyperv(
            &mut ebpf,
            selection,
            catalog,
            &mut status,
            &mut event_names,
            &mut links,
        );
        Ok(KernelProbes {
            links,
            ebpf,
            status,
            event_names,
        })
    }

    /// Counts the hits of any classic tracepoint (`category:name`) in
    /// [`KernelSnapshot::events`], with the program the Hyper-V events use: for ad-hoc
    /// counting, and to test that program where no Hyper-V tracepoint exists.
    pub fn attach_event_counter(
        &mut self,
        category: &str,
        name: &str,
    ) -> Result<(), KernelProbeError> {
        let probe = format!("{category}:{name}");
        let id = attach_counter(
            &mut self.ebpf,
            &mut self.links,
            &tracefs::Tracefs::default(),
            category,
            name,
        )
        .map_err(|reason| KernelProbeError::Attach {
            probe: probe.clone(),
            reason,
        })?;
        self.event_names.insert(id, probe);
        Ok(())
    }

    /// Every probe's status, by `category:name`.
    pub fn status(&self) -> &BTreeMap<String, ProbeStatus> {
        &self.status
    }

    /// Whether every probe of `group` that exists here is attached (and at least one is).
    pub fn group_attached(&self, group: Group) -> bool {
        let mut any = false;
        for s in self.status.values().filter(|s| s.group == group) {
            if !s.attached {
                return false;
            }
            any = true;
        }
        any
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, KernelProbeError> {
        self.ebpf.map(name).ok_or_else(|| KernelProbeError::Map {
            name,
            reason: "missing".into(),
        })
    }

    /// Reads every map, summing the per-CPU values.
    pub fn snapshot(&self) -> Result<KernelSnapshot, KernelProbeError> {
        let mut snap = KernelSnapshot::default();
        let blk = AyaHashMap::<&MapData, IoKeyRaw, IoHistRaw>::try_from(self.map("blk_hist")?)
            .map_err(map_err("blk_hist"))?;
        for entry in blk.iter() {
            let (k, v) = entry.map_err(map_err("blk_hist"))?;
            // Entries created ahead (prepare_disk) for ops that never completed are left out.
            if v.stats.ops == 0 && v.stats.bytes == 0 {
                continue;
            }
            snap.disks.insert(
                BlockKey {
                    dev: k.dev,
                    op: k.op,
                },
                IoStats {
                    ops: v.stats.ops,
                    bytes: v.stats.bytes,
                    errors: v.stats.errors,
                    latency_sum_ns: v.stats.latency_sum_ns,
                    buckets: v
                        .buckets
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| **c > 0)
                        .map(|(i, c)| (i as u32, *c))
                        .collect(),
                },
            );
        }
        let nics =
            PerCpuHashMap::<&MapData, NicKeyRaw, NicStatsRaw>::try_from(self.map("nic_stats")?)
                .map_err(map_err("nic_stats"))?;
        for entry in nics.iter() {
            let (k, values) = entry.map_err(map_err("nic_stats"))?;
            let s = snap
                .nics
                .entry(NicKey {
                    netns: k.netns,
                    ifindex: k.ifindex,
                })
                .or_default();
            for v in values.iter() {
                s.add_raw(v);
            }
        }
        let aya::maps::Map::Array(irqs) = self.map("irq_counts")? else {
            return Err(KernelProbeError::Map {
                name: "irq_counts",
                reason: "not an array".into(),
            });
        };
        let counts =
            read_u64_array(irqs.fd().as_fd(), IRQ_SLOTS).map_err(|e| KernelProbeError::Map {
                name: "irq_counts",
                reason: format!("batch lookup: {e}"),
            })?;
        for (irq, n) in counts.into_iter().enumerate().filter(|(_, n)| *n > 0) {
            snap.irqs.insert(irq as u32, n);
        }
        let kvm = PerCpuHashMap::<&MapData, KvmKeyRaw, u64>::try_from(self.map("kvm_counts")?)
            .map_err(map_err("kvm_counts"))?;
        for entry in kvm.iter() {
            let (k, values) = entry.map_err(map_err("kvm_counts"))?;
            *snap
                .kvm
                .entry(KvmKey {
                    pid: k.tgid,
                    tid: k.tid,
                    event: k.event,
                    isa: k.isa,
                    reason: k.reason,
                })
                .or_default() += values.iter().sum::<u64>();
        }
        let events = PerCpuHashMap::<&MapData, u32, u64>::try_from(self.map("event_counts")?)
            .map_err(map_err("event_counts"))?;
        for entry in events.iter() {
            let (id, values) = entry.map_err(map_err("event_counts"))?;
            let name = self
                .event_names
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("event_{id}"));
            *snap.events.entry(name).or_default() += values.iter().sum::<u64>();
        }
        let health = PerCpuArray::<&MapData, u64>::try_from(self.map("kernel_health")?)
            .map_err(map_err("kernel_health"))?;
        let sum = |i: u32| -> Result<u64, KernelProbeError> {
            Ok(health
                .get(&i, 0)
                .map_err(map_err("kernel_health"))?
                .iter()
                .sum())
        };
        snap.health = KernelHealth {
            events_lost: sum(KHEALTH_MAP_FULL)?,
            completions_without_issue: sum(KHEALTH_NO_START)?,
            read_failures: sum(KHEALTH_READ_FAILED)?,
            timed_from_allocation: sum(KHEALTH_FROM_ALLOC)?,
        };
        Ok(snap)
    }

    /// `kvm:kvm_exit` counts per process (VMM pid) and exit reason, cumulative since load: what
    /// a KVM transport reports as its exits.
    pub fn kvm_exits(&self) -> Result<BTreeMap<u32, BTreeMap<String, u64>>, KernelProbeError> {
        Ok(self.snapshot()?.kvm_exits())
    }

    /// Run statistics of every loaded program, by program name (run time and count only while
    /// `kernel.bpf_stats_enabled` is 1; recursion misses always).
    pub fn program_stats(&self) -> BTreeMap<String, crate::attach::ProgStats> {
        let mut out = BTreeMap::new();
        for (name, program) in self.ebpf.programs() {
            let Ok(fd) = program.fd() else {
                continue; // not loaded
            };
            if let Ok(s) = crate::attach::prog_stats(fd.as_fd()) {
                out.insert(name.to_string(), s);
            }
        }
        out
    }

    /// Invocations the kernel skipped per loaded program, because the same program was already
    /// running on that CPU (an interrupt arrived while it ran). Events are lost this way and
    /// only this way when the maps have room; tests bound their differences with it.
    pub fn recursion_misses(&self) -> BTreeMap<String, u64> {
        self.program_stats()
            .into_iter()
            .map(|(name, s)| (name, s.recursion_misses))
            .collect()
    }

    /// Creates the all-zero counters of disk `dev` (a kernel `dev_t`) for every op, from user
    /// space, so the programs only look them up (a program creates a missing entry itself, from
    /// the preallocated pool; creating them ahead keeps that off the completion path). Entries
    /// that exist are left as they are.
    pub fn prepare_disk(&mut self, dev: u32) -> Result<(), KernelProbeError> {
        let map = self
            .ebpf
            .map_mut("blk_hist")
            .ok_or_else(|| KernelProbeError::Map {
                name: "blk_hist",
                reason: "missing".into(),
            })?;
        let mut hist = AyaHashMap::<&mut MapData, IoKeyRaw, IoHistRaw>::try_from(map)
            .map_err(map_err("blk_hist"))?;
        let zero = IoHistRaw {
            stats: Default::default(),
            buckets: [0; BUCKETS],
        };
        for op in [0, 1, 2, OP_DISCARD, OP_OTHER] {
            let key = IoKeyRaw {
                tgid: 0,
                dev,
                op,
                pad: 0,
            };
            const BPF_NOEXIST: u64 = 1;
            match hist.insert(key, zero, BPF_NOEXIST) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(aya::maps::MapError::SyscallError(e)) => {
                    return Err(KernelProbeError::Map {
                        name: "blk_hist",
                        reason: format!("creating the counters of dev {dev:#x}: {}", e.io_error),
                    })
                }
                Err(e) => return Err(map_err("blk_hist")(e)),
            }
        }
        Ok(())
    }
}

/// Every value of an array map of `n` u64s, in one `BPF_MAP_LOOKUP_BATCH` call (one system
/// call instead of one per entry: `irq_counts` has 16,384), more only if the kernel stops short.
fn read_u64_array(map: std::os::fd::BorrowedFd<'_>, n: u32) -> std::io::Result<Vec<u64>> {
    use std::os::fd::AsRawFd;
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let mut keys = vec![0u32; n as usize];
    let mut values = vec![0u64; n as usize];
    let mut done = 0usize;
    let mut next_key = 0u32;
    while done < n as usize {
        // union bpf_attr's batch member: in_batch, out_batch, keys, values (u64 pointers),
        // count, map_fd (u32), elem_flags, flags (u64).
        let mut attr = [0u64; 8];
        attr[0] = if done == 0 {
            0
        } else {
            &next_key as *const u32 as u64
        };
        attr[1] = &mut next_key as *mut u32 as u64;
        attr[2] = keys[done..].as_mut_ptr() as u64;
        attr[3] = values[done..].as_mut_ptr() as u64;
        attr[4] = (n as usize - done) as u64 | (map.as_raw_fd() as u64) << 32;
        // SAFETY: attr is a valid bpf_attr prefix for this command; in_batch and out_batch point
        // to a u32 (the array's key size) that outlives the call; keys and values have room for
        // `count` entries from `done` on, and the kernel writes at most `count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr) as u32,
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let copied = (attr[4] & 0xffff_ffff) as usize;
        done += copied;
        match err {
            None if copied > 0 => {}
            // ENOENT: the end of the map, after what was copied.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Some(e) => return Err(e),
            None => break,
        }
    }
    let mut out = vec![0u64; n as usize];
    for (k, v) in keys[..done].iter().zip(&values[..done]) {
        if let Some(slot) = out.get_mut(*k as usize) {
            *slot = *v;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_t_encoding_round_trips() {
        let d = make_dev(7, 3);
        assert_eq!((dev_major(d), dev_minor(d)), (7, 3));
        assert_eq!(make_dev(259, 0x12345), (259 << 20) | 0x12345);
    }

    #[test]
    fn shared_types_match_the_objects_btf() {
        let structs = crate::tests::btf_structs(crate::tests::btf_section(KERNEL_OBJECT));
        for (name, size) in SHARED_STRUCTS {
            let (btf_size, _) = structs
                .get(name)
                .unwrap_or_else(|| panic!("{name} not in the kernel object's BTF"));
            assert_eq!(*btf_size, size, "{name}");
        }
        use std::mem::offset_of;
        let offsets = |name: &str| structs[name].1.iter().map(|(_, o)| *o).collect::<Vec<_>>();
        assert_eq!(
            offsets("enlight_kvm_key"),
            [
                offset_of!(KvmKeyRaw, tgid),
                offset_of!(KvmKeyRaw, tid),
                offset_of!(KvmKeyRaw, event),
                offset_of!(KvmKeyRaw, isa),
                offset_of!(KvmKeyRaw, reason),
                offset_of!(KvmKeyRaw, pad)
            ]
        );
        assert_eq!(
            offsets("enlight_nic_stats")[8],
            offset_of!(NicStatsRaw, napi_work_hist)
        );
        // The io_hist value is the USDT programs' type, so the daemon's histogram code applies.
        assert_eq!(
            structs["enlight_io_hist"].0,
            std::mem::size_of::<IoHistRaw>()
        );
    }

    #[test]
    fn kvm_exits_sum_threads_per_process_and_name_reasons() {
        let mut snap = KernelSnapshot::default();
        let key = |tid, event, reason| KvmKey {
            pid: 100,
            tid,
            event,
            isa: kvm::ISA_VMX,
            reason,
        };
        snap.kvm.insert(key(101, KVM_EXIT, 30), 5);
        snap.kvm.insert(key(102, KVM_EXIT, 30), 7);
        snap.kvm.insert(key(102, KVM_EXIT, 48), 1);
        snap.kvm.insert(key(102, KVM_PIO, 1), 12);
        let exits = snap.kvm_exits();
        assert_eq!(exits.len(), 1);
        assert_eq!(exits[&100]["IO_INSTRUCTION"], 12);
        assert_eq!(exits[&100]["EPT_VIOLATION"], 1);
        assert_eq!(exits[&100].len(), 2, "PIO events are not exits");
        assert_eq!(snap.kvm_event_counts(KVM_PIO)[&100], 12);
        assert_eq!(snap.kvm_event_counts(KVM_EXIT)[&100], 13);
        assert!(snap.kvm_event_counts(KVM_MMIO).is_empty());
    }
}
