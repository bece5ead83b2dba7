//! Privileged: the Debian package as an operator gets it. `packaging/build-deb.sh` (cargo-deb)
//! packages the binaries this test run built; `dpkg -i` installs it on this machine; the unit
//! passes `systemd-analyze verify`; then, since systemd is not PID 1 here, the unit's command line
//! runs with the unit's environment and sandbox as systemd would set them up: its capability
//! bounding set and no new privileges (setpriv), a read-only file system but for its runtime and
//! state directories, a private /tmp, in a network namespace of its own (so its port and runtime
//! directory collide with nothing else). A device started by the installed `enlight` registers
//! there; the daemon, with only the unit's capabilities, attaches to it, counts exactly its I/Os
//! and its own cost, and is scraped. `dpkg --purge` then leaves nothing behind: no file, directory
//! or symlink with "enlight" in its path under the places a package or systemd writes, no user or
//! group. Needs root and cargo-deb (scripts/test-all.sh installs it).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{repo, KillOnDrop};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// dpkg, waiting (up to 2 minutes) while another package manager holds its lock.
fn dpkg(args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = Command::new("dpkg")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("dpkg");
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains("lock") || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "enlight"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"))
}

/// Every path with "enlight" in it under the places dpkg, the package's scripts and systemd
/// write to (symlinks not followed).
fn enlight_paths() -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.to_string_lossy().contains("enlight") {
                out.insert(p.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    for root in [
        "/etc",
        "/usr/bin",
        "/usr/lib/systemd",
        "/lib/systemd",
        "/usr/share/man",
        "/usr/share/doc",
        "/usr/share/bash-completion",
        "/usr/share/zsh",
        "/usr/share/fish",
        "/var/lib/systemd",
        "/var/lib",
        "/run",
    ] {
        let r = Path::new(root);
        if root == "/var/lib" || root == "/run" {
            // Only the top level of /var/lib and /run (the state and runtime directories).
            for e in std::fs::read_dir(r).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().contains("enlight") {
                    out.insert(e.path());
                }
            }
        } else {
            walk(r, &mut out);
        }
    }
    // dpkg's own record of the package.
    for e in std::fs::read_dir("/var/lib/dpkg/info")
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("enlight.") {
            out.insert(e.path());
        }
    }
    out
}

/// `Key=` values of the unit (the last one wins, as in systemd, except Environment which adds).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
        .collect()
}

/// Purges the package when dropped, so a failing test leaves no package behind.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = dpkg(&["--purge", "enlight"]);
    }
}

/// Removes the test's network namespace when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

