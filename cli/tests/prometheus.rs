//! The dashboards and rules against a real Prometheus: Debian's `prometheus` (started here on a
//! free loopback port with a temporary storage directory, killed at the end) scrapes a live
//! enlightd (in this process, real eBPF probes) watching a live `enlight disk` workload whose
//! settings are changed through its control socket. Then every expression of
//! dashboards/enlight.json and every rule Prometheus loaded from
//! dashboards/prometheus/enlight.rules.yml is evaluated through Prometheus's HTTP API and must
//! return data; every metric the dashboard names must exist on /metrics; and `promtool check
//! config`, `promtool check rules` and `promtool test rules` pass on the shipped files.
//!
//! The tuner runs in dry run, so its series (contract 6) exist and are checked like the rest.
//!
//! Prometheus asks for OpenMetrics first (`Accept: application/openmetrics-text;version=1.0.0,
//! ...,text/plain;version=0.0.4;q=0.5,...`), so this is the OpenMetrics exposition as a real
//! Prometheus parses it; the text format is what `metrics` below reads.
//!
//! Set `ENLIGHT_DASHBOARD_SNAPSHOT=path.json` to also save range queries of the main panels
//! (for dashboards/render.py), and `ENLIGHT_DASHBOARD_SNAPSHOT_SECS` to collect for longer.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{free_port, repo, spawn_disk, wait_for_io, KillOnDrop, LiveDaemon};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");

fn tool(name: &str) -> Command {
    let c = Command::new(name);
    if which(name).is_none() {
        panic!("{name} is needed (apt-get install prometheus)");
    }
    c
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn promtool(args: &[&str], cwd: &Path) {
    let out = tool("promtool")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_prometheus_config_and_rules_pass_promtool() {
    let dir = repo().join("dashboards/prometheus");
    promtool(&["check", "config", "prometheus.yml"], &dir);
    promtool(&["check", "rules", "enlight.rules.yml"], &dir);
    promtool(&["test", "rules", "enlight.rules.test.yml"], &dir);
}

/// Replaces Grafana's variables with what selects everything in the test.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("$instance", ".+")
        .replace("$device", ".+")
        .replace("$kind", ".+")
}

/// Every query of a dashboard: panel targets, annotation targets, variable queries
/// (`label_values(selector, label)` becomes `selector`).
fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((
                    format!(
                        "panel {:?} {}",
                        p["title"].as_str().unwrap_or(""),
                        t["refId"]
                    ),
                    t["expr"].as_str().expect("target has expr").to_string(),
                ));
            }
            panels(&p["panels"], out);
        }
    }
    panels(&d["panels"], &mut out);
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(e) = a["target"]["expr"].as_str() {
            out.push((format!("annotation {:?}", a["name"]), e.to_string()));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .expect("variables use label_values(selector, label)");
            let selector = inner.rsplit_once(',').unwrap().0.trim();
            out.push((format!("variable {:?}", v["name"]), selector.to_string()));
        }
    }
    out
}

