//! `enlight top`: flags, then the TUI (crate `enlight-tui`).

use std::time::Duration;

use anyhow::{Context, Result};

/// Flags of `enlight top`.
#[derive(clap::Args)]
pub struct TopArgs {
    /// enlightd's HTTP address (`host:port` or `http://host:port`).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub daemon: String,
    /// How often to read the daemon, in milliseconds (50..=10000).
    #[arg(long, default_value_t = 500, value_parser = crate::ranges::int(50..=10_000u64))]
    pub interval_ms: u64,
    /// Panic after this many seconds (for tests of terminal restoration).
    #[arg(long, hide = true, value_parser = crate::ranges::duration_secs())]
    pub panic_after_secs: Option<f64>,
}

pub fn run(args: TopArgs) -> Result<()> {
    // SIGTERM and SIGHUP (a closed terminal) end it like `q`, restoring the terminal; Ctrl-C
    // in the raw-mode terminal is a key, which the TUI handles itself.
    crate::signals::install_stop_handlers()?;
    enlight_tui::run(&enlight_tui::Options {
        daemon: args.daemon.clone(),
        interval: Duration::from_millis(args.interval_ms),
        panic_after: args.panic_after_secs.map(Duration::from_secs_f64),
        stop: Some(crate::signals::stop_flag()),
    })
    .with_context(|| format!("enlight top (daemon {})", args.daemon))
}
