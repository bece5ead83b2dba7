//! `enlight bench tune`: every tuning controller on every scenario, on the real synthetic disk
//! and NIC with the real probes, against an oracle; and on a kernel veth pair in namespaces of
//! its own (`kernel-tcp`, `kernel-ping`, [`veth`]), whose receiving end's NAPI moderation
//! (`napi_defer_hard_irqs`, `gro_flush_timeout`) the oracle sweeps through sysfs and, in
//! enlight's run, the real `enlightd --kernel` tunes, the bench only watching.
//!
//! For each scenario (a workload plan of one or more phases and an objective):
//! - the **oracle** sweeps the settings grid ([`grid`]) once per phase: one device process runs
//!   that phase's workload and the grid points are put in force one after another through the
//!   control socket, each settled and then measured from the eBPF windows; the [`FINALISTS`]
//!   best by the scenario's objective ([`score::best`]) are measured again for twice as long,
//!   the best of those is the oracle's point, and one more measurement of that point is the
//!   oracle's value for that phase (independent of the ones that chose it);
//! - each **controller** (static defaults, DIM, enlight's tuner) runs the whole plan on a fresh
//!   device process, deciding every tick from the eBPF window and applying through the control
//!   socket.
//!
//! Reported per scenario, phase and controller: the objective over the last part of the phase
//! (from [`EVAL_FROM_S`] s after the phase start, quick: 60% of the phase) as a fraction of the
//! oracle's, the time after which the objective stays at 95% of the oracle's (`t95`: the
//! earliest tick from which the rest of the phase, merged, reaches 95%), the time of the last
//! change, the number of changes and the most changes within any 1 s. Markdown, JSON and a PNG
//! go to `--out`.

mod device;
mod report;
pub mod score;
mod veth;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use enlight_driver::settings::DeviceSettings;
use enlightd::tuner::backend::SettingsBackend;
use enlightd::tuner::decide::{Policy, TunerParams};
use enlightd::tuner::dim::Dim;
use enlightd::tuner::window::Window;
use enlightd::tuner::{
    Action, Bounds, Controller, Cumulative, DeviceTuner, Objective, Static, Throughput, TunerMode,
};
use serde::{Deserialize, Serialize};

use self::device::Harness;
use self::score::Figures;

/// In a full run, a phase's objective is judged from this many seconds after its start.
pub const EVAL_FROM_S: f64 = 30.0;

#[derive(Args, Debug)]
pub struct TuneBenchArgs {
    /// Short phases and a small grid (about 10 minutes instead of about 47).
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// Phases of a few seconds and a grid of two points: checks that every part runs, end to
    /// end, in about half a minute per scenario. Its figures mean nothing; writes tune-smoke.*.
    #[arg(long)]
    smoke: bool,
    /// Run only these scenarios (by name; repeatable): steady-throughput, low-rate-latency,
    /// bursty, phase-change, drift, mixed-sizes, nic-tcp-throughput, nic-ping-latency, and the
    /// kernel ones, kernel-tcp and kernel-ping (a veth pair in namespaces the bench creates and
    /// removes; enlightd, beside this executable, tunes its NAPI moderation).
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// Where tune.md, tune.json and tune.png go (tune-quick.* with --quick, tune-smoke.* with
    /// --smoke).
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Controller tick, milliseconds, 50..=60000.
    #[arg(long, default_value_t = 500, value_parser = crate::ranges::int(50..=60_000u64))]
    tick_ms: u64,
    /// Pin each device process (all its threads) to this CPU, or `none`. The default, the
    /// machine's last CPU when it has more than one, keeps the scheduler's thread placement from
    /// moving a CPU-bound device's throughput by a factor of two between runs (measured on a
    /// 2-vCPU guest), which would swamp what the knobs change; the harness and the traffic
    /// generators run on the other CPUs.
    #[arg(long, value_name = "CPU|none")]
    cpu: Option<String>,
}

/// The CPU device processes are pinned to, from `--cpu`.
fn device_cpu(arg: Option<&str>) -> Result<Option<usize>> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    match arg {
        None if cpus > 1 => Ok(Some(cpus - 1)),
        None | Some("none") => Ok(None),
        Some(v) => {
            let cpu: usize = v
                .parse()
                .with_context(|| format!("--cpu {v:?} is neither a CPU number nor \"none\""))?;
            anyhow::ensure!(cpu < cpus, "--cpu {cpu}: this machine has {cpus} CPUs");
            Ok(Some(cpu))
        }
    }
}

