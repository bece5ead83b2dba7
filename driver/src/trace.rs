//! USDT tracepoints, provider `enlight`: the contract with `probes/` (docs/architecture.md).
//!
//! Every site is a [`usdt_lazy!`](crate::usdt_lazy) (a 5-byte nop on x86-64) with a semaphore:
//! when nothing is attached a site costs one load and a not-taken branch, and its arguments are
//! not even evaluated. All times are
//! `CLOCK_MONOTONIC` nanoseconds. Each function is `#[inline(always)]` so the site sits where the
//! event happens; every inlined copy gets its own note and the attacher attaches them all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

// The op codes, directions, batch limit and records the probes read are the shared ABI, defined
// once in enlight-abi (its crate docs state the contract with probes/src/bpf/enlight.h).
pub use enlight_abi::dir::{DIR_GUEST_TO_HOST, DIR_HOST_TO_GUEST};
pub use enlight_abi::op::{OP_FLUSH, OP_READ, OP_RX, OP_TX, OP_WRITE};
pub use enlight_abi::record::{SignalDeltas, MAX_BATCH};

/// One completion as `io_reap` carries it: `enlight_abi::record::Completion` (`struct
/// enlight_completion` in `probes/src/bpf/enlight.h`), under the name the driver gives it (its
/// disk already has a `Completion`, the guest driver's).
pub use enlight_abi::record::Completion as CompletionRecord;

/// Longest a reaped completion waits before it is traced (`io_reap`), for every guest driver.
pub const TRACE_FLUSH: Duration = Duration::from_millis(1);

/// Completions a guest driver reaped and has not yet traced.
///
/// Completions are traced in batches rather than one `io_reap` hit per polling pass: a uprobe
/// trap costs about a microsecond, and at high rates a pass often reaps only a few completions.
/// The driver flushes a batch (one `io_reap` hit, then [`ReapBatch::clear`]) before a push into
/// a full one, at the first pass or sleep after it is [`TRACE_FLUSH`] old
/// ([`ReapBatch::stale`]), when its workload ends, and when it is dropped: every completion is
/// traced exactly once, at most one pass or sleep after it is [`TRACE_FLUSH`] old.
#[derive(Debug)]
pub struct ReapBatch {
    records: Vec<CompletionRecord>,
    /// When the oldest record was pushed.
    since: Option<Instant>,
}

impl Default for ReapBatch {
    fn default() -> Self {
        ReapBatch::new()
    }
}

impl ReapBatch {
    /// An empty batch with room for [`MAX_BATCH`] records.
    pub fn new() -> ReapBatch {
        ReapBatch {
            records: Vec::with_capacity(MAX_BATCH),
            since: None,
        }
    }

    /// Whether the batch holds [`MAX_BATCH`] records: flush it before the next push.
    pub fn is_full(&self) -> bool {
        self.records.len() >= MAX_BATCH
    }

    /// Adds one record (the batch's age starts with its first).
    pub fn push(&mut self, record: CompletionRecord) {
        self.since.get_or_insert_with(Instant::now);
        self.records.push(record);
    }

    /// The records, oldest first.
    pub fn records(&self) -> &[CompletionRecord] {
        &self.records
    }

    /// How long the oldest record has waited; `None` when the batch is empty.
    pub fn age(&self) -> Option<Duration> {
        self.since.map(|t| t.elapsed())
    }

    /// Whether the oldest record has waited [`TRACE_FLUSH`] or longer.
    pub fn stale(&self) -> bool {
        self.age().is_some_and(|age| age >= TRACE_FLUSH)
    }

    /// Empties the batch, once the caller has traced it.
    pub fn clear(&mut self) {
        self.records.clear();
        self.since = None;
    }
}

/// Name of every probe, in the order of contract 1.
pub const PROBE_NAMES: [&str; 9] = [
    "io_submit",
    "io_complete",
    "io_reap",
    "signal",
    "irq_mask",
    "ring_full",
    "workload_start",
    "settings_change",
    "trap",
];

