//! `enlight bench tune`: every tuning controller on every scenario, on the real synthetic disk
//! and NIC with the real probes, against an oracle; and on a kernel veth pair in namespaces of
//! its own (`kernel-tcp`, `kernel-ping`, [`veth`]), whose receiving end's NAPI moderation
//! (`napi_defer_hard_irqs`, `gro_flush_timeout`) the oracle sweeps through sysfs and, in
//! enlight's run, the real `enlightd --kernel` tunes, the bench only watching.
//!
//! For each scenario (a workload plan of one or more phases and an objective):
//! - the **oracle** sweeps the settings grid ([`oracle::grid`]) once per phase: one device process runs
//!   that phase's workload and the grid points are put in force one after another through the
//!   control socket, each settled and then measured from the eBPF windows; the [`oracle::FINALISTS`]
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

mod controllers;
mod device;
mod oracle;
mod report;
mod rig;
mod scenarios;
pub mod score;
mod veth;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use enlight_driver::settings::DeviceSettings;
use enlightd::tuner::decide::TunerParams;
use enlightd::tuner::window::Window;
use serde::{Deserialize, Serialize};

use self::device::Harness;
use self::oracle::{grid, kernel_grid};
pub use self::scenarios::{scenarios, Scenario};
use self::score::Figures;
use super::machine::Machine;

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

/// How long a run lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    Full,
    Quick,
    Smoke,
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
    let m = Machine::read();
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
            controllers::scenario(
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
            controllers::scenario(rig, s, &grid(length), length, phase_s, eval_from, tick)?
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
    use super::device_cpu;

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