/// A workload scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    /// One workload spec per phase (without duration).
    pub phases: Vec<String>,
    pub objective: Objective,
    pub slo_us: u64,
    /// The device: `disk` (phases are workload specs), `nic` (the synthetic NIC; one phase of
    /// traffic: `tcp`, `udp=<Mbit/s>` or `ping=<per second>`, see [`device::NicTraffic`]) or
    /// `veth` (a kernel veth pair, NAPI moderation of its receiving end tuned by enlightd; one
    /// phase of traffic as for `nic`, see [`veth`]).
    #[serde(default = "disk_device")]
    pub device: String,
}

fn disk_device() -> String {
    "disk".into()
}

impl Scenario {
    /// What throughput is counted in, as enlightd's tuner counts it for the device
    /// ([`Throughput::of_device`]): a NIC's (synthetic or the veth) bytes/s, a disk's ops/s.
    /// Every controller and the oracle are scored in it.
    pub fn throughput(&self) -> Throughput {
        Throughput::of_device(if self.device == "veth" {
            "nic"
        } else {
            &self.device
        })
    }
}

/// The disk scenarios, then the NIC's.
pub fn scenarios() -> Vec<Scenario> {
    let s = |name: &str, description: &str, phases: &[&str], objective, slo_us| Scenario {
        name: name.into(),
        description: description.into(),
        phases: phases.iter().map(|p| p.to_string()).collect(),
        objective,
        slo_us,
        device: disk_device(),
    };
    let nic = |name: &str, description: &str, traffic: &str, objective, slo_us| Scenario {
        device: "nic".into(),
        ..s(name, description, &[traffic], objective, slo_us)
    };
    vec![
        s(
            "steady-throughput",
            "closed loop, QD 32, 4 KiB random, 70% reads",
            &["qd=32,bs=4k,rw=70"],
            Objective::Throughput,
            5_000,
        ),
        s(
            "low-rate-latency",
            "open loop at 2000 IOPS, at most 4 in flight, 4 KiB random",
            &["qd=4,bs=4k,rw=70,rate=2000"],
            Objective::Latency,
            5_000,
        ),
        s(
            "bursty",
            "QD 32 for 200 ms, idle for 300 ms, repeated",
            &["qd=32,bs=4k,rw=70,burst=200ms:300ms"],
            Objective::Balanced,
            2_000,
        ),
        s(
            "phase-change",
            "2000 IOPS at QD <= 4, then closed loop at QD 32",
            &["qd=4,bs=4k,rw=70,rate=2000", "qd=32,bs=4k,rw=70"],
            Objective::Latency,
            5_000,
        ),
        s(
            "drift",
            "open loop ramping down from 16000 to 6000 IOPS at QD <= 32 whatever the settings",
            &["qd=32,bs=4k,rw=70,rate=16000,ramp=6000"],
            Objective::Balanced,
            5_000,
        ),
        s(
            "mixed-sizes",
            "closed loop, QD 16, 70% 4 KiB and 30% 64 KiB",
            &["qd=16,bs=4k,mix=64k:30,rw=70"],
            Objective::Throughput,
            10_000,
        ),
        nic(
            "nic-tcp-throughput",
            "synthetic NIC: one iperf3 TCP stream, guest to host namespace",
            "tcp",
            Objective::Throughput,
            5_000,
        ),
        nic(
            "nic-ping-latency",
            "synthetic NIC: 500 pings/s (and their replies), nothing else",
            "ping=500",
            Objective::Latency,
            2_000,
        ),
        Scenario {
            device: "veth".into(),
            ..s(
                "kernel-tcp",
                "kernel veth pair, GRO on the receiver, TSO off on the sender: one iperf3 TCP \
                 stream; enlightd --kernel tunes the receiver's NAPI moderation",
                &["tcp"],
                Objective::Throughput,
                5_000,
            )
        },
        Scenario {
            device: "veth".into(),
            ..s(
                "kernel-ping",
                "kernel veth pair, GRO on the receiver: 500 pings/s, round trips from ping; \
                 enlightd --kernel tunes the receiver's NAPI moderation",
                &["ping=500"],
                Objective::Latency,
                2_000,
            )
        },
    ]
}

/// A device run, synthetic or kernel: what the sweep and the controllers need of it.
trait Run {
    fn backend(&mut self) -> &mut dyn SettingsBackend;
    /// Whether the run has ended (its process exited, its time is up).
    fn ended(&mut self) -> Result<bool>;
}

