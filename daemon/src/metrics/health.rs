//! The daemon's own health: events its probes lost, its errors, its devices and ticks, and
//! what it costs (its eBPF programs' run counts and times, its CPU and memory;
//! [`crate::selfcost`]).

use crate::exposition::{labels, Exposition, Family};
use crate::model::{State, ERROR_KINDS};
use crate::selfcost::SelfCost;

/// The health families.
pub fn families(state: &State, out: &mut Exposition) {
    let mut f = Family::counter(
        "enlight_probe_events_lost_total",
        "Events the eBPF programs could not account, by reason.",
    );
    let h = &state.health;
    for (reason, v) in [
        ("map_full", h.events_lost),
        ("batch_truncated", h.batch_truncated),
        ("read_failed", h.read_failures),
        ("no_spec", h.no_spec),
    ] {
        f.sample(labels(&[("reason", reason)]), v as f64);
    }
    out.add(f);
    let mut f = Family::counter("enlight_errors_total", "Errors of the daemon, by kind.");
    for kind in ERROR_KINDS {
        let v = state.errors.get(kind).copied().unwrap_or(0);
        f.sample(labels(&[("kind", kind)]), v as f64);
    }
    out.add(f);
    let mut f = Family::gauge("enlight_devices", "Devices currently registered.");
    f.sample(
        vec![],
        state.devices.values().filter(|d| d.present).count() as f64,
    );
    out.add(f);
    let mut f = Family::counter(
        "enlight_collector_ticks_total",
        "Collector intervals completed.",
    );
    f.sample(vec![], state.ticks as f64);
    out.add(f);
    let mut f = Family::gauge(
        "enlight_collector_tick_seconds",
        "Duration of the last collector interval's work.",
    );
    f.sample(vec![], state.last_tick.as_secs_f64());
    out.add(f);
    self_cost(&state.self_cost, out);
}

/// `enlight_bpf_stats_enabled`, `enlight_bpf_program_runs_total`,
/// `enlight_bpf_program_run_seconds_total`, `enlight_bpf_program_info` (the program's kernel
/// id), `process_cpu_seconds_total` and `process_resident_memory_bytes` (the names Prometheus
/// client libraries give a process's own figures).
fn self_cost(cost: &SelfCost, out: &mut Exposition) {
    let mut f = Family::gauge(
        "enlight_bpf_stats_enabled",
        "1 while enlightd holds the kernel's BPF run-time statistics on (BPF_ENABLE_STATS; needs CAP_SYS_ADMIN): without them the program run counts and times stand still.",
    );
    f.sample(vec![], cost.bpf_stats_enabled as u8 as f64);
    out.add(f);
    let mut f = Family::counter(
        "enlight_bpf_program_runs_total",
        "Runs of each of enlightd's eBPF programs, as the kernel counts them (bpftool prog show: run_cnt).",
    );
    for p in cost.programs.values() {
        f.sample(labels(&[("program", &p.program)]), p.runs_total as f64);
    }
    out.add(f);
    let mut f = Family::counter(
        "enlight_bpf_program_run_seconds_total",
        "Time spent in each of enlightd's eBPF programs, as the kernel counts it (bpftool prog show: run_time_ns).",
    );
    for p in cost.programs.values() {
        f.sample(labels(&[("program", &p.program)]), p.run_seconds_total);
    }
    out.add(f);
    let mut f = Family::gauge(
        "enlight_bpf_program_info",
        "enlightd's eBPF programs (1), with the kernel's id of each (bpftool prog show id ID).",
    );
    for p in cost.programs.values() {
        let id = p.id.to_string();
        f.sample(labels(&[("program", &p.program), ("id", &id)]), 1.0);
    }
    out.add(f);
    let mut f = Family::counter(
        "process_cpu_seconds_total",
        "Total user and system CPU time enlightd spent, in seconds.",
    );
    f.sample(vec![], cost.process.cpu_seconds_total);
    out.add(f);
    let mut f = Family::gauge(
        "process_resident_memory_bytes",
        "enlightd's resident memory, in bytes.",
    );
    f.sample(vec![], cost.process.resident_bytes as f64);
    out.add(f);
}
