//! Live knobs under load: a QD32 random read/write workload runs on the synthetic disk while a
//! client on the real control socket resizes both rings up and down several times and changes
//! moderation and the polling budget. Every request must complete exactly once, slots must
//! complete their tags in order, reads must return what the model of the disk says, the backing
//! file must equal the model at the end, and the host must have seen exactly the requests the
//! guest submitted. The longest I/O stall of a resize is measured and printed; only a sanity
//! bound is asserted (the figure for the docs comes from the printed line).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use enlight_driver::control::{socket_path, ControlClient, ControlServer, SettingsPatch};
use enlight_driver::disk::{DiskOptions, Submitted, SyntheticDisk};
use enlight_driver::settings::DeviceSettings;
use enlight_driver::trace::{OP_READ, OP_WRITE};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 1024;
const QD: usize = 32;

/// The content of `block` after its `version`th write (version 0: the initial file).
fn pattern(block: u64, version: u32) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[0..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..12].copy_from_slice(&version.to_le_bytes());
        chunk[12..16].copy_from_slice(&(i as u32).to_le_bytes());
    }
    v
}

struct Pending {
    op: u16,
    block: u64,
    version: u32,
}

/// Sets its flag when dropped: a thread that makes the changes stops the I/O it needs when it
/// ends, however it ends (a panic included; the join then reports it).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn resize_and_moderation_changes_under_qd32_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    let mut initial = Vec::with_capacity(BLOCKS as usize * BLOCK);
    for b in 0..BLOCKS {
        initial.extend_from_slice(&pattern(b, 0));
    }
    std::fs::write(&backing, &initial).unwrap();
    let (mut vsc, vsp) = SyntheticDisk::start(
        &backing,
        DeviceSettings::default(),
        0,
        DiskOptions {
            max_io_bytes: BLOCK as u32,
            queue_slots: QD as u32,
            workers: 4,
        },
    )
    .unwrap();
    let live = vsc.live();
    let sock = socket_path(dir.path(), "disk0");
    let server = ControlServer::start(&sock, live.clone(), 0, None).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    // Completions so far: the changer waits for I/O on each new ring size before the next.
    let completed_io = Arc::new(AtomicU64::new(0));
    // The changes, applied from another thread over the socket while I/O runs.
    let changer = {
        let (sock, stop, completed_io) =
            (sock.clone(), Arc::clone(&stop), Arc::clone(&completed_io));
        std::thread::spawn(move || {
            let _stop = SetOnDrop(&stop);
            let mut c = ControlClient::connect(&sock).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let steps: [(u32, u32, u32, u32, u32); 8] = [
                (8192, 8192, 1, 0, 4),
                (1 << 20, 256 << 10, 32, 200, 256),
                (16384, 1 << 20, 8, 50, 64),
                (2 << 20, 8192, 128, 1000, 1),
                (8192, 16384, 4, 10, 4096),
                (64 << 10, 64 << 10, 16, 100, 32),
                (12288, 4 << 20, 2, 0, 8),
                (256 << 10, 256 << 10, 8, 50, 64),
            ];
            let mut applied = Vec::new();
            for (out, inb, frames, usecs, budget) in steps {
                let want = DeviceSettings {
                    ring_out_bytes: out,
                    ring_in_bytes: inb,
                    moderation_frames: frames,
                    moderation_usecs: usecs,
                    poll_budget: budget,
                };
                let before = c.get().unwrap().0;
                let now = c
                    .set(SettingsPatch::between(&before, &want))
                    .unwrap_or_else(|e| panic!("set {want:?}: {e}"));
                assert_eq!(now, want);
                applied.push(want);
                // I/O completes on these rings before the next change (a fixed time alone could
                // pass with the I/O thread off the CPU).
                let at_change = completed_io.load(Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(120));
                let deadline = Instant::now() + Duration::from_secs(30);
                while completed_io.load(Ordering::SeqCst) <= at_change {
                    assert!(
                        Instant::now() < deadline,
                        "no I/O completed within 30 s on {want:?}"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let generation = c.get().unwrap().2;
            (applied, generation)
        })
    };

    let mut rng = SmallRng::seed_from_u64(42);
    let mut versions = vec![0u32; BLOCKS as usize];
    let mut busy_blocks = vec![false; BLOCKS as usize];
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut last_generation_of_slot: HashMap<u32, u32> = HashMap::new();
    let (mut submitted, mut completed, mut reads_checked) = (0u64, 0u64, 0u64);
    let mut out = Vec::new();
    let mut last_completion = Instant::now();
    let mut longest_gap = Duration::ZERO;
    let mut buf = vec![0u8; BLOCK];
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping && pending.is_empty() {
            break;
        }
        // The run ends when the changer does (it has its own deadlines); until then I/O moves.
        assert!(
            last_completion.elapsed() < Duration::from_secs(30),
            "no completion for 30 s ({} requests pending)",
            pending.len()
        );
        while !stopping && pending.len() < QD {
            let block = rng.gen_range(0..BLOCKS);
            if busy_blocks[block as usize] {
                continue;
            }
            let (op, r) = if rng.gen_bool(0.5) {
                (OP_READ, vsc.submit(OP_READ, block * 8, 8).unwrap())
            } else {
                let version = versions[block as usize] + 1;
                (
                    OP_WRITE,
                    vsc.submit_write(block * 8, &pattern(block, version))
                        .unwrap(),
                )
            };
            let Submitted::Queued(tag) = r else {
                break;
            };
            busy_blocks[block as usize] = true;
            let version = if op == OP_WRITE {
                versions[block as usize] + 1
            } else {
                versions[block as usize]
            };
            assert!(
                pending
                    .insert(tag, Pending { op, block, version })
                    .is_none(),
                "tag {tag:#x} handed out twice"
            );
            submitted += 1;
        }
        out.clear();
        vsc.reap(&mut out, Duration::from_millis(100)).unwrap();
        let now = Instant::now();
        if !out.is_empty() {
            longest_gap = longest_gap.max(now - last_completion);
            last_completion = now;
        }
        for c in &out {
            let p = pending
                .remove(&c.tag)
                .unwrap_or_else(|| panic!("completion for unknown or finished tag {:#x}", c.tag));
            assert_eq!((c.op, c.status, c.bytes), (p.op, 0, BLOCK as u32));
            // Slots complete their tags in order: each generation exactly once, increasing.
            let (slot, generation) = (c.tag as u32, (c.tag >> 32) as u32);
            if let Some(prev) = last_generation_of_slot.insert(slot, generation) {
                assert_eq!(generation, prev.wrapping_add(1), "slot {slot} out of order");
            }
            busy_blocks[p.block as usize] = false;
            if p.op == OP_READ {
                vsc.read_completed(c.tag, &mut buf).unwrap();
                assert!(
                    buf == pattern(p.block, p.version),
                    "block {} read wrong data (want version {})",
                    p.block,
                    p.version
                );
                reads_checked += 1;
            } else {
                versions[p.block as usize] = p.version;
            }
            completed += 1;
        }
        completed_io.store(completed, Ordering::SeqCst);
    }
    let (applied, generation) = changer.join().unwrap();
    assert_eq!(generation, applied.len() as u64);
    assert_eq!(completed, submitted);
    assert!(pending.is_empty());
    assert_eq!(vsc.settings(), *applied.last().unwrap());
    assert_eq!(vsc.ring_sizes(), (256 << 10, 256 << 10));
    assert_eq!(live.resizes(), applied.len() as u64);
    // The host saw exactly what the guest sent (switch requests are not counted as I/O).
    assert_eq!(vsp.stats().requests.load(Ordering::Relaxed), submitted);
    assert_eq!(vsp.stats().errors.load(Ordering::Relaxed), 0);
    drop(server);
    vsp.stop().unwrap();
    let on_disk = std::fs::read(&backing).unwrap();
    for b in 0..BLOCKS {
        let at = b as usize * BLOCK;
        assert!(
            on_disk[at..at + BLOCK] == pattern(b, versions[b as usize])[..],
            "block {b} on disk is not version {}",
            versions[b as usize]
        );
    }
    let longest_stall = Duration::from_nanos(live.longest_stall_ns());
    println!(
        "live resize: {submitted} requests ({reads_checked} reads checked), {} resizes, \
         longest resize stall {longest_stall:?} (last {:?}), longest gap between completions \
         {longest_gap:?}",
        live.resizes(),
        live.last_resize().unwrap()
    );
    // A sanity bound only: the design holds I/O for a drain at QD32 plus a channel switch
    // (about a millisecond here, printed above); a unit test on a shared machine asserts no
    // timing.
    assert!(
        longest_stall < Duration::from_secs(5),
        "a resize stalled I/O for {longest_stall:?}"
    );
}

#[test]
fn a_resize_with_no_io_running_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    std::fs::write(&backing, vec![0u8; 1 << 20]).unwrap();
    let (vsc, _vsp) =
        SyntheticDisk::start(&backing, DeviceSettings::default(), 0, Default::default()).unwrap();
    let sock = socket_path(dir.path(), "idle");
    let _server = ControlServer::start(&sock, vsc.live(), 0, None).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    // Refused after RESIZE_START_TIMEOUT, as a refusal (not the client's own timeout).
    let e = c
        .set(SettingsPatch {
            ring_out_bytes: Some(8192),
            moderation_frames: Some(2),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(e, enlight_driver::control::ControlError::Busy(ref m) if m.contains("workload")),
        "{e}"
    );
    // Nothing changed, not even the knob that needs no resize.
    let (settings, _, generation) = c.get().unwrap();
    assert_eq!((settings, generation), (DeviceSettings::default(), 0));
    // A knob that needs no resize applies at once without I/O.
    assert_eq!(
        c.set(SettingsPatch {
            moderation_frames: Some(2),
            ..Default::default()
        })
        .unwrap()
        .moderation_frames,
        2
    );
    drop(vsc);
}

/// Runs the workload generator (`spec`, unbounded) on `vsc` while another thread resizes both
/// rings to each of `rings` in turn over the control socket `sock`, every one required to
/// succeed; the resizing thread stops the workload when it ends, however it ends.
fn workload_through_resizes(
    vsc: &mut enlight_driver::disk::DiskVsc,
    spec: &enlight_driver::workload::WorkloadSpec,
    sock: &std::path::Path,
    rings: &[u32],
) -> enlight_driver::workload::WorkloadSnapshot {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let changer = s.spawn(|| {
            let _stop = SetOnDrop(&stop);
            let mut c = ControlClient::connect(sock).unwrap();
            for &ring in rings {
                let now = c
                    .set(SettingsPatch {
                        ring_out_bytes: Some(ring),
                        ring_in_bytes: Some(ring),
                        ..Default::default()
                    })
                    .unwrap_or_else(|e| panic!("resize to {ring}: {e}"));
                assert_eq!((now.ring_out_bytes, now.ring_in_bytes), (ring, ring));
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        let r = enlight_driver::workload::run(vsc, spec, &stop, |_| {}).unwrap();
        changer.join().unwrap();
        r
    })
}

/// The real workload generator through resizes: it runs until every resize is done, its own
/// count equals what the host received, and nothing failed.
#[test]
fn the_workload_generators_count_survives_resizes() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    enlight_driver::disk::Backing::create(&backing, 16 << 20).unwrap();
    let (mut vsc, vsp) = SyntheticDisk::start(
        &backing,
        DeviceSettings::default(),
        0,
        DiskOptions {
            max_io_bytes: 128 << 10,
            queue_slots: 32,
            workers: 4,
        },
    )
    .unwrap();
    let sock = socket_path(dir.path(), "gen");
    let _server = ControlServer::start(&sock, vsc.live(), 0, None).unwrap();
    // Unbounded: the changer stops it after its last resize, so every resize finds I/O running
    // (a resize starts between I/Os; with none it is refused after RESIZE_START_TIMEOUT).
    let spec: enlight_driver::workload::WorkloadSpec = "qd=32,bs=4k,rw=70".parse().unwrap();
    let rings = [8192u32, 1 << 20, 16384, 256 << 10, 8192, 64 << 10];
    let report = workload_through_resizes(&mut vsc, &spec, &sock, &rings);
    assert!(report.done);
    assert!(report.ops_total > 0);
    assert_eq!(report.errors, 0);
    // Every I/O counted exactly once: the generator's count is what the host received.
    assert_eq!(
        vsp.stats().requests.load(Ordering::Relaxed),
        report.ops_total
    );
    assert_eq!(vsc.live().resizes(), rings.len() as u64);
    assert_eq!(vsc.ring_sizes(), (64 << 10, 64 << 10));
}

/// Moderation changed while I/O runs takes effect: at most one interrupt per 1024 completions
/// (plus the 100 ms timer), then one per completion when frames drop to 1.
#[test]
fn moderation_changes_take_effect_while_io_runs() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    enlight_driver::disk::Backing::create(&backing, 8 << 20).unwrap();
    let start = DeviceSettings {
        moderation_frames: 1024,
        moderation_usecs: 100_000,
        ..DeviceSettings::default()
    };
    let (mut vsc, vsp) = SyntheticDisk::start(&backing, start, 0, DiskOptions::default()).unwrap();
    let sock = socket_path(dir.path(), "mod");
    let _server = ControlServer::start(&sock, vsc.live(), 0, None).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    // QD1: every completion leaves the guest idle, waiting for an interrupt.
    let spec: enlight_driver::workload::WorkloadSpec = "qd=1,bs=4k,ios=20".parse().unwrap();
    let interrupts = || vsp.stats().interrupts.load(Ordering::Relaxed);
    let t = Instant::now();
    enlight_driver::workload::run(&mut vsc, &spec, &AtomicBool::new(false), |_| {}).unwrap();
    let slow = interrupts();
    // Only the 100 ms timer wakes the guest: about one interrupt per 100 ms.
    assert!(
        slow <= t.elapsed().as_millis() as u64 / 100 + 2,
        "{slow} interrupts"
    );
    let t = Instant::now();
    c.set(SettingsPatch {
        moderation_frames: Some(1),
        moderation_usecs: Some(0),
        ..Default::default()
    })
    .unwrap();
    let spec: enlight_driver::workload::WorkloadSpec = "qd=1,bs=4k,ios=300".parse().unwrap();
    enlight_driver::workload::run(&mut vsc, &spec, &AtomicBool::new(false), |_| {}).unwrap();
    let fast = interrupts() - slow;
    let window_ms = t.elapsed().as_millis() as u64;
    assert!(
        fast >= 290,
        "{fast} interrupts for 300 completions at frames=1"
    );
    // The old settings could not have sent that many in that time (the bound asserted above:
    // at QD1 an I/O waits up to 100 ms for the timer or the reap's own timeout, and gets about
    // one interrupt, so frames=1024 would fit within it): the change took effect. Not a
    // timing target: with frames=1 this fails only if 300 QD1 I/Os take about 29 s.
    assert!(
        fast > window_ms / 100 + 2,
        "{fast} interrupts in {window_ms} ms: no more than the old moderation allows"
    );
}

