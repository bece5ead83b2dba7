//! The enlightened disk on the KVM transport: a ring of descriptors in guest memory and one
//! ioeventfd doorbell per batch, instead of a trap per register access.
//!
//! The guest driver copies each request of a batch into the ring (32-byte descriptors: op,
//! sectors, LBA, guest-physical buffer), publishes the producer index, writes the doorbell once
//! (an MMIO write KVM turns into an eventfd signal in the kernel: the vCPU goes straight back to
//! the guest, this process sees no exit), then polls the used index in guest memory until the
//! host has completed the batch, and ends with its done-write (one exit to the VMM per batch).
//! The host side is a service thread blocked on the doorbell's eventfd; it validates every
//! descriptor (the guest is untrusted), reads or writes the backing file straight into or out of
//! the guest buffer, writes a status per descriptor and advances the used index.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use enlight_driver::disk::{Backing, SECTOR};
use enlight_driver::emulated::{BatchIo, BlockTransport, EmulatedError, TransportKind};
use enlight_driver::trace::{self, SignalCounts, OP_FLUSH, OP_READ, OP_WRITE};
use std::os::unix::fs::FileExt;
use vmm_sys_util::eventfd::EventFd;

use crate::asm::{Asm, Cond, R32};
use crate::machine::{Exit, GuestMem, Machine, BUF, CMD, CODE, DONE_MMIO};
use crate::{ExitCounters, VmmError};

/// Descriptors in the ring.
pub const RING_ENTRIES: u32 = 64;
const DESC: u64 = 32;
const RING: u64 = 0x20000;
const PROD: u64 = 0x1F000;
const USED: u64 = 0x1F040;
const STATUS: u64 = 0x1F100;
/// The request list the VMM hands the guest: count at CMD, entries from CMD + 64.
const REQS: u64 = CMD + 64;
/// The doorbell (registered as an ioeventfd; unbacked, so without it a write would exit).
pub const DOORBELL: u64 = 0x3000_1000;
/// Largest request.
pub const MAX_IO: usize = 128 * 1024;
/// Requests per batch (one guest buffer each). Not the tracing ABI's `MAX_BATCH` (completions
/// per `io_reap` hit, enlight_abi::record::MAX_BATCH): this is the ring's own batch.
pub const MAX_REQUESTS_PER_BATCH: usize = 32;

fn ring_guest_program() -> Vec<u8> {
    let mut a = Asm::new(CODE);
    a.label("top")
        .mov_imm(R32::Ebx, CMD as u32)
        .load_rbx(R32::Ecx, 0)
        .mov_imm(R32::Esi, REQS as u32)
        .load_abs(R32::Eax, PROD as u32);
    // Copy each request into ring[prod % 64].
    a.label("copy")
        .mov_edx_eax()
        .and_edx((RING_ENTRIES - 1) as i8)
        .shl_edx(5)
        .add_edx(RING as u32);
    for off in [0i8, 8, 16, 24] {
        a.load_rdi_rsi(off).store_rdi_rdx(off);
    }
    a.add_esi(DESC as i8)
        .inc_eax()
        .dec(R32::Ecx)
        .jcc(Cond::Nz, "copy");
    // Publish, ring once, poll the used index (plain memory reads: no exits).
    a.store_abs_reg(R32::Eax, PROD as u32)
        .store_abs(DOORBELL as u32, 1);
    a.label("poll")
        .pause()
        .load_abs(R32::Edx, USED as u32)
        .cmp_edx_eax()
        .jcc(Cond::Nz, "poll");
    a.store_abs(DONE_MMIO as u32, 1).jmp("top");
    a.finish()
}

/// A descriptor as the host reads it from the ring.
#[derive(Debug, Clone, Copy)]
struct Desc {
    op: u32,
    sectors: u32,
    lba: u64,
    buf: u64,
}

impl Desc {
    fn decode(b: &[u8; 32]) -> Desc {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Desc {
            op: u32_at(0),
            sectors: u32_at(4),
            lba: u64_at(8),
            buf: u64_at(16),
        }
    }

    fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.sectors.to_le_bytes());
        b[8..16].copy_from_slice(&self.lba.to_le_bytes());
        b[16..24].copy_from_slice(&self.buf.to_le_bytes());
        b
    }
}

