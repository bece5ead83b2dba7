//! Fuzzing harnesses of the transport: what the cargo-fuzz targets in `vmbus/fuzz/` run on one
//! input, and the [`scribble`]r (a peer writing shared memory during our reads) that the harnesses
//! of the devices above (`enlight_driver::fuzzing`, `driver/fuzz/`) use too.
//!
//! The logic lives here, in the library, so that the fuzz targets (built with the `fuzzing`
//! feature) and the ordinary test suite run the same code: `cargo test` replays every file of the
//! seed corpora (`vmbus/fuzz/corpus/<target>/`) and every crash the fuzzers found
//! (`vmbus/fuzz/regressions/<target>/`) through [`TARGETS`].
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
//! Layout: one submodule per surface (`ring`, `channel`); the disk, NIC and control harnesses
//! live with those devices in `enlight_driver::fuzzing`.

mod channel;
mod ring;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

pub use channel::channel_handoff;
pub use ring::{ring_reader, ring_writer};

/// A harness: runs one input.
pub type Harness = fn(&[u8]);

/// Every target: its name (the cargo-fuzz target and the corpus directory) and its harness.
pub const TARGETS: [(&str, Harness); 3] = [
    ("ring_reader", ring_reader),
    ("ring_writer", ring_writer),
    ("channel_handoff", channel_handoff),
];

/// Up to `max` bytes of the input.
pub fn some_bytes(u: &mut arbitrary::Unstructured, max: usize) -> arbitrary::Result<Vec<u8>> {
    let n = u.int_in_range(0..=max)?;
    Ok(u.bytes(n)?.to_vec())
}

/// A stretch of shared memory the scribbler may write, and the width of its stores (4 for a
/// ring's control page, whose fields are 32-bit atomics; 8 for data areas, which our side
/// accesses as 64-bit words). Every store is an atomic of that width at an aligned address, so
/// the scribbler's accesses are the same size as ours.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// First byte (aligned to `width`).
    pub ptr: *mut u8,
    /// Length in bytes (a multiple of `width`).
    pub len: usize,
    /// 4 or 8.
    pub width: usize,
}

const MAX_WINDOWS: usize = 8;

/// The scribbler's shared state: the windows it writes while `active`, and a `busy` flag it
/// holds while it might be touching them (so that [`ScribbleGuard::drop`] can wait for it).
struct Shared {
    windows: [[AtomicUsize; 3]; MAX_WINDOWS],
    count: AtomicUsize,
    seed: AtomicU64,
    active: AtomicBool,
    busy: AtomicBool,
    stores: AtomicU64,
    thread: Mutex<Option<Thread>>,
    /// Held by the one [`ScribbleGuard`] alive: the windows are process-wide, so two callers at
    /// once (tests run on several threads) would have the scribbler write into memory the other
    /// has already unmapped (seen as SIGSEGV in the driver's unit tests).
    session: Mutex<()>,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<&'static Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let s: &'static Shared = Box::leak(Box::new(Shared {
            windows: Default::default(),
            count: AtomicUsize::new(0),
            seed: AtomicU64::new(1),
            active: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            stores: AtomicU64::new(0),
            thread: Mutex::new(None),
            session: Mutex::new(()),
        }));
        let t = std::thread::Builder::new()
            .name("fuzz-scribbler".into())
            .spawn(move || scribble_loop(s))
            .expect("spawning the scribbler thread");
        *s.thread.lock().expect("scribbler lock") = Some(t.thread().clone());
        s
    })
}

