//! An IDE/ATA disk in PIO mode, modelled at the register level the way QEMU's `hw/ide/core.c`
//! models it: the legacy primary channel's task file (0x1F0-0x1F7) and device control /
//! alternate status (0x3F6), IDENTIFY DEVICE, READ/WRITE SECTORS (LBA28 and the EXT LBA48 forms),
//! FLUSH CACHE and SET FEATURES, the BSY/DRDY/DRQ/ERR status protocol and one 16-bit data-port
//! access per two bytes (256 per 512-byte sector).
//!
//! Every register access is one call into [`IdeDisk::pio_read`] / [`IdeDisk::pio_write`]; the
//! transport decides how that call is reached (a hand-off to a device-model thread, or a KVM
//! exit). Like QEMU's PIO path, each DRQ block (one sector for READ/WRITE SECTORS) is one
//! positioned read or write of the backing file, done synchronously inside the access that
//! starts it (the command write, or the data access that ends the previous block). Only the
//! master device exists; the slave reads as absent (status 0).

use std::os::unix::fs::FileExt;

use crate::disk::{Backing, SECTOR};

/// Data register (16-bit; 32-bit accesses move two words).
pub const PORT_DATA: u16 = 0x1F0;
/// Error (read) / features (write).
pub const PORT_ERROR: u16 = 0x1F1;
/// Sector count.
pub const PORT_NSECTOR: u16 = 0x1F2;
/// LBA bits 0-7 (sector number).
pub const PORT_LBA_LOW: u16 = 0x1F3;
/// LBA bits 8-15 (cylinder low).
pub const PORT_LBA_MID: u16 = 0x1F4;
/// LBA bits 16-23 (cylinder high).
pub const PORT_LBA_HIGH: u16 = 0x1F5;
/// Drive/head: bit 6 LBA mode, bit 4 device (0 master), bits 0-3 LBA28 bits 24-27.
pub const PORT_SELECT: u16 = 0x1F6;
/// Status (read, clears a pending interrupt) / command (write).
pub const PORT_STATUS: u16 = 0x1F7;
/// Alternate status (read, no side effect) / device control (write).
pub const PORT_ALT_STATUS: u16 = 0x3F6;

/// Status: busy.
pub const BSY: u8 = 0x80;
/// Status: device ready.
pub const DRDY: u8 = 0x40;
/// Status: device fault.
pub const DF: u8 = 0x20;
/// Status: seek complete (obsolete, set as QEMU does).
pub const DSC: u8 = 0x10;
/// Status: data request (the data port has a block to move).
pub const DRQ: u8 = 0x08;
/// Status: error (details in the error register).
pub const ERR: u8 = 0x01;

/// Error: command aborted.
pub const ABRT: u8 = 0x04;
/// Error: sector not found (address out of range).
pub const IDNF: u8 = 0x10;
/// Error: uncorrectable data error (the backing file failed).
pub const UNC: u8 = 0x40;

/// Device control: interrupts disabled.
pub const CTL_NIEN: u8 = 0x02;
/// Device control: software reset.
pub const CTL_SRST: u8 = 0x04;
/// Device control: read the previous (high order) contents of the LBA48 registers.
pub const CTL_HOB: u8 = 0x80;

/// IDENTIFY DEVICE.
pub const CMD_IDENTIFY: u8 = 0xEC;
/// READ SECTORS (with retry).
pub const CMD_READ: u8 = 0x20;
/// READ SECTORS (without retry).
pub const CMD_READ_NORETRY: u8 = 0x21;
/// READ SECTORS EXT (LBA48).
pub const CMD_READ_EXT: u8 = 0x24;
/// WRITE SECTORS (with retry).
pub const CMD_WRITE: u8 = 0x30;
/// WRITE SECTORS (without retry).
pub const CMD_WRITE_NORETRY: u8 = 0x31;
/// WRITE SECTORS EXT (LBA48).
pub const CMD_WRITE_EXT: u8 = 0x34;
/// FLUSH CACHE.
pub const CMD_FLUSH: u8 = 0xE7;
/// FLUSH CACHE EXT.
pub const CMD_FLUSH_EXT: u8 = 0xEA;
/// SET FEATURES.
pub const CMD_SET_FEATURES: u8 = 0xEF;

