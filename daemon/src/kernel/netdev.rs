//! NAPI moderation per NAPI instance through the `netdev` generic netlink family
//! (`napi-get`, `napi-set`, kernel 6.13 and later): `defer-hard-irqs`, `gro-flush-timeout` and
//! `irq-suspend-timeout` of each NAPI instance of a NIC, where the sysfs files
//! ([`super::napi`]) set one value for all of them.
//!
//! Framing, generic netlink, the family lookup and the socket are the rust-netlink crates'
//! (`netlink-packet-core`, `netlink-packet-generic`, `netlink-sys`), and so are the attribute
//! buffers (`DefaultNla`, `NlasIterator`, `parse_u32`/`parse_u64`). No crate has the netdev
//! family's attributes, so their numbers (from the kernel's `include/uapi/linux/netdev.h`,
//! generated from `Documentation/netlink/specs/netdev.yaml`) and the one request payload
//! ([`NetdevMessage`]) are written here.
//!
//! A kernel without the family, or without its NAPI operations (before 6.13: the 6.1 guests
//! of the lab), is [`NetdevError::Unavailable`]: callers fall back to the sysfs knobs.

use std::os::fd::AsRawFd;

use netlink_packet_core::{
    parse_u32, parse_u64, DecodeError, DefaultNla, Emitable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NlaBuffer, NlasIterator, Parseable, ParseableParametrized, NLM_F_ACK,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};
use serde::{Deserialize, Serialize};

/// `NETDEV_CMD_NAPI_GET`.
pub const NETDEV_CMD_NAPI_GET: u8 = 11;
/// `NETDEV_CMD_NAPI_SET` (6.13).
pub const NETDEV_CMD_NAPI_SET: u8 = 14;
/// `NETDEV_A_NAPI_*` attributes.
pub const NETDEV_A_NAPI_IFINDEX: u16 = 1;
pub const NETDEV_A_NAPI_ID: u16 = 2;
pub const NETDEV_A_NAPI_IRQ: u16 = 3;
pub const NETDEV_A_NAPI_DEFER_HARD_IRQS: u16 = 5;
pub const NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT: u16 = 6;
pub const NETDEV_A_NAPI_IRQ_SUSPEND_TIMEOUT: u16 = 7;
/// `NETLINK_EXT_ACK`: the kernel says why in words.
const NETLINK_EXT_ACK: libc::c_int = 11;

/// Why a netdev request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    /// The kernel has no netdev family, or no NAPI operations in it (before 6.13).
    #[error("per-NAPI settings through netdev netlink: not available on this kernel ({0}); the sysfs knobs apply to every NAPI instance")]
    Unavailable(String),
    /// No such NAPI instance (gone, or the device went away).
    #[error("NAPI instance {id} of {iface} (driver {driver}): no such instance")]
    NoSuchNapi {
        iface: String,
        driver: String,
        id: u32,
    },
    /// The kernel refused.
    #[error("netdev {what} on {iface} (driver {driver}): {message} (errno {errno})")]
    Kernel {
        iface: String,
        driver: String,
        what: &'static str,
        errno: i32,
        message: String,
    },
    #[error("netdev netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("netdev netlink: malformed reply: {0}")]
    Decode(String),
}

/// One NAPI instance and its moderation settings (`None`: the kernel did not report it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NapiInstance {
    pub id: u32,
    pub ifindex: u32,
    pub irq: Option<u32>,
    pub defer_hard_irqs: Option<u32>,
    pub gro_flush_timeout: Option<u64>,
    pub irq_suspend_timeout: Option<u64>,
}

/// A change of one NAPI instance's settings; `None` leaves a setting as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NapiPatch {
    pub defer_hard_irqs: Option<u32>,
    pub gro_flush_timeout: Option<u64>,
    pub irq_suspend_timeout: Option<u64>,
}

/// A netdev family message: a command and raw attributes (the layout no crate has).
#[derive(Debug, Clone)]
pub struct NetdevMessage {
    pub cmd: u8,
    pub nlas: Vec<DefaultNla>,
}

impl GenlFamily for NetdevMessage {
    fn family_name() -> &'static str {
        "netdev"
    }
    fn version(&self) -> u8 {
        1
    }
    fn command(&self) -> u8 {
        self.cmd
    }
}

impl Emitable for NetdevMessage {
    fn buffer_len(&self) -> usize {
        self.nlas.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.nlas.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let mut nlas = Vec::new();
        for nla in NlasIterator::new(buf) {
            let nla: NlaBuffer<&[u8]> = nla?;
            nlas.push(DefaultNla::parse(&nla)?);
        }
        Ok(NetdevMessage {
            cmd: header.cmd,
            nlas,
        })
    }
}

/// A u32 attribute.
fn nla_u32(kind: u16, v: u32) -> DefaultNla {
    DefaultNla::new(kind, v.to_ne_bytes().to_vec())
}