/// Where runs happen: the synthetic devices' harness, or the kernel veth rig.
trait Rig {
    type Run: Run;
    /// Starts a run of `phases` for `secs` (a NIC scenario has one phase); with `enlightd`,
    /// the real enlightd tunes the device (kernel scenarios).
    fn start(
        &mut self,
        s: &Scenario,
        phases: &[String],
        secs: f64,
        enlightd: bool,
    ) -> Result<Self::Run>;
    /// The device's counters as the tuner counts them.
    fn cumulative(&self, run: &Self::Run) -> Result<Cumulative>;
    /// Stops the run.
    fn finish(&mut self, run: Self::Run) -> Result<Finished>;
}

/// What a run's end reports.
struct Finished {
    /// The workload's own op count, if it reports one.
    workload_ops: Option<u64>,
    /// The eBPF count (`None`: the caller sums the windows).
    ebpf_ops: Option<u64>,
    /// enlightd's decisions, where enlightd ran.
    decisions: Vec<String>,
}

impl Run for device::Device {
    fn backend(&mut self) -> &mut dyn SettingsBackend {
        &mut self.backend
    }
    fn ended(&mut self) -> Result<bool> {
        self.exited()
    }
}

impl Rig for Harness {
    type Run = device::Device;
    fn start(
        &mut self,
        s: &Scenario,
        phases: &[String],
        secs: f64,
        enlightd: bool,
    ) -> Result<device::Device> {
        anyhow::ensure!(
            !enlightd,
            "synthetic scenarios run the tuner in this process"
        );
        if s.device == "nic" {
            let traffic: device::NicTraffic = phases
                .first()
                .context("a NIC scenario needs one phase of traffic")?
                .parse()?;
            anyhow::ensure!(phases.len() == 1, "NIC scenarios have one phase");
            self.start_nic(traffic, secs)
        } else {
            Harness::start(self, &plan(phases, secs / phases.len() as f64))
        }
    }
    fn cumulative(&self, run: &device::Device) -> Result<Cumulative> {
        Harness::cumulative(self, run.pid)
    }
    fn finish(&mut self, run: device::Device) -> Result<Finished> {
        let (report, ebpf) = Harness::finish(self, run)?;
        Ok(Finished {
            workload_ops: report.map(|r| r.ops_total),
            ebpf_ops: Some(ebpf),
            decisions: Vec::new(),
        })
    }
}

impl Run for veth::VethRun {
    fn backend(&mut self) -> &mut dyn SettingsBackend {
        &mut self.backend
    }
    fn ended(&mut self) -> Result<bool> {
        Ok(self.over() || self.enlightd_exited()?)
    }
}

impl Rig for veth::VethRig {
    type Run = veth::VethRun;
    fn start(
        &mut self,
        s: &Scenario,
        phases: &[String],
        secs: f64,
        enlightd: bool,
    ) -> Result<veth::VethRun> {
        let traffic: device::NicTraffic = phases
            .first()
            .context("a kernel scenario needs one phase of traffic")?
            .parse()?;
        anyhow::ensure!(phases.len() == 1, "kernel scenarios have one phase");
        let tuner = enlightd.then_some(veth::EnlightdTuner {
            objective: s.objective,
            slo_us: s.slo_us,
            interval_ms: self.tick_ms,
        });
        veth::VethRig::start(self, traffic, secs, tuner)
    }
    fn cumulative(&self, run: &veth::VethRun) -> Result<Cumulative> {
        veth::VethRig::cumulative(self, run)
    }
    fn finish(&mut self, run: veth::VethRun) -> Result<Finished> {
        Ok(Finished {
            workload_ops: None,
            ebpf_ops: None,
            decisions: veth::VethRig::finish(self, run)?,
        })
    }
}

/// A kernel NIC's point in its own knobs' words.
fn settings_text(s: &DeviceSettings) -> String {
    format!(
        "napi_defer_hard_irqs {}, gro_flush_timeout {} us",
        s.moderation_frames, s.moderation_usecs
    )
}

/// enlight's own run on a kernel scenario: the real enlightd decides and applies, so the bench
/// only watches (the settings it reads each tick say what enlightd changed).
struct Enlightd;

