//! The live channel switch: both ends of a device move to a new channel (new ring sizes) at one
//! point in the packet stream, with nothing lost, duplicated or reordered.
//!
//! The protocol, for every device:
//! 1. The guest creates the new channel ([`new_channel`]), copies into its shared area whatever
//!    must survive, and offers the host end (in the same process through a hand-over slot, or
//!    over the hand-off socket, see [`crate::channel`]).
//! 2. The guest writes a switch request (an inband packet asking for a completion, tagged
//!    [`SWITCH_TAG`], which no other packet may carry) into the *old* outbound ring, after every
//!    earlier request, and signals.
//! 3. The host reads the old ring in order, so it meets the request after everything earlier.
//!    It acknowledges on the old inbound ring after everything it owes there (a completion
//!    tagged [`SWITCH_TAG`] carrying a status, see [`ack_status`]: 0, `EBUSY` if it still holds
//!    requests it could lose in the move, `EPROTO` if nothing was offered), signals whatever the
//!    ring's state, and on status 0 continues on the new channel. (The NIC's host writes what it
//!    owes before the acknowledgement; the disk's host refuses unless it owes nothing.)
//! 4. The guest reads the old inbound ring ([`request_switch`]), handing every other packet to
//!    the device as in any pass, until the acknowledgement; on status 0 it continues on the new
//!    channel, otherwise it withdraws the offer and stays.
//!
//! A host that never acknowledges within [`SWITCH_ACK_TIMEOUT`], goes away, or sends an
//! acknowledgement the guest did not ask for breaks the switch ([`SwitchFailure`]); the device
//! turns that into its own error.

use std::time::{Duration, Instant};

use crate::channel::{self, ChannelConfig, ChannelError, GuestEnd, HostEnd, WaitResult};
use crate::ring::{
    PacketHeader, RingError, WriteOutcome, FLAG_COMPLETION_REQUESTED, PACKET_TYPE_COMPLETION,
    PACKET_TYPE_INBAND,
};

/// Tag of the channel switch request and of its acknowledgement.
pub const SWITCH_TAG: u64 = u64::MAX;
/// Longest the guest waits for the host to acknowledge a channel switch, and the host for room
/// in the inbound ring to write the acknowledgement.
pub const SWITCH_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the guest sleeps at a time while it waits (it also waits for room to write the
/// request, and for packets whose signal the host's moderation may hold back).
const SWITCH_POLL: Duration = Duration::from_millis(1);

/// Why a switch broke after the new channel was offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchFailure {
    /// No acknowledgement within [`SWITCH_ACK_TIMEOUT`]. `requested`: whether the request was
    /// written at all (if not, the host knows nothing of the switch and the offer can be taken
    /// back).
    TimedOut {
        /// The switch request is in the ring.
        requested: bool,
    },
    /// The host went away.
    PeerGone,
    /// An acknowledgement that does not decode, or one before the request was written.
    BadAck,
}

impl std::fmt::Display for SwitchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwitchFailure::TimedOut { .. } => write!(
                f,
                "the host did not take the channel switch within {SWITCH_ACK_TIMEOUT:?}"
            ),
            SwitchFailure::PeerGone => write!(f, "the host went away during the channel switch"),
            SwitchFailure::BadAck => write!(f, "a malformed or unasked-for switch ack"),
        }
    }
}

/// A guest driver's side of the switch, as [`request_switch`] drives it.
pub trait SwitchGuest {
    /// The device's error.
    type Error: From<RingError> + From<ChannelError>;

    /// The channel in use (the old one, during the switch).
    fn end(&mut self) -> &mut GuestEnd;

    /// Signals the host (counted and traced as the device's every guest → host signal).
    fn doorbell(&mut self) -> Result<(), Self::Error>;

    /// A packet other than the acknowledgement, read from the old inbound ring while waiting
    /// (`payload` as [`crate::ring::RingReader::read_into`] left it): handled as in any pass,
    /// or refused with an error, which ends the switch.
    fn packet(&mut self, header: &PacketHeader, payload: &[u8]) -> Result<(), Self::Error>;

