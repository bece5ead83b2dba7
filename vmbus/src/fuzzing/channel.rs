//! The channel hand-off and the memfd's lifecycle against a hostile sender.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use arbitrary::{Result, Unstructured};

use super::{channel_windows, scribble, some_bytes};
use crate::channel::{
    create, eventfd, handoff_header, receive_host_end, send_with_fds, ChannelConfig, ChannelError,
    HANDOFF_HEADER_LEN,
};
use crate::ring::{RingError, WriteOutcome, PAGE_SIZE};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The hand-off of a host end over a Unix socket, from a sender that may lie about everything:
/// the header (magic, version, sizes), the descriptors (how many, which kinds), the memfd's size
/// and seals, and what it does to the memfd afterwards. A host end is accepted only if its memfd
/// is sealed against resizing and as large as the header says, and then the region can never
/// shrink or grow under it and its rings work; anything else is a typed error. Across the whole
/// lifecycle (create, seal, send, receive, map, use, drop) no descriptor leaks.
pub fn channel_handoff(data: &[u8]) {
    let before = open_fds();
    let _ = handoff(&mut Unstructured::new(data));
    // Descriptors are counted process-wide: only the fuzzer (cfg fuzzing, one input at a time)
    // can attribute a change to this input; `cargo test` runs other tests beside it.
    if cfg!(fuzzing) {
        assert_eq!(open_fds(), before, "a descriptor leaked");
    }
}

/// What the sender sent, as far as the receiver's checks go.
struct Sent {
    /// The sizes the header claims, if its magic and version are right.
    claimed: Option<ChannelConfig>,
    /// The first descriptor is a memfd with the required seals and no write seal.
    sealed: bool,
    /// Its size in bytes.
    size: Option<u64>,
    /// Exactly three descriptors, the last two eventfds.
    shape_ok: bool,
    /// The memfd, kept to try resizing it after the hand-off.
    memfd: Option<OwnedFd>,
}

fn config(u: &mut Unstructured) -> Result<ChannelConfig> {
    Ok(ChannelConfig {
        out_ring_bytes: *u.choose(&[4096usize, 8192])?,
        in_ring_bytes: *u.choose(&[4096usize, 8192])?,
        extra_bytes: *u.choose(&[0usize, 4096, 8192])?,
    })
}

