//! The guest's ATA PIO driver: what a polling `ata_piix`-style driver does with the task file,
//! one register access at a time, over any [`PioBus`].
//!
//! A read of `n` sectors costs 7 task-file writes (device, count, three LBA bytes, command; LBA48
//! writes the four address registers twice), one status read per sector plus a final one, and
//! 256 data-port reads per sector; a write the same. Interrupts are disabled (nIEN) and status is
//! polled, so no interrupt acknowledgement adds to the count.

use super::ide::{self, BSY, DRQ, ERR};
use super::pio::PioBus;
use super::EmulatedError;
use crate::disk::SECTOR;
use crate::trace::{OP_FLUSH, OP_READ, OP_WRITE};

/// Status polls before a command is declared hung.
const MAX_POLLS: u32 = 1_000_000;

/// What IDENTIFY DEVICE said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifyInfo {
    /// Model string (words 27-46).
    pub model: String,
    /// Serial string (words 10-19).
    pub serial: String,
    /// Addressable sectors (LBA48 count when supported, else LBA28).
    pub sectors: u64,
    /// LBA48 supported (word 83 bit 10).
    pub lba48: bool,
}

/// A polling ATA PIO driver.
pub struct AtaPio<B: PioBus> {
    bus: B,
    info: Option<IdentifyInfo>,
}

impl<B: PioBus> AtaPio<B> {
    /// Resets the device, disables its interrupt and identifies it.
    pub fn new(bus: B) -> Result<Self, EmulatedError> {
        let mut d = AtaPio { bus, info: None };
        d.bus.write(
            ide::PORT_ALT_STATUS,
            1,
            (ide::CTL_SRST | ide::CTL_NIEN) as u32,
        );
        d.bus.write(ide::PORT_ALT_STATUS, 1, ide::CTL_NIEN as u32);
        d.wait_not_busy()?;
        d.info = Some(d.identify()?);
        Ok(d)
    }

    /// The bus (for its trap count).
    pub fn bus(&self) -> &B {
        &self.bus
    }

    /// Takes the bus back.
    pub fn into_bus(self) -> B {
        self.bus
    }

    /// What IDENTIFY reported at start.
    pub fn info(&self) -> &IdentifyInfo {
        self.info.as_ref().expect("identified in new()")
    }

    fn wait_not_busy(&mut self) -> Result<u8, EmulatedError> {
        for _ in 0..MAX_POLLS {
            let s = self.bus.read(ide::PORT_STATUS, 1) as u8;
            if s & BSY == 0 {
                return Ok(s);
            }
        }
        Err(EmulatedError::Hung("BSY never cleared".into()))
    }

    fn check(&mut self, status: u8) -> Result<(), EmulatedError> {
        if status & ERR != 0 {
            let error = self.bus.read(ide::PORT_ERROR, 1) as u8;
            return Err(EmulatedError::Device { status, error });
        }
        Ok(())
    }

    /// Polls until DRQ (data ready) or an error.
    fn wait_drq(&mut self) -> Result<(), EmulatedError> {
        let s = self.wait_not_busy()?;
        self.check(s)?;
        if s & DRQ == 0 {
            return Err(EmulatedError::Hung(format!(
                "status {s:#04x}: neither DRQ nor ERR"
            )));
        }
        Ok(())
    }

    /// IDENTIFY DEVICE.
    pub fn identify(&mut self) -> Result<IdentifyInfo, EmulatedError> {
        self.bus.write(ide::PORT_SELECT, 1, 0xA0);
        self.bus
            .write(ide::PORT_STATUS, 1, ide::CMD_IDENTIFY as u32);
        self.wait_drq()?;
        let mut w = [0u16; 256];
        for word in w.iter_mut() {
            *word = self.bus.read(ide::PORT_DATA, 2) as u16;
        }
        let s = self.wait_not_busy()?;
        self.check(s)?;
        let lba48 = w[83] & (1 << 10) != 0;
        let sectors = if lba48 {
            (0..4).map(|i| (w[100 + i] as u64) << (16 * i)).sum()
        } else {
            w[60] as u64 | (w[61] as u64) << 16
        };
        Ok(IdentifyInfo {
            model: ide::ata_string(&w[27..47]),
            serial: ide::ata_string(&w[10..20]),
            sectors,
            lba48,
        })
    }

    fn setup(&mut self, lba: u64, count: u32) -> Result<bool, EmulatedError> {
        let lba48_needed = lba + count as u64 > 0x0FFF_FFFF || count > 256;
        if lba48_needed && !self.info().lba48 {
            return Err(EmulatedError::Invalid(format!(
                "{count} sectors at {lba} need LBA48, which the device lacks"
            )));
        }
        if count == 0 || count > 65536 {
            return Err(EmulatedError::Invalid(format!("{count} sectors")));
        }
        if lba48_needed {
            self.bus.write(ide::PORT_SELECT, 1, 0x40);
            self.bus.write(ide::PORT_NSECTOR, 1, (count >> 8) & 0xFF);
            self.bus
                .write(ide::PORT_LBA_LOW, 1, (lba >> 24) as u32 & 0xFF);
            self.bus
                .write(ide::PORT_LBA_MID, 1, (lba >> 32) as u32 & 0xFF);
            self.bus
                .write(ide::PORT_LBA_HIGH, 1, (lba >> 40) as u32 & 0xFF);
        } else {
            self.bus
                .write(ide::PORT_SELECT, 1, 0xE0 | ((lba >> 24) as u32 & 0x0F));
        }
        self.bus.write(ide::PORT_NSECTOR, 1, count & 0xFF);
        self.bus.write(ide::PORT_LBA_LOW, 1, lba as u32 & 0xFF);
        self.bus
            .write(ide::PORT_LBA_MID, 1, (lba >> 8) as u32 & 0xFF);
        self.bus
            .write(ide::PORT_LBA_HIGH, 1, (lba >> 16) as u32 & 0xFF);
        Ok(lba48_needed)
    }

