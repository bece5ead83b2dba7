//! Rust mirrors of the types in `src/bpf/kernel.h`, with the same size assertions (a test checks
//! them against the BTF of the shipped object).

/// NAPI poll-size slots: packets 0..=63 exactly, the last slot holds 64 and more.
pub const NAPI_SLOTS: usize = 65;

/// `ENLIGHT_KOP_DISCARD`: discard, secure erase and write-zeroes requests.
pub const OP_DISCARD: u32 = 5;
/// `ENLIGHT_KOP_OTHER`: zone management and driver passthrough requests.
pub const OP_OTHER: u32 = 6;

/// `ENLIGHT_IRQ_SLOTS`: entries of `irq_counts`, one per IRQ number.
pub const IRQ_SLOTS: u32 = 16384;

/// `struct enlight_nic_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NicKeyRaw {
    pub netns: u32,
    pub ifindex: u32,
}

/// `struct enlight_nic_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NicStatsRaw {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub napi_polls: u64,
    pub napi_work: u64,
    pub napi_budget_exhausted: u64,
    pub napi_work_hist: [u64; NAPI_SLOTS],
    pub pad: u64,
}

/// `enum enlight_kvm_event`.
pub const KVM_EXIT: u32 = 0;
/// `kvm:kvm_pio`.
pub const KVM_PIO: u32 = 1;
/// `kvm:kvm_mmio`.
pub const KVM_MMIO: u32 = 2;

/// `struct enlight_kvm_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KvmKeyRaw {
    pub tgid: u32,
    pub tid: u32,
    pub event: u32,
    pub isa: u32,
    pub reason: u32,
    pub pad: u32,
}

/// `ENLIGHT_FIELD_ABSENT`.
pub const FIELD_ABSENT: u32 = u32::MAX;
/// `enum enlight_kvm_field`: indices of the `kvm_fields` array.
pub const KVM_EXIT_REASON: u32 = 0;
/// `kvm_exit`'s `isa` (1 VMX, 2 SVM).
pub const KVM_EXIT_ISA: u32 = 1;
/// `kvm_pio`'s `rw`.
pub const KVM_PIO_RW: u32 = 2;
/// `kvm_mmio`'s `type`.
pub const KVM_MMIO_TYPE: u32 = 3;

/// `enum enlight_kernel_health`.
pub const KHEALTH_MAP_FULL: u32 = 0;
/// A completed request with no start time stamped in it.
pub const KHEALTH_NO_START: u32 = 1;
/// Reading kernel memory failed.
pub const KHEALTH_READ_FAILED: u32 = 2;
/// A latency timed from the request's allocation (its queue keeps no issue time).
pub const KHEALTH_FROM_ALLOC: u32 = 3;
/// Entries of the health array.
pub const KHEALTH_COUNT: u32 = 4;

const _: () = assert!(std::mem::size_of::<NicKeyRaw>() == 8);
const _: () = assert!(std::mem::size_of::<NicStatsRaw>() == 8 * (9 + NAPI_SLOTS));
const _: () = assert!(std::mem::size_of::<KvmKeyRaw>() == 24);

// SAFETY: each type is #[repr(C)], Copy, made only of integers with no implicit padding (the
// size assertions above equal the sum of the fields), so every bit pattern is valid.
unsafe impl aya::Pod for NicKeyRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for NicStatsRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for KvmKeyRaw {}

/// `(name, size)` of every struct shared with kernel.bpf.c, as the BTF check compares them.
pub const SHARED_STRUCTS: [(&str, usize); 3] = [
    ("enlight_nic_key", std::mem::size_of::<NicKeyRaw>()),
    ("enlight_nic_stats", std::mem::size_of::<NicStatsRaw>()),
    ("enlight_kvm_key", std::mem::size_of::<KvmKeyRaw>()),
];