/// Serves one descriptor; returns 0 or an errno. Nothing the guest wrote is trusted.
fn serve_one(mem: &GuestMem, backing: &Backing, capacity: u64, d: Desc) -> u32 {
    if d.op == OP_FLUSH as u32 {
        return match backing.file().sync_data() {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(libc::EIO) as u32,
        };
    }
    let len = d.sectors as usize * SECTOR as usize;
    let buf_ok = d.buf >= BUF
        && d.buf.is_multiple_of(4096)
        && d.buf + len as u64 <= BUF + (MAX_REQUESTS_PER_BATCH * MAX_IO) as u64;
    if d.sectors == 0
        || len > MAX_IO
        || !buf_ok
        || d.lba
            .checked_add(d.sectors as u64)
            .is_none_or(|e| e > capacity)
    {
        return libc::EINVAL as u32;
    }
    // SAFETY: the guest handed this buffer to the host until the used index passes it.
    let Some(buf) = (unsafe { mem.slice_mut(d.buf, len) }) else {
        return libc::EFAULT as u32;
    };
    let off = d.lba * SECTOR as u64;
    let r = match d.op as u16 {
        OP_READ => backing.file().read_exact_at(buf, off),
        OP_WRITE => backing.file().write_all_at(buf, off),
        _ => return libc::EINVAL as u32,
    };
    match r {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO) as u32,
    }
}

fn service(mem: GuestMem, backing: Backing, doorbell: EventFd, stop: Arc<AtomicBool>) {
    let capacity = backing.capacity_sectors();
    let mut consumed = mem.read_u32(USED).unwrap_or(0);
    while doorbell.read().is_ok() && !stop.load(Ordering::Relaxed) {
        let Some(prod) = mem.read_u32(PROD) else {
            return;
        };
        // At most a ring's worth per pass: a hostile producer index cannot make us spin.
        let mut budget = RING_ENTRIES;
        while consumed != prod && budget > 0 {
            budget -= 1;
            let slot = (consumed % RING_ENTRIES) as u64;
            let mut raw = [0u8; 32];
            // SAFETY: the guest published this descriptor before the producer index.
            if let Some(d) = unsafe { mem.slice_mut(RING + slot * DESC, 32) } {
                raw.copy_from_slice(d);
            }
            let status = serve_one(&mem, &backing, capacity, Desc::decode(&raw));
            mem.write_u32(STATUS + slot * 4, status);
            consumed = consumed.wrapping_add(1);
            mem.write_u32(USED, consumed);
        }
    }
}

/// The paravirtual ring disk on KVM.
pub struct KvmRingDisk {
    // Dropped by hand (Drop joins it before `machine` unmaps the memory it uses).
    service: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    kick: EventFd,
    machine: Machine,
    capacity: u64,
    counters: ExitCounters,
    doorbells: u64,
    /// The doorbells again, for `io_reap` to carry (counted only while it is traced).
    signals: SignalCounts,
    dev_id: u32,
}

impl KvmRingDisk {
    /// Opens `backing`, builds the VM, registers the doorbell and starts the service thread.
    pub fn open(backing: &Path, dev_id: u32) -> Result<KvmRingDisk, EmulatedError> {
        crate::detect().map_err(|reason| EmulatedError::from(VmmError::Unavailable(reason)))?;
        let backing = Backing::open(backing)?;
        let capacity = backing.capacity_sectors();
        let machine = Machine::new(&ring_guest_program())?;
        let doorbell = machine.register_ioeventfd(DOORBELL)?;
        let kick = doorbell
            .try_clone()
            .map_err(|e| EmulatedError::Transport(format!("eventfd clone: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        // SAFETY: the service thread is joined in Drop before the machine (and its memory) goes.
        let mem = unsafe { machine.guest_mem() };
        let service = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ring-service".into())
                .spawn(move || service(mem, backing, doorbell, stop))
                .map_err(|e| EmulatedError::Transport(format!("service thread: {e}")))?
        };
        Ok(KvmRingDisk {
            service: Some(service),
            stop,
            kick,
            machine,
            capacity,
            counters: ExitCounters::default(),
            doorbells: 0,
            signals: SignalCounts::default(),
            dev_id,
        })
    }

    /// The VMM's own exit counts.
    pub fn exit_counters(&self) -> ExitCounters {
        self.counters
    }
}

impl Drop for KvmRingDisk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.kick.write(1);
        if let Some(t) = self.service.take() {
            let _ = t.join();
        }
    }
}

impl BlockTransport for KvmRingDisk {
    fn transport(&self) -> TransportKind {
        TransportKind::Kvm
    }

    fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    fn max_io_bytes(&self) -> u32 {
        MAX_IO as u32
    }

    fn io(&mut self, op: u16, lba: u64, buf: &mut [u8]) -> Result<(), EmulatedError> {
        let mut one = [BatchIo {
            op,
            lba,
            buf,
            status: 0,
            done_ns: 0,
        }];
        self.io_batch(&mut one)?;
        match one[0].status {
            0 => Ok(()),
            e => Err(EmulatedError::Device {
                status: 0x01,
                error: e as u8,
            }),
        }
    }

    fn traps(&self) -> u64 {
        // The only guest access that leaves the guest for the device is the doorbell.
        self.doorbells
    }

    fn vm_exits(&self) -> u64 {
        self.counters.exits
    }

    fn signals(&self) -> Option<&SignalCounts> {
        Some(&self.signals)
    }

