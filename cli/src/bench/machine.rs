//! The machine a benchmark ran on, as its reports state it (the project's rule for performance
//! figures: CPU model and kernel stated): read once here for `bench compare`, `bench tune` and
//! `bench demo`. Each report keeps its own words for what could not be read.

/// What /proc says about this machine; `None` where it could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Machine {
    /// The first `model name` in /proc/cpuinfo.
    pub cpu_model: Option<String>,
    /// The CPUs this process may run on.
    pub cpus: Option<usize>,
    /// The kernel release (/proc/sys/kernel/osrelease).
    pub kernel: Option<String>,
}

impl Machine {
    pub fn read() -> Machine {
        Machine {
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|c| cpu_model(&c)),
            cpus: std::thread::available_parallelism().ok().map(|n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
        }
    }

    /// The CPU model with the number of CPUs (`bench tune`, `bench demo`).
    pub fn cpu_text(&self) -> String {
        format!(
            "{}, {} CPUs",
            self.cpu_model.as_deref().unwrap_or("unknown CPU"),
            self.cpus.unwrap_or(0)
        )
    }
}

/// The first `model name` of a /proc/cpuinfo (pure).
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (_, value) = l.strip_prefix("model name")?.split_once(':')?;
        Some(value.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_model_is_the_first_model_name() {
        let info = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\n\
                    model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nprocessor\t: 1\n\
                    model name\t: other\n";
        assert_eq!(
            cpu_model(info).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.20GHz")
        );
        assert_eq!(cpu_model("processor\t: 0\n"), None);
    }

    #[test]
    fn the_cpu_text_says_what_it_could_not_read() {
        let m = Machine {
            cpu_model: Some("Xeon".into()),
            cpus: Some(2),
            kernel: None,
        };
        assert_eq!(m.cpu_text(), "Xeon, 2 CPUs");
        assert_eq!(Machine::default().cpu_text(), "unknown CPU, 0 CPUs");
    }
}
