//! What a person sees at a terminal and what a program gets through a pipe: `enlight disk` run
//! in a real pseudo-terminal (util-linux `script`) prints readable lines, not JSON; with `--json`
//! (or through a pipe) one JSON object per line. Unprivileged: nothing is traced.

use std::process::Command;

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

fn disk_args(dir: &std::path::Path, name: &str) -> String {
    format!(
        "{ENLIGHT} disk --name {name} --backing {} --create-mib 8 --runtime-dir {} --workload qd=1,bs=4k,rate=200 --duration 1.5",
        dir.join(format!("{name}.img")).display(),
        dir.display()
    )
}

/// The command's output as a terminal showed it.
fn on_a_terminal(cmd: &str) -> String {
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", cmd, "/dev/null"])
        .output()
        .expect("script (util-linux)");
    assert!(out.status.success(), "{cmd}: {out:?}");
    String::from_utf8_lossy(&out.stdout).replace('\r', "")
}

#[test]
fn a_terminal_gets_readable_lines_and_json_is_asked_for_or_piped() {
    let dir = tempfile::tempdir().unwrap();
    let text = on_a_terminal(&disk_args(dir.path(), "h0"));
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{text}");
    assert!(lines.iter().all(|l| !l.starts_with('{')), "{text}");
    assert!(
        lines[0].contains("IOPS") && lines[0].contains("p99"),
        "{text}"
    );
    assert!(lines.last().unwrap().starts_with("done after "), "{text}");

    let json = on_a_terminal(&format!("{} --json", disk_args(dir.path(), "h1")));
    for l in json.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["ops_total"].is_u64(), "{l}");
    }
    let piped = Command::new("sh")
        .args(["-c", &disk_args(dir.path(), "h2")])
        .output()
        .unwrap();
    let last = String::from_utf8_lossy(&piped.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(v["done"], true, "{last}");
}
