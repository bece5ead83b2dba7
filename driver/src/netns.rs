//! Network namespaces and tap devices that enlight creates for itself, and removes again.
//!
//! Everything here lives in namespaces of its own: enlight never touches `eth0` or any interface,
//! address or route it did not create. A namespace is named `enl-<pid>-<seq>-<role>` (the pid of
//! the process that made it), so that
//! - a guard ([`Netns`], [`Tap`], [`NetPair`]) removes what it created when it is dropped, and
//! - [`remove_leftovers`] removes the namespaces of an earlier process that was killed before its
//!   guards ran (SIGKILL), without disturbing those of processes still running.
//!
//! Taps are created *inside* their namespace: a helper thread enters the namespace with
//! `setns(2)` (which changes only that thread), opens `/dev/net/tun` there and asks for an
//! `IFF_TAP | IFF_NO_PI` device, so the tap never exists in the caller's namespace. A tap lives
//! as long as its file descriptor; the namespace goes when its bind mount in `/run/netns` is
//! removed and the last descriptor into it is closed. Addresses and links are set with
//! iproute2's `ip -n` (netlink without writing netlink by hand).
//!
//! The emulated NIC and the synthetic NIC share this module: [`NetPair::create`] makes the usual
//! layout (a "guest" namespace and a "host" namespace, one tap in each, addresses in one /24) and
//! [`Tap`] implements [`FrameIo`](crate::nic::FrameIo), the backend both NICs read and write.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace enlight creates.
pub const NETNS_PREFIX: &str = "enl-";
/// Where iproute2 keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// `_IOW('T', 202, int)`: libc does not export it.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Longest interface name (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// Namespace and tap errors.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A name that would not make a namespace or interface name.
    #[error("invalid name {0:?}: {1}")]
    BadName(String, &'static str),
    /// A system call failed.
    #[error("{what}: {source}")]
    Os { what: String, source: io::Error },
    /// `ip` could not run or failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    /// The output of `ip` did not parse.
    #[error("unexpected output of `ip {args}`: {detail}")]
    IpOutput { args: String, detail: String },
}

fn os(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Os { what, source }
}

static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);

fn check_label(label: &str) -> Result<(), NetError> {
    if label.is_empty() || label.len() > 24 {
        return Err(NetError::BadName(label.into(), "use 1 to 24 characters"));
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(NetError::BadName(label.into(), "use only [A-Za-z0-9_]"));
    }
    Ok(())
}

/// Checks an interface name (1-15 characters, no '/', ':' or whitespace).
pub fn check_ifname(name: &str) -> Result<(), NetError> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        return Err(NetError::BadName(name.into(), "use 1 to 15 characters"));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || !b.is_ascii_graphic())
    {
        return Err(NetError::BadName(
            name.into(),
            "no '/', ':', whitespace or non-ASCII",
        ));
    }
    Ok(())
}

/// The pid a namespace name of ours carries (`enl-<pid>-...`), if it is one of ours.
pub fn owner_pid(netns_name: &str) -> Option<u32> {
    let rest = netns_name.strip_prefix(NETNS_PREFIX)?;
    rest.split('-').next()?.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Runs `ip` with `args`, returning its stdout.
fn ip(args: &[&str]) -> Result<String, NetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetError::Ip {
            args: args.join(" "),
            stderr: format!("cannot run ip (install iproute2): {e}"),
        })?;
    if !out.status.success() {
        return Err(NetError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes the namespaces named `enl-<pid>-...` whose process is gone (left behind by a run that
/// was killed before its guards ran). Namespaces of live processes, and anything not named by us,
/// are left alone. Returns the names removed.
pub fn remove_leftovers() -> Result<Vec<String>, NetError> {
    let dir = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(os(format!("reading {NETNS_RUN_DIR}"))(e)),
    };
    let mut removed = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        if let Err(e) = ip(&["netns", "delete", &name]) {
            // Another process removing the same leftovers at the same moment got there first.
            if Path::new(NETNS_RUN_DIR).join(&name).exists() {
                return Err(e);
            }
            continue;
        }
        log::info!("removed leftover network namespace {name} of dead process {pid}");
        removed.push(name);
    }
    removed.sort();
    Ok(removed)
}

/// Names of the namespaces of ours that exist now (for tests and `enlight nic --cleanup`).
pub fn list_ours() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(NETNS_RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| owner_pid(n).is_some())
        .collect();
    v.sort();
    v
}

