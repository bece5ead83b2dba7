//! NIC unit tests: traffic through the rings between socket-pair backends, receive-buffer
//! exhaustion, moderation, and a hostile peer on either side.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Instant;

use super::*;
use crate::channel::{ChannelConfig, GuestEnd, HostEnd};
use crate::ring::{
    WriteOutcome, FLAG_COMPLETION_REQUESTED, PACKET_TYPE_COMPLETION, PACKET_TYPE_GPADL,
    PACKET_TYPE_INBAND, PACKET_TYPE_TRANSFER_PAGES,
};
use crate::trace;

fn frame(i: u32, len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|k| (k as u32).wrapping_mul(7).wrapping_add(i) as u8)
        .collect();
    f[..4].copy_from_slice(&i.to_le_bytes());
    f
}

fn knobs(s: &DeviceSettings) -> Arc<NicKnobs> {
    Arc::new(NicKnobs::new(s).unwrap())
}

/// Receives one frame from `pipe`, waiting up to 30 s.
fn recv_wait(pipe: &mut FramePipe) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 70_000];
    loop {
        if let Some(n) = pipe.recv_frame(&mut buf).unwrap() {
            return buf[..n].to_vec();
        }
        assert!(Instant::now() < deadline, "no frame within 30 s");
        let mut fds = [pollfd(pipe.raw_fd())];
        sleep_on(&mut fds, Duration::from_millis(50)).unwrap();
    }
}

#[test]
fn codecs_round_trip_and_reject_short_input() {
    let rx = RxPacket {
        section: 7,
        len: 1514,
        host_rx_ns: 123_456_789,
    };
    assert_eq!(RxPacket::decode(&rx.encode()), Some(rx));
    assert_eq!(RxPacket::decode(&rx.encode()[..20]), None);
    let tx = TxRequest {
        section: 3,
        len: 60,
    };
    assert_eq!(
        GuestMessage::decode(&tx.encode()),
        Some(GuestMessage::Tx(tx))
    );
    let post = RxPost { first: 1, count: 9 };
    assert_eq!(
        GuestMessage::decode(&post.encode()),
        Some(GuestMessage::RxPost(post))
    );
    assert_eq!(
        GuestMessage::decode(&[9, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]),
        None
    );
    assert_eq!(GuestMessage::decode(b"ab"), None);
    let c = NicCompletion { status: 5, len: 9 };
    assert_eq!(NicCompletion::decode(&c.encode()), Some(c));
    assert_eq!(NicCompletion::decode(&[1, 2, 3]), None);
    // An rx message is not a guest message, and vice versa.
    assert_eq!(GuestMessage::decode(&rx.encode()), None);
    assert_eq!(RxPacket::decode(&tx.encode()), None);
}

#[test]
fn options_are_checked() {
    NicOptions::default().validate().unwrap();
    assert!(NicOptions {
        section_bytes: 100,
        ..Default::default()
    }
    .validate()
    .is_err());
    assert!(NicOptions {
        recv_sections: 0,
        ..Default::default()
    }
    .validate()
    .is_err());
    assert_eq!(NicOptions::for_mtu(1500).section_bytes, 2048);
    assert_eq!(NicOptions::for_mtu(9000).section_bytes, 9024);
    assert_eq!(NicOptions::default().extra_bytes(), 768 * 2048);
}

#[test]
fn frames_cross_the_rings_intact_both_ways() {
    let (mut guest_outer, guest_inner) = FramePipe::pair().unwrap();
    let (mut host_outer, host_inner) = FramePipe::pair().unwrap();
    let settings = DeviceSettings {
        ring_out_bytes: 8192,
        ring_in_bytes: 8192,
        ..Default::default()
    };
    let opts = NicOptions {
        section_bytes: 2048,
        send_sections: 16,
        recv_sections: 16,
    };
    let nic = SyntheticNic::start(guest_inner, host_inner, 0, settings, opts).unwrap();
    let total = 600u32;
    let (mut tx_bytes, mut rx_bytes) = (0u64, 0u64);
    for i in 0..total {
        let len = 14 + (i as usize * 37) % 2034;
        let out = frame(i, len);
        guest_outer.send_frame(&out).unwrap();
        assert_eq!(recv_wait(&mut host_outer), out, "tx frame {i}");
        tx_bytes += len as u64;
        let back = frame(i ^ 0xffff, 2048 - len + 14);
        host_outer.send_frame(&back).unwrap();
        assert_eq!(recv_wait(&mut guest_outer), back, "rx frame {i}");
        rx_bytes += back.len() as u64;
    }
    // Counters are updated before the frame moves on, but tx completions may still be on their
    // way back: wait for them.
    let deadline = Instant::now() + Duration::from_secs(30);
    while nic.counters().tx_completions < total as u64 {
        assert!(Instant::now() < deadline, "{:?}", nic.counters());
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = nic.stop().unwrap();
    assert_eq!(
        (c.tx_completions, c.tx_bytes, c.tx_errors, c.host_tx_frames),
        (total as u64, tx_bytes, 0, total as u64)
    );
    assert_eq!(
        (c.rx_packets, c.rx_bytes, c.host_rx_frames, c.guest_errors),
        (total as u64, rx_bytes, total as u64, 0)
    );
    assert!(c.interrupts > 0 && c.doorbells > 0, "{c:?}");
}

#[test]
fn a_burst_larger_than_the_buffers_and_rings_arrives_whole_and_in_order() {
    let (mut guest_outer, guest_inner) = FramePipe::pair().unwrap();
    let (mut host_outer, host_inner) = FramePipe::pair().unwrap();
    // Small rings and buffers: the burst must wait for sections and ring space many times.
    let settings = DeviceSettings {
        ring_out_bytes: 8192,
        ring_in_bytes: 8192,
        moderation_frames: 4,
        moderation_usecs: 20,
        poll_budget: 8,
    };
    let opts = NicOptions {
        section_bytes: 256,
        send_sections: 4,
        recv_sections: 4,
    };
    let nic = SyntheticNic::start(guest_inner, host_inner, 0, settings, opts).unwrap();
    let total = 2000u32;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 512];
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < total as usize {
        assert!(
            Instant::now() < deadline,
            "{} of {total} arrived: {:?}",
            got.len(),
            nic.counters()
        );
        // Bursts of up to 64 (the sender waits when its socket is full).
        for _ in 0..64.min(total - sent) {
            host_outer
                .send_frame(&frame(sent, 60 + sent as usize % 190))
                .unwrap();
            sent += 1;
        }
        let before = got.len();
        while let Some(n) = guest_outer.recv_frame(&mut buf).unwrap() {
            got.push(buf[..n].to_vec());
        }
        if got.len() == before {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f, &frame(i as u32, 60 + i % 190), "frame {i}");
    }
    let c = nic.stop().unwrap();
    assert_eq!(c.rx_packets, total as u64);
    assert!(c.rx_buffer_exhausted > 0, "{c:?}");
}