    /// The status an acknowledgement's payload carries, or `None` if it does not decode.
    fn ack_status(payload: &[u8]) -> Option<u32>;

    /// The device's error for a broken switch.
    fn failed(&mut self, why: SwitchFailure) -> Self::Error;
}

/// A channel like `old` (same shared area size) with rings of `out`/`inb` bytes, both readers
/// accepting payloads of at most `max_payload` bytes.
pub fn new_channel(
    old: &ChannelConfig,
    out: u32,
    inb: u32,
    max_payload: u32,
) -> Result<(GuestEnd, HostEnd), ChannelError> {
    let (mut guest, mut host) = channel::create(&ChannelConfig {
        out_ring_bytes: out as usize,
        in_ring_bytes: inb as usize,
        extra_bytes: old.extra_bytes,
    })?;
    guest.rx.set_max_payload(max_payload);
    host.rx.set_max_payload(max_payload);
    Ok((guest, host))
}

/// Steps 2 and 4 of the switch, on the guest's side, once the new channel is offered: writes
/// `request` (the device's encoding of a switch request) into the old outbound ring with
/// [`SWITCH_TAG`] as soon as there is room, signals, and reads the old inbound ring until the
/// acknowledgement, committing every pass (and signalling the host when that frees the room it
/// waits for). Returns the acknowledgement's status (0: the host moved to the new channel).
/// Every other packet goes to [`SwitchGuest::packet`], in order.
pub fn request_switch<G: SwitchGuest>(guest: &mut G, request: &[u8]) -> Result<u32, G::Error> {
    let deadline = Instant::now() + SWITCH_ACK_TIMEOUT;
    let mut buf = Vec::with_capacity(64);
    let mut requested = false;
    loop {
        if !requested {
            let written = guest.end().tx.try_write(
                PACKET_TYPE_INBAND,
                FLAG_COMPLETION_REQUESTED,
                SWITCH_TAG,
                &[request],
            )?;
            if let WriteOutcome::Written { .. } = written {
                requested = true;
                // Always signal: the host may be asleep whatever the ring's state.
                guest.doorbell()?;
            }
        }
        let mut handled = 0;
        let mut ack = None;
        while let Some(h) = guest.end().rx.read_into(&mut buf)? {
            if h.ty == PACKET_TYPE_COMPLETION && h.trans_id == SWITCH_TAG {
                match G::ack_status(&buf).filter(|_| requested) {
                    Some(status) => ack = Some(status),
                    None => return Err(guest.failed(SwitchFailure::BadAck)),
                }
                break;
            }
            guest.packet(&h, &buf)?;
            handled += 1;
        }
        if guest.end().rx.commit().signal_writer {
            guest.doorbell()?;
        }
        if let Some(status) = ack {
            return Ok(status);
        }
        if handled > 0 {
            continue;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(guest.failed(SwitchFailure::TimedOut { requested }));
        }
        if guest
            .end()
            .from_host
            .wait(SWITCH_POLL.min(deadline - now))?
            == WaitResult::PeerGone
        {
            return Err(guest.failed(SwitchFailure::PeerGone));
        }
    }
}