/// The VSC wrote a request packet into the outbound ring.
#[inline(always)]
pub fn io_submit(dev: u32, op: u16, tag: u64, bytes: u32, submit_ns: u64) {
    crate::usdt_lazy!(enlight, io_submit, dev, op, tag, bytes, submit_ns);
}

/// The VSC matched one completion to its request.
#[inline(always)]
pub fn io_complete(dev: u32, op: u16, tag: u64, bytes: u32, latency_ns: u64, status: u16) {
    crate::usdt_lazy!(
        enlight,
        io_complete,
        dev,
        op,
        tag,
        bytes,
        latency_ns,
        status
    );
}

/// A device's signalling events (signals each way, ring-full writers, interrupt-mask changes),
/// counted in process memory and carried to the probes by the device's next `io_reap` hit
/// rather than by a uprobe trap each.
///
/// A trap per signal was most of what the probes cost a CPU-bound disk (benches/README.md): it
/// sits in the middle of the signalling path, next to an eventfd write and a wake-up. Counting
/// costs a relaxed atomic add, and only while `io_reap` is traced, so the counts start when a
/// tracer attaches, as a site's hits would. Shared by both ends of a device in one process (the
/// host's interrupts then ride on the guest's `io_reap` hits); each end also flushes what is
/// left when it stops, so the totals are exact once a device has stopped.
#[derive(Debug, Default)]
pub struct SignalCounts {
    doorbells: AtomicU64,
    interrupts: AtomicU64,
    ring_full_out: AtomicU64,
    ring_full_in: AtomicU64,
    irq_masked: AtomicU64,
    irq_unmasked: AtomicU64,
}

