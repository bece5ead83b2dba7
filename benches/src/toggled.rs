//! Probe overhead with the probes attached for the whole run and switched on and off through
//! their semaphores, in short slices.
//!
//! Attaching and detaching take seconds (detaching waits for an RCU grace period per site), so
//! the interleaved measurement needs 1 s slices a few seconds apart, and a device whose IOPS
//! drift by several percent from one second to the next (the virtio disk of a shared host) gives
//! it a wide interval. A site runs only while its semaphore is non-zero, and the driver counts
//! its signalling events only while `io_reap`'s is: with every semaphore written to zero the
//! process runs exactly the code it runs detached, while the uprobes stay in place. So this
//! process writes its own semaphores (zero for "off", the kernel's value for "on") between
//! 200 ms slices, in A-B-B-A quartets, and puts the kernel's values back before detaching (the
//! kernel decrements them then). That the "off" slices really run no program is checked from
//! the kernel's run counts; that attached-but-idle probes cost nothing is what the interleaved
//! measurement's control shows.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use enlight_driver::workload;
use serde::Serialize;

use crate::{continuous_qd32, geo_mean_ci95, measure_slice, SliceSample};

/// One measured slice.
const SLICE: Duration = Duration::from_millis(200);
/// Time after a switch before the slice starts (the batch in progress goes out meanwhile).
const SETTLE: Duration = Duration::from_millis(20);
/// Slices per quartet, and whether the probes are on in each.
const QUARTET: [bool; 4] = [true, false, false, true];

/// The semaphores of this process's enlight sites, each with the value "on" writes and dropping
/// puts back: the kernel's (what it gave them when it attached), or 0 for semaphores set with no
/// tracer attached.
pub struct Semaphores {
    cells: Vec<(*mut u16, u16)>,
}

impl Semaphores {
    /// Finds the semaphores of the `probes` sites in this executable: file offsets from its USDT
    /// notes, turned into addresses through the writable mapping of the executable that holds
    /// them (`/proc/self/maps`). Every one must be set (the probes attached).
    fn of_this_process(probes: &[&str]) -> Result<Semaphores> {
        Self::find(probes, true)
    }

    /// The semaphores of every enlight site in this executable, set to 1 as if a tracer had
    /// attached, with none attached: the driver then runs its traced paths (records, signal
    /// counts, batch flushes) while every site stays a plain nop. What `--disk-cost-only` counts
    /// under callgrind. Dropping them puts 0 back.
    pub fn force_on_without_tracer() -> Result<Semaphores> {
        let mut semaphores = Self::find(&enlight_driver::trace::PROBE_NAMES, false)?;
        for (cell, restore) in &mut semaphores.cells {
            // SAFETY: as in `find`; nothing else writes these semaphores (no tracer attached).
            unsafe { std::ptr::write_volatile(*cell, 1) };
            *restore = 0;
        }
        Ok(semaphores)
    }

    /// Finds the semaphores; with `attached`, each must already be set by the kernel.
    fn find(probes: &[&str], attached: bool) -> Result<Semaphores> {
        let exe = std::fs::read_link("/proc/self/exe")?;
        let mut offsets: Vec<u64> = enlight_probes::usdt::sites(&exe)?
            .into_iter()
            .filter(|s| {
                s.provider == enlight_probes::PROVIDER
                    && s.semaphore_offset != 0
                    && probes.contains(&s.name.as_str())
            })
            .map(|s| s.semaphore_offset)
            .collect();
        offsets.sort_unstable();
        offsets.dedup();
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let exe_name = exe.to_string_lossy();
        let mut cells = Vec::new();
        for off in offsets {
            let addr = maps
                .lines()
                .find_map(|line| writable_address(line, &exe_name, off))
                .with_context(|| {
                    format!("no writable mapping of {exe_name} holds offset {off:#x}")
                })?;
            let cell = addr as *mut u16;
            // SAFETY: the address is inside a live, writable, private mapping of this
            // executable (its data segment, where `usdt_lazy!` puts semaphores), 2-aligned as
            // the notes require; the kernel itself reads and writes it the same way.
            let value = unsafe { std::ptr::read_volatile(cell) };
            anyhow::ensure!(
                value > 0 || !attached,
                "the semaphore at {off:#x} is 0: are the probes attached?"
            );
            cells.push((cell, value));
        }
        anyhow::ensure!(!cells.is_empty(), "no semaphores of {probes:?} found");
        Ok(Semaphores { cells })
    }

    /// Turns every site on (the kernel's values) or off (0).
    fn set(&self, on: bool) {
        for &(cell, value) in &self.cells {
            // SAFETY: as in `of_this_process`; a 2-byte aligned store, which the driver's
            // volatile reads see whole (the kernel updates semaphores the same way).
            unsafe { std::ptr::write_volatile(cell, if on { value } else { 0 }) };
        }
    }
}

