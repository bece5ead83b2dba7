//! `enlight tune --dry-run`: what the tuner recommends for each running device.
//!
//! It asks a running enlightd (`/api/v1/devices`, contract 6) rather than measuring by itself:
//! a recommendation rests on many windows measured at known settings, which only the daemon
//! that watches the device all along has. Start enlightd with `--dry-run` (recommend only) or
//! `--tune` (apply); in auto mode the recommendation is the best settings the tuner knows.

use anyhow::{bail, Context, Result};
use clap::Args;
// The lenient client types (enlight-abi's, as `enlight top` reads them): a mode, state, action,
// kind, unit, source or disruption of a newer daemon is kept as written, not an error.
use enlight_abi::api::DeviceView;
use enlight_abi::knob::Knob;
use enlight_abi::tuner::{Action, Mode, Settings, State};
use enlight_driver::settings::DeviceSettings;
use enlightd::knobs::KnobExt;

#[derive(Args, Debug)]
pub struct TuneArgs {
    /// Print recommendations only (the only mode: applying is enlightd's job, `enlightd --tune`).
    #[arg(long, required = true)]
    dry_run: bool,
    /// enlightd's address.
    #[arg(long, default_value = "127.0.0.1:9464")]
    addr: String,
    /// Only this device.
    #[arg(long)]
    device: Option<String>,
    /// Print JSON: one object per device with its name, kind, type, current settings and the
    /// tuner's state as enlightd's API has it (`tuner`: mode, objective, state, pinned, last
    /// decision, recommendation; null when no tuner runs for it).
    #[arg(long)]
    json: bool,
}

/// The tuner's mode as a person reads it (a newer daemon's, as it names it).
fn mode_name(m: &Mode) -> &str {
    match m {
        Mode::Off => "off",
        Mode::Auto => "auto (applies changes)",
        Mode::DryRun => "dry run (recommends only)",
        Mode::Other(s) => s,
    }
}

/// The tuner's state as a person reads it (a newer daemon's, as it names it).
fn state_name(s: &State) -> &str {
    match s {
        State::Idle => "measuring the current settings",
        State::Exploring => "trying a candidate",
        State::Converged => "converged",
        State::Pinned => "pinned by the operator",
        State::Frozen => "frozen after failed changes",
        State::Other(s) => s,
    }
}

/// A decision's action as a person reads it (a newer daemon's, as it names it).
fn action_name(a: &Action) -> &str {
    match a {
        Action::Change => "changed",
        Action::Revert => "reverted",
        Action::Recommend => "recommended",
        Action::Other(s) => s,
    }
}

/// The tuner's settings point a recommendation stands for, in the tuner's units: each field as
/// the daemon sent it, and one it left out (a daemon of another version) at the value the
/// device's knobs stand for now, so that it changes nothing.
fn recommended_point(knobs: &[Knob], r: &Settings) -> DeviceSettings {
    let (now, _) = enlightd::knobs::tuner_space(knobs, 0);
    let field = |v: Option<u64>, now: u32| v.map_or(now, |v| v.min(u32::MAX as u64) as u32);
    DeviceSettings {
        ring_out_bytes: field(r.ring_out_bytes, now.ring_out_bytes),
        ring_in_bytes: field(r.ring_in_bytes, now.ring_in_bytes),
        moderation_frames: field(r.moderation_frames, now.moderation_frames),
        moderation_usecs: field(r.moderation_usecs, now.moderation_usecs),
        poll_budget: field(r.poll_budget, now.poll_budget),
    }
}

/// The `--json` report: the devices' tuner views (contract 6), filtered like the text one.
pub fn render_json(devices: &[DeviceView], only: Option<&str>) -> Result<String> {
    if let Some(n) = only {
        if !devices.iter().any(|d| d.name == n) {
            bail!("enlightd knows no device {n:?}");
        }
    }
    let out: Vec<serde_json::Value> = devices
        .iter()
        .filter(|d| only.is_none_or(|n| d.name == n))
        .map(|d| {
            serde_json::json!({
                "name": d.name, "kind": d.kind, "device": d.device,
                "settings": d.settings, "knobs": d.knobs, "tuner": d.tuner,
            })
        })
        .collect();
    Ok(serde_json::to_string_pretty(&out)? + "\n")
}

/// Why each knob the tuner never changes live is left alone (recommend only).
fn not_explored(d: &DeviceView) -> Vec<String> {
    d.knobs
        .iter()
        .filter_map(|k| k.not_explored_because())
        .collect()
}

