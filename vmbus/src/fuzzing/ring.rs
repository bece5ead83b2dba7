//! The ring's reader and writer against a hostile peer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};

use arbitrary::{Result, Unstructured};

use super::{scribble, Window};
use crate::ring::{
    ring_init, PacketHeader, RingError, RingReader, RingWriter, WriteOutcome, DESCRIPTOR_LEN,
    PAGE_SIZE, TRAILER_LEN,
};
use crate::shmem::SharedMem;

/// A page-aligned heap region standing in for the shared mapping of one ring.
struct Region {
    ptr: *mut u8,
    len: usize,
}

impl Region {
    fn new(data_pages: usize) -> Region {
        let len = PAGE_SIZE * (1 + data_pages);
        let layout = std::alloc::Layout::from_size_align(len, PAGE_SIZE).expect("layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        // SAFETY: fresh, page-aligned, nobody else uses it.
        unsafe { ring_init(ptr, len).expect("a valid ring layout") };
        Region { ptr, len }
    }

    /// A control page word, as the peer writes it.
    fn control_word(&self, index: usize) -> &AtomicU32 {
        assert!(index < 17);
        // SAFETY: inside the control page, 4-aligned; those words are only accessed atomically.
        unsafe { AtomicU32::from_ptr(self.ptr.add(index * 4).cast()) }
    }

    /// The data area, as the peer writes it.
    fn data(&self) -> SharedMem {
        // SAFETY: the data area follows the control page inside the region, which outlives
        // every use in a harness, and is only accessed through SharedMem.
        unsafe { SharedMem::new(self.ptr.add(PAGE_SIZE), self.len - PAGE_SIZE) }.expect("aligned")
    }

    fn windows(&self) -> [Window; 2] {
        [
            Window {
                ptr: self.ptr,
                len: 68,
                width: 4,
            },
            Window {
                // SAFETY: inside the region.
                ptr: unsafe { self.ptr.add(PAGE_SIZE) },
                len: self.len - PAGE_SIZE,
                width: 8,
            },
        ]
    }

    fn ends(&self, max_payload: u32) -> (Result2<RingWriter>, Result2<RingReader>) {
        // SAFETY: the region outlives both ends (the harness drops them first); one writer and
        // one reader per ring.
        unsafe {
            (
                RingWriter::new(self.ptr, self.len),
                RingReader::with_max_payload(self.ptr, self.len, max_payload),
            )
        }
    }
}

type Result2<T> = std::result::Result<T, RingError>;

impl Drop for Region {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, PAGE_SIZE).expect("layout");
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// After an error that breaks the ring, every later read is `Broken` and commits publish nothing.
fn assert_reader_broken(r: &mut RingReader, buf: &mut Vec<u8>) {
    assert_eq!(r.read_into(buf), Err(RingError::Broken));
    assert_eq!(r.commit().bytes_freed, 0);
    assert_eq!(r.has_data(), Err(RingError::Broken));
}

/// The reader against whatever a peer may have put in the ring: indices, descriptors, lengths and
/// offsets from the input, over a ring that may also hold well-formed packets, optionally with
/// the peer still writing while we read. Every packet read stays within the reader's limit and
/// the bytes published; a violation is a typed error after which the ring stays broken; with no
/// tampering, the packets come back exactly as written.
pub fn ring_reader(data: &[u8]) {
    let _ = reader(&mut Unstructured::new(data));
}

fn reader(u: &mut Unstructured) -> Result<()> {
    let region = Region::new(u.int_in_range(1..=2)?);
    let data_len = (region.len - PAGE_SIZE) as u32;
    let max_payload = *u.choose(&[u32::MAX, 64, 256, 1024, 4096])?;
    let written = write_honest_packets(u, &region, max_payload)?;
    let tampered = tamper(u, &region, data_len)?;
    let scribbling = u.ratio(1, 8)?;
    let _guard = scribbling.then(|| {
        // SAFETY: the region outlives the guard (declared later, dropped earlier) and is only
        // accessed atomically, with these widths.
        unsafe { scribble(&region.windows(), u.arbitrary().unwrap_or(7)) }
    });
    let (_, r) = region.ends(max_payload);
    let mut r = match r {
        Ok(r) => r,
        Err(e) => {
            // Only a bad read index can refuse a reader.
            assert!(tampered || scribbling, "untampered ring refused: {e}");
            assert!(matches!(
                e,
                RingError::IndexOutOfRange { .. } | RingError::IndexMisaligned { .. }
            ));
            return Ok(());
        }
    };
    let mut expected = Expected {
        written,
        max_payload,
        data_len,
        tampered,
        scribbling,
    };
    read_packets(u, &mut r, &mut expected);
    Ok(())
}

/// Well-formed packets, from a writer that plays by the rules: the transaction id and payload
/// of each one that fitted, in order.
fn write_honest_packets(
    u: &mut Unstructured,
    region: &Region,
    max_payload: u32,
) -> Result<VecDeque<(u64, Vec<u8>)>> {
    let mut written = VecDeque::new();
    let (w, _) = region.ends(max_payload);
    let mut w = w.expect("a fresh ring");
    for i in 0..u.int_in_range(0..=12)? {
        let len = u.int_in_range(0..=600)?;
        let payload = u.bytes(len)?.to_vec();
        let split = u.int_in_range(0..=len)?;
        match w.try_write(6, 0, i, &[&payload[..split], &payload[split..]]) {
            Ok(WriteOutcome::Written { .. }) => written.push_back((i, payload)),
            Ok(WriteOutcome::Full { .. }) | Err(RingError::PacketTooLarge { .. }) => {}
            Err(e) => panic!("a well-behaved writer failed: {e}"),
        }
    }
    Ok(written)
}

/// The peer's tampering: words of the control page and bytes of the data area. Whether it
/// tampered at all.
fn tamper(u: &mut Unstructured, region: &Region, data_len: u32) -> Result<bool> {
    let mut tampered = false;
    for _ in 0..u.int_in_range(0..=8)? {
        tampered = true;
        if u.arbitrary()? {
            let word = *u.choose(&[0usize, 1, 2, 3, 16])?;
            let value = if u.arbitrary()? {
                u.arbitrary()?
            } else {
                u.int_in_range(0..=data_len / 8)? * 8
            };
            region.control_word(word).store(value, Ordering::SeqCst);
        } else {
            let at = u.int_in_range(0..=data_len as usize - 1)?;
            let n = u.int_in_range(1..=16)?.min(data_len as usize - at);
            let bytes = u.bytes(n)?;
            region
                .data()
                .write(at, bytes)
                .expect("inside the data area");
        }
    }
    Ok(tampered)
}

/// What the reader may expect of the ring: the packets written honestly (those not read yet),
/// its limits, and whether the peer tampered with it or is still scribbling over it.
struct Expected {
    written: VecDeque<(u64, Vec<u8>)>,
    max_payload: u32,
    data_len: u32,
    tampered: bool,
    scribbling: bool,
}

impl Expected {
    fn untouched(&self) -> bool {
        !self.tampered && !self.scribbling
    }
}

/// Reads (up to 64 packets) until the ring is empty or broken, committing and masking
/// interrupts now and then, checking every outcome against `expected`.
fn read_packets(u: &mut Unstructured, r: &mut RingReader, expected: &mut Expected) {
    let mut buf = Vec::new();
    for _ in 0..64 {
        let before = match r.bytes_available() {
            Ok(n) => n,
            Err(e) => {
                // A bad write index breaks the ring as soon as we look at it.
                assert!(!expected.untouched(), "untampered ring failed: {e}");
                assert_reader_broken(r, &mut buf);
                break;
            }
        };
        match r.read_into(&mut buf) {
            Ok(Some(h)) => check_packet(&h, &buf, before, expected),
            Ok(None) => {
                if expected.untouched() {
                    assert!(expected.written.is_empty(), "packets lost");
                }
                break;
            }
            Err(e) => {
                check_violation(&e, expected);
                assert_reader_broken(r, &mut buf);
                break;
            }
        }
        if u.ratio(1, 3).unwrap_or(true) {
            let c = r.commit();
            assert!(c.bytes_freed <= expected.data_len);
        }
        if u.ratio(1, 8).unwrap_or(false) {
            r.set_interrupt_mask(u.arbitrary().unwrap_or(false));
        }
    }
}

/// A packet read stays within the reader's limit and what was published when we looked
/// (`before` bytes); from an untouched ring it is the next one written, exactly.
fn check_packet(h: &PacketHeader, buf: &[u8], before: u32, expected: &mut Expected) {
    assert!(h.payload_len <= expected.max_payload && h.payload_len <= expected.data_len);
    assert_eq!(buf.len(), h.payload_len as usize);
    assert!(h.payload_len.is_multiple_of(8));
    // Never more than what was published when we looked.
    let needed = DESCRIPTOR_LEN as u32 + h.payload_len + TRAILER_LEN as u32;
    assert!(needed <= before || expected.scribbling);
    if expected.untouched() {
        let (id, p) = expected
            .written
            .pop_front()
            .expect("no more packets than written");
        assert_eq!(h.trans_id, id);
        assert_eq!(&buf[..p.len()], &p[..]);
        assert!(buf[p.len()..].iter().all(|&b| b == 0));
    }
}

/// A read error comes only from a ring the peer touched (or an honest packet larger than this
/// reader accepts, a violation too), and is a violation of the ring's rules, never one of the
/// errors that mean something else.
fn check_violation(e: &RingError, expected: &Expected) {
    let too_large = matches!(*e, RingError::PayloadTooLarge { len, max }
        if expected.written.front().is_some_and(|(_, p)| p.len().next_multiple_of(8) as u32 == len && len > max));
    assert!(
        !expected.untouched() || too_large,
        "untampered ring failed: {e}"
    );
    assert!(
        !matches!(
            e,
            RingError::Broken | RingError::PacketTooLarge { .. } | RingError::BadLayout { .. }
        ),
        "{e}"
    );
}

/// The writer against a peer that moves the read index, `pending_send_sz`, the interrupt mask
/// and the feature bits as it likes, with a reader consuming in between. Outcomes stay
/// consistent with the space the writer saw (`Full` reports exactly the packet's space; a write
/// never uses more than the ring), a bad read index breaks the writer for good, and with an
/// honest peer every packet arrives intact and in order.
pub fn ring_writer(data: &[u8]) {
    let _ = writer(&mut Unstructured::new(data));
}

fn writer(u: &mut Unstructured) -> Result<()> {
    let region = Region::new(u.int_in_range(1..=2)?);
    let data_len = (region.len - PAGE_SIZE) as u32;
    let (w, r) = region.ends(u32::MAX);
    let (mut w, mut r) = (w.expect("fresh"), r.expect("fresh"));
    let scribbling = u.ratio(1, 8)?;
    let _guard = scribbling.then(|| {
        // SAFETY: as in `reader`.
        unsafe { scribble(&region.windows(), u.arbitrary().unwrap_or(9)) }
    });
    let mut honest = !scribbling;
    let mut broken = false;
    let mut sent: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut buf = Vec::new();
    let mut id = 0u64;
    for _ in 0..u.int_in_range(1..=64)? {
        match u.int_in_range(0..=9)? {
            0..=4 => {
                let len = u.int_in_range(0..=2 * data_len as usize)?;
                let fill = u.arbitrary::<u8>()?;
                let payload = vec![fill; len];
                let pieces = u.int_in_range(1..=3)?;
                let cut1 = len / pieces;
                let out = w.try_write(6, 0, id, &[&payload[..cut1], &payload[cut1..]]);
                let space = RingWriter::packet_space(len);
                match out {
                    Ok(WriteOutcome::Written { bytes_used, .. }) => {
                        assert!(!broken);
                        assert!(space < data_len as usize);
                        assert!(bytes_used < data_len || !honest);
                        sent.push_back((id, payload));
                    }
                    Ok(WriteOutcome::Full { needed }) => {
                        assert!(!broken);
                        assert_eq!(needed as usize, space);
                    }
                    Err(RingError::PacketTooLarge { needed, capacity }) => {
                        assert_eq!(needed, space);
                        assert!(needed > capacity);
                    }
                    Err(RingError::Broken) => assert!(broken),
                    Err(e) => {
                        assert!(!honest, "an honest peer broke the writer: {e}");
                        broken = true;
                        assert_eq!(w.free_bytes(), Err(RingError::Broken));
                    }
                }
                id += 1;
            }
            5 | 6 => {
                // The honest reader consumes a few packets.
                for _ in 0..u.int_in_range(1..=4)? {
                    match r.read_into(&mut buf) {
                        Ok(Some(h)) if honest => {
                            let (want_id, p) = sent.pop_front().expect("packets in order");
                            assert_eq!(h.trans_id, want_id);
                            assert_eq!(&buf[..p.len()], &p[..]);
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            assert!(!honest || sent.is_empty(), "written packet not readable");
                            break;
                        }
                        Err(e) => {
                            assert!(!honest, "honest ring unreadable: {e}");
                            break;
                        }
                    }
                }
                let c = r.commit();
                assert!(c.bytes_freed <= data_len);
            }
            7 => {
                // The peer moves its read index (or scribbles over ours).
                honest = false;
                let value = if u.arbitrary()? {
                    u.arbitrary()?
                } else {
                    u.int_in_range(0..=data_len / 8)? * 8
                };
                region.control_word(1).store(value, Ordering::SeqCst);
            }
            8 => {
                // pending_send_sz, interrupt_mask and feature bits are the peer's business: any
                // value must leave the writer's own accounting intact.
                let word = *u.choose(&[2usize, 3, 16])?;
                region
                    .control_word(word)
                    .store(u.arbitrary()?, Ordering::SeqCst);
            }
            _ => {
                match w.free_bytes() {
                    Ok(free) => assert!(free <= data_len && free > 0 && !broken),
                    Err(RingError::Broken) => assert!(broken),
                    Err(e) => {
                        // Looking at a bad read index breaks the writer too.
                        assert!(!honest, "an honest peer broke the writer: {e}");
                        broken = true;
                    }
                }
                match w.is_empty() {
                    Ok(_) => assert!(!broken),
                    Err(RingError::Broken) => assert!(broken),
                    Err(e) => {
                        assert!(!honest, "an honest peer broke the writer: {e}");
                        broken = true;
                    }
                }
                w.clear_pending_send();
            }
        }
    }
    Ok(())
}
