//! The guest kernel's modules the lab needs, in an order `insmod` accepts.
//!
//! Debian's kernel package has no `modules.dep` (depmod runs when the package is installed, and
//! the lab never installs it), so each module's dependencies are read from its own `.modinfo`
//! section (`depends=a,b`) and the closure is sorted so that every module comes after the ones
//! it needs. The guest's `/init` then loads them with busybox `insmod`, one after the other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::LabError;

/// The drivers behind every device the lab can attach, plus what the guest itself needs.
pub fn wanted_for(devices: &[&str]) -> Vec<&'static str> {
    let mut out = Vec::new();
    for d in devices {
        let mods: &[&'static str] = match *d {
            "ide" => &["ata_piix", "sd_mod"],
            "virtio-blk" => &["virtio_pci", "virtio_blk"],
            "virtio-scsi" => &["virtio_pci", "virtio_scsi", "sd_mod"],
            "e1000" => &["e1000"],
            "virtio-net" => &["virtio_pci", "virtio_net"],
            _ => &[],
        };
        for m in mods {
            if !out.contains(m) {
                out.push(*m);
            }
        }
    }
    out
}

/// A module's name as the kernel spells it (`t10-pi.ko` is module `t10_pi`).
pub fn canonical(name: &str) -> String {
    name.trim_end_matches(".ko").replace('-', "_")
}

/// The `depends=` list of a module's `.modinfo` section (NUL-separated `key=value` strings).
pub fn depends_from_modinfo(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|b| *b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(canonical)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every module `wanted` needs, each after its dependencies (pure: `deps` maps a module to what
/// it depends on). A module missing from `deps` is an error naming it and who wanted it.
pub fn load_order(
    wanted: &[String],
    deps: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<String>, LabError> {
    fn visit(
        m: &str,
        by: &str,
        deps: &BTreeMap<String, Vec<String>>,
        done: &mut BTreeSet<String>,
        active: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) -> Result<(), LabError> {
        if done.contains(m) {
            return Ok(());
        }
        let Some(needs) = deps.get(m) else {
            return Err(LabError::Module(format!(
                "module {m} (needed by {by}) is not in the kernel package"
            )));
        };
        if !active.insert(m.to_string()) {
            return Err(LabError::Module(format!("module dependency cycle at {m}")));
        }
        for d in needs {
            visit(d, m, deps, done, active, out)?;
        }
        active.remove(m);
        done.insert(m.to_string());
        out.push(m.to_string());
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for m in wanted {
        visit(
            m,
            "the lab",
            deps,
            &mut done,
            &mut BTreeSet::new(),
            &mut out,
        )?;
    }
    Ok(out)
}

/// Every `.ko` under `modules_dir` by canonical name.
pub fn index(modules_dir: &Path) -> Result<BTreeMap<String, PathBuf>, LabError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![modules_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| LabError::io(format!("reading {}", dir.display()), e))?;
        for e in entries {
            let e = e.map_err(|e| LabError::io(format!("reading {}", dir.display()), e))?;
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                if name.ends_with(".ko") {
                    out.insert(canonical(name), path);
                }
            }
        }
    }
    Ok(out)
}

/// Reads one module's dependencies from its ELF `.modinfo` section.
pub fn depends_of(path: &Path) -> Result<Vec<String>, LabError> {
    use object::{Object, ObjectSection};
    let data =
        std::fs::read(path).map_err(|e| LabError::io(format!("reading {}", path.display()), e))?;
    let file = object::File::parse(&*data)
        .map_err(|e| LabError::Module(format!("{}: not an ELF module: {e}", path.display())))?;
    let Some(section) = file.section_by_name(".modinfo") else {
        return Ok(Vec::new());
    };
    let bytes = section
        .data()
        .map_err(|e| LabError::Module(format!("{}: .modinfo: {e}", path.display())))?;
    Ok(depends_from_modinfo(bytes))
}

/// The modules for `devices` in load order, with their files.
pub fn resolve(modules_dir: &Path, devices: &[&str]) -> Result<Vec<(String, PathBuf)>, LabError> {
    let index = index(modules_dir)?;
    let mut deps = BTreeMap::new();
    let mut todo: Vec<String> = wanted_for(devices).iter().map(|s| s.to_string()).collect();
    let wanted = todo.clone();
    while let Some(m) = todo.pop() {
        if deps.contains_key(&m) {
            continue;
        }
        let Some(path) = index.get(&m) else { continue };
        let d = depends_of(path)?;
        todo.extend(d.iter().cloned());
        deps.insert(m, d);
    }
    let order = load_order(&wanted, &deps)?;
    Ok(order
        .into_iter()
        .map(|m| {
            let p = index[&m].clone();
            (m, p)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_are_read_from_modinfo_strings() {
        let info = b"license=GPL\0depends=virtio_ring,t10-pi,virtio\0name=x\0";
        assert_eq!(
            depends_from_modinfo(info),
            ["virtio_ring", "t10_pi", "virtio"]
        );
        assert!(depends_from_modinfo(b"depends=\0").is_empty());
    }

    #[test]
    fn every_module_comes_after_what_it_needs() {
        let deps: BTreeMap<String, Vec<String>> = [
            ("virtio_pci", vec!["virtio_ring", "virtio"]),
            ("virtio", vec!["virtio_ring"]),
            ("virtio_ring", vec![]),
            ("virtio_blk", vec!["virtio", "virtio_ring"]),
            ("e1000", vec![]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
        let wanted = ["virtio_pci", "virtio_blk", "e1000"].map(String::from);
        let order = load_order(&wanted, &deps).unwrap();
        assert_eq!(
            order,
            ["virtio_ring", "virtio", "virtio_pci", "virtio_blk", "e1000"]
        );
        let missing = load_order(&["ata_piix".to_string()], &deps).unwrap_err();
        assert!(missing.to_string().contains("ata_piix"), "{missing}");
    }

    #[test]
    fn cycles_are_errors_not_hangs() {
        let deps: BTreeMap<String, Vec<String>> = [("a", vec!["b"]), ("b", vec!["a"])]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
            .collect();
        assert!(load_order(&["a".to_string()], &deps).is_err());
    }

    #[test]
    fn devices_name_their_drivers() {
        assert_eq!(
            wanted_for(&["ide", "e1000"]),
            ["ata_piix", "sd_mod", "e1000"]
        );
        assert_eq!(
            wanted_for(&["virtio-blk", "virtio-net"]),
            ["virtio_pci", "virtio_blk", "virtio_net"]
        );
    }
}
