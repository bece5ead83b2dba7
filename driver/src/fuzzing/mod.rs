//! Fuzzing harnesses: what every cargo-fuzz target in `driver/fuzz/` runs on one input.
//!
//! The logic lives here, in the library, so that the fuzz targets (built with the `fuzzing`
//! feature) and the ordinary test suite run the same code: `cargo test` replays every file of the
//! seed corpora (`driver/fuzz/corpus/<target>/`) and every crash the fuzzers found
//! (`driver/fuzz/regressions/<target>/`) through [`TARGETS`].
//!
//! Each harness decodes its input into structure (`arbitrary::Unstructured`): the peer's packets,
//! the indices and bytes it writes, the operations of our own side, so that the fuzzer explores
//! protocol states rather than framing errors. Each one checks invariants, not just "no panic":
//! a payload within the reader's limit, a violation that breaks the channel for good, a host
//! queue within its bound, completions only for tags in flight, a hand-off accepted only with its
//! seals, no descriptor leaked. Inputs also decide whether a [`Scribbler`] thread writes random
//! words into the shared memory while our side reads it (the peer writing during reads), which
//! both exercises validation of torn data and, under ThreadSanitizer, would expose any
//! non-atomic access.
//!
//! Layout: one submodule per device surface (`disk`, `nic`, `control`); the ring and channel
//! harnesses, and the scribbler all of them share, are in `enlight_vmbus::fuzzing`.

mod control;
mod disk;
mod nic;

pub use control::control_request;
pub use disk::{disk_guest, disk_host};
pub use nic::{nic_guest, nic_host};
// The scribbler and the channel's windows come with the transport, whose own harnesses (ring,
// channel) and cargo-fuzz targets live in `enlight_vmbus::fuzzing` and `vmbus/fuzz/`.
pub use enlight_vmbus::fuzzing::{channel_windows, scribble, some_bytes, ScribbleGuard, Window};

/// A harness: runs one input.
pub type Harness = fn(&[u8]);

/// Every target: its name (the cargo-fuzz target and the corpus directory) and its harness.
pub const TARGETS: [(&str, Harness); 5] = [
    ("disk_host", disk_host),
    ("disk_guest", disk_guest),
    ("nic_host", nic_host),
    ("nic_guest", nic_guest),
    ("control_request", control_request),
];

/// One of `choices`, or (one time in four) any value.
fn pick<'a, T: Copy + arbitrary::Arbitrary<'a>>(
    u: &mut arbitrary::Unstructured<'a>,
    choices: &[T],
) -> arbitrary::Result<T> {
    if u.ratio(1, 4)? {
        u.arbitrary()
    } else {
        u.choose(choices).copied()
    }
}

#[cfg(test)]
mod tests {
    enlight_vmbus::fuzz_target_tests!(super::TARGETS);
}
