//! A blocking HTTP client for enlightd's JSON API (the collector thread and the pin/unpin
//! requests use it; nothing here touches the terminal).

use std::time::Duration;

use crate::model::{Decision, DeviceHistogram, DeviceView, HealthView, Poll};

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection (daemon down, restarting, wrong address).
    #[error("cannot reach enlightd at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    /// The daemon answered with an error status.
    #[error("{path}: HTTP {status}: {message}")]
    Status {
        path: String,
        status: u16,
        message: String,
    },
    /// The daemon's answer was not what the API promises.
    #[error("{path}: unexpected response: {reason}")]
    Malformed { path: String, reason: String },
}

/// The daemon's address, normalised to `http://host:port` (no trailing slash).
pub fn base_url(addr: &str) -> String {
    let addr = addr.trim().trim_end_matches('/');
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// The answer of a pin or unpin request.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
pub struct PinResponse {
    pub device: String,
    pub pinned: bool,
}

/// A client for one daemon.
#[derive(Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `addr` (`host:port` or a URL), with short timeouts so a hung daemon shows up
    /// as disconnected within a second or two.
    pub fn new(addr: &str) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_millis(500))
            .timeout(Duration::from_secs(2))
            .build();
        Client {
            base: base_url(addr),
            agent,
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn error(&self, path: &str, e: ureq::Error) -> ClientError {
        match e {
            ureq::Error::Status(status, resp) => {
                let body = resp.into_string().unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                    .unwrap_or(body);
                ClientError::Status {
                    path: path.into(),
                    status,
                    message: message.trim().to_string(),
                }
            }
            ureq::Error::Transport(t) => ClientError::Unreachable {
                addr: self.base.clone(),
                reason: t
                    .message()
                    .map(String::from)
                    .unwrap_or_else(|| t.kind().to_string()),
            },
        }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self
            .agent
            .get(&format!("{}{path}", self.base))
            .call()
            .map_err(|e| self.error(path, e))?;
        let body = resp.into_string().map_err(|e| ClientError::Unreachable {
            addr: self.base.clone(),
            reason: e.to_string(),
        })?;
        serde_json::from_str(&body).map_err(|e| ClientError::Malformed {
            path: path.into(),
            reason: e.to_string(),
        })
    }

    /// `/api/v1/devices`.
    pub fn devices(&self) -> Result<Vec<DeviceView>, ClientError> {
        self.get("/api/v1/devices")
    }

    /// `/api/v1/health`.
    pub fn health(&self) -> Result<HealthView, ClientError> {
        self.get("/api/v1/health")
    }

    /// `/api/v1/histograms`.
    pub fn histograms(&self) -> Result<Vec<DeviceHistogram>, ClientError> {
        self.get("/api/v1/histograms")
    }

    /// `/api/v1/tuner/decisions?limit=N` (newest last); `Ok(None)` when the daemon has no tuner
    /// API (404).
    pub fn decisions(&self, limit: usize) -> Result<Option<Vec<Decision>>, ClientError> {
        match self.get(&format!("/api/v1/tuner/decisions?limit={limit}")) {
            Ok(d) => Ok(Some(d)),
            Err(ClientError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One poll: devices, health, histograms and decisions. Histograms and decisions are
    /// optional (an older daemon lacks them); devices and health are not.
    pub fn poll(&self, decisions: usize) -> Result<Poll, ClientError> {
        let devices = self.devices()?;
        let health = self.health()?;
        let histograms = match self.histograms() {
            Ok(h) => h,
            Err(ClientError::Status { status: 404, .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        let (decisions, tuner_api) = match self.decisions(decisions)? {
            Some(d) => (d, true),
            None => (Vec::new(), false),
        };
        Ok(Poll {
            devices,
            health,
            histograms,
            decisions,
            tuner_api,
        })
    }

    /// `POST /api/v1/devices/{name}/pin` (`pin = true`) or `.../unpin`.
    pub fn set_pinned(&self, device: &str, pin: bool) -> Result<PinResponse, ClientError> {
        let path = format!(
            "/api/v1/devices/{}/{}",
            encode_path_segment(device),
            if pin { "pin" } else { "unpin" }
        );
        let resp = self
            .agent
            .post(&format!("{}{path}", self.base))
            .call()
            .map_err(|e| self.error(&path, e))?;
        let body = resp.into_string().map_err(|e| ClientError::Unreachable {
            addr: self.base.clone(),
            reason: e.to_string(),
        })?;
        serde_json::from_str(&body).map_err(|e| ClientError::Malformed {
            path,
            reason: e.to_string(),
        })
    }
}

/// Percent-encodes everything but unreserved characters (device names are usually plain, but a
/// name is whatever the device process registered).
fn encode_path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeDaemon;

    #[test]
    fn addresses_normalise_to_a_base_url() {
        assert_eq!(base_url("127.0.0.1:9464"), "http://127.0.0.1:9464");
        assert_eq!(base_url("http://h:1/"), "http://h:1");
        assert_eq!(encode_path_segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn pin_and_unpin_post_to_the_contract_paths_and_parse_the_answer() {
        let fake = FakeDaemon::start();
        let c = Client::new(&fake.addr());
        let r = c.set_pinned("disk0", true).unwrap();
        assert_eq!(
            r,
            PinResponse {
                device: "disk0".into(),
                pinned: true
            }
        );
        assert!(!c.set_pinned("disk0", false).unwrap().pinned);
        let err = c.set_pinned("nope", true).unwrap_err();
        assert!(
            matches!(&err, ClientError::Status { status: 404, message, .. } if message == "no device \"nope\""),
            "{err}"
        );
        assert_eq!(
            fake.requests(),
            vec![
                "POST /api/v1/devices/disk0/pin",
                "POST /api/v1/devices/disk0/unpin",
                "POST /api/v1/devices/nope/pin",
            ]
        );
    }

    #[test]
    fn a_daemon_without_tuner_api_or_histograms_still_polls() {
        let fake = FakeDaemon::start();
        fake.set_tuner_api(false);
        let p = Client::new(&fake.addr()).poll(20).unwrap();
        assert!(!p.tuner_api);
        assert_eq!(p.devices.len(), 2);
        fake.set_tuner_api(true);
        let p = Client::new(&fake.addr()).poll(20).unwrap();
        assert!(p.tuner_api);
        assert_eq!(p.decisions.len(), 1);
        assert_eq!(p.histograms.len(), 2);
    }

    #[test]
    fn an_unreachable_daemon_is_a_typed_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = Client::new(&format!("127.0.0.1:{port}"))
            .poll(1)
            .unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    }
}