/// `enlight_*` metric names an expression mentions (histogram suffixes kept).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("enlight_") {
        let start = i + pos;
        let boundary = start == 0
            || !(b[start - 1].is_ascii_alphanumeric()
                || b[start - 1] == b'_'
                || b[start - 1] == b':');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.push(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

/// Whether /metrics exposes `name` (a sample line starting with it).
fn exposed(metrics: &str, name: &str) -> bool {
    metrics.lines().filter(|l| !l.starts_with('#')).any(|l| {
        l.strip_prefix(name)
            .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
    })
}

/// The left side of `expr > 0.005` and the like (an alert's condition), if it has one.
fn left_of_comparison(expr: &str) -> Option<&str> {
    for op in [" > ", " < ", " >= ", " <= ", " == ", " != "] {
        if let Some((l, r)) = expr.rsplit_once(op) {
            if r.trim().parse::<f64>().is_ok() {
                return Some(l.trim());
            }
        }
    }
    None
}

struct Prometheus {
    _child: KillOnDrop,
    base: String,
    agent: ureq::Agent,
}

impl Prometheus {
    fn start(dir: &Path, target_port: u16) -> Prometheus {
        let port = free_port();
        let rules = repo().join("dashboards/prometheus/enlight.rules.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: enlightd\n    static_configs:\n      - targets: [\"127.0.0.1:{target_port}\"]\n",
                rules.display()
            ),
        )
        .unwrap();
        let child = tool("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            _child: KillOnDrop(child),
            base: format!("http://127.0.0.1:{port}"),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.agent.get(&format!("{}/-/ready", p.base)).call().is_err() {
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut req = self.agent.get(&format!("{}{path}", self.base));
        for (k, v) in params {
            req = req.query(k, v);
        }
        let body: Value = match req.call() {
            Ok(r) => r.into_json().unwrap(),
            Err(ureq::Error::Status(_, r)) => r.into_json().unwrap(),
            Err(e) => panic!("{path}: {e}"),
        };
        body
    }

    /// An instant query's result vector (panics on a query error).
    fn query(&self, expr: &str) -> Vec<Value> {
        let v = self.api("/api/v1/query", &[("query", expr)]);
        assert_eq!(v["status"], "success", "query {expr}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

#[test]
fn every_dashboard_and_rule_expression_returns_data_from_a_live_daemon() {
    if let Err(e) = enlight_probes::preflight() {
        panic!("privileged end-to-end test cannot run: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The tuner in dry run: its series exist (and it recommends) while the test alone changes
    // the settings.
    let daemon = LiveDaemon::start_tuned(dir.path(), port, enlightd::tuner::TunerMode::DryRun);
    let snapshot_secs: u64 = std::env::var("ENLIGHT_DASHBOARD_SNAPSHOT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let run_secs = 60 + snapshot_secs;
    let _disk = spawn_disk(
        ENLIGHT,
        dir.path(),
        "prom0",
        &format!("qd=16,bs=4k,rw=70,pattern=random,duration={run_secs}s"),
    );
    // An emulated disk too, when this build has one (contract 5), so that the emulated vs
    // enlightened panels compare two kinds.
    let emulated = Command::new(ENLIGHT)
        .args(["emulated-disk", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _emu = emulated.then(|| {
        KillOnDrop(
            Command::new(ENLIGHT)
                .args(["emulated-disk", "--name", "emu0", "--create-mib", "16"])
                .args([
                    "--wait-for-probes",
                    "30",
                    "--duration",
                    &run_secs.to_string(),
                ])
                .args(["--workload", "qd=1,bs=4k,rw=70,pattern=random"])
                .arg("--backing")
                .arg(dir.path().join("emu0.img"))
                .arg("--runtime-dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn enlight emulated-disk"),
        )
    });
    wait_for_io(&daemon.handle, "prom0");
    if emulated {
        wait_for_io(&daemon.handle, "emu0");
    } else {
        eprintln!("prometheus test: this build has no `enlight emulated-disk`; comparing one kind");
    }
    let prom = Prometheus::start(dir.path(), port);
    let started = Instant::now();

    // Settings changes through the device's control socket (contract 4), so that the
    // settings-change annotation has something to show.
    let socket = enlight_driver::control::socket_path(dir.path(), "prom0");
    let mut control = enlight_driver::control::ControlClient::connect(&socket)
        .unwrap_or_else(|e| panic!("control socket {}: {e}", socket.display()));
    let (before, _, _) = control.get().unwrap();
    let patch = |frames: u32| enlight_driver::control::SettingsPatch {
        moderation_frames: Some(frames),
        ..Default::default()
    };
    let sleep_until = |secs: u64| {
        while started.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Moderation doubled half-way through the run and restored 5 s before the end, so the
    // annotation's 1m window at the end sees a change however long the run.
    let end = 12 + snapshot_secs;
    sleep_until(4 + snapshot_secs / 2);
    control.set(patch(before.moderation_frames * 2)).unwrap();
    sleep_until(end - 5);
    control.set(patch(before.moderation_frames)).unwrap();
    // Enough samples for every rate window and the 1m recording rules.
    sleep_until(end);
    let metrics = daemon.handle.render_metrics();
    // Prometheus scrapes enlightd. The target's health is its last scrape's, and one scrape
    // slower than the 1 s timeout marks it down until the next: wait for an "up".
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let target = prom.api("/api/v1/targets", &[]);
        if target["data"]["activeTargets"][0]["health"] == "up" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus does not scrape enlightd: {target}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("dashboards/enlight.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    let mut failures = Vec::new();

    // The dashboard: every metric it names is on /metrics; every query returns data.
    for (what, expr) in dashboard_queries(&dashboard) {
        for m in metric_names(&expr) {
            if !exposed(&metrics, &m) {
                failures.push(format!("{what}: metric {m} is not on /metrics"));
            }
        }
        // The tuner may change nothing in a short run: its annotation's series must exist.
        let expr = if expr.contains("enlight_tuner_changes_total") {
            left_of_comparison(&expr).unwrap_or(&expr).to_string()
        } else {
            expr
        };
        let result = prom.query(&substitute(&expr));
        checked += 1;
        if result.is_empty() {
            failures.push(format!("{what}: no data for {expr}"));
        }
    }
    assert!(checked >= 25, "only {checked} dashboard queries found");
    if emulated {
        // The comparison row shows both kinds.
        for (what, expr) in dashboard_queries(&dashboard) {
            if what.contains("by kind") {
                let kinds: std::collections::BTreeSet<String> = prom
                    .query(&substitute(&expr))
                    .iter()
                    .filter_map(|r| r["metric"]["kind"].as_str().map(String::from))
                    .collect();
                if !(kinds.contains("synthetic") && kinds.contains("emulated")) {
                    failures.push(format!(
                        "{what}: kinds {kinds:?}, want synthetic and emulated"
                    ));
                }
            }
        }
    }

    // The rules, as Prometheus loaded them: healthy, and each returns data (an alert's
    // condition side, since a healthy system fires none; the recorded series themselves).
    let rules = prom.api("/api/v1/rules", &[]);
    let mut n_rules = 0;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            n_rules += 1;
            let name = rule["name"].as_str().unwrap();
            let query = rule["query"].as_str().unwrap();
            assert_eq!(rule["health"], "ok", "rule {name}: {rule}");
            for m in metric_names(query) {
                if !exposed(&metrics, &m) {
                    failures.push(format!("rule {name}: metric {m} is not on /metrics"));
                }
            }
            let (expr, what) = match rule["type"].as_str() {
                Some("alerting") => (
                    left_of_comparison(query)
                        .unwrap_or_else(|| panic!("alert {name} is not `expr OP number`"))
                        .to_string(),
                    format!("alert {name} (its condition's left side)"),
                ),
                _ => (query.to_string(), format!("recording rule {name}")),
            };
            if prom.query(&expr).is_empty() {
                failures.push(format!("{what}: no data for {expr}"));
            }
            if rule["type"] == "recording" && prom.query(name).is_empty() {
                failures.push(format!("recording rule {name}: no recorded series"));
            }
            checked += 1;
        }
    }
    assert_eq!(n_rules, 16, "rules loaded: {rules}");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("prometheus test: {checked} expressions returned data");

    if let Ok(path) = std::env::var("ENLIGHT_DASHBOARD_SNAPSHOT") {
        save_snapshot(&prom, &dashboard, Path::new(&path), started);
    }
    drop(control);
    daemon.stop();
}

/// Range queries of every dashboard panel over the run, for dashboards/render.py.
fn save_snapshot(prom: &Prometheus, dashboard: &Value, path: &Path, started: Instant) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = now - started.elapsed().as_secs_f64();
    let mut panels = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        let mut series = Vec::new();
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = substitute(t["expr"].as_str().unwrap());
            let v = prom.api(
                "/api/v1/query_range",
                &[
                    ("query", &expr),
                    ("start", &format!("{start:.3}")),
                    ("end", &format!("{now:.3}")),
                    ("step", "1"),
                ],
            );
            series.push(serde_json::json!({
                "refId": t["refId"], "legend": t["legendFormat"], "expr": expr,
                "format": t["format"], "result": v["data"]["result"],
            }));
        }
        panels.push(serde_json::json!({
            "title": p["title"], "type": p["type"],
            "unit": p["fieldConfig"]["defaults"]["unit"], "targets": series,
        }));
    }
    let settings = prom.api(
        "/api/v1/query_range",
        &[
            (
                "query",
                "sum by (device, knob) (increase(enlight_settings_changes_total[2s])) > 0",
            ),
            ("start", &format!("{start:.3}")),
            ("end", &format!("{now:.3}")),
            ("step", "1"),
        ],
    );
    std::fs::write(
        path,
        serde_json::to_string_pretty(&serde_json::json!({
            "start": start, "end": now, "panels": panels,
            "settings_changes": settings["data"]["result"],
        }))
        .unwrap(),
    )
    .unwrap();
}