/// The host service half of `resizes_work_with_the_host_service_in_another_process`: runs when
/// the test binary is re-executed with ENLIGHT_VSP_CHILD set to "<socket fd>:<backing path>".
#[test]
fn vsp_child_role() {
    use std::os::fd::FromRawFd;
    let Ok(arg) = std::env::var("ENLIGHT_VSP_CHILD") else {
        return;
    };
    let (fd, path) = arg.split_once(':').unwrap();
    // SAFETY: the parent passed this inherited, open socket fd to us and nobody else uses it.
    let sock = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd.parse().unwrap()) };
    let mut host = enlight_driver::channel::receive_host_end(&sock).unwrap();
    host.rx
        .set_max_payload(enlight_driver::disk::MAX_PACKET_PAYLOAD);
    let control = enlight_driver::disk::VspControl::new().unwrap();
    control.live().set_handover_socket(sock);
    let backing = enlight_driver::disk::Backing::open(std::path::Path::new(path)).unwrap();
    // Serves until the guest's process closes the socket.
    enlight_driver::disk::serve(host, backing, 0, cross_process_options(), control.clone())
        .unwrap();
    // For the parent to compare with its workload's count.
    println!(
        "{CHILD_REPORT}{} errors={}",
        control.stats().requests.load(Ordering::Relaxed),
        control.stats().errors.load(Ordering::Relaxed)
    );
}

