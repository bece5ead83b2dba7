//! Test helpers shared with the integration tests of other crates (not part of the API).

/// Asserts that Debian's `promtool check metrics` accepts `text`. Without promtool on `PATH` it
/// skips loudly on stderr (CI installs it), unless `ENLIGHT_REQUIRE_PROMTOOL` is set.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && std::env::var_os("ENLIGHT_REQUIRE_PROMTOOL").is_none() =>
        {
            eprintln!("SKIPPED promtool check: promtool not found (apt-get install prometheus)");
            return;
        }
        Err(e) => panic!("promtool is needed to check the exposition: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool exits 3 for lint warnings only (e.g. naming advice) and 1 for parse errors.
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{report}\n--- exposition ---\n{text}",
        out.status
    );
}