impl Controller for Enlightd {
    fn name(&self) -> &'static str {
        "enlight"
    }
    fn step(
        &mut self,
        _: u64,
        _: &DeviceSettings,
        _: &Bounds,
        _: &Window,
    ) -> Option<enlightd::tuner::decide::Outcome> {
        None
    }
}

/// How long a run lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    Full,
    Quick,
    Smoke,
}

/// The workload the oracle sweeps for a phase: a ramp (a rate that drifts by itself) is swept at
/// its mean rate, so that the points, measured one after another, are measured at one rate.
pub fn oracle_spec(spec: &str) -> String {
    let parts: Vec<&str> = spec.split(',').collect();
    let value = |key: &str| {
        parts
            .iter()
            .find_map(|p| p.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
    };
    match (value("rate"), value("ramp")) {
        (Some(from), Some(to)) => parts
            .iter()
            .filter(|p| !p.starts_with("ramp="))
            .map(|p| {
                if p.starts_with("rate=") {
                    format!("rate={}", (from + to) / 2)
                } else {
                    p.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(","),
        _ => spec.to_string(),
    }
}

/// The oracle's grid for a kernel NIC: `napi_defer_hard_irqs` (the moderation count) by
/// `gro_flush_timeout` in µs (the delay); (0, 0) is the kernel's default. A count without a
/// timeout does nothing, so the grid pairs counts with non-zero timeouts only, plus a timeout
/// alone (GRO held for the timer, interrupts not deferred).
pub fn kernel_grid(length: Length) -> Vec<DeviceSettings> {
    let point = |defer: u32, usecs: u32| DeviceSettings {
        moderation_frames: defer,
        moderation_usecs: usecs,
        poll_budget: enlightd::kernel::backend::NAPI_WEIGHT,
        ..DeviceSettings::default()
    };
    let (defers, usecs): (&[u32], &[u32]) = match length {
        Length::Smoke => return vec![point(0, 0), point(8, 100)],
        Length::Quick => (&[2, 32], &[20, 200]),
        Length::Full => (&[1, 4, 32, 256], &[10, 50, 200, 1000]),
    };
    let mut out = vec![point(0, 0), point(0, usecs[usecs.len() / 2])];
    for &d in defers {
        for &u in usecs {
            out.push(point(d, u));
        }
    }
    out
}

/// The oracle's settings grid (ring sizes stay at their default: no disk scenario fills them).
pub fn grid(length: Length) -> Vec<DeviceSettings> {
    if length == Length::Smoke {
        return vec![
            DeviceSettings::default(),
            DeviceSettings {
                moderation_frames: 1,
                moderation_usecs: 0,
                ..DeviceSettings::default()
            },
        ];
    }
    let (frames, usecs, budgets): (&[u32], &[u32], &[u32]) = if length == Length::Quick {
        (&[1, 8, 64], &[0, 50, 200], &[64])
    } else {
        (&[1, 8, 64], &[0, 20, 100, 500], &[16, 64, 256])
    };
    let mut out = Vec::new();
    for &f in frames {
        for &u in usecs {
            for &b in budgets {
                out.push(DeviceSettings {
                    moderation_frames: f,
                    moderation_usecs: u,
                    poll_budget: b,
                    ..DeviceSettings::default()
                });
            }
        }
    }
    out
}

/// One tick of a controller's run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// Seconds since the workload started (end of the window).
    pub t: f64,
    /// Seconds since the workload started (start of the window).
    #[serde(default)]
    pub t_start: f64,
    /// The phase the window started in.
    pub phase: usize,
    /// The window spans a phase boundary: it holds traffic of two phases and is scored in
    /// neither.
    #[serde(default)]
    pub straddles: bool,
    /// The settings in force during the window.
    pub settings: DeviceSettings,
    pub figures: Option<Figures>,
    /// The reason, when the controller changed something at the end of this window.
    pub change: Option<String>,
    #[serde(skip)]
    pub window: Window,
}

/// A controller's result on one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseScore {
    pub figures: Option<Figures>,
    pub fraction: Option<f64>,
    pub t95_s: Option<f64>,
    pub last_change_s: Option<f64>,
    pub changes: usize,
}

/// One controller on one scenario. `max_changes_in_1s` counts changes less than 0.95 s apart
/// (tick jitter makes changes exactly one interval apart land a few ms early).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerRun {
    pub controller: String,
    pub points: Vec<Point>,
    pub phases: Vec<PhaseScore>,
    pub changes: usize,
    pub max_changes_in_1s: usize,
    pub workload_ops: Option<u64>,
    pub ebpf_ops: u64,
    /// enlightd's decisions from its audit log, where the run was the real enlightd's (kernel
    /// scenarios): `action: reason`.
    #[serde(default)]
    pub enlightd_decisions: Vec<String>,
}

/// The oracle's sweep of one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseOracle {
    pub spec: String,
    pub grid: Vec<(DeviceSettings, Option<Figures>)>,
    /// The best grid points, re-measured for twice as long.
    pub finalists: Vec<(DeviceSettings, Option<Figures>)>,
    pub best_settings: Option<DeviceSettings>,
    /// `best_settings` measured once more, independently of the measurements that chose it.
    pub best: Option<Figures>,
}

