//! One small VM: 16 MiB of guest memory, identity-mapped page tables (2 MiB pages, the user bit
//! at every level), a GDT with ring-3 code and data segments and a 64-bit TSS whose I/O
//! permission bitmap is all zero (so a ring-3 `in`/`out` is allowed by the CPU and exits to KVM
//! instead of faulting), and one vCPU started at CPL3 in 64-bit mode at [`CODE`].
//!
//! Guest physical layout: 0x1000 PML4, 0x2000 PDPT, 0x3000 PD, 0x4000 GDT, 0x5000 TSS, 0x8000
//! code, 0x10000 command block, stack below 0x80000, 0x100000 data buffer. [`DONE_MMIO`] is
//! mapped by the page tables but backed by no memory slot, so a write there is an MMIO exit.

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::VmmError;

/// Guest memory size.
pub const MEM_SIZE: usize = 16 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x4000;
const TSS: u64 = 0x5000;
/// TSS limit: the 104-byte TSS, an all-zero bitmap for all 65536 ports, and the 0xFF end byte.
const TSS_LIMIT: u32 = 104 + 8192;
/// Where the guest program is loaded and starts.
pub const CODE: u64 = 0x8000;
/// The command block.
pub const CMD: u64 = 0x10000;
const STACK_TOP: u64 = 0x80000;
/// The data buffer.
pub const BUF: u64 = 0x100000;
/// Its size: the largest request.
pub const BUF_SIZE: usize = 128 * 1024;
/// The guest's done-write address (unbacked: an MMIO exit).
pub const DONE_MMIO: u64 = 0x3000_0000;

const SEL_DATA3: u16 = 0x28 | 3;
const SEL_CODE3: u16 = 0x30 | 3;
const SEL_TSS: u16 = 0x40;

/// Why KVM_RUN returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// A port access (served by the handler).
    Pio,
    /// The guest's done-write.
    Done,
    /// Anything else (a triple fault shows as `Shutdown`).
    Other(String),
}

/// A VM with one vCPU and its memory.
pub struct Machine {
    // Dropped by hand in Drop, before the memory they use is unmapped.
    vcpu: std::mem::ManuallyDrop<VcpuFd>,
    vm: std::mem::ManuallyDrop<VmFd>,
    _kvm: Kvm,
    mem: *mut u8,
}

// SAFETY: the guest memory mapping is owned by the Machine and only reached through &self/&mut
// self methods; the fds are plain file descriptors. Moving the Machine to another thread moves
// all of it (KVM allows a vCPU to run from any thread, one at a time).
unsafe impl Send for Machine {}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

