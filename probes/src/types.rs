//! Rust mirrors of the types in `src/bpf/enlight.h`, with the same size assertions. A test checks
//! each against the BTF of the shipped object, so the two sides cannot drift apart silently.

/// Most completions one `io_reap` hit carries.
pub const MAX_BATCH: usize = 256;
/// Arguments per USDT spec.
pub const USDT_MAX_ARGS: usize = 12;
/// Entries of the `usdt_specs` map.
pub const USDT_MAX_SPECS: u32 = 1024;

/// `struct enlight_completion`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    pub latency_ns: u64,
    pub bytes: u32,
    pub op: u16,
    pub status: u16,
}

/// `struct enlight_io_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IoKeyRaw {
    pub tgid: u32,
    pub dev: u32,
    pub op: u32,
    pub pad: u32,
}

/// `struct enlight_io_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStatsRaw {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency_sum_ns: u64,
}

/// Latency buckets per (process, device, op) (`ENLIGHT_BUCKETS`).
pub const BUCKETS: usize = 3584;

/// `struct enlight_io_hist`: the counters and every latency bucket of one (process, device, op).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoHistRaw {
    pub stats: IoStatsRaw,
    pub buckets: [u64; BUCKETS],
}

/// `struct enlight_dev_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevKeyRaw {
    pub tgid: u32,
    pub dev: u32,
}

/// `struct enlight_knob_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KnobKeyRaw {
    pub tgid: u32,
    pub dev: u32,
    pub knob: u32,
    pub pad: u32,
}

/// `struct enlight_dev_events`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevEventsRaw {
    pub doorbells: u64,
    pub interrupts: u64,
    pub ring_full_out: u64,
    pub ring_full_in: u64,
    pub irq_masked: u64,
    pub irq_unmasked: u64,
    pub workload_starts: u64,
}

/// `enum enlight_usdt_arg_type`.
pub const USDT_ARG_CONST: u32 = 0;
/// The argument is a register.
pub const USDT_ARG_REG: u32 = 1;
/// The argument is in user memory at register + offset.
pub const USDT_ARG_REG_DEREF: u32 = 2;

/// `struct enlight_usdt_arg` (libbpf's `__bpf_usdt_arg_spec` layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtArg {
    pub val_off: u64,
    pub arg_type: u32,
    pub reg_off: i16,
    pub arg_signed: u8,
    pub arg_bitshift: i8,
}

/// `struct enlight_usdt_spec`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtSpec {
    pub args: [UsdtArg; USDT_MAX_ARGS],
    pub arg_cnt: u32,
    pub pad: u32,
}

/// Indices of the `health` per-CPU array.
pub const HEALTH_MAP_FULL: u32 = 0;
/// `io_reap` count above [`MAX_BATCH`].
pub const HEALTH_BATCH_TRUNCATED: u32 = 1;
/// Reading user memory or an argument failed.
pub const HEALTH_READ_FAILED: u32 = 2;
/// A hit with no argument spec for its cookie.
pub const HEALTH_NO_SPEC: u32 = 3;
/// Entries of the health array.
pub const HEALTH_COUNT: u32 = 4;

const _: () = assert!(std::mem::size_of::<Completion>() == 16);
const _: () = assert!(std::mem::size_of::<IoKeyRaw>() == 16);
const _: () = assert!(std::mem::size_of::<IoStatsRaw>() == 32);
const _: () = assert!(std::mem::size_of::<IoHistRaw>() == 32 + 8 * BUCKETS);
// A per-CPU map value may not exceed 32 KiB.
const _: () = assert!(std::mem::size_of::<IoHistRaw>() <= 32 * 1024);
const _: () = assert!(std::mem::size_of::<DevKeyRaw>() == 8);
const _: () = assert!(std::mem::size_of::<DevEventsRaw>() == 56);
const _: () = assert!(std::mem::size_of::<KnobKeyRaw>() == 16);
const _: () = assert!(std::mem::size_of::<UsdtArg>() == 16);
const _: () = assert!(std::mem::size_of::<UsdtSpec>() == 200);

// SAFETY: each type is #[repr(C)], Copy, made only of integers with no implicit padding (the
// size assertions above equal the sum of the fields), so every bit pattern is valid.
unsafe impl aya::Pod for IoKeyRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for IoStatsRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for IoHistRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for DevKeyRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for DevEventsRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for KnobKeyRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for UsdtSpec {}

/// `(name, size)` of every shared struct, as the BTF check compares them.
pub const SHARED_STRUCTS: [(&str, usize); 8] = [
    ("enlight_io_key", std::mem::size_of::<IoKeyRaw>()),
    ("enlight_io_stats", std::mem::size_of::<IoStatsRaw>()),
    ("enlight_io_hist", std::mem::size_of::<IoHistRaw>()),
    ("enlight_dev_key", std::mem::size_of::<DevKeyRaw>()),
    ("enlight_dev_events", std::mem::size_of::<DevEventsRaw>()),
    ("enlight_knob_key", std::mem::size_of::<KnobKeyRaw>()),
    ("enlight_usdt_arg", std::mem::size_of::<UsdtArg>()),
    ("enlight_usdt_spec", std::mem::size_of::<UsdtSpec>()),
];
