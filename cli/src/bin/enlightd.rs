//! `enlightd`: flags, configuration, preflight, then [`enlightd::run`]. Built by the `enlight`
//! package so that `cargo install --path cli` installs it beside `enlight`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

#[path = "../docs.rs"]
mod docs;
use enlightd::Config;

#[derive(Parser, Debug)]
#[command(
    name = "enlightd",
    version,
    about = "enlight daemon: eBPF-fed latency histograms of synthetic, emulated and kernel devices, served to Prometheus and a JSON API, and a live tuner of their rings and interrupt moderation"
)]
struct Flags {
    /// TOML configuration file (unknown keys are rejected).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Address for /metrics and the JSON API [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Device registry directory [default: $ENLIGHT_RUNTIME_DIR or /run/enlight].
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Collector interval in milliseconds, 50..=60000 [default: 1000].
    #[arg(long, value_name = "MS")]
    interval_ms: Option<u64>,
    /// Also observe the running kernel's own disks and NICs (as `[kernel] enabled = true`).
    #[arg(long)]
    kernel: bool,
    /// Check everything the daemon would use (configuration, runtime directory and its lock,
    /// audit log, [kernel] tune names, privileges, probes, devices, the listen address), print a
    /// report, exit non-zero on anything the daemon would fail on or skip.
    #[arg(long)]
    check: bool,
    /// Tune every device with a control interface (the tuner's mode `auto`; docs/tuner.md).
    #[arg(long, conflicts_with = "dry_run")]
    tune: bool,
    /// Run the tuner but only recommend: never change a device (overrides every per-device mode
    /// but `off`). Recommendations: `enlight tune --dry-run`, /api/v1/devices, the audit log.
    #[arg(long)]
    dry_run: bool,
    /// More log output on stderr (-v debug, -vv trace: the eBPF loader's own lines too);
    /// RUST_LOG still wins. The default level logs devices found and gone, probes attached,
    /// tuner changes, restored knobs, and each problem once (then counts it).
    #[arg(short, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log line format: text, or json (one object per line, for log shippers).
    #[arg(long, value_enum, default_value_t = enlightd::logging::LogFormat::Text)]
    log_format: enlightd::logging::LogFormat,
    /// Write enlightd's man page and shell completions under DIR, then exit (for packaging).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_docs: Option<PathBuf>,
}

fn config_from(flags: &Flags) -> Result<Config> {
    let mut config = match &flags.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(l) = flags.listen {
        config.listen = l;
    }
    if let Some(d) = &flags.runtime_dir {
        config.runtime_dir = d.clone();
    }
    if let Some(i) = flags.interval_ms {
        config.interval_ms = i;
    }
    if flags.tune {
        config.tuner.mode = enlightd::tuner::TunerMode::Auto;
    }
    if flags.dry_run {
        use enlightd::tuner::TunerMode;
        config.tuner.mode = TunerMode::DryRun;
        for d in config.tuner.devices.values_mut() {
            if d.mode.is_some_and(|m| m != TunerMode::Off) {
                d.mode = Some(TunerMode::DryRun);
            }
        }
    }
    if flags.kernel {
        config.kernel.enabled = true;
    }
    config.validate()?;
    Ok(config)
}

