//! KVM or TCG: which accelerator can run a full guest kernel here.
//!
//! `/dev/kvm` alone does not say: on this project's machines it is KVM with nested PVM
//! (`kvm_pvm`), which runs CPL3 guest code natively but not a guest kernel (QEMU `-accel kvm`
//! hangs right after the kernel's decompressor). A full guest needs the hardware extensions'
//! KVM modules, `kvm_intel` (VMX) or `kvm_amd` (SVM). Anything else runs under TCG, QEMU's
//! binary translator, whose timings are those of an emulator: reports always name it.

use std::path::Path;

/// The accelerator a guest runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's Tiny Code Generator: an emulator; its timings are not a KVM guest's.
    Tcg,
}

impl Accel {
    /// QEMU's `-accel` value.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
    /// What reports print.
    pub fn label(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// The decision (pure): whether `/dev/kvm` exists and which KVM modules are loaded.
pub fn decide(dev_kvm: bool, loaded_modules: &[&str]) -> (Accel, String) {
    if !dev_kvm {
        return (Accel::Tcg, "no /dev/kvm".into());
    }
    if let Some(m) = loaded_modules
        .iter()
        .find(|m| **m == "kvm_intel" || **m == "kvm_amd")
    {
        return (
            Accel::Kvm,
            format!("/dev/kvm backed by {m} (hardware virtualization)"),
        );
    }
    if loaded_modules.contains(&"kvm_pvm") {
        return (
            Accel::Tcg,
            "/dev/kvm is nested PVM (kvm_pvm): it runs CPL3 code only, not a guest kernel".into(),
        );
    }
    (
        Accel::Tcg,
        "/dev/kvm has neither kvm_intel nor kvm_amd behind it".into(),
    )
}

/// Detects the accelerator on this machine, with the reason.
pub fn detect() -> (Accel, String) {
    let dev_kvm = Path::new("/dev/kvm").exists();
    let loaded: Vec<&str> = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .collect();
    decide(dev_kvm, &loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hardware_kvm_runs_a_full_guest() {
        assert_eq!(decide(false, &["kvm_intel"]).0, Accel::Tcg);
        assert_eq!(decide(true, &["kvm_intel"]).0, Accel::Kvm);
        assert_eq!(decide(true, &["kvm_amd"]).0, Accel::Kvm);
        let (a, why) = decide(true, &["kvm_pvm"]);
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("PVM"), "{why}");
        assert_eq!(decide(true, &[]).0, Accel::Tcg);
    }
}