/// A network namespace created by us; deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `enl-<pid>-<seq>-<role>`. `role` is `[A-Za-z0-9_]{1,24}`.
    pub fn create(role: &str) -> Result<Netns, NetError> {
        check_label(role)?;
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NETNS_PREFIX}{}-{seq}-{role}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of its bind mount.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `ip -n <ns> <args>`, returning stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Writes a sysctl under `/proc/sys/net/` as seen from inside the namespace (e.g.
    /// `ipv6/conf/all/disable_ipv6`).
    pub fn set_net_sysctl(&self, key: &str, value: &str) -> Result<(), NetError> {
        if key.contains("..") || key.starts_with('/') {
            return Err(NetError::BadName(key.into(), "a relative key under net/"));
        }
        let path = format!("/proc/sys/net/{key}");
        let value = value.to_string();
        self.in_namespace(move || std::fs::write(&path, &value).map_err(os(path)))
    }

    /// Runs `f` on a helper thread that has entered this namespace (only that thread does).
    pub fn in_namespace<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, NetError> + Send + 'static,
    ) -> Result<T, NetError> {
        let path = self.path();
        std::thread::Builder::new()
            .name("enl-setns".into())
            .spawn(move || {
                let ns = std::fs::File::open(&path)
                    .map_err(os(format!("opening {}", path.display())))?;
                // SAFETY: setns on a namespace fd we opened; it changes only this thread's
                // network namespace, and the thread ends after `f`.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(os("setns(CLONE_NEWNET)")(io::Error::last_os_error()));
                }
                f()
            })
            .map_err(os("spawning the setns thread"))?
            .join()
            .map_err(|_| NetError::Os {
                what: "setns thread".into(),
                source: io::Error::other("panicked"),
            })?
    }

    /// Creates a tap `ifname` (`IFF_TAP | IFF_NO_PI`, non-blocking) inside this namespace.
    /// The device disappears when the returned [`Tap`] is dropped.
    pub fn create_tap(&self, ifname: &str) -> Result<Tap, NetError> {
        check_ifname(ifname)?;
        let name = ifname.to_string();
        let fd = self.in_namespace(move || open_tap(&name))?;
        Ok(Tap {
            fd,
            ifname: ifname.to_string(),
            netns: self.name.clone(),
        })
    }

    /// Reads the kernel's counters of `dev` in this namespace (`ip -s -j link show`).
    pub fn link_stats(&self, dev: &str) -> Result<LinkStats, NetError> {
        check_ifname(dev)?;
        let out = self.ip(&["-s", "-j", "link", "show", "dev", dev])?;
        LinkStats::parse_ip_json(&out).map_err(|detail| NetError::IpOutput {
            args: format!("-n {} -s -j link show dev {dev}", self.name),
            detail,
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            log::warn!("removing network namespace {}: {e}", self.name);
        }
    }
}

fn open_tap(ifname: &str) -> Result<OwnedFd, NetError> {
    let path = CString::new("/dev/net/tun").expect("no NUL");
    // SAFETY: open(2) with a valid C string; we own the fd on success.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(os("opening /dev/net/tun")(io::Error::last_os_error()));
    }
    // SAFETY: fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: 16 bytes of name, then a union whose first member we use is `short flags`.
    let mut ifr = [0u8; 40];
    ifr[..ifname.len()].copy_from_slice(ifname.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq, which ifr is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) } != 0 {
        return Err(os(format!("TUNSETIFF {ifname}"))(io::Error::last_os_error()));
    }
    Ok(fd)
}

/// A tap device created by us; the device goes when this is dropped.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    ifname: String,
    netns: String,
}

impl Tap {
    /// Interface name (inside its namespace).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Name of the namespace the tap lives in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The tap's file descriptor (non-blocking; readable when a frame waits).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one frame the kernel sent out through the tap; `Ok(None)` if none waits.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: read into a buffer we own, of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        }
    }

    /// Injects one frame into the kernel as if it arrived on the wire.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: write from a slice we hold, of its length.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The kernel's counters of one link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    /// Frames the kernel received on the link (for a tap: frames written to its fd).
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames received and dropped.
    pub rx_dropped: u64,
    /// Frames the kernel sent on the link (for a tap: frames queued for its fd).
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Frames dropped on the way out (for a tap: its queue was full).
    pub tx_dropped: u64,
}

impl LinkStats {
    /// Parses the output of `ip -s -j link show dev X`.
    pub fn parse_ip_json(text: &str) -> Result<LinkStats, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let link = v.get(0).ok_or("no link in the output")?;
        let stats = link.get("stats64").ok_or("no stats64")?;
        let field = |dir: &str, key: &str| -> Result<u64, String> {
            stats
                .get(dir)
                .and_then(|d| d.get(key))
                .and_then(|x| x.as_u64())
                .ok_or_else(|| format!("no stats64.{dir}.{key}"))
        };
        Ok(LinkStats {
            rx_packets: field("rx", "packets")?,
            rx_bytes: field("rx", "bytes")?,
            rx_dropped: field("rx", "dropped")?,
            tx_packets: field("tx", "packets")?,
            tx_bytes: field("tx", "bytes")?,
            tx_dropped: field("tx", "dropped")?,
        })
    }
}

/// Addresses of a [`NetPair`]: the guest tap is `.1`, the host tap `.2` of a /24. Each pair has
/// namespaces of its own, so every pair can use the same addresses.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// See [`GUEST_IP`].
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Prefix length of the pair's subnet.
pub const PREFIX_LEN: u8 = 24;

