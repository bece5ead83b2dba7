//! `enlight disk`: one synthetic disk device process.
//!
//! Creates (if asked) and opens the backing file, starts the host service on threads of this
//! process and the guest driver on the main thread, announces the device in the registry, runs the
//! workload and prints the workload's own figures about once per second, and a last line when it
//! is done: a readable line on a terminal, one JSON object per line (`WorkloadSnapshot`, the last
//! with `"done": true`) with `--json` or when stdout is not a terminal. SIGINT/SIGTERM stop it
//! cleanly: in-flight requests complete, the registry record is removed.
//!
//! The device serves its control socket (`<runtime dir>/control/<name>.sock`, contract 4) for
//! its whole life: every knob can change while the workload runs, and each applied change
//! rewrites the registry record with the settings now in force.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use enlight_driver::control::{self, ControlServer};
use enlight_driver::disk::{Backing, DiskOptions, SyntheticDisk};
use enlight_driver::registry::{self, DeviceRecord, Registration};
use enlight_driver::settings::{DeviceSettings, Knob};
use enlight_driver::workload::{self, Limit};

use crate::{ranges, signals};

#[derive(Args, Debug)]
pub struct DiskArgs {
    /// Device name (unique in the runtime directory).
    #[arg(long, default_value = "disk0")]
    name: String,
    /// Device id inside this process (the `dev` argument of the USDT probes), 0..=65535.
    #[arg(long, default_value_t = 0, value_parser = crate::ranges::int(0..=65535u32))]
    dev_id: u32,
    /// Backing file: the disk's contents (the workload writes to it unless rw=100).
    #[arg(long)]
    backing: PathBuf,
    /// Create the backing file with this many MiB (1..=1048576), written out with zeros so that
    /// deleting it later is quick, or grow a smaller one to it (its bytes are kept). A larger
    /// existing file is refused unless --shrink is given.
    #[arg(long, value_name = "MIB", value_parser = ranges::mib)]
    create_mib: Option<u64>,
    /// Let --create-mib cut an existing larger backing file down to MIB, destroying the data
    /// past that point.
    #[arg(long, requires = "create_mib")]
    shrink: bool,
    /// Runtime directory: the registry record goes to <DIR>/devices/<name>.json, the control
    /// socket to <DIR>/control/<name>.sock [default: $ENLIGHT_RUNTIME_DIR or /run/enlight].
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Workload: comma-separated key=value: qd (1..=4096), bs (512..=16m, a multiple of 512;
    /// k/m suffixes), rw (read %, 0..=100), pattern (random|sequential), ios (1.., I/Os) or
    /// duration (0..=31536000 s: 10s, 1.5, 500ms), seed (any u64), rate (IOPS, open loop,
    /// 0..=10000000), ramp (IOPS at the end of the phase: the rate moves linearly from rate to
    /// it over the duration), mix (SIZE:PERCENT at a second block size), burst (ON:OFF, each
    /// 0..=3600 s). Phases run in turn: join specs with ';' (every phase but the last needs ios
    /// or duration).
    #[arg(long, default_value = "qd=32,bs=4k,rw=70,pattern=random", value_parser = ranges::plan)]
    workload: workload::Plan,
    /// Stop after this many seconds, 0.001..=31536000 (overrides the workload's own limit).
    #[arg(long, value_name = "SECS", value_parser = ranges::duration_secs())]
    duration: Option<f64>,
    /// Wait up to SECS (0..=3600) for a tracer (enlightd) to attach every probe before starting.
    #[arg(long, value_name = "SECS", value_parser = ranges::probe_wait_secs())]
    wait_for_probes: Option<f64>,
    /// Ring data area per direction, bytes: 8192..=67108864, a multiple of 4096.
    #[arg(long, value_parser = ranges::knob(Knob::RingOutBytes))]
    ring_bytes: Option<u32>,
    /// Interrupt moderation: signal after this many completions (1..=1024)...
    #[arg(long, value_parser = ranges::knob(Knob::ModerationFrames))]
    moderation_frames: Option<u32>,
    /// ...or this many microseconds (0..=100000), whichever first.
    #[arg(long, value_parser = ranges::knob(Knob::ModerationUsecs))]
    moderation_usecs: Option<u32>,
    /// Completions reaped per polling pass, 1..=4096.
    #[arg(long, value_parser = ranges::knob(Knob::PollBudget))]
    poll_budget: Option<u32>,
    /// Host I/O worker threads, 1..=64.
    #[arg(long, default_value_t = 4, value_parser = crate::ranges::int(1..=64u32))]
    workers: u32,
    /// How often to print the workload's figures, in milliseconds (10..=60000; `enlight demo`
    /// reads them every 100 ms to line them up with enlightd's collector).
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    report_ms: u64,
    /// Print one JSON object per line (the workload's figures; the last has "done": true)
    /// instead of a readable line; the default when stdout is not a terminal.
    #[arg(long)]
    json: bool,
}

/// Creates or grows the backing file as `--create-mib` asks (shrinks it only with `--shrink`),
/// with the flags to use in the refusal.
pub fn size_backing(path: &std::path::Path, mib: u64, shrink: bool) -> Result<()> {
    let bytes = mib << 20;
    let sized = if shrink {
        Backing::resize(path, bytes)
    } else {
        Backing::create_written(path, bytes)
    };
    match sized {
        Err(e @ enlight_driver::disk::DiskError::WouldShrink { .. }) => Err(anyhow::anyhow!(
            "{e}; pass --shrink to cut it down to {mib} MiB, or leave out --create-mib to use it \
             as it is"
        )),
        other => Ok(other?),
    }
}

pub fn run(args: DiskArgs) -> Result<()> {
    signals::install_stop_handlers().context("installing signal handlers")?;
    let mut plan = args.workload.clone();
    if let Some(secs) = args.duration {
        plan.limit_last(Limit::Duration(Duration::from_secs_f64(secs)));
    }
    let defaults = DeviceSettings::default();
    let settings = DeviceSettings {
        ring_out_bytes: args.ring_bytes.unwrap_or(defaults.ring_out_bytes),
        ring_in_bytes: args.ring_bytes.unwrap_or(defaults.ring_in_bytes),
        moderation_frames: args.moderation_frames.unwrap_or(defaults.moderation_frames),
        moderation_usecs: args.moderation_usecs.unwrap_or(defaults.moderation_usecs),
        poll_budget: args.poll_budget.unwrap_or(defaults.poll_budget),
    };
    settings.validate()?;
    if let Some(mib) = args.create_mib {
        size_backing(&args.backing, mib, args.shrink)?;
    }
    let options = DiskOptions {
        max_io_bytes: plan
            .max_block_size()
            .next_multiple_of(4096)
            .max(DiskOptions::default().max_io_bytes),
        queue_slots: plan.max_queue_depth().max(1),
        workers: args.workers,
    };
    let (mut vsc, vsp) = SyntheticDisk::start(&args.backing, settings, args.dev_id, options)
        .with_context(|| format!("starting synthetic disk {}", args.name))?;

    let runtime_dir = args.runtime_dir.unwrap_or_else(registry::runtime_dir);
    let control_path = control::socket_path(&runtime_dir, &args.name);
    // The socket is bound before the record that names it is written, so a client that finds
    // the record can connect at once. A change applied before the record exists is not lost:
    // the record is written under the same lock, with the settings in force then.
    type Registered = Option<(DeviceRecord, Registration)>;
    let registered: Arc<Mutex<Registered>> = Arc::new(Mutex::new(None));
    let on_change = {
        let registered = Arc::clone(&registered);
        Box::new(move |now: &DeviceSettings| {
            let mut guard = registered.lock().expect("registration lock");
            if let Some((record, registration)) = &mut *guard {
                record.settings = *now;
                if let Err(e) = registration.update(record) {
                    log::warn!("rewriting the registry record: {e}");
                }
            }
        })
    };
    let live = vsc.live();
    let control_server =
        ControlServer::start(&control_path, live.clone(), args.dev_id, Some(on_change))
            .with_context(|| format!("serving the control socket {}", control_path.display()))?;
    {
        let mut guard = registered.lock().expect("registration lock");
        let record = DeviceRecord {
            name: args.name.clone(),
            device: "disk".into(),
            kind: enlight_driver::registry::DeviceKind::Synthetic,
            dev_id: args.dev_id,
            pid: std::process::id(),
            pid_start_time: registry::start_time_of(std::process::id()),
            exe: std::env::current_exe().context("locating this executable")?,
            started_unix_ms: registry::now_unix_ms(),
            settings: live.current(),
            control: Some(control_path.clone()),
        };
        let registration = Registration::register(&runtime_dir, &record)
            .with_context(|| format!("registering in {}", runtime_dir.display()))?;
        *guard = Some((record, registration));
    }

    if let Some(secs) = args.wait_for_probes {
        workload::wait_for_probes(
            args.dev_id,
            plan.max_queue_depth(),
            Duration::from_secs_f64(secs),
            signals::stop_flag(),
        )?;
    }
    let stdout = std::io::stdout();
    let json = crate::output::json_wanted(args.json);
    let emit = |snapshot: &workload::WorkloadSnapshot| {
        let mut out = stdout.lock();
        // A closed pipe (the reader went away) is not a reason to stop the device.
        if json {
            let _ = serde_json::to_writer(&mut out, snapshot);
        } else {
            let _ = out.write_all(crate::output::workload_line(snapshot).as_bytes());
        }
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    };
    let report = workload::run_plan_every(
        &mut vsc,
        &plan,
        signals::stop_flag(),
        Duration::from_millis(args.report_ms),
        emit,
    )?;
    emit(&report);
    drop(control_server);
    drop(registered);
    vsp.stop().context("stopping the host service")?;
    Ok(())
}