fn raw_channel(opts: &NicOptions) -> (GuestEnd, HostEnd) {
    channel::create(&ChannelConfig {
        out_ring_bytes: 8192,
        in_ring_bytes: 8192,
        extra_bytes: opts.extra_bytes(),
    })
    .unwrap()
}

/// A host service with default knobs on a raw channel, for tests that play the guest by hand:
/// the guest end, the host tap's outer end, the service and its statistics.
fn vsp_on_raw_channel(
    opts: NicOptions,
) -> (GuestEnd, FramePipe, NicVsp<FramePipe>, Arc<NicHostStats>) {
    let (guest, host) = raw_channel(&opts);
    let (outer, inner) = FramePipe::pair().unwrap();
    let stats = Arc::new(NicHostStats::default());
    let vsp = NicVsp::new(
        host,
        inner,
        0,
        opts,
        knobs(&DeviceSettings::default()),
        Arc::clone(&stats),
    )
    .unwrap();
    (guest, outer, vsp, stats)
}

fn small_opts() -> NicOptions {
    NicOptions {
        section_bytes: 256,
        send_sections: 4,
        recv_sections: 4,
    }
}

/// Packets the host wrote into the inbound ring, read by a test acting as the guest.
fn inbound(guest: &mut GuestEnd) -> Vec<(PacketHeaderCopy, Vec<u8>)> {
    let mut v = Vec::new();
    while let Some((h, p)) = guest.rx.read().unwrap() {
        v.push((
            PacketHeaderCopy {
                ty: h.ty,
                flags: h.flags,
                trans_id: h.trans_id,
            },
            p,
        ));
    }
    guest.rx.commit();
    v
}

#[derive(Debug, Clone, Copy)]
struct PacketHeaderCopy {
    ty: u16,
    flags: u16,
    trans_id: u64,
}

#[test]
fn receive_buffer_exhaustion_stops_the_host_until_sections_return() {
    let opts = small_opts();
    let (mut guest, mut outer, mut vsp, stats) = vsp_on_raw_channel(opts);
    guest
        .tx
        .try_write(
            PACKET_TYPE_INBAND,
            0,
            0,
            &[&RxPost { first: 0, count: 4 }.encode()],
        )
        .unwrap();
    for i in 0..10 {
        outer.send_frame(&frame(i, 100)).unwrap();
    }
    for _ in 0..5 {
        vsp.poll_once(-1, Duration::from_millis(1)).unwrap();
    }
    let got = inbound(&mut guest);
    assert_eq!(got.len(), 4, "one frame per posted section, no more");
    let mut sections = Vec::new();
    for (i, (h, p)) in got.iter().enumerate() {
        assert_eq!(h.ty, PACKET_TYPE_TRANSFER_PAGES);
        assert_eq!(h.flags, FLAG_COMPLETION_REQUESTED);
        let rx = RxPacket::decode(p).unwrap();
        let mut data = vec![0u8; rx.len as usize];
        guest
            .extra
            .read_at(opts.recv_offset(rx.section), &mut data)
            .unwrap();
        assert_eq!(data, frame(i as u32, 100));
        sections.push((h.trans_id, rx.section));
    }
    assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 4);
    assert_eq!(stats.rx_buffer_exhausted.load(Ordering::Relaxed), 1);
    assert_eq!(vsp.posted_sections(), 0);
    // Return two sections: exactly two more frames (the next in order) arrive.
    for &(trans_id, _) in &sections[..2] {
        guest
            .tx
            .try_write(
                PACKET_TYPE_COMPLETION,
                0,
                trans_id,
                &[&NicCompletion::default().encode()],
            )
            .unwrap();
    }
    for _ in 0..5 {
        vsp.poll_once(-1, Duration::from_millis(1)).unwrap();
    }
    let got = inbound(&mut guest);
    assert_eq!(got.len(), 2);
    for (k, (_, p)) in got.iter().enumerate() {
        let rx = RxPacket::decode(p).unwrap();
        let mut data = vec![0u8; rx.len as usize];
        guest
            .extra
            .read_at(opts.recv_offset(rx.section), &mut data)
            .unwrap();
        assert_eq!(data, frame(4 + k as u32, 100));
    }
    // Returning a section twice is a completion for a tag not in flight: it breaks the
    // channel, posts nothing, and every later turn fails.
    guest
        .tx
        .try_write(
            PACKET_TYPE_COMPLETION,
            0,
            sections[0].0,
            &[&NicCompletion::default().encode()],
        )
        .unwrap();
    expect_guest_violation(&mut vsp, "return of unknown rx");
    assert_eq!(stats.guest_errors.load(Ordering::Relaxed), 1);
    assert_eq!(vsp.posted_sections(), 0);
    assert!(inbound(&mut guest).is_empty());
}

