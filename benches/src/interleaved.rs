//! Probe overhead in one continuous run (`--interleaved-secs`): the workload never pauses while
//! the probes are switched between the three configurations, and 1 s slices of the host's
//! request counter are compared within each triple; with the cost of one probe hit and the
//! statistics (geometric mean, Student's t) the toggled measurement shares.

use super::*;

/// The three configurations of the probe-overhead comparison.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub(crate) enum ProbeConfig {
    Detached,
    /// Only `workload_start` attached: it fires once per run, so this shows what attaching alone
    /// (and the measurement's noise) look like.
    Control,
    All,
}

impl ProbeConfig {
    const ROTATION: [ProbeConfig; 3] = [
        ProbeConfig::Detached,
        ProbeConfig::Control,
        ProbeConfig::All,
    ];
}

/// The length of one slice of the interleaved run.
pub(crate) const SLICE: Duration = Duration::from_secs(1);

/// Time left after a switch before a slice starts, for the threads to leave whatever state the
/// switch caught them in.
pub(crate) const SETTLE: Duration = Duration::from_millis(200);

/// One measured slice of the interleaved run.
#[derive(Serialize)]
pub(crate) struct Slice {
    pub(crate) config: ProbeConfig,
    #[serde(flatten)]
    pub(crate) sample: SliceSample,
}

/// What one slice of a continuous run measured.
#[derive(Serialize)]
pub(crate) struct SliceSample {
    pub(crate) iops: f64,
    pub(crate) cpu_ns_per_io: f64,
    pub(crate) ios: u64,
    /// Probe hits in the slice (all programs, as the kernel counted them).
    pub(crate) hits: u64,
    /// Time spent in the probes' programs in the slice, ns.
    pub(crate) program_ns: u64,
    /// Hits per probe in the slice.
    pub(crate) hits_by_probe: BTreeMap<&'static str, u64>,
}

