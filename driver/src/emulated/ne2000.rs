//! An NE2000 (National Semiconductor DP8390 core) NIC, modelled at the register level the way
//! QEMU's `hw/net/ne2000.c` models it: the 16 paged registers at offsets 0x00-0x0F (page 0
//! control and status, page 1 station address / current page / multicast, page 2 read-back), the
//! remote-DMA data port at 0x10 and the reset port at 0x1F, 48 KiB of on-card memory (a 32-byte
//! PROM holding the MAC address, then the transmit buffer and the receive ring in 256-byte
//! pages from 16 KiB), the receive ring's 4-byte frame headers, BNRY/CURR ring accounting, and
//! ISR/IMR interrupt bits.
//!
//! Every byte of every frame crosses the data port: a 1500-byte frame is 750 16-bit accesses,
//! each one a trap. Frames leave through the [`NetBackend`] synchronously when the guest sets
//! TXP, and arrive from it when the backend's reader calls [`Ne2000::receive`] (QEMU's
//! `ne2000_receive`), which refuses them while the ring has no room ([`Ne2000::can_receive`]).

/// Where frames go and come from (a tap device in the NIC's host namespace, or a test double).
pub trait NetBackend: Send {
    /// Sends one frame.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
}

/// Command register.
pub const CR: u16 = 0x00;
/// Page 0: PSTART (w) / CLDA0 (r). Page 1: PAR0.
pub const PSTART: u16 = 0x01;
/// Page 0: PSTOP (w).
pub const PSTOP: u16 = 0x02;
/// Page 0: boundary pointer.
pub const BNRY: u16 = 0x03;
/// Page 0: TPSR (w) / TSR (r).
pub const TPSR: u16 = 0x04;
/// Page 0: transmit byte count, low (w).
pub const TBCR0: u16 = 0x05;
/// Page 0: transmit byte count, high (w).
pub const TBCR1: u16 = 0x06;
/// Page 0: interrupt status (write 1 to clear). Page 1: CURR.
pub const ISR: u16 = 0x07;
/// Page 0: remote start address, low (w) / current remote DMA address (r).
pub const RSAR0: u16 = 0x08;
/// Page 0: remote start address, high.
pub const RSAR1: u16 = 0x09;
/// Page 0: remote byte count, low (w).
pub const RBCR0: u16 = 0x0A;
/// Page 0: remote byte count, high (w).
pub const RBCR1: u16 = 0x0B;
/// Page 0: receive configuration (w) / receive status (r).
pub const RCR: u16 = 0x0C;
/// Page 0: transmit configuration (w).
pub const TCR: u16 = 0x0D;
/// Page 0: data configuration (w).
pub const DCR: u16 = 0x0E;
/// Page 0: interrupt mask (w).
pub const IMR: u16 = 0x0F;
/// Page 1: current page (next free receive page).
pub const CURR: u16 = 0x07;
/// Remote-DMA data port (8- or 16-bit).
pub const DATA: u16 = 0x10;
/// Reset port: reading it resets the card.
pub const RESET: u16 = 0x1F;

/// CR: stop.
pub const CR_STP: u8 = 0x01;
/// CR: start.
pub const CR_STA: u8 = 0x02;
/// CR: transmit packet.
pub const CR_TXP: u8 = 0x04;
/// CR: remote read.
pub const CR_RD_READ: u8 = 0x08;
/// CR: remote write.
pub const CR_RD_WRITE: u8 = 0x10;
/// CR: abort / complete remote DMA.
pub const CR_RD_ABORT: u8 = 0x20;
/// CR: register page 1.
pub const CR_PAGE1: u8 = 0x40;
/// CR: register page 2.
pub const CR_PAGE2: u8 = 0x80;