/// A `uint` attribute (the kernel takes 4 or 8 bytes; 8 always fits).
fn nla_uint(kind: u16, v: u64) -> DefaultNla {
    DefaultNla::new(kind, v.to_ne_bytes().to_vec())
}

/// The value of a `uint` attribute (4 or 8 bytes).
fn uint(value: &[u8]) -> Option<u64> {
    match value.len() {
        4 => parse_u32(value).ok().map(u64::from),
        8 => parse_u64(value).ok(),
        _ => None,
    }
}

/// A NAPI instance from one `napi-get` reply.
pub fn parse_napi(msg: &NetdevMessage) -> Option<NapiInstance> {
    let mut n = NapiInstance::default();
    let mut have_id = false;
    for nla in &msg.nlas {
        let mut v = vec![0u8; netlink_packet_core::Nla::value_len(nla)];
        netlink_packet_core::Nla::emit_value(nla, &mut v);
        match netlink_packet_core::Nla::kind(nla) {
            NETDEV_A_NAPI_ID => {
                n.id = parse_u32(&v).ok()?;
                have_id = true;
            }
            NETDEV_A_NAPI_IFINDEX => n.ifindex = parse_u32(&v).ok()?,
            NETDEV_A_NAPI_IRQ => n.irq = parse_u32(&v).ok(),
            NETDEV_A_NAPI_DEFER_HARD_IRQS => n.defer_hard_irqs = parse_u32(&v).ok(),
            NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT => n.gro_flush_timeout = uint(&v),
            NETDEV_A_NAPI_IRQ_SUSPEND_TIMEOUT => n.irq_suspend_timeout = uint(&v),
            _ => {}
        }
    }
    have_id.then_some(n)
}

/// The attributes of a `napi-set` of instance `id`.
pub fn set_attrs(id: u32, patch: &NapiPatch) -> Vec<DefaultNla> {
    let mut nlas = vec![nla_u32(NETDEV_A_NAPI_ID, id)];
    if let Some(v) = patch.defer_hard_irqs {
        nlas.push(nla_u32(NETDEV_A_NAPI_DEFER_HARD_IRQS, v));
    }
    if let Some(v) = patch.gro_flush_timeout {
        nlas.push(nla_uint(NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT, v));
    }
    if let Some(v) = patch.irq_suspend_timeout {
        nlas.push(nla_uint(NETDEV_A_NAPI_IRQ_SUSPEND_TIMEOUT, v));
    }
    nlas
}

/// A connection to the netdev family of the calling thread's network namespace.
pub struct Netdev {
    socket: Socket,
    family: u16,
    seq: u32,
}

