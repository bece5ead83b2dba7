//! The ethtool netlink `monitor` multicast group: the kernel sends a notification
//! (`ETHTOOL_MSG_COALESCE_NTF`, `ETHTOOL_MSG_RINGS_NTF`, ...) to every member of the group after
//! each settings change that changed something, whoever made it (`ethtool -C`/`-G`, another
//! daemon, enlight itself). enlightd listens there so an administrator's change of a knob the
//! tuner set is seen at once, not only at the next tick's re-read: the tuner pins the device
//! through the same path as a change found by the re-read
//! ([`crate::tuner::backend::SettingsBackend::notified`], [`crate::tuner::shell`]).
//!
//! Which change was enlight's own is decided by the backend that made it (it keeps the values
//! it wrote whose notification it has not seen yet: [`crate::kernel::backend::judge_notice`]);
//! this module only turns the notifications into [`KnobNotice`]s, in enlight's knob names.
//!
//! Framing, the family and group lookup and the socket are the rust-netlink crates', and the
//! coalescing and ring attributes are the `ethtool` crate's (a notification carries the same
//! attributes as the GET reply). Only the notification command numbers are written here: the
//! crate knows the GET replies alone. Sysfs writes (NAPI, block queues) and netdev `napi-set`
//! send no notification; the per-tick re-read covers those.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ethtool::{EthtoolCoalesceAttr, EthtoolHeader, EthtoolRingAttr};
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NetlinkMessage, NetlinkPayload, NlaBuffer, NlasIterator,
    Parseable, ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket};

use super::ethtool::{Ethtool, EthtoolError};
use crate::tuner::backend::KnobNotice;

/// `ETHTOOL_MSG_RINGS_NTF` (kernel → user, include/uapi/linux/ethtool_netlink.h).
pub const ETHTOOL_MSG_RINGS_NTF: u8 = 17;
/// `ETHTOOL_MSG_COALESCE_NTF`.
pub const ETHTOOL_MSG_COALESCE_NTF: u8 = 21;

/// Why the monitor could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("ethtool monitor: {0}")]
    Ethtool(#[from] EthtoolError),
    #[error("ethtool monitor socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("ethtool monitor: entering network namespace: {0}")]
    Netns(String),
}

/// One message of the monitor group: the command and the attributes of the settings it is
/// about (coalescing or rings; other notifications carry none here).
#[derive(Debug, Clone)]
pub enum Notification {
    Coalesce(Vec<EthtoolCoalesceAttr>),
    Rings(Vec<EthtoolRingAttr>),
    /// A notification about something enlight does not set (link modes, features, ...).
    Other(u8),
}

impl GenlFamily for Notification {
    fn family_name() -> &'static str {
        "ethtool"
    }
    fn version(&self) -> u8 {
        1
    }
    fn command(&self) -> u8 {
        match self {
            Notification::Coalesce(_) => ETHTOOL_MSG_COALESCE_NTF,
            Notification::Rings(_) => ETHTOOL_MSG_RINGS_NTF,
            Notification::Other(cmd) => *cmd,
        }
    }
}

impl Emitable for Notification {
    fn buffer_len(&self) -> usize {
        match self {
            Notification::Coalesce(n) => n.as_slice().buffer_len(),
            Notification::Rings(n) => n.as_slice().buffer_len(),
            Notification::Other(_) => 0,
        }
    }
    fn emit(&self, buffer: &mut [u8]) {
        match self {
            Notification::Coalesce(n) => n.as_slice().emit(buffer),
            Notification::Rings(n) => n.as_slice().emit(buffer),
            Notification::Other(_) => {}
        }
    }
}

impl ParseableParametrized<[u8], GenlHeader> for Notification {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        fn all<T>(buf: &[u8]) -> Result<Vec<T>, DecodeError>
        where
            T: for<'a> Parseable<NlaBuffer<&'a [u8]>>,
        {
            NlasIterator::new(buf)
                .map(|nla| T::parse(&nla?))
                .collect::<Result<Vec<T>, DecodeError>>()
        }
        Ok(match header.cmd {
            ETHTOOL_MSG_COALESCE_NTF => Notification::Coalesce(all(buf)?),
            ETHTOOL_MSG_RINGS_NTF => Notification::Rings(all(buf)?),
            cmd => {
                // Checked to be attributes, then dropped.
                all::<DefaultNla>(buf)?;
                Notification::Other(cmd)
            }
        })
    }
}

/// The interface a notification's header names (index, name).
fn header_of(h: &[EthtoolHeader]) -> (u32, String) {
    let mut index = 0;
    let mut name = String::new();
    for a in h {
        match a {
            EthtoolHeader::DevIndex(i) => index = *i,
            EthtoolHeader::DevName(n) => name = n.clone(),
            _ => {}
        }
    }
    (index, name)
}

