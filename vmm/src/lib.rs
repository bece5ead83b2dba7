//! enlight's minimal KVM VMM: the "real VM exits" transport of the emulated devices.
//!
//! One VM per device with one vCPU running a tiny guest driver loop in 64-bit long mode at CPL3
//! (platform.md: ring-3 code runs natively under this host's nested KVM, while real-mode and
//! ring-0 code would be emulated instruction by instruction). The guest's `in`/`out` instructions
//! on the IDE ports exit to this process, where the vCPU thread calls the same register model the
//! thread transport uses ([`enlight_driver::emulated::ide::IdeDisk`]), as QEMU's vCPU threads do.
//! A request is handed to the guest in a command block in guest memory; the guest signals the
//! end of it with a write to an unbacked address (an MMIO exit), since `hlt` is privileged.
//!
//! Every `unsafe` of the crate is here or in [`machine`]: guest memory, and nothing else.
//!
//! - [`asm`]: the instruction encoder for the guest programs.
//! - [`machine`]: guest memory, page tables, GDT/TSS, vCPU registers, the run loop.
//! - [`KvmIdeDisk`]: the emulated IDE disk on this transport ([`BlockTransport`]).
//! - [`ring_disk::KvmRingDisk`]: the enlightened counterpart: a descriptor ring in guest memory and
//!   one ioeventfd doorbell per batch.
//! - [`nic::KvmNe2kGuest`]: the emulated NE2000 NIC's guest driver on this transport.
//! - [`detect`]: whether KVM works here, with the reason when it does not.

pub mod asm;
pub mod machine;
pub mod nic;
pub mod ring_disk;

use std::path::Path;
use std::sync::OnceLock;

use enlight_driver::disk::{Backing, SECTOR};
use enlight_driver::emulated::ide::{self, IdeDisk};
use enlight_driver::emulated::{BlockTransport, EmulatedError, TransportKind};
use enlight_driver::trace::{OP_FLUSH, OP_READ, OP_WRITE};

use crate::asm::{Asm, Cond, R32};
use crate::machine::{Exit, Machine, BUF, BUF_SIZE, CMD, CODE, DONE_MMIO};

/// VMM errors.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// KVM cannot be used here.
    #[error("KVM unavailable: {0}")]
    Unavailable(String),
    /// A KVM call failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// The guest did something the VMM did not expect (a triple fault, an unknown exit).
    #[error("guest: {0}")]
    Guest(String),
}

impl From<VmmError> for EmulatedError {
    fn from(e: VmmError) -> Self {
        EmulatedError::Transport(e.to_string())
    }
}

/// Environment variable that turns a KVM test's skip into a failure: the test suite sets it
/// where `/dev/kvm` exists, so a KVM that stopped working there cannot pass unnoticed.
pub const REQUIRE_KVM_ENV: &str = "ENLIGHT_REQUIRE_KVM";

/// The KVM tests' policy, in one place: true when KVM works; otherwise the test fails with the
/// reason if [`REQUIRE_KVM_ENV`] is `1`, and else prints `SKIPPED <test>: ...` and returns
/// false (the caller returns).
pub fn kvm_or_skip(test: &str) -> bool {
    match detect() {
        Ok(()) => true,
        Err(reason) if std::env::var(REQUIRE_KVM_ENV).as_deref() == Ok("1") => {
            panic!("{test}: KVM is required ({REQUIRE_KVM_ENV}=1) but unavailable: {reason}")
        }
        Err(reason) => {
            eprintln!("SKIPPED {test}: KVM unavailable: {reason}");
            false
        }
    }
}

/// Checks that KVM really works: `/dev/kvm` opens, the API version is 12, a VM and a vCPU can
/// be created, and a tiny CPL3 long-mode guest reaches its done-write. The result (or the
/// reason it failed) is computed once per process.
pub fn detect() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            let mut code = Asm::new(CODE);
            code.label("top").store_abs(DONE_MMIO as u32, 1).jmp("top");
            let mut m = Machine::new(&code.finish()).map_err(|e| e.to_string())?;
            match m.run().map_err(|e| e.to_string())? {
                Exit::Done => Ok(()),
                other => Err(format!(
                    "the probe guest stopped with {other:?} instead of its done-write"
                )),
            }
        })
        .clone()
}