/// The host's next turn fails with a guest protocol violation mentioning `needle`, and every
/// turn after it with `Broken`.
fn expect_guest_violation(vsp: &mut NicVsp<FramePipe>, needle: &str) {
    let err = vsp.poll_once(-1, Duration::ZERO).unwrap_err();
    assert!(
        matches!(err, NicError::GuestProtocol(ref m) if m.contains(needle)),
        "{err} (wanted {needle:?})"
    );
    for _ in 0..2 {
        let err = vsp.poll_once(-1, Duration::ZERO).unwrap_err();
        assert!(
            matches!(err, NicError::Broken(ref m) if m.contains(needle)),
            "{err} (wanted Broken: {needle:?})"
        );
    }
}

#[test]
fn hostile_guest_requests_get_error_completions() {
    let opts = small_opts();
    let (mut guest, mut outer, mut vsp, stats) = vsp_on_raw_channel(opts);
    let bad_tx = [
        TxRequest {
            section: 4,
            len: 60,
        },
        TxRequest {
            section: u32::MAX,
            len: 60,
        },
        TxRequest { section: 0, len: 0 },
        TxRequest {
            section: 0,
            len: 257,
        },
    ];
    let mut expect = Vec::new();
    for (i, req) in bad_tx.iter().enumerate() {
        guest
            .tx
            .try_write(
                PACKET_TYPE_INBAND,
                FLAG_COMPLETION_REQUESTED,
                i as u64,
                &[&req.encode()],
            )
            .unwrap();
        expect.push((i as u64, libc::EINVAL as u32));
    }
    // A well-formed post of sections the host does not hold yet.
    guest
        .tx
        .try_write(
            PACKET_TYPE_INBAND,
            0,
            0,
            &[&RxPost { first: 0, count: 2 }.encode()],
        )
        .unwrap();
    vsp.poll_once(-1, Duration::from_millis(1)).unwrap();
    let got: Vec<(u64, u32)> = inbound(&mut guest)
        .into_iter()
        .map(|(h, p)| {
            assert_eq!(h.ty, PACKET_TYPE_COMPLETION);
            (h.trans_id, NicCompletion::decode(&p).unwrap().status)
        })
        .collect();
    assert_eq!(got, expect);
    assert_eq!(stats.guest_errors.load(Ordering::Relaxed), 4);
    assert_eq!(vsp.posted_sections(), 2);
    // The service still works: a good frame goes out.
    let good = frame(5, 60);
    guest.extra.write_at(opts.send_offset(1), &good).unwrap();
    guest
        .tx
        .try_write(
            PACKET_TYPE_INBAND,
            FLAG_COMPLETION_REQUESTED,
            99,
            &[&TxRequest {
                section: 1,
                len: 60,
            }
            .encode()],
        )
        .unwrap();
    vsp.poll_once(-1, Duration::from_millis(1)).unwrap();
    assert_eq!(recv_wait(&mut outer), good);
    let (h, p) = inbound(&mut guest).pop().unwrap();
    assert_eq!(
        (h.trans_id, NicCompletion::decode(&p).unwrap()),
        (99, NicCompletion { status: 0, len: 60 })
    );
    // A payload over the message limit breaks the ring: a typed error, no panic.
    guest
        .tx
        .try_write(PACKET_TYPE_INBAND, 0, 1, &[&[0u8; 200]])
        .unwrap();
    let err = vsp.poll_once(-1, Duration::from_millis(1)).unwrap_err();
    assert!(
        matches!(err, NicError::Ring(RingError::PayloadTooLarge { .. })),
        "{err}"
    );
    assert!(matches!(
        vsp.poll_once(-1, Duration::ZERO),
        Err(NicError::Broken(ref m)) if m.contains("exceeds")
    ));
}

