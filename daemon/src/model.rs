//! The daemon's shared model: what the collectors know about each device and about the daemon
//! itself ([`State`]), read by everything that shows it (the exposition, the JSON API, the
//! tuner). The collectors ([`crate::collector`], [`crate::kernel::collector`]) write it; nothing
//! here reads a map, a socket or a file.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use enlight_driver::registry::DeviceRecord;
use enlight_probes::{DevEvents, Health};
use hdrhistogram::Histogram;

/// Name of an op code: the `op` label and the API's `op` (`op<code>` for one with no
/// [`enlight_abi::Op`], such as the kernel's discards, 5).
pub fn op_name(op: u32) -> String {
    enlight_abi::op::name_of(op)
}

/// Cumulative figures of one op of one device (monotonic across re-attachments).
#[derive(Debug, Clone, Default)]
pub struct OpFigures {
    /// Completed ops.
    pub ops: u64,
    /// Bytes.
    pub bytes: u64,
    /// Completions with an error status.
    pub errors: u64,
    /// Sum of latencies, ns.
    pub latency_sum_ns: u64,
    /// Kernel bucket index → count.
    pub buckets: BTreeMap<u32, u64>,
    /// Ops per second over the last interval.
    pub ops_per_sec: f64,
    /// Bytes per second over the last interval.
    pub bytes_per_sec: f64,
}

impl OpFigures {
    /// Adds another's counters and buckets (not its rates).
    pub(crate) fn add(&mut self, other: &OpFigures) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.errors += other.errors;
        self.latency_sum_ns += other.latency_sum_ns;
        for (b, c) in &other.buckets {
            *self.buckets.entry(*b).or_default() += c;
        }
    }

    /// An HDR histogram (2 significant digits, ns) with each kernel bucket's count recorded at the
    /// bucket's midpoint: buckets are at most 1/128 wide, so this errs by under 0.4%.
    pub fn histogram(&self) -> Histogram<u64> {
        let mut h = empty_histogram();
        for (&b, &c) in &self.buckets {
            h.saturating_record_n(enlight_probes::hist::bucket_mid_ns(b).max(1), c);
        }
        h
    }

    /// Latency quantiles in ns, exactly as `self.histogram().value_at_quantile(q)` gives them,
    /// or `None` before any completion; see [`bucket_quantiles_ns`].
    pub fn quantiles_ns<const N: usize>(&self, qs: [f64; N]) -> Option<[u64; N]> {
        let buckets: Vec<(u32, u64)> = self.buckets.iter().map(|(&b, &c)| (b, c)).collect();
        bucket_quantiles_ns(&buckets, qs)
    }
}

/// Latency quantiles in ns of kernel buckets (`(index, count)`, ascending index, an index may
/// repeat: several ops' buckets sorted together), exactly as the [`OpFigures::histogram`] of
/// their sum gives them with `value_at_quantile`, or `None` before any completion; without
/// building the histogram (tens of kilobytes to allocate, zero and scan, per op of every device
/// at every tick).
///
/// The kernel buckets ascend and so do their midpoints, so the HDR bucket where the running
/// count first reaches `q` of the total is the one of the first kernel bucket where it does; the
/// answer is that HDR bucket's highest equivalent value. A midpoint beyond the histogram's range
/// (an I/O of over an hour) is clamped by the histogram, so then it is built after all.
pub fn bucket_quantiles_ns<const N: usize>(
    buckets: &[(u32, u64)],
    qs: [f64; N],
) -> Option<[u64; N]> {
    let shape = histogram_shape();
    // Each bucket's midpoint and the running count up to it.
    let mut running = Vec::with_capacity(buckets.len());
    let mut total = 0u64;
    for &(b, c) in buckets {
        let mid = enlight_probes::hist::bucket_mid_ns(b).max(1);
        if mid > shape.high() {
            let mut h = empty_histogram();
            for &(b, c) in buckets {
                h.saturating_record_n(enlight_probes::hist::bucket_mid_ns(b).max(1), c);
            }
            return (!h.is_empty()).then(|| qs.map(|q| h.value_at_quantile(q)));
        }
        total = total.saturating_add(c);
        running.push((mid, total));
    }
    if total == 0 {
        return None;
    }
    Some(qs.map(|q| {
        // What value_at_quantile aims for: at least one completion.
        let target = ((q.min(1.0) * total as f64).ceil() as u64).max(1);
        let at = running
            .partition_point(|&(_, seen)| seen < target)
            .min(running.len() - 1);
        let v = running[at].0;
        if q == 0.0 {
            shape.lowest_equivalent(v)
        } else {
            shape.highest_equivalent(v)
        }
    }))
}

/// The latency histogram's shape: 1 ns to an hour, two significant digits.
fn empty_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 2).expect("valid HDR bounds")
}

/// One empty histogram of [`empty_histogram`]'s shape, made once: its bucket arithmetic
/// (`highest_equivalent`) is all [`OpFigures::quantiles_ns`] needs.
fn histogram_shape() -> &'static Histogram<u64> {
    static SHAPE: std::sync::OnceLock<Histogram<u64>> = std::sync::OnceLock::new();
    SHAPE.get_or_init(empty_histogram)
}

