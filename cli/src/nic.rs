//! `enlight nic`: one synthetic NIC device process between two network namespaces.
//!
//! Creates a "guest" and a "host" namespace with a tap in each (removing the leftovers of runs
//! that were killed first), runs the NIC's guest driver on the guest tap and its host service on
//! the host tap, serves the control socket (every knob is live-tunable, ring sizes included),
//! announces the device in the registry (device `nic`, kind `synthetic`) and prints JSON lines:
//! first `{"event":"ready",...}` with the namespaces and addresses, then the NIC's own counters
//! about once per second, and a last line with `"done": true`. SIGINT/SIGTERM (or `--duration`)
//! stop it; the taps and namespaces are removed on the way out.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use enlight_driver::control::{self, ControlServer, Tunable};
use enlight_driver::netns::{self, NetPair};
use enlight_driver::nic::{LatencyFigures, NicBridge, NicCounters, NicOptions};
use enlight_driver::registry::{self, DeviceRecord, Registration};
use enlight_driver::settings::{DeviceSettings, Knob};
use enlight_driver::workload;
use serde::Serialize;

use crate::{ranges, signals};

#[derive(Args, Debug)]
pub struct NicArgs {
    /// Device name (unique in the runtime directory).
    #[arg(long, default_value = "nic0")]
    name: String,
    /// Device id inside this process (the `dev` argument of the USDT probes), 0..=255.
    #[arg(long, default_value_t = 0, value_parser = crate::ranges::int(0..=255u32))]
    dev_id: u32,
    /// Registry directory [default: $ENLIGHT_RUNTIME_DIR or /run/enlight].
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Stop after this many seconds, 0.001..=31536000 (default: run until SIGINT, SIGTERM or
    /// SIGHUP).
    #[arg(long, value_name = "SECS", value_parser = ranges::duration_secs())]
    duration: Option<f64>,
    /// Wait up to SECS (0..=3600) for a tracer (enlightd) to attach every probe before
    /// announcing "ready".
    #[arg(long, value_name = "SECS", value_parser = ranges::probe_wait_secs())]
    wait_for_probes: Option<f64>,
    /// MTU of both taps, 68..=65535 (the buffers it needs must also fit the channel).
    #[arg(long, default_value_t = 1500, value_parser = crate::ranges::int(68..=65535u32))]
    mtu: u32,
    /// Ring data area per direction at start, bytes: 8192..=67108864, a multiple of 4096 (the
    /// control socket can resize each ring while traffic flows).
    #[arg(long, value_parser = ranges::knob(Knob::RingOutBytes))]
    ring_bytes: Option<u32>,
    /// Interrupt moderation: signal after this many packets (1..=1024)...
    #[arg(long, value_parser = ranges::knob(Knob::ModerationFrames))]
    moderation_frames: Option<u32>,
    /// ...or this many microseconds (0..=100000), whichever first.
    #[arg(long, value_parser = ranges::knob(Knob::ModerationUsecs))]
    moderation_usecs: Option<u32>,
    /// Packets the guest reaps per polling pass, 1..=4096.
    #[arg(long, value_parser = ranges::knob(Knob::PollBudget))]
    poll_budget: Option<u32>,
    /// Send buffer sections (tx frames in flight), 1..=65536.
    #[arg(long, default_value_t = NicOptions::default().send_sections,
          value_parser = crate::ranges::int(1..=65536u32))]
    send_sections: u32,
    /// Receive buffer sections (rx frames the guest has not returned), 1..=65536.
    #[arg(long, default_value_t = NicOptions::default().recv_sections,
          value_parser = crate::ranges::int(1..=65536u32))]
    recv_sections: u32,
    /// Only remove the namespaces left behind by killed runs, then exit.
    #[arg(long)]
    cleanup: bool,
    /// Print one JSON object per line (first `"event":"ready"` with the namespaces, then one
    /// report per second, the last with "done": true) instead of readable lines; the default
    /// when stdout is not a terminal.
    #[arg(long)]
    json: bool,
}

/// The first line: where to send traffic.
#[derive(Serialize)]
struct Ready<'a> {
    event: &'static str,
    name: &'a str,
    guest_netns: &'a str,
    host_netns: &'a str,
    guest_if: &'a str,
    host_if: &'a str,
    guest_ip: String,
    host_ip: String,
    mtu: u32,
    removed_leftovers: Vec<String>,
}

/// One line per second and a last one.
#[derive(Serialize)]
struct Report {
    elapsed_secs: f64,
    /// Rates over the last interval.
    tx_pps: f64,
    rx_pps: f64,
    tx_bits_per_sec: f64,
    rx_bits_per_sec: f64,
    counters: NicCounters,
    /// The guest's own latency figures since the start (tx: submit to completion; rx: host
    /// receive to guest reap), over the completions traced so far.
    tx_latency: LatencyFigures,
    rx_latency: LatencyFigures,
    settings: DeviceSettings,
    done: bool,
}

