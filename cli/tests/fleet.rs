//! Privileged: a fleet. Three `enlightd` processes, each in a network namespace of its own (as
//! three guests would be), each watching its own devices: every instance has a synthetic disk
//! called `disk0` (at 300, 600 and 150 IOPS), the third also an emulated disk. One real
//! Prometheus, in a fourth namespace joined to the three by veth pairs, scrapes all three with the
//! shipped rules. Then every expression of dashboards/enlight.json and every rule is evaluated at
//! one instant, once over the whole fleet and once per instance:
//!
//! - a per-instance query must return, for each instance, exactly the series (labels and values)
//!   the fleet-wide query returns for that instance: nothing merged across instances (three
//!   `disk0`s stay three);
//! - a query without an `instance` label must be one of the fleet panels, and equal what the
//!   instances' own figures give: sums the sum of the instances', ratios the ratio of those sums,
//!   percentiles the histogram_quantile of the bucket rates summed by `le` over the instances
//!   (computed here), never an average of percentiles;
//! - the fleet and per-instance recording rules equal the same computations from the per-device
//!   rules; every alert condition keeps `instance`;
//! - the figures are the expected ones: each `disk0` at its workload's rate, four devices.
//!
//! The namespaces (named after this process, so a killed run's are removed by the next) and
//! every process are removed at the end, also on failure.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::dashboard::{dashboard_queries, same, same_series, series_of, substitute, Prom};
use support::{repo, KillOnDrop};

