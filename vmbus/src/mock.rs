//! A scripted peer for tests (feature `test-utils`, and in this crate's own tests): one end of a
//! real channel, driven packet by packet, so that a layer above (a device's guest driver or host
//! service) is tested without the real other side — and against a peer that does exactly what
//! the test says, including what a real one never would.
//!
//! The peer speaks the ring protocol for real (the same [`RingReader`]/[`RingWriter`], the same
//! signalling); it only replaces the device logic. It is not hardened: a broken ring is a panic
//! with the test's context, which is what a test wants.

use std::time::{Duration, Instant};

use crate::channel::{EndParts, GuestEnd, HostEnd};
use crate::ring::{
    PacketHeader, RingReader, RingWriter, WriteOutcome, PACKET_TYPE_COMPLETION, PACKET_TYPE_INBAND,
};
use crate::switch::SWITCH_TAG;

/// One end of a channel under a test's control (either end: build it from a [`HostEnd`] to play
/// the host, from a [`GuestEnd`] to play the guest).
pub struct MockPeer {
    parts: EndParts,
}

impl From<HostEnd> for MockPeer {
    fn from(end: HostEnd) -> MockPeer {
        MockPeer {
            parts: end.into_parts(),
        }
    }
}

impl From<GuestEnd> for MockPeer {
    fn from(end: GuestEnd) -> MockPeer {
        MockPeer {
            parts: end.into_parts(),
        }
    }
}

impl MockPeer {
    /// The ring this peer reads (the other side's outbound ring).
    pub fn reader(&mut self) -> &mut RingReader {
        &mut self.parts.rx
    }

    /// The ring this peer writes.
    pub fn writer(&mut self) -> &mut RingWriter {
        &mut self.parts.tx
    }

    /// The next packet from the other side, waiting up to `timeout` for it (its signal, or
    /// polling every millisecond, so a packet whose signal was suppressed is found too). The
    /// read is committed, signalling the other side if that frees the room it waits for.
    /// `None` on timeout.
    ///
    /// # Panics
    /// If the other side broke the ring.
    pub fn recv(&mut self, timeout: Duration) -> Option<(PacketHeader, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.parts.rx.read().expect("the peer broke the ring") {
                if self.parts.rx.commit().signal_writer {
                    self.signal();
                }
                return Some(p);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.parts
                .waiter
                .wait((deadline - now).min(Duration::from_millis(1)))
                .expect("waiting for the peer");
        }
    }

    /// Writes one packet and signals if the ring asks for it (an empty-to-non-empty write to an
    /// unmasked reader). Returns whether it signalled.
    ///
    /// # Panics
    /// If the ring has no room (a test decides how full the ring gets) or is broken.
    pub fn send(&mut self, ty: u16, flags: u16, trans_id: u64, payload: &[u8]) -> bool {
        match self
            .parts
            .tx
            .try_write(ty, flags, trans_id, &[payload])
            .expect("writing to the peer")
        {
            WriteOutcome::Written { signal, .. } => {
                if signal {
                    self.signal();
                }
                signal
            }
            WriteOutcome::Full { needed } => {
                panic!("the mock peer's ring is full ({needed} bytes needed)")
            }
        }
    }

    /// Sends a completion packet for `trans_id` carrying `payload`.
    pub fn complete(&mut self, trans_id: u64, payload: &[u8]) -> bool {
        self.send(PACKET_TYPE_COMPLETION, 0, trans_id, payload)
    }

    /// Signals the other side.
    pub fn signal(&self) {
        self.parts.signaller.signal().expect("signalling the peer");
    }

    /// Plays the host's part of a channel switch ([`crate::switch`]): waits up to `timeout` for
    /// the guest's switch request, acknowledges it with `ack` (the device's encoding of the
    /// status), signals whatever the ring's state, and returns the request's payload.
    ///
    /// # Panics
    /// If no request comes, or another packet comes first.
    pub fn answer_switch(&mut self, ack: &[u8], timeout: Duration) -> Vec<u8> {
        let (h, payload) = self
            .recv(timeout)
            .expect("no switch request within the timeout");
        assert_eq!(
            (h.ty, h.trans_id),
            (PACKET_TYPE_INBAND, SWITCH_TAG),
            "expected a switch request"
        );
        self.complete(SWITCH_TAG, ack);
        self.signal();
        payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{self, ChannelConfig};

    fn pair() -> (GuestEnd, MockPeer) {
        let (guest, host) = channel::create(&ChannelConfig {
            out_ring_bytes: 4096,
            in_ring_bytes: 4096,
            extra_bytes: 0,
        })
        .unwrap();
        (guest, MockPeer::from(host))
    }

    #[test]
    fn packets_cross_both_ways_and_signal_as_the_ring_says() {
        let (mut guest, mut host) = pair();
        assert!(host.recv(Duration::from_millis(5)).is_none());
        guest
            .tx
            .try_write(PACKET_TYPE_INBAND, 0, 9, &[b"request!"])
            .unwrap();
        let (h, p) = host.recv(Duration::from_secs(1)).unwrap();
        assert_eq!((h.trans_id, p.as_slice()), (9, &b"request!"[..]));
        // The first completion into an empty, unmasked ring signals; the second does not.
        assert!(host.complete(9, &[1; 8]));
        assert!(!host.complete(10, &[2; 8]));
        guest.rx.set_interrupt_mask(true);
        let (h, _) = guest.rx.read().unwrap().unwrap();
        assert_eq!(h.trans_id, 9);
    }

    #[test]
    fn it_answers_a_switch_request() {
        let (guest, host) = pair();
        let mut host = host;
        let mut guest = MockPeer::from(guest);
        guest.send(
            PACKET_TYPE_INBAND,
            crate::ring::FLAG_COMPLETION_REQUESTED,
            SWITCH_TAG,
            b"switch!!",
        );
        assert_eq!(
            host.answer_switch(&[0; 8], Duration::from_secs(1)),
            b"switch!!"
        );
        let (h, p) = guest.recv(Duration::from_secs(1)).unwrap();
        assert_eq!(
            (h.ty, h.trans_id, p),
            (PACKET_TYPE_COMPLETION, SWITCH_TAG, vec![0; 8])
        );
    }
}