/// The notice of one notification, in enlight's knob names (those of
/// [`super::knobs::nic`]); `None` for notifications about settings enlight does not set. A pure
/// function.
pub fn notice_of(n: &Notification) -> Option<KnobNotice> {
    let mut knobs = Vec::new();
    let (what, (ifindex, device)) = match n {
        Notification::Coalesce(attrs) => {
            let mut header = (0, String::new());
            for a in attrs {
                let (name, v) = match a {
                    EthtoolCoalesceAttr::Header(h) => {
                        header = header_of(h);
                        continue;
                    }
                    EthtoolCoalesceAttr::RxUsecs(v) => ("rx_usecs", *v as u64),
                    EthtoolCoalesceAttr::RxMaxFrames(v) => ("rx_frames", *v as u64),
                    EthtoolCoalesceAttr::TxUsecs(v) => ("tx_usecs", *v as u64),
                    EthtoolCoalesceAttr::TxMaxFrames(v) => ("tx_frames", *v as u64),
                    EthtoolCoalesceAttr::UseAdaptiveRx(v) => ("adaptive_rx", *v as u64),
                    EthtoolCoalesceAttr::UseAdaptiveTx(v) => ("adaptive_tx", *v as u64),
                    _ => continue,
                };
                knobs.push((name.to_string(), v));
            }
            ("coalescing", header)
        }
        Notification::Rings(attrs) => {
            let mut header = (0, String::new());
            for a in attrs {
                let (name, v) = match a {
                    EthtoolRingAttr::Header(h) => {
                        header = header_of(h);
                        continue;
                    }
                    EthtoolRingAttr::Rx(v) => ("rx_ring", *v as u64),
                    EthtoolRingAttr::Tx(v) => ("tx_ring", *v as u64),
                    _ => continue,
                };
                knobs.push((name.to_string(), v));
            }
            ("rings", header)
        }
        Notification::Other(_) => return None,
    };
    (!device.is_empty()).then(|| KnobNotice {
        device,
        ifindex,
        what: what.into(),
        knobs,
    })
}

/// The notices in one datagram of the monitor socket (several messages may share one);
/// messages of other families, and those that do not parse, are skipped.
pub fn notices_in(family: u16, datagram: &[u8]) -> Vec<KnobNotice> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= datagram.len() {
        let len = u32::from_ne_bytes(datagram[at..at + 4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(datagram[at + 4..at + 6].try_into().expect("2 bytes"));
        if len < 16 || at + len > datagram.len() {
            break;
        }
        let bytes = &datagram[at..at + len];
        at += (len + 3) & !3;
        if kind != family {
            continue;
        }
        match NetlinkMessage::<GenlMessage<Notification>>::deserialize(bytes) {
            Ok(NetlinkMessage {
                payload: NetlinkPayload::InnerMessage(m),
                ..
            }) => out.extend(notice_of(&m.payload)),
            Ok(_) => {}
            Err(e) => log::debug!("ethtool monitor: a notification did not parse: {e}"),
        }
    }
    out
}

/// A member of the ethtool `monitor` group of one network namespace.
pub struct Monitor {
    socket: Socket,
    family: u16,
    netns: Option<PathBuf>,
}

impl Monitor {
    /// Joins the group in the network namespace at `netns` (`None`: the daemon's own). The
    /// socket stays in that namespace whichever thread reads it.
    pub fn open(netns: Option<&Path>) -> Result<Monitor, MonitorError> {
        let open = || -> Result<(Socket, u16), MonitorError> {
            let (family, group) = Ethtool::open()?.monitor_group()?;
            let mut socket = Socket::new(NETLINK_GENERIC)?;
            socket.bind_auto()?;
            socket.add_membership(group)?;
            // Room for a burst (a driver reset notifies rings, channels and coalescing at
            // once); an overflow is survivable, the tick's re-read still sees every change.
            socket.set_rx_buf_sz(1 << 20)?;
            Ok((socket, family))
        };
        let (socket, family) = super::netns::in_netns(netns, open)
            .map_err(|e| MonitorError::Netns(e.to_string()))??;
        // Wake every 200 ms so that a stopped listener's thread ends.
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: setsockopt on our own socket with a pointer to a live timeval of the size
        // passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Monitor {
            socket,
            family,
            netns: netns.map(Path::to_path_buf),
        })
    }

    /// The notices of the next datagram; empty after 200 ms without one.
    pub fn recv(&mut self) -> Result<Vec<KnobNotice>, std::io::Error> {
        let mut buf: Vec<u8> = Vec::with_capacity(65536);
        match self.socket.recv(&mut buf, 0) {
            Ok(n) => Ok(notices_in(self.family, &buf[..n])),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Vec::new())
            }
            // ENOBUFS: notifications were dropped; the re-read every tick covers them.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                log::warn!(
                    "ethtool monitor: notifications lost (receive buffer full); the next tick's \
                     re-read still sees every change"
                );
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads notices on a thread of its own and sends each to `tx` until the returned
    /// [`Listener`] is dropped (or `tx`'s receiver is).
    pub fn spawn(
        mut self,
        tx: tokio::sync::mpsc::UnboundedSender<KnobNotice>,
    ) -> Result<Listener, MonitorError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let ns = self
            .netns
            .as_ref()
            .map(|p| format!(" (netns {})", p.display()))
            .unwrap_or_default();
        let thread = std::thread::Builder::new()
            .name("ethtool-monitor".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) && !tx.is_closed() {
                    match self.recv() {
                        Ok(notices) => {
                            for n in notices {
                                log::debug!(
                                    "ethtool monitor{ns}: {} of {}: {:?}",
                                    n.what,
                                    n.device,
                                    n.knobs
                                );
                                if tx.send(n).is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            log::warn!("ethtool monitor{ns}: {e}; listening stops (the tick's re-read goes on)");
                            return;
                        }
                    }
                }
            })?;
        Ok(Listener {
            stop,
            thread: Some(thread),
        })
    }
}