/// A broken inbound ring (the guest moved its read index out of range) stops the host for
/// good, although the outbound ring is intact and holds a valid request: every later turn is
/// `Broken` (found by the nic_host fuzz target: a later turn used to read the other ring and
/// fail with a different error, or carry on).
#[test]
fn a_broken_inbound_ring_stops_the_host_although_the_outbound_one_is_intact() {
    let opts = small_opts();
    let (mut guest, _outer, mut vsp, _stats) = vsp_on_raw_channel(opts);
    let bad = TxRequest {
        section: 99,
        len: 60,
    };
    guest
        .tx
        .try_write(
            PACKET_TYPE_INBAND,
            FLAG_COMPLETION_REQUESTED,
            1,
            &[&bad.encode()],
        )
        .unwrap();
    // SAFETY: the test pokes the inbound ring's read index, the second word of its control
    // page, which starts one control page and one 8 KiB data area before the extra area.
    unsafe { (guest.extra.as_ptr().sub(4096 + 8192).add(4) as *mut u32).write_volatile(12) };
    let err = vsp.poll_once(-1, Duration::ZERO).unwrap_err();
    assert!(
        matches!(err, NicError::Ring(RingError::IndexMisaligned { .. })),
        "{err}"
    );
    // The guest now writes a good request on the intact outbound ring: nothing reads it.
    guest
        .tx
        .try_write(
            PACKET_TYPE_INBAND,
            FLAG_COMPLETION_REQUESTED,
            2,
            &[&bad.encode()],
        )
        .unwrap();
    for _ in 0..2 {
        let err = vsp.poll_once(-1, Duration::ZERO).unwrap_err();
        assert!(
            matches!(err, NicError::Broken(ref m) if m.contains("not 8-byte aligned")),
            "{err}"
        );
    }
}

