//! `enlight top`: a terminal view of a running enlightd.
//!
//! The parts are kept apart the way ratatui apps do it:
//!
//! - [`model`]: the daemon's JSON API as the TUI reads it (tolerant of missing fields: a daemon
//!   without a tuner shows `tuner: n/a`); [`client`]: a blocking HTTP client for it.
//! - [`app`]: [`App`], the plain state, changed only by [`Event`]s (keys, polls, disconnects,
//!   pin results), answering with [`Action`]s (quit, pin/unpin).
//! - [`stats`]: pure figures: window deltas of the kernel's cumulative latency buckets,
//!   percentiles, log-scale columns.
//! - [`ui`] renders (`impl Widget for &App`), [`widgets`] holds the histogram widget.
//! - [`collect`]: the collector thread (polls the daemon, reports disconnects, keeps retrying),
//!   the key reader and pin requests, all sending over one channel.
//! - [`term`]: raw mode and the alternate screen, undone by a `Drop` guard and a panic hook.

pub mod app;
pub mod client;
pub mod collect;
pub mod model;
pub mod stats;
pub mod term;
pub mod ui;
pub mod widgets;

#[cfg(test)]
mod testing;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use app::{Action, App, Event, Screen, Window};
pub use client::{Client, ClientError};

/// What `enlight top` needs to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The daemon: `host:port` or `http://host:port`.
    pub daemon: String,
    /// How often to poll the daemon.
    pub interval: Duration,
    /// Panic after this long (tests use it to check that a panic restores the terminal).
    pub panic_after: Option<Duration>,
    /// Set (by a signal handler: SIGTERM, SIGHUP) to end the TUI the way `q` does, restoring
    /// the terminal; looked at after every batch of events (at least once per poll interval).
    pub stop: Option<&'static AtomicBool>,
}

/// Errors that end `enlight top` (a daemon that is down is not one: it is shown and retried).
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The terminal could not be set up or drawn on.
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// Sets the flag on drop, so the threads stop on every way out of [`run`].
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs the TUI until the user quits.
pub fn run(options: &Options) -> Result<(), TopError> {
    let client = Client::new(&options.daemon);
    let mut app = App::new(client.base());
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_threads = StopOnDrop(Arc::clone(&stop));
    let mut guard = term::TerminalGuard::enter()?;
    let collector = collect::spawn_collector(
        client.clone(),
        options.interval,
        start,
        tx.clone(),
        Arc::clone(&stop),
    )?;
    let input = collect::spawn_input(start, tx.clone(), Arc::clone(&stop))?;
    'outer: loop {
        guard
            .terminal
            .draw(|frame| frame.render_widget(&app, frame.area()))?;
        let Ok(first) = rx.recv() else { break };
        // Apply everything already queued before drawing again.
        for event in std::iter::once(first).chain(rx.try_iter()) {
            match app.on_event(event) {
                Some(Action::Quit) => break 'outer,
                Some(Action::SetPinned { device, pin }) => {
                    collect::spawn_pin(client.clone(), device, pin, start, tx.clone())
                }
                None => {}
            }
        }
        if options.stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            break;
        }
        if options.panic_after.is_some_and(|d| start.elapsed() >= d) {
            panic!("enlight top: --panic-after reached (a test of terminal restoration)");
        }
    }
    stop.store(true, Ordering::Release);
    let _ = input.join();
    drop(guard);
    // The collector may sit in an HTTP request for up to its timeout; it exits on its own.
    drop(collector);
    Ok(())
}
