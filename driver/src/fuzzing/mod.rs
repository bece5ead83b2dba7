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
    use std::path::{Path, PathBuf};

    use super::TARGETS;

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut v: Vec<PathBuf> = entries
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    }

    /// Every seed corpus file and every regression input of every target, through its harness.
    /// A harness that panics fails this test with the file's name.
    #[test]
    fn corpora_and_regressions_replay() {
        let mut total = 0;
        for (name, harness) in TARGETS {
            let seeds = files(&fuzz_dir().join("corpus").join(name));
            assert!(!seeds.is_empty(), "no seed corpus for {name}");
            let regressions = files(&fuzz_dir().join("regressions").join(name));
            for file in seeds.iter().chain(&regressions) {
                let data = std::fs::read(file).expect("reading a corpus file");
                let outcome = std::panic::catch_unwind(|| harness(&data));
                assert!(outcome.is_ok(), "{name}: {} fails", file.display());
                total += 1;
            }
        }
        assert!(total > 0);
    }

    /// A few hundred pseudo-random inputs per target, from a fixed seed: a cheap check that the
    /// harnesses themselves hold on inputs no corpus has (the fuzzers do this for real).
    #[test]
    fn harnesses_hold_on_random_inputs() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(12);
        for (name, harness) in TARGETS {
            for i in 0..300 {
                let len = rng.gen_range(0..600);
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let outcome = std::panic::catch_unwind(|| harness(&data));
                assert!(
                    outcome.is_ok(),
                    "{name}: random input {i} ({data:02x?}) fails"
                );
            }
        }
    }

    /// Every target has a cargo-fuzz binary (and no binary lacks a harness).
    #[test]
    fn every_target_has_a_fuzz_binary() {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        for (name, _) in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{name}\"")),
                "driver/fuzz/Cargo.toml has no [[bin]] {name}"
            );
            assert!(fuzz_dir()
                .join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file());
        }
        assert_eq!(manifest.matches("[[bin]]").count(), TARGETS.len());
    }
}
