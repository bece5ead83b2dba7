//! The USDT site macro every enlight probe uses: [`usdt_lazy!`](crate::usdt_lazy).
//!
//! It is `probe::probe_lazy!` (a SystemTap SDT note plus a semaphore the tracer increments)
//! with one difference on x86-64: the site is the 5-byte `nopl 0x0(%rax,%rax,1)` instead of a
//! 1-byte `nop`. On that instruction Linux (6.18 and later, `arch_uprobe_optimize`) replaces the
//! uprobe's `int3` after its first hit with a call into a trampoline that enters the kernel
//! through the `uprobe` system call, which costs less than an exception. Kernels without the
//! optimisation, and tools that attach their own way (bpftrace, perf), treat it as an ordinary
//! probed `nop`. Other architectures use `probe::probe_lazy!` unchanged.
//!
//! The note layout is the `probe` crate's (0.5.2, `src/platform/systemtap.rs`, MIT OR
//! Apache-2.0), which follows `sys/sdt.h`.

/// A USDT site `provider:name` with a semaphore: when no tracer is attached it costs one load
/// and a not-taken branch, and the arguments are not evaluated. Evaluates to whether the site is
/// enabled. Arguments are integers or pointers (passed as 8-byte signed values).
///
/// `usdt_lazy!(semaphore = STATIC; provider, name, args...)` uses a semaphore the caller
/// declared (a `static mut`
/// [`PageAlignedSemaphore`](crate::usdt::PageAlignedSemaphore) in `.probes`), so other code can
/// read whether the probe is traced without firing it (see
/// [`semaphore_set!`](crate::semaphore_set)). Every site of one probe name must then name the
/// same semaphore.
#[cfg(target_arch = "x86_64")]
#[macro_export]
macro_rules! usdt_lazy {
    (semaphore = $sem:path; $provider:ident, $name:ident $(, $arg:expr)* $(,)?) => {{
        let enabled = $crate::semaphore_set!($sem);
        if enabled {
            $crate::__usdt_site!($sem, $provider, $name, $("-8@{}", $arg,)*);
        }
        enabled
    }};
    ($provider:ident, $name:ident $(, $arg:expr)* $(,)?) => {{
        #[link_section = ".probes"]
        static mut SEMAPHORE: $crate::usdt::PageAlignedSemaphore =
            $crate::usdt::PageAlignedSemaphore::new();
        $crate::usdt_lazy!(semaphore = SEMAPHORE; $provider, $name $(, $arg)*)
    }};
}

/// A USDT semaphore on a page of its own (declare it `static mut` in `.probes`).
///
/// A tracer gives the kernel the semaphore's file offset, and the kernel increments it in the
/// first writable mapping of that file page. If the semaphore's page is also the last page of
/// the segment before it (the partial page RELRO leaves writable), the kernel increments that
/// copy and the program never sees the tracer: with one debug build of `enlight` every device
/// waited for probes that had attached (`enlight bench tune`: "the workload did not start").
/// Page alignment keeps a semaphore's page its own, whatever the linker's layout; it costs a
/// page of zeros per semaphore (a dozen in `enlight`). `enlight_probes::usdt` refuses a
/// semaphore that is shadowed, with the reason.
#[repr(C, align(4096))]
pub struct PageAlignedSemaphore {
    /// The count the tracer increments (first field: the semaphore's address is the static's).
    pub count: u16,
}

impl PageAlignedSemaphore {
    /// Zero: no tracer.
    pub const fn new() -> Self {
        PageAlignedSemaphore { count: 0 }
    }
}

impl Default for PageAlignedSemaphore {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a USDT semaphore (a `static mut` [`PageAlignedSemaphore`] or `u16` in `.probes`) is
/// set: a tracer is attached.
#[macro_export]
macro_rules! semaphore_set {
    ($sem:path) => {
        // SAFETY: a plain load of the u16 at the start of the semaphore (its count), which the
        // tracer may change at any time (hence volatile); the static lives for the whole program.
        (unsafe { ::core::ptr::read_volatile((&raw const $sem).cast::<u16>()) } != 0)
    };
}

#[cfg(not(target_arch = "x86_64"))]
#[macro_export]
macro_rules! usdt_lazy {
    // The probe crate declares its own semaphore: the caller's stays 0 here (see
    // `trace::io_reap_traced`).
    (semaphore = $sem:path; $provider:ident, $name:ident $(, $arg:expr)* $(,)?) => {
        $crate::usdt::__probe::probe_lazy!($provider, $name $(, $arg)*)
    };
    ($provider:ident, $name:ident $(, $arg:expr)* $(,)?) => {
        $crate::usdt::__probe::probe_lazy!($provider, $name $(, $arg)*)
    };
}

/// The `probe` crate, for [`usdt_lazy!`](crate::usdt_lazy) on other architectures.
#[doc(hidden)]
pub use probe as __probe;

/// The site itself: the 5-byte nop and its `.note.stapsdt` entry (pc, base, semaphore,
/// provider, name, argument specs).
#[doc(hidden)]
#[cfg(target_arch = "x86_64")]
#[macro_export]
macro_rules! __usdt_site {
    ($sem:path, $provider:ident, $name:ident, $first:literal, $arg1:expr, $($argstr:literal, $arg:expr,)*) => {
        // SAFETY: the asm only emits a nop and a note section; it reads its register operands
        // (the arguments, for the tracer to inspect) and touches no memory or flags.
        //
        // Not `nostack`: once a tracer attaches, Linux (6.18, `arch_uprobe_optimize`) replaces
        // the nop with a call into its uprobe trampoline, and that call and the trampoline's
        // pushes write below the stack pointer. With `nostack` the compiler may keep live data
        // in the red zone across the site, and a traced process would read back the
        // trampoline's return address and saved registers instead.
        unsafe {
            ::core::arch::asm!(
                concat!(
                    r#"
990:    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
        .pushsection .note.stapsdt,"?","note"
        .balign 4
        .4byte 992f-991f, 994f-993f, 3
991:    .asciz "stapsdt"
992:    .balign 4
993:    .8byte 990b
        .8byte _.stapsdt.base
        .8byte {sem}
        .asciz ""#,
                    stringify!($provider),
                    r#""
        .asciz ""#,
                    stringify!($name),
                    r#""
        .asciz ""#,
                    $first,
                    $(" ", $argstr,)*
                    r#""
994:    .balign 4
        .popsection
.ifndef _.stapsdt.base
        .pushsection .stapsdt.base,"aGR","progbits",.stapsdt.base,comdat
        .weak _.stapsdt.base
        .hidden _.stapsdt.base
_.stapsdt.base: .space 1
        .size _.stapsdt.base, 1
        .popsection
.endif"#
                ),
                in(reg) ($arg1) as isize,
                $(in(reg) ($arg) as isize,)*
                sem = sym $sem,
                options(readonly, preserves_flags, att_syntax),
            )
        }
    };
}
