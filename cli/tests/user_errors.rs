//! A user makes mistakes (issue 12, items 7 and 8): numbers out of range on every numeric flag
//! and workload key get a clear error naming the flag and its range (never a panic or an
//! abort), `--help` states the ranges (enlightd's: cli/tests/check.rs), and a backing file the user named is never shrunk or
//! truncated without the flag that says so. Unprivileged: nothing here loads eBPF.

use std::path::Path;
use std::process::{Command, Output};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

fn run(exe: &str, args: &[&str]) -> Output {
    Command::new(exe)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap_or_else(|e| panic!("running {exe} {args:?}: {e}"))
}

/// Runs `exe args` and checks it is refused cleanly: a non-zero exit code that is neither a
/// panic (101) nor a signal (an abort), and a stderr that contains every `needle`.
fn refused(exe: &str, args: &[&str], needles: &[&str]) {
    let out = run(exe, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    assert!(
        matches!(code, Some(c) if c != 0 && c != 101),
        "{args:?}: exit {:?} (want a clean refusal)\nstderr: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for n in needles {
        assert!(
            stderr.contains(n),
            "{args:?}: stderr lacks {n:?}:\n{stderr}"
        );
    }
}

fn help(exe: &str, subcommand: &[&str]) -> String {
    let mut args = subcommand.to_vec();
    args.push("--help");
    let out = run(exe, &args);
    assert!(out.status.success(), "{args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn numeric_flags_out_of_range_are_refused_with_their_range() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let img = img.to_str().unwrap();
    let run_dir = dir.path().to_str().unwrap();
    let disk = |extra: &[&'static str]| -> Vec<&str> {
        let mut v = vec!["disk", "--backing", img, "--runtime-dir", run_dir];
        v.extend_from_slice(extra);
        v
    };
    // (arguments, what the error must name: the flag and its range)
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (disk(&["--duration", "inf"]), vec!["--duration", "31536000"]),
        (disk(&["--duration", "NaN"]), vec!["--duration", "31536000"]),
        (
            disk(&["--duration", "1e300"]),
            vec!["--duration", "31536000"],
        ),
        (
            disk(&["--duration", "99999999999999999999"]),
            vec!["--duration", "31536000"],
        ),
        (disk(&["--duration=-1"]), vec!["--duration", "31536000"]),
        (
            disk(&["--wait-for-probes", "inf"]),
            vec!["--wait-for-probes", "3600"],
        ),
        (disk(&["--workers", "100000"]), vec!["--workers", "1..=64"]),
        (disk(&["--workers", "0"]), vec!["--workers", "1..=64"]),
        (
            disk(&["--create-mib", "0"]),
            vec!["--create-mib", "1..=1048576"],
        ),
        (
            disk(&["--create-mib", "99999999999999"]),
            vec!["--create-mib", "1..=1048576"],
        ),
        (
            disk(&["--ring-bytes", "5000"]),
            vec!["--ring-bytes", "67108864"],
        ),
        (
            disk(&["--moderation-frames", "0"]),
            vec!["--moderation-frames", "1..=1024"],
        ),
        (
            disk(&["--moderation-usecs", "100001"]),
            vec!["--moderation-usecs", "0..=100000"],
        ),
        (
            disk(&["--poll-budget", "0"]),
            vec!["--poll-budget", "1..=4096"],
        ),
        // Workload keys: the key and its range.
        (disk(&["--workload", "qd=0"]), vec!["qd", "1..=4096"]),
        (disk(&["--workload", "qd=100000"]), vec!["qd", "1..=4096"]),
        (disk(&["--workload", "bs=3"]), vec!["bs", "512"]),
        (disk(&["--workload", "rw=101"]), vec!["rw", "0..=100"]),
        (disk(&["--workload", "ios=0"]), vec!["ios", "1.."]),
        (
            disk(&["--workload", "duration=inf"]),
            vec!["duration", "31536000"],
        ),
        (
            disk(&["--workload", "duration=1e300"]),
            vec!["duration", "31536000"],
        ),
        (
            disk(&["--workload", "duration=99999999999999999999ms"]),
            vec!["duration", "31536000"],
        ),
        (
            disk(&["--workload", "rate=99999999999"]),
            vec!["rate", "0..=10000000"],
        ),
        (
            disk(&["--workload", "burst=1e300:1"]),
            vec!["burst", "3600"],
        ),
        (disk(&["--workload", "mix=4k:101"]), vec!["mix", "0..=100"]),
        (
            disk(&["--workload", "seed=-1"]),
            vec!["seed", "18446744073709551615"],
        ),
        (
            vec!["emulated-disk", "--backing", img, "--duration", "NaN"],
            vec!["--duration", "31536000"],
        ),
        (
            vec!["emulated-disk", "--backing", img, "--create-mib", "0"],
            vec!["--create-mib", "1..=1048576"],
        ),
        (
            vec!["emulated-nic", "--duration", "1e300"],
            vec!["--duration", "31536000"],
        ),
        (
            vec!["emulated-nic", "--dev-id", "300"],
            vec!["--dev-id", "0..=255"],
        ),
        (
            vec!["nic", "--duration", "inf"],
            vec!["--duration", "31536000"],
        ),
        (
            vec!["nic", "--mtu", "4294967295"],
            vec!["--mtu", "68..=65535"],
        ),
        (
            vec!["nic", "--send-sections", "0"],
            vec!["--send-sections", "1..=65536"],
        ),
        (
            vec!["nic", "--recv-sections", "100000"],
            vec!["--recv-sections", "1..=65536"],
        ),
        (vec!["nic", "--dev-id", "256"], vec!["--dev-id", "0..=255"]),
        (
            vec!["demo", "--duration", "99999999999999999999"],
            vec!["--duration", "1..=31536000"],
        ),
        (
            vec!["demo", "--duration", "0"],
            vec!["--duration", "1..=31536000"],
        ),
        (
            vec!["demo", "--size-mib", "0"],
            vec!["--size-mib", "1..=1048576"],
        ),
        (vec!["demo", "--workload", "qd=0"], vec!["qd", "1..=4096"]),
        (
            vec!["top", "--interval-ms", "1"],
            vec!["--interval-ms", "50..=10000"],
        ),
        (
            // An unknown scenario too: without the range check the benchmark refuses that
            // instead of running for half an hour.
            vec!["bench", "tune", "--tick-ms", "0", "--scenario", "no-such"],
            vec!["--tick-ms", "50..=60000"],
        ),
        (
            vec!["bench", "compare", "--seconds", "inf"],
            vec!["--seconds", "3600"],
        ),
    ];
    for (args, needles) in &cases {
        refused(ENLIGHT, args, needles);
    }
    assert!(
        !Path::new(img).exists(),
        "no case got far enough to create the backing file"
    );
}

#[test]
fn help_states_every_numeric_range() {
    let disk = help(ENLIGHT, &["disk"]);
    for range in [
        "1..=64",
        "1..=1048576",
        "0.001..=31536000",
        "0..=3600",
        "8192..=67108864",
        "1..=1024",
        "0..=100000",
        "1..=4096",
        "0..=100",
    ] {
        assert!(
            disk.contains(range),
            "enlight disk --help lacks {range}:\n{disk}"
        );
    }
    let nic = help(ENLIGHT, &["nic"]);
    for range in ["68..=65535", "1..=65536", "0..=255", "0.001..=31536000"] {
        assert!(
            nic.contains(range),
            "enlight nic --help lacks {range}:\n{nic}"
        );
    }
    let demo = help(ENLIGHT, &["demo"]);
    for range in ["1..=31536000", "1..=1048576"] {
        assert!(
            demo.contains(range),
            "enlight demo --help lacks {range}:\n{demo}"
        );
    }
    let emu = help(ENLIGHT, &["emulated-disk"]);
    assert!(
        emu.contains("1..=1048576") && emu.contains("0.001..=31536000"),
        "{emu}"
    );
    let enic = help(ENLIGHT, &["emulated-nic"]);
    assert!(
        enic.contains("0..=255") && enic.contains("0.001..=31536000"),
        "{enic}"
    );
    assert!(help(ENLIGHT, &["bench", "tune"]).contains("50..=60000"));
    assert!(help(ENLIGHT, &["bench", "compare"]).contains("0.1..=3600"));
}

/// A file of `mib` MiB whose every byte is 0xA5 (so a truncation or an overwrite shows).
fn user_file(path: &Path, mib: usize) {
    std::fs::write(path, vec![0xA5u8; mib << 20]).unwrap();
}

fn intact(path: &Path, mib: usize) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len(), mib << 20, "{} changed size", path.display());
    assert!(
        bytes.iter().all(|&b| b == 0xA5),
        "{} was overwritten",
        path.display()
    );
}