/// ISR: packet received.
pub const ISR_PRX: u8 = 0x01;
/// ISR: packet transmitted.
pub const ISR_PTX: u8 = 0x02;
/// ISR: receive error.
pub const ISR_RXE: u8 = 0x04;
/// ISR: transmit error.
pub const ISR_TXE: u8 = 0x08;
/// ISR: receive ring overwrite warning (a frame was refused for lack of room).
pub const ISR_OVW: u8 = 0x10;
/// ISR: remote DMA complete.
pub const ISR_RDC: u8 = 0x40;
/// ISR: reset state.
pub const ISR_RST: u8 = 0x80;

/// RCR: accept broadcast.
pub const RCR_AB: u8 = 0x04;
/// RCR: accept multicast (hash filter).
pub const RCR_AM: u8 = 0x08;
/// RCR: promiscuous.
pub const RCR_PRO: u8 = 0x10;

/// DCR: word-wide remote DMA.
pub const DCR_WTS: u8 = 0x01;

/// TSR: packet transmitted.
pub const TSR_PTX: u8 = 0x01;
/// RSR: packet received intact.
pub const RSR_RXOK: u8 = 0x01;
/// RSR: multicast/broadcast address.
pub const RSR_PHY: u8 = 0x20;

/// On-card memory size: PROM + 32 KiB of buffer from 16 KiB (as QEMU's NE2000).
pub const MEM_SIZE: usize = 48 * 1024;
/// First byte of packet memory.
pub const PMEM_START: usize = 16 * 1024;
/// Largest Ethernet frame without FCS.
pub const MAX_FRAME: usize = 1514;
const MIN_FRAME: usize = 60;

/// Counters of the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NicCounters {
    /// Register reads and writes handled.
    pub accesses: u64,
    /// Data-port accesses among them.
    pub data_accesses: u64,
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Frames the backend failed to send.
    pub tx_errors: u64,
    /// Frames placed in the receive ring.
    pub rx_frames: u64,
    /// Frames refused by the address filter.
    pub rx_filtered: u64,
    /// Frames refused because the ring was full or the card stopped.
    pub rx_refused: u64,
}

/// The register-level model of one NE2000.
pub struct Ne2000<B: NetBackend> {
    backend: B,
    cmd: u8,
    start: u32,
    stop: u32,
    boundary: u8,
    tsr: u8,
    tpsr: u8,
    tcnt: u16,
    rcnt: u16,
    rsar: u32,
    rsr: u8,
    rxcr: u8,
    txcr: u8,
    dcfg: u8,
    isr: u8,
    imr: u8,
    phys: [u8; 6],
    curpag: u8,
    mult: [u8; 8],
    mem: Box<[u8; MEM_SIZE]>,
    counters: NicCounters,
}

impl<B: NetBackend> Ne2000<B> {
    /// A card with station address `mac`, sending through `backend`.
    pub fn new(mac: [u8; 6], backend: B) -> Self {
        let mut n = Ne2000 {
            backend,
            cmd: 0,
            start: 0,
            stop: 0,
            boundary: 0,
            tsr: 0,
            tpsr: 0,
            tcnt: 0,
            rcnt: 0,
            rsar: 0,
            rsr: 0,
            rxcr: 0,
            txcr: 0,
            dcfg: 0,
            isr: 0,
            imr: 0,
            phys: [0; 6],
            curpag: 0,
            mult: [0; 8],
            mem: Box::new([0; MEM_SIZE]),
            counters: NicCounters::default(),
        };
        // The PROM: the MAC address, each byte doubled (word-wide PROM), then the NE2000
        // signature 0x57 0x57 at 14-15 (QEMU's ne2000_reset).
        for (i, b) in mac.iter().enumerate() {
            n.mem[2 * i] = *b;
            n.mem[2 * i + 1] = *b;
        }
        n.mem[14] = 0x57;
        n.mem[15] = 0x57;
        n.reset();
        n
    }

    fn reset(&mut self) {
        self.isr = ISR_RST;
        self.cmd = CR_STP | CR_RD_ABORT;
    }

    /// What the model has seen.
    pub fn counters(&self) -> NicCounters {
        self.counters
    }

    /// Whether the card asserts its interrupt line (some unmasked ISR bit set).
    pub fn irq(&self) -> bool {
        self.isr & self.imr & 0x7F != 0
    }