/// Packets a guest cannot legally send break the channel: the host's turn fails with a typed
/// error naming the violation, and so does every later turn (it used to answer or count them
/// and carry on).
#[test]
fn illegal_guest_packets_break_the_channel() {
    let mut unknown = TxRequest {
        section: 0,
        len: 60,
    }
    .encode();
    unknown[0] = 77;
    let post = |first, count| RxPost { first, count }.encode().to_vec();
    let done = NicCompletion::default().encode().to_vec();
    let switch = proto::switch_request().to_vec();
    /// Packets (type, tag, payload) the guest sends, and what the violation names.
    type Case = (Vec<(u16, u64, Vec<u8>)>, &'static str);
    let cases: Vec<Case> = vec![
        (
            vec![(PACKET_TYPE_INBAND, 10, unknown.to_vec())],
            "does not decode",
        ),
        (
            vec![(PACKET_TYPE_INBAND, 11, b"abc".to_vec())],
            "does not decode",
        ),
        (
            vec![(PACKET_TYPE_GPADL, 12, unknown.to_vec())],
            "packet type 8",
        ),
        (vec![(PACKET_TYPE_INBAND, 13, switch)], "switch request"),
        (
            vec![(PACKET_TYPE_INBAND, 0, post(u32::MAX, 2))],
            "outside the receive buffer",
        ),
        (
            vec![(PACKET_TYPE_INBAND, 0, post(3, 2))],
            "outside the receive buffer",
        ),
        (
            vec![
                (PACKET_TYPE_INBAND, 0, post(0, 2)),
                (PACKET_TYPE_INBAND, 0, post(1, 1)),
            ],
            "posted twice",
        ),
        (
            vec![(PACKET_TYPE_COMPLETION, 0xdead_0000_0001, done)],
            "return of unknown rx",
        ),
    ];
    for (packets, needle) in cases {
        let (mut guest, _outer, mut vsp, stats) = vsp_on_raw_channel(small_opts());
        for (ty, tag, payload) in &packets {
            guest
                .tx
                .try_write(*ty, FLAG_COMPLETION_REQUESTED, *tag, &[payload])
                .unwrap();
        }
        expect_guest_violation(&mut vsp, needle);
        assert_eq!(stats.guest_errors.load(Ordering::Relaxed), 1, "{needle}");
        assert!(inbound(&mut guest).is_empty(), "{needle}: nothing answered");
    }
}

/// A guest that floods tx requests (bad ones, answered with `EINVAL` at once) and never reads
/// its inbound ring cannot grow the host: once the completions it holds reach its bound the host
/// stops reading requests, and it resumes, losing nothing, when the guest reads. The test drives
/// the host's turns itself, so nothing depends on time. (The host used to take 128 requests a
/// turn whatever it held: 0.7-2 GB in 10 s.)
#[test]
fn a_flooding_guest_that_never_reads_cannot_grow_the_host() {
    let opts = small_opts();
    let bound = (opts.send_sections + opts.recv_sections) as u64;
    let (mut guest, _outer, mut vsp, stats) = vsp_on_raw_channel(opts);
    let bad = TxRequest {
        section: 99,
        len: 60,
    }
    .encode();
    let mut written = 0u64;
    for _ in 0..200 {
        while let WriteOutcome::Written { .. } = guest
            .tx
            .try_write(
                PACKET_TYPE_INBAND,
                FLAG_COMPLETION_REQUESTED,
                written,
                &[&bad],
            )
            .unwrap()
        {
            written += 1;
        }
        vsp.poll_once(-1, Duration::ZERO).unwrap();
    }
    // 8 KiB rings: the inbound one holds 255 completions (32 bytes each), the outbound 204
    // requests (40 bytes each); the host holds at most `bound` more.
    let peak = stats.queue_peak.load(Ordering::Relaxed);
    assert!(
        peak <= bound && written <= 255 + bound + 204,
        "the host took {written} requests and held {peak} completions (bound {bound})"
    );
    assert!(stats.throttled.load(Ordering::Relaxed) > 0);
    // The guest reads: every request is answered, in order, and the flood goes on to the end.
    let mut next = 0u64;
    while next < 5_000 {
        for (h, p) in inbound(&mut guest) {
            assert_eq!(h.trans_id, next);
            assert_eq!(
                NicCompletion::decode(&p).unwrap().status,
                libc::EINVAL as u32
            );
            next += 1;
        }
        while written < 5_000 {
            match guest
                .tx
                .try_write(
                    PACKET_TYPE_INBAND,
                    FLAG_COMPLETION_REQUESTED,
                    written,
                    &[&bad],
                )
                .unwrap()
            {
                WriteOutcome::Written { .. } => written += 1,
                WriteOutcome::Full { .. } => break,
            }
        }
        vsp.poll_once(-1, Duration::ZERO).unwrap();
    }
    assert!(stats.queue_peak.load(Ordering::Relaxed) <= bound);
}

#[test]
fn a_corrupt_ring_index_from_the_guest_is_a_typed_error() {
    let (guest, _outer, mut vsp, _stats) = vsp_on_raw_channel(small_opts());
    // SAFETY: the test pokes the outbound ring's write_index, the first word of the region,
    // which starts two control pages and both 8 KiB data areas before the extra area.
    unsafe { (guest.extra.as_ptr().sub(2 * 4096 + 8192 + 8192) as *mut u32).write_volatile(12345) };
    let err = vsp.poll_once(-1, Duration::ZERO).unwrap_err();
    assert!(matches!(err, NicError::Ring(_)), "{err}");
}

/// A guest driver over a raw host end, with its initial post already read by the "host".
fn guest_with_raw_host() -> (NicVsc<FramePipe>, HostEnd, FramePipe) {
    let opts = small_opts();
    let (guest, mut host) = raw_channel(&opts);
    let (outer, inner) = FramePipe::pair().unwrap();
    let mut vsc = NicVsc::new(
        guest,
        inner,
        0,
        opts,
        knobs(&DeviceSettings::default()),
        Arc::default(),
    )
    .unwrap();
    assert!(vsc.poll_once(-1, Duration::ZERO).unwrap(), "posts at once");
    let (h, p) = host.rx.read().unwrap().unwrap();
    host.rx.commit();
    assert_eq!(h.ty, PACKET_TYPE_INBAND);
    assert_eq!(
        GuestMessage::decode(&p),
        Some(GuestMessage::RxPost(RxPost { first: 0, count: 4 }))
    );
    (vsc, host, outer)
}

fn rx_packet(host: &mut HostEnd, trans_id: u64, section: u32, len: u32) {
    let p = RxPacket {
        section,
        len,
        host_rx_ns: trace::monotonic_ns(),
    };
    host.tx
        .try_write(
            PACKET_TYPE_TRANSFER_PAGES,
            FLAG_COMPLETION_REQUESTED,
            trans_id,
            &[&p.encode()],
        )
        .unwrap();
}

/// The guest's next turn fails with a protocol violation mentioning `needle`, and every turn
/// after it with `Broken` (the channel stays broken although the ring itself is intact).
fn expect_protocol_error(vsc: &mut NicVsc<FramePipe>, needle: &str) {
    let err = vsc.poll_once(-1, Duration::ZERO).unwrap_err();
    assert!(
        matches!(err, NicError::Protocol(ref m) if m.contains(needle)),
        "{err} (wanted {needle:?})"
    );
    for _ in 0..2 {
        let err = vsc.poll_once(-1, Duration::ZERO).unwrap_err();
        assert!(
            matches!(err, NicError::Broken(ref m) if m.contains(needle)),
            "{err} (wanted Broken: {needle:?})"
        );
    }
}

#[test]
fn a_good_rx_packet_is_delivered_and_its_section_returned() {
    let (mut vsc, mut host, mut outer) = guest_with_raw_host();
    let f = frame(1, 200);
    host.extra
        .write_at(small_opts().recv_offset(2), &f)
        .unwrap();
    rx_packet(&mut host, 0x5_0000_0002, 2, 200);
    assert!(vsc.poll_once(-1, Duration::ZERO).unwrap());
    assert_eq!(recv_wait(&mut outer), f);
    let (h, p) = host.rx.read().unwrap().unwrap();
    assert_eq!(
        (h.ty, h.trans_id, NicCompletion::decode(&p)),
        (
            PACKET_TYPE_COMPLETION,
            0x5_0000_0002,
            Some(NicCompletion::default())
        )
    );
}

#[test]
fn hostile_host_packets_break_the_guest_with_typed_errors() {
    // A completion for a tag never sent.
    let (mut vsc, mut host, _outer) = guest_with_raw_host();
    host.tx
        .try_write(
            PACKET_TYPE_COMPLETION,
            0,
            0xdead_0000_0001,
            &[&NicCompletion::default().encode()],
        )
        .unwrap();
    expect_protocol_error(&mut vsc, "unknown");

    // A completion reporting more bytes than the frame had.
    let (mut vsc, mut host, mut outer) = guest_with_raw_host();
    outer.send_frame(&frame(0, 60)).unwrap();
    assert!(vsc.poll_once(-1, Duration::ZERO).unwrap());
    let (h, _) = host.rx.read().unwrap().unwrap();
    host.tx
        .try_write(
            PACKET_TYPE_COMPLETION,
            0,
            h.trans_id,
            &[&NicCompletion { status: 0, len: 61 }.encode()],
        )
        .unwrap();
    expect_protocol_error(&mut vsc, "61 bytes");

    // Rx packets naming a section outside the buffer, a frame longer than a section, and a
    // section the guest holds already (the same one twice).
    for (section, len, needle) in [
        (4u32, 60u32, "does not own"),
        (u32::MAX, 60, "does not own"),
        (0, 257, "sections hold 256"),
        (0, 3, "rx frame of 3 bytes"),
    ] {
        let (mut vsc, mut host, _outer) = guest_with_raw_host();
        rx_packet(&mut host, 1, section, len);
        expect_protocol_error(&mut vsc, needle);
    }
    let (mut vsc, mut host, _outer) = guest_with_raw_host();
    rx_packet(&mut host, 1, 0, 60);
    rx_packet(&mut host, 2, 0, 60);
    expect_protocol_error(&mut vsc, "does not own");

    // A short rx payload and an unexpected packet type.
    let (mut vsc, mut host, _outer) = guest_with_raw_host();
    host.tx
        .try_write(PACKET_TYPE_TRANSFER_PAGES, 0, 1, &[b"short"])
        .unwrap();
    expect_protocol_error(&mut vsc, "malformed rx packet");
    let (mut vsc, mut host, _outer) = guest_with_raw_host();
    host.tx
        .try_write(PACKET_TYPE_INBAND, 0, 1, &[&[0u8; 16]])
        .unwrap();
    expect_protocol_error(&mut vsc, "packet type 6");

    // An oversized payload and a corrupt index break the ring.
    let (mut vsc, mut host, _outer) = guest_with_raw_host();
    host.tx
        .try_write(PACKET_TYPE_COMPLETION, 0, 1, &[&[0u8; 100]])
        .unwrap();
    let err = vsc.poll_once(-1, Duration::ZERO).unwrap_err();
    assert!(
        matches!(err, NicError::Ring(RingError::PayloadTooLarge { .. })),
        "{err}"
    );
    let (mut vsc, host, _outer) = guest_with_raw_host();
    // SAFETY: the test pokes the inbound ring's write_index, the first word of its control
    // page, which starts one control page and one 8 KiB data area before the extra area.
    unsafe { (host.extra.as_ptr().sub(4096 + 8192) as *mut u32).write_volatile(4) };
    let err = vsc.poll_once(-1, Duration::ZERO).unwrap_err();
    assert!(matches!(err, NicError::Ring(_)), "{err}");
}

#[test]
fn moderation_bounds_interrupts_by_frames() {
    let (mut guest_outer, guest_inner) = FramePipe::pair().unwrap();
    let (mut host_outer, host_inner) = FramePipe::pair().unwrap();
    // Drain the guest's side as a stack would.
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        let mut n = 0u64;
        while n < 3000 {
            match guest_outer.recv_frame(&mut buf).unwrap() {
                Some(_) => n += 1,
                None => std::thread::sleep(Duration::from_micros(100)),
            }
        }
    });
    let settings = DeviceSettings {
        moderation_frames: 8,
        moderation_usecs: 100_000,
        poll_budget: 64,
        ..Default::default()
    };
    let nic =
        SyntheticNic::start(guest_inner, host_inner, 0, settings, NicOptions::default()).unwrap();
    let t0 = Instant::now();
    let total = 3000u64;
    let mut sent = 0u64;
    while sent < total {
        match host_outer.send_frame(&frame(sent as u32, 64)) {
            Ok(()) => sent += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(100))
            }
            Err(e) => panic!("{e}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while nic.counters().rx_packets < total {
        assert!(Instant::now() < deadline, "{:?}", nic.counters());
        std::thread::sleep(Duration::from_millis(5));
    }
    drain.join().unwrap();
    let c = nic.stop().unwrap();
    // At most one interrupt per 8 packets, plus the ones the 100 ms timer may fire.
    let timer_allowance = t0.elapsed().as_millis() as u64 / 100 + 2;
    assert!(
        c.interrupts <= total / 8 + timer_allowance,
        "{} interrupts for {total} packets",
        c.interrupts
    );
}

