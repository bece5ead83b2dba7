//! Signal and ring directions: the `direction` argument of the `signal` and `ring_full` USDT
//! sites (`u32` on the wire).

/// Which way a signal goes, or which ring a writer found full.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Guest → host: a doorbell, the outbound ring.
    GuestToHost = 0,
    /// Host → guest: an interrupt, the inbound ring.
    HostToGuest = 1,
}

/// Signal / ring direction: guest → host (doorbell, outbound ring).
pub const DIR_GUEST_TO_HOST: u32 = Direction::GuestToHost as u32;
/// Signal / ring direction: host → guest (interrupt, inbound ring).
pub const DIR_HOST_TO_GUEST: u32 = Direction::HostToGuest as u32;

impl Direction {
    /// The direction's code.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// The direction of a code; `None` for any other.
    pub const fn from_u32(code: u32) -> Option<Direction> {
        match code {
            DIR_GUEST_TO_HOST => Some(Direction::GuestToHost),
            DIR_HOST_TO_GUEST => Some(Direction::HostToGuest),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_traced_ones() {
        assert_eq!((DIR_GUEST_TO_HOST, DIR_HOST_TO_GUEST), (0, 1));
        for d in [Direction::GuestToHost, Direction::HostToGuest] {
            assert_eq!(Direction::from_u32(d.as_u32()), Some(d));
        }
        assert_eq!(Direction::from_u32(2), None);
    }
}