/// Command block layout (guest physical [`CMD`]): op u32, sectors u32, lba u64, then what the
/// guest writes back: final status u32, error register u32.
const CMD_OP: usize = 0;
const CMD_SECTORS: usize = 4;
const CMD_LBA: usize = 8;
const CMD_STATUS: usize = 16;
const CMD_ERROR: usize = 20;

/// The guest's ATA PIO driver loop: the same register sequence as the Rust driver in
/// `enlight_driver::emulated::ide_driver` (LBA28, polling, nIEN), so both transports trap on the same
/// accesses: 6 task-file writes, per sector a status read and 256 data-port accesses, a final
/// status read (and an error-register read only on error).
fn ide_guest_program() -> Vec<u8> {
    let mut a = Asm::new(CODE);
    a.label("top").mov_imm(R32::Ebx, CMD as u32);
    // Flush: the command alone.
    a.load_rbx(R32::Eax, CMD_OP as i8)
        .cmp_eax(OP_FLUSH as i8)
        .jcc(Cond::Z, "flush");
    // Task file: device/LBA 24-27, count, LBA 0-7, 8-15, 16-23.
    a.mov_dx(ide::PORT_SELECT)
        .load_rbx(R32::Eax, CMD_LBA as i8)
        .shr_eax(24)
        .and_al(0x0F)
        .or_al(0xE0)
        .out_al();
    a.mov_dx(ide::PORT_NSECTOR)
        .load_rbx(R32::Eax, CMD_SECTORS as i8)
        .out_al();
    a.mov_dx(ide::PORT_LBA_LOW)
        .load_rbx(R32::Eax, CMD_LBA as i8)
        .out_al();
    a.mov_dx(ide::PORT_LBA_MID).shr_eax(8).out_al();
    a.mov_dx(ide::PORT_LBA_HIGH).shr_eax(8).out_al();
    a.mov_imm(R32::Edi, BUF as u32)
        .load_rbx(R32::Ecx, CMD_SECTORS as i8)
        .mov_dx(ide::PORT_STATUS)
        .load_rbx(R32::Eax, CMD_OP as i8)
        .cmp_eax(OP_WRITE as i8)
        .jcc(Cond::Z, "write");
    // READ SECTORS: per sector, poll for DRQ, then 256 `in ax, dx`.
    a.mov_al(ide::CMD_READ).out_al();
    a.label("rsec").mov_dx(ide::PORT_STATUS);
    a.label("rpoll")
        .in_al()
        .test_al(ide::BSY)
        .jcc(Cond::Nz, "rpoll")
        .test_al(ide::ERR)
        .jcc(Cond::Nz, "finish")
        .test_al(ide::DRQ)
        .jcc(Cond::Z, "finish");
    a.mov_dx(ide::PORT_DATA).mov_imm(R32::Esi, 256);
    a.label("rword")
        .in_ax()
        .store_ax_rdi()
        .add_rdi(2)
        .dec(R32::Esi)
        .jcc(Cond::Nz, "rword")
        .dec(R32::Ecx)
        .jcc(Cond::Nz, "rsec")
        .jmp("finish");
    // WRITE SECTORS: per sector, poll for DRQ, then 256 `out dx, ax`.
    a.label("write").mov_al(ide::CMD_WRITE).out_al();
    a.label("wsec").mov_dx(ide::PORT_STATUS);
    a.label("wpoll")
        .in_al()
        .test_al(ide::BSY)
        .jcc(Cond::Nz, "wpoll")
        .test_al(ide::ERR)
        .jcc(Cond::Nz, "finish")
        .test_al(ide::DRQ)
        .jcc(Cond::Z, "finish");
    a.mov_dx(ide::PORT_DATA).mov_imm(R32::Esi, 256);
    a.label("wword")
        .load_ax_rdi()
        .out_ax()
        .add_rdi(2)
        .dec(R32::Esi)
        .jcc(Cond::Nz, "wword")
        .dec(R32::Ecx)
        .jcc(Cond::Nz, "wsec")
        .jmp("finish");
    a.label("flush")
        .mov_dx(ide::PORT_STATUS)
        .mov_al(ide::CMD_FLUSH)
        .out_al();
    // Final status (polled until not busy); the error register only on ERR.
    a.label("finish").mov_dx(ide::PORT_STATUS);
    a.label("fpoll")
        .in_al()
        .test_al(ide::BSY)
        .jcc(Cond::Nz, "fpoll")
        .movzx_eax_al()
        .store_rbx(R32::Eax, CMD_STATUS as i8)
        .mov_imm(R32::Eax, 0)
        .store_rbx(R32::Eax, CMD_ERROR as i8)
        .load_rbx(R32::Eax, CMD_STATUS as i8)
        .test_al(ide::ERR)
        .jcc(Cond::Z, "done")
        .mov_dx(ide::PORT_ERROR)
        .in_al()
        .movzx_eax_al()
        .store_rbx(R32::Eax, CMD_ERROR as i8);
    a.label("done").store_abs(DONE_MMIO as u32, 1).jmp("top");
    a.finish()
}

