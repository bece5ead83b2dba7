//! Privileged: loads the real programs, attaches them to USDT sites of this very test process,
//! fires the sites a known number of times and checks every counter exactly. Needs root (or
//! CAP_BPF+CAP_PERFMON); without it the test says so and fails, since CI runs as root and a
//! silently skipped eBPF test proves nothing.

use std::path::PathBuf;

use enlight_probes::hist::bucket_index;
use enlight_probes::types::Completion;
use enlight_probes::{preflight, DevKey, IoKey, KnobKey, Probes};

// Sites with the provider, names and argument order of the driver's tracepoints (contract 1).
#[inline(never)]
fn io_reap(dev: u32, batch: &[Completion]) -> bool {
    probe::probe_lazy!(enlight, io_reap, dev, batch.as_ptr() as usize, batch.len())
}
#[inline(never)]
fn signal(dev: u32, direction: u32) -> bool {
    probe::probe_lazy!(enlight, signal, dev, direction, 0u32)
}
#[inline(never)]
fn ring_full(dev: u32, direction: u32) -> bool {
    probe::probe_lazy!(enlight, ring_full, dev, direction, 4096u32)
}
#[inline(never)]
fn irq_mask(dev: u32, masked: u32) -> bool {
    probe::probe_lazy!(enlight, irq_mask, dev, masked)
}
#[inline(never)]
fn trap(dev: u32, count: u64) -> bool {
    probe::probe_lazy!(enlight, trap, dev, count)
}
#[inline(never)]
fn settings_change(dev: u32, knob: u32, old: u32, new: u32) -> bool {
    probe::probe_lazy!(enlight, settings_change, dev, knob, old, new)
}
#[inline(never)]
fn workload_start(dev: u32) -> bool {
    probe::probe_lazy!(enlight, workload_start, dev, 32u32)
}

fn require_privileges() {
    if let Err(e) = preflight() {
        panic!("privileged eBPF test cannot run: {e}");
    }
}

#[test]
fn counts_from_our_own_sites_are_exact() {
    require_privileges();
    let pid = std::process::id();
    let exe = PathBuf::from("/proc/self/exe");
    let mut probes = Probes::load().expect("load programs");
    assert!(!workload_start(7), "semaphore should be zero before attach");
    let report = probes.attach_process(pid, &exe).expect("attach");
    assert!(report.missing.is_empty(), "{report:?}");
    assert_eq!(report.semaphores, report.sites_attached);
    assert!(workload_start(7), "attach enables the semaphore");

    // A deterministic latency distribution over three decades, ops read/write, some errors.
    let mut expected_buckets = std::collections::BTreeMap::<(u32, u32), u64>::new();
    let (mut ops, mut bytes, mut errors) = ([0u64; 2], [0u64; 2], [0u64; 2]);
    let mut batch = Vec::new();
    for i in 0..1000u64 {
        batch.clear();
        for j in 0..(1 + i % 40) {
            let op = ((i + j) % 2) as u16;
            let latency_ns = 1_000 + (i * 7919 + j * 104_729) % 2_000_000;
            let status = if (i + j) % 97 == 0 { 5 } else { 0 };
            batch.push(Completion {
                latency_ns,
                bytes: 4096,
                op,
                status,
            });
            ops[op as usize] += 1;
            bytes[op as usize] += 4096;
            errors[op as usize] += (status != 0) as u64;
            *expected_buckets
                .entry((op as u32, bucket_index(latency_ns)))
                .or_default() += 1;
        }
        assert!(io_reap(7, &batch));
    }
    for _ in 0..11 {
        signal(7, 0);
    }
    for _ in 0..13 {
        signal(7, 1);
    }
    ring_full(7, 0);
    for _ in 0..3 {
        ring_full(7, 1);
    }
    for _ in 0..5 {
        irq_mask(7, 1);
        irq_mask(7, 0);
    }
    // Trap counts are summed, not counted: 100 hits of 1..=100 accesses.
    for n in 1..=100u64 {
        trap(7, n);
    }
    trap(9, 1 << 40);
    // Settings changes are counted per knob, whatever the values.
    for i in 0..7u32 {
        settings_change(7, 4, i, i + 1);
    }
    settings_change(7, 0, 8192, 1 << 20);
    settings_change(9, 2, 8, 1);

    let snap = probes.snapshot().expect("snapshot");
    for op in 0..2u32 {
        let s = &snap.io[&IoKey { pid, dev: 7, op }];
        assert_eq!(s.ops, ops[op as usize], "ops of op {op}");
        assert_eq!(s.bytes, bytes[op as usize]);
        assert_eq!(s.errors, errors[op as usize]);
        let want: Vec<(u32, u64)> = expected_buckets
            .iter()
            .filter(|((o, _), _)| *o == op)
            .map(|((_, b), c)| (*b, *c))
            .collect();
        assert_eq!(s.buckets, want, "latency buckets of op {op}");
    }
    let e = snap.events[&DevKey { pid, dev: 7 }];
    assert_eq!((e.doorbells, e.interrupts), (11, 13));
    assert_eq!((e.ring_full_out, e.ring_full_in), (1, 3));
    assert_eq!((e.irq_masked, e.irq_unmasked), (5, 5));
    assert_eq!(e.workload_starts, 1);
    assert_eq!(snap.traps[&DevKey { pid, dev: 7 }], 5050);
    assert_eq!(snap.traps[&DevKey { pid, dev: 9 }], 1 << 40);
    let changes = |dev, knob| snap.settings_changes[&KnobKey { pid, dev, knob }];
    assert_eq!((changes(7, 4), changes(7, 0), changes(9, 2)), (7, 1, 1));
    assert_eq!(snap.settings_changes.len(), 3);
    assert_eq!(snap.health.events_lost, 0);
    assert_eq!(snap.health.read_failures, 0);
    assert_eq!(snap.health.no_spec, 0);

    // An oversized batch is counted as truncated, not read past its bound.
    let big = vec![
        Completion {
            latency_ns: 5000,
            bytes: 512,
            op: 2,
            status: 0
        };
        300
    ];
    io_reap(8, &big);
    let snap = probes.snapshot().unwrap();
    assert_eq!(snap.io[&IoKey { pid, dev: 8, op: 2 }].ops, 256);
    assert_eq!(snap.health.batch_truncated, 1);

    // Detaching releases the semaphores and forgets this pid's counters.
    probes.detach_process(pid);
    assert!(!workload_start(7), "detach releases the semaphore");
    assert!(!io_reap(7, &batch));
    let snap = probes.snapshot().unwrap();
    assert!(snap.io.keys().all(|k| k.pid != pid));
    assert!(snap.events.keys().all(|k| k.pid != pid));
    assert!(snap.traps.keys().all(|k| k.pid != pid));
}

#[test]
fn bpftrace_lists_the_same_sites() {
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let out = match std::process::Command::new("bpftrace")
        .arg("-l")
        .arg(format!("usdt:{}:enlight:*", exe.display()))
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!(
            "bpftrace is needed for this interoperability check (apt-get install bpftrace): {e}"
        ),
    };
    let listed = String::from_utf8_lossy(&out.stdout);
    for name in [
        "io_reap",
        "signal",
        "ring_full",
        "irq_mask",
        "trap",
        "workload_start",
    ] {
        assert!(
            listed.contains(&format!("enlight:{name}")),
            "bpftrace did not list enlight:{name}: {listed}"
        );
    }
}