    /// Free room in the receive ring, in bytes (QEMU's `ne2000_buffer_full` test).
    fn ring_room(&self) -> u32 {
        let index = (self.curpag as u32) << 8;
        let boundary = (self.boundary as u32) << 8;
        if index < boundary {
            boundary - index
        } else {
            (self.stop - self.start).saturating_sub(index - boundary)
        }
    }

    /// Whether a full-size frame would fit now (the backend holds frames back until it does).
    pub fn can_receive(&self) -> bool {
        self.cmd & CR_STP == 0
            && self.stop > self.start
            && self.ring_room() >= (MAX_FRAME + 4) as u32
    }

    fn accepts(&self, frame: &[u8]) -> (bool, u8) {
        let dst = &frame[..6];
        if self.rxcr & RCR_PRO != 0 {
            return (true, if dst[0] & 1 != 0 { RSR_PHY } else { 0 });
        }
        if dst == [0xFF; 6] {
            return (self.rxcr & RCR_AB != 0, RSR_PHY);
        }
        if dst[0] & 1 != 0 {
            if self.rxcr & RCR_AM == 0 {
                return (false, 0);
            }
            // CRC-32 (Ethernet, little-endian) of the address; the top 6 bits index MAR.
            let mut crc = 0xFFFF_FFFFu32;
            for b in dst {
                let mut x = *b;
                for _ in 0..8 {
                    let carry = (crc ^ x as u32) & 1;
                    crc >>= 1;
                    x >>= 1;
                    if carry != 0 {
                        crc ^= 0xEDB8_8320;
                    }
                }
            }
            let bit = (crc.reverse_bits() >> 26) as usize;
            return (self.mult[bit >> 3] & (1 << (bit & 7)) != 0, RSR_PHY);
        }
        (dst == self.phys, 0)
    }

    /// Places a frame from the wire in the receive ring; false if it was refused (filtered, or
    /// no room: the caller should hold it until [`can_receive`](Self::can_receive)).
    pub fn receive(&mut self, frame: &[u8]) -> bool {
        if frame.len() < 6 || frame.len() > MAX_FRAME {
            self.counters.rx_refused += 1;
            return false;
        }
        let (accept, rsr_bits) = self.accepts(frame);
        if !accept {
            self.counters.rx_filtered += 1;
            return false;
        }
        if !self.can_receive() {
            self.counters.rx_refused += 1;
            self.isr |= ISR_OVW;
            return false;
        }
        let mut padded = [0u8; MIN_FRAME];
        let frame = if frame.len() < MIN_FRAME {
            padded[..frame.len()].copy_from_slice(frame);
            &padded[..]
        } else {
            frame
        };
        let index = (self.curpag as u32) << 8;
        let total = frame.len() as u32 + 4;
        let mut next = index + ((total + 4 + 255) & !0xFF);
        if next >= self.stop {
            next -= self.stop - self.start;
        }
        self.rsr = RSR_RXOK | rsr_bits;
        let header = [self.rsr, (next >> 8) as u8, total as u8, (total >> 8) as u8];
        let mut at = index as usize;
        for b in header.iter().chain(frame.iter()) {
            self.mem[at] = *b;
            at += 1;
            if at == self.stop as usize {
                at = self.start as usize;
            }
        }
        self.curpag = (next >> 8) as u8;
        self.isr |= ISR_PRX;
        self.counters.rx_frames += 1;
        true
    }

    fn dma_update(&mut self, len: u32) {
        self.rsar += len;
        if self.rsar == self.stop {
            self.rsar = self.start;
        }
        if self.rcnt as u32 <= len {
            self.rcnt = 0;
            self.isr |= ISR_RDC;
        } else {
            self.rcnt -= len as u16;
        }
    }

    fn mem_read(&self, addr: u32, len: u32) -> u32 {
        let a = addr as usize;
        let ok = |a: usize| a < 32 || (PMEM_START..MEM_SIZE).contains(&a);
        (0..len as usize).fold(0, |v, i| {
            let byte = if ok(a + i) { self.mem[a + i] } else { 0xFF };
            v | (byte as u32) << (8 * i)
        })
    }

