//! The `#[repr(C)]` records shared with the eBPF programs, the Rust side of
//! `probes/src/bpf/enlight.h` (struct `enlight_<name>` there): the same fields in the same order,
//! fixed-width integers only, explicit padding, and the same size assertions. A test of
//! `enlight-probes` checks each struct of [`SHARED_STRUCTS`] against the BTF of the shipped
//! object (crate docs).

/// Most completions one `io_reap` hit carries (`ENLIGHT_MAX_BATCH`); a device splits longer
/// batches, and the programs count a longer one in the `health` array
/// ([`HEALTH_BATCH_TRUNCATED`]).
pub const MAX_BATCH: usize = 256;
/// Arguments per USDT spec (`ENLIGHT_USDT_MAX_ARGS`).
pub const USDT_MAX_ARGS: usize = 12;
/// Entries of the `usdt_specs` map (`ENLIGHT_USDT_MAX_SPECS`).
pub const USDT_MAX_SPECS: u32 = 1024;
/// Latency buckets per (process, device, op) (`ENLIGHT_BUCKETS`).
pub const BUCKETS: usize = 3584;

/// `struct enlight_completion`: one completion as an `io_reap` hit carries it (its second
/// argument points at an array of them). Written by the device processes, read by the
/// `enlight_io_reap` program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Reap time minus submit time, ns.
    pub latency_ns: u64,
    /// Bytes transferred.
    pub bytes: u32,
    /// Op code ([`crate::op::Op`]).
    pub op: u16,
    /// 0 or an errno.
    pub status: u16,
}

/// `struct enlight_signal_counts`: a device's signalling events since its previous `io_reap`
/// hit, what that hit's fourth argument points at (0: none). Written by the device processes;
/// the `enlight_io_reap` program adds it, field by field, into the first six fields of
/// [`DevEventsRaw`]. Only a local in the programs, so not in the object's BTF: the probes' test
/// checks its offsets against `enlight_dev_events` instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SignalDeltas {
    /// Guest → host signals.
    pub doorbells: u64,
    /// Host → guest signals.
    pub interrupts: u64,
    /// Writes that found the outbound ring full.
    pub ring_full_out: u64,
    /// Writes that found the inbound ring full.
    pub ring_full_in: u64,
    /// The guest set `interrupt_mask` (entered polling).
    pub irq_masked: u64,
    /// The guest cleared `interrupt_mask`.
    pub irq_unmasked: u64,
}

/// `struct enlight_io_key`: key of the per-op map, one process, one device in it, one op.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IoKeyRaw {
    pub tgid: u32,
    pub dev: u32,
    pub op: u32,
    pub pad: u32,
}

/// `struct enlight_io_stats`: the counters of one (process, device, op).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStatsRaw {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency_sum_ns: u64,
}

/// `struct enlight_io_hist`: the counters and every latency bucket of one (process, device, op).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoHistRaw {
    pub stats: IoStatsRaw,
    pub buckets: [u64; BUCKETS],
}

/// `struct enlight_dev_key`: one process, one device in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevKeyRaw {
    pub tgid: u32,
    pub dev: u32,
}

/// `struct enlight_knob_key`: key of the settings-change counters (the knob codes of the
/// `settings_change` probe).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KnobKeyRaw {
    pub tgid: u32,
    pub dev: u32,
    pub knob: u32,
    pub pad: u32,
}

/// `struct enlight_dev_events`: per (process, device), the signalling events `io_reap` carried
/// ([`SignalDeltas`], summed) and `workload_start` hits.
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

impl std::ops::AddAssign<&DevEventsRaw> for DevEventsRaw {
    fn add_assign(&mut self, o: &DevEventsRaw) {
        self.doorbells += o.doorbells;
        self.interrupts += o.interrupts;
        self.ring_full_out += o.ring_full_out;
        self.ring_full_in += o.ring_full_in;
        self.irq_masked += o.irq_masked;
        self.irq_unmasked += o.irq_unmasked;
        self.workload_starts += o.workload_starts;
    }
}

/// `enum enlight_usdt_arg_type`: the argument is a constant (`val_off`).
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

/// `struct enlight_usdt_spec`: where each argument of one USDT site lives, written by the loader
/// into the `usdt_specs` map under the id the site's BPF cookie carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtSpec {
    pub args: [UsdtArg; USDT_MAX_ARGS],
    pub arg_cnt: u32,
    pub pad: u32,
}

/// `enum enlight_health`: indices of the `health` per-CPU array. A map update failed (events
/// lost).
pub const HEALTH_MAP_FULL: u32 = 0;
/// `io_reap` count above [`MAX_BATCH`].
pub const HEALTH_BATCH_TRUNCATED: u32 = 1;
/// Reading user memory or an argument failed.
pub const HEALTH_READ_FAILED: u32 = 2;
/// A hit with no argument spec for its cookie.
pub const HEALTH_NO_SPEC: u32 = 3;
/// Entries of the health array.
pub const HEALTH_COUNT: u32 = 4;

// The same assertions as enlight.h's _Static_asserts.
const _: () = assert!(std::mem::size_of::<Completion>() == 16);
const _: () = assert!(std::mem::offset_of!(Completion, bytes) == 8);
const _: () = assert!(std::mem::offset_of!(Completion, op) == 12);
const _: () = assert!(std::mem::offset_of!(Completion, status) == 14);
const _: () = assert!(std::mem::size_of::<SignalDeltas>() == 48);
const _: () = assert!(std::mem::offset_of!(SignalDeltas, interrupts) == 8);
const _: () = assert!(std::mem::offset_of!(SignalDeltas, irq_unmasked) == 40);
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

/// `(C name, size)` of every shared struct in the object's BTF, as the probes' BTF check compares
/// them. (`enlight_completion` and `enlight_signal_counts` are only read through pointers into
/// locals of the programs, so they are not in the BTF; their layouts are asserted above and in
/// `enlight.h`, and the probes' privileged attach test reads every field back.)
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

/// The `aya::Pod` marker of the records the probes read from or write to BPF maps. Here rather
/// than in `enlight-probes` because of the orphan rule (a foreign trait on a foreign type).
#[cfg(feature = "aya")]
mod pod {
    use super::*;

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
}