/// Everything the collector knows about one device.
#[derive(Debug, Clone)]
pub struct DeviceState {
    /// The registry record (settings included).
    pub record: DeviceRecord,
    /// Whether the device's process is still registered.
    pub present: bool,
    /// Whether the probes are attached to its process.
    pub attached: bool,
    /// Sites attached per probe.
    pub sites_by_probe: BTreeMap<String, usize>,
    /// Why attaching failed, if it did.
    pub attach_error: Option<String>,
    /// Figures per op code, cumulative.
    pub ops: BTreeMap<u32, OpFigures>,
    /// Signalling counters, cumulative.
    pub events: DevEvents,
    /// Host → guest signals per second over the last interval.
    pub interrupts_per_sec: f64,
    /// Register accesses an emulated device trapped (`trap` probe), cumulative.
    pub traps: u64,
    /// Settings changes applied through the device's control socket, by knob code
    /// (`settings_change` probe), cumulative.
    pub settings_changes: BTreeMap<u32, u64>,
    /// Per op: each recent interval's rate and highest latency bucket (microbursts).
    pub peaks: BTreeMap<u32, crate::peaks::PeakWindow>,
    /// The knobs the device really has, with their values in force (see [`crate::knobs`]):
    /// a synthetic device's control-socket knobs, a kernel device's from ethtool and sysfs,
    /// none for an emulated device.
    pub knobs: Vec<crate::knobs::Knob>,
    /// The limits the device's control socket reported (asked once per process).
    pub control_limits: Option<enlight_driver::control::Limits>,
    /// A device of the running kernel (kind `kernel`): its driver, class and tuning state.
    /// `None` for registry devices. Kernel devices are kept by [`crate::kernel::collector`];
    /// this collector leaves them alone.
    pub kernel: Option<crate::kernel::KernelInfo>,
    /// Figures of earlier instances (processes) of this device, added to the current ones so
    /// counters never go backwards.
    pub(crate) base_ops: BTreeMap<u32, OpFigures>,
    pub(crate) base_events: DevEvents,
    pub(crate) base_traps: u64,
    pub(crate) base_settings_changes: BTreeMap<u32, u64>,
    pub(crate) gone_since: Option<Instant>,
}

impl DeviceState {
    /// A device just seen, with no figures yet.
    pub fn new(record: DeviceRecord) -> DeviceState {
        DeviceState {
            record,
            present: true,
            attached: false,
            sites_by_probe: BTreeMap::new(),
            attach_error: None,
            ops: BTreeMap::new(),
            events: DevEvents::default(),
            interrupts_per_sec: 0.0,
            traps: 0,
            settings_changes: BTreeMap::new(),
            peaks: BTreeMap::new(),
            knobs: Vec::new(),
            control_limits: None,
            kernel: None,
            base_ops: BTreeMap::new(),
            base_events: DevEvents::default(),
            base_traps: 0,
            base_settings_changes: BTreeMap::new(),
            gone_since: None,
        }
    }
}

/// The key of [`DeviceState::peaks`] for every op of a device together.
pub const ALL_OPS: u32 = u32::MAX;

/// Error kinds counted in `enlight_errors_total`.
pub const ERROR_KINDS: [&str; 4] = ["attach", "snapshot", "registry", "http"];

/// The collector's whole state, shared with the HTTP handlers.
#[derive(Debug, Default)]
pub struct State {
    /// Devices by name.
    pub devices: BTreeMap<String, DeviceState>,
    /// The probes' own counters.
    pub health: Health,
    /// Errors by kind.
    pub errors: BTreeMap<&'static str, u64>,
    /// Ticks done.
    pub ticks: u64,
    /// Duration of the last tick.
    pub last_tick: Duration,
    /// Last few error messages (newest last), for /api/v1/health.
    pub recent_errors: Vec<String>,
    /// The kernel probes' state (attached probes, KVM exits), kept by
    /// [`crate::kernel::collector`].
    pub kernel: crate::kernel::KernelState,
    /// Errors already logged that keep recurring (logged once, then counted).
    pub(crate) repeats: crate::logging::Repeats,
    /// What enlightd itself costs: its programs' runs and run time, its CPU and memory.
    pub self_cost: crate::selfcost::SelfCost,
    /// The window of the peak gauges (`peak_window_secs`).
    pub peak_window: Duration,
    /// The collector's interval: the resolution of the peak rates.
    pub interval: Duration,
    /// When the maps were last read (what the figures describe; a tick that attaches probes
    /// ends well after it).
    pub read_at: Option<Instant>,
}

impl State {
    /// Counts an error of `kind` (one of [`ERROR_KINDS`]) and keeps its message. The first
    /// occurrence is logged; while it recurs every interval it is only counted (here, in
    /// `recent_errors` as `(seen N times)`, and in `enlight_errors_total`).
    pub(crate) fn error(&mut self, kind: &'static str, message: String) {
        *self.errors.entry(kind).or_default() += 1;
        let line = format!("{kind}: {message}");
        if self.repeats.note(&line) {
            log::warn!("{line}");
            self.recent_errors.push(line);
            if self.recent_errors.len() > 20 {
                self.recent_errors.remove(0);
            }
        } else {
            let n = self.repeats.count(&line);
            if let Some(e) = self
                .recent_errors
                .iter_mut()
                .rev()
                .find(|e| e.starts_with(&line))
            {
                *e = format!("{line} (seen {n} times)");
            }
        }
    }

    /// Ends a collector interval: a logged error that did not recur in it is said to be over,
    /// once, with how often it was seen.
    pub(crate) fn end_interval(&mut self) {
        for (line, n) in self.repeats.end_interval() {
            if n > 1 {
                log::info!("no longer seen after {n} times: {line}");
            } else {
                log::debug!("no longer seen: {line}");
            }
        }
    }
}