const ENLIGHT: &str = env!("CARGO_BIN_EXE_enlight");
const ENLIGHTD: &str = env!("CARGO_BIN_EXE_enlightd");
const PREFIX: &str = "enlfl";
/// The synthetic disks' rates, one per instance.
const RATES: [f64; 3] = [300.0, 600.0, 150.0];

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The hub and three guest namespaces, joined hub-to-guest by veth pairs (10.213.i.1 in the
/// hub, 10.213.i.2 in guest i); all removed on drop.
struct Fleet {
    hub: String,
    guests: Vec<String>,
}

impl Fleet {
    fn create() -> Fleet {
        // Namespaces of a killed run of this test: their process is gone.
        for e in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|r| r.split(['h', 'g']).next())
                .and_then(|p| p.parse::<u32>().ok())
            {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = Command::new("ip").args(["netns", "delete", &name]).status();
                }
            }
        }
        let me = std::process::id();
        let fleet = Fleet {
            hub: format!("{PREFIX}{me}h"),
            guests: (0..3).map(|i| format!("{PREFIX}{me}g{i}")).collect(),
        };
        for ns in std::iter::once(&fleet.hub).chain(&fleet.guests) {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for (i, g) in fleet.guests.iter().enumerate() {
            let (vh, vg) = (format!("vh{i}"), format!("vg{i}"));
            ip(&[
                "link", "add", &vh, "netns", &fleet.hub, "type", "veth", "peer", "name", &vg,
                "netns", g,
            ]);
            ip(&[
                "-n",
                &fleet.hub,
                "addr",
                "add",
                &format!("10.213.{i}.1/24"),
                "dev",
                &vh,
            ]);
            ip(&["-n", &fleet.hub, "link", "set", &vh, "up"]);
            ip(&[
                "-n",
                g,
                "addr",
                "add",
                &format!("10.213.{i}.2/24"),
                "dev",
                &vg,
            ]);
            ip(&["-n", g, "link", "set", &vg, "up"]);
        }
        fleet
    }

    fn instance(i: usize) -> String {
        format!("10.213.{i}.2:9464")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for ns in std::iter::once(&self.hub).chain(&self.guests) {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// Moves the calling thread (only) into namespace `ns`.
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: setns on an open namespace file; it changes only this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// Prometheus's histogram_quantile over one set of (upper bound, cumulative rate) buckets.
fn bucket_quantile(q: f64, buckets: &BTreeMap<String, f64>) -> f64 {
    let mut b: Vec<(f64, f64)> = buckets
        .iter()
        .map(|(le, c)| {
            let upper = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (upper, *c)
        })
        .collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    if b.len() < 2 || b.last().unwrap().0 != f64::INFINITY {
        return f64::NAN;
    }
    // ensureMonotonic
    let mut max = f64::NEG_INFINITY;
    for x in &mut b {
        if x.1 > max {
            max = x.1;
        } else {
            x.1 = max;
        }
    }
    let observations = b.last().unwrap().1;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    let i = b.iter().position(|x| x.1 >= rank).unwrap();
    if i == b.len() - 1 {
        return b[b.len() - 2].0;
    }
    if i == 0 && b[0].0 <= 0.0 {
        return b[0].0;
    }
    let (mut start, end, mut count) = (0.0, b[i].0, b[i].1);
    if i > 0 {
        start = b[i - 1].0;
        count -= b[i - 1].1;
        rank -= b[i - 1].1;
    }
    start + (end - start) * (rank / count)
}

/// `expr` split at its top-level ` / ` (outside parentheses), if it has one.
fn split_ratio(expr: &str) -> Option<(&str, &str)> {
    let mut depth = 0i32;
    let bytes = expr.as_bytes();
    for (i, c) in bytes.iter().enumerate() {
        match c {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b'/' if depth == 0 && i > 0 && bytes[i - 1] == b' ' => {
                return Some((expr[..i].trim(), expr[i + 1..].trim()));
            }
            _ => {}
        }
    }
    None
}

/// `histogram_quantile(q, sum by (X, le) (INNER))` as (q, X, INNER).
fn quantile_parts(expr: &str) -> Option<(f64, Vec<String>, String)> {
    let rest = expr.strip_prefix("histogram_quantile(")?;
    let (q, rest) = rest.split_once(", sum by (")?;
    let (by, rest) = rest.split_once(") (")?;
    let inner = rest.strip_suffix("))")?;
    let by: Vec<String> = by
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| s != "le")
        .collect();
    Some((q.parse().ok()?, by, inner.to_string()))
}

/// The fleet value of a quantile query computed here: bucket rates per instance, summed by `le`
/// over the instances, then histogram_quantile.
fn fleet_quantiles(
    prom: &Prom,
    q: f64,
    by: &[String],
    inner: &str,
) -> BTreeMap<BTreeMap<String, String>, f64> {
    let mut groups: BTreeMap<BTreeMap<String, String>, BTreeMap<String, f64>> = BTreeMap::new();
    let mut by_instance = vec!["instance".to_string()];
    by_instance.extend(by.iter().cloned());
    by_instance.push("le".into());
    for (labels, v) in prom.query(&format!("sum by ({}) ({inner})", by_instance.join(", "))) {
        let key: BTreeMap<String, String> = labels
            .iter()
            .filter(|(k, _)| by.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        *groups
            .entry(key)
            .or_default()
            .entry(labels["le"].clone())
            .or_default() += v;
    }
    groups
        .into_iter()
        .map(|(k, b)| (k, bucket_quantile(q, &b)))
        .collect()
}

/// Panels that aggregate over instances on purpose.
const FLEET_PANELS: [&str; 7] = [
    "Latency heatmap",
    "p99 latency by kind",
    "Operations per second by kind",
    "Exits per operation by kind",
    "Devices",
    "Fleet latency percentiles (p50, p99, p999)",
    "Operations per second per instance and fleet",
];

/// `expr` without one pair of parentheses around all of it, if it has them.
fn unwrap_parens(expr: &str) -> &str {
    let Some(inner) = expr.strip_prefix('(').and_then(|r| r.strip_suffix(')')) else {
        return expr;
    };
    let mut depth = 0i32;
    for c in inner.chars() {
        depth += match c {
            '(' => 1,
            ')' => -1,
            _ => 0,
        };
        if depth < 0 {
            return expr; // the first '(' closes before the end
        }
    }
    inner
}

type Series = BTreeMap<BTreeMap<String, String>, f64>;

/// Checks one fleet-wide (instance-less) dashboard query against the instances' own figures.
fn check_fleet_query(prom: &Prom, what: &str, expr: &str, failures: &mut Vec<String>) {
    let expr_all = substitute(expr, ".+");
    let all: Series = prom.query(&expr_all).into_iter().collect();
    if all.is_empty() {
        failures.push(format!("{what}: no data"));
        return;
    }
    // The sum over the instances of `part` evaluated for each instance alone.
    let summed = |part: &str| -> Series {
        let mut sum = Series::new();
        for i in 0..3 {
            for (k, v) in prom.query(&substitute(part, &Fleet::instance(i))) {
                *sum.entry(k).or_default() += v;
            }
        }
        sum
    };
    let expected: Series = if let Some((q, by, inner)) = quantile_parts(&expr_all) {
        fleet_quantiles(prom, q, &by, &inner)
    } else if let Some((num, den)) = split_ratio(expr) {
        let (n, d) = (summed(unwrap_parens(num)), summed(den));
        n.iter()
            .filter_map(|(k, v)| d.get(k).map(|dv| (k.clone(), v / dv)))
            .collect()
    } else {
        summed(expr)
    };
    for (labels, v) in &all {
        match expected.get(labels) {
            Some(e) if same(*e, *v) => {}
            other => failures.push(format!(
                "{what}: {labels:?} is {v} over the fleet, the instances' figures give {other:?}"
            )),
        }
    }
}

#[test]
fn three_instances_one_prometheus_every_panel_and_rule_per_instance_and_fleet_wide() {
    let _lock = support::require_privileges();
    support::require_tools(&["prometheus", "promtool"], "prometheus");
    let rules = repo().join("dashboards/prometheus/enlight.rules.yml");
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");

    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::create();
    let mut processes: Vec<KillOnDrop> = Vec::new();
    for (i, guest) in fleet.guests.iter().enumerate() {
        let runtime = dir.path().join(format!("run{i}"));
        std::fs::create_dir_all(&runtime).unwrap();
        let config = dir.path().join(format!("enlightd{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"{}\"\nruntime_dir = \"{}\"\ninterval_ms = 500\ndevice_grace_secs = 600\n[tuner]\nmode = \"dry_run\"\n",
                Fleet::instance(i),
                runtime.display()
            ),
        )
        .unwrap();
        processes.push(KillOnDrop(
            Command::new("ip")
                .args(["netns", "exec", guest, ENLIGHTD, "--config"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(format!("enlightd{i}.log"))).unwrap())
                .spawn()
                .expect("start enlightd"),
        ));
        processes.push(KillOnDrop(
            Command::new(ENLIGHT)
                .args(["disk", "--name", "disk0", "--create-mib", "16", "--json"])
                .args([
                    "--workload",
                    &format!("qd=4,bs=4k,rw=70,pattern=random,rate={}", RATES[i]),
                ])
                .args(["--duration", "120", "--wait-for-probes", "60"])
                .arg("--backing")
                .arg(runtime.join("disk0.img"))
                .arg("--runtime-dir")
                .arg(&runtime)
                .stdout(Stdio::null())
                .spawn()
                .expect("start enlight disk"),
        ));
        if i == 2 {
            processes.push(KillOnDrop(
                Command::new(ENLIGHT)
                    .args([
                        "emulated-disk",
                        "--name",
                        "emu0",
                        "--create-mib",
                        "8",
                        "--json",
                    ])
                    .args(["--workload", "qd=1,bs=4k,rw=70,pattern=random"])
                    .args(["--duration", "120", "--wait-for-probes", "60"])
                    .arg("--backing")
                    .arg(runtime.join("emu0.img"))
                    .arg("--runtime-dir")
                    .arg(&runtime)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("start enlight emulated-disk"),
            ));
        }
    }
    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: enlightd\n    static_configs:\n      - targets: [\"{}\", \"{}\", \"{}\"]\n",
            rules.display(),
            Fleet::instance(0),
            Fleet::instance(1),
            Fleet::instance(2)
        ),
    )
    .unwrap();
    processes.push(KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &fleet.hub, "prometheus"])
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .args(["--web.listen-address=127.0.0.1:9090", "--log.level=warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    ));

    // From here this thread lives in the hub: Prometheus's loopback and the guests' addresses.
    enter(&fleet.hub);
    let mut prom = Prom::new("http://127.0.0.1:9090".into());
    let deadline = Instant::now() + Duration::from_secs(90);
    // Every instance scraped and counting I/O of all its devices.
    loop {
        prom.at_now_less(0.0);
        let ready = prom.ready()
            && prom
                .query("count by (instance) (enlight_io_ops_total > 0)")
                .len()
                == 3
            && prom.query("sum(enlight_devices)").first().map(|s| s.1) == Some(4.0);
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet did not come up in 90 s; daemon logs:\n{}",
            (0..3)
                .map(
                    |i| std::fs::read_to_string(dir.path().join(format!("enlightd{i}.log")))
                        .unwrap_or_default()
                )
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Long enough for the 10 s dashboard windows and the rules' 1 m windows to have samples.
    std::thread::sleep(Duration::from_secs(20));
    prom.at_now_less(1.0);

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("dashboards/enlight.json")).unwrap(),
    )
    .unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (what, expr) in dashboard_queries(&dashboard) {
        let expr_all = substitute(&expr, ".+");
        let all = prom.query(&expr_all);
        checked += 1;
        if all.is_empty() {
            // Only a settings-change annotation may be empty (nothing changed settings here).
            if !what.contains("Settings changes") {
                failures.push(format!("{what}: no data for {expr_all}"));
            }
            continue;
        }
        if all.iter().all(|(l, _)| l.contains_key("instance")) {
            // Per instance: selecting one instance gives exactly its series of the fleet query.
            for i in 0..3 {
                let inst = Fleet::instance(i);
                let mine = series_of(&all, &inst);
                let alone: BTreeMap<_, _> =
                    prom.query(&substitute(&expr, &inst)).into_iter().collect();
                if !same_series(&mine, &alone) {
                    failures.push(format!(
                        "{what}: instance {inst} alone gives {alone:?}, within the fleet {mine:?}"
                    ));
                }
            }
            if all.iter().any(|(l, _)| l.contains_key("device")) && expr.contains("enlight_io_") {
                // Three disk0s stay three.
                let disk0s = all
                    .iter()
                    .filter(|(l, _)| l.get("device").is_some_and(|d| d == "disk0"))
                    .map(|(l, _)| l["instance"].clone())
                    .collect::<std::collections::BTreeSet<_>>();
                if disk0s.len() != 3 {
                    failures.push(format!("{what}: disk0 on {disk0s:?}, want 3 instances"));
                }
            }
        } else if all.iter().any(|(l, _)| l.contains_key("instance")) {
            failures.push(format!(
                "{what}: some series have an instance, some not: {all:?}"
            ));
        } else if !FLEET_PANELS
            .iter()
            .any(|p| what.contains(&format!("{p:?}")))
        {
            failures.push(format!(
                "{what}: merges instances (no instance label) but is not a fleet panel: {expr}"
            ));
        } else {
            check_fleet_query(&prom, &what, &expr, &mut failures);
        }
    }
    if checked < 40 {
        failures.push(format!("only {checked} dashboard queries"));
    }

    // The figures themselves: each disk0 at its workload's rate; four devices, all attached.
    let ops = prom.query(&substitute(
        "sum by (instance, device) (rate(enlight_io_ops_total{instance=~\"$instance\"}[$__rate_interval]))",
        ".+",
    ));
    for (i, rate) in RATES.iter().enumerate() {
        let got = ops
            .iter()
            .find(|(l, _)| l["instance"] == Fleet::instance(i) && l["device"] == "disk0")
            .map(|s| s.1)
            .unwrap_or(0.0);
        if (got - rate).abs() > 0.2 * rate {
            failures.push(format!(
                "disk0 on instance {i}: {got:.0} ops/s, want {rate}"
            ));
        }
    }
    let devices = prom.query("sum(enlight_devices)");
    let attached = prom.query("count(min by (instance, device) (enlight_probe_attached) == 1)");
    if devices.first().map(|s| s.1) != Some(4.0) || attached.first().map(|s| s.1) != Some(4.0) {
        failures.push(format!(
            "devices {devices:?}, attached {attached:?}: want 4 and 4"
        ));
    }

    // The rules as Prometheus loaded them.
    let loaded = prom.get("/api/v1/rules", &[]);
    let mut n_rules = 0;
    for group in loaded["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            n_rules += 1;
            let name = rule["name"].as_str().unwrap();
            if rule["health"] != "ok" {
                failures.push(format!("rule {name}: {rule}"));
            }
            if rule["type"] == "alerting" {
                // Alerts are per instance: the condition's left side keeps the label.
                let query = rule["query"].as_str().unwrap();
                let left = query
                    .rsplit_once(" > ")
                    .or(query.rsplit_once(" == "))
                    .unwrap()
                    .0;
                let got = prom.query(left);
                if got.is_empty() || got.iter().any(|(l, _)| !l.contains_key("instance")) {
                    failures.push(format!("alert {name}: {left} gives {got:?}"));
                }
            } else if prom.query(name).is_empty() {
                failures.push(format!("recording rule {name}: no series"));
            }
        }
    }
    assert_eq!(n_rules, 16, "rules loaded: {loaded}");
    // Per instance and fleet rules, from the per-device ones (one evaluation, so exactly).
    let per_device_ops = prom.query("enlight:io_ops:rate1m");
    for i in 0..3 {
        let inst = Fleet::instance(i);
        let want: f64 = per_device_ops
            .iter()
            .filter(|(l, _)| l["instance"] == inst)
            .map(|s| s.1)
            .sum();
        let got = prom.query(&format!(
            "enlight_instance:io_ops:rate1m{{instance=\"{inst}\"}}"
        ));
        if got.len() != 1 || !same(got[0].1, want) {
            failures.push(format!(
                "enlight_instance:io_ops:rate1m {inst}: {got:?}, want {want}"
            ));
        }
    }
    for kind in ["synthetic", "emulated"] {
        let want: f64 = per_device_ops
            .iter()
            .filter(|(l, _)| l["kind"] == kind)
            .map(|s| s.1)
            .sum();
        let got = prom.query(&format!("enlight_fleet:io_ops:rate1m{{kind=\"{kind}\"}}"));
        if got.len() != 1 || !same(got[0].1, want) {
            failures.push(format!(
                "enlight_fleet:io_ops:rate1m {kind}: {got:?}, want {want}"
            ));
        }
        for (q, rule) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p999")] {
            let want = fleet_quantiles(
                &prom,
                q,
                &["kind".to_string()],
                &format!("enlight:io_latency_seconds_bucket:rate1m{{kind=\"{kind}\"}}"),
            );
            let name = format!("enlight_fleet:io_latency_seconds:{rule}_1m");
            let got = prom.query(&format!("{name}{{kind=\"{kind}\"}}"));
            let w = want.values().next().copied().unwrap_or(f64::NAN);
            if got.len() != 1 || !same(got[0].1, w) {
                failures.push(format!("{name} {kind}: {got:?}, from the buckets {w}"));
            }
        }
    }
    let per_instance_p99 = prom.query("enlight_instance:io_latency_seconds:p99_1m");
    let fleet_p99 = prom
        .query("histogram_quantile(0.99, sum by (le) (enlight:io_latency_seconds_bucket:rate1m))");
    eprintln!(
        "fleet test: {checked} dashboard queries; p99 per instance {:?}, fleet {:?} (the mean of the instances' would be {:.6})",
        per_instance_p99.iter().map(|s| s.1).collect::<Vec<_>>(),
        fleet_p99.first().map(|s| s.1),
        per_instance_p99.iter().map(|s| s.1).sum::<f64>() / per_instance_p99.len().max(1) as f64
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    drop(processes);
    drop(fleet);
}
