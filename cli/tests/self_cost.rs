//! Privileged: enlightd's own cost as /metrics exports it agrees with the kernel's figures as
//! `bpftool prog show` prints them (an independent reader of `bpf_prog_info`): while the daemon
//! runs, run-time statistics are on and every program's run count on /metrics equals bpftool's
//! for the same program id, exactly, once the device has stopped; its run time too. The daemon's
//! CPU time and memory are there. After the daemon stops, statistics are off again: a program
//! loaded afterwards counts no runs while its sites are hit (when no other process on the machine
//! holds them on: the test checks that enlightd let go of its descriptor in any case).

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use support::{free_port, settle, LiveDaemon};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

/// `name{labels} value` lines of one family, as (labels, value).
fn family(metrics: &str, name: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
                let (labels, v) = r.split_once("} ")?;
                (labels.to_string(), v)
            } else {
                (String::new(), rest.strip_prefix(' ')?)
            };
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

fn label<'a>(labels: &'a str, key: &str) -> &'a str {
    labels
        .split(',')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no {key} in {labels}"))
}

/// Processes holding the kernel's run-time statistics on (`BPF_ENABLE_STATS` returns an
/// `anon_inode:bpf-stats` descriptor; the kernel counts runs while any is open), by pid.
fn stats_holders() -> Vec<u32> {
    let mut pids = Vec::new();
    for proc_entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|target| target.as_os_str() == "anon_inode:bpf-stats")
        {
            pids.push(pid);
        }
    }
    pids
}

fn disk(dir: &std::path::Path, name: &str, secs: u32) -> std::process::Child {
    Command::new(ENLIGHT)
        .args(["disk", "--name", name, "--create-mib", "16", "--json"])
        .args(["--workload", "qd=8,bs=4k,rw=70,pattern=random"])
        .args(["--duration", &secs.to_string(), "--wait-for-probes", "30"])
        .arg("--backing")
        .arg(dir.join(format!("{name}.img")))
        .arg("--runtime-dir")
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn enlight disk")
}

#[test]
fn self_cost_metrics_agree_with_bpftool_and_statistics_go_off_after() {
    let _lock = support::require_privileges();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let daemon = LiveDaemon::start(dir.path(), port);
    let last = support::final_line(disk(dir.path(), "cost0", 3));
    assert!(last.contains("\"done\":true"), "{last}");
    // The device has stopped: nothing runs the USDT programs any more. Two ticks read the final
    // counts.
    settle(&daemon.handle, 3);
    let metrics = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    enlightd::testing::promtool_check(&metrics);
    let bpftool = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool (apt-get install bpftool)");
    assert!(bpftool.status.success());
    let progs: Vec<serde_json::Value> = serde_json::from_slice(&bpftool.stdout).unwrap();
    let by_id: BTreeMap<u64, &serde_json::Value> = progs
        .iter()
        .map(|p| (p["id"].as_u64().unwrap(), p))
        .collect();

    assert_eq!(
        family(&metrics, "enlight_bpf_stats_enabled"),
        [(String::new(), 1.0)]
    );
    let ids: BTreeMap<String, u64> = family(&metrics, "enlight_bpf_program_info")
        .into_iter()
        .map(|(l, _)| {
            (
                label(&l, "program").to_string(),
                label(&l, "id").parse().unwrap(),
            )
        })
        .collect();
    let runs: BTreeMap<String, f64> = family(&metrics, "enlight_bpf_program_runs_total")
        .into_iter()
        .map(|(l, v)| (label(&l, "program").to_string(), v))
        .collect();
    let secs: BTreeMap<String, f64> = family(&metrics, "enlight_bpf_program_run_seconds_total")
        .into_iter()
        .map(|(l, v)| (label(&l, "program").to_string(), v))
        .collect();
    for (_, program) in enlight_probes::PROGRAMS {
        let id = ids[program];
        let p = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("bpftool has no program id {id} ({program})"));
        // bpftool names a program by its first 15 characters.
        assert!(
            program.starts_with(p["name"].as_str().unwrap()),
            "{program}: {p}"
        );
        let (run_cnt, run_time_ns) = (
            p["run_cnt"].as_u64().unwrap_or(0),
            p["run_time_ns"].as_u64().unwrap_or(0),
        );
        assert_eq!(runs[program], run_cnt as f64, "{program}: runs vs {p}");
        assert!(
            (secs[program] - run_time_ns as f64 / 1e9).abs() <= 1e-9 * run_time_ns as f64 + 1e-9,
            "{program}: {} s vs {p}",
            secs[program]
        );
    }
    assert!(runs["enlight_io_reap"] > 0.0, "io_reap never ran: {runs:?}");
    assert!(secs["enlight_io_reap"] > 0.0);
    let cpu = family(&metrics, "process_cpu_seconds_total")[0].1;
    let rss = family(&metrics, "process_resident_memory_bytes")[0].1;
    assert!(cpu > 0.0 && rss > 1e6, "cpu {cpu} s, rss {rss} B");
    let health = daemon.handle.health();
    assert!(health.self_cost.bpf_stats_enabled);
    assert_eq!(
        health.self_cost.programs["enlight_io_reap"].runs_total as f64,
        runs["enlight_io_reap"]
    );
    assert!(
        stats_holders().contains(&std::process::id()),
        "the daemon holds statistics on while it runs"
    );
    daemon.stop();
    // enlightd let go of them (this process ran it)...
    assert!(
        !stats_holders().contains(&std::process::id()),
        "enlightd stopped but still holds the run-time statistics on"
    );
    // ...so, unless another process on this machine holds them on (another enlightd, bpftop)
    // or the sysctl does, they are off: programs loaded now count nothing while their sites are
    // hit.
    let others = stats_holders();
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap();
    if !others.is_empty() || sysctl.trim() != "0" {
        eprintln!(
            "self_cost: statistics held on by pids {others:?} (sysctl {}): \
             not checking that programs count nothing",
            sysctl.trim()
        );
        return;
    }
    let mut probes = enlight_probes::Probes::load().unwrap();
    let child = disk(dir.path(), "cost1", 2);
    probes
        .attach_process(child.id(), std::path::Path::new(ENLIGHT))
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(100));
    let snap = probes.snapshot().unwrap();
    let ops: u64 = snap.io.values().map(|s| s.ops).sum();
    assert!(ops > 0, "the programs ran (they counted {ops} I/Os)");
    let stats = probes.program_run_stats().unwrap();
    assert_eq!(
        (stats["io_reap"].run_count, stats["io_reap"].run_time_ns),
        (0, 0),
        "run-time statistics still on after enlightd stopped"
    );
}