/// Runs `enlight <cmd> --create-mib <mib> <extra>` on `img` for 0.2 s of reads (reads only, so
/// any change to the file is the sizing's doing).
fn sized(cmd: &str, img: &Path, mib: &str, extra: &[&str]) -> Output {
    Command::new(ENLIGHT)
        .args([
            cmd,
            "--create-mib",
            mib,
            "--duration",
            "0.2",
            "--workload",
            "rw=100",
        ])
        .args(extra)
        .arg("--backing")
        .arg(img)
        .arg("--runtime-dir")
        .arg(img.with_extension("run"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

#[test]
fn a_backing_file_the_user_named_is_never_shrunk() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("existing.img");
    user_file(&img, 4);
    for cmd in ["disk", "emulated-disk"] {
        for mib in ["0", "1"] {
            let out = sized(cmd, &img, mib, &[]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && out.status.code() != Some(101),
                "{cmd} --create-mib {mib}: {:?}\n{stderr}",
                out.status
            );
            intact(&img, 4);
            if mib != "0" {
                // The refusal says why and what to do.
                assert!(
                    stderr.contains("existing.img") && stderr.contains("--shrink"),
                    "{cmd}: {stderr}"
                );
            }
        }
    }
    // Growing keeps every byte that was there.
    let out = sized("disk", &img, "8", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len(), 8 << 20);
    assert!(
        bytes[..4 << 20].iter().all(|&b| b == 0xA5),
        "growing overwrote data"
    );
    // With the flag that says so, the file is cut down.
    let out = sized("disk", &img, "2", &["--shrink"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 2 << 20);
}
