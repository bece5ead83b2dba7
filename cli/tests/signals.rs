//! Every signal a user sends ends a command cleanly, and no child outlives its parent (issue 12,
//! item 6): the real `enlight demo` gets SIGINT, SIGTERM, SIGHUP, a closed stdout (`enlight demo
//! | head -1`) and SIGKILL, and afterwards its device process is gone and nothing is left in the
//! temporary directory the test gave it (TMPDIR). The demo needs root (its enlightd loads eBPF);
//! without privileges these tests fail with the reason. The device-process test is unprivileged.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::require_privileges;

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

/// A process identified by pid and start time (field 22 of /proc/<pid>/stat), so a reused pid
/// is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Proc {
    pid: u32,
    start: u64,
}

/// `(state, start time)` of `pid`, from /proc/<pid>/stat.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields[0].chars().next()?, fields[19].parse().ok()?))
}

impl Proc {
    fn of(pid: u32) -> Option<Proc> {
        stat(pid).map(|(_, start)| Proc { pid, start })
    }

    /// Still running (a zombie has exited: only its parent has not reaped it yet).
    fn running(&self) -> bool {
        matches!(stat(self.pid), Some((state, start)) if start == self.start && state != 'Z')
    }
}

/// The children of every thread of `pid`.
fn children(pid: u32) -> Vec<Proc> {
    let mut v = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        v.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter_map(Proc::of),
        );
    }
    v
}