/// Sectors READ MULTIPLE would move per DRQ block (IDENTIFY word 47); we serve one per block
/// for READ/WRITE SECTORS, as the standard says.
pub const MAX_MULTIPLE: u16 = 16;

const BLOCK_ALIGN: usize = 4096;

/// A sector buffer aligned for `O_DIRECT`.
struct SectorBuf {
    ptr: *mut u8,
}

// SAFETY: the buffer is exclusively owned; moving it to another thread moves the ownership.
unsafe impl Send for SectorBuf {}

impl SectorBuf {
    fn layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(SECTOR as usize, BLOCK_ALIGN).expect("valid layout")
    }

    fn new() -> SectorBuf {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(Self::layout());
        }
        SectorBuf { ptr }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of SECTOR bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, SECTOR as usize) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, SECTOR as usize) }
    }
}

impl Drop for SectorBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with the same layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, Self::layout()) };
    }
}

/// What the data port is moving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    /// Nothing: data accesses are ignored (reads return 0).
    Idle,
    /// IDENTIFY data, device to host.
    Identify,
    /// Sectors device to host; `remaining` counts the one in the buffer.
    Read {
        lba: u64,
        remaining: u32,
        lba48: bool,
    },
    /// Sectors host to device; `remaining` counts the one being filled.
    Write {
        lba: u64,
        remaining: u32,
        lba48: bool,
    },
}

/// Counters of the model (what it saw, independent of any transport or probe).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdeCounters {
    /// Register reads and writes handled.
    pub accesses: u64,
    /// Data-port accesses among them.
    pub data_accesses: u64,
    /// Commands accepted (including aborted ones).
    pub commands: u64,
    /// Sectors read from / written to the backing file.
    pub sectors_read: u64,
    /// Sectors written.
    pub sectors_written: u64,
    /// Interrupts raised (only while nIEN is clear).
    pub interrupts: u64,
}

/// The register-level model of one IDE disk (master on the primary channel).
pub struct IdeDisk {
    backing: Backing,
    capacity: u64,
    serial: String,
    // Task file; `hob_*` hold the previous write (LBA48's two-deep registers).
    feature: u8,
    nsector: u8,
    lba_low: u8,
    lba_mid: u8,
    lba_high: u8,
    hob_feature: u8,
    hob_nsector: u8,
    hob_lba_low: u8,
    hob_lba_mid: u8,
    hob_lba_high: u8,
    select: u8,
    status: u8,
    error: u8,
    control: u8,
    irq_pending: bool,
    transfer: Transfer,
    buf: SectorBuf,
    pos: usize,
    counters: IdeCounters,
}

/// An ATA string field: ASCII padded with spaces, the two bytes of each word swapped.
fn put_ata_string(words: &mut [u16], s: &str) {
    let mut bytes = vec![b' '; words.len() * 2];
    for (b, c) in bytes.iter_mut().zip(s.bytes()) {
        *b = c;
    }
    for (w, pair) in words.iter_mut().zip(bytes.chunks(2)) {
        *w = (pair[0] as u16) << 8 | pair[1] as u16;
    }
}

/// Reads an ATA string field back.
pub fn ata_string(words: &[u16]) -> String {
    let bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| [(w >> 8) as u8, *w as u8])
        .collect();
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}

