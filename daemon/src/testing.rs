//! Test helpers shared with the integration tests of other crates (not part of the API).

/// Asserts that Debian's `promtool check metrics` accepts `text`. Without promtool on `PATH` it
/// skips loudly on stderr (CI installs it), unless `ENLIGHT_REQUIRE_PROMTOOL` is set.
pub fn promtool_check(text: &str) {
    let out = match run_with_input("promtool", &["check", "metrics"], text) {
        Ok(out) => out,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && std::env::var_os("ENLIGHT_REQUIRE_PROMTOOL").is_none() =>
        {
            eprintln!("SKIPPED promtool check: promtool not found (apt-get install prometheus)");
            return;
        }
        Err(e) => panic!("promtool is needed to check the exposition: {e}"),
    };
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

/// A sample as a parser reads it: name, labels (sorted), value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Asserts that the OpenMetrics parser of Debian's `python3-prometheus-client` (strict: it
/// rejects a missing `# EOF`, a counter family named `_total`, a sample outside its family)
/// reads `text`, and returns what it read: `(sample name, labels sorted, value)`, sorted. Without
/// the package it skips loudly on stderr and returns `None`, unless `ENLIGHT_REQUIRE_PROMTOOL`
/// is set (`scripts/test-all.sh` installs both parsers and sets it).
pub fn openmetrics_check(text: &str) -> Option<Vec<Sample>> {
    // Debian's python3 (the package's), not whatever `python3` PATH finds first.
    const PARSE: &str = r#"
import sys, json
try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError:
    sys.exit(75)
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        out.append([s.name, sorted(s.labels.items()), repr(float(s.value))])
out.sort()
json.dump(out, sys.stdout)
"#;
    let out = match run_with_input("/usr/bin/python3", &["-c", PARSE], text) {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return missing_openmetrics_parser(),
        Err(e) => panic!("running /usr/bin/python3: {e}"),
    };
    if out.status.code() == Some(75) {
        return missing_openmetrics_parser();
    }
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition ({}):\n{}\n--- exposition ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Values as Python's repr: serde_json's own float parsing can be an ulp off.
    type Read = (String, Vec<(String, String)>, String);
    let read: Vec<Read> =
        serde_json::from_slice(&out.stdout).expect("the parser's samples as JSON");
    Some(
        read.into_iter()
            .map(|(n, l, v)| {
                let v = v.parse().unwrap_or_else(|e| panic!("{n}: value {v}: {e}"));
                (n, l, v)
            })
            .collect(),
    )
}

fn missing_openmetrics_parser<T>() -> Option<T> {
    if std::env::var_os("ENLIGHT_REQUIRE_PROMTOOL").is_some() {
        panic!("python3-prometheus-client is needed to check the OpenMetrics exposition");
    }
    eprintln!(
        "SKIPPED OpenMetrics check: no /usr/bin/python3 with prometheus_client (apt-get install python3-prometheus-client)"
    );
    None
}

/// Runs `program` with `input` on its standard input, and collects its output.
fn run_with_input(
    program: &str,
    args: &[&str],
    input: &str,
) -> std::io::Result<std::process::Output> {
    use std::io::Write;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // A parser that fails early closes its input: its report says why, not this write.
    let _ = child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes());
    child.wait_with_output()
}