    fn mem_write(&mut self, addr: u32, len: u32, value: u32) {
        for i in 0..len as usize {
            let a = addr as usize + i;
            if (PMEM_START..MEM_SIZE).contains(&a) {
                self.mem[a] = (value >> (8 * i)) as u8;
            }
        }
    }

    fn transmit(&mut self) {
        let start = (self.tpsr as usize) << 8;
        let len = (self.tcnt as usize).min(MAX_FRAME);
        let ok = start >= PMEM_START && start + len <= MEM_SIZE;
        let sent = ok && self.backend.send(&self.mem[start..start + len]).is_ok();
        if sent {
            self.counters.tx_frames += 1;
            self.tsr = TSR_PTX;
            self.isr |= ISR_PTX;
        } else {
            self.counters.tx_errors += 1;
            self.tsr = 0;
            self.isr |= ISR_TXE;
        }
        self.cmd &= !CR_TXP;
    }

    fn write_cr(&mut self, v: u8) {
        self.cmd = v;
        if v & CR_STP != 0 {
            self.isr |= ISR_RST;
            return;
        }
        self.isr &= !ISR_RST;
        // A remote DMA of zero bytes completes at once.
        if v & (CR_RD_READ | CR_RD_WRITE) != 0 && self.rcnt == 0 {
            self.isr |= ISR_RDC;
        }
        if v & CR_TXP != 0 {
            self.transmit();
        }
    }

    /// A register read of `size` bytes at card offset `offset` (0x00-0x1F).
    pub fn pio_read(&mut self, offset: u16, size: u8) -> u32 {
        self.counters.accesses += 1;
        match offset {
            DATA..=0x17 => {
                self.counters.data_accesses += 1;
                let len = if self.dcfg & DCR_WTS != 0 && size >= 2 {
                    2
                } else {
                    1
                };
                let addr = if len == 2 { self.rsar & !1 } else { self.rsar };
                let v = self.mem_read(addr, len);
                self.dma_update(len);
                v
            }
            0x18..=0x1F => {
                self.reset();
                0
            }
            CR => self.cmd as u32,
            _ => {
                let page = self.cmd >> 6;
                let reg = offset & 0x0F;
                (match (page, reg) {
                    (1, 1..=6) => self.phys[reg as usize - 1],
                    (1, 7) => self.curpag,
                    (1, 8..=15) => self.mult[reg as usize - 8],
                    (2, 1) => (self.start >> 8) as u8,
                    (2, 2) => (self.stop >> 8) as u8,
                    (2, 4) => self.tpsr,
                    (2, 0x0C) => self.rxcr,
                    (2, 0x0D) => self.txcr,
                    (2, 0x0E) => self.dcfg,
                    (2, 0x0F) => self.imr,
                    (0, 3) => self.boundary,
                    (0, 4) => self.tsr,
                    (0, 7) => self.isr,
                    (0, 8) => self.rsar as u8,
                    (0, 9) => (self.rsar >> 8) as u8,
                    (0, 0x0C) => self.rsr,
                    _ => 0,
                }) as u32
            }
        }
    }

