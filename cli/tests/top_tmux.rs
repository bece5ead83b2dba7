//! `enlight top` for real: in a tmux pane, against a live enlightd (in this process, real eBPF
//! probes) watching a live `enlight disk` workload. The screen is read back with
//! `tmux capture-pane`: real figures appear, the daemon is stopped (the TUI says so), restarted
//! on the same port (the TUI reconnects), and after quitting, and after a panic, the terminal is
//! back in cooked mode (`stty` in the same pane). Needs root and tmux (scripts/test-all.sh
//! installs it); without them these tests fail with the reason.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use enlightd::tuner::TunerMode;
use support::{free_port, spawn_disk, wait_for_io, LiveDaemon};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

/// A private tmux server (its own socket), killed on drop even when the test fails.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let socket = format!("enlight-top-test-{}-{}", std::process::id(), rand_suffix());
        let t = Tmux { socket };
        let out = t
            .cmd()
            .args([
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "100",
                "-y",
                "30",
                command,
            ])
            .output()
            .unwrap_or_else(|e| panic!("tmux is needed (apt-get install tmux): {e}"));
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]);
        c
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let ok = self
            .cmd()
            .args(["send-keys", "-t", "top"])
            .args(keys)
            .status()
            .unwrap()
            .success();
        assert!(ok, "tmux send-keys {keys:?}");
    }

    /// Waits until `pred` holds for the screen; panics with the last screen otherwise.
    fn wait_for(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_007
}

/// After the TUI exits, the pane runs `stty -a`: in cooked mode `icanon` and `echo` are on.
fn shell_after(top_args: &str) -> String {
    format!(
        "{ENLIGHT} top {top_args}; echo TOP-EXITED=$?; stty -a | tr ' ;' '\\n\\n' | grep -xE -- '-?(icanon|echo)' | tr '\\n' ' '; echo; sleep 60"
    )
}

/// Whether the pane shows the exit status and the `stty` line after it.
fn exited(screen: &str) -> bool {
    screen
        .lines()
        .skip_while(|l| !l.starts_with("TOP-EXITED="))
        .nth(1)
        .is_some_and(|l| l.contains("icanon"))
}

fn assert_cooked(screen: &str) {
    let line = screen
        .lines()
        .skip_while(|l| !l.starts_with("TOP-EXITED="))
        .nth(1)
        .unwrap_or_else(|| panic!("no stty line:\n{screen}"));
    let modes: Vec<&str> = line.split_whitespace().collect();
    assert!(
        modes.contains(&"icanon") && modes.contains(&"echo"),
        "terminal left in raw mode: {line:?}\n{screen}"
    );
}

/// Parses a latency as `enlight top` prints it (`850ns`, `12.3us`, `1.25ms`, `2.00s`) into ns.
fn parse_latency(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "ns" => v,
        "us" => v * 1e3,
        "ms" => v * 1e6,
        "s" => v * 1e9,
        _ => return None,
    })
}

fn parse_count(s: &str) -> Option<f64> {
    let (num, mul) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1e3),
        'M' => (&s[..s.len() - 1], 1e6),
        _ => (s, 1.0),
    };
    Some(num.parse::<f64>().ok()? * mul)
}

