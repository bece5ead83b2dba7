//! Child processes that never outlive the command that started them.
//!
//! Every process `enlight` starts (device processes, `ip`, `ping`, `iperf3`) is spawned through
//! [`DieWithParent`]: the kernel sends it a signal when its parent dies, however the parent dies
//! (SIGKILL included, which no handler sees). `PR_SET_PDEATHSIG` has two sharp edges, both
//! handled here or by the callers:
//! - it is set in the child between fork and exec, and the parent may already be gone by then
//!   (the signal is then never sent): the child checks `getppid()` after setting it and exits
//!   if its parent is no longer the process that forked it;
//! - it fires when the *thread* that forked the child exits, not the process: spawn children
//!   from a thread that lives as long as they should (every caller spawns from the main thread).

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes a command's child die with this process.
pub trait DieWithParent {
    /// The child gets `signal` when this process (strictly: the spawning thread) exits. Our
    /// device processes get SIGTERM, which they handle by stopping cleanly (registry record,
    /// control socket and network namespaces removed); other programs get SIGKILL.
    fn die_with_parent(&mut self, signal: libc::c_int) -> &mut Self;
}

impl DieWithParent for Command {
    fn die_with_parent(&mut self, signal: libc::c_int) -> &mut Self {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // async-signal-safe system calls (prctl, getppid) on values copied into it.
        unsafe {
            self.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the prctl: nobody will send the signal.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("the parent exited while starting"));
                }
                Ok(())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::time::{Duration, Instant};

    /// The death signal follows the spawning thread: a child spawned from a thread that exits
    /// gets it at once (the same kernel path as a parent process that dies; the end-to-end
    /// proof with a SIGKILLed `enlight demo` is in cli/tests/signals.rs).
    #[test]
    fn a_child_dies_when_its_spawning_thread_exits() {
        let started = Instant::now();
        let mut child = std::thread::spawn(|| {
            Command::new("sleep")
                .arg("30")
                .die_with_parent(libc::SIGKILL)
                .spawn()
                .unwrap()
        })
        .join()
        .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
