//! The closed-loop workload on an emulated disk, with the same spec, figures and tracepoints as
//! the synthetic disk's ([`crate::workload`]), so the two kinds are measured the same way.
//!
//! An IDE channel has no command queue: a queue depth of `qd` means `qd` requests are submitted
//! together (one `io_submit` each, one submit time) and the device serves them one after another;
//! each one's latency runs from that submit time to its own completion, so it includes the wait
//! behind the others, as it would for a guest whose block layer queues in front of the device.
//!
//! Completions are traced in batches (`io_reap`, up to 256, at the latest 1 ms after the oldest),
//! and each batch is followed by one `trap(dev, n)` hit carrying the register accesses trapped
//! since the previous one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{BatchIo, BlockTransport, EmulatedError};
use crate::disk::SECTOR;
use crate::trace::{self, CompletionRecord, SignalCounts, OP_READ, OP_WRITE};
use crate::workload::{Limit, Pattern, WorkloadSnapshot, WorkloadSpec};

/// Traces completions in batches and the traps behind them.
struct Tracer {
    dev: u32,
    records: Vec<CompletionRecord>,
    since: Option<Instant>,
    traps_traced: u64,
}

impl Tracer {
    fn push(&mut self, r: CompletionRecord) {
        self.since.get_or_insert_with(Instant::now);
        self.records.push(r);
    }

    fn maybe_flush(&mut self, traps_now: u64, signals: Option<&SignalCounts>) {
        let old = self
            .since
            .is_some_and(|t| t.elapsed() >= crate::disk::TRACE_FLUSH);
        if self.records.len() >= trace::MAX_BATCH || old {
            self.flush(traps_now, signals);
        }
    }

    fn flush(&mut self, traps_now: u64, signals: Option<&SignalCounts>) {
        trace::io_reap(self.dev, &self.records, signals);
        self.records.clear();
        self.since = None;
        if traps_now > self.traps_traced {
            trace::trap(self.dev, traps_now - self.traps_traced);
            self.traps_traced = traps_now;
        }
    }
}

/// Figures only this workload has (beyond [`WorkloadSnapshot`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrapFigures {
    /// Register accesses trapped during the run (transport's count).
    pub traps: u64,
    /// VM exits during the run (0 without a VM).
    pub vm_exits: u64,
}

/// Runs `spec` on `dev` until its limit or `stop`; `on_interval` gets cumulative figures (and
/// the traps so far) about once per second. Returns the final figures and the traps the run took.
pub fn run(
    dev: &mut dyn BlockTransport,
    dev_id: u32,
    spec: &WorkloadSpec,
    stop: &AtomicBool,
    mut on_interval: impl FnMut(&WorkloadSnapshot, TrapFigures),
) -> Result<(WorkloadSnapshot, TrapFigures), EmulatedError> {
    let (sectors, blocks) = geometry(dev, spec)?;
    let qd = spec.queue_depth.max(1) as usize;
    let counters = TransportCounters::at_start(dev);
    let mut tracer = Tracer {
        dev: dev_id,
        records: Vec::with_capacity(trace::MAX_BATCH),
        since: None,
        traps_traced: counters.traps,
    };
    trace::workload_start(dev_id, qd as u32);
    let mut requests = Requests {
        rng: SmallRng::seed_from_u64(spec.seed),
        next_block: 0,
        blocks,
        sectors,
        submitted: 0,
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 2).expect("HDR");
    let mut snap = WorkloadSnapshot::default();
    let mut bufs = vec![vec![0u8; spec.block_size as usize]; qd];
    let mut clock = Clock::new();
    let mut batch: Vec<Request> = Vec::with_capacity(qd);
    while !stop.load(Ordering::Relaxed) && !clock.limit_reached(spec, requests.submitted) {
        let submit_ns = submit_batch(&mut batch, qd, &mut requests, spec, dev_id, &clock);
        serve_batch(dev, &batch, &mut bufs, |req, status, done_ns| {
            let latency_ns = done_ns.saturating_sub(submit_ns);
            trace::io_complete(dev_id, req.op, req.tag, spec.block_size, latency_ns, status);
            tracer.push(CompletionRecord {
                latency_ns,
                bytes: spec.block_size,
                op: req.op,
                status,
            });
            count_completion(
                &mut snap,
                &mut hist,
                req.op,
                status,
                spec.block_size,
                latency_ns,
            );
        })?;
        tracer.maybe_flush(dev.traps(), dev.signals());
        if let Some((elapsed, iops)) = clock.tick(snap.ops_total) {
            fill(&mut snap, &hist, elapsed, iops, false);
            on_interval(&snap, counters.since(dev));
        }
    }
    tracer.flush(dev.traps(), dev.signals());
    let (elapsed, iops) = clock.last_interval(snap.ops_total);
    fill(&mut snap, &hist, elapsed, iops, true);
    Ok((snap, counters.since(dev)))
}

