//! NIC ring sizes and interrupt coalescing through the kernel's ethtool netlink API (the
//! `ethtool` generic netlink family, what `ethtool -g/-G/-c/-C` use).
//!
//! Framing, generic netlink and the socket come from the rust-netlink crates
//! (`netlink-packet-core`, `netlink-packet-generic`, `netlink-sys`), and the ring and coalescing
//! attributes (their numbers, parsing and emitting) from the `ethtool` crate. That crate sends
//! only GET requests, so requests are a small generic-netlink payload of our own ([`Request`])
//! built from its attribute types; replies parse with its `EthtoolMessage`.
//!
//! Every write reads first: ring sizes are checked against the driver's maximums, and a
//! coalescing knob the driver does not report is refused as [`EthtoolError::Unsupported`]
//! naming the driver, before anything is sent.

use std::ffi::CString;
use std::os::fd::AsRawFd;

use ethtool::{EthtoolAttr, EthtoolCoalesceAttr, EthtoolHeader, EthtoolMessage, EthtoolRingAttr};
use netlink_packet_core::{
    Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};
use serde::{Deserialize, Serialize};

/// `ETHTOOL_MSG_RINGS_SET` (user → kernel).
const ETHTOOL_MSG_RINGS_SET: u8 = 16;
/// `ETHTOOL_MSG_COALESCE_SET` (user → kernel).
const ETHTOOL_MSG_COALESCE_SET: u8 = 20;
/// `NETLINK_CAP_ACK`: errors echo only the request's header, so the extended-ack attributes
/// start at a known offset.
const NETLINK_CAP_ACK: libc::c_int = 10;
/// `NETLINK_EXT_ACK`: the kernel says why in words.
const NETLINK_EXT_ACK: libc::c_int = 11;
/// `NLMSGERR_ATTR_MSG`.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Ring sizes (descriptors) and the driver's maximums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rings {
    pub rx: u32,
    pub tx: u32,
    pub rx_max: u32,
    pub tx_max: u32,
}

/// Interrupt coalescing; `None` = the driver does not support the knob.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coalesce {
    pub rx_usecs: Option<u32>,
    pub rx_frames: Option<u32>,
    pub tx_usecs: Option<u32>,
    pub tx_frames: Option<u32>,
    pub adaptive_rx: Option<bool>,
    pub adaptive_tx: Option<bool>,
}

/// A change of some NIC knobs; `None` leaves a knob as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicPatch {
    pub rx_ring: Option<u32>,
    pub tx_ring: Option<u32>,
    pub rx_usecs: Option<u32>,
    pub rx_frames: Option<u32>,
    pub tx_usecs: Option<u32>,
    pub tx_frames: Option<u32>,
    pub adaptive_rx: Option<bool>,
    pub adaptive_tx: Option<bool>,
}

impl NicPatch {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == NicPatch::default()
    }

    /// Whether it touches coalescing.
    fn has_coalesce(&self) -> bool {
        self.rx_usecs.is_some()
            || self.rx_frames.is_some()
            || self.tx_usecs.is_some()
            || self.tx_frames.is_some()
            || self.adaptive_rx.is_some()
            || self.adaptive_tx.is_some()
    }
}

/// Why an ethtool request failed.
#[derive(Debug, thiserror::Error)]
pub enum EthtoolError {
    /// No interface of that name in this network namespace.
    #[error("no network interface {0}")]
    NoSuchDevice(String),
    /// The driver lacks the knob (or all of ring/coalescing support).
    #[error("{what} on {iface}: not supported by driver {driver}")]
    Unsupported {
        iface: String,
        driver: String,
        what: String,
    },
    /// A value outside what the driver allows.
    #[error(
        "{iface}: {knob} = {value} is out of range (the driver {driver} allows {min}..={max})"
    )]
    OutOfRange {
        iface: String,
        driver: String,
        knob: &'static str,
        value: u32,
        min: u32,
        max: u32,
    },
    /// The kernel refused the request.
    #[error("{iface}: {request}: {message} (errno {errno})")]
    Kernel {
        iface: String,
        request: &'static str,
        errno: i32,
        message: String,
    },
    /// The netlink socket failed.
    #[error("ethtool netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// A reply did not parse.
    #[error("ethtool netlink reply: {0}")]
    Decode(String),
}

