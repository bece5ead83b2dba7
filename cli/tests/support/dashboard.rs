//! A real Prometheus's view of the dashboard (dashboards/enlight.json): its queries, evaluated
//! at one instant, for the tests that run Prometheus over several enlightd instances (fleet.rs,
//! lab_fleet.rs).

use std::collections::BTreeMap;

use serde_json::Value;

pub struct Prom {
    pub base: String,
    pub agent: ureq::Agent,
    /// The instant every query is evaluated at (unix seconds).
    pub at: String,
}

impl Prom {
    /// The Prometheus serving at `base` (`http://127.0.0.1:9090`), queried at no instant yet.
    pub fn new(base: String) -> Prom {
        Prom {
            base,
            agent: ureq::AgentBuilder::new()
                .timeout(std::time::Duration::from_secs(10))
                .build(),
            at: String::new(),
        }
    }

    /// Queries from now on at `ago_s` seconds before now.
    pub fn at_now_less(&mut self, ago_s: f64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        self.at = format!("{:.3}", now - ago_s);
    }

    /// Whether Prometheus says it is ready.
    pub fn ready(&self) -> bool {
        self.agent
            .get(&format!("{}/-/ready", self.base))
            .call()
            .is_ok()
    }

    pub fn get(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut req = self.agent.get(&format!("{}{path}", self.base));
        for (k, v) in params {
            req = req.query(k, v);
        }
        match req.call() {
            Ok(r) => r.into_json().unwrap(),
            Err(ureq::Error::Status(_, r)) => r.into_json().unwrap(),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    /// An instant query at `self.at`: (labels without __name__, value).
    pub fn query(&self, expr: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let v = self.get("/api/v1/query", &[("query", expr), ("time", &self.at)]);
        assert_eq!(v["status"], "success", "query {expr}: {v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let mut labels: BTreeMap<String, String> = r["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                labels.remove("__name__");
                let value = r["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                (labels, value)
            })
            .collect()
    }
}

/// The series of `instance` among `all`.
pub fn series_of(
    all: &[(BTreeMap<String, String>, f64)],
    instance: &str,
) -> BTreeMap<BTreeMap<String, String>, f64> {
    all.iter()
        .filter(|(l, _)| l.get("instance").is_some_and(|i| i == instance))
        .cloned()
        .collect()
}

/// Whether two sets of series are the same: the same labels, each with the [`same`] value.
pub fn same_series(
    a: &BTreeMap<BTreeMap<String, String>, f64>,
    b: &BTreeMap<BTreeMap<String, String>, f64>,
) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|(k, v)| b.get(k).is_some_and(|w| same(*w, *v)))
}

/// Whether two sample values are the same (NaN equals NaN; a relative 1e-9 for rounding).
pub fn same(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// `expr` with the dashboard's variables: every instance or one, every kind and device.
pub fn substitute(expr: &str, instance: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("$instance", instance)
        .replace("$device", ".+")
        .replace("$kind", ".+")
}

/// Every query of the dashboard: (what, expr).
pub fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((
                    format!("panel {:?} {}", p["title"].as_str().unwrap(), t["refId"]),
                    t["expr"].as_str().unwrap().to_string(),
                ));
            }
            panels(&p["panels"], out);
        }
    }
    panels(&d["panels"], &mut out);
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(e) = a["target"]["expr"].as_str() {
            // The changes themselves may not happen in a short run: their series.
            let e = e.strip_suffix(" > 0").unwrap_or(e);
            out.push((format!("annotation {:?}", a["name"]), e.to_string()));
        }
    }
    out
}