/// Everything about one scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    pub phase_s: f64,
    pub eval_from_s: f64,
    pub oracle: Vec<PhaseOracle>,
    pub runs: Vec<ControllerRun>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub quick: bool,
    /// A smoke run (`--smoke`): seconds-long phases, figures that mean nothing.
    #[serde(default)]
    pub smoke: bool,
    pub machine: String,
    pub kernel: String,
    pub started_unix_ms: u64,
    pub tick_ms: u64,
    /// The CPU every device process was pinned to (none: not pinned).
    #[serde(default)]
    pub device_cpu: Option<usize>,
    pub tuner_params: TunerParams,
    pub scenarios: Vec<ScenarioResult>,
}

fn tuner_for(s: &Scenario) -> DeviceTuner {
    DeviceTuner::new(
        Policy {
            mode: TunerMode::Auto,
            objective: s.objective,
            slo_p99_ns: s.slo_us * 1000,
            pinned: false,
        },
        TunerParams::default(),
    )
    .counting(s.throughput())
}

fn plan(phases: &[String], phase_s: f64) -> String {
    phases
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{p},duration={phase_s}s,seed={}", i + 1))
        .collect::<Vec<_>>()
        .join(";")
}

/// Sleeps until `t`, or fails early once a stop signal came (the run unwinds and its device
/// process is stopped).
fn sleep_until(t: Instant) -> Result<()> {
    while Instant::now() < t {
        crate::signals::check_stop()?;
        std::thread::sleep(
            t.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100)),
        );
    }
    crate::signals::check_stop()
}

/// Grid points re-measured before the oracle picks its best (the best of many noisy
/// measurements is biased upwards: picking among re-measured finalists removes most of that).
pub const FINALISTS: usize = 3;

/// Puts `point` in force, settles, and measures one window of `measure`.
fn measure_point<R: Rig>(
    h: &R,
    dev: &mut R::Run,
    current: &mut DeviceSettings,
    point: &DeviceSettings,
    settle: Duration,
    measure: Duration,
) -> Result<Option<Figures>> {
    *current = dev
        .backend()
        .apply(current, point)
        .with_context(|| format!("putting {point:?} in force"))?;
    sleep_until(Instant::now() + settle)?;
    let c0 = h.cumulative(dev)?;
    let t0 = Instant::now();
    sleep_until(t0 + measure)?;
    let c1 = h.cumulative(dev)?;
    let w = Window::between(&c0, &c1, t0.elapsed().as_secs_f64());
    Ok(score::merge([&w]))
}

