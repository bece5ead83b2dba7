//! A fake enlightd for unit tests: a tiny HTTP/1.1 server on 127.0.0.1:0 that serves canned
//! API answers, implements pin/unpin as contract 6 says, and records every request.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<String>>,
    pinned: AtomicBool,
    no_tuner_api: AtomicBool,
}

pub struct FakeDaemon {
    addr: String,
    shared: Arc<Shared>,
}

impl FakeDaemon {
    pub fn start() -> FakeDaemon {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // Skip the headers (no request here has a body).
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                if method == "POST" {
                    s.requests.lock().unwrap().push(format!("{method} {path}"));
                }
                let (status, body) = answer(&s, method, path);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeDaemon { addr, shared }
    }

    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// The POST requests seen, in order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn set_tuner_api(&self, on: bool) {
        self.shared.no_tuner_api.store(!on, Ordering::SeqCst);
    }
}

fn device(name: &str, kind: &str, tuner: serde_json::Value) -> serde_json::Value {
    json!({"name": name, "device": "disk", "kind": kind, "pid": 7, "present": true,
           "attached": true, "attach_error": null,
           "settings": {"ring_out_bytes": 262144, "ring_in_bytes": 262144,
                        "moderation_frames": 8, "moderation_usecs": 50, "poll_budget": 64},
           "total": {"op": "all", "ops_total": 100, "bytes_total": 409600, "errors_total": 0,
                     "ops_per_sec": 10.0, "bytes_per_sec": 40960.0, "p50_seconds": 1e-5,
                     "p90_seconds": 2e-5, "p99_seconds": 5e-5, "p999_seconds": 1e-4},
           "ops": [], "interrupts_total": 50, "interrupts_per_sec": 5.0, "doorbells_total": 60,
           "ring_full_out_total": 0, "ring_full_in_total": 0, "irq_masked_total": 0,
           "tuner": tuner})
}

fn answer(s: &Shared, method: &str, path: &str) -> (&'static str, String) {
    let tuner_api = !s.no_tuner_api.load(Ordering::SeqCst);
    let pinned = s.pinned.load(Ordering::SeqCst);
    let tuner = if tuner_api {
        json!({"mode": "auto", "objective": "latency",
               "state": if pinned { "pinned" } else { "exploring" },
               "pinned": pinned, "last_decision": null, "recommendation": null})
    } else {
        serde_json::Value::Null
    };
    let ok = |v: serde_json::Value| ("200 OK", v.to_string());
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/api/v1/devices") => ok(json!([
            device("disk0", "synthetic", tuner),
            device("emu0", "emulated", serde_json::Value::Null)
        ])),
        ("GET", "/api/v1/health") => ok(json!({"devices": 2, "devices_attached": 2,
            "events_lost": 0, "errors": {}, "recent_errors": [], "ticks": 3})),
        ("GET", "/api/v1/histograms") => ok(json!([
            {"device": "disk0", "kind": "synthetic",
             "ops": [{"op": "read", "count": 100, "buckets": [[10000, 10078, 100]]}]},
            {"device": "emu0", "kind": "emulated", "ops": []}
        ])),
        ("GET", "/api/v1/tuner/decisions") if tuner_api => ok(json!([
            {"ts_unix_ms": 3_600_000, "device": "disk0", "action": "change",
             "from": {"moderation_frames": 8}, "to": {"moderation_frames": 16},
             "reason": "interrupts per op 0.9 > 0.5", "objective_value": 1.5}
        ])),
        ("POST", p) if p.starts_with("/api/v1/devices/") => {
            let rest = &p["/api/v1/devices/".len()..];
            let (name, verb) = rest.rsplit_once('/').unwrap_or((rest, ""));
            if name != "disk0" {
                return (
                    "404 Not Found",
                    json!({"error": format!("no device {name:?}")}).to_string(),
                );
            }
            let pin = match verb {
                "pin" => true,
                "unpin" => false,
                _ => return ("404 Not Found", json!({"error": "no route"}).to_string()),
            };
            s.pinned.store(pin, Ordering::SeqCst);
            ok(json!({"device": name, "pinned": pin}))
        }
        _ => ("404 Not Found", json!({"error": "no route"}).to_string()),
    }
}