/// A namespace label from a device name: `[A-Za-z0-9_]`, at most 16 characters.
fn label_of(name: &str) -> String {
    let l: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(16)
        .collect();
    if l.is_empty() {
        "nic".into()
    } else {
        l
    }
}

pub fn run(args: NicArgs) -> Result<()> {
    if args.cleanup {
        let removed = netns::remove_leftovers()?;
        signals::line(serde_json::json!({ "removed_leftovers": removed }));
        return Ok(());
    }
    signals::install_stop_handlers().context("installing signal handlers")?;
    let (settings, options) = starting_settings(&args)?;

    let removed = netns::remove_leftovers().context("removing leftovers of killed runs")?;
    let bridge = NicBridge::start(
        &label_of(&args.name),
        args.dev_id,
        settings,
        options,
        args.mtu,
    )
    .with_context(|| format!("starting synthetic NIC {}", args.name))?;
    let (registration, control) = announce(&args, &bridge, settings)?;

    if let Some(secs) = args.wait_for_probes {
        workload::wait_for_probes(
            args.dev_id,
            0,
            Duration::from_secs_f64(secs),
            signals::stop_flag(),
        )?;
    }
    let json = crate::output::json_wanted(args.json);
    emit(json, &Ready::of(&args.name, &bridge, removed));

    let mut meter = Meter::new(bridge.nic().counters());
    let deadline = args
        .duration
        .map(|s| meter.start + Duration::from_secs_f64(s));
    let failed = report_until_stopped(&bridge, deadline, &mut meter, json);
    drop(control);
    let settings_now = bridge.nic().settings();
    let result = bridge.stop_with_latency();
    drop(registration);
    let (counters, latency) = result.context("the NIC stopped with an error")?;
    if failed {
        bail!("the NIC stopped on its own");
    }
    emit(
        json,
        &meter.report(Instant::now(), counters, latency, settings_now, true),
    );
    Ok(())
}

/// The settings and buffer options the NIC starts with: the defaults, with what the command
/// line sets (each checked).
fn starting_settings(args: &NicArgs) -> Result<(DeviceSettings, NicOptions)> {
    let defaults = DeviceSettings::default();
    let settings = DeviceSettings {
        ring_out_bytes: args.ring_bytes.unwrap_or(defaults.ring_out_bytes),
        ring_in_bytes: args.ring_bytes.unwrap_or(defaults.ring_in_bytes),
        moderation_frames: args.moderation_frames.unwrap_or(defaults.moderation_frames),
        moderation_usecs: args.moderation_usecs.unwrap_or(defaults.moderation_usecs),
        poll_budget: args.poll_budget.unwrap_or(defaults.poll_budget),
    };
    settings.validate()?;
    let options = NicOptions {
        send_sections: args.send_sections,
        recv_sections: args.recv_sections,
        ..NicOptions::for_mtu(args.mtu)
    };
    options.validate()?;
    Ok((settings, options))
}

/// Registers the device (its record rewritten on every settings change) and serves its
/// control socket; both go away when the returned values are dropped.
fn announce(
    args: &NicArgs,
    bridge: &NicBridge,
    settings: DeviceSettings,
) -> Result<(Arc<Registration>, ControlServer)> {
    let runtime_dir = args
        .runtime_dir
        .clone()
        .unwrap_or_else(registry::runtime_dir);
    let socket = control::socket_path(&runtime_dir, &args.name);
    let record = DeviceRecord {
        name: args.name.clone(),
        device: "nic".into(),
        kind: enlight_driver::registry::DeviceKind::Synthetic,
        dev_id: args.dev_id,
        pid: std::process::id(),
        pid_start_time: registry::start_time_of(std::process::id()),
        exe: std::env::current_exe().context("locating this executable")?,
        started_unix_ms: registry::now_unix_ms(),
        settings,
        control: Some(socket.clone()),
    };
    let registration = Arc::new(
        Registration::register(&runtime_dir, &record)
            .with_context(|| format!("registering in {}", runtime_dir.display()))?,
    );
    let on_change = {
        let (registration, record) = (Arc::clone(&registration), record.clone());
        Box::new(move |s: &DeviceSettings| {
            let record = DeviceRecord {
                settings: *s,
                ..record.clone()
            };
            if let Err(e) = registration.update(&record) {
                log::warn!("updating the registry record: {e}");
            }
        })
    };
    let knobs: Arc<dyn Tunable> = bridge.nic().knobs().clone();
    let control = ControlServer::start(&socket, knobs, args.dev_id, Some(on_change))
        .with_context(|| format!("serving {}", socket.display()))?;
    Ok((registration, control))
}

