//! The synthetic disk's protocol, each side against a hostile other.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use arbitrary::{Result, Unstructured};

use super::{channel_windows, pick, scribble, some_bytes};
use crate::channel::{self, ChannelConfig};
use crate::disk::{
    classify, do_io, DiskCompletion, DiskError, DiskOptions, DiskRequest, DiskVsc, GuestPacket,
    Submitted, MAX_PACKET_PAYLOAD, OP_SWITCH_CHANNEL, SECTOR, SLOT_ALIGN, SWITCH_TAG,
};
use crate::ring::{
    RingError, WriteOutcome, PACKET_TYPE_COMPLETION, PACKET_TYPE_GPADL, PACKET_TYPE_GPA_DIRECT,
    PACKET_TYPE_INBAND, PACKET_TYPE_TRANSFER_PAGES,
};
use crate::settings::DeviceSettings;
use crate::trace::{OP_FLUSH, OP_READ, OP_WRITE};

/// A memfd-backed backing file of `bytes`, filled with a pattern.
fn backing(bytes: usize) -> File {
    // SAFETY: a valid C string; we own the descriptor on success.
    let fd = unsafe { libc::memfd_create(c"fuzz-backing".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let pattern: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    std::io::Write::write_all(&mut &file, &pattern).expect("filling the backing file");
    file
}

fn pread(file: &File, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut v, at).expect("reading the backing");
    v
}

fn request(u: &mut Unstructured, capacity: u64, options: &DiskOptions) -> Result<Vec<u8>> {
    let sectors = if u.ratio(7, 8)? {
        u.int_in_range(0..=options.max_io_bytes / SECTOR + 1)?
    } else {
        u.arbitrary()?
    };
    let slots = options.queue_slots as u64;
    let req = DiskRequest {
        op: *u.choose(&[
            OP_READ,
            OP_READ,
            OP_WRITE,
            OP_WRITE,
            OP_FLUSH,
            OP_SWITCH_CHANNEL,
            77,
        ])?,
        reserved: if u.ratio(1, 8)? { u.arbitrary()? } else { 0 },
        sectors,
        lba: if u.ratio(7, 8)? {
            u.int_in_range(0..=capacity + 2)?
        } else {
            u.arbitrary()?
        },
        buf_offset: if u.ratio(7, 8)? {
            u.int_in_range(0..=slots)? * options.max_io_bytes as u64
        } else {
            u.arbitrary()?
        },
        buf_len: if u.ratio(7, 8)? {
            sectors.wrapping_mul(SECTOR)
        } else {
            u.arbitrary()?
        },
        reserved2: 0,
    };
    let mut bytes = req.encode().to_vec();
    if u.ratio(1, 8)? {
        bytes.truncate(u.int_in_range(0..=32)?);
    }
    Ok(bytes)
}

/// The host service's handling of whatever a guest puts in the outbound ring, packet by packet
/// as `serve` does it (`classify`, then the I/O on a memfd-backed file into the shared slots):
/// only a valid request reaches the file, inside the disk and the shared area; a bad request is
/// answered with an error status; anything a guest cannot send is a violation that ends the
/// service; a completion never reports more than was asked; with no peer scribbling, a read
/// puts exactly the file's bytes in the slot and a write puts the slot's bytes in the file.
pub fn disk_host(data: &[u8]) {
    let _ = host(&mut Unstructured::new(data));
}

fn host(u: &mut Unstructured) -> Result<()> {
    let options = DiskOptions {
        max_io_bytes: 4096 * u.int_in_range(1..=2)?,
        queue_slots: u.int_in_range(1..=3)?,
        workers: 1,
    };
    let cfg = ChannelConfig {
        out_ring_bytes: 4096,
        in_ring_bytes: 4096,
        extra_bytes: (options.max_io_bytes * options.queue_slots) as usize,
    };
    let (mut guest, mut host) = channel::create(&cfg).expect("creating a channel");
    host.rx.set_max_payload(MAX_PACKET_PAYLOAD);
    let capacity = u.int_in_range(0..=64u64)?;
    let file = backing(capacity as usize * SECTOR as usize);
    for _ in 0..u.int_in_range(1..=24)? {
        let ty = *u.choose(&[
            PACKET_TYPE_INBAND,
            PACKET_TYPE_INBAND,
            PACKET_TYPE_INBAND,
            PACKET_TYPE_INBAND,
            PACKET_TYPE_COMPLETION,
            PACKET_TYPE_TRANSFER_PAGES,
            PACKET_TYPE_GPADL,
            PACKET_TYPE_GPA_DIRECT,
            0xffff,
        ])?;
        let tag = if u.ratio(1, 8)? {
            SWITCH_TAG
        } else {
            u.arbitrary()?
        };
        let payload = if u.ratio(7, 8)? {
            request(u, capacity, &options)?
        } else {
            some_bytes(u, 300)?
        };
        match guest.tx.try_write(ty, u.arbitrary()?, tag, &[&payload]) {
            Ok(WriteOutcome::Written { .. }) => {}
            Ok(WriteOutcome::Full { .. }) => break,
            Err(e) => panic!("an honest guest writer failed: {e}"),
        }
    }
    let scribbling = u.ratio(1, 8)?;
    let _guard = scribbling.then(|| {
        // SAFETY: the windows lie in the channel's mapping, which both ends keep alive beyond
        // the guard (declared later, dropped first), and are only accessed atomically.
        unsafe { scribble(&channel_windows(guest.extra.as_ptr(), &cfg), 11) }
    });
    let mut buf = Vec::new();
    loop {
        let h = match host.rx.read_into(&mut buf) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => {
                // A ring violation (an oversized packet, or a scribbling peer's garbage) ends the
                // service.
                assert!(
                    scribbling || matches!(e, RingError::PayloadTooLarge { .. }),
                    "an honest ring failed: {e}"
                );
                break;
            }
        };
        assert!(buf.len() <= MAX_PACKET_PAYLOAD as usize);
        match classify(&h, &buf, capacity, host.extra.len(), options) {
            Err(_) => {
                assert!(h.ty != PACKET_TYPE_INBAND || DiskRequest::decode(&buf).is_none());
                break;
            }
            Ok(GuestPacket::Switch) => {
                assert_eq!(h.trans_id, SWITCH_TAG);
            }
            Ok(GuestPacket::Reject(status)) => {
                assert_ne!(status, 0);
                let c = DiskCompletion { status, bytes: 0 };
                let _ = host
                    .tx
                    .try_write(PACKET_TYPE_COMPLETION, 0, h.trans_id, &[&c.encode()]);
            }
            Ok(GuestPacket::Io(req)) => {
                let sectors = req.sectors as u64;
                if req.op != OP_FLUSH {
                    assert!(req.op == OP_READ || req.op == OP_WRITE);
                    assert!(sectors > 0 && sectors * SECTOR as u64 == req.buf_len as u64);
                    assert!(req.buf_len <= options.max_io_bytes);
                    assert!(req.buf_offset.is_multiple_of(SLOT_ALIGN as u64));
                    assert!(req.buf_offset + req.buf_len as u64 <= host.extra.len() as u64);
                    assert!(req.lba + sectors <= capacity);
                }
                let c = do_io(&file, &host.extra, &req);
                assert!(c.bytes <= req.buf_len);
                if c.status == 0 && req.op != OP_FLUSH {
                    assert_eq!(c.bytes, req.buf_len);
                    if !scribbling {
                        let mut slot = vec![0u8; req.buf_len as usize];
                        host.extra
                            .read_at(req.buf_offset as usize, &mut slot)
                            .expect("a validated slot");
                        let disk = pread(&file, req.lba * SECTOR as u64, req.buf_len as usize);
                        assert_eq!(slot, disk, "slot and file disagree after op {}", req.op);
                    }
                }
                let _ = host
                    .tx
                    .try_write(PACKET_TYPE_COMPLETION, 0, h.trans_id, &[&c.encode()]);
            }
        }
    }
    host.rx.commit();
    Ok(())
}