/// Sectors per request and requests that fit on the disk, or why `spec` cannot run on `dev`.
fn geometry(dev: &dyn BlockTransport, spec: &WorkloadSpec) -> Result<(u32, u64), EmulatedError> {
    let sectors = spec.block_size / SECTOR;
    let blocks = dev.capacity_sectors() / sectors.max(1) as u64;
    if blocks == 0 || spec.block_size > dev.max_io_bytes() || sectors == 0 {
        return Err(EmulatedError::Invalid(format!(
            "block size {} on a disk of {} sectors with {}-byte maximum I/O",
            spec.block_size,
            dev.capacity_sectors(),
            dev.max_io_bytes()
        )));
    }
    Ok((sectors, blocks))
}

/// The transport's trap and VM-exit counts when the run started, so figures count this run's.
struct TransportCounters {
    traps: u64,
    vm_exits: u64,
}

impl TransportCounters {
    fn at_start(dev: &dyn BlockTransport) -> TransportCounters {
        TransportCounters {
            traps: dev.traps(),
            vm_exits: dev.vm_exits(),
        }
    }

    fn since(&self, dev: &dyn BlockTransport) -> TrapFigures {
        TrapFigures {
            traps: dev.traps() - self.traps,
            vm_exits: dev.vm_exits() - self.vm_exits,
        }
    }
}

/// One request of a batch: its op code, first sector and tag (its submission number).
#[derive(Debug, Clone, Copy)]
struct Request {
    op: u16,
    lba: u64,
    tag: u64,
}

/// Where the next requests go and what they do: one seeded stream, so a spec repeats exactly.
struct Requests {
    rng: SmallRng,
    next_block: u64,
    blocks: u64,
    sectors: u32,
    submitted: u64,
}

impl Requests {
    fn next(&mut self, spec: &WorkloadSpec) -> Request {
        let block = match spec.pattern {
            Pattern::Random => self.rng.gen_range(0..self.blocks),
            Pattern::Sequential => {
                let b = self.next_block;
                self.next_block = (self.next_block + 1) % self.blocks;
                b
            }
        };
        let op = if self.rng.gen_range(0..100u8) < spec.read_percent {
            OP_READ
        } else {
            OP_WRITE
        };
        let tag = self.submitted;
        self.submitted += 1;
        Request {
            op,
            lba: block * self.sectors as u64,
            tag,
        }
    }
}

/// The run's start, for its limit and figures, and the last once-a-second report.
struct Clock {
    start: Instant,
    last_tick: Instant,
    ops_at_tick: u64,
}

impl Clock {
    fn new() -> Clock {
        let start = Instant::now();
        Clock {
            start,
            last_tick: start,
            ops_at_tick: 0,
        }
    }

    fn limit_reached(&self, spec: &WorkloadSpec, submitted: u64) -> bool {
        match spec.limit {
            Limit::Ios(n) => submitted >= n,
            Limit::Duration(d) => self.start.elapsed() >= d,
            Limit::Unbounded => false,
        }
    }

    /// At least a second after the last report: the time since the start and the IOPS since
    /// that report, and now is the last report.
    fn tick(&mut self, ops_total: u64) -> Option<(Duration, f64)> {
        let now = Instant::now();
        let interval = now.duration_since(self.last_tick);
        if interval < Duration::from_secs(1) {
            return None;
        }
        let iops = (ops_total - self.ops_at_tick) as f64 / interval.as_secs_f64();
        self.ops_at_tick = ops_total;
        self.last_tick = now;
        Some((now.duration_since(self.start), iops))
    }

