//! Access to memory a peer may write at any moment: the rings' data areas and the channel's
//! shared buffer area.
//!
//! Every access to such memory is a relaxed atomic load or store of one aligned 64-bit word
//! ([`AtomicU64::from_ptr`]). Under Rust's memory model that is defined whatever the peer does at
//! the same moment, as long as the peer's own accesses in this process are atomics of the same
//! words (both ends of a channel use this module and nothing else), and a peer in another process
//! is outside our program altogether (an aligned word load is single-copy atomic on x86-64 and
//! AArch64). A plain `ptr::copy_nonoverlapping` of the same bytes is a data race, undefined
//! behaviour whatever validation follows it, and the compiler may also read a byte twice (for
//! instance a length it checked and then used). On x86-64 a relaxed atomic load or store is a
//! plain `mov`, so a copy costs one load and one store per 8 bytes: what a memcpy that is not
//! vectorised issues.
//!
//! Each byte of a copy out of shared memory is read exactly once, into memory the caller owns;
//! callers validate that copy, never the shared bytes, so a racing peer can make us see garbage
//! (which validation then rejects) but never see one value when checking and another when using.
//!
//! Why not rust-vmm's `vm-memory`, whose `VolatileSlice` this follows: its `copy_to`/`copy_from`
//! use volatile word accesses only for copies of at most 8 bytes and `ptr::copy_nonoverlapping`
//! for anything longer (for speed), which is exactly the racy memcpy this module exists to
//! avoid; and volatile accesses inside memory our process maps are, per the `read_volatile`
//! documentation, no more defined under a race than plain ones, while atomics are.
//!
//! The partial words at the edges of an unaligned write are merged with `fetch_and` then
//! `fetch_or`: two atomic read-modify-writes that leave the other bytes of the word alone and
//! that no peer can make spin (a compare-and-swap loop could be starved by a hostile writer).

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes per access.
pub const WORD: usize = 8;

/// A range outside a [`SharedMem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes at offset {offset} do not fit in the {size}-byte shared area")]
pub struct OutOfRange {
    /// Requested offset.
    pub offset: usize,
    /// Requested length.
    pub len: usize,
    /// Size of the area.
    pub size: usize,
}

/// A window on memory that a peer may read and write concurrently. Cheap to copy; it does not
/// own the memory (whoever created it keeps the mapping alive, see [`SharedMem::new`]).
#[derive(Clone, Copy, Debug)]
pub struct SharedMem {
    base: *mut u8,
    len: usize,
}