/// The report for a list of devices (pure, tested).
pub fn render(devices: &[DeviceView], only: Option<&str>) -> Result<String> {
    let mut out = String::new();
    let mut tuned = 0;
    for d in devices.iter().filter(|d| only.is_none_or(|n| d.name == n)) {
        let Some(t) = &d.tuner else {
            out.push_str(&format!(
                "{} ({} {}): no tuner runs for this device; knobs: {}\n",
                d.name,
                d.kind,
                d.device,
                enlightd::knobs::line(&d.knobs)
            ));
            continue;
        };
        tuned += 1;
        out.push_str(&format!(
            "{} ({} {}): tuner {}, objective {}, {}{}\n  current:     {}\n",
            d.name,
            d.kind,
            d.device,
            mode_name(&t.mode),
            t.objective,
            state_name(&t.state),
            if t.pinned && t.state != State::Pinned {
                ", pinned"
            } else {
                ""
            },
            enlightd::knobs::line(&d.knobs)
        ));
        // The recommendation in the device's own knobs (the tuner's settings point mapped
        // onto the knobs riding its ladders).
        match &t.recommendation {
            Some(r) => out.push_str(&format!(
                "  recommended: {}\n",
                enlightd::knobs::changes_line(&d.knobs, &recommended_point(&d.knobs, r))
            )),
            None => out.push_str("  recommended: nothing yet (still measuring)\n"),
        }
        if let Some(why) = &t.pinned_reason {
            out.push_str(&format!("  pinned: {why}\n"));
        }
        for why in not_explored(d) {
            out.push_str(&format!("  not explored: {why}\n"));
        }
        if let Some(dec) = &t.last_decision {
            out.push_str(&format!(
                "  last decision: {} {}\n",
                action_name(&dec.action),
                dec.reason
            ));
        }
    }
    if let Some(n) = only {
        if !devices.iter().any(|d| d.name == n) {
            bail!("enlightd knows no device {n:?}");
        }
    }
    if tuned == 0 {
        out.push_str(
            "no device has a tuner: start enlightd with --dry-run (recommend) or --tune (apply), or set [tuner] mode\n",
        );
    }
    Ok(out)
}