/// The oracle's sweep of one phase's workload: every grid point, then the [`FINALISTS`] best
/// re-measured for twice as long; the best finalist is the oracle's point, and a third,
/// independent measurement of it is the oracle's value.
fn sweep<R: Rig>(
    h: &mut R,
    spec: &str,
    grid: &[DeviceSettings],
    length: Length,
    s: &Scenario,
) -> Result<PhaseOracle> {
    let (settle, measure) = match length {
        Length::Smoke => (Duration::from_millis(200), Duration::from_millis(300)),
        Length::Quick => (Duration::from_millis(500), Duration::from_millis(1000)),
        Length::Full => (Duration::from_millis(500), Duration::from_millis(1500)),
    };
    let spec = &oracle_spec(spec);
    let total = (settle + measure).as_secs_f64() * grid.len() as f64
        + (settle + 2 * measure).as_secs_f64() * (FINALISTS + 1) as f64
        + 3.0;
    let mut dev = h.start(s, &[spec.to_string()], total.ceil(), false)?;
    // Let the workload start before the first point.
    std::thread::sleep(Duration::from_millis(300));
    let mut out = Vec::new();
    let (mut current, _) = dev.backend().get()?;
    for point in grid {
        let f = measure_point(h, &mut dev, &mut current, point, settle, measure)?;
        out.push((*point, f));
    }
    let slo = s.slo_us as f64;
    let measured: Vec<(DeviceSettings, Figures)> =
        out.iter().filter_map(|(p, f)| f.map(|f| (*p, f))).collect();
    let figures: Vec<Figures> = measured.iter().map(|(_, f)| *f).collect();
    let mut finalists = Vec::new();
    if let Some((_, top)) = score::best(s.objective, s.throughput(), slo, &figures) {
        let mut ranked = measured.clone();
        ranked.sort_by(|a, b| {
            let unit = s.throughput();
            score::fraction(s.objective, unit, slo, &b.1, &top).total_cmp(&score::fraction(
                s.objective,
                unit,
                slo,
                &a.1,
                &top,
            ))
        });
        for (point, _) in ranked.into_iter().take(FINALISTS) {
            let f = measure_point(h, &mut dev, &mut current, &point, settle, 2 * measure)?;
            finalists.push((point, f));
        }
    }
    let final_figures: Vec<Figures> = finalists.iter().filter_map(|(_, f)| *f).collect();
    let final_points: Vec<DeviceSettings> = finalists
        .iter()
        .filter(|(_, f)| f.is_some())
        .map(|(p, _)| *p)
        .collect();
    let best_settings =
        score::best(s.objective, s.throughput(), slo, &final_figures).map(|(i, _)| final_points[i]);
    // The winner measured once more: the figures that picked it are the best of three noisy
    // measurements, biased upwards (the winner's curse); an independent measurement is not.
    let best = match best_settings {
        Some(point) => measure_point(h, &mut dev, &mut current, &point, settle, 2 * measure)?,
        None => None,
    };
    h.finish(dev)?;
    Ok(PhaseOracle {
        spec: spec.to_string(),
        grid: out,
        finalists,
        best_settings,
        best,
    })
}

/// One controller on one scenario's whole plan.
fn run_controller<R: Rig>(
    h: &mut R,
    s: &Scenario,
    phase_s: f64,
    ctl: &mut dyn Controller,
    tick: Duration,
) -> Result<ControllerRun> {
    // On a kernel scenario enlight's run is the real enlightd's.
    let enlightd = s.device == "veth" && ctl.name() == "enlight";
    let mut dev = h.start(s, &s.phases, phase_s * s.phases.len() as f64, enlightd)?;
    let (mut current, bounds) = dev.backend().get()?;
    let t0 = Instant::now();
    let mut prev = h.cumulative(&dev)?;
    let mut prev_t = t0;
    let mut next = t0 + tick;
    let mut points = Vec::new();
    loop {
        sleep_until(next)?;
        next += tick;
        let exited = dev.ended()?;
        let now = Instant::now();
        let cum = h.cumulative(&dev)?;
        let window = Window::between(&prev, &cum, now.duration_since(prev_t).as_secs_f64());
        let t_start = prev_t.duration_since(t0).as_secs_f64();
        prev = cum;
        prev_t = now;
        let t = now.duration_since(t0).as_secs_f64();
        let phase_at = |t: f64| (t / phase_s).floor().max(0.0) as usize;
        let (phase, phase_end) = (phase_at(t_start), phase_at(t - 1e-9));
        if exited || phase_end >= s.phases.len() {
            break;
        }
        let mut change = None;
        if let Ok((reported, _)) = dev.backend().get() {
            // Changed by someone other than this loop: enlightd, on a kernel scenario.
            if enlightd && reported != current {
                change = Some(format!(
                    "enlightd: {} → {}",
                    settings_text(&current),
                    settings_text(&reported)
                ));
            }
            current = reported;
        }
        let during = current;
        let now_ms = now.duration_since(t0).as_millis() as u64;
        if let Some(o) = ctl.step(now_ms, &current, &bounds, &window) {
            if o.action != Action::Recommend {
                match dev.backend().apply(&current, &o.to) {
                    Ok(in_force) => {
                        current = in_force;
                        change = Some(o.reason);
                    }
                    Err(e) => log::warn!("{}: applying {:?}: {e}", ctl.name(), o.to),
                }
            }
        }
        points.push(Point {
            t,
            t_start,
            phase,
            straddles: phase_end != phase,
            settings: during,
            figures: score::merge([&window]),
            change,
            window,
        });
    }
    let finished = h.finish(dev)?;
    let ebpf_ops = finished
        .ebpf_ops
        .unwrap_or_else(|| points.iter().map(|p| p.window.ops).sum());
    let change_times: Vec<f64> = points
        .iter()
        .filter(|p| p.change.is_some())
        .map(|p| p.t)
        .collect();
    let max_changes_in_1s = change_times
        .iter()
        .map(|&t0| {
            change_times
                .iter()
                .filter(|&&t| t >= t0 && t < t0 + 0.95)
                .count()
        })
        .max()
        .unwrap_or(0);
    Ok(ControllerRun {
        controller: ctl.name().to_string(),
        changes: change_times.len(),
        max_changes_in_1s,
        points,
        phases: Vec::new(),
        workload_ops: finished.workload_ops,
        ebpf_ops,
        enlightd_decisions: finished.decisions,
    })
}

