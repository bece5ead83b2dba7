//! What a bench says about the machine it ran on (shared by the bench binaries by `mod`).

/// The value after the colon of the first line of `path` that starts with `key`
/// (`/proc/cpuinfo`'s `model name`), or "unknown".
pub fn first_line(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
