//! The lab's network namespace: one per guest, holding a tap per NIC (the host's end of the
//! guest's link). Created with `ip` (iproute2) and deleted, with its taps, on drop. Names are
//! `enlight-lab-<pid>-<n>`: a namespace whose pid is gone (an `enlight lab` killed with SIGKILL)
//! is removed by the next lab that starts.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{run_tool, LabError};

pub const PREFIX: &str = "enlight-lab-";

pub struct Netns {
    pub name: String,
    taps: Vec<String>,
}

/// The pid in a lab namespace's name (pure).
pub fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes the namespaces of labs whose process is gone.
pub fn remove_stale() {
    let Ok(text) = run_tool(Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    for line in text.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(pid) = owner_pid(name) {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                log::warn!("lab: removing network namespace {name} left by a lab that died");
                let _ = run_tool(Command::new("ip").args(["netns", "del", name]));
            }
        }
    }
}

impl Netns {
    pub fn create() -> Result<Netns, LabError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run_tool(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns {
            name,
            taps: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String, LabError> {
        run_tool(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// A tap named `name` with `addr` (CIDR), up.
    pub fn add_tap(&mut self, name: &str, addr: &str) -> Result<(), LabError> {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        self.taps.push(name.to_string());
        self.ip(&["addr", "add", addr, "dev", name])?;
        self.ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// A command that runs inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A TCP connection made from inside the namespace (the socket stays in it, whichever
    /// thread then uses it).
    #[allow(dead_code)]
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        connect_in(&self.name, addr, timeout)
    }
}

/// A TCP connection made from inside the named namespace (see [`Netns::connect`]).
pub fn connect_in(name: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    {
        let path = format!("/run/netns/{name}");
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns on a valid namespace fd affects only this short-lived thread, which
            // makes one socket and exits.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&addr, timeout)
        })
        .join()
        .map_err(|_| std::io::Error::other("the connecting thread panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for tap in &self.taps {
            let _ = self.ip(&["link", "del", tap]);
        }
        if let Err(e) = run_tool(Command::new("ip").args(["netns", "del", &self.name])) {
            log::warn!("lab: removing network namespace {}: {e}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_read_from_the_name() {
        assert_eq!(owner_pid("enlight-lab-4242-0"), Some(4242));
        assert_eq!(owner_pid("enlight-lab-x-0"), None);
        assert_eq!(owner_pid("other-4242-0"), None);
    }
}