fn wait_gone(procs: &[Proc], limit: Duration) {
    let deadline = Instant::now() + limit;
    while procs.iter().any(Proc::running) {
        assert!(
            Instant::now() < deadline,
            "still running {}s later: {:?}",
            limit.as_secs(),
            procs.iter().filter(|p| p.running()).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` to exit, killing it (and failing) after `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("did not exit within {}s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A running `enlight demo` in a temporary directory of the test's own, its stdout piped, its
/// device process started.
struct Demo {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    device: Vec<Proc>,
    tmp: tempfile::TempDir,
    /// Holds the demo's stderr (outside TMPDIR, which must end up empty).
    logs: tempfile::TempDir,
}

impl Demo {
    fn start() -> Demo {
        let tmp = tempfile::tempdir().unwrap();
        let logs = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(logs.path().join("stderr")).unwrap();
        let mut child = Command::new(ENLIGHT)
            .args(["demo", "--listen", "127.0.0.1:0", "--size-mib", "16"])
            .args(["--duration", "120"])
            .env("TMPDIR", tmp.path())
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn enlight demo");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        // The summary header comes once the device process has been started.
        let mut line = String::new();
        while !line.contains("p999") {
            line.clear();
            let n = out.read_line(&mut line).unwrap();
            assert!(n > 0, "demo ended before its summary header");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let device = loop {
            let c = children(child.id());
            if !c.is_empty() {
                break c;
            }
            assert!(Instant::now() < deadline, "the demo has no device process");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            !entries(tmp.path()).is_empty(),
            "the demo made its directory in TMPDIR"
        );
        Demo {
            child,
            out,
            device,
            tmp,
            logs,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stderr")).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0);
    }
}

/// The read end of a pipe whose write end is already closed (a stand-in for a dropped stdout).
fn closed_stdout() -> std::process::ChildStdout {
    let mut c = Command::new("true").stdout(Stdio::piped()).spawn().unwrap();
    let out = c.stdout.take().unwrap();
    c.wait().unwrap();
    out
}

/// A signal ends the demo as Ctrl-C does: a clean exit with its final line, the device process
/// stopped, nothing left in TMPDIR.
fn ends_like_ctrl_c(sig: libc::c_int) {
    let _serial = require_privileges();
    let mut demo = Demo::start();
    demo.signal(sig);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut demo.out, &mut rest).unwrap();
    let status = wait_exit(&mut demo.child, Duration::from_secs(60));
    assert!(
        status.success(),
        "signal {sig}: demo exited with {status}\n{rest}\n{}",
        demo.stderr()
    );
    assert!(
        rest.contains("final:"),
        "signal {sig}: no final line:\n{rest}"
    );
    wait_gone(&demo.device, Duration::from_secs(10));
    assert_eq!(
        entries(demo.tmp.path()),
        Vec::<String>::new(),
        "signal {sig}: left behind"
    );
}

#[test]
fn sigint_ends_the_demo_cleanly() {
    ends_like_ctrl_c(libc::SIGINT);
}

#[test]
fn sigterm_ends_the_demo_cleanly() {
    ends_like_ctrl_c(libc::SIGTERM);
}

#[test]
fn sighup_ends_the_demo_cleanly() {
    ends_like_ctrl_c(libc::SIGHUP);
}

/// `enlight demo | head -1`: the reader goes away; the demo notices at its next line, stops
/// as on Ctrl-C (no panic), and leaves nothing behind.
#[test]
fn a_closed_stdout_ends_the_demo_cleanly() {
    let _serial = require_privileges();
    let mut demo = Demo::start();
    // Closing our end of the pipe: the demo's next line meets a broken pipe.
    let out = std::mem::replace(&mut demo.out, BufReader::new(closed_stdout()));
    drop(out);
    let status = wait_exit(&mut demo.child, Duration::from_secs(60));
    let stderr = demo.stderr();
    assert!(
        status.success(),
        "demo exited with {status} after its stdout closed:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    wait_gone(&demo.device, Duration::from_secs(10));
    assert_eq!(
        entries(demo.tmp.path()),
        Vec::<String>::new(),
        "left behind"
    );
}

/// SIGKILL cannot be caught: the device process must die with its parent all the same, and
/// the next demo removes the directory the killed one left.
#[test]
fn a_killed_demo_leaves_no_process_and_the_next_removes_its_directory() {
    let _serial = require_privileges();
    let mut demo = Demo::start();
    demo.signal(libc::SIGKILL);
    let _ = demo.child.wait();
    wait_gone(&demo.device, Duration::from_secs(10));
    assert!(
        !entries(demo.tmp.path()).is_empty(),
        "SIGKILL leaves the directory"
    );
    let out = Command::new(ENLIGHT)
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--size-mib",
            "16",
            "--duration",
            "1",
        ])
        .env("TMPDIR", demo.tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        entries(demo.tmp.path()),
        Vec::<String>::new(),
        "leftover not removed"
    );
}

/// `enlight disk --name <name>` on a fresh 8 MiB file in `dir`, a QD1 workload, its stdout piped.
fn disk(dir: &Path, name: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(ENLIGHT);
    c.args([
        "disk",
        "--name",
        name,
        "--create-mib",
        "8",
        "--workload",
        "qd=1",
    ])
    .args(extra)
    .arg("--backing")
    .arg(dir.join(format!("{name}.img")))
    .arg("--runtime-dir")
    .arg(dir)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// Reads a device process's first line (it is running and registered by then).
fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

/// A device process stops cleanly on SIGHUP too (a closed terminal): its registry record and
/// control socket are removed.
#[test]
fn a_device_process_stops_cleanly_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = disk(dir.path(), "hup0", &[]).spawn().unwrap();
    first_line(&mut child);
    assert!(dir.path().join("devices/hup0.json").exists());
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) };
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "exited with {status}");
    assert!(
        !dir.path().join("devices/hup0.json").exists(),
        "record left behind"
    );
    assert!(
        !dir.path().join("control/hup0.sock").exists(),
        "socket left behind"
    );
}

/// Stale state (issue 12, item 10): a device killed with SIGKILL leaves its record and control
/// socket; a device starting under the same name removes them first, while a name whose
/// device still runs is refused, naming that device's pid (enlightd removes such leftovers on
/// discovery too: daemon/src/collector.rs).
#[test]
fn a_killed_devices_leftovers_go_and_a_live_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = disk(dir.path(), "k0", &[]).spawn().unwrap();
    first_line(&mut first);
    first.kill().unwrap();
    first.wait().unwrap();
    let (record, socket) = (
        dir.path().join("devices/k0.json"),
        dir.path().join("control/k0.sock"),
    );
    assert!(record.exists() && socket.exists(), "SIGKILL leaves both");
    let again = disk(dir.path(), "k0", &["--duration", "0.5"])
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(!record.exists() && !socket.exists(), "leftovers removed");

    // A device with no control socket (emulated) cannot take the name of a running one.
    let emulated = |extra: &[&str]| {
        let mut c = Command::new(ENLIGHT);
        c.args(["emulated-disk", "--name", "e0", "--create-mib", "4"])
            .args(["--workload", "qd=1,rw=100"])
            .args(extra)
            .arg("--backing")
            .arg(dir.path().join("e.img"))
            .arg("--runtime-dir")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let mut running = emulated(&[]).spawn().unwrap();
    first_line(&mut running);
    let second = emulated(&["--duration", "1"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(running.id() as libc::pid_t, libc::SIGTERM) };
    let status = wait_exit(&mut running, Duration::from_secs(30));
    assert!(
        !second.status.success() && stderr.contains(&format!("pid {}", running.id())),
        "{stderr}"
    );
    assert!(
        status.success(),
        "the first keeps running and stops cleanly"
    );
    assert!(!dir.path().join("devices/e0.json").exists());
}