    /// At the end: the run's length and the IOPS since the last report (however short).
    fn last_interval(&self, ops_total: u64) -> (Duration, f64) {
        let now = Instant::now();
        let iops = (ops_total - self.ops_at_tick) as f64
            / now.duration_since(self.last_tick).as_secs_f64().max(1e-9);
        (now.duration_since(self.start), iops)
    }
}

/// Fills `batch` with up to `qd` requests submitted together (until the limit), tracing each
/// one's submission; returns their common submit time.
fn submit_batch(
    batch: &mut Vec<Request>,
    qd: usize,
    requests: &mut Requests,
    spec: &WorkloadSpec,
    dev_id: u32,
    clock: &Clock,
) -> u64 {
    batch.clear();
    let submit_ns = trace::monotonic_ns();
    while batch.len() < qd && !clock.limit_reached(spec, requests.submitted) {
        let req = requests.next(spec);
        trace::io_submit(dev_id, req.op, req.tag, spec.block_size, submit_ns);
        batch.push(req);
    }
    submit_ns
}

/// Hands `batch` to the device in one go (writes carry a pattern of their tag), then calls
/// `completed` with each request, its status and its completion time.
fn serve_batch(
    dev: &mut dyn BlockTransport,
    batch: &[Request],
    bufs: &mut [Vec<u8>],
    mut completed: impl FnMut(&Request, u16, u64),
) -> Result<(), EmulatedError> {
    let mut ios: Vec<BatchIo<'_>> = batch
        .iter()
        .zip(bufs.iter_mut())
        .map(|(req, buf)| {
            if req.op == OP_WRITE {
                buf.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = (i as u64 ^ req.tag) as u8);
            }
            BatchIo {
                op: req.op,
                lba: req.lba,
                buf: buf.as_mut_slice(),
                status: 0,
                done_ns: 0,
            }
        })
        .collect();
    dev.io_batch(&mut ios)?;
    for (io, req) in ios.iter().zip(batch) {
        completed(req, io.status, io.done_ns);
    }
    Ok(())
}

/// Counts one completion in the figures and the latency histogram.
fn count_completion(
    snap: &mut WorkloadSnapshot,
    hist: &mut Histogram<u64>,
    op: u16,
    status: u16,
    bytes: u32,
    latency_ns: u64,
) {
    snap.ops_total += 1;
    if status != 0 {
        snap.errors += 1;
    }
    if op == OP_READ {
        snap.reads += 1;
        snap.read_bytes += bytes as u64;
    } else {
        snap.writes += 1;
        snap.write_bytes += bytes as u64;
    }
    hist.saturating_record(latency_ns.max(1));
}

fn fill(s: &mut WorkloadSnapshot, h: &Histogram<u64>, elapsed: Duration, iops: f64, done: bool) {
    s.elapsed_s = elapsed.as_secs_f64();
    s.iops_interval = iops;
    s.iops_avg = if s.elapsed_s > 0.0 {
        s.ops_total as f64 / s.elapsed_s
    } else {
        0.0
    };
    s.p50_ns = h.value_at_quantile(0.50);
    s.p90_ns = h.value_at_quantile(0.90);
    s.p99_ns = h.value_at_quantile(0.99);
    s.p999_ns = h.value_at_quantile(0.999);
    s.max_ns = h.max();
    s.done = done;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulated::ThreadIdeDisk;

    #[test]
    fn exact_count_mix_and_traps_per_io() {
        let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        std::fs::write(f.path(), vec![0u8; 1 << 20]).unwrap();
        let mut d = ThreadIdeDisk::open(f.path(), "W").unwrap();
        let spec: WorkloadSpec = "qd=4,bs=1k,rw=50,ios=200".parse().unwrap();
        let (r, t) = run(&mut d, 0, &spec, &AtomicBool::new(false), |_, _| {}).unwrap();
        assert_eq!(r.ops_total, 200);
        assert_eq!(r.reads + r.writes, 200);
        assert_eq!(r.errors, 0);
        // A 2-sector request: 6 task-file writes, 2 x (status + 256 data), a final status.
        assert_eq!(t.traps, 200 * (6 + 2 * 257 + 1));
        assert_eq!(t.vm_exits, 0);
        let model = d.stop().unwrap();
        assert_eq!(model.sectors_read + model.sectors_written, 400);
        assert!(r.p50_ns > 0 && r.p50_ns <= r.p99_ns && r.done);
    }
}