/// How `vsp_child_role` reports the requests it received, on its stdout.
const CHILD_REPORT: &str = "vsp_child_role: requests=";

fn cross_process_options() -> DiskOptions {
    DiskOptions {
        max_io_bytes: 16384,
        queue_slots: 32,
        workers: 2,
    }
}

/// The same in-band switch with the VSP in another process: the new host end travels over the
/// channel's hand-off socket instead of the in-process slot.
#[test]
fn resizes_work_with_the_host_service_in_another_process() {
    use std::os::fd::AsRawFd;
    if std::env::var("ENLIGHT_VSP_CHILD").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    enlight_driver::disk::Backing::create(&backing, 8 << 20).unwrap();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    // Let the child inherit its end: clear CLOEXEC on it.
    // SAFETY: fcntl on a socket we own.
    unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "vsp_child_role",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "ENLIGHT_VSP_CHILD",
            format!("{}:{}", theirs.as_raw_fd(), backing.display()),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(theirs);
    let options = cross_process_options();
    let settings = DeviceSettings::default();
    let cfg = enlight_driver::channel::ChannelConfig {
        out_ring_bytes: settings.ring_out_bytes as usize,
        in_ring_bytes: settings.ring_in_bytes as usize,
        extra_bytes: (options.max_io_bytes * options.queue_slots) as usize,
    };
    let handover = ours.try_clone().unwrap();
    let mut guest = enlight_driver::channel::create_for_peer(&cfg, ours).unwrap();
    guest
        .rx
        .set_max_payload(enlight_driver::disk::MAX_PACKET_PAYLOAD);
    let live = Arc::new(enlight_driver::disk::DiskLive::new(settings));
    live.set_handover_socket(handover);
    let mut vsc = enlight_driver::disk::DiskVsc::with_live(
        guest,
        0,
        live.clone(),
        options.max_io_bytes,
        (8 << 20) / 512,
    );
    let sock = socket_path(dir.path(), "xproc");
    let _server = ControlServer::start(&sock, live.clone(), 0, None).unwrap();
    // Unbounded: the changer stops it after its last resize (as in
    // `the_workload_generators_count_survives_resizes`).
    let spec: enlight_driver::workload::WorkloadSpec = "qd=32,bs=4k,rw=70".parse().unwrap();
    let rings = [8192u32, 1 << 20, 16384, 128 << 10];
    let report = workload_through_resizes(&mut vsc, &spec, &sock, &rings);
    assert!(report.done);
    assert!(report.ops_total > 0);
    assert_eq!(report.errors, 0);
    assert_eq!(live.resizes(), rings.len() as u64);
    // The guest goes away: the host process sees it on the socket and exits cleanly.
    drop(vsc);
    drop(_server);
    drop(live);
    let child = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success(),
        "host service process failed:\n{stdout}"
    );
    // Every I/O counted exactly once: the generator's count is what the host process received.
    let (requests, errors) = stdout
        .split_once(CHILD_REPORT)
        .and_then(|(_, rest)| {
            let (requests, rest) = rest.split_once(" errors=")?;
            let errors: String = rest.chars().take_while(char::is_ascii_digit).collect();
            Some((requests.parse::<u64>().ok()?, errors.parse::<u64>().ok()?))
        })
        .unwrap_or_else(|| panic!("no request count from the host process:\n{stdout}"));
    assert_eq!((requests, errors), (report.ops_total, 0));
}