impl Netdev {
    /// Opens a generic netlink socket and resolves the netdev family.
    pub fn open() -> Result<Netdev, NetdevError> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on our own socket with a pointer to a live c_int of the size
        // passed.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_NETLINK,
                NETLINK_EXT_ACK,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let mut me = Netdev {
            socket,
            family: 0,
            seq: 0,
        };
        let mut msg = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName("netdev".into())],
        });
        msg.finalize();
        let replies: Vec<GenlMessage<GenlCtrl>> = me
            .request(msg, NLM_F_REQUEST | NLM_F_ACK, "", "resolve family")
            .map_err(|e| NetdevError::Unavailable(e.to_string()))?;
        me.family = replies
            .into_iter()
            .flat_map(|r| r.payload.nlas)
            .find_map(|nla| match nla {
                GenlCtrlAttrs::FamilyId(id) => Some(id),
                _ => None,
            })
            .ok_or_else(|| NetdevError::Unavailable("no netdev family".into()))?;
        Ok(me)
    }

    /// Sends one request; collects replies until the ACK or the end of the dump.
    fn request<Req, Rep>(
        &mut self,
        payload: Req,
        flags: u16,
        iface: &str,
        what: &'static str,
    ) -> Result<Vec<Rep>, NetdevError>
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
        loop {
            let mut rbuf: Vec<u8> = Vec::with_capacity(65536);
            let n = self.socket.recv(&mut rbuf, 0)?;
            let mut at = 0;
            while at + 16 <= n {
                let len =
                    u32::from_ne_bytes(rbuf[at..at + 4].try_into().expect("4 bytes")) as usize;
                if len < 16 || at + len > n {
                    return Err(NetdevError::Decode(format!("bad message length {len}")));
                }
                let bytes = &rbuf[at..at + len];
                at += (len + 3) & !3;
                let parsed = NetlinkMessage::<Rep>::deserialize(bytes)
                    .map_err(|e| NetdevError::Decode(e.to_string()))?;
                if parsed.header.sequence_number != self.seq {
                    continue;
                }
                match parsed.payload {
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(replies),
                        Some(code) => {
                            let errno = -code.get();
                            let driver = if iface.is_empty() {
                                String::new()
                            } else {
                                super::ethtool::driver_name(iface)
                            };
                            return Err(match errno {
                                libc::EOPNOTSUPP | libc::EINVAL if what == "resolve family" => {
                                    NetdevError::Unavailable(format!("errno {errno}"))
                                }
                                libc::ENOENT if what == "resolve family" => {
                                    NetdevError::Unavailable("no netdev family".into())
                                }
                                _ => NetdevError::Kernel {
                                    iface: iface.into(),
                                    driver,
                                    what,
                                    errno,
                                    message: std::io::Error::from_raw_os_error(errno).to_string(),
                                },
                            });
                        }
                    },
                    NetlinkPayload::Done(_) => return Ok(replies),
                    _ => {}
                }
            }
        }
    }

    /// Every NAPI instance of interface `ifindex` (named `iface` in errors).
    pub fn napis(&mut self, iface: &str, ifindex: u32) -> Result<Vec<NapiInstance>, NetdevError> {
        let mut msg = GenlMessage::from_payload(NetdevMessage {
            cmd: NETDEV_CMD_NAPI_GET,
            nlas: vec![nla_u32(NETDEV_A_NAPI_IFINDEX, ifindex)],
        });
        msg.set_resolved_family_id(self.family);
        msg.finalize();
        let replies: Vec<GenlMessage<NetdevMessage>> =
            match self.request(msg, NLM_F_REQUEST | NLM_F_DUMP, iface, "napi-get") {
                Err(NetdevError::Kernel { errno, .. }) if errno == libc::EOPNOTSUPP => {
                    return Err(NetdevError::Unavailable("no napi-get".into()))
                }
                other => other?,
            };
        Ok(replies
            .iter()
            .filter_map(|r| parse_napi(&r.payload))
            .filter(|n| n.ifindex == ifindex)
            .collect())
    }

    /// Applies `patch` to NAPI instance `id` of `iface`.
    pub fn set(&mut self, iface: &str, id: u32, patch: &NapiPatch) -> Result<(), NetdevError> {
        let mut msg = GenlMessage::from_payload(NetdevMessage {
            cmd: NETDEV_CMD_NAPI_SET,
            nlas: set_attrs(id, patch),
        });
        msg.set_resolved_family_id(self.family);
        msg.finalize();
        match self.request::<_, GenlMessage<NetdevMessage>>(
            msg,
            NLM_F_REQUEST | NLM_F_ACK,
            iface,
            "napi-set",
        ) {
            Ok(_) => Ok(()),
            // Before 6.13 the family has no napi-set.
            Err(NetdevError::Kernel { errno, .. }) if errno == libc::EOPNOTSUPP => {
                Err(NetdevError::Unavailable("no napi-set".into()))
            }
            Err(NetdevError::Kernel { errno, .. }) if errno == libc::ENOENT => {
                Err(NetdevError::NoSuchNapi {
                    iface: iface.into(),
                    driver: super::ethtool::driver_name(iface),
                    id,
                })
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn napi_replies_parse_and_set_requests_carry_only_what_changes() {
        let reply = NetdevMessage {
            cmd: NETDEV_CMD_NAPI_GET,
            nlas: vec![
                nla_u32(NETDEV_A_NAPI_IFINDEX, 7),
                nla_u32(NETDEV_A_NAPI_ID, 8193),
                nla_u32(NETDEV_A_NAPI_DEFER_HARD_IRQS, 2),
                // The kernel sends a uint in 4 bytes when it fits.
                nla_u32(NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT, 20_000),
                nla_uint(NETDEV_A_NAPI_IRQ_SUSPEND_TIMEOUT, 5_000_000_000),
            ],
        };
        // Through the bytes, as the kernel would send them.
        let mut buf = vec![0u8; reply.buffer_len()];
        reply.emit(&mut buf);
        let parsed = NetdevMessage::parse_with_param(
            &buf,
            GenlHeader {
                cmd: NETDEV_CMD_NAPI_GET,
                version: 1,
            },
        )
        .unwrap();
        assert_eq!(
            parse_napi(&parsed),
            Some(NapiInstance {
                id: 8193,
                ifindex: 7,
                irq: None,
                defer_hard_irqs: Some(2),
                gro_flush_timeout: Some(20_000),
                irq_suspend_timeout: Some(5_000_000_000),
            })
        );
        let attrs = set_attrs(
            8193,
            &NapiPatch {
                gro_flush_timeout: Some(50_000),
                ..Default::default()
            },
        );
        let kinds: Vec<u16> = attrs.iter().map(netlink_packet_core::Nla::kind).collect();
        assert_eq!(kinds, [NETDEV_A_NAPI_ID, NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT]);
        assert!(parse_napi(&NetdevMessage {
            cmd: NETDEV_CMD_NAPI_GET,
            nlas: vec![]
        })
        .is_none());
    }
}
