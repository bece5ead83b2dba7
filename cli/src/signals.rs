//! Stopping cleanly: SIGINT, SIGTERM and SIGHUP (a closed terminal) set a stop flag that the
//! synchronous commands poll, and a closed stdout (`enlight demo | head -1`) sets the same flag
//! instead of panicking in `println!`. Every way a user ends a command thus ends it the way
//! Ctrl-C does, through the command's own clean-up. (`enlight demo`, which is async, watches
//! the same signals through tokio and the same output functions.)

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// The signals that end a command cleanly.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_stop_signal(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs handlers so that SIGINT, SIGTERM and SIGHUP set the flag of [`stop_flag`].
pub fn install_stop_handlers() -> std::io::Result<()> {
    for signal in STOP_SIGNALS {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
        // performs an atomic store, which is async-signal-safe.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The flag a stop signal (or a closed stdout, through [`line`]) sets.
pub fn stop_flag() -> &'static AtomicBool {
    &STOP_REQUESTED
}

/// Whether a stop was asked for.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// An error once a stop was asked for: long commands (the benchmarks) call this between steps,
/// so a signal unwinds them through their destructors (children stopped, directories removed).
pub fn check_stop() -> anyhow::Result<()> {
    if stop_requested() {
        anyhow::bail!("stopped by a signal (or a closed stdout)");
    }
    Ok(())
}

/// Whether stdout has been found closed.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::SeqCst)
}

/// Writes `text` and a newline to stdout and flushes. Returns `false` once stdout is closed
/// (the reader went away): that also asks the command to stop ([`stop_flag`]), and nothing is
/// written after it. Other write errors are reported on stderr once, the same way.
pub fn line(text: impl std::fmt::Display) -> bool {
    text_out(format_args!("{text}\n"))
}

/// [`line`] without the newline (for text that carries its own).
pub fn text(text: impl std::fmt::Display) -> bool {
    text_out(format_args!("{text}"))
}

fn text_out(args: std::fmt::Arguments) -> bool {
    if stdout_closed() {
        return false;
    }
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("enlight: writing to stdout: {e}; stopping");
            }
            STDOUT_CLOSED.store(true, Ordering::SeqCst);
            STOP_REQUESTED.store(true, Ordering::SeqCst);
            false
        }
    }
}