/// Prints one line, as JSON or for a person.
fn emit(json: bool, line: &dyn erased::Line) {
    let mut out = std::io::stdout().lock();
    // A closed pipe (the reader went away) is not a reason to stop the device.
    let text = if json { line.json() } else { line.human() };
    let _ = out.write_all(text.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Prints a report about once a second until a stop signal, the deadline, or the NIC fails;
/// returns whether it failed.
fn report_until_stopped(
    bridge: &NicBridge,
    deadline: Option<Instant>,
    meter: &mut Meter,
    json: bool,
) -> bool {
    while !signals::stop_flag().load(std::sync::atomic::Ordering::SeqCst)
        && deadline.is_none_or(|d| Instant::now() < d)
    {
        if bridge.nic().failed() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        if now.duration_since(meter.last.0) >= Duration::from_secs(1) {
            let c = bridge.nic().counters();
            emit(
                json,
                &meter.report(
                    now,
                    c,
                    bridge.nic().latency(),
                    bridge.nic().settings(),
                    false,
                ),
            );
            meter.last = (now, c);
        }
    }
    false
}

/// The run's start and the counters of the last report: what a report's rates are over.
struct Meter {
    start: Instant,
    last: (Instant, NicCounters),
}

impl Meter {
    fn new(counters: NicCounters) -> Meter {
        let start = Instant::now();
        Meter {
            start,
            last: (Instant::now(), counters),
        }
    }

    /// The report at `now` with counters `c`: rates over the span since the last report.
    fn report(
        &self,
        now: Instant,
        c: NicCounters,
        (tx_latency, rx_latency): (LatencyFigures, LatencyFigures),
        settings: DeviceSettings,
        done: bool,
    ) -> Report {
        let prev = &self.last;
        let dt = now.duration_since(prev.0).as_secs_f64().max(1e-9);
        Report {
            elapsed_secs: now.duration_since(self.start).as_secs_f64(),
            tx_pps: (c.tx_completions - prev.1.tx_completions) as f64 / dt,
            rx_pps: (c.rx_packets - prev.1.rx_packets) as f64 / dt,
            tx_bits_per_sec: (c.tx_bytes - prev.1.tx_bytes) as f64 * 8.0 / dt,
            rx_bits_per_sec: (c.rx_bytes - prev.1.rx_bytes) as f64 * 8.0 / dt,
            counters: c,
            tx_latency,
            rx_latency,
            settings,
            done,
        }
    }
}

impl<'a> Ready<'a> {
    /// The first line, for a NIC that has started.
    fn of(name: &'a str, bridge: &'a NicBridge, removed: Vec<String>) -> Ready<'a> {
        Ready {
            event: "ready",
            name,
            guest_netns: bridge.guest_ns().name(),
            host_netns: bridge.host_ns().name(),
            guest_if: NetPair::GUEST_IF,
            host_if: NetPair::HOST_IF,
            guest_ip: netns::GUEST_IP.to_string(),
            host_ip: netns::HOST_IP.to_string(),
            mtu: bridge.mtu(),
            removed_leftovers: removed,
        }
    }
}

impl Ready<'_> {
    fn human(&self) -> String {
        let mut s = format!(
            "{} ready: guest {} ({} {}), host {} ({} {}), MTU {}\n  try: ip netns exec {} ping {}",
            self.name,
            self.guest_netns,
            self.guest_if,
            self.guest_ip,
            self.host_netns,
            self.host_if,
            self.host_ip,
            self.mtu,
            self.guest_netns,
            self.host_ip
        );
        if !self.removed_leftovers.is_empty() {
            s.push_str(&format!(
                "\n  removed namespaces left by killed runs: {}",
                self.removed_leftovers.join(", ")
            ));
        }
        s
    }
}

impl Report {
    fn human(&self) -> String {
        use crate::output::{bits, count, latency};
        if self.done {
            return format!(
                "done after {:.1}s: tx {} frames, rx {} frames; tx latency {}, rx latency {}",
                self.elapsed_secs,
                self.counters.tx_completions,
                self.counters.rx_packets,
                latency(&self.tx_latency),
                latency(&self.rx_latency)
            );
        }
        format!(
            "{:>5.0}s  tx {:>6} pkt/s {:>13}  rx {:>6} pkt/s {:>13}  tx {}  rx {}",
            self.elapsed_secs,
            count(self.tx_pps),
            bits(self.tx_bits_per_sec),
            count(self.rx_pps),
            bits(self.rx_bits_per_sec),
            latency(&self.tx_latency),
            latency(&self.rx_latency)
        )
    }
}

/// Printing the two line types through one closure, as JSON or for a person.
mod erased {
    pub trait Line {
        fn json(&self) -> String;
        fn human(&self) -> String;
    }

    impl Line for super::Ready<'_> {
        fn json(&self) -> String {
            json(self)
        }
        fn human(&self) -> String {
            super::Ready::human(self)
        }
    }

    impl Line for super::Report {
        fn json(&self) -> String {
            json(self)
        }
        fn human(&self) -> String {
            super::Report::human(self)
        }
    }

    fn json(v: &impl serde::Serialize) -> String {
        serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_namespace_safe() {
        assert_eq!(label_of("nic0"), "nic0");
        assert_eq!(label_of("my-nic.1"), "my_nic_1");
        assert_eq!(label_of(""), "nic");
        assert_eq!(label_of("a_very_long_device_name_x").len(), 16);
    }
}