/// Counters of the VMM (independent of any probe).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounters {
    /// Every exit KVM_RUN returned to this process.
    pub exits: u64,
    /// Port I/O exits (each one register access).
    pub pio: u64,
    /// MMIO exits (the guest's done-writes).
    pub mmio: u64,
}

/// The emulated IDE disk behind real VM exits.
pub struct KvmIdeDisk {
    machine: Machine,
    model: IdeDisk,
    capacity: u64,
    counters: ExitCounters,
}

impl KvmIdeDisk {
    /// Opens `backing` (`O_DIRECT` where possible), builds the VM and its guest, and checks that
    /// KVM works (see [`detect`]).
    pub fn open(backing: &Path, serial: &str) -> Result<KvmIdeDisk, EmulatedError> {
        detect().map_err(|reason| EmulatedError::from(VmmError::Unavailable(reason)))?;
        let mut model = IdeDisk::new(Backing::open(backing)?, serial);
        // Interrupts off (nIEN) as the Rust driver sets them: the guest polls status.
        model.pio_write(ide::PORT_ALT_STATUS, 1, ide::CTL_NIEN as u32);
        let capacity = model.capacity_sectors();
        let machine = Machine::new(&ide_guest_program())?;
        Ok(KvmIdeDisk {
            machine,
            model,
            capacity,
            counters: ExitCounters::default(),
        })
    }

    /// The VMM's own exit counts.
    pub fn exit_counters(&self) -> ExitCounters {
        self.counters
    }

    /// The model's own counters.
    pub fn model_counters(&self) -> ide::IdeCounters {
        self.model.counters()
    }

    /// Runs the vCPU until the guest's done-write, serving its port I/O with the model.
    fn run_guest(&mut self) -> Result<(), VmmError> {
        loop {
            let exit = {
                let model = &mut self.model;
                self.machine.run_with(|port, data, write| {
                    if write {
                        let mut v = [0u8; 4];
                        let n = data.len().min(4);
                        v[..n].copy_from_slice(&data[..n]);
                        model.pio_write(port, n as u8, u32::from_le_bytes(v));
                    } else {
                        let n = data.len().min(4);
                        let v = model.pio_read(port, n as u8).to_le_bytes();
                        data[..n].copy_from_slice(&v[..n]);
                    }
                })?
            };
            self.counters.exits += 1;
            match exit {
                Exit::Pio => self.counters.pio += 1,
                Exit::Done => {
                    self.counters.mmio += 1;
                    return Ok(());
                }
                other => return Err(VmmError::Guest(format!("unexpected exit {other:?}"))),
            }
        }
    }
}

impl BlockTransport for KvmIdeDisk {
    fn transport(&self) -> TransportKind {
        TransportKind::Kvm
    }

    fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    fn max_io_bytes(&self) -> u32 {
        BUF_SIZE as u32
    }