/// Scores a run's phases against the oracle.
fn score_run(
    run: &mut ControllerRun,
    s: &Scenario,
    oracle: &[PhaseOracle],
    phase_s: f64,
    eval_from: f64,
) {
    let slo = s.slo_us as f64;
    run.phases = oracle
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let start = i as f64 * phase_s;
            // Windows wholly inside the phase: the one across the boundary holds the previous
            // phase's traffic too.
            let in_phase: Vec<&Point> = run
                .points
                .iter()
                .filter(|p| p.phase == i && !p.straddles)
                .collect();
            let eval: Vec<&Window> = in_phase
                .iter()
                .filter(|p| p.t - start > eval_from)
                .map(|p| &p.window)
                .collect();
            let figures = score::merge(eval.iter().copied());
            let fraction = match (&figures, &o.best) {
                (Some(f), Some(b)) => Some(score::fraction(s.objective, s.throughput(), slo, f, b)),
                _ => None,
            };
            // The earliest tick from which the rest of the phase reaches 95% of the oracle.
            let t95_s = o.best.and_then(|best| {
                (0..in_phase.len()).find_map(|k| {
                    let rest = score::merge(in_phase[k..].iter().map(|p| &p.window))?;
                    (score::fraction(s.objective, s.throughput(), slo, &rest, &best) >= 0.95)
                        .then(|| (in_phase[k].t_start - start).max(0.0))
                })
            });
            let changes: Vec<f64> = in_phase
                .iter()
                .filter(|p| p.change.is_some())
                .map(|p| p.t - start)
                .collect();
            PhaseScore {
                figures,
                fraction,
                t95_s,
                last_change_s: changes.last().copied(),
                changes: changes.len(),
            }
        })
        .collect();
}

/// One scenario on its rig: the oracle's sweep of each phase, then each controller's run.
fn scenario<R: Rig>(
    h: &mut R,
    s: &Scenario,
    grid: &[DeviceSettings],
    length: Length,
    phase_s: f64,
    eval_from: f64,
    tick: Duration,
) -> Result<ScenarioResult> {
    eprintln!(
        "== {} ({}): oracle sweep of {} points per phase",
        s.name,
        s.description,
        grid.len()
    );
    let mut oracle = Vec::new();
    for spec in &s.phases {
        let o = sweep(h, spec, grid, length, s)?;
        if let (Some(best), Some(st)) = (o.best, o.best_settings) {
            eprintln!(
                "   oracle {}: {st:?} -> {:.0} ops/s ({:.1} MB/s), p99 {:.0} us, {:.3} irq/op",
                o.spec,
                best.ops_per_sec,
                best.bytes_per_sec / 1e6,
                best.p99_us,
                best.interrupts_per_op
            );
        }
        oracle.push(o);
    }
    let mut runs = Vec::new();
    let enlight: Box<dyn Controller> = if s.device == "veth" {
        Box::new(Enlightd)
    } else {
        Box::new(tuner_for(s))
    };
    let mut controllers: Vec<Box<dyn Controller>> =
        vec![Box::new(Static), Box::new(Dim::default()), enlight];
    for ctl in controllers.iter_mut() {
        let mut run = run_controller(h, s, phase_s, ctl.as_mut(), tick)?;
        score_run(&mut run, s, &oracle, phase_s, eval_from);
        eprintln!(
            "   {:8} fractions {:?}, changes {}, t95 {:?}",
            run.controller,
            run.phases
                .iter()
                .map(|p| p.fraction.map(|f| (f * 1000.0).round() / 1000.0))
                .collect::<Vec<_>>(),
            run.changes,
            run.phases.iter().map(|p| p.t95_s).collect::<Vec<_>>()
        );
        runs.push(run);
    }
    Ok(ScenarioResult {
        scenario: s.clone(),
        phase_s,
        eval_from_s: eval_from,
        oracle,
        runs,
    })
}

