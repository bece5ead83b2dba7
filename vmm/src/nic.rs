//! The emulated NE2000 NIC on KVM: a guest program whose `in`/`out` instructions on the card's
//! ports (base [`IO_BASE`]) exit to this process, where the vCPU thread serves each one with the
//! same [`Ne2000`](enlight_driver::emulated::ne2000::Ne2000) model the thread transport uses
//! (behind the card's lock, shared with the tap backend's reader thread).
//!
//! The VMM hands the guest one command at a time in the command block ([`CMD`]) and runs the
//! vCPU until the guest's done-write (an MMIO exit). The guest program knows four commands,
//! each a stretch of `ne.c`/`8390.c`:
//! - `WRITES`: a table of (port, byte) pairs in the data buffer, one `out dx, al` each (the
//!   card's set-up and the interrupt acknowledgements);
//! - `TX`: the frame in the data buffer goes through the remote-DMA data port (`out dx, ax` per
//!   word), then RDC is polled, TBCR/TPSR set, TXP issued and PTX/TXE polled;
//! - `PEEK`: reads CURR (page 1) and BNRY (page 0);
//! - `READ`: a remote-DMA read of a span of card memory into the data buffer (`in ax, dx` per
//!   word), RDC acknowledged, and BNRY moved when asked.
//!
//! The receive ring's bookkeeping (which page is next, where BNRY goes, whether a header makes
//! sense) is computed by the VMM between commands, as [`Ne2kDriver`] computes it; every register
//! access is the guest's. The register sequence is the Rust driver's, so both transports trap
//! on the same accesses per frame.
//!
//! [`Ne2kDriver`]: enlight_driver::emulated::ne2000_driver::Ne2kDriver

use enlight_driver::emulated::ne2000::{self as ne, MAX_FRAME};
use enlight_driver::emulated::ne2000_driver::{RX_START, RX_STOP, TX_PAGE};
use enlight_driver::emulated::nic::{NicGuest, SharedCard, IO_BASE};
use enlight_driver::emulated::pio::PioDevice;
use enlight_driver::emulated::EmulatedError;

use crate::asm::{Asm, Cond, R32};
use crate::machine::{Exit, Machine, BUF, CMD, CODE, DONE_MMIO};
use crate::{detect, ExitCounters, VmmError};

const OP_WRITES: u32 = 1;
const OP_TX: u32 = 2;
const OP_PEEK: u32 = 3;
const OP_READ: u32 = 4;

/// Command block: op, then three arguments, then what the guest writes back.
const C_OP: usize = 0;
/// WRITES: entries; TX: frame length; READ: card address.
const C_A: usize = 4;
/// TX, READ: words to move.
const C_WORDS: usize = 8;
/// TX, READ: bytes for RBCR (2 x words).
const C_BYTES: usize = 12;
/// Back: TX's final ISR.
const C_ISR: usize = 16;
/// Back: PEEK's CURR.
const C_CURR: usize = 20;
/// Back: PEEK's BNRY.
const C_BNRY: usize = 24;
/// READ: BNRY to write afterwards, plus one (0: leave BNRY alone).
const C_SET_BNRY: usize = 28;

fn port(reg: u16) -> u16 {
    IO_BASE + reg
}

/// `out` of a constant byte to a card register.
fn outb(a: &mut Asm, reg: u16, v: u8) {
    a.mov_dx(port(reg)).mov_al(v).out_al();
}

/// RBCR0/1 from the command block's byte count, RSAR0/1 from `rsar` (or the block's address).
fn remote_setup(a: &mut Asm, rsar_from_block: bool, rsar_page: u8, cmd: u8) {
    a.mov_dx(port(ne::RBCR0))
        .load_rbx(R32::Eax, C_BYTES as i8)
        .out_al()
        .mov_dx(port(ne::RBCR1))
        .shr_eax(8)
        .out_al();
    if rsar_from_block {
        a.mov_dx(port(ne::RSAR0))
            .load_rbx(R32::Eax, C_A as i8)
            .out_al()
            .mov_dx(port(ne::RSAR1))
            .shr_eax(8)
            .out_al();
    } else {
        outb(a, ne::RSAR0, 0);
        outb(a, ne::RSAR1, rsar_page);
    }
    outb(a, ne::CR, ne::CR_STA | cmd);
}

