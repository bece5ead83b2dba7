//! A hostile peer that writes into shared memory while our code reads and writes it.
//!
//! Each scenario runs a scribbler thread that stores pseudo-random words anywhere in memory our
//! ends share with it (with atomic stores, as any peer thread in this process must: the peer's
//! own accesses are its business, ours must be defined whatever they are). In a normal run the
//! checks are functional: every call returns a value within its limits or a typed error, and
//! nothing panics. `scripts/test-all.sh` also runs this binary under ThreadSanitizer, where any
//! non-atomic access of ours to the memory the scribbler writes (a plain `memcpy` of packet
//! bytes, a reference into the area) is reported as a data race and fails the run.
//!
//! `harness = false`: libtest's own result channel is reported as a race by ThreadSanitizer when
//! the standard library is not instrumented, so this file is its own small runner.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use enlight_driver::channel::{self, ChannelConfig};
use enlight_driver::ring::{self, RingError, RingReader, RingWriter, PAGE_SIZE};

/// Raw shared memory the test owns: page-aligned, freed on drop.
struct Region {
    ptr: *mut u8,
    len: usize,
}

impl Region {
    fn new(len: usize) -> Region {
        let layout = std::alloc::Layout::from_size_align(len, PAGE_SIZE).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Region { ptr, len }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, PAGE_SIZE).unwrap();
        // SAFETY: allocated in new() with this layout; every user has been joined.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// A thread storing pseudo-random values into `[base, base + len)` until stopped (and at least
/// `min_stores` times): 8-byte words, or 4-byte words in the first `control_len` bytes (where
/// the ring's control page keeps its 32-bit indices).
struct Scribbler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Scribbler {
    fn start(base: *mut u8, len: usize, control_len: usize, min_stores: u64) -> Scribbler {
        let stop = Arc::new(AtomicBool::new(false));
        let (base, flag) = (base as usize, Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut stores = 0u64;
            while !flag.load(Ordering::Relaxed) || stores < min_stores {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let pick = (x >> 8) as usize;
                if control_len > 0 && x.is_multiple_of(16) {
                    let at = base + pick % (control_len / 4) * 4;
                    // SAFETY: inside the region, 4-aligned; this word is only accessed atomically.
                    let w = unsafe { AtomicU32::from_ptr(at as *mut u32) };
                    // Mostly plausible indices (aligned, small) so that both ends keep going.
                    w.store(((x >> 32) as u32 % 16384) & !7, Ordering::Relaxed);
                } else {
                    let words = (len - control_len) / 8;
                    let at = base + control_len + pick % words * 8;
                    // SAFETY: inside the region, 8-aligned; this word is only accessed atomically.
                    let w = unsafe { AtomicU64::from_ptr(at as *mut u64) };
                    w.store(x, Ordering::Relaxed);
                }
                stores += 1;
            }
            stores
        });
        Scribbler {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Both ends of one ring work while the peer scribbles over its control page and data area.
fn ring_ends_under_a_scribbling_peer() {
    let len = PAGE_SIZE * 3;
    let region = Region::new(len);
    // SAFETY: fresh, page-aligned, nobody uses it yet.
    unsafe { ring::ring_init(region.ptr, len).unwrap() };
    // Only the indices (the first 16 bytes) of the control page and the data area: the rest of
    // the control page is the reserved area and the feature bits, which nothing reads per packet.
    let scribbler = Scribbler::start(region.ptr, len, 16, 20_000);
    let mut buf = Vec::new();
    let (mut packets, mut errors) = (0u64, 0u64);
    for round in 0..2_000u64 {
        // SAFETY: the region outlives both ends (it is dropped after the scribbler is joined);
        // one writer and one reader at a time.
        let ends = unsafe {
            (
                RingWriter::new(region.ptr, len),
                RingReader::with_max_payload(region.ptr, len, 512),
            )
        };
        let (Ok(mut w), Ok(mut r)) = ends else {
            // A garbage index at start-up is a typed error too.
            errors += 1;
            continue;
        };
        for i in 0..8u64 {
            let _ = w.try_write(6, 0, round * 8 + i, &[&[i as u8; 40], &[1, 2, 3]]);
            match r.read_into(&mut buf) {
                Ok(Some(h)) => {
                    assert!(h.payload_len <= 512 && buf.len() == h.payload_len as usize);
                    packets += 1;
                }
                Ok(None) => {}
                Err(_) => {
                    assert_eq!(r.read_into(&mut buf), Err(RingError::Broken));
                    errors += 1;
                    break;
                }
            }
            r.commit();
        }
    }
    let stores = scribbler.finish();
    assert!(stores >= 20_000 && packets + errors > 0);
}

/// A channel's shared buffer area copied in and out (unaligned offsets and lengths too) while
/// the peer writes it.
fn shared_area_copies_under_a_scribbling_peer() {
    let (guest, host) = channel::create(&ChannelConfig {
        out_ring_bytes: 4096,
        in_ring_bytes: 4096,
        extra_bytes: 8192,
    })
    .unwrap();
    let (ptr, len) = guest.extra_area();
    let scribbler = Scribbler::start(ptr, len, 0, 20_000);
    let mut buf = vec![0u8; 3000];
    for i in 0..3_000usize {
        let offset = (i * 37) % 5000;
        let n = 1 + (i * 13) % 3000;
        host.extra.read_at(offset, &mut buf[..n]).unwrap();
        guest.extra.write_at(offset + 1, &buf[..n]).unwrap();
    }
    let other = channel::create(&ChannelConfig {
        out_ring_bytes: 4096,
        in_ring_bytes: 4096,
        extra_bytes: 8192,
    })
    .unwrap()
    .0;
    for _ in 0..50 {
        guest.extra.copy_to(&other.extra, 8192).unwrap();
    }
    scribbler.finish();
}

/// Packets cross a real channel between threads while the peer scribbles over the inbound
/// ring's data area (every ring access of both ends and the area in one process).
fn channel_exchange_under_a_scribbling_peer() {
    let (mut guest, mut host) = channel::create(&ChannelConfig {
        out_ring_bytes: 4096,
        in_ring_bytes: 4096,
        extra_bytes: 4096,
    })
    .unwrap();
    // The inbound ring's data area ends where the extra area starts.
    let (extra, _) = guest.extra_area();
    // SAFETY: pointer arithmetic inside the channel's mapping (the inbound data area is the
    // 4096 bytes before the extra area).
    let inbound_data = unsafe { extra.sub(4096) };
    let scribbler = Scribbler::start(inbound_data, 4096, 0, 20_000);
    let mut buf = Vec::new();
    let mut broken = false;
    for i in 0..5_000u64 {
        let _ = guest.tx.try_write(6, 1, i, &[&i.to_le_bytes()]);
        if let Ok(Some(h)) = host.rx.read_into(&mut buf) {
            let _ = host.tx.try_write(11, 0, h.trans_id, &[&buf]);
        }
        host.rx.commit();
        match guest.rx.read_into(&mut buf) {
            Ok(_) => {}
            Err(RingError::Broken) => broken = true,
            Err(_) => {}
        }
        guest.rx.commit();
        if broken {
            break;
        }
    }
    scribbler.finish();
}

fn main() {
    let tests: [(&str, fn()); 3] = [
        (
            "ring_ends_under_a_scribbling_peer",
            ring_ends_under_a_scribbling_peer,
        ),
        (
            "shared_area_copies_under_a_scribbling_peer",
            shared_area_copies_under_a_scribbling_peer,
        ),
        (
            "channel_exchange_under_a_scribbling_peer",
            channel_exchange_under_a_scribbling_peer,
        ),
    ];
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let t0 = Instant::now();
    let mut passed = 0;
    println!("\nrunning {} tests", tests.len());
    for (name, f) in tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        // A failing scenario panics, which ends the process with a non-zero status.
        f();
        println!("test {name} ... ok");
        passed += 1;
    }
    println!(
        "\ntest result: ok. {passed} passed; 0 failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        tests.len() - passed,
        t0.elapsed().as_secs_f64()
    );
}
