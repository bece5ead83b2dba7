//! Interrupt moderation on a ring's writer side (the host → guest path of every device).
//!
//! The ring already signals at most once per empty-to-non-empty transition while the reader has
//! not masked interrupts (see [`crate::ring`]). Moderation goes further: such a write does not
//! signal at once but makes a signal *owed*; the writer fires it once `frames` packets have been
//! written since it became owed, or `usecs` microseconds after, whichever comes first, and only
//! if the reader has not masked interrupts by then (a polling reader needs none). With
//! `frames` = 1 every owed signal fires at the first check, which is the ring's own behaviour.
//!
//! The state is a small value with no I/O, so the policy is tested on its own; the device owns
//! the signalling (its counters and tracepoints) and asks [`Moderation::fire`] when to signal.

use std::time::{Duration, Instant};

use crate::ring::{RingError, RingWriter};

/// The moderation knobs in force for one decision. Devices read them from their live settings on
/// every pass, so a change takes effect within one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModerationKnobs {
    /// Packets written since the signal became owed that make it due (0 is taken as 1).
    pub frames: u32,
    /// Microseconds after the signal became owed that make it due.
    pub usecs: u32,
}

/// Whether a signal is owed to the reader of one ring, since when, and how many packets have
/// been written since.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moderation {
    /// A signal is owed since this instant...
    owed_since: Option<Instant>,
    /// ...and this many packets were written since (the one that made it owed included).
    since_owed: u32,
}

impl Moderation {
    /// Nothing owed.
    pub const fn new() -> Moderation {
        Moderation {
            owed_since: None,
            since_owed: 0,
        }
    }

    /// Records one packet written into the ring. `signal` is the ring's verdict for that write
    /// ([`crate::ring::WriteOutcome::Written`]'s `signal`: the write made the ring non-empty while
    /// the reader had not masked interrupts). Such a write makes a signal owed, from now, if none
    /// was; every packet written while a signal is owed counts towards `frames`, this one
    /// included. A write that does not make the ring non-empty and finds nothing owed changes
    /// nothing.
    pub fn wrote(&mut self, signal: bool) {
        if signal && self.owed_since.is_none() {
            self.owed_since = Some(Instant::now());
            self.since_owed = 0;
        }
        if self.owed_since.is_some() {
            self.since_owed += 1;
        }
    }

    /// Whether a signal is owed.
    pub fn owed(&self) -> bool {
        self.owed_since.is_some()
    }

    /// Packets written since the owed signal became owed (0 when none is owed).
    pub fn since_owed(&self) -> u32 {
        if self.owed() {
            self.since_owed
        } else {
            0
        }
    }

    /// When the owed signal falls due by time (`usecs` after it became owed); `None` when no
    /// signal is owed. A writer that sleeps wakes by then.
    pub fn deadline(&self, usecs: u32) -> Option<Instant> {
        self.owed_since
            .map(|t| t + Duration::from_micros(usecs as u64))
    }

    /// Returns true if a signal is owed and, at `now`, at least `knobs.frames` (at least 1)
    /// packets were written since it became owed or its deadline has passed. Changes nothing.
    pub fn due(&self, knobs: ModerationKnobs, now: Instant) -> bool {
        self.owed_since.is_some()
            && (self.since_owed >= knobs.frames.max(1)
                || self.deadline(knobs.usecs).is_some_and(|d| now >= d))
    }

    /// Forgets an owed signal: the writer signalled the reader anyway (a signal it had to send
    /// whatever the ring's state), or moved to a new ring.
    pub fn clear(&mut self) {
        self.owed_since = None;
    }