/// The guest program (see the module documentation).
fn ne2k_guest_program() -> Vec<u8> {
    let mut a = Asm::new(CODE);
    a.label("top").mov_imm(R32::Ebx, CMD as u32);
    a.load_rbx(R32::Eax, C_OP as i8);
    a.cmp_eax(OP_WRITES as i8).jcc(Cond::Z, "writes");
    a.cmp_eax(OP_TX as i8).jcc(Cond::Z, "tx");
    a.cmp_eax(OP_PEEK as i8).jcc(Cond::Z, "peek");
    a.cmp_eax(OP_READ as i8).jcc(Cond::Z, "read");
    a.jmp("done");

    // WRITES: each 4-byte entry is port (low 16 bits) and value (bits 16-23).
    a.label("writes")
        .mov_imm(R32::Edi, BUF as u32)
        .load_rbx(R32::Esi, C_A as i8);
    a.label("wnext")
        .load_eax_rdi()
        .mov_edx_eax()
        .shr_eax(16)
        .out_al()
        .add_rdi(4)
        .dec(R32::Esi)
        .jcc(Cond::Nz, "wnext")
        .jmp("done");

    // TX (ne_block_output + ei_start_xmit).
    a.label("tx");
    outb(&mut a, ne::CR, ne::CR_STA | ne::CR_RD_ABORT);
    outb(&mut a, ne::ISR, ne::ISR_RDC);
    remote_setup(&mut a, false, TX_PAGE, ne::CR_RD_WRITE);
    a.mov_dx(port(ne::DATA))
        .mov_imm(R32::Edi, BUF as u32)
        .load_rbx(R32::Esi, C_WORDS as i8);
    a.label("txword")
        .load_ax_rdi()
        .out_ax()
        .add_rdi(2)
        .dec(R32::Esi)
        .jcc(Cond::Nz, "txword");
    a.mov_dx(port(ne::ISR));
    a.label("txrdc")
        .in_al()
        .test_al(ne::ISR_RDC)
        .jcc(Cond::Z, "txrdc");
    outb(&mut a, ne::ISR, ne::ISR_RDC);
    a.mov_dx(port(ne::TBCR0))
        .load_rbx(R32::Eax, C_A as i8)
        .out_al()
        .mov_dx(port(ne::TBCR1))
        .shr_eax(8)
        .out_al();
    outb(&mut a, ne::TPSR, TX_PAGE);
    outb(&mut a, ne::CR, ne::CR_STA | ne::CR_TXP | ne::CR_RD_ABORT);
    a.mov_dx(port(ne::ISR));
    a.label("txdone")
        .in_al()
        .test_al(ne::ISR_PTX | ne::ISR_TXE)
        .jcc(Cond::Z, "txdone")
        .movzx_eax_al()
        .store_rbx(R32::Eax, C_ISR as i8);
    outb(&mut a, ne::ISR, ne::ISR_PTX | ne::ISR_TXE);
    a.jmp("done");

    // PEEK: CURR on page 1, BNRY on page 0.
    a.label("peek");
    outb(&mut a, ne::CR, ne::CR_PAGE1 | ne::CR_STA | ne::CR_RD_ABORT);
    a.mov_dx(port(ne::CURR))
        .in_al()
        .movzx_eax_al()
        .store_rbx(R32::Eax, C_CURR as i8);
    outb(&mut a, ne::CR, ne::CR_STA | ne::CR_RD_ABORT);
    a.mov_dx(port(ne::BNRY))
        .in_al()
        .movzx_eax_al()
        .store_rbx(R32::Eax, C_BNRY as i8)
        .jmp("done");

    // READ: remote DMA from card memory into the buffer, then BNRY if asked.
    a.label("read");
    remote_setup(&mut a, true, 0, ne::CR_RD_READ);
    a.mov_dx(port(ne::DATA))
        .mov_imm(R32::Edi, BUF as u32)
        .load_rbx(R32::Esi, C_WORDS as i8);
    a.label("rxword")
        .in_ax()
        .store_ax_rdi()
        .add_rdi(2)
        .dec(R32::Esi)
        .jcc(Cond::Nz, "rxword");
    outb(&mut a, ne::ISR, ne::ISR_RDC);
    a.load_rbx(R32::Eax, C_SET_BNRY as i8)
        .cmp_eax(0)
        .jcc(Cond::Z, "done")
        .dec(R32::Eax)
        .mov_dx(port(ne::BNRY))
        .out_al();

    a.label("done").store_abs(DONE_MMIO as u32, 1).jmp("top");
    a.finish()
}