fn scribble_loop(s: &'static Shared) {
    let mut x = 0u64;
    let mut seed_seen = 0u64;
    let mut idle_since = std::time::Instant::now();
    loop {
        if !s.active.load(Ordering::SeqCst) {
            // Stay hot for a while (a fuzzer activates it every few runs, and waking a parked
            // thread costs more than a run), then sleep until the next activation.
            if idle_since.elapsed() < std::time::Duration::from_millis(20) {
                std::thread::yield_now();
            } else {
                std::thread::park_timeout(std::time::Duration::from_millis(50));
            }
            continue;
        }
        idle_since = std::time::Instant::now();
        // Dekker with `ScribbleGuard::drop`: set busy, then re-check active. Either the guard
        // sees busy and waits, or we see inactive and touch nothing.
        s.busy.store(true, Ordering::SeqCst);
        if !s.active.load(Ordering::SeqCst) {
            s.busy.store(false, Ordering::SeqCst);
            continue;
        }
        let seed = s.seed.load(Ordering::Relaxed);
        if seed != seed_seen {
            seed_seen = seed;
            x = seed | 1;
        }
        let n = s.count.load(Ordering::Relaxed);
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = &s.windows[(x >> 56) as usize % n.max(1)];
            let (ptr, len, width) = (
                w[0].load(Ordering::Relaxed),
                w[1].load(Ordering::Relaxed),
                w[2].load(Ordering::Relaxed),
            );
            if len < width || width == 0 {
                continue;
            }
            let at = ptr + (x as usize >> 8) % (len / width) * width;
            if width == 4 {
                // Mostly small, aligned values: plausible indices keep the other side going.
                let v = if x & 0x30 == 0 {
                    (x >> 32) as u32
                } else {
                    ((x >> 32) as u32 % 8192) & !7
                };
                // SAFETY: `at` is 4-aligned inside a window the guard keeps mapped while
                // `active`/`busy` say so; the memory is only ever accessed atomically with this
                // width in this process.
                unsafe { AtomicU32::from_ptr(at as *mut u32) }.store(v, Ordering::Relaxed);
            } else {
                // SAFETY: as above, 8-aligned, 64-bit accesses only.
                unsafe { AtomicU64::from_ptr(at as *mut u64) }.store(x, Ordering::Relaxed);
            }
        }
        s.stores.fetch_add(64, Ordering::Relaxed);
        s.busy.store(false, Ordering::SeqCst);
    }
}

/// While this guard lives, the scribbler thread writes random words into its windows; dropping
/// it waits until the scribbler has stopped touching them (so they may be unmapped).
pub struct ScribbleGuard {
    _session: std::sync::MutexGuard<'static, ()>,
}

/// A peer that writes during our reads: starts scribbling into `windows` (at most 8) and returns
/// once the scribbler has made its first stores, so that the caller's reads overlap them.
///
/// # Safety
/// Every window must be mapped, writable shared memory that this process accesses only
/// atomically (with the window's width), and it must stay mapped until the guard is dropped.
pub unsafe fn scribble(windows: &[Window], seed: u64) -> ScribbleGuard {
    let s = shared();
    assert!(windows.len() <= MAX_WINDOWS);
    // One session at a time; a caller that panicked while holding it left nothing behind (its
    // guard's drop stopped the scribbler), so a poisoned lock is still good.
    let session = s.session.lock().unwrap_or_else(|p| p.into_inner());
    for (slot, w) in s.windows.iter().zip(windows) {
        assert!(w.width == 4 || w.width == 8);
        assert!((w.ptr as usize).is_multiple_of(w.width) && w.len.is_multiple_of(w.width));
        slot[0].store(w.ptr as usize, Ordering::Relaxed);
        slot[1].store(w.len, Ordering::Relaxed);
        slot[2].store(w.width, Ordering::Relaxed);
    }
    s.count.store(windows.len(), Ordering::Relaxed);
    s.seed.store(seed, Ordering::Relaxed);
    let before = s.stores.load(Ordering::Relaxed);
    s.active.store(true, Ordering::SeqCst);
    if let Some(t) = &*s.thread.lock().expect("scribbler lock") {
        t.unpark();
    }
    // Wait (briefly) for the first stores: a thread that starts after our reads finished would
    // test nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_micros(500);
    while s.stores.load(Ordering::Relaxed) == before && std::time::Instant::now() < deadline {
        std::hint::spin_loop();
    }
    ScribbleGuard { _session: session }
}

impl Drop for ScribbleGuard {
    fn drop(&mut self) {
        let s = shared();
        s.active.store(false, Ordering::SeqCst);
        while s.busy.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
    }
}