// SAFETY: a SharedMem is a pointer and a length; every access through it is an atomic operation,
// valid from any thread. The creator guarantees the memory outlives every copy (see `new`).
unsafe impl Send for SharedMem {}
// SAFETY: as above; no method takes &mut self or has interior state.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    /// A window on `len` bytes at `base`. `None` unless `base` is 8-byte aligned and `len` a
    /// multiple of 8 (every access is a whole aligned word).
    ///
    /// # Safety
    /// `base..base + len` must be readable and writable, and stay mapped while this value or any
    /// copy of it (or of a [`sub`](Self::sub)-window) is used. Inside this process that memory
    /// must be accessed only through `SharedMem` (or by the kernel, e.g. `pread` into it): no
    /// Rust reference into it and no non-atomic access may exist while a peer can write it.
    pub unsafe fn new(base: *mut u8, len: usize) -> Option<SharedMem> {
        if base.is_null() || !(base as usize).is_multiple_of(WORD) || !len.is_multiple_of(WORD) {
            return None;
        }
        Some(SharedMem { base, len })
    }

    /// Size of the window in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte, for system calls that read or write the memory themselves (`pread`,
    /// `pwrite`, `mmap` bookkeeping). Never turn it into a Rust reference.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    /// The window `offset .. offset + len` of this one; both must be multiples of 8.
    pub fn sub(&self, offset: usize, len: usize) -> Option<SharedMem> {
        let end = offset.checked_add(len)?;
        if end > self.len || !offset.is_multiple_of(WORD) || !len.is_multiple_of(WORD) {
            return None;
        }
        // SAFETY: inside this window (checked), so the creator's guarantee covers it; alignment
        // is kept because both base and offset are multiples of 8.
        let base = unsafe { self.base.add(offset) };
        Some(SharedMem { base, len })
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfRange> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OutOfRange {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// The word at byte offset `at` (a multiple of 8, at most `len - 8`).
    #[inline(always)]
    fn word(&self, at: usize) -> &AtomicU64 {
        debug_assert!(at.is_multiple_of(WORD) && at + WORD <= self.len);
        // SAFETY: `at` is an aligned offset inside the window (callers check the range; every
        // window is a whole number of aligned words), the memory is live (`new`'s contract), and
        // it is only ever accessed atomically in this process, so an `&AtomicU64` to it is sound
        // (AtomicU64::from_ptr's requirements).
        unsafe { AtomicU64::from_ptr(self.base.add(at).cast::<u64>()) }
    }

    /// Loads `words` whole words from byte offset `at` (a multiple of 8) into `dst`, which may be
    /// unaligned. The tight loop of every copy out: one atomic load and one plain store per word.
    ///
    /// # Safety
    /// `at + words * 8 <= self.len`, and `dst` is valid for `words * 8` bytes of writes and is not
    /// shared memory.
    #[inline(always)]
    unsafe fn load_words(&self, at: usize, dst: *mut u8, words: usize) {
        debug_assert!(at.is_multiple_of(WORD) && at + words * WORD <= self.len);
        // SAFETY: inside the window (caller), so the base pointer arithmetic stays in bounds.
        let src = unsafe { self.base.add(at) }.cast::<u64>();
        for i in 0..words {
            // SAFETY: word i is aligned and inside the window (caller); only ever accessed
            // atomically in this process (`new`'s contract). `dst` has room (caller) and is
            // private memory, so an unaligned plain store is fine.
            unsafe {
                let w = AtomicU64::from_ptr(src.add(i)).load(Ordering::Relaxed);
                dst.add(i * WORD).cast::<u64>().write_unaligned(w);
            }
        }
    }

    /// Stores `words` whole words read from `src` (may be unaligned) at byte offset `at` (a
    /// multiple of 8).
    ///
    /// # Safety
    /// `at + words * 8 <= self.len`, and `src` is valid for `words * 8` bytes of reads and is not
    /// shared memory.
    #[inline(always)]
    unsafe fn store_words(&self, at: usize, src: *const u8, words: usize) {
        debug_assert!(at.is_multiple_of(WORD) && at + words * WORD <= self.len);
        // SAFETY: inside the window (caller).
        let dst = unsafe { self.base.add(at) }.cast::<u64>();
        for i in 0..words {
            // SAFETY: as in load_words, with the roles swapped.
            unsafe {
                let w = src.add(i * WORD).cast::<u64>().read_unaligned();
                AtomicU64::from_ptr(dst.add(i)).store(w, Ordering::Relaxed);
            }
        }
    }

    /// Loads the aligned word at byte offset `at` (a multiple of 8).
    #[inline(always)]
    pub fn load_word(&self, at: usize) -> Result<u64, OutOfRange> {
        self.check(at, WORD)?;
        if !at.is_multiple_of(WORD) {
            return Err(OutOfRange {
                offset: at,
                len: WORD,
                size: self.len,
            });
        }
        Ok(self.word(at).load(Ordering::Relaxed))
    }

    /// Copies `dst.len()` bytes starting at `offset` into `dst`, reading each word once.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange> {
        self.check(offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let mut at = offset - offset % WORD;
        let mut rest = dst;
        let skip = offset % WORD;
        if skip != 0 {
            // A head inside one word: take the bytes we were asked for and no more.
            let w = self.word(at).load(Ordering::Relaxed).to_ne_bytes();
            let n = rest.len().min(WORD - skip);
            rest[..n].copy_from_slice(&w[skip..skip + n]);
            rest = &mut rest[n..];
            at += WORD;
        }
        let words = rest.len() / WORD;
        // SAFETY: the whole range is inside the window (checked above) and `rest` is ours.
        unsafe { self.load_words(at, rest.as_mut_ptr(), words) };
        at += words * WORD;
        let tail = &mut rest[words * WORD..];
        if !tail.is_empty() {
            let w = self.word(at).load(Ordering::Relaxed).to_ne_bytes();
            let n = tail.len();
            tail.copy_from_slice(&w[..n]);
        }
        Ok(())
    }

    /// Copies `src` into the window starting at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), OutOfRange> {
        self.check(offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let mut at = offset - offset % WORD;
        let mut rest = src;
        let skip = offset % WORD;
        if skip != 0 {
            let n = rest.len().min(WORD - skip);
            self.merge(at, skip, &rest[..n]);
            rest = &rest[n..];
            at += WORD;
        }
        let words = rest.len() / WORD;
        // SAFETY: the whole range is inside the window (checked above) and `rest` is ours.
        unsafe { self.store_words(at, rest.as_ptr(), words) };
        at += words * WORD;
        let tail = &rest[words * WORD..];
        if !tail.is_empty() {
            self.merge(at, 0, tail);
        }
        Ok(())
    }

    /// Writes `bytes` into the word at `at`, starting at byte `skip` of it, leaving its other
    /// bytes as they are.
    fn merge(&self, at: usize, skip: usize, bytes: &[u8]) {
        debug_assert!(skip + bytes.len() <= WORD && !bytes.is_empty());
        let mut mask = [0u8; WORD];
        let mut value = [0u8; WORD];
        mask[skip..skip + bytes.len()].fill(0xff);
        value[skip..skip + bytes.len()].copy_from_slice(bytes);
        let (mask, value) = (u64::from_ne_bytes(mask), u64::from_ne_bytes(value));
        let word = self.word(at);
        word.fetch_and(!mask, Ordering::Relaxed);
        word.fetch_or(value, Ordering::Relaxed);
    }

    /// Copies `len` bytes from this window at `from` to `dst` at `to` (both may be shared with a
    /// peer; offsets and length multiples of 8).
    pub fn copy_to(
        &self,
        from: usize,
        dst: &SharedMem,
        to: usize,
        len: usize,
    ) -> Result<(), OutOfRange> {
        self.check(from, len)?;
        dst.check(to, len)?;
        if !(from | to | len).is_multiple_of(WORD) {
            return Err(OutOfRange {
                offset: from,
                len,
                size: self.len,
            });
        }
        for i in (0..len).step_by(WORD) {
            let w = self.word(from + i).load(Ordering::Relaxed);
            dst.word(to + i).store(w, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A writer that streams bytes into whole words from byte offset `at` (a multiple of 8),
    /// wrapping to the start of the window at its end (a ring's data area).
    pub fn word_writer(&self, at: usize) -> WordWriter<'_> {
        debug_assert!(at.is_multiple_of(WORD) && at < self.len.max(WORD));
        WordWriter {
            mem: self,
            at,
            acc: [0; WORD],
            fill: 0,
        }
    }

    /// Replaces the contents of `buf` with `len` bytes (a multiple of 8) copied out of the window
    /// from `offset` (a multiple of 8), wrapping to the start of the window at its end. Unlike
    /// [`read_wrapping`](Self::read_wrapping) it does not zero the buffer first.
    pub fn read_wrapping_to_vec(
        &self,
        offset: usize,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> Result<(), OutOfRange> {
        if !offset.is_multiple_of(WORD) || !len.is_multiple_of(WORD) || len > self.len {
            return Err(OutOfRange {
                offset,
                len,
                size: self.len,
            });
        }
        self.check(offset, 0)?;
        buf.clear();
        buf.reserve(len);
        let first = len.min(self.len - offset);
        let dst = buf.spare_capacity_mut().as_mut_ptr().cast::<u8>();
        // SAFETY: `offset + first <= self.len` and `len - first <= self.len` (checked above), so
        // both runs of words are inside the window; `buf` has room for `len` bytes (reserved)
        // and is ours. Every one of those bytes is written before `set_len`.
        unsafe {
            self.load_words(offset, dst, first / WORD);
            self.load_words(0, dst.add(first), (len - first) / WORD);
            buf.set_len(len);
        }
        Ok(())
    }

    /// Copies whole words out of the window starting at `offset` (a multiple of 8) into `dst`
    /// (a multiple of 8 bytes long), wrapping to the start of the window at its end.
    pub fn read_wrapping(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange> {
        if !offset.is_multiple_of(WORD) || !dst.len().is_multiple_of(WORD) || dst.len() > self.len {
            return Err(OutOfRange {
                offset,
                len: dst.len(),
                size: self.len,
            });
        }
        self.check(offset, 0)?;
        let first = dst.len().min(self.len - offset);
        let (a, b) = dst.split_at_mut(first);
        self.read(offset, a)?;
        self.read(0, b)
    }
}

/// Streams bytes into a [`SharedMem`] one whole word at a time (see
/// [`SharedMem::word_writer`]): a packet made of several pieces needs no staging copy.
pub struct WordWriter<'a> {
    mem: &'a SharedMem,
    at: usize,
    acc: [u8; WORD],
    fill: usize,
}

impl WordWriter<'_> {
    #[inline(always)]
    fn store(&mut self, w: u64) {
        self.mem.word(self.at).store(w, Ordering::Relaxed);
        self.at += WORD;
        if self.at == self.mem.len {
            self.at = 0;
        }
    }

    /// Appends `bytes`.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if self.fill != 0 {
            let n = bytes.len().min(WORD - self.fill);
            self.acc[self.fill..self.fill + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill < WORD {
                return;
            }
            self.store(u64::from_ne_bytes(self.acc));
            self.fill = 0;
        }
        let words = bytes.len() / WORD;
        let mut done = 0;
        while done < words {
            // Whole words up to the end of the window, then from its start.
            let n = ((self.mem.len - self.at) / WORD).min(words - done);
            // SAFETY: `self.at + n * 8 <= len` (n is bounded by the room left) and the source
            // holds `words * 8` bytes of ours.
            unsafe {
                self.mem
                    .store_words(self.at, bytes.as_ptr().add(done * WORD), n)
            };
            done += n;
            self.at += n * WORD;
            if self.at == self.mem.len {
                self.at = 0;
            }
        }
        let tail = &bytes[words * WORD..];
        self.acc[..tail.len()].copy_from_slice(tail);
        self.fill = tail.len();
    }

    /// Completes a partial last word with zeros.
    pub fn pad_to_word(&mut self) {
        if self.fill != 0 {
            self.acc[self.fill..].fill(0);
            self.store(u64::from_ne_bytes(self.acc));
            self.fill = 0;
        }
    }

    /// Pads the last word with zeros (if it is partial) and returns the offset after it.
    pub fn finish(mut self) -> usize {
        self.pad_to_word();
        self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heap region of `words` words; stands in for a mapping in tests.
    pub(crate) struct Words(Vec<AtomicU64>);

    impl Words {
        pub(crate) fn new(words: usize) -> Words {
            Words((0..words).map(|_| AtomicU64::new(0)).collect())
        }

        pub(crate) fn mem(&self) -> SharedMem {
            // SAFETY: the vector's atomics are 8-aligned, live as long as `self`, and only ever
            // accessed atomically.
            unsafe { SharedMem::new(self.0.as_ptr() as *mut u8, self.0.len() * WORD).unwrap() }
        }
    }

    #[test]
    fn unaligned_reads_and_writes_round_trip_and_keep_neighbours() {
        let words = Words::new(8);
        let m = words.mem();
        m.write(0, &[0xaa; 64]).unwrap();
        for offset in 0..20 {
            for len in 0..30 {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + offset) as u8).collect();
                m.write(0, &[0xaa; 64]).unwrap();
                m.write(offset, &data).unwrap();
                let mut all = [0u8; 64];
                m.read(0, &mut all).unwrap();
                assert_eq!(&all[offset..offset + len], &data[..], "{offset}+{len}");
                assert!(all[..offset].iter().all(|&b| b == 0xaa));
                assert!(all[offset + len..].iter().all(|&b| b == 0xaa));
                let mut back = vec![0u8; len];
                m.read(offset, &mut back).unwrap();
                assert_eq!(back, data);
            }
        }
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let words = Words::new(2);
        let m = words.mem();
        let mut b = [0u8; 4];
        assert!(m.read(13, &mut b).is_err());
        assert!(m.read(usize::MAX, &mut b).is_err());
        assert!(m.write(15, &[1, 2]).is_err());
        assert!(m.load_word(12).is_err());
        assert!(m.load_word(16).is_err());
        assert!(m.sub(8, 16).is_none());
        assert!(m.sub(4, 8).is_none());
        assert_eq!(m.sub(8, 8).unwrap().len(), 8);
        let mut big = [0u8; 24];
        assert!(m.read_wrapping(8, &mut big).is_err());
        assert!(m.read_wrapping(16, &mut b).is_err());
    }

    #[test]
    fn word_writer_wraps_and_pads() {
        let words = Words::new(4);
        let m = words.mem();
        m.write(0, &[0xee; 32]).unwrap();
        let mut w = m.word_writer(16);
        w.push(&[1, 2, 3]);
        w.push(&[4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]);
        w.push(&[18]);
        assert_eq!(w.finish(), 8);
        let mut all = [0u8; 32];
        m.read(0, &mut all).unwrap();
        assert_eq!(&all[16..32], &(1..=16).collect::<Vec<u8>>()[..]);
        assert_eq!(&all[0..8], &[17, 18, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&all[8..16], &[0xee; 8]);
        let mut wrapped = [0u8; 24];
        m.read_wrapping(16, &mut wrapped).unwrap();
        assert_eq!(&wrapped[..16], &all[16..]);
        assert_eq!(&wrapped[16..], &all[..8]);
    }

    #[test]
    fn copy_between_windows() {
        let (a, b) = (Words::new(4), Words::new(4));
        let (ma, mb) = (a.mem(), b.mem());
        ma.write(0, &(0..32).collect::<Vec<u8>>()).unwrap();
        ma.copy_to(8, &mb, 16, 16).unwrap();
        let mut got = [0u8; 16];
        mb.read(16, &mut got).unwrap();
        assert_eq!(got.to_vec(), (8..24).collect::<Vec<u8>>());
        assert!(ma.copy_to(8, &mb, 24, 16).is_err());
        assert!(ma.copy_to(4, &mb, 0, 8).is_err());
    }
}