impl IdeDisk {
    /// A disk over `backing`; `serial` appears in IDENTIFY (at most 20 characters kept).
    pub fn new(backing: Backing, serial: &str) -> IdeDisk {
        let capacity = backing.capacity_sectors();
        IdeDisk {
            backing,
            capacity,
            serial: serial.chars().take(20).collect(),
            feature: 0,
            nsector: 1,
            lba_low: 1,
            lba_mid: 0,
            lba_high: 0,
            hob_feature: 0,
            hob_nsector: 0,
            hob_lba_low: 0,
            hob_lba_mid: 0,
            hob_lba_high: 0,
            select: 0xA0,
            status: DRDY | DSC,
            error: 0x01, // diagnostic code after reset: no error
            control: 0,
            irq_pending: false,
            transfer: Transfer::Idle,
            buf: SectorBuf::new(),
            pos: 0,
            counters: IdeCounters::default(),
        }
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    /// What the model has seen so far.
    pub fn counters(&self) -> IdeCounters {
        self.counters
    }

    /// Whether the interrupt line is asserted (raised and not yet acknowledged by a status read).
    pub fn irq_pending(&self) -> bool {
        self.irq_pending
    }

    /// The 256 words IDENTIFY DEVICE returns.
    pub fn identify_words(&self) -> [u16; 256] {
        let mut w = [0u16; 256];
        let lba28 = self.capacity.min(0x0FFF_FFFF) as u32;
        // Legacy CHS geometry (16 heads, 63 sectors per track), capped as ATA says.
        let cyls = (self.capacity / (16 * 63)).min(16383) as u16;
        w[0] = 0x0040; // fixed (non-removable) device, ATA
        w[1] = cyls;
        w[3] = 16;
        w[6] = 63;
        put_ata_string(&mut w[10..20], &self.serial);
        put_ata_string(&mut w[23..27], "0.1");
        put_ata_string(&mut w[27..47], "enlight emulated IDE disk");
        w[47] = 0x8000 | MAX_MULTIPLE;
        w[49] = 1 << 9; // LBA supported (no DMA: this model is PIO only)
        w[53] = 0x0001; // words 54-58 valid
        w[54] = cyls;
        w[55] = 16;
        w[56] = 63;
        let chs = cyls as u32 * 16 * 63;
        w[57] = chs as u16;
        w[58] = (chs >> 16) as u16;
        w[60] = lba28 as u16;
        w[61] = (lba28 >> 16) as u16;
        w[80] = 0x00F0; // ATA/ATAPI-4..7
        w[82] = 0x4000;
        w[83] = 0x4000 | 1 << 10 | 1 << 12 | 1 << 13; // LBA48, FLUSH CACHE, FLUSH CACHE EXT
        w[84] = 0x4000;
        w[85] = 0x4000;
        w[86] = 1 << 10 | 1 << 12 | 1 << 13;
        w[87] = 0x4000;
        for (i, word) in w[100..104].iter_mut().enumerate() {
            *word = (self.capacity >> (16 * i)) as u16;
        }
        // Integrity word: signature 0xA5, then a checksum making the 512 bytes sum to 0 mod 256.
        w[255] = 0x00A5;
        let sum: u8 = w
            .iter()
            .flat_map(|x| [*x as u8, (x >> 8) as u8])
            .fold(0u8, |a, b| a.wrapping_add(b));
        w[255] |= (sum.wrapping_neg() as u16) << 8;
        w
    }

    fn master_selected(&self) -> bool {
        self.select & 0x10 == 0
    }

    fn raise_irq(&mut self) {
        if self.control & CTL_NIEN == 0 {
            self.irq_pending = true;
            self.counters.interrupts += 1;
        }
    }

    fn abort(&mut self, error: u8) {
        self.transfer = Transfer::Idle;
        self.pos = 0;
        self.error = error;
        self.status = DRDY | ERR;
        self.raise_irq();
    }

    fn finish_ok(&mut self) {
        self.transfer = Transfer::Idle;
        self.pos = 0;
        self.error = 0;
        self.status = DRDY | DSC;
        self.raise_irq();
    }

    fn lba28(&self) -> u64 {
        (self.select as u64 & 0x0F) << 24
            | (self.lba_high as u64) << 16
            | (self.lba_mid as u64) << 8
            | self.lba_low as u64
    }

    fn lba48(&self) -> u64 {
        (self.hob_lba_high as u64) << 40
            | (self.hob_lba_mid as u64) << 32
            | (self.hob_lba_low as u64) << 24
            | (self.lba_high as u64) << 16
            | (self.lba_mid as u64) << 8
            | self.lba_low as u64
    }

    /// Writes the address of the next sector back into the task file (as the device does, so
    /// that after an error the registers name the failing sector) and the remaining count.
    fn set_position(&mut self, lba: u64, remaining: u32, lba48: bool) {
        self.lba_low = lba as u8;
        self.lba_mid = (lba >> 8) as u8;
        self.lba_high = (lba >> 16) as u8;
        self.nsector = remaining as u8;
        if lba48 {
            self.hob_lba_low = (lba >> 24) as u8;
            self.hob_lba_mid = (lba >> 32) as u8;
            self.hob_lba_high = (lba >> 40) as u8;
            self.hob_nsector = (remaining >> 8) as u8;
        } else {
            self.select = (self.select & 0xF0) | ((lba >> 24) as u8 & 0x0F);
        }
    }

    /// Loads sector `lba` into the buffer and raises DRQ; false (and an aborted command) if the
    /// backing file failed.
    fn load_sector(&mut self, lba: u64) -> bool {
        let off = lba * SECTOR as u64;
        let file = self.backing.file();
        let buf = self.buf.bytes_mut();
        match file.read_exact_at(buf, off) {
            Ok(()) => {
                self.counters.sectors_read += 1;
                self.pos = 0;
                self.status = DRDY | DSC | DRQ;
                self.raise_irq();
                true
            }
            Err(e) => {
                log::warn!("emulated IDE: reading sector {lba}: {e}");
                self.abort(UNC);
                false
            }
        }
    }

    fn start_rw(&mut self, write: bool, lba48: bool) {
        if self.select & 0x40 == 0 {
            // CHS addressing: this model speaks LBA only (IDENTIFY says so in word 49).
            self.abort(ABRT);
            return;
        }
        let (lba, count) = if lba48 {
            let c = (self.hob_nsector as u32) << 8 | self.nsector as u32;
            (self.lba48(), if c == 0 { 65536 } else { c })
        } else {
            let c = self.nsector as u32;
            (self.lba28(), if c == 0 { 256 } else { c })
        };
        if lba
            .checked_add(count as u64)
            .is_none_or(|end| end > self.capacity)
        {
            self.abort(IDNF);
            return;
        }
        if write {
            self.transfer = Transfer::Write {
                lba,
                remaining: count,
                lba48,
            };
            self.pos = 0;
            self.error = 0;
            // The first block is requested without an interrupt (ATA PIO data-out protocol).
            self.status = DRDY | DSC | DRQ;
        } else {
            self.transfer = Transfer::Read {
                lba,
                remaining: count,
                lba48,
            };
            self.error = 0;
            self.load_sector(lba);
        }
    }

    fn command(&mut self, cmd: u8) {
        if !self.master_selected() {
            return; // no slave: commands to it are ignored
        }
        self.counters.commands += 1;
        match cmd {
            CMD_IDENTIFY => {
                let words = self.identify_words();
                for (pair, w) in self.buf.bytes_mut().chunks_mut(2).zip(words) {
                    pair.copy_from_slice(&w.to_le_bytes());
                }
                self.transfer = Transfer::Identify;
                self.pos = 0;
                self.error = 0;
                self.status = DRDY | DSC | DRQ;
                self.raise_irq();
            }
            CMD_READ | CMD_READ_NORETRY => self.start_rw(false, false),
            CMD_READ_EXT => self.start_rw(false, true),
            CMD_WRITE | CMD_WRITE_NORETRY => self.start_rw(true, false),
            CMD_WRITE_EXT => self.start_rw(true, true),
            CMD_FLUSH | CMD_FLUSH_EXT => match self.backing.file().sync_data() {
                Ok(()) => self.finish_ok(),
                Err(e) => {
                    log::warn!("emulated IDE: flush: {e}");
                    self.abort(ABRT)
                }
            },
            // Transfer mode and write-cache sub-commands are accepted and change nothing.
            CMD_SET_FEATURES => match self.feature {
                0x02 | 0x03 | 0x82 => self.finish_ok(),
                _ => self.abort(ABRT),
            },
            _ => self.abort(ABRT),
        }
    }

    /// The data port moved the last byte of the buffer.
    fn block_done(&mut self) {
        match self.transfer {
            Transfer::Idle => {}
            Transfer::Identify => self.finish_ok(),
            Transfer::Read {
                lba,
                remaining,
                lba48,
            } => {
                let (lba, remaining) = (lba + 1, remaining - 1);
                self.set_position(lba, remaining, lba48);
                if remaining == 0 {
                    // The last block raised its interrupt when it was loaded.
                    self.transfer = Transfer::Idle;
                    self.pos = 0;
                    self.status = DRDY | DSC;
                } else {
                    self.transfer = Transfer::Read {
                        lba,
                        remaining,
                        lba48,
                    };
                    self.load_sector(lba);
                }
            }
            Transfer::Write {
                lba,
                remaining,
                lba48,
            } => {
                let off = lba * SECTOR as u64;
                if let Err(e) = self.backing.file().write_all_at(self.buf.bytes(), off) {
                    log::warn!("emulated IDE: writing sector {lba}: {e}");
                    self.abort(UNC);
                    return;
                }
                self.counters.sectors_written += 1;
                let (lba, remaining) = (lba + 1, remaining - 1);
                self.set_position(lba, remaining, lba48);
                self.pos = 0;
                if remaining == 0 {
                    self.finish_ok();
                } else {
                    self.transfer = Transfer::Write {
                        lba,
                        remaining,
                        lba48,
                    };
                    self.status = DRDY | DSC | DRQ;
                    self.raise_irq();
                }
            }
        }
    }

    fn data_read(&mut self, bytes: usize) -> u32 {
        if self.status & DRQ == 0 || matches!(self.transfer, Transfer::Write { .. }) {
            return 0;
        }
        let mut v = 0u32;
        for i in 0..bytes {
            v |= (self.buf.bytes()[self.pos] as u32) << (8 * i);
            self.pos += 1;
            if self.pos == SECTOR as usize {
                self.block_done();
                break;
            }
        }
        v
    }

    fn data_write(&mut self, bytes: usize, value: u32) {
        if self.status & DRQ == 0 || !matches!(self.transfer, Transfer::Write { .. }) {
            return;
        }
        for i in 0..bytes {
            let pos = self.pos;
            self.buf.bytes_mut()[pos] = (value >> (8 * i)) as u8;
            self.pos += 1;
            if self.pos == SECTOR as usize {
                self.block_done();
                break;
            }
        }
    }

    fn reset(&mut self) {
        self.transfer = Transfer::Idle;
        self.pos = 0;
        self.nsector = 1;
        self.lba_low = 1;
        self.lba_mid = 0;
        self.lba_high = 0;
        self.select = 0xA0;
        self.error = 0x01;
        self.status = DRDY | DSC;
        self.irq_pending = false;
    }

    /// A register read of `size` bytes (1, 2 or 4) at `port`.
    pub fn pio_read(&mut self, port: u16, size: u8) -> u32 {
        self.counters.accesses += 1;
        let hob = self.control & CTL_HOB != 0;
        let pick = |lo: u8, hi: u8| if hob { hi } else { lo } as u32;
        match port {
            PORT_DATA => {
                self.counters.data_accesses += 1;
                self.data_read(size.clamp(1, 4) as usize)
            }
            _ if !self.master_selected() && port != PORT_SELECT => 0,
            PORT_ERROR => pick(self.error, self.hob_feature),
            PORT_NSECTOR => pick(self.nsector, self.hob_nsector),
            PORT_LBA_LOW => pick(self.lba_low, self.hob_lba_low),
            PORT_LBA_MID => pick(self.lba_mid, self.hob_lba_mid),
            PORT_LBA_HIGH => pick(self.lba_high, self.hob_lba_high),
            PORT_SELECT => self.select as u32,
            PORT_STATUS => {
                self.irq_pending = false;
                self.status as u32
            }
            PORT_ALT_STATUS => self.status as u32,
            _ => 0xFF, // an unclaimed port floats high
        }
    }

    /// A register write of `size` bytes (1, 2 or 4) at `port`.
    pub fn pio_write(&mut self, port: u16, size: u8, value: u32) {
        self.counters.accesses += 1;
        let v = value as u8;
        // Writing any task-file register clears HOB (ATA-6 7.10.5).
        if (PORT_ERROR..=PORT_STATUS).contains(&port) {
            self.control &= !CTL_HOB;
        }
        match port {
            PORT_DATA => {
                self.counters.data_accesses += 1;
                self.data_write(size.clamp(1, 4) as usize, value)
            }
            PORT_ERROR => {
                self.hob_feature = self.feature;
                self.feature = v;
            }
            PORT_NSECTOR => {
                self.hob_nsector = self.nsector;
                self.nsector = v;
            }
            PORT_LBA_LOW => {
                self.hob_lba_low = self.lba_low;
                self.lba_low = v;
            }
            PORT_LBA_MID => {
                self.hob_lba_mid = self.lba_mid;
                self.lba_mid = v;
            }
            PORT_LBA_HIGH => {
                self.hob_lba_high = self.lba_high;
                self.lba_high = v;
            }
            PORT_SELECT => self.select = v | 0xA0,
            PORT_STATUS if self.status & BSY == 0 => self.command(v),
            PORT_STATUS => {} // a busy device ignores commands
            PORT_ALT_STATUS => {
                let was_reset = self.control & CTL_SRST != 0;
                self.control = v;
                if v & CTL_SRST != 0 {
                    self.status = BSY | DSC;
                } else if was_reset {
                    self.reset();
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn backing(sectors: u64) -> (tempfile::NamedTempFile, Backing, Vec<u8>) {
        let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        let data: Vec<u8> = (0..sectors * 512)
            .map(|i| (i % 251) as u8 ^ (i / 512) as u8)
            .collect();
        std::fs::write(f.path(), &data).unwrap();
        let b = Backing::open(f.path()).unwrap();
        (f, b, data)
    }

    fn wait_drq(d: &mut IdeDisk) -> u8 {
        let s = d.pio_read(PORT_STATUS, 1) as u8;
        assert_eq!(s & BSY, 0);
        s
    }

    fn setup28(d: &mut IdeDisk, lba: u64, count: u8) {
        d.pio_write(PORT_SELECT, 1, 0xE0 | (lba >> 24) as u32 & 0xF);
        d.pio_write(PORT_NSECTOR, 1, count as u32);
        d.pio_write(PORT_LBA_LOW, 1, lba as u32 & 0xFF);
        d.pio_write(PORT_LBA_MID, 1, (lba >> 8) as u32 & 0xFF);
        d.pio_write(PORT_LBA_HIGH, 1, (lba >> 16) as u32 & 0xFF);
    }

    #[test]
    fn identify_reports_capacity_model_and_checksum() {
        let (_f, b, _) = backing(2048);
        let mut d = IdeDisk::new(b, "EMU0001");
        d.pio_write(PORT_SELECT, 1, 0xA0);
        d.pio_write(PORT_STATUS, 1, CMD_IDENTIFY as u32);
        let s = wait_drq(&mut d);
        assert_eq!(s & (DRQ | ERR | DRDY), DRQ | DRDY);
        let words: Vec<u16> = (0..256).map(|_| d.pio_read(PORT_DATA, 2) as u16).collect();
        assert_eq!(words[0] & 0x8000, 0, "ATA device");
        assert_ne!(words[49] & (1 << 9), 0, "LBA supported");
        assert_eq!(words[60] as u32 | (words[61] as u32) << 16, 2048);
        assert_ne!(words[83] & (1 << 10), 0, "LBA48 supported");
        let lba48: u64 = (0..4).map(|i| (words[100 + i] as u64) << (16 * i)).sum();
        assert_eq!(lba48, 2048);
        assert_eq!(ata_string(&words[10..20]), "EMU0001");
        assert_eq!(ata_string(&words[27..47]), "enlight emulated IDE disk");
        assert_eq!(words[255] & 0xFF, 0xA5);
        let sum = words
            .iter()
            .flat_map(|w| [*w as u8, (w >> 8) as u8])
            .fold(0u8, |a, b| a.wrapping_add(b));
        assert_eq!(sum, 0, "integrity checksum");
        assert_eq!(
            d.pio_read(PORT_STATUS, 1) as u8 & DRQ,
            0,
            "DRQ drops at the end"
        );
        assert_eq!(d.counters().data_accesses, 256);
    }

    #[test]
    fn pio_read_returns_the_files_bytes_with_256_accesses_per_sector() {
        let (_f, b, data) = backing(1024);
        let mut d = IdeDisk::new(b, "x");
        setup28(&mut d, 300, 3);
        d.pio_write(PORT_STATUS, 1, CMD_READ as u32);
        let mut got = Vec::new();
        for _ in 0..3 {
            let s = wait_drq(&mut d);
            assert_eq!(s & (DRQ | ERR), DRQ);
            for _ in 0..256 {
                got.extend_from_slice(&(d.pio_read(PORT_DATA, 2) as u16).to_le_bytes());
            }
        }
        assert_eq!(got, data[300 * 512..303 * 512]);
        assert_eq!(d.pio_read(PORT_STATUS, 1) as u8, DRDY | DSC);
        let c = d.counters();
        assert_eq!(c.data_accesses, 3 * 256);
        assert_eq!(c.sectors_read, 3);
        // The task file names the sector after the last one, count 0.
        assert_eq!(d.pio_read(PORT_LBA_LOW, 1), 303 & 0xFF);
        assert_eq!(d.pio_read(PORT_LBA_MID, 1), 303 >> 8);
        assert_eq!(d.pio_read(PORT_NSECTOR, 1), 0);
        // Extra data reads after the transfer return nothing and change nothing.
        assert_eq!(d.pio_read(PORT_DATA, 2), 0);
    }

    #[test]
    fn pio_write_lands_in_the_file_and_32bit_accesses_work() {
        let (f, b, mut data) = backing(64);
        let mut d = IdeDisk::new(b, "x");
        setup28(&mut d, 10, 2);
        d.pio_write(PORT_STATUS, 1, CMD_WRITE as u32);
        let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        for sector in payload.chunks(512) {
            assert_eq!(wait_drq(&mut d) & (DRQ | ERR), DRQ);
            for dw in sector.chunks(4) {
                d.pio_write(PORT_DATA, 4, u32::from_le_bytes(dw.try_into().unwrap()));
            }
        }
        assert_eq!(d.pio_read(PORT_STATUS, 1) as u8, DRDY | DSC);
        d.pio_write(PORT_STATUS, 1, CMD_FLUSH as u32);
        assert_eq!(d.pio_read(PORT_STATUS, 1) as u8 & ERR, 0);
        data[10 * 512..12 * 512].copy_from_slice(&payload);
        assert_eq!(std::fs::read(f.path()).unwrap(), data);
        assert_eq!(d.counters().sectors_written, 2);
    }

    #[test]
    fn lba48_uses_the_high_order_registers() {
        let (_f, b, data) = backing(600);
        let mut d = IdeDisk::new(b, "x");
        // count 0x0001 (hob 0x00), lba 0x000000000200 (hob bytes written first).
        d.pio_write(PORT_SELECT, 1, 0x40);
        for (port, hob, lo) in [
            (PORT_NSECTOR, 0, 1),
            (PORT_LBA_LOW, 0, 0x00),
            (PORT_LBA_MID, 0, 0x02),
            (PORT_LBA_HIGH, 0, 0),
        ] {
            d.pio_write(port, 1, hob);
            d.pio_write(port, 1, lo);
        }
        d.pio_write(PORT_ALT_STATUS, 1, (CTL_HOB | CTL_NIEN) as u32);
        assert_eq!(
            d.pio_read(PORT_LBA_MID, 1),
            0,
            "HOB reads the previous write"
        );
        d.pio_write(PORT_STATUS, 1, CMD_READ_EXT as u32);
        assert_eq!(wait_drq(&mut d) & DRQ, DRQ);
        let got: Vec<u8> = (0..256)
            .flat_map(|_| (d.pio_read(PORT_DATA, 2) as u16).to_le_bytes())
            .collect();
        assert_eq!(got, data[0x200 * 512..0x201 * 512]);
    }

    #[test]
    fn errors_set_err_and_the_error_register() {
        let (_f, b, _) = backing(16);
        let mut d = IdeDisk::new(b, "x");
        setup28(&mut d, 15, 2); // runs past the end
        d.pio_write(PORT_STATUS, 1, CMD_READ as u32);
        assert_eq!(d.pio_read(PORT_STATUS, 1) as u8, DRDY | ERR);
        assert_eq!(d.pio_read(PORT_ERROR, 1) as u8, IDNF);
        d.pio_write(PORT_STATUS, 1, 0x55); // not a command we know
        assert_eq!(d.pio_read(PORT_STATUS, 1) as u8 & ERR, ERR);
        assert_eq!(d.pio_read(PORT_ERROR, 1) as u8, ABRT);
        d.pio_write(PORT_SELECT, 1, 0x00); // CHS mode
        d.pio_write(PORT_STATUS, 1, CMD_READ as u32);
        assert_eq!(d.pio_read(PORT_ERROR, 1) as u8, ABRT);
        // The slave does not exist.
        d.pio_write(PORT_SELECT, 1, 0xF0);
        assert_eq!(d.pio_read(PORT_STATUS, 1), 0);
    }

    #[test]
    fn interrupts_follow_nien_and_status_reads_acknowledge_them() {
        let (_f, b, _) = backing(16);
        let mut d = IdeDisk::new(b, "x");
        setup28(&mut d, 0, 1);
        d.pio_write(PORT_STATUS, 1, CMD_READ as u32);
        assert!(d.irq_pending());
        assert_eq!(d.pio_read(PORT_ALT_STATUS, 1) as u8 & DRQ, DRQ);
        assert!(d.irq_pending(), "alternate status does not acknowledge");
        d.pio_read(PORT_STATUS, 1);
        assert!(!d.irq_pending());
        for _ in 0..256 {
            d.pio_read(PORT_DATA, 2);
        }
        d.pio_write(PORT_ALT_STATUS, 1, CTL_NIEN as u32);
        setup28(&mut d, 1, 1);
        d.pio_write(PORT_STATUS, 1, CMD_READ as u32);
        assert!(!d.irq_pending(), "nIEN masks the line");
        assert_eq!(d.counters().interrupts, 1);
        // Software reset: BSY while SRST is set, back to ready with the signature after.
        d.pio_write(PORT_ALT_STATUS, 1, (CTL_SRST | CTL_NIEN) as u32);
        assert_eq!(d.pio_read(PORT_ALT_STATUS, 1) as u8 & BSY, BSY);
        d.pio_write(PORT_STATUS, 1, CMD_IDENTIFY as u32);
        assert_eq!(
            d.pio_read(PORT_ALT_STATUS, 1) as u8 & DRQ,
            0,
            "BSY ignores commands"
        );
        d.pio_write(PORT_ALT_STATUS, 1, CTL_NIEN as u32);
        assert_eq!(d.pio_read(PORT_STATUS, 1) as u8, DRDY | DSC);
        assert_eq!(d.pio_read(PORT_NSECTOR, 1), 1);
        assert_eq!(d.pio_read(PORT_LBA_LOW, 1), 1);
    }
}