impl SignalCounts {
    #[inline(always)]
    fn count(counter: &AtomicU64) {
        if io_reap_traced() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The events counted since the last call, and zero again (each counter is swapped, so an
    /// event counted by another thread meanwhile goes to this call or the next, never both).
    pub fn take(&self) -> SignalDeltas {
        let take = |c: &AtomicU64| c.swap(0, Ordering::Relaxed);
        SignalDeltas {
            doorbells: take(&self.doorbells),
            interrupts: take(&self.interrupts),
            ring_full_out: take(&self.ring_full_out),
            ring_full_in: take(&self.ring_full_in),
            irq_masked: take(&self.irq_masked),
            irq_unmasked: take(&self.irq_unmasked),
        }
    }
}

/// The semaphore of every `io_reap` site: it also tells [`SignalCounts`] whether to count.
#[cfg(target_arch = "x86_64")]
#[link_section = ".probes"]
static mut IO_REAP_SEMAPHORE: crate::usdt::PageAlignedSemaphore =
    crate::usdt::PageAlignedSemaphore::new();

/// Whether a tracer is attached to `io_reap`. (Other architectures use the `probe` crate's
/// sites, whose semaphores are private: there devices always count, and the first traced hit
/// carries every event since the device started.)
#[inline(always)]
pub fn io_reap_traced() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::semaphore_set!(IO_REAP_SEMAPHORE)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

/// Traces reaped completions, one hit per at most [`MAX_BATCH`], and `signals`' events since the
/// previous hit (on the first hit; a hit with no completions carries events alone). Arguments:
/// `dev, batch_ptr, count, signals_ptr`, where `signals_ptr` points at a [`SignalDeltas`] or is 0
/// when there are none.
#[inline(always)]
pub fn io_reap(dev: u32, batch: &[CompletionRecord], signals: Option<&SignalCounts>) {
    if !io_reap_traced() {
        return;
    }
    let deltas = signals.map(SignalCounts::take).unwrap_or_default();
    let mut deltas_ptr = if deltas == SignalDeltas::default() {
        0
    } else {
        &raw const deltas as usize
    };
    if batch.is_empty() {
        if deltas_ptr != 0 {
            crate::usdt_lazy!(semaphore = IO_REAP_SEMAPHORE; enlight, io_reap, dev, batch.as_ptr() as usize, 0usize, deltas_ptr);
        }
        return;
    }
    for chunk in batch.chunks(MAX_BATCH) {
        crate::usdt_lazy!(semaphore = IO_REAP_SEMAPHORE; enlight, io_reap, dev, chunk.as_ptr() as usize, chunk.len(), deltas_ptr);
        deltas_ptr = 0;
    }
}

/// An eventfd signal was sent (`direction`: [`DIR_GUEST_TO_HOST`] or [`DIR_HOST_TO_GUEST`]);
/// counted in `signals`.
#[inline(always)]
pub fn signal(dev: u32, direction: u32, ring_bytes_used: u32, signals: &SignalCounts) {
    SignalCounts::count(if direction == DIR_GUEST_TO_HOST {
        &signals.doorbells
    } else {
        &signals.interrupts
    });
    crate::usdt_lazy!(enlight, signal, dev, direction, ring_bytes_used);
}

/// The guest set (entering polling) or cleared `interrupt_mask`; counted in `signals`.
#[inline(always)]
pub fn irq_mask(dev: u32, masked: bool, signals: &SignalCounts) {
    SignalCounts::count(if masked {
        &signals.irq_masked
    } else {
        &signals.irq_unmasked
    });
    crate::usdt_lazy!(enlight, irq_mask, dev, masked as u32);
}

/// A writer found too little room, set `pending_send_sz` and blocked; counted in `signals`.
#[inline(always)]
pub fn ring_full(dev: u32, direction: u32, needed_bytes: u32, signals: &SignalCounts) {
    SignalCounts::count(if direction == DIR_GUEST_TO_HOST {
        &signals.ring_full_out
    } else {
        &signals.ring_full_in
    });
    crate::usdt_lazy!(enlight, ring_full, dev, direction, needed_bytes);
}

/// The workload starts; returns whether this site is enabled. The attacher enables this site
/// last, so a workload that waits for it knows every other site is live.
#[inline(always)]
pub fn workload_start(dev: u32, queue_depth: u32) -> bool {
    crate::usdt_lazy!(enlight, workload_start, dev, queue_depth)
}

/// A change of one knob was applied through the control socket (contract 4): `knob` is the
/// [`Knob`](crate::settings::Knob) code (0 ring_out_bytes, 1 ring_in_bytes, 2 moderation_frames,
/// 3 moderation_usecs, 4 poll_budget), `old` and `new` its values. One hit per changed knob.
#[inline(always)]
pub fn settings_change(dev: u32, knob: u32, old: u32, new: u32) {
    crate::usdt_lazy!(enlight, settings_change, dev, knob, old, new);
}

/// An emulated device trapped `count` register accesses since its last `trap` hit (contract 5).
/// Fired once per traced completion batch, not per access: a uprobe hit costs about as much as
/// the thread transport's hand-off it would count.
#[inline(always)]
pub fn trap(dev: u32, count: u64) {
    crate::usdt_lazy!(enlight, trap, dev, count);
}

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock every probe argument uses).
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reap_batch_fills_ages_and_empties() {
        let mut b = ReapBatch::new();
        assert_eq!(b.age(), None);
        assert!(!b.stale() && !b.is_full());
        let rec = CompletionRecord {
            latency_ns: 1,
            bytes: 512,
            op: OP_READ,
            status: 0,
        };
        for _ in 0..MAX_BATCH {
            assert!(!b.is_full());
            b.push(rec);
        }
        assert!(b.is_full());
        assert_eq!(b.records().len(), MAX_BATCH);
        std::thread::sleep(TRACE_FLUSH);
        assert!(b.stale(), "the oldest record has waited TRACE_FLUSH");
        b.clear();
        assert!(b.records().is_empty() && b.age().is_none() && !b.stale());
    }

    #[test]
    fn sites_are_disabled_without_a_tracer() {
        // Nothing attaches in unit tests: the semaphore is zero and the site reports it.
        assert!(!workload_start(0, 1));
        io_reap(0, &[CompletionRecord::default(); 300], None);
        let t = monotonic_ns();
        assert!(monotonic_ns() >= t);
    }
}