fn dead(e: &DiskError) -> bool {
    matches!(e, DiskError::Broken(_) | DiskError::Ring(RingError::Broken))
}

/// The guest driver (`DiskVsc`) against whatever a host writes into its inbound ring:
/// completions for tags in flight or not, of the right length or not, packets of other types,
/// and garbage, between submissions and reaps. The driver reports each completion exactly once
/// and only for a request in flight, never has more requests in flight than slots, and once the
/// host broke the protocol (or the ring), every later call fails.
pub fn disk_guest(data: &[u8]) {
    let _ = guest(&mut Unstructured::new(data));
}

fn guest(u: &mut Unstructured) -> Result<()> {
    let max_io = 4096u32;
    let slots = u.int_in_range(1..=4u32)?;
    let cfg = ChannelConfig {
        out_ring_bytes: 4096,
        in_ring_bytes: 4096,
        extra_bytes: (max_io * slots) as usize,
    };
    let (mut guest, mut host) = channel::create(&cfg).expect("creating a channel");
    guest.rx.set_max_payload(MAX_PACKET_PAYLOAD);
    let extra = guest.extra.as_ptr();
    let mut vsc = DiskVsc::new(guest, 0, DeviceSettings::default(), max_io, 64);
    let scribbling = u.ratio(1, 8)?;
    let _guard = scribbling.then(|| {
        // SAFETY: as in `host`: the mapping outlives the guard.
        unsafe { scribble(&channel_windows(extra, &cfg), 13) }
    });
    // Tags the driver handed out and has not reported complete, with their byte counts.
    let mut in_flight: Vec<(u64, u32)> = Vec::new();
    let mut done: HashSet<u64> = HashSet::new();
    let mut broken = false;
    let mut buf = Vec::new();
    let check = |r: std::result::Result<(), DiskError>, broken: &mut bool| match r {
        Ok(()) => assert!(!*broken, "a call succeeded on a broken channel"),
        Err(e) if *broken => assert!(dead(&e), "after the channel broke: {e}"),
        Err(DiskError::Protocol(_) | DiskError::Ring(_)) => *broken = true,
        Err(DiskError::Invalid(_) | DiskError::QueueFull(_)) => {}
        Err(e) => panic!("unexpected error from the driver: {e}"),
    };
    for _ in 0..u.int_in_range(1..=48)? {
        match u.int_in_range(0..=9)? {
            0 | 1 => {
                let op = *u.choose(&[OP_READ, OP_WRITE, OP_FLUSH, 99])?;
                let sectors = u.int_in_range(0..=9)?;
                let r = vsc.submit(op, u.int_in_range(0..=70)?, sectors);
                if let Ok(Submitted::Queued(tag)) = &r {
                    in_flight.push((*tag, if op == OP_FLUSH { 0 } else { sectors * SECTOR }));
                }
                check(r.map(|_| ()), &mut broken);
            }
            2 => {
                let n = u.int_in_range(0..=9)? as usize * SECTOR as usize;
                let data = vec![u.arbitrary::<u8>()?; n];
                let r = vsc.submit_write(u.int_in_range(0..=70)?, &data);
                if let Ok(Submitted::Queued(tag)) = &r {
                    in_flight.push((*tag, n as u32));
                }
                check(r.map(|_| ()), &mut broken);
            }
            3..=5 => {
                // The host writes something into the inbound ring.
                let ty = *u.choose(&[
                    PACKET_TYPE_COMPLETION,
                    PACKET_TYPE_COMPLETION,
                    PACKET_TYPE_COMPLETION,
                    PACKET_TYPE_INBAND,
                    PACKET_TYPE_TRANSFER_PAGES,
                ])?;
                let known = (!in_flight.is_empty())
                    .then(|| u.choose(&in_flight).copied())
                    .transpose()?;
                let (tag, bytes) = match (u.int_in_range(0..=5)?, known) {
                    (0..=3, Some(k)) => k,
                    (4, _) => (SWITCH_TAG, 0),
                    _ => (u.arbitrary()?, u.arbitrary()?),
                };
                let payload = if u.ratio(7, 8)? {
                    let c = DiskCompletion {
                        status: pick(u, &[0, 0, libc::EIO as u32])?,
                        bytes: pick(u, &[bytes, bytes, 0])?,
                    };
                    c.encode().to_vec()
                } else {
                    some_bytes(u, 40)?
                };
                let _ = host.tx.try_write(ty, 0, tag, &[&payload]);
            }
            6..=8 => {
                let mut out = Vec::new();
                let r = vsc.reap(&mut out, Duration::ZERO);
                if let Ok(n) = &r {
                    assert_eq!(*n, out.len());
                }
                for c in &out {
                    let i = in_flight
                        .iter()
                        .position(|(t, _)| *t == c.tag)
                        .unwrap_or_else(|| panic!("completion for tag {:#x} not in flight", c.tag));
                    let (_, bytes) = in_flight.swap_remove(i);
                    assert!(c.bytes <= bytes);
                    assert!(done.insert(c.tag), "tag {:#x} completed twice", c.tag);
                }
                check(r.map(|_| ()), &mut broken);
            }
            _ => {
                // The host takes the requests (making room for more).
                while let Ok(Some(_)) = host.rx.read_into(&mut buf) {}
                host.rx.commit();
                let mut b = [0u8; 512];
                let tag = u.arbitrary()?;
                let _ = vsc.read_completed(tag, &mut b);
            }
        }
        assert!(vsc.outstanding() <= vsc.queue_slots());
        assert_eq!(vsc.outstanding(), in_flight.len());
    }
    Ok(())
}