#[test]
fn moderation_timer_delivers_a_lone_frame() {
    let (mut guest_outer, guest_inner) = FramePipe::pair().unwrap();
    let (mut host_outer, host_inner) = FramePipe::pair().unwrap();
    let settings = DeviceSettings {
        moderation_frames: 64,
        moderation_usecs: 200,
        ..Default::default()
    };
    // Idle sides sleep for an hour: the guest's own idle poll cannot fetch the frame.
    let nic = SyntheticNic::start_idle(
        guest_inner,
        host_inner,
        0,
        settings,
        NicOptions::default(),
        Duration::from_secs(3600),
    )
    .unwrap();
    // Let the guest go idle (asleep, interrupts unmasked) first.
    std::thread::sleep(Duration::from_millis(50));
    let f = frame(9, 80);
    host_outer.send_frame(&f).unwrap();
    // Only the timer can wake the guest: 64 frames will never accumulate.
    assert_eq!(recv_wait(&mut guest_outer), f);
    // The interrupt is owed from the moment the frame was in the ring: were the guest still awake
    // then and reaped it unsignalled, the timer still fires.
    let deadline = Instant::now() + Duration::from_secs(30);
    while nic.counters().interrupts == 0 {
        assert!(
            Instant::now() < deadline,
            "no interrupt within 30 s: {:?}",
            nic.counters()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    nic.stop().unwrap();
}

#[test]
fn knobs_change_live_and_a_resize_needs_a_running_host() {
    let s = DeviceSettings::default();
    let k = NicKnobs::new(&s).unwrap();
    let changed = DeviceSettings {
        moderation_frames: 2,
        poll_budget: 16,
        ..s
    };
    k.apply(&changed).unwrap();
    assert_eq!(k.settings(), changed);
    // No host service took these knobs: nothing can switch channels.
    let err = k
        .apply(&DeviceSettings {
            ring_in_bytes: 8192,
            ..changed
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            NicError::Control(crate::control::ControlError::Unsupported(_))
        ),
        "{err}"
    );
    assert!(k
        .apply(&DeviceSettings {
            poll_budget: 0,
            ..s
        })
        .is_err());
    assert_eq!(k.settings(), changed);
}

/// Numbered frame `i` (sizes 60..=1459) of the sender tagged `tag`.
fn numbered(i: u32, tag: u8) -> Vec<u8> {
    let mut f = frame(i, 60 + (i as usize * 37) % 1400);
    f[4] = tag;
    f
}

/// Sends numbered frames into `pipe` in bursts of 32: at least `min` of them, and on until `stop`
/// is set. Returns how many it sent.
fn send_numbered(
    mut pipe: FramePipe,
    min: u32,
    stop: Arc<AtomicBool>,
    tag: u8,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut sent = 0u32;
        while sent < min || !stop.load(Ordering::Acquire) {
            pipe.send_frame(&numbered(sent, tag)).unwrap();
            if sent % 32 == 31 {
                std::thread::sleep(Duration::from_micros(300));
            }
            sent += 1;
        }
        sent
    })
}