/// The NE2000's guest driver running in a VM (the KVM transport of the emulated NIC).
/// `D` is the card as port I/O sees it (absolute ports): [`SharedCard`] in the NIC.
pub struct KvmNe2kGuest<D: PioDevice = SharedCard> {
    machine: Machine,
    card: D,
    counters: ExitCounters,
    rx_errors: u64,
    mac: [u8; 6],
}

impl<D: PioDevice> KvmNe2kGuest<D> {
    /// Builds the VM, checks that KVM works (see [`detect`]) and lets the guest reset and start
    /// the card: the set-up of `Ne2kDriver::new`, register by register.
    pub fn new(card: D) -> Result<KvmNe2kGuest<D>, EmulatedError> {
        detect().map_err(|reason| EmulatedError::from(VmmError::Unavailable(reason)))?;
        let machine = Machine::new(&ne2k_guest_program())?;
        let mut g = KvmNe2kGuest {
            machine,
            card,
            counters: ExitCounters::default(),
            rx_errors: 0,
            mac: [0; 6],
        };
        g.writes(&[
            (ne::CR, ne::CR_STP | ne::CR_RD_ABORT),
            (ne::DCR, 0x48 | ne::DCR_WTS),
            (ne::RBCR0, 0),
            (ne::RBCR1, 0),
            (ne::ISR, 0xFF),
        ])?;
        // The PROM: the station address, each byte doubled.
        let prom = g.read(0, 12, None)?;
        for i in 0..6 {
            g.mac[i] = prom[2 * i];
        }
        let mut setup = vec![
            (ne::CR, ne::CR_STP | ne::CR_RD_ABORT),
            (ne::PSTART, RX_START),
            (ne::PSTOP, RX_STOP),
            (ne::BNRY, RX_START),
            (ne::ISR, 0xFF),
            (ne::IMR, 0),
            (ne::CR, ne::CR_PAGE1 | ne::CR_STP | ne::CR_RD_ABORT),
        ];
        for i in 0..6 {
            setup.push((ne::PSTART + i as u16, g.mac[i]));
        }
        for i in 0..8 {
            setup.push((0x08 + i, 0xFF));
        }
        setup.extend([
            (ne::CURR, RX_START + 1),
            (ne::CR, ne::CR_STA | ne::CR_RD_ABORT),
            (ne::TCR, 0),
            (ne::RCR, ne::RCR_AB | ne::RCR_AM | ne::RCR_PRO),
            (
                ne::IMR,
                ne::ISR_PRX | ne::ISR_PTX | ne::ISR_RXE | ne::ISR_TXE | ne::ISR_OVW,
            ),
        ]);
        g.writes(&setup)?;
        Ok(g)
    }

    /// The station address the guest read from the PROM.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The VMM's own exit counts.
    pub fn exit_counters(&self) -> ExitCounters {
        self.counters
    }