/// The status the host acknowledges a switch request with: `EBUSY` if the host is not `idle`
/// (it still holds requests the guest waits for, which the move could lose); otherwise 0 if a
/// new channel was `offered`, `EPROTO` if not. A host that refuses stays on the old channel.
pub fn ack_status(offered: bool, idle: bool) -> u32 {
    match (offered, idle) {
        (_, false) => libc::EBUSY as u32,
        (true, true) => 0,
        (false, true) => libc::EPROTO as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::RingReader;

    /// A guest with nothing of its own: any other packet is refused.
    struct Plain {
        end: GuestEnd,
        doorbells: usize,
    }

    #[derive(Debug)]
    #[allow(
        dead_code,
        reason = "the payloads are read through Debug, in panic messages"
    )]
    enum E {
        Ring(RingError),
        Channel(ChannelError),
        Other(String),
        Failed(SwitchFailure),
    }
    impl From<RingError> for E {
        fn from(e: RingError) -> E {
            E::Ring(e)
        }
    }
    impl From<ChannelError> for E {
        fn from(e: ChannelError) -> E {
            E::Channel(e)
        }
    }

    impl SwitchGuest for Plain {
        type Error = E;
        fn end(&mut self) -> &mut GuestEnd {
            &mut self.end
        }
        fn doorbell(&mut self) -> Result<(), E> {
            self.doorbells += 1;
            Ok(self.end.to_host.signal()?)
        }
        fn packet(&mut self, h: &PacketHeader, _: &[u8]) -> Result<(), E> {
            Err(E::Other(format!("packet {:#x}", h.trans_id)))
        }
        fn ack_status(payload: &[u8]) -> Option<u32> {
            Some(u32::from_le_bytes(payload.get(..4)?.try_into().ok()?))
        }
        fn failed(&mut self, why: SwitchFailure) -> E {
            E::Failed(why)
        }
    }

    fn plain() -> (Plain, HostEnd) {
        let cfg = ChannelConfig {
            out_ring_bytes: 4096,
            in_ring_bytes: 4096,
            extra_bytes: 4096,
        };
        let (end, host) = new_channel(&cfg, 4096, 4096, 64).unwrap();
        (Plain { end, doorbells: 0 }, host)
    }

    /// Serves one switch request on `host` from another thread (the mock peer): reads it,
    /// answers `status`.
    fn host_answers(host: HostEnd, status: u32) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut host = crate::mock::MockPeer::from(host);
            let request = host.answer_switch(&status.to_le_bytes(), Duration::from_secs(5));
            assert_eq!(request, b"switch!!");
        })
    }

    #[test]
    fn the_ack_status_comes_back() {
        for status in [0, libc::EPROTO as u32] {
            let (mut g, host) = plain();
            let host = host_answers(host, status);
            assert_eq!(request_switch(&mut g, b"switch!!").unwrap(), status);
            assert_eq!(g.doorbells, 1);
            host.join().unwrap();
        }
    }

    #[test]
    fn an_ack_before_the_request_breaks_the_switch() {
        let (mut g, mut host) = plain();
        // Fill the outbound ring with packets of the request's size, so the request cannot go
        // out, then ack anyway.
        while let WriteOutcome::Written { .. } = g
            .end
            .tx
            .try_write(PACKET_TYPE_INBAND, 0, 1, &[&[0u8; 8]])
            .unwrap()
        {}
        host.tx
            .try_write(
                PACKET_TYPE_COMPLETION,
                0,
                SWITCH_TAG,
                &[&0u32.to_le_bytes()],
            )
            .unwrap();
        match request_switch(&mut g, b"switch!!") {
            Err(E::Failed(SwitchFailure::BadAck)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_packets_go_to_the_device_in_order() {
        let (mut g, mut host) = plain();
        host.tx
            .try_write(PACKET_TYPE_COMPLETION, 0, 7, &[&[0u8; 8]])
            .unwrap();
        match request_switch(&mut g, b"switch!!") {
            Err(E::Other(m)) => assert_eq!(m, "packet 0x7"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_host_refuses_while_busy_or_unoffered() {
        assert_eq!(ack_status(true, true), 0);
        assert_eq!(ack_status(true, false), libc::EBUSY as u32);
        assert_eq!(ack_status(false, false), libc::EBUSY as u32);
        assert_eq!(ack_status(false, true), libc::EPROTO as u32);
    }

    #[test]
    fn a_new_channel_keeps_the_shared_area_and_limits_payloads() {
        let (g, host) = plain();
        assert_eq!(g.end.config.extra_bytes, 4096);
        assert_eq!(g.end.extra.len(), host.extra.len());
        let _: &RingReader = &g.end.rx;
    }
}
