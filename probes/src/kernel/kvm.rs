//! Names of KVM exit reasons, as the kernel's own `kvm:kvm_exit` format prints them.

/// `kvm_exit`'s `isa` for Intel VMX.
pub const ISA_VMX: u32 = 1;
/// `kvm_exit`'s `isa` for AMD SVM.
pub const ISA_SVM: u32 = 2;

const VMX: &[(u32, &str)] = &[
    (0, "EXCEPTION_NMI"),
    (1, "EXTERNAL_INTERRUPT"),
    (2, "TRIPLE_FAULT"),
    (7, "INTERRUPT_WINDOW"),
    (8, "NMI_WINDOW"),
    (10, "CPUID"),
    (12, "HLT"),
    (16, "RDTSC"),
    (18, "VMCALL"),
    (28, "CR_ACCESS"),
    (29, "DR_ACCESS"),
    (30, "IO_INSTRUCTION"),
    (31, "MSR_READ"),
    (32, "MSR_WRITE"),
    (33, "INVALID_STATE"),
    (40, "PAUSE_INSTRUCTION"),
    (44, "APIC_ACCESS"),
    (45, "EOI_INDUCED"),
    (48, "EPT_VIOLATION"),
    (49, "EPT_MISCONFIG"),
    (52, "PREEMPTION_TIMER"),
    (54, "WBINVD"),
    (55, "XSETBV"),
    (56, "APIC_WRITE"),
    (74, "BUS_LOCK"),
    (75, "NOTIFY"),
];

const SVM: &[(u32, &str)] = &[
    (0x040 + 6, "UD excp"),
    (0x040 + 13, "GP excp"),
    (0x040 + 14, "PF excp"),
    (0x060, "interrupt"),
    (0x061, "nmi"),
    (0x064, "vintr"),
    (0x06e, "rdtsc"),
    (0x072, "cpuid"),
    (0x077, "pause"),
    (0x078, "hlt"),
    (0x07b, "io"),
    (0x07c, "msr"),
    (0x07f, "shutdown"),
    (0x081, "hypercall"),
    (0x400, "npf"),
];

/// The name of an exit reason: the kernel's name for VMX (`IO_INSTRUCTION`) and SVM (`io`) exits,
/// otherwise `reason_<n>` (other ISAs, or reasons this table does not list).
pub fn exit_reason_name(isa: u32, reason: u32) -> String {
    let table = match isa {
        ISA_VMX => VMX,
        ISA_SVM => SVM,
        _ => &[],
    };
    // VMX puts flags (FAILED_VMENTRY) in the upper 16 bits.
    let basic = if isa == ISA_VMX {
        reason & 0xffff
    } else {
        reason
    };
    table
        .iter()
        .find(|(r, _)| *r == basic)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| format!("reason_{reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_named_per_isa() {
        assert_eq!(exit_reason_name(ISA_VMX, 30), "IO_INSTRUCTION");
        assert_eq!(exit_reason_name(ISA_VMX, 0x8000_0021), "INVALID_STATE");
        assert_eq!(exit_reason_name(ISA_VMX, 999), "reason_999");
        assert_eq!(exit_reason_name(ISA_VMX, 0x0001_0030), "EPT_VIOLATION");
        assert_eq!(exit_reason_name(ISA_SVM, 0x07b), "io");
        assert_eq!(exit_reason_name(ISA_SVM, 0x400), "npf");
        assert_eq!(exit_reason_name(0, 7), "reason_7");
    }
}
