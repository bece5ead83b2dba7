//! Privileged: loads the real programs, attaches them to USDT sites of this very test process,
//! fires the sites a known number of times and checks every counter exactly. Needs root (or
//! CAP_BPF+CAP_PERFMON); without it the test says so and fails, since CI runs as root and a
//! silently skipped eBPF test proves nothing.

use std::path::PathBuf;

use enlight_driver::trace::{
    self, SignalCounts, SignalDeltas, DIR_GUEST_TO_HOST, DIR_HOST_TO_GUEST,
};
use enlight_probes::hist::bucket_index;
use enlight_probes::types::Completion;
use enlight_probes::{preflight, DevKey, IoKey, KnobKey, Probes};

// Sites with the provider, names and argument order of the driver's tracepoints (contract 1).
#[inline(never)]
fn io_reap(dev: u32, batch: &[Completion], signals: Option<&SignalDeltas>) -> bool {
    let signals = signals.map_or(0, |s| s as *const SignalDeltas as usize);
    probe::probe_lazy!(
        enlight,
        io_reap,
        dev,
        batch.as_ptr() as usize,
        batch.len(),
        signals
    )
}
/// `io_reap` as drivers before the signalling argument fired it.
#[inline(never)]
fn io_reap_without_signals(dev: u32, batch: &[Completion]) -> bool {
    probe::probe_lazy!(enlight, io_reap, dev, batch.as_ptr() as usize, batch.len())
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

/// The driver's `io_reap` in a leaf function, where the compiler may keep the deltas it points at
/// in the red zone below the stack pointer. After a site's first hit, Linux 6.18 turns its 5-byte
/// nop into a call, which writes below the stack pointer: the site must not let the compiler keep
/// anything live there (`usdt_lazy!` must not claim `nostack`).
#[inline(never)]
fn io_reap_from_a_leaf(dev: u32, signals: &SignalCounts) {
    trace::io_reap(dev, &[], Some(signals));
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
    // The driver counts signalling events only while io_reap is traced.
    let driver_signals = SignalCounts::default();
    trace::signal(10, DIR_GUEST_TO_HOST, 0, &driver_signals);
    assert_eq!(driver_signals.take(), Default::default());
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
        // Every tenth batch from a site without the signalling argument, which counts the same.
        if i % 10 == 0 {
            assert!(io_reap_without_signals(7, &batch));
        } else {
            assert!(io_reap(7, &batch, None));
        }
    }
    // Signalling events ride on io_reap: with a batch, and alone (count 0, as a device's last
    // hit when it stops); summed per device.
    io_reap(
        7,
        &batch,
        Some(&SignalDeltas {
            doorbells: 11,
            interrupts: 6,
            ring_full_in: 3,
            ..Default::default()
        }),
    );
    for c in &batch {
        ops[c.op as usize] += 1;
        bytes[c.op as usize] += c.bytes as u64;
        errors[c.op as usize] += (c.status != 0) as u64;
        *expected_buckets
            .entry((c.op as u32, bucket_index(c.latency_ns)))
            .or_default() += 1;
    }
    io_reap(
        7,
        &[],
        Some(&SignalDeltas {
            interrupts: 7,
            ring_full_out: 1,
            irq_masked: 5,
            irq_unmasked: 4,
            ..Default::default()
        }),
    );
    // The driver's own path: its sites count, and its io_reap carries the counts.
    for _ in 0..4 {
        trace::signal(10, DIR_GUEST_TO_HOST, 0, &driver_signals);
    }
    trace::signal(10, DIR_HOST_TO_GUEST, 0, &driver_signals);
    trace::ring_full(10, DIR_HOST_TO_GUEST, 4096, &driver_signals);
    trace::irq_mask(10, true, &driver_signals);
    trace::irq_mask(10, false, &driver_signals);
    trace::irq_mask(10, true, &driver_signals);
    trace::io_reap(10, &[], Some(&driver_signals));
    assert_eq!(
        driver_signals.take(),
        Default::default(),
        "io_reap took them"
    );
    // Many hits of one site in a leaf function: the kernel optimises it after the first, and
    // the events the later hits carry must arrive intact.
    for round in 1..=20u64 {
        for _ in 0..round {
            trace::signal(12, DIR_HOST_TO_GUEST, 0, &driver_signals);
        }
        for _ in 0..3 {
            trace::ring_full(12, DIR_HOST_TO_GUEST, 4096, &driver_signals);
        }
        trace::irq_mask(12, true, &driver_signals);
        trace::irq_mask(12, false, &driver_signals);
        trace::irq_mask(12, false, &driver_signals);
        io_reap_from_a_leaf(12, &driver_signals);
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
    assert_eq!((e.irq_masked, e.irq_unmasked), (5, 4));
    assert_eq!(e.workload_starts, 1);
    let e = snap.events[&DevKey { pid, dev: 10 }];
    assert_eq!((e.doorbells, e.interrupts), (4, 1));
    assert_eq!((e.ring_full_out, e.ring_full_in), (0, 1));
    assert_eq!((e.irq_masked, e.irq_unmasked), (2, 1));
    assert!(
        !snap.io.keys().any(|k| k.pid == pid && k.dev == 10),
        "a hit with no completions creates no op entries"
    );
    let e = snap.events[&DevKey { pid, dev: 12 }];
    assert_eq!(
        (e.doorbells, e.interrupts, e.ring_full_out, e.ring_full_in),
        (0, 210, 0, 60),
        "{e:?}"
    );
    assert_eq!((e.irq_masked, e.irq_unmasked), (20, 40), "{e:?}");
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
    io_reap(8, &big, None);
    let snap = probes.snapshot().unwrap();
    assert_eq!(snap.io[&IoKey { pid, dev: 8, op: 2 }].ops, 256);
    assert_eq!(snap.health.batch_truncated, 1);

    // Detaching releases the semaphores and forgets this pid's counters.
    probes.detach_process(pid);
    assert!(!workload_start(7), "detach releases the semaphore");
    assert!(!io_reap(7, &batch, None));
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
