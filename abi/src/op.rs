//! Op codes: the `op` argument of the `io_submit` and `io_complete` USDT sites, the `op` field of
//! an `io_reap` completion ([`crate::record::Completion`]) and of the synthetic disk's requests,
//! and (as a `u32`) of the eBPF programs' per-op key. Their names are the `op` label of
//! `/metrics` and the `op` field of the JSON API.

/// One op of a device. The discriminants are the codes on the wire and in the maps.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// A disk read.
    Read = 0,
    /// A disk write.
    Write = 1,
    /// A disk cache flush.
    Flush = 2,
    /// A NIC transmit.
    Tx = 3,
    /// A NIC receive.
    Rx = 4,
}

/// Op code: read.
pub const OP_READ: u16 = Op::Read.as_u16();
/// Op code: write.
pub const OP_WRITE: u16 = Op::Write.as_u16();
/// Op code: flush.
pub const OP_FLUSH: u16 = Op::Flush.as_u16();
/// Op code: NIC transmit.
pub const OP_TX: u16 = Op::Tx.as_u16();
/// Op code: NIC receive.
pub const OP_RX: u16 = Op::Rx.as_u16();

impl Op {
    /// Every op, in code order.
    pub const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Tx, Op::Rx];

    /// The op's code.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }

    /// The op of a code; `None` for a code this build does not know.
    pub const fn from_u16(code: u16) -> Option<Op> {
        Some(match code {
            0 => Op::Read,
            1 => Op::Write,
            2 => Op::Flush,
            3 => Op::Tx,
            4 => Op::Rx,
            _ => return None,
        })
    }

    /// The op's name in `/metrics` (`op` label) and the JSON API.
    pub const fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Tx => "tx",
            Op::Rx => "rx",
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// The name of any op code, as a map key carries it: the op's [`Op::name`], or `op<code>` for a
/// code with no [`Op`] (the kernel-device programs count discards as 5 and other requests as 6,
/// `probes/src/bpf/kernel.h`, which show as `op5` and `op6`).
pub fn name_of(code: u32) -> String {
    match u16::try_from(code).ok().and_then(Op::from_u16) {
        Some(op) => op.name().to_string(),
        None => format!("op{code}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_names_are_the_exposed_ones() {
        for (i, op) in Op::ALL.into_iter().enumerate() {
            assert_eq!(op.as_u16() as usize, i);
            assert_eq!(Op::from_u16(op.as_u16()), Some(op));
            assert_eq!(name_of(op.as_u16() as u32), op.name());
        }
        assert_eq!(
            Op::ALL.map(Op::name),
            ["read", "write", "flush", "tx", "rx"]
        );
        assert_eq!([OP_READ, OP_WRITE, OP_FLUSH, OP_TX, OP_RX], [0, 1, 2, 3, 4]);
        assert_eq!(Op::from_u16(5), None);
        assert_eq!(name_of(5), "op5");
        assert_eq!(name_of(6), "op6");
        // A code beyond u16 is not an op, whatever its low bits.
        assert_eq!(name_of(0x1_0000), "op65536");
        assert_eq!(Op::Tx.to_string(), "tx");
    }
}
