//! The disk's tests: both sides over real channels and backing files, hostile peers on either
//! side, moderation bounds and queue limits.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::channel::{self, ChannelConfig};
use crate::ring::{
    WriteOutcome, FLAG_COMPLETION_REQUESTED, PACKET_TYPE_COMPLETION, PACKET_TYPE_INBAND,
};
use crate::settings::DeviceSettings;
use crate::trace::{OP_FLUSH, OP_READ, OP_WRITE};
use enlight_vmbus::mock::MockPeer;

#[test]
fn backing_files_grow_but_are_never_shrunk_unasked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("user.img");
    std::fs::write(&p, vec![7u8; 8192]).unwrap();
    for bytes in [0, 4096] {
        assert!(Backing::create(&p, bytes).is_err(), "{bytes}");
        assert_eq!(
            std::fs::read(&p).unwrap(),
            vec![7u8; 8192],
            "{bytes}: file changed"
        );
    }
    assert!(matches!(
        Backing::create(&p, 4096),
        Err(DiskError::WouldShrink {
            have: 8192,
            want: 4096,
            ..
        })
    ));
    Backing::create(&p, 8192).unwrap();
    Backing::create(&p, 16384).unwrap();
    let grown = std::fs::read(&p).unwrap();
    assert_eq!((grown.len(), &grown[..8192]), (16384, &[7u8; 8192][..]));
    Backing::resize(&p, 4096).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), vec![7u8; 4096]);
    assert!(Backing::resize(&p, 0).is_err());
    assert!(
        Backing::create(Path::new("/dev/null"), 4096).is_err(),
        "not a regular file"
    );
}

fn backing_with_pattern(sectors: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
    let data: Vec<u8> = (0..sectors * 512).map(|i| (i % 251) as u8).collect();
    std::fs::write(f.path(), &data).unwrap();
    f
}

fn reap_one(vsc: &mut DiskVsc) -> Completion {
    let mut out = Vec::new();
    while out.is_empty() {
        vsc.reap(&mut out, Duration::from_secs(5)).unwrap();
    }
    out[0]
}

/// A host service on a bare 8 KiB channel, for tests that play the guest by hand: the
/// guest end, the host's control and its thread.
fn host_on_raw_channel(
    backing: &Path,
) -> (
    channel::GuestEnd,
    VspControl,
    std::thread::JoinHandle<Result<(), DiskError>>,
) {
    let (guest, host) = channel::create(&ChannelConfig {
        out_ring_bytes: 8192,
        in_ring_bytes: 8192,
        extra_bytes: 8192,
    })
    .unwrap();
    let control = VspControl::new().unwrap();
    let backing = Backing::open(backing).unwrap();
    let t = {
        let control = control.clone();
        std::thread::spawn(move || serve(host, backing, 0, small(), control))
    };
    (guest, control, t)
}

fn small() -> DiskOptions {
    DiskOptions {
        max_io_bytes: 8192,
        queue_slots: 8,
        workers: 2,
    }
}

#[test]
fn read_returns_the_files_bytes_and_writes_stick() {
    let f = backing_with_pattern(64);
    let (mut vsc, vsp) =
        SyntheticDisk::start(f.path(), DeviceSettings::default(), 0, small()).unwrap();
    let Submitted::Queued(tag) = vsc.submit(OP_READ, 3, 8).unwrap() else {
        panic!("ring full")
    };
    let c = reap_one(&mut vsc);
    assert_eq!((c.tag, c.status, c.bytes, c.op), (tag, 0, 4096, OP_READ));
    let mut got = vec![0u8; 4096];
    vsc.read_completed(tag, &mut got).unwrap();
    let want: Vec<u8> = (3 * 512..3 * 512 + 4096u64)
        .map(|i| (i % 251) as u8)
        .collect();
    assert_eq!(got, want);

    let data = vec![0xabu8; 1024];
    vsc.submit_write(10, &data).unwrap();
    assert_eq!(reap_one(&mut vsc).status, 0);
    vsc.submit(OP_FLUSH, 0, 0).unwrap();
    assert_eq!(reap_one(&mut vsc).status, 0);
    let Submitted::Queued(tag) = vsc.submit(OP_READ, 10, 2).unwrap() else {
        panic!()
    };
    reap_one(&mut vsc);
    let mut got = vec![0u8; 1024];
    vsc.read_completed(tag, &mut got).unwrap();
    assert_eq!(got, data);
    vsp.stop().unwrap();
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[10 * 512..11 * 512], &[0xab; 512]);
}