impl Drop for Semaphores {
    fn drop(&mut self) {
        // The kernel decrements each semaphore when it detaches: give it back what it set.
        self.set(true);
    }
}

/// The address of file offset `off` of `exe` if `line` of /proc/self/maps maps it writable.
fn writable_address(line: &str, exe: &str, off: u64) -> Option<u64> {
    let mut f = line.split_whitespace();
    let (range, perms, file_off) = (f.next()?, f.next()?, f.next()?);
    let path = f.nth(2)?;
    if path != exe || !perms.starts_with("rw") {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let file_off = u64::from_str_radix(file_off, 16).ok()?;
    (file_off <= off && off < file_off + (end - start)).then(|| start + (off - file_off))
}

/// One measured slice (`hits`, the kernel's count of program runs, is 0 in every "off" slice).
#[derive(Serialize)]
struct ToggledSlice {
    on: bool,
    #[serde(flatten)]
    sample: SliceSample,
}

/// The result of one toggled run.
#[derive(Serialize)]
pub struct ToggledResult {
    backing: &'static str,
    /// Complete A-B-B-A quartets measured.
    quartets: usize,
    /// Per quartet: IOPS on / IOPS off (geometric mean of its two pairs).
    iops_ratio_on: Vec<f64>,
    /// Per quartet: process CPU per I/O on / off.
    cpu_ratio_on: Vec<f64>,
    /// Geometric mean of `iops_ratio_on` and its 95% confidence interval.
    on_mean: f64,
    on_ci95: (f64, f64),
    /// The same for `cpu_ratio_on`.
    cpu_on_mean: f64,
    cpu_on_ci95: (f64, f64),
    /// Median IOPS of the "off" slices.
    median_iops_off: f64,
    /// Program runs per I/O in the "on" slices.
    hits_per_io_on: f64,
    slices: Vec<ToggledSlice>,
}

/// Runs QD32 4 KiB random reads on `backing` for about `secs`, with `all` attached throughout
/// and switched on and off in quartets of [`SLICE`]s.
pub fn toggled_overhead(
    probes: &mut enlight_probes::Probes,
    backing: &Path,
    label: &'static str,
    secs: u64,
    all: &[&str],
) -> Result<ToggledResult> {
    let pid = std::process::id();
    let (mut vsc, vsp, spec) = continuous_qd32(backing, Duration::from_secs(secs * 2 + 60))?;
    let requests = || vsp.stats().requests.load(Ordering::Relaxed);
    probes.attach_process_only(pid, Path::new("/proc/self/exe"), all)?;
    let stop = AtomicBool::new(false);
    let mut slices = Vec::new();
    let measured = std::thread::scope(|scope| -> Result<()> {
        let workload = scope.spawn(|| workload::run(&mut vsc, &spec, &stop, |_| {}));
        let result = (|| -> Result<()> {
            let semaphores = Semaphores::of_this_process(all)?;
            std::thread::sleep(Duration::from_secs(1)); // warm-up, probes on
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut k = 0usize;
            while Instant::now() < deadline || !k.is_multiple_of(QUARTET.len()) {
                anyhow::ensure!(
                    !workload.is_finished(),
                    "the workload ended before the slices were measured"
                );
                let on = QUARTET[k % QUARTET.len()];
                semaphores.set(on);
                std::thread::sleep(SETTLE);
                slices.push(ToggledSlice {
                    on,
                    sample: measure_slice(probes, &requests, SLICE)?,
                });
                k += 1;
            }
            Ok(()) // `semaphores` restores the kernel's values here, before the detach below
        })();
        stop.store(true, Ordering::Relaxed);
        let ended = workload.join().expect("the workload thread does not panic");
        result?;
        ended?;
        Ok(())
    });
    probes.detach_process(pid);
    vsp.stop()?;
    measured?;
    let off_hits: u64 = slices.iter().filter(|s| !s.on).map(|s| s.sample.hits).sum();
    anyhow::ensure!(
        off_hits == 0,
        "{off_hits} program runs in the \"off\" slices: the semaphores did not switch the sites off"
    );
    let (mut iops_ratio, mut cpu_ratio) = (Vec::new(), Vec::new());
    for q in slices.chunks_exact(QUARTET.len()) {
        // A1 B1 B2 A2: the geometric mean of A1/B1 and A2/B2 cancels a linear drift.
        let ratio = |f: &dyn Fn(&ToggledSlice) -> f64| {
            ((f(&q[0]) * f(&q[3])) / (f(&q[1]) * f(&q[2]))).sqrt()
        };
        iops_ratio.push(ratio(&|s| s.sample.iops));
        cpu_ratio.push(ratio(&|s| s.sample.cpu_ns_per_io));
    }
    anyhow::ensure!(
        iops_ratio.len() >= 2,
        "the toggled run measured {} quartets: run it for longer",
        iops_ratio.len()
    );
    let on: Vec<&ToggledSlice> = slices.iter().filter(|s| s.on).collect();
    let on_ios = on.iter().map(|s| s.sample.ios).sum::<u64>().max(1) as f64;
    let (on_mean, on_ci95) = geo_mean_ci95(&iops_ratio);
    let (cpu_on_mean, cpu_on_ci95) = geo_mean_ci95(&cpu_ratio);
    Ok(ToggledResult {
        backing: label,
        quartets: iops_ratio.len(),
        iops_ratio_on: iops_ratio,
        cpu_ratio_on: cpu_ratio,
        on_mean,
        on_ci95,
        cpu_on_mean,
        cpu_on_ci95,
        median_iops_off: crate::median(
            &slices
                .iter()
                .filter(|s| !s.on)
                .map(|s| s.sample.iops)
                .collect::<Vec<_>>(),
        ),
        hits_per_io_on: on.iter().map(|s| s.sample.hits).sum::<u64>() as f64 / on_ios,
        slices,
    })
}

/// Prints the toggled runs as a Markdown table.
pub fn print(results: &[ToggledResult]) {
    if results.is_empty() {
        return;
    }
    println!("\n| QD32, 4 KiB random read, probes attached throughout | backing file | A-B-B-A quartets of 200 ms slices | median IOPS, off | IOPS, on / off (geo. mean, 95% CI) | cost | CPU per I/O, on / off | program runs per I/O, on |");
    println!("|---|---|---|---|---|---|---|---|");
    for t in results {
        println!(
            "| QD32 | {} | {} | {:.0} | {:.4} [{:.4}, {:.4}] | {:.2}% | {:.4} [{:.4}, {:.4}] | {:.4} |",
            t.backing,
            t.quartets,
            t.median_iops_off,
            t.on_mean,
            t.on_ci95.0,
            t.on_ci95.1,
            (1.0 - t.on_mean) * 100.0,
            t.cpu_on_mean,
            t.cpu_on_ci95.0,
            t.cpu_on_ci95.1,
            t.hits_per_io_on,
        );
    }
    for t in results {
        println!("{}", verdict(t.backing, t.on_mean, t.on_ci95));
    }
}

/// The most the probes may cost at QD32 (issue 17): the cost itself and the upper end of its 95%
/// interval both at most this.
pub const COST_TARGET: f64 = 0.03;

/// One backing's verdict against [`COST_TARGET`], from its IOPS ratio on / off and that ratio's
/// 95% interval (the cost's upper bound is one minus the ratio's lower bound).
fn verdict(backing: &str, on_mean: f64, on_ci95: (f64, f64)) -> String {
    let (cost, lo, hi) = (1.0 - on_mean, 1.0 - on_ci95.1, 1.0 - on_ci95.0);
    let met = cost <= COST_TARGET && hi < COST_TARGET;
    format!(
        "verdict, {backing}: cost {:.2}% [{:.2}%, {:.2}%] (95%); target at most {:.0}% with the \
         interval below it: {}",
        cost * 100.0,
        lo * 100.0,
        hi * 100.0,
        COST_TARGET * 100.0,
        if met { "met" } else { "NOT met" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_needs_the_whole_interval_under_the_target() {
        // Run 1 of 2026-12-07: 0.89% [-1.18%, 2.91%].
        assert!(verdict("allocated", 0.9911, (0.9709, 1.0118)).ends_with(": met"));
        // Under 3% on average but the interval reaches past it.
        let wide = verdict("allocated", 0.98, (0.96, 1.0));
        assert!(wide.ends_with("NOT met"), "{wide}");
        assert!(wide.contains("cost 2.00% [0.00%, 4.00%]"), "{wide}");
        // Issue 17's re-run: 4.72%.
        assert!(verdict("allocated", 0.9528, (0.9406, 0.9652)).ends_with("NOT met"));
    }

    #[test]
    fn finds_a_file_offset_in_the_writable_mapping_of_the_executable() {
        let maps = "\
55d0a0000000-55d0a0100000 r--p 00000000 fd:01 123 /usr/bin/spine-bench
55d0a0100000-55d0a0400000 r-xp 00100000 fd:01 123 /usr/bin/spine-bench
55d0a0600000-55d0a0610000 rw-p 00500000 fd:01 123 /usr/bin/spine-bench
7f0000000000-7f0000001000 rw-p 00500000 fd:01 456 /usr/lib/other.so";
        let find = |off| {
            maps.lines()
                .find_map(|l| writable_address(l, "/usr/bin/spine-bench", off))
        };
        assert_eq!(find(0x500004), Some(0x55d0a0600004));
        assert_eq!(find(0x50fffe), Some(0x55d0a060fffe));
        assert_eq!(find(0x510000), None, "past the mapping");
        assert_eq!(find(0x100010), None, "only in a read-only mapping");
    }
}