    fn io(&mut self, op: u16, lba: u64, buf: &mut [u8]) -> Result<(), EmulatedError> {
        let sectors = (buf.len() / SECTOR as usize) as u32;
        if op != OP_FLUSH
            && (buf.is_empty()
                || !buf.len().is_multiple_of(SECTOR as usize)
                || buf.len() > BUF_SIZE
                || lba + sectors as u64 > 0x0FFF_FFFF)
        {
            return Err(EmulatedError::Invalid(format!(
                "{} bytes at sector {lba} (whole sectors, at most {BUF_SIZE} bytes, LBA28)",
                buf.len()
            )));
        }
        if ![OP_READ, OP_WRITE, OP_FLUSH].contains(&op) {
            return Err(EmulatedError::Invalid(format!("op {op} on a disk")));
        }
        let mut cmd = [0u8; 24];
        cmd[CMD_OP..CMD_OP + 4].copy_from_slice(&(op as u32).to_le_bytes());
        cmd[CMD_SECTORS..CMD_SECTORS + 4].copy_from_slice(&sectors.to_le_bytes());
        cmd[CMD_LBA..CMD_LBA + 8].copy_from_slice(&lba.to_le_bytes());
        self.machine.write(CMD, &cmd);
        if op == OP_WRITE {
            self.machine.write(BUF, buf);
        }
        self.run_guest()?;
        let mut back = [0u8; 24];
        self.machine.read(CMD, &mut back);
        let status = back[CMD_STATUS];
        let error = back[CMD_ERROR];
        if status & ide::ERR != 0 {
            return Err(EmulatedError::Device { status, error });
        }
        if op == OP_READ {
            self.machine.read(BUF, buf);
        }
        Ok(())
    }

    fn traps(&self) -> u64 {
        self.counters.pio
    }

    fn vm_exits(&self) -> u64 {
        self.counters.exits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(sectors: u64) -> (tempfile::NamedTempFile, Vec<u8>) {
        let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i * 13 % 241) as u8).collect();
        std::fs::write(f.path(), &data).unwrap();
        (f, data)
    }

    #[test]
    fn guest_reads_and_writes_through_real_exits() {
        if !kvm_or_skip("guest_reads_and_writes_through_real_exits") {
            return;
        }
        let (f, mut data) = file(2048);
        let mut d = KvmIdeDisk::open(f.path(), "K1").unwrap();
        let model_before = d.model_counters().accesses; // open() set nIEN
        let mut buf = vec![0u8; 4 * 512];
        d.io(OP_READ, 77, &mut buf).unwrap();
        assert_eq!(
            buf,
            data[77 * 512..81 * 512],
            "the file's bytes, via in ax,dx"
        );
        let c = d.exit_counters();
        // Exactly the accesses of the Rust driver: 6 + 4 x (1 + 256) + 1, plus the done-write.
        assert_eq!(c.pio, 6 + 4 * 257 + 1);
        assert_eq!(c.mmio, 1);
        assert_eq!(c.exits, c.pio + 1);
        assert_eq!(
            d.model_counters().accesses - model_before,
            c.pio,
            "every exit reached the model"
        );
        let mut payload: Vec<u8> = (0..2 * 512).map(|i| (i % 5) as u8 + 10).collect();
        d.io(OP_WRITE, 2046, &mut payload).unwrap();
        d.io(OP_FLUSH, 0, &mut []).unwrap();
        data[2046 * 512..].copy_from_slice(&payload);
        assert_eq!(std::fs::read(f.path()).unwrap(), data);
        // A request past the end: the device says IDNF, the guest reports it.
        let err = d.io(OP_READ, 2047, &mut buf).unwrap_err();
        assert!(
            matches!(err, EmulatedError::Device { error, .. } if error == ide::IDNF),
            "{err}"
        );
        // And the guest carries on afterwards.
        d.io(OP_READ, 0, &mut buf[..512]).unwrap();
        assert_eq!(buf[..512], data[..512]);
    }

    #[test]
    fn a_256_sector_request_uses_count_zero() {
        if !kvm_or_skip("a_256_sector_request_uses_count_zero") {
            return;
        }
        let (f, data) = file(600);
        let mut d = KvmIdeDisk::open(f.path(), "K2").unwrap();
        let mut buf = vec![0u8; 256 * 512];
        d.io(OP_READ, 300, &mut buf).unwrap();
        assert!(buf == data[300 * 512..556 * 512]);
        assert_eq!(d.model_counters().sectors_read, 256);
    }
}