impl Machine {
    /// Builds the VM and loads `code` at [`CODE`].
    pub fn new(code: &[u8]) -> Result<Machine, VmmError> {
        let kvm =
            Kvm::new().map_err(|e| VmmError::Unavailable(format!("opening /dev/kvm: {e}")))?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmmError::Unavailable(format!(
                "KVM API version {api}, expected 12"
            )));
        }
        if !kvm.check_extension(Cap::UserMemory) {
            return Err(VmmError::Unavailable("no KVM_CAP_USER_MEMORY".into()));
        }
        let vm = kvm
            .create_vm()
            .map_err(|e| VmmError::Unavailable(format!("KVM_CREATE_VM: {e}")))?;
        // SAFETY: an anonymous private mapping of MEM_SIZE bytes, checked below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(VmmError::Guest(format!(
                "mmap of guest memory: {}",
                std::io::Error::last_os_error()
            )));
        }
        let machine_mem = mem as *mut u8;
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: machine_mem as u64,
            flags: 0,
        };
        // From here the mapping is owned by a Machine (unmapped in Drop) even on error.
        let vcpu_result = (|| {
            // SAFETY: the region is our live mapping of exactly memory_size bytes, which stays
            // mapped for as long as the VM exists (the Machine owns both, unmaps in Drop).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            vm.create_vcpu(0)
                .map_err(|e| VmmError::Unavailable(format!("KVM_CREATE_VCPU: {e}")))
        })();
        let vcpu = match vcpu_result {
            Ok(v) => v,
            Err(e) => {
                // SAFETY: unmapping the mapping made above, used by nothing else.
                unsafe { libc::munmap(mem, MEM_SIZE) };
                return Err(e);
            }
        };
        let mut m = Machine {
            vcpu: std::mem::ManuallyDrop::new(vcpu),
            vm: std::mem::ManuallyDrop::new(vm),
            _kvm: kvm,
            mem: machine_mem,
        };
        m.setup(code)?;
        Ok(m)
    }

    fn mem(&self) -> &[u8] {
        // SAFETY: mem is a live mapping of MEM_SIZE bytes owned by self. The guest may write it
        // only while run() holds &mut self, so no Rust reference races with the guest.
        unsafe { std::slice::from_raw_parts(self.mem, MEM_SIZE) }
    }

    fn mem_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in mem(), and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.mem, MEM_SIZE) }
    }

    /// Copies `data` into guest memory at `gpa` (panics outside guest memory: a VMM bug).
    pub fn write(&mut self, gpa: u64, data: &[u8]) {
        let at = gpa as usize;
        self.mem_mut()[at..at + data.len()].copy_from_slice(data);
    }

    /// Copies guest memory at `gpa` into `out`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) {
        let at = gpa as usize;
        out.copy_from_slice(&self.mem()[at..at + out.len()]);
    }

    fn write_u64(&mut self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }

    fn setup(&mut self, code: &[u8]) -> Result<(), VmmError> {
        const P: u64 = 1;
        const RW: u64 = 2;
        const US: u64 = 4;
        const PS: u64 = 0x80;
        // Identity map of the first GiB in 2 MiB pages, user-accessible at every level.
        self.write_u64(PML4, PDPT | P | RW | US);
        self.write_u64(PDPT, PD | P | RW | US);
        for i in 0..512u64 {
            self.write_u64(PD + i * 8, (i << 21) | P | RW | US | PS);
        }
        // GDT: 0 null, 5 ring-3 data, 6 ring-3 64-bit code, 8-9 the TSS (16 bytes).
        self.write_u64(GDT + 5 * 8, 0x00CF_F200_0000_FFFF);
        self.write_u64(GDT + 6 * 8, 0x00AF_FA00_0000_FFFF);
        let tss_low = (TSS_LIMIT as u64 & 0xFFFF)
            | (TSS & 0xFF_FFFF) << 16
            | 0x8B << 40 // present, busy 64-bit TSS
            | ((TSS_LIMIT as u64 >> 16) & 0xF) << 48
            | ((TSS >> 24) & 0xFF) << 56;
        self.write_u64(GDT + 8 * 8, tss_low);
        self.write_u64(GDT + 9 * 8, TSS >> 32);
        // TSS: rsp0 (unused: no interrupts), the I/O bitmap right after the 104 bytes, all zero
        // (every port allowed), then the 0xFF terminator.
        self.write(TSS + 102, &104u16.to_le_bytes());
        self.write(TSS + TSS_LIMIT as u64, &[0xFF]);
        self.write(CODE, code);

        let mut sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let code_seg = kvm_segment {
            base: 0,
            limit: 0xFFFF_FFFF,
            selector: SEL_CODE3,
            type_: 0xB,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data_seg = kvm_segment {
            selector: SEL_DATA3,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code_seg
        };
        sregs.cs = code_seg;
        sregs.ds = data_seg;
        sregs.es = data_seg;
        sregs.fs = data_seg;
        sregs.gs = data_seg;
        sregs.ss = data_seg;
        sregs.tr = kvm_segment {
            base: TSS,
            limit: TSS_LIMIT,
            selector: SEL_TSS,
            type_: 0xB,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.gdt.base = GDT;
        sregs.gdt.limit = 10 * 8 - 1;
        // No IDT: any exception becomes a triple fault, which KVM reports as a shutdown exit.
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr3 = PML4;
        sregs.cr4 = 1 << 5; // PAE
        sregs.cr0 = 1 | 1 << 1 | 1 << 4 | 1 << 5 | 1 << 16 | 1 << 31; // PE MP ET NE WP PG
        sregs.efer = 1 << 8 | 1 << 10; // LME LMA
        self.vcpu
            .set_sregs(&sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        let mut regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = CODE;
        regs.rsp = STACK_TOP;
        regs.rflags = 2; // IOPL 0: port access is decided by the TSS bitmap
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(())
    }

    /// An eventfd KVM signals, in the kernel and without an exit to this process, when the
    /// guest writes 4 bytes at `gpa` (an ioeventfd: the doorbell of a paravirtual device).
    pub fn register_ioeventfd(&self, gpa: u64) -> Result<EventFd, VmmError> {
        let fd = EventFd::new(libc::EFD_CLOEXEC)
            .map_err(|e| VmmError::Guest(format!("eventfd for the doorbell: {e}")))?;
        self.vm
            .register_ioevent(&fd, &IoEventAddress::Mmio(gpa), NoDatamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))?;
        Ok(fd)
    }

    /// A handle on guest memory for another thread (a device's service thread), which reads and
    /// writes it while the vCPU runs.
    ///
    /// # Safety
    /// The handle must not be used after this Machine is dropped (its memory is unmapped then).
    pub unsafe fn guest_mem(&self) -> GuestMem {
        GuestMem { base: self.mem }
    }

    /// Runs until the next exit; port accesses are left unserved (an `in` reads 0).
    pub fn run(&mut self) -> Result<Exit, VmmError> {
        self.run_with(|_, _, _| {})
    }

    /// Runs until the next exit; a port access calls `pio(port, data, is_write)`, which fills
    /// `data` for an `in`.
    pub fn run_with(
        &mut self,
        mut pio: impl FnMut(u16, &mut [u8], bool),
    ) -> Result<Exit, VmmError> {
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    pio(port, data, false);
                    return Ok(Exit::Pio);
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    let mut copy = [0u8; 8];
                    let n = data.len().min(8);
                    copy[..n].copy_from_slice(&data[..n]);
                    pio(port, &mut copy[..n], true);
                    return Ok(Exit::Pio);
                }
                Ok(VcpuExit::MmioWrite(addr, _)) if addr == DONE_MMIO => return Ok(Exit::Done),
                Ok(other) => return Ok(Exit::Other(format!("{other:?}"))),
                // A signal interrupted KVM_RUN: go back in.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    return Err(VmmError::Kvm {
                        what: "KVM_RUN",
                        source: e,
                    })
                }
            }
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SAFETY: each is dropped exactly once, here, and never used again.
        unsafe {
            std::mem::ManuallyDrop::drop(&mut self.vcpu);
            std::mem::ManuallyDrop::drop(&mut self.vm);
        }
        // SAFETY: the mapping made in new(); the vCPU and the VM that used it are closed.
        unsafe { libc::munmap(self.mem as *mut libc::c_void, MEM_SIZE) };
    }
}

