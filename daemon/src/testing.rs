//! Test helpers shared with the integration tests of other crates (not part of the API).

/// Asserts that Debian's `promtool check metrics` accepts `text` (it must be installed: the test
/// command installs it; a missing promtool fails rather than skipping silently).
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool is needed to check the exposition (apt-get install prometheus): {e}")
        });
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