pub fn run(args: TuneBenchArgs) -> Result<()> {
    let all = scenarios();
    for name in &args.scenarios {
        anyhow::ensure!(
            all.iter().any(|s| &s.name == name),
            "unknown scenario {name:?} (known: {})",
            all.iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let chosen: Vec<Scenario> = all
        .into_iter()
        .filter(|s| args.scenarios.is_empty() || args.scenarios.contains(&s.name))
        .collect();
    let length = if args.smoke {
        Length::Smoke
    } else if args.quick {
        Length::Quick
    } else {
        Length::Full
    };
    let (phase_s, eval_from) = match length {
        Length::Smoke => (4.0, 2.0),
        Length::Quick => (20.0, 12.0),
        Length::Full => (45.0, EVAL_FROM_S),
    };
    let tick = Duration::from_millis(args.tick_ms);
    let pin = device_cpu(args.cpu.as_deref())?;
    let m = super::machine::Machine::read();
    let (machine, kernel) = (m.cpu_text(), m.kernel.unwrap_or_else(|| "unknown".into()));
    let mut report = Report {
        quick: args.quick,
        smoke: args.smoke,
        machine,
        kernel,
        started_unix_ms: enlight_driver::registry::now_unix_ms(),
        tick_ms: tick.as_millis() as u64,
        device_cpu: pin,
        tuner_params: TunerParams::default(),
        scenarios: Vec::new(),
    };
    // Each rig is made when a scenario first needs it: the synthetic harness loads the USDT
    // probes, the veth rig creates namespaces and loads the kernel probes.
    let mut synthetic: Option<Harness> = None;
    let mut kernel: Option<veth::VethRig> = None;
    for s in &chosen {
        let result = if s.device == "veth" {
            if kernel.is_none() {
                kernel = Some(veth::VethRig::new(args.tick_ms)?);
            }
            let rig = kernel.as_mut().expect("made above");
            scenario(
                rig,
                s,
                &kernel_grid(length),
                length,
                phase_s,
                eval_from,
                tick,
            )?
        } else {
            if synthetic.is_none() {
                synthetic = Some(Harness::new(pin)?);
            }
            let rig = synthetic.as_mut().expect("made above");
            scenario(rig, s, &grid(length), length, phase_s, eval_from, tick)?
        };
        report.scenarios.push(result);
    }
    // The namespaces go before the report is written.
    drop(kernel);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let stem = match length {
        Length::Smoke => "tune-smoke",
        Length::Quick => "tune-quick",
        Length::Full => "tune",
    };
    let md = report::markdown(&report);
    std::fs::write(args.out.join(format!("{stem}.md")), &md)?;
    std::fs::write(
        args.out.join(format!("{stem}.json")),
        serde_json::to_string(&report)?,
    )?;
    match report::png(&report, &args.out.join(format!("{stem}.png"))) {
        Ok(()) => {}
        Err(e) => eprintln!("warning: no PNG: {e:#}"),
    }
    crate::signals::line(md);
    eprintln!("wrote {}/{stem}.{{md,json,png}}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{device_cpu, oracle_spec};

    #[test]
    fn the_oracle_sweeps_a_ramp_at_its_mean_rate() {
        assert_eq!(
            oracle_spec("qd=32,bs=4k,rate=16000,ramp=6000,rw=70"),
            "qd=32,bs=4k,rate=11000,rw=70"
        );
        assert_eq!(oracle_spec("qd=4,rate=2000"), "qd=4,rate=2000");
    }

    #[test]
    fn the_device_cpu_is_the_last_by_default_and_checked_when_given() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let default = device_cpu(None).unwrap();
        assert_eq!(default, (cpus > 1).then(|| cpus - 1));
        assert_eq!(device_cpu(Some("none")).unwrap(), None);
        assert_eq!(device_cpu(Some("0")).unwrap(), Some(0));
        let err = device_cpu(Some(&cpus.to_string())).unwrap_err().to_string();
        assert!(
            err.contains(&format!("this machine has {cpus} CPUs")),
            "{err}"
        );
        let err = device_cpu(Some("two")).unwrap_err().to_string();
        assert!(err.contains("neither a CPU number"), "{err}");
    }
}