/// Guest memory as another thread sees it: bounds-checked copies and volatile 32-bit accesses
/// (the guest reads and writes the same bytes concurrently; x86 keeps stores in order, and the
/// fences keep the compiler from reordering around the index accesses).
#[derive(Clone, Copy)]
pub struct GuestMem {
    base: *mut u8,
}

// SAFETY: a raw view of the guest mapping; Machine::guest_mem's contract keeps it from outliving
// the mapping, and every access is bounds-checked against MEM_SIZE.
unsafe impl Send for GuestMem {}
// SAFETY: as above; concurrent accesses are volatile or plain byte copies of guest data, which
// the guest protocol (indices published after the data) orders.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    fn check(gpa: u64, len: usize) -> Option<usize> {
        let at = usize::try_from(gpa).ok()?;
        (at.checked_add(len)? <= MEM_SIZE).then_some(at)
    }

    /// Reads a u32 the guest may be writing; `None` outside guest memory.
    pub fn read_u32(&self, gpa: u64) -> Option<u32> {
        let at = Self::check(gpa, 4)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        // SAFETY: in bounds (checked), u32-sized; unaligned reads are fine on x86 via read_unaligned.
        let v = unsafe { std::ptr::read_volatile(self.base.add(at) as *const [u8; 4]) };
        Some(u32::from_le_bytes(v))
    }

    /// Writes a u32 the guest may be reading (after every earlier write, as a publish).
    pub fn write_u32(&self, gpa: u64, v: u32) -> Option<()> {
        let at = Self::check(gpa, 4)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: in bounds (checked).
        unsafe { std::ptr::write_volatile(self.base.add(at) as *mut [u8; 4], v.to_le_bytes()) };
        Some(())
    }

    /// The raw bytes at `gpa` (for positioned file I/O straight into guest memory).
    ///
    /// # Safety
    /// The guest must not touch these bytes while the slice lives (the device protocol hands
    /// the buffer to the host until it completes the request), nobody else may hold a slice of
    /// them, and the slice must not outlive the Machine.
    pub unsafe fn slice_mut<'a>(self, gpa: u64, len: usize) -> Option<&'a mut [u8]> {
        let at = Self::check(gpa, len)?;
        // SAFETY: in bounds (checked); exclusivity is the caller's promise.
        Some(unsafe { std::slice::from_raw_parts_mut(self.base.add(at), len) })
    }
}