    /// The moderation step of a writer's pass. If a signal is [`due`](Self::due) at `now`, it is
    /// no longer owed, and this returns `Some(bytes in the ring)` when `writer`'s reader has not
    /// masked interrupts in the meantime: the caller then signals (and traces the fill level).
    /// Returns `None` when nothing is due or the reader masked (a polling reader finds the
    /// packets itself). An error only if the peer corrupted the ring's indices.
    pub fn fire(
        &mut self,
        writer: &mut RingWriter,
        knobs: ModerationKnobs,
        now: Instant,
    ) -> Result<Option<u32>, RingError> {
        if !self.due(knobs, now) {
            return Ok(None);
        }
        self.owed_since = None;
        if writer.reader_masked() {
            return Ok(None);
        }
        writer.bytes_used().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs(frames: u32, usecs: u32) -> ModerationKnobs {
        ModerationKnobs { frames, usecs }
    }

    #[test]
    fn nothing_is_owed_until_a_write_makes_the_ring_non_empty() {
        let mut m = Moderation::new();
        m.wrote(false);
        m.wrote(false);
        assert!(!m.owed());
        assert_eq!(m.since_owed(), 0);
        assert_eq!(m.deadline(50), None);
        let far = Instant::now() + Duration::from_secs(3600);
        assert!(!m.due(knobs(1, 0), far));
    }

    #[test]
    fn frames_count_every_write_from_the_one_that_made_it_owed() {
        let mut m = Moderation::new();
        let k = knobs(4, 1_000_000);
        m.wrote(true);
        assert!(m.owed());
        let now = Instant::now();
        for i in 1..4 {
            assert_eq!(m.since_owed(), i);
            assert!(!m.due(k, now), "due after {i} of 4 frames");
            // Later writes find the ring non-empty (no signal of their own) but still count.
            m.wrote(false);
        }
        assert_eq!(m.since_owed(), 4);
        assert!(m.due(k, now));
    }

    #[test]
    fn a_second_signalling_write_does_not_restart_the_count_or_the_clock() {
        let mut m = Moderation::new();
        m.wrote(true);
        let deadline = m.deadline(100).unwrap();
        m.wrote(true);
        assert_eq!(m.since_owed(), 2);
        assert_eq!(m.deadline(100), Some(deadline));
    }

    #[test]
    fn the_timer_makes_a_lone_packet_due() {
        let mut m = Moderation::new();
        m.wrote(true);
        let k = knobs(1000, 50);
        let deadline = m.deadline(50).unwrap();
        assert!(!m.due(k, deadline - Duration::from_micros(1)));
        assert!(m.due(k, deadline));
    }

    #[test]
    fn fire_signals_once_when_due_and_never_into_a_masked_reader() {
        use crate::channel::{self, ChannelConfig};
        use crate::ring::{WriteOutcome, PACKET_TYPE_COMPLETION};
        let (guest, mut host) = channel::create(&ChannelConfig {
            out_ring_bytes: 4096,
            in_ring_bytes: 4096,
            extra_bytes: 0,
        })
        .unwrap();
        let k = knobs(2, 1_000_000);
        let mut m = Moderation::new();
        let write = |m: &mut Moderation, tx: &mut RingWriter| match tx
            .try_write(PACKET_TYPE_COMPLETION, 0, 1, &[&[0u8; 8]])
            .unwrap()
        {
            WriteOutcome::Written { signal, .. } => m.wrote(signal),
            other => panic!("{other:?}"),
        };
        write(&mut m, &mut host.tx);
        assert_eq!(m.fire(&mut host.tx, k, Instant::now()).unwrap(), None);
        write(&mut m, &mut host.tx);
        // Two packets of 16 + 8 bytes and an 8-byte trailer each.
        assert_eq!(m.fire(&mut host.tx, k, Instant::now()).unwrap(), Some(64));
        assert!(!m.owed());
        assert_eq!(m.fire(&mut host.tx, k, Instant::now()).unwrap(), None);
        // Due, but the reader polls: the signal is dropped, not kept for later.
        guest.rx.set_interrupt_mask(true);
        let mut m = Moderation::new();
        m.wrote(true);
        m.wrote(false);
        assert_eq!(m.fire(&mut host.tx, k, Instant::now()).unwrap(), None);
        assert!(!m.owed());
    }

    #[test]
    fn zero_frames_means_one() {
        let mut m = Moderation::new();
        m.wrote(true);
        assert!(m.due(knobs(0, 1_000_000), Instant::now()));
    }

    #[test]
    fn clear_forgets_the_owed_signal_and_the_next_one_counts_afresh() {
        let mut m = Moderation::new();
        m.wrote(true);
        m.wrote(false);
        m.clear();
        assert!(!m.owed());
        assert_eq!(m.since_owed(), 0);
        m.wrote(false);
        assert!(!m.owed(), "a write into a non-empty ring owes nothing");
        m.wrote(true);
        assert_eq!(m.since_owed(), 1);
    }
}