    /// READ SECTORS into `buf` (whole sectors).
    pub fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), EmulatedError> {
        let count = sectors_of(buf.len())?;
        let ext = self.setup(lba, count)?;
        let cmd = if ext {
            ide::CMD_READ_EXT
        } else {
            ide::CMD_READ
        };
        self.bus.write(ide::PORT_STATUS, 1, cmd as u32);
        for sector in buf.chunks_mut(SECTOR as usize) {
            self.wait_drq()?;
            for pair in sector.chunks_mut(2) {
                pair.copy_from_slice(&(self.bus.read(ide::PORT_DATA, 2) as u16).to_le_bytes());
            }
        }
        let s = self.wait_not_busy()?;
        self.check(s)
    }

    /// WRITE SECTORS from `buf` (whole sectors).
    pub fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), EmulatedError> {
        let count = sectors_of(buf.len())?;
        let ext = self.setup(lba, count)?;
        let cmd = if ext {
            ide::CMD_WRITE_EXT
        } else {
            ide::CMD_WRITE
        };
        self.bus.write(ide::PORT_STATUS, 1, cmd as u32);
        for sector in buf.chunks(SECTOR as usize) {
            self.wait_drq()?;
            for pair in sector.chunks(2) {
                self.bus.write(
                    ide::PORT_DATA,
                    2,
                    u16::from_le_bytes([pair[0], pair[1]]) as u32,
                );
            }
        }
        let s = self.wait_not_busy()?;
        self.check(s)
    }

    /// FLUSH CACHE.
    pub fn flush(&mut self) -> Result<(), EmulatedError> {
        self.bus.write(ide::PORT_STATUS, 1, ide::CMD_FLUSH as u32);
        let s = self.wait_not_busy()?;
        self.check(s)
    }

    /// One request by op code.
    pub fn io(&mut self, op: u16, lba: u64, buf: &mut [u8]) -> Result<(), EmulatedError> {
        match op {
            OP_READ => self.read(lba, buf),
            OP_WRITE => self.write(lba, buf),
            OP_FLUSH => self.flush(),
            _ => Err(EmulatedError::Invalid(format!("op {op} on a disk"))),
        }
    }
}

fn sectors_of(len: usize) -> Result<u32, EmulatedError> {
    if len == 0 || !len.is_multiple_of(SECTOR as usize) {
        return Err(EmulatedError::Invalid(format!(
            "{len} bytes is not whole sectors"
        )));
    }
    Ok((len / SECTOR as usize) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Backing;
    use crate::emulated::ide::IdeDisk;
    use crate::emulated::pio::{DirectBus, ThreadBus};

    fn file(sectors: u64) -> (tempfile::NamedTempFile, Vec<u8>) {
        let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i * 31 % 253) as u8).collect();
        std::fs::write(f.path(), &data).unwrap();
        (f, data)
    }

    #[test]
    fn driver_identifies_reads_and_writes_through_the_thread_transport() {
        let (f, mut data) = file(4096);
        let disk = IdeDisk::new(Backing::open(f.path()).unwrap(), "T1");
        let bus = ThreadBus::spawn(disk, "ide-model").unwrap();
        let mut d = AtaPio::new(bus).unwrap();
        assert_eq!(d.info().sectors, 4096);
        assert_eq!(d.info().serial, "T1");
        let before = d.bus().traps();
        let mut buf = vec![0u8; 8 * 512];
        d.read(100, &mut buf).unwrap();
        assert_eq!(buf, data[100 * 512..108 * 512]);
        // 6 task-file writes, per sector one status read and 256 data reads, one final status.
        assert_eq!(d.bus().traps() - before, 6 + 8 * 257 + 1);
        let payload: Vec<u8> = (0..4096).map(|i| (i % 7) as u8 + 1).collect();
        d.write(4000, &payload).unwrap();
        d.flush().unwrap();
        data[4000 * 512..4008 * 512].copy_from_slice(&payload);
        let ide = d.into_bus().stop().unwrap();
        assert_eq!(ide.counters().sectors_written, 8);
        assert_eq!(std::fs::read(f.path()).unwrap(), data);
    }

    #[test]
    fn large_requests_switch_to_lba48_and_errors_surface() {
        let (f, data) = file(1024);
        let disk = IdeDisk::new(Backing::open(f.path()).unwrap(), "T2");
        let mut d = AtaPio::new(DirectBus::new(disk)).unwrap();
        let mut buf = vec![0u8; 300 * 512]; // more than LBA28's 256-sector count
        d.read(7, &mut buf).unwrap();
        assert_eq!(buf, data[7 * 512..307 * 512]);
        let err = d.read(1000, &mut buf).unwrap_err();
        assert!(
            matches!(err, EmulatedError::Device { error, .. } if error == ide::IDNF),
            "{err}"
        );
        assert!(d.read(0, &mut [0u8; 100]).is_err());
    }
}