/// Two namespaces with one tap each: the "guest" side and the "host" side of a NIC. A NIC that
/// carries frames between the two taps connects the namespaces, and nothing else does.
///
/// Field order is drop order: the taps close before their namespaces are deleted.
#[derive(Debug)]
pub struct NetPair {
    /// Tap in the guest namespace (`enl-g`, address [`GUEST_IP`]).
    pub guest_tap: Tap,
    /// Tap in the host namespace (`enl-h`, address [`HOST_IP`]).
    pub host_tap: Tap,
    /// The guest namespace.
    pub guest: Netns,
    /// The host namespace.
    pub host: Netns,
    /// MTU of both taps.
    pub mtu: u32,
}

impl NetPair {
    /// Interface name of the guest tap.
    pub const GUEST_IF: &'static str = "enl-g";
    /// Interface name of the host tap.
    pub const HOST_IF: &'static str = "enl-h";

    /// Creates `enl-<pid>-<seq>-<label>_g` and `..._h`, a tap in each with its address and MTU,
    /// links up, IPv6 off (so that only the traffic a test makes crosses the NIC). Removes the
    /// leftovers of dead processes first.
    pub fn create(label: &str, mtu: u32) -> Result<NetPair, NetError> {
        check_label(label)?;
        if !(68..=65_535).contains(&mtu) {
            return Err(NetError::BadName(mtu.to_string(), "MTU must be 68..=65535"));
        }
        if label.len() > 22 {
            return Err(NetError::BadName(label.into(), "use 1 to 22 characters"));
        }
        remove_leftovers()?;
        let guest = Netns::create(&format!("{label}_g"))?;
        let host = Netns::create(&format!("{label}_h"))?;
        let guest_tap = Self::side(&guest, Self::GUEST_IF, GUEST_IP, mtu)?;
        let host_tap = Self::side(&host, Self::HOST_IF, HOST_IP, mtu)?;
        Ok(NetPair {
            guest_tap,
            host_tap,
            guest,
            host,
            mtu,
        })
    }

    fn side(ns: &Netns, ifname: &str, addr: Ipv4Addr, mtu: u32) -> Result<Tap, NetError> {
        for key in [
            "ipv6/conf/all/disable_ipv6",
            "ipv6/conf/default/disable_ipv6",
        ] {
            // A kernel without IPv6 has no such files, and then nothing to silence.
            if let Err(e) = ns.set_net_sysctl(key, "1") {
                log::debug!("{}: {key}: {e}", ns.name());
            }
        }
        let tap = ns.create_tap(ifname)?;
        let cidr = format!("{addr}/{PREFIX_LEN}");
        let mtu = mtu.to_string();
        ns.ip(&["link", "set", "dev", ifname, "mtu", &mtu])?;
        ns.ip(&["addr", "add", &cidr, "dev", ifname])?;
        ns.ip(&["link", "set", "dev", ifname, "up"])?;
        Ok(tap)
    }

    /// Both namespaces' names.
    pub fn names(&self) -> [&str; 2] {
        [self.guest.name(), self.host.name()]
    }

    /// Takes the taps out (for threads that own them) and leaves the namespace guards.
    pub fn split(self) -> (Tap, Tap, NetNamespaces) {
        (
            self.guest_tap,
            self.host_tap,
            NetNamespaces {
                guest: self.guest,
                host: self.host,
            },
        )
    }
}

/// The two namespaces of a [`NetPair`] whose taps were taken by [`NetPair::split`].
#[derive(Debug)]
pub struct NetNamespaces {
    /// The guest namespace.
    pub guest: Netns,
    /// The host namespace.
    pub host: Netns,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_ifname("enl-g").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("0123456789abcdef").is_err());
        assert!(check_label("nic0").is_ok());
        assert!(check_label("a-b").is_err());
        assert!(check_label("").is_err());
    }

    #[test]
    fn owner_pid_only_for_our_names() {
        assert_eq!(owner_pid("enl-1234-0-nic_g"), Some(1234));
        assert_eq!(owner_pid("enl-x-0"), None);
        assert_eq!(owner_pid("other-1234"), None);
        assert_eq!(owner_pid("enl-"), None);
    }

    #[test]
    fn parses_ip_link_json() {
        let text = r#"[{"ifindex":2,"ifname":"enl-g","stats64":{"rx":{"bytes":100,"packets":2,"errors":0,"dropped":1},"tx":{"bytes":300,"packets":4,"errors":0,"dropped":0}}}]"#;
        let s = LinkStats::parse_ip_json(text).unwrap();
        assert_eq!(
            s,
            LinkStats {
                rx_packets: 2,
                rx_bytes: 100,
                rx_dropped: 1,
                tx_packets: 4,
                tx_bytes: 300,
                tx_dropped: 0
            }
        );
        assert!(LinkStats::parse_ip_json("[]").is_err());
        assert!(LinkStats::parse_ip_json("nonsense").is_err());
    }
}