pub fn run(args: TuneArgs) -> Result<()> {
    debug_assert!(args.dry_run);
    let url = format!("http://{}/api/v1/devices", args.addr);
    let body = ureq::get(&url)
        .call()
        .with_context(|| format!("asking enlightd at {url} (is it running?)"))?
        .into_string()?;
    let devices: Vec<DeviceView> =
        serde_json::from_str(&body).with_context(|| format!("reading {url}"))?;
    if args.json {
        crate::signals::text(render_json(&devices, args.device.as_deref())?);
    } else {
        crate::signals::text(render(&devices, args.device.as_deref())?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use enlight_abi::tuner::{Objective, TunerView};

    /// The daemon's settings as its API writes them (every field present).
    fn wire(s: DeviceSettings) -> Settings {
        serde_json::from_value(serde_json::to_value(s).unwrap()).unwrap()
    }

    /// A newer daemon's device: a kind, a unit, a source, a disruption, a tuner mode,
    /// objective, state and action this build does not know, a field it does not know and a
    /// recommendation with fields left out. The daemon's strict types refuse it; `enlight tune`
    /// reads it and shows what it says, as written.
    #[test]
    fn a_newer_daemons_unknown_values_are_shown_as_written() {
        let json = r#"[{"name":"vdb","device":"disk","kind":"vhost-user","present":true,
            "knobs":[
              {"name":"nr_requests","value":64,"min":4,"max":2048,"unit":"requests",
               "source":"bpf-map","disruption":"live","tuner_kind":"queue_depth"},
              {"name":"iothreads","value":4,"unit":"threads","source":"qmp",
               "disruption":"restarts-vm"}],
            "tuner":{"mode":"shadow","objective":"energy","state":"warming","pinned":false,
              "last_decision":{"ts_unix_ms":5,"device":"vdb","action":"escalate","from":{},
                "to":{},"reason":"queue full","objective_value":null},
              "recommendation":{"moderation_frames":128,"iothreads":8}},
            "numa_node":1}]"#;
        assert!(serde_json::from_str::<Vec<enlightd::DeviceView>>(json).is_err());
        let devices: Vec<DeviceView> = serde_json::from_str(json).unwrap();
        let text = render(&devices, None).unwrap();
        assert_eq!(
            text,
            "vdb (vhost-user disk): tuner shadow, objective energy, warming\n\
             \x20 current:     nr_requests 64 requests, iothreads 4 threads (restarts-vm)\n\
             \x20 recommended: nr_requests 64 requests → 128 requests\n\
             \x20 not explored: iothreads changes with a disruption this daemon does not know \
             (\"restarts-vm\"): recommend only\n\
             \x20 last decision: escalate queue full\n"
        );
        let out: serde_json::Value =
            serde_json::from_str(&render_json(&devices, Some("vdb")).unwrap()).unwrap();
        assert_eq!(out[0]["kind"], "vhost-user");
        assert_eq!(
            (&out[0]["knobs"][0]["unit"], &out[0]["knobs"][0]["source"]),
            (&"requests".into(), &"bpf-map".into())
        );
        assert_eq!(out[0]["knobs"][1]["disruption"], "restarts-vm");
        assert_eq!(
            (&out[0]["tuner"]["mode"], &out[0]["tuner"]["state"]),
            (&"shadow".into(), &"warming".into())
        );
        assert_eq!(out[0]["tuner"]["last_decision"]["action"], "escalate");
    }

    #[test]
    fn recommendations_are_printed_per_device() {
        let json = r#"[{"name":"disk0","device":"disk","kind":"synthetic","pid":1,"present":true,
            "attached":true,"attach_error":null,
            "settings":{"ring_out_bytes":262144,"ring_in_bytes":262144,"moderation_frames":8,
                        "moderation_usecs":50,"poll_budget":64},
            "knobs":[],
            "total":{"op":"all","ops_total":0,"bytes_total":0,"errors_total":0,"ops_per_sec":0.0,
                     "bytes_per_sec":0.0,"p50_seconds":null,"p90_seconds":null,"p99_seconds":null,
                     "p999_seconds":null},
            "ops":[],"interrupts_total":0,"interrupts_per_sec":0.0,"doorbells_total":0,
            "ring_full_out_total":0,"ring_full_in_total":0,"irq_masked_total":0}]"#;
        let mut devices: Vec<DeviceView> = serde_json::from_str(json).unwrap();
        let settings: DeviceSettings =
            serde_json::from_value(serde_json::to_value(&devices[0].settings).unwrap()).unwrap();
        devices[0].knobs =
            enlightd::knobs::synthetic(&settings, &enlight_driver::control::Limits::synthetic());
        let text = render(&devices, None).unwrap();
        assert!(
            text.contains("no tuner runs") && text.contains("no device has a tuner"),
            "{text}"
        );
        devices[0].tuner = Some(TunerView {
            mode: Mode::DryRun,
            objective: Objective::Latency,
            state: State::Idle,
            pinned: false,
            last_decision: None,
            pinned_reason: None,
            recommendation: Some(wire(DeviceSettings {
                moderation_usecs: 20,
                ..settings
            })),
        });
        let text = render(&devices, Some("disk0")).unwrap();
        assert!(
            text.contains("recommended: moderation_usecs 50 us → 20 us\n"),
            "{text}"
        );
        assert!(
            text.contains("disk0 (synthetic disk): tuner dry run (recommends only), objective latency, measuring the current settings"),
            "{text}"
        );
        assert!(!text.contains("DryRun") && !text.contains("Idle"), "{text}");
        assert!(render(&devices, Some("nope")).is_err());
        let json: serde_json::Value =
            serde_json::from_str(&render_json(&devices, Some("disk0")).unwrap()).unwrap();
        assert_eq!(json[0]["tuner"]["mode"], "dry_run");
        assert_eq!(json[0]["tuner"]["state"], "idle");
        assert_eq!(json[0]["settings"]["moderation_frames"], 8);
        assert_eq!(json[0]["knobs"][2]["name"], "moderation_frames");
        assert!(render_json(&devices, Some("nope")).is_err());
    }

    /// A kernel NIC shows its own knobs, the recommendation in them, and why its rings are
    /// never explored; an emulated device shows it has none.
    #[test]
    fn kernel_and_emulated_devices_show_only_their_own_knobs() {
        let nic = enlightd::kernel::ethtool::NicSettings {
            rings: Some(enlightd::kernel::ethtool::Rings {
                rx: 1024,
                tx: 1024,
                rx_max: 8192,
                tx_max: 8192,
            }),
            coalesce: None,
        };
        let knobs = enlightd::kernel::knobs::nic(
            "hv_netvsc",
            Some(&nic),
            &[("napi_defer_hard_irqs", 0), ("gro_flush_timeout", 0)],
        );
        let (now, _) = enlightd::knobs::tuner_space(&knobs, 64);
        let view = |name: &str, kind: &str, knobs: Vec<enlightd::knobs::Knob>| DeviceView {
            name: name.into(),
            device: "nic".into(),
            kind: kind.into(),
            knobs,
            ..serde_json::from_value::<DeviceView>(serde_json::json!({
                "name":"x","device":"nic","kind":"kernel","pid":0,"present":true,
                "attached":true,"attach_error":null,
                "total":{"op":"all","ops_total":0,"bytes_total":0,"errors_total":0,
                         "ops_per_sec":0.0,"bytes_per_sec":0.0,"p50_seconds":null,
                         "p90_seconds":null,"p99_seconds":null,"p999_seconds":null},
                "ops":[],"interrupts_total":0,"interrupts_per_sec":0.0,"doorbells_total":0,
                "ring_full_out_total":0,"ring_full_in_total":0,"irq_masked_total":0}))
            .unwrap()
        };
        let mut eth = view("eth1", "kernel", knobs);
        eth.tuner = Some(TunerView {
            mode: Mode::DryRun,
            objective: Objective::Latency,
            state: State::Exploring,
            pinned: false,
            last_decision: None,
            pinned_reason: None,
            recommendation: Some(wire(DeviceSettings {
                moderation_frames: 2,
                moderation_usecs: 50,
                ..now
            })),
        });
        let emu = view("ide0", "emulated", vec![]);
        let text = render(&[eth, emu], None).unwrap();
        assert!(
            text.contains("current:     rx_ring 1024 (detaches), tx_ring 1024 (detaches), napi_defer_hard_irqs 0, gro_flush_timeout 0 ns"),
            "{text}"
        );
        assert!(
            text.contains(
                "recommended: napi_defer_hard_irqs 0 → 2, gro_flush_timeout 0 ns → 50000 ns"
            ),
            "{text}"
        );
        assert!(text.contains("not explored: rx_ring detaches and re-creates the device"));
        assert!(text.contains(
            "ide0 (emulated nic): no tuner runs for this device; knobs: no tunable knobs"
        ));
        assert!(
            !text.contains("moderation_frames") && !text.contains("ring_out"),
            "{text}"
        );
    }

    /// A kernel disk shows its own knobs (the scheduler by name), the recommendation in them,
    /// and why max_sectors_kb is not explored.
    #[test]
    fn a_kernel_disk_shows_its_queue_knobs_and_the_recommendation_in_them() {
        let q = |name: &'static str, value: u32, range: (u32, u32)| {
            enlightd::kernel::knobs::QueueSetting {
                name,
                value,
                writable: true,
                range,
            }
        };
        let sched = enlightd::kernel::blockq::parse_scheduler("none [mq-deadline] kyber");
        let knobs = enlightd::kernel::knobs::disk(
            &[
                q("nr_requests", 256, (4, 2048)),
                q("read_ahead_kb", 128, (0, 1 << 20)),
                q("max_sectors_kb", 1280, (4, 1280)),
            ],
            sched.as_ref(),
        );
        let (now, _) = enlightd::knobs::tuner_space(&knobs, 0);
        let mut disk: DeviceView = serde_json::from_value(serde_json::json!({
            "name":"vda","device":"disk","kind":"kernel","pid":0,"present":true,
            "attached":true,"attach_error":null,
            "total":{"op":"all","ops_total":0,"bytes_total":0,"errors_total":0,
                     "ops_per_sec":0.0,"bytes_per_sec":0.0,"p50_seconds":null,
                     "p90_seconds":null,"p99_seconds":null,"p999_seconds":null},
            "ops":[],"interrupts_total":0,"interrupts_per_sec":0.0,"doorbells_total":0,
            "ring_full_out_total":0,"ring_full_in_total":0,"irq_masked_total":0}))
        .unwrap();
        disk.knobs = knobs;
        disk.tuner = Some(TunerView {
            mode: Mode::DryRun,
            objective: Objective::Latency,
            state: State::Exploring,
            pinned: false,
            last_decision: None,
            pinned_reason: None,
            recommendation: Some(wire(DeviceSettings {
                moderation_frames: 128,
                moderation_usecs: 0,
                ..now
            })),
        });
        let text = render(&[disk], None).unwrap();
        assert!(
            text.contains("current:     scheduler mq-deadline, nr_requests 256, read_ahead_kb 128 KiB, max_sectors_kb 1280 KiB"),
            "{text}"
        );
        assert!(
            text.contains("recommended: scheduler mq-deadline → none, nr_requests 256 → 128"),
            "{text}"
        );
        assert!(
            text.contains("not explored: max_sectors_kb rides the ring ladder"),
            "{text}"
        );
        assert!(!text.contains("moderation_frames"), "{text}");
    }
}