    fn io_batch(&mut self, batch: &mut [BatchIo<'_>]) -> Result<(), EmulatedError> {
        if batch.is_empty() {
            return Ok(());
        }
        if batch.len() > MAX_REQUESTS_PER_BATCH {
            return Err(EmulatedError::Invalid(format!(
                "{} requests in one batch (at most {MAX_REQUESTS_PER_BATCH})",
                batch.len()
            )));
        }
        let mut head = [0u8; 4];
        self.machine.read(PROD, &mut head);
        let first = u32::from_le_bytes(head);
        self.machine.write(CMD, &(batch.len() as u32).to_le_bytes());
        for (i, b) in batch.iter().enumerate() {
            if b.op != OP_FLUSH
                && (b.buf.is_empty()
                    || b.buf.len() > MAX_IO
                    || !b.buf.len().is_multiple_of(SECTOR as usize))
            {
                return Err(EmulatedError::Invalid(format!("{} bytes", b.buf.len())));
            }
            let gbuf = BUF + (i * MAX_IO) as u64;
            let d = Desc {
                op: b.op as u32,
                sectors: (b.buf.len() / SECTOR as usize) as u32,
                lba: b.lba,
                buf: gbuf,
            };
            self.machine.write(REQS + i as u64 * DESC, &d.encode());
            if b.op == OP_WRITE {
                self.machine.write(gbuf, &b.buf[..]);
            }
        }
        // One doorbell per batch (the guest rings it; KVM signals the service thread).
        self.doorbells += 1;
        trace::signal(self.dev_id, trace::DIR_GUEST_TO_HOST, 0, &self.signals);
        // The guest's only exit in a batch is its done-write.
        let exit = self.machine.run()?;
        self.counters.exits += 1;
        if exit != Exit::Done {
            return Err(VmmError::Guest(format!("unexpected exit {exit:?}")).into());
        }
        self.counters.mmio += 1;
        let done = trace::monotonic_ns();
        for (i, b) in batch.iter_mut().enumerate() {
            let slot = (first.wrapping_add(i as u32) % RING_ENTRIES) as u64;
            let mut st = [0u8; 4];
            self.machine.read(STATUS + slot * 4, &mut st);
            b.status = u32::from_le_bytes(st).min(u16::MAX as u32) as u16;
            b.done_ns = done;
            if b.op == OP_READ && b.status == 0 {
                self.machine.read(BUF + (i * MAX_IO) as u64, b.buf);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_goes_through_the_ring_with_one_doorbell_and_one_exit() {
        if !crate::kvm_or_skip("a_batch_goes_through_the_ring_with_one_doorbell_and_one_exit") {
            return;
        }
        let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        let mut data: Vec<u8> = (0..4096u32 * 512).map(|i| (i * 29 % 251) as u8).collect();
        std::fs::write(f.path(), &data).unwrap();
        let mut d = KvmRingDisk::open(f.path(), 0).unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 4096]).collect();
        bufs[7].iter_mut().for_each(|b| *b = 0xAB);
        let mut batch: Vec<BatchIo<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| BatchIo {
                op: if i == 7 { OP_WRITE } else { OP_READ },
                lba: i as u64 * 100,
                buf: buf.as_mut_slice(),
                status: 0,
                done_ns: 0,
            })
            .collect();
        d.io_batch(&mut batch).unwrap();
        for (i, b) in batch.iter().enumerate().take(7) {
            assert_eq!(b.status, 0);
            let off = i * 100 * 512;
            assert_eq!(b.buf, &data[off..off + 4096], "request {i}");
        }
        assert_eq!(batch[7].status, 0);
        drop(batch);
        data[700 * 512..700 * 512 + 4096].fill(0xAB);
        assert_eq!(std::fs::read(f.path()).unwrap(), data, "the write landed");
        assert_eq!(
            d.exit_counters().exits,
            1,
            "one exit to the VMM for 8 requests"
        );
        assert_eq!(d.traps(), 1, "one doorbell");
        // Many batches wrap the 64-entry ring; a request past the end fails alone.
        for round in 0..20u64 {
            let mut b1 = vec![0u8; 512];
            let mut b2 = vec![0u8; 512];
            let mut batch = [
                BatchIo {
                    op: OP_READ,
                    lba: round,
                    buf: &mut b1,
                    status: 0,
                    done_ns: 0,
                },
                BatchIo {
                    op: OP_READ,
                    lba: 4096,
                    buf: &mut b2,
                    status: 0,
                    done_ns: 0,
                },
            ];
            d.io_batch(&mut batch).unwrap();
            assert_eq!(batch[0].status, 0);
            assert_eq!(batch[1].status, libc::EINVAL as u16, "past the end");
            let off = round as usize * 512;
            assert_eq!(&b1[..], &data[off..off + 512]);
        }
        assert_eq!(d.exit_counters().exits, 21);
    }
}
