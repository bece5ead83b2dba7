//! The synthetic NIC's protocol, each side against a hostile other.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Result, Unstructured};

use super::{channel_windows, scribble, some_bytes};
use crate::channel::{self, ChannelConfig};
use crate::disk::SWITCH_TAG;
use crate::nic::{
    FrameIo, FramePipe, NicCompletion, NicError, NicHostStats, NicKnobs, NicOptions, NicVsc,
    NicVsp, RxPacket, RxPost, TxRequest, ETH_HLEN,
};
use crate::ring::{
    RingError, FLAG_COMPLETION_REQUESTED, PACKET_TYPE_COMPLETION, PACKET_TYPE_GPADL,
    PACKET_TYPE_INBAND, PACKET_TYPE_TRANSFER_PAGES,
};
use crate::settings::DeviceSettings;

fn options(u: &mut Unstructured) -> Result<NicOptions> {
    Ok(NicOptions {
        section_bytes: *u.choose(&[64u32, 256, 2048])?,
        send_sections: u.int_in_range(1..=4)?,
        recv_sections: u.int_in_range(1..=4)?,
    })
}

fn channel(opts: &NicOptions) -> (ChannelConfig, channel::GuestEnd, channel::HostEnd) {
    let cfg = ChannelConfig {
        out_ring_bytes: 4096,
        in_ring_bytes: 4096,
        extra_bytes: opts.extra_bytes(),
    };
    let (g, h) = channel::create(&cfg).expect("creating a channel");
    (cfg, g, h)
}

fn dead(e: &NicError) -> bool {
    matches!(e, NicError::Broken(_) | NicError::Ring(RingError::Broken))
}

/// Frames that reached a backend: never shorter than a header or longer than a section.
fn drain(pipe: &mut FramePipe, opts: &NicOptions) {
    let mut buf = vec![0u8; 70_000];
    while let Ok(Some(n)) = pipe.recv_frame(&mut buf) {
        assert!(
            n >= ETH_HLEN as usize && n <= opts.section_bytes as usize,
            "frame of {n}"
        );
    }
}

fn message(u: &mut Unstructured, opts: &NicOptions, tags: &[u64]) -> Result<(u16, u64, Vec<u8>)> {
    let small = |u: &mut Unstructured, n: u32| -> Result<u32> {
        if u.ratio(7, 8)? {
            u.int_in_range(0..=n)
        } else {
            u.arbitrary()
        }
    };
    Ok(match u.int_in_range(0..=9)? {
        0..=3 => {
            let req = TxRequest {
                section: small(u, opts.send_sections)?,
                len: small(u, opts.section_bytes + 1)?,
            };
            (PACKET_TYPE_INBAND, u.arbitrary()?, req.encode().to_vec())
        }
        4 | 5 => {
            let post = RxPost {
                first: small(u, opts.recv_sections)?,
                count: small(u, opts.recv_sections)?,
            };
            (PACKET_TYPE_INBAND, 0, post.encode().to_vec())
        }
        6 | 7 => {
            // A return of an rx section: mostly one the host really sent.
            let tag = if !tags.is_empty() && u.ratio(3, 4)? {
                *u.choose(tags)?
            } else {
                u.arbitrary()?
            };
            (
                PACKET_TYPE_COMPLETION,
                tag,
                NicCompletion::default().encode().to_vec(),
            )
        }
        8 => (
            *u.choose(&[PACKET_TYPE_INBAND, PACKET_TYPE_GPADL, 0xffff])?,
            // Never the switch tag: see below.
            u.arbitrary::<u64>()? & !1,
            some_bytes(u, 40)?,
        ),
        _ => {
            // A switch request with the wrong tag (the right one, with nothing offered, makes the
            // host wait for room for its answer; see `nic_host`).
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&4u32.to_le_bytes());
            (PACKET_TYPE_INBAND, u.arbitrary::<u64>()? & !1, b.to_vec())
        }
    })
}

/// The host service (`NicVsp`) against whatever a guest writes: tx requests for any section and
/// length, posts and returns of any sections, unknown messages and packet types, bytes in the
/// send buffer, frames arriving from its backend, between its turns. Requests with bad arguments
/// are answered with an error, a packet the guest cannot send breaks the channel for good, the
/// packets the host holds never exceed its bound, and every frame it sends to its backend or
/// puts in the receive buffer has a valid length and section.
pub fn nic_host(data: &[u8]) {
    let _ = host(&mut Unstructured::new(data));
}