fn memfd(u: &mut Unstructured, len: u64) -> Result<(OwnedFd, bool)> {
    let sealing = u.ratio(3, 4)?;
    let flags = libc::MFD_CLOEXEC | if sealing { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: a valid C string; we own the descriptor on success.
    let fd = unsafe { libc::memfd_create(c"fuzz-handoff".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on our descriptor.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(rc, 0);
    let mut seals = 0;
    for s in [
        libc::F_SEAL_SHRINK,
        libc::F_SEAL_GROW,
        libc::F_SEAL_WRITE,
        libc::F_SEAL_FUTURE_WRITE,
        libc::F_SEAL_SEAL,
    ] {
        let write_seal = s == libc::F_SEAL_WRITE || s == libc::F_SEAL_FUTURE_WRITE;
        // Write seals rarely: a region no one may write is refused (or fails to map) at once.
        if u.ratio(3, 4)? && (!write_seal || u.ratio(1, 4)?) {
            seals |= s;
        }
    }
    if sealing && seals != 0 {
        // SAFETY: plain syscall on our descriptor (no mapping exists, so write seals succeed).
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(rc, 0);
    }
    let required = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    let write = libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE;
    let ok = sealing && seals & required == required && seals & write == 0;
    Ok((fd, ok))
}

fn parse_claim(header: &[u8; HANDOFF_HEADER_LEN]) -> Option<ChannelConfig> {
    let genuine = handoff_header(&ChannelConfig {
        out_ring_bytes: 0,
        in_ring_bytes: 0,
        extra_bytes: 0,
    });
    if header[..8] != genuine[..8] {
        return None;
    }
    let at = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
    Some(ChannelConfig {
        out_ring_bytes: usize::try_from(at(8)).ok()?,
        in_ring_bytes: usize::try_from(at(16)).ok()?,
        extra_bytes: usize::try_from(at(24)).ok()?,
    })
}

/// A crafted hand-off: header and descriptors from the input.
fn crafted(u: &mut Unstructured, sock: &UnixStream) -> Result<Sent> {
    let cfg = config(u)?;
    let mut header = handoff_header(&cfg);
    if u.ratio(1, 3)? {
        for _ in 0..u.int_in_range(1..=3)? {
            let i = u.int_in_range(0..=HANDOFF_HEADER_LEN - 1)?;
            header[i] = u.arbitrary()?;
        }
    }
    let claimed = parse_claim(&header);
    let want = cfg.region_len() as u64;
    let size = *u.choose(&[
        want,
        want,
        0,
        want - PAGE_SIZE as u64,
        want + PAGE_SIZE as u64,
    ])?;
    let (memfd, sealed) = memfd(u, size)?;
    let (e1, e2) = (eventfd().expect("eventfd"), eventfd().expect("eventfd"));
    let (p0, p1) = UnixStream::pair().expect("socketpair");
    // The descriptors, in an order and number the input picks (mostly the right ones).
    let palette: [RawFd; 5] = [
        memfd.as_raw_fd(),
        e1.as_raw_fd(),
        e2.as_raw_fd(),
        p0.as_raw_fd(),
        p1.as_raw_fd(),
    ];
    let fds: Vec<RawFd> = if u.ratio(2, 3)? {
        palette[..3].to_vec()
    } else {
        (0..u.int_in_range(0..=4)?)
            .map(|_| u.choose(&palette).copied())
            .collect::<Result<_>>()?
    };
    let shape_ok = fds.len() == 3
        && fds[0] == palette[0]
        && [palette[1], palette[2]].contains(&fds[1])
        && [palette[1], palette[2]].contains(&fds[2]);
    let truncated_header = u.ratio(1, 16)?;
    let len = if truncated_header {
        u.int_in_range(0..=HANDOFF_HEADER_LEN - 1)?
    } else {
        HANDOFF_HEADER_LEN
    };
    let _ = send_with_fds(sock, &header[..len], &fds);
    Ok(Sent {
        claimed: claimed.filter(|_| !truncated_header),
        sealed: sealed && fds.first() == Some(&palette[0]),
        size: Some(size),
        shape_ok,
        memfd: Some(memfd),
    })
}

fn handoff(u: &mut Unstructured) -> Result<()> {
    let (a, b) = UnixStream::pair().expect("socketpair");
    b.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("socket timeout");
    let mut genuine_guest = None;
    let sent = match u.int_in_range(0..=3)? {
        // The real thing: create (sealed), send_to.
        0 => {
            let cfg = config(u)?;
            let (guest, host) = create(&cfg).expect("creating a channel");
            // SAFETY: dup of a descriptor the guest end owns.
            let memfd = unsafe { OwnedFd::from_raw_fd(libc::dup(guest.extra.memfd().as_raw_fd())) };
            host.send_to(&a).expect("sending a host end");
            genuine_guest = Some(guest);
            Sent {
                claimed: Some(cfg),
                sealed: true,
                size: Some(cfg.region_len() as u64),
                shape_ok: true,
                memfd: Some(memfd),
            }
        }
        // Garbage bytes and no descriptors at all.
        1 => {
            let n = u.int_in_range(0..=64)?;
            let _ = (&a).write_all(u.bytes(n)?);
            Sent {
                claimed: None,
                sealed: false,
                size: None,
                shape_ok: false,
                memfd: None,
            }
        }
        _ => crafted(u, &a)?,
    };
    drop(a);
    match receive_host_end(&b) {
        Ok(mut host) => {
            let cfg = host.config();
            assert!(
                sent.shape_ok && sent.sealed,
                "accepted a memfd without its seals"
            );
            assert_eq!(Some(cfg), sent.claimed);
            assert_eq!(sent.size, Some(cfg.region_len() as u64));
            let memfd = sent.memfd.expect("a memfd was sent");
            // The sender's worst: resize the region under the receiver's mapping. It must fail.
            for len in [0, cfg.region_len() as u64 / 2, 2 * cfg.region_len() as u64] {
                // SAFETY: plain syscall on our descriptor.
                let rc = unsafe { libc::ftruncate(memfd.as_raw_fd(), len as libc::off_t) };
                assert_eq!(rc, -1, "a sealed memfd was resized to {len}");
            }
            // And the rings work (the guest may be writing garbage meanwhile).
            let scribbling = u.ratio(1, 8)?;
            let _guard = scribbling.then(|| {
                let (p, _) = host.extra_area();
                // SAFETY: the windows lie in the host end's mapping, which outlives the guard
                // (declared after `host`), and are only accessed atomically.
                unsafe { scribble(&channel_windows(p, &cfg), 3) }
            });
            let payload = &some_bytes(u, 200)?;
            // A small packet always fits a ring of a page or more; a scribbling peer may make the
            // ring refuse it with a typed error, never panic.
            let out = host.tx.try_write(11, 0, 1, &[payload]);
            assert!(!matches!(out, Err(RingError::PacketTooLarge { .. })));
            if genuine_guest.is_some() && !scribbling {
                assert!(matches!(out, Ok(WriteOutcome::Written { .. })));
            }
            let mut buf = Vec::new();
            let _ = host.rx.read_into(&mut buf);
            if let Some(mut guest) = genuine_guest.take() {
                let _ = guest.rx.read_into(&mut buf);
            }
            let _ = host.signal_peer();
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    ChannelError::BadHandoff(_)
                        | ChannelError::Unsealed { .. }
                        | ChannelError::Os { .. }
                        | ChannelError::BadConfig(_)
                ),
                "{e}"
            );
            // A genuine hand-off is always accepted.
            assert!(
                genuine_guest.is_none(),
                "a genuine hand-off was refused: {e}"
            );
            if matches!(e, ChannelError::Unsealed { .. }) {
                assert!(!sent.sealed);
            }
        }
    }
    Ok(())
}
