//! Where `enlight bench tune` runs a scenario: the synthetic devices' harness ([`Harness`]) or the
//! kernel veth rig ([`veth::VethRig`]), behind one interface ([`Rig`], [`Run`]) so the oracle's
//! sweep and the controllers' runs are written once for both.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use enlightd::tuner::backend::SettingsBackend;
use enlightd::tuner::Cumulative;

use super::device::{self, Harness};
use super::veth;
use super::Scenario;

/// A device run, synthetic or kernel: what the sweep and the controllers need of it.
pub(super) trait Run {
    fn backend(&mut self) -> &mut dyn SettingsBackend;
    /// Whether the run has ended (its process exited, its time is up).
    fn ended(&mut self) -> Result<bool>;
}

/// Where runs happen: the synthetic devices' harness, or the kernel veth rig.
pub(super) trait Rig {
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
pub(super) struct Finished {
    /// The workload's own op count, if it reports one.
    pub(super) workload_ops: Option<u64>,
    /// The eBPF count (`None`: the caller sums the windows).
    pub(super) ebpf_ops: Option<u64>,
    /// enlightd's decisions, where enlightd ran.
    pub(super) decisions: Vec<String>,
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
pub(super) fn sleep_until(t: Instant) -> Result<()> {
    while Instant::now() < t {
        crate::signals::check_stop()?;
        std::thread::sleep(
            t.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100)),
        );
    }
    crate::signals::check_stop()
}