fn host(u: &mut Unstructured) -> Result<()> {
    let opts = options(u)?;
    let (cfg, mut guest, host) = channel(&opts);
    let (mut outer, inner) = FramePipe::pair().expect("socketpair");
    let knobs = Arc::new(NicKnobs::new(&DeviceSettings::default()).expect("knobs"));
    let stats = Arc::new(NicHostStats::default());
    let mut vsp = NicVsp::new(host, inner, 0, opts, knobs, Arc::clone(&stats)).expect("a NIC host");
    let bound = (opts.send_sections + opts.recv_sections) as u64;
    let scribbling = u.ratio(1, 8)?;
    let _guard = scribbling.then(|| {
        // SAFETY: the channel's mapping outlives the guard (both ends are declared earlier and
        // dropped later); it is only accessed atomically.
        unsafe { scribble(&channel_windows(guest.extra.as_ptr(), &cfg), 17) }
    });
    let mut rx_tags: Vec<u64> = Vec::new();
    let mut broken = false;
    let mut first = true;
    for _ in 0..u.int_in_range(1..=40)? {
        match u.int_in_range(0..=9)? {
            0..=3 => {
                let (ty, tag, payload) = if first && u.ratio(1, 8)? {
                    // The right switch request on an empty ring: refused (nothing offered).
                    let mut b = [0u8; 16];
                    b[..4].copy_from_slice(&4u32.to_le_bytes());
                    (PACKET_TYPE_INBAND, SWITCH_TAG, b.to_vec())
                } else {
                    message(u, &opts, &rx_tags)?
                };
                let flags = if u.ratio(7, 8)? {
                    FLAG_COMPLETION_REQUESTED
                } else {
                    0
                };
                let _ = guest.tx.try_write(ty, flags, tag, &[&payload]);
            }
            4 => {
                let section = u.int_in_range(0..=opts.send_sections - 1)?;
                let n = u.int_in_range(0..=opts.section_bytes as usize)?;
                let bytes = u.bytes(n)?;
                guest
                    .extra
                    .write_at(opts.send_offset(section), bytes)
                    .expect("inside the send buffer");
            }
            5 => {
                let len = u.int_in_range(0..=opts.section_bytes as usize + 8)?;
                let _ = outer.send_frame(&vec![0x42; len]);
            }
            6 | 7 => {
                // The test backend is lossless and waits for room: keep it drained.
                drain(&mut outer, &opts);
                let r = vsp.poll_once(-1, Duration::ZERO);
                match r {
                    Ok(_) => assert!(!broken, "a turn succeeded on a broken channel"),
                    Err(e) if broken => assert!(dead(&e), "after the channel broke: {e}"),
                    Err(NicError::GuestProtocol(_) | NicError::Ring(_)) => broken = true,
                    Err(e) => panic!("unexpected error from the host: {e}"),
                }
                assert!(stats.queue_peak.load(Ordering::Relaxed) <= bound);
            }
            8 => {
                // The guest reads what the host wrote.
                let mut buf = Vec::new();
                while let Ok(Some(h)) = guest.rx.read_into(&mut buf) {
                    if h.ty == PACKET_TYPE_TRANSFER_PAGES && !scribbling {
                        let p = RxPacket::decode(&buf).expect("the host's rx packets decode");
                        assert!(p.section < opts.recv_sections);
                        assert!(p.len >= ETH_HLEN && p.len <= opts.section_bytes);
                        rx_tags.push(h.trans_id);
                    }
                }
                guest.rx.commit();
            }
            _ => drain(&mut outer, &opts),
        }
        first = false;
    }
    drain(&mut outer, &opts);
    Ok(())
}

/// The guest driver (`NicVsc`) against whatever a host writes: tx completions for tags in flight
/// or not, with any length and status; rx packets for any section and length; other packet
/// types and garbage; bytes in the receive buffer; with frames to send arriving from its
/// backend. Frames it delivers to its backend have valid lengths, it never has more tx frames in
/// flight than send sections, and once the host broke the protocol (or the ring), every later
/// turn fails.
pub fn nic_guest(data: &[u8]) {
    let _ = guest(&mut Unstructured::new(data));
}

