//! The guest's NE2000 driver: what Linux's `ne.c`/`8390.c` do with the card, one register access
//! at a time over any [`PioBus`], polling for DMA and transmit completion.
//!
//! Transmit (`ne_block_output` + `ei_start_xmit`): remote-DMA the frame into the transmit pages
//! through the data port, wait for RDC, set TPSR/TBCR and TXP, wait for PTX. Receive
//! (`ei_receive`): read CURR (page 1) and BNRY, and while the ring is not empty remote-read each
//! frame's 4-byte header and then its bytes, and move BNRY behind it.

use super::ne2000::{self as ne, *};
use super::pio::PioBus;
use super::EmulatedError;

/// First transmit page (6 pages: one full frame).
pub const TX_PAGE: u8 = 0x40;
/// First receive page.
pub const RX_START: u8 = 0x46;
/// One past the last receive page.
pub const RX_STOP: u8 = 0x80;

const MAX_POLLS: u32 = 100_000;

/// A polling NE2000 driver over `bus`; ports are `base + offset`.
pub struct Ne2kDriver<B: PioBus> {
    bus: B,
    base: u16,
    mac: [u8; 6],
    /// Frames whose receive header made no sense (the ring was reset behind them).
    pub rx_errors: u64,
}

impl<B: PioBus> Ne2kDriver<B> {
    /// Resets and starts the card at I/O `base` (promiscuous: the guest's network stack sits
    /// behind this driver like a bridge port, so frames for its address must pass).
    pub fn new(bus: B, base: u16) -> Result<Self, EmulatedError> {
        let mut d = Ne2kDriver {
            bus,
            base,
            mac: [0; 6],
            rx_errors: 0,
        };
        d.bus.read(base + ne::RESET, 1);
        d.out(CR, CR_STP | CR_RD_ABORT);
        d.out(DCR, 0x48 | DCR_WTS); // word-wide, normal operation, FIFO threshold 8
        d.out(RBCR0, 0);
        d.out(RBCR1, 0);
        d.out(ISR, 0xFF);
        // The PROM: the station address, each byte doubled.
        let prom = d.remote_read(0, 12)?;
        for i in 0..6 {
            d.mac[i] = prom[2 * i];
        }
        d.out(CR, CR_STP | CR_RD_ABORT);
        d.out(PSTART, RX_START);
        d.out(PSTOP, RX_STOP);
        d.out(BNRY, RX_START);
        d.out(ISR, 0xFF);
        d.out(IMR, 0);
        d.out(CR, CR_PAGE1 | CR_STP | CR_RD_ABORT);
        for i in 0..6 {
            d.out(PSTART + i as u16, d.mac[i]);
        }
        for i in 0..8 {
            d.out(0x08 + i, 0xFF);
        }
        d.out(CURR, RX_START + 1);
        d.out(CR, CR_STA | CR_RD_ABORT);
        d.out(TCR, 0);
        d.out(RCR, RCR_AB | RCR_AM | RCR_PRO);
        d.out(IMR, ISR_PRX | ISR_PTX | ISR_RXE | ISR_TXE | ISR_OVW);
        Ok(d)
    }

    /// The station address read from the PROM.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The bus (for its trap count).
    pub fn bus(&self) -> &B {
        &self.bus
    }

    fn out(&mut self, reg: u16, v: u8) {
        self.bus.write(self.base + reg, 1, v as u32);
    }

    fn inb(&mut self, reg: u16) -> u8 {
        self.bus.read(self.base + reg, 1) as u8
    }

    fn wait_isr(&mut self, bits: u8) -> Result<u8, EmulatedError> {
        for _ in 0..MAX_POLLS {
            let isr = self.inb(ISR);
            if isr & bits != 0 {
                return Ok(isr);
            }
        }
        Err(EmulatedError::Hung(format!(
            "ISR bits {bits:#04x} never set"
        )))
    }

    fn remote_setup(&mut self, addr: u16, len: usize, cmd: u8) {
        self.out(RBCR0, len as u8);
        self.out(RBCR1, (len >> 8) as u8);
        self.out(RSAR0, addr as u8);
        self.out(RSAR1, (addr >> 8) as u8);
        self.out(CR, CR_STA | cmd);
    }

    fn remote_read(&mut self, addr: u16, len: usize) -> Result<Vec<u8>, EmulatedError> {
        let words = len.div_ceil(2);
        self.remote_setup(addr, words * 2, CR_RD_READ);
        let mut out = Vec::with_capacity(words * 2);
        for _ in 0..words {
            out.extend_from_slice(&(self.bus.read(self.base + DATA, 2) as u16).to_le_bytes());
        }
        out.truncate(len);
        self.out(ISR, ISR_RDC);
        Ok(out)
    }