/// A request of the ethtool family (GET or SET), carrying the `ethtool` crate's attributes.
#[derive(Debug, Clone)]
pub struct Request {
    cmd: u8,
    nlas: Vec<EthtoolAttr>,
}

impl GenlFamily for Request {
    fn family_name() -> &'static str {
        "ethtool"
    }
    fn version(&self) -> u8 {
        1
    }
    fn command(&self) -> u8 {
        self.cmd
    }
}

impl Emitable for Request {
    fn buffer_len(&self) -> usize {
        self.nlas.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.nlas.as_slice().emit(buffer)
    }
}

/// A connection to the ethtool netlink family of the calling thread's network namespace.
pub struct Ethtool {
    socket: Socket,
    family: u16,
    seq: u32,
}

impl Ethtool {
    /// Opens a generic netlink socket and resolves the ethtool family.
    pub fn open() -> Result<Ethtool, EthtoolError> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        for opt in [NETLINK_CAP_ACK, NETLINK_EXT_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt on our own socket with a pointer to a live c_int of the size
            // passed.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_NETLINK,
                    opt,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        let mut me = Ethtool {
            socket,
            family: 0,
            seq: 0,
        };
        me.family = me.resolve_family()?;
        Ok(me)
    }

    /// The generic netlink controller's description of the ethtool family.
    fn get_family(&mut self) -> Result<Vec<GenlMessage<GenlCtrl>>, EthtoolError> {
        let mut msg = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName("ethtool".into())],
        });
        msg.finalize();
        self.request(msg, NLM_F_REQUEST, "", "resolve family")
    }

    fn resolve_family(&mut self) -> Result<u16, EthtoolError> {
        for r in self.get_family()? {
            for nla in r.payload.nlas {
                if let GenlCtrlAttrs::FamilyId(id) = nla {
                    return Ok(id);
                }
            }
        }
        Err(EthtoolError::Decode(
            "the kernel has no ethtool netlink family (CONFIG_ETHTOOL_NETLINK)".into(),
        ))
    }

    /// The family's id and the id of its `monitor` multicast group, where the kernel sends a
    /// notification (`ETHTOOL_MSG_*_NTF`) of every settings change, whoever made it.
    pub fn monitor_group(&mut self) -> Result<(u16, u32), EthtoolError> {
        use netlink_packet_generic::ctrl::nlas::McastGrpAttrs;
        let group = self
            .get_family()?
            .into_iter()
            .flat_map(|r| r.payload.nlas)
            .filter_map(|nla| match nla {
                GenlCtrlAttrs::McastGroups(groups) => Some(groups),
                _ => None,
            })
            .flatten()
            .find_map(|g| {
                let named = g
                    .iter()
                    .any(|a| matches!(a, McastGrpAttrs::Name(n) if n == "monitor"));
                g.iter().find_map(|a| match a {
                    McastGrpAttrs::Id(id) if named => Some(*id),
                    _ => None,
                })
            })
            .ok_or_else(|| {
                EthtoolError::Decode("the ethtool family has no monitor multicast group".into())
            })?;
        Ok((self.family, group))
    }

    /// Sends one request and collects its replies until the ACK (or the one reply, for a GET
    /// without ACK).
    fn request<Req, Rep>(
        &mut self,
        payload: Req,
        flags: u16,
        iface: &str,
        what: &'static str,
    ) -> Result<Vec<Rep>, EthtoolError>
    where
        Req: netlink_packet_core::NetlinkSerializable + std::fmt::Debug,
        Rep: netlink_packet_core::NetlinkDeserializable + std::fmt::Debug,
    {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut replies = Vec::new();
        let expect_ack = flags & NLM_F_ACK != 0;
        loop {
            let mut rbuf: Vec<u8> = Vec::with_capacity(65536);
            let n = self.socket.recv(&mut rbuf, 0)?;
            let mut at = 0;
            while at + 16 <= n {
                let len =
                    u32::from_ne_bytes(rbuf[at..at + 4].try_into().expect("4 bytes")) as usize;
                if len < 16 || at + len > n {
                    return Err(EthtoolError::Decode(format!("bad message length {len}")));
                }
                let bytes = &rbuf[at..at + len];
                at += (len + 3) & !3;
                let parsed = NetlinkMessage::<Rep>::deserialize(bytes)
                    .map_err(|e| EthtoolError::Decode(e.to_string()))?;
                if parsed.header.sequence_number != self.seq {
                    continue;
                }
                match parsed.payload {
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !expect_ack {
                            return Ok(replies);
                        }
                    }
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(replies),
                        Some(code) => {
                            let errno = -code.get();
                            return Err(kernel_error(iface, what, errno, &e.header));
                        }
                    },
                    NetlinkPayload::Done(_) => return Ok(replies),
                    _ => {}
                }
            }
        }
    }

    fn get(
        &mut self,
        iface: &str,
        cmd: u8,
        attr: EthtoolAttr,
        what: &'static str,
    ) -> Result<Vec<EthtoolAttr>, EthtoolError> {
        let mut msg = GenlMessage::from_payload(Request {
            cmd,
            nlas: vec![attr],
        });
        msg.set_resolved_family_id(self.family);
        msg.finalize();
        let replies: Vec<GenlMessage<EthtoolMessage>> =
            self.request(msg, NLM_F_REQUEST, iface, what)?;
        Ok(replies.into_iter().flat_map(|r| r.payload.nlas).collect())
    }

    /// Ring sizes of `iface` and the driver's maximums.
    pub fn rings(&mut self, iface: &str) -> Result<Rings, EthtoolError> {
        const ETHTOOL_MSG_RINGS_GET: u8 = 15;
        let header = EthtoolAttr::Ring(EthtoolRingAttr::Header(vec![EthtoolHeader::DevName(
            iface.into(),
        )]));
        let nlas = self.get(iface, ETHTOOL_MSG_RINGS_GET, header, "get rings")?;
        let mut r = Rings {
            rx: 0,
            tx: 0,
            rx_max: 0,
            tx_max: 0,
        };
        for nla in nlas {
            match nla {
                EthtoolAttr::Ring(EthtoolRingAttr::Rx(v)) => r.rx = v,
                EthtoolAttr::Ring(EthtoolRingAttr::Tx(v)) => r.tx = v,
                EthtoolAttr::Ring(EthtoolRingAttr::RxMax(v)) => r.rx_max = v,
                EthtoolAttr::Ring(EthtoolRingAttr::TxMax(v)) => r.tx_max = v,
                _ => {}
            }
        }
        Ok(r)
    }

    /// Coalescing of `iface`; knobs the driver does not support are `None`.
    pub fn coalesce(&mut self, iface: &str) -> Result<Coalesce, EthtoolError> {
        const ETHTOOL_MSG_COALESCE_GET: u8 = 19;
        let header =
            EthtoolAttr::Coalesce(EthtoolCoalesceAttr::Header(vec![EthtoolHeader::DevName(
                iface.into(),
            )]));
        let nlas = self.get(iface, ETHTOOL_MSG_COALESCE_GET, header, "get coalescing")?;
        let mut c = Coalesce::default();
        for nla in nlas {
            if let EthtoolAttr::Coalesce(a) = nla {
                match a {
                    EthtoolCoalesceAttr::RxUsecs(v) => c.rx_usecs = Some(v),
                    EthtoolCoalesceAttr::RxMaxFrames(v) => c.rx_frames = Some(v),
                    EthtoolCoalesceAttr::TxUsecs(v) => c.tx_usecs = Some(v),
                    EthtoolCoalesceAttr::TxMaxFrames(v) => c.tx_frames = Some(v),
                    EthtoolCoalesceAttr::UseAdaptiveRx(v) => c.adaptive_rx = Some(v),
                    EthtoolCoalesceAttr::UseAdaptiveTx(v) => c.adaptive_tx = Some(v),
                    _ => {}
                }
            }
        }
        Ok(c)
    }

    /// Ring sizes and coalescing together; a driver without either reports it as `None`.
    pub fn settings(&mut self, iface: &str) -> Result<NicSettings, EthtoolError> {
        let rings = match self.rings(iface) {
            Ok(r) => Some(r),
            Err(EthtoolError::Unsupported { .. }) => None,
            Err(e) => return Err(e),
        };
        let coalesce = match self.coalesce(iface) {
            Ok(c) => Some(c),
            Err(EthtoolError::Unsupported { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(NicSettings { rings, coalesce })
    }

    /// Applies `patch`, after checking every knob against what the driver reports: ring sizes
    /// within 1..=max, coalescing knobs the driver has. Nothing is sent if a check fails.
    /// Returns the settings in force afterwards.
    pub fn apply(&mut self, iface: &str, patch: &NicPatch) -> Result<NicSettings, EthtoolError> {
        let driver = driver_name(iface);
        if patch.rx_ring.is_some() || patch.tx_ring.is_some() {
            let rings = self.rings(iface)?;
            for (knob, value, max) in [
                ("rx_ring", patch.rx_ring, rings.rx_max),
                ("tx_ring", patch.tx_ring, rings.tx_max),
            ] {
                if let Some(v) = value {
                    if v == 0 || v > max {
                        return Err(EthtoolError::OutOfRange {
                            iface: iface.into(),
                            driver: driver.clone(),
                            knob,
                            value: v,
                            min: 1,
                            max,
                        });
                    }
                }
            }
            let mut nlas = vec![EthtoolRingAttr::Header(vec![EthtoolHeader::DevName(
                iface.into(),
            )])];
            if let Some(v) = patch.rx_ring {
                nlas.push(EthtoolRingAttr::Rx(v));
            }
            if let Some(v) = patch.tx_ring {
                nlas.push(EthtoolRingAttr::Tx(v));
            }
            self.set(
                iface,
                ETHTOOL_MSG_RINGS_SET,
                nlas.into_iter().map(EthtoolAttr::Ring).collect(),
                "set rings",
            )?;
        }
        if patch.has_coalesce() {
            let current = self.coalesce(iface)?;
            let mut nlas = vec![EthtoolCoalesceAttr::Header(vec![EthtoolHeader::DevName(
                iface.into(),
            )])];
            let unsupported = |what: &str| EthtoolError::Unsupported {
                iface: iface.into(),
                driver: driver.clone(),
                what: what.into(),
            };
            type Knob = (
                &'static str,
                Option<u32>,
                Option<u32>,
                fn(u32) -> EthtoolCoalesceAttr,
            );
            let knobs: [Knob; 4] = [
                (
                    "rx-usecs",
                    patch.rx_usecs,
                    current.rx_usecs,
                    EthtoolCoalesceAttr::RxUsecs,
                ),
                (
                    "rx-frames",
                    patch.rx_frames,
                    current.rx_frames,
                    EthtoolCoalesceAttr::RxMaxFrames,
                ),
                (
                    "tx-usecs",
                    patch.tx_usecs,
                    current.tx_usecs,
                    EthtoolCoalesceAttr::TxUsecs,
                ),
                (
                    "tx-frames",
                    patch.tx_frames,
                    current.tx_frames,
                    EthtoolCoalesceAttr::TxMaxFrames,
                ),
            ];
            for (name, want, have, attr) in knobs {
                if let Some(v) = want {
                    if have.is_none() {
                        return Err(unsupported(&format!("coalescing {name}")));
                    }
                    nlas.push(attr(v));
                }
            }
            for (name, want, have, attr) in [
                (
                    "adaptive-rx",
                    patch.adaptive_rx,
                    current.adaptive_rx,
                    EthtoolCoalesceAttr::UseAdaptiveRx as fn(bool) -> EthtoolCoalesceAttr,
                ),
                (
                    "adaptive-tx",
                    patch.adaptive_tx,
                    current.adaptive_tx,
                    EthtoolCoalesceAttr::UseAdaptiveTx,
                ),
            ] {
                if let Some(v) = want {
                    if have.is_none() {
                        return Err(unsupported(&format!("coalescing {name}")));
                    }
                    nlas.push(attr(v));
                }
            }
            self.set(
                iface,
                ETHTOOL_MSG_COALESCE_SET,
                nlas.into_iter().map(EthtoolAttr::Coalesce).collect(),
                "set coalescing",
            )?;
        }
        self.settings(iface)
    }

    fn set(
        &mut self,
        iface: &str,
        cmd: u8,
        nlas: Vec<EthtoolAttr>,
        what: &'static str,
    ) -> Result<(), EthtoolError> {
        let mut msg = GenlMessage::from_payload(Request { cmd, nlas });
        msg.set_resolved_family_id(self.family);
        msg.finalize();
        let _: Vec<GenlMessage<EthtoolMessage>> =
            self.request(msg, NLM_F_REQUEST | NLM_F_ACK, iface, what)?;
        Ok(())
    }
}

/// Ring sizes and coalescing of one NIC (`None`: the driver has neither).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSettings {
    pub rings: Option<Rings>,
    pub coalesce: Option<Coalesce>,
}

/// Turns a netlink error into a typed one: "operation not supported" names the driver.
fn kernel_error(iface: &str, what: &'static str, errno: i32, echoed: &[u8]) -> EthtoolError {
    let message = ext_ack_message(echoed)
        .unwrap_or_else(|| std::io::Error::from_raw_os_error(errno).to_string());
    match errno {
        libc::ENODEV => EthtoolError::NoSuchDevice(iface.into()),
        libc::EOPNOTSUPP => EthtoolError::Unsupported {
            iface: iface.into(),
            driver: driver_name(iface),
            what: what
                .trim_start_matches("get ")
                .trim_start_matches("set ")
                .to_string(),
        },
        _ => EthtoolError::Kernel {
            iface: iface.into(),
            request: what,
            errno,
            message,
        },
    }
}

/// The extended-ack message of an error: with `NETLINK_CAP_ACK` the echo is the request's 16-byte
/// header, then attributes.
fn ext_ack_message(echoed: &[u8]) -> Option<String> {
    let mut at = 16;
    while at + 4 <= echoed.len() {
        let len = u16::from_ne_bytes([echoed[at], echoed[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([echoed[at + 2], echoed[at + 3]]) & 0x3fff;
        if len < 4 || at + len > echoed.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let s = &echoed[at + 4..at + len];
            let s = s.split(|b| *b == 0).next().unwrap_or(s);
            return Some(String::from_utf8_lossy(s).into_owned());
        }
        at += (len + 3) & !3;
    }
    None
}

/// `VIRTIO_NET_F_NOTF_COAL`: a virtio-net device that offers it takes coalescing commands.
const VIRTIO_NET_F_NOTF_COAL: usize = 53;

/// Whether a NIC's coalescing, as ethtool reports it, is fixed: the driver accepts only the
/// values it reports, so they are no knobs. `virtio_net` without `VIRTIO_NET_F_NOTF_COAL`
/// (QEMU before 8.x offers none) reports rx-frames 1 and rx-usecs 0 and refuses any other
/// value (`virtnet_coal_params_supported`: `EOPNOTSUPP` for usecs, `EINVAL` for frames); its
/// moderation is NAPI's. `features` is the virtio device's `features` file (one `0`/`1` per
/// feature bit); a virtio NIC whose features cannot be read is taken as fixed, the safe side.
pub fn coalescing_fixed(driver: &str, features: Option<&str>) -> bool {
    driver == "virtio_net"
        && features.and_then(|f| f.trim().as_bytes().get(VIRTIO_NET_F_NOTF_COAL).copied())
            != Some(b'1')
}

/// The virtio feature bits of NIC `iface` under `sysfs` (`class/net/<if>/device/features`,
/// the virtio device's), `None` for a NIC that is no virtio device.
pub fn virtio_features(sysfs: &std::path::Path, iface: &str) -> Option<String> {
    std::fs::read_to_string(sysfs.join("class/net").join(iface).join("device/features")).ok()
}

/// The driver of an interface as `ethtool -i` reports it (the `ETHTOOL_GDRVINFO` ioctl, which
/// every netdev answers, virtual ones included), or `unknown`.
pub fn driver_name(iface: &str) -> String {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    // struct ethtool_drvinfo: cmd, then driver[32] at byte 4; 196 bytes in all.
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    let Ok(name) = CString::new(iface) else {
        return "unknown".into();
    };
    if name.as_bytes().len() >= libc::IFNAMSIZ {
        return "unknown".into();
    }
    // struct ifreq: the name, then a union whose ifr_data is the pointer.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut u8,
        _pad: [u8; 16],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: info.as_mut_ptr(),
        _pad: [0; 16],
    };
    req.name[..name.as_bytes().len()].copy_from_slice(name.as_bytes());
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return "unknown".into();
    }
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at a drvinfo buffer of the size the
    // kernel writes; both outlive the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut IfReq) };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return "unknown".into();
    }
    let driver = &info[4..36];
    let end = driver.iter().position(|b| *b == 0).unwrap_or(32);
    String::from_utf8_lossy(&driver[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn virtio_net_coalescing_is_fixed_without_notf_coal() {
        let mut bits = vec![b'0'; 64];
        let off = String::from_utf8(bits.clone()).unwrap();
        bits[super::VIRTIO_NET_F_NOTF_COAL] = b'1';
        let on = String::from_utf8(bits).unwrap();
        assert!(super::coalescing_fixed("virtio_net", Some(&off)));
        assert!(super::coalescing_fixed(
            "virtio_net",
            Some(&format!("{off}\n"))
        ));
        assert!(!super::coalescing_fixed("virtio_net", Some(&on)));
        assert!(super::coalescing_fixed("virtio_net", None));
        assert!(!super::coalescing_fixed("e1000", None));
    }

    use super::*;

    #[test]
    fn ext_ack_messages_are_found_after_the_echoed_header() {
        let mut echoed = vec![0u8; 16];
        let text = b"unsupported parameter\0";
        let len = (4 + text.len()) as u16;
        echoed.extend_from_slice(&len.to_ne_bytes());
        echoed.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        echoed.extend_from_slice(text);
        assert_eq!(
            ext_ack_message(&echoed).as_deref(),
            Some("unsupported parameter")
        );
        assert_eq!(ext_ack_message(&echoed[..16]), None);
        assert_eq!(ext_ack_message(&echoed[..20]), None, "truncated attribute");
    }

    #[test]
    fn set_requests_emit_the_ethtool_attributes() {
        let req = Request {
            cmd: ETHTOOL_MSG_COALESCE_SET,
            nlas: vec![EthtoolAttr::Coalesce(EthtoolCoalesceAttr::RxMaxFrames(16))],
        };
        assert_eq!(req.command(), 20);
        assert_eq!(Request::family_name(), "ethtool");
        let mut buf = vec![0u8; req.buffer_len()];
        req.emit(&mut buf);
        // One attribute: length 8, type ETHTOOL_A_COALESCE_RX_MAX_FRAMES (3), value 16.
        assert_eq!(buf.len(), 8);
        assert_eq!(u16::from_ne_bytes([buf[0], buf[1]]), 8);
        assert_eq!(u16::from_ne_bytes([buf[2], buf[3]]), 3);
        assert_eq!(u32::from_ne_bytes(buf[4..8].try_into().unwrap()), 16);
    }

    #[test]
    fn empty_patches_are_empty() {
        assert!(NicPatch::default().is_empty());
        assert!(!NicPatch {
            rx_frames: Some(1),
            ..Default::default()
        }
        .is_empty());
    }
}