    fn command(op: u32, a: u32, words: u32, set_bnry: Option<u8>) -> [u8; 32] {
        let mut cmd = [0u8; 32];
        let mut put = |at: usize, v: u32| cmd[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(C_OP, op);
        put(C_A, a);
        put(C_WORDS, words);
        put(C_BYTES, words * 2);
        put(C_SET_BNRY, set_bnry.map_or(0, |b| b as u32 + 1));
        cmd
    }

    /// Runs one command: the vCPU until the guest's done-write, port I/O served by the card.
    fn run(&mut self, cmd: [u8; 32]) -> Result<[u8; 32], VmmError> {
        self.machine.write(CMD, &cmd);
        loop {
            let exit = {
                let card = &mut self.card;
                self.machine.run_with(|port, data, write| {
                    let n = data.len().min(4);
                    if write {
                        let mut v = [0u8; 4];
                        v[..n].copy_from_slice(&data[..n]);
                        card.pio_write(port, n as u8, u32::from_le_bytes(v));
                    } else {
                        let v = card.pio_read(port, n as u8).to_le_bytes();
                        data[..n].copy_from_slice(&v[..n]);
                    }
                })?
            };
            self.counters.exits += 1;
            match exit {
                Exit::Pio => self.counters.pio += 1,
                Exit::Done => {
                    self.counters.mmio += 1;
                    let mut back = [0u8; 32];
                    self.machine.read(CMD, &mut back);
                    return Ok(back);
                }
                other => return Err(VmmError::Guest(format!("unexpected exit {other:?}"))),
            }
        }
    }

    fn writes(&mut self, regs: &[(u16, u8)]) -> Result<(), EmulatedError> {
        let table: Vec<u8> = regs
            .iter()
            .flat_map(|&(reg, v)| (port(reg) as u32 | (v as u32) << 16).to_le_bytes())
            .collect();
        self.machine.write(BUF, &table);
        let cmd = Self::command(OP_WRITES, regs.len() as u32, 0, None);
        self.run(cmd)?;
        Ok(())
    }

    fn read(
        &mut self,
        addr: u16,
        len: usize,
        set_bnry: Option<u8>,
    ) -> Result<Vec<u8>, EmulatedError> {
        let words = len.div_ceil(2) as u32;
        let cmd = Self::command(OP_READ, addr as u32, words, set_bnry);
        self.run(cmd)?;
        let mut out = vec![0u8; len];
        self.machine.read(BUF, &mut out);
        Ok(out)
    }
}

fn u32_at(b: &[u8; 32], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl<D: PioDevice> NicGuest for KvmNe2kGuest<D> {
    fn send(&mut self, frame: &[u8]) -> Result<(), EmulatedError> {
        if frame.len() > MAX_FRAME {
            return Err(EmulatedError::Invalid(format!(
                "{}-byte frame (at most {MAX_FRAME})",
                frame.len()
            )));
        }
        let len = frame.len().max(60);
        let words = len.div_ceil(2);
        let mut padded = vec![0u8; words * 2];
        padded[..frame.len()].copy_from_slice(frame);
        self.machine.write(BUF, &padded);
        let cmd = Self::command(OP_TX, len as u32, words as u32, None);
        let back = self.run(cmd)?;
        let isr = u32_at(&back, C_ISR) as u8;
        if isr & ne::ISR_TXE != 0 {
            return Err(EmulatedError::Device {
                status: isr,
                error: 0,
            });
        }
        Ok(())
    }

    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8])) -> Result<usize, EmulatedError> {
        let mut n = 0;
        loop {
            let back = self.run(Self::command(OP_PEEK, 0, 0, None))?;
            let curr = u32_at(&back, C_CURR) as u8;
            let mut this = (u32_at(&back, C_BNRY) as u8).wrapping_add(1);
            if this >= RX_STOP {
                this = RX_START;
            }
            if this == curr {
                break;
            }
            let hdr = self.read((this as u16) << 8, 4, None)?;
            let (next, total) = (hdr[1], u16::from_le_bytes([hdr[2], hdr[3]]) as usize);
            if !(RX_START..RX_STOP).contains(&next) || !(64..=MAX_FRAME + 4).contains(&total) {
                // A header that makes no sense: drop everything up to CURR (as ei_receive does).
                self.rx_errors += 1;
                let bnry = if curr == RX_START {
                    RX_STOP - 1
                } else {
                    curr - 1
                };
                self.writes(&[(ne::BNRY, bnry)])?;
                break;
            }
            let bnry = if next == RX_START {
                RX_STOP - 1
            } else {
                next - 1
            };
            let frame = self.read(((this as u16) << 8) + 4, total - 4, Some(bnry))?;
            deliver(&frame);
            n += 1;
        }
        self.writes(&[(ne::ISR, ne::ISR_PRX | ne::ISR_RXE | ne::ISR_OVW)])?;
        Ok(n)
    }

    fn traps(&self) -> u64 {
        self.counters.pio
    }

    fn vm_exits(&self) -> u64 {
        self.counters.exits
    }

    fn rx_errors(&self) -> u64 {
        self.rx_errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use enlight_driver::emulated::ne2000::{Ne2000, NetBackend};
    use enlight_driver::emulated::ne2000_driver::Ne2kDriver;
    use enlight_driver::emulated::pio::{DirectBus, PioBus};
    use std::sync::{Arc, Mutex};

    /// Frames the card sent.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl NetBackend for Sink {
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    /// The card at absolute ports, shared with the test (which plays the tap backend).
    #[derive(Clone)]
    struct Card(Arc<Mutex<Ne2000<Sink>>>);

    impl PioDevice for Card {
        fn pio_read(&mut self, port: u16, size: u8) -> u32 {
            self.0.lock().unwrap().pio_read(port - IO_BASE, size)
        }
        fn pio_write(&mut self, port: u16, size: u8, value: u32) {
            self.0
                .lock()
                .unwrap()
                .pio_write(port - IO_BASE, size, value)
        }
    }

    const MAC: [u8; 6] = [2, 0x11, 0x22, 0x33, 0x44, 0x55];

    fn card() -> (Card, Sink) {
        let sink = Sink::default();
        (
            Card(Arc::new(Mutex::new(Ne2000::new(MAC, sink.clone())))),
            sink,
        )
    }

    fn frame(len: usize, seed: u32) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len as u32).map(|i| (i * 7 + seed) as u8).collect();
        f[..6].copy_from_slice(&[0xFF; 6]); // broadcast: passes any filter
        f
    }

    #[test]
    fn the_guest_program_sends_and_receives_through_real_pio_exits() {
        if !crate::kvm_or_skip("the_guest_program_sends_and_receives_through_real_pio_exits") {
            return;
        }
        let (c, sink) = card();
        let mut g = KvmNe2kGuest::new(c.clone()).unwrap();
        assert_eq!(
            g.mac(),
            MAC,
            "the guest read the PROM through the data port"
        );
        let model = |c: &Card| c.0.lock().unwrap().counters();
        assert_eq!(model(&c).accesses, g.exit_counters().pio);

        // Transmit: the frames arrive intact, and each costs exactly the Rust driver's accesses.
        let (rc, _rsink) = card();
        let mut rust = Ne2kDriver::new(DirectBus::new(rc), IO_BASE).unwrap();
        for len in [1514usize, 42, 1000] {
            let f = frame(len, len as u32);
            let before = g.exit_counters();
            g.send(&f).unwrap();
            let after = g.exit_counters();
            let rust_before = rust.bus().traps();
            rust.send(&f).unwrap();
            assert_eq!(
                after.pio - before.pio,
                rust.bus().traps() - rust_before,
                "PIO exits of a {len}-byte frame = the Rust driver's accesses"
            );
            assert_eq!(after.mmio - before.mmio, 1, "one done-write per frame");
            let sent = sink.0.lock().unwrap().last().unwrap().clone();
            let mut want = f.clone();
            want.resize(len.max(60), 0);
            assert_eq!(sent, want, "{len}-byte frame intact (padded to 60)");
        }

        // Receive: 100 frames of varied sizes, in batches as the ring allows, across its wrap.
        let mut got = Vec::new();
        let mut want = Vec::new();
        let mut i = 0u32;
        while i < 100 {
            while i < 100 {
                let f = frame(60 + (i as usize * 97) % 1400, i);
                if !c.0.lock().unwrap().receive(&f) {
                    break;
                }
                want.push(f);
                i += 1;
            }
            g.receive(&mut |f| got.push(f.to_vec())).unwrap();
        }
        assert_eq!(got.len(), 100);
        assert!(got == want, "every frame intact and in order");
        assert_eq!(g.rx_errors(), 0);
        let c_now = g.exit_counters();
        assert_eq!(
            model(&c).accesses,
            c_now.pio,
            "every exit reached the model"
        );
        assert_eq!(c_now.exits, c_now.pio + c_now.mmio);
        assert_eq!(model(&c).rx_frames, 100);
    }
}