fn guest(u: &mut Unstructured) -> Result<()> {
    let opts = options(u)?;
    let (cfg, guest, mut host) = channel(&opts);
    let (mut outer, inner) = FramePipe::pair().expect("socketpair");
    let knobs = Arc::new(NicKnobs::new(&DeviceSettings::default()).expect("knobs"));
    let extra = guest.extra.as_ptr();
    let mut vsc = NicVsc::new(guest, inner, 0, opts, knobs, Arc::default()).expect("a NIC guest");
    let scribbling = u.ratio(1, 8)?;
    let _guard = scribbling.then(|| {
        // SAFETY: as in `host`.
        unsafe { scribble(&channel_windows(extra, &cfg), 19) }
    });
    // Tx requests the host has read: (tag, frame length).
    let mut tx: Vec<(u64, u32)> = Vec::new();
    let mut posted: Vec<u32> = Vec::new();
    let mut broken = false;
    let mut buf = Vec::new();
    for _ in 0..u.int_in_range(1..=40)? {
        match u.int_in_range(0..=9)? {
            0 | 1 => {
                drain(&mut outer, &opts);
                let r = vsc.poll_once(-1, Duration::ZERO);
                match r {
                    Ok(_) => assert!(!broken, "a turn succeeded on a broken channel"),
                    Err(e) if broken => assert!(dead(&e), "after the channel broke: {e}"),
                    Err(NicError::Protocol(_) | NicError::Ring(_)) => broken = true,
                    Err(e) => panic!("unexpected error from the guest: {e}"),
                }
                assert!(vsc.tx_outstanding() <= opts.send_sections as usize);
            }
            2 => {
                let len = u.int_in_range(0..=opts.section_bytes as usize + 8)?;
                let _ = outer.send_frame(&vec![0x17; len]);
            }
            3 => {
                // The host reads the guest's requests, posts and returns.
                while let Ok(Some(h)) = host.rx.read_into(&mut buf) {
                    if scribbling || h.ty != PACKET_TYPE_INBAND {
                        continue;
                    }
                    match crate::nic::GuestMessage::decode(&buf) {
                        Some(crate::nic::GuestMessage::Tx(r)) => {
                            assert!(r.section < opts.send_sections);
                            assert!(r.len >= ETH_HLEN && r.len <= opts.section_bytes);
                            tx.push((h.trans_id, r.len));
                        }
                        Some(crate::nic::GuestMessage::RxPost(p)) => {
                            assert!(p.first as u64 + p.count as u64 <= opts.recv_sections as u64);
                            posted.extend(p.first..p.first + p.count);
                        }
                        m => panic!("the guest sent {m:?}"),
                    }
                }
                host.rx.commit();
            }
            4..=6 => {
                let payload;
                let (ty, tag) = if u.arbitrary()? {
                    let known = (!tx.is_empty())
                        .then(|| u.choose(&tx).copied())
                        .transpose()?;
                    let (tag, len) = match known {
                        Some(k) if u.ratio(3, 4)? => k,
                        _ => (u.arbitrary()?, u.arbitrary()?),
                    };
                    let c = NicCompletion {
                        status: *u.choose(&[0, 0, libc::EIO as u32])?,
                        len: *u.choose(&[len, len, 0, len.wrapping_add(1)])?,
                    };
                    payload = c.encode().to_vec();
                    (PACKET_TYPE_COMPLETION, tag)
                } else if u.ratio(4, 5)? {
                    let section = match posted.is_empty() {
                        false if u.ratio(3, 4)? => *u.choose(&posted)?,
                        _ => u.arbitrary()?,
                    };
                    let p = RxPacket {
                        section,
                        len: if u.ratio(7, 8)? {
                            u.int_in_range(0..=opts.section_bytes + 1)?
                        } else {
                            u.arbitrary()?
                        },
                        host_rx_ns: u.arbitrary()?,
                    };
                    payload = p.encode().to_vec();
                    (PACKET_TYPE_TRANSFER_PAGES, u.arbitrary()?)
                } else {
                    payload = some_bytes(u, 40)?;
                    (*u.choose(&[PACKET_TYPE_INBAND, 0xffff])?, u.arbitrary()?)
                };
                let _ = host
                    .tx
                    .try_write(ty, FLAG_COMPLETION_REQUESTED, tag, &[&payload]);
            }
            7 => {
                let section = u.int_in_range(0..=opts.recv_sections - 1)?;
                let n = u.int_in_range(0..=opts.section_bytes as usize)?;
                let bytes = u.bytes(n)?;
                host.extra
                    .write_at(opts.recv_offset(section), bytes)
                    .expect("inside the receive buffer");
            }
            _ => drain(&mut outer, &opts),
        }
    }
    drain(&mut outer, &opts);
    Ok(())
}