/// Measures one slice of `len` of a running workload: I/O from `requests` (the host service's
/// live request counter), the process's CPU time, and the probes' run counts and times.
pub(crate) fn measure_slice(
    probes: &enlight_probes::Probes,
    requests: &dyn Fn() -> u64,
    len: Duration,
) -> Result<SliceSample> {
    let (hits0, prog0, by0) = run_totals(probes)?;
    let (t0, cpu0, req0) = (Instant::now(), process_cpu_ns(), requests());
    std::thread::sleep(len);
    let (t1, cpu1, req1) = (Instant::now(), process_cpu_ns(), requests());
    let (hits1, prog1, by1) = run_totals(probes)?;
    let n = req1.saturating_sub(req0).max(1);
    Ok(SliceSample {
        iops: n as f64 / t1.duration_since(t0).as_secs_f64(),
        cpu_ns_per_io: cpu1.saturating_sub(cpu0) as f64 / n as f64,
        ios: n,
        hits: hits1 - hits0,
        program_ns: prog1 - prog0,
        hits_by_probe: by1
            .iter()
            .map(|(k, v)| (*k, v - by0.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect(),
    })
}

/// The kernel's run counts per USDT program, and the sums of run counts and run times over all.
pub(crate) fn run_totals(
    probes: &enlight_probes::Probes,
) -> Result<(u64, u64, BTreeMap<&'static str, u64>)> {
    let stats = probes.program_run_stats()?;
    let (c, t) = stats
        .values()
        .fold((0, 0), |(c, t), s| (c + s.run_count, t + s.run_time_ns));
    Ok((c, t, stats.iter().map(|(k, v)| (*k, v.run_count)).collect()))
}

/// CPU time of the calling thread, ns.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one probe hit costs on this machine, measured on a real enlight site (`trap`, with its
/// real program) in a tight loop on one thread, attached and detached in alternation.
#[derive(Serialize)]
pub(crate) struct HitCost {
    /// CPU ns per call with the probe attached (trap + program + the call).
    pub(crate) attached_ns: f64,
    /// CPU ns per call detached (the call and the semaphore check).
    pub(crate) detached_ns: f64,
    /// The program's own run time per hit, as the kernel counted it.
    pub(crate) program_ns: f64,
    /// `attached - detached - program`: the trap's cost (the `int3`, or the call and system
    /// call of a uprobe the kernel optimised on a 5-byte nop; uprobe dispatch; return).
    pub(crate) trap_ns: f64,
}

pub(crate) fn hit_cost(probes: &mut enlight_probes::Probes) -> Result<HitCost> {
    const CALLS: u64 = 200_000;
    // A device number no device uses: the hits land in their own map entry, removed on detach.
    const DEV: u32 = u32::MAX - 1;
    let pid = std::process::id();
    let exe = std::path::Path::new("/proc/self/exe");
    let timed = || {
        let t = thread_cpu_ns();
        for i in 0..CALLS {
            enlight_driver::trace::trap(std::hint::black_box(DEV), i);
        }
        (thread_cpu_ns() - t) as f64 / CALLS as f64
    };
    let (mut attached, mut detached, mut program) = (vec![], vec![], vec![]);
    for _ in 0..5 {
        detached.push(timed());
        probes.attach_process_only(pid, exe, &["trap"])?;
        let before = probes.program_run_stats()?["trap"];
        attached.push(timed());
        let after = probes.program_run_stats()?["trap"];
        probes.detach_process(pid);
        let hits = after.run_count - before.run_count;
        anyhow::ensure!(
            hits == CALLS,
            "the trap probe counted {hits} hits of {CALLS} calls: is it attached?"
        );
        program.push((after.run_time_ns - before.run_time_ns) as f64 / hits as f64);
    }
    let (a, d, p) = (median(&attached), median(&detached), median(&program));
    Ok(HitCost {
        attached_ns: a,
        detached_ns: d,
        program_ns: p,
        trap_ns: (a - d - p).max(0.0),
    })
}

/// Attaches `config`'s probes to this process (after detaching whatever was attached).
pub(crate) fn apply_probe_config(
    probes: &mut enlight_probes::Probes,
    config: ProbeConfig,
    all: &[&str],
) -> Result<()> {
    let pid = std::process::id();
    probes.detach_process(pid);
    let exe = std::path::Path::new("/proc/self/exe");
    match config {
        ProbeConfig::Detached => {}
        ProbeConfig::Control => {
            probes.attach_process_only(pid, exe, &["workload_start"])?;
        }
        ProbeConfig::All => {
            probes.attach_process_only(pid, exe, all)?;
        }
    }
    Ok(())
}

/// The disk and workload of a continuous overhead run: QD32 4 KiB random reads on `backing`,
/// default settings, until the caller stops it (`backstop` is the workload's own limit).
pub(crate) fn continuous_qd32(
    backing: &std::path::Path,
    backstop: Duration,
) -> Result<(DiskVsc, VspHandle, WorkloadSpec)> {
    let (vsc, vsp) = SyntheticDisk::start(
        backing,
        DeviceSettings::default(),
        0,
        DiskOptions {
            queue_slots: 32,
            ..DiskOptions::default()
        },
    )?;
    let spec = WorkloadSpec {
        queue_depth: 32,
        pattern: Pattern::Random,
        block_size: 4096,
        read_percent: 100,
        limit: Limit::Duration(backstop),
        seed: 42,
        ..WorkloadSpec::default()
    };
    Ok((vsc, vsp, spec))
}

/// Probe overhead measured inside one continuous QD32 run. The workload runs on its own thread
/// and never pauses; this thread switches the probes (attaching takes about 0.2 s, detaching
/// every site about 1.5 s, during which the configuration is in between and nothing is
/// measured), waits [`SETTLE`], then measures one [`SLICE`] from the host service's live
/// request counter and the process's CPU time. Slices rotate through the three configurations
/// (the order rotated each triple, so a trend within a triple favours none of them), and each
/// triple gives one ratio per configuration against its own detached slice.
pub(crate) fn interleaved_overhead(
    probes: &mut enlight_probes::Probes,
    backing: &std::path::Path,
    label: &'static str,
    secs: u64,
    hit: &HitCost,
    all: &[&str],
) -> Result<InterleavedResult> {
    let (mut vsc, vsp, spec) = continuous_qd32(backing, Duration::from_secs(secs * 3 + 60))?;
    let stop = AtomicBool::new(false);
    let requests = || {
        vsp.stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut slices: Vec<Slice> = Vec::new();
    let mut longest_switch = Duration::ZERO;
    let measured = std::thread::scope(|scope| -> Result<()> {
        let workload = scope.spawn(|| workload::run(&mut vsc, &spec, &stop, |_| {}));
        let result = (|| -> Result<()> {
            std::thread::sleep(Duration::from_secs(1)); // warm-up, detached
            let mut k = 0usize;
            while Instant::now() < deadline || !k.is_multiple_of(3) {
                if workload.is_finished() {
                    anyhow::bail!("the workload ended before the slices were measured");
                }
                let config = ProbeConfig::ROTATION[(k / 3 + k % 3) % 3];
                let switch = Instant::now();
                apply_probe_config(probes, config, all)?;
                longest_switch = longest_switch.max(switch.elapsed());
                std::thread::sleep(SETTLE);
                slices.push(Slice {
                    config,
                    sample: measure_slice(probes, &requests, SLICE)?,
                });
                k += 1;
            }
            Ok(())
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let ended = workload.join().expect("the workload thread does not panic");
        result?;
        ended?;
        Ok(())
    });
    probes.detach_process(std::process::id());
    vsp.stop()?;
    measured?;
    let (mut with, mut control, mut cpu_with, mut base) = (vec![], vec![], vec![], vec![]);
    for triple in slices.chunks_exact(3) {
        let get = |c: ProbeConfig| triple.iter().find(|s| s.config == c).expect("one of each");
        let (d, c, a) = (
            get(ProbeConfig::Detached),
            get(ProbeConfig::Control),
            get(ProbeConfig::All),
        );
        with.push(a.sample.iops / d.sample.iops);
        control.push(c.sample.iops / d.sample.iops);
        cpu_with.push(a.sample.cpu_ns_per_io / d.sample.cpu_ns_per_io);
        base.push(d.sample.iops);
    }
    anyhow::ensure!(
        with.len() >= 2,
        "the interleaved run measured {} triples: run it for longer",
        with.len()
    );
    let attached: Vec<&Slice> = slices
        .iter()
        .filter(|s| s.config == ProbeConfig::All)
        .collect();
    let ios = attached.iter().map(|s| s.sample.ios).sum::<u64>().max(1) as f64;
    let hits_per_io = attached.iter().map(|s| s.sample.hits).sum::<u64>() as f64 / ios;
    let program_ns_per_io = attached.iter().map(|s| s.sample.program_ns).sum::<u64>() as f64 / ios;
    let mut hits_per_io_by_probe: BTreeMap<&'static str, f64> = BTreeMap::new();
    for s in &attached {
        for (k, v) in &s.sample.hits_by_probe {
            *hits_per_io_by_probe.entry(k).or_default() += *v as f64 / ios;
        }
    }
    let accounted_ns_per_io = hits_per_io * hit.trap_ns + program_ns_per_io;
    let cpu_ns_per_io_detached = median(
        &slices
            .iter()
            .filter(|s| s.config == ProbeConfig::Detached)
            .map(|s| s.sample.cpu_ns_per_io)
            .collect::<Vec<_>>(),
    );
    let (with_mean, with_ci95) = geo_mean_ci95(&with);
    let (control_mean, control_ci95) = geo_mean_ci95(&control);
    let (cpu_with_mean, cpu_with_ci95) = geo_mean_ci95(&cpu_with);
    Ok(InterleavedResult {
        backing: label,
        triples: with.len(),
        iops_ratio_with: with,
        iops_ratio_control: control,
        cpu_ratio_with: cpu_with,
        with_mean,
        with_ci95,
        control_mean,
        control_ci95,
        cpu_with_mean,
        cpu_with_ci95,
        median_iops_without: median(&base),
        hits_per_io,
        hits_per_io_by_probe,
        program_ns_per_io,
        accounted_ns_per_io,
        cpu_ns_per_io_detached,
        accounted_cost_percent: accounted_ns_per_io / cpu_ns_per_io_detached * 100.0,
        longest_switch_ms: longest_switch.as_secs_f64() * 1e3,
        slices,
    })
}

/// Geometric mean of ratios and its 95% confidence interval (Student's t on the logs).
pub(crate) fn geo_mean_ci95(ratios: &[f64]) -> (f64, (f64, f64)) {
    let logs: Vec<f64> = ratios.iter().map(|r| r.ln()).collect();
    let n = logs.len() as f64;
    let mean = logs.iter().sum::<f64>() / n;
    let var = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let half = t_975(n - 1.0) * (var / n).sqrt();
    (mean.exp(), ((mean - half).exp(), (mean + half).exp()))
}

/// The 97.5% quantile of Student's t with `dof` degrees of freedom (Cornish-Fisher expansion
/// around the normal quantile; within 1% of the exact value from 4 degrees of freedom on).
pub(crate) fn t_975(dof: f64) -> f64 {
    let z: f64 = 1.959964;
    z + (z.powi(3) + z) / (4.0 * dof)
        + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * dof * dof)
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}