/// Receives frames from `pipe` until `expected` have come (it starts at `usize::MAX` and is set
/// once the sender has finished) or none has come for 30 s; returns them with their arrival
/// times.
fn receive_all(
    mut pipe: FramePipe,
    expected: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Vec<(Instant, Vec<u8>)>> {
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut last = Instant::now();
        while got.len() < expected.load(Ordering::Acquire)
            && last.elapsed() < Duration::from_secs(30)
        {
            match pipe.recv_frame(&mut buf).unwrap() {
                Some(n) => {
                    last = Instant::now();
                    got.push((last, buf[..n].to_vec()));
                }
                None => {
                    let mut fds = [pollfd(pipe.raw_fd())];
                    sleep_on(&mut fds, Duration::from_millis(20)).unwrap();
                }
            }
        }
        got
    })
}

#[test]
fn live_resizes_up_and_down_under_traffic_both_ways_lose_nothing() {
    let (guest_outer, guest_inner) = FramePipe::pair().unwrap();
    let (host_outer, host_inner) = FramePipe::pair().unwrap();
    let settings = DeviceSettings {
        ring_out_bytes: 16384,
        ring_in_bytes: 16384,
        moderation_frames: 8,
        moderation_usecs: 50,
        poll_budget: 16,
    };
    let nic =
        SyntheticNic::start(guest_inner, host_inner, 0, settings, NicOptions::default()).unwrap();
    // Each way at least this many frames, and more until the last resize is done.
    let min = 20_000u32;
    let stop = Arc::new(AtomicBool::new(false));
    let tx_expected = Arc::new(AtomicUsize::new(usize::MAX));
    let rx_expected = Arc::new(AtomicUsize::new(usize::MAX));
    // tx: into the guest's backend, out of the host's; rx the other way.
    let tx_recv = receive_all(host_outer.try_clone().unwrap(), Arc::clone(&tx_expected));
    let rx_recv = receive_all(guest_outer.try_clone().unwrap(), Arc::clone(&rx_expected));
    let tx_send = send_numbered(guest_outer, min, Arc::clone(&stop), b't');
    let rx_send = send_numbered(host_outer, min, Arc::clone(&stop), b'r');
    let knobs: Arc<dyn crate::control::Tunable> = nic.knobs().clone();
    // Up and down, one ring or both, from 8 KiB to 4 MiB.
    let sizes = [
        (65536, 8192),
        (8192, 4 << 20),
        (1 << 20, 1 << 20),
        (8192, 8192),
        (262144, 16384),
        (16384, 262144),
    ];
    // Frames move both ways between every two resizes, and before the first and after the last
    // (the test exercises what it claims): before each resize and after the last, wait until
    // both directions have moved since the last look.
    let mut during = vec![nic.counters()];
    let mut traffic_since_last_look = || {
        let last = *during.last().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = nic.counters();
            if c.tx_completions > last.tx_completions && c.rx_packets > last.rx_packets {
                during.push(c);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no traffic both ways within 30 s after {} resizes: {:?}",
                during.len() - 1,
                during
                    .iter()
                    .chain([&c])
                    .map(|c| (c.tx_completions, c.rx_packets, c.doorbells, c.interrupts))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let mut stalls = Vec::new();
    for (out, inb) in sizes {
        traffic_since_last_look();
        let target = DeviceSettings {
            ring_out_bytes: out,
            ring_in_bytes: inb,
            ..knobs.settings()
        };
        knobs.apply(&target).unwrap();
        assert_eq!(knobs.settings(), target);
        let r = nic.knobs().last_resize().unwrap();
        assert_eq!(r.to, (out, inb));
        stalls.push(r.stall_ns());
    }
    traffic_since_last_look();
    stop.store(true, Ordering::Release);
    let tx_sent = tx_send.join().unwrap();
    let rx_sent = rx_send.join().unwrap();
    tx_expected.store(tx_sent as usize, Ordering::Release);
    rx_expected.store(rx_sent as usize, Ordering::Release);
    let (tx, rx) = (tx_recv.join().unwrap(), rx_recv.join().unwrap());
    assert_eq!(nic.knobs().resizes(), sizes.len() as u64);
    // A frame reaches the receiver before its completion reaches the guest: let the last
    // completions arrive before stopping (a clean-clone run stopped with 5 still in flight).
    let deadline = Instant::now() + Duration::from_secs(30);
    while nic.counters().tx_completions < tx_sent as u64 {
        assert!(
            Instant::now() < deadline,
            "{tx_sent} tx frames sent, not all completed within 30 s: {:?}",
            nic.counters()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = nic.stop().unwrap();
    // Every frame exactly once, in order, intact, each way.
    for (what, got, sent, tag) in [("tx", &tx, tx_sent, b't'), ("rx", &rx, rx_sent, b'r')] {
        assert_eq!(got.len(), sent as usize, "{what}: {c:?}");
        for (i, (_, f)) in got.iter().enumerate() {
            assert!(
                f == &numbered(i as u32, tag),
                "{what} frame {i} differs (lost, duplicated or reordered)"
            );
        }
    }
    assert_eq!(c.tx_completions, tx_sent as u64);
    assert_eq!(c.rx_packets, rx_sent as u64);
    assert_eq!(
        (c.tx_errors, c.guest_errors, c.tx_dropped),
        (0, 0, 0),
        "{c:?}"
    );
    let gap = |got: &Vec<(Instant, Vec<u8>)>| {
        got.windows(2)
            .map(|w| w[1].0 - w[0].0)
            .max()
            .unwrap_or_default()
    };
    let longest = *stalls.iter().max().unwrap();
    eprintln!(
        "{tx_sent} tx and {rx_sent} rx frames; resize stalls (us): {:?}; longest arrival gap \
         tx {:?} rx {:?}",
        stalls.iter().map(|s| s / 1000).collect::<Vec<_>>(),
        gap(&tx),
        gap(&rx)
    );
    // A sanity bound only: the stall is printed for the record (the measured figures are in
    // docs/nic.md); a unit test on a shared machine asserts no timing.
    assert!(
        longest < 5_000_000_000,
        "a resize stalled the NIC for {longest} ns"
    );
}

#[test]
fn an_idle_nic_resizes_at_once_and_keeps_working() {
    let (mut guest_outer, guest_inner) = FramePipe::pair().unwrap();
    let (mut host_outer, host_inner) = FramePipe::pair().unwrap();
    // Idle sides sleep for an hour, and a resize request that no driver starts within
    // RESIZE_START_TIMEOUT (3 s) is refused: the resize happens at all only because the request
    // wakes the idle guest, not because its idle poll runs out.
    let nic = SyntheticNic::start_idle(
        guest_inner,
        host_inner,
        0,
        DeviceSettings::default(),
        NicOptions::default(),
        Duration::from_secs(3600),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let target = DeviceSettings {
        ring_out_bytes: 8192,
        ring_in_bytes: 1 << 20,
        ..DeviceSettings::default()
    };
    // A refusal (a guest thread kept off the CPU for 3 s on a loaded machine) is retried; a
    // guest the request does not wake refuses every time.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match nic.knobs().apply(&target) {
            Ok(()) => break,
            Err(NicError::Control(crate::control::ControlError::Busy(m)))
                if Instant::now() < deadline =>
            {
                eprintln!("retrying: {m}");
            }
            Err(e) => panic!("the idle NIC did not resize: {e}"),
        }
    }
    assert_eq!(nic.settings(), target);
    assert_eq!(nic.knobs().resizes(), 1);
    for i in 0..3 {
        guest_outer.send_frame(&frame(i, 100)).unwrap();
        assert_eq!(recv_wait(&mut host_outer), frame(i, 100));
        host_outer.send_frame(&frame(i, 200)).unwrap();
        assert_eq!(recv_wait(&mut guest_outer), frame(i, 200));
    }
    let c = nic.stop().unwrap();
    assert_eq!((c.tx_completions, c.rx_packets, c.guest_errors), (3, 3, 0));
}

#[test]
fn a_switch_request_with_nothing_offered_is_refused_and_serving_goes_on() {
    let (mut guest, _outer, mut vsp, stats) = vsp_on_raw_channel(small_opts());
    // A guest (confused or hostile) asks to switch with no channel offered, then posts.
    for (tag, payload) in [
        (crate::disk::SWITCH_TAG, proto::switch_request().to_vec()),
        (0, RxPost { first: 0, count: 2 }.encode().to_vec()),
    ] {
        let flags = if tag == 0 {
            0
        } else {
            FLAG_COMPLETION_REQUESTED
        };
        guest
            .tx
            .try_write(PACKET_TYPE_INBAND, flags, tag, &[&payload])
            .unwrap();
    }
    vsp.poll_once(-1, Duration::ZERO).unwrap();
    let (h, p) = guest.rx.read().unwrap().unwrap();
    assert_eq!(
        (h.ty, h.trans_id),
        (PACKET_TYPE_COMPLETION, crate::disk::SWITCH_TAG)
    );
    assert_eq!(
        NicCompletion::decode(&p).unwrap().status,
        libc::EPROTO as u32
    );
    assert_eq!(stats.guest_errors.load(Ordering::Relaxed), 1);
    // Still on the old channel: the post that followed the request counts there.
    assert_eq!(vsp.posted_sections(), 2);
}
