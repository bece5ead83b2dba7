//! Attaching a program to one USDT site of one process, with its semaphore enabled.
//!
//! aya 0.14's uprobe attach cannot pass a reference-counter (semaphore) offset, so this opens the
//! uprobe through `perf_event_open` on the uprobe PMU with `ref_ctr_offset` in `config` bits
//! 32-63 (the kernel then increments the semaphore in the target process, and decrements it when
//! the event goes away) and links the program with `BPF_LINK_CREATE` (`BPF_PERF_EVENT`) carrying
//! the spec id as the BPF cookie. Every system call of the crate is in this module.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PERF_EVENT: u32 = 41;
const PERF_UPROBE_REF_CTR_OFFSET_SHIFT: u32 = 32;
const PERF_ATTR_SIZE: u32 = 128;

/// A live attachment; dropping it detaches the program and releases the semaphore.
#[derive(Debug)]
pub struct SiteLink {
    // Field order matters: the link goes before the perf event.
    _link: OwnedFd,
    _perf: OwnedFd,
}

/// The uprobe PMU's type number.
pub fn uprobe_pmu_type() -> io::Result<u32> {
    let text = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")?;
    text.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad uprobe PMU type"))
}

/// Attaches `prog` at `file_offset` of `exe` for every process (system-wide: pid -1 on CPU 0,
/// as libbpf does; the program runs on whichever CPU hits the site, and no per-task perf context
/// is switched on context switches), enabling the semaphore at `semaphore_offset` (0: none) in
/// every process that maps `exe`, with `cookie` readable by the program.
pub fn attach_site(
    prog: BorrowedFd<'_>,
    pmu_type: u32,
    exe: &Path,
    file_offset: u64,
    semaphore_offset: u64,
    cookie: u64,
) -> io::Result<SiteLink> {
    let path = CString::new(exe.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // struct perf_event_attr, as u64 words: type/size at 0, config at 8, config1 (uprobe path) at
    // 56, config2 (probe offset) at 64. Everything else zero: no sampling, enabled.
    let mut attr = [0u64; PERF_ATTR_SIZE as usize / 8];
    attr[0] = pmu_type as u64 | (PERF_ATTR_SIZE as u64) << 32;
    attr[1] = semaphore_offset << PERF_UPROBE_REF_CTR_OFFSET_SHIFT;
    attr[7] = path.as_ptr() as u64;
    attr[8] = file_offset;
    // `path` outlives the call, which is all the kernel needs of the pointer in config1.
    open_and_link(prog, &attr, cookie)
}

/// Attaches `prog` to the classic tracepoint with tracefs id `tracepoint_id` (every CPU, as
/// libbpf does: the program hangs off the tracepoint, not off the perf event's CPU), with
/// `cookie` readable by the program through `bpf_get_attach_cookie`. aya 0.14's tracepoint
/// attach cannot pass a cookie.
pub fn attach_tracepoint(
    prog: BorrowedFd<'_>,
    tracepoint_id: u32,
    cookie: u64,
) -> io::Result<SiteLink> {
    const PERF_TYPE_TRACEPOINT: u64 = 2;
    let mut attr = [0u64; PERF_ATTR_SIZE as usize / 8];
    attr[0] = PERF_TYPE_TRACEPOINT | (PERF_ATTR_SIZE as u64) << 32;
    attr[1] = tracepoint_id as u64;
    // sample_period 1 (word 2); every other field zero: enabled, no sampling.
    attr[2] = 1;
    open_and_link(prog, &attr, cookie)
}

/// Opens the perf event `attr` describes (every process, the event's CPU 0, close-on-exec) and
/// links `prog` to it with `cookie` readable through `bpf_get_attach_cookie`.
fn open_and_link(
    prog: BorrowedFd<'_>,
    attr: &[u64; PERF_ATTR_SIZE as usize / 8],
    cookie: u64,
) -> io::Result<SiteLink> {
    // SAFETY: attr is a valid perf_event_attr of the size it declares; any pointer in it (the
    // uprobe path) is kept alive by the caller for the duration of the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            -1,
            0,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd returned by the kernel, owned by nobody else.
    let perf = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // union bpf_attr for BPF_LINK_CREATE: prog_fd, target_fd, attach_type, flags, then
    // perf_event.bpf_cookie at byte 16.
    let mut battr = [0u32; 16];
    battr[0] = prog.as_raw_fd() as u32;
    battr[1] = perf.as_raw_fd() as u32;
    battr[2] = BPF_PERF_EVENT;
    battr[4] = cookie as u32;
    battr[5] = (cookie >> 32) as u32;
    // SAFETY: battr is a zero-padded bpf_attr of the size we pass.
    let link = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            battr.as_ptr(),
            std::mem::size_of_val(&battr) as u32,
        )
    };
    if link < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd returned by the kernel.
    let link = unsafe { OwnedFd::from_raw_fd(link as i32) };
    Ok(SiteLink {
        _link: link,
        _perf: perf,
    })
}

/// A program's run statistics from `struct bpf_prog_info`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgStats {
    /// The kernel's id of the program (`bpftool prog show id N`).
    pub id: u32,
    /// Time spent in the program, ns (counted only while `kernel.bpf_stats_enabled` is 1).
    pub run_time_ns: u64,
    /// Runs (counted only while `kernel.bpf_stats_enabled` is 1).
    pub run_cnt: u64,
    /// Runs the kernel skipped because the same program was already running on that CPU (an
    /// interrupt arrived while it ran). Always counted.
    pub recursion_misses: u64,
}

/// `run_time_ns`, `run_cnt` and `recursion_misses` of a loaded program (kernel 5.12+).
pub fn prog_stats(prog: BorrowedFd<'_>) -> io::Result<ProgStats> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // struct bpf_prog_info up to verified_insns: type and id in the first 8 bytes,
    // run_time_ns at byte 192, run_cnt at 200, recursion_misses at 208.
    let mut info = [0u64; 29];
    let attr: [u64; 2] = [
        prog.as_raw_fd() as u32 as u64 | ((std::mem::size_of_val(&info) as u64) << 32),
        info.as_mut_ptr() as u64,
    ];
    // SAFETY: attr is a bpf_attr (bpf_fd, info_len, info pointer) naming a buffer of info_len
    // bytes that lives across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ProgStats {
        id: (info[0] >> 32) as u32,
        run_time_ns: info[192 / 8],
        run_cnt: info[200 / 8],
        recursion_misses: info[208 / 8],
    })
}

/// Effective capabilities of this process (`CapEff` in /proc/self/status).
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Tries to mount tracefs at /sys/kernel/tracing.
pub fn mount_tracefs() -> io::Result<()> {
    // SAFETY: constant C strings; mount(2) with no data.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