/// One line of `--check`'s report. A closed stdout (`enlightd --check | head -1`) does not panic:
/// the rest of the report is dropped and the exit code still says how the checks went.
fn say(line: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// `--check`: every check on its own line (`ok`, `FAIL` or `skip`), the ones that need no
/// privileges first; it fails on anything the daemon would fail on or silently skip.
fn check(flags: &Flags) -> Result<()> {
    let config = config_from(flags)?;
    say(format_args!(
        "ok   config ({})",
        flags
            .config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "defaults".into())
    ));
    let mut failed = false;
    let mut fail = |line: String| {
        failed = true;
        say(format_args!("FAIL {line}"));
    };
    // The runtime directory: another daemon on it makes this one refuse to start.
    match enlightd::runtime_lock::RuntimeLock::holder(&config.runtime_dir) {
        Ok(None) => say(format_args!(
            "ok   runtime directory {}: no other enlightd",
            config.runtime_dir.display()
        )),
        Ok(Some(pid)) => fail(format!(
            "runtime directory {}: enlightd pid {pid} already serves it (a second daemon \
             refuses to start)",
            config.runtime_dir.display()
        )),
        Err(e) => fail(e.to_string()),
    }
    // The tuner's audit log: the daemon refuses to tune without it.
    if config.tuner.any_enabled() {
        let path = config.tuner.audit_path(&config.runtime_dir);
        match enlightd::tuner::audit::AuditLog::open(&path) {
            Ok(_) => say(format_args!("ok   tuner audit log {}", path.display())),
            Err(e) => fail(format!(
                "tuner audit log {}: {e} (the daemon would not start its tuner)",
                path.display()
            )),
        }
    }
    // `[kernel] tune`: names the daemon could never tune.
    if !config.kernel.tune.is_empty() && !config.kernel.enabled {
        fail(format!(
            "[kernel] tune = {:?}, but the kernel's devices are not observed ([kernel] enabled = \
             false and no --kernel): the daemon would ignore it",
            config.kernel.tune
        ));
    } else {
        for name in enlightd::kernel::unknown_tune_names(&config.kernel) {
            fail(format!(
                "[kernel] tune names {name:?}, which is no disk or NIC of this machine (under {})",
                config.kernel.sysfs.display()
            ));
        }
    }
    enlight_probes::preflight()?;
    say("ok   privileges, kernel BTF, tracefs, uprobe PMU");
    let mut probes = enlight_probes::Probes::load().context("loading the eBPF programs")?;
    say(format_args!(
        "ok   eBPF programs loaded and verified ({})",
        enlight_probes::PROGRAMS.map(|(_, p)| p).join(", ")
    ));
    let (records, errors) = enlight_driver::registry::list(&config.runtime_dir);
    for e in &errors {
        fail(format!("registry: {e}"));
    }
    say(format_args!(
        "ok   registry {}: {} device(s)",
        config.runtime_dir.display(),
        records.len()
    ));
    for r in &records {
        match probes.attach_process(r.pid, &r.exe) {
            Ok(report) if report.missing.is_empty() => say(format_args!(
                "ok   {} (pid {}): {} sites attached",
                r.name, r.pid, report.sites_attached
            )),
            Ok(report) => fail(format!(
                "{} (pid {}): no site for {}",
                r.name,
                r.pid,
                report.missing.join(", ")
            )),
            Err(e) => fail(format!("{} (pid {}): {e}", r.name, r.pid)),
        }
        probes.detach_process(r.pid);
    }
    if config.kernel.enabled {
        // A missing tracepoint is reported, not a failure: the daemon runs without it.
        let kernel = enlight_probes::kernel::KernelProbes::load(&Default::default())
            .context("loading the kernel-device eBPF programs")?;
        for (probe, s) in kernel.status() {
            match &s.reason {
                None => say(format_args!("ok   kernel probe {probe} attached")),
                Some(why) if s.absent => say(format_args!("absent kernel probe {probe}: {why}")),
                Some(why) => say(format_args!("skip kernel probe {probe}: {why}")),
            }
        }
        let devices = enlightd::kernel::discovery::discover(&config.kernel.sysfs);
        for d in &devices {
            say(format_args!(
                "ok   kernel {} {} (driver {}, {}, {} queue(s))",
                d.device,
                d.name,
                d.driver,
                d.class.name(),
                d.queues
            ));
        }
    }
    std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("binding {}", config.listen))?;
    say(format_args!("ok   can listen on {}", config.listen));
    anyhow::ensure!(!failed, "some checks failed");
    Ok(())
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    if let Some(dir) = &flags.generate_docs {
        use clap::CommandFactory;
        return match docs::write(Flags::command(), dir, "8") {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("enlightd: writing the docs to {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    enlightd::logging::init(flags.verbose, flags.log_format);
    let result = if flags.check {
        check(&flags)
    } else {
        serve(&flags)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enlightd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(flags: &Flags) -> Result<()> {
    let config = config_from(flags)?;
    // Before anything is bound or logged, so a missing privilege is the only line printed.
    enlight_probes::preflight()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        log::info!(
            "serving on http://{}/metrics, devices from {}",
            config.listen,
            config.runtime_dir.display()
        );
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        enlightd::run(config, listener, shutdown).await?;
        Ok(())
    })
}