    /// A register write of `size` bytes at card offset `offset`.
    pub fn pio_write(&mut self, offset: u16, size: u8, value: u32) {
        self.counters.accesses += 1;
        let v = value as u8;
        match offset {
            DATA..=0x17 => {
                self.counters.data_accesses += 1;
                let len = if self.dcfg & DCR_WTS != 0 && size >= 2 {
                    2
                } else {
                    1
                };
                let addr = if len == 2 { self.rsar & !1 } else { self.rsar };
                self.mem_write(addr, len, value);
                self.dma_update(len);
            }
            0x18..=0x1F => {} // writes to the reset port do nothing
            CR => self.write_cr(v),
            _ => {
                let page = self.cmd >> 6;
                let reg = offset & 0x0F;
                match (page, reg) {
                    (0, 1) => self.start = (v as u32) << 8,
                    (0, 2) => self.stop = (v as u32) << 8,
                    (0, 3) => self.boundary = v,
                    (0, 4) => self.tpsr = v,
                    (0, 5) => self.tcnt = (self.tcnt & 0xFF00) | v as u16,
                    (0, 6) => self.tcnt = (self.tcnt & 0x00FF) | (v as u16) << 8,
                    (0, 7) => self.isr &= !(v & 0x7F),
                    (0, 8) => self.rsar = (self.rsar & 0xFF00) | v as u32,
                    (0, 9) => self.rsar = (self.rsar & 0x00FF) | (v as u32) << 8,
                    (0, 0x0A) => self.rcnt = (self.rcnt & 0xFF00) | v as u16,
                    (0, 0x0B) => self.rcnt = (self.rcnt & 0x00FF) | (v as u16) << 8,
                    (0, 0x0C) => self.rxcr = v,
                    (0, 0x0D) => self.txcr = v,
                    (0, 0x0E) => self.dcfg = v,
                    (0, 0x0F) => self.imr = v,
                    (1, 1..=6) => self.phys[reg as usize - 1] = v,
                    (1, 7) => self.curpag = v,
                    (1, 8..=15) => self.mult[reg as usize - 8] = v,
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A backend that keeps what was sent (unit tests only; the namespace test uses taps).
    #[derive(Clone, Default)]
    pub(crate) struct Sink(pub Arc<Mutex<Vec<Vec<u8>>>>);

    impl NetBackend for Sink {
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    fn card() -> (Ne2000<Sink>, Sink) {
        let sink = Sink::default();
        let mut n = Ne2000::new([2, 0, 0, 0, 0, 1], sink.clone());
        n.pio_write(CR, 1, (CR_STP | CR_RD_ABORT) as u32);
        n.pio_write(DCR, 1, 0x49);
        n.pio_write(PSTART, 1, 0x46);
        n.pio_write(PSTOP, 1, 0x80);
        n.pio_write(BNRY, 1, 0x46);
        n.pio_write(RCR, 1, RCR_AB as u32);
        n.pio_write(IMR, 1, 0x3F);
        n.pio_write(CR, 1, (CR_PAGE1 | CR_STP | CR_RD_ABORT) as u32);
        for (i, b) in [2u8, 0, 0, 0, 0, 1].iter().enumerate() {
            n.pio_write(PSTART + i as u16, 1, *b as u32);
        }
        n.pio_write(CURR, 1, 0x47);
        n.pio_write(CR, 1, (CR_STA | CR_RD_ABORT) as u32);
        (n, sink)
    }

    fn remote_read(n: &mut Ne2000<Sink>, addr: u16, len: usize) -> Vec<u8> {
        n.pio_write(RBCR0, 1, len as u32 & 0xFF);
        n.pio_write(RBCR1, 1, (len >> 8) as u32);
        n.pio_write(RSAR0, 1, addr as u32 & 0xFF);
        n.pio_write(RSAR1, 1, (addr >> 8) as u32);
        n.pio_write(CR, 1, (CR_STA | CR_RD_READ) as u32);
        let mut out = Vec::new();
        for _ in 0..len.div_ceil(2) {
            out.extend_from_slice(&(n.pio_read(DATA, 2) as u16).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    #[test]
    fn prom_holds_the_mac() {
        let (mut n, _) = card();
        let prom = remote_read(&mut n, 0, 32);
        assert_eq!(&prom[..12], &[2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(&prom[14..16], &[0x57, 0x57]);
        assert_ne!(n.pio_read(ISR, 1) as u8 & ISR_RDC, 0);
    }

    #[test]
    fn transmit_sends_the_bytes_written_through_the_data_port() {
        let (mut n, sink) = card();
        let frame: Vec<u8> = (0..98u32).map(|i| (i * 3) as u8).collect();
        n.pio_write(RBCR0, 1, frame.len() as u32);
        n.pio_write(RBCR1, 1, 0);
        n.pio_write(RSAR0, 1, 0);
        n.pio_write(RSAR1, 1, 0x40);
        n.pio_write(CR, 1, (CR_STA | CR_RD_WRITE) as u32);
        for w in frame.chunks(2) {
            n.pio_write(DATA, 2, u16::from_le_bytes([w[0], w[1]]) as u32);
        }
        assert_ne!(n.pio_read(ISR, 1) as u8 & ISR_RDC, 0, "remote DMA complete");
        n.pio_write(TPSR, 1, 0x40);
        n.pio_write(TBCR0, 1, frame.len() as u32);
        n.pio_write(TBCR1, 1, 0);
        n.pio_write(CR, 1, (CR_STA | CR_TXP | CR_RD_ABORT) as u32);
        assert_eq!(*sink.0.lock().unwrap(), vec![frame]);
        assert_ne!(n.pio_read(ISR, 1) as u8 & ISR_PTX, 0);
        assert_eq!(n.pio_read(TPSR, 1) as u8, TSR_PTX);
        assert_eq!(n.counters().data_accesses, 49);
        assert!(n.irq());
        n.pio_write(ISR, 1, 0xFF);
        assert!(!n.irq(), "writing ones clears ISR");
    }

    #[test]
    fn receive_fills_the_ring_with_headers_and_wraps() {
        let (mut n, _) = card();
        let mut frame = vec![0xFFu8; 6];
        frame.extend((0..1000u32).map(|i| i as u8));
        // Fill most of the ring so later frames wrap past PSTOP back to PSTART.
        let mut curr = 0x47u8;
        let mut bnry = 0x46u8;
        for round in 0..100 {
            assert!(n.receive(&frame), "round {round}");
            let this = if bnry + 1 >= 0x80 { 0x46 } else { bnry + 1 };
            assert_eq!(this, curr);
            let hdr = remote_read(&mut n, (this as u16) << 8, 4);
            assert_eq!(hdr[0] & RSR_RXOK, RSR_RXOK);
            let len = u16::from_le_bytes([hdr[2], hdr[3]]) as usize;
            assert_eq!(len, frame.len() + 4);
            let body = remote_read(&mut n, ((this as u16) << 8) + 4, len - 4);
            assert_eq!(body, frame, "round {round}");
            let next = hdr[1];
            n.pio_write(CR, 1, (CR_PAGE1 | CR_STA | CR_RD_ABORT) as u32);
            curr = n.pio_read(CURR, 1) as u8;
            n.pio_write(CR, 1, (CR_STA | CR_RD_ABORT) as u32);
            assert_eq!(next, curr);
            bnry = if next == 0x46 { 0x7F } else { next - 1 };
            n.pio_write(BNRY, 1, bnry as u32);
        }
        assert_eq!(n.counters().rx_frames, 100);
    }

    #[test]
    fn a_full_ring_refuses_and_the_filter_drops_strangers() {
        let (mut n, _) = card();
        let mut frame = vec![0xFFu8; 6];
        frame.resize(1514, 7);
        let mut accepted = 0;
        while n.receive(&frame) {
            accepted += 1;
        }
        // 0x46..0x80 is 58 pages, 57 free behind BNRY; a full frame takes 6 pages, and one
        // is accepted only while a full frame's 1518 bytes are free: 9 fit.
        assert_eq!(accepted, 9);
        assert!(!n.can_receive());
        assert_ne!(n.pio_read(ISR, 1) as u8 & ISR_OVW, 0);
        let (mut n, _) = card();
        let mut unicast_other = vec![2, 0, 0, 0, 0, 9];
        unicast_other.resize(64, 0);
        assert!(!n.receive(&unicast_other));
        let mut unicast_ours = vec![2, 0, 0, 0, 0, 1];
        unicast_ours.resize(64, 0);
        assert!(n.receive(&unicast_ours));
        assert_eq!(n.counters().rx_filtered, 1);
    }
}
