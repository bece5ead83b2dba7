//! Which kernel devices enlight may change: only those the configuration names, and only with
//! dry-run off; every other device gets recommendations ([`policy`]).

/// What may happen to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permission {
    /// The configuration names it and dry-run is off: changes are applied.
    Apply,
    /// Changes are only recommended, for this reason.
    RecommendOnly(String),
}

/// The policy: kernel devices are changed only when the configuration names them and dry-run
/// is off; anything else is a recommendation. A pure function, so it is tested on its own.
pub fn policy(configured: &[String], dry_run: bool, device: &str) -> Permission {
    if !configured.iter().any(|d| d == device) {
        Permission::RecommendOnly(format!(
            "{device} is not named in [kernel] tune, so enlight only recommends"
        ))
    } else if dry_run {
        Permission::RecommendOnly("[kernel] dry_run is on".into())
    } else {
        Permission::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_named_devices_are_changed_and_never_in_dry_run() {
        let named = vec!["eth1".to_string(), "loop3".to_string()];
        assert_eq!(policy(&named, false, "eth1"), Permission::Apply);
        assert!(matches!(
            policy(&named, false, "eth0"),
            Permission::RecommendOnly(r) if r.contains("not named")
        ));
        assert!(matches!(
            policy(&named, true, "eth1"),
            Permission::RecommendOnly(r) if r.contains("dry_run")
        ));
        assert!(matches!(
            policy(&[], false, "vda"),
            Permission::RecommendOnly(_)
        ));
    }
}