    /// Sends one frame (padded to 60 bytes); waits until the card has transmitted it.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), EmulatedError> {
        if frame.len() > MAX_FRAME {
            return Err(EmulatedError::Invalid(format!(
                "{}-byte frame (at most {MAX_FRAME})",
                frame.len()
            )));
        }
        let len = frame.len().max(60);
        let words = len.div_ceil(2);
        self.out(CR, CR_STA | CR_RD_ABORT);
        self.out(ISR, ISR_RDC);
        self.remote_setup((TX_PAGE as u16) << 8, words * 2, CR_RD_WRITE);
        for i in 0..words {
            let b = |j: usize| frame.get(j).copied().unwrap_or(0);
            let w = u16::from_le_bytes([b(2 * i), b(2 * i + 1)]);
            self.bus.write(self.base + DATA, 2, w as u32);
        }
        self.wait_isr(ISR_RDC)?;
        self.out(ISR, ISR_RDC);
        self.out(TBCR0, len as u8);
        self.out(TBCR1, (len >> 8) as u8);
        self.out(TPSR, TX_PAGE);
        self.out(CR, CR_STA | CR_TXP | CR_RD_ABORT);
        let isr = self.wait_isr(ISR_PTX | ISR_TXE)?;
        self.out(ISR, ISR_PTX | ISR_TXE);
        if isr & ISR_TXE != 0 {
            return Err(EmulatedError::Device {
                status: isr,
                error: self.inb(TPSR),
            });
        }
        Ok(())
    }

    /// Takes every frame out of the receive ring, oldest first, handing each to `deliver`;
    /// returns how many. Acknowledges the receive interrupt bits.
    pub fn receive(&mut self, mut deliver: impl FnMut(&[u8])) -> Result<usize, EmulatedError> {
        let mut n = 0;
        loop {
            self.out(CR, CR_PAGE1 | CR_STA | CR_RD_ABORT);
            let curr = self.inb(CURR);
            self.out(CR, CR_STA | CR_RD_ABORT);
            let mut this = self.inb(BNRY).wrapping_add(1);
            if this >= RX_STOP {
                this = RX_START;
            }
            if this == curr {
                break;
            }
            let hdr = self.remote_read((this as u16) << 8, 4)?;
            let (next, total) = (hdr[1], u16::from_le_bytes([hdr[2], hdr[3]]) as usize);
            if !(RX_START..RX_STOP).contains(&next) || !(64..=MAX_FRAME + 4).contains(&total) {
                // A header that makes no sense: drop everything up to CURR (as ei_receive does).
                self.rx_errors += 1;
                let bnry = if curr == RX_START {
                    RX_STOP - 1
                } else {
                    curr - 1
                };
                self.out(BNRY, bnry);
                break;
            }
            let frame = self.remote_read(((this as u16) << 8) + 4, total - 4)?;
            deliver(&frame);
            n += 1;
            let bnry = if next == RX_START {
                RX_STOP - 1
            } else {
                next - 1
            };
            self.out(BNRY, bnry);
        }
        self.out(ISR, ISR_PRX | ISR_RXE | ISR_OVW);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulated::ne2000::tests::Sink;
    use crate::emulated::pio::{DirectBus, PioDevice};

    impl PioDevice for Ne2000<Sink> {
        fn pio_read(&mut self, port: u16, size: u8) -> u32 {
            Ne2000::pio_read(self, port - 0x300, size)
        }
        fn pio_write(&mut self, port: u16, size: u8, value: u32) {
            Ne2000::pio_write(self, port - 0x300, size, value)
        }
    }

    #[test]
    fn driver_sends_and_receives_through_the_registers() {
        let sink = Sink::default();
        let card = Ne2000::new([2, 0x11, 0x22, 0x33, 0x44, 0x55], sink.clone());
        let mut d = Ne2kDriver::new(DirectBus::new(card), 0x300).unwrap();
        assert_eq!(d.mac(), [2, 0x11, 0x22, 0x33, 0x44, 0x55]);
        let frame: Vec<u8> = (0..1514u32).map(|i| (i * 7) as u8).collect();
        let before = d.bus().traps();
        d.send(&frame).unwrap();
        let traps = d.bus().traps() - before;
        // 757 data words plus the set-up, RDC and PTX handshakes.
        assert!((757..800).contains(&traps), "{traps}");
        d.send(&frame[..42]).unwrap();
        {
            let sent = sink.0.lock().unwrap();
            assert_eq!(sent[0], frame);
            assert_eq!(sent[1].len(), 60, "short frames are padded");
            assert_eq!(sent[1][..42], frame[..42]);
        }
        // Receive: frames placed by the card come out intact and in order, across the wrap.
        let mut got = Vec::new();
        for round in 0..30u8 {
            let f: Vec<u8> = std::iter::repeat_n(round, 900).collect();
            assert!(d.bus.device.receive(&f));
            assert!(d.bus.device.irq());
            d.receive(|fr| got.push(fr.to_vec())).unwrap();
            assert!(!d.bus.device.irq(), "interrupt acknowledged");
        }
        assert_eq!(got.len(), 30);
        for (i, f) in got.iter().enumerate() {
            assert_eq!(f.len(), 900);
            assert!(f.iter().all(|b| *b == i as u8));
        }
        assert_eq!(d.rx_errors, 0);
    }
}