#[test]
fn out_of_range_lba_completes_with_an_error() {
    let f = backing_with_pattern(16);
    let (mut vsc, vsp) =
        SyntheticDisk::start(f.path(), DeviceSettings::default(), 0, small()).unwrap();
    vsc.submit(OP_READ, 15, 2).unwrap();
    assert_eq!(reap_one(&mut vsc).status, libc::ERANGE as u32);
    assert_eq!(vsp.stats().errors.load(Ordering::Relaxed), 1);
}

#[test]
fn hostile_guest_requests_get_error_completions() {
    let f = backing_with_pattern(16);
    let (mut guest, control, t) = host_on_raw_channel(f.path());
    let bad = [
        DiskRequest {
            op: 99,
            sectors: 1,
            buf_len: 512,
            ..Default::default()
        },
        DiskRequest {
            op: OP_READ,
            sectors: 1,
            buf_len: 512,
            buf_offset: u64::MAX - 10,
            ..Default::default()
        },
        DiskRequest {
            op: OP_READ,
            sectors: 1,
            buf_len: 512,
            buf_offset: 8192,
            ..Default::default()
        },
        DiskRequest {
            op: OP_READ,
            sectors: 2,
            buf_len: 512,
            ..Default::default()
        },
        DiskRequest {
            op: OP_WRITE,
            sectors: 1,
            buf_len: 512,
            buf_offset: 100,
            ..Default::default()
        },
        DiskRequest {
            op: OP_READ,
            sectors: 1,
            buf_len: 512,
            lba: u64::MAX,
            ..Default::default()
        },
    ];
    for (i, req) in bad.iter().enumerate() {
        guest
            .tx
            .try_write(PACKET_TYPE_INBAND, 1, i as u64, &[&req.encode()])
            .unwrap();
    }
    guest.to_host.signal().unwrap();
    let mut buf = Vec::new();
    let mut statuses = Vec::new();
    while statuses.len() < 6 {
        match guest.rx.read_into(&mut buf).unwrap() {
            Some(h) => statuses.push((h.trans_id, DiskCompletion::decode(&buf).unwrap().status)),
            None => {
                guest.from_host.wait(Duration::from_millis(50)).unwrap();
            }
        }
    }
    assert!(statuses.iter().all(|(_, s)| *s != 0), "{statuses:?}");
    assert_eq!(control.stats().errors.load(Ordering::Relaxed), 6);
    // Then a corrupt ring index: the service stops with a typed error instead of crashing.
    // SAFETY: test pokes the outbound ring's write_index (first word of the region).
    unsafe { (guest.extra.as_ptr().sub(2 * 4096 + 8192 + 8192) as *mut u32).write_volatile(12345) };
    guest.to_host.signal().unwrap();
    let r = t.join().unwrap();
    assert!(matches!(r, Err(DiskError::Ring(_))), "{r:?}");
    control.request_stop();
}