#[test]
fn the_package_installs_runs_as_its_unit_says_and_purges_to_nothing() {
    let _lock = support::require_privileges();
    assert!(
        !installed(),
        "a package named enlight is installed on this machine; this test installs and purges \
         its own and will not touch that one (dpkg --purge enlight to run it)"
    );
    assert!(
        Command::new("cargo")
            .args(["deb", "--version"])
            .output()
            .is_ok_and(|o| o.status.success()),
        "cargo-deb is needed: cargo install cargo-deb --locked --no-default-features \
         (scripts/test-all.sh installs it)"
    );
    let users = |f: &str| std::fs::read_to_string(f).unwrap();
    let (passwd, group) = (users("/etc/passwd"), users("/etc/group"));
    let before = enlight_paths();

    // Build the package from this run's binaries.
    let out = tempfile::tempdir().unwrap();
    let bins = Path::new(ENLIGHT).parent().unwrap();
    let started = Instant::now();
    run(Command::new(repo().join("packaging/build-deb.sh"))
        .arg("--from")
        .arg(bins)
        .arg("--output")
        .arg(out.path())
        .arg("--fast"));
    eprintln!(
        "package test: cargo-deb built the package in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");

    let purge = Purge;
    let install = dpkg(&["-i", deb.to_str().unwrap()]);
    assert!(
        install.status.success(),
        "dpkg -i: {}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );
    // What it installed.
    for f in [
        "/usr/bin/enlight",
        "/usr/bin/enlightd",
        "/etc/enlight/enlightd.toml",
        "/usr/share/man/man8/enlightd.8.gz",
        "/usr/share/man/man1/enlight.1.gz",
        "/usr/share/man/man1/enlight-demo.1.gz",
        "/usr/share/bash-completion/completions/enlight",
        "/usr/share/zsh/vendor-completions/_enlightd",
        "/usr/share/fish/vendor_completions.d/enlight.fish",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "enlight"]));
    assert!(
        String::from_utf8_lossy(&conffiles.stdout).contains("/etc/enlight/enlightd.toml"),
        "the configuration is a conffile"
    );
    let unit_path = [
        "/usr/lib/systemd/system/enlightd.service",
        "/lib/systemd/system/enlightd.service",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("the unit is installed");
    run(Command::new("systemd-analyze").args(["verify", "--man=no", unit_path]));
    let completion =
        std::fs::read_to_string("/usr/share/bash-completion/completions/enlightd").unwrap();
    assert!(
        completion.contains("--log-format"),
        "completions from the real flags"
    );

    // The unit's command line, environment and sandbox.
    let unit = std::fs::read_to_string(unit_path).unwrap();
    let exec = unit_values(&unit, "ExecStart").pop().expect("ExecStart");
    let env: Vec<String> = unit_values(&unit, "Environment");
    let caps: Vec<String> = unit_values(&unit, "CapabilityBoundingSet")
        .pop()
        .expect("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert_eq!(unit_values(&unit, "NoNewPrivileges"), ["yes"]);
    assert_eq!(unit_values(&unit, "ProtectSystem"), ["strict"]);
    assert_eq!(unit_values(&unit, "PrivateTmp"), ["yes"]);
    let runtime = unit_values(&unit, "RuntimeDirectory")
        .pop()
        .expect("RuntimeDirectory");
    let state = unit_values(&unit, "StateDirectory")
        .pop()
        .expect("StateDirectory");
    let script = format!(
        "set -e\n\
         mount -t tmpfs -o mode=0755 tmpfs /run && mkdir -m 0755 /run/{runtime}\n\
         mount -t tmpfs -o mode=0755 tmpfs /var/lib && mkdir -m 0750 /var/lib/{state}\n\
         mount -t tmpfs -o mode=1777 tmpfs /tmp\n\
         mount -o remount,bind,ro /\n\
         exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin {env} setpriv --bounding-set -all,{caps} --no-new-privs -- {exec}\n",
        env = env.join(" "),
        caps = caps.join(","),
    );
    let ns = Netns(format!("enlpkg{}", std::process::id()));
    run(Command::new("ip").args(["netns", "add", &ns.0]));
    run(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("enlightd.log");
    let mut daemon = KillOnDrop(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.0,
                "unshare",
                "--mount",
                "--propagation",
                "private",
            ])
            .args(["sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the unit's command line"),
    );
    let pid = daemon.0.id().to_string();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    // Its bounding set and no-new-privs, as the kernel has them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "enlightd" {
            let field = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            // CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21, CAP_PERFMON 38, CAP_BPF 39.
            assert_eq!(field("CapBnd:"), "000000c000201000", "{status}");
            assert_eq!(field("CapEff:"), "000000c000201000", "{status}");
            assert_eq!(field("NoNewPrivs:"), "1", "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline && daemon.0.try_wait().unwrap().is_none(),
            "enlightd did not start: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A device started by the installed enlight, in the daemon's mount namespace (its private
    // runtime directory and /tmp).
    let device = Command::new("nsenter")
        .args(["--target", &pid, "--mount", "--net", "--"])
        .args(["/usr/bin/enlight", "disk", "--name", "pkg0", "--json"])
        .args(["--backing", "/tmp/pkg0.img", "--create-mib", "16"])
        .args(["--workload", "qd=4,bs=4k,rw=70,pattern=random,rate=1000"])
        .args(["--duration", "3", "--wait-for-probes", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the installed enlight disk");
    let last = support::final_line(device);
    let w: enlight_driver::workload::WorkloadSnapshot = serde_json::from_str(&last).unwrap();
    assert!(w.done && w.ops_total > 0, "{last}");

    // Scrape it from inside its namespace (a thread of our own moves there).
    let ns_name = ns.0.clone();
    let metrics = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns_name}")).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: setns on an open namespace file; it moves only this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = ureq::get("http://127.0.0.1:9464/metrics")
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .unwrap_or_default();
            let counted: u64 = text
                .lines()
                .filter(|l| l.starts_with("enlight_io_ops_total{device=\"pkg0\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            if counted >= w.ops_total || Instant::now() > deadline {
                return (text, counted);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .join()
    .unwrap();
    let (text, counted) = metrics;
    assert_eq!(
        counted,
        w.ops_total,
        "eBPF under the unit's capabilities counted {counted} of the workload's {}: {}",
        w.ops_total,
        log_text()
    );
    assert!(text.contains("enlight_bpf_stats_enabled 1"), "{text}");
    // SIGTERM: the service's clean stop.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(daemon.0.id() as libc::pid_t, libc::SIGTERM) };
    let status = daemon.0.wait().unwrap();
    assert!(
        status.success(),
        "enlightd exited with {status}: {}",
        log_text()
    );
    for line in [
        "device pkg0 found",
        "probes attached to pkg0",
        "device pkg0 gone",
    ] {
        assert!(
            log_text().contains(line),
            "{line}: the daemon's log: {}",
            log_text()
        );
    }
    drop(ns);

    // Purge: nothing left.
    drop(purge);
    assert!(!installed(), "still installed after purge");
    let after = enlight_paths();
    assert_eq!(
        after.difference(&before).collect::<Vec<_>>(),
        Vec::<&PathBuf>::new(),
        "left behind by the package"
    );
    assert_eq!(users("/etc/passwd"), passwd, "users changed");
    assert_eq!(users("/etc/group"), group, "groups changed");
}
