//! What the running kernel's tracefs says: which tracepoints exist, their event ids and the
//! offsets of their fields. Behind [`Catalog`] so a test can change the answer to "does this
//! tracepoint exist?" and nothing else.

use std::path::{Path, PathBuf};

/// Where tracepoints are looked up.
pub trait Catalog {
    /// Whether `category:name` exists in this kernel.
    fn exists(&self, category: &str, name: &str) -> bool;
    /// Names of every event in `category` (empty if the category does not exist).
    fn events(&self, category: &str) -> Vec<String>;
    /// The event's tracefs `format` text.
    fn format(&self, category: &str, name: &str) -> Option<String>;
    /// The event's id (the `common_type` of its records).
    fn id(&self, category: &str, name: &str) -> Option<u32>;
}

/// The kernel's tracefs, normally `/sys/kernel/tracing`.
#[derive(Debug, Clone)]
pub struct Tracefs {
    root: PathBuf,
}

impl Default for Tracefs {
    fn default() -> Self {
        Tracefs::at("/sys/kernel/tracing")
    }
}

impl Tracefs {
    /// Tracefs mounted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Tracefs { root: root.into() }
    }

    fn event_dir(&self, category: &str, name: &str) -> PathBuf {
        self.root.join("events").join(category).join(name)
    }

    /// The mount point.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Catalog for Tracefs {
    fn exists(&self, category: &str, name: &str) -> bool {
        self.event_dir(category, name).join("id").exists()
    }

    fn events(&self, category: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join("events").join(category))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("id").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    fn format(&self, category: &str, name: &str) -> Option<String> {
        std::fs::read_to_string(self.event_dir(category, name).join("format")).ok()
    }

    fn id(&self, category: &str, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.event_dir(category, name).join("id"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Byte offset of field `field` in a tracefs `format` text, e.g. from
/// `field:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;`.
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?;
        // Arrays are declared as `char name[16]`.
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        line.split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM_EXIT_FORMAT: &str = "name: kvm_exit\nID: 103\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;\n\
\tfield:unsigned long guest_rip;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:u32 isa;\toffset:24;\tsize:4;\tsigned:0;\n\
\tfield:struct napi_struct * napi;\toffset:32;\tsize:8;\tsigned:0;\n\
\tfield:char comm[16];\toffset:40;\tsize:16;\tsigned:0;\n\n\
print fmt: \"vcpu %u reason %s\", REC->vcpu_id\n";

    #[test]
    fn field_offsets_are_read_from_the_format_text() {
        assert_eq!(field_offset(KVM_EXIT_FORMAT, "common_type"), Some(0));
        assert_eq!(field_offset(KVM_EXIT_FORMAT, "exit_reason"), Some(8));
        assert_eq!(field_offset(KVM_EXIT_FORMAT, "isa"), Some(24));
        assert_eq!(field_offset(KVM_EXIT_FORMAT, "napi"), Some(32));
        assert_eq!(field_offset(KVM_EXIT_FORMAT, "comm"), Some(40));
        assert_eq!(field_offset(KVM_EXIT_FORMAT, "rip"), None);
        assert_eq!(field_offset("", "isa"), None);
    }

    #[test]
    fn a_missing_tracefs_has_no_events() {
        let t = Tracefs::at("/nonexistent/tracing");
        assert!(!t.exists("block", "block_rq_issue"));
        assert!(t.events("hyperv").is_empty());
        assert_eq!(t.id("kvm", "kvm_exit"), None);
    }
}
