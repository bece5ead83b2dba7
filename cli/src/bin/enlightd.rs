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
    /// Collector interval in milliseconds [default: 1000].
    #[arg(long, value_name = "MS")]
    interval_ms: Option<u64>,
    /// Also observe the running kernel's own disks and NICs (as `[kernel] enabled = true`).
    #[arg(long)]
    kernel: bool,
    /// Load and attach everything it would, print a report, exit non-zero on any failure.
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

/// `--check`: every step on its own line; the first failure ends it.
fn check(flags: &Flags) -> Result<()> {
    let config = config_from(flags)?;
    println!(
        "ok   config ({})",
        flags
            .config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "defaults".into())
    );
    enlight_probes::preflight()?;
    println!("ok   privileges, kernel BTF, tracefs, uprobe PMU");
    let mut probes = enlight_probes::Probes::load().context("loading the eBPF programs")?;
    println!(
        "ok   eBPF programs loaded and verified ({})",
        enlight_probes::PROGRAMS.map(|(_, p)| p).join(", ")
    );
    let (records, errors) = enlight_driver::registry::list(&config.runtime_dir);
    for e in &errors {
        println!("FAIL registry: {e}");
    }
    println!(
        "ok   registry {}: {} device(s)",
        config.runtime_dir.display(),
        records.len()
    );
    let mut failed = !errors.is_empty();
    for r in &records {
        match probes.attach_process(r.pid, &r.exe) {
            Ok(report) if report.missing.is_empty() => {
                println!(
                    "ok   {} (pid {}): {} sites attached",
                    r.name, r.pid, report.sites_attached
                )
            }
            Ok(report) => {
                failed = true;
                println!(
                    "FAIL {} (pid {}): no site for {}",
                    r.name,
                    r.pid,
                    report.missing.join(", ")
                );
            }
            Err(e) => {
                failed = true;
                println!("FAIL {} (pid {}): {e}", r.name, r.pid);
            }
        }
        probes.detach_process(r.pid);
    }
    if config.kernel.enabled {
        // A missing tracepoint is reported, not a failure: the daemon runs without it.
        let kernel = enlight_probes::kernel::KernelProbes::load(&Default::default())
            .context("loading the kernel-device eBPF programs")?;
        for (probe, s) in kernel.status() {
            match &s.reason {
                None => println!("ok   kernel probe {probe} attached"),
                Some(why) => println!("skip kernel probe {probe}: {why}"),
            }
        }
        let devices = enlightd::kernel::discovery::discover(&config.kernel.sysfs);
        for d in &devices {
            println!(
                "ok   kernel {} {} (driver {}, {}, {} queue(s))",
                d.device,
                d.name,
                d.driver,
                d.class.name(),
                d.queues
            );
        }
    }
    std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("binding {}", config.listen))?;
    println!("ok   can listen on {}", config.listen);
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