#[test]
fn top_shows_live_figures_survives_a_daemon_restart_and_restores_the_terminal() {
    if let Err(e) = enlight_probes::preflight() {
        panic!("privileged end-to-end test cannot run: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The tuner recommends without applying (dry run): its state shows, pinning works, and the
    // workload's settings stay put.
    let daemon = LiveDaemon::start_tuned(dir.path(), port, TunerMode::DryRun);
    let _disk = spawn_disk(
        ENLIGHT,
        dir.path(),
        "top0",
        "qd=8,bs=4k,rw=70,pattern=random,duration=90s",
    );
    wait_for_io(&daemon.handle, "top0");

    let tmux = Tmux::start(&shell_after(&format!(
        "--daemon 127.0.0.1:{port} --interval-ms 200"
    )));
    // The device row with real figures: ops/s and a p50 near what the daemon itself reports.
    // The workload starts when its probes attach, which can be late in a daemon tick: that first
    // tick's rate is true but covers a few milliseconds of I/O (CI once read 66 ops/s from it).
    // Wait for a full tick of I/O, over 100 ops/s, before comparing.
    let screen = tmux.wait_for("a device row with figures", 30, |s| {
        s.contains("● connected")
            && s.lines().any(|l| {
                l.starts_with("top0 ")
                    && l.split_whitespace()
                        .nth(2)
                        .and_then(parse_count)
                        .unwrap_or(0.0)
                        > 100.0
                    && l.split_whitespace()
                        .nth(4)
                        .and_then(parse_latency)
                        .is_some()
            })
    });
    let row: Vec<&str> = screen
        .lines()
        .find(|l| l.starts_with("top0 "))
        .unwrap()
        .split_whitespace()
        .collect();
    let d = daemon
        .handle
        .devices()
        .into_iter()
        .find(|d| d.name == "top0")
        .unwrap();
    assert_eq!(row[1], "synth", "{screen}");
    let ops_per_sec = parse_count(row[2]).unwrap();
    let p50 = parse_latency(row[4]).unwrap();
    let daemon_p50 = d.total.p50_seconds.unwrap() * 1e9;
    // The TUI's p50 is over its recent window, the daemon's over the whole run, read at another
    // moment: the same order of magnitude, not the same figure.
    assert!(
        ops_per_sec > 100.0 && p50 > 0.0 && (0.1..10.0).contains(&(p50 / daemon_p50)),
        "TUI ops/s {ops_per_sec} p50 {p50} ns vs daemon p50 {daemon_p50} ns\n{screen}"
    );
    // One window's percentiles, in order.
    let (p99, p999) = (
        parse_latency(row[5]).unwrap(),
        parse_latency(row[6]).unwrap(),
    );
    assert!(p50 <= p99 && p99 <= p999, "{screen}");
    assert_eq!(row[8], "256K", "ring size: {screen}");
    // The tuner column: a contract 6 state (it may move on between the two reads).
    assert!(
        tuner_column(&d) != "n/a",
        "the daemon runs a tuner for top0"
    );
    assert!(
        ["idle", "exploring", "converged", "pinned", "frozen"].contains(row.last().unwrap()),
        "{screen}"
    );

    // The device view: histogram with markers, the chart.
    tmux.keys(&["Enter"]);
    let screen = tmux.wait_for("the device view", 30, |s| {
        s.contains("latency, last") && s.contains("^p50") && s.contains("over the last 120s")
    });
    assert!(screen.contains("top0  disk/synthetic"), "{screen}");

    // Pin and unpin through the daemon's API (contract 6): the TUI reports the answer and the
    // daemon's own view follows.
    let pinned = |handle: &enlightd::DaemonHandle| {
        let d = handle
            .devices()
            .into_iter()
            .find(|d| d.name == "top0")
            .unwrap();
        serde_json::to_value(&d).unwrap()["tuner"]["pinned"] == true
    };
    for (pin, word) in [(true, "pinned"), (false, "unpinned")] {
        tmux.keys(&["p"]);
        tmux.wait_for(word, 30, |s| s.contains(&format!("tuner {word} for top0")));
        let deadline = Instant::now() + Duration::from_secs(30);
        while pinned(&daemon.handle) != pin {
            assert!(Instant::now() < deadline, "daemon's tuner not {word}");
            std::thread::sleep(Duration::from_millis(50));
        }
        if pin {
            tmux.wait_for("(pinned) in the summary", 30, |s| s.contains("(pinned)"));
        }
    }

    // The daemon goes away: the TUI says so and keeps the last figures.
    daemon.stop();
    let screen = tmux.wait_for("DISCONNECTED", 30, |s| s.contains("DISCONNECTED"));
    assert!(screen.contains("top0  disk/synthetic"), "{screen}");
    // ... and comes back on the same port: the TUI reconnects by itself.
    let daemon = LiveDaemon::start_tuned(dir.path(), port, TunerMode::DryRun);
    tmux.wait_for("reconnected", 30, |s| {
        s.contains("● connected") && s.contains("latency, last") && !s.contains("DISCONNECTED")
    });
    tmux.keys(&["Escape"]);
    tmux.wait_for("the list with live figures after the restart", 30, |s| {
        s.lines().any(|l| {
            l.starts_with("top0 ")
                && l.split_whitespace()
                    .nth(2)
                    .and_then(parse_count)
                    .unwrap_or(0.0)
                    > 0.0
        })
    });
    assert!(daemon.handle.devices().iter().any(|d| d.name == "top0"));

    // Quit: the pane's shell is back in cooked mode and the TUI's screen is gone.
    tmux.keys(&["q"]);
    let screen = tmux.wait_for("the TUI to exit", 30, exited);
    assert!(screen.contains("TOP-EXITED=0"), "{screen}");
    assert!(
        !screen.contains("enlight top"),
        "alternate screen left: {screen}"
    );
    assert_cooked(&screen);
    daemon.stop();
}

fn tuner_column(d: &enlightd::DeviceView) -> String {
    // Reads the daemon's own JSON: with no tuner the TUI shows n/a.
    let v = serde_json::to_value(d).unwrap();
    match v.get("tuner") {
        None | Some(serde_json::Value::Null) => "n/a".into(),
        Some(t) if t["pinned"] == true => "pinned".into(),
        Some(t) if t["mode"] == "off" => "off".into(),
        Some(t) => t["state"].as_str().unwrap_or_default().to_string(),
    }
}

#[test]
fn a_panic_in_top_restores_the_terminal() {
    // No daemon at all: the TUI shows it is disconnected, then panics on purpose (late enough
    // that a slow start and the 100 ms polling of the pane still see it disconnected first).
    let port = free_port();
    let tmux = Tmux::start(&shell_after(&format!(
        "--daemon 127.0.0.1:{port} --panic-after-secs 8"
    )));
    tmux.wait_for("disconnected", 30, |s| s.contains("DISCONNECTED"));
    let screen = tmux.wait_for("the TUI to exit", 30, exited);
    assert!(
        screen.contains("TOP-EXITED=101"),
        "panics exit 101: {screen}"
    );
    assert!(
        screen.contains("--panic-after reached"),
        "panic message readable: {screen}"
    );
    assert_cooked(&screen);
}

/// SIGTERM and SIGHUP end `enlight top` the way `q` does (issue 12, item 6): exit 0 and the
/// terminal back in cooked mode, not killed with the terminal left raw.
#[test]
fn signals_end_top_and_restore_the_terminal() {
    for sig in [libc::SIGTERM, libc::SIGHUP] {
        let port = free_port();
        let tmux = Tmux::start(&shell_after(&format!("--daemon 127.0.0.1:{port}")));
        tmux.wait_for("disconnected", 30, |s| s.contains("DISCONNECTED"));
        let out = tmux
            .cmd()
            .args(["display-message", "-p", "-t", "top", "#{pane_pid}"])
            .output()
            .unwrap();
        let shell: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
            .unwrap_or_default();
        let top: i32 = children
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no enlight top under the pane's shell {shell}"))
            .parse()
            .unwrap();
        // SAFETY: kill(2) on the `enlight top` this test started (through tmux).
        assert_eq!(unsafe { libc::kill(top, sig) }, 0);
        let screen = tmux.wait_for("the TUI to exit", 30, exited);
        assert!(
            screen.contains("TOP-EXITED=0"),
            "signal {sig}: not a clean exit: {screen}"
        );
        assert_cooked(&screen);
    }
}
