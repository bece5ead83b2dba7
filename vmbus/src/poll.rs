//! NAPI-style polling on a ring's reader side (the guest's inbound ring of every device).
//!
//! A reader handles packets in passes of at most `budget`. While a pass fills its whole budget
//! more are probably waiting: the reader stays in polling mode with the ring's `interrupt_mask`
//! set, so the writer sends no signal it would not wait for. A short pass ends polling: the
//! reader clears the mask and then checks the ring once more, because a packet written while the
//! mask was set raised no signal (the lost-wake-up guard); only if that check finds nothing may
//! the reader sleep on its eventfd.
//!
//! [`Napi`] holds the one bit of state (whether the mask is set) and makes that decision after
//! each pass; the device runs the passes, sleeps, and traces every mask change it is told of.

use crate::ring::{RingError, RingReader};

/// What a reader does after a pass, as [`Napi::after_pass`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterPass {
    /// The pass filled its budget: interrupts are now masked; pass again without sleeping.
    Busy,
    /// A short pass ended polling: interrupts were unmasked and a packet had raced in while
    /// they were masked; pass again without sleeping (it raised no signal).
    Raced,
    /// A short pass with interrupts unmasked and, if polling just ended, nothing raced in: the
    /// reader may return what it has or sleep until the writer signals.
    Settled,
}

/// The polling mode of one ring's reader: whether it has masked interrupts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Napi {
    masked: bool,
}

impl Napi {
    /// Interrupts not masked (a fresh ring's state).
    pub const fn new() -> Napi {
        Napi { masked: false }
    }

    /// Whether this reader has set its ring's `interrupt_mask`.
    pub fn masked(&self) -> bool {
        self.masked
    }

    /// Sets or clears `reader`'s `interrupt_mask`. Returns true if that changed the mask (the
    /// caller traces the change), false if it was already so.
    pub fn set_masked(&mut self, reader: &RingReader, masked: bool) -> bool {
        if self.masked == masked {
            return false;
        }
        reader.set_interrupt_mask(masked);
        self.masked = masked;
        true
    }

    /// Forgets the mask: the reader moved to a new ring, whose mask starts clear.
    pub fn reset(&mut self) {
        self.masked = false;
    }

    /// The decision after a pass that handled `handled` packets of a `budget`: masks on a full
    /// pass ([`AfterPass::Busy`]); on a short one unmasks if masked and re-checks `reader`
    /// ([`AfterPass::Raced`] if data is there), else [`AfterPass::Settled`]. `on_change` is
    /// called with the new mask on every change, before the re-check. An error only if the
    /// peer corrupted the ring's indices.
    pub fn after_pass(
        &mut self,
        reader: &mut RingReader,
        handled: usize,
        budget: usize,
        mut on_change: impl FnMut(bool),
    ) -> Result<AfterPass, RingError> {
        if handled >= budget {
            if self.set_masked(reader, true) {
                on_change(true);
            }
            return Ok(AfterPass::Busy);
        }
        if self.masked {
            self.set_masked(reader, false);
            on_change(false);
            if reader.has_data()? {
                return Ok(AfterPass::Raced);
            }
        }
        Ok(AfterPass::Settled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{self, ChannelConfig};
    use crate::ring::{WriteOutcome, PACKET_TYPE_INBAND};

    fn ends() -> (channel::GuestEnd, channel::HostEnd) {
        channel::create(&ChannelConfig {
            out_ring_bytes: 4096,
            in_ring_bytes: 4096,
            extra_bytes: 0,
        })
        .unwrap()
    }

    #[test]
    fn full_passes_mask_once_and_a_short_one_unmasks() {
        let (mut guest, _host) = ends();
        let mut napi = Napi::new();
        let mut changes = Vec::new();
        for _ in 0..3 {
            let v = napi
                .after_pass(&mut guest.rx, 8, 8, |m| changes.push(m))
                .unwrap();
            assert_eq!(v, AfterPass::Busy);
            assert!(guest.rx.interrupt_masked());
        }
        let v = napi
            .after_pass(&mut guest.rx, 3, 8, |m| changes.push(m))
            .unwrap();
        assert_eq!(v, AfterPass::Settled);
        assert!(!guest.rx.interrupt_masked());
        assert_eq!(changes, [true, false]);
    }

    #[test]
    fn a_packet_written_while_masked_is_found_by_the_recheck() {
        let (mut guest, mut host) = ends();
        let mut napi = Napi::new();
        napi.after_pass(&mut guest.rx, 1, 1, |_| {}).unwrap();
        // Written while masked: the ring asks for no signal, so only the re-check can find it.
        match host
            .tx
            .try_write(PACKET_TYPE_INBAND, 0, 1, &[&[0u8; 8]])
            .unwrap()
        {
            WriteOutcome::Written { signal, .. } => assert!(!signal),
            other => panic!("{other:?}"),
        }
        let v = napi.after_pass(&mut guest.rx, 0, 1, |_| {}).unwrap();
        assert_eq!(v, AfterPass::Raced);
        assert!(!napi.masked());
    }

    #[test]
    fn an_unmasked_short_pass_does_not_touch_the_ring() {
        let (mut guest, mut host) = ends();
        host.tx
            .try_write(PACKET_TYPE_INBAND, 0, 1, &[&[0u8; 8]])
            .unwrap();
        let mut napi = Napi::new();
        let mut changes = 0;
        // Not masked: data waiting is the caller's next pass, announced by the writer's signal.
        let v = napi
            .after_pass(&mut guest.rx, 0, 4, |_| changes += 1)
            .unwrap();
        assert_eq!(v, AfterPass::Settled);
        assert_eq!(changes, 0);
    }
}