/// Packets a guest cannot legally send (not a request, or a request that does not decode)
/// break the channel: the service stops with a typed error instead of answering and going on.
#[test]
fn illegal_guest_packets_stop_the_service() {
    let f = backing_with_pattern(16);
    let cases: [(u16, &[u8], &str); 3] = [
        (PACKET_TYPE_INBAND, b"short", "does not decode"),
        (PACKET_TYPE_COMPLETION, &[0u8; 8], "packet type 11"),
        (crate::ring::PACKET_TYPE_GPADL, &[0u8; 32], "packet type 8"),
    ];
    for (ty, payload, needle) in cases {
        let (mut guest, control, t) = host_on_raw_channel(f.path());
        guest.tx.try_write(ty, 1, 100, &[payload]).unwrap();
        guest.to_host.signal().unwrap();
        // A generous sanity bound, not a timing target: a service that carries on never ends.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !t.is_finished() {
            if Instant::now() > deadline {
                control.request_stop();
                let _ = t.join();
                panic!("{needle}: the service kept serving after the violation");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = t.join().unwrap();
        assert!(
            matches!(r, Err(DiskError::GuestProtocol(ref m)) if m.contains(needle)),
            "{needle}: {r:?}"
        );
        control.request_stop();
    }
}

/// A guest that floods requests (answered with an error status, so no I/O slows the host)
/// and never reads its inbound ring cannot grow the host: the service stops reading once
/// the completions it holds reach its queue bound, and resumes, losing nothing, when the
/// guest reads. (It used to read every request and queue every completion: 135-775 MB in
/// 10 s.) The assertions are on the service's own queue counters, not on time.
#[test]
fn a_flooding_guest_that_never_reads_cannot_grow_the_host() {
    let f = backing_with_pattern(16);
    let (mut guest, control, t) = host_on_raw_channel(f.path());
    let bound = small().queue_slots as u64;
    let bad = DiskRequest {
        op: 99,
        ..Default::default()
    }
    .encode();
    let stats = control.stats();
    let write = |guest: &mut channel::GuestEnd, tag: u64| {
        guest
            .tx
            .try_write(PACKET_TYPE_INBAND, FLAG_COMPLETION_REQUESTED, tag, &[&bad])
            .unwrap()
    };
    const FLOOD: u64 = 20_000;
    let mut written = 0u64;
    // Write until the host stops taking requests (its throttle counter moved and a wait
    // brought no progress), or until the whole flood went in, which a bounded host never
    // allows: 8 KiB rings hold a few hundred packets.
    let mut last_seen = u64::MAX;
    while written < FLOOD {
        match write(&mut guest, written) {
            WriteOutcome::Written { .. } => {
                written += 1;
                guest.to_host.signal().unwrap();
            }
            WriteOutcome::Full { .. } => {
                let seen = stats.requests.load(Ordering::Relaxed);
                if stats.throttled.load(Ordering::Relaxed) > 0 && seen == last_seen {
                    break;
                }
                last_seen = seen;
                guest.from_host.wait(Duration::from_millis(200)).unwrap();
            }
        }
    }
    let peak = stats.queue_peak.load(Ordering::Relaxed);
    assert!(
        written < FLOOD && peak <= bound,
        "the host took {written} requests and held {peak} completions (bound {bound})"
    );
    // The guest starts reading: every request gets its completion, in order, and the host
    // takes the rest of the flood.
    let mut buf = Vec::new();
    let mut next = 0u64;
    while next < FLOOD {
        while written < FLOOD {
            match write(&mut guest, written) {
                WriteOutcome::Written { .. } => written += 1,
                WriteOutcome::Full { .. } => break,
            }
        }
        guest.to_host.signal().unwrap();
        while let Some(h) = guest.rx.read_into(&mut buf).unwrap() {
            assert_eq!(h.trans_id, next);
            let c = DiskCompletion::decode(&buf).unwrap();
            assert_eq!(c.status, libc::EOPNOTSUPP as u32);
            next += 1;
        }
        if guest.rx.commit().signal_writer {
            guest.to_host.signal().unwrap();
        }
        if next < FLOOD {
            guest.from_host.wait(Duration::from_millis(50)).unwrap();
        }
    }
    assert!(stats.queue_peak.load(Ordering::Relaxed) <= bound);
    assert_eq!(stats.requests.load(Ordering::Relaxed), FLOOD);
    control.request_stop();
    t.join().unwrap().unwrap();
}

/// A switch request the host cannot honour (nothing offered in the hand-over slot) is
/// refused with EPROTO and the host keeps serving the old channel.
#[test]
fn an_unoffered_channel_switch_is_refused_and_serving_goes_on() {
    let f = backing_with_pattern(16);
    let (mut guest, control, t) = host_on_raw_channel(f.path());
    let switch = DiskRequest {
        op: OP_SWITCH_CHANNEL,
        ..Default::default()
    };
    let read = DiskRequest {
        op: OP_READ,
        sectors: 1,
        buf_len: 512,
        ..Default::default()
    };
    guest
        .tx
        .try_write(PACKET_TYPE_INBAND, 1, SWITCH_TAG, &[&switch.encode()])
        .unwrap();
    guest
        .tx
        .try_write(PACKET_TYPE_INBAND, 1, 5, &[&read.encode()])
        .unwrap();
    guest.to_host.signal().unwrap();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    while got.len() < 2 {
        match guest.rx.read_into(&mut buf).unwrap() {
            Some(h) => got.push((h.trans_id, DiskCompletion::decode(&buf).unwrap().status)),
            None => {
                guest.from_host.wait(Duration::from_millis(50)).unwrap();
            }
        }
    }
    assert_eq!(got, vec![(SWITCH_TAG, libc::EPROTO as u32), (5, 0)]);
    control.request_stop();
    t.join().unwrap().unwrap();
}

#[test]
fn hostile_host_completion_breaks_the_guest() {
    let f = backing_with_pattern(16);
    let (guest, host) = channel::create(&ChannelConfig {
        out_ring_bytes: 8192,
        in_ring_bytes: 8192,
        extra_bytes: 8192,
    })
    .unwrap();
    let _ = f;
    let mut host = MockPeer::from(host);
    let mut vsc = DiskVsc::new(guest, 0, DeviceSettings::default(), 4096, 16);
    vsc.submit(OP_READ, 0, 8).unwrap();
    let (h, _) = host.recv(Duration::from_secs(1)).expect("the read request");
    assert_ne!(h.trans_id, 0xdead_0000_0007);
    // A completion for a tag the guest never used.
    host.complete(0xdead_0000_0007, &DiskCompletion::default().encode());
    let err = vsc
        .reap(&mut Vec::new(), Duration::from_millis(100))
        .unwrap_err();
    assert!(
        matches!(err, DiskError::Protocol(ref m) if m.contains("unknown")),
        "{err}"
    );
    // The channel stays broken: every later call fails with the typed error, although the
    // ring itself is intact and the host now behaves.
    let broken = |r: Result<(), DiskError>| {
        assert!(
            matches!(r, Err(DiskError::Broken(ref m)) if m.contains("unknown")),
            "{r:?}"
        )
    };
    broken(vsc.reap(&mut Vec::new(), Duration::ZERO).map(|_| ()));
    broken(vsc.submit(OP_READ, 0, 8).map(|_| ()));
    broken(vsc.submit_write(0, &[0u8; 512]).map(|_| ()));
    broken(
        vsc.reap(&mut Vec::new(), Duration::from_millis(10))
            .map(|_| ()),
    );
}

#[test]
fn moderation_bounds_interrupts_by_frames() {
    let f = backing_with_pattern(2048);
    let settings = DeviceSettings {
        moderation_frames: 8,
        moderation_usecs: 100_000,
        poll_budget: 64,
        ..Default::default()
    };
    let (mut vsc, vsp) = SyntheticDisk::start(
        f.path(),
        settings,
        0,
        DiskOptions {
            max_io_bytes: 4096,
            queue_slots: 32,
            workers: 4,
        },
    )
    .unwrap();
    let total = 4000u64;
    let (mut submitted, mut done) = (0u64, 0u64);
    let mut out = Vec::new();
    let t0 = Instant::now();
    while done < total {
        while submitted < total && vsc.outstanding() < 32 {
            match vsc.submit(OP_READ, (submitted * 8) % 2040, 8).unwrap() {
                Submitted::Queued(_) => submitted += 1,
                Submitted::RingFull => break,
            }
        }
        out.clear();
        done += vsc.reap(&mut out, Duration::from_secs(5)).unwrap() as u64;
    }
    let interrupts = vsp.stats().interrupts.load(Ordering::Relaxed);
    // At most one interrupt per 8 completions, plus the ones the 100 ms timer may fire.
    let timer_allowance = t0.elapsed().as_millis() as u64 / 100 + 2;
    assert!(
        interrupts <= total / 8 + timer_allowance,
        "{interrupts} interrupts for {total} completions"
    );
    vsp.stop().unwrap();
}

#[test]
fn moderation_timer_signals_a_lone_completion() {
    let f = backing_with_pattern(16);
    let settings = DeviceSettings {
        moderation_frames: 64,
        moderation_usecs: 200,
        ..Default::default()
    };
    let (mut vsc, vsp) = SyntheticDisk::start(f.path(), settings, 0, small()).unwrap();
    vsc.submit(OP_READ, 0, 1).unwrap();
    let mut out = Vec::new();
    // The completion arrives: signalled or, if the host is slow, found by a pass after a
    // reap's timeout; either way it is reaped exactly once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.is_empty() {
        assert!(Instant::now() < deadline, "no completion within 30 s");
        vsc.reap(&mut out, Duration::from_secs(1)).unwrap();
    }
    assert_eq!(out.len(), 1);
    // Only the timer can signal it: 64 frames will never accumulate. (The host counts the
    // interrupt before signalling, but a completion found without it may be reaped first.)
    let interrupts = || vsp.stats().interrupts.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while interrupts() == 0 {
        assert!(
            Instant::now() < deadline,
            "the moderation timer never signalled the lone completion"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn queue_depth_is_bounded_by_slots() {
    let f = backing_with_pattern(64);
    let (mut vsc, _vsp) =
        SyntheticDisk::start(f.path(), DeviceSettings::default(), 0, small()).unwrap();
    for _ in 0..8 {
        vsc.submit(OP_READ, 0, 1).unwrap();
    }
    assert!(matches!(
        vsc.submit(OP_READ, 0, 1),
        Err(DiskError::QueueFull(8))
    ));
}