/// The windows of a channel's whole mapping, for [`scribble`]: both control pages (32-bit
/// stores) and both data areas and the shared area (64-bit stores). `end_extra` is the start of
/// a channel end's extra area (`extra.as_ptr()`): the rings precede it in the same mapping.
/// Only addresses are computed here (wrapping arithmetic, nothing dereferenced); [`scribble`],
/// an `unsafe fn`, is where they must be valid.
pub fn channel_windows(end_extra: *mut u8, cfg: &crate::channel::ChannelConfig) -> Vec<Window> {
    use crate::ring::PAGE_SIZE;
    let (out_len, in_len) = (
        PAGE_SIZE + cfg.out_ring_bytes,
        PAGE_SIZE + cfg.in_ring_bytes,
    );
    let base = end_extra.wrapping_sub(out_len + in_len);
    let at = |off: usize| base.wrapping_add(off);
    let mut w = vec![
        // The control page words our side uses (indices, mask, pending size, feature bits).
        Window {
            ptr: base,
            len: 68,
            width: 4,
        },
        Window {
            ptr: at(PAGE_SIZE),
            len: cfg.out_ring_bytes,
            width: 8,
        },
        Window {
            ptr: at(out_len),
            len: 68,
            width: 4,
        },
        Window {
            ptr: at(out_len + PAGE_SIZE),
            len: cfg.in_ring_bytes,
            width: 8,
        },
    ];
    if cfg.extra_bytes > 0 {
        w.push(Window {
            ptr: end_extra,
            len: cfg.extra_bytes,
            width: 8,
        });
    }
    w
}

/// The checks every crate with cargo-fuzz targets runs in its unit tests (here for the ring and
/// channel targets, in `enlight_driver::fuzzing` for the devices'): they take the crate's fuzz
/// directory (the cargo-fuzz crate, with `corpus/`, `regressions/` and `fuzz_targets/`) and its
/// targets, and panic with the file or input that fails.
pub mod checks {
    use std::path::{Path, PathBuf};

    use super::Harness;

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
    /// A target without seeds, or a harness that panics, fails with the target's and the
    /// file's names.
    pub fn corpora_and_regressions_replay(fuzz_dir: &Path, targets: &[(&str, Harness)]) {
        let mut total = 0;
        for &(name, harness) in targets {
            let seeds = files(&fuzz_dir.join("corpus").join(name));
            assert!(!seeds.is_empty(), "no seed corpus for {name}");
            let regressions = files(&fuzz_dir.join("regressions").join(name));
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
    pub fn harnesses_hold_on_random_inputs(targets: &[(&str, Harness)]) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(12);
        for &(name, harness) in targets {
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

    /// Every target has a cargo-fuzz binary in `fuzz_dir` (and no binary lacks a harness).
    pub fn every_target_has_a_fuzz_binary(fuzz_dir: &Path, targets: &[(&str, Harness)]) {
        let manifest = std::fs::read_to_string(fuzz_dir.join("Cargo.toml")).unwrap();
        for &(name, _) in targets {
            assert!(
                manifest.contains(&format!("name = \"{name}\"")),
                "{}/Cargo.toml has no [[bin]] {name}",
                fuzz_dir.display()
            );
            assert!(fuzz_dir
                .join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file());
        }
        assert_eq!(manifest.matches("[[bin]]").count(), targets.len());
    }
}

/// The unit tests of a crate's fuzz targets: `fuzz_target_tests!(TARGETS);` inside a
/// `#[cfg(test)] mod tests` defines `corpora_and_regressions_replay`,
/// `harnesses_hold_on_random_inputs` and `every_target_has_a_fuzz_binary` over the calling
/// crate's `fuzz/` directory (its `CARGO_MANIFEST_DIR`), running the [`checks`].
#[macro_export]
macro_rules! fuzz_target_tests {
    ($targets:expr) => {
        fn fuzz_dir() -> ::std::path::PathBuf {
            ::std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
        }

        #[test]
        fn corpora_and_regressions_replay() {
            $crate::fuzzing::checks::corpora_and_regressions_replay(&fuzz_dir(), &$targets);
        }

        #[test]
        fn harnesses_hold_on_random_inputs() {
            $crate::fuzzing::checks::harnesses_hold_on_random_inputs(&$targets);
        }

        #[test]
        fn every_target_has_a_fuzz_binary() {
            $crate::fuzzing::checks::every_target_has_a_fuzz_binary(&fuzz_dir(), &$targets);
        }
    };
}

#[cfg(test)]
mod tests {
    crate::fuzz_target_tests!(super::TARGETS);
}