/// A running monitor thread; dropping it stops the thread (within 200 ms) and waits for it.
pub struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts listening in `netns` (`None`: here), sending notices to `tx`; `None` (logged) when
/// the kernel has no ethtool netlink: the tick's re-read is then the only way a change is seen.
pub fn listen(
    netns: Option<&Path>,
    tx: tokio::sync::mpsc::UnboundedSender<KnobNotice>,
) -> Option<Listener> {
    match Monitor::open(netns).and_then(|m| m.spawn(tx)) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("{e}: an admin's ethtool change is seen at the next tick only");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A COALESCE_NTF as the kernel sends it (header nest, then the driver's parameters),
    /// framed by the crates, and a RINGS_NTF in the same datagram: both become notices in
    /// enlight's knob names; another family's message is skipped.
    #[test]
    fn notifications_become_notices_in_enlights_knob_names() {
        let family = 0x1c;
        let frame = |n: Notification, family: u16| {
            let mut g = GenlMessage::from_payload(n);
            g.set_resolved_family_id(family);
            let mut m = NetlinkMessage::from(g);
            m.finalize();
            let mut buf = vec![0u8; m.buffer_len()];
            m.serialize(&mut buf);
            buf
        };
        let header = vec![
            EthtoolHeader::DevIndex(7),
            EthtoolHeader::DevName("tap0".into()),
        ];
        let mut datagram = frame(
            Notification::Coalesce(vec![
                EthtoolCoalesceAttr::Header(header.clone()),
                EthtoolCoalesceAttr::RxMaxFrames(24),
                EthtoolCoalesceAttr::UseAdaptiveRx(false),
                EthtoolCoalesceAttr::StatsBlockUsecs(0),
            ]),
            family,
        );
        datagram.extend(frame(
            Notification::Rings(vec![
                EthtoolRingAttr::Header(header.clone()),
                EthtoolRingAttr::Rx(512),
                EthtoolRingAttr::RxMax(4096),
                EthtoolRingAttr::Tx(256),
            ]),
            family,
        ));
        datagram.extend(frame(
            Notification::Coalesce(vec![EthtoolCoalesceAttr::RxMaxFrames(1)]),
            family + 1,
        ));
        let notices = notices_in(family, &datagram);
        assert_eq!(
            notices,
            [
                KnobNotice {
                    device: "tap0".into(),
                    ifindex: 7,
                    what: "coalescing".into(),
                    knobs: vec![("rx_frames".into(), 24), ("adaptive_rx".into(), 0)],
                },
                KnobNotice {
                    device: "tap0".into(),
                    ifindex: 7,
                    what: "rings".into(),
                    knobs: vec![("rx_ring".into(), 512), ("tx_ring".into(), 256)],
                },
            ]
        );
        // Other notifications (link modes: 5) carry nothing enlight sets.
        assert!(notices_in(family, &frame(Notification::Other(5), family)).is_empty());
        // A truncated datagram yields what parsed before the cut.
        assert_eq!(notices_in(family, &datagram[..datagram.len() - 3]).len(), 2);
    }
}
